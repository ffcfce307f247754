"""Classify videos with a trained checkpoint: files, folders (searched recursively) and manifests.

    python -m mvfast.predict runs/train/best.pt clip.mp4 other.avi               # printed
    python -m mvfast.predict best.pt clip.mp4 --title "sunset at the beach" --top-k 3
    python -m mvfast.predict best.pt *.mp4 --json > predictions.json
    python -m mvfast.predict best.pt videos/ list.csv more.txt --out preds.jsonl   # resumable
    python -m mvfast.predict best.pt videos/ --out preds.csv --all-probs
    python -m mvfast.predict best.pt long.mp4 --window 4 --stride 2 --out timeline.jsonl
    torchrun --nproc_per_node 4 -m mvfast.predict best.pt videos/ --out preds.jsonl

INPUT is any mix of video files, folders (every .mp4, .avi, .mkv, .mov, .webm, .m4v below them) and
manifests (.csv with a path column and optionally title; .txt, .lst or .list with a path per line;
relative paths are relative to the manifest).

For each video: the top-k classes with their probabilities (the mean over the test-time clips), the key
(scene) frames' attention weights with their times in the video, highest first, the decode and model
times, and a status: ok, partial (the file was cut short: frames_kept frames were used, reason says why) or
failed (error says why). --out writes them as JSONL (one object per line) or CSV, in chunks written
atomically: a rerun with the same --out skips the videos done (ok or partial) and tries the failed ones
again. Without --out they are printed (--json: one JSON document). With --window, each video's JSONL
object has a timeline: the top-k of every window of that many seconds, every --stride seconds.

Decoding runs in --workers DataLoader processes while the model runs on --batch-size videos at a time
(the clips of a video in one forward pass). Under torchrun each rank takes every WORLD_SIZE-th input and
writes its own chunks beside --out (a folder every rank can reach); rank 0 merges them into --out.

The exit status is 0 when every video succeeded (ok or partial), 1 when some failed (unless
--allow-failures), 2 on a mistake: a bad flag, a missing INPUT or checkpoint, or no video decodable at all.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import torch

from mvfast import _batch
from mvfast._checkpoint import atomic_write_text, load_for_inference
from mvfast._cli import CLIError, Processes, add_device_flags, run_main, set_backend
from mvfast._inference import is_multi_label, labels_over, scores

OUT_SUFFIXES = (".jsonl", ".csv")


def parse(argv):
    parser = _batch.job_parser("python -m mvfast.predict", __doc__)
    parser.add_argument(
        "--out", help="preds.jsonl or preds.csv: the predictions, resumable (default: printed)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per video (default: 5)")
    parser.add_argument(
        "--all-probs", action="store_true", help="every class's probability too (default: the top-k only)"
    )
    parser.add_argument(
        "--title", action="append", help="title of a video (once per video, in order; default: none)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (default: off)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label models: the labels are the classes scored at least this "
        "(default: the checkpoint's)",
    )
    parser.add_argument(
        "--window",
        type=float,
        metavar="SECONDS",
        help="predictions per segment of this many seconds too: a timeline (default: off)",
    )
    parser.add_argument(
        "--stride", type=float, metavar="SECONDS", help="seconds between segment starts (default: --window)"
    )
    _batch.add_job_flags(parser)
    add_device_flags(parser)
    args = parser.parse_args(argv)
    _batch.check_job_flags(args)
    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if args.out and Path(args.out).suffix.lower() not in OUT_SUFFIXES:
        raise CLIError(f"--out must end in {' or '.join(OUT_SUFFIXES)}, got {args.out!r}")
    if args.out and args.json:
        raise CLIError("--json prints the predictions and --out writes them: give one of them")
    if args.stride is not None and args.window is None:
        raise CLIError("--stride needs --window")
    for name in ("window", "stride"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise CLIError(f"--{name} must be > 0 seconds, got {value}")
    if args.window and args.out and Path(args.out).suffix.lower() == ".csv":
        raise CLIError("--window gives a timeline per video, which --out .csv cannot hold: use .jsonl")
    return args


def predict(argv=None) -> int:
    """The command; returns its exit status (see the module's docstring)."""
    args = parse(argv)
    videos = _batch.gather(args.inputs, args.title)
    processes, device = None, None
    loaded = None
    try:
        processes = Processes.start(args.device)
        device = processes.device
        set_backend(args.backend, device)
        loaded = load_for_inference(args.checkpoint, device)
        data_cfg = _batch.configure(args, loaded.data_config)
        out = Path(args.out) if args.out else None
        previous = read_rows(out) if out is not None and out.is_file() else {}
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        modalities = tuple(loaded.model.config.modalities)
        job = _batch.Job(
            "predict",
            videos,
            _batch.Cut(data_cfg, modalities, args.window, args.stride or args.window),
            processes,
            out.with_name(out.name + ".parts") if out is not None else None,
            previous,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk=args.chunk,
            progress=args.progress,
        )
        threshold = args.threshold if args.threshold is not None else loaded.threshold
        multi_label = is_multi_label(loaded.model)
        rows_of = Rows(
            loaded.classes, args.top_k, args.all_probs, args.window is not None, multi_label, threshold
        )
        if not job.run(loaded.model, device, rows_of):
            return 130
        summary = job.finish(lambda rows, _chunks: write(rows, out, args, loaded.source))
        if summary is not None and out is not None:
            print(_batch.summary_line("predict", summary, str(out)), file=sys.stderr)
        return _batch.exit_code("predict", summary, args.allow_failures)
    finally:
        if processes is not None:
            processes.close()


class Rows:
    """A batch's model output as each video's row (see the module's docstring)."""

    def __init__(
        self, classes: list, top_k: int, all_probs: bool, timeline: bool, multi_label=False, threshold=0.5
    ):
        self.classes = [str(c) for c in classes]
        self.k = min(top_k, len(classes))
        self.all_probs, self.timeline = all_probs, timeline
        self.multi_label, self.threshold = multi_label, threshold

    def top(self, probs: torch.Tensor) -> list[dict]:
        top = probs.topk(self.k)
        return [
            {"label": self.classes[j], "index": int(j), "prob": round(float(p), 6)}
            for p, j in zip(top.values, top.indices, strict=True)
        ]

    @staticmethod
    def key_frames(attention: torch.Tensor | None, seconds: list[float]) -> list[dict] | None:
        """Scene frames by attention weight (first head, mean over the clips), highest first."""
        if attention is None:
            return None
        weights = attention.mean(0)
        weights = weights[:, 0] if weights.dim() == 2 else weights
        order = weights.argsort(descending=True).tolist()
        return [
            {"frame": int(f), "seconds": seconds[f], "weight": round(float(weights[f]), 4)} for f in order
        ]

    def __call__(self, items, out, owner):
        for item, row, clips in _batch.video_rows(items, owner):
            if clips is None:
                yield row, None
                continue
            probs = scores(out["logits"][clips], self.multi_label)  # (clips of every segment, C)
            attention = out["attention"][clips] if "attention" in out else None
            segments = item["segments"]
            row["top"] = self.top(probs.mean(0))
            if self.multi_label:  # scores are sigmoids: the labels are those over the threshold
                row["labels"] = [self.classes[j] for j in labels_over(probs.mean(0), self.threshold)]
                row["threshold"] = self.threshold
            if len(segments) == 1:
                frames = self.key_frames(attention, segments[0]["scene_seconds"])
                if frames is not None:
                    row["key_frames"] = frames
            if self.all_probs:
                row["probs"] = {
                    c: round(float(p), 6) for c, p in zip(self.classes, probs.mean(0), strict=True)
                }
            if self.timeline:
                row["timeline"], lo = [], 0
                for seg in segments:
                    part = slice(lo, lo + seg["clips"])
                    lo += seg["clips"]
                    entry = {"start": seg["start"], "end": seg["end"], "top": self.top(probs[part].mean(0))}
                    frames = self.key_frames(
                        attention[part] if attention is not None else None, seg["scene_seconds"]
                    )
                    if frames is not None:
                        entry["key_frames"] = frames
                    row["timeline"].append(entry)
            row.update(
                decode_ms=round(item["decode_ms"], 2),
                model_ms=round(item["model_ms"], 2),
                clips=len(clips),
                **item["facts"],
            )
            yield row, None


# ---------------------------------------------------------------------------------------------------------
# Reading and writing the output


def read_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier --out (JSONL or CSV), by video."""
    rows = {}
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                found = list(csv.DictReader(f))
        else:
            text = path.read_text(encoding="utf-8")
            found = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise CLIError(f"--out {str(path)!r} exists but cannot be read as predictions ({e})") from None
    for row in found:
        if not isinstance(row, dict) or "video" not in row or "status" not in row:
            raise CLIError(
                f"--out {str(path)!r} exists but is not a predictions file (rows need video, status)"
            )
        rows[row["video"]] = row
    return rows


def flat(row: dict) -> dict:
    """A row as CSV columns (one already flat, read from a CSV, stays as it is)."""
    if "top" not in row and "key_frames" not in row and "probs" not in row:
        return row
    out = {k: v for k, v in row.items() if k not in ("top", "key_frames", "probs", "timeline")}
    top = row.get("top") or []
    if top:
        out["top1_label"], out["top1_prob"] = top[0]["label"], top[0]["prob"]
        out["top_labels"] = ";".join(t["label"] for t in top)
        out["top_probs"] = ";".join(str(t["prob"]) for t in top)
    if isinstance(row.get("labels"), list):
        out["labels"] = "|".join(row["labels"])
    if row.get("key_frames"):
        out["key_frames"] = ";".join(f"{f['seconds']}s:{f['weight']}" for f in row["key_frames"])
    for label, p in (row.get("probs") or {}).items():
        out[f"prob:{label}"] = p
    return out


def write(rows: list[dict], out: Path | None, args, source: str) -> None:
    if out is None:
        show(rows, args, source)
        return
    if out.suffix.lower() == ".jsonl":
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        return
    flats = [flat(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flats for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flats)
    atomic_write_text(out, text.getvalue())


def show(rows: list[dict], args, source: str) -> None:
    """Without --out: JSON (--json) or text on stdout, failures on stderr."""
    if args.json:
        print(json.dumps({"checkpoint": source, "predictions": rows}, indent=1))
        return
    for r in rows:
        if r["status"] == "failed":
            print(f"{r['video']}: skipped: {r['error']}", file=sys.stderr)
            continue
        note = f", partial: {r['frames_kept']} frames kept" if r["status"] == "partial" else ""
        print(
            f"{r['video']}  (decode {r['decode_ms']:.1f} ms, model {r['model_ms']:.1f} ms, "
            f"{r['clips']} clips{note})"
        )
        if "labels" in r:
            print(f"  labels (score >= {r['threshold']:g}): {', '.join(r['labels']) or 'none'}")
        for t in r["top"]:
            print(f"  {t['prob']:6.3f}  {t['label']}")
        if "key_frames" in r:
            frames = ", ".join(f"{f['seconds']:.2f}s: {f['weight']:.3f}" for f in r["key_frames"])
            print(f"  key frames (attention): {frames}")
        for seg in r.get("timeline", []):
            best = seg["top"][0]
            print(f"  {seg['start']:7.2f}-{seg['end']:.2f}s  {best['prob']:6.3f}  {best['label']}")


def main(argv=None) -> int:
    return run_main("mvfast.predict", predict, argv)


if __name__ == "__main__":
    sys.exit(main())
