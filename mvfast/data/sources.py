"""Which videos a command runs on: the data settings of the command line turned into the videos of each split.

:func:`select` reads the fields ``data`` (one of :data:`DATA_KINDS`), ``data_root``, ``split``, ``val_root``,
``train_split``, ``val_split``, ``val_fraction``, ``seed``, ``multi_label`` (csv: ``a|b`` label lists) and
``synthetic_*`` of any settings object (the
commands' ``TrainConfig``) and gives a :class:`DataSource`: the classes and the videos of the training and
validation splits, before any of them is decoded. Bad settings, missing paths and empty sets raise
ValueError or OSError with a message for the user.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .config import DataConfig
from .datasets import UCF101, VideoCSV, VideoFolder, VideoItem

DATA_KINDS = ("synthetic", "ucf101", "folder", "csv")
# SyntheticMicroVideos's argument: the settings field synthetic_<name> that gives it
SYNTHETIC_SETTINGS = {
    "num_classes": "classes", "videos_per_class": "videos", "seed": "seed", "size": "size",
    "seconds": "seconds",
}  # fmt: skip


@dataclass
class DataSource:
    """The videos of a run: the classes (index = label) and the items of each split."""

    name: str
    classes: list
    train_items: list[VideoItem]
    val_items: list[VideoItem]
    use_titles: bool


def holdout(items: list[VideoItem], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: per class, a seeded `fraction` of its videos (at least one, when it has two or more)
    goes to validation."""
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


def check_kind(cfg) -> None:
    """The checks of :func:`select` that need no file: the kind, and a root where one is needed."""
    if cfg.data not in DATA_KINDS:
        raise ValueError(f"unknown data kind {cfg.data!r}; choose from {', '.join(DATA_KINDS)}")
    if cfg.data != "synthetic" and not cfg.data_root:
        raise ValueError(f"--data {cfg.data} needs --data-root")


def select(cfg, config: DataConfig, classes: list | None = None) -> DataSource:
    """The videos named by `cfg`'s data fields; `config` is given to the datasets that list them, `classes`
    fixes the class list of a CSV manifest (a checkpoint's). The synthetic set is generated here if needed."""
    check_kind(cfg)
    kind = cfg.data
    if cfg.data_root and kind != "synthetic" and not Path(cfg.data_root).expanduser().exists():
        raise FileNotFoundError(f"data path {cfg.data_root!r} does not exist")
    root = str(Path(cfg.data_root).expanduser()) if cfg.data_root else None
    if kind == "synthetic":
        from .synthetic import SyntheticMicroVideos

        names = {"num_classes": "classes", "videos_per_class": "videos", "seed": "seed", "size": "size"}
        opts = {
            arg: getattr(cfg, f"synthetic_{name}") for arg, name in {**names, "seconds": "seconds"}.items()
        }
        opts.update(config=config, cache=False)
        train = SyntheticMicroVideos(root, train=True, **opts)
        val = SyntheticMicroVideos(root, train=False, **opts)
        return DataSource("synthetic", train.classes, train.items, val.items, True)
    if kind == "ucf101":
        train = UCF101(root, split=cfg.split, train=True, config=config, cache=False)
        val = UCF101(root, split=cfg.split, train=False, config=config, cache=False)
        return DataSource(f"ucf101 split {cfg.split}", train.classes, train.items, val.items, False)
    if kind == "folder":
        return _folder(cfg, root, config)
    return _csv(cfg, root, config, classes)


def _folder(cfg, root: str, config: DataConfig) -> DataSource:
    train = VideoFolder(root, config=config, cache=False)
    if not cfg.val_root:
        tr, va = holdout(train.items, cfg.val_fraction, cfg.seed)
        return DataSource(f"folder {root}", train.classes, tr, va, True)
    if not Path(cfg.val_root).expanduser().exists():
        raise FileNotFoundError(f"validation path {cfg.val_root!r} does not exist")
    val = VideoFolder(Path(cfg.val_root).expanduser(), config=config, cache=False)
    if val.classes != train.classes:
        raise ValueError(
            f"the class folders of {cfg.val_root!r} ({val.classes}) differ from those of "
            f"{cfg.data_root!r} ({train.classes})"
        )
    return DataSource(f"folder {root}", train.classes, train.items, val.items, True)


def _csv(cfg, root: str, config: DataConfig, classes: list | None) -> DataSource:
    with open(root, encoding="utf-8") as f:
        header = f.readline()
    multi = bool(getattr(cfg, "multi_label", False))
    full = VideoCSV(root, config=config, cache=False, classes=classes, multi_label=multi)
    if "split" not in [c.strip() for c in header.split(",")]:
        tr, va = holdout(full.items, cfg.val_fraction, cfg.seed)
        return DataSource(f"csv {root}", full.classes, tr, va, True)
    # every row's label is a class, whichever split it is in
    opts = dict(config=config, cache=False, classes=full.classes, multi_label=multi)
    train = VideoCSV(root, split=cfg.train_split, **opts)
    val = VideoCSV(root, split=cfg.val_split, **opts)
    return DataSource(f"csv {root}", full.classes, train.items, val.items, True)
