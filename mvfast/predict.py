"""Classify video files with a trained checkpoint.

    python -m mvfast.predict runs/train/best.pt clip.mp4 other.avi
    python -m mvfast.predict best.pt clip.mp4 --title "sunset at the beach" --top-k 3
    python -m mvfast.predict best.pt *.mp4 --json > predictions.json

For each video: the top-k classes with their probabilities (the mean over the test-time clips), the time to
decode it and the model's time, and the attention weights of the key (scene) frames with their times in the
video, highest first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mvfast._checkpoint import load_checkpoint, model_from_checkpoint
from mvfast._cli import CLIError, add_device_flags, pick_device, run_main, set_backend
from mvfast._inference import is_multi_label, labels_over, predict_file


def predict(argv=None) -> list[dict]:
    from mvfast.data import VideoDecodeError

    parser = argparse.ArgumentParser(
        prog="python -m mvfast.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint of python -m mvfast.train (or its output folder)")
    parser.add_argument(
        "videos", nargs="+", metavar="VIDEO", help="video files (mp4, avi, mkv, mov, webm, ...)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per video (default: 5)")
    parser.add_argument(
        "--title", action="append", help="title of a video (once per video, in order; default: none)"
    )
    parser.add_argument("--test-clips", type=int, help="clips averaged per video (default: the checkpoint's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (default: off)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label models: the labels are the classes scored at least this "
        "(default: the checkpoint's)",
    )
    add_device_flags(parser)
    args = parser.parse_args(argv)
    if args.title and len(args.title) != len(args.videos):
        raise CLIError(f"--title given {len(args.title)} times for {len(args.videos)} videos")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    missing = [v for v in args.videos if not Path(v).is_file()]
    if missing:
        raise CLIError(
            f"video file {missing[0]!r} does not exist"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    ckpt = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    set_backend(args.backend, device)
    model, data_cfg, classes = model_from_checkpoint(ckpt, device)
    threshold = args.threshold if args.threshold is not None else ckpt["config"].get("threshold", 0.5)
    if args.test_clips:
        data_cfg = data_cfg.replace(test_clips=args.test_clips)
    results, failed = [], 0
    for i, path in enumerate(args.videos):
        title = args.title[i] if args.title else None
        try:
            r = predict_file(model, path, data_cfg, device, title)
        except (VideoDecodeError, OSError) as e:
            failed += 1
            results.append({"video": path, "error": str(e)})
            if not args.json:
                print(f"{path}: skipped: {e}", file=sys.stderr)
            continue
        k = min(args.top_k, len(classes))
        top = r["probs"].topk(k)
        entry = {
            "video": path,
            "top": [
                {"label": str(classes[j]), "index": int(j), "prob": float(p)}
                for p, j in zip(top.values, top.indices, strict=True)
            ],
            "decode_ms": round(r["decode_ms"], 2),
            "model_ms": round(r["model_ms"], 2),
            "clips": data_cfg.test_clips,
        }
        if is_multi_label(model):  # scores are sigmoids: the labels are those over the threshold
            entry["labels"] = [str(classes[j]) for j in labels_over(r["probs"], threshold)]
        if r["attention"] is not None:
            weights = r["attention"][:, 0] if r["attention"].dim() == 2 else r["attention"]  # first head
            order = weights.argsort(descending=True).tolist()
            entry["key_frames"] = [
                {
                    "frame": int(f),
                    "seconds": r["scene_frame_seconds"][f],
                    "weight": round(float(weights[f]), 4),
                }
                for f in order
            ]
        results.append(entry)
        if not args.json:
            print(
                f"{path}  (decode {entry['decode_ms']:.1f} ms, model {entry['model_ms']:.1f} ms, "
                f"{entry['clips']} clips)"
            )
            if "labels" in entry:
                print(f"  labels (score >= {threshold:g}): {', '.join(entry['labels']) or 'none'}")
            for t in entry["top"]:
                print(f"  {t['prob']:6.3f}  {t['label']}")
            if "key_frames" in entry:
                frames = ", ".join(f"{f['seconds']:.2f}s: {f['weight']:.3f}" for f in entry["key_frames"])
                print(f"  key frames (attention): {frames}")
    if args.json:
        print(json.dumps({"checkpoint": ckpt["path"], "predictions": results}, indent=1))
    if failed == len(args.videos):
        raise CLIError(f"none of the {failed} videos could be decoded")
    return results


def main(argv=None) -> int:
    return run_main("mvfast.predict", predict, argv)


if __name__ == "__main__":
    sys.exit(main())
