"""One dataclass holds every data setting: clip length, sampling rate, sizes, scene frames, clips per video.

Settings that change what is decoded (`fps`, `resize`, `max_duration`, the audio windowing) form the cache
key (:meth:`DataConfig.cache_key`); settings applied when a clip is cut from the decoded arrays (clip length,
crop size, scene frames, test clips, normalisation) do not, so changing them reuses the cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# ImageNet statistics: the scene branch is VGG and users bring ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SHORT_VIDEO_MODES = ("loop", "pad")


def _decode_setting(default):
    # Marks a field whose change alters the decoded arrays, hence the cache key.
    return field(default=default, metadata={"cache": True})


@dataclass(frozen=True)
class DataConfig:
    """Settings of the video data pipeline.

    Shapes of a sample (see :func:`mvfast.data.load_video`): ``rgb`` (3, clip_len, size, size),
    ``motion`` (2, clip_len, size, size), ``frames`` (scene_frames, 3, scene_size, scene_size),
    ``audio`` (A, 64) with A <= max_audio_windows, ``text`` (W,) with W <= max_title_tokens.
    """

    clip_len: int = 16
    """T, frames per clip (C3D uses 16)."""
    fps: float = _decode_setting(12.5)
    """Rate of the decoded timeline. The paper reads at 50 fps and keeps a subset; 12.5 is every 4th of those,
    so a 16-frame clip spans 1.28 s of a micro-video."""
    size: int = 112
    """H = W of the rgb and motion clips (C3D's 112)."""
    resize: int = _decode_setting(128)
    """Decoded frames are resized so that the short side is `resize`, then centre-cropped to a square of that
    side; this is what is cached. Training crops `size` at random positions inside it, testing at the
    centre."""
    scene_frames: int = 8
    """F, scene frames evenly spaced over the whole video."""
    scene_size: int = 112
    """h = w of the scene frames. They are resized from the `resize` square, so keep resize >= scene_size for
    full detail."""
    test_clips: int = 3
    """Evenly spaced clips per video when not training (test-time averaging)."""
    short_video: str = "loop"
    """How a video with fewer than clip_len frames is filled: "loop" repeats it from the start, "pad" repeats
    its last frame (with zero motion). The sample's meta says which was done."""
    random_flip: bool = True
    """Horizontal flip with probability 1/2 in training (the motion's x component is negated with it)."""
    max_duration: float | None = _decode_setting(None)
    """Seconds decoded from the start of each file; None decodes it all."""
    audio_pool: int = _decode_setting(4)
    """Log-mel frames (10 ms hop) averaged into one audio window: 4 gives 40 ms windows, 25 per second."""
    max_audio_windows: int = _decode_setting(256)
    """Bound on A. Longer audio is average-pooled over time down to this many windows, so the whole track is
    still seen."""
    vocab_size: int = 16384
    """Size of the hashed title vocabulary; id 0 is padding."""
    max_title_tokens: int = 32
    """Bound on W, the title tokens kept."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decode_threads: int = 0
    """Threads of the video decoder; 0 lets FFmpeg choose."""

    def __post_init__(self):
        positive_ints = (
            "clip_len",
            "size",
            "resize",
            "scene_frames",
            "scene_size",
            "test_clips",
            "audio_pool",
            "max_audio_windows",
            "max_title_tokens",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataConfig.{name}: expected a positive int, got {value!r}")
        if not isinstance(self.decode_threads, int) or self.decode_threads < 0:
            raise ValueError(f"DataConfig.decode_threads: expected an int >= 0, got {self.decode_threads!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 2:
            raise ValueError(
                f"DataConfig.vocab_size: expected an int >= 2 (id 0 is padding), got {self.vocab_size!r}"
            )
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"DataConfig.fps: expected a positive finite number, got {self.fps!r}")
        if self.size > self.resize:
            raise ValueError(
                f"DataConfig.size: expected size <= resize ({self.resize}) since clips are cropped "
                f"from the resized square, got {self.size}"
            )
        if self.short_video not in SHORT_VIDEO_MODES:
            raise ValueError(
                f"DataConfig.short_video: expected one of {SHORT_VIDEO_MODES}, got {self.short_video!r}"
            )
        if self.max_duration is not None and not (self.max_duration > 0):
            raise ValueError(
                f"DataConfig.max_duration: expected None or seconds > 0, got {self.max_duration!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"DataConfig.{name}: expected 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"DataConfig.std: expected positive values, got {self.std!r}")

    def cache_key(self) -> dict:
        """The settings that determine the decoded (cached) arrays, as a JSON-able dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("cache")}

    @classmethod
    def for_inputs(cls, inputs, **settings) -> DataConfig:
        """The DataConfig of `settings` (any other fields) whose samples are what a model eats.

        ``inputs`` is the model's :class:`mvfast.models.InputSpec` (``model.config.inputs()``): its clip_len,
        size, scene_frames, scene_size, vocab_size and max_title_tokens are taken, and its resize where the
        model fixes one; else resize is the settings' (or the default), raised to at least size and
        scene_size.
        """
        resize = inputs.resize
        if resize is None:
            resize = max(settings.get("resize", cls.resize), inputs.size, inputs.scene_size)
        sizes = dict(
            clip_len=inputs.clip_len,
            size=inputs.size,
            resize=resize,
            scene_frames=inputs.scene_frames,
            scene_size=inputs.scene_size,
            vocab_size=inputs.vocab_size,
            max_title_tokens=inputs.max_title_tokens,
        )
        return cls(**{**settings, **sizes})

    def with_inputs(self, inputs) -> DataConfig:
        """This config with a model's input sizes (see :meth:`for_inputs`)."""
        return self.for_inputs(inputs, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def replace(self, **changes) -> DataConfig:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)
