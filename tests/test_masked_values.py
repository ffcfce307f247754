"""Masked positions and empty sequences, on every backend (DESIGN.md, "exact semantics").

A masked position's value never reaches the output or any gradient, whatever it holds: padding made with
``torch.empty`` or a feature extractor that emits NaN on blank frames must give exactly what zeros there
give. An empty sequence (M = 0 for netvlad, L = 0 for attention pooling) gives zeros and zero gradients on
every backend alike.
"""

import math

import pytest
import torch
from backend_params import kernel_backends

import mvfast

BACKENDS = [pytest.param(("reference", "cpu"), id="reference"), *kernel_backends()]
FILLS = [math.nan, math.inf, -math.inf, 1e30]


def _mask(B, M, device, empty_sample=True):
    m = torch.rand(B, M, generator=torch.Generator().manual_seed(3)) > 0.4
    m[:, 0] = True
    if empty_sample:
        m[1] = False  # a sample with no valid position at all
    return m.to(device)


def _filled(x, mask, fill):
    """x with ``fill`` at the masked positions, as a fresh leaf."""
    return x.detach().masked_fill(~mask.unsqueeze(-1), fill).requires_grad_()


def _run(f, leaves, seed=1):
    """f's outputs and the gradients of a fixed random linear function of all of them."""
    outs = f(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g).to(o)).sum() for o in outs)
    live = [t for t in leaves if t is not None and t.requires_grad]
    return list(outs) + list(torch.autograd.grad(loss, live, allow_unused=True))


def _assert_same(got, want, names):
    for name, g, w in zip(names, got, want, strict=True):
        assert g is not None and w is not None, f"{name}: no gradient"
        assert torch.isfinite(g).all(), f"{name}: non-finite values with garbage at masked positions"
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _netvlad_inputs(device, B=3, M=13, D=20, K=5, G=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M, D, generator=g)
    w = torch.randn(K + G, D, generator=g) * 0.3
    b = torch.randn(K + G, generator=g) * 0.5
    c = torch.randn(K, D, generator=g)
    return [t.to(device).requires_grad_() for t in (x, w, b, c)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("fill", FILLS, ids=str)
def test_netvlad_masked_values_do_not_leak(backend, normalize, fill):
    name, device = backend
    x, w, b, c = _netvlad_inputs(device)
    mask = _mask(x.shape[0], x.shape[1], device)

    def f(x, w, b, c):
        with mvfast.backend(name):
            return mvfast.ops.netvlad(x, w, b, c, mask, ghost_clusters=2, normalize=normalize)

    x0 = _filled(x, mask, 0.0)
    want = _run(f, [x0, w, b, c])
    got = _run(f, [_filled(x, mask, fill), w, b, c])
    _assert_same(got, want, ["out", "grad_x", "grad_weight", "grad_bias", "grad_centroids"])
    assert (got[1][~mask] == 0).all(), "a masked position got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_weights", [False, True], ids=["pooled", "weights"])
@pytest.mark.parametrize("fill", FILLS, ids=str)
def test_attention_pool_masked_values_do_not_leak(backend, return_weights, fill):
    name, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 13, 20, generator=g).to(device).requires_grad_()
    w = (torch.randn(2, 20, generator=g) * 0.3).to(device).requires_grad_()
    b = (torch.randn(2, generator=g) * 0.5).to(device).requires_grad_()
    mask = _mask(3, 13, device)

    def f(x, w, b):
        with mvfast.backend(name):
            return mvfast.ops.attention_pool(x, w, b, mask, return_weights=return_weights)

    want = _run(f, [_filled(x, mask, 0.0), w, b])
    got = _run(f, [_filled(x, mask, fill), w, b])
    names = ["out"] + (["weights"] if return_weights else []) + ["grad_x", "grad_weight", "grad_bias"]
    _assert_same(got, want, names)
    grad_x = got[2 if return_weights else 1]
    assert (grad_x[~mask] == 0).all(), "a masked position got a gradient"
    if return_weights:
        assert (got[1][~mask] == 0).all(), "a masked position got an attention weight"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_netvlad_empty_sequence(backend, normalize, with_mask):
    """M = 0: zeros out, zero gradients, the same on every backend."""
    name, device = backend
    x, w, b, c = _netvlad_inputs(device, M=0)
    mask = torch.zeros(3, 0, dtype=torch.bool, device=device) if with_mask else None

    def f(x, w, b, c):
        with mvfast.backend(name):
            return mvfast.ops.netvlad(x, w, b, c, mask, ghost_clusters=2, normalize=normalize)

    out, gx, gw, gb, gc = _run(f, [x, w, b, c])
    assert out.shape == ((3, 5 * 20) if normalize else (3, 5, 20))
    assert gx.shape == (3, 0, 20)
    for t, what in ((out, "out"), (gw, "grad_weight"), (gb, "grad_bias"), (gc, "grad_centroids")):
        assert t is not None and (t == 0).all(), f"{what}: not zeros for an empty sequence"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_weights", [False, True], ids=["pooled", "weights"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
def test_attention_pool_empty_sequence(backend, return_weights, with_mask):
    """L = 0: zeros out (and (B, 0, H) weights), zero gradients, the same on every backend."""
    name, device = backend
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 0, 20, generator=g).to(device).requires_grad_()
    w = (torch.randn(2, 20, generator=g) * 0.3).to(device).requires_grad_()
    b = (torch.randn(2, generator=g) * 0.5).to(device).requires_grad_()
    mask = torch.zeros(3, 0, dtype=torch.bool, device=device) if with_mask else None

    def f(x, w, b):
        with mvfast.backend(name):
            return mvfast.ops.attention_pool(x, w, b, mask, return_weights=return_weights)

    res = _run(f, [x, w, b])
    out = res[0]
    assert out.shape == (3, 2, 20) and (out == 0).all(), "out: not zeros for an empty sequence"
    if return_weights:
        assert res[1].shape == (3, 0, 2)
    gx, gw, gb = res[-3:]
    assert gx.shape == (3, 0, 20)
    for t, what in ((gw, "grad_weight"), (gb, "grad_bias")):
        assert t is not None and (t == 0).all(), f"{what}: not zeros for an empty sequence"
