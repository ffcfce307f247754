"""torch.utils.data datasets of video files: UCF101 in its official layout, a folder of class folders, a CSV
manifest, and (in :mod:`mvfast.data.synthetic`) the embedded synthetic set.

Every dataset yields the dict of :func:`mvfast.data.load_video` plus ``label``, ``video_index`` and
``clip_index``. In training (``train=True``) there is one item per video, a clip at a random offset; otherwise
one item per (video, clip) for the config's ``test_clips`` evenly spaced clips, so predictions can be
averaged per ``video_index``. A file that fails to decode yields a :class:`Skipped` marker that
:func:`mvfast.data.collate` drops and counts; a missing or empty dataset raises at construction.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cache import ClipCache
from .collate import Skipped
from .config import DataConfig
from .sampling import sample_clip
from .text import tokenize
from .video import VIDEO_EXTENSIONS, VideoDecodeError, decode_video

log = logging.getLogger("mvfast.data")


@dataclass(frozen=True)
class VideoItem:
    """A video: its file, its class index, its title, and for multi-label data all its class indices
    (``labels``; then ``label`` is the first of them, or -1 for none, and only groups videos for a split)."""

    path: str
    label: int
    title: str | None = None
    labels: tuple[int, ...] | None = None


def _resolve_cache(cache) -> ClipCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return ClipCache()
    return cache if isinstance(cache, ClipCache) else ClipCache(cache)


class VideoDataset(Dataset):
    """Videos with labels and optional titles.

    Args:
        items: the videos (path, label, title).
        classes: class names, index = label.
        config: a :class:`DataConfig` (default DataConfig()).
        train: random clips (one item per video) or evenly spaced test clips (test_clips items per video).
        cache: True for the default cache folder, a folder or a :class:`ClipCache`, False/None for none.
        use_titles: whether to emit `text` / `text_mask` (a video without a title then has a masked one).
        multi_label: `label` is a multi-hot int64[C] of the item's ``labels`` (or of its one ``label`` when it
            has no list) instead of the class index.
    """

    def __init__(
        self,
        items: list[VideoItem],
        classes: list[str],
        config: DataConfig | None = None,
        train: bool = True,
        cache=True,
        use_titles: bool = True,
        name: str | None = None,
        multi_label: bool = False,
    ):
        self.name = name or type(self).__name__
        if not items:
            raise ValueError(f"{self.name}: the dataset is empty (no videos found)")
        self.items = list(items)
        self.classes = list(classes)
        self.multi_label = multi_label
        for item in self.items:
            for label in item.labels if item.labels is not None else (item.label,):
                if not 0 <= label < len(self.classes):
                    raise ValueError(
                        f"{self.name}: label {label} of {item.path} is outside [0, {len(self.classes)})"
                    )
        self.config = config or DataConfig()
        self.train = train
        self.cache = _resolve_cache(cache)
        self.use_titles = use_titles
        self.failures = 0  # in this process only; use the batches' num_skipped with DataLoader workers
        # Whether a file that fails is logged here, as it fails; off where a SkipCounter reports the skipped
        # files of the batches instead (once per file, not once per epoch and worker).
        self.log_skips = True
        self._last = None  # (path, decoded): consecutive test clips of a video decode it once

    @property
    def clips_per_video(self) -> int:
        return 1 if self.train else self.config.test_clips

    @property
    def targets(self) -> list[int]:
        """Label of every video (not every clip)."""
        return [item.label for item in self.items]

    def __len__(self) -> int:
        return len(self.items) * self.clips_per_video

    def __repr__(self):
        return (
            f"{self.name}({len(self.items)} videos, {len(self.classes)} classes, train={self.train}, "
            f"clips_per_video={self.clips_per_video})"
        )

    def _decode(self, path: str):
        if self._last is not None and self._last[0] == path:
            return self._last[1]
        if self.cache is not None:
            video = self.cache.get_or_decode(path, self.config)
        else:
            video = decode_video(path, self.config)
        self._last = (path, video)
        return video

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} items")
        index %= len(self)
        video_index, clip_index = divmod(index, self.clips_per_video)
        item = self.items[video_index]
        try:
            sample = sample_clip(
                self._decode(item.path),
                self.config,
                train=self.train,
                clip=None if self.train else clip_index,
            )
        except (VideoDecodeError, OSError) as e:
            self.failures += 1
            log.log(
                logging.WARNING if self.log_skips else logging.DEBUG,
                "%s: skipping %s: %s",
                self.name,
                item.path,
                e,
            )
            return Skipped(item.path, str(e))
        if self.use_titles:
            sample["text"], sample["text_mask"] = tokenize(
                item.title or "", self.config.vocab_size, self.config.max_title_tokens
            )
        if self.multi_label:
            hot = torch.zeros(len(self.classes), dtype=torch.long)
            hot[list(item.labels if item.labels is not None else (item.label,))] = 1
            sample["label"] = hot
        else:
            sample["label"] = item.label
        sample["video_index"] = video_index
        sample["clip_index"] = clip_index if not self.train else -1
        sample["meta"]["title"] = item.title
        return sample


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def _read_title(video: Path) -> str | None:
    sidecar = video.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None


def _require_dir(name: str, root: Path, what: str) -> Path:
    if not root.exists():
        raise FileNotFoundError(f"{name}: {what} {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{name}: {what} {str(root)!r} is not a directory")
    return root


class VideoFolder(VideoDataset):
    """One sub-folder per class (sorted names = classes), videos anywhere below it.

    A title may sit next to a video as a text file of the same name (``clip.mp4`` + ``clip.txt``).
    Other arguments: see :class:`VideoDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        config: DataConfig | None = None,
        train: bool = True,
        cache=True,
        use_titles: bool = True,
    ):
        root = _require_dir("VideoFolder", Path(root), "root")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise ValueError(f"VideoFolder: no class sub-folders in {str(root)!r}")
        items = []
        for label, name in enumerate(classes):
            videos = sorted(p for p in (root / name).rglob("*") if _is_video(p))
            if not videos:
                log.warning(
                    "VideoFolder: class folder %s has no videos (%s)",
                    root / name,
                    ", ".join(VIDEO_EXTENSIONS),
                )
            items += [VideoItem(str(p), label, _read_title(p)) for p in videos]
        if not items:
            raise ValueError(
                f"VideoFolder: no videos ({', '.join(VIDEO_EXTENSIONS)}) under the class folders "
                f"of {str(root)!r}"
            )
        super().__init__(items, classes, config, train, cache, use_titles)


class VideoCSV(VideoDataset):
    """A CSV manifest with a header: `path`, `label`, and optionally `title` and `split`.

    Relative paths are relative to the CSV's folder. Labels are class names, or integers 0..C-1 (then the
    classes are their string forms). `split`, when given, keeps the rows whose `split` column equals it.
    With `multi_label` a label is a list of classes separated by ``|`` (``cat|indoor``; empty for none).
    Other arguments: see :class:`VideoDataset`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: DataConfig | None = None,
        train: bool = True,
        cache=True,
        use_titles: bool = True,
        split: str | None = None,
        classes: list[str] | None = None,
        multi_label: bool = False,
    ):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"VideoCSV: manifest {str(path)!r} does not exist")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in fields]
            if missing:
                raise ValueError(
                    f"VideoCSV: {str(path)!r} must have columns path and label (and optionally "
                    f"title, split); missing {missing}, found {fields}"
                )
            if split is not None and "split" not in fields:
                raise ValueError(f"VideoCSV: split={split!r} given but {str(path)!r} has no split column")
            rows = [r for r in reader if split is None or r.get("split") == split]
        labels = [_row_labels(r, multi_label, path) for r in rows]
        if classes is None:
            names = {lab for row_labels in labels for lab in row_labels}
            if names and all(lab.lstrip("-").isdigit() for lab in names):
                classes = [str(i) for i in range(max(int(lab) for lab in names) + 1)]
            else:
                classes = sorted(names)
        index = {c: i for i, c in enumerate(classes)}
        items = []
        for row, row_labels in zip(rows, labels, strict=True):
            for lab in row_labels:
                if lab not in index:
                    raise ValueError(
                        f"VideoCSV: label {lab!r} of {row['path']!r} is not a class ({len(classes)} classes)"
                    )
            p = Path(row["path"])
            p = p if p.is_absolute() else path.parent / p
            title = row.get("title") or None
            ids = tuple(index[lab] for lab in row_labels)
            if multi_label:
                items.append(VideoItem(str(p), ids[0] if ids else -1, title, ids))
            else:
                items.append(VideoItem(str(p), ids[0], title))
        if not items:
            where = f" with split={split!r}" if split is not None else ""
            raise ValueError(f"VideoCSV: no rows{where} in {str(path)!r}")
        super().__init__(items, classes, config, train, cache, use_titles, multi_label=multi_label)


def _row_labels(row: dict, multi_label: bool, path: Path) -> tuple[str, ...]:
    text = (row["label"] or "").strip()
    if multi_label:
        return tuple(dict.fromkeys(lab.strip() for lab in text.split("|") if lab.strip()))
    if "|" in text:
        raise ValueError(
            f"VideoCSV: label {text!r} of {row['path']!r} in {str(path)!r} is a list of classes: multi-label "
            "data needs --multi-label (or multi_label=True)"
        )
    return (text,)


def _read_lines(path: Path) -> list[str]:
    # The official lists have Windows line endings; strip them and skip blank lines.
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class UCF101(VideoDataset):
    """UCF101 in its official layout.

    ``root`` holds the 101 class folders (``ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi``, ...) and
    ``annotation_dir`` (default: ``root/ucfTrainTestlist`` if it exists, else ``root``) holds
    ``classInd.txt`` ("1 ApplyEyeMakeup"), ``trainlist0N.txt`` ("ApplyEyeMakeup/v_..._c01.avi 1") and
    ``testlist0N.txt`` ("ApplyEyeMakeup/v_..._c01.avi"). A video's label is its folder's line in classInd
    (0-based), never parsed from the file name: the file names spell some classes differently from the
    folders (``HandstandPushups/v_HandStandPushups_g01_c01.avi``). Listed files that are missing on disk are
    left out with one warning.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: int = 1,
        train: bool = True,
        config: DataConfig | None = None,
        cache=True,
        annotation_dir: str | os.PathLike | None = None,
    ):
        if split not in (1, 2, 3):
            raise ValueError(f"UCF101: split must be 1, 2 or 3, got {split!r}")
        root = _require_dir("UCF101", Path(root), "root")
        if annotation_dir is None:
            annotation_dir = root / "ucfTrainTestlist" if (root / "ucfTrainTestlist").is_dir() else root
        annotation_dir = _require_dir("UCF101", Path(annotation_dir), "annotation_dir")
        class_ind = annotation_dir / "classInd.txt"
        if not class_ind.is_file():
            raise FileNotFoundError(
                f"UCF101: {str(class_ind)!r} not found (expected lines '1 ApplyEyeMakeup')"
            )
        numbered = {}
        for line in _read_lines(class_ind):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(
                    f"UCF101: bad line in {class_ind}: {line!r} (expected '<index> <ClassName>')"
                )
            numbered[int(parts[0])] = parts[1]
        if sorted(numbered) != list(range(1, len(numbered) + 1)):
            raise ValueError(f"UCF101: {class_ind} must number the classes 1..N, got {sorted(numbered)}")
        classes = [numbered[i] for i in range(1, len(numbered) + 1)]
        index = {name: i for i, name in enumerate(classes)}

        listing = annotation_dir / f"{'train' if train else 'test'}list{split:02d}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"UCF101: split file {str(listing)!r} not found")
        items, missing = [], 0
        for line in _read_lines(listing):
            parts = line.split()
            rel = parts[0].replace("\\", "/")
            folder = rel.split("/")[0]
            if folder not in index:
                raise ValueError(
                    f"UCF101: {listing.name} lists {rel!r} whose folder {folder!r} is not in classInd.txt"
                )
            label = index[folder]
            if len(parts) > 1 and int(parts[1]) - 1 != label:
                raise ValueError(
                    f"UCF101: {listing.name} gives {rel!r} label {parts[1]} but classInd.txt numbers "
                    f"{folder!r} as {label + 1}"
                )
            video = root / rel
            if not video.is_file():
                missing += 1
                continue
            items.append(VideoItem(str(video), label, None))
        if missing:
            log.warning(
                "UCF101: %d of the videos listed in %s are missing under %s", missing, listing.name, root
            )
        if not items:
            raise ValueError(f"UCF101: none of the videos listed in {listing} exist under {str(root)!r}")
        # UCF101 has no titles: use_titles=False leaves text out, so the batch's text is masked.
        super().__init__(items, classes, config, train, cache, use_titles=False)
