"""Running a model over many videos, as predict and extract do: the inputs, decoding in DataLoader workers,
batches across files, a status per file, output in chunks that a rerun resumes from, and shards under
torchrun.

    inputs (files, folders, manifests) -> this rank's share -> those not done yet -> DataLoader workers
    (each decodes a file and cuts its test clips, per segment with --window) -> batches of videos -> the
    model, the clips of a video in one forward pass -> per-video results -> chunks written atomically ->
    rank 0 merges every rank's chunks into the output

A command gives a :class:`Job` its videos and two functions: ``consume`` turns a batch's model output into
each video's output row (and arrays), ``merge`` writes the final output from the rows (see predict.py and
extract.py). Rows are dicts with at least ``video`` (the path as given) and ``status``: ``ok``, ``partial``
(the file was cut short; ``frames_kept`` source frames were decoded and used, ``reason`` says what FFmpeg
said) or ``failed`` (``error`` says why). A rerun with the same output skips the videos whose row is ok or
partial, and tries the failed ones again.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvfast._cli import CLIError, Processes, StopSignal, to_device
from mvfast.utils import atomic_write

log = logging.getLogger("mvfast")

MANIFEST_SUFFIXES = (".csv", ".txt", ".lst", ".list")
DONE = ("ok", "partial")


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Video:
    """One input: its path as given (or as a manifest gives it, joined to the manifest's folder), its title,
    and why it cannot be read when that is known before decoding (a manifest's path that does not exist)."""

    path: str
    title: str | None = None
    missing: str | None = None


def _listed(manifest: Path) -> list[tuple[str, str | None]]:
    """(path, title) rows of a CSV manifest (columns path[,title], any others ignored) or a text list."""
    text = manifest.read_text(encoding="utf-8")
    if manifest.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise CLIError(
                f"manifest {str(manifest)!r}: needs a header with a path column (and optionally title), "
                f"found {columns or 'no header'}"
            )
        reader.fieldnames = columns
        return [((r["path"] or "").strip(), (r.get("title") or "").strip() or None) for r in reader]
    lines = (line.strip() for line in text.splitlines())
    return [(line, None) for line in lines if line and not line.startswith("#")]


def gather(inputs: list[str], titles: list[str] | None = None) -> list[Video]:
    """The videos of files, folders (searched recursively for VIDEO_EXTENSIONS) and manifests (.csv with a
    path column, or .txt/.lst/.list with a path per line; relative paths are relative to the manifest's
    folder), in order, each once. A path given on the command line that does not exist is a CLIError; one
    that a manifest lists is a Video with `missing` set, and a warning names them."""
    from mvfast.data import VIDEO_EXTENSIONS

    missing = [p for p in inputs if not os.path.lexists(p)]
    if missing:
        raise CLIError(
            f"video file {missing[0]!r} does not exist"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    found: list[Video] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            videos = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in VIDEO_EXTENSIONS and (p.is_file() or p.is_symlink())
            )
            if not videos:
                log.warning("no videos (%s) under folder %s", ", ".join(VIDEO_EXTENSIONS), given)
            found += [Video(str(p)) for p in videos]
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            absent = []
            for row, (listed, title) in enumerate(_listed(path), start=2 if path.suffix == ".csv" else 1):
                if not listed:
                    continue
                p = Path(listed).expanduser()
                p = Path(os.path.normpath(p if p.is_absolute() else path.parent / p))
                if os.path.lexists(p):
                    found.append(Video(str(p), title))
                else:
                    absent.append(str(p))
                    found.append(Video(str(p), title, f"does not exist (listed in {given}, line {row})"))
            if absent:
                more = f" (and {len(absent) - 10} more)" if len(absent) > 10 else ""
                log.warning(
                    "manifest %s lists %d paths that do not exist: %s%s",
                    given,
                    len(absent),
                    ", ".join(absent[:10]),
                    more,
                )
        else:
            found.append(Video(given))
    seen, videos = set(), []
    for v in found:
        if v.path not in seen:
            seen.add(v.path)
            videos.append(v)
    if titles:
        if len(titles) != len(videos):
            raise CLIError(f"--title given {len(titles)} times for {len(videos)} videos")
        videos = [Video(v.path, t, v.missing) for v, t in zip(videos, titles, strict=True)]
    if not videos:
        raise CLIError(f"no videos found in {', '.join(inputs)}")
    return videos


# ---------------------------------------------------------------------------------------------------------
# Decoding, in the DataLoader's workers


@dataclass(frozen=True)
class Cut:
    """How the samples of a video are cut: its test clips (data_config.test_clips), of the whole video or of
    each segment of `window` seconds every `stride` seconds; the modalities the model reads (motion and
    audio are skipped when it reads neither); whether titles are tokenised."""

    data_config: object
    modalities: tuple[str, ...]
    window: float | None = None
    stride: float | None = None
    use_titles: bool = True


class VideoSamples(torch.utils.data.Dataset):
    """Item i: the dict of video i's samples, or of its failure. Every error of a file is caught here, so
    that no file stops the run: it becomes a row with status failed and the reason."""

    def __init__(self, videos: list[Video], cut: Cut):
        self.videos, self.cut = videos, cut

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i: int) -> dict:
        video = self.videos[i]
        started = time.perf_counter()
        if video.missing:
            return {"index": i, "status": "failed", "error": video.missing}
        try:
            item = self._cut(video)
        except Exception as e:  # noqa: BLE001 - a file's failure of any kind is its status, not the run's end
            reason = str(e) if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {e}"
            log.debug("%s failed", video.path, exc_info=True)
            return {"index": i, "status": "failed", "error": reason}
        item.update(index=i, decode_ms=(time.perf_counter() - started) * 1e3)
        return item

    def _cut(self, item: Video) -> dict:
        from mvfast.data import (
            decode_video,
            inference_needs,
            sample_clip,
            scene_indices,
            segment,
            segment_bounds,
            tokenize,
        )

        cut, cfg = self.cut, self.cut.data_config
        needs = inference_needs(cfg, cut.window, cut.stride)
        video = decode_video(
            item.path,
            cfg,
            needs=needs,
            motion="motion" in cut.modalities,
            audio="audio" in cut.modalities,
        )
        n = video.num_frames
        bounds = [(0, n)] if cut.window is None else segment_bounds(n, cfg.fps, cut.window, cut.stride)
        near = {int(k): v for k, v in video.meta.get("near_seconds", {}).items()}
        text = tokenize(item.title or "", cfg.vocab_size, cfg.max_title_tokens) if cut.use_titles else None
        samples, segments = [], []
        for a, b in bounds:
            part = video if (a, b) == (0, n) else segment(video, a, b)
            for clip in range(cfg.test_clips):
                s = sample_clip(part, cfg, train=False, clip=clip)
                del s["meta"]
                if text is not None:
                    s["text"], s["text_mask"] = text
                samples.append(s)
            scene = (a + scene_indices(b - a, cfg.scene_frames)).tolist()
            segments.append(
                {
                    "start": round(a / cfg.fps, 3),
                    "end": round(b / cfg.fps, 3),
                    "clips": cfg.test_clips,
                    "scene_seconds": [round(near.get(k, k / cfg.fps), 3) for k in scene],
                }
            )
        meta = video.meta
        status = "partial" if meta["truncated"] else "ok"
        facts = {"frames_decoded": n, "source_frames": meta["source_frames"], "has_audio": meta["has_audio"]}
        if status == "partial":
            facts.update(
                frames_kept=meta["source_frames"], reason=f"truncated or corrupt: {meta['truncated']}"
            )
        return {"status": status, "samples": samples, "segments": segments, "facts": facts}


def collate_videos(items: list[dict]) -> dict:
    """A batch of videos: the samples of those decoded, stacked into one model batch (with ``owner``, the
    position in `items` of each sample's video), and every item without its samples."""
    from mvfast.data import collate

    samples, owner = [], []
    for j, item in enumerate(items):
        for s in item.pop("samples", ()):
            samples.append(s)
            owner.append(j)
    batch = collate(samples) if samples else None
    return {"items": items, "batch": batch, "owner": torch.tensor(owner, dtype=torch.long)}


def video_rows(items: list[dict], owner: torch.Tensor):
    """Each video of a collated batch, in order: ``(item, row, clips)``, where row starts the video's
    output row (its path and status, and the error where it failed) and clips are the positions of its
    samples in the batch's outputs (None where it failed: it has none)."""
    for j, item in enumerate(items):
        row = {"video": item["video"], "status": item["status"]}
        if item["status"] == "failed":
            row["error"] = item["error"]
            yield item, row, None
        else:
            yield item, row, (owner == j).nonzero().flatten()


def loader(videos: list[Video], cut: Cut, batch_size: int, workers: int, pin_memory: bool = False):
    from torch.utils.data import DataLoader

    from mvfast.data.samplers import ignore_sigint

    return DataLoader(
        VideoSamples(videos, cut),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_videos,
        worker_init_fn=ignore_sigint if workers else None,
        pin_memory=pin_memory,
        # Workers for a whole job's life; more batches ahead keep the model fed while one file is slow.
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


@torch.no_grad()
def forward(model, batch: dict, device: torch.device, max_samples: int, **kwargs) -> dict:
    """The model over a batch, in pieces of at most `max_samples` samples (a batch of long videos cut into
    segments holds many); the outputs' tensors (and those of ``features``) concatenated, on the CPU."""
    n = len(batch["meta"])
    pieces = []
    for lo in range(0, n, max_samples):
        piece = {k: v[lo : lo + max_samples] if _per_sample(v, n) else v for k, v in batch.items()}
        out = model(to_device(piece, device), **kwargs)
        pieces.append(_cpu(out))
    return _cat(pieces)


def _per_sample(value, n: int) -> bool:
    return (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == n) or (
        isinstance(value, list) and len(value) == n
    )


def _cpu(out):
    if torch.is_tensor(out):
        return out.detach().float().cpu()
    if isinstance(out, dict):
        return {k: _cpu(v) for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return out


def _cat(pieces: list):
    first = pieces[0]
    if torch.is_tensor(first):
        return torch.cat(pieces)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in pieces]) for k in first}
    return first


# ---------------------------------------------------------------------------------------------------------
# Output in chunks


class Parts:
    """The rows written so far, in chunks: ``<folder>/r<rank>-<n>.jsonl``, each written atomically (with its
    arrays in an .npz of the same name, written before it), so that a killed job loses at most the chunk
    it was filling. Every rank writes its own; :meth:`rows` reads them all. folder None keeps them in
    memory (predict printing to the terminal)."""

    def __init__(self, folder: Path | None, rank: int):
        self.folder, self.rank = folder, rank
        self.memory: list[tuple[list[dict], dict | None]] = []
        self.count = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            mine = sorted(folder.glob(f"r{rank:03d}-*.jsonl"))
            self.count = int(mine[-1].stem.split("-")[1]) + 1 if mine else 0

    def write(self, rows: list[dict], arrays: dict[str, np.ndarray] | None = None) -> None:
        if not rows:
            return
        if self.folder is None:
            self.memory.append((rows, arrays))
            return
        name = f"r{self.rank:03d}-{self.count:06d}"
        self.count += 1
        if arrays:
            with atomic_write(self.folder / f"{name}.npz") as f:
                np.savez(f, **arrays)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with atomic_write(self.folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.write(text)

    def chunks(self) -> list[tuple[list[dict], dict | None]]:
        """Every finished chunk of every rank: (rows, arrays or None), oldest first per rank."""
        if self.folder is None:
            return list(self.memory)
        out = []
        for path in sorted(self.folder.glob("r*-*.jsonl")):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            npz = path.with_suffix(".npz")
            arrays = None
            if npz.is_file():
                with np.load(npz) as f:
                    arrays = {k: f[k] for k in f.files}
            out.append((rows, arrays))
        return out

    def rows(self) -> list[dict]:
        return [r for rows, _ in self.chunks() for r in rows]

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# The job


@dataclass
class Job:
    """One run of predict or extract over `videos`, in this process (one of torchrun's ranks, or alone).

    Args:
        videos: every input, the same list on every rank.
        cut: how samples are cut.
        parts: the folder of the chunks (None: in memory).
        previous: the rows of an earlier run's finished output, by path (resume).
        batch_size: videos per batch; workers: DataLoader worker processes; chunk: videos per chunk.
    """

    tool: str
    videos: list[Video]
    cut: Cut
    processes: Processes
    parts_folder: Path | None
    previous: dict[str, dict] = field(default_factory=dict)
    batch_size: int = 8
    workers: int = 2
    chunk: int = 64
    progress: bool = True
    forward_kwargs: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.parts = Parts(self.parts_folder, self.processes.rank)
        self.done = dict(self.previous)
        left = self.parts.rows()  # by an earlier run that was stopped or killed
        self.resumed = len(left)
        for row in left:
            self.done[row["video"]] = row
        p = self.processes
        # Sharded before the done ones are left out, so that every rank's share is fixed by the inputs alone
        # (ranks that start at different moments may see different chunks on disk).
        share = self.videos[p.rank :: p.world]
        self.todo = [v for v in share if self.done.get(v.path, {}).get("status") not in DONE]
        self.skipped = len(share) - len(self.todo)

    def run(self, model, device: torch.device, consume) -> bool:
        """Runs the model over this rank's videos still to do; `consume(items, out, owner)` gives each item's
        (row, arrays or None). Returns False when stopped by a signal (the chunks so far are written)."""
        from tqdm import tqdm

        stats = self.stats
        stats.update(videos=0, failed=0, wait_s=0.0, model_s=0.0, decode_ms=0.0, started=time.perf_counter())
        if not self.todo:
            return True
        data = loader(self.todo, self.cut, self.batch_size, self.workers, pin_memory=device.type == "cuda")
        max_samples = self.batch_size * self.cut.data_config.test_clips
        rows, arrays = [], []
        bar = tqdm(
            total=len(self.todo),
            unit="video",
            desc=self.tool if self.processes.world == 1 else f"{self.tool} rank 0/{self.processes.world}",
            disable=None if (self.progress and self.processes.master) else True,
            dynamic_ncols=True,
        )
        stopped = False
        with StopSignal() as stop:
            it = iter(data)
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                items = batch["items"]
                out = None
                if batch["batch"] is not None:
                    out = forward(model, batch["batch"], device, max_samples, **self.forward_kwargs)
                t2 = time.perf_counter()
                stats["wait_s"] += t1 - t0
                stats["model_s"] += t2 - t1
                decoded = sum(item["status"] in DONE for item in items)
                for item in items:
                    item["video"] = self.todo[item["index"]].path
                    item["model_ms"] = (t2 - t1) * 1e3 / max(1, decoded) if item["status"] in DONE else 0.0
                for row, arr in consume(items, out, batch["owner"]):
                    rows.append(row)
                    arrays.append(arr)
                stats["videos"] += len(items)
                stats["failed"] += sum(i["status"] == "failed" for i in items)
                stats["decode_ms"] += sum(i.get("decode_ms", 0.0) for i in items)
                bar.update(len(items))
                rate = stats["videos"] / max(1e-9, time.perf_counter() - stats["started"])
                bar.set_postfix(videos_s=f"{rate:.1f}", failed=stats["failed"])
                if len(rows) >= self.chunk:
                    self._flush(rows, arrays)
                if stop.name:
                    stopped = True
                    break
        self._flush(rows, arrays)
        bar.close()
        stats["seconds"] = time.perf_counter() - stats["started"]
        if stopped:
            print(
                f"{self.tool}: stopped by {stop.name}; {stats['videos']} videos written, a rerun with the "
                "same output continues",
                file=sys.stderr,
            )
        return not stopped

    def _flush(self, rows: list, arrays: list) -> None:
        if not rows:
            return
        merged = None
        if any(a for a in arrays):
            # Each video's arrays under "<key>/<position in the chunk>", one .npz per chunk.
            merged = {f"{k}/{i}": v for i, a in enumerate(arrays) if a for k, v in a.items()}
        self.parts.write(list(rows), merged)
        rows.clear()
        arrays.clear()

    def finish(self, merge) -> dict | None:
        """After every rank has run: rank 0 gives `merge` the rows (earlier output first, then the chunks,
        a later row of a video replacing an earlier one) with each chunk's arrays, then removes the chunks.
        Returns the summary on rank 0 (None elsewhere)."""
        p = self.processes
        p.barrier()
        if not p.master:
            return None
        chunks = self.parts.chunks()
        rows: dict[str, dict] = dict(self.previous)
        for chunk_rows, _ in chunks:
            for row in chunk_rows:
                rows[row["video"]] = row
        order = {v.path: i for i, v in enumerate(self.videos)}
        ordered = sorted(rows.values(), key=lambda r: order.get(r["video"], len(order)))
        merge(ordered, chunks)
        self.parts.remove()
        mine = [rows[v.path] for v in self.videos if v.path in rows]
        new = sum(len(c) for c, _ in chunks) - self.resumed
        seconds = self.stats.get("seconds", 0.0)
        return {
            "videos": len(self.videos),
            "ok": sum(r["status"] == "ok" for r in mine),
            "partial": sum(r["status"] == "partial" for r in mine),
            "failed": [r for r in mine if r["status"] == "failed"],
            "new": new,
            "done_before": len(self.videos) - new,
            "seconds": seconds,
            "videos_per_s": new / seconds if seconds else 0.0,
        }


def summary_line(tool: str, summary: dict, where: str | None) -> str:
    s = summary
    line = (
        f"{tool}: {s['videos']} videos: {s['ok']} ok, {s['partial']} partial, {len(s['failed'])} failed"
        f" ({s['new']} run now in {s['seconds']:.1f} s, {s['videos_per_s']:.1f} videos/s"
        + (f"; {s['done_before']} done before" if s["done_before"] else "")
        + ")"
    )
    return line + (f"; wrote {where}" if where else "")


def exit_code(tool: str, summary: dict | None, allow_failures: bool) -> int:
    """0 when every video succeeded (ok or partial) or --allow-failures; 1 when some failed (listed on
    stderr); a CLIError (2) when every one failed, which is a mistake rather than a bad file."""
    if summary is None:
        return 0
    failed = summary["failed"]
    if failed and len(failed) == summary["videos"]:
        raise CLIError(f"none of the {len(failed)} videos could be decoded ({failed[0]['error']})")
    if failed:
        shown = "; ".join(f"{r['video']}: {r['error']}" for r in failed[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        print(f"{tool}: {len(failed)} videos failed: {shown}{more}", file=sys.stderr)
        if not allow_failures:
            return 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# Flags both commands take


def job_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of predict or extract with what both take first: the checkpoint, then the inputs."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint of python -m mvfast.train (or its output folder)")
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="video files, folders of videos, manifests (.csv, .txt)"
    )
    return parser


def add_job_flags(parser, chunk: int = 64) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="videos per forward pass (default: 8)")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes that decode in parallel with the model (default: 2; 0 decodes "
        "in the main process)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the model; 0 leaves it to PyTorch (default: 0)",
    )
    parser.add_argument(
        "--test-clips", type=int, help="clips averaged per video or segment (default: the checkpoint's)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=chunk,
        help=f"videos per chunk of output written at once; a kill loses at most one (default: {chunk})",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 although some files failed (each has its status line; default: exit 1)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a progress bar with videos/s (on a terminal only; default: on)",
    )


def check_job_flags(args) -> None:
    for name, least in (("batch_size", 1), ("workers", 0), ("threads", 0), ("chunk", 1), ("test_clips", 1)):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise CLIError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


def configure(args, data_config):
    """The threads of --threads, and the data config with --test-clips and the workers' decoder threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.test_clips:
        data_config = data_config.replace(test_clips=args.test_clips)
    if args.workers:
        # One decoder thread per worker: the workers are the parallelism, across files.
        data_config = data_config.replace(decode_threads=1)
    return data_config
