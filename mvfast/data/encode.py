"""Writing video files: frames (and a mono audio track) into any container and codec FFmpeg has.

The synthetic set is made with it, and the tests and benchmarks use it to make files of every container,
codec, rotation and frame-rate pattern the decoder must read. PyAV is imported on the first call.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import numpy as np

from ._av import require_av

_FAST_OPTIONS = {
    "libx264": {"preset": "veryfast"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    "libvpx": {"deadline": "realtime", "cpu-used": "8"},
}


def _audio_array(wave: np.ndarray, fmt: str) -> np.ndarray:
    # Converts float samples in [-1, 1] to what the encoder's sample format holds.
    wave = np.clip(wave, -1.0, 1.0)
    if fmt.startswith("s16"):
        return (wave * 32767).astype(np.int16)
    if fmt.startswith("s32"):
        return (wave * 2147483647).astype(np.int32)
    if fmt.startswith("dbl"):
        return wave.astype(np.float64)
    return wave.astype(np.float32)


def encode_video(
    path: str | os.PathLike,
    frames,
    fps: float = 25.0,
    codec: str = "libx264",
    audio: np.ndarray | None = None,
    audio_rate: int = 22050,
    audio_codec: str = "aac",
    rotation: int | None = None,
    pts_ms: list[int] | None = None,
    container_format: str | None = None,
    options: dict | None = None,
) -> Path:
    """Encodes frames (and optionally a mono audio track) into a file; the container follows the suffix.

    Args:
        frames (uint8[N, H, W, 3]): RGB frames, H and W even.
        audio (float[S]): mono samples in [-1, 1] at `audio_rate`.
        rotation: display rotation in degrees counter-clockwise, stored as the stream's display matrix.
        pts_ms: presentation times in milliseconds, one per frame, for a variable frame rate file.
        options: encoder options (default: fast presets for x264 and libvpx).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"encode_video: frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    if pts_ms is not None and len(pts_ms) != len(frames):
        raise ValueError(
            f"encode_video: pts_ms must have one time per frame ({len(frames)}), got {len(pts_ms)}"
        )
    av = require_av()
    n, h, w, _ = frames.shape
    # The MP3 encoder's priming delay gives negative audio timestamps; AVI's default shift of every stream
    # then shows up as a dropped first video frame. Keep the timestamps as encoded instead.
    muxer_options = {"avoid_negative_ts": "disabled"} if path.suffix.lower() == ".avi" else {}
    with av.open(str(path), "w", format=container_format, options=muxer_options) as out:
        vs = out.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.codec_context.options = dict(options if options is not None else _FAST_OPTIONS.get(codec, {}))
        rate = fractions.Fraction(fps).limit_denominator(1001)
        vs.codec_context.time_base = fractions.Fraction(1, 1000) if pts_ms is not None else 1 / rate
        if pts_ms is not None:
            vs.time_base = fractions.Fraction(1, 1000)
        if rotation:
            vs.set_display_rotation(rotation)
        astream = None
        if audio is not None:
            astream = out.add_stream(audio_codec, rate=audio_rate)
            astream.layout = "mono"
            wave = _audio_array(np.asarray(audio, dtype=np.float64), astream.codec_context.format.name)
        chunk = 1024
        for i in range(n):
            # Converted here with one thread: FFmpeg's sliced RGB->YUV conversion gave different bytes from
            # run to run.
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24").reformat(
                format="yuv420p", threads=1
            )
            # Explicit timestamps: left to the encoder, some muxers (AVI with an audio track) skip one.
            frame.pts = int(pts_ms[i]) if pts_ms is not None else i
            frame.time_base = vs.codec_context.time_base
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if astream is not None:
            # All video first, then all audio: the muxer interleaves by timestamp.
            for start in range(0, len(wave), chunk):
                part = wave[start : start + chunk]
                af = av.AudioFrame.from_ndarray(
                    part[None, :], format=astream.codec_context.format.name, layout="mono"
                )
                af.sample_rate = audio_rate
                af.pts = start
                af.time_base = fractions.Fraction(1, audio_rate)
                for packet in astream.encode(af):
                    out.mux(packet)
        if astream is not None:
            for packet in astream.encode():
                out.mux(packet)
    return path
