"""The on-disk clip cache: hit, miss, invalidation by settings and by file changes, atomic writes."""

import logging
import os

import numpy as np
import pytest

import mvfast.data.cache as cache_mod
from mvfast.data import ClipCache, DataConfig, load_video
from mvfast.data.encode import encode_video

CFG = DataConfig(clip_len=4, size=32, resize=32, scene_frames=2, scene_size=32)


def frames(n=10, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, 32, 32, 3)).astype(np.uint8)


@pytest.fixture
def video(tmp_path):
    t = np.arange(11025) / 22050
    return encode_video(tmp_path / "v.mp4", frames(), fps=20, audio=0.3 * np.sin(2 * np.pi * 500 * t))


@pytest.fixture
def counting_decode(monkeypatch):
    calls = []
    real = cache_mod.decode_video

    def decode(path, config):
        calls.append(path)
        return real(path, config)

    monkeypatch.setattr(cache_mod, "decode_video", decode)
    return calls


def test_miss_then_hit_returns_the_same_arrays(tmp_path, video, counting_decode):
    cache = ClipCache(tmp_path / "cache")
    first = cache.get_or_decode(video, CFG)
    second = cache.get_or_decode(video, CFG)
    assert (cache.misses, cache.hits, len(counting_decode)) == (1, 1, 1)
    np.testing.assert_array_equal(first.frames, second.frames)
    np.testing.assert_array_equal(first.motion, second.motion)
    np.testing.assert_array_equal(first.audio, second.audio)
    assert first.meta == second.meta
    assert second.frames.dtype == np.uint8 and second.motion.dtype == np.int8
    # Another ClipCache on the same folder (a later run, a worker) hits too.
    assert ClipCache(tmp_path / "cache").load(video, CFG) is not None


def test_no_audio_roundtrips_as_none(tmp_path):
    path = encode_video(tmp_path / "silent.mp4", frames(), fps=20)
    cache = ClipCache(tmp_path / "cache")
    cache.get_or_decode(path, CFG)
    assert cache.load(path, CFG).audio is None


def test_changed_setting_misses_unrelated_setting_hits(tmp_path, video, counting_decode):
    cache = ClipCache(tmp_path / "cache")
    cache.get_or_decode(video, CFG)
    cache.get_or_decode(video, CFG.replace(clip_len=2, size=16, test_clips=5))  # cut from the same arrays
    assert len(counting_decode) == 1
    other = cache.get_or_decode(video, CFG.replace(fps=10.0))
    assert len(counting_decode) == 2 and other.frames.shape[0] == 5
    assert cache.entry_path(video, CFG) != cache.entry_path(video, CFG.replace(fps=10.0))
    assert cache.load(video, CFG) is not None  # the old setting's entry is still valid for it


def test_changed_file_invalidates_its_entry(tmp_path, video, counting_decode):
    cache = ClipCache(tmp_path / "cache")
    before = cache.get_or_decode(video, CFG)
    st = os.stat(video)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert cache.load(video, CFG) is None and cache.stale == 1
    cache.get_or_decode(video, CFG)
    assert len(counting_decode) == 2 and cache.load(video, CFG) is not None  # replaced in place
    encode_video(video, frames(n=20, seed=1), fps=20)  # rewritten: new size and content
    after = cache.get_or_decode(video, CFG)
    assert len(counting_decode) == 3 and cache.stale == 3  # every load of a stale entry counts
    assert after.frames.shape[0] != before.frames.shape[0] and after.audio is None


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path, video, monkeypatch):
    cache = ClipCache(tmp_path / "cache")
    entry = cache.entry_path(video, CFG)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.dirname(src), os.path.basename(dst)))
        assert not os.path.exists(dst)  # the entry appears only by the rename
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", replace)
    cache.get_or_decode(video, CFG)
    assert seen == [(str(entry.parent), entry.name)]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]

    def failing_write(f, arrays, header):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_mod, "_write_entry", failing_write)
    other = CFG.replace(fps=5.0)
    cache.get_or_decode(video, other)  # the failed write is logged, the decode still returned
    assert not cache.entry_path(video, other).exists()
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".tmp")]


def test_damaged_entry_is_a_miss(tmp_path, video, caplog):
    cache = ClipCache(tmp_path / "cache")
    cache.get_or_decode(video, CFG)
    cache.entry_path(video, CFG).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="mvfast.data"):
        assert cache.load(video, CFG) is None
    assert "unreadable cache entry" in caplog.text
    assert cache.get_or_decode(video, CFG).frames.shape[0] == 7  # 0.5 s at 12.5 fps


def test_cached_epoch_does_not_decode(tmp_path, video, monkeypatch):
    cache = ClipCache(tmp_path / "cache")
    first = load_video(video, CFG, cache=cache)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(cache_mod, "decode_video", no_decode)
    second = load_video(video, CFG, cache=tmp_path / "cache")
    np.testing.assert_array_equal(first["rgb"].numpy(), second["rgb"].numpy())


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MVFAST_CACHE", str(tmp_path / "c"))
    assert cache_mod.default_cache_dir() == tmp_path / "c"
    assert ClipCache().root == tmp_path / "c" / "clips"
    monkeypatch.delenv("MVFAST_CACHE")
    assert cache_mod.default_cache_dir() == cache_mod.Path.home() / ".cache" / "mvfast"
