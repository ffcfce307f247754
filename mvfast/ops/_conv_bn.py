"""What conv3d_bn_relu and conv2d_bn_relu share: their argument groups, their checks (each error in the
op's own terms, 2D or 3D), the eager BatchNorm + ReLU tail of their references, and the body of both
public functions (autocast, checks, backend, then the reference or the kernels of the 3D op).

Inside, the convolution's and BatchNorm's arguments travel as two named tuples, :class:`Conv` and
:class:`BN`; the public functions and the custom op ``mvfast::conv3d_bn_relu`` take them flat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast import _backend
from mvfast.ops import _checks
from mvfast.ops._op import autocast_dtype, autocast_off, cast_all
from mvfast.ops._triton import MAX_GRID

CHANNEL_TILE = 64  # the most output channels a program of the Triton conv and BN kernels takes


class Conv(NamedTuple):
    """The convolution's arguments besides its tensors (as nn.Conv3d's; lists of nd ints once checked)."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


class BN(NamedTuple):
    """BatchNorm's arguments (as nn.BatchNorm3d's; weight and bias None: 1 and 0)."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    momentum: float | None
    eps: float
    num_batches_tracked: Tensor | None


def batch_stats(bn: BN) -> bool:
    """Normalise with the batch's statistics: in training, and in eval without running ones. (A function,
    not a property of BN: torch 2.4's dynamo does not trace properties of a NamedTuple.)"""
    return bn.training or bn.running_mean is None


def fused(op: str, nd: int, x, weight, bias, conv: Conv, bn: BN, relu: bool, reference, kernels) -> Tensor:
    """conv{nd}d_bn_relu: under autocast, itself on the cast arguments with autocast off (x, weight and
    bias in autocast's dtype, the output in it; BatchNorm's parameters and statistics stay float32, which
    the kernels take beside 16-bit x); else the checks, then ``reference(x, weight, bias, conv, bn, relu)``
    or ``kernels(backend, x, weight, bias, conv, bn, relu)`` as the backend says."""
    if dtype := autocast_dtype(x):
        with autocast_off(x):
            x, weight, bias = cast_all((x, weight, bias), dtype)
            return fused(op, nd, x, weight, bias, conv, bn, relu, reference, kernels)
    conv = validate(op, nd, x, weight, bias, conv, bn)
    name = _backend.resolve(op, x.device, lambda b: op_reasons(b, x, weight, conv, bn))
    if name == "reference":
        return reference(x, weight, bias, conv, bn, relu)
    return kernels(name, x, weight, bias, conv, bn, relu)


def op_reasons(backend: str, x: Tensor, weight: Tensor, conv: Conv, bn: BN) -> list[str]:
    if backend != "triton":
        return []
    reasons = []
    # grid axis 1 holds the output channels' tiles (of at most CHANNEL_TILE) in every kernel
    C = weight.shape[0]
    if C > MAX_GRID[1] * CHANNEL_TILE:
        reasons.append(
            f"the triton kernels launch the output channels in tiles of {CHANNEL_TILE} along a grid axis of "
            f"at most {MAX_GRID[1]} programs (CUDA's limit): out_channels <= {MAX_GRID[1] * CHANNEL_TILE}; "
            f"it is {C}"
        )
    if x.dtype == torch.float64:
        reasons.append("the triton kernels take float32, float16 and bfloat16, not float64")
    # grid axis 2 holds the groups in the conv kernel and the samples in the batch-statistics kernels
    most = MAX_GRID[2]
    if conv.groups > most:
        reasons.append(
            f"the triton conv launches at most {most} groups (CUDA's grid limit); groups is {conv.groups}"
        )
    if batch_stats(bn) and x.shape[0] > most:
        reasons.append(
            f"the triton batch-statistics kernels launch at most {most} samples (CUDA's grid limit); "
            f"N is {x.shape[0]}"
        )
    return reasons


# ---------------------------------------------------------------------------------------------------
# Checks


def _tuple(op: str, name: str, v, minimum: int, nd: int = 3) -> list[int]:
    # the common cases first, in fewer steps (this runs three times on every call): an int, nd ints
    if type(v) is int:
        if v >= minimum:
            return [v] * nd
    elif type(v) in (tuple, list) and len(v) == nd and all(type(a) is int for a in v) and min(v) >= minimum:
        return list(v)
    vals = [v] * nd if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, (tuple, list))
        or len(vals) != nd
        or any(isinstance(a, bool) or not isinstance(a, int) or a < minimum for a in vals)
    ):
        raise ValueError(f"{op}: {name} must be an int >= {minimum} or a tuple of {nd} such ints, got {v!r}")
    return [int(a) for a in vals]


def out_spatial(x_shape, w_shape, conv: Conv) -> list[int]:
    stride, padding, dilation, _ = conv
    return [
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(len(stride))
    ]


_DIMS = {
    3: ("(N, C, D, H, W)", "(C, Cin/groups, kD, kH, kW)"),
    2: ("(N, C, H, W)", "(C, Cin/groups, kH, kW)"),
}


def validate(op: str, nd: int, x, weight, bias, conv: Conv, bn: BN) -> Conv:
    """The checks of conv{nd}d_bn_relu's arguments, each error in the op's own terms (``nd`` spatial
    dimensions). Returns conv with stride, padding and dilation as lists of nd ints."""
    _checks.tensor(op, "x", x, ndim=nd + 2, dims=_DIMS[nd][0])
    _checks.tensor(op, "weight", weight, ndim=nd + 2, dims=_DIMS[nd][1])
    groups = conv.groups
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
    # (fields, not bn[:4]: torch 2.7's dynamo fails slicing a NamedTuple)
    g, b, rmean, rvar = bn.weight, bn.bias, bn.running_mean, bn.running_var
    bn_tensors = ("bn_weight", g), ("bn_bias", b), ("running_mean", rmean), ("running_var", rvar)
    for name, t in (("bias", bias), *bn_tensors):
        if t is not None:
            _checks.tensor(op, name, t, ndim=1, shape=(C,))
    if (rmean is None) != (rvar is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    _checks.same_dtype(op, "x", x, weight=weight, bias=bias)
    for name, t in bn_tensors:
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{op}: {name} must have the dtype of x ({str(x.dtype).replace('torch.', '')}) or "
                f"float32, got {str(t.dtype).replace('torch.', '')}"
            )
    _checks.same_device(
        op, "x", x, weight=weight, bias=bias, bn_weight=g, bn_bias=b, running_mean=rmean, running_var=rvar
    )
    conv = Conv(
        _tuple(op, "stride", conv.stride, 1, nd),
        _tuple(op, "padding", conv.padding, 0, nd),
        _tuple(op, "dilation", conv.dilation, 1, nd),
        groups,
    )
    eps, momentum = bn.eps, bn.momentum
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps must be a float > 0, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1
    ):
        raise ValueError(f"{op}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    out = out_spatial(x.shape, weight.shape, conv)
    if min(out) < 1:
        raise ValueError(
            f"{op}: x's spatial size {tuple(x.shape[2:])} is too small for the kernel "
            f"{tuple(weight.shape[2:])} with padding {conv.padding} and dilation {conv.dilation}"
        )
    if batch_stats(bn) and x.shape[0] * math.prod(out) <= 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, got conv output of shape "
            f"{(x.shape[0], C, *out)}"
        )
    return conv


# ---------------------------------------------------------------------------------------------------
# The references' tail


def _factor(momentum, num_batches_tracked):
    """nn.BatchNorm's exponential_average_factor, after counting this batch."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def batch_norm_relu(z: Tensor, bn: BN, relu: bool) -> Tensor:
    """relu(batch_norm(z)) as nn.BatchNorm*d and nn.ReLU run it: the eager references' common tail."""
    g, b, running_mean, running_var, training, momentum, eps, num_batches_tracked = bn
    factor = _factor(momentum, num_batches_tracked) if training and running_mean is not None else 0.0
    y = F.batch_norm(z, running_mean, running_var, g, b, batch_stats(bn), factor, eps)
    return F.relu(y) if relu else y


def reference(conv_fn: Callable) -> Callable:
    """The eager chain ``relu(batch_norm(conv_fn(x)))`` on grouped arguments, for F.conv3d or F.conv2d."""

    def chain(x, weight, bias, conv: Conv, bn: BN, relu: bool) -> Tensor:
        return batch_norm_relu(conv_fn(x, weight, bias, *conv), bn, relu)

    return chain
