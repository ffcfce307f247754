"""What the command-line tools (train, evaluate, predict, sweep) share: user errors as one line, the model and
datasets from a config, checkpoints (atomic writes, ``weights_only`` loads), the device.

A :class:`CLIError` is a user's mistake (a missing path, an unknown preset, a corrupt checkpoint): the tools
print it as one line and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from mvfast.utils import atomic_write

MODALITIES = ("rgb", "motion", "frames", "audio", "text")
DATA_KINDS = ("synthetic", "ucf101", "folder", "csv")
CHECKPOINT_FORMAT = 1


class CLIError(Exception):
    """A user error, printed as ``prog: error: message`` without a traceback."""


def run_main(prog: str, fn, argv) -> int:
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        fn(argv)
        return 0
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def parse_modalities(value) -> tuple[str, ...] | None:
    """ "rgb,motion" (or a list) -> ("rgb", "motion"); None stays None (the preset's)."""
    if value is None:
        return None
    names = [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]
    bad = [m for m in names if m not in MODALITIES]
    if bad or not names:
        raise CLIError(
            f"unknown modality {', '.join(bad) or '(none given)'}; choose from {','.join(MODALITIES)}"
        )
    if len(set(names)) != len(names):
        raise CLIError(f"modalities listed twice: {value}")
    return tuple(names)


# ---------------------------------------------------------------------------------------------------------
# The model


def create_model(preset: str, num_classes: int, overrides: dict):
    """mvfast.models.create_model, with a bad preset or override reported as a CLIError."""
    from mvfast.models import create_model as create

    try:
        return create(preset, num_classes, **overrides)
    except (ValueError, TypeError) as e:
        raise CLIError(f"cannot build model {preset!r} with {overrides or 'no overrides'}: {e}") from None


def data_config_to_dict(cfg) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def data_config_from_dict(d: dict):
    from mvfast.data import DataConfig

    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save into a temporary file beside `path`, then os.replace: readers see the old file or the
    new one, never half of one (also when the process is killed while writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by python -m mvfast.train, loaded with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CLIError(f"no checkpoint (last.pt) in folder {str(path)!r}")
        path = found
    if not path.is_file():
        raise CLIError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file: zip, pickle, EOF, runtime errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(
            f"cannot read checkpoint {str(path)!r}: not a valid checkpoint file ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CLIError(f"{str(path)!r} is not an mvfast training checkpoint")
    ckpt["path"] = str(path)
    return ckpt


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint a run in `folder` would resume from (last.pt), or None."""
    last = Path(folder) / "last.pt"
    return last if last.is_file() else None


def model_from_checkpoint(ckpt: dict, device="cpu"):
    """(model in eval mode with the checkpoint's weights, its DataConfig, class names)."""
    spec = ckpt["model_spec"]
    overrides = dict(spec["overrides"])
    if "modalities" in overrides:
        overrides["modalities"] = tuple(overrides["modalities"])
    model = create_model(spec["preset"], spec["num_classes"], overrides)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CLIError(
            f"checkpoint {ckpt.get('path')!r} does not fit model {spec['preset']!r}: {e}"
        ) from None
    model.to(device).eval()
    return model, data_config_from_dict(ckpt["data_config"]), list(ckpt["classes"])


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return device


def set_backend(name: str, device: torch.device) -> None:
    """mvfast.set_backend with an unavailable backend reported before any work starts."""
    import mvfast

    if name not in mvfast.BACKENDS:
        raise CLIError(f"unknown backend {name!r}; choose from {', '.join(mvfast.BACKENDS)}")
    if name not in ("auto", "reference"):
        status = mvfast.backends(device)[name]
        if not status["available"]:
            raise CLIError(f"backend {name!r} cannot run on {device.type}: {status['reason']}")
    mvfast.set_backend(name)


def to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class DataSource:
    """The videos of a run, before the model fixes the clip sizes: items of each split and the classes."""

    name: str
    classes: list
    train_items: list
    val_items: list
    use_titles: bool


def _holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: per class, a seeded `fraction` of its videos (at least one, when it has two or more)
    goes to validation."""
    import random

    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda it: it.path)
        random.Random(f"{seed}-{label}").shuffle(group)
        n_val = min(len(group) - 1, max(1, round(len(group) * fraction))) if len(group) > 1 else 0
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def data_source(cfg, base, classes: list | None = None) -> DataSource:
    """The videos named by a config's data fields (data, data_root, split, val_root, train_split, val_split,
    val_fraction, synthetic_*); `base` is the DataConfig; `classes` fixes the class list of a CSV manifest
    (a checkpoint's). Missing paths, empty sets and bad layouts are CLIErrors."""
    from mvfast.data import UCF101, SyntheticMicroVideos, VideoCSV, VideoFolder

    kind = cfg.data
    if kind not in DATA_KINDS:
        raise CLIError(f"unknown data kind {kind!r}; choose from {', '.join(DATA_KINDS)}")
    if kind != "synthetic" and not cfg.data_root:
        raise CLIError(f"--data {kind} needs --data-root")
    if cfg.data_root and kind != "synthetic" and not Path(cfg.data_root).expanduser().exists():
        raise CLIError(f"data path {cfg.data_root!r} does not exist")
    root = str(Path(cfg.data_root).expanduser()) if cfg.data_root else None
    try:
        if kind == "synthetic":
            opts = dict(
                num_classes=cfg.synthetic_classes,
                videos_per_class=cfg.synthetic_videos,
                seed=cfg.synthetic_seed,
                size=cfg.synthetic_size,
                seconds=cfg.synthetic_seconds,
                config=base,
                cache=False,
            )
            train = SyntheticMicroVideos(root, train=True, **opts)
            val = SyntheticMicroVideos(root, train=False, **opts)
            return DataSource("synthetic", train.classes, train.items, val.items, True)
        if kind == "ucf101":
            train = UCF101(root, split=cfg.split, train=True, config=base, cache=False)
            val = UCF101(root, split=cfg.split, train=False, config=base, cache=False)
            return DataSource(f"ucf101 split {cfg.split}", train.classes, train.items, val.items, False)
        if kind == "folder":
            train = VideoFolder(root, config=base, cache=False)
            if cfg.val_root:
                if not Path(cfg.val_root).expanduser().exists():
                    raise CLIError(f"validation path {cfg.val_root!r} does not exist")
                val = VideoFolder(Path(cfg.val_root).expanduser(), config=base, cache=False)
                if val.classes != train.classes:
                    raise CLIError(
                        f"the class folders of {cfg.val_root!r} ({val.classes}) differ from those of "
                        f"{cfg.data_root!r} ({train.classes})"
                    )
                return DataSource(f"folder {root}", train.classes, train.items, val.items, True)
            tr, va = _holdout(train.items, cfg.val_fraction, cfg.seed)
            return DataSource(f"folder {root}", train.classes, tr, va, True)
        # csv
        with open(root, encoding="utf-8") as f:
            header = f.readline()
        full = VideoCSV(root, config=base, cache=False, classes=classes)
        if "split" in [c.strip() for c in header.split(",")]:
            # every row's label is a class, whichever split it is in
            train = VideoCSV(root, config=base, cache=False, split=cfg.train_split, classes=full.classes)
            val = VideoCSV(root, config=base, cache=False, split=cfg.val_split, classes=full.classes)
            return DataSource(f"csv {root}", full.classes, train.items, val.items, True)
        tr, va = _holdout(full.items, cfg.val_fraction, cfg.seed)
        return DataSource(f"csv {root}", full.classes, tr, va, True)
    except CLIError:
        raise
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
