"""Every Triton kernel compiled ahead of time for sm_80, sm_86, sm_89 and sm_90 with Triton's own compiler
and its bundled ptxas, no GPU needed (DESIGN.md, "Verification without a GPU"): the interpreter runs the
kernels as Python and cannot see what only the compiler checks (a global read inside @triton.jit, a tile
whose shared memory exceeds the arch).

The launches come from the launchers themselves. Each op's Triton forward and backward run on meta
tensors under ``mvfast.ops._triton.recording(target)``: they make their plan (``triton_plan``) for that
GPU and record every launch with its very arguments instead of running it, so each kernel is compiled
as Triton's JIT would specialise it (pointer types, integers equal to 1, multiples of 16). The shapes
span what the models meet: NetVLAD D 128..4096 and K+G 16..512, attention D 96..2048 and H 1..4, conv
3..512 channels, kernels 1 and 3, NCDHW and channels_last_3d, training and eval; every dtype the ops
take (float32 under both TF32 settings, float16, bfloat16), masks, normalize and return_weights on and
off. On sm_80 and sm_90 also views with strides past 2**31 elements, which Triton passes as i64: kernels
of their own. Each distinct kernel is compiled once per arch, in a pool of processes, through Triton's
cache.

It asserts that every kernel of the three op modules is launched by some plan, that every launch
compiles, and that its shared memory fits the arch. ``python tests/test_triton_compile.py`` prints the
table of every compiled kernel's shared memory, registers and spills per arch.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("mvfast.ops.netvlad", "mvfast.ops.attention_pool", "mvfast.ops.conv3d_bn_relu")
# SM counts (how many programs fill the GPU) of a common part of each arch: A100, A40, L40S, H100 SXM.
TARGETS = {80: 108, 86: 84, 89: 142, 90: 132}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# The shapes, and the launches the launchers make for them


def _meta(*shape, dtype=torch.float32, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last_3d) if channels_last else t


def _tf32_settings(dtype):
    """(matmul precision, cudnn.allow_tf32) pairs to plan under: both for float32, whose kernels follow
    them; the defaults for the 16-bit dtypes, whose kernels do not."""
    if dtype == torch.float32:
        return (("highest", True), ("high", False))
    return (("highest", True),)


def _netvlad(x, w, b, c, mask, G, normalize):
    nv = importlib.import_module("mvfast.ops.netvlad")
    out, assign, vlad = nv._triton_forward(x, w, b, c, mask, G, normalize)
    nv._triton_backward(torch.empty_like(out), x, w, c, assign, vlad, G, normalize)


def _attention(x, w, mask, weights):
    ap = importlib.import_module("mvfast.ops.attention_pool")
    out, a, lse = ap._triton_forward(x, w, mask, weights)
    ga = torch.empty_like(a) if weights else None
    ap._triton_backward(torch.empty_like(out), ga, x, w, mask, out, lse, a)


def _conv(x, w, bn, stride, padding, training):
    cb = importlib.import_module("mvfast.ops.conv3d_bn_relu")
    conv = (stride, padding, [1, 1, 1], 1)
    out, z, mean, invstd, _, _ = cb._triton_forward(x, w, None, *bn, *conv, training, 1e-5, True)
    if training:
        cb._triton_backward(
            torch.empty_like(out), x, w, bn[0], bn[1], z, mean, invstd, *conv, True, True, True
        )


def _netvlad_inputs(x, K, G, masked):
    """(x, weight, bias, centroids, mask) for x (B, M, D): with a mask and a bias, or with neither."""
    B, M, D = x.shape
    w, c = _meta(K + G, D, dtype=x.dtype), _meta(K, D, dtype=x.dtype)
    b = _meta(K + G, dtype=x.dtype) if masked else None
    mask = _meta(B, M, dtype=torch.bool) if masked else None
    return x, w, b, c, mask


def netvlad_calls():
    """(label, dtype, function, args): forward and backward of each case."""
    B, M = 32, 300
    for D in (128, 1024, 4096):
        for K, G in ((16, 0), (64, 0), (256, 0), (500, 12)):
            for dtype in DTYPES:
                for normalize in (True, False):
                    for masked in (True, False):
                        inputs = _netvlad_inputs(_meta(B, M, D, dtype=dtype), K, G, masked)
                        label = f"netvlad D={D} K={K} G={G} {dtype} normalize={normalize}"
                        yield label, dtype, _netvlad, (*inputs, G, normalize)


def attention_calls():
    for B, L in ((1, 4096), (32, 300)):
        for D in (96, 1024, 2048):
            for H in (1, 4):
                for dtype in DTYPES:
                    for masked, weights in ((True, True), (False, False)):
                        x, w = _meta(B, L, D, dtype=dtype), _meta(H, D, dtype=dtype)
                        mask = _meta(B, L, dtype=torch.bool) if masked else None
                        label = f"attention B={B} L={L} D={D} H={H} {dtype} return_weights={weights}"
                        yield label, dtype, _attention, (x, w, mask, weights)


# (N, Cin, Cout, input size, kernel, stride, padding): r3d_18-like blocks, the stem, a stage, its 1x1x1
# projection, and the last stage of a 2D network seen as 3D over a depth of 1 (conv2d_bn_relu).
CONVS = (
    (4, 3, 64, (16, 112, 112), (3, 3, 3), 1, 1),
    (8, 64, 64, (8, 56, 56), (3, 3, 3), 1, 1),
    (8, 64, 128, (8, 56, 56), (1, 1, 1), 2, 0),
    (32, 512, 512, (1, 7, 7), (1, 3, 3), 1, (0, 1, 1)),
)


def conv_calls():
    for N, cin, cout, size, k, stride, padding in CONVS:
        stride = [stride] * 3 if isinstance(stride, int) else list(stride)
        padding = [padding] * 3 if isinstance(padding, int) else list(padding)
        for dtype in DTYPES:
            for channels_last in (False, True):
                for training in (True, False):
                    x = _meta(N, cin, *size, dtype=dtype, channels_last=channels_last)
                    w = _meta(cout, cin, *k, dtype=dtype)
                    bn = [_meta(cout) for _ in range(4)]
                    layout = "channels_last_3d" if channels_last else "NCDHW"
                    label = f"conv {cin}->{cout} k={k} {size} {layout} {dtype} training={training}"
                    yield label, dtype, _conv, (x, w, bn, stride, padding, training)


def _strided(shape, strides, dtype):
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


# Archs that also compile the launches on tensors with strides of 2**31 elements or more: Triton passes
# such strides as i64, a kernel of its own that the realistic shapes above never make. The two ends of
# the targets: the offsets cost registers, not shared memory, so the archs between add nothing but time.
LARGE_STRIDE_ARCHS = (80, 90)


def large_stride_calls():
    """Views past 2**31 elements (a (L, B, D) batch seen as (B, L, D), a feature dim strided apart, a batch
    2**31 apart) and a conv whose batch stride is 2**31, float32 and bfloat16."""
    big = 2**31
    for dtype in (torch.float32, torch.bfloat16):
        for shape, strides in (
            ((2, 3, 16), (16, big + 32, 1)),
            ((2, 3, 33), (3, 1, big + 8)),
            ((2, 3, 16), (big + 48, 16, 1)),
        ):
            x = _strided(shape, strides, dtype)
            for masked in (True, False):
                inputs = _netvlad_inputs(x, 4, 1, masked)
                for normalize in (True, False):
                    label = f"large strides netvlad {strides} {dtype} masked={masked} normalize={normalize}"
                    yield label, dtype, _netvlad, (*inputs, 1, normalize)
                label = f"large strides attention {strides} {dtype} masked={masked}"
                yield label, dtype, _attention, (x, _meta(2, shape[2], dtype=dtype), inputs[4], masked)
        for channels_last in (False, True):
            x = _meta(2, 64, 128, 512, 512, dtype=dtype, channels_last=channels_last)
            for training in (True, False):
                bn = [_meta(64) for _ in range(4)]
                label = (
                    f"large strides conv 2x64x128x512x512 channels_last={channels_last} {dtype} {training=}"
                )
                yield (
                    label,
                    dtype,
                    _conv,
                    (x, _meta(64, 64, 3, 3, 3, dtype=dtype), bn, [1] * 3, [1] * 3, training),
                )


def launches(arch: int) -> dict[tuple, dict]:
    """The distinct compiled kernels the launchers make for ``arch``: key -> the job that compiles it and
    the first call that launches it."""
    from mvfast.ops import _triton

    target = _triton.Target(arch, TARGETS[arch])
    jobs = {}
    sources = [netvlad_calls, attention_calls, conv_calls]
    if arch in LARGE_STRIDE_ARCHS:
        sources.append(large_stride_calls)
    for calls in sources:
        for label, dtype, fn, inputs in calls():
            for matmul, cudnn_tf32 in _tf32_settings(dtype):
                with _precision(matmul, cudnn_tf32), _triton.recording(target) as recorded:
                    fn(*inputs)
                for launch, args in recorded:
                    sig, constexprs, attrs = _triton.specialization(launch, args)
                    key = (
                        arch,
                        launch.name,
                        tuple(sig.items()),
                        tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                        tuple(sorted(attrs)),
                        launch.num_warps,
                        launch.num_stages,
                    )
                    jobs.setdefault(
                        key,
                        dict(
                            module=_fn(launch.kernel).__module__,
                            kernel=launch.name,
                            signature=sig,
                            constexprs=constexprs,
                            attrs=attrs,
                            num_warps=launch.num_warps,
                            num_stages=launch.num_stages,
                            arch=arch,
                            first=label,
                            i64=[k for k, v in sig.items() if v == "i64"],
                        ),
                    )
    return jobs


def _fn(kernel):
    return getattr(kernel, "fn", kernel)


class _precision:
    def __init__(self, matmul, cudnn_tf32):
        self.matmul, self.cudnn_tf32 = matmul, cudnn_tf32

    def __enter__(self):
        self.saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision(self.matmul)
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.saved[0])
        torch.backends.cudnn.allow_tf32 = self.saved[1]


# ---------------------------------------------------------------------------------------------------
# Compiling them


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker process); the result or the compiler's error."""
    from mvfast.ops import _triton

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    try:
        usage = _triton.compile_kernel(
            kernel,
            job["signature"],
            job["constexprs"],
            job["attrs"],
            job["num_warps"],
            job["num_stages"],
            job["arch"],
        )
    except Exception as e:  # noqa: BLE001 - reported with the job, asserted on by the test
        usage = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
    return {k: v for k, v in job.items() if k not in ("attrs", "signature")} | usage


def run(workers: int, archs=tuple(TARGETS)) -> dict:
    start = time.perf_counter()
    jobs = [job for arch in archs for job in launches(arch).values()]
    planned = time.perf_counter() - start
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        results = list(pool.map(compile_job, jobs, chunksize=1))
    kernels = sorted(
        {
            f"{m}.{name}"
            for m in MODULES
            for name, obj in vars(importlib.import_module(m)).items()
            if name.endswith("_kernel") and hasattr(obj, "fn")
        }
    )
    return dict(
        results=results,
        kernels=kernels,
        budgets={str(a): _budget(a) for a in TARGETS},
        seconds=time.perf_counter() - start,
        planning_seconds=planned,
        triton=importlib.import_module("triton").__version__,
    )


def _budget(arch: int) -> int:
    from mvfast.ops import _triton

    return _triton.Target(arch, 1).shared_memory


def table(report: dict) -> str:
    """Per kernel and arch: plans compiled, the largest shared memory and registers, spills."""
    rows = collections.defaultdict(list)
    for r in report["results"]:
        rows[(r["kernel"], r["arch"])].append(r)
    lines = ["| kernel | arch | plans | max shared (KB) / budget | max registers | spill bytes (max) |"]
    lines.append("|---|---|---|---|---|---|")
    for (kernel, arch), rs in sorted(rows.items()):
        ok = [r for r in rs if "error" not in r]
        errors = len(rs) - len(ok)
        shared = max((r["shared"] for r in ok), default=0)
        regs = max((r["registers"] for r in ok), default=0)
        spills = max((r["spill_stores"] for r in ok), default=0)
        budget = report["budgets"][str(arch)]
        err = f" ({errors} failed)" if errors else ""
        lines.append(
            f"| {kernel} | sm_{arch} | {len(rs)}{err} | {shared / 1024:.1f} / {budget / 1024:.0f} | {regs} | "
            f"{spills} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The test


def _triton_compiler():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


@pytest.mark.slow
@pytest.mark.skipif(_triton_compiler() is not None, reason=f"no Triton compiler: {_triton_compiler()}")
def test_every_plan_compiles_and_fits_the_arch(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    p = subprocess.run(
        [sys.executable, __file__, "--json", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    print(table(report))
    cpu = sum(r.get("cpu_seconds", 0) for r in report["results"])
    print(f"{len(report['results'])} compiles in {report['seconds']:.0f} s ({cpu:.0f} CPU seconds)")
    results = report["results"]
    failed = [f"{r['kernel']} sm_{r['arch']} ({r['first']}): {r['error']}" for r in results if "error" in r]
    assert not failed, "kernels that do not compile:\n" + "\n".join(failed[:10])
    too_big = [
        f"{r['kernel']} sm_{r['arch']} ({r['first']}, {r['constexprs']}): {r['shared']} bytes of shared "
        f"memory, the arch has {report['budgets'][str(r['arch'])]}"
        for r in results
        if r["shared"] > report["budgets"][str(r["arch"])]
    ]
    assert not too_big, "\n".join(too_big[:10])
    for arch in TARGETS:
        compiled = {f"{r['module']}.{r['kernel']}" for r in results if r["arch"] == arch}
        missing = set(report["kernels"]) - compiled
        assert not missing, f"kernels that no plan launches on sm_{arch}: {sorted(missing)}"
    for arch in LARGE_STRIDE_ARCHS:  # the large-stride views did make i64 kernels, of every op
        wide = {r["module"] for r in results if r["arch"] == arch and r["i64"]}
        assert wide == set(MODULES), f"sm_{arch}: i64 kernels only in {sorted(wide)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--archs", type=int, nargs="+", default=list(TARGETS), help="e.g. 80 90")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the compile check needs Triton's JIT functions")
    report = run(args.workers, args.archs)
    if args.json:
        Path(args.json).write_text(json.dumps(report, default=str))
    print(table(report))
    cpu = sum(r.get("cpu_seconds", 0) for r in report["results"])
    print(
        f"{len(report['results'])} compiles (Triton {report['triton']}) in {report['seconds']:.0f} s "
        f"({report['planning_seconds']:.1f} s of it planning), {cpu:.0f} CPU seconds of compiling"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
