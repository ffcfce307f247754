"""NetVLAD forward and forward+backward: mvfast's kernels against eager PyTorch (the reference) and
torch.compile of the reference, in the same run. CUDA cases run where a GPU is.

    pytest benchmarks/test_bench_netvlad.py --benchmark-only
"""

import pytest
import torch
from benchutil import BARS, GPU, measure, saved_bytes

import mvfast
from mvfast.ops.netvlad import netvlad_reference

CASES = {"B16-M64-D512-K32": (16, 64, 512, 32), "B32-M300-D1024-K64": (32, 300, 1024, 64)}
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "compile", "cpu"], "cuda": ["eager", "compile", "cuda", "triton"]}
ROUNDS = {"cpu": 8, "cuda": 50}

for _case in CASES:
    for _mode in ("fwd", "fwd+bwd"):
        BARS.append(
            dict(op="netvlad", case=_case, device="cpu", mode=_mode, impl="cpu", base="compile", at_least=1.0)
        )
    BARS.append(
        dict(op="netvlad", case=_case, device="cpu", mode="fwd+bwd", impl="cpu", base="eager", at_least=1.4)
    )

_compiled = {}


def _inputs(case, device):
    B, M, D, K = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M, D, generator=g)
    w = torch.randn(K, D, generator=g) * D**-0.5
    b = torch.zeros(K)
    c = torch.randn(K, D, generator=g) * D**-0.5
    mask = torch.arange(M).expand(B, M) < torch.randint(M // 2, M + 1, (B, 1), generator=g)
    x, w, b, c, mask = (t.to(device) for t in (x, w, b, c, mask))
    return [t.requires_grad_() for t in (x, w, b, c)], mask


def _fn(impl, case, mode):
    if impl == "eager":
        return netvlad_reference
    if impl == "compile":
        key = (case, mode)
        if key not in _compiled:
            _compiled[key] = torch.compile(netvlad_reference, dynamic=False)
        return _compiled[key]

    def kernel(x, w, b, c, mask):
        with mvfast.backend(impl):
            return mvfast.ops.netvlad(x, w, b, c, mask)

    return kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu", "cuda", "triton"])
def test_netvlad(benchmark, device, case, mode, impl):
    if impl not in IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device}")
    if impl in ("cpu", "cuda", "triton") and not mvfast.backends(device)[impl]["available"]:
        pytest.skip(f"{impl}: {mvfast.backends(device)[impl]['reason']}")
    (x, w, b, c), mask = _inputs(case, device)
    f = _fn(impl, case, mode)
    benchmark.group = f"netvlad {case} {device} {mode}"
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
    measure(benchmark, step, device, rounds=ROUNDS[device], info=info)
