"""Conv3d + BatchNorm3d + ReLU: mvfast's fused kernels against the eager chain (the reference) and
torch.compile of it, in the same run, at r3d_18's first stage (batch 8, 64 -> 64 channels, 3x3x3, padding
1, 8x56x56, float32): training forward+backward and eval forward. Then torchvision's whole r3d_18 in eval,
fused by mvfast.fuse against unfused, and its training step on an NCDHW clip (batch 2, 8x56x56): unfused,
fused (fuse's default: channels-last on the CPU), and fused with channels_last=False (NCDHW throughout),
with the activations each saves for backward. CUDA cases run where a GPU is.

    pytest benchmarks/test_bench_conv3d_bn_relu.py --benchmark-only
"""

import copy

import pytest
import torch
from benchutil import BARS, GPU, measure, measure_case, saved_bytes, unavailable

import mvfast
from mvfast.ops.conv3d_bn_relu import conv3d_bn_relu_reference

CASES = {"N8-C64-8x56x56": (8, 64, 8, 56, 56)}
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "compile", "cpu"], "cuda": ["eager", "compile", "cuda", "triton"]}
ROUNDS = {"cpu": 5, "cuda": 50}
MODES = ["fwd", "fwd+bwd"]

# The bars on the 2-core development CPU.
_BLOCK = "N8-C64-8x56x56"
BARS.append(
    dict(
        op="conv3d_bn_relu",
        case=_BLOCK,
        device="cpu",
        mode="fwd+bwd",
        impl="cpu",
        base="eager",
        at_least=1.15,
    )
)
BARS.append(
    dict(op="conv3d_bn_relu", case=_BLOCK, device="cpu", mode="fwd", impl="cpu", base="eager", at_least=1.15)
)
BARS.append(
    dict(op="conv3d_bn_relu", case=_BLOCK, device="cpu", mode="fwd", impl="cpu", base="compile", at_least=1.0)
)
BARS.append(
    dict(op="r3d_18", case="N1-16x112x112", device="cpu", mode="fwd", impl="cpu", base="eager", at_least=1.0)
)

_compiled = {}


def _inputs(case, device, dtype=torch.float32):
    N, C, D, H, W = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, D, H, W, generator=g)
    w = torch.randn(C, C, 3, 3, 3, generator=g) * (C * 27) ** -0.5
    gamma, beta = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.1
    rm, rv = torch.zeros(C), torch.ones(C)
    # every tensor in the input's dtype, as model.to(dtype) leaves a BatchNorm3d
    x, w, gamma, beta, rm, rv = (t.to(device, dtype) for t in (x, w, gamma, beta, rm, rv))
    return [t.requires_grad_() for t in (x, w, gamma, beta)], rm, rv


def _fn(impl, case, mode, dtype):
    def eager(x, w, g, b, rm, rv, training):
        return conv3d_bn_relu_reference(x, w, None, g, b, rm, rv, padding=1, training=training)

    if impl == "eager":
        return eager
    if impl == "compile":
        key = (case, mode, dtype)
        if key not in _compiled:
            _compiled[key] = torch.compile(eager, dynamic=False)
        return _compiled[key]

    def kernel(x, w, g, b, rm, rv, training):
        with mvfast.backend(impl):
            return mvfast.ops.conv3d_bn_relu(x, w, None, g, b, rm, rv, padding=1, training=training)

    return kernel


def case_step(device, case, mode, impl, dtype=torch.float32):
    """The step one benchmark times and its extra_info; benchmarks/gpu_check.py times the same steps."""
    (x, w, g, b), rm, rv = _inputs(case, device, dtype)
    f = _fn(impl, case, mode, dtype)
    info = dict(op="conv3d_bn_relu", case=case, device=device, mode=mode, impl=impl)
    if mode == "fwd":  # eval: BN folded into the conv

        def step():
            with torch.no_grad():
                f(x, w, g, b, rm, rv, False)
    else:  # training: batch statistics, running-statistics update, backward to x and every parameter
        gy = torch.randn_like(x)

        def step():
            torch.autograd.grad(f(x, w, g, b, rm, rv, True), (x, w, g, b), gy)

        info["saved_bytes"] = saved_bytes(lambda: f(x, w, g, b, rm, rv, True))
        if impl != "eager":
            eager_saved = saved_bytes(lambda: _fn("eager", case, mode, dtype)(x, w, g, b, rm, rv, True))
            info["saved_vs_eager"] = info["saved_bytes"] / eager_saved
    return step, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu", "cuda", "triton"])
def test_conv3d_bn_relu(benchmark, device, case, mode, impl):
    reason = unavailable(IMPLS, device, impl)
    if reason:
        pytest.skip(reason)
    step, info = case_step(device, case, mode, impl)
    benchmark.group = f"conv3d_bn_relu {case} {device} {mode}"
    if impl in ("cpu", "cuda", "triton") and mode == "fwd+bwd":
        # the issue: at least 30% fewer bytes saved for backward than the eager chain
        assert info["saved_vs_eager"] <= 0.7, info
    measure_case(benchmark, case_step, IMPLS, step, info, rounds=ROUNDS[device])


R3D_IMPLS = {"cpu": ["eager", "cpu"], "cuda": ["eager", "cuda", "triton"]}


def r3d_18_step(device, impl):
    """torchvision's r3d_18 (random weights) on one 16x112x112 clip, unfused ("eager") or fused: the step
    and its extra_info."""
    from torchvision.models import video

    torch.manual_seed(0)
    model = video.r3d_18(weights=None).to(device).eval()
    if impl != "eager":
        model = mvfast.fuse(copy.deepcopy(model))[0]
    x = torch.randn(1, 3, 16, 112, 112, device=device)

    def step():
        with torch.no_grad(), mvfast.backend("auto" if impl == "eager" else impl):
            model(x)

    return step, dict(op="r3d_18", case="N1-16x112x112", device=device, mode="fwd", impl=impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "cpu", "cuda", "triton"])
def test_r3d_18_eval(benchmark, device, impl):
    """torchvision's r3d_18 (random weights) on one 16x112x112 clip: unfused ("eager") against fused."""
    pytest.importorskip("torchvision.models.video")
    reason = unavailable(R3D_IMPLS, device, impl)
    if reason:
        pytest.skip(reason)
    step, info = r3d_18_step(device, impl)
    benchmark.group = f"r3d_18 N1-16x112x112 {device} fwd"
    against = {} if impl == "eager" else {"eager": r3d_18_step(device, "eager")[0]}
    measure(benchmark, step, device, rounds=ROUNDS[device], info=info, against=against)


R3D_TRAIN_IMPLS = {"cpu": ["eager", "cpu", "cpu-ncdhw"], "cuda": ["eager", "cuda", "triton"]}
R3D_TRAIN_CASE = "N2-8x56x56"


def r3d_18_train_step(device, impl):
    """torchvision's r3d_18 (random weights, training) on an NCDHW clip batch of 2x3x8x56x56: forward and
    backward to every parameter, unfused ("eager": torchvision's in-place ReLUs), fused (``mvfast.fuse``'s
    default: channels-last from the first block on, on the CPU), or fused with channels_last=False
    ("cpu-ncdhw": every block's output in NCDHW, as its input). The step and its extra_info, with the
    activations saved for backward (parameters not counted) and their ratio to the unfused model's."""
    from torchvision.models import video

    torch.manual_seed(0)
    model = video.r3d_18(weights=None).to(device).train()
    x = torch.randn(2, 3, 8, 56, 56, device=device)
    backend = {"eager": "auto", "cpu-ncdhw": "cpu"}.get(impl, impl)

    def loss(m):
        with mvfast.backend(backend):
            return m(x).sum()

    eager_saved = saved_bytes(lambda: loss(model), exclude=list(model.parameters()))
    if impl != "eager":
        model = mvfast.fuse(copy.deepcopy(model), channels_last=False if impl == "cpu-ncdhw" else "auto")[0]
    params = list(model.parameters())
    info = dict(op="r3d_18", case=R3D_TRAIN_CASE, device=device, mode="train", impl=impl)
    info["saved_bytes"] = saved_bytes(lambda: loss(model), exclude=params)
    info["saved_vs_eager"] = info["saved_bytes"] / eager_saved

    def step():
        torch.autograd.grad(loss(model), params)

    return step, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "cpu", "cpu-ncdhw", "cuda", "triton"])
def test_r3d_18_train(benchmark, device, impl):
    pytest.importorskip("torchvision.models.video")
    if impl not in R3D_TRAIN_IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device}")
    if impl != "eager" and not mvfast.backends(device)[impl.removesuffix("-ncdhw")]["available"]:
        pytest.skip(mvfast.backends(device)[impl.removesuffix("-ncdhw")]["reason"])
    step, info = r3d_18_train_step(device, impl)
    benchmark.group = f"r3d_18 {R3D_TRAIN_CASE} {device} train"
    measure(benchmark, step, device, rounds=ROUNDS[device], info=info)
