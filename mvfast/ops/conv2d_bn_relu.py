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

The arguments are checked by the 3D op's checks in 2D terms (4-D shapes, pairs of stride/padding/dilation),
so that an error names what the caller passed; then the 3D op's kernels run on the views.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mvfast.ops._conv_bn import BN, Conv, fused, reference
from mvfast.ops.conv3d_bn_relu import run_kernels

OP = "conv2d_bn_relu"
_chain = reference(F.conv2d)


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
    it (running statistics updated in place in training); differentiable by autograd. Its convolution
    is F.conv2d, not the 3D op over a depth of 1: the oracle of the tests and the ``reference`` backend."""
    conv = Conv(stride, padding, dilation, groups)
    bn = BN(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, num_batches_tracked)
    return _chain(x, weight, bias, conv, bn, relu)


def _kernels(backend, x, weight, bias, conv: Conv, bn: BN, relu: bool) -> Tensor:
    """The 3D op's kernels on the depth-1 views."""
    stride, padding, dilation, groups = conv
    conv = Conv([1, *stride], [0, *padding], [1, *dilation], groups)
    out = run_kernels(backend, x.unsqueeze(2), weight.unsqueeze(2), bias, conv, bn, relu)  # (N, C, 1, Ho, Wo)
    return out.squeeze(2)  # (N, C, Ho, Wo)


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

    Under ``torch.autocast`` as conv3d_bn_relu: x, weight and bias in autocast's dtype, the output in it,
    BatchNorm's parameters and statistics float32.

    On a GPU, a float32 convolution uses TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is set (the
    default), as cuDNN's does.
    """
    conv = Conv(stride, padding, dilation, groups)
    bn = BN(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, num_batches_tracked)
    # the reference backend runs the eager 2D chain, not conv3d over a depth of 1
    return fused(OP, 2, x, weight, bias, conv, bn, relu, _chain, _kernels)
