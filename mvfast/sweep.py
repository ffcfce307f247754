"""Reproduce the paper's tables on the synthetic set (or any data python -m mvfast.train reads).

    python -m mvfast.sweep dropout            # Table 2: dropout 0 to 0.75, training/validation precision
    python -m mvfast.sweep baseline           # Table 1: the frame2d baseline beside the 3D model (tiny)
    python -m mvfast.sweep dropout --out runs/table2 -- --epochs 8 --batch-size 16

Each setting is one run of python -m mvfast.train, in a process of its own (one after the other), in its own
folder under --out; arguments after ``--`` go to every run. A run whose folder already holds a finished
summary is not repeated (--force trains it again), and one that was interrupted is resumed. Ends with a
markdown table of the runs' summaries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mvfast._cli import CLIError, run_main

SWEEPS = {
    # name: (what varies, [(column title, train arguments)])
    "dropout": [(f"dropout {d:g}", ["--dropout", str(d)]) for d in (0.0, 0.25, 0.5, 0.75)],
    "baseline": [
        ("traditional CNN (frame2d)", ["--preset", "frame2d"]),
        ("3D CNN (tiny)", ["--preset", "tiny"]),
    ],
}

ROWS = [
    ("training precision", lambda s: _f(s["train"].get("precision"))),
    ("validation precision", lambda s: _f(s["val"].get("precision"))),
    ("validation recall", lambda s: _f(s["val"].get("recall"))),
    ("validation top-1", lambda s: _f(s["val"].get("top1"))),
    ("validation top-5", lambda s: _f(s["val"].get("top5"))),
    ("validation mean class accuracy", lambda s: _f(s["val"].get("mean_class_accuracy"))),
    ("model convergence time", lambda s: f"{s['converged']['seconds']:.0f} s" if s.get("converged") else "-"),
    (
        "inference time per video",
        lambda s: f"{s['inference']['model_ms']:.1f} ms" if s.get("inference") else "-",
    ),
    ("... with decoding", lambda s: f"{s['inference']['total_ms']:.1f} ms" if s.get("inference") else "-"),
]


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(columns: list[tuple[str, dict]]) -> str:
    lines = ["| | " + " | ".join(title for title, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name, get in ROWS:
        lines.append(f"| {name} | " + " | ".join(get(s) for _, s in columns) + " |")
    return "\n".join(lines)


def sweep(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m mvfast.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("which", choices=sorted(SWEEPS), help="dropout (Table 2) or baseline (Table 1)")
    parser.add_argument("--out", default=None, help="folder of the runs (default: runs/sweep-<which>)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="train every run again, also where its summary exists (default: off)",
    )
    args = parser.parse_args(argv)
    if "--out" in extra or any(a.startswith("--out=") for a in extra):
        raise CLIError("give --out before --, to the sweep; each run gets a folder inside it")
    root = Path(args.out or f"runs/sweep-{args.which}")
    columns = []
    for title, run_args in SWEEPS[args.which]:
        folder = root / title.split(" (")[0].replace(" ", "-").replace("(", "").replace(")", "")
        summary_file = folder / "summary.json"
        if args.force or not summary_file.is_file():
            train_args = [*run_args, *extra, "--out", str(folder)]
            if args.force:
                train_args.append("--force")
            elif (folder / "last.pt").is_file():
                train_args.append("--resume")
            print(f"== {title}: python -m mvfast.train {' '.join(train_args)}", flush=True)
            done = subprocess.run([sys.executable, "-m", "mvfast.train", *train_args])
            if done.returncode != 0:
                raise CLIError(f"{title}: python -m mvfast.train exited with status {done.returncode}")
        columns.append((title, json.loads(summary_file.read_text())))
    result = table(columns)
    print(f"\n{'Table 2' if args.which == 'dropout' else 'Table 1'} on {columns[0][1]['data']}:\n\n{result}")
    (root / "table.md").write_text(result + "\n", encoding="utf-8")
    return result


def main(argv=None) -> int:
    return run_main("mvfast.sweep", sweep, argv)


if __name__ == "__main__":
    sys.exit(main())
