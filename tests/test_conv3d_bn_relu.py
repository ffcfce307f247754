"""Conv3d + BatchNorm3d + ReLU: the reference against nn modules, every backend against the float64
reference in train and eval (outputs, gradients, running statistics), gradcheck, opcheck, torch.compile,
channels_last_3d, memory saved for backward, the module's state_dict, and bad input."""

import copy
import importlib

import pytest
import torch
from backend_params import kernel_backends
from conv_checks import check_close, exact_float32, grads, names_for, off_the_kink
from torch import nn

import mvfast
from mvfast.ops.conv3d_bn_relu import conv3d_bn_relu_reference
from mvfast.utils import saved_bytes

CL = torch.channels_last_3d

# Tiny shapes: the Triton implicit GEMM runs in the interpreter on the CPU.
CASES = {
    "plain": dict(),
    "strided": dict(stride=(1, 2, 2), padding=(0, 1, 2), dilation=(1, 1, 2)),
    "groups-bias": dict(groups=2, bias=True, padding=1),
    "channels_last": dict(channels_last=True, padding=1, stride=2),
    "no-relu": dict(relu=False, padding=1),
}


def sample_inputs(
    dtype=torch.float32,
    device="cpu",
    *,
    N=2,
    Cin=4,
    C=6,
    size=(4, 5, 6),
    k=3,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias=False,
    channels_last=False,
    relu=True,
    seed=0,
):
    """(leaves [x, weight, bias, bn_weight, bn_bias], running_mean, running_var, kwargs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, Cin, *size, generator=g)
    w = torch.randn(C, Cin // groups, k, k, k, generator=g) * (Cin // groups * k**3) ** -0.5
    b = torch.randn(C, generator=g) if bias else None
    gamma = torch.rand(C, generator=g) + 0.5
    beta = torch.randn(C, generator=g) * 0.3
    rm = torch.randn(C, generator=g) * 0.2
    rv = torch.rand(C, generator=g) + 0.5
    x, w, gamma, beta = (t.to(device=device, dtype=dtype) for t in (x, w, gamma, beta))
    b = b.to(device=device, dtype=dtype) if b is not None else None
    rm, rv = rm.to(device=device, dtype=dtype), rv.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b, gamma, beta)]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    return leaves, rm, rv, kw


def run(backend, leaves, rm, rv, kw, training, gy=None):
    """[out, grads of (x, weight, bias?, bn_weight, bn_bias)], with rm / rv updated in place."""
    with mvfast.backend(backend):
        y = mvfast.ops.conv3d_bn_relu(*leaves, rm, rv, training=training, **kw)
    return [y] + grads(y, leaves, gy)


def grad_out_off_the_kink(leaves, rm, rv, kw, training, dtype):
    """A random grad_out that is zero where the float64 pre-activation lies within the dtype's rounding
    of 0: there the ReLU mask of any low-precision computation may go either way, and the gradient with
    it (see conv_checks.off_the_kink)."""
    up, rm64, rv64 = upcast(leaves, rm, rv)
    with torch.no_grad():
        pre = conv3d_bn_relu_reference(*up, rm64, rv64, training=training, **dict(kw, relu=False))
    return off_the_kink(pre, dtype)


def upcast(leaves, rm, rv):
    up = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in leaves]
    if leaves[0].is_contiguous(memory_format=CL) and not leaves[0].is_contiguous():
        up[0] = up[0].detach().contiguous(memory_format=CL).requires_grad_()
    return up, rm.double().cpu(), rv.double().cpu()


def eager_in_dtype(leaves, rm, rv, kw, training, gy=None):
    """The eager chain run by PyTorch in the inputs' own dtype: the error it makes sets the tolerance."""
    y = conv3d_bn_relu_reference(*leaves, rm, rv, training=training, **kw)
    return [y] + grads(y, leaves, gy)


# ---------------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("momentum", [0.1, None])
def test_reference_is_the_module_chain(momentum):
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv3d(4, 6, 3, padding=1, bias=True), nn.BatchNorm3d(6, momentum=momentum), nn.ReLU()
    ).double()
    conv, bn = seq[0], seq[1]
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
        want = seq(x)
        got = conv3d_bn_relu_reference(
            x,
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            rm,
            rv,
            padding=1,
            training=True,
            momentum=momentum,
            num_batches_tracked=nbt,
        )
        torch.testing.assert_close(got, want)
    torch.testing.assert_close((rm, rv, nbt), (bn.running_mean, bn.running_var, bn.num_batches_tracked))
    seq.eval()
    got = conv3d_bn_relu_reference(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, padding=1)
    torch.testing.assert_close(got, seq(x))


# ---------------------------------------------------------------------------------------------------
# Every backend against the float64 reference


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backend_matches_reference(backend, dtype, case, training):
    name, device = backend
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not support bfloat16 (triton-lang/triton#11584)")
    if name == "triton" and device == "cpu" and case in ("groups-bias", "no-relu") and dtype != torch.float32:
        pytest.skip("interpreter time: the float32 run covers this case")
    leaves, rm, rv, kw = sample_inputs(dtype, device, **CASES[case])
    gy = grad_out_off_the_kink(leaves, rm, rv, kw, training, dtype)
    got = run(name, leaves, rm.clone(), rv.clone(), kw, training, gy)
    up, rm64, rv64 = upcast(leaves, rm, rv)
    ref64 = run("reference", up, rm64, rv64, kw, training, gy)
    lowp = eager_in_dtype(leaves, rm.clone(), rv.clone(), kw, training, gy)
    check_close(got, [t.to(device) for t in ref64], lowp, dtype, names_for(leaves[2] is not None))
    fmt = CL if CASES[case].get("channels_last") else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt), "the output keeps x's memory format"


@pytest.mark.parametrize("C", [1, 3, 4, 8, 13, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "ncdhw"])
def test_cpu_kernels_any_channel_count(C, dtype, layout):
    """The CPU kernels walk channels-last tiles in whole vectors against per-channel values repeated along
    the lanes (a period of lcm(C, lanes) values) and finish each tile's partial period in scalar code:
    channel counts below, at, between and above the vector width, with tiles of many periods and a
    ragged last one, in both input layouts, every output and gradient against float64."""
    if not mvfast.backends("cpu")["cpu"]["available"]:
        pytest.skip(mvfast.backends("cpu")["cpu"]["reason"])
    leaves, rm, rv, kw = sample_inputs(
        dtype, N=3, Cin=3, C=C, size=(2, 9, 11), padding=1, channels_last=layout == "channels_last", seed=C
    )
    gy = grad_out_off_the_kink(leaves, rm, rv, kw, True, torch.float32 if dtype == torch.float64 else dtype)
    got = run("cpu", leaves, rm.clone(), rv.clone(), kw, True, gy)
    up, rm64, rv64 = upcast(leaves, rm, rv)
    ref64 = run("reference", up, rm64, rv64, kw, True, gy)
    if dtype == torch.float64:
        for name, g, r in zip(names_for(False), got, ref64, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    else:
        lowp = eager_in_dtype(leaves, rm.clone(), rv.clone(), kw, True, gy)
        check_close(got, ref64, lowp, dtype, names_for(False))


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id in ("cpu", "cuda")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["ncdhw", "channels_last"])
@pytest.mark.parametrize("gy_layout", ["ncdhw", "channels_last"])
def test_kernels_across_reduction_tiles(backend, dtype, layout, gy_layout):
    """Shapes that cross every tile of the CUDA statistics and backward sums (the CASES above fit in one):
    C = 40 channels, a full tile of 32 and a ragged one; 2 * 33 * 31 = 2046 positions per sample, two spans
    of 1024, the last ragged and ending in a ragged step of 32 positions; N = 3. grad_out comes in either
    layout, so the backward also reads z and grad_out in different layouts."""
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(
        dtype, device, N=3, Cin=3, C=40, size=(2, 33, 31), padding=1, channels_last=layout == "channels_last"
    )
    gy = grad_out_off_the_kink(leaves, rm, rv, kw, True, dtype)
    gy = gy.contiguous(memory_format=CL if gy_layout == "channels_last" else torch.contiguous_format)
    got = run(name, leaves, rm.clone(), rv.clone(), kw, True, gy)
    up, rm64, rv64 = upcast(leaves, rm, rv)
    ref64 = run("reference", up, rm64, rv64, kw, True, gy)
    lowp = eager_in_dtype(leaves, rm.clone(), rv.clone(), kw, True, gy)
    check_close(got, ref64, lowp, dtype, names_for(False))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm3d(backend, momentum):
    """Several training steps: running_mean, running_var and num_batches_tracked as nn.BatchNorm3d's."""
    name, device = backend
    with exact_float32():  # the chain and the kernels compared to 1e-4, tighter than TF32
        torch.manual_seed(0)
        block = mvfast.nn.Conv3dBNReLU(3, 5, 3, padding=1, bias=True, momentum=momentum).to(device)
        seq = nn.Sequential(
            nn.Conv3d(3, 5, 3, padding=1, bias=True), nn.BatchNorm3d(5, momentum=momentum), nn.ReLU()
        ).to(device)
        seq.load_state_dict(block.state_dict())
        with mvfast.backend(name):
            for step in range(4):
                x = (torch.randn(2, 3, 3, 4, 4) * (step + 1) + step).to(device)
                torch.testing.assert_close(block(x), seq(x), rtol=1e-4, atol=1e-4)
        bn = block.bn
        torch.testing.assert_close(bn.running_mean, seq[1].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, seq[1].running_var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == seq[1].num_batches_tracked.item() == 4
        block.eval()
        seq.eval()
        x = torch.randn(2, 3, 3, 4, 4, device=device)
        with mvfast.backend(name), torch.no_grad():
            torch.testing.assert_close(block(x), seq(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_calls_match_autograd_calls(backend, training):
    """Under torch.no_grad the compiled kernels are called without the autograd custom op: the same output
    and the same running-statistics update as a call that records the graph."""
    name, device = backend
    torch.manual_seed(0)
    block = mvfast.nn.Conv3dBNReLU(3, 5, 3, padding=1, bias=True).to(device).train(training)
    twin = mvfast.nn.Conv3dBNReLU(3, 5, 3, padding=1, bias=True).to(device).train(training)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 3, 4, 5, device=device)
    with mvfast.backend(name):
        with torch.no_grad():
            y = block(x)
        y_graph = twin(x)
    assert not y.requires_grad and y_graph.requires_grad
    torch.testing.assert_close(y, y_graph.detach(), rtol=0, atol=0)
    for k, v in block.state_dict().items():
        torch.testing.assert_close(v, twin.state_dict()[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", kernel_backends())
def test_statistics_are_stable_far_from_zero(backend):
    """z around 1e3 with unit spread: E[z^2] - E[z]^2 in float32 would get the variance wrong by percents.
    (Without TF32, which would round z itself by about 0.5 on a GPU.)"""
    name, device = backend
    leaves, rm, rv, _ = sample_inputs(torch.float32, device, size=(4, 6, 6))
    x = leaves[0].detach() + 1e3
    w = torch.zeros_like(leaves[1])
    w[:, :, 1, 1, 1] = torch.eye(6, 4, device=device)  # z = x on 4 channels, 0 on the other 2
    with mvfast.backend(name), exact_float32():
        mvfast.ops.conv3d_bn_relu(
            x, w, None, leaves[3].detach(), leaves[4].detach(), rm, rv, padding=1, training=True, momentum=1.0
        )
    z = torch.nn.functional.conv3d(x.double(), w.double(), padding=1)
    torch.testing.assert_close(rm.double(), z.mean((0, 2, 3, 4)), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(rv.double(), z.var((0, 2, 3, 4)), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile


def _gradcheck_backends():
    return ["reference"] + [p for p in kernel_backends() if p.id == "cpu"]


@pytest.mark.parametrize("backend", _gradcheck_backends(), ids=lambda p: p if isinstance(p, str) else p[0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["strided", "groups-bias", "channels_last"])
def test_gradcheck_float64(backend, training, case):
    name = backend if isinstance(backend, str) else backend[0]
    kw_in = dict(CASES[case])
    leaves, rm, rv, kw = sample_inputs(
        torch.float64, N=2, Cin=2 * (2 if case == "groups-bias" else 1), C=4, size=(3, 4, 4), k=2, **kw_in
    )
    live = [t for t in leaves if t is not None]

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in leaves]
        with mvfast.backend(name):
            return mvfast.ops.conv3d_bn_relu(*args, rm.clone(), rv.clone(), training=training, **kw)

    assert torch.autograd.gradcheck(f, live, eps=1e-6, atol=1e-5, rtol=1e-4)


def _op_args(leaves, rm, rv, kw, training, name, conv_cl=False):
    x, w, b, g, beta = leaves
    s = [kw["stride"]] * 3 if isinstance(kw["stride"], int) else list(kw["stride"])
    p = [kw["padding"]] * 3 if isinstance(kw["padding"], int) else list(kw["padding"])
    d = [kw["dilation"]] * 3 if isinstance(kw["dilation"], int) else list(kw["dilation"])
    return (x, w, b, g, beta, rm, rv, s, p, d, kw["groups"], training, 1e-5, kw["relu"], conv_cl, name)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", ["plain", "groups-bias", "channels_last"])
def test_opcheck(backend, case):
    name, device = backend
    if name == "triton" and device == "cpu" and case == "groups-bias":
        pytest.skip("interpreter time (17 s): the group loop is checked against the reference above")
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, **CASES[case])
    for training in (True, False):
        for conv_cl in (False, True) if name == "cpu" else (False,):
            torch.library.opcheck(
                torch.ops.mvfast.conv3d_bn_relu.default, _op_args(leaves, rm, rv, kw, training, name, conv_cl)
            )


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_backward_and_compiled_kernels(backend):
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, **CASES["channels_last"])
    leaves = [t.detach() if t is not None else None for t in leaves]
    args = _op_args(leaves, rm, rv, kw, True, name, name == "cpu")
    out, z, mean, invstd, var, x_conv = torch.ops.mvfast.conv3d_bn_relu(*args)
    x = x_conv if x_conv.numel() else leaves[0]
    gy = torch.randn_like(out)
    conv = (args[7], args[8], args[9], args[10])
    for need in ((True, True), (False, True)):
        bargs = (gy, x, leaves[1], leaves[3], leaves[4], z, mean, invstd, *conv, True, *need)
        torch.library.opcheck(torch.ops.mvfast.conv3d_bn_relu_backward.default, (*bargs, name))
        if name != "triton":
            torch.library.opcheck(torch.ops.mvfast.conv3d_bn_relu_bwd.default, bargs)
    if name != "triton":
        torch.library.opcheck(torch.ops.mvfast.conv3d_bn_relu_fwd.default, args[:-1])


@pytest.mark.parametrize(
    "backend", ["reference"] + kernel_backends(), ids=lambda p: p if isinstance(p, str) else p[0]
)
def test_compile_fullgraph_module(backend):
    """A training step (output, gradients, running statistics) and eval, compiled with fullgraph=True."""
    name, device = (backend, "cpu") if isinstance(backend, str) else backend
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = mvfast.nn.Conv3dBNReLU(4, 6, 3, padding=1).to(device)
    twin = mvfast.nn.Conv3dBNReLU(4, 6, 3, padding=1).to(device)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 3, 5, 5, device=device)
    with mvfast.backend(name):
        eager = block(x)
        (ge,) = torch.autograd.grad(eager.square().sum(), [block.conv.weight])
        compiled = torch.compile(twin, fullgraph=True)
        y = compiled(x)
        (gc,) = torch.autograd.grad(y.square().sum(), [twin.conv.weight])
        torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin.bn.running_mean, block.bn.running_mean)
        torch.testing.assert_close(twin.bn.running_var, block.bn.running_var)
        assert twin.bn.num_batches_tracked.item() == block.bn.num_batches_tracked.item() == 1
        block.eval()
        twin.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Memory: what is saved for backward


@pytest.mark.parametrize("backend", kernel_backends())
def test_saves_the_conv_output_and_channel_statistics_only(backend):
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, N=2, Cin=8, C=8, size=(4, 16, 16), padding=1)

    def call(be):
        return lambda: run(be, leaves, rm.clone(), rv.clone(), kw, True)[0]

    ours, eager = saved_bytes(call(name)), saved_bytes(call("reference"))
    act = leaves[0].numel() * 4  # x and z have the same size here
    small = leaves[1].numel() * 4 + 6 * 8 * 8  # weight, bn_weight, bn_bias, mean, invstd
    assert ours <= 2 * act + small, f"{name} saves {ours} bytes: more than x, z and per-channel tensors"
    assert ours <= 0.7 * eager, f"{name} saves {ours} bytes, eager {eager}"


def _block_after_inplace_relu(C=8):
    """nn.Sequential(ReLU(inplace), Conv3d, BatchNorm3d, ReLU(inplace)) in training: a block fed the output
    of an in-place ReLU, as torchvision's video ResNets feed each residual block (the ReLU after the add)."""
    torch.manual_seed(0)
    conv = nn.Conv3d(C, C, 3, padding=1, bias=False)
    return nn.Sequential(nn.ReLU(inplace=True), conv, nn.BatchNorm3d(C), nn.ReLU(inplace=True)).train()


@pytest.mark.parametrize("backend", kernel_backends())
def test_ncdhw_block_saves_its_input_not_a_copy(backend):
    """With NCDHW input the CPU kernels run the conv on a channels_last_3d copy of x; backward gets x
    itself (shared with what the ReLU before it saves) and converts it again, so the block adds z only,
    against the eager chain's z and ReLU output: at most 70% of the bytes of the eager chain with in-place
    ReLUs, where saving the copy gave 100%."""
    name, device = backend
    eager = _block_after_inplace_relu().to(device)
    fused = mvfast.fuse(copy.deepcopy(eager))[0]
    assert any(isinstance(m, mvfast.nn.Conv3dBNReLU) for m in fused.modules())
    x = torch.randn(2, 8, 4, 16, 16, device=device, requires_grad=True)
    with mvfast.backend(name):
        ours = saved_bytes(lambda: fused(x * 1))
        theirs = saved_bytes(lambda: eager(x * 1))
        # and the gradients of that path are the eager chain's
        gy = torch.randn(2, 8, 4, 16, 16, device=device)
        with exact_float32():
            got = torch.autograd.grad(fused(x * 1), [x, *fused.parameters()], gy)
            want = torch.autograd.grad(eager(x * 1), [x, *eager.parameters()], gy)
    assert ours <= 0.7 * theirs, f"{name} saves {ours} bytes, the eager chain with in-place ReLU {theirs}"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
def test_converted_input_is_saved_as_converted_when_changed_in_place_in_between(backend):
    """A fused block converting an NCDHW x to channels-last saves x in the copy's place, unless x was
    changed in place after the conversion (the copy then holds the values the conv read): the gradients
    are the reference backend's, which saves the copy, in both cases. float64 throughout."""
    from mvfast.ops.conv3d_bn_relu import channels_last_input

    name, device = backend
    if name == "triton":
        pytest.skip("the triton kernels take float32, float16 and bfloat16, not float64")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 6, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(5, 4, 3, 3, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    gamma = torch.rand(5, generator=g, dtype=torch.float64).add(0.5).to(device).requires_grad_()
    beta = torch.randn(5, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def run(change):
        h = x * 1
        hc = channels_last_input(h)
        assert hc.is_contiguous(memory_format=torch.channels_last_3d) and not hc.is_contiguous()
        if change:
            with torch.no_grad():
                h.add_(1.0)
        y = mvfast.ops.conv3d_bn_relu(hc, w, None, gamma, beta, None, None, padding=1, training=True)
        return torch.autograd.grad(y.square().sum(), [x, w, gamma, beta])

    for change in (False, True):
        with mvfast.backend("reference"):
            want = run(change)
        with mvfast.backend(name):
            got = run(change)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["ncdhw", "channels_last_3d"])
@pytest.mark.parametrize("weights", ["light", "heavy"])
def test_cpu_training_conv_layout_follows_the_weights_size(layout, weights):
    """The cpu kernels run a float32 training conv channels-last, unless its NCDHW weights outweigh x
    more than 4x (a late, wide layer at a small batch: copying those weights to channels-last three times
    a step cost more than the layout gained), then NCDHW, whatever x's layout; z shows which. Both agree
    with the float64 reference, forward and every gradient, in both input layouts."""
    if not mvfast.backends("cpu")["cpu"]["available"]:
        pytest.skip(mvfast.backends("cpu")["cpu"]["reason"])
    g = torch.Generator().manual_seed(0)
    cin, spatial = (4, (3, 8, 8)) if weights == "light" else (24, (1, 3, 3))
    x = torch.randn(2, cin, *spatial, generator=g)  # heavy: x 432 values, weight 24*24*27 = 15552
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(cin, cin, 3, 3, 3, generator=g) / (cin * 27) ** 0.5
    gamma, beta = torch.rand(cin, generator=g) + 0.5, torch.randn(cin, generator=g)
    args = [t.clone().requires_grad_() for t in (x, w, gamma, beta)]
    _, z, *_ = torch.ops.mvfast.conv3d_bn_relu(
        args[0],
        args[1],
        None,
        args[2],
        args[3],
        None,
        None,
        [1] * 3,
        [1] * 3,
        [1] * 3,
        1,
        True,
        1e-5,
        True,
        importlib.import_module("mvfast.ops.conv3d_bn_relu")._conv_channels_last("cpu", x, w),
        "cpu",
    )
    channels_last = z.is_contiguous(memory_format=torch.channels_last_3d) and not z.is_contiguous()
    assert channels_last == (weights == "light"), f"z is {'channels-last' if channels_last else 'NCDHW'}"
    with mvfast.backend("cpu"):
        y = mvfast.ops.conv3d_bn_relu(
            args[0], args[1], None, args[2], args[3], None, None, padding=1, training=True
        )
    gy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, args, gy)
    ref = [t.detach().double().requires_grad_() for t in (x, w, gamma, beta)]
    y64 = conv3d_bn_relu_reference(ref[0], ref[1], None, ref[2], ref[3], None, None, padding=1, training=True)
    want = torch.autograd.grad(y64, ref, gy.double())
    for name, a, b in zip(
        ["out", "grad_x", "grad_w", "grad_gamma", "grad_beta"], [y, *got], [y64, *want], strict=True
    ):
        torch.testing.assert_close(
            a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


# ---------------------------------------------------------------------------------------------------
# Module


def test_module_state_dict_is_the_sequentials():
    block = mvfast.nn.Conv3dBNReLU(3, 8, (1, 3, 3), padding=(0, 1, 1), bias=True)
    seq = nn.Sequential(nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(8), nn.ReLU())
    assert list(block.state_dict()) == list(seq.state_dict())
    with torch.no_grad():
        for p in seq.parameters():
            p.normal_()
        seq[1].running_var.uniform_(0.5, 2)
    block.load_state_dict(seq.state_dict())
    seq.eval()
    block.eval()
    x = torch.randn(2, 3, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), seq(x), rtol=1e-5, atol=1e-5)
    assert "relu=True" in repr(block)


# ---------------------------------------------------------------------------------------------------
# Bad input


def _bad(change):
    leaves, rm, rv, kw = sample_inputs(torch.float32, groups=2, padding=1)
    args = dict(
        x=leaves[0],
        weight=leaves[1],
        bias=leaves[2],
        bn_weight=leaves[3],
        bn_bias=leaves[4],
        running_mean=rm,
        running_var=rv,
    )
    kw = dict(kw, training=True)
    kw.pop("relu")
    change(args, kw)
    return args, kw


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda a, k: a.update(x=a["x"][0]), ValueError, r"x must have 5 dimensions"),
        (lambda a, k: a.update(weight=a["weight"][:, :1]), ValueError, r"weight must have shape \(6, 2, \*"),
        (lambda a, k: a.update(weight=a["weight"][:5]), ValueError, r"multiple of groups"),
        (
            lambda a, k: a.update(bn_weight=a["bn_weight"][:-1]),
            ValueError,
            r"bn_weight must have shape \(6\)",
        ),
        (lambda a, k: a.update(running_var=None), ValueError, r"running_mean and running_var must both"),
        (
            lambda a, k: a.update(running_mean=a["running_mean"].long()),
            TypeError,
            r"running_mean must have dtype",
        ),
        (lambda a, k: a.update(x=a["x"].double()), TypeError, r"weight must have the dtype of x \(float64\)"),
        (
            lambda a, k: a.update(bn_bias=a["bn_bias"].to("meta")),
            ValueError,
            r"bn_bias is on meta but x is on cpu",
        ),
        (lambda a, k: k.update(stride=0), ValueError, r"stride must be an int >= 1"),
        (lambda a, k: k.update(padding=(1, 1)), ValueError, r"padding must be an int >= 0 or a tuple of 3"),
        (lambda a, k: k.update(groups=3), ValueError, r"groups"),
        (lambda a, k: k.update(eps=0.0), ValueError, r"eps must be a float > 0"),
        (lambda a, k: k.update(momentum=2.0), ValueError, r"momentum must be a float in \[0, 1\]"),
        (
            lambda a, k: (a.update(x=a["x"][:, :, :1, :1, :1]), k.update(padding=0)),
            ValueError,
            r"x's spatial size .* too small",
        ),
        (
            lambda a, k: (
                a.update(x=a["x"][:1, :, :1, :1, :1]),
                k.update(padding=0, dilation=1),
                a.update(weight=a["weight"][..., :1, :1, :1]),
            ),
            ValueError,
            r"more than 1 value per channel",
        ),
    ],
    ids=[
        "x-rank",
        "weight-cin",
        "weight-groups",
        "bn_weight",
        "stats-pair",
        "stats-dtype",
        "dtype-mix",
        "device",
        "stride",
        "padding",
        "groups",
        "eps",
        "momentum",
        "too-small",
        "one-value",
    ],
)
def test_bad_input_names_the_argument(change, exc, pattern):
    args, kw = _bad(change)
    with pytest.raises(exc, match=pattern):
        mvfast.ops.conv3d_bn_relu(
            args.pop("x"),
            args.pop("weight"),
            args.pop("bias"),
            args.pop("bn_weight"),
            args.pop("bn_bias"),
            args.pop("running_mean"),
            args.pop("running_var"),
            **kw,
        )


@pytest.mark.parametrize("backend", kernel_backends())
def test_second_derivative_is_an_error(backend):
    """In training the kernels' backward is not differentiable: backpropagating through a graph recorded by
    create_graph=True must fail loudly, not drop the kernels' part of the second derivative."""
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, padding=1)
    with mvfast.backend(name):
        y = mvfast.ops.conv3d_bn_relu(*leaves, rm, rv, training=True, **kw)
        (gx,) = torch.autograd.grad(y.square().sum(), [leaves[0]], create_graph=True)
        with pytest.raises(RuntimeError, match="conv3d_bn_relu"):
            torch.autograd.grad(gx.square().sum(), [leaves[1]])
