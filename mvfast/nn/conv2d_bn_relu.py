"""``mvfast.nn.Conv2dBNReLU``: the module over :func:`mvfast.ops.conv2d_bn_relu`."""

from __future__ import annotations

from torch import nn

from mvfast.nn._conv_bn_relu import ConvBNReLU
from mvfast.ops import conv2d_bn_relu


class Conv2dBNReLU(ConvBNReLU):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)`` as one fused op, with the same parameters,
    buffers and state_dict keys: the 2D twin of :class:`~mvfast.nn.Conv3dBNReLU`, with the same design.

    The conv and the BatchNorm are the children ``"0"`` and ``"1"`` (``.conv`` and ``.bn``), where
    nn.Sequential holds them, so checkpoints of either load into the other (``"0.weight"``,
    ``"1.running_mean"``, ``"1.num_batches_tracked"``, ...). ``relu=False`` gives a fused Conv2d +
    BatchNorm2d. Training and eval follow nn.BatchNorm2d exactly (batch statistics and the in-place
    running-statistics update in training, the running statistics folded into the conv in eval); the
    kernels are those of the 3D op over a depth of 1 (see :func:`mvfast.ops.conv2d_bn_relu`).

    ``Conv2dBNReLU.from_modules(conv, bn, relu=True)`` builds a block over existing modules (shared, not
    copied); ``Conv2dBNReLU.fusable(conv, bn)`` says whether they can be fused.

    Args: as nn.Conv2d (zero padding only) and nn.BatchNorm2d; ``bias`` is the conv's bias (False by
    default: BatchNorm cancels it).

    Shape: x (Tensor[N, Cin, H, W], NCHW or channels_last) -> Tensor[N, C, Ho, Wo] in x's memory format;
    in channels_last whatever x's when ``channels_last`` is True, and where it is ``"auto"`` (what
    ``mvfast.fuse(model)`` sets) on the CPU in float32 and bfloat16.
    """

    dims = 2
    conv_type = nn.Conv2d
    bn_type = nn.BatchNorm2d
    op = staticmethod(conv2d_bn_relu)
