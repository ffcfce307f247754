"""On-disk cache of decoded videos, so that epochs after the first read arrays instead of decoding.

One entry per (file, decode settings): the resized uint8 frames, the int8 motion field, the audio windows
and the meta, in an uncompressed ``.npz`` (no pickle). The entry's name hashes the file's absolute path and
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
import tempfile
from pathlib import Path

import numpy as np

from .config import DataConfig
from .video import DecodedVideo, decode_video

log = logging.getLogger("mvfast.data")

# Bumped whenever what decode_video produces changes, so old entries are not read as new ones.
FORMAT_VERSION = 1


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
        return self.root / digest[:2] / f"{digest}.npz"

    @staticmethod
    def _signature(path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns

    def load(self, path: str | os.PathLike, config: DataConfig) -> DecodedVideo | None:
        """The cached decode of `path`, or None on a miss (no entry, a stale one, or an unreadable one)."""
        entry = self.entry_path(path, config)
        try:
            with np.load(entry, allow_pickle=False) as z:
                signature = tuple(int(v) for v in z["signature"])
                if signature != self._signature(path):
                    self.stale += 1
                    self.misses += 1
                    return None
                meta = json.loads(bytes(z["meta"]).decode())
                audio = z["audio"] if meta.get("has_audio") else None
                video = DecodedVideo(frames=z["frames"], motion=z["motion"], audio=audio, meta=meta)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError) as e:
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
        entry = self.entry_path(path, config)
        entry.parent.mkdir(parents=True, exist_ok=True)
        signature = signature if signature is not None else self._signature(path)
        audio = video.audio if video.audio is not None else np.zeros((0, 64), np.float32)
        meta = np.frombuffer(json.dumps(video.meta).encode(), dtype=np.uint8)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    frames=video.frames,
                    motion=video.motion,
                    audio=audio,
                    meta=meta,
                    signature=np.array(signature, dtype=np.int64),
                )
            os.replace(tmp, entry)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
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
