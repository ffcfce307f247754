"""The run folder: where a training run goes, the log of what it showed, and the records it leaves.

A run folder is a record a team shares. A new run gets a new folder (``runs/train``, ``runs/train-2``, ...);
an ``--out`` that already holds a run is refused unless the run is resumed or ``--force`` starts over; every
file gets the mode the umask gives; ``train.log`` keeps what the console showed; ``metrics.csv`` has a row per
epoch, the learning rate included.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path

from mvfast._checkpoint import atomic_write_text
from mvfast._cli import CLIError
from mvfast._config import DEFAULT_OUT

METRIC_KEYS = ("loss", "precision", "recall", "top1", "top5", "mean_class_accuracy")
# multi-label: mvfast.metrics.multilabel_metrics (map on validation only: it needs every score)
MULTI_LABEL_KEYS = ("loss", "map", "micro_f1", "macro_f1", "precision", "recall", "top1")


def metric_keys(multi_label: bool) -> tuple[str, ...]:
    return MULTI_LABEL_KEYS if multi_label else METRIC_KEYS


# A folder holds a run once one of these is there: the run has trained (or finished).
RUN_MARKERS = ("last.pt", "best.pt", "summary.json")
# What a run writes, and --force removes.
RUN_FILES = (
    "config.yaml", "train.log", "last.pt", "best.pt", "metrics.csv", "precision.png", "loss.png",
    "summary.md", "summary.json",
)  # fmt: skip


def holds_run(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in RUN_MARKERS)


def refuse_taken(out: str | None, resume: bool, force: bool) -> None:
    """An --out given by the user that holds a run needs --resume or --force (checked by every process,
    before any of them waits on another)."""
    if out is not None and not resume and not force and holds_run(out):
        marker = next(n for n in RUN_MARKERS if (Path(out) / n).is_file())
        raise CLIError(
            f"--out {out} holds a run ({marker}): --resume continues it, --force starts a new one over it, "
            "or give another --out"
        )


def claim(out: str | None, force: bool) -> tuple[Path, str | None]:
    """The folder of a new run (or a resumed one), created; with no --out, the first of runs/train,
    runs/train-2, ... that holds no run. Returns the folder and a note for the log."""
    note = None
    if out is None:
        n = 1
        while holds_run(folder := Path(DEFAULT_OUT if n == 1 else f"{DEFAULT_OUT}-{n}")):
            n += 1
    else:
        folder = Path(out)
        if force and holds_run(folder):
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
            shutil.rmtree(folder / "tensorboard", ignore_errors=True)
            note = f"note: --force: removed the earlier run in {folder}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder, note


class RunLog:
    """What the console shows (rank 0's lines; other ranks print nothing), also written to train.log with the
    warnings that mvfast logs meanwhile."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.handler = None

    def open(self, path: Path, append: bool) -> None:
        self.file = open(path, "a" if append else "w", encoding="utf-8")
        self.handler = logging.StreamHandler(self.file)
        self.handler.setLevel(logging.WARNING)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("mvfast").addHandler(self.handler)

    def __call__(self, text: str = "") -> None:
        if not self.enabled:
            return
        print(text, flush=True)
        self.to_file(text)

    def to_file(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("mvfast").removeHandler(self.handler)
            self.handler = None
        if self.file is not None:
            self.file.close()
            self.file = None


def tensorboard(out: Path, log: RunLog):
    """A TensorBoard SummaryWriter into out/tensorboard, or None (with a note) when it is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("note: --tensorboard skipped: tensorboard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def epoch_line(row: dict, epochs: int) -> str:
    """The log line of an epoch's row of metrics.csv."""
    val = ""
    if "val_map" in row:
        val = f" | val loss {row['val_loss']:.3f} mAP {row['val_map']:.3f} F1 {row['val_micro_f1']:.3f}"
        val += f" (clips mAP {row['val_clip_map']:.3f})"
    elif "val_top1" in row:
        val = f" | val loss {row['val_loss']:.3f} top-1 {row['val_top1']:.3f}"
        val += f" (clips {row['val_clip_top1']:.3f})"
    skipped = f" | skipped {row['skipped']} files" if row.get("skipped") else ""
    return (
        f"epoch {row['epoch']}/{epochs} step {row['step']} | train loss {row['train_loss']:.3f} top-1 "
        f"{row['train_top1']:.3f}{val} | {row['time']:.0f} s{skipped}"
    )


def record_epoch(out: Path, history: list[dict], writer=None) -> None:
    """metrics.csv and the plots of the history so far, and the last row to TensorBoard."""
    write_metrics_csv(out / "metrics.csv", history)
    plot_history(out, history)
    if writer is not None:
        row = history[-1]
        for k, v in row.items():
            if k not in ("epoch", "step"):
                writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        writer.flush()


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(dict.fromkeys(k for row in history for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, text.getvalue())


def plot_history(out: Path, history: list[dict]) -> None:
    """precision.png and loss.png per epoch, training and validation (the paper's Fig. 3 and 4)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for key, title, name in (("precision", "Precision", "precision.png"), ("loss", "Loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in history if f"{split}_{key}" in r]
            if points:
                ax.plot(
                    *zip(*points, strict=True), style, label={"train": "training", "val": "validation"}[split]
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.lower())
        ax.set_title(f"{title} in training and validation sets")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f".{name}.tmp.png")
        plt.close(fig)
        os.replace(out / f".{name}.tmp.png", out / name)


def convergence(history: list[dict], monitor: str = "top1") -> dict | None:
    """Training time until validation top-1 (or another `monitor`) first came within 0.01 of the run's
    best."""
    key = f"val_{monitor}"
    vals = [r for r in history if key in r]
    if not vals:
        return None
    best = max(r[key] for r in vals)
    first = next(r for r in vals if r[key] >= best - 0.01)
    return {"seconds": first["time"], "epoch": first["epoch"], key: first[key]}


def summary_table(summary: dict) -> str:
    t, v = summary["train"], summary["val"]
    rows = [
        ("precision", "precision"),
        ("recall", "recall"),
        ("top-1", "top1"),
        ("top-5", "top5"),
        ("mean class accuracy", "mean_class_accuracy"),
        ("mAP", "map"),
        ("micro F1", "micro_f1"),
        ("macro F1", "macro_f1"),
        ("loss", "loss"),
    ]
    rows = [(name, k) for name, k in rows if k in t or k in v]

    def fmt(d, k):
        return f"{d[k]:.3f}" if k in d else "-"

    lines = [f"| {summary['preset']} ({summary['data']}) | training | validation |", "|---|---:|---:|"]
    lines += [f"| {name} | {fmt(t, k)} | {fmt(v, k)} |" for name, k in rows]
    conv = summary.get("converged")
    if conv:
        lines.append(f"| time to converge | {conv['seconds']:.0f} s (epoch {conv['epoch']}) | |")
    inf = summary.get("inference")
    if inf:
        lines.append(
            f"| inference time per video | {inf['model_ms']:.1f} ms model | "
            f"{inf['total_ms']:.1f} ms with decoding |"
        )
    lines.append(f"| training time | {summary['train_seconds']:.0f} s, {summary['steps']} steps | |")
    return "\n".join(lines)


def write_summary(out: Path, summary: dict, log: RunLog) -> None:
    """summary.json, and summary.md with the table that the log shows."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    table = summary_table(summary)
    atomic_write_text(out / "summary.md", table + "\n")
    log("\n" + table + "\n")
    log(f"outputs in {out}/ (train.log, last.pt, best.pt, metrics.csv, precision.png, loss.png, summary.md)")
