"""Decode time per video, in one run: mvfast's whole decode (what the cache stores, and what predict read
before issue 14), its inference decode (the test clips' and scene frames' timeline frames only, seeking in
long files; with and without motion and audio), a plain PyAV decode of every frame to RGB, and torchcodec's
decoder (every frame, and only the frames the clips need) where torchcodec is installed.

    pytest benchmarks/test_bench_decode.py --benchmark-only

Files: synthetic micro-videos (4 s, 128 px, H.264 + AAC, as the embedded set), the real clips in
../shared/videos (skipped where that folder is missing), and one long file (60 s, 128 px, a key frame every
2 s). The tiny preset's data settings (8-frame clips of a 80 px square at 12.5 fps, 3 test clips, 4 scene
frames). One decoder thread and one torch thread, as in a DataLoader worker.

torchcodec needs FFmpeg's shared libraries on the system (it bundles none): pip install torchcodec, and
e.g. apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4. It decodes RGB
only (no motion vectors), so it could serve at most the RGB frames of a model that reads no motion.
"""

import statistics
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from benchutil import TABLES

from mvfast.data import DataConfig, decode_video, inference_needs
from mvfast.data.encode import encode_video
from mvfast.data.synthetic import class_factors, render_video
from mvfast.models.config import preset_config


def _torchcodec_decoder():
    """torchcodec's VideoDecoder, or None where it is not installed or cannot load FFmpeg's libraries.
    It loads them on the first decoder, not on import, so a decoder of a few bad bytes tells: a load
    failure is a RuntimeError naming libtorchcodec, bad bytes are any other error."""
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception:  # not installed, or broken
        return None
    try:
        VideoDecoder(b"not a video")
    except RuntimeError as e:
        if "libtorchcodec" in str(e):
            return None
    except Exception:
        pass
    return VideoDecoder


VideoDecoder = _torchcodec_decoder()

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
CFG = DataConfig.for_inputs(preset_config("tiny", 10).inputs(), decode_threads=1)
IMPLS = ("whole", "needs", "needs-rgb", "pyav-all", "torchcodec-all", "torchcodec-needs")
# one torch thread in every path, for the module (benchmarks/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INFO = dict(op="decode", device="cpu")
# The bar, checked in the table: seeking, i.e. the frames of a long file without the gaps between its clips
# (the audio, decoded whole, is not part of needs-rgb: it is most of "needs" there).


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    factors = class_factors(4, 0)
    synthetic = []
    for i in range(4):
        frames, audio = render_video(factors[i], 5, np.random.default_rng(i), size=128, seconds=4.0)
        synthetic.append(encode_video(root / f"s{i}.mp4", frames, fps=25, audio=audio))
    frames, audio = render_video(factors[0], 5, np.random.default_rng(9), size=128, seconds=60.0)
    options = {"preset": "veryfast", "g": "50"}
    long = encode_video(root / "long.mp4", frames, fps=25, audio=audio, options=options)
    real = []
    if SHARED.is_dir():
        real = sorted(p for p in SHARED.iterdir() if p.suffix in (".mp4", ".avi", ".mkv"))
    return {"synthetic-4s": synthetic, "real": real, "long-60s": [long]}


def needed_seconds(path) -> list[float]:
    """The times of the timeline frames the tiny preset's test clips and scene frames read."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        duration = float(vs.duration * vs.time_base) if vs.duration else c.duration / av.time_base
    n = max(1, int(np.ceil(duration * CFG.fps - 1e-6)))
    exact, near = inference_needs(CFG)(n)
    return (np.union1d(exact, near) / CFG.fps).tolist()


def pyav_all(path):
    """Every frame to an RGB array at the file's own size, as a user's first loop would."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        return [f.to_ndarray(format="rgb24") for f in c.decode(vs)]


def torchcodec_all(path):
    d = VideoDecoder(str(path), num_ffmpeg_threads=1)
    frames = []
    for i in range(len(d)):
        try:
            frames.append(d[i])
        except RuntimeError:  # the header counted more frames than the AVI holds
            break
    return frames


def torchcodec_needs(path, seconds):
    d = VideoDecoder(str(path), num_ffmpeg_threads=1, seek_mode="exact")
    end = d.metadata.duration_seconds or max(seconds) + 1
    batch = d.get_frames_played_at([min(s, end - 1e-3) for s in seconds]).data  # (K, 3, H, W) uint8
    R = CFG.resize
    h, w = batch.shape[-2:]
    scale = R / min(h, w)
    small = torch.nn.functional.interpolate(
        batch, size=(max(R, round(h * scale)), max(R, round(w * scale))), mode="bilinear", antialias=True
    )
    return small


def decoder(impl, path):
    if impl == "whole":
        return lambda: decode_video(path, CFG)
    if impl == "needs":
        return lambda: decode_video(path, CFG, needs=inference_needs(CFG))
    if impl == "needs-rgb":
        return lambda: decode_video(path, CFG, needs=inference_needs(CFG), motion=False, audio=False)
    if impl == "pyav-all":
        return lambda: pyav_all(path)
    if impl == "torchcodec-all":
        return lambda: torchcodec_all(path)
    seconds = needed_seconds(path)
    return lambda: torchcodec_needs(path, seconds)


def interleaved(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each run, the runs taking turns round by round: on a machine that others load,
    the load drifts over minutes, and every implementation then sees the same drift."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.parametrize("case", ["synthetic-4s", "real", "long-60s"])
def test_decode(benchmark, files, case, request):
    paths = files[case]
    if not paths:
        pytest.skip(f"no real videos at {SHARED}")
    impls = [i for i in IMPLS if VideoDecoder is not None or not i.startswith("torchcodec")]
    runs = {}
    for impl in impls:
        calls = [decoder(impl, p) for p in paths]
        runs[impl] = lambda calls=calls: [c() for c in calls]
    for fn in runs.values():  # warm-up: imports, first-call costs
        fn()
    rounds = 1 if request.config.getoption("benchmark_disable", False) else 5
    medians = {}
    benchmark.pedantic(lambda: medians.update(interleaved(runs, rounds)), rounds=1, iterations=1)
    per_video = {impl: t / len(paths) for impl, t in medians.items()}
    benchmark.extra_info.update(INFO, case=case, mode="interleaved", per_video=per_video)
    if VideoDecoder is None:
        benchmark.extra_info["torchcodec"] = "not installed (or no FFmpeg libraries for it)"


def decode_table(results: list[dict]) -> str:
    rows = {}
    for b in results:
        info = b.get("extra_info") or {}
        if info.get("op") == "decode":
            rows[info["case"]] = info["per_video"]
    if not rows:
        return ""
    lines = [
        "decode time per video, ms (x: whole / this, > 1 is faster); medians of rounds that take turns",
        "| files | " + " | ".join(IMPLS) + " |",
        "|---|" + "---:|" * len(IMPLS),
    ]
    for case, impls in rows.items():
        base, cells = impls["whole"], []
        for impl in IMPLS:
            t = impls.get(impl)
            cells.append("-" if t is None else f"{t * 1e3:.1f} ({base / t:.2f}x)")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    long = rows.get("long-60s")
    if long:
        r = long["whole"] / long["needs-rgb"]
        verdict = "met" if r >= 5 else "MISSED"
        lines.append(f"bar: long-60s needs-rgb vs whole >= 5x (seeking): {verdict} ({r:.1f}x)")
    return "\n".join(lines)


TABLES.append(decode_table)
