"""Running a trained model on videos, as every command does: one file (decode, cut its test clips, one
forward pass, the clips' mean), a whole loader (clip and video-level metrics), and timing it.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from mvfast._cli import to_device
from mvfast.metrics import classification_metrics, multilabel_metrics, video_level


def is_multi_label(model) -> bool:
    """Whether the model scores each class on its own (a sigmoid per class) rather than one of them."""
    return bool(getattr(model.config, "multi_label", False))


def scores(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Class scores (float32[N, C]) of logits (N, C): a softmax over the classes, or with multi_label a
    sigmoid per class. Every command turns logits into scores here, and averages the scores of a video's
    clips."""
    logits = logits.float()
    return logits.sigmoid() if multi_label else logits.softmax(1)


def labels_over(class_scores: torch.Tensor, threshold: float) -> list[int]:
    """The classes whose score (float[C]) is at least `threshold`, highest first: a multi-label prediction."""
    picked = (class_scores >= threshold).nonzero().flatten()
    return picked[class_scores[picked].argsort(descending=True)].tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(path, data_cfg, title: str | None = None) -> tuple[dict, dict]:
    """Decodes a file into a batch of its data_cfg.test_clips evenly spaced clips; returns (batch, facts)."""
    from mvfast.data import collate, decode_video, sample_clip, tokenize

    video = decode_video(path, data_cfg)
    samples = []
    for clip in range(data_cfg.test_clips):
        s = sample_clip(video, data_cfg, train=False, clip=clip)
        s["text"], s["text_mask"] = tokenize(title or "", data_cfg.vocab_size, data_cfg.max_title_tokens)
        samples.append(s)
    n = video.frames.shape[0]
    # the scene frames sample_clip takes: evenly spread, at these timeline indices
    scene_idx = np.minimum(
        ((np.arange(data_cfg.scene_frames) + 0.5) * n / data_cfg.scene_frames).astype(int), n - 1
    )
    facts = {
        "frames_decoded": int(n),
        "scene_frame_seconds": [round(float(i) / data_cfg.fps, 3) for i in scene_idx],
        "has_audio": video.audio is not None and len(video.audio) > 0,
    }
    return collate(samples), facts


@torch.no_grad()
def predict_file(model, path, data_cfg, device, title: str | None = None) -> dict:
    """probs (float[C], the class scores' mean over the clips; sigmoids for a multi-label model), attention
    (float[F, H] mean over the clips, or None), decode_ms, model_ms and the facts of :func:`prepare`."""
    t0 = time.perf_counter()
    batch, facts = prepare(path, data_cfg, title)
    batch = to_device(batch, device)
    _sync(device)
    t1 = time.perf_counter()
    out = model(batch)
    probs = scores(out["logits"], is_multi_label(model)).mean(0).cpu()
    _sync(device)
    t2 = time.perf_counter()
    attention = out.get("attention")
    return {
        "probs": probs,
        "attention": attention.float().mean(0).cpu() if attention is not None else None,
        "decode_ms": (t1 - t0) * 1e3,
        "model_ms": (t2 - t1) * 1e3,
        **facts,
    }


def time_inference(model, items, data_cfg, device, use_titles: bool = True) -> dict:
    """Median per-video inference time over some videos (each: decode without cache, its test clips, one
    forward pass), after one warm-up: model_ms (the forward pass) and total_ms (decoding included)."""
    was_training = model.training
    model.eval()
    model_ms, total_ms = [], []
    for i, item in enumerate([items[0], *items]):
        try:
            r = predict_file(model, item.path, data_cfg, device, item.title if use_titles else None)
        except (OSError, ValueError):
            continue
        if i > 0:
            model_ms.append(r["model_ms"])
            total_ms.append(r["model_ms"] + r["decode_ms"])
    model.train(was_training)
    if not model_ms:
        return {}
    return {
        "model_ms": statistics.median(model_ms),
        "total_ms": statistics.median(total_ms),
        "videos": len(model_ms),
        "clips_per_video": data_cfg.test_clips,
    }


@torch.no_grad()
def infer(model, loader, loss_fn, device, amp_dtype=None, gather=None) -> dict | None:
    """Runs `model` in eval mode over a test-mode loader.

    Returns {"probs" float[N, C] (the class scores, :func:`scores`), "labels" int64[N] (multi-hot int64[N, C]
    for multi-label data), "video_index" int64[N], "loss" (mean of loss_fn over the
    batches, weighted by size), "num_skipped", "skipped"}, or None when no clip could be decoded. `gather`
    (all_gather of a picklable object, under DDP) combines the ranks' shards; every rank gets the result.
    """
    was_training = model.training
    model.eval()
    multi_label = is_multi_label(model)
    probs, labels, videos, loss_sum, skipped = [], [], [], 0.0, []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["label"].numel() == 0:
            continue
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(batch)
            loss = loss_fn(out, batch["label"])
        probs.append(scores(out["logits"], multi_label).cpu())
        labels.append(batch["label"].cpu())
        videos.append(batch["video_index"].cpu())
        loss_sum += float(loss) * batch["label"].shape[0]
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
    count = sum(p["labels"].shape[0] for p in kept)
    return {
        "probs": torch.cat([p["probs"] for p in kept]),
        "labels": torch.cat([p["labels"] for p in kept]),
        "video_index": torch.cat([p["video_index"] for p in kept]),
        "loss": sum(p["loss_sum"] for p in kept) / count,
        "skipped": [s for p in parts for s in p["skipped"]],
        "num_skipped": sum(len(p["skipped"]) for p in parts),
    }


def validation_metrics(
    result: dict, num_classes: int, multi_label: bool = False, threshold: float = 0.5
) -> tuple[dict, dict]:
    """(clip-level, video-level) metrics of an :func:`infer` result. The loss of both is the clips' mean.
    Multi-label: :func:`mvfast.metrics.multilabel_metrics` at `threshold`."""
    vp, vl, _ = video_level(result["probs"], result["labels"], result["video_index"])
    if multi_label:
        clip = multilabel_metrics(result["probs"], result["labels"], threshold, loss=result["loss"])
        return clip, multilabel_metrics(vp, vl, threshold, loss=result["loss"])
    clip = classification_metrics(result["probs"], result["labels"], num_classes, loss=result["loss"])
    video = classification_metrics(vp, vl, num_classes, loss=result["loss"])
    return clip, video
