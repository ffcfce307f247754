"""Fused Conv3d + BatchNorm3d + ReLU: exactly ``relu(batch_norm(conv3d(x)))`` with nn.BatchNorm3d's
semantics in training and eval.

    z      = conv3d(x, weight, bias, stride, padding, dilation, groups)            (N, C, Do, Ho, Wo)
    train: mean, var = per-channel batch mean and biased variance of z (float32 accumulation; each tile's
           statistics around its own mean, combined with Chan/Welford, never E[z^2] - E[z]^2)
           y = relu((z - mean) / sqrt(var + eps) * bn_weight + bn_bias)
           running_mean = (1 - f) running_mean + f mean,  running_var = (1 - f) running_var + f var * R/(R-1)
           with f = momentum, or 1 / num_batches_tracked when momentum is None (cumulative average)
    eval:  y = relu(conv3d(x, weight * s, (bias - running_mean) * s + bn_bias)),  s = bn_weight / sqrt(
           running_var + eps): BN folded into the conv, bias and ReLU in the conv's epilogue.

In training the conv bias cancels in y, so the kernels convolve without it (its gradient is zero) and it
only shifts the batch mean used for the running update. Backward needs z and the per-channel mean and
inverse std only: the ReLU mask is recomputed from z, so neither the BN output nor the ReLU output is
saved (one activation per block instead of three).

Running statistics: ``torch.library`` refuses autograd for an op that mutates its arguments, so the
custom op ``mvfast::conv3d_bn_relu`` is functional (it returns the batch mean and unbiased variance) and
the public function updates ``running_mean``, ``running_var`` and ``num_batches_tracked`` in place from
them under ``torch.no_grad()``. That passes ``opcheck`` and traces under ``torch.compile(fullgraph=True)``
as plain in-place buffer updates, as nn.BatchNorm3d's own do.

Backends: ``reference`` (the eager chain); ``triton`` (an implicit-GEMM conv3d kernel with the epilogue
fused: bias + ReLU in eval, per-tile channel statistics in training; then fused BN-apply + ReLU and the
backward kernels; the conv backward is ATen's); ``cuda`` and ``cpu`` (csrc/cuda/conv3d_bn_relu.cu,
csrc/cpu/conv3d_bn_relu.cpp: the conv through ATen (cuDNN / oneDNN), the statistics, BN+ReLU and their
backward fused in the extension's kernels). On the CPU, float32 and bfloat16 training convs run in
channels_last_3d, which oneDNN is much faster in, unless the weights are NCDHW and outweigh x more than
4x (see _conv_channels_last); the output keeps x's memory format. grad_x comes back in the conv's layout,
as ATen's own conv backward answers.
"""

# No ``from __future__ import annotations``: Triton's interpreter before 3.2 knows a kernel's
# tl.constexpr parameters only by the annotation object, and took string annotations for runtime values.

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast.ops._conv_bn import BN, CHANNEL_TILE, Conv, batch_stats, fused, out_spatial, reference
from mvfast.ops._op import Op, OpSpec, acc_dtype, cast_all
from mvfast.ops._triton import Launch, Target, conv_precision, next_pow2, pick, target, tl, triton
from mvfast.utils import saved_tensor_hooks_keep_tensors

OP = "conv3d_bn_relu"
_CL = torch.channels_last_3d
_MKLDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile does not trace the query


# ---------------------------------------------------------------------------------------------------
# Reference


_chain = reference(F.conv3d)


def conv3d_bn_relu_reference(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    training=False,
    momentum=0.1,
    eps=1e-5,
    relu=True,
    num_batches_tracked=None,
) -> Tensor:
    """The eager chain ``relu(batch_norm(conv3d(x)))`` exactly as nn.Conv3d, nn.BatchNorm3d and nn.ReLU run
    it (running statistics updated in place in training); differentiable by autograd."""
    conv = Conv(stride, padding, dilation, groups)
    bn = BN(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, num_batches_tracked)
    return _chain(x, weight, bias, conv, bn, relu)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Implicit GEMM: rows are the output positions, columns the out channels of a group, and the reduction
# runs over the kernel taps and the group's in channels: for each (tap, chunk of in channels), a
# (BLOCK_M x BLOCK_K) tile of x gathered at the tap's input positions (zero outside the padding) times a
# (BLOCK_K x BLOCK_N) tile of the weight, one pipelined loop over both. A program's BLOCK_M =
# BLOCK_H x BLOCK_W rows are a tile of one output plane (n, od): its row r is (oh0 + r // BLOCK_W,
# ow0 + r % BLOCK_W), shifts and masks by constexpr powers of two whose contiguity the compiler sees, so
# that NCDHW tensors are read and written along W in coalesced, vectorisable accesses (no % or // by
# runtime sizes per element). The epilogue either adds the folded bias and applies ReLU (eval) or writes
# z and the tile's count, per-channel mean and M2 (training), which the statistics kernel combines.
# Every tensor is addressed through its strides, so NCDHW and channels_last_3d need no copy; z is
# allocated channels_last_3d so that its stores run along channels. Flags that only guard a load or the
# epilogue (bias, ReLU, statistics) and the kernel size are runtime arguments: every constexpr doubles
# the kernels the JIT compiles.
#
# Precision: the products follow torch.backends.cudnn.allow_tf32, as the cuDNN convolution they replace
# (mvfast.ops._triton.conv_precision): float32 inputs are rounded to TF32 by tl.dot when it is on (the
# default), exact float32 otherwise; 16-bit inputs multiply as they are, accumulating in float32.


# Sizes, paddings and dilations are not specialised on (a value of 1 would make a kernel of its own); the
# strides are, so that a unit stride gives vector accesses.
@triton.jit(
    do_not_specialize=[
        "CIN_G", "COUT_G", "C", "D", "H", "W", "DO", "HO", "WO", "PD", "PH", "PW", "DD", "DH", "DW",
        "KD", "KH", "KW", "has_bias", "relu", "stats", "TH", "TW",
    ]
)  # fmt: skip
def _cbr_conv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    pcount_ptr,
    pmean_ptr,
    pm2_ptr,
    CIN_G,
    COUT_G,
    C,
    D,
    H,
    W,
    DO,
    HO,
    WO,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    swo,
    swi,
    swd,
    swh,
    sww,
    szn,
    szc,
    szd,
    szh,
    szw,
    STD,
    STH,
    STW,
    PD,
    PH,
    PW,
    DD,
    DH,
    DW,
    KD,
    KH,
    KW,
    has_bias,
    relu,
    stats,
    TH,
    TW,
    PREC: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    # the program's output plane and tile in it, once per program
    tw = tile % TW
    th = (tile // TW) % TH
    plane = tile // (TW * TH)
    od = plane % DO
    nb = (plane // DO).to(tl.int64)
    r = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = th * BLOCK_H + r // BLOCK_W
    ow = tw * BLOCK_W + r % BLOCK_W
    m_ok = (oh < HO) & (ow < WO)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < COUT_G
    co = grp * COUT_G + rn
    x_base = x_ptr + nb * sxn + (grp * CIN_G).to(tl.int64) * sxc
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), dtype=tl.float32)
    chunks = tl.cdiv(CIN_G, BLOCK_K)
    for it in range(KD * KH * KW * chunks):
        tap = it // chunks
        c0 = (it % chunks) * BLOCK_K
        kw = tap % KW
        kh = (tap // KW) % KH
        kd = tap // (KW * KH)
        idd = od * STD - PD + kd * DD
        ih = oh * STH - PH + kh * DH
        iw = ow * STW - PW + kw * DW
        pos_ok = m_ok & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = idd.to(tl.int64) * sxd + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        ci = c0 + tl.arange(0, BLOCK_K)
        c_ok = ci < CIN_G
        a = tl.load(
            x_base + x_row[:, None] + ci.to(tl.int64)[None, :] * sxc,
            mask=pos_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + co[None, :] * swo + ci[:, None] * swi + (kd * swd + kh * swh + kw * sww),
            mask=c_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PREC)
    acc += tl.load(b_ptr + co, mask=n_ok & (has_bias != 0), other=0.0).to(tl.float32)[None, :]
    acc = tl.where((relu != 0) & (acc < 0), 0.0, acc)
    zt = acc.to(z_ptr.dtype.element_ty)
    ok = m_ok[:, None] & n_ok[None, :]
    z_row = nb * szn + od.to(tl.int64) * szd + oh.to(tl.int64) * szh + ow.to(tl.int64) * szw
    tl.store(z_ptr + z_row[:, None] + co.to(tl.int64)[None, :] * szc, zt, mask=ok)
    if stats != 0:
        # statistics of z as stored (rounded to its dtype), as an eager BatchNorm would see it
        v = tl.where(ok, zt.to(tl.float32), 0.0)
        cnt = tl.sum(m_ok.to(tl.float32), axis=0)
        mean = tl.sum(v, axis=0) / cnt
        dev = tl.where(ok, v - mean[None, :], 0.0)
        tl.store(pmean_ptr + tile.to(tl.int64) * C + co, mean, mask=n_ok)
        tl.store(pm2_ptr + tile.to(tl.int64) * C + co, tl.sum(dev * dev, axis=0), mask=n_ok)
        if (pid_n == 0) & (grp == 0):
            tl.store(pcount_ptr + tile, cnt)


@triton.jit
def _cbr_stats_kernel(
    pcount_ptr,
    pmean_ptr,
    pm2_ptr,
    ocount_ptr,
    omean_ptr,
    om2_ptr,
    mean_ptr,
    invstd_ptr,
    var_ptr,
    eps,
    T,
    C,
    CHUNK,
    FINAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Chan's parallel combination of per-tile (count, mean, M2): program (c, p) combines the tiles
    [p * CHUNK, (p + 1) * CHUNK) BLOCK_T at a time, each block at once (its mean, then M2 as the sum of
    the tiles' M2 and their counts times the squared distances of their means to the block's), merged
    into the running result with the pairwise formula. The launcher runs it twice, tiles into partials
    and partials into one (FINAL: mean, 1 / sqrt(var + eps) and the unbiased variance), so that no
    program walks more than a few hundred blocks. float64 keeps the many small tiles from adding rounding
    of their own beyond that of their float32 means; the data is small next to the conv's."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    part = tl.program_id(1)
    c_ok = c < C
    n = tl.zeros((BLOCK_C,), dtype=tl.float64)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    t_end = tl.minimum(T, (part + 1) * CHUNK)
    for t0 in range(part * CHUNK, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < t_end
        ok = t_ok[:, None] & c_ok[None, :]
        off = t.to(tl.int64)[:, None] * C + c[None, :]
        cnt = tl.load(pcount_ptr + t, mask=t_ok, other=0.0).to(tl.float64)[:, None]
        mt = tl.load(pmean_ptr + off, mask=ok, other=0.0).to(tl.float64)
        nb = tl.sum(cnt, axis=0)
        mb = tl.sum(cnt * mt, axis=0) / nb
        dev = tl.where(ok, mt - mb[None, :], 0.0)
        m2b = tl.sum(tl.load(pm2_ptr + off, mask=ok, other=0.0).to(tl.float64) + cnt * dev * dev, axis=0)
        nab = n + nb
        delta = mb - mean
        f = nb / nab
        mean += delta * f
        m2 += m2b + delta * delta * n * f
        n = nab
    if FINAL:
        tl.store(mean_ptr + c, mean.to(tl.float32), mask=c_ok)
        tl.store(invstd_ptr + c, (1.0 / tl.sqrt(m2 / n + eps)).to(tl.float32), mask=c_ok)
        tl.store(var_ptr + c, (m2 / (n - 1)).to(tl.float32), mask=c_ok)
    else:
        tl.store(omean_ptr + part.to(tl.int64) * C + c, mean.to(tl.float32), mask=c_ok)
        tl.store(om2_ptr + part.to(tl.int64) * C + c, m2.to(tl.float32), mask=c_ok)
        if tl.program_id(0) == 0:
            tl.store(ocount_ptr + part, tl.max(n, axis=0).to(tl.float32))


@triton.jit
def _cbr_rows(n, s, c, sn, ss, sc):
    """Offsets of (sample n, spatial positions s, channels c) in a tensor whose spatial dimensions
    flatten to one stride ss (NCDHW: 1, channels_last_3d: C)."""
    return n * sn + s.to(tl.int64)[:, None] * ss + c.to(tl.int64)[None, :] * sc


@triton.jit(do_not_specialize=["relu"])
def _cbr_apply_kernel(
    z_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    S,
    C,
    szn,
    szc,
    szs,
    son,
    soc,
    sos,
    relu,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    ok = (s < S)[:, None] & (c < C)[None, :]
    z = tl.load(z_ptr + _cbr_rows(n, s, c, szn, szs, szc), mask=ok, other=0.0)
    sc = tl.load(scale_ptr + c, mask=c < C, other=0.0)
    sh = tl.load(shift_ptr + c, mask=c < C, other=0.0)
    y = z.to(tl.float32) * sc[None, :] + sh[None, :]
    y = tl.where((relu != 0) & (y < 0), 0.0, y)
    tl.store(out_ptr + _cbr_rows(n, s, c, son, sos, soc), y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["relu"])
def _cbr_backward_kernel(
    gy_ptr,
    z_ptr,
    gz_ptr,
    scale_ptr,
    shift_ptr,
    mean_ptr,
    invstd_ptr,
    mg_ptr,
    mgx_ptr,
    psg_ptr,
    psgx_ptr,
    S,
    C,
    sgn,
    sgc,
    sgs,
    szn,
    szc,
    szs,
    relu,
    APPLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """APPLY=False: per-tile sums of g and g * xhat (g the gradient past the recomputed ReLU mask);
    APPLY=True: gz = scale (g - mean_g - xhat mean_gx), written in z's layout."""
    pid_s = tl.program_id(0)
    s = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    c_ok = c < C
    ok = (s < S)[:, None] & c_ok[None, :]
    z_off = _cbr_rows(n, s, c, szn, szs, szc)
    z = tl.load(z_ptr + z_off, mask=ok, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + _cbr_rows(n, s, c, sgn, sgs, sgc), mask=ok, other=0.0)
    sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    iv = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)[None, :]
    g = gy.to(tl.float32)
    g = tl.where(ok & ((relu == 0) | (z * sc + sh > 0)), g, 0.0)
    xhat = (z - mu) * iv
    if APPLY:
        mg = tl.load(mg_ptr + c, mask=c_ok, other=0.0)[None, :]
        mgx = tl.load(mgx_ptr + c, mask=c_ok, other=0.0)[None, :]
        gz = sc * (g - mg - xhat * mgx)
        tl.store(gz_ptr + z_off, gz.to(gz_ptr.dtype.element_ty), mask=ok)
    else:
        tile = n * tl.num_programs(0) + pid_s
        tl.store(psg_ptr + tile * C + c, tl.sum(g, axis=0), mask=c_ok)
        tl.store(psgx_ptr + tile * C + c, tl.sum(g * xhat, axis=0), mask=c_ok)


# ---------------------------------------------------------------------------------------------------
# Launch plan and launchers


@functools.lru_cache(maxsize=256)
def triton_plan(
    x_shape: tuple, w_shape: tuple, out_shape: tuple, groups: int, dtype: torch.dtype, training: bool,
    target: Target, prec: str,
) -> dict[str, Launch]:  # fmt: skip
    """Every launch of the Triton forward (and, in training, backward) for x of ``x_shape`` (N, Cin, D,
    H, W) and ``dtype``, a weight of ``w_shape``, an output of ``out_shape`` and ``groups``, on ``target``,
    products at ``prec`` (conv_precision of the dtype): the plan the launchers run and the compile check
    compiles. The layouts (NCDHW or channels_last_3d), the kernel size, the bias and the ReLU do not
    change it: they are runtime arguments."""
    N, C, DO, HO, WO = out_shape
    cin_g, cout_g = w_shape[1], C // groups
    xb = torch.empty((), dtype=dtype).element_size()
    block_w = 8 if WO <= 8 else 16 if WO <= 16 else 32
    # exact float32 products (FMA units, no TF32) hold a channel chunk of both operands in registers
    block_k = min(16 if prec == "ieee" else 32, next_pow2(cin_g))
    block_h, block_n = 64 // block_w, min(CHANNEL_TILE, next_pow2(cout_g))
    th, tw = triton.cdiv(HO, block_h), triton.cdiv(WO, block_w)
    tiles = N * DO * th * tw
    per_stage = (block_h * block_w * block_k + block_k * block_n) * xb
    stages = pick((3, 2, 1), lambda s: s * per_stage <= target.shared_memory)
    plan = {
        "conv": Launch(
            _cbr_conv_kernel,
            (tiles, triton.cdiv(cout_g, block_n), groups),
            dict(PREC=prec, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_K=block_k),
            8,
            stages,
            dict(TH=th, TW=tw),
        )
    }
    if not training:
        return plan
    # Statistics: the conv's tiles into at most ~2 programs per SM of partials, then those into one.
    block_t, block_c = 32, 64
    cblocks = triton.cdiv(C, block_c)
    parts = max(1, min(triton.cdiv(2 * target.sms, cblocks), triton.cdiv(tiles, 4 * block_t)))
    chunk = triton.cdiv(triton.cdiv(tiles, parts), block_t) * block_t
    parts = triton.cdiv(tiles, chunk)
    stats = dict(BLOCK_T=block_t, BLOCK_C=block_c)
    if parts > 1:
        plan["stats_partial"] = Launch(
            _cbr_stats_kernel, (cblocks, parts), dict(FINAL=False, **stats), num_warps=8,
            scalars=dict(T=tiles, C=C, CHUNK=chunk),
        )  # fmt: skip
    T = parts if parts > 1 else tiles
    plan["stats"] = Launch(
        _cbr_stats_kernel, (cblocks, 1), dict(FINAL=True, **stats), num_warps=8,
        scalars=dict(T=T, C=C, CHUNK=T),
    )  # fmt: skip
    S = DO * HO * WO
    block_m, block_c = 64, min(CHANNEL_TILE, next_pow2(C))
    grid = (triton.cdiv(S, block_m), triton.cdiv(C, block_c), N)
    rows = dict(BLOCK_M=block_m, BLOCK_C=block_c)
    plan["apply"] = Launch(_cbr_apply_kernel, grid, rows)
    plan["backward_sums"] = Launch(_cbr_backward_kernel, grid, dict(APPLY=False, **rows))
    plan["backward_apply"] = Launch(_cbr_backward_kernel, grid, dict(APPLY=True, **rows))
    return plan


def _plan(x, weight, out_shape, groups, training) -> dict[str, Launch]:
    return triton_plan(
        tuple(x.shape), tuple(weight.shape), tuple(out_shape), groups, x.dtype, training, target(x.device),
        conv_precision(x.dtype),
    )  # fmt: skip


def _spatial_stride(t: Tensor) -> int | None:
    """The one stride of t's spatial dimensions flattened (NCDHW: 1, channels_last_3d: C; 0 for an
    expanded tensor), or None when they do not flatten."""
    dims = [(n, s) for n, s in zip(t.shape[2:], t.stride()[2:], strict=True) if n != 1]
    if not dims:
        return 1
    inner = expected = dims[-1][1]
    for n, s in reversed(dims):
        if s != expected:
            return None
        expected = n * s
    return inner


def _rows_view(t: Tensor, like: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(t, its (sample, channel, spatial) strides) for the row kernels; a t whose spatial dimensions do
    not flatten (a slice) is copied into like's layout first (the only copy, and a rare one)."""
    ss = _spatial_stride(t)
    if ss is None:
        t = t.contiguous(memory_format=_format_of(like))
        ss = _spatial_stride(t)
    return t, (t.stride(0), t.stride(1), ss)


def _triton_conv(plan, x, weight, bias, out, conv: Conv, relu, stats):
    """Runs the implicit-GEMM kernel into out (any strides); returns the per-tile (count, mean, M2) or
    None."""
    C, cin_g, KD, KH, KW = weight.shape
    stride, padding, dilation, groups = conv
    launch = plan["conv"]
    tiles = launch.grid[0]
    # Unused pointers get float32 stand-ins, the type of the real ones, so that eval and training, with
    # and without bias, are one compiled kernel.
    none32 = x.new_empty((0,), dtype=torch.float32)
    pcount = x.new_empty((tiles,), dtype=torch.float32) if stats else none32
    pmean = x.new_empty((tiles, C), dtype=torch.float32) if stats else none32
    pm2 = torch.empty_like(pmean) if stats else none32
    launch(
        x.device, x, weight, bias if bias is not None else none32, out, pcount, pmean, pm2,
        cin_g, C // groups, C, *x.shape[2:], *out.shape[2:], *x.stride(), *weight.stride(),
        *out.stride(), *stride, *padding, *dilation, KD, KH, KW, int(bias is not None), int(relu), int(stats),
    )  # fmt: skip
    return (pcount, pmean, pm2) if stats else None


def _out_shape(x, weight, conv: Conv):
    return (x.shape[0], weight.shape[0], *out_spatial(x.shape, weight.shape, conv))


def _triton_forward(
    x, weight, bias, bn_weight, bn_bias, rmean, rvar, stride, padding, dilation, groups, training, eps, relu
):
    conv = Conv(stride, padding, dilation, groups)
    shape = _out_shape(x, weight, conv)
    plan = _plan(x, weight, shape, groups, training)
    out = _empty(x, shape, _format_of(x))
    none, none32 = x.new_empty((0,)), x.new_empty((0,), dtype=torch.float32)
    if not training:
        scale = bn_weight.float() * (rvar.float() + eps).rsqrt()
        b = bn_bias.float() - rmean.float() * scale
        if bias is not None:
            b = b + bias.float() * scale
        w = (weight.float() * scale.view(-1, 1, 1, 1, 1)).to(x.dtype)
        _triton_conv(plan, x, w, b, out, conv, relu, stats=False)
        return out, none, none32, none32.clone(), none32.clone(), none.clone()
    C = shape[1]
    z = _empty(x, shape, _CL)
    pcount, pmean, pm2 = _triton_conv(plan, x, weight, None, z, conv, False, stats=True)
    dev = x.device
    if "stats_partial" in plan:
        parts = plan["stats_partial"].grid[1]
        qcount, qmean, qm2 = (pmean.new_empty(s) for s in ((parts,), (parts, C), (parts, C)))
        plan["stats_partial"](dev, pcount, pmean, pm2, qcount, qmean, qm2, qm2, qm2, qm2, float(eps))
        pcount, pmean, pm2 = qcount, qmean, qm2
    mean, invstd, var = (x.new_empty((C,), dtype=torch.float32) for _ in range(3))
    plan["stats"](dev, pcount, pmean, pm2, pm2, pm2, pm2, mean, invstd, var, float(eps))
    scale = bn_weight.float() * invstd
    shift = bn_bias.float() - mean * scale
    _, zs = _rows_view(z, z)
    _, os_ = _rows_view(out, out)
    plan["apply"](dev, z, out, scale, shift, z[0, 0].numel(), C, *zs, *os_, int(relu))
    return out, z, mean, invstd, var, none.clone()


def _triton_backward(
    grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd, stride, padding, dilation, groups, relu,
    need_grad_x, need_grad_weight,
):  # fmt: skip
    conv = Conv(stride, padding, dilation, groups)
    C = z.shape[1]
    plan = _plan(x, weight, z.shape, conv.groups, True)
    M = z.numel() // C
    scale = bn_weight.float() * invstd
    shift = bn_bias.float() - mean * scale
    sums, apply = plan["backward_sums"], plan["backward_apply"]
    tiles = sums.grid[0] * sums.grid[2]
    psg = z.new_empty((tiles, C), dtype=torch.float32)
    psgx = torch.empty_like(psg)
    gz = torch.empty_like(z)
    grad_out, gs = _rows_view(grad_out, z)
    _, zs = _rows_view(z, z)
    args = (z[0, 0].numel(), C, *gs, *zs, int(relu))
    dev = z.device
    sums(dev, grad_out, z, gz, scale, shift, mean, invstd, psg, psgx, psg, psgx, *args)
    sum_g, sum_gx = psg.sum(0), psgx.sum(0)
    apply(dev, grad_out, z, gz, scale, shift, mean, invstd, sum_g / M, sum_gx / M, psg, psgx, *args)
    gx, gw = _conv_backward(gz, x, weight, conv, need_grad_x, need_grad_weight)
    return gx, gw, sum_gx.to(bn_weight.dtype), sum_g.to(bn_bias.dtype)


def _conv_backward(gz, x, weight, conv: Conv, need_grad_x, need_grad_weight):
    """(grad_x in gz's layout or empty, grad_weight in weight's layout or empty), by ATen."""
    stride, padding, dilation, groups = conv
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gz, x, weight, None, stride, padding, dilation, False, [0, 0, 0], groups,
        [need_grad_x, need_grad_weight, False],
    )  # fmt: skip
    gx = gx.contiguous(memory_format=_format_of(gz)) if need_grad_x else gz.new_empty((0,))
    gw = gw.contiguous(memory_format=_format_of(weight)) if need_grad_weight else weight.new_empty((0,))
    return gx, gw


# ---------------------------------------------------------------------------------------------------
# The op: forward returns (out, z, mean, invstd, var, x_conv), see csrc/ops.cpp. z, mean, invstd (and
# x_conv, or x) are saved for backward in training; in eval the output itself is (for the ReLU mask).


def _empty(like: Tensor, shape, memory_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


def _format_of(t: Tensor) -> torch.memory_format:
    """The layout the kernels give a tensor shaped like t: channels_last_3d when t is in it (and not also
    in NCDHW), else NCDHW."""
    return _CL if t.is_contiguous(memory_format=_CL) and not t.is_contiguous() else torch.contiguous_format


def _dense(t: Tensor) -> bool:
    """t is dense in NCDHW or in channels_last_3d order, the two layouts the kernels address."""
    return t.is_contiguous() or t.is_contiguous(memory_format=_CL)


def _fake(
    x, weight, bias, g, b, rmean, rvar, stride, padding, dilation, groups, training, eps, relu, cl, backend
):
    shape = _out_shape(x, weight, Conv(stride, padding, dilation, groups))
    out = _empty(x, shape, _format_of(x))
    acc = acc_dtype(x)
    if not training:
        return (out, x.new_empty((0,)), *(x.new_empty((0,), dtype=acc) for _ in range(3)), x.new_empty((0,)))
    conv_fmt = _CL if cl or backend == "triton" else torch.contiguous_format
    z = _empty(x, shape, conv_fmt)
    stats = [x.new_empty((shape[1],), dtype=acc) for _ in range(3)]
    copies = backend != "triton" and not x.is_contiguous(memory_format=conv_fmt)
    x_conv = torch.empty_like(x, memory_format=conv_fmt) if copies else x.new_empty((0,))
    return (out, z, *stats, x_conv)


def _backward_fake(
    grad_out, x, weight, g, b, z, mean, invstd, stride, padding, dilation, groups, relu, need_gx, need_gw,
    backend,
):  # fmt: skip
    gx = torch.empty_like(x, memory_format=_format_of(z)) if need_gx else z.new_empty((0,))
    gw = torch.empty_like(weight, memory_format=_format_of(weight)) if need_gw else weight.new_empty((0,))
    return gx, gw, torch.empty_like(g), torch.empty_like(b)


def _setup_context(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *conv, training, eps, relu, _ = inputs
    out, z, mean, invstd, var, x_conv = output
    ctx.conv = Conv(*conv)
    ctx.training, ctx.relu, ctx.eps = training, relu, eps
    ctx.has_bias = bias is not None
    if training:
        # x itself, not the conv's channels_last_3d copy of it (x_conv), unless x is in neither dense
        # layout: x is often saved anyway by the layer that made it (torchvision's in-place ReLU after the
        # residual add saves its output for its mask), and then saving the copy held x twice. The
        # backward kernels convert x to z's layout again (one copy per step, as in the forward).
        x_saved = x if x_conv.numel() == 0 or _dense(x) else x_conv
        if (x_source := _converted_from(x)) is not None:
            # x is a channels-last copy made for this block: save what it was made of (every backend's
            # backward takes x in any layout)
            x_saved = x_source
        # the recompute below, on the cpu backend, where no saved-tensor hooks move or drop tensors
        # (checkpointing, offloading): z held on a node for the next block would escape them
        recompute = ctx.backend == "cpu" and saved_tensor_hooks_keep_tensors()
        source = _made_by_a_block(x) if recompute else None
        ctx.x_from_relu = None
        if source is None:
            ctx.save_for_backward(x_saved, weight, bn_weight, bn_bias, z, mean, invstd)
        else:
            # x is another block's output relu(z' * scale' + shift'), which nothing else need hold: save that
            # block's z' (it saves z' itself, so this costs nothing) and statistics, and recompute x in
            # backward, in z''s channels-last layout, rather than hold x too (see _made_by_a_block)
            z_src, *stats_src, relu_src = source
            ctx.x_from_relu = relu_src
            ctx.save_for_backward(z_src, weight, bn_weight, bn_bias, z, mean, invstd, *stats_src)
        # offered to the block this one feeds (_made_by_a_block)
        if recompute and type(ctx) is _OP.function._backward_cls:
            versions = (out._version, bn_weight._version, bn_bias._version)
            ctx.as_source = (z, mean, invstd, bn_weight, bn_bias, relu, versions)
    else:
        ctx.save_for_backward(x, weight, bias, bn_weight, running_mean, running_var, out if relu else None)
    ctx.mark_non_differentiable(z, mean, invstd, var, x_conv)


def _backward(ctx, run, grad_out, *_):
    need = ctx.needs_input_grad
    if ctx.training:
        x, weight, bn_weight, bn_bias, z, mean, invstd, *stats_src = ctx.saved_tensors
        if ctx.x_from_relu is not None:
            x = _block_output(x, *stats_src, ctx.x_from_relu)
        # (the compiled backward op is called directly in an ordinary backward: the Python backward custom
        # op cost ~0.1 ms per block, which a small model's many narrow blocks felt; see mvfast.ops._op)
        gx, gw, gg, gb = run(
            ctx, grad_out, x, weight, bn_weight, bn_bias, z, mean, invstd, *ctx.conv, ctx.relu, *need[:2]
        )
        # the conv bias cancels in training-mode BN: its gradient is exactly zero
        gbias = weight.new_zeros((weight.shape[0],)) if ctx.has_bias else None
    else:
        gx, gw, gbias, gg, gb = _eval_backward(ctx, grad_out)
    return (gx if need[0] else None, gw if need[1] else None, gbias, gg, gb) + (None,) * 11


def _made_by_a_block(x: Tensor):
    """(z, mean, invstd, bn_weight, bn_bias, relu) of the fused CPU block in training whose output x is,
    unchanged since (the same tensor, no in-place op on it, nor on that block's BN weight and bias), or
    None.

    Each such block leaves these on its autograd node (``as_source``) when it runs; the block that x then
    feeds takes them, so that it saves z instead of x and recomputes x = relu(z * scale + shift) in its
    backward (one elementwise pass, the forward's own arithmetic: bit for bit on the development CPU). In a
    chain of fused blocks (an NCDHW or channels-last model) each block then holds its z only, where the
    eager chain holds z and the ReLU's output. A residual add in place on x (torchvision's ``out +=
    identity``) gives x another autograd node, and x is saved as usual. What no block took is let go of
    when the node's own backward runs (mvfast.ops._op).
    """
    node = x.grad_fn
    source = getattr(node, "as_source", None)
    if (
        source is None
        or x.output_nr != 0
        or (x._version, source[3]._version, source[4]._version) != source[-1]
    ):
        return None
    del node.as_source
    return source[:-1]


_CONVERTED_FROM = "_mvfast_channels_last_of"  # on a copy made by channels_last_input: (weakref, versions)


def channels_last_input(x: Tensor) -> Tensor:
    """x (5-D, or 4-D for a 2D block) in channels-last for a fused block (``mvfast.fuse(model,
    channels_last=...)``): a copy when it is not already. Where autograd records, the copy remembers x
    (weakly), so that the kernel backend's block that reads it saves x in its place, as it saves an NCDHW x
    it converts itself, and converts again in backward: x is often held anyway (an in-place ReLU's output
    is saved for its mask, a data batch by its caller), the copy then is not."""
    fmt = _CL if x.dim() == 5 else torch.channels_last
    if x.is_contiguous(memory_format=fmt):
        return x
    y = x.contiguous(memory_format=fmt)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        setattr(y, _CONVERTED_FROM, (weakref.ref(x), x._version, y._version))
    return y


def _converted_from(x: Tensor) -> Tensor | None:
    """The dense tensor whose channels-last copy x is (channels_last_input; for the 2D op, x is that copy's
    ``unsqueeze(2)``, and so is the answer), unchanged since, as is the copy; else None."""
    copy = x if x._base is None else x._base
    source = getattr(copy, _CONVERTED_FROM, None)
    if source is None:
        return None
    ref, version, copy_version = source
    original = ref()
    if original is None or original._version != version or copy._version != copy_version:
        return None
    if copy is not x:
        original = original.unsqueeze(2)
    if original.shape != x.shape or not _dense(original):
        return None
    return original


def _block_output(z, mean, invstd, bn_weight, bn_bias, relu):
    """relu(z * scale + shift) with scale and shift as the forward computes them (csrc/conv3d_bn_relu.h):
    the output of the block that saved z, in z's layout."""
    acc = acc_dtype(z)
    scale = bn_weight.to(acc) * invstd
    shift = bn_bias.to(acc) - mean * scale
    # one multiply-add, rounded once, as the kernels' vector loop compiles (a mul then an add may differ
    # from their output by an ulp)
    y = torch.addcmul(shift.view(1, -1, 1, 1, 1), z.to(acc), scale.view(1, -1, 1, 1, 1)).to(z.dtype)
    return y.relu_() if relu else y


def _eval_backward(ctx, grad_out):
    """Gradients through the folded eval form y = relu(conv3d(x, w s) + b'), in ATen ops: the rare case of
    backpropagating through a block in eval mode (frozen BatchNorm)."""
    x, weight, bias, bn_weight, running_mean, running_var, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    acc = acc_dtype(x)
    inv = (running_var.to(acc) + ctx.eps).rsqrt()
    s = bn_weight.to(acc) * inv  # (C,)
    g = grad_out if out is None else torch.where(out > 0, grad_out, torch.zeros_like(grad_out))
    w_folded = (weight.to(acc) * s.view(-1, 1, 1, 1, 1)).to(x.dtype)
    gx, gwf, _ = torch.ops.aten.convolution_backward(
        g, x, w_folded, None, stride, padding, dilation, False, [0, 0, 0], groups, [True, True, False]
    )
    gb_folded = g.to(acc).sum((0, 2, 3, 4))  # (C,)
    gwf = gwf.to(acc)
    centred = -running_mean.to(acc) + (bias.to(acc) if bias is not None else 0)
    gs = (gwf * weight.to(acc)).sum((1, 2, 3, 4)) + gb_folded * centred
    gw = (gwf * s.view(-1, 1, 1, 1, 1)).to(weight.dtype)
    gbias = (gb_folded * s).to(bias.dtype) if bias is not None else None
    return gx, gw, gbias, (gs * inv).to(bn_weight.dtype), gb_folded.to(bn_weight.dtype)


def _autocast(args, dtype):
    """The autocast rule: the conv (x, weight, bias) runs in autocast's dtype, the output in it too, as an
    autocast conv's; BatchNorm's parameters and running statistics stay as they are (float32), which the
    kernels take beside 16-bit x, and the statistics accumulate in float32."""
    x, weight, bias, *rest = args
    return (*cast_all((x, weight, bias), dtype), *rest)


_OP = Op(
    OpSpec(
        name=OP,
        schema="(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, "
        "Tensor? running_mean, Tensor? running_var, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool training, float eps, bool relu, bool conv_channels_last) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        backward_schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
        "Tensor z, Tensor mean, Tensor invstd, int[] stride, int[] padding, int[] dilation, int groups, "
        "bool relu, bool need_grad_x, bool need_grad_weight) -> (Tensor, Tensor, Tensor, Tensor)",
        fake=_fake,
        backward_fake=_backward_fake,
        triton_forward=lambda *args: _triton_forward(*args[:-1]),  # the CPU kernels' conv_channels_last
        triton_backward=_triton_backward,
        setup_context=_setup_context,
        backward=_backward,
        autocast=_autocast,
    ),
    "Conv3dBNReLUFunction",
)


# ---------------------------------------------------------------------------------------------------
# Public function


def _conv_channels_last(backend: str, x: Tensor, weight: Tensor) -> bool:
    """The layout the training conv runs in, channels_last_3d (True) or NCDHW (False).

    The cpu kernels in float32 and bfloat16: channels_last_3d, which oneDNN is faster in where the
    activations outweigh the weights, unless the weights are NCDHW and over 4x the size of x. Such a
    weight would be copied to channels-last (by ATen, at a few GB/s) in the forward, again in the
    backward, and its gradient back, three copies that cost more than the layout gains: on the development
    CPU r3d_18's 512-channel convs at batch 2 took 102 ms forward+backward channels-last against 54 ms
    NCDHW, its 64-channel ones at 8x56x56 74 ms against 98 ms. Elsewhere (float16, float64, CUDA) x's own
    layout: ATen's float16 and float64 CPU convs gain nothing from channels-last.
    """
    if backend == "cpu" and cpu_prefers_channels_last(x):
        return _format_of(weight) is _CL or 4 * x.numel() >= weight.numel()
    return _format_of(x) is _CL


def cpu_prefers_channels_last(x: Tensor) -> bool:
    """x is a CPU tensor whose convolutions oneDNN runs faster channels-last (float32, bfloat16)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _MKLDNN


def conv3d_bn_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """``relu(batch_norm(conv3d(x)))``, fused, with nn.BatchNorm3d's semantics.

    Args:
        x (Tensor[N, Cin, D, H, W]): input, NCDHW or channels_last_3d.
        weight (Tensor[C, Cin/groups, kD, kH, kW]), bias (Tensor[C] or None): the convolution.
        bn_weight, bn_bias (Tensor[C] or None): BatchNorm's affine parameters (None: 1 and 0).
        running_mean, running_var (Tensor[C] or None): BatchNorm's running statistics, updated in place in
            training; None (track_running_stats=False) normalises with the batch statistics in eval too.
        stride, padding, dilation (int or tuple of 3), groups: as nn.Conv3d (zero padding).
        training: normalise with the batch statistics and update the running ones.
        momentum: as nn.BatchNorm3d; None is the cumulative moving average over num_batches_tracked.
        eps: added to the variance.
        relu: apply the ReLU (False gives a fused Conv3d + BatchNorm3d).
        num_batches_tracked (Tensor[] int64 or None): BatchNorm's batch counter, incremented in place in
            training.

    Returns:
        Tensor[N, C, Do, Ho, Wo] in x's dtype and memory format (statistics accumulated in float32).

    Under ``torch.autocast`` (CPU or CUDA) x, weight and bias are cast to autocast's dtype (float64 ones
    are left alone, as autocast does) and the output is in that dtype, as an autocast conv's; BatchNorm's
    parameters and running statistics stay float32 (the op takes them beside 16-bit x), its statistics
    accumulate in float32.

    On a GPU, a float32 convolution uses TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is set (the
    default), as cuDNN's does.
    """
    conv = Conv(stride, padding, dilation, groups)
    bn = BN(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, num_batches_tracked)
    return fused(OP, 3, x, weight, bias, conv, bn, relu, _chain, run_kernels)


def run_kernels(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, conv: Conv, bn: BN, relu: bool):
    """Kernel backend ``backend`` on arguments that were validated (5-D tensors; stride, padding and
    dilation lists of 3), and the running-statistics update: what conv3d_bn_relu and conv2d_bn_relu (its
    tensors given a depth of 1) run after their checks.

    torch.compile and the Triton backend go through the custom op ``mvfast::conv3d_bn_relu``, eager calls
    of the CPU and CUDA kernels around its Python layers (see mvfast.ops._op).
    """
    C = weight.shape[0]
    g = bn.weight if bn.weight is not None else x.new_ones((C,))
    b = bn.bias if bn.bias is not None else x.new_zeros((C,))
    # asked in training only: eval convolves in x's layout and ignores it, so torch.export of an eval model
    # with a dynamic batch meets no guard on the size rule
    conv_cl = batch_stats(bn) and _conv_channels_last(backend, x, weight)
    args = (x, weight, bias, g, b, bn.running_mean, bn.running_var, *conv, batch_stats(bn), float(bn.eps))
    out, _, mean, _, var, _ = _OP.call((*args, relu, conv_cl), backend)
    if bn.training and bn.running_mean is not None:
        _update_running_stats(bn, mean, var, bias)
    return out


def _update_running_stats(bn: BN, mean, var, bias):
    """running += f (batch - running), f = momentum (or 1 / num_batches_tracked), in the statistics' float32
    / float64 (ATen's batch_norm computes f batch + (1 - f) running: the same up to rounding), one lerp_
    each when the buffers are in that dtype."""
    running_mean, running_var, num_batches_tracked, momentum = (
        bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum
    )  # fmt: skip
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            if num_batches_tracked is None:
                return
            f = 1.0 / num_batches_tracked.to(mean.dtype)
        else:
            f = momentum
        if bias is not None:
            mean = mean + bias.detach().to(mean.dtype)
        if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            running_mean.lerp_(mean, f)
            running_var.lerp_(var, f)
        else:
            running_mean.copy_(running_mean.to(mean.dtype).lerp_(mean, f))
            running_var.copy_(running_var.to(var.dtype).lerp_(var, f))
