"""The fused ops under torch.autocast (issue 12): every backend casts as designed, computes what the
float64 reference computes from the cast inputs, gives float32 parameters float32 gradients, and the
eager route, the custom op called directly and torch.compile agree; the model trains under autocast.

    conv3d_bn_relu, conv2d_bn_relu: x, weight, bias in autocast's dtype, the output in it; BatchNorm's
        parameters and running statistics float32.
    netvlad, attention_pool: x and every weight in autocast's dtype, float32 accumulation, the outputs in
        autocast's dtype.

On the CPU autocast runs bfloat16 (and float16); Triton's interpreter has no bfloat16, so the Triton
backend is tested in float16 only.
"""

import pytest
import torch
from backend_params import kernel_backends

import mvfast
from mvfast.ops import attention_pool, conv2d_bn_relu, conv3d_bn_relu, netvlad
from mvfast.ops.attention_pool import attention_pool_reference
from mvfast.ops.conv2d_bn_relu import conv2d_bn_relu_reference as conv2d_ref
from mvfast.ops.conv3d_bn_relu import conv3d_bn_relu_reference
from mvfast.ops.netvlad import netvlad_reference

LOW = {torch.bfloat16: 3e-2, torch.float16: 5e-3}  # error relative to the largest value


def backends():
    """(backend, device) params: reference on the CPU and every kernel backend, on its device: the CUDA
    ones (cuda, and triton on a GPU) are skipped with the reason where no GPU is visible, and run by
    benchmarks/gpu_check.py where one is."""
    return [pytest.param(("reference", "cpu"), id="reference"), *kernel_backends()]


def dtypes_for(backend, device="cpu"):
    if backend == "triton" and device == "cpu":
        # the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
        return [torch.float16]
    return [torch.bfloat16, torch.float16]


def cases():
    return [
        pytest.param(b.values[0], dt, id=f"{b.values[0][0]}-{str(dt)[6:]}", marks=b.marks)
        for b in backends()
        for dt in dtypes_for(*b.values[0])
    ]


# ---------------------------------------------------------------------------------------------------
# The ops, each as (inputs, public call, float64 reference on given inputs)


def _netvlad_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, M, D, K, G = 2, 9, 16, 4, 2
    x = torch.randn(B, M, D, generator=g)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 6:] = False
    params = [torch.randn(K + G, D, generator=g) * 0.3, torch.randn(K + G, generator=g) * 0.1,
              torch.randn(K, D, generator=g)]  # fmt: skip

    def public(x, w, b, c):
        return netvlad(x, w, b, c, mask.to(x.device), ghost_clusters=G)

    def reference(x, w, b, c):
        return netvlad_reference(x, w, b, c, mask.to(x.device), G)

    return x, params, public, reference


def _attention_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, D, H = 2, 9, 16, 2
    x = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 7:] = False
    params = [torch.randn(H, D, generator=g) * 0.5, torch.randn(H, generator=g)]

    def public(x, w, b):
        out, weights = attention_pool(x, w, b, mask.to(x.device), return_weights=True)
        return torch.cat([out.flatten(1), weights.flatten(1)], 1)

    def reference(x, w, b):
        out, weights = attention_pool_reference(x, w, b, mask.to(x.device), True)
        return torch.cat([out.flatten(1), weights.flatten(1)], 1)

    return x, params, public, reference


def _conv_case(nd, training, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, Cin, C = 2, 4, 6
    size = (4, 5, 6)[3 - nd :]
    x = torch.randn(N, Cin, *size, generator=g)
    w = torch.randn(C, Cin, *(3,) * nd, generator=g) * (Cin * 3**nd) ** -0.5
    params = [w, torch.randn(C, generator=g) * 0.1, torch.rand(C, generator=g) + 0.5,
              torch.randn(C, generator=g) * 0.3]  # fmt: skip
    stats = torch.randn(C, generator=g) * 0.2, torch.rand(C, generator=g) + 0.5
    fn, ref_fn = (conv3d_bn_relu, conv3d_bn_relu_reference) if nd == 3 else (conv2d_bn_relu, conv2d_ref)

    def public(x, w, b, gamma, beta):
        rm, rv = (s.to(x.device, copy=True) for s in stats)
        return fn(x, w, b, gamma, beta, rm, rv, padding=1, training=training)

    def reference(x, w, b, gamma, beta):
        rm, rv = (s.to(x.device, torch.float64) for s in stats)
        return ref_fn(x, w, b, gamma, beta, rm, rv, padding=1, training=training)

    return x, params, public, reference


OPS = {
    "netvlad": _netvlad_case,
    "attention_pool": _attention_case,
    "conv3d-train": lambda seed=0: _conv_case(3, True, seed),
    "conv3d-eval": lambda seed=0: _conv_case(3, False, seed),
    "conv2d-train": lambda seed=0: _conv_case(2, True, seed),
}
# which parameters autocast casts (the rest keep float32): the conv's weight and bias, not BatchNorm's
CAST = {"netvlad": 3, "attention_pool": 2, "conv3d-train": 2, "conv3d-eval": 2, "conv2d-train": 2}


def _close(got, ref, tol, what):
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale + 1e-6, f"{what}: max error {err:.3g} against {tol * scale:.3g}"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend, dtype", cases())
def test_autocast_casts_computes_and_backpropagates(op, backend, dtype):
    name, device = backend
    x, params, public, reference = OPS[op]()
    x = x.to(device).requires_grad_()
    params = [p.to(device).requires_grad_() for p in params]
    with mvfast.backend(name), torch.autocast(device, dtype=dtype):
        out = public(x, *params)
    assert out.dtype == dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(out.float(), [x, *params], g)

    # float64 reference on the inputs autocast casts, rounded to dtype first
    n = CAST[op]
    x64 = x.detach().to(dtype).double().requires_grad_()
    p64 = [(p.detach().to(dtype) if i < n else p.detach()).double() for i, p in enumerate(params)]
    p64 = [p.requires_grad_() for p in p64]
    ref = reference(x64, *p64)
    refs = torch.autograd.grad(ref, [x64, *p64], g.double())

    tol = LOW[dtype]
    _close(out, ref, tol, f"{op} output")
    for i, (got, want) in enumerate(zip(grads, refs, strict=True)):
        assert got.dtype == torch.float32, f"{op}: gradient {i} is {got.dtype}"
        if want.abs().max() < 1e-9:
            # a bias that cancels (attention's, the conv's in training): zero, as in float64, up to the
            # rounding of the weight's gradient (the kernels give exactly zero, the reference nearly)
            assert got.abs().max() <= 4 * tol * refs[1].abs().max(), f"{op} gradient {i}"
            continue
        _close(got, want, 4 * tol, f"{op} gradient {i}")


@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b.values[0][1] == "cpu"])
def test_eager_route_equals_custom_op(backend):
    """The public function (its eager route for cpu) and the custom op called directly under autocast, its
    Autocast kernel casting, give the same results."""
    name, _ = backend
    dtype = torch.float16 if name == "triton" else torch.bfloat16
    x, (w, b, c), _, _ = _netvlad_case()
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    with torch.autocast("cpu", dtype=dtype):
        with mvfast.backend(name):
            eager = netvlad(x, w, b, c, mask, ghost_clusters=2)
        direct = torch.ops.mvfast.netvlad(x, w, b, c, mask, 2, True, name)
    assert [t.dtype for t in direct] == [dtype, torch.float32, torch.float32]
    torch.testing.assert_close(eager, direct[0], rtol=0, atol=0)

    x, (w, a_b), _, _ = _attention_case()
    with torch.autocast("cpu", dtype=dtype):
        with mvfast.backend(name):
            eager = attention_pool(x, w, a_b, return_weights=True)
        direct = torch.ops.mvfast.attention_pool(x, w, a_b, None, True, name)
    assert [t.dtype for t in direct] == [dtype, dtype, torch.float32]
    torch.testing.assert_close(eager, direct[:2], rtol=0, atol=0)

    x, (w, cb, gamma, beta), _, _ = _conv_case(3, True)
    rm, rv = torch.zeros(6), torch.ones(6)
    args = (x, w, cb, gamma, beta, rm, rv, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, True, 1e-5, True)
    with torch.autocast("cpu", dtype=dtype):
        with mvfast.backend(name):
            eager = conv3d_bn_relu(x, w, cb, gamma, beta, rm.clone(), rv.clone(), padding=1, training=True)
        direct = torch.ops.mvfast.conv3d_bn_relu(*args, name == "cpu" and dtype == torch.bfloat16, name)
    assert direct[0].dtype == dtype and direct[2].dtype == torch.float32  # out, and the batch mean
    torch.testing.assert_close(eager, direct[0], rtol=0, atol=0)


@pytest.mark.parametrize("op", ["netvlad", "attention_pool", "conv3d-train"])
@pytest.mark.parametrize("backend", kernel_backends())
def test_backward_inside_autocast_equals_backward_outside(op, backend):
    """A training loop that calls backward inside its autocast region: the kernels' backward runs with
    autocast off, as their forward does, and gives the gradients a backward outside the region gives
    (NetVLAD's CPU backward raised a dtype error here while its products were autocast)."""
    name, device = backend
    dtype = dtypes_for(name, device)[0]

    def run(inside: bool):
        x, params, public, _ = OPS[op]()
        leaves = [x.to(device).requires_grad_(), *(p.to(device).requires_grad_() for p in params)]
        with mvfast.backend(name), torch.autocast(device, dtype=dtype):
            loss = public(*leaves).float().square().sum()
            if inside:
                return torch.autograd.grad(loss, leaves)
        return torch.autograd.grad(loss, leaves)

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_fullgraph_under_autocast():
    """torch.compile(fullgraph=True) of the public ops (cpu backend) and of the custom op called directly,
    under bfloat16 autocast: the same dtypes and values as eager."""
    x, (w, b, c), _, _ = _netvlad_case()
    xa, (wa, ba), _, _ = _attention_case()
    xc, (wc, cb, gamma, beta), _, _ = _conv_case(3, True)

    def block(x, w, b, c, xa, wa, ba, xc, wc, cb, gamma, beta):
        v = netvlad(x, w, b, c, ghost_clusters=2)
        a = attention_pool(xa, wa, ba)
        y = conv3d_bn_relu(xc, wc, cb, gamma, beta, None, None, padding=1, training=True)
        direct = torch.ops.mvfast.netvlad(x, w, b, c, None, 2, True, "cpu")[0]
        return v, a, y, direct

    args = (x, w, b, c, xa, wa, ba, xc, wc, cb, gamma, beta)
    compiled = torch.compile(block, fullgraph=True)
    with mvfast.backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        want = block(*args)
        got = compiled(*args)
    for g_, w_ in zip(got, want, strict=True):
        assert g_.dtype == torch.bfloat16
        torch.testing.assert_close(g_, w_, rtol=1e-2, atol=1e-2)


def test_model_trains_under_autocast():
    """The tiny model under bfloat16 autocast: finite logits close to float32's, and a backward that gives
    every parameter a finite float32 gradient (the ops are called directly, no autocast-off wrapper)."""
    from test_models import make_batch, model_of

    model = model_of("tiny").train()
    batch = make_batch(model.config, 3)
    torch.manual_seed(0)
    ref = model(batch)["logits"]
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        loss = model.loss(out, batch["label"])
    assert torch.isfinite(out["logits"]).all()
    assert (out["logits"].float() - ref).abs().max() < 0.25 * ref.abs().max() + 0.1
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
