"""Attention pooling: a softmax over the local features of a set, per head (paper eq. 10-13).

    s[b,l,h] = x[b,l] . weight[h] + bias[h]          positions where mask is False are excluded
    a[b,:,h] = softmax over l of s[b,:,h]             (a sample with no valid position gets a = 0)
    out[b,h] = sum_l a[b,l,h] x[b,l]                  (B, H, D); with return_weights also a (B, L, H)

The bias is constant over l for each head, so it cancels in the softmax: the kernels leave it out (their
results are the same, their scores are not rounded to the bias's magnitude) and its gradient is exactly
zero. Every kernel reads x once in forward with an online softmax (running max, running sum, running
weighted sum) and saves only the log-sum-exp (B, H) besides x, weight, mask and out; backward
recomputes a from it in one more pass over x that also writes grad_x.

This module holds the pure PyTorch reference (ground truth and fallback), the Triton kernels, and the
registration of the custom op ``mvfast::attention_pool`` with its fake kernel and autograd; the CPU and
CUDA kernels are in ``csrc/cpu/attention_pool.cpp`` and ``csrc/cuda/attention_pool.cu``.
"""

# No ``from __future__ import annotations``: Triton's interpreter before 3.2 knows a kernel's
# tl.constexpr parameters only by the annotation object, and took string annotations for runtime values.

import functools

import torch
from torch import Tensor

from mvfast import _backend
from mvfast.ops import _checks
from mvfast.ops._op import Op, OpSpec, acc_dtype, autocast_dtype, autocast_off, cast_all
from mvfast.ops._triton import Launch, Target, mask_bytes, matmul_precision, next_pow2, target, tl, triton

OP = "attention_pool"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _validate(x, weight, bias, mask) -> None:
    _checks.tensor(OP, "x", x, ndim=3)
    B, L, D = x.shape
    _checks.tensor(OP, "weight", weight, ndim=2)
    if weight.shape[0] < 1:
        raise ValueError(f"{OP}: weight must hold at least one head, got shape {tuple(weight.shape)}")
    H = weight.shape[0]
    _checks.tensor(OP, "weight", weight, shape=(H, D))
    if bias is not None:
        _checks.tensor(OP, "bias", bias, ndim=1, shape=(H,))
    if mask is not None:
        _checks.tensor(OP, "mask", mask, dtypes=(torch.bool,), shape=(B, L))
    _checks.same_dtype(OP, "x", x, weight=weight, bias=bias)
    _checks.same_device(OP, "x", x, weight=weight, bias=bias, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Reference


def attention_pool_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure PyTorch attention pooling, written from the formulas; differentiable by autograd.

    float16 / bfloat16 inputs are computed in float32 and the results cast back, as the kernels do.
    """
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        x, weight = x.float(), weight.float()
        bias = None if bias is None else bias.float()
    out, a = attention_pool_math(x, weight, bias, mask)
    if return_weights:
        return out.to(dtype), a.to(dtype)
    return out.to(dtype)


def attention_pool_math(x, weight, bias, mask):
    """The formulas in the dtype of the inputs; returns (out (B, H, D), a (B, L, H)). The reference
    upcasts first; tests also run this in low precision to measure the error PyTorch itself makes there."""
    if mask is not None:
        # Masked positions are zeroed before anything reads them: whatever they hold (NaN, inf) would
        # otherwise reach the output as 0 * NaN. masked_fill also gives them a zero gradient.
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
    s = x @ weight.t()  # (B, L, H)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    # A softmax that gives 0, not NaN, over a sample with no valid position (and no NaN in its gradient);
    # L = 0 has no maximum at all, and gives zeros too.
    if s.shape[1] == 0:
        m = s.new_zeros((s.shape[0], 1, s.shape[2]))
    else:
        m = s.detach().amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)  # exp(-inf) = 0 at masked positions
    den = e.sum(dim=1, keepdim=True)  # (B, 1, H), >= 1 unless the sample has no valid position
    a = e / torch.where(den > 0, den, torch.ones_like(den))
    out = a.transpose(1, 2) @ x  # (B, H, D)
    return out, a


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Forward: (1) a program per (sample, split of its rows) streams its rows in tiles of BLOCK_L: the scores
# of a tile over D chunks, then the online-softmax update of the running weighted sum over D chunks again
# (the second read of the tile comes from cache); it leaves (max, sum, weighted sum) per head; (2) a
# program per (sample, head) merges the splits into out and lse, and writes the weights when asked.
# Backward: a program per (sample, split) recomputes the scores, a = exp(s - lse) and x . dv for a tile,
# then writes grad_x = a dv + ds w and adds ds^T x to its own slice of the weight-gradient partials; the
# partials are summed at the end. Products with a float32 intermediate (p, a, ds, dv) take float32
# operands, 16-bit x upcast, so that no intermediate is stored in 16 bits or overflows their range; under
# PREC="tf32" (see mvfast.ops._triton) tl.dot still rounds them to TF32, float16's 10-bit mantissa with
# float32's range, and only PREC="ieee" multiplies them as they are. The scores take 16-bit x and
# weight as they are, accumulating in float32. x is addressed through its own strides, which a view (a
# transposed (L, B, D) batch) can make as large as the whole tensor: its row and feature offsets, and
# grad_x's, are int64 (an int32 rows * stride wraps past 2**31 elements; Triton makes a stride argument
# int64 only from 2**31 itself). Masked rows are loaded as zeros wherever x is read, so
# whatever they hold never reaches a product. Whether there is a mask, and whether the weights are
# written or have a gradient, are runtime arguments (each guards a load or a store; every constexpr
# doubles the kernels the JIT compiles). S and CHUNK (how a sample's rows are split) come from the plan.


@triton.jit(do_not_specialize=["L", "H", "has_mask", "write_scores", "S", "CHUNK"])
def _ap_forward_kernel(
    x_ptr,
    w_ptr,
    mask_ptr,
    scores_ptr,
    pm_ptr,
    ps_ptr,
    pacc_ptr,
    L,
    D,
    H,
    sxb,
    sxl,
    sxd,
    swh,
    swd,
    has_mask,
    write_scores,
    S,
    CHUNK,
    PREC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    item = b * S + split
    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < H
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc_base = pacc_ptr + item * H * D
    l_start = split * CHUNK
    l_end = tl.minimum(L, l_start + CHUNK)
    for l0 in range(l_start, l_end, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        r_ok = rows < l_end
        keep = tl.load(mask_ptr + b * L + rows, mask=r_ok & (has_mask != 0), other=1)
        valid = r_ok & (keep != 0)
        x_rows = x_ptr + b * sxb + rows.to(tl.int64)[:, None] * sxl
        sc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xt = tl.load(
                x_rows + d.to(tl.int64)[None, :] * sxd, mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            wt = tl.load(
                w_ptr + hs[None, :] * swh + d[:, None] * swd, mask=h_ok[None, :] & d_ok[:, None], other=0.0
            )  # (BLOCK_D, BLOCK_H)
            sc = tl.dot(xt, wt, sc, input_precision=PREC)
        sc = tl.where(valid[:, None], sc, float("-inf"))
        tl.store(
            scores_ptr + (b * L + rows[:, None]) * H + hs[None, :],
            sc,
            mask=r_ok[:, None] & h_ok[None, :] & (write_scores != 0),
        )
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        # Until a head has seen a valid score its max is -inf; subtract 0 then, so that p = 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(sc - m_ref[None, :])  # (BLOCK_L, BLOCK_H), 0 at masked rows
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
        pt = tl.trans(p)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xt = tl.load(
                x_rows + d.to(tl.int64)[None, :] * sxd, mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            off = hs[:, None] * D + d[None, :]
            hd_ok = h_ok[:, None] & d_ok[None, :]
            acc = tl.load(acc_base + off, mask=hd_ok, other=0.0)
            acc = tl.dot(pt, xt.to(tl.float32), acc * alpha[:, None], input_precision=PREC)
            tl.store(acc_base + off, acc, mask=hd_ok)
    tl.store(pm_ptr + item * H + hs, m, mask=h_ok)
    tl.store(ps_ptr + item * H + hs, s, mask=h_ok)


@triton.jit(do_not_specialize=["L", "H", "write_weights", "S"])
def _ap_combine_kernel(
    pm_ptr,
    ps_ptr,
    pacc_ptr,
    out_ptr,
    lse_ptr,
    scores_ptr,
    weights_ptr,
    L,
    D,
    H,
    write_weights,
    S,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    js = tl.arange(0, BLOCK_S)
    j_ok = js < S
    part = (b * S + js) * H + h
    mj = tl.load(pm_ptr + part, mask=j_ok, other=float("-inf"))
    sj = tl.load(ps_ptr + part, mask=j_ok, other=0.0)
    m = tl.max(mj, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    scale = tl.where(sj > 0, tl.exp(mj - m_ref), 0.0)  # an empty split weighs nothing
    s = tl.sum(sj * scale, axis=0)
    s_safe = tl.where(s > 0, s, 1.0)
    inv = tl.where(s > 0, 1.0 / s_safe, 0.0)
    lse = tl.where(s > 0, m_ref + tl.log(s_safe), float("inf"))  # +inf: every weight exp(s - lse) is 0
    tl.store(lse_ptr + b * H + h, lse)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        accs = tl.load(
            pacc_ptr + part[:, None] * D + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0
        )
        o = tl.sum(accs * scale[:, None], axis=0) * inv
        tl.store(out_ptr + (b * H + h) * D + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    if write_weights != 0:
        for l0 in range(0, L, BLOCK_L):
            rows = l0 + tl.arange(0, BLOCK_L)
            r_ok = rows < L
            sc = tl.load(scores_ptr + (b * L + rows) * H + h, mask=r_ok, other=float("-inf"))
            a = tl.exp(sc - lse)  # masked rows hold -inf
            tl.store(weights_ptr + (b * L + rows) * H + h, a.to(weights_ptr.dtype.element_ty), mask=r_ok)


@triton.jit(do_not_specialize=["L", "H", "has_mask", "has_ga", "S", "CHUNK"])
def _ap_backward_kernel(
    x_ptr,
    w_ptr,
    dv_ptr,
    lse_ptr,
    c_ptr,
    ga_ptr,
    mask_ptr,
    dx_ptr,
    pdw_ptr,
    L,
    D,
    H,
    sxb,
    sxl,
    sxd,
    swh,
    swd,
    sdxb,
    sdxl,
    sdxd,
    has_mask,
    has_ga,
    S,
    CHUNK,
    PREC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    item = b * S + split
    hs = tl.arange(0, BLOCK_H)
    h_ok = hs < H
    lse = tl.load(lse_ptr + b * H + hs, mask=h_ok, other=float("inf"))
    c = tl.load(c_ptr + b * H + hs, mask=h_ok, other=0.0)
    dv_base = dv_ptr + b * H * D
    dw_base = pdw_ptr + item * H * D
    l_start = split * CHUNK
    l_end = tl.minimum(L, l_start + CHUNK)
    for l0 in range(l_start, l_end, BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        r_ok = rows < l_end
        keep = tl.load(mask_ptr + b * L + rows, mask=r_ok & (has_mask != 0), other=1)
        valid = r_ok & (keep != 0)
        x_rows = x_ptr + b * sxb + rows.to(tl.int64)[:, None] * sxl
        sc = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
        da = tl.zeros((BLOCK_L, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xt = tl.load(
                x_rows + d.to(tl.int64)[None, :] * sxd, mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            dh_ok = h_ok[None, :] & d_ok[:, None]
            wt = tl.load(w_ptr + hs[None, :] * swh + d[:, None] * swd, mask=dh_ok, other=0.0)
            dvt = tl.load(dv_base + hs[None, :] * D + d[:, None], mask=dh_ok, other=0.0)
            sc = tl.dot(xt, wt, sc, input_precision=PREC)
            da = tl.dot(xt.to(tl.float32), dvt, da, input_precision=PREC)
        ok = valid[:, None] & h_ok[None, :]
        a = tl.where(ok, tl.exp(sc - lse[None, :]), 0.0)
        ga = tl.load(ga_ptr + (b * L + rows[:, None]) * H + hs[None, :], mask=ok & (has_ga != 0), other=0.0)
        da += ga
        ds = tl.where(ok, a * (da - c[None, :]), 0.0)
        dst = tl.trans(ds)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            xt = tl.load(
                x_rows + d.to(tl.int64)[None, :] * sxd, mask=valid[:, None] & d_ok[None, :], other=0.0
            )
            hd_ok = h_ok[:, None] & d_ok[None, :]
            off = hs[:, None] * D + d[None, :]
            wt = tl.load(w_ptr + hs[:, None] * swh + d[None, :] * swd, mask=hd_ok, other=0.0)
            dvt = tl.load(dv_base + off, mask=hd_ok, other=0.0)
            dx = tl.dot(a, dvt, input_precision=PREC)
            dx = tl.dot(ds, wt.to(tl.float32), dx, input_precision=PREC)
            tl.store(
                dx_ptr + b * sdxb + rows.to(tl.int64)[:, None] * sdxl + d.to(tl.int64)[None, :] * sdxd,
                dx.to(dx_ptr.dtype.element_ty),
                mask=r_ok[:, None] & d_ok[None, :],
            )
            dw = tl.load(dw_base + off, mask=hd_ok, other=0.0)
            dw = tl.dot(dst, xt.to(tl.float32), dw, input_precision=PREC)
            tl.store(dw_base + off, dw, mask=hd_ok)


_TRITON_MAX_HEADS = 16
_CUDA_MAX_HEADS = 512  # kMaxHeads in csrc/cuda/attention_pool.cu


@functools.lru_cache(maxsize=256)
def triton_plan(B: int, L: int, D: int, H: int, dtype: torch.dtype, target: Target, prec: str) -> dict:
    """Every launch of the Triton forward and backward for x (B, L, D) of ``dtype`` and H heads on
    ``target``, products at ``prec`` (matmul_precision of the dtype): the plan the launchers run and the
    compile check compiles. A mask, and whether the weights are returned, do not change it.

    A sample's rows are cut into S splits of CHUNK rows (a multiple of the tile), enough programs to fill
    the GPU twice over when B is small; the combine kernel merges the splits, in tiles of about 4096
    values of (split, D).
    """
    # Exact float32 products run on the FMA units, which hold a D chunk of both operands in registers: a
    # chunk of 128 spilled there.
    block_l, block_d, block_h = 32, min(64 if prec == "ieee" else 128, next_pow2(D)), next_pow2(H)
    rows = max(L, 1)
    s = max(1, min(triton.cdiv(2 * target.sms, max(B, 1)), triton.cdiv(rows, block_l)))
    chunk = triton.cdiv(triton.cdiv(rows, s), block_l) * block_l
    S = triton.cdiv(rows, chunk)
    tiles = dict(PREC=prec, BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_H=block_h)
    block_s = next_pow2(S, 2)
    return {
        "forward": Launch(
            _ap_forward_kernel, (B, S), tiles, num_warps=8, scalars=dict(S=S, CHUNK=chunk),
        ),
        "combine": Launch(
            _ap_combine_kernel,
            (B, H),
            dict(BLOCK_S=block_s, BLOCK_D=max(16, min(block_d, 4096 // block_s)), BLOCK_L=128),
            scalars=dict(S=S),
        ),
        "backward": Launch(
            _ap_backward_kernel, (B, S), tiles, num_warps=8, scalars=dict(S=S, CHUNK=chunk),
        ),
    }  # fmt: skip


def _plan(x: Tensor, H: int) -> dict:
    B, L, D = x.shape
    return triton_plan(B, L, D, H, x.dtype, target(x.device), matmul_precision(x.dtype))


def _triton_forward(x, weight, mask, return_weights):
    B, L, D = x.shape
    H = weight.shape[0]
    plan = _plan(x, H)
    S = plan["forward"].grid[1]
    out = x.new_empty((B, H, D))
    lse = x.new_empty((B, H), dtype=torch.float32)
    weights = x.new_empty((B, L, H) if return_weights else (0,))
    part_m = x.new_empty((B, S, H), dtype=torch.float32)
    part_s = torch.empty_like(part_m)
    part_acc = x.new_zeros((B, S, H, D), dtype=torch.float32)
    scores = x.new_empty((B, L, H), dtype=torch.float32) if return_weights else part_m
    mask_u8, has_mask = mask_bytes(mask, x)
    dev = x.device
    plan["forward"](
        dev, x, weight, mask_u8, scores, part_m, part_s, part_acc, L, D, H, *x.stride(), *weight.stride(),
        has_mask, int(return_weights),
    )  # fmt: skip
    plan["combine"](
        dev, part_m, part_s, part_acc, out, lse, scores, weights if return_weights else out, L, D, H,
        int(return_weights),
    )  # fmt: skip
    return out, weights, lse


def _triton_backward(grad_out, grad_weights, x, weight, mask, out, lse, weights):
    B, L, D = x.shape
    H = weight.shape[0]
    plan = _plan(x, H)
    S = plan["backward"].grid[1]
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B == 0:
        return grad_x, torch.zeros_like(weight)
    dv = grad_out.float().contiguous()
    c = (out.float() * dv).sum(-1)  # (B, H): sum_l a (x . dv) = out . dv
    has_ga = grad_weights is not None and weights is not None and weights.numel() > 0
    ga = grad_weights.float().contiguous() if has_ga else dv
    if has_ga:
        c = c + (weights.float() * ga).sum(1)
    part_dw = x.new_zeros((B * S, H, D), dtype=torch.float32)
    mask_u8, has_mask = mask_bytes(mask, x)
    plan["backward"](
        x.device, x, weight, dv, lse.contiguous(), c.contiguous(), ga, mask_u8, grad_x, part_dw, L, D, H,
        *x.stride(), *weight.stride(), *grad_x.stride(), has_mask, int(has_ga),
    )  # fmt: skip
    return grad_x, part_dw.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# The op: forward returns (out, weights, lse); lse (and weights, when asked for) is saved for backward
# (see csrc/ops.cpp). bias is an input only so that autograd gives it its (zero) gradient.


def _fake(x, weight, bias, mask, return_weights, backend):
    B, L, D = x.shape
    H = weight.shape[0]
    out = x.new_empty((B, H, D))
    weights = x.new_empty((B, L, H) if return_weights else (0,))
    lse = x.new_empty((B, H), dtype=acc_dtype(x))
    return out, weights, lse


def _backward_fake(grad_out, grad_weights, x, weight, mask, out, lse, weights, backend):
    return x.new_empty(x.shape), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, return_weights = inputs
    out, weights, lse = output
    ctx.save_for_backward(x, weight, mask, out, lse, weights if return_weights else None)
    ctx.return_weights = return_weights
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(lse)
    if not return_weights:
        ctx.mark_non_differentiable(weights)


def _backward(ctx, run, grad_out, grad_weights, _grad_lse):
    x, weight, mask, out, lse, weights = ctx.saved_tensors
    if grad_out is None:  # only the weights were used: out's gradient is zero
        grad_out = torch.zeros_like(out)
    if not ctx.return_weights:
        grad_weights = None
    grad_x, grad_w = run(ctx, grad_out, grad_weights, x, weight, mask, out, lse, weights)
    # The bias cancels in the softmax over l: its gradient is exactly zero.
    grad_b = weight.new_zeros((weight.shape[0],)) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, None, None


_OP = Op(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, bool return_weights) "
        "-> (Tensor, Tensor, Tensor)",
        backward_schema="(Tensor grad_out, Tensor? grad_weights, Tensor x, Tensor weight, Tensor? mask, "
        "Tensor out, Tensor lse, Tensor? weights) -> (Tensor, Tensor)",
        fake=_fake,
        backward_fake=_backward_fake,
        triton_forward=lambda x, weight, bias, mask, return_weights: _triton_forward(
            x, weight, mask, return_weights
        ),
        triton_backward=_triton_backward,
        setup_context=_setup_context,
        backward=_backward,
        # x, weight and bias in autocast's dtype (the kernels accumulate in float32 and return out and the
        # weights in that dtype); lse stays float32
        autocast=cast_all,
        kernel_args=lambda x, weight, bias, mask, return_weights: (x, weight, mask, return_weights),
        kernel_fake=lambda x, weight, mask, weights: _fake(x, weight, None, mask, weights, "cpu"),
    ),
    "AttentionPoolFunction",
)


# ---------------------------------------------------------------------------------------------------
# Public function


def _op_reasons(backend: str, x: Tensor, weight: Tensor) -> list[str]:
    """This op's own limits per kernel backend, beyond the device checks of mvfast._backend."""
    H = weight.shape[0]
    if backend == "cuda" and H > _CUDA_MAX_HEADS:
        return [f"the cuda kernels hold up to {_CUDA_MAX_HEADS} heads in shared memory; H is {H}"]
    if backend != "triton":
        return []
    reasons = []
    if x.dtype == torch.float64:
        reasons.append("the triton kernels take float32, float16 and bfloat16, not float64")
    if H > _TRITON_MAX_HEADS:
        reasons.append(f"the triton kernels hold up to {_TRITON_MAX_HEADS} heads in a tile; H is {H}")
    return reasons


def attention_pool(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention pooling of a set of local features, one softmax over the set per head.

    Args:
        x (Tensor[B, L, D]): local features (frames, segments, tokens).
        weight (Tensor[H, D]): one scoring vector per head.
        bias (Tensor[H] or None): score bias per head. It cancels in the softmax, so it changes nothing
            and its gradient is zero; accepted so that models with one load and train unchanged.
        mask (Tensor[B, L], bool, optional): True where a feature is valid. Masked features get weight 0
            and take no part, whatever they hold (NaN and inf included): the result and the gradients
            are those of zeros there. A sample with none, and L = 0, yield zeros.
        return_weights (bool): also return the attention weights, which show the key frames.

    Returns:
        Tensor[B, H, D] in x's dtype (accumulation in float32); with ``return_weights`` a tuple
        ``(out, weights)`` with weights Tensor[B, L, H], summing to 1 over L (0 for an all-masked sample).

    Under ``torch.autocast`` (CPU or CUDA) x, weight and bias are cast to autocast's dtype (float64 ones
    are left alone, as autocast does) and out and the weights are in that dtype, as a matmul's would be;
    the softmax and the weighted sum accumulate in float32 and the gradients of float32 parameters are
    float32.

    On a GPU, float32 products follow ``torch.get_float32_matmul_precision()`` as torch.matmul does
    (``"highest"``, the default: exact float32; otherwise TF32).
    """
    if dtype := autocast_dtype(x):
        with autocast_off(x):
            x, weight, bias = cast_all((x, weight, bias), dtype)
            return attention_pool(x, weight, bias, mask, return_weights=return_weights)
    _validate(x, weight, bias, mask)
    name = _backend.resolve(OP, x.device, lambda b: _op_reasons(b, x, weight))
    if name == "reference":
        return attention_pool_reference(x, weight, bias, mask, return_weights)
    out, weights, _ = _OP.call((x, weight, bias, mask, return_weights), name)
    return (out, weights) if return_weights else out
