"""Serving latency of the tiny preset's model, every way mvfast can serve it, in one run:

    python benchmarks/serving.py                      # batch 1 and 16, the markdown table at the end
    python benchmarks/serving.py --batches 1 --repeats 5 --ways eager-reference,eager-mvfast

| way | what runs |
|---|---|
| eager-reference | the model in eager PyTorch on the reference backend (the baseline) |
| eager-mvfast | the same model with mvfast's kernels (the `auto` backend: the C++ CPU kernels) |
| torch.compile | torch.compile of the model with mvfast's kernels (their custom ops trace whole) |
| aoti | the AOTInductor package of python -m mvfast.export (dynamic batch), loaded in this process |
| onnxruntime | model.onnx of python -m mvfast.export (the reference backend's standard ops) in onnxruntime |

Each cell is the median of --repeats timed calls after two warm-up calls (the compile of torch.compile and
the AOTInductor build are done before, and reported apart). Inputs: random tensors of the sizes the data
pipeline gives the preset (4 s of audio: 100 windows; 8 title tokens). Ratios are against eager-reference
in this run; on a machine that other processes share, compare ratios, never absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor

import mvfast
from mvfast.export import export_aoti, export_onnx, export_program, median_ms, onnx_runner, onnx_session
from mvfast.models import TensorInputs, create_model

WAYS = ("eager-reference", "eager-mvfast", "torch.compile", "aoti", "onnxruntime")


def runners(wrapper, ways, folder: Path, log) -> dict:
    """way -> a callable taking the inputs; the build times of the compiled ones go to the log."""
    out = {}
    example = wrapper.example_inputs(batch=2, audio=100, title=8)

    def eager_on(backend):
        def run(*x):
            with mvfast.backend(backend):
                return wrapper(*x)

        return run

    if "eager-reference" in ways:
        out["eager-reference"] = eager_on("reference")
    if "eager-mvfast" in ways:
        out["eager-mvfast"] = eager_on("auto")
    if "torch.compile" in ways:
        out["torch.compile"] = torch.compile(wrapper)
    if "aoti" in ways:
        t0 = time.perf_counter()
        with torch.no_grad():
            program = export_program(wrapper, example)
            path = export_aoti(program, folder / "model_aoti.pt2")
        log(f"aoti: exported and compiled in {time.perf_counter() - t0:.0f} s")
        out["aoti"] = torch._inductor.aoti_load_package(str(path))
    if "onnxruntime" in ways:
        t0 = time.perf_counter()
        with torch.no_grad():
            export_onnx(wrapper, example, folder / "model.onnx")
        log(f"onnxruntime: exported in {time.perf_counter() - t0:.0f} s")
        out["onnxruntime"] = onnx_runner(onnx_session(folder / "model.onnx"), wrapper.input_names())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="1,16", help="batch sizes (default: 1,16)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"out of {','.join(WAYS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per cell (default: 30)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    ways = [w for w in args.ways.split(",") if w]
    bad = [w for w in ways if w not in WAYS]
    if bad:
        parser.error(f"unknown --ways {bad}; choose from {WAYS}")
    torch.manual_seed(0)
    model = create_model("tiny", 10).eval()
    wrapper = TensorInputs(model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        run = runners(wrapper, ways, Path(tmp), lambda s: print(s, file=sys.stderr))
        results = {}
        for b in batches:
            x = wrapper.example_inputs(batch=b, audio=100, title=8, seed=b)
            with torch.no_grad():
                want = run[ways[0]](*x)
            for way in ways:
                t0 = time.perf_counter()
                ms = median_ms(run[way], x, args.repeats, warmup=2)
                with torch.no_grad():
                    got = run[way](*x)
                diff = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want, strict=True))
                results[(way, b)] = {"ms": ms, "max_difference": diff}
                print(f"{way} batch {b}: {ms:.2f} ms ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    base = "eager-reference" if "eager-reference" in ways else ways[0]
    head = "| way | " + " | ".join(f"batch {b}" for b in batches) + " |"
    lines = [head, "|---|" + "---:|" * len(batches)]
    for way in ways:
        cells = []
        for b in batches:
            r = results[(way, b)]
            cells.append(f"{r['ms']:.2f} ms ({results[(base, b)]['ms'] / r['ms']:.2f}x)")
        lines.append(f"| {way} | " + " | ".join(cells) + " |")
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"\ntiny preset, CPU ({machine}); median of {args.repeats}; (x) = {base} / it, this run")
    print("\n".join(lines))
    if args.json:
        rows = [{"way": w, "batch": b, **r} for (w, b), r in results.items()]
        Path(args.json).write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
