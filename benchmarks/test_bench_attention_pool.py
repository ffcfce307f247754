"""Attention pooling forward and forward+backward: mvfast's kernels against eager PyTorch (the reference)
and torch.compile of the reference, in the same run. CUDA cases run where a GPU is.

    pytest benchmarks/test_bench_attention_pool.py --benchmark-only
"""

import pytest
import torch
from benchutil import BARS, GPU, measure_case, saved_bytes, unavailable

import mvfast
from mvfast.ops.attention_pool import attention_pool_reference

CASES = {"B32-L300-D1024-H1": (32, 300, 1024, 1), "B64-L32-D512-H4": (64, 32, 512, 4)}
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "compile", "cpu"], "cuda": ["eager", "compile", "cuda", "triton"]}
ROUNDS = {"cpu": 10, "cuda": 50}
MODES = ["fwd", "fwd+bwd"]

# The bars on the 2-core development CPU, at the paper's shape.
for _mode in MODES:
    BARS.append(
        dict(
            op="attention_pool",
            case="B32-L300-D1024-H1",
            device="cpu",
            mode=_mode,
            impl="cpu",
            base="compile",
            at_least=1.0,
        )
    )
BARS.append(
    dict(
        op="attention_pool",
        case="B32-L300-D1024-H1",
        device="cpu",
        mode="fwd+bwd",
        impl="cpu",
        base="eager",
        at_least=3.0,
    )
)

_compiled = {}


def _inputs(case, device, dtype=torch.float32):
    B, L, D, H = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, L, D, generator=g)
    w = torch.randn(H, D, generator=g) * D**-0.5
    b = torch.zeros(H)
    mask = torch.arange(L).expand(B, L) < torch.randint(L // 2, L + 1, (B, 1), generator=g)
    x, w, b = (t.to(device, dtype) for t in (x, w, b))
    return [t.requires_grad_() for t in (x, w, b)], mask.to(device)


def _fn(impl, case, mode, dtype):
    if impl == "eager":
        return attention_pool_reference
    if impl == "compile":
        key = (case, mode, dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(attention_pool_reference, dynamic=False)
        return _compiled[key]

    def kernel(x, w, b, mask):
        with mvfast.backend(impl):
            return mvfast.ops.attention_pool(x, w, b, mask)

    return kernel


def case_step(device, case, mode, impl, dtype=torch.float32):
    """The step one benchmark times and its extra_info; benchmarks/gpu_check.py times the same steps."""
    (x, w, b), mask = _inputs(case, device, dtype)
    f = _fn(impl, case, mode, dtype)
    info = dict(op="attention_pool", case=case, device=device, mode=mode, impl=impl)
    if mode == "fwd":

        def step():
            with torch.no_grad():
                f(x, w, b, mask)
    else:
        gy = torch.randn_like(f(x, w, b, mask))

        def step():
            torch.autograd.grad(f(x, w, b, mask), (x, w, b), gy)

        info["saved_bytes"] = saved_bytes(lambda: f(x, w, b, mask))
    return step, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu", "cuda", "triton"])
def test_attention_pool(benchmark, device, case, mode, impl):
    reason = unavailable(IMPLS, device, impl)
    if reason:
        pytest.skip(reason)
    step, info = case_step(device, case, mode, impl)
    benchmark.group = f"attention_pool {case} {device} {mode}"
    measure_case(benchmark, case_step, IMPLS, step, info, rounds=ROUNDS[device])
