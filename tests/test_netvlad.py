"""NetVLAD: the reference against the formulas, every backend against the float64 reference (forward and
all four gradients), gradcheck, opcheck, torch.compile, memory saved for backward, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from backend_params import kernel_backends

import mvfast
from mvfast.ops.netvlad import netvlad_math, netvlad_reference
from mvfast.utils import saved_bytes

LOW = (torch.float16, torch.bfloat16)


def sample_inputs(
    dtype=torch.float32,
    device="cpu",
    *,
    B=3,
    M=13,
    D=20,
    K=5,
    G=0,
    mask="some",
    bias=True,
    noncontig=False,
    seed=0,
):
    """(x, weight, bias, centroids, mask) with leaf tensors that require grad.

    mask: None, "some" (random gaps, every sample keeps at least one frame), "empty" (sample 1 has no
    valid frame). noncontig: x and weight as transposed views.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, D, generator=g)
    w = torch.randn(K + G, D, generator=g) * 0.3
    b = torch.randn(K + G, generator=g) * 0.5 if bias else None
    c = torch.randn(K, D, generator=g)
    m = None
    if mask is not None:
        m = torch.rand(B, M, generator=g) > 0.3
        m[:, 0] = True
        if mask == "empty":
            m[1] = False
        m = m.to(device)
    x, w, c = (t.to(device=device, dtype=dtype) for t in (x, w, c))
    b = b.to(device=device, dtype=dtype) if b is not None else None
    if noncontig:  # same values, as views with the last dimension strided
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        w = w.t().contiguous().t()
    return (*(t.requires_grad_() if t is not None else None for t in (x, w, b, c)), m)


def run(backend, x, w, b, c, m, G, normalize, grad_seed=1):
    """Output and the gradients of (x, weight, bias, centroids) for a fixed random upstream gradient."""
    with mvfast.backend(backend):
        y = mvfast.ops.netvlad(x, w, b, c, m, ghost_clusters=G, normalize=normalize)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    leaves = [t for t in (x, w, b, c) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, gy)]


def upcast(ts):
    """float64 copies on the CPU, leaves of their own."""
    return [
        t.detach().double().cpu().requires_grad_()
        if t is not None and t.is_floating_point()
        else (t.cpu() if t is not None else None)
        for t in ts
    ]


def math_in_dtype(x, w, b, c, m, G, normalize, grad_seed=1):
    """The formulas run by PyTorch in the inputs' own dtype: the error it makes sets the tolerance."""
    y = netvlad_math(x, w, b, c, m, G, normalize)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    leaves = [t for t in (x, w, b, c) if t is not None]
    return [y, *torch.autograd.grad(y, leaves, gy)]


# ---------------------------------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("G", [0, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_equals_explicit_residual_sum(G, normalize):
    """V[b,k] = sum_i a_ik (x_i - c_k), computed the slow way with the full B x M x K x D residuals."""
    x, w, b, c, m = sample_inputs(torch.float64, G=G)
    K = c.shape[0]
    a = torch.softmax(x @ w.t() + b, -1)[..., :K] * m.unsqueeze(-1)
    resid = x.unsqueeze(2) - c  # (B, M, K, D)
    v = (a.unsqueeze(-1) * resid).sum(1)  # (B, K, D)
    if normalize:
        v = F.normalize(F.normalize(v, dim=2).flatten(1), dim=1)
    torch.testing.assert_close(netvlad_reference(x, w, b, c, m, G, normalize), v, rtol=1e-12, atol=1e-12)


def test_mask_equals_truncation():
    """A masked tail gives exactly what the shorter sequence gives (variable-length batches)."""
    x, w, b, c, _ = sample_inputs(torch.float64, B=1, M=11, mask=None)
    m = torch.zeros(1, 11, dtype=torch.bool)
    m[0, :6] = True
    garbage = x.detach().clone()
    garbage[0, 6:] = 1e3  # masked values do not matter
    full = netvlad_reference(garbage, w, b, c, m)
    short = netvlad_reference(x[:, :6], w, b, c)
    torch.testing.assert_close(full, short)


def test_ghost_clusters_absorb_weight():
    x, w, b, c, _ = sample_inputs(torch.float64, G=3, mask=None)
    with torch.no_grad():
        b[-3:] = 5.0  # ghosts that attract most of the weight
    raw = netvlad_reference(x, w, b, c, None, 3, normalize=False)
    a = torch.softmax(x @ w.t() + b, -1)
    assert (a[..., :-3].sum(-1) < 0.5).all()
    expected = a[..., :-3].transpose(1, 2) @ x - a[..., :-3].sum(1).unsqueeze(-1) * c
    torch.testing.assert_close(raw, expected)


# ---------------------------------------------------------------------------------------------------
# Every backend against the float64 reference


def check_close(got, ref64, lowp, dtype, what):
    """flash-attention style: the kernel's error against float64 is at most about twice PyTorch's own
    error in that dtype, plus a small floor relative to the values' scale."""
    floor = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for name, g, r, l in zip(what, got, ref64, lowp, strict=True):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item()
        base = (l.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= 2 * base + floor * max(scale, 1e-3), (
            f"{name}: error {err:.3g} vs PyTorch's own {base:.3g} in {dtype} (scale {scale:.3g})"
        )


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(G=0, normalize=True),
        dict(G=2, normalize=True),
        dict(G=1, normalize=False),
        dict(G=0, normalize=True, mask=None),
        dict(G=2, normalize=True, bias=False),
        dict(G=1, normalize=True, noncontig=True),
        dict(G=0, normalize=True, B=2, M=1, D=7, K=1),
        dict(G=3, normalize=True, B=2, M=70, D=67, K=17),
        dict(G=1, normalize=True, B=9, M=131, D=40, K=6),
    ],
    ids=["plain", "ghost", "raw", "nomask", "nobias", "noncontig", "tiny", "odd", "batch"],
)
def test_backend_matches_reference(backend, dtype, case):
    name, device = backend
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not support bfloat16 (triton-lang/triton#11584)")
    case = dict(case)
    G, normalize = case.pop("G"), case.pop("normalize")
    inputs = sample_inputs(dtype, device, G=G, **case)
    if case.get("noncontig"):
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    got = run(name, *inputs, G, normalize)
    ref64 = run("reference", *upcast(inputs), G, normalize)
    lowp = math_in_dtype(*inputs, G, normalize)
    names = ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"]
    if inputs[2] is None:
        names.remove("grad_bias")
    check_close(got, [t.to(device) for t in ref64], lowp, dtype, names)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_all_masked_sample_gives_zeros(backend, dtype, normalize):
    name, device = backend
    x, w, b, c, m = sample_inputs(dtype, device, mask="empty", G=1)
    y, gx, gw, gb, gc = run(name, x, w, b, c, m, 1, normalize)
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert (y[0] != 0).any()
    for g in (gx, gw, gb, gc):
        assert torch.isfinite(g).all()
    assert (gx[1] == 0).all()


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("normalize", [True, False])
def test_no_features_give_empty_descriptors_and_zero_gradients(backend, normalize):
    """D = 0: the logits are the bias alone; the descriptor and every gradient are empty or zero. The
    Triton backward's bias gradient came from a buffer that no program writes at D = 0 (the dw grid has no
    D tiles): freed NaN memory is offered to it first."""
    name, device = backend
    x = torch.randn(2, 5, 0, device=device, requires_grad=True)
    w = torch.randn(4, 0, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    c = torch.randn(3, 0, device=device, requires_grad=True)
    poison = [torch.full((64, 4), float("nan"), device=device) for _ in range(4)]
    del poison  # memory full of NaN, for an allocator to hand back
    with mvfast.backend(name):
        y = mvfast.ops.netvlad(x, w, b, c, ghost_clusters=1, normalize=normalize)
    assert y.shape == ((2, 0) if normalize else (2, 3, 0))
    gx, gw, gb, gc = torch.autograd.grad(y.sum(), (x, w, b, c), allow_unused=True)
    assert gx.shape == x.shape and gw.shape == w.shape and gc.shape == c.shape
    assert gb is not None and torch.equal(gb, torch.zeros_like(b)), gb


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id == "cpu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_cpu_flows_agree(backend, normalize):
    """The CPU kernel streams each batch item through cache when there are at least two items per thread
    and runs the batched flow otherwise: both against float64, with M across several tiles."""
    x, w, b, c, m = sample_inputs(torch.float32, B=4, M=150, D=24, K=4, G=1, mask="empty")
    ref64 = run("reference", *upcast((x, w, b, c, m)), 1, normalize)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 4):  # 4 items: per item with one thread, batched with four
            torch.set_num_threads(n)
            results[n] = run("cpu", x, w, b, c, m, 1, normalize)
    finally:
        torch.set_num_threads(threads)
    for got in results.values():
        for g, r in zip(got, ref64, strict=True):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id in ("cpu", "cuda")])
@pytest.mark.parametrize("G", [0, 2])
def test_raw_ops_reject_no_clusters(backend, G):
    """K = 0 reaches only the raw ops (the public op rejects it). They reject it too, naming centroids: with
    K + G = 0 the CPU softmax read the first logit of an empty row (a segfault)."""
    name, device = backend
    x = torch.randn(2, 5, 4, device=device)
    w, c = torch.randn(G, 4, device=device), torch.empty(0, 4, device=device)
    pattern = r"centroids must hold at least one cluster \(K >= 1\), got \[0, 4\]"
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mvfast.netvlad_fwd(x, w, None, c, None, G, True)
    assign, vlad = torch.zeros(2, 5, G, device=device), torch.zeros(2, 0, 4, device=device)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mvfast.netvlad_bwd(torch.zeros(2, 0, device=device), x, w, c, assign, vlad, None, G, True)


def test_backend_bfloat16_on_reference_runs_in_float32():
    x, w, b, c, m = sample_inputs(torch.bfloat16)
    y = mvfast.ops.netvlad(x, w, b, c, m)
    assert y.dtype == torch.bfloat16
    y32 = netvlad_reference(
        *(t.float() if t is not None and t.is_floating_point() else t for t in (x, w, b, c)), m
    )
    torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile


def _gradcheck_backends():
    return ["reference"] + [p for p in kernel_backends() if p.id == "cpu"]


@pytest.mark.parametrize("backend", _gradcheck_backends(), ids=lambda p: p if isinstance(p, str) else p[0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G,normalize,mask", [(0, True, "some"), (2, True, "empty"), (1, False, "some")])
def test_gradcheck_float64(backend, seed, G, normalize, mask):
    name = backend if isinstance(backend, str) else backend[0]
    x, w, b, c, m = sample_inputs(torch.float64, B=2, M=5, D=4, K=3, G=G, mask=mask, seed=seed)

    def f(x, w, b, c):
        with mvfast.backend(name):
            return mvfast.ops.netvlad(x, w, b, c, m, ghost_clusters=G, normalize=normalize)

    assert torch.autograd.gradcheck(f, (x, w, b, c), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(backend, normalize):
    name, device = backend
    x, w, b, c, m = sample_inputs(torch.float32, device, G=1)
    torch.library.opcheck(torch.ops.mvfast.netvlad.default, (x, w, b, c, m, 1, normalize, name))
    torch.library.opcheck(torch.ops.mvfast.netvlad.default, (x, w, None, c, None, 1, normalize, name))


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck_backward_and_compiled_kernels(backend):
    name, device = backend
    x, w, b, c, m = sample_inputs(torch.float32, device, G=1)
    out, assign, vlad = torch.ops.mvfast.netvlad(x, w, b, c, m, 1, True, name)
    gy = torch.randn_like(out)
    args = (gy, x.detach(), w.detach(), c.detach(), assign, vlad, m, 1, True)
    torch.library.opcheck(torch.ops.mvfast.netvlad_backward.default, (*args, name))
    if name != "triton":
        torch.library.opcheck(
            torch.ops.mvfast.netvlad_fwd.default, (x.detach(), w.detach(), b.detach(), c.detach(), m, 1, True)
        )
        torch.library.opcheck(torch.ops.mvfast.netvlad_bwd.default, args)


@pytest.mark.parametrize(
    "backend", ["reference"] + kernel_backends(), ids=lambda p: p if isinstance(p, str) else p[0]
)
def test_compile_fullgraph_module(backend):
    name, device = (backend, "cpu") if isinstance(backend, str) else backend
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = mvfast.nn.NetVLAD(20, 5, ghost_clusters=1).to(device)
    x, _, _, _, m = sample_inputs(torch.float32, device)
    with mvfast.backend(name):
        eager = module(x, m)
        (ge,) = torch.autograd.grad(eager.square().sum(), [module.centroids])
        compiled = torch.compile(module, fullgraph=True)
        y = compiled(x, m)
        (gc,) = torch.autograd.grad(y.square().sum(), [module.centroids])
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Memory: what is saved for backward


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("normalize", [True, False])
def test_saves_less_than_eager_for_backward(backend, normalize):
    name, device = backend
    x, w, b, c, m = sample_inputs(torch.float32, device, B=4, M=40, D=64, K=8, G=0)

    def call(be):
        return lambda: run_forward(be, x, w, b, c, m, normalize)

    ours, eager = saved_bytes(call(name)), saved_bytes(call("reference"))
    x_bytes = x.numel() * x.element_size()
    assert ours <= eager, f"{name} saves {ours} bytes, eager {eager}"
    # x itself plus O(B*M*K + B*K*D + params): nothing else of size B*M*D
    assert ours < 1.5 * x_bytes + 4 * (4 * 40 * 8 + 4 * 8 * 64) + 2 * 4 * (8 * 64 + 8 * 64 + 8)


def run_forward(backend, x, w, b, c, m, normalize):
    with mvfast.backend(backend):
        return mvfast.ops.netvlad(x, w, b, c, m, normalize=normalize)


# ---------------------------------------------------------------------------------------------------
# Module


def test_module_shapes_state_dict_and_repr():
    m = mvfast.nn.NetVLAD(16, 4, ghost_clusters=2)
    assert set(m.state_dict()) == {"weight", "bias", "centroids"}
    assert m.weight.shape == (6, 16) and m.centroids.shape == (4, 16) and m.output_dim == 64
    assert m(torch.randn(2, 9, 16)).shape == (2, 64)
    assert mvfast.nn.NetVLAD(16, 4, normalize=False)(torch.randn(2, 9, 16)).shape == (2, 4, 16)
    assert "ghost_clusters=2" in repr(m)
    with pytest.raises(ValueError, match="clusters"):
        mvfast.nn.NetVLAD(16, 0)


def test_init_from_data_finds_the_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 4
    labels = torch.randint(4, (3000,), generator=g)
    feats = centres[labels] + 0.2 * torch.randn(3000, 8, generator=g)
    m = mvfast.nn.NetVLAD(8, 4, ghost_clusters=1).init_from_data(feats.view(30, 100, 8), generator=g)
    # every true centre has a learned centroid next to it
    assert torch.cdist(centres, m.centroids.detach()).min(1).values.max() < 0.2
    # and the soft assignment puts each feature on its own cluster
    with torch.no_grad():
        a = torch.softmax(feats @ m.weight.t() + m.bias, -1)[:, :4]
        own = torch.cdist(centres, m.centroids).argmin(1)[labels]
    assert (a.argmax(1) == own).float().mean() > 0.99
    assert a.max(1).values.mean() > 0.9


def test_init_from_data_rejects_bad_input():
    m = mvfast.nn.NetVLAD(8, 4)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        m.init_from_data(torch.randn(100, 7))
    with pytest.raises(ValueError, match="at least clusters=4"):
        m.init_from_data(torch.randn(3, 8))


# ---------------------------------------------------------------------------------------------------
# Bad input


def _good():
    return sample_inputs(torch.float32, G=1)


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (lambda a: a.update(x=a["x"][0]), ValueError, r"x must have 3 dimensions, got shape \(13, 20\)"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, r"weight must have shape \(6, 20\)"),
        (
            lambda a: a.update(centroids=a["centroids"][:, :-1]),
            ValueError,
            r"centroids must have shape \(5, 20\)",
        ),
        (
            lambda a: a.update(weight=a["weight"][:-1]),
            ValueError,
            r"weight must have shape \(6, 20\), got \(5, 20\)",
        ),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must have shape \(6\)"),
        (lambda a: a.update(mask=a["mask"][:, :-1]), ValueError, r"mask must have shape \(3, 13\)"),
        (lambda a: a.update(mask=a["mask"].float()), TypeError, r"mask must have dtype bool; got float32"),
        (lambda a: a.update(x=a["x"].double()), TypeError, r"weight must have the dtype of x \(float64\)"),
        (lambda a: a.update(x=a["x"].long()), TypeError, r"x must have dtype"),
        (
            lambda a: a.update(centroids=a["centroids"].to("meta")),
            ValueError,
            r"centroids is on meta but x is on cpu",
        ),
        (lambda a: a.update(ghost_clusters=-1), ValueError, r"ghost_clusters must be a non-negative int"),
    ],
    ids=[
        "x-rank",
        "weight-D",
        "centroids-D",
        "weight-K",
        "bias",
        "mask-shape",
        "mask-dtype",
        "dtype-mix",
        "x-int",
        "device",
        "ghosts",
    ],
)
def test_bad_input_names_the_argument(change, exc, pattern):
    x, w, b, c, m = _good()
    args = dict(x=x, weight=w, bias=b, centroids=c, mask=m, ghost_clusters=1)
    change(args)
    with pytest.raises(exc, match=pattern):
        mvfast.ops.netvlad(
            args.pop("x"),
            args.pop("weight"),
            args.pop("bias"),
            args.pop("centroids"),
            args.pop("mask"),
            **args,
        )


@pytest.mark.parametrize("backend", kernel_backends())
def test_no_grad_calls_match_autograd_calls(backend):
    """Eager calls of the compiled kernels skip the custom op (mvfast.ops._op): under torch.no_grad the
    kernel op alone, with a gradient an autograd.Function with the op's own backward. Both give what the
    custom op gives."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 10, generator=g).to(device)
    w, c = (torch.randn(6, 10, generator=g).to(device) for _ in range(2))
    b = torch.randn(6, generator=g).to(device)
    mask = torch.ones(3, 7, dtype=torch.bool, device=device)
    mask[1, 4:] = False
    leaves = [t.clone().requires_grad_() for t in (x, w, b, c[:4])]
    with mvfast.backend(name):
        with torch.no_grad():
            plain = mvfast.ops.netvlad(x, w, b, c[:4], mask, ghost_clusters=2)
        out = mvfast.ops.netvlad(*leaves, mask, ghost_clusters=2)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        # the custom op itself, as torch.compile calls it
        via_op = torch.ops.mvfast.netvlad(*leaves, mask, 2, True, name)[0]
        grads_op = torch.autograd.grad(via_op.square().sum(), leaves)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, out.detach(), rtol=0, atol=0)
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
    w = torch.randn(4, 8, generator=g).to(device).requires_grad_()
    c = torch.randn(4, 8, generator=g).to(device).requires_grad_()
    with mvfast.backend(name):
        (gx,) = torch.autograd.grad(mvfast.ops.netvlad(x, w, None, c).square().sum(), [x], create_graph=True)
        with pytest.raises(RuntimeError, match="netvlad"):
            torch.autograd.grad(gx.square().sum(), [w])


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented")
@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id == "cpu"])
def test_vmap_matches_a_loop(backend):
    """torch.func.vmap over the op with parameters that require grad (the eager autograd.Function route)."""
    if torch.__version__ < (2, 7):
        pytest.skip(
            f"torch {torch.__version__}: torch.func's generated vmap rule fails in the backward, passing a "
            "None among the batched arguments to _add_batch_dim (2.4, 2.5 and 2.6; 2.7 passes)"
        )
    name, device = backend
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, 2, 5, 8, generator=g)
    w = torch.randn(4, 8, generator=g).requires_grad_()
    c = torch.randn(4, 8, generator=g).requires_grad_()
    with mvfast.backend(name):
        batched = torch.func.vmap(lambda x: mvfast.ops.netvlad(x, w, None, c))(xs)
        looped = torch.stack([mvfast.ops.netvlad(x, w, None, c) for x in xs])
    torch.testing.assert_close(batched, looped)
    gb = torch.autograd.grad(batched.square().sum(), [w, c])
    gl = torch.autograd.grad(looped.square().sum(), [w, c])
    for a, b in zip(gb, gl, strict=True):
        torch.testing.assert_close(a, b)
