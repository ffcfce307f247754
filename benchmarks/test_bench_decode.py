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

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from benchutil import BARS, TABLES

from mvfast.data import DataConfig, decode_video, inference_needs
from mvfast.data.encode import encode_video
from mvfast.data.synthetic import class_factors, render_video
from mvfast.models.config import preset_config

try:
    from torchcodec.decoders import VideoDecoder
except Exception:  # not installed, or its FFmpeg libraries are missing (an OSError from the loader)
    VideoDecoder = None

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
CFG = DataConfig.for_inputs(preset_config("tiny", 10).inputs(), decode_threads=1)
IMPLS = ("whole", "needs", "needs-rgb", "pyav-all", "torchcodec-all", "torchcodec-needs")
INFO = dict(op="decode", device="cpu")
# Seeking: the frames of a long file without the gaps between its clips (the audio, decoded whole, is not
# part of this one: it is most of "needs" there).
BARS.append(dict(INFO, case="long-60s", mode="per-video", impl="needs-rgb", base="whole", at_least=5.0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["synthetic-4s", "real", "long-60s"])
def test_decode(benchmark, files, case, impl):
    if impl.startswith("torchcodec") and VideoDecoder is None:
        pytest.skip("torchcodec is not installed here (or finds no FFmpeg libraries)")
    paths = files[case]
    if not paths:
        pytest.skip(f"no real videos at {SHARED}")
    runs = [decoder(impl, p) for p in paths]

    def all_files():
        for r in runs:
            r()

    benchmark.extra_info.update(INFO, case=case, mode="per-video", impl=impl, videos=len(paths))
    benchmark.pedantic(all_files, rounds=3 if case != "long-60s" else 2, warmup_rounds=1, iterations=1)


def decode_table(results: list[dict]) -> str:
    rows: dict[str, dict[str, float]] = {}
    for b in results:
        info = b.get("extra_info") or {}
        if info.get("op") == "decode":
            rows.setdefault(info["case"], {})[info["impl"]] = b["stats"]["median"] / info["videos"]
    if not rows:
        return ""
    lines = [
        "decode time per video, ms (x: whole decode / this, > 1 is faster), medians of one run",
        "| files | " + " | ".join(IMPLS) + " |",
        "|---|" + "---:|" * len(IMPLS),
    ]
    for case, impls in rows.items():
        cells = []
        for impl in IMPLS:
            t = impls.get(impl)
            base = impls.get("whole")
            if t is None:
                cells.append("-")
            else:
                cells.append(f"{t * 1e3:.1f} ({base / t:.2f}x)" if base else f"{t * 1e3:.1f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES.append(decode_table)
