"""End to end: videos per second of ``python -m mvfast.predict`` over a folder, in one run against

- today's path before issue 14: the same model called one file at a time (``_inference.predict_file``: a
  whole decode, the test clips, one forward pass), and
- the pipeline a user would write: PyAV decoding every frame, 3 clips of the same size (8 frames of 64 x 64)
  resized with torch, torchvision's r3d_18, one video at a time;

and the per-video latency at batch 1 with and without decoding.

    pytest benchmarks/test_bench_predict.py --benchmark-only

64 synthetic micro-videos (4 s, 128 px, H.264 + AAC, as the embedded set; 8 of 2 s with
--benchmark-disable), the tiny preset with random weights (what is timed does not depend on them), the CPU,
one torch thread for the model in every path (on the shared 2-core development machine two OpenMP threads
made one forward pass of the tiny model take from 85 ms to 1.3 s). predict runs with 2 DataLoader workers
(one more process each: the parallelism it adds) and batches of 8 videos, and with no workers (batching
alone). The decode share is the decode time over decode plus model
time, summed over the videos (for predict, the workers' decode time: it overlaps the model's).
The bar: predict at least 2x today's path.
"""

import json
import resource
import statistics
import time

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchutil import TABLES

import mvfast.predict
from mvfast import _checkpoint
from mvfast._inference import predict_file, prepare
from mvfast.data import DataConfig, decode_video, inference_needs
from mvfast.data.encode import encode_video
from mvfast.data.synthetic import class_factors, render_video
from mvfast.models import create_model

# one torch thread in every path, for the module (benchmarks/conftest.py)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

INFO = dict(op="predict", case="folder", device="cpu", mode="videos")
BAR = 2.0  # predict (2 workers, batch 8) against one file at a time, checked in the table
CLASSES = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory, request):
    quick = request.config.getoption("benchmark_disable", False)
    n, seconds = (8, 2.0) if quick else (64, 4.0)
    root = tmp_path_factory.mktemp("predict-bench")
    folder = root / "videos"
    folder.mkdir()
    factors = class_factors(CLASSES, 0)
    for i in range(n):
        rng = np.random.default_rng(i)
        frames, audio = render_video(factors[i % CLASSES], 5, rng, size=128, seconds=seconds)
        encode_video(folder / f"{i:03d}.mp4", frames, fps=25, audio=audio)
    torch.manual_seed(0)
    model = create_model("tiny", CLASSES).eval()
    data_cfg = DataConfig.for_inputs(model.config.inputs())
    ckpt = {
        "format": _checkpoint.FORMAT,
        "kind": _checkpoint.WEIGHTS,
        "model": model.state_dict(),
        "model_spec": _checkpoint.model_spec("tiny", CLASSES, {}),
        "data_config": _checkpoint.data_config_to_dict(data_cfg),
        "classes": [f"c{i}" for i in range(CLASSES)],
        "config": {},
    }
    path = _checkpoint.atomic_save(ckpt, root / "best.pt")
    videos = sorted(folder.glob("*.mp4"))
    return {"folder": folder, "videos": videos, "ckpt": path, "model": model, "cfg": data_cfg}


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def r3d18_clips(path, clip_len=8, size=64, clips=3):
    """What a user's loop does: every frame decoded to RGB, clips evenly spaced, resized, normalised."""
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # (N, H, W, 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    starts = np.linspace(0, max(len(x) - clip_len, 0), clips).round().astype(int)
    batch = torch.stack([x[s : s + clip_len] for s in starts])  # (clips, T, 3, H, W)
    batch = F.interpolate(batch.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor([0.43216, 0.394666, 0.37645]).view(1, 3, 1, 1)
    std = torch.tensor([0.22803, 0.22145, 0.216989]).view(1, 3, 1, 1)
    batch = ((batch - mean) / std).view(clips, clip_len, 3, size, size)
    return batch.permute(0, 2, 1, 3, 4).contiguous()  # (clips, 3, T, size, size)


@pytest.fixture(scope="module")
def r3d18():
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    return r3d_18(num_classes=CLASSES).eval()


def paths(setup, r3d18, tmp_path):
    """Each path over the whole folder: a function giving (decode ms, model ms) summed over the videos."""
    model, cfg, device = setup["model"], setup["cfg"], torch.device("cpu")
    outs = iter(range(1000))

    def predict(workers):
        def run():
            out = tmp_path / f"p{next(outs)}.jsonl"
            args = [str(setup["ckpt"]), str(setup["folder"]), "--out", str(out), "--no-progress"]
            flags = ["--workers", str(workers), "--batch-size", "8", "--threads", "1"]
            assert mvfast.predict.main([*args, *flags]) == 0
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert len(rows) == len(setup["videos"]) and all(r["status"] == "ok" for r in rows)
            return sum(r["decode_ms"] for r in rows), sum(r["model_ms"] for r in rows)

        return run

    def one_file():
        results = [predict_file(model, p, cfg, device) for p in setup["videos"]]
        return sum(r["decode_ms"] for r in results), sum(r["model_ms"] for r in results)

    @torch.no_grad()
    def pyav_r3d18():
        decode = infer = 0.0
        for p in setup["videos"]:
            t0 = time.perf_counter()
            x = r3d18_clips(p)
            t1 = time.perf_counter()
            r3d18(x).softmax(1).mean(0)
            decode, infer = decode + (t1 - t0) * 1e3, infer + (time.perf_counter() - t1) * 1e3
        return decode, infer

    return {
        "one-file": one_file,
        "predict-w2-b8": predict(2),
        "predict-w0-b8": predict(0),
        "pyav-r3d18": pyav_r3d18,
    }


def test_predict_folder(benchmark, setup, r3d18, tmp_path, request):
    """The paths take turns, round by round (the baseline a user would write, 5x slower, in the first round
    only), so that each sees the same load on a shared machine; medians over the rounds."""
    runs = paths(setup, r3d18, tmp_path)
    rounds = 1 if request.config.getoption("benchmark_disable", False) else 3
    record: dict[str, list] = {name: [] for name in runs}

    def measure():
        for r in range(rounds):
            for name, fn in runs.items():
                if name == "pyav-r3d18" and r > 0:
                    continue
                cpu0, t0 = cpu_seconds(), time.perf_counter()
                decode_ms, model_ms = fn()
                record[name].append((time.perf_counter() - t0, cpu_seconds() - cpu0, decode_ms, model_ms))

    runs["one-file"]()  # warm-up: the model's first calls at these shapes
    benchmark.pedantic(measure, rounds=1, iterations=1)
    n = len(setup["videos"])
    summary = {}
    for name, rows in record.items():
        wall, cpu, decode, infer = (statistics.median(col) for col in zip(*rows, strict=True))
        summary[name] = {
            "videos_per_s": n / wall,
            "cpu_ms_per_video": cpu * 1e3 / n,
            "decode_share": decode / (decode + infer),
        }
    benchmark.extra_info.update(INFO, impl="all", videos=n, rounds=rounds, paths=summary)


# ---------------------------------------------------------------------------------------------------------
# Latency per video at batch 1


@pytest.mark.parametrize("what", ["model", "whole-decode+model", "needs-decode+model"])
def test_latency_batch1(benchmark, setup, what):
    model, cfg = setup["model"], setup["cfg"]
    path = setup["videos"][0]
    batch, _ = prepare(path, cfg)

    @torch.no_grad()
    def once():
        if what == "whole-decode+model":
            b, _ = prepare(path, cfg)
        elif what == "needs-decode+model":
            from mvfast.data import sample_clip, tokenize

            video = decode_video(path, cfg, needs=inference_needs(cfg))
            samples = []
            for c in range(cfg.test_clips):
                s = sample_clip(video, cfg, clip=c)
                s["text"], s["text_mask"] = tokenize("", cfg.vocab_size, cfg.max_title_tokens)
                samples.append(s)
            from mvfast.data import collate

            b = collate(samples)
        else:
            b = batch
        model(b)

    benchmark.extra_info.update(op="predict", case="latency-b1", device="cpu", mode="per-video", impl=what)
    benchmark.pedantic(once, rounds=10, warmup_rounds=2, iterations=1)


def test_latency_batch1_r3d18(benchmark, setup, r3d18):
    path = setup["videos"][0]
    x = r3d18_clips(path)
    benchmark.extra_info.update(op="predict", case="latency-b1", device="cpu", mode="per-video", impl="r3d18")
    with torch.no_grad():
        benchmark.pedantic(lambda: r3d18(x), rounds=5, warmup_rounds=1, iterations=1)


NAMES = {
    "predict-w2-b8": "predict, 2 workers, batch 8",
    "predict-w0-b8": "predict, no workers, batch 8",
    "one-file": "one file at a time (predict_file, before issue 14)",
    "pyav-r3d18": "PyAV all frames + torchvision r3d_18, one at a time",
}


def predict_table(results: list[dict]) -> str:
    summary, latency = None, {}
    for b in results:
        info = b.get("extra_info") or {}
        if info.get("op") != "predict":
            continue
        if info["case"] == "folder":
            summary = info
        else:
            latency[info["impl"]] = b["stats"]["median"] * 1e3
    if summary is None:
        return ""
    runs = summary["paths"]
    base = runs["one-file"]["videos_per_s"]
    lines = [
        f"predict over a folder of {summary['videos']} videos (tiny preset, CPU, one torch thread); medians "
        f"of {summary['rounds']} rounds in which the paths take turns",
        "| path | videos/s | vs one file at a time | decode share | CPU ms per video |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl, name in NAMES.items():
        r = runs[impl]
        rate = r["videos_per_s"]
        share, cpu = r["decode_share"], r["cpu_ms_per_video"]
        cells = [f"{rate:.1f}", f"{rate / base:.2f}x", f"{share:.0%}", f"{cpu:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio = runs["predict-w2-b8"]["videos_per_s"] / base
    verdict = "met" if ratio >= BAR else "MISSED"
    what = f"predict (2 workers, batch 8) >= {BAR:g}x one file at a time"
    lines.append(f"bar: {what}: {verdict} ({ratio:.2f}x)")
    if latency:
        lines += ["", "| latency per video at batch 1 (3 clips) | ms |", "|---|---:|"]
        for impl, ms in latency.items():
            lines.append(f"| {impl} | {ms:.1f} |")
    return "\n".join(lines)


TABLES.append(predict_table)
