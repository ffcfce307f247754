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
backward fused in the extension's kernels). On the CPU, float32 and bfloat16 convs run in
channels_last_3d, which oneDNN is much faster in; the output keeps x's memory format. grad_x comes back in
the conv's layout, as ATen's own conv backward answers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast import _backend
from mvfast.ops import _checks, _eager
from mvfast.ops._triton import dot_precision, next_pow2, tl, triton

OP = "conv3d_bn_relu"
_CL = torch.channels_last_3d
_MKLDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile does not trace the query


def _tuple(op: str, name: str, v, minimum: int, nd: int = 3) -> list[int]:
    vals = [v] * nd if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, (tuple, list))
        or len(vals) != nd
        or any(isinstance(a, bool) or not isinstance(a, int) or a < minimum for a in vals)
    ):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a tuple of {nd} such ints, got {v!r}")
    return [int(a) for a in vals]


def _out_spatial(x_shape, w_shape, stride, padding, dilation) -> list[int]:
    return [
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(len(stride))
    ]


_DIMS = {
    3: ("(N, C, D, H, W)", "(C, Cin/groups, kD, kH, kW)"),
    2: ("(N, C, H, W)", "(C, Cin/groups, kH, kW)"),
}


def _validate(
    op,
    nd,
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    padding,
    dilation,
    groups,
    eps,
    momentum,
    batch_stats,
):
    """The checks of conv{nd}d_bn_relu's arguments, each error in the op's own terms (``nd`` spatial
    dimensions). Returns (stride, padding, dilation) as lists of nd ints."""
    _checks.tensor(op, "x", x, ndim=nd + 2, dims=_DIMS[nd][0])
    _checks.tensor(op, "weight", weight, ndim=nd + 2, dims=_DIMS[nd][1])
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups must be an int >= 1, got {groups!r}")
    C, cin_g = weight.shape[0], weight.shape[1]
    if C < 1 or C % groups:
        raise ValueError(
            f"{op}: weight's out channels ({C}) must be a positive multiple of groups ({groups})"
        )
    if cin_g * groups != x.shape[1]:
        want = x.shape[1] // groups if x.shape[1] % groups == 0 else "?"
        raise ValueError(
            f"{op}: weight must have shape ({C}, {want}{', *' * nd}) for x with {x.shape[1]} channels and "
            f"groups={groups}, got {tuple(weight.shape)}"
        )
    for name, t in (
        ("bias", bias),
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None:
            _checks.tensor(op, name, t, ndim=1, shape=(C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    _checks.same_dtype(op, "x", x, weight=weight, bias=bias)
    for name, t in (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{op}: {name} must have the dtype of x ({str(x.dtype).replace('torch.', '')}) or "
                f"float32, got {str(t.dtype).replace('torch.', '')}"
            )
    _checks.same_device(
        op,
        "x",
        x,
        weight=weight,
        bias=bias,
        bn_weight=bn_weight,
        bn_bias=bn_bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    stride = _tuple(op, "stride", stride, 1, nd)
    padding = _tuple(op, "padding", padding, 0, nd)
    dilation = _tuple(op, "dilation", dilation, 1, nd)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a float > 0, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1
    ):
        raise ValueError(f"{op}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    out = _out_spatial(x.shape, weight.shape, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(
            f"{op}: x's spatial size {tuple(x.shape[2:])} is too small for the kernel "
            f"{tuple(weight.shape[2:])} with padding {padding} and dilation {dilation}"
        )
    if batch_stats and x.shape[0] * math.prod(out) <= 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got conv output of shape "
            f"{(x.shape[0], C, *out)}"
        )
    return stride, padding, dilation


# ---------------------------------------------------------------------------------------------------
# Reference


def _factor(momentum, num_batches_tracked):
    """nn.BatchNorm's exponential_average_factor, after counting this batch."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


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
    z = F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    return _batch_norm_relu(
        z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu, num_batches_tracked
    )


def _batch_norm_relu(
    z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, relu, num_batches_tracked
) -> Tensor:
    """relu(batch_norm(z)) as nn.BatchNorm*d and nn.ReLU run it: the eager references' common tail."""
    factor = _factor(momentum, num_batches_tracked) if training and running_mean is not None else 0.0
    y = F.batch_norm(
        z, running_mean, running_var, bn_weight, bn_bias, training or running_mean is None, factor, eps
    )
    return F.relu(y) if relu else y


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Implicit GEMM: rows are the M = N*Do*Ho*Wo output positions, columns the out channels of a group, and
# the reduction runs over the kernel taps and the group's in channels: for each tap, a (BLOCK_M x BLOCK_K)
# tile of x gathered at the tap's input positions (zero outside the padding) times a (BLOCK_K x BLOCK_N)
# tile of the weight. The epilogue either adds the folded bias and applies ReLU (eval) or writes z and the
# tile's per-channel count-mean-M2 (training), combined by a second kernel with the Chan/Welford formula.
# Every tensor is addressed through its strides, so NCDHW and channels_last_3d need no copy; z is
# allocated channels_last_3d so that its stores run along channels.


@triton.jit
def _cbr_conv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    z_ptr,
    pmean_ptr,
    pm2_ptr,
    M,
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
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < COUT_G
    ow = rm % WO
    t = rm // WO
    oh = t % HO
    t = t // HO
    od = t % DO
    nb = (t // DO).to(tl.int64)
    co = grp * COUT_G + rn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(KD * KH * KW):
        kd = tap // (KH * KW)
        kh = (tap // KW) % KH
        kw = tap % KW
        idd = od * STD - PD + kd * DD
        ih = oh * STH - PH + kh * DH
        iw = ow * STW - PW + kw * DW
        pos_ok = m_ok & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = nb * sxn + idd.to(tl.int64) * sxd + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        w_tap = kd * swd + kh * swh + kw * sww
        for c0 in range(0, CIN_G, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            c_ok = ci < CIN_G
            a = tl.load(
                x_ptr + x_row[:, None] + (grp * CIN_G + ci).to(tl.int64)[None, :] * sxc,
                mask=pos_ok[:, None] & c_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + co[None, :] * swo + ci[:, None] * swi + w_tap,
                mask=c_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    zt = acc.to(z_ptr.dtype.element_ty)
    ok = m_ok[:, None] & n_ok[None, :]
    z_off = (nb * szn + od.to(tl.int64) * szd + oh.to(tl.int64) * szh + ow.to(tl.int64) * szw)[
        :, None
    ] + co.to(tl.int64)[None, :] * szc
    tl.store(z_ptr + z_off, zt, mask=ok)
    if STATS:
        # statistics of z as stored (rounded to its dtype), as an eager BatchNorm would see it
        v = tl.where(ok, zt.to(tl.float32), 0.0)
        cnt = tl.sum(m_ok.to(tl.float32), axis=0)
        mean = tl.sum(v, axis=0) / cnt
        d = tl.where(ok, v - mean[None, :], 0.0)
        tl.store(pmean_ptr + pid_m * C + co, mean, mask=n_ok)
        tl.store(pm2_ptr + pid_m * C + co, tl.sum(d * d, axis=0), mask=n_ok)


@triton.jit
def _cbr_stats_kernel(
    pmean_ptr,
    pm2_ptr,
    mean_ptr,
    invstd_ptr,
    var_ptr,
    M,
    C,
    NB,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    # Chan/Welford combine of the tiles' float32 (count, mean, M2), as welford_combine, carried in float64
    # so that the many small tiles add no rounding of their own beyond that of their float32 means. It
    # costs NB x C operations, nothing next to the conv.
    n = tl.zeros((BLOCK_C,), dtype=tl.float64)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float64)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for i in range(NB):
        nb = tl.minimum(BLOCK_M, M - i * BLOCK_M).to(tl.float64)
        mb = tl.load(pmean_ptr + i * C + c, mask=c_ok, other=0.0).to(tl.float64)
        m2b = tl.load(pm2_ptr + i * C + c, mask=c_ok, other=0.0).to(tl.float64)
        nab = n + nb
        delta = mb - mean
        f = nb / nab
        mean += delta * f
        m2 += m2b + delta * delta * n * f
        n = nab
    tl.store(mean_ptr + c, mean.to(tl.float32), mask=c_ok)
    tl.store(invstd_ptr + c, (1.0 / tl.sqrt(m2 / M + eps)).to(tl.float32), mask=c_ok)
    tl.store(var_ptr + c, (m2 / (M - 1)).to(tl.float32), mask=c_ok)


@triton.jit
def _cbr_offsets(rm, DO, HO, WO, sn, sc, sd, sh, sw, c):
    ow = rm % WO
    t = rm // WO
    oh = t % HO
    t = t // HO
    od = t % DO
    nb = t // DO
    row = nb.to(tl.int64) * sn + od.to(tl.int64) * sd + oh.to(tl.int64) * sh + ow.to(tl.int64) * sw
    return row[:, None] + c.to(tl.int64)[None, :] * sc


@triton.jit
def _cbr_apply_kernel(
    z_ptr,
    out_ptr,
    scale_ptr,
    shift_ptr,
    M,
    C,
    DO,
    HO,
    WO,
    szn,
    szc,
    szd,
    szh,
    szw,
    son,
    soc,
    sod,
    soh,
    sow,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rm < M)[:, None] & (c < C)[None, :]
    z = tl.load(z_ptr + _cbr_offsets(rm, DO, HO, WO, szn, szc, szd, szh, szw, c), mask=ok, other=0.0)
    sc = tl.load(scale_ptr + c, mask=c < C, other=0.0)
    sh = tl.load(shift_ptr + c, mask=c < C, other=0.0)
    y = z.to(tl.float32) * sc[None, :] + sh[None, :]
    if RELU:
        y = tl.where(y < 0, 0.0, y)
    tl.store(
        out_ptr + _cbr_offsets(rm, DO, HO, WO, son, soc, sod, soh, sow, c),
        y.to(out_ptr.dtype.element_ty),
        mask=ok,
    )


@triton.jit
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
    M,
    C,
    DO,
    HO,
    WO,
    sgn,
    sgc,
    sgd,
    sgh,
    sgw,
    szn,
    szc,
    szd,
    szh,
    szw,
    RELU: tl.constexpr,
    APPLY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """APPLY=False: per-tile sums of g and g * xhat (g the gradient past the recomputed ReLU mask);
    APPLY=True: gz = scale (g - mean_g - xhat mean_gx), written in z's layout."""
    pid_m = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (rm < M)[:, None] & c_ok[None, :]
    z_off = _cbr_offsets(rm, DO, HO, WO, szn, szc, szd, szh, szw, c)
    z = tl.load(z_ptr + z_off, mask=ok, other=0.0).to(tl.float32)
    gy = tl.load(gy_ptr + _cbr_offsets(rm, DO, HO, WO, sgn, sgc, sgd, sgh, sgw, c), mask=ok, other=0.0)
    sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    iv = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)[None, :]
    g = gy.to(tl.float32)
    if RELU:
        g = tl.where(z * sc + sh > 0, g, 0.0)
    g = tl.where(ok, g, 0.0)
    xhat = (z - mu) * iv
    if APPLY:
        mg = tl.load(mg_ptr + c, mask=c_ok, other=0.0)[None, :]
        mgx = tl.load(mgx_ptr + c, mask=c_ok, other=0.0)[None, :]
        gz = sc * (g - mg - xhat * mgx)
        tl.store(gz_ptr + z_off, gz.to(gz_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(psg_ptr + pid_m * C + c, tl.sum(g, axis=0), mask=c_ok)
        tl.store(psgx_ptr + pid_m * C + c, tl.sum(g * xhat, axis=0), mask=c_ok)


def _conv_blocks(cin_g: int, cout_g: int) -> tuple[int, int, int]:
    return 64, min(64, next_pow2(cout_g)), min(32, next_pow2(cin_g))


def _triton_conv(x, weight, bias, out, stride, padding, dilation, groups, relu, stats):
    """Runs the implicit-GEMM kernel into out (any strides); returns the partial statistics or None."""
    N, _, D, H, W = x.shape
    C, cin_g, KD, KH, KW = weight.shape
    DO, HO, WO = out.shape[2:]
    M = N * DO * HO * WO
    cout_g = C // groups
    bm, bn, bk = _conv_blocks(cin_g, cout_g)
    nb = triton.cdiv(M, bm)
    pmean = x.new_empty((nb, C), dtype=torch.float32) if stats else out
    pm2 = torch.empty_like(pmean) if stats else out
    _cbr_conv_kernel[(nb, triton.cdiv(cout_g, bn), groups)](
        x,
        weight,
        bias if bias is not None else out,
        out,
        pmean,
        pm2,
        M,
        cin_g,
        cout_g,
        C,
        D,
        H,
        W,
        DO,
        HO,
        WO,
        *x.stride(),
        *weight.stride(),
        *out.stride(),
        *stride,
        *padding,
        *dilation,
        KD=KD,
        KH=KH,
        KW=KW,
        HAS_BIAS=bias is not None,
        RELU=relu,
        STATS=stats,
        PREC=dot_precision(x.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    return (pmean, pm2, bm) if stats else None


def _out_shape(x, weight, stride, padding, dilation):
    return (x.shape[0], weight.shape[0], *_out_spatial(x.shape, weight.shape, stride, padding, dilation))


def _triton_forward(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    padding,
    dilation,
    groups,
    training,
    eps,
    relu,
):
    shape = _out_shape(x, weight, stride, padding, dilation)
    out = _empty(x, shape, _format_of(x))
    none, none32 = x.new_empty((0,)), x.new_empty((0,), dtype=torch.float32)
    if not training:
        scale = bn_weight.float() * (running_var.float() + eps).rsqrt()
        b = bn_bias.float() - running_mean.float() * scale
        if bias is not None:
            b = b + bias.float() * scale
        w = (weight.float() * scale.view(-1, 1, 1, 1, 1)).to(x.dtype)
        _triton_conv(x, w, b, out, stride, padding, dilation, groups, relu, stats=False)
        return out, none, none32, none32.clone(), none32.clone(), none.clone()
    C = shape[1]
    z = _empty(x, shape, _CL)
    pmean, pm2, bm = _triton_conv(x, weight, None, z, stride, padding, dilation, groups, False, stats=True)
    M = z.numel() // C
    mean, invstd, var = (x.new_empty((C,), dtype=torch.float32) for _ in range(3))
    _cbr_stats_kernel[(triton.cdiv(C, 64),)](
        pmean, pm2, mean, invstd, var, M, C, pmean.shape[0], eps, BLOCK_M=bm, BLOCK_C=64
    )
    scale = bn_weight.float() * invstd
    shift = bn_bias.float() - mean * scale
    bm2, bc = 64, min(64, next_pow2(C))
    _cbr_apply_kernel[(triton.cdiv(M, bm2), triton.cdiv(C, bc))](
        z, out, scale, shift, M, C, *shape[2:], *z.stride(), *out.stride(), RELU=relu, BLOCK_M=bm2, BLOCK_C=bc
    )
    return out, z, mean, invstd, var, none.clone()


def _triton_backward(
    grad_out,
    x,
    weight,
    bn_weight,
    bn_bias,
    z,
    mean,
    invstd,
    stride,
    padding,
    dilation,
    groups,
    relu,
    need_grad_x,
    need_grad_weight,
):
    C = z.shape[1]
    M = z.numel() // C
    scale = bn_weight.float() * invstd
    shift = bn_bias.float() - mean * scale
    bm, bc = 64, min(64, next_pow2(C))
    grid = (triton.cdiv(M, bm), triton.cdiv(C, bc))
    psg = z.new_empty((grid[0], C), dtype=torch.float32)
    psgx = torch.empty_like(psg)
    gz = torch.empty_like(z)
    args = (M, C, *z.shape[2:], *grad_out.stride(), *z.stride())
    _cbr_backward_kernel[grid](
        grad_out,
        z,
        gz,
        scale,
        shift,
        mean,
        invstd,
        psg,
        psgx,
        psg,
        psgx,
        *args,
        RELU=relu,
        APPLY=False,
        BLOCK_M=bm,
        BLOCK_C=bc,
    )
    sum_g, sum_gx = psg.sum(0), psgx.sum(0)
    _cbr_backward_kernel[grid](
        grad_out,
        z,
        gz,
        scale,
        shift,
        mean,
        invstd,
        sum_g / M,
        sum_gx / M,
        psg,
        psgx,
        *args,
        RELU=relu,
        APPLY=True,
        BLOCK_M=bm,
        BLOCK_C=bc,
    )
    return _conv_backward(gz, x, weight, stride, padding, dilation, groups, need_grad_x, need_grad_weight) + (
        sum_gx.to(bn_weight.dtype),
        sum_g.to(bn_bias.dtype),
    )


def _conv_backward(gz, x, weight, stride, padding, dilation, groups, need_grad_x, need_grad_weight):
    """(grad_x in gz's layout or empty, grad_weight in weight's layout or empty), by ATen."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gz,
        x,
        weight,
        None,
        stride,
        padding,
        dilation,
        False,
        [0, 0, 0],
        groups,
        [need_grad_x, need_grad_weight, False],
    )
    gx = gx.contiguous(memory_format=_format_of(gz)) if need_grad_x else gz.new_empty((0,))
    gw = gw.contiguous(memory_format=_format_of(weight)) if need_grad_weight else weight.new_empty((0,))
    return gx, gw


# ---------------------------------------------------------------------------------------------------
# Custom ops: forward returns (out, z, mean, invstd, var, x_conv), see csrc/ops.cpp. z, mean, invstd (and
# x_conv, or x) are saved for backward in training; in eval the output itself is (for the ReLU mask).


def _empty(like: Tensor, shape, memory_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


def _format_of(t: Tensor) -> torch.memory_format:
    """The layout the kernels give a tensor shaped like t: channels_last_3d when t is in it (and not also
    in NCDHW), else NCDHW."""
    return _CL if t.is_contiguous(memory_format=_CL) and not t.is_contiguous() else torch.contiguous_format


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mvfast::conv3d_bn_relu", mutates_args=())
def _conv3d_bn_relu_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    training: bool,
    eps: float,
    relu: bool,
    conv_channels_last: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _triton_forward(
            x,
            weight,
            bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            stride,
            padding,
            dilation,
            groups,
            training,
            eps,
            relu,
        )
    return torch.ops.mvfast.conv3d_bn_relu_fwd(
        x,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride,
        padding,
        dilation,
        groups,
        training,
        eps,
        relu,
        conv_channels_last,
    )


@_conv3d_bn_relu_op.register_fake
def _conv3d_bn_relu_fake(
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    padding,
    dilation,
    groups,
    training,
    eps,
    relu,
    conv_channels_last,
    backend="cpu",
):
    shape = _out_shape(x, weight, stride, padding, dilation)
    out = _empty(x, shape, _format_of(x))
    acc = _acc_dtype(x)
    if not training:
        return (out, x.new_empty((0,)), *(x.new_empty((0,), dtype=acc) for _ in range(3)), x.new_empty((0,)))
    conv_fmt = _CL if conv_channels_last or backend == "triton" else _format_of(x)
    z = _empty(x, shape, conv_fmt)
    stats = [x.new_empty((shape[1],), dtype=acc) for _ in range(3)]
    copies = backend != "triton" and not x.is_contiguous(memory_format=conv_fmt)
    x_conv = torch.empty_like(x, memory_format=conv_fmt) if copies else x.new_empty((0,))
    return (out, z, *stats, x_conv)


@torch.library.custom_op("mvfast::conv3d_bn_relu_backward", mutates_args=())
def _conv3d_bn_relu_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    z: Tensor,
    mean: Tensor,
    invstd: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
    need_grad_x: bool,
    need_grad_weight: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (
        grad_out,
        x,
        weight,
        bn_weight,
        bn_bias,
        z,
        mean,
        invstd,
        stride,
        padding,
        dilation,
        groups,
        relu,
        need_grad_x,
        need_grad_weight,
    )
    if backend == "triton":
        return _triton_backward(*args)
    return torch.ops.mvfast.conv3d_bn_relu_bwd(*args)


@_conv3d_bn_relu_backward_op.register_fake
def _conv3d_bn_relu_backward_fake(
    grad_out,
    x,
    weight,
    bn_weight,
    bn_bias,
    z,
    mean,
    invstd,
    stride,
    padding,
    dilation,
    groups,
    relu,
    need_grad_x,
    need_grad_weight,
    backend="cpu",
):
    gx = torch.empty_like(x, memory_format=_format_of(z)) if need_grad_x else z.new_empty((0,))
    gw = (
        torch.empty_like(weight, memory_format=_format_of(weight))
        if need_grad_weight
        else weight.new_empty((0,))
    )
    return gx, gw, torch.empty_like(bn_weight), torch.empty_like(bn_bias)


if hasattr(torch.ops.mvfast, "conv3d_bn_relu_fwd"):  # the compiled kernel ops, when mvfast._C is loaded
    torch.library.register_fake(
        "mvfast::conv3d_bn_relu_fwd",
        lambda *args: _conv3d_bn_relu_fake(*args, backend="cpu"),
    )
    torch.library.register_fake(
        "mvfast::conv3d_bn_relu_bwd",
        lambda *args: _conv3d_bn_relu_backward_fake(*args, backend="cpu"),
    )


def _setup_context(ctx, inputs, output):
    (
        x,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride,
        padding,
        dilation,
        groups,
        training,
        eps,
        relu,
        conv_channels_last,
        backend,
    ) = inputs
    out, z, mean, invstd, var, x_conv = output
    ctx.conv = (stride, padding, dilation, groups)
    ctx.training, ctx.relu, ctx.eps, ctx.backend = training, relu, eps, backend
    ctx.has_bias = bias is not None
    if training:
        ctx.save_for_backward(x_conv if x_conv.numel() else x, weight, bn_weight, bn_bias, z, mean, invstd)
    else:
        ctx.save_for_backward(x, weight, bias, bn_weight, running_mean, running_var, out if relu else None)
    ctx.mark_non_differentiable(z, mean, invstd, var, x_conv)
    # The other outputs never carry a gradient: without this autograd would fill a zero tensor of z's size
    # (and x_conv's) for each backward, which on a small model's training step came to 2 ms of memset.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_):
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    if grad_out is None:  # undefined: no gradient reached the output (gradcheck tests this case)
        return (None,) * len(need)
    if ctx.training:
        x, weight, bn_weight, bn_bias, z, mean, invstd = ctx.saved_tensors
        # The compiled kernels' backward op (it has a fake kernel, so torch.compile traces it as it is) is
        # called directly in an ordinary backward: the Python backward custom op cost ~0.1 ms per block,
        # which a small model's many narrow blocks felt. Triton's Python kernels, and a backward that
        # records a graph (create_graph=True), go through the backward custom op: it has no derivative
        # and says so, where the compiled op would be dropped from the graph and the second derivative
        # silently wrong.
        args = (
            grad_out,
            x,
            weight,
            bn_weight,
            bn_bias,
            z,
            mean,
            invstd,
            stride,
            padding,
            dilation,
            groups,
            ctx.relu,
            need[0],
            need[1],
        )
        if ctx.backend == "triton" or torch.is_grad_enabled():
            gx, gw, gg, gb = torch.ops.mvfast.conv3d_bn_relu_backward(*args, ctx.backend)
        else:
            gx, gw, gg, gb = torch.ops.mvfast.conv3d_bn_relu_bwd(*args)
        # the conv bias cancels in training-mode BN: its gradient is exactly zero
        gbias = weight.new_zeros((weight.shape[0],)) if ctx.has_bias else None
    else:
        gx, gw, gbias, gg, gb = _eval_backward(ctx, grad_out)
    return (
        gx if need[0] else None,
        gw if need[1] else None,
        gbias,
        gg,
        gb,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _eval_backward(ctx, grad_out):
    """Gradients through the folded eval form y = relu(conv3d(x, w s) + b'), in ATen ops: the rare case of
    backpropagating through a block in eval mode (frozen BatchNorm)."""
    x, weight, bias, bn_weight, running_mean, running_var, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    acc = _acc_dtype(x)
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


_conv3d_bn_relu_op.register_autograd(_backward, setup_context=_setup_context)


def _kernel_forward(*args):
    return torch.ops.mvfast.conv3d_bn_relu_fwd(*args)


_KernelFunction = _eager.kernel_function("Conv3dBNReLUFunction", _kernel_forward, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------------
# Public function


def _op_reasons(backend: str, x: Tensor) -> list[str]:
    if backend == "triton" and x.dtype == torch.float64:
        return ["the triton kernels take float32, float16 and bfloat16, not float64"]
    return []


def _cpu_conv_channels_last(x: Tensor) -> bool:
    """The CPU kernels run the conv in channels_last_3d where oneDNN is fast in it (float32, bfloat16);
    ATen's float16 and float64 CPU convs take no advantage of it."""
    return x.dtype in (torch.float32, torch.bfloat16) and _MKLDNN


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
    """
    batch_stats = training or running_mean is None
    stride, padding, dilation = _validate(
        OP,
        3,
        x,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride,
        padding,
        dilation,
        groups,
        eps,
        momentum,
        batch_stats,
    )
    name = _backend.resolve(OP, x.device, lambda b: _op_reasons(b, x))
    if name == "reference":
        return conv3d_bn_relu_reference(
            x,
            weight,
            bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            stride,
            padding,
            dilation,
            groups,
            training,
            momentum,
            eps,
            relu,
            num_batches_tracked,
        )
    return run_kernels(
        name,
        x,
        weight,
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride,
        padding,
        dilation,
        groups,
        training,
        momentum,
        eps,
        relu,
        num_batches_tracked,
    )


def run_kernels(
    backend,
    x,
    weight,
    bias,
    bn_weight,
    bn_bias,
    running_mean,
    running_var,
    stride,
    padding,
    dilation,
    groups,
    training,
    momentum,
    eps,
    relu,
    num_batches_tracked,
) -> Tensor:
    """Kernel backend ``backend`` on arguments that were validated (5-D tensors; stride, padding and
    dilation lists of 3), and the running-statistics update: what conv3d_bn_relu and conv2d_bn_relu (its
    tensors given a depth of 1) run after their checks.

    torch.compile and the Triton backend go through the custom op ``mvfast::conv3d_bn_relu``, eager calls
    of the CPU and CUDA kernels around its Python layers (see mvfast.ops._eager).
    """
    C = weight.shape[0]
    g = bn_weight if bn_weight is not None else x.new_ones((C,))
    b = bn_bias if bn_bias is not None else x.new_zeros((C,))
    batch_stats = training or running_mean is None
    conv_cl = backend == "cpu" and _cpu_conv_channels_last(x)
    args = (x, weight, bias, g, b, running_mean, running_var, stride, padding, dilation, groups, batch_stats)
    out, _, mean, _, var, _ = _eager.call(
        torch.ops.mvfast.conv3d_bn_relu,
        _KernelFunction,
        _kernel_forward,
        (*args, float(eps), relu, conv_cl),
        backend,
    )
    if training and running_mean is not None:
        _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, bias, momentum)
    return out


def _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, bias, momentum):
    """running += f (batch - running), f = momentum (or 1 / num_batches_tracked), in the statistics' float32
    / float64 (ATen's batch_norm computes f batch + (1 - f) running: the same up to rounding), one lerp_
    each when the buffers are in that dtype."""
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
