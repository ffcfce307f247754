"""Decoding: every container and codec, real-world files, rotation, VFR, short videos, bad files."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mvfast.data import (
    DataConfig,
    VideoDecodeError,
    clip_starts,
    decode_video,
    inference_needs,
    load_video,
    sample_clip,
)
from mvfast.data.encode import encode_video

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
CFG = DataConfig(clip_len=8, size=32, resize=48, scene_frames=3, scene_size=32, test_clips=2)

# (suffix, video codec, audio codec or None, decoder name)
MATRIX = [
    ("mp4", "libx264", "aac", "h264"),
    ("mp4", "libx264", None, "h264"),
    ("mov", "libx264", "aac", "h264"),
    ("mkv", "libx264", "libopus", "h264"),
    ("avi", "mpeg4", "libmp3lame", "mpeg4"),
    ("avi", "mpeg4", None, "mpeg4"),
    ("webm", "libvpx-vp9", "libopus", "vp9"),
    ("mkv", "libvpx-vp9", None, "vp9"),
]
AUDIO_RATES = {"aac": 22050, "libopus": 48000, "libmp3lame": 44100}


def moving_square(n=20, h=48, w=64, speed=2, seed=0):
    """A textured square moving right over a static noisy background, uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(60, 120, (h, w, 3)).astype(np.uint8)
    patch = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((4, 4)))[..., None] * np.array([200, 40, 40]) + 40
    frames = np.repeat(bg[None], n, axis=0)
    for i in range(n):
        x = 4 + speed * i
        frames[i, 12:28, x : x + 16] = patch[:, : max(0, min(16, w - x))]
    return frames


def tone(seconds, rate, hz=1000.0):
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * hz * t)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    files = {}
    for suffix, vcodec, acodec, _ in MATRIX:
        path = root / f"{vcodec}_{acodec}.{suffix}"
        audio = tone(1.0, AUDIO_RATES[acodec]) if acodec else None
        encode_video(
            path,
            moving_square(),
            fps=20,
            codec=vcodec,
            audio=audio,
            audio_rate=AUDIO_RATES.get(acodec, 22050),
            audio_codec=acodec or "aac",
        )
        files[(suffix, vcodec, acodec)] = path
    return files


@pytest.mark.parametrize("suffix,vcodec,acodec,decoder", MATRIX)
def test_decode_every_container_and_codec(media, suffix, vcodec, acodec, decoder):
    video = decode_video(media[(suffix, vcodec, acodec)], CFG)
    # 1 s at 20 fps resampled to 12.5 fps: targets 0, 0.08, ..., 0.96 -> 13 frames.
    assert video.frames.shape == (13, 48, 48, 3) and video.frames.dtype == np.uint8
    assert video.motion.shape == (2, 13, 48, 48) and video.motion.dtype == np.int8
    assert video.meta["video_codec"] == decoder
    assert video.meta["has_audio"] is (acodec is not None)
    if acodec:
        # 1 s at 16 kHz: 98 frames of 10 ms, pooled by 4 -> 25 windows (the encoder may pad a few ms).
        assert 24 <= video.audio.shape[0] <= 27 and video.audio.shape[1] == 64
    else:
        assert video.audio is None
    # The textured square is visible: frames differ from each other.
    assert np.abs(video.frames[0].astype(int) - video.frames[-1].astype(int)).mean() > 2


def test_sample_shapes_and_title(media):
    path = media[("mp4", "libx264", "aac")]
    s = load_video(path, CFG, title="Hello, World! hello")
    assert s["rgb"].shape == (3, 8, 32, 32) and s["rgb"].dtype == torch.float32
    assert s["motion"].shape == (2, 8, 32, 32) and s["motion"].dtype == torch.float32
    assert s["frames"].shape == (3, 3, 32, 32)
    assert s["audio"].shape[1] == 64 and s["audio_mask"].all()
    assert s["text"].tolist()[0] == s["text"].tolist()[2]  # "hello" twice, lower-cased
    assert s["text_mask"].tolist() == [True, True, True]
    assert "text" not in load_video(path, CFG)


def test_no_audio_is_masked_not_silence(media):
    s = load_video(media[("mp4", "libx264", None)], CFG)
    assert s["audio"].shape == (1, 64)
    assert not s["audio_mask"].any()


def test_normalisation_uses_config_mean_std(media):
    path = media[("mp4", "libx264", None)]
    raw = load_video(path, CFG.replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))["rgb"]
    norm = load_video(path, CFG)["rgb"]
    assert 0 <= raw.min() and raw.max() <= 1
    expected = (raw - torch.tensor(CFG.mean).view(3, 1, 1, 1)) / torch.tensor(CFG.std).view(3, 1, 1, 1)
    torch.testing.assert_close(norm, expected)


def _open_fds():
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def test_containers_are_closed(media, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    before = _open_fds()
    if before is None:
        pytest.skip("no /proc/self/fd on this system")
    for _ in range(3):
        for path in media.values():
            decode_video(path, CFG)
        with pytest.raises(VideoDecodeError):
            decode_video(bad, CFG)
    assert _open_fds() == before


# ---- real-world files ----------------------------------------------------------------------------

SHARED = [
    # name, has audio, source frames, seconds
    ("ucf_style_mpeg4_mp3.avi", True, 164, 164 / 25),
    ("h264_no_audio.mp4", False, 280, 280 / 28),
    ("h264_opus.mkv", True, 310, 310 / 30),  # no frame count in the header: found by decoding
]


@pytest.mark.parametrize("name,has_audio,source_frames,seconds", SHARED)
def test_shared_real_videos(name, has_audio, source_frames, seconds):
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real test videos not found at {SHARED_VIDEOS} (../shared/videos from the repo root)")
    video = decode_video(SHARED_VIDEOS / name, CFG)
    assert video.meta["has_audio"] is has_audio
    assert video.meta["source_frames"] == source_frames
    # Timeline length from the timestamps: duration * 12.5 fps, whatever the header says or lacks.
    assert abs(video.frames.shape[0] - seconds * CFG.fps) <= 1
    assert video.meta["motion_codec_frames"] > video.frames.shape[0] // 2
    assert video.meta["source_fps"] == pytest.approx(
        {"ucf_style_mpeg4_mp3.avi": 25, "h264_no_audio.mp4": 28, "h264_opus.mkv": 30}[name], rel=0.05
    )
    s = sample_clip(video, CFG, train=True)
    assert s["rgb"].shape == (3, 8, 32, 32) and torch.isfinite(s["rgb"]).all()


# ---- rotation, VFR, short videos -----------------------------------------------------------------


def test_rotation_metadata_is_applied(tmp_path):
    frames = np.full((10, 48, 48, 3), 30, np.uint8)
    frames[:, 2:14, 2:14] = 250  # a marker in the top-left corner
    path = encode_video(tmp_path / "rot.mp4", frames, fps=10, rotation=90)
    video = decode_video(path, CFG)
    assert video.meta["rotation"] == 90
    img = video.frames[0].mean(-1)
    # Displayed 90 degrees counter-clockwise, the top-left corner goes to the bottom-left.
    assert img[-11:-5, 5:11].mean() > 200 and img[5:11, 5:11].mean() < 80


def test_rotation_turns_the_motion_vectors(tmp_path):
    path = encode_video(tmp_path / "rot_motion.mp4", moving_square(h=64, w=64), fps=20, rotation=90)
    video = decode_video(path, CFG.replace(resize=64, size=64))
    flow = video.motion.astype(np.float32) / 4
    moving = np.hypot(flow[0], flow[1]) > 0.5
    # Moving right in the stored picture is moving up once turned counter-clockwise.
    assert np.median(flow[1][moving]) < -1 and abs(np.median(flow[0][moving])) < 0.5


def test_variable_frame_rate_uses_timestamps(tmp_path):
    pts = [0, 40, 80, 200, 220, 240, 500, 540, 580, 900]
    levels = np.arange(len(pts)) * 25 + 10
    frames = np.broadcast_to(levels.astype(np.uint8)[:, None, None, None], (len(pts), 32, 32, 3)).copy()
    path = encode_video(tmp_path / "vfr.mkv", frames, fps=25, pts_ms=pts)
    video = decode_video(path, CFG)
    # Target k shows the last frame with pts <= 80 k ms; the last frame lasts the median interval (40 ms).
    targets = np.arange(0, 940, 80)
    expected = levels[np.searchsorted(pts, targets, side="right") - 1]
    assert video.frames.shape[0] == len(targets)
    np.testing.assert_allclose(video.frames.mean(axis=(1, 2, 3)), expected, atol=4)


@pytest.mark.parametrize("mode,short", [("loop", "looped"), ("pad", "padded")])
def test_short_video_is_looped_or_padded(tmp_path, mode, short):
    path = encode_video(tmp_path / "short.mp4", moving_square(n=5), fps=25)
    cfg = CFG.replace(short_video=mode)
    s = load_video(path, cfg)
    n = 3  # 0.2 s at 12.5 fps
    assert s["meta"]["num_frames"] == n and s["meta"]["short"] == short
    rgb = s["rgb"]
    if mode == "loop":
        torch.testing.assert_close(rgb[:, n : 2 * n], rgb[:, :n])
    else:
        torch.testing.assert_close(rgb[:, n:], rgb[:, n - 1 : n].expand(-1, 8 - n, -1, -1))
        assert (s["motion"][:, n:] == 0).all()
    assert load_video(path, CFG.replace(clip_len=2))["meta"]["short"] is None


def test_test_clips_are_evenly_spaced_and_training_is_random(media):
    assert clip_starts(100, 16, 3) == [0, 42, 84]
    assert clip_starts(100, 16, 1) == [42]
    assert clip_starts(10, 16, 3) == [0, 0, 0]
    video = decode_video(media[("mp4", "libx264", "aac")], CFG.replace(fps=20.0))  # 20 frames
    starts = [sample_clip(video, CFG, clip=c)["meta"]["clip_start"] for c in range(2)]
    assert starts == [0, 12]
    with pytest.raises(ValueError, match="clip must be in"):
        sample_clip(video, CFG, clip=2)
    g = torch.Generator().manual_seed(0)
    seen = {sample_clip(video, CFG, train=True, generator=g)["meta"]["clip_start"] for _ in range(30)}
    assert len(seen) > 3 and min(seen) >= 0 and max(seen) <= 12
    a = sample_clip(video, CFG, train=True, generator=torch.Generator().manual_seed(5))
    b = sample_clip(video, CFG, train=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a["rgb"], b["rgb"])


def test_max_duration_cuts_video_and_audio(media):
    video = decode_video(media[("mp4", "libx264", "aac")], CFG.replace(max_duration=0.5))
    assert video.frames.shape[0] == 7  # 0, 0.08, ..., 0.48
    assert video.audio.shape[0] == 12  # 8000 samples: 1 + (8000 - 400) // 160 = 48 frames of 10 ms, by 4


# ---- bad files -----------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty file") as info:
        load_video(path, CFG)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_text_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("These are my holiday notes, not a video.\n" * 20)
    with pytest.raises(VideoDecodeError, match="not a video") as info:
        load_video(path, CFG)
    assert str(path) in str(info.value)


def test_truncated_mp4(tmp_path, media):
    data = media[("mp4", "libx264", "aac")].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: cut off
    with pytest.raises(VideoDecodeError, match="truncated") as info:
        load_video(path, CFG)
    assert str(path) in str(info.value)


def test_no_video_stream(tmp_path):
    import av

    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.pts = 0
        for p in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(p)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        load_video(path, CFG)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode_video(tmp_path / "nope.mp4", CFG)
    with pytest.raises(VideoDecodeError, match="directory"):
        decode_video(tmp_path, CFG)


def test_decode_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(VideoDecodeError("/x.mp4", "zero frames")))
    assert isinstance(e, VideoDecodeError) and e.path == "/x.mp4" and e.reason == "zero frames"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"DataConfig.clip_len: expected a positive int, got 0"):
        DataConfig(clip_len=0)
    with pytest.raises(ValueError, match=r"DataConfig.size"):
        DataConfig(size=200, resize=128)
    with pytest.raises(ValueError, match=r"DataConfig.short_video"):
        DataConfig(short_video="wrap")
    keys = {"fps", "resize", "max_duration", "audio_pool", "max_audio_windows"}
    assert set(DataConfig().cache_key()) == keys


# ---------------------------------------------------------------------------------------------------------
# Decoding only what inference cuts (needs=)


def _same_test_samples(full, part, cfg):
    for clip in range(cfg.test_clips):
        a, b = sample_clip(full, cfg, clip=clip), sample_clip(part, cfg, clip=clip)
        for key in ("rgb", "motion", "frames", "audio", "audio_mask"):
            assert torch.equal(a[key], b[key]), (clip, key)


def _inputs_of_every_kind(media):
    files = [media[(s, v, a)] for s, v, a, _ in MATRIX]
    if SHARED_VIDEOS.is_dir():
        files += sorted(p for p in SHARED_VIDEOS.iterdir() if p.suffix in (".mp4", ".avi", ".mkv"))
    return files


def test_needs_keeps_exactly_the_test_samples(media):
    # Every container and codec, and the real files (no frame count in the mkv's header, decode-order
    # stamps in the AVI): the samples cut from the kept frames equal those of a whole decode, bit for bit.
    cfg = CFG.replace(test_clips=3)
    for path in _inputs_of_every_kind(media):
        full = decode_video(path, cfg)
        part = decode_video(path, cfg, needs=inference_needs(cfg))
        assert part.num_frames == full.num_frames and part.slots is not None, path
        assert len(part.slots) < full.num_frames or full.num_frames <= cfg.clip_len * 3, path
        _same_test_samples(full, part, cfg)
        assert part.meta["seeks"] == 0  # short files are read through


def test_needs_without_motion_or_audio(media):
    path = media[("mp4", "libx264", "aac")]
    part = decode_video(path, CFG, needs=inference_needs(CFG), motion=False, audio=False)
    assert part.audio is None and not part.motion.any() and part.meta["motion_codec_frames"] == 0
    full = decode_video(path, CFG)
    s = sample_clip(part, CFG, clip=1)
    assert torch.equal(s["rgb"], sample_clip(full, CFG, clip=1)["rgb"])


def test_needs_with_a_wrong_duration_in_the_header(tmp_path):
    # The container says 0.5 s longer than the frames last (a header written before the file was cut):
    # the kept frames are judged on the wrong length, and a second pass reads them right.
    path = encode_video(tmp_path / "short.mp4", moving_square(n=30), fps=20)
    cfg = CFG.replace(test_clips=3)
    from mvfast.data import video as video_module

    original = video_module._Decoder._duration
    try:
        video_module._Decoder._duration = lambda self: 2.0
        part = decode_video(path, cfg, needs=inference_needs(cfg))
    finally:
        video_module._Decoder._duration = original
    _same_test_samples(decode_video(path, cfg), part, cfg)


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    # 40 s at 20 fps with a key frame every second, and a tone: long enough that the clips are seeked to.
    n = 800
    frames = np.concatenate([moving_square(n=40, seed=i % 3) for i in range(n // 40)])
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    return encode_video(
        path, frames, fps=20, audio=tone(n / 20, 22050), options={"preset": "ultrafast", "g": "20"}
    )


def test_needs_seeks_in_a_long_video(long_video):
    cfg = CFG.replace(test_clips=3)
    full = decode_video(long_video, cfg)
    part = decode_video(long_video, cfg, needs=inference_needs(cfg))
    assert part.meta["seeks"] >= 3 and part.meta["source_frames"] < full.meta["source_frames"] / 3
    # The clips (frames and motion) and the audio are exact; a scene frame far from the clips is the key
    # frame before its time (at most a second, the key frame interval, earlier).
    for clip in range(cfg.test_clips):
        a, b = sample_clip(full, cfg, clip=clip), sample_clip(part, cfg, clip=clip)
        for key in ("rgb", "motion", "audio"):
            assert torch.equal(a[key], b[key]), (clip, key)
    near = {int(k): v for k, v in part.meta["near_seconds"].items()}
    assert near and all(0 <= k / cfg.fps - t <= 1.0 + 1e-6 for k, t in near.items())


def test_segments_of_a_long_video(long_video):
    from mvfast.data import segment, segment_bounds

    cfg = CFG.replace(test_clips=2)
    assert segment_bounds(100, 12.5, 2.0, 1.0)[:2] == [(0, 25), (12, 37)]
    assert segment_bounds(100, 12.5, 2.0, 1.0)[-1] == (75, 100)  # one more, ending with the video
    assert segment_bounds(10, 12.5, 2.0, 1.0) == [(0, 10)]
    full = decode_video(long_video, cfg)
    part = decode_video(long_video, cfg, needs=inference_needs(cfg, window=10.0, stride=10.0))
    bounds = segment_bounds(full.num_frames, cfg.fps, 10.0, 10.0)
    assert len(bounds) == 4
    for a, b in bounds:
        whole, kept = segment(full, a, b), segment(part, a, b)
        assert whole.num_frames == kept.num_frames == b - a
        for clip in range(cfg.test_clips):
            x, y = sample_clip(whole, cfg, clip=clip), sample_clip(kept, cfg, clip=clip)
            assert torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["motion"], y["motion"])
            assert torch.equal(x["audio"], y["audio"]) and 0 < x["audio"].shape[0] < full.audio.shape[0]


def test_motion_is_the_same_every_decode(media):
    # With frame threads FFmpeg's H.264 decoder exported the B-frames' vectors only some of the time.
    path = media[("mp4", "libx264", None)]
    first = decode_video(path, CFG.replace(decode_threads=2))
    for _ in range(4):
        again = decode_video(path, CFG.replace(decode_threads=2))
        assert np.array_equal(first.motion, again.motion)
