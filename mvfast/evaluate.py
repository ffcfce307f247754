"""Evaluate a checkpoint: clip-level and video-level (multi-clip averaged) metrics and the confusion matrix.

    python -m mvfast.evaluate runs/train/best.pt                        # the run's own validation set
    python -m mvfast.evaluate runs/train/best.pt --on train              # its training set, test-time clips
    python -m mvfast.evaluate best.pt --data ucf101 --data-root ~/UCF-101 --split 2
    python -m mvfast.evaluate best.pt --data folder --data-root held_out/ --val-fraction 1 --test-clips 5

Data flags are those of python -m mvfast.train and default to the checkpoint's run. Writes into --out
(default: the checkpoint's folder / eval-<name>): metrics.json (precision, recall, top-1, top-5, mean class
accuracy, loss; clip and video level), confusion.csv and confusion.png (video level, rows = true class).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import torch

from mvfast._cli import (
    CLIError,
    atomic_write_text,
    data_source,
    load_checkpoint,
    model_from_checkpoint,
    pick_device,
    run_main,
    set_backend,
    to_device,
)
from mvfast.metrics import classification_metrics, confusion_matrix, video_level

METRIC_NAMES = {
    "precision": "precision",
    "recall": "recall",
    "top1": "top-1",
    "top5": "top-5",
    "mean_class_accuracy": "mean class accuracy",
    "loss": "loss",
}


@torch.no_grad()
def infer(model, loader, loss_fn, device, amp_dtype=None, gather=None) -> dict | None:
    """Runs `model` in eval mode over a test-mode loader.

    Returns {"probs" float[N, C], "labels" int64[N], "video_index" int64[N], "loss" (mean of loss_fn over the
    batches, weighted by size), "num_skipped", "skipped"}, or None when no clip could be decoded. `gather`
    (all_gather of a picklable object, under DDP) combines the ranks' shards; every rank gets the result.
    """
    was_training = model.training
    model.eval()
    probs, labels, videos, loss_sum, skipped = [], [], [], 0.0, []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["label"].numel() == 0:
            continue
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
            loss = loss_fn(out, batch["label"])
        probs.append(out["logits"].float().softmax(1).cpu())
        labels.append(batch["label"].cpu())
        videos.append(batch["video_index"].cpu())
        loss_sum += float(loss) * batch["label"].numel()
    model.train(was_training)
    part = {
        "probs": torch.cat(probs) if probs else None,
        "labels": torch.cat(labels) if labels else None,
        "video_index": torch.cat(videos) if videos else None,
        "loss_sum": loss_sum,
        "skipped": skipped,
    }
    parts = gather(part) if gather is not None else [part]
    kept = [p for p in parts if p["probs"] is not None]
    if not kept:
        return None
    count = sum(p["labels"].numel() for p in kept)
    return {
        "probs": torch.cat([p["probs"] for p in kept]),
        "labels": torch.cat([p["labels"] for p in kept]),
        "video_index": torch.cat([p["video_index"] for p in kept]),
        "loss": sum(p["loss_sum"] for p in kept) / count,
        "skipped": [s for p in parts for s in p["skipped"]],
        "num_skipped": sum(len(p["skipped"]) for p in parts),
    }


def validation_metrics(result: dict, num_classes: int) -> tuple[dict, dict]:
    """(clip-level, video-level) metrics of an :func:`infer` result. The loss of both is the clips' mean."""
    clip = classification_metrics(result["probs"], result["labels"], num_classes, loss=result["loss"])
    vp, vl, _ = video_level(result["probs"], result["labels"], result["video_index"])
    video = classification_metrics(vp, vl, num_classes, loss=result["loss"])
    return clip, video


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


def table(metrics: dict) -> str:
    lines = ["| metric | clips | videos |", "|---|---:|---:|"]
    for key, name in METRIC_NAMES.items():
        lines.append(f"| {name} | {metrics['clip'][key]:.4f} | {metrics['video'][key]:.4f} |")
    lines.append(f"| count | {metrics['clip']['count']} | {metrics['video']['count']} |")
    return "\n".join(lines)


def evaluate(argv=None) -> dict:
    from torch.utils.data import DataLoader

    from mvfast.data import Collate, VideoDataset
    from mvfast.train import DATA_FIELDS, TrainConfig, build_parser, check_config

    parser = build_parser("python -m mvfast.evaluate", fields=DATA_FIELDS, description=__doc__)
    parser.add_argument("checkpoint", help="a checkpoint of python -m mvfast.train (or its output folder)")
    parser.add_argument("--on", choices=("val", "train"), default="val", help="which split (default: val)")
    parser.add_argument("--out", help="output folder (default: beside the checkpoint, eval-<name>)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per batch (default: 16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--backend", default="auto", help="mvfast kernels (default: auto)")
    args = vars(parser.parse_args(argv))
    ckpt = load_checkpoint(args.pop("checkpoint"))
    on, out, batch_size = args.pop("on"), args.pop("out", None), args.pop("batch_size")
    device = pick_device(args.pop("device"))
    set_backend(args.pop("backend"), device)

    stored = {k: v for k, v in ckpt["config"].items() if k in {f for f in TrainConfig.__dataclass_fields__}}
    cfg = TrainConfig(**{**stored, **args})
    check_config(cfg)
    model, data_cfg, classes = model_from_checkpoint(ckpt, device)
    data_cfg = data_cfg.replace(test_clips=cfg.test_clips)
    source = data_source(cfg, data_cfg, classes if cfg.data == "csv" else None)
    if len(source.classes) != len(classes) or [str(c) for c in source.classes] != [str(c) for c in classes]:
        raise CLIError(
            f"the data's {len(source.classes)} classes differ from the checkpoint's {len(classes)} "
            f"({source.classes[:5]}... vs {classes[:5]}...)"
        )
    items = source.val_items if on == "val" else source.train_items
    if not items:
        raise CLIError(f"{source.name}: no {on} videos")
    dataset = VideoDataset(items, classes, data_cfg, False, cfg.cache, source.use_titles, source.name)
    loader = DataLoader(dataset, batch_size, num_workers=cfg.workers, collate_fn=Collate())
    print(
        f"evaluating {ckpt['path']} on {source.name} "
        f"({on}: {len(items)} videos x {data_cfg.test_clips} clips)"
    )
    started = time.perf_counter()
    result = infer(model, loader, model.loss, device)
    if result is None:
        raise CLIError(f"none of the {len(items)} videos could be decoded")
    clip, video = validation_metrics(result, len(classes))
    vp, vl, _ = video_level(result["probs"], result["labels"], result["video_index"])
    cm = confusion_matrix(vp.argmax(1), vl, len(classes))
    out = Path(out) if out else Path(ckpt["path"]).parent / f"eval-{Path(ckpt['path']).stem}-{on}"
    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "checkpoint": ckpt["path"],
        "data": source.name,
        "split": on,
        "test_clips": data_cfg.test_clips,
        "clip": clip,
        "video": video,
        "skipped": result["num_skipped"],
        "skipped_files": [list(s) for s in result["skipped"]],
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_confusion(out, cm, [str(c) for c in classes])
    print(table(metrics))
    if result["num_skipped"]:
        print(f"skipped {result['num_skipped']} clips that could not be decoded (listed in metrics.json)")
    print(f"wrote {out / 'metrics.json'}, {out / 'confusion.csv'}, {out / 'confusion.png'}")
    return metrics


def main(argv=None) -> int:
    return run_main("mvfast.evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
