"""Attention pooling: the reference against the formulas, every backend against the float64 reference
(forward, weights and gradients), gradcheck, opcheck, torch.compile, memory saved for backward, and bad
input."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from backend_params import kernel_backends

import mvfast
from mvfast.ops.attention_pool import attention_pool_math, attention_pool_reference
from mvfast.utils import saved_bytes


def sample_inputs(
    dtype=torch.float32,
    device="cpu",
    *,
    B=3,
    L=13,
    D=20,
    H=1,
    mask="some",
    bias=True,
    noncontig=False,
    seed=0,
):
    """(x, weight, bias, mask) with leaf tensors that require grad.

    mask: None, "some" (random gaps, every sample keeps at least one position), "empty" (sample 1 has
    no valid position). noncontig: x and weight as transposed views.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    w = torch.randn(H, D, generator=g) * 0.3
    b = torch.randn(H, generator=g) * 0.5 if bias else None
    m = None
    if mask is not None:
        m = torch.rand(B, L, generator=g) > 0.3
        m[:, 0] = True
        if mask == "empty":
            m[1] = False
        m = m.to(device)
    x, w = (t.to(device=device, dtype=dtype) for t in (x, w))
    b = b.to(device=device, dtype=dtype) if b is not None else None
    if noncontig:  # same values, as views with the last dimension strided
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        w = w.t().contiguous().t()
    return (*(t.requires_grad_() if t is not None else None for t in (x, w, b)), m)


def _grads(out, a, leaves, grad_seed):
    """Gradients of a fixed random linear function of out (and of the weights a when given)."""
    g = torch.Generator().manual_seed(grad_seed)
    loss = (out * torch.randn(out.shape, generator=g).to(out)).sum()
    if a is not None:
        loss = loss + (a * torch.randn(a.shape, generator=g).to(a)).sum()
    return list(torch.autograd.grad(loss, leaves))


def run(backend, x, w, b, m, return_weights=False, grad_seed=1):
    """[out, (weights,) grad_x, grad_weight, (grad_bias)]."""
    with mvfast.backend(backend):
        y = mvfast.ops.attention_pool(x, w, b, m, return_weights=return_weights)
    out, a = y if return_weights else (y, None)
    leaves = [t for t in (x, w, b) if t is not None]
    return [out] + ([a] if return_weights else []) + _grads(out, a, leaves, grad_seed)


def upcast(ts):
    """float64 copies on the CPU, leaves of their own."""
    return [
        t.detach().double().cpu().requires_grad_()
        if t is not None and t.is_floating_point()
        else (t.cpu() if t is not None else None)
        for t in ts
    ]


def math_in_dtype(x, w, b, m, return_weights=False, grad_seed=1):
    """The formulas run by PyTorch in the inputs' own dtype: the error it makes sets the tolerance."""
    out, a = attention_pool_math(x, w, b, m)
    leaves = [t for t in (x, w, b) if t is not None]
    a = a if return_weights else None
    return [out] + ([a] if return_weights else []) + _grads(out, a, leaves, grad_seed)


def names_for(return_weights, bias):
    return (
        ["out"]
        + (["weights"] if return_weights else [])
        + ["grad_x", "grad_weight"]
        + (["grad_bias"] if bias else [])
    )


# ---------------------------------------------------------------------------------------------------
# The reference itself


def test_reference_equals_explicit_softmax():
    x, w, b, m = sample_inputs(torch.float64, H=3)
    out, a = attention_pool_reference(x, w, b, m, return_weights=True)
    for i in range(x.shape[0]):
        xi = x[i][m[i]]  # (valid, D)
        ai = torch.softmax(xi @ w.t() + b, dim=0)  # (valid, H)
        torch.testing.assert_close(out[i], ai.t() @ xi, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[i][m[i]], ai, rtol=1e-12, atol=1e-12)
        assert (a[i][~m[i]] == 0).all()
    torch.testing.assert_close(a.sum(1), torch.ones(3, 3, dtype=torch.float64))


def test_mask_equals_truncation_and_bias_cancels():
    x, w, b, _ = sample_inputs(torch.float64, B=1, L=11, H=2, mask=None)
    m = torch.zeros(1, 11, dtype=torch.bool)
    m[0, :6] = True
    garbage = x.detach().clone()
    garbage[0, 6:] = 1e3  # masked values do not matter
    full = attention_pool_reference(garbage, w, b, m)
    short = attention_pool_reference(x[:, :6], w, None)
    torch.testing.assert_close(full, short)


def test_reference_all_masked_gives_zeros_and_finite_gradients():
    x, w, b, m = sample_inputs(torch.float64, mask="empty", H=2)
    out, a, gx, gw, gb = run("reference", x, w, b, m, return_weights=True)
    assert (out[1] == 0).all() and (a[1] == 0).all() and (gx[1] == 0).all()
    assert all(torch.isfinite(t).all() for t in (out, a, gx, gw, gb))
    assert gb.abs().max() < 1e-12  # the bias cancels


# ---------------------------------------------------------------------------------------------------
# Every backend against the float64 reference


def check_close(got, ref64, lowp, dtype, what):
    """flash-attention style: the kernel's error against float64 is at most about twice PyTorch's own
    error in that dtype, plus a small floor relative to the values' scale (at least 1, the inputs' scale:
    a gradient that is zero analytically, as grad_weight at L = 1, is only zero up to rounding)."""
    floor = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert len(got) == len(ref64) == len(lowp) == len(what)
    for name, g, r, l in zip(what, got, ref64, lowp, strict=True):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item()
        base = (l.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= 2 * base + floor * max(scale, 1.0), (
            f"{name}: error {err:.3g} vs PyTorch's own {base:.3g} in {dtype} (scale {scale:.3g})"
        )


CASES = {
    "plain": dict(),
    "heads": dict(H=3, return_weights=True),
    "nomask": dict(mask=None, H=2),
    "nobias": dict(bias=False, return_weights=True),
    "noncontig": dict(noncontig=True, H=2),
    "single": dict(B=2, L=1, D=7, H=2, return_weights=True),  # L = 1: the weight is 1
    "odd": dict(B=2, L=70, D=67, H=5, return_weights=True),
    "long": dict(B=1, L=700, D=9, H=2),  # several splits of the rows per sample
}


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference(backend, dtype, case):
    name, device = backend
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not support bfloat16 (triton-lang/triton#11584)")
    kw = dict(CASES[case])
    rw = kw.pop("return_weights", False)
    inputs = sample_inputs(dtype, device, **kw)
    if kw.get("noncontig"):
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    got = run(name, *inputs, return_weights=rw)
    ref64 = run("reference", *upcast(inputs), return_weights=rw)
    lowp = math_in_dtype(*inputs, return_weights=rw)
    check_close(got, [t.to(device) for t in ref64], lowp, dtype, names_for(rw, inputs[2] is not None))


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_all_masked_sample_gives_zeros(backend, dtype):
    name, device = backend
    x, w, b, m = sample_inputs(dtype, device, mask="empty", H=2)
    out, a, gx, gw, gb = run(name, x, w, b, m, return_weights=True)
    assert (out[1] == 0).all() and (a[1] == 0).all() and (gx[1] == 0).all()
    assert (out[0] != 0).any()
    assert all(torch.isfinite(t).all() for t in (out, a, gx, gw))
    assert (gb == 0).all()  # exactly: the bias cancels in the softmax


@pytest.mark.parametrize("backend", kernel_backends())
def test_weights_sum_to_one_and_masked_are_zero(backend):
    name, device = backend
    x, w, b, m = sample_inputs(torch.float32, device, H=3)
    with mvfast.backend(name):
        _, a = mvfast.ops.attention_pool(x, w, b, m, return_weights=True)
    torch.testing.assert_close(a.sum(1), torch.ones(3, 3, device=device))
    assert (a[~m] == 0).all()


def test_long_set_on_the_cpu_kernel():
    """L in the thousands, cut into several splits per sample."""
    if not mvfast.backends("cpu")["cpu"]["available"]:
        pytest.skip(mvfast.backends("cpu")["cpu"]["reason"])
    x, w, b, m = sample_inputs(torch.float32, B=2, L=3000, D=24, H=2)
    got = run("cpu", x, w, b, m, return_weights=True)
    ref64 = run("reference", *upcast((x, w, b, m)), return_weights=True)
    lowp = math_in_dtype(x, w, b, m, return_weights=True)
    check_close(got, ref64, lowp, torch.float32, names_for(True, True))


@contextlib.contextmanager
def _threads(n):
    """torch's intra-op threads set to n in a with-block (the CPU kernel cuts a sample into more splits
    with more threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_many_heads_at_batch_1_with_the_splits_capped():
    """With 64 threads a sample of 8192 rows would be cut into 128 splits, each holding an (H, D) partial
    sum: at H = 128 that is twice x. The splits are capped at ceil(L / H) = 64, and the result is right."""
    if not mvfast.backends("cpu")["cpu"]["available"]:
        pytest.skip(mvfast.backends("cpu")["cpu"]["reason"])
    x, w, b, m = sample_inputs(torch.float32, B=1, L=8192, D=16, H=128)
    with _threads(64):
        got = run("cpu", x, w, b, m, return_weights=True)
    ref64 = run("reference", *upcast((x, w, b, m)), return_weights=True)
    lowp = math_in_dtype(x, w, b, m, return_weights=True)
    check_close(got, ref64, lowp, torch.float32, names_for(True, True))


# The peak resident memory of this process's memory map (VmHWM; ru_maxrss would also count what the forked
# pytest process held before the exec).
PEAK = """
import re, torch, mvfast
def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", f.read()).group(1))
torch.set_num_threads(64)
x, w = torch.randn(1, 16384, 256), torch.randn(256, 256) * 0.05
with mvfast.backend("cpu"):
    mvfast.ops.attention_pool(x[:, :64], w)  # the thread pool and the op, before the peak is read
    before = peak_kib()
    mvfast.ops.attention_pool(x, w)
print(peak_kib() - before)
"""


def test_many_heads_at_batch_1_allocate_about_x_not_many_times_it():
    """B = 1, L = 16384, D = 256, H = 256 with 64 threads: uncapped, the forward's 256 splits would hold a
    (256, 256) float32 partial sum each, 64 MiB (4x the 16 MiB x); capped at 64 splits they hold 16 MiB.
    The peak resident memory of the call, in a fresh process, stays under 2x x."""
    if not mvfast.backends("cpu")["cpu"]["available"]:
        pytest.skip(mvfast.backends("cpu")["cpu"]["reason"])
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak resident memory from /proc/self/status (Linux)")
    p = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    grown_mib = int(p.stdout.split()[-1]) / 1024
    assert grown_mib < 32, f"the call grew the peak resident memory by {grown_mib:.1f} MiB (x is 16 MiB)"


def _compiled_backends():
    """The backends of the compiled kernels (the raw mvfast::attention_pool_fwd/_bwd ops): cpu, and cuda."""
    return [p for p in kernel_backends() if p.id in ("cpu", "cuda")]


@pytest.mark.parametrize("backend", _compiled_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("H", [40, 130, 512])
def test_many_heads_on_the_compiled_kernels(backend, dtype, H):
    """More heads than the Triton kernels take (16), up to the CUDA kernels' 512: their shared-memory tile
    holds fewer rows as H grows (32 rows at 40 heads, 15 at 130, 4 at 512, fewer rows than the block has
    warps), over L = 300 rows in several tiles and, on a GPU, three splits of 100 rows (ragged against the
    tile) at 40 and 130 heads, one at 512 (the splits are capped at ceil(L / H))."""
    name, device = backend
    inputs = sample_inputs(dtype, device, B=2, L=300, D=33, H=H)
    got = run(name, *inputs, return_weights=True)
    ref64 = run("reference", *upcast(inputs), return_weights=True)
    lowp = math_in_dtype(*inputs, return_weights=True)
    check_close(got, [t.to(device) for t in ref64], lowp, dtype, names_for(True, True))


@pytest.mark.parametrize("backend", _compiled_backends())
def test_raw_ops_reject_no_heads(backend):
    """H = 0 reaches only the raw ops (the public op rejects it). They reject it too, naming weight: the CPU
    backward indexed an empty row of weights (a segfault) and the CUDA launchers divided by H."""
    name, device = backend
    x = torch.randn(2, 5, 4, device=device)
    w = torch.empty(0, 4, device=device)
    with pytest.raises(RuntimeError, match=r"weight must hold at least one head \(H >= 1\), got \[0, 4\]"):
        torch.ops.mvfast.attention_pool_fwd(x, w, None, True)
    out, lse = torch.zeros(2, 0, 4, device=device), torch.zeros(2, 0, device=device)
    with pytest.raises(RuntimeError, match=r"weight must hold at least one head"):
        torch.ops.mvfast.attention_pool_bwd(out, None, x, w, None, out, lse, None)


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile


def _gradcheck_backends():
    return ["reference"] + [p for p in kernel_backends() if p.id == "cpu"]


@pytest.mark.parametrize("backend", _gradcheck_backends(), ids=lambda p: p if isinstance(p, str) else p[0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("H,mask,return_weights", [(1, "some", False), (2, "empty", True), (3, None, True)])
def test_gradcheck_float64(backend, seed, H, mask, return_weights):
    name = backend if isinstance(backend, str) else backend[0]
    x, w, b, m = sample_inputs(torch.float64, B=2, L=5, D=4, H=H, mask=mask, seed=seed)

    def f(x, w, b):
        with mvfast.backend(name):
            return mvfast.ops.attention_pool(x, w, b, m, return_weights=return_weights)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", _gradcheck_backends(), ids=lambda p: p if isinstance(p, str) else p[0])
@pytest.mark.parametrize("used", [0, 1], ids=["out-only", "weights-only"])
def test_gradcheck_one_output_used(backend, used):
    """return_weights=True and a loss of one output only: the other output's gradient is undefined (not
    materialised as zeros), and the gradients are those through the one used (gradcheck also runs the
    backward with every gradient undefined)."""
    name = backend if isinstance(backend, str) else backend[0]
    x, w, b, m = sample_inputs(torch.float64, B=2, L=5, D=4, H=2, mask="some", seed=0)

    def f(x, w, b):
        with mvfast.backend(name):
            return mvfast.ops.attention_pool(x, w, b, m, return_weights=True)[used]

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("used", [0, 1], ids=["out-only", "weights-only"])
def test_one_output_used_matches_reference(backend, used):
    """Every kernel backend, one of the two outputs in the loss: the gradients equal the reference's."""
    name, device = backend
    x, w, b, m = sample_inputs(torch.float32, device, H=2)
    grads = []
    for impl in ("reference", name):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        with mvfast.backend(impl):
            y = mvfast.ops.attention_pool(*leaves, b, m, return_weights=True)[used]
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        grads.append(torch.autograd.grad(y, leaves, g))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("return_weights", [False, True])
def test_opcheck(backend, return_weights):
    name, device = backend
    x, w, b, m = sample_inputs(torch.float32, device, H=2)
    torch.library.opcheck(torch.ops.mvfast.attention_pool.default, (x, w, b, m, return_weights, name))
    torch.library.opcheck(torch.ops.mvfast.attention_pool.default, (x, w, None, None, return_weights, name))


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_backward_and_compiled_kernels(backend):
    name, device = backend
    x, w, b, m = sample_inputs(torch.float32, device, H=2)
    x, w = x.detach(), w.detach()
    out, a, lse = torch.ops.mvfast.attention_pool(x, w, None, m, True, name)
    gy, ga = torch.randn_like(out), torch.randn_like(a)
    for args in ((gy, ga, x, w, m, out, lse, a), (gy, None, x, w, None, out, lse, None)):
        torch.library.opcheck(torch.ops.mvfast.attention_pool_backward.default, (*args, name))
        if name != "triton":
            torch.library.opcheck(torch.ops.mvfast.attention_pool_bwd.default, args)
    if name != "triton":
        torch.library.opcheck(torch.ops.mvfast.attention_pool_fwd.default, (x, w, m, True))
        torch.library.opcheck(torch.ops.mvfast.attention_pool_fwd.default, (x, w, None, False))


@pytest.mark.parametrize(
    "backend", ["reference"] + kernel_backends(), ids=lambda p: p if isinstance(p, str) else p[0]
)
def test_compile_fullgraph_module(backend):
    name, device = (backend, "cpu") if isinstance(backend, str) else backend
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = mvfast.nn.AttentionPool(20, heads=2).to(device)
    with torch.no_grad():
        module.weight.normal_(std=0.3)
    x, _, _, m = sample_inputs(torch.float32, device)

    def loss(y, a):
        return y.square().sum() + (a * torch.arange(a.shape[1], device=device).view(1, -1, 1)).sum()

    with mvfast.backend(name):
        eager = module(x, m, return_weights=True)
        (ge,) = torch.autograd.grad(loss(*eager), [module.weight])
        compiled = torch.compile(module, fullgraph=True)
        y = compiled(x, m, return_weights=True)
        (gc,) = torch.autograd.grad(loss(*y), [module.weight])
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Memory: what is saved for backward


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_saves_only_x_and_small_tensors_for_backward(backend, dtype):
    name, device = backend
    B, L, D, H = 4, 40, 64, 2
    x, w, b, m = sample_inputs(dtype, device, B=B, L=L, D=D, H=H)

    def call(be):
        def f():
            with mvfast.backend(be):
                return mvfast.ops.attention_pool(x, w, b, m)

        return f

    ours, eager = saved_bytes(call(name)), saved_bytes(call("reference"))
    x_bytes = x.numel() * x.element_size()
    assert ours < eager, f"{name} saves {ours} bytes, eager {eager}"
    # x, then weight (H, D), mask (B, L), out (B, H, D) and the float32 lse (B, H): nothing else of B*L*D
    small = H * D * x.element_size() + B * L + B * H * D * x.element_size() + 4 * B * H
    assert ours <= x_bytes + small, f"{name} saves {ours} bytes; x is {x_bytes}, the rest may be {small}"


# ---------------------------------------------------------------------------------------------------
# Module


def test_module_starts_as_the_mean_of_the_valid_features():
    pool = mvfast.nn.AttentionPool(16, heads=3)
    assert set(pool.state_dict()) == {"weight"} and pool.weight.shape == (3, 16) and pool.output_dim == 48
    x = torch.randn(2, 9, 16)
    m = torch.ones(2, 9, dtype=torch.bool)
    m[1, 4:] = False
    y, a = pool(x, m, return_weights=True)
    assert y.shape == (2, 3, 16) and a.shape == (2, 9, 3)
    torch.testing.assert_close(y[1, 0], x[1, :4].mean(0))  # eq. 12, the uniform special case
    assert "heads=3" in repr(pool)
    with pytest.raises(ValueError, match="heads"):
        mvfast.nn.AttentionPool(16, heads=0)


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, r"x must have 3 dimensions, got shape \(13, 20\)"),
        (
            lambda a: a.update(weight=a["weight"][:, :-1]),
            ValueError,
            r"weight must have shape \(2, 20\), got \(2, 19\)",
        ),
        (lambda a: a.update(weight=a["weight"][0]), ValueError, r"weight must have 2 dimensions"),
        (lambda a: a.update(weight=a["weight"][:0]), ValueError, r"weight must hold at least one head"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must have shape \(2\), got \(1\)"),
        (lambda a: a.update(mask=a["mask"][:, :-1]), ValueError, r"mask must have shape \(3, 13\)"),
        (lambda a: a.update(mask=a["mask"].float()), TypeError, r"mask must have dtype bool; got float32"),
        (lambda a: a.update(x=a["x"].double()), TypeError, r"weight must have the dtype of x \(float64\)"),
        (lambda a: a.update(x=a["x"].long()), TypeError, r"x must have dtype"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, r"weight is on meta but x is on cpu"),
    ],
    ids=[
        "x-rank",
        "weight-D",
        "weight-rank",
        "no-heads",
        "bias",
        "mask-shape",
        "mask-dtype",
        "dtype-mix",
        "x-int",
        "device",
    ],
)
def test_bad_input_names_the_argument(change, exc, pattern):
    x, w, b, m = sample_inputs(torch.float32, H=2)
    args = dict(x=x, weight=w, bias=b, mask=m)
    change(args)
    with pytest.raises(exc, match=pattern):
        mvfast.ops.attention_pool(args.pop("x"), args.pop("weight"), args.pop("bias"), args.pop("mask"))


@pytest.mark.parametrize("backend", kernel_backends())
def test_no_grad_calls_match_autograd_calls(backend):
    """Eager calls of the compiled kernels skip the custom op (mvfast.ops._op): under torch.no_grad the
    kernel op alone, with a gradient an autograd.Function with the op's own backward. Both give what the
    custom op gives, weights and their gradient included."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 8, generator=g).to(device)
    w = torch.randn(2, 8, generator=g).to(device)
    mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    mask[2, 5:] = False
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    with mvfast.backend(name):
        with torch.no_grad():
            plain, plain_w = mvfast.ops.attention_pool(x, w, mask=mask, return_weights=True)
        out, weights = mvfast.ops.attention_pool(*leaves, mask=mask, return_weights=True)
        grads = torch.autograd.grad(out.square().sum() + weights[:, 0].sum(), leaves)
        via_op, via_w, _ = torch.ops.mvfast.attention_pool(*leaves, None, mask, True, name)
        grads_op = torch.autograd.grad(via_op.square().sum() + via_w[:, 0].sum(), leaves)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(plain_w, weights.detach(), rtol=0, atol=0)
    torch.testing.assert_close(via_op, out, rtol=0, atol=0)
    for a, r in zip(grads, grads_op, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("backend", kernel_backends())
def test_second_derivative_is_an_error(backend):
    """The kernels' backward is not differentiable: backpropagating through a graph recorded by
    create_graph=True must fail loudly, not drop the kernels' part of the second derivative."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=g).to(device).requires_grad_()
    w = torch.randn(1, 8, generator=g).to(device).requires_grad_()
    with mvfast.backend(name):
        (gx,) = torch.autograd.grad(mvfast.ops.attention_pool(x, w).square().sum(), [x], create_graph=True)
        with pytest.raises(RuntimeError, match="attention_pool"):
            torch.autograd.grad(gx.square().sum(), [w])
