"""Decoding a video file with PyAV into the arrays everything else is cut from (PyAV is imported on the first
decode, not with the package).

:func:`decode_video` reads a file once and returns a :class:`DecodedVideo`: the whole video resampled to
``DataConfig.fps`` by timestamps (never by the frame count in the header, which VFR files contradict and some
containers lack), each frame resized and centre-cropped to a ``resize`` square and decoded straight into a
preallocated array, the motion field of each of those frames, and the audio windows. This is what the cache
stores; clips, crops and scene frames are cut from it by :mod:`mvfast.data.sampling`.

Inference needs a few frames of each file (its test clips and scene frames), so ``decode_video(..., needs=)``
keeps only those: every frame is still decoded (the codec needs them), but only the kept ones are converted
to RGB and given a motion field. In a long file it seeks to each clip instead of decoding the gaps, takes a
scene frame from the key frame before its time, and reads the audio in one pass of its own. ``motion=False``
and ``audio=False`` skip what a model does not read.
"""

from __future__ import annotations

import collections
import errno
import heapq
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np

from . import motion as mo
from ._av import require_av
from .audio import SAMPLE_RATE, audio_features, resample, to_mono_float
from .config import DataConfig

log = logging.getLogger("mvfast.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")

# Magic bytes of the containers we read, to tell a damaged video from a file that is not one.
_MAGIC = ((4, b"ftyp", "MP4/MOV"), (0, b"RIFF", "AVI"), (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"))

# Motion fields and grey frames are computed in chunks of this many frames, bounding the scratch memory of
# rasterize (3 float32 planes per frame: 13 MB at 128 px) for long videos.
_MOTION_CHUNK = 64

# With `needs`, a gap of more than this many seconds between two kept frames is skipped by seeking rather
# than decoded: beyond the length of the usual group of pictures (1-5 s), so a seek, which decodes from the
# key frame before its target, decodes fewer frames than reading on would.
SEEK_GAP = 8.0
# A scene frame that far from the frames decoded before it is taken from the key frame before its time.
NEAR_GAP = 1.0


class VideoDecodeError(ValueError):
    """A file that cannot be decoded: names the file and the reason (not a video, no video stream, truncated,
    zero frames, unsupported codec)."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")

    def __reduce__(self):
        # Keeps the two-argument constructor when the error crosses a DataLoader worker's pipe.
        return (type(self), (self.path, self.reason))


@dataclass
class DecodedVideo:
    """A whole video at the config's fps and `resize` square: what the cache stores.

    Attributes:
        frames (uint8[N, R, R, 3]): RGB frames of the timeline, N >= 1, R = config.resize.
        motion (int8[2, N, R, R]): forward flow (dx, dy) of each frame in quarter pixels of R per source frame
            (see :mod:`mvfast.data.motion`).
        audio (float32[A, 64] or None): log-mel windows; None when the file has no (decodable) audio stream,
            A = 0 when the stream is empty.
        meta (dict): JSON-able facts about the file and the decoding.
        slots (int64[K] or None): when only some timeline frames were decoded (``decode_video(needs=...)``),
            the timeline index of each row of `frames` and `motion` (sorted); N is then
            ``meta["num_frames"]``. None: row i is timeline frame i.
    """

    frames: np.ndarray
    motion: np.ndarray
    audio: np.ndarray | None
    meta: dict = field(default_factory=dict)
    slots: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        """N, the length of the timeline (also when only some of its frames were kept)."""
        return self.frames.shape[0] if self.slots is None else int(self.meta["num_frames"])

    def rows(self, index: np.ndarray) -> np.ndarray:
        """The rows of `frames` (and of `motion`'s second axis) that hold these timeline frames."""
        if self.slots is None:
            return index
        index = np.asarray(index)
        rows = np.minimum(np.searchsorted(self.slots, index), len(self.slots) - 1)
        if not np.array_equal(self.slots[rows], index):
            missing = sorted(set(np.asarray(index).ravel().tolist()) - set(self.slots.tolist()))
            raise ValueError(f"{self.meta.get('path')}: timeline frames {missing[:8]} were not decoded")
        return rows


def _sniff(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(16)
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _describe_streams(container) -> str:
    kinds = [
        f"{s.type} ({s.codec_context.name if s.codec_context else 'unknown codec'})"
        for s in container.streams
    ]
    return ", ".join(kinds) if kinds else "no streams"


def open_container(path):
    """Opens a file for reading (an ``av`` InputContainer), turning every failure into FileNotFoundError or
    VideoDecodeError."""
    av = require_av()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "video file not found", path)
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        kind = _sniff(path)
        if kind is not None:
            raise VideoDecodeError(
                path, f"truncated or corrupt {kind} file (FFmpeg: {e.strerror or e})"
            ) from e
        raise VideoDecodeError(
            path, f"not a video: no known container format (FFmpeg: {e.strerror or e})"
        ) from e


class _Timeline:
    """Sample-and-hold resampling by timestamps: target frame k (time k / fps from the first frame) shows the
    latest decoded frame whose timestamp is <= k / fps. Frames are written into a preallocated buffer that
    grows by doubling when the header underestimated the length; with `keep` (sorted target indices), only
    those are stored, one row each."""

    def __init__(self, fps: float, resize: int, capacity: int, limit: float | None, keep=None):
        self.step = 1.0 / fps
        self.resize = resize
        self.limit = limit
        self.keep = None if keep is None else np.asarray(keep, dtype=np.int64)
        rows = capacity if self.keep is None else len(self.keep)
        self.frames = np.empty((max(rows, 1), resize, resize, 3), dtype=np.uint8)
        self.filled = np.zeros(max(rows, 1), dtype=bool)
        self.count = 0
        self.slots: list[tuple[int, int]] = []  # (first target slot, repeats) per emitted source frame

    def targets_before(self, t: float) -> int:
        """How many target slots, from the next one, have time < t (and < limit)."""
        end = t if self.limit is None else min(t, self.limit)
        # A tiny tolerance keeps k / fps == t (exact in theory, not in float) on the next frame's side.
        last = math.ceil(end / self.step - 1e-6)  # first k with k * step >= end
        return max(0, last - self.count)

    def skip_to(self, t: float) -> None:
        """After a seek: the next slot is the first at or after time t."""
        self.count = max(0, math.ceil(t / self.step - 1e-6))

    def reserve(self, n: int) -> range:
        need = self.count + n
        if self.keep is None and need > self.frames.shape[0]:
            grown = np.empty((max(need, 2 * self.frames.shape[0]),) + self.frames.shape[1:], dtype=np.uint8)
            grown[: self.count] = self.frames[: self.count]
            self.frames = grown
        s = range(self.count, need)
        self.slots.append((self.count, n))
        self.count = need
        return s

    def rows(self, slots: range | np.ndarray) -> np.ndarray:
        """The rows that store these slots: all of them, or (with `keep`) those kept."""
        if self.keep is None:
            return np.arange(slots.start, slots.stop) if isinstance(slots, range) else np.asarray(slots)
        lo, hi = (slots.start, slots.stop) if isinstance(slots, range) else (min(slots), max(slots) + 1)
        a, b = np.searchsorted(self.keep, [lo, hi])
        rows = np.arange(a, b)
        if not isinstance(slots, range):
            rows = rows[np.isin(self.keep[rows], slots)]
        return rows

    def write(self, rows: np.ndarray, image: np.ndarray) -> None:
        self.frames[rows] = image
        self.filled[rows] = True


class _Reorder:
    """Gives decoded frames their display times when the container stores decode-order stamps.

    The decoder outputs frames in display order, but AVI has no presentation timestamps, so MPEG-4 Part 2 with
    B-frames comes out stamped 1, 2, 4, 3, 5, 7, 6, ... The display times are then the same stamps sorted:
    frames wait in a short queue and each leaves with the smallest stamp seen so far. For correctly stamped
    streams this changes nothing (the smallest stamp is the frame's own)."""

    DEPTH = 4  # reorder depth of packed B-frames; deeper H.264 pyramids carry real pts anyway

    def __init__(self):
        self.frames: collections.deque = collections.deque()
        self.stamps: list[float] = []

    def push(self, frame):
        self.frames.append(frame)
        if frame.time is not None:
            heapq.heappush(self.stamps, frame.time)
        if len(self.frames) > self.DEPTH:
            yield from self._pop()

    def flush(self):
        while self.frames:
            yield from self._pop()

    def _pop(self):
        frame = self.frames.popleft()
        t = heapq.heappop(self.stamps) if frame.time is not None and self.stamps else None
        yield frame, t


def _crop_box(width: int, height: int, resize: int) -> tuple[int, int, int, int, float]:
    # Short side to `resize`, keeping the aspect ratio; then the centred square.
    scale = resize / min(width, height)
    rw, rh = max(resize, round(width * scale)), max(resize, round(height * scale))
    return rw, rh, (rw - resize) // 2, (rh - resize) // 2, scale


def decode_video(
    path, config: DataConfig | None = None, *, needs=None, motion: bool = True, audio: bool = True
) -> DecodedVideo:
    """Decodes a whole file into a :class:`DecodedVideo` (frames at config.fps, motion, audio).

    Args:
        needs: None to keep every timeline frame (what the cache stores), or a function of the timeline
            length N giving (exact, near): the timeline indices to keep exactly as a whole decode would
            give them (frames and motion), and those for which a nearby frame will do (scene frames: in a
            long file, the key frame before them). The result then holds those rows only (its ``slots``).
            N is taken from the container's duration; where that proves wrong, the file is read again.
        motion: False leaves the motion field zero and does not ask the codec for its vectors.
        audio: False leaves the audio out (None), as for a file without sound.

    Raises:
        FileNotFoundError: the file does not exist.
        VideoDecodeError: the file is not a video, has no video stream, is truncated before its first frame,
            decodes to zero frames, or uses a codec this FFmpeg cannot decode.
        ModuleNotFoundError: PyAV is not installed.
    """
    config = config or DataConfig()
    path = os.fspath(path)
    length, seek = None, True
    # With `needs`, a pass that misjudged the timeline's length gives None: then once more without seeking,
    # and (where that pass had to guess the length too) once more with the length it measured.
    for _ in range(3):
        with open_container(path) as container:
            decoder = _Decoder(
                container, path, config, needs=needs, motion=motion, audio=audio, length=length, seek=seek
            )
            video = decoder.decode()
        if video is not None:
            return video
        length, seek = decoder.length, False
    raise AssertionError(f"{path}: the kept frames were not decoded in three passes")


class _Decoder:
    """One pass over a container: the video frames go onto the timeline as their display intervals end, each
    with the codec's motion vectors (or, without them, the grey frames for the RGB-difference fallback); the
    audio samples are collected. :meth:`decode` then builds the motion field, the audio windows and the meta.

    A frame is placed once the next one's timestamp says how long it lasts, so the decoder keeps the frame
    waiting for that (`pending`) and the one before it (`previous`, for the RGB difference).

    With `needs` (see :func:`decode_video`) only the kept slots are converted and given motion; their set is
    computed for the length N the container's duration gives (and N +- 1, what rounding of the duration can
    change), or for `length` when a first pass measured it. Where the kept slots are more than SEEK_GAP
    apart, the gaps are skipped by seeking (:meth:`_read_seeking`).
    """

    def __init__(
        self,
        container,
        path: str,
        cfg: DataConfig,
        needs=None,
        motion: bool = True,
        audio: bool = True,
        length: int | None = None,
        seek: bool = True,
    ):
        self.av = require_av()
        if not container.streams.video:
            raise VideoDecodeError(path, f"no video stream (streams: {_describe_streams(container)})")
        vs = container.streams.video[0]
        if vs.codec_context is None:
            raise VideoDecodeError(path, "unsupported codec: this FFmpeg has no decoder for the video stream")
        if motion:
            # Asking the decoder to export its motion vectors costs little and spares an optical-flow pass.
            vs.codec_context.options = {"flags2": "+export_mvs"}
        # Frame threads decode several frames at once, but with them FFmpeg's H.264 decoder exports the
        # vectors of B-frames only some of the time (seen: none, or 24 of 38 blocks, varying from run to run
        # on one file): they are used only where the motion is not.
        vs.thread_type = "SLICE" if motion else "AUTO"
        vs.thread_count = cfg.decode_threads
        self.container, self.path, self.cfg, self.vs = container, path, cfg, vs
        self.motion = motion
        self.astream = None
        if audio and container.streams.audio and container.streams.audio[0].codec_context is not None:
            self.astream = container.streams.audio[0]
        self.needs, self.length, self.seek = needs, length, seek
        self.exact = self.near = None
        keep = None
        if needs is not None:
            lengths = [length] if length is not None else self._lengths()
            exact, near = zip(*(needs(n) for n in lengths), strict=True)
            self.exact = np.unique(np.concatenate([np.asarray(e, dtype=np.int64) for e in exact]))
            near = np.concatenate([np.asarray(e, dtype=np.int64) for e in near])
            self.near = np.setdiff1d(near, self.exact)
            keep = np.union1d(self.exact, self.near)
        self.timeline = _Timeline(cfg.fps, cfg.resize, self._capacity(), cfg.max_duration, keep)
        # Rows whose motion is read: all of them, or those of the clips (scene frames are RGB only).
        self.moving = None if keep is None else np.isin(keep, self.exact)

        self.pending = self.previous = None
        self.index = -1  # display index of the pending frame
        self.t0 = self.last_t = None  # timestamps (s) of the first and the pending frame
        self.intervals: list[float] = []  # between consecutive frames
        self.rotation = 0
        self.decoded_frames = 0
        self.seeks = 0
        self.near_seconds: dict[int, float] = {}  # slot -> time of the key frame that stands in for it
        self.pict_types: list[int] = []  # of every decoded frame, in display order
        # slot, vectors, crop geometry of their frame, display index of their frame
        self.mv_slots: list[tuple[int, np.ndarray, tuple, int]] = []
        self.rgb_slots: list[tuple[int, np.ndarray, np.ndarray]] = []  # slot, grey previous, grey current
        self.copies: list[tuple[int, np.ndarray]] = []  # (row with the motion, rows of the same frame)
        self.audio_chunks: list[tuple[int, np.ndarray]] = []  # (sample rate, mono samples)
        self.audio_error: str | None = None

    def _duration(self) -> float | None:
        vs, cfg, estimate = self.vs, self.cfg, None
        if vs.duration and vs.time_base:
            estimate = float(vs.duration * vs.time_base)
        elif self.container.duration:
            estimate = self.container.duration / self.av.time_base
        if cfg.max_duration is not None:
            estimate = min(estimate or cfg.max_duration, cfg.max_duration)
        return estimate

    def _capacity(self) -> int:
        estimate = self._duration()
        return math.ceil(estimate * self.cfg.fps) + 2 if estimate else 64

    def _lengths(self) -> list[int]:
        """The timeline lengths to keep frames for: N of the stream's duration (exact on every file seen),
        or N - 1, N, N + 1 of the container's (which adds the other streams and rounding)."""
        estimate = self._duration()
        if not estimate:
            return [1]  # unknown: the first pass keeps little and measures N
        n = max(1, math.ceil(estimate * self.cfg.fps - 1e-6))
        if self.vs.duration and self.vs.time_base:
            return [n]
        return [m for m in (n - 1, n, n + 1) if m >= 1]

    def decode(self) -> DecodedVideo | None:
        """The video; None when `needs` was judged on a wrong length (the caller reads again with
        ``self.length``, now measured)."""
        seeking = self._seeking()
        truncated = self._read_seeking() if seeking else self._read()
        if self.decoded_frames == 0:
            raise VideoDecodeError(self.path, "zero frames: the video stream decodes to no frames")
        if not seeking:
            # at_least_one: a single frame shorter than one target step still gives one frame.
            self._emit(self.last_t - self.t0 + self._last_duration(), at_least_one=True)
        last = self.pending
        source_width, source_height = last.width, last.height
        # No decoded frame outlives this call: they hold their decoder's buffers.
        self.pending = self.previous = last = None

        cfg, tl = self.cfg, self.timeline
        n = self._length() if seeking else tl.count
        slots = None
        if self.needs is not None:
            exact, near = self.needs(n)
            wanted = np.union1d(np.asarray(exact, dtype=np.int64), np.asarray(near, dtype=np.int64))
            have = tl.keep[tl.filled[: len(tl.keep)]]
            if not np.isin(wanted, have).all():
                # A seeking pass learns nothing of the true length; a reading pass has measured it.
                self.length = None if seeking else tl.count
                return None
            rows = np.flatnonzero(tl.filled[: len(tl.keep)])
            slots = tl.keep[rows]
        else:
            rows = slice(0, n)
        flow, sources = _motion_fields(
            len(tl.frames), cfg.resize, self.mv_slots, self.rgb_slots, np.array(self.pict_types), self.copies
        )
        motion = mo.quantize(flow[rows]).transpose(1, 0, 2, 3)  # (2, N, R, R)
        sources = sources[rows]
        frames, motion = _rotate(tl.frames[rows], motion, self.rotation)
        audio = self._audio()
        meta = {
            "path": self.path,
            "num_frames": n,
            "duration": n / cfg.fps,
            "source_frames": self.decoded_frames,
            "source_fps": (1.0 / float(np.median(self.intervals))) if self.intervals else None,
            "width": source_width,  # of the source, before rotation
            "height": source_height,
            "rotation": self.rotation,
            "video_codec": self.vs.codec_context.name,
            "audio_codec": self.astream.codec_context.name if self.astream is not None else None,
            "has_audio": audio is not None,
            "audio_error": self.audio_error,
            "truncated": truncated,
            "motion_codec_frames": int((sources == 1).sum()),
            "motion_rgb_frames": int((sources == 2).sum()),
        }
        if slots is not None:
            meta.update(
                kept_frames=len(slots),
                seeks=self.seeks,
                near_seconds={str(k): round(v, 3) for k, v in self.near_seconds.items()},
            )
        return DecodedVideo(
            frames=np.ascontiguousarray(frames),
            motion=np.ascontiguousarray(motion),
            audio=audio,
            meta=meta,
            slots=slots,
        )

    def _read(self) -> str | None:
        """Demuxes to the end (or max_duration); returns FFmpeg's complaint when the file was cut short."""
        streams = [self.vs] + ([self.astream] if self.astream is not None else [])
        reorder = _Reorder()
        done, truncated = False, None
        try:
            for packet in self.container.demux(streams):
                if packet.stream.type == "audio":
                    self._on_audio(packet)
                    continue
                for frame in packet.decode():
                    for ready, t in reorder.push(frame):
                        done = done or self._on_video(ready, t)
                if done:
                    break
        except self.av.FFmpegError as e:
            truncated = e
        if not done:
            for ready, t in reorder.flush():
                if self._on_video(ready, t):
                    break
        return self._truncation(truncated)

    def _truncation(self, error) -> str | None:
        if error is None:
            return None
        if self.decoded_frames == 0:
            raise VideoDecodeError(
                self.path, f"truncated or corrupt before the first frame (FFmpeg: {error})"
            ) from error
        log.warning(
            "%s: truncated or corrupt after %d frames, keeping those (%s)",
            self.path,
            self.decoded_frames,
            error,
        )
        return str(error)

    # -------------------------------------------------------------------------------------------------
    # seeking (long files with `needs`)

    def _seeking(self) -> bool:
        """Whether to seek: the kept slots have gaps longer than SEEK_GAP and the stream says its length."""
        if self.exact is None or not self.seek or self._duration() is None:
            return False
        keep = self.timeline.keep
        if len(keep) < 2:
            return False
        return bool(np.diff(keep).max() * self.timeline.step > SEEK_GAP)

    def _length(self) -> int:
        """N of a file that was not read to its end: from its duration."""
        lengths = self._lengths()
        return lengths[len(lengths) // 2]

    def _runs(self) -> list[tuple[int, int, bool]]:
        """(first slot, last slot, near only) of each stretch of kept slots to decode in one go. A clip's
        slot joins the stretch before it when the gap is at most SEEK_GAP; a scene frame only when it is
        within NEAR_GAP, since on its own it costs a seek and one key frame."""
        step, runs = self.timeline.step, []
        for slot in self.timeline.keep.tolist():
            exact = bool(np.isin(slot, self.exact))
            gap = (slot - runs[-1][1]) * step if runs else math.inf
            if runs and (gap <= NEAR_GAP or (exact and not runs[-1][2] and gap <= SEEK_GAP)):
                runs[-1][1] = slot
                runs[-1][2] = runs[-1][2] and not exact
            else:
                runs.append([slot, slot, not exact])
        return [tuple(r) for r in runs]

    def _start_time(self) -> float:
        vs = self.vs
        return float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else 0.0

    def _seek(self, t: float) -> None:
        """To the key frame at or before time t (s, from the stream's start); the decoder starts afresh."""
        vs = self.vs
        target = self._start_time() + max(t, 0.0)
        self.container.seek(int(target / vs.time_base), stream=vs, backward=True, any_frame=False)
        self.seeks += 1
        self.pending = self.previous = None

    def _read_seeking(self) -> str | None:
        """The audio in one pass of its own; then for each run of kept slots, a seek to just before it and
        a decode through it. A run of scene frames only (`near`) takes the first frame after the seek, the key
        frame before its time."""
        self.t0 = self._start_time()
        tl, error = self.timeline, None
        if self.astream is not None:
            # First, from the start of the freshly opened file: an audio decoder flushed by a seek loses its
            # priming and changes the first windows.
            try:
                for packet in self.container.demux(self.astream):
                    self._on_audio(packet)
            except self.av.FFmpegError as e:
                self.audio_error = str(e)
        try:
            for first, last, near_only in self._runs():
                # One source frame early, so that the first kept slot has its previous frame (RGB difference).
                self._seek(first * tl.step - 1.0 / self._nominal_rate())
                if near_only:
                    self._take_near(first, last)
                else:
                    self._decode_run(last)
        except self.av.FFmpegError as e:
            error = e
        return self._truncation(error)

    def _decode_run(self, last: int) -> None:
        tl, reorder, started = self.timeline, _Reorder(), False

        def take(frame, t) -> bool:
            nonlocal started
            t = self.t0 if t is None else t
            if not started:
                tl.skip_to(t - self.t0)
                self.last_t, started = None, True
            self._on_video(frame, t)
            # Slot `last` is placed once a frame after its time arrives (see _Timeline.targets_before).
            return (t - self.t0) > (last + 1e-5) * tl.step

        for packet in self.container.demux(self.vs):
            for frame in packet.decode():
                for ready, t in reorder.push(frame):
                    if take(ready, t):
                        return
        for ready, t in reorder.flush():
            if take(ready, t):
                return
        if self.pending is not None:  # the stream ended inside the run: the last frame lasts its duration
            self._emit(self.last_t - self.t0 + self._last_duration())

    def _take_near(self, first: int, last: int) -> None:
        for packet in self.container.demux(self.vs):
            for frame in packet.decode():
                rows = self.timeline.rows(np.arange(first, last + 1))
                self.timeline.write(rows, _square(frame, "rgb24", self.cfg.resize))
                t = frame.time if frame.time is not None else self.t0
                for slot in self.timeline.keep[rows].tolist():
                    self.near_seconds[slot] = t - self.t0
                if self.decoded_frames == 0:
                    self.rotation = int(frame.rotation or 0)
                self.decoded_frames += 1
                self.pending = frame
                return

    # -------------------------------------------------------------------------------------------------
    # frames and audio

    def _on_video(self, frame, t: float | None) -> bool:
        """Takes the next frame in display order; True once max_duration is reached."""
        if t is None:
            # No timestamp: assume the nominal rate after the previous frame.
            t = 0.0 if self.last_t is None else self.last_t + 1.0 / self._nominal_rate()
        if self.t0 is None:
            self.t0 = t
        if self.decoded_frames == 0:
            self.rotation = int(frame.rotation or 0)
        rel = t - self.t0
        if self.last_t is not None and t > self.last_t:
            self.intervals.append(t - self.last_t)
        self.decoded_frames += 1
        self._emit(rel)
        self.pict_types.append(int(frame.pict_type))
        self.previous, self.pending, self.last_t = self.pending, frame, t
        self.index += 1
        return self.cfg.max_duration is not None and rel >= self.cfg.max_duration

    def _emit(self, until: float, at_least_one: bool = False) -> None:
        """Places the pending frame on every target slot before time `until`, with its motion source."""
        frame, timeline = self.pending, self.timeline
        n = timeline.targets_before(until)
        if at_least_one and timeline.count == 0:
            n = max(n, 1)
        if frame is None or n == 0:
            return
        R = self.cfg.resize
        rows = timeline.rows(timeline.reserve(n))
        if len(rows) == 0:
            return
        timeline.write(rows, _square(frame, "rgb24", R))
        if self.moving is not None:
            rows = rows[self.moving[rows]]
        if not self.motion or len(rows) == 0:
            return
        row = int(rows[0])
        self.copies.append((row, rows))
        mvs = frame.side_data.get("MOTION_VECTORS")
        vectors = mvs.to_ndarray() if mvs is not None else None
        if vectors is not None and vectors.size:
            self.mv_slots.append((row, vectors, _crop_box(frame.width, frame.height, R), self.index))
        elif self.previous is not None:
            self.rgb_slots.append((row, _square(self.previous, "gray", R), _square(frame, "gray", R)))

    def _on_audio(self, packet) -> None:
        if self.audio_error is not None:
            return
        try:
            for af in packet.decode():
                mono = to_mono_float(af.to_ndarray(), af.format.is_planar, af.layout.nb_channels)
                self.audio_chunks.append((af.sample_rate, mono))
        except (self.av.FFmpegError, ValueError) as e:
            # A damaged audio track does not make the video unusable: drop the audio, say so in meta.
            self.audio_error = str(e)

    def _nominal_rate(self) -> float:
        return float(self.vs.average_rate or self.vs.guessed_rate or 25)

    def _last_duration(self) -> float:
        """The last frame lasts its own duration, or the typical interval when the container does not say."""
        last = self.pending
        if last.duration and last.time_base:
            return float(last.duration * last.time_base)
        if self.intervals:
            return float(np.median(self.intervals))
        return 1.0 / self._nominal_rate()

    def _audio(self) -> np.ndarray | None:
        if self.astream is None or self.audio_error is not None:
            return None
        # Resampled per run of one rate (a stream may change its rate mid-way), then joined.
        runs: list[tuple[int, list[np.ndarray]]] = []
        for rate, mono in self.audio_chunks:
            if not runs or runs[-1][0] != rate:
                runs.append((rate, []))
            runs[-1][1].append(mono)
        parts = [resample(np.concatenate(chunks), rate, SAMPLE_RATE) for rate, chunks in runs]
        wav = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if self.cfg.max_duration is not None:
            wav = wav[: int(self.cfg.max_duration * SAMPLE_RATE)]
        return audio_features(wav, self.cfg.audio_pool, self.cfg.max_audio_windows).numpy()


def _square(frame, fmt: str, R: int) -> np.ndarray:
    """The frame resized (short side R) and centre-cropped to R x R, in `fmt` ("rgb24" or "gray")."""
    # Geometry per frame: H.264 and VP9 allow the resolution to change mid-stream.
    rw, rh, x0, y0, _ = _crop_box(frame.width, frame.height, R)
    # threads=1: no slice threads for frames this small, and none for a forked DataLoader worker to hang on
    # when it garbage-collects a frame inherited from its parent (seen: pthread_cond_destroy in
    # sws_freeContext).
    img = frame.to_ndarray(width=rw, height=rh, format=fmt, interpolation="AREA", threads=1)
    return img[y0 : y0 + R, x0 : x0 + R]


def _motion_fields(
    rows: int, R: int, mv_slots, rgb_slots, pict_types, copies
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, 2, R, R) float32 flow of the stored timeline rows and, per row, its source: 0 none, 1 codec,
    2 RGB difference. Each frame's field is computed once, for its first row, and copied to the other rows
    that show the same frame (`copies`)."""
    flow = np.zeros((rows, 2, R, R), dtype=np.float32)
    sources = np.zeros(rows, dtype=np.int8)
    past, future = mo.reference_distances(pict_types)
    for i in range(0, len(mv_slots), _MOTION_CHUNK):
        chunk = mv_slots[i : i + _MOTION_CHUNK]
        boxes, vecs, which = [], [], []
        for j, (_, vectors, (_, _, x0, y0, scale), index) in enumerate(chunk):
            b, f = mo.codec_vectors(vectors, past[index], future[index])
            # Source pixels -> pixels of the resized, centre-cropped square.
            boxes.append(b * scale - np.array([x0, y0, x0, y0], dtype=np.float64))
            vecs.append(f * scale)
            which.append(np.full(len(b), j))
        field_, _ = mo.rasterize(
            np.concatenate(boxes), np.concatenate(vecs), np.concatenate(which), len(chunk), R, R
        )
        slots = [s for s, _, _, _ in chunk]
        flow[slots] = field_
        sources[slots] = 1
    for i in range(0, len(rgb_slots), _MOTION_CHUNK):
        chunk = rgb_slots[i : i + _MOTION_CHUNK]
        prev = np.stack([p for _, p, _ in chunk])
        cur = np.stack([c for _, _, c in chunk])
        slots = [s for s, _, _ in chunk]
        flow[slots] = mo.rgb_difference_flow(prev, cur)
        sources[slots] = 2
    for row, same in copies:
        if len(same) > 1:
            flow[same[1:]] = flow[row]
            sources[same[1:]] = sources[row]
    return flow, sources


def _rotate(frames: np.ndarray, motion: np.ndarray, degrees: int) -> tuple[np.ndarray, np.ndarray]:
    """Applies the display rotation (degrees counter-clockwise, as FFmpeg's display matrix) to the frames
    (N, R, R, 3) and the flow (2, N, R, R), turning the flow vectors with the image."""
    k = round(degrees / 90) % 4
    if k == 0:
        return frames, motion
    frames = np.rot90(frames, k, axes=(1, 2))
    motion = np.rot90(motion, k, axes=(2, 3))
    dx, dy = motion[0], motion[1]
    # np.rot90 turns counter-clockwise on screen: (x, y) -> (y, W-1-x) for k = 1, so (dx, dy) -> (dy, -dx).
    # Negating int8 -128 would overflow, but quantize saturates at +-127.
    if k == 1:
        motion = np.stack([dy, -dx])
    elif k == 2:
        motion = np.stack([-dx, -dy])
    else:
        motion = np.stack([-dy, dx])
    return np.ascontiguousarray(frames), np.ascontiguousarray(motion)
