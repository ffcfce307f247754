"""Cutting a sample out of a decoded video: the clip, its crop, the scene frames, the audio, the title.

:func:`load_video` is the one-call entry point: decode (or read the cache), then cut the sample.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from . import motion as mo
from .config import DataConfig
from .text import tokenize
from .video import DecodedVideo, decode_video


def clip_starts(num_frames: int, clip_len: int, num_clips: int) -> list[int]:
    """First frame of each of `num_clips` evenly spaced clips (the first at 0, the last ending at the end);
    one clip is centred. All 0 when the video is shorter than a clip."""
    span = max(num_frames - clip_len, 0)
    if num_clips == 1:
        return [span // 2]
    return [round(i * span / (num_clips - 1)) for i in range(num_clips)]


def scene_indices(num_frames: int, scene_frames: int) -> np.ndarray:
    """Timeline indices of the scene frames: evenly spread over the video, each in the middle of its part."""
    return np.minimum(
        ((np.arange(scene_frames) + 0.5) * num_frames / scene_frames).astype(np.int64), num_frames - 1
    )


def segment_bounds(num_frames: int, fps: float, window: float, stride: float) -> list[tuple[int, int]]:
    """[first, end) timeline indices of the segments of `window` seconds every `stride` seconds: from the
    start, then one more that ends with the video where the last does not; one segment for a video shorter
    than a window."""
    length = max(1, round(window * fps))
    step = max(1, round(stride * fps))
    if num_frames <= length:
        return [(0, num_frames)]
    starts = list(range(0, num_frames - length + 1, step))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return [(a, a + length) for a in starts]


def inference_needs(config: DataConfig, window: float | None = None, stride: float | None = None):
    """The ``needs`` of :func:`mvfast.data.decode_video` for the test clips and scene frames that
    :func:`sample_clip` cuts (``train=False``), of the whole video or of each segment (``window``,
    ``stride`` in seconds, :func:`segment_bounds`): a function of the timeline length giving the clips'
    indices (exact) and the scene frames' (near)."""
    cfg = config

    def needs(n: int) -> tuple[np.ndarray, np.ndarray]:
        bounds = [(0, n)] if window is None else segment_bounds(n, cfg.fps, window, stride or window)
        exact, near = [], []
        for a, b in bounds:
            m = b - a
            for start in clip_starts(m, cfg.clip_len, cfg.test_clips):
                exact.append(a + _clip_indices(m, start, cfg.clip_len, cfg.short_video)[0])
            near.append(a + scene_indices(m, cfg.scene_frames))
        return np.unique(np.concatenate(exact)), np.unique(np.concatenate(near))

    return needs


def segment(video: DecodedVideo, first: int, end: int) -> DecodedVideo:
    """The timeline frames [first, end) of a video (and the audio windows of that time) as a video of its
    own, without copying the frames of a whole decode; of a decode that kept some frames, the kept ones in
    that range."""
    n = video.num_frames
    meta = dict(video.meta, num_frames=end - first, duration=(end - first) / (n / video.meta["duration"]))
    if video.slots is None:
        frames, motion, slots = video.frames[first:end], video.motion[:, first:end], None
    else:
        a, b = np.searchsorted(video.slots, [first, end])
        frames, motion, slots = video.frames[a:b], video.motion[:, a:b], video.slots[a:b] - first
    audio = video.audio
    if audio is not None and len(audio):
        # Audio windows span the whole track evenly (pooled to at most max_audio_windows).
        lo, hi = (round(i * len(audio) / n) for i in (first, end))
        audio = audio[lo : max(hi, lo + 1)]
    return DecodedVideo(frames=frames, motion=motion, audio=audio, meta=meta, slots=slots)


def _clip_indices(n: int, start: int, clip_len: int, mode: str) -> tuple[np.ndarray, str | None]:
    if n >= clip_len:
        return np.arange(start, start + clip_len), None
    if mode == "loop":
        return np.arange(clip_len) % n, "looped"
    return np.minimum(np.arange(clip_len), n - 1), "padded"


def _normalize(x: torch.Tensor, mean, std, channel_dim: int) -> torch.Tensor:
    """uint8 -> float32 (x / 255 - mean) / std: one multiply and one subtract, in place on the float copy."""
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    std_t = torch.tensor(std, dtype=torch.float32)
    out = x.float().mul_((1.0 / (255.0 * std_t)).view(shape))
    return out.sub_((torch.tensor(mean, dtype=torch.float32) / std_t).view(shape))


def _take(array: np.ndarray, index, flip_axis: int | None) -> torch.Tensor:
    # Cut out of the (memory-mapped) cache and, if flip_axis is given, mirrored along it, while still 8-bit.
    out = array[index]
    if flip_axis is not None:
        out = np.flip(out, axis=flip_axis)
    return torch.from_numpy(np.ascontiguousarray(out))


def sample_clip(
    video: DecodedVideo,
    config: DataConfig | None = None,
    *,
    train: bool = False,
    clip: int | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Cuts a sample from a decoded video.

    Training (`train=True`): a clip at a random offset, a random `size` crop and, if config.random_flip, a
    horizontal flip with probability 1/2 (motion dx negated). Otherwise clip number `clip` of
    config.test_clips evenly spaced clips (default: the middle one), centre crop, no flip. Randomness comes
    from `generator`, or torch's global generator (seeded per DataLoader worker).

    Returns a dict of:
        rgb (float32[3, T, size, size]): normalised with config.mean / config.std.
        motion (float32[2, T, size, size]): forward flow (dx, dy) in pixels of the `resize` square per source
            frame.
        frames (float32[F, 3, scene_size, scene_size]): normalised scene frames spread over the whole video.
        audio (float32[A, 64]): log-mel windows; one all-zero row when the file has no audio.
        audio_mask (bool[A]): True at real windows; all False when the file has no audio.
        meta (dict): the decoding facts plus clip_start, clip_index, crop, flipped and `short` ("looped",
            "padded" or None when the video has at least T frames).
    """
    cfg = config or DataConfig()
    n = video.num_frames
    R = video.frames.shape[1]
    T, S = cfg.clip_len, cfg.size
    if S > R:
        raise ValueError(
            f"sample_clip: config.size={S} is larger than the decoded frames ({R}x{R}); decode "
            f"with resize >= size"
        )

    def randint(high: int) -> int:
        return int(torch.randint(high, (1,), generator=generator)) if high > 1 else 0

    if train:
        start = randint(n - T + 1) if n > T else 0
        crop_y, crop_x = randint(R - S + 1), randint(R - S + 1)
        flip = cfg.random_flip and randint(2) == 1
        clip_index = -1
    else:
        clip_index = cfg.test_clips // 2 if clip is None else clip
        if not 0 <= clip_index < cfg.test_clips:
            raise ValueError(
                f"sample_clip: clip must be in [0, {cfg.test_clips}) (config.test_clips), got {clip}"
            )
        start = clip_starts(n, T, cfg.test_clips)[clip_index]
        crop_y = crop_x = (R - S) // 2
        flip = False
    idx, short = _clip_indices(n, start, T, cfg.short_video)

    rows, cols = slice(crop_y, crop_y + S), slice(crop_x, crop_x + S)
    at = video.rows(idx)  # the rows holding those timeline frames (the same, unless only some were kept)
    # Flips are applied to the 8-bit data while it is cut out, and channels moved first while 8-bit too,
    # so that the float tensors are written once, contiguous.
    frames = _take(video.frames, (at, rows, cols), -2 if flip else None)  # (T, S, S, 3) uint8
    rgb = _normalize(frames.permute(3, 0, 1, 2).contiguous(), cfg.mean, cfg.std, 0)  # (3, T, S, S)
    flow = mo.dequantize(
        _take(video.motion, (slice(None), at, rows, cols), -1 if flip else None)
    )  # (2, T, S, S)
    if flip:
        flow[0].neg_()
    if short == "padded":
        flow[:, n:] = 0  # a repeated frame does not move
    scene_idx = video.rows(scene_indices(n, cfg.scene_frames))
    scene = _take(video.frames, (scene_idx,), -2 if flip else None).permute(0, 3, 1, 2)  # (F, 3, R, R) uint8
    if cfg.scene_size != R:
        # Resized while still uint8 (torch's fast channels-last path), then normalised at the smaller size.
        scene = F.interpolate(
            scene, size=(cfg.scene_size, cfg.scene_size), mode="bilinear", align_corners=False, antialias=True
        )
    scene = _normalize(scene.contiguous(), cfg.mean, cfg.std, 1)  # (F, 3, h, w)

    if video.audio is not None and len(video.audio):
        audio = torch.from_numpy(
            np.array(video.audio, dtype=np.float32)
        )  # a copy: cached arrays are read-only
        audio_mask = torch.ones(audio.shape[0], dtype=torch.bool)
    else:
        # Masked, never zeros that a model would take for silence.
        audio = torch.zeros(1, 64)
        audio_mask = torch.zeros(1, dtype=torch.bool)

    meta = dict(video.meta)
    meta.update(
        clip_start=int(start), clip_index=clip_index, crop=(crop_y, crop_x), flipped=flip, short=short
    )
    return {
        "rgb": rgb.contiguous(),
        "motion": flow.contiguous(),
        "frames": scene.contiguous(),
        "audio": audio,
        "audio_mask": audio_mask,
        "meta": meta,
    }


def load_video(
    path: str | os.PathLike,
    config: DataConfig | None = None,
    title: str | None = None,
    *,
    train: bool = False,
    clip: int | None = None,
    generator: torch.Generator | None = None,
    cache=None,
) -> dict:
    """Decodes a video file into one sample of tensors.

    Args:
        path: an mp4, avi, mkv, mov or webm file (H.264, MPEG-4 Part 2, VP9 and anything else FFmpeg reads).
        config: a :class:`DataConfig`; defaults to DataConfig().
        title: the video's title; adds `text` and `text_mask`.
        train, clip, generator: see :func:`sample_clip`.
        cache: a :class:`mvfast.data.ClipCache`, a cache directory, or None to decode without caching.

    Returns:
        The dict of :func:`sample_clip` (rgb (3, T, H, W), motion (2, T, H, W), frames (F, 3, h, w),
        audio (A, 64), audio_mask (A,), meta), plus text (LongTensor[W]) and text_mask (BoolTensor[W]) when
        a title is given (W >= 1; a title without words is one masked position).

    Raises:
        FileNotFoundError, VideoDecodeError: see :func:`mvfast.data.decode_video`.
    """
    cfg = config or DataConfig()
    if cache is None:
        decoded = decode_video(path, cfg)
    else:
        from .cache import ClipCache

        if not isinstance(cache, ClipCache):
            cache = ClipCache(cache)
        decoded = cache.get_or_decode(path, cfg)
    sample = sample_clip(decoded, cfg, train=train, clip=clip, generator=generator)
    if title is not None:
        sample["text"], sample["text_mask"] = tokenize(title, cfg.vocab_size, cfg.max_title_tokens)
    return sample
