"""NetVLAD: soft assignment to clusters and aggregation of residuals (paper eq. 7-9).

    a      = softmax over K+G of (x @ weight.T + bias); rows where mask is False get a = 0;
             the G ghost columns are dropped after the softmax
    V[b,k] = sum_i a[b,i,k] (x[b,i] - c[k]) = (a^T x)[b,k] - (sum_i a[b,i,k]) c[k]
    out    = F.normalize(F.normalize(V, dim=2).flatten(1), dim=1)    (normalize=True)

The B x M x K x D residual tensor is never materialised by any backend. This module holds the pure
PyTorch reference (ground truth and fallback), the Triton kernels, and the registration of the custom op
``mvfast::netvlad`` with its fake kernel and autograd; the CPU and CUDA kernels are in
``csrc/cpu/netvlad.cpp`` and ``csrc/cuda/netvlad.cu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast import _backend, _ext
from mvfast.ops import _checks

OP = "netvlad"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _validate(x, weight, bias, centroids, mask, ghost_clusters) -> None:
    _checks.tensor(OP, "x", x, ndim=3)
    B, M, D = x.shape
    _checks.nonnegative_int(OP, "ghost_clusters", ghost_clusters)
    _checks.tensor(OP, "centroids", centroids, ndim=2)
    K = centroids.shape[0]
    if K < 1:
        raise ValueError(f"{OP}: centroids must hold at least one cluster, got shape {tuple(centroids.shape)}")
    _checks.tensor(OP, "centroids", centroids, shape=(K, D))
    _checks.tensor(OP, "weight", weight, ndim=2, shape=(K + ghost_clusters, D))
    if bias is not None:
        _checks.tensor(OP, "bias", bias, ndim=1, shape=(K + ghost_clusters,))
    if mask is not None:
        _checks.tensor(OP, "mask", mask, dtypes=(torch.bool,), shape=(B, M))
    _checks.same_dtype(OP, "x", x, weight=weight, bias=bias, centroids=centroids)
    _checks.same_device(OP, "x", x, weight=weight, bias=bias, centroids=centroids, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Reference


def netvlad_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    centroids: Tensor,
    mask: Tensor | None = None,
    ghost_clusters: int = 0,
    normalize: bool = True,
) -> Tensor:
    """Pure PyTorch NetVLAD, written from the formulas; differentiable by autograd.

    float16 / bfloat16 inputs are computed in float32 and the result cast back, as the kernels do.
    """
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        x, weight, centroids = x.float(), weight.float(), centroids.float()
        bias = None if bias is None else bias.float()
    out = netvlad_math(x, weight, bias, centroids, mask, ghost_clusters, normalize)
    return out.to(dtype)


def netvlad_math(x, weight, bias, centroids, mask, ghost_clusters, normalize):
    """The formulas in the dtype of the inputs (the reference upcasts first; tests also run this in low
    precision to measure the error PyTorch itself makes there)."""
    K = centroids.shape[0]
    logits = x @ weight.t()  # (B, M, K+G)
    if bias is not None:
        logits = logits + bias
    a = torch.softmax(logits, dim=-1)[..., :K]  # (B, M, K), ghosts dropped after the softmax
    if mask is not None:
        a = a * mask.unsqueeze(-1).to(a.dtype)
    v = a.transpose(1, 2) @ x - a.sum(1).unsqueeze(-1) * centroids  # (B, K, D)
    if normalize:
        v = F.normalize(v, dim=2)
        v = F.normalize(v.flatten(1), dim=1)  # (B, K*D)
    return v


# ---------------------------------------------------------------------------------------------------
# Triton kernels (loaded lazily: importing triton is slow and it may be absent)


def _triton():
    from mvfast.ops import _netvlad_triton

    return _netvlad_triton


# ---------------------------------------------------------------------------------------------------
# Custom ops: forward returns (out, assign, vlad), the last two saved for backward.


def _saved_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mvfast::netvlad", mutates_args=())
def _netvlad_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    centroids: Tensor,
    mask: Tensor | None,
    ghost_clusters: int,
    normalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton().forward(x, weight, bias, centroids, mask, ghost_clusters, normalize)
    return torch.ops.mvfast.netvlad_fwd(x, weight, bias, centroids, mask, ghost_clusters, normalize)


@_netvlad_op.register_fake
def _(x, weight, bias, centroids, mask, ghost_clusters, normalize, backend):
    B, M, D = x.shape
    K, KG = centroids.shape[0], weight.shape[0]
    out = x.new_empty((B, K * D) if normalize else (B, K, D))
    acc = _saved_dtype(x)
    assign = x.new_empty((B, M, KG), dtype=acc)
    vlad = x.new_empty((B, K, D) if normalize else (0,), dtype=acc)
    return out, assign, vlad


@torch.library.custom_op("mvfast::netvlad_backward", mutates_args=())
def _netvlad_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    centroids: Tensor,
    assign: Tensor,
    vlad: Tensor,
    ghost_clusters: int,
    normalize: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton().backward(grad_out, x, weight, centroids, assign, vlad, ghost_clusters, normalize)
    return torch.ops.mvfast.netvlad_bwd(grad_out, x, weight, centroids, assign, vlad, ghost_clusters, normalize)


@_netvlad_backward_op.register_fake
def _(grad_out, x, weight, centroids, assign, vlad, ghost_clusters, normalize, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        weight.new_empty((weight.shape[0],)),
        torch.empty_like(centroids),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, centroids, mask, ghost_clusters, normalize, backend = inputs
    _, assign, vlad = output
    ctx.save_for_backward(x, weight, centroids, assign, vlad)
    ctx.ghost_clusters, ctx.normalize, ctx.backend = ghost_clusters, normalize, backend
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(assign, vlad)


def _backward(ctx, grad_out, _grad_assign, _grad_vlad):
    x, weight, centroids, assign, vlad = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_c = torch.ops.mvfast.netvlad_backward(
        grad_out, x, weight, centroids, assign, vlad, ctx.ghost_clusters, ctx.normalize, ctx.backend
    )
    return grad_x, grad_w, grad_b if ctx.has_bias else None, grad_c, None, None, None, None


_netvlad_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public function


def _op_reasons(backend: str, x: Tensor, weight: Tensor) -> list[str]:
    """This op's own limits per kernel backend, beyond the device checks of mvfast._backend."""
    if backend == "triton":
        return _triton_reasons(x, weight)
    return []


def _triton_reasons(x: Tensor, weight: Tensor) -> list[str]:
    reasons = []
    if x.dtype == torch.float64:
        reasons.append("the triton kernels take float32, float16 and bfloat16, not float64")
    if weight.shape[0] > 256:
        reasons.append(f"the triton kernels hold a row of K+G <= 256 logits; K+G is {weight.shape[0]}")
    return reasons


def netvlad(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    centroids: Tensor,
    mask: Tensor | None = None,
    *,
    ghost_clusters: int = 0,
    normalize: bool = True,
) -> Tensor:
    """NetVLAD pooling of a set of local features.

    Args:
        x (Tensor[B, M, D]): local features (frames, audio windows, tokens).
        weight (Tensor[K+G, D]): soft-assignment weights, G ghost clusters last.
        bias (Tensor[K+G] or None): soft-assignment bias.
        centroids (Tensor[K, D]): cluster centres.
        mask (Tensor[B, M], bool, optional): True where a feature is valid. Masked features get zero
            weight in every cluster (their values must be finite); a sample with none yields zeros.
        ghost_clusters (int): G, clusters that absorb assignment weight and are then dropped.
        normalize (bool): intra-normalise each cluster's descriptor, flatten, then L2-normalise.

    Returns:
        Tensor[B, K*D] when ``normalize``, else Tensor[B, K, D]; in x's dtype (accumulation in float32).
    """
    _validate(x, weight, bias, centroids, mask, ghost_clusters)
    name = _backend.resolve(OP, x.device, lambda b: _op_reasons(b, x, weight))
    if name == "reference":
        return netvlad_reference(x, weight, bias, centroids, mask, ghost_clusters, normalize)
    out, _, _ = torch.ops.mvfast.netvlad(x, weight, bias, centroids, mask, ghost_clusters, normalize, name)
    return out


def kernel_available(backend: str) -> bool:
    """Whether this op has a compiled kernel for ``backend`` in this build (used by mvfast.info)."""
    if backend in ("cpu", "cuda"):
        return _ext.LOADED and hasattr(torch.ops.mvfast, "netvlad_fwd")
    return True
