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

# No ``from __future__ import annotations``: Triton's interpreter before 3.2 knows a kernel's
# tl.constexpr parameters only by the annotation object, and took string annotations for runtime values.

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast import _backend
from mvfast.ops import _checks
from mvfast.ops._op import Op, OpSpec, acc_dtype, autocast_dtype, autocast_off, cast_all
from mvfast.ops._triton import (
    MAX_GRID,
    Launch,
    Target,
    mask_bytes,
    matmul_precision,
    next_pow2,
    pick,
    target,
    tl,
    triton,
)

OP = "netvlad"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _validate(x, weight, bias, centroids, mask, ghost_clusters) -> None:
    _checks.tensor(OP, "x", x, ndim=3)
    B, M, D = x.shape
    _checks.nonnegative_int(OP, "ghost_clusters", ghost_clusters)
    _checks.tensor(OP, "centroids", centroids, ndim=2)
    K = centroids.shape[0]
    if K < 1:
        raise ValueError(
            f"{OP}: centroids must hold at least one cluster, got shape {tuple(centroids.shape)}"
        )
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
    if mask is not None:
        # Masked rows are zeroed before anything reads them: whatever they hold (NaN, inf) would otherwise
        # reach the output and the gradients as 0 * NaN. masked_fill also gives them a zero gradient.
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    logits = x @ weight.t()  # (B, M, K+G)
    if bias is not None:
        logits = logits + bias
    a = torch.softmax(logits, dim=-1)[..., :K]  # (B, M, K), ghosts dropped after the softmax
    if mask is not None:
        a = a.masked_fill(~mask.unsqueeze(-1), 0.0)
    v = a.transpose(1, 2) @ x - a.sum(1).unsqueeze(-1) * centroids  # (B, K, D)
    if normalize:
        v = F.normalize(v, dim=2)
        v = F.normalize(v.flatten(1), dim=1)  # (B, K*D)
    return v


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Forward: (1) logits over D chunks, bias, masked softmax -> assign (B, M, KG) float32; (2) a^T x and
# sum_i a, the residual epilogue -> V (B, K, D), float32 when normalize (else the output itself);
# (3) both normalisations -> out. Backward: (1) the normalisation backward -> dV and c.dV; (2) x dV^T,
# softmax backward -> dS; (3) dx = a dV + dS W; (4) dW = dS^T x and dbias, the rows split across programs
# and the partial sums added. Matrix products accumulate in float32. The logits x W^T take 16-bit inputs
# as they are; the products with a float32 intermediate (assign, dV, dS) take float32 operands, 16-bit
# inputs upcast, so that no intermediate is stored in 16 bits or overflows their range (the gradient of
# an all-masked sample passes through dy / eps before it is multiplied by zero). These operands are not
# exact either: under PREC="tf32" (see mvfast.ops._triton) tl.dot rounds them to TF32, float16's 10-bit
# mantissa with float32's range; only PREC="ieee" multiplies them as they are.
#
# x and grad_x are addressed through their own strides, which a view (a transposed (M, B, D) batch) can
# make as large as the whole tensor: their row and feature offsets are int64 (an int32 rows * stride wraps
# past 2**31 elements; Triton makes a stride argument int64 only from 2**31 itself). The parameters are
# (K+G, D) at most, and the float32 intermediates are addressed from their sample's int64 offset.
#
# Masked rows are loaded as zeros wherever x is read, so whatever they hold (NaN, inf) never meets a
# zero weight in a product (0 * NaN = NaN). Whether there is a mask, and a bias, are runtime arguments,
# not constexprs: each only guards a load, and every constexpr doubles the kernels the JIT compiles.


@triton.jit
def _nv_valid_rows(mask_ptr, b, M, rows, has_mask):
    """rows < M that the mask keeps (all of them without a mask)."""
    ok = rows < M
    keep = tl.load(mask_ptr + b * M + rows, mask=ok & (has_mask != 0), other=1)
    return ok & (keep != 0)


@triton.jit
def _nv_rows_times_t(
    x_base,
    sxm,
    sxd,
    rows,
    row_ok,
    m_base,
    smk,
    smd,
    cols,
    col_ok,
    D,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KG: tl.constexpr,
):
    """x[rows] @ m[cols]^T over D chunks, float32 (BLOCK_M, BLOCK_KG), rows not row_ok read as zeros:
    the logits x W^T (UPCAST False: 16-bit inputs multiply as they are) and x dV^T (UPCAST True: x meets
    float32 dV in float32)."""
    acc = tl.zeros((BLOCK_M, BLOCK_KG), dtype=tl.float32)
    x_rows = x_base + rows.to(tl.int64)[:, None] * sxm
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        xt = tl.load(x_rows + d.to(tl.int64)[None, :] * sxd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        mt = tl.load(
            m_base + cols[None, :] * smk + d[:, None] * smd, mask=col_ok[None, :] & d_ok[:, None], other=0.0
        )  # (BLOCK_D, BLOCK_KG)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(xt, mt, acc, input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["has_bias", "has_mask"])
def _nv_assign_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    mask_ptr,
    a_ptr,
    M,
    D,
    KG,
    sxb,
    sxm,
    sxd,
    swk,
    swd,
    sbk,
    has_bias,
    has_mask,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KG: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_KG)
    valid = _nv_valid_rows(mask_ptr, b, M, rows, has_mask)
    col_ok = cols < KG
    logits = _nv_rows_times_t(
        x_ptr + b * sxb, sxm, sxd, rows, valid, w_ptr, swk, swd, cols, col_ok, D,
        False, PREC, BLOCK_M, BLOCK_D, BLOCK_KG,
    )  # fmt: skip
    bias = tl.load(b_ptr + cols * sbk, mask=col_ok & (has_bias != 0), other=0.0)
    logits += bias.to(tl.float32)[None, :]
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    p = tl.where(valid[:, None], p, 0.0)
    m = (rows < M)[:, None] & col_ok[None, :]
    tl.store(a_ptr + (b * M + rows[:, None]) * KG + cols[None, :], p, mask=m)


@triton.jit(do_not_specialize=["has_mask"])
def _nv_aggregate_kernel(
    x_ptr,
    a_ptr,
    c_ptr,
    mask_ptr,
    v_ptr,
    M,
    D,
    K,
    KG,
    sxb,
    sxm,
    sxd,
    sck,
    scd,
    has_mask,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < K
    d_ok = d < D
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    asum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        valid = _nv_valid_rows(mask_ptr, b, M, rows, has_mask)
        at = tl.load(
            a_ptr + (b * M + rows[None, :]) * KG + ks[:, None],
            mask=k_ok[:, None] & (rows < M)[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_M) float32, 0 at masked rows
        xt = tl.load(
            x_ptr + b * sxb + rows.to(tl.int64)[:, None] * sxm + d.to(tl.int64)[None, :] * sxd,
            mask=valid[:, None] & d_ok[None, :],
            other=0.0,
        )
        asum += tl.sum(at, axis=1)
        acc = tl.dot(at, xt.to(tl.float32), acc, input_precision=PREC)
    c = tl.load(c_ptr + ks[:, None] * sck + d[None, :] * scd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    v = acc - asum[:, None] * c.to(tl.float32)
    tl.store(
        v_ptr + (b * K + ks[:, None]) * D + d[None, :],
        v.to(v_ptr.dtype.element_ty),
        mask=k_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _nv_norms(v_base, g_base, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per cluster |V_k|^2 and V_k . g_k over D (g_base may equal v_base)."""
    ks = tl.arange(0, BLOCK_K)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    vg = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = (ks < K)[:, None] & (d < D)[None, :]
        off = ks[:, None] * D + d[None, :]
        v = tl.load(v_base + off, mask=m, other=0.0)
        g = tl.load(g_base + off, mask=m, other=0.0)
        sq += tl.sum(v * v, axis=1)
        vg += tl.sum(v * g, axis=1)
    return sq, vg


@triton.jit
def _nv_normalize_kernel(
    v_ptr, out_ptr, K, D, EPS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    base = b * K * D
    sq, _ = _nv_norms(v_ptr + base, v_ptr + base, K, D, BLOCK_K, BLOCK_D)
    inv1 = 1.0 / tl.maximum(tl.sqrt(sq), EPS)
    total = tl.sum(sq * inv1 * inv1, axis=0)
    scale = inv1 / tl.maximum(tl.sqrt(total), EPS)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = (ks < K)[:, None] & (d < D)[None, :]
        off = base + ks[:, None] * D + d[None, :]
        v = tl.load(v_ptr + off, mask=m, other=0.0)
        tl.store(out_ptr + off, (v * scale[:, None]).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _nv_norm_backward_kernel(
    g_ptr,
    v_ptr,
    c_ptr,
    dv_ptr,
    cdv_ptr,
    K,
    D,
    sck,
    scd,
    NORMALIZE: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # dV = d(unnormalised V) from dy through F.normalize twice: (dy - y (y.dy)) / |.|, or dy / eps where a
    # norm was clamped. du (the gradient of the intra-normalised V) is recomputed, not stored, between
    # the two passes that need it.
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    base = b * K * D
    inv1 = tl.full((BLOCK_K,), 1.0, dtype=tl.float32)
    clamp1 = ks < 0
    inv2 = 1.0
    clamp2 = False
    ydy = 0.0
    udu = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if NORMALIZE:
        sq, vdy = _nv_norms(v_ptr + base, g_ptr + base, K, D, BLOCK_K, BLOCK_D)
        n1 = tl.sqrt(sq)
        clamp1 = n1 <= EPS
        inv1 = 1.0 / tl.maximum(n1, EPS)
        n2 = tl.sqrt(tl.sum(sq * inv1 * inv1, axis=0))
        clamp2 = n2 <= EPS
        inv2 = 1.0 / tl.maximum(n2, EPS)
        ydy = tl.sum(vdy * inv1, axis=0) * inv2
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = k_ok[:, None] & (d < D)[None, :]
            off = base + ks[:, None] * D + d[None, :]
            u = tl.load(v_ptr + off, mask=m, other=0.0) * inv1[:, None]
            g = tl.load(g_ptr + off, mask=m, other=0.0)
            du = tl.where(clamp2, g * inv2, (g - u * inv2 * ydy) * inv2)
            udu += tl.sum(u * du, axis=1)
    cdv = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = k_ok[:, None] & (d < D)[None, :]
        off = base + ks[:, None] * D + d[None, :]
        g = tl.load(g_ptr + off, mask=m, other=0.0)
        if NORMALIZE:
            u = tl.load(v_ptr + off, mask=m, other=0.0) * inv1[:, None]
            du = tl.where(clamp2, g * inv2, (g - u * inv2 * ydy) * inv2)
            g = tl.where(clamp1[:, None], du * inv1[:, None], (du - u * udu[:, None]) * inv1[:, None])
        c = tl.load(c_ptr + ks[:, None] * sck + d[None, :] * scd, mask=m, other=0.0).to(tl.float32)
        cdv += tl.sum(c * g, axis=1)
        tl.store(dv_ptr + off, g, mask=m)
    tl.store(cdv_ptr + b * K + ks, cdv, mask=k_ok)


@triton.jit
def _nv_assign_backward_kernel(
    x_ptr,
    dv_ptr,
    cdv_ptr,
    a_ptr,
    ds_ptr,
    valid_ptr,
    M,
    D,
    K,
    KG,
    sxb,
    sxm,
    sxd,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_KG: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_KG)
    real = cols < K
    m = (rows < M)[:, None] & (cols < KG)[None, :]
    a_off = (b * M + rows[:, None]) * KG + cols[None, :]
    # A row of the softmax sums to 1 over K+G and a masked row is all zeros, so the mask is read off a
    # (no need to save it); the dW kernel reads the rows' validity from valid_ptr. a is read again after
    # the product rather than held in registers through it.
    valid = (rows < M) & (tl.sum(tl.load(a_ptr + a_off, mask=m, other=0.0), axis=1) > 0)
    tl.store(valid_ptr + b * M + rows, valid.to(tl.uint8), mask=rows < M)
    da = _nv_rows_times_t(
        x_ptr + b * sxb, sxm, sxd, rows, valid, dv_ptr + b * K * D, D, 1, cols, real, D,
        True, PREC, BLOCK_M, BLOCK_D, BLOCK_KG,
    )  # fmt: skip
    cdv = tl.load(cdv_ptr + b * K + cols, mask=real, other=0.0)
    g = tl.where(real[None, :], da - cdv[None, :], 0.0)  # ghosts are dropped after the softmax
    a = tl.load(a_ptr + a_off, mask=m, other=0.0)
    dot = tl.sum(a * g, axis=1)
    tl.store(ds_ptr + a_off, a * (g - dot[:, None]), mask=m)


@triton.jit
def _nv_dx_kernel(
    a_ptr,
    ds_ptr,
    dv_ptr,
    w_ptr,
    dx_ptr,
    M,
    D,
    K,
    KG,
    swk,
    swd,
    sdxb,
    sdxm,
    sdxd,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # dx = a dV + dS W, the clusters in chunks of BLOCK_C; masked rows have a = dS = 0, so dx = 0 there.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    d_ok = d < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, KG, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        real = cols < K
        col_ok = cols < KG
        arow = (b * M + rows[:, None]) * KG + cols[None, :]
        a = tl.load(a_ptr + arow, mask=row_ok[:, None] & real[None, :], other=0.0)
        s = tl.load(ds_ptr + arow, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dvt = tl.load(
            dv_ptr + (b * K + cols[:, None]) * D + d[None, :], mask=real[:, None] & d_ok[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + cols[:, None] * swk + d[None, :] * swd, mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        acc = tl.dot(a, dvt, acc, input_precision=PREC)
        acc = tl.dot(s, wt.to(tl.float32), acc, input_precision=PREC)
    tl.store(
        dx_ptr + b * sdxb + rows.to(tl.int64)[:, None] * sdxm + d.to(tl.int64)[None, :] * sdxd,
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


# TILES, MT and PER change with B and M: specialised (as 1, or as multiples of 16) they made 31 kernels
# over B in 1..256 and M in 1..1024 where every other NetVLAD kernel has 3; they only bound the row loop.
@triton.jit(do_not_specialize=["TILES", "MT", "PER"])
def _nv_dw_kernel(
    ds_ptr,
    x_ptr,
    valid_ptr,
    dw_ptr,
    db_ptr,
    M,
    D,
    KG,
    sxb,
    sxm,
    sxd,
    TILES,
    MT,
    PER,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # dW = dS^T x and dbias = sum dS over the B*M rows: program (c, d, split) sums the row tiles
    # [split * PER, (split + 1) * PER) of the B * MT tiles (MT per sample) into its own slice of the
    # partial sums, which the launcher adds up.
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < KG
    d_ok = d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t in range(split * PER, tl.minimum(TILES, (split + 1) * PER)):
        b = (t // MT).to(tl.int64)
        rows = (t % MT) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = tl.load(valid_ptr + b * M + rows, mask=rows < M, other=0) != 0
        st = tl.load(
            ds_ptr + (b * M + rows[None, :]) * KG + cols[:, None],
            mask=col_ok[:, None] & (rows < M)[None, :],
            other=0.0,
        )  # (BLOCK_C, BLOCK_M)
        xt = tl.load(
            x_ptr + b * sxb + rows.to(tl.int64)[:, None] * sxm + d.to(tl.int64)[None, :] * sxd,
            mask=valid[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(st, xt.to(tl.float32), acc, input_precision=PREC)
        db += tl.sum(st, axis=1)
    out = split.to(tl.int64) * KG + cols
    tl.store(dw_ptr + out[:, None] * D + d[None, :], acc, mask=col_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        tl.store(db_ptr + out, db, mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# Launch plan and launchers

_EPS = 1e-12  # F.normalize's
MAX_KG = 512  # the row kernels hold a row of K+G logits in registers
D_TILE = 64  # the features per program of the aggregate, dx and dw kernels, whose grids' axis 1 is D's tiles
MAX_B = MAX_GRID[1]  # the samples are grid axis 1 or 2 of all but the per-sample kernels
# (BLOCK_D, stages) of the row kernels, fastest first. Exact float32 products run on the FMA units, which
# hold a D chunk of both operands in registers: a chunk of 64 spilled there.
_ROW_TILES = {
    "tf32": ((64, 3), (32, 3), (64, 2), (32, 2), (16, 2), (16, 1)),
    "ieee": ((32, 3), (32, 2), (16, 2), (16, 1)),
}


def _row_kernel(KG: int, x_bytes: int, m_bytes: int, budget: int, prec: str) -> dict:
    """Tiles of the kernels that hold whole rows of K+G columns (the logits and their gradient): 8 warps
    and at most 32 float32 accumulators a thread (more spilled registers at K+G = 512 on sm_90), then the
    D chunk and pipeline depth whose shared memory (a tile of x and one of the (D, K+G) operand per
    stage; the row's softmax reuses it) fits the arch."""
    block_kg = next_pow2(KG)
    warps = 8
    block_m = max(16, min(64, 32 * 32 * warps // block_kg))

    def smem(c):
        block_d, stages = c
        return max(stages * block_d * (block_m * x_bytes + block_kg * m_bytes), block_m * block_kg * 4)

    block_d, stages = pick(_ROW_TILES[prec], lambda c: smem(c) <= budget)
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_KG=block_kg), warps, stages


def _stages(per_stage: int, budget: int, most: int = 3) -> int:
    """The deepest pipeline (at most ``most``) whose operand tiles of per_stage bytes each fit."""
    return pick(range(most, 0, -1), lambda s: s * per_stage <= budget)


def _item_tiles(K: int) -> tuple[dict, int]:
    """The (all K, BLOCK_D) tiles of the per-sample kernels: about 4096 values for the block's threads."""
    block_k = next_pow2(K, 1)
    block_d = max(8, min(128, 4096 // block_k))
    return dict(BLOCK_K=block_k, BLOCK_D=block_d), 8 if block_k * block_d >= 4096 else 4


@functools.lru_cache(maxsize=256)
def triton_plan(
    B: int, M: int, D: int, K: int, G: int, dtype: torch.dtype, normalize: bool, target: Target, prec: str
) -> dict[str, Launch]:
    """Every launch of the Triton forward and backward for x (B, M, D) of ``dtype``, K clusters and G
    ghosts on ``target``, products at ``prec`` (matmul_precision of the dtype): the plan the launchers
    run and the compile check compiles. Whether there is a mask or a bias does not change it."""
    KG = K + G
    budget = target.shared_memory
    xb = torch.empty((), dtype=dtype).element_size()
    plan = {}

    tiles, warps, stages = _row_kernel(KG, xb, xb, budget, prec)
    plan["assign"] = Launch(
        _nv_assign_kernel,
        (triton.cdiv(M, tiles["BLOCK_M"]), B),
        dict(PREC=prec, **tiles),
        warps,
        stages,
    )
    block_k, block_m, block_d = min(next_pow2(K), 64), 32, D_TILE
    plan["aggregate"] = Launch(
        _nv_aggregate_kernel,
        (triton.cdiv(K, block_k), triton.cdiv(D, block_d), B),
        dict(PREC=prec, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d),
        8,
        _stages(block_m * (block_k * 4 + block_d * xb), budget),
    )
    item, item_warps = _item_tiles(K)
    if normalize:
        plan["normalize"] = Launch(_nv_normalize_kernel, (B,), dict(EPS=_EPS, **item), item_warps, 2)

    plan["norm_backward"] = Launch(
        _nv_norm_backward_kernel,
        (B,),
        dict(NORMALIZE=normalize, EPS=_EPS, **item),
        item_warps,
        2,
    )
    tiles, warps, stages = _row_kernel(KG, xb, 4, budget, prec)
    plan["assign_backward"] = Launch(
        _nv_assign_backward_kernel,
        (triton.cdiv(M, tiles["BLOCK_M"]), B),
        dict(PREC=prec, **tiles),
        warps,
        stages,
    )
    block_m, block_d, block_c = 64, D_TILE, 16 if prec == "ieee" else 32
    plan["dx"] = Launch(
        _nv_dx_kernel,
        (triton.cdiv(M, block_m), triton.cdiv(D, block_d), B),
        dict(PREC=prec, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c),
        8,
        _stages(block_c * (2 * block_m * 4 + block_d * (4 + xb)), budget),
    )
    block_c, block_d, block_m = min(64, next_pow2(KG)), D_TILE, 32
    tiles_cd = max(1, triton.cdiv(KG, block_c) * triton.cdiv(D, block_d))  # 0 at D = 0: no program runs
    mt = triton.cdiv(M, block_m)
    # Enough programs to fill the GPU twice over: the rows are split when the (K+G, D) tiles are few.
    per = max(1, triton.cdiv(B * mt, max(1, triton.cdiv(2 * target.sms, tiles_cd))))
    splits = max(1, triton.cdiv(B * mt, per))
    plan["dw"] = Launch(
        _nv_dw_kernel,
        (triton.cdiv(KG, block_c), triton.cdiv(D, block_d), splits),
        dict(PREC=prec, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c),
        8,
        _stages(block_m * (block_c * 4 + block_d * xb), budget),
        dict(TILES=B * mt, MT=mt, PER=per),
    )
    return plan


def _plan(x: Tensor, K: int, G: int, normalize: bool) -> dict[str, Launch]:
    B, M, D = x.shape
    return triton_plan(B, M, D, K, G, x.dtype, normalize, target(x.device), matmul_precision(x.dtype))


def _triton_forward(x, weight, bias, centroids, mask, ghost_clusters, normalize):
    B, M, D = x.shape
    K, KG = centroids.shape[0], weight.shape[0]
    plan = _plan(x, K, ghost_clusters, normalize)
    dev = x.device
    assign = x.new_empty((B, M, KG), dtype=torch.float32)
    out = x.new_empty((B, K, D))
    vlad = x.new_empty((B, K, D), dtype=torch.float32) if normalize else out
    mask_u8, has_mask = mask_bytes(mask, x)
    b, sb = (bias, bias.stride(0)) if bias is not None else (weight, 1)
    plan["assign"](
        dev, x, weight, b, mask_u8, assign, M, D, KG, *x.stride(), *weight.stride(), sb,
        int(bias is not None), has_mask,
    )  # fmt: skip
    plan["aggregate"](
        dev, x, assign, centroids, mask_u8, vlad, M, D, K, KG, *x.stride(), *centroids.stride(), has_mask
    )
    if normalize:
        plan["normalize"](dev, vlad, out, K, D)
        return out.view(B, K * D), assign, vlad
    return out, assign, vlad.new_empty((0,), dtype=torch.float32)


def _triton_backward(grad_out, x, weight, centroids, assign, vlad, ghost_clusters, normalize):
    B, M, D = x.shape
    K, KG = centroids.shape[0], weight.shape[0]
    plan = _plan(x, K, ghost_clusters, normalize)
    dev = x.device
    g = grad_out.reshape(B, K, D).float().contiguous()
    dv = torch.empty_like(g)
    cdv = g.new_empty((B, K))
    c = centroids.float()  # (K, D), small: one compiled kernel for every dtype
    plan["norm_backward"](dev, g, vlad if normalize else g, c, dv, cdv, K, D, *c.stride())
    ds = torch.empty_like(assign)
    valid = x.new_empty((B, M), dtype=torch.uint8)
    plan["assign_backward"](dev, x, dv, cdv, assign, ds, valid, M, D, K, KG, *x.stride())
    grad_x = torch.empty_like(x)
    plan["dx"](dev, assign, ds, dv, weight, grad_x, M, D, K, KG, *weight.stride(), *grad_x.stride())
    dw = plan["dw"]
    splits = dw.grid[2]
    part_w = x.new_empty((splits, KG, D), dtype=torch.float32)
    part_b = x.new_zeros((splits, KG), dtype=torch.float32)  # at D = 0 no program runs to write it
    dw(dev, ds, x, valid, part_w, part_b, M, D, KG, *x.stride())
    grad_w, grad_b = (part_w[0], part_b[0]) if splits == 1 else (part_w.sum(0), part_b.sum(0))
    # dC_k = -sum_b (sum_i a_bik) dV_bk: (B, K) x (B, K, D), small next to the rest
    grad_c = -torch.einsum("bk,bkd->kd", assign[:, :, :K].sum(1), dv)
    return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype), grad_c.to(centroids.dtype)


# ---------------------------------------------------------------------------------------------------
# The op: forward returns (out, assign, vlad), the last two saved for backward (see csrc/ops.cpp).


def _fake(x, weight, bias, centroids, mask, ghost_clusters, normalize, backend):
    B, M, D = x.shape
    K, KG = centroids.shape[0], weight.shape[0]
    out = x.new_empty((B, K * D) if normalize else (B, K, D))
    acc = acc_dtype(x)
    assign = x.new_empty((B, M, KG), dtype=acc)
    vlad = x.new_empty((B, K, D) if normalize else (0,), dtype=acc)
    return out, assign, vlad


def _backward_fake(grad_out, x, weight, centroids, assign, vlad, mask, ghost_clusters, normalize, backend):
    return (
        torch.empty_like(x),
        torch.empty_like(weight),
        weight.new_empty((weight.shape[0],)),
        torch.empty_like(centroids),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, centroids, mask, ghost_clusters, normalize = inputs
    _, assign, vlad = output
    ctx.save_for_backward(x, weight, centroids, assign, vlad, mask)
    ctx.ghost_clusters, ctx.normalize = ghost_clusters, normalize
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(assign, vlad)


def _backward(ctx, run, grad_out, _grad_assign, _grad_vlad):
    x, weight, centroids, assign, vlad, mask = ctx.saved_tensors
    grad_x, grad_w, grad_b, grad_c = run(
        ctx, grad_out, x, weight, centroids, assign, vlad, mask, ctx.ghost_clusters, ctx.normalize
    )
    return grad_x, grad_w, grad_b if ctx.has_bias else None, grad_c, None, None, None, None


_OP = Op(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor weight, Tensor? bias, Tensor centroids, Tensor? mask, int ghost_clusters, "
        "bool normalize) -> (Tensor, Tensor, Tensor)",
        backward_schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor centroids, Tensor assign, "
        "Tensor vlad, Tensor? mask, int ghost_clusters, bool normalize) -> (Tensor, Tensor, Tensor, Tensor)",
        fake=_fake,
        backward_fake=_backward_fake,
        triton_forward=_triton_forward,
        triton_backward=lambda g, x, w, c, a, v, mask, G, n: _triton_backward(g, x, w, c, a, v, G, n),
        setup_context=_setup_context,
        backward=_backward,
        # x, weight, bias and centroids in autocast's dtype (the kernels accumulate in float32 and return
        # out in that dtype); assign and vlad stay float32
        autocast=cast_all,
    ),
    "NetVLADFunction",
)


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
    if weight.shape[0] > MAX_KG:
        reasons.append(f"the triton kernels hold a row of K+G <= {MAX_KG} logits; K+G is {weight.shape[0]}")
    if x.shape[0] > MAX_B:
        reasons.append(
            f"the triton kernels launch the samples along a grid axis of at most {MAX_B} programs (CUDA's "
            f"limit); B is {x.shape[0]}"
        )
    D = x.shape[2]
    if D > MAX_GRID[1] * D_TILE:
        reasons.append(
            f"the triton kernels launch D's tiles of {D_TILE} along a grid axis of at most {MAX_GRID[1]} "
            f"programs (CUDA's limit): D <= {MAX_GRID[1] * D_TILE}; D is {D}"
        )
    # (with K+G <= 512 this also keeps the 32-bit offsets into weight, (K+G) * D, below 2**31)
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
        mask (Tensor[B, M], bool, optional): True where a feature is valid. Masked features take no
            part, whatever they hold (NaN and inf included): the result and the gradients are those of
            zeros there, and a masked feature's gradient is zero. A sample with none yields zeros.
        ghost_clusters (int): G, clusters that absorb assignment weight and are then dropped.
        normalize (bool): intra-normalise each cluster's descriptor, flatten, then L2-normalise.

    Returns:
        Tensor[B, K*D] when ``normalize``, else Tensor[B, K, D]; in x's dtype (accumulation in float32).

    Under ``torch.autocast`` (CPU or CUDA) x, weight, bias and centroids are cast to autocast's dtype
    (float64 ones are left alone, as autocast does) and the result is in that dtype, as a matmul's would
    be; the accumulation stays float32 and the gradients of float32 parameters are float32.

    On a GPU, float32 products follow ``torch.get_float32_matmul_precision()`` as torch.matmul does
    (``"highest"``, the default: exact float32; otherwise TF32).
    """
    if dtype := autocast_dtype(x):
        with autocast_off(x):
            return netvlad(
                *cast_all((x, weight, bias, centroids), dtype),
                mask, ghost_clusters=ghost_clusters, normalize=normalize,
            )  # fmt: skip
    _validate(x, weight, bias, centroids, mask, ghost_clusters)
    name = _backend.resolve(OP, x.device, lambda b: _op_reasons(b, x, weight))
    if name == "reference":
        return netvlad_reference(x, weight, bias, centroids, mask, ghost_clusters, normalize)
    args = (x, weight, bias, centroids, mask, ghost_clusters, normalize)
    out, _, _ = _OP.call(args, name)
    return out
