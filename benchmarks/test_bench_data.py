"""Data pipeline throughput on the CPU: the decoding epoch, the cached epoch, motion-vector rasterisation.

    pytest benchmarks/test_bench_data.py --benchmark-only

Runs on a small synthetic subset (4 classes x 3 videos of 4 s, 128x128, H.264 + AAC) with the default
DataConfig (16 frames at 12.5 fps, 112x112 clips), in one thread as in a DataLoader worker (torch's
intra-op threads only add synchronisation for tensors this small, and on a shared 2-core machine they made
timings swing by 10x). Requirements checked here: the cached epoch at least 10x
faster than the decoding one, and rasterising the motion vectors of a 16-frame 112x112 clip under 5 ms.
"""

import time

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mvfast.data import ClipCache, DataConfig, SyntheticMicroVideos, collate
from mvfast.data.motion import codec_vectors, rasterize
from mvfast.data.synthetic import encode_video, render_video

CFG = DataConfig()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    ds = SyntheticMicroVideos(root, train=True, num_classes=4, videos_per_class=3, config=CFG, cache=False)
    return ds, root


def run_epoch(ds) -> int:
    clips = 0
    for batch in DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate):
        clips += batch["label"].numel()
    return clips


def with_cache(ds, folder) -> None:
    ds.cache = ClipCache(folder)
    ds._last = None


def test_decode_epoch(benchmark, dataset, tmp_path):
    ds, _ = dataset
    rounds = iter(range(100))
    benchmark.pedantic(
        lambda: run_epoch(ds),
        setup=lambda: with_cache(ds, tmp_path / f"c{next(rounds)}"),
        rounds=3,
        iterations=1,
    )
    benchmark.extra_info["clips"] = len(ds)
    benchmark.extra_info["clips_per_s"] = len(ds) / benchmark.stats.stats.median


def test_cached_epoch(benchmark, dataset, tmp_path):
    ds, _ = dataset
    decode_times = []
    for attempt in range(3):
        with_cache(ds, tmp_path / f"decode{attempt}")
        started = time.perf_counter()
        run_epoch(ds)  # decodes and fills the cache
        decode_times.append(time.perf_counter() - started)
    decode_s = min(decode_times)
    with_cache(ds, tmp_path / "decode2")
    benchmark.pedantic(run_epoch, args=(ds,), rounds=10, iterations=1, warmup_rounds=1)
    # Minimum against minimum: on a 2-core machine shared with compilers, the medians swing with whatever
    # else runs; the minimum of each is its cost when it had the cores.
    cached_s = benchmark.stats.stats.min
    assert ds.cache.hits > 0 and ds.cache.misses == 0
    benchmark.extra_info.update(
        clips=len(ds), clips_per_s=len(ds) / cached_s, decode_epoch_s=decode_s, speedup=decode_s / cached_s
    )
    assert decode_s / cached_s >= 10, f"cached epoch only {decode_s / cached_s:.1f}x faster than decoding"


@pytest.fixture(scope="module")
def clip_vectors(tmp_path_factory):
    """The exported motion vectors of 16 frames of a 112x112 H.264 synthetic video."""
    frames, _ = render_video([1, 2, 0, 0], 5, np.random.default_rng(0), size=112, seconds=1.0)
    path = encode_video(tmp_path_factory.mktemp("mv") / "clip.mp4", frames, fps=25)
    vectors = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"flags2": "+export_mvs"}
        for frame in container.decode(stream):
            mvs = frame.side_data.get("MOTION_VECTORS")
            if mvs is not None:
                vectors.append(mvs.to_ndarray())
            if len(vectors) == 16:
                break
    assert len(vectors) == 16
    return vectors


def test_motion_rasterisation(benchmark, clip_vectors):
    def rasterise_clip():
        parts = [codec_vectors(v) for v in clip_vectors]
        boxes = np.concatenate([b for b, _ in parts])
        flow = np.concatenate([f for _, f in parts])
        frame = np.concatenate([np.full(len(b), i) for i, (b, _) in enumerate(parts)])
        return rasterize(boxes, flow, frame, 16, 112, 112)

    field, _ = benchmark(rasterise_clip)
    assert field.shape == (16, 2, 112, 112)
    benchmark.extra_info["vectors"] = int(sum(len(v) for v in clip_vectors))
    assert benchmark.stats.stats.median < 5e-3
