"""Data pipeline throughput on the CPU: the decoding epoch, the cached epoch, motion-vector rasterisation.

    pytest benchmarks/test_bench_data.py --benchmark-only

Runs on a small synthetic subset (4 classes x 3 videos of 4 s, 128x128, H.264 + AAC) with the default
DataConfig (16 frames at 12.5 fps, 112x112 clips), in one thread as in a DataLoader worker (torch's
intra-op threads only add synchronisation for tensors this small, and on a shared 2-core machine they made
timings swing by 10x). The bars, reported at the end of the run: the cached epoch at least 10x faster than
the decoding one, and rasterising the motion vectors of a 16-frame 112x112 clip under 5 ms.
"""

import av
import numpy as np
import pytest
from benchutil import BARS
from torch.utils.data import DataLoader

from mvfast.data import ClipCache, DataConfig, SyntheticMicroVideos, collate
from mvfast.data.encode import encode_video
from mvfast.data.motion import codec_vectors, rasterize
from mvfast.data.synthetic import render_video

CFG = DataConfig()
# one torch thread in every path, for the module (benchmarks/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INFO = dict(op="data", case="synthetic-4x3", device="cpu")
BARS.append(dict(INFO, mode="epoch", impl="cached", base="decode", at_least=10.0))
BARS.append(dict(INFO, mode="rasterise", impl="rasterise", max_ms=5.0))


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
    benchmark.extra_info.update(INFO, mode="epoch", impl="decode", clips=len(ds))
    benchmark.pedantic(
        lambda: run_epoch(ds),
        setup=lambda: with_cache(ds, tmp_path / f"c{next(rounds)}"),
        rounds=3,
        iterations=1,
    )
    assert ds.cache.misses > 0 and ds.cache.hits == 0


def test_cached_epoch(benchmark, dataset, tmp_path):
    ds, _ = dataset
    with_cache(ds, tmp_path / "cache")
    run_epoch(ds)  # decodes and fills the cache
    ds.cache.hits = ds.cache.misses = 0
    benchmark.extra_info.update(INFO, mode="epoch", impl="cached", clips=len(ds))
    benchmark.pedantic(run_epoch, args=(ds,), rounds=10, iterations=1, warmup_rounds=1)
    assert ds.cache.hits > 0 and ds.cache.misses == 0


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

    benchmark.extra_info.update(INFO, mode="rasterise", impl="rasterise")
    benchmark.extra_info["vectors"] = int(sum(len(v) for v in clip_vectors))
    field, _ = benchmark(rasterise_clip)
    assert field.shape == (16, 2, 112, 112)
