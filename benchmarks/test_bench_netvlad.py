"""NetVLAD forward and forward+backward: mvfast's kernels against eager PyTorch (the reference) and
torch.compile of the reference, in the same run. CUDA cases run where a GPU is.

    pytest benchmarks/test_bench_netvlad.py --benchmark-only
"""

import pytest
import torch
from benchutil import BARS, GPU, measure_case, saved_bytes, unavailable

import mvfast
from mvfast.ops.netvlad import netvlad_reference

CASES = {"B16-M64-D512-K32": (16, 64, 512, 32), "B32-M300-D1024-K64": (32, 300, 1024, 64)}
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "compile", "cpu"], "cuda": ["eager", "compile", "cuda", "triton"]}
ROUNDS = {"cpu": 8, "cuda": 50}
MODES = ["fwd", "fwd+bwd"]

for _case in CASES:
    for _mode in MODES:
        BARS.append(
            dict(op="netvlad", case=_case, device="cpu", mode=_mode, impl="cpu", base="compile", at_least=1.0)
        )
    BARS.append(
        dict(op="netvlad", case=_case, device="cpu", mode="fwd+bwd", impl="cpu", base="eager", at_least=1.4)
    )

_compiled = {}


def _inputs(case, device, dtype=torch.float32):
    B, M, D, K = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M, D, generator=g)
    w = torch.randn(K, D, generator=g) * D**-0.5
    b = torch.zeros(K)
    c = torch.randn(K, D, generator=g) * D**-0.5
    mask = torch.arange(M).expand(B, M) < torch.randint(M // 2, M + 1, (B, 1), generator=g)
    x, w, b, c = (t.to(device, dtype) for t in (x, w, b, c))
    return [t.requires_grad_() for t in (x, w, b, c)], mask.to(device)


def _fn(impl, case, mode, dtype):
    if impl == "eager":
        return netvlad_reference
    if impl == "compile":
        key = (case, mode, dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(netvlad_reference, dynamic=False)
        return _compiled[key]

    def kernel(x, w, b, c, mask):
        with mvfast.backend(impl):
            return mvfast.ops.netvlad(x, w, b, c, mask)

    return kernel


def case_step(device, case, mode, impl, dtype=torch.float32):
    """The step one benchmark times and its extra_info; benchmarks/gpu_check.py times the same steps."""
    (x, w, b, c), mask = _inputs(case, device, dtype)
    f = _fn(impl, case, mode, dtype)
    info = dict(op="netvlad", case=case, device=device, mode=mode, impl=impl)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                f(x, w, b, c, mask)
    else:
        gy = torch.randn_like(f(x, w, b, c, mask))

        def step():
            torch.autograd.grad(f(x, w, b, c, mask), (x, w, b, c), gy)

        info["saved_bytes"] = saved_bytes(lambda: f(x, w, b, c, mask))
    return step, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu", "cuda", "triton"])
def test_netvlad(benchmark, device, case, mode, impl):
    reason = unavailable(IMPLS, device, impl)
    if reason:
        pytest.skip(reason)
    step, info = case_step(device, case, mode, impl)
    benchmark.group = f"netvlad {case} {device} {mode}"
    measure_case(benchmark, case_step, IMPLS, step, info, rounds=ROUNDS[device])
