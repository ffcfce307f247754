"""Turn pytest-benchmark results into a markdown table of ratios.

    pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json

Each benchmark carries ``extra_info`` = {op, case, device, mode, impl, saved_bytes}; rows are grouped by
(op, case, device, mode), and every implementation is compared with the eager PyTorch reference and
torch.compile of it measured in the same run. A ratio above 1 means faster than that baseline. Where a
kernel's benchmark also ran the baselines taking turns with it (``turns_ms``), its ratios come from those
rounds; the median column is each benchmark's own.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("eager", "compile")


def _mib(n):
    return "" if n is None else f"{n / 2**20:.1f}"


def table(benchmarks: list[dict]) -> str:
    """Markdown from benchmark dicts, each with ``extra_info`` and ``stats`` (``median`` in seconds)."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if "impl" not in info or not b.get("stats"):
            continue
        key = (info["op"], info["case"], info["device"], info["mode"])
        groups[key][info["impl"]] = {
            "median": b["stats"]["median"],
            "saved": info.get("saved_bytes"),
            "turns": info.get("turns_ms") or {},
        }
    lines = [
        "| op | case | device | mode | impl | median ms | vs eager | vs compile | saved for backward MiB |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for key in sorted(groups):
        impls = groups[key]
        for impl in sorted(
            impls, key=lambda i: (i not in BASELINES, BASELINES.index(i) if i in BASELINES else 0, i)
        ):
            r = impls[impl]
            ratios = []
            for base in BASELINES:
                t = r["turns"]
                if base in t and impl in t:  # the rounds in which they took turns
                    ratios.append(f"{t[base] / t[impl]:.2f}x")
                else:
                    ratios.append(f"{impls[base]['median'] / r['median']:.2f}x" if base in impls else "")
            lines.append(
                f"| {' | '.join(key)} | {impl} | {r['median'] * 1e3:.2f} | {' | '.join(ratios)} | "
                f"{_mib(r['saved'])} |"
            )
    return "\n".join(lines)


def _find(benchmarks: list[dict], op: str, case: str, device: str, mode: str, impl: str) -> dict | None:
    """The measured benchmark (with stats) of one implementation in one group, or None."""
    for b in benchmarks:
        info = b.get("extra_info") or {}
        if (info.get("op"), info.get("case"), info.get("device"), info.get("mode"), info.get("impl")) == (
            op,
            case,
            device,
            mode,
            impl,
        ) and b.get("stats"):
            return b
    return None


def median(benchmarks: list[dict], op: str, case: str, device: str, mode: str, impl: str):
    """The median time in seconds of one implementation in one group, or None when it was not measured."""
    b = _find(benchmarks, op, case, device, mode, impl)
    return None if b is None else b["stats"]["median"]


def turns(benchmarks: list[dict], op: str, case: str, device: str, mode: str, impl: str) -> dict:
    """The medians (ms) of impl's benchmark and its baselines taking turns (benchutil.measure's
    ``against``), or {} where that benchmark did not take turns."""
    b = _find(benchmarks, op, case, device, mode, impl)
    return (b.get("extra_info") or {}).get("turns_ms") or {} if b is not None else {}


def ratio(benchmarks: list[dict], op: str, case: str, device: str, mode: str, impl: str, base: str):
    """median(base) / median(impl) for one group, or None when either is missing: from the rounds in which
    impl and base took turns where impl's benchmark ran them, else from their own benchmarks."""
    t = turns(benchmarks, op, case, device, mode, impl)
    if impl in t and base in t:
        return t[base] / t[impl]
    mi = median(benchmarks, op, case, device, mode, impl)
    mb = median(benchmarks, op, case, device, mode, base)
    return None if mi is None or mb is None else mb / mi


def verdict(benchmarks: list[dict], bar: dict) -> str:
    """One line: whether a bar of benchutil.BARS was met in these results, missed, or not measured."""
    where = (bar["op"], bar["case"], bar["device"], bar["mode"])
    if "max_ms" in bar:
        what = f"{' '.join(where)}: {bar['impl']} median"
        need = f"needs at most {bar['max_ms']:.2f} ms"
        t = median(benchmarks, *where, bar["impl"])
        if t is None:
            return f"{'not measured':<12}  {what} ({need})"
        return f"{'met' if t * 1e3 <= bar['max_ms'] else 'MISSED':<12}  {what}: {t * 1e3:.2f} ms ({need})"
    took_turns = bar["base"] in turns(benchmarks, *where, bar["impl"])
    what = f"{' '.join(where)}: {bar['impl']} vs {bar['base']}{', taking turns' if took_turns else ''}"
    need = f"needs {bar['at_least']:.2f}x"
    r = ratio(benchmarks, *where, bar["impl"], bar["base"])
    if r is None:
        return f"{'not measured':<12}  {what} ({need})"
    return f"{'met' if r >= bar['at_least'] else 'MISSED':<12}  {what}: {r:.2f}x ({need})"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('node', '')}\n")
    print(table(data["benchmarks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
