"""Conv2d + BatchNorm2d + ReLU (a view onto the 3D op): the reference against nn modules, every backend
against the float64 reference in train and eval (outputs, every gradient, running statistics), NCHW and
channels_last inputs and the output's layout, odd sizes, stride, groups, dilation, a sliced input, float32
and the low precisions, gradcheck, opcheck of the 3D op on the 2D views, torch.compile, the module and its
fusable check, and bad input named in 2D terms."""

import pytest
import torch
from backend_params import kernel_backends
from conv_checks import check_close, exact_float32, grads, names_for, off_the_kink
from torch import nn

import mvfast
from mvfast.nn import Conv2dBNReLU, Conv3dBNReLU
from mvfast.ops.conv2d_bn_relu import conv2d_bn_relu_reference
from mvfast.utils import saved_bytes

CL = torch.channels_last

# Tiny, odd sizes: the Triton implicit GEMM runs in the interpreter on the CPU.
CASES = {
    "plain": dict(),
    "strided-dilated": dict(stride=2, padding=(1, 2), dilation=(1, 2)),
    "groups-bias": dict(groups=2, bias=True, padding=1),
    "channels_last": dict(channels_last=True, padding=1, stride=(2, 1)),
    "sliced": dict(sliced=True, padding=1),
    "no-relu": dict(relu=False, padding=1),
}


def sample_inputs(
    dtype=torch.float32,
    device="cpu",
    *,
    N=2,
    Cin=4,
    C=6,
    size=(5, 7),
    k=3,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias=False,
    channels_last=False,
    sliced=False,
    relu=True,
    seed=0,
):
    """(leaves [x, weight, bias, bn_weight, bn_bias], running_mean, running_var, kwargs). ``sliced``: x is
    a strided view (every other channel and column of a larger tensor), contiguous in no layout."""
    g = torch.Generator().manual_seed(seed)
    if sliced:
        x = torch.randn(N, 2 * Cin, size[0] + 1, 2 * size[1], generator=g)[:, ::2, 1:, ::2]
    else:
        x = torch.randn(N, Cin, *size, generator=g)
    w = torch.randn(C, Cin // groups, k, k, generator=g) * (Cin // groups * k**2) ** -0.5
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
        y = mvfast.ops.conv2d_bn_relu(*leaves, rm, rv, training=training, **kw)
    return [y] + grads(y, leaves, gy)


def upcast(leaves, rm, rv):
    up = [t.detach().double().cpu().requires_grad_() if t is not None else None for t in leaves]
    return up, rm.double().cpu(), rv.double().cpu()


def grad_out_off_the_kink(leaves, rm, rv, kw, training, dtype):
    """A random grad_out, zero where the float64 pre-activation is within the dtype's rounding of 0: there
    a low-precision ReLU mask may go either way (see conv_checks.off_the_kink)."""
    up, rm64, rv64 = upcast(leaves, rm, rv)
    with torch.no_grad():
        pre = conv2d_bn_relu_reference(*up, rm64, rv64, training=training, **dict(kw, relu=False))
    return off_the_kink(pre, dtype)


# ---------------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("momentum", [0.1, None])
def test_reference_is_the_module_chain(momentum):
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, momentum=momentum), nn.ReLU()
    ).double()
    conv, bn = seq[0], seq[1]
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
        want = seq(x)
        got = conv2d_bn_relu_reference(
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
    got = conv2d_bn_relu_reference(x, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, padding=1)
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
    leaves, rm, rv, kw = sample_inputs(dtype, device, **CASES[case])
    gy = grad_out_off_the_kink(leaves, rm, rv, kw, training, dtype)
    got = run(name, leaves, rm.clone(), rv.clone(), kw, training, gy)
    up, rm64, rv64 = upcast(leaves, rm, rv)
    ref64 = run("reference", up, rm64, rv64, kw, training, gy)
    lowp = run("reference", leaves, rm.clone(), rv.clone(), kw, training, gy)
    check_close(got, [t.to(device) for t in ref64], lowp, dtype, names_for(leaves[2] is not None))
    # A channels_last input gives a channels_last output, anything else (NCHW, the sliced view) NCHW.
    fmt = CL if CASES[case].get("channels_last") else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt), f"output strides {got[0].stride()}: not {fmt}"


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm2d(backend, momentum):
    """Several training steps: running_mean, running_var and num_batches_tracked as nn.BatchNorm2d's."""
    name, device = backend
    with exact_float32():  # the chain and the kernels compared to 1e-4, tighter than TF32
        torch.manual_seed(0)
        block = Conv2dBNReLU(3, 5, 3, padding=1, bias=True, momentum=momentum).to(device)
        seq = nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5, momentum=momentum), nn.ReLU()
        ).to(device)
        seq.load_state_dict(block.state_dict())
        with mvfast.backend(name):
            for step in range(4):
                x = (torch.randn(2, 3, 5, 6) * (step + 1) + step).to(device)
                torch.testing.assert_close(block(x), seq(x), rtol=1e-4, atol=1e-4)
        bn = block.bn
        torch.testing.assert_close(bn.running_mean, seq[1].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, seq[1].running_var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == seq[1].num_batches_tracked.item() == 4
        block.eval()
        seq.eval()
        x = torch.randn(2, 3, 5, 6, device=device)
        with mvfast.backend(name), torch.no_grad():
            torch.testing.assert_close(block(x), seq(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id == "cpu"])
def test_without_running_statistics(backend):
    """track_running_stats=False: batch statistics in training and in eval, nothing updated."""
    torch.manual_seed(0)
    block = Conv2dBNReLU(3, 5, 3, padding=1)
    block.bn.track_running_stats = False
    block.bn.running_mean = block.bn.running_var = block.bn.num_batches_tracked = None
    seq = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5, track_running_stats=False)
    )
    seq.append(nn.ReLU())
    seq.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 5, 6)
    with mvfast.backend(backend[0]):
        for mode in (True, False):
            block.train(mode)
            seq.train(mode)
            torch.testing.assert_close(block(x), seq(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile


def _gradcheck_backends():
    return ["reference"] + [p for p in kernel_backends() if p.id == "cpu"]


@pytest.mark.parametrize("backend", _gradcheck_backends(), ids=lambda p: p if isinstance(p, str) else p[0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["strided-dilated", "groups-bias", "channels_last"])
def test_gradcheck_float64(backend, training, case):
    name = backend if isinstance(backend, str) else backend[0]
    leaves, rm, rv, kw = sample_inputs(
        torch.float64, Cin=4 if case == "groups-bias" else 2, C=4, size=(4, 5), k=2, **CASES[case]
    )
    live = [t for t in leaves if t is not None]

    def f(*ts):
        it = iter(ts)
        args = [next(it) if t is not None else None for t in leaves]
        with mvfast.backend(name):
            return mvfast.ops.conv2d_bn_relu(*args, rm.clone(), rv.clone(), training=training, **kw)

    assert torch.autograd.gradcheck(f, live, eps=1e-6, atol=1e-5, rtol=1e-4)


def _op_args_3d(leaves, rm, rv, kw, training, name, conv_cl=False):
    """The arguments conv2d_bn_relu hands the 3D custom op: 5-D views of the 2D tensors."""
    x, w, b, g, beta = leaves
    s, p, d = (
        [v] * 2 if isinstance(v, int) else list(v) for v in (kw["stride"], kw["padding"], kw["dilation"])
    )
    return (
        x.unsqueeze(2),
        w.unsqueeze(2),
        b,
        g,
        beta,
        rm,
        rv,
        [1, *s],
        [0, *p],
        [1, *d],
        kw["groups"],
        training,
        1e-5,
        kw["relu"],
        conv_cl,
        name,
    )


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", ["plain", "channels_last"])
def test_opcheck_of_the_3d_op_on_2d_views(backend, case):
    """The fake kernels must give the strides the kernels give for the depth-1 views, channels_last's
    (N, C, 1, H, W) view (channels_last_3d-contiguous) included."""
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, **CASES[case])
    for training in (True, False):
        for conv_cl in (False, True) if name == "cpu" else (False,):
            torch.library.opcheck(
                torch.ops.mvfast.conv3d_bn_relu.default,
                _op_args_3d(leaves, rm, rv, kw, training, name, conv_cl),
            )


@pytest.mark.parametrize(
    "backend", ["reference"] + kernel_backends(), ids=lambda p: p if isinstance(p, str) else p[0]
)
def test_compile_fullgraph_module(backend):
    """A training step (output, gradients, running statistics) and eval, compiled with fullgraph=True,
    on a channels_last input."""
    name, device = (backend, "cpu") if isinstance(backend, str) else backend
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Conv2dBNReLU(4, 6, 3, padding=1).to(device)
    twin = Conv2dBNReLU(4, 6, 3, padding=1).to(device)
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 4, 5, 7, device=device).contiguous(memory_format=CL)
    with mvfast.backend(name):
        eager = block(x)
        (ge,) = torch.autograd.grad(eager.square().sum(), [block.conv.weight])
        compiled = torch.compile(twin, fullgraph=True)
        y = compiled(x)
        (gc,) = torch.autograd.grad(y.square().sum(), [twin.conv.weight])
        torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=CL)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(twin.bn.running_mean, block.bn.running_mean)
        torch.testing.assert_close(twin.bn.running_var, block.bn.running_var)
        assert twin.bn.num_batches_tracked.item() == block.bn.num_batches_tracked.item() == 1
        block.eval()
        twin.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
def test_saves_the_conv_output_and_channel_statistics_only(backend):
    name, device = backend
    leaves, rm, rv, kw = sample_inputs(torch.float32, device, N=2, Cin=8, C=8, size=(12, 12), padding=1)

    def call(be):
        return lambda: run(be, leaves, rm.clone(), rv.clone(), kw, True)[0]

    ours, eager = saved_bytes(call(name)), saved_bytes(call("reference"))
    act = leaves[0].numel() * 4  # x and z have the same size here
    small = leaves[1].numel() * 4 + 6 * 8 * 8  # weight, bn_weight, bn_bias, mean, invstd
    assert ours <= 2 * act + small, f"{name} saves {ours} bytes: more than x, z and per-channel tensors"
    assert ours <= 0.7 * eager, f"{name} saves {ours} bytes, eager {eager}"


# ---------------------------------------------------------------------------------------------------
# Module


def test_module_state_dict_is_the_sequentials():
    block = Conv2dBNReLU(3, 8, (3, 5), padding=(1, 2), bias=True)
    seq = nn.Sequential(nn.Conv2d(3, 8, (3, 5), padding=(1, 2)), nn.BatchNorm2d(8), nn.ReLU())
    assert list(block.state_dict()) == list(seq.state_dict())
    assert type(block.conv) is nn.Conv2d and type(block.bn) is nn.BatchNorm2d
    with torch.no_grad():
        for p in seq.parameters():
            p.normal_()
        seq[1].running_var.uniform_(0.5, 2)
    block.load_state_dict(seq.state_dict())
    seq.eval()
    block.eval()
    x = torch.randn(2, 3, 6, 9)
    with torch.no_grad():
        torch.testing.assert_close(block(x), seq(x), rtol=1e-5, atol=1e-5)
    assert "relu=True" in repr(block)


def test_from_modules_shares_the_modules():
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    block = Conv2dBNReLU.from_modules(conv, bn, relu=False)
    assert block.conv is conv and block.bn is bn and not block.relu and not block.training
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"Conv2dBNReLU.from_modules: cannot fuse .*\(needs an nn.Conv2d"):
        Conv2dBNReLU.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match=r"Conv2dBNReLU: padding must be an int or a tuple of 2 ints"):
        Conv2dBNReLU(3, 4, 3, padding="same")


class _MyBN(nn.BatchNorm2d):
    pass


def _hooked(m):
    m.register_forward_hook(lambda *a: None)
    return m


@pytest.mark.parametrize(
    "conv,bn,ok2d",
    [
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), True),
        (nn.Conv2d(3, 4, 3, padding=(1, 2), stride=2, groups=1), nn.BatchNorm2d(4), True),
        (nn.Conv2d(3, 4, 3, padding="same"), nn.BatchNorm2d(4), False),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), False),
        (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5), False),
        (nn.Conv2d(3, 4, 3), _MyBN(4), False),
        (nn.Conv2d(3, 4, 3), nn.BatchNorm3d(4), False),
        (nn.Conv3d(3, 4, 3), nn.BatchNorm2d(4), False),
        (_hooked(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), False),
        (nn.Conv2d(3, 4, 3), _hooked(nn.BatchNorm2d(4)), False),
    ],
    ids=[
        "plain",
        "padded",
        "same",
        "reflect",
        "features",
        "bn-subclass",
        "bn3d",
        "conv3d",
        "conv-hook",
        "bn-hook",
    ],
)
def test_fusable(conv, bn, ok2d):
    assert Conv2dBNReLU.fusable(conv, bn) is ok2d
    assert not Conv3dBNReLU.fusable(conv, bn)


# ---------------------------------------------------------------------------------------------------
# Bad input, named in 2D terms


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
        (
            lambda a, k: a.update(x=a["x"][0]),
            ValueError,
            r"^conv2d_bn_relu: x must have 4 dimensions \(N, C, H, W\), got shape \(4, 5, 7\)$",
        ),
        (
            lambda a, k: a.update(x=a["x"].unsqueeze(2)),
            ValueError,
            r"x must have 4 dimensions \(N, C, H, W\), got shape \(2, 4, 1, 5, 7\)",
        ),
        (
            lambda a, k: a.update(weight=a["weight"].unsqueeze(2)),
            ValueError,
            r"weight must have 4 dimensions \(C, Cin/groups, kH, kW\), got shape \(6, 2, 1, 3, 3\)",
        ),
        (
            lambda a, k: a.update(weight=a["weight"][:, :1]),
            ValueError,
            r"weight must have shape \(6, 2, \*, \*\) for x with 4 channels and groups=2, got \(6, 1, 3, 3\)",
        ),
        (lambda a, k: a.update(weight=a["weight"][:5]), ValueError, r"multiple of groups"),
        (
            lambda a, k: a.update(bn_weight=a["bn_weight"][:-1]),
            ValueError,
            r"bn_weight must have shape \(6\), got \(5\)",
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
        (lambda a, k: k.update(stride=0), ValueError, r"stride must be an int >= 1 or a tuple of 2"),
        (
            lambda a, k: k.update(padding=(1, 1, 1)),
            ValueError,
            r"padding must be an int >= 0 or a tuple of 2 such ints, got \(1, 1, 1\)",
        ),
        (lambda a, k: k.update(padding="same"), ValueError, r"padding must be an int >= 0 or a tuple of 2"),
        (lambda a, k: k.update(dilation=(1, 0)), ValueError, r"dilation must be an int >= 1 or a tuple of 2"),
        (lambda a, k: k.update(groups=3), ValueError, r"groups"),
        (lambda a, k: k.update(eps=0.0), ValueError, r"eps must be a float > 0"),
        (lambda a, k: k.update(momentum=2.0), ValueError, r"momentum must be a float in \[0, 1\]"),
        (
            lambda a, k: (a.update(x=a["x"][:, :, :1, :1]), k.update(padding=0)),
            ValueError,
            r"x's spatial size \(1, 1\) is too small for the kernel \(3, 3\)",
        ),
        (
            lambda a, k: (
                a.update(x=a["x"][:1, :, :1, :1]),
                k.update(padding=0),
                a.update(weight=a["weight"][..., :1, :1]),
            ),
            ValueError,
            r"conv2d_bn_relu: expected more than 1 value per channel when training, got conv output of "
            r"shape \(1, 6, 1, 1\)",
        ),
    ],
    ids=[
        "x-rank",
        "x-5d",
        "weight-rank",
        "weight-cin",
        "weight-groups",
        "bn_weight",
        "stats-pair",
        "stats-dtype",
        "dtype-mix",
        "device",
        "stride",
        "padding",
        "padding-same",
        "dilation",
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
        mvfast.ops.conv2d_bn_relu(
            args.pop("x"),
            args.pop("weight"),
            args.pop("bias"),
            args.pop("bn_weight"),
            args.pop("bn_bias"),
            args.pop("running_mean"),
            args.pop("running_var"),
            **kw,
        )


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id == "triton"])
def test_a_backend_that_cannot_run_the_call_is_an_error(backend):
    """The Triton kernels take no float64: the error names the 2D op, the backend and the reason."""
    leaves, rm, rv, kw = sample_inputs(torch.float64, backend[1])
    with (
        mvfast.backend("triton"),
        pytest.raises(RuntimeError, match=r"mvfast\.conv2d_bn_relu: backend 'triton'.*float64"),
    ):
        mvfast.ops.conv2d_bn_relu(*leaves, rm, rv, **kw)
