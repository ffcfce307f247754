"""Write each video's embedding (the classifier's input) and, on request, the parts it is made of.

    python -m mvfast.extract runs/train/best.pt videos/ --out feats/                    # feats/<name>.npy
    python -m mvfast.extract best.pt list.csv --out feats/ --parts behaviour,scene,attention_weights
    python -m mvfast.extract best.pt videos/ --out feats/ --format npz --parts all      # feats/features.npz
    torchrun --nproc_per_node 4 -m mvfast.extract best.pt videos/ --out feats/ --format safetensors

INPUT is any mix of video files, folders and manifests, as for python -m mvfast.predict. A video's
features are the mean over its test-time clips of ``model(batch, return_features=True)["features"]``:
``embedding``, and with --parts those of behaviour (f_A), scene (f_s), joint, frames_vlad, audio_vlad,
text_vlad (the NetVLAD descriptors), attention (the attention-pooled frame feature) and attention_weights
(the key frames' weights, F x H) that the model computes.

--out receives index.jsonl, a row per video in input order: its path, status (ok, partial, failed, as for
predict) and where its arrays are: ``files`` (--format npy: ``<name>.npy`` for the embedding and
``<name>.<part>.npy`` for each part, <name> the file's stem and a hash of its path), or ``row`` (npz or
safetensors: its row in each array of features.npz / features.safetensors, one array per part). Status,
resuming (a rerun with the same --out skips the videos done), chunks, sharding under torchrun and the exit
status are those of predict.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from mvfast import _batch
from mvfast._checkpoint import atomic_write_text, load_for_inference
from mvfast._cli import CLIError, Processes, add_device_flags, run_main, set_backend
from mvfast.utils import atomic_write

FORMATS = ("npy", "npz", "safetensors")
PARTS = (
    "behaviour", "scene", "joint", "frames_vlad", "audio_vlad", "text_vlad", "attention", "attention_weights",
)  # fmt: skip
ARRAYS = {"npz": "features.npz", "safetensors": "features.safetensors"}


def parse(argv):
    parser = _batch.job_parser("python -m mvfast.extract", __doc__)
    parser.add_argument("--out", required=True, help="the folder of the features and index.jsonl")
    parser.add_argument(
        "--parts",
        default="",
        help=f"features besides the embedding: all, or some of {','.join(PARTS)} (default: none)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="npy",
        help="npy: files per video; npz or safetensors: one file with a row per video (default: npy)",
    )
    parser.add_argument("--title", action="append", help="title of a video (once per video, in order)")
    _batch.add_job_flags(parser)
    add_device_flags(parser)
    args = parser.parse_args(argv)
    _batch.check_job_flags(args)
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    if names == ["all"]:
        args.parts = "all"
    else:
        unknown = [p for p in names if p not in PARTS]
        if unknown:
            raise CLIError(
                f"--parts: unknown part {', '.join(unknown)}; choose all or from {','.join(PARTS)}"
            )
        args.parts = names
    if args.format == "safetensors":
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError:
            raise CLIError(
                "--format safetensors needs the safetensors package (pip install safetensors)"
            ) from None
    return args


def extract(argv=None) -> int:
    args = parse(argv)
    videos = _batch.gather(args.inputs, args.title)
    processes = None
    try:
        processes = Processes.start(args.device)
        device = processes.device
        set_backend(args.backend, device)
        loaded = load_for_inference(args.checkpoint, device)
        data_cfg = _batch.configure(args, loaded.data_config)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {str(out)!r} is a file; extract writes a folder")
        out.mkdir(parents=True, exist_ok=True)
        previous = read_index(out)
        job = _batch.Job(
            "extract",
            videos,
            _batch.Cut(data_cfg, tuple(loaded.model.config.modalities)),
            processes,
            out / "parts",
            previous,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk=args.chunk,
            progress=args.progress,
            forward_kwargs={"return_features": True},
        )
        if not job.run(loaded.model, device, Features(out, args.parts, args.format)):
            return 130
        summary = job.finish(lambda rows, chunks: write(out, rows, chunks, previous, args.format))
        if summary is not None:
            print(_batch.summary_line("extract", summary, str(out)), file=sys.stderr)
        return _batch.exit_code("extract", summary, args.allow_failures)
    finally:
        if processes is not None:
            processes.close()


def file_name(path: str) -> str:
    """<stem>-<8 hex digits of the path>: videos of one name in different folders get different files."""
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


class Features:
    """A batch's features as each video's row and arrays (the mean over its clips)."""

    def __init__(self, out: Path, parts, fmt: str):
        self.out, self.parts, self.format = out, parts, fmt

    def chosen(self, features: dict) -> list[str]:
        if self.parts == "all":
            return ["embedding", *(p for p in PARTS if p in features)]
        missing = [p for p in self.parts if p not in features]
        if missing:
            raise CLIError(
                f"--parts {','.join(missing)}: this model computes no such feature (it computes "
                f"{', '.join(k for k in features if k != 'embedding') or 'only the embedding'})"
            )
        return ["embedding", *self.parts]

    def __call__(self, items, out, owner):
        for item, row, clips in _batch.video_rows(items, owner):
            if clips is None:
                yield row, None
                continue
            features = out["features"]
            arrays = {k: features[k][clips].mean(0).numpy() for k in self.chosen(features)}
            row.update(item["facts"], clips=len(clips), decode_ms=round(item["decode_ms"], 2))
            if self.format == "npy":
                name, row["files"] = file_name(item["video"]), {}
                for k, a in arrays.items():
                    fname = f"{name}.npy" if k == "embedding" else f"{name}.{k}.npy"
                    with atomic_write(self.out / fname) as f:
                        np.save(f, a)
                    row["files"][k] = fname
                yield row, None
            else:
                yield row, arrays


def read_index(out: Path) -> dict[str, dict]:
    path = out / "index.jsonl"
    if not path.is_file():
        return {}
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as e:
        raise CLIError(f"{str(path)!r} cannot be read ({e})") from None
    return {r["video"]: r for r in rows}


def _previous_arrays(out: Path, fmt: str) -> dict[str, np.ndarray]:
    path = out / ARRAYS.get(fmt, "")
    if fmt == "npy" or not path.is_file():
        return {}
    if fmt == "npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from safetensors.numpy import load_file

    return load_file(str(path))


def write(out: Path, rows: list[dict], chunks, previous: dict, fmt: str) -> None:
    """index.jsonl, and for npz/safetensors the one file of every ok row's arrays, in the rows' order."""
    if fmt != "npy":
        # Where each video's arrays are: the last chunk that holds it, or the earlier output.
        found: dict[str, tuple[dict, int]] = {}
        for chunk_rows, arrays in chunks:
            for pos, row in enumerate(chunk_rows):
                if arrays is not None and f"embedding/{pos}" in arrays:
                    found[row["video"]] = (arrays, pos)
        old = _previous_arrays(out, fmt)
        stacks: dict[str, list] = {}
        for row in rows:
            if row["status"] == "failed":
                row.pop("row", None)
                continue
            if row["video"] in found:
                arrays, pos = found[row["video"]]
                got = {k.split("/")[0]: v for k, v in arrays.items() if k.endswith(f"/{pos}")}
            else:
                got = {k: v[previous[row["video"]]["row"]] for k, v in old.items()}
            row["row"] = len(stacks.get("embedding", []))
            for k, v in got.items():
                stacks.setdefault(k, []).append(v)
        tensors = {k: np.ascontiguousarray(np.stack(v)) for k, v in stacks.items()}
        target = out / ARRAYS[fmt]
        if fmt == "npz":
            with atomic_write(target) as f:
                np.savez(f, **tensors)
        elif tensors:
            from safetensors.numpy import save_file

            tmp = target.with_name(f".{target.name}.tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, target)
    atomic_write_text(out / "index.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> int:
    return run_main("mvfast.extract", extract, argv)


if __name__ == "__main__":
    sys.exit(main())
