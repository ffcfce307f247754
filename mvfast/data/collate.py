"""Batching samples whose audio and titles differ in length, or are missing, and dropping failed files.

A dataset's ``__getitem__`` returns a :class:`Skipped` marker for a file that cannot be decoded. The marker
travels through DataLoader workers like any sample; :func:`collate` drops it and reports it in the batch
(``num_skipped``, ``skipped``), and :class:`SkipCounter` adds those up over an epoch. A count kept on the
dataset object would stay inside each worker process and never reach the training loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("mvfast.data")

_STACKED = ("rgb", "motion", "frames")


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample whose file could not be decoded."""

    path: str
    reason: str


def _pad_stack(
    rows: list[torch.Tensor | None], masks: list[torch.Tensor | None], length: int, tail_shape, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros((len(rows), length, *tail_shape), dtype=dtype)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        if row is None:
            continue
        n = min(row.shape[0], length)
        out[i, :n] = row[:n]
        mask[i, :n] = m[:n]
    return out, mask


class Collate:
    """Collate function for DataLoader.

    Args:
        audio_windows, title_tokens: pad `audio` and `text` to these fixed lengths (longer ones are cut),
            for static shapes under torch.compile; None pads to the longest in the batch.

    The batch dict:
        rgb (float32[B, 3, T, H, W]), motion (float32[B, 2, T, H, W]), frames (float32[B, F, 3, h, w]);
        audio (float32[B, A, 64]) and audio_mask (bool[B, A]); text (int64[B, W]) and text_mask (bool[B, W]);
        has_audio, has_text (bool[B]): whether the modality is present at all for each sample (a sample
        without it has an all-False mask); label (int64[B], or multi-hot int64[B, C] for multi-label samples)
        when the samples have labels; video_index and
        clip_index (int64[B]) when they have them; meta (list of B dicts);
        num_skipped (int) and skipped (list of (path, reason)): failed files dropped from this batch.
    A batch in which every file failed has B = 0: rgb and the other tensors are absent and `label` is empty.
    """

    def __init__(self, audio_windows: int | None = None, title_tokens: int | None = None):
        for name, value in (("audio_windows", audio_windows), ("title_tokens", title_tokens)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Collate: {name} must be None or a positive int, got {value!r}")
        self.audio_windows = audio_windows
        self.title_tokens = title_tokens

    def __call__(self, samples: list) -> dict:
        skipped = [s for s in samples if s is None or isinstance(s, Skipped)]
        good = [s for s in samples if not (s is None or isinstance(s, Skipped))]
        batch: dict = {
            "num_skipped": len(skipped),
            "skipped": [
                (s.path, s.reason) if s is not None else ("?", "dataset returned None") for s in skipped
            ],
        }
        if not good:
            batch["label"] = torch.zeros(0, dtype=torch.long)
            batch["meta"] = []
            return batch
        for key in _STACKED:
            if key in good[0]:
                shapes = {tuple(s[key].shape) for s in good}
                if len(shapes) != 1:
                    raise ValueError(
                        f"collate: `{key}` must have one shape across the batch, got {sorted(shapes)}"
                    )
                batch[key] = torch.stack([s[key] for s in good])

        has_audio = torch.tensor([bool("audio_mask" in s and s["audio_mask"].any()) for s in good])
        audio = [s["audio"] if h else None for s, h in zip(good, has_audio.tolist(), strict=True)]
        amask = [s["audio_mask"] if h else None for s, h in zip(good, has_audio.tolist(), strict=True)]
        a_len = self.audio_windows or max([a.shape[0] for a in audio if a is not None] + [1])
        batch["audio"], batch["audio_mask"] = _pad_stack(audio, amask, a_len, (64,), torch.float32)
        batch["has_audio"] = has_audio

        has_text = torch.tensor([bool("text_mask" in s and s["text_mask"].any()) for s in good])
        text = [s["text"] if h else None for s, h in zip(good, has_text.tolist(), strict=True)]
        tmask = [s["text_mask"] if h else None for s, h in zip(good, has_text.tolist(), strict=True)]
        w_len = self.title_tokens or max([t.shape[0] for t in text if t is not None] + [1])
        batch["text"], batch["text_mask"] = _pad_stack(text, tmask, w_len, (), torch.long)
        batch["has_text"] = has_text

        for key in ("label", "video_index", "clip_index"):
            if all(key in s for s in good):
                if torch.is_tensor(good[0][key]) and good[0][key].dim() == 1:  # multi-hot labels
                    batch[key] = torch.stack([s[key] for s in good])
                else:
                    batch[key] = torch.tensor([int(s[key]) for s in good], dtype=torch.long)
        batch["meta"] = [s.get("meta", {}) for s in good]
        return batch


collate = Collate()
"""The default :class:`Collate` (pads to the longest audio and title in each batch)."""


class SkipCounter:
    """Adds up the files skipped over an epoch, from the batches (works with any number of workers), and warns
    about each file once: the epoch that first skips it lists it with its reason; the count of every epoch is
    what :meth:`end_epoch` returns (and logs at INFO level).

    >>> skips = SkipCounter()
    >>> for batch in loader:
    ...     skips.update(batch)
    ...     if batch["label"].numel() == 0:
    ...         continue
    >>> skips.end_epoch(epoch)   # warns "skipped N files" with the new ones and why; returns N, resets
    """

    def __init__(self):
        self.count = 0
        self.files: list[tuple[str, str]] = []
        self.reported: set[str] = set()  # over the counter's life: a run

    def update(self, batch: dict) -> int:
        return self.add(batch.get("skipped", []), batch.get("num_skipped", 0))

    def add(self, skipped: list[tuple[str, str]], count: int | None = None) -> int:
        """Counts skipped (path, reason) pairs from elsewhere (a validation pass); `count` if they are a
        sample of more."""
        n = len(skipped) if count is None else count
        self.count += n
        self.files.extend(skipped)
        return n

    def end_epoch(self, epoch: int | None = None) -> int:
        n = self.count
        if n:
            where = f" in epoch {epoch}" if epoch is not None else ""
            new = sorted({(p, r) for p, r in self.files if p not in self.reported})
            self.reported.update(p for p, _ in new)
            if new:
                listing = "; ".join(f"{p}: {r}" for p, r in new[:20])
                more = f" (and {len(new) - 20} more)" if len(new) > 20 else ""
                old = {p for p, _ in self.files} - {p for p, _ in new}
                seen = f" (and {len(old)} reported before)" if old else ""
                log.warning("skipped %d undecodable file(s)%s: %s%s%s", n, where, listing, more, seen)
            else:
                log.info("skipped %d undecodable file(s)%s, all reported before", n, where)
        self.count = 0
        self.files = []
        return n
