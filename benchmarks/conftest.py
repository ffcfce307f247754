"""After the benchmarks: the table of ratios against eager PyTorch and torch.compile measured in the same
run, and each performance bar the suites declare, met or not."""

import benchutil
import report


def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    # A benchmark that failed before it was timed has no data to summarise.
    results = [b.as_dict(include_data=False) for b in session.benchmarks if b.stats and b.stats.data]
    tr = terminalreporter
    tr.write_sep("=", "mvfast: ratios (baseline median / impl median; > 1 is faster)")
    tr.write_line(report.table(results))
    if benchutil.BARS:
        tr.write_sep("-", "mvfast: performance bars")
        for bar in benchutil.BARS:
            tr.write_line(_verdict(results, bar))


def _verdict(results, bar) -> str:
    where = (bar["op"], bar["case"], bar["device"], bar["mode"])
    if "max_ms" in bar:
        what = f"{' '.join(where)}: {bar['impl']} median"
        need = f"needs at most {bar['max_ms']:.2f} ms"
        t = report.median(results, *where, bar["impl"])
        if t is None:
            return f"{'not measured':<12}  {what} ({need})"
        return f"{'met' if t * 1e3 <= bar['max_ms'] else 'MISSED':<12}  {what}: {t * 1e3:.2f} ms ({need})"
    what = f"{' '.join(where)}: {bar['impl']} vs {bar['base']}"
    need = f"needs {bar['at_least']:.2f}x"
    r = report.ratio(results, *where, bar["impl"], bar["base"])
    if r is None:
        return f"{'not measured':<12}  {what} ({need})"
    return f"{'met' if r >= bar['at_least'] else 'MISSED':<12}  {what}: {r:.2f}x ({need})"
