"""Decoding a video file with PyAV into the arrays everything else is cut from (PyAV is imported on the first
decode, not with the package).

:func:`decode_video` reads a file once and returns a :class:`DecodedVideo`: the whole video resampled to
``DataConfig.fps`` by timestamps (never by the frame count in the header, which VFR files contradict and some
containers lack), each frame resized and centre-cropped to a ``resize`` square and decoded straight into a
preallocated array, the motion field of each of those frames, and the audio windows. This is what the cache
stores; clips, crops and scene frames are cut from it by :mod:`mvfast.data.sampling`.
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
# rasterize (3 float64 planes per frame) for long videos.
_MOTION_CHUNK = 16


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
    """

    frames: np.ndarray
    motion: np.ndarray
    audio: np.ndarray | None
    meta: dict = field(default_factory=dict)


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
    grows by doubling when the header underestimated the length."""

    def __init__(self, fps: float, resize: int, capacity: int, limit: float | None):
        self.step = 1.0 / fps
        self.resize = resize
        self.limit = limit
        self.frames = np.empty((max(capacity, 1), resize, resize, 3), dtype=np.uint8)
        self.count = 0
        self.slots: list[tuple[int, int]] = []  # (first target slot, repeats) per emitted source frame

    def targets_before(self, t: float) -> int:
        """How many target slots, from the next one, have time < t (and < limit)."""
        end = t if self.limit is None else min(t, self.limit)
        # A tiny tolerance keeps k / fps == t (exact in theory, not in float) on the next frame's side.
        last = math.ceil(end / self.step - 1e-6)  # first k with k * step >= end
        return max(0, last - self.count)

    def reserve(self, n: int) -> slice:
        need = self.count + n
        if need > self.frames.shape[0]:
            grown = np.empty((max(need, 2 * self.frames.shape[0]),) + self.frames.shape[1:], dtype=np.uint8)
            grown[: self.count] = self.frames[: self.count]
            self.frames = grown
        s = slice(self.count, need)
        self.slots.append((self.count, n))
        self.count = need
        return s


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


def decode_video(path, config: DataConfig | None = None) -> DecodedVideo:
    """Decodes a whole file into a :class:`DecodedVideo` (frames at config.fps, motion, audio).

    Raises:
        FileNotFoundError: the file does not exist.
        VideoDecodeError: the file is not a video, has no video stream, is truncated before its first frame,
            decodes to zero frames, or uses a codec this FFmpeg cannot decode.
        ModuleNotFoundError: PyAV is not installed.
    """
    config = config or DataConfig()
    path = os.fspath(path)
    with open_container(path) as container:
        return _Decoder(container, path, config).decode()


class _Decoder:
    """One pass over a container: the video frames go onto the timeline as their display intervals end, each
    with the codec's motion vectors (or, without them, the grey frames for the RGB-difference fallback); the
    audio samples are collected. :meth:`decode` then builds the motion field, the audio windows and the meta.

    A frame is placed once the next one's timestamp says how long it lasts, so the decoder keeps the frame
    waiting for that (`pending`) and the one before it (`previous`, for the RGB difference).
    """

    def __init__(self, container, path: str, cfg: DataConfig):
        self.av = require_av()
        if not container.streams.video:
            raise VideoDecodeError(path, f"no video stream (streams: {_describe_streams(container)})")
        vs = container.streams.video[0]
        if vs.codec_context is None:
            raise VideoDecodeError(path, "unsupported codec: this FFmpeg has no decoder for the video stream")
        # Asking the decoder to export its motion vectors costs little and spares an optical-flow pass.
        vs.codec_context.options = {"flags2": "+export_mvs"}
        vs.thread_type = "AUTO"
        vs.thread_count = cfg.decode_threads
        self.container, self.path, self.cfg, self.vs = container, path, cfg, vs
        self.astream = None
        if container.streams.audio and container.streams.audio[0].codec_context is not None:
            self.astream = container.streams.audio[0]
        self.timeline = _Timeline(cfg.fps, cfg.resize, self._capacity(), cfg.max_duration)

        self.pending = self.previous = None
        self.index = -1  # display index of the pending frame
        self.t0 = self.last_t = None  # timestamps (s) of the first and the pending frame
        self.intervals: list[float] = []  # between consecutive frames
        self.rotation = 0
        self.decoded_frames = 0
        self.pict_types: list[int] = []  # of every decoded frame, in display order
        # slot, vectors, crop geometry of their frame, display index of their frame
        self.mv_slots: list[tuple[int, np.ndarray, tuple, int]] = []
        self.rgb_slots: list[tuple[int, np.ndarray, np.ndarray]] = []  # slot, grey previous, grey current
        self.audio_chunks: list[tuple[int, np.ndarray]] = []  # (sample rate, mono samples)
        self.audio_error: str | None = None

    def _capacity(self) -> int:
        vs, cfg, estimate = self.vs, self.cfg, None
        if vs.duration and vs.time_base:
            estimate = float(vs.duration * vs.time_base)
        elif self.container.duration:
            estimate = self.container.duration / self.av.time_base
        if cfg.max_duration is not None:
            estimate = min(estimate or cfg.max_duration, cfg.max_duration)
        return math.ceil(estimate * cfg.fps) + 2 if estimate else 64

    def decode(self) -> DecodedVideo:
        truncated = self._read()
        if self.decoded_frames == 0:
            raise VideoDecodeError(self.path, "zero frames: the video stream decodes to no frames")
        # at_least_one: a single frame shorter than one target step still gives one frame.
        self._emit(self.last_t - self.t0 + self._last_duration(), at_least_one=True)
        last = self.pending
        source_width, source_height = last.width, last.height
        # No decoded frame outlives this call: they hold their decoder's buffers.
        self.pending = self.previous = last = None

        cfg, n = self.cfg, self.timeline.count
        flow, sources = _motion_fields(
            n, cfg.resize, self.mv_slots, self.rgb_slots, np.array(self.pict_types)
        )
        for start, repeats in self.timeline.slots:
            if repeats > 1:
                flow[start + 1 : start + repeats] = flow[start]
                sources[start + 1 : start + repeats] = sources[start]
        motion = mo.quantize(flow).transpose(1, 0, 2, 3)  # (2, N, R, R)
        frames, motion = _rotate(self.timeline.frames[:n], motion, self.rotation)
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
        return DecodedVideo(
            frames=np.ascontiguousarray(frames), motion=np.ascontiguousarray(motion), audio=audio, meta=meta
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
        if truncated is None:
            return None
        if self.decoded_frames == 0:
            raise VideoDecodeError(
                self.path, f"truncated or corrupt before the first frame (FFmpeg: {truncated})"
            ) from truncated
        log.warning(
            "%s: truncated or corrupt after %d frames, keeping those (%s)",
            self.path,
            self.decoded_frames,
            truncated,
        )
        return str(truncated)

    def _on_video(self, frame, t: float | None) -> bool:
        """Takes the next frame in display order; True once max_duration is reached."""
        if t is None:
            # No timestamp: assume the nominal rate after the previous frame.
            t = 0.0 if self.last_t is None else self.last_t + 1.0 / self._nominal_rate()
        if self.t0 is None:
            self.t0 = t
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
        s = timeline.reserve(n)
        timeline.frames[s] = _square(frame, "rgb24", R)
        mvs = frame.side_data.get("MOTION_VECTORS")
        vectors = mvs.to_ndarray() if mvs is not None else None
        if vectors is not None and vectors.size:
            self.mv_slots.append((s.start, vectors, _crop_box(frame.width, frame.height, R), self.index))
        elif self.previous is not None:
            self.rgb_slots.append((s.start, _square(self.previous, "gray", R), _square(frame, "gray", R)))

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


def _motion_fields(n: int, R: int, mv_slots, rgb_slots, pict_types) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, R, R) float32 flow of the timeline and, per frame, its source: 0 none, 1 codec, 2 RGB diff."""
    flow = np.zeros((n, 2, R, R), dtype=np.float32)
    sources = np.zeros(n, dtype=np.int8)
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
