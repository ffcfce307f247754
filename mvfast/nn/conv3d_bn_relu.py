"""``mvfast.nn.Conv3dBNReLU``: the module over :func:`mvfast.ops.conv3d_bn_relu`."""

from __future__ import annotations

from torch import nn

from mvfast.nn._conv_bn_relu import ConvBNReLU
from mvfast.ops import conv3d_bn_relu


class Conv3dBNReLU(ConvBNReLU):
    """``nn.Sequential(nn.Conv3d, nn.BatchNorm3d, nn.ReLU)`` as one fused op, with the same parameters,
    buffers and state_dict keys.

    The conv and the BatchNorm are kept as the children ``"0"`` and ``"1"`` (reachable as ``.conv`` and
    ``.bn``), exactly where nn.Sequential holds them, so the state_dict is key for key that of the
    Sequential it replaces (``"0.weight"``, ``"1.running_mean"``, ``"1.num_batches_tracked"``, ...) and
    checkpoints of either load into the other. The ReLU has no state. ``relu=False`` gives a fused
    Conv3d + BatchNorm3d.

    Training and eval follow nn.BatchNorm3d exactly: batch statistics and the in-place running-statistics
    update (momentum, or the cumulative average when momentum is None; num_batches_tracked counted) in
    training, the running statistics folded into the conv in eval. The running-statistics update is done
    by :func:`mvfast.ops.conv3d_bn_relu` in Python under ``torch.no_grad()`` from the batch statistics that
    the functional custom op returns (torch.library gives no autograd to ops that mutate their inputs);
    this passes ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.

    ``Conv3dBNReLU.from_modules(conv, bn, relu=True)`` builds a block over existing modules (shared, not
    copied); ``Conv3dBNReLU.fusable(conv, bn)`` says whether they can be fused.

    Args: as nn.Conv3d (zero padding only) and nn.BatchNorm3d; ``bias`` is the conv's bias (False by
    default: BatchNorm cancels it).

    Shape: x (Tensor[N, Cin, D, H, W], NCDHW or channels_last_3d) -> Tensor[N, C, Do, Ho, Wo] in x's
    memory format; in channels_last_3d whatever x's when ``channels_last`` is True, and where it is
    ``"auto"`` (what ``mvfast.fuse(model)`` sets) on the CPU in float32 and bfloat16. In training, a block
    that converts a dense NCDHW x saves x itself, not the copy (x is often held anyway: by the layer before
    it, or as the caller's batch).
    """

    dims = 3
    conv_type = nn.Conv3d
    bn_type = nn.BatchNorm3d
    op = staticmethod(conv3d_bn_relu)


fusable = Conv3dBNReLU.fusable  # the module-level name that this module exported before Conv2dBNReLU
