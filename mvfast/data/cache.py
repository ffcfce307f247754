"""On-disk cache of decoded videos, so that epochs after the first read arrays instead of decoding.

One entry per (file, decode settings): the resized uint8 frames, the int8 motion field, the audio windows
and the meta, in one uncompressed file: a JSON header, then each array's raw bytes at an aligned offset.
Arrays are memory-mapped on load, so cutting a clip reads only the frames and the crop it uses (an ``.npz``
is read whole and CRC-checked on every load). The entry's name hashes the file's absolute path and
:meth:`DataConfig.cache_key`, so a changed setting reads (and writes) another entry. The entry also records
the file's size and mtime; when the file has changed since, the entry is stale and is replaced on the next
decode. Entries are written to a temporary file in the same folder and moved into place with
``os.replace``, so a reader (another DataLoader worker, another run) sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ..utils import atomic_write
from .config import DataConfig
from .video import DecodedVideo, decode_video

log = logging.getLogger("mvfast.data")

# Bumped whenever what decode_video produces or the entry layout changes, so old entries are not misread.
FORMAT_VERSION = 3
_MAGIC = b"MVFASTC1"
_ALIGN = 64


def _write_entry(f, arrays: dict[str, np.ndarray], header: dict) -> None:
    """magic, u64 header length, JSON header (with each array's dtype, shape, offset), aligned raw arrays."""
    layout, offset = {}, 0
    for name, a in arrays.items():
        layout[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    blob = json.dumps(dict(header, arrays=layout)).encode()
    start = -(-(len(_MAGIC) + 8 + len(blob)) // _ALIGN) * _ALIGN
    f.write(_MAGIC + len(blob).to_bytes(8, "little") + blob)
    f.write(b"\0" * (start - f.tell()))
    for name, a in arrays.items():
        f.seek(start + layout[name]["offset"])
        f.write(np.ascontiguousarray(a).tobytes())


def _read_entry(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with open(path, "rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise ValueError("not a cache entry (bad magic bytes)")
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    start = -(-(len(_MAGIC) + 8 + length) // _ALIGN) * _ALIGN
    arrays = {}
    for name, spec in header["arrays"].items():
        shape = tuple(spec["shape"])
        if int(np.prod(shape)) == 0:
            arrays[name] = np.zeros(shape, dtype=np.dtype(spec["dtype"]))
        else:
            arrays[name] = np.memmap(
                path, dtype=np.dtype(spec["dtype"]), mode="r", offset=start + spec["offset"], shape=shape
            )
    return header, arrays


def default_cache_dir() -> Path:
    """$MVFAST_CACHE if set, else ~/.cache/mvfast."""
    env = os.environ.get("MVFAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mvfast"


class ClipCache:
    """Decoded videos on disk.

    Args:
        root: the cache folder (created on first write); defaults to ``default_cache_dir() / "clips"``.

    Attributes:
        hits, misses, stale: counts since creation in this process (stale entries also count as misses).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir() / "clips"
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def __repr__(self):
        return f"ClipCache({str(self.root)!r}, hits={self.hits}, misses={self.misses}, stale={self.stale})"

    def entry_path(self, path: str | os.PathLike, config: DataConfig) -> Path:
        """Where the entry of `path` decoded with `config` lives."""
        key = json.dumps(
            {"path": os.path.abspath(path), "config": config.cache_key(), "v": FORMAT_VERSION}, sort_keys=True
        )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.clip"

    @staticmethod
    def _signature(path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def load(self, path: str | os.PathLike, config: DataConfig) -> DecodedVideo | None:
        """The cached decode of `path`, or None on a miss (no entry, a stale one, or an unreadable one)."""
        entry = self.entry_path(path, config)
        try:
            header, arrays = _read_entry(entry)
            if tuple(header["signature"]) != self._signature(path):
                self.stale += 1
                self.misses += 1
                return None
            meta = header["meta"]
            audio = np.asarray(arrays["audio"]) if meta.get("has_audio") else None
            video = DecodedVideo(frames=arrays["frames"], motion=arrays["motion"], audio=audio, meta=meta)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A damaged entry (disk full during an older write, a foreign file) is a miss, not a failure.
            log.warning("ignoring unreadable cache entry %s (%s)", entry, e)
            self.misses += 1
            return None
        self.hits += 1
        return video

    def store(
        self,
        path: str | os.PathLike,
        config: DataConfig,
        video: DecodedVideo,
        signature: tuple[int, int] | None = None,
    ) -> Path:
        """Writes the entry atomically; `signature` is the file's (size, mtime_ns) when it was decoded."""
        if video.slots is not None:
            raise ValueError(
                f"ClipCache.store: {path} was decoded in part (needs=...); the cache holds whole videos"
            )
        entry = self.entry_path(path, config)
        entry.parent.mkdir(parents=True, exist_ok=True)
        signature = signature if signature is not None else self._signature(path)
        audio = video.audio if video.audio is not None else np.zeros((0, 64), np.float32)
        arrays = {"frames": video.frames, "motion": video.motion, "audio": np.asarray(audio, np.float32)}
        header = {"signature": list(signature), "meta": video.meta}
        with atomic_write(entry) as f:
            _write_entry(f, arrays, header)
        return entry

    def get_or_decode(self, path: str | os.PathLike, config: DataConfig) -> DecodedVideo:
        """The cached decode, or a fresh one that is then cached."""
        video = self.load(path, config)
        if video is not None:
            return video
        # The signature is taken before decoding: a file rewritten while it is decoded is then stale.
        signature = self._signature(path) if os.path.exists(path) else None
        video = decode_video(path, config)
        try:
            self.store(path, config, video, signature)
        except OSError as e:
            # A read-only or full cache slows training down but must not stop it.
            log.warning("could not write cache entry for %s (%s)", path, e)
        return video
