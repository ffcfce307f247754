"""After the benchmarks: the table of ratios against eager PyTorch and torch.compile measured in the same
run, and each performance bar the suites declare, met or not."""

import benchutil
import report


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    results = [b.as_dict(include_data=False) for b in session.benchmarks]
    tr = terminalreporter
    tr.write_sep("=", "mvfast: ratios (baseline median / impl median; > 1 is faster)")
    tr.write_line(report.table(results))
    if benchutil.BARS:
        tr.write_sep("-", "mvfast: performance bars")
        for bar in benchutil.BARS:
            r = report.ratio(
                results, bar["op"], bar["case"], bar["device"], bar["mode"], bar["impl"], bar["base"]
            )
            what = f"{bar['op']} {bar['case']} {bar['device']} {bar['mode']}: {bar['impl']} vs {bar['base']}"
            if r is None:
                tr.write_line(f"not measured  {what} (needs {bar['at_least']:.2f}x)")
            else:
                verdict = "met" if r >= bar["at_least"] else "MISSED"
                tr.write_line(f"{verdict:<12}  {what}: {r:.2f}x (needs {bar['at_least']:.2f}x)")
