"""Video data pipeline: decoding, sampling, motion, audio, text, cache, datasets and the synthetic set.

Everything here is pure Python over PyAV, NumPy and PyTorch; it does not need the compiled extension.
PyAV is imported when a video is decoded or encoded: the configs, collate and the datasets' listings work
without it.

>>> from mvfast.data import load_video, DataConfig
>>> sample = load_video("clip.mp4", DataConfig(clip_len=16, size=112), title="My first video")
>>> sample["rgb"].shape, sample["motion"].shape, sample["audio"].shape
(torch.Size([3, 16, 112, 112]), torch.Size([2, 16, 112, 112]), torch.Size([A, 64]))
"""

from .audio import audio_features, log_mel, mel_filterbank
from .cache import ClipCache, default_cache_dir
from .collate import Collate, SkipCounter, Skipped, collate
from .config import DataConfig
from .datasets import UCF101, VideoCSV, VideoDataset, VideoFolder, VideoItem
from .encode import encode_video
from .motion import codec_vectors, rasterize, rgb_difference_flow
from .sampling import (
    clip_starts,
    inference_needs,
    load_video,
    sample_clip,
    scene_indices,
    segment,
    segment_bounds,
)
from .text import tokenize
from .video import VIDEO_EXTENSIONS, DecodedVideo, VideoDecodeError, decode_video

__all__ = [
    "DataConfig",
    "load_video",
    "decode_video",
    "sample_clip",
    "clip_starts",
    "scene_indices",
    "segment",
    "segment_bounds",
    "inference_needs",
    "DecodedVideo",
    "VideoDecodeError",
    "VIDEO_EXTENSIONS",
    "ClipCache",
    "default_cache_dir",
    "Collate",
    "collate",
    "Skipped",
    "SkipCounter",
    "VideoDataset",
    "VideoItem",
    "VideoFolder",
    "VideoCSV",
    "UCF101",
    "SyntheticMicroVideos",
    "encode_video",
    "log_mel",
    "mel_filterbank",
    "audio_features",
    "tokenize",
    "codec_vectors",
    "rasterize",
    "rgb_difference_flow",
]


def __getattr__(name):
    # The synthetic set is loaded on first use, not with the package, so that
    # `python -m mvfast.data.synthetic` runs the module fresh (runpy warns when it was imported already).
    if name == "SyntheticMicroVideos":
        from . import synthetic

        return synthetic.SyntheticMicroVideos
    raise AttributeError(f"module 'mvfast.data' has no attribute {name!r}")
