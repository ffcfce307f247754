"""Evaluate a checkpoint: clip-level and video-level (multi-clip averaged) metrics and the confusion matrix.

    python -m mvfast.evaluate runs/train/best.pt                        # the run's own validation set
    python -m mvfast.evaluate runs/train/best.pt --on train              # its training set, test-time clips
    python -m mvfast.evaluate best.pt --data ucf101 --data-root ~/UCF-101 --split 2
    python -m mvfast.evaluate best.pt --data folder --data-root held_out/ --val-fraction 1 --test-clips 5

The checkpoint is a run's best.pt or last.pt, the run folder (its last.pt), or a folder written by
python -m mvfast.export. Data flags are those of python -m mvfast.train and default to the checkpoint's run.
Writes into --out (default: eval-<checkpoint name>-<split> beside the checkpoint): metrics.json (precision,
recall, top-1, top-5, mean class accuracy, loss; clip and video level), confusion.csv and confusion.png
(video level, rows = true class).

A multi-label model (trained with --multi-label) gets instead: metrics.json with mAP, micro and macro F1,
micro precision and recall at --threshold, top-1 and loss, and per class its AP, F1, precision, recall and
support; per_class.csv (the same per class, video level); predictions.csv (each video: its labels, the
labels whose score is at least --threshold, and every class's score).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch

from mvfast._checkpoint import atomic_write_text, load_checkpoint, model_from_checkpoint
from mvfast._cli import CLIError, add_device_flags, pick_device, run_main, set_backend
from mvfast._config import DATA_FIELDS, FIELDS, TrainConfig, build_parser, check, open_source
from mvfast._inference import infer, is_multi_label, labels_over, validation_metrics
from mvfast.metrics import confusion_matrix, video_level

METRIC_NAMES = {
    "precision": "precision",
    "recall": "recall",
    "top1": "top-1",
    "top5": "top-5",
    "mean_class_accuracy": "mean class accuracy",
    "loss": "loss",
}


def write_confusion(out: Path, cm: torch.Tensor, classes: list[str]) -> None:
    with open(out / "confusion.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, cm.tolist(), strict=True):
            writer.writerow([name, *row])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: confusion.png skipped: matplotlib is not installed", file=sys.stderr)
        return
    C = len(classes)
    side = min(max(4.0, 0.35 * C + 2), 40.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    norm = cm.double() / cm.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if C <= 40:
        ax.set_xticks(range(C), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(C), classes, fontsize=7)
        for i in range(C):
            for j in range(C):
                if cm[i, j]:
                    colour = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (videos, rows normalised)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png")
    plt.close(fig)


MULTI_LABEL_NAMES = {
    "map": "mAP",
    "micro_f1": "micro F1",
    "macro_f1": "macro F1",
    "precision": "precision (micro)",
    "recall": "recall (micro)",
    "top1": "top-1 (a label ranked first)",
    "loss": "loss",
}


def write_multi_label(out: Path, metrics: dict, vp, vl, videos, items, classes, threshold: float) -> None:
    """per_class.csv (video level) and predictions.csv: every video's labels, those over the threshold and its
    scores."""
    per = metrics["video"]["per_class"]
    with open(out / "per_class.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "ap", "f1", "precision", "recall", "support"])
        for c, name in enumerate(classes):
            ap = per["ap"][c]
            row = [f"{per[k][c]:.6g}" for k in ("f1", "precision", "recall")]
            writer.writerow([name, "" if ap is None else f"{ap:.6g}", *row, per["support"][c]])
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", f"predicted (score >= {threshold:g})", *classes])
        for scores, hot, v in zip(vp, vl, videos.tolist(), strict=True):
            true = "|".join(classes[c] for c in hot.nonzero().flatten().tolist())
            predicted = "|".join(classes[c] for c in labels_over(scores, threshold))
            writer.writerow([items[v].path, true, predicted, *(f"{p:.5f}" for p in scores.tolist())])


def table(metrics: dict) -> str:
    lines = ["| metric | clips | videos |", "|---|---:|---:|"]
    names = MULTI_LABEL_NAMES if "map" in metrics["clip"] else METRIC_NAMES
    for key, name in names.items():
        lines.append(f"| {name} | {metrics['clip'][key]:.4f} | {metrics['video'][key]:.4f} |")
    lines.append(f"| count | {metrics['clip']['count']} | {metrics['video']['count']} |")
    return "\n".join(lines)


def evaluate(argv=None) -> dict:
    from torch.utils.data import DataLoader

    from mvfast.data import Collate, VideoDataset

    parser = build_parser("python -m mvfast.evaluate", __doc__, fields=DATA_FIELDS, shown="the checkpoint's")
    parser.add_argument("checkpoint", help="a checkpoint of python -m mvfast.train (or its output folder)")
    parser.add_argument(
        "--on",
        choices=("val", "train"),
        default="val",
        help="the split of the data to evaluate on (default: val)",
    )
    parser.add_argument(
        "--out", help="output folder (default: eval-<checkpoint name>-<split> beside the checkpoint)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch (default: 16)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label: a class is predicted where its score is at least this (default: the checkpoint's)",
    )
    add_device_flags(parser)
    args = vars(parser.parse_args(argv))
    ckpt = load_checkpoint(args.pop("checkpoint"))
    on, out, batch_size = args.pop("on"), args.pop("out", None), args.pop("batch_size")
    threshold = args.pop("threshold", None)
    device = pick_device(args.pop("device"))
    set_backend(args.pop("backend"), device)

    stored = {k: v for k, v in ckpt["config"].items() if k in FIELDS}
    if threshold is not None:
        args["threshold"] = threshold
    cfg = TrainConfig(**{**stored, **args})
    check(cfg)
    model, data_cfg, classes = model_from_checkpoint(ckpt, device)
    multi_label = is_multi_label(model)
    data_cfg = data_cfg.replace(test_clips=cfg.test_clips)
    source = open_source(cfg, data_cfg, classes if cfg.data == "csv" else None)
    if len(source.classes) != len(classes) or [str(c) for c in source.classes] != [str(c) for c in classes]:
        raise CLIError(
            f"the data's {len(source.classes)} classes differ from the checkpoint's {len(classes)} "
            f"({source.classes[:5]}... vs {classes[:5]}...)"
        )
    items = source.val_items if on == "val" else source.train_items
    if not items:
        raise CLIError(f"{source.name}: no {on} videos")
    dataset = VideoDataset(
        items, classes, data_cfg, False, cfg.cache, source.use_titles, source.name, multi_label=multi_label
    )
    loader = DataLoader(dataset, batch_size, num_workers=cfg.workers, collate_fn=Collate())
    print(
        f"evaluating {ckpt['path']} on {source.name} "
        f"({on}: {len(items)} videos x {data_cfg.test_clips} clips)"
    )
    started = time.perf_counter()
    result = infer(model, loader, model.loss, device)
    if result is None:
        raise CLIError(f"none of the {len(items)} videos could be decoded")
    clip, video = validation_metrics(result, len(classes), multi_label, cfg.threshold)
    vp, vl, videos = video_level(result["probs"], result["labels"], result["video_index"])
    out = Path(out) if out else Path(ckpt["path"]).parent / f"eval-{Path(ckpt['path']).stem}-{on}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "checkpoint": ckpt["path"],
        "data": source.name,
        "split": on,
        "test_clips": data_cfg.test_clips,
        **({"threshold": cfg.threshold, "classes": [str(c) for c in classes]} if multi_label else {}),
        "clip": clip,
        "video": video,
        "skipped": result["num_skipped"],
        "skipped_files": [list(s) for s in result["skipped"]],
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    names = [str(c) for c in classes]
    if multi_label:
        write_multi_label(out, metrics, vp, vl, videos, items, names, cfg.threshold)
        written = ("metrics.json", "per_class.csv", "predictions.csv")
    else:
        write_confusion(out, confusion_matrix(vp.argmax(1), vl, len(classes)), names)
        written = ("metrics.json", "confusion.csv", "confusion.png")
    print(table(metrics))
    if result["num_skipped"]:
        print(f"skipped {result['num_skipped']} clips that could not be decoded (listed in metrics.json)")
    print("wrote " + ", ".join(str(out / name) for name in written))
    return metrics


def main(argv=None) -> int:
    return run_main("mvfast.evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
