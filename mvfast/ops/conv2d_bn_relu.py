"""Fused Conv2d + BatchNorm2d + ReLU: exactly ``relu(batch_norm(conv2d(x)))`` with nn.BatchNorm2d's
semantics in training and eval, run as a view onto :func:`mvfast.ops.conv3d_bn_relu`.

A 2D convolution is a 3D one over a depth of 1:

    x       (N, Cin, H, W)          -> x.unsqueeze(2)       (N, Cin, 1, H, W)
    weight  (C, Cin/groups, kH, kW) -> weight.unsqueeze(2)  (C, Cin/groups, 1, kH, kW)
    stride (sH, sW), padding (pH, pW), dilation (dH, dW) -> (1, sH, sW), (0, pH, pW), (1, dH, dW)
    out     (N, C, 1, Ho, Wo)       -> out.squeeze(2)       (N, C, Ho, Wo)

and BatchNorm3d over (N, C, 1, Ho, Wo) reduces over the same N * Ho * Wo values per channel as BatchNorm2d
over (N, C, Ho, Wo), so every backend, the registered autograd, the fake kernels and the running-statistics
update of the 3D op serve the 2D one unchanged, with no copy: unsqueeze and squeeze are views. Layouts map
onto each other too: ``x.unsqueeze(2)`` of a channels_last (NHWC) tensor is channels_last_3d-contiguous, the
3D op keeps x's memory format, and the squeezed output is channels_last again, so a channels_last model
stays channels_last end to end (and an NCHW one NCHW).

The arguments are checked here first, in 2D terms (4-D shapes, pairs of stride/padding/dilation), so that
an error names what the caller passed. Only a backend that was asked for by name and cannot take the call
(e.g. ``triton`` with float64) is reported by the 3D op, as ``mvfast.conv3d_bn_relu``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mvfast import _backend
from mvfast.ops import _checks
from mvfast.ops.conv3d_bn_relu import conv3d_bn_relu

OP = "conv2d_bn_relu"


def _pair(name: str, v, minimum: int) -> list[int]:
    vals = [v] * 2 if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, (tuple, list))
        or len(vals) != 2
        or any(isinstance(a, bool) or not isinstance(a, int) or a < minimum for a in vals)
    ):
        raise ValueError(f"{OP}: {name} must be an int >= {minimum} or a tuple of 2 such ints, got {v!r}")
    return [int(a) for a in vals]


def _out_spatial(x_shape, w_shape, stride, padding, dilation) -> list[int]:
    return [
        (x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    ]


def _validate(
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
    """The 3D op's checks, worded for 2D; returns (stride, padding, dilation) as lists of 2."""
    _checks.tensor(OP, "x", x, ndim=4, dims="(N, C, H, W)")
    _checks.tensor(OP, "weight", weight, ndim=4, dims="(C, Cin/groups, kH, kW)")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{OP}: groups must be an int >= 1, got {groups!r}")
    C, cin_g = weight.shape[0], weight.shape[1]
    if C < 1 or C % groups:
        raise ValueError(
            f"{OP}: weight's out channels ({C}) must be a positive multiple of groups ({groups})"
        )
    if cin_g * groups != x.shape[1]:
        want = x.shape[1] // groups if x.shape[1] % groups == 0 else "?"
        raise ValueError(
            f"{OP}: weight must have shape ({C}, {want}, *, *) for x with {x.shape[1]} channels and "
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
            _checks.tensor(OP, name, t, ndim=1, shape=(C,))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{OP}: running_mean and running_var must both be given or both be None")
    _checks.same_dtype(OP, "x", x, weight=weight, bias=bias)
    for name, t in (
        ("bn_weight", bn_weight),
        ("bn_bias", bn_bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{OP}: {name} must have the dtype of x ({str(x.dtype).replace('torch.', '')}) or "
                f"float32, got {str(t.dtype).replace('torch.', '')}"
            )
    _checks.same_device(
        OP,
        "x",
        x,
        weight=weight,
        bias=bias,
        bn_weight=bn_weight,
        bn_bias=bn_bias,
        running_mean=running_mean,
        running_var=running_var,
    )
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{OP}: eps must be a float > 0, got {eps!r}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1
    ):
        raise ValueError(f"{OP}: momentum must be a float in [0, 1] or None, got {momentum!r}")
    out = _out_spatial(x.shape, weight.shape, stride, padding, dilation)
    if min(out) < 1:
        raise ValueError(
            f"{OP}: x's spatial size {tuple(x.shape[2:])} is too small for the kernel "
            f"{tuple(weight.shape[2:])} with padding {padding} and dilation {dilation}"
        )
    if batch_stats and x.shape[0] * math.prod(out) <= 1:
        raise ValueError(
            f"{OP}: expected more than 1 value per channel when training, got conv output of shape "
            f"{(x.shape[0], C, *out)}"
        )
    return stride, padding, dilation


def _factor(momentum, num_batches_tracked):
    """nn.BatchNorm2d's exponential_average_factor, after counting this batch."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            return 1.0 / float(num_batches_tracked)
    return 0.0 if momentum is None else momentum


def conv2d_bn_relu_reference(
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
    """The eager chain ``relu(batch_norm(conv2d(x)))`` exactly as nn.Conv2d, nn.BatchNorm2d and nn.ReLU run
    it (running statistics updated in place in training); differentiable by autograd. Independent of the
    3D op: the oracle of the tests and the ``reference`` backend."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    factor = _factor(momentum, num_batches_tracked) if training and running_mean is not None else 0.0
    y = F.batch_norm(
        z, running_mean, running_var, bn_weight, bn_bias, training or running_mean is None, factor, eps
    )
    return F.relu(y) if relu else y


def conv2d_bn_relu(
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
    """``relu(batch_norm(conv2d(x)))``, fused, with nn.BatchNorm2d's semantics.

    Args:
        x (Tensor[N, Cin, H, W]): input, NCHW or channels_last.
        weight (Tensor[C, Cin/groups, kH, kW]), bias (Tensor[C] or None): the convolution.
        bn_weight, bn_bias (Tensor[C] or None): BatchNorm's affine parameters (None: 1 and 0).
        running_mean, running_var (Tensor[C] or None): BatchNorm's running statistics, updated in place in
            training; None (track_running_stats=False) normalises with the batch statistics in eval too.
        stride, padding, dilation (int or tuple of 2), groups: as nn.Conv2d (zero padding).
        training: normalise with the batch statistics and update the running ones.
        momentum: as nn.BatchNorm2d; None is the cumulative moving average over num_batches_tracked.
        eps: added to the variance.
        relu: apply the ReLU (False gives a fused Conv2d + BatchNorm2d).
        num_batches_tracked (Tensor[] int64 or None): BatchNorm's batch counter, incremented in place in
            training.

    Returns:
        Tensor[N, C, Ho, Wo] in x's dtype and memory format (statistics accumulated in float32).
    """
    stride, padding, dilation = _validate(
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
        training or running_mean is None,
    )
    if _backend.get_backend() == "reference":  # the eager 2D chain, not conv3d over a depth of 1
        return conv2d_bn_relu_reference(
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
    out = conv3d_bn_relu(
        x.unsqueeze(2),  # (N, Cin, 1, H, W)
        weight.unsqueeze(2),  # (C, Cin/groups, 1, kH, kW)
        bias,
        bn_weight,
        bn_bias,
        running_mean,
        running_var,
        stride=(1, *stride),
        padding=(0, *padding),
        dilation=(1, *dilation),
        groups=groups,
        training=training,
        momentum=momentum,
        eps=eps,
        relu=relu,
        num_batches_tracked=num_batches_tracked,
    )
    return out.squeeze(2)  # (N, C, Ho, Wo)
