"""After the benchmarks: the table of ratios against eager PyTorch and torch.compile measured in the same
run, and each performance bar the suites declare, met or not."""

import benchutil
import pytest
import report
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module's benchmarks (``pytestmark = pytest.mark.usefixtures(...)``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    # A benchmark that failed before it was timed has no data to summarise.
    results = [b.as_dict(include_data=False) for b in session.benchmarks if b.stats and b.stats.data]
    tr = terminalreporter
    tr.write_sep("=", "mvfast: ratios (baseline median / impl median; > 1 is faster)")
    tr.write_line(report.table(results))
    for make in benchutil.TABLES:
        text = make(results)
        if text:
            tr.write_line("")
            tr.write_line(text)
    if benchutil.BARS:
        tr.write_sep("-", "mvfast: performance bars")
        for bar in benchutil.BARS:
            tr.write_line(report.verdict(results, bar))
