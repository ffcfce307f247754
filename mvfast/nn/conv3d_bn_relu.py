"""``mvfast.nn.Conv3dBNReLU``: the module over :func:`mvfast.ops.conv3d_bn_relu`."""

from __future__ import annotations

from torch import Tensor, nn

from mvfast.ops import conv3d_bn_relu


class Conv3dBNReLU(nn.Module):
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

    Args: as nn.Conv3d (zero padding only) and nn.BatchNorm3d; ``bias`` is the conv's bias (False by
    default: BatchNorm cancels it).

    Shape: x (Tensor[N, Cin, D, H, W], NCDHW or channels_last_3d) -> Tensor[N, C, Do, Ho, Wo] in x's
    memory format.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        relu: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(padding, str):
            raise ValueError(f"Conv3dBNReLU: padding must be an int or a tuple of 3 ints, got {padding!r}")
        kw = dict(device=device, dtype=dtype)
        self.add_module(
            "0",
            nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **kw),
        )
        self.add_module("1", nn.BatchNorm3d(out_channels, eps, momentum, **kw))
        self.relu = relu

    @classmethod
    def from_modules(cls, conv: nn.Conv3d, bn: nn.BatchNorm3d, relu: bool = True) -> Conv3dBNReLU:
        """A fused block over these very modules (shared, not copied): their parameters, buffers and
        hyper-parameters, and their training flags."""
        if not fusable(conv, bn):
            raise ValueError(
                f"Conv3dBNReLU.from_modules: cannot fuse {conv} and {bn} (needs an nn.Conv3d with "
                "zero padding given as ints and an nn.BatchNorm3d over its out channels)"
            )
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.add_module("0", conv)
        block.add_module("1", bn)
        block.relu = relu
        block.train(bn.training)
        return block

    @property
    def conv(self) -> nn.Conv3d:
        return self._modules["0"]

    @property
    def bn(self) -> nn.BatchNorm3d:
        return self._modules["1"]

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        # nn.BatchNorm3d's rules: batch statistics in training or without running statistics; the running
        # statistics are updated only in training.
        track = not bn.training or bn.track_running_stats
        return conv3d_bn_relu(
            x,
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            bn.running_mean if track else None,
            bn.running_var if track else None,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            training=bn.training,
            momentum=bn.momentum,
            eps=bn.eps,
            relu=self.relu,
            num_batches_tracked=bn.num_batches_tracked if bn.training and bn.track_running_stats else None,
        )

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def fusable(conv, bn) -> bool:
    """True when ``conv`` then ``bn`` can run as one Conv3dBNReLU: any nn.Conv3d subclass with zero padding
    given as numbers (not 'same'), an nn.BatchNorm3d (not a subclass with its own forward) over its out
    channels, neither with hooks that the fused op would skip."""
    if not isinstance(conv, nn.Conv3d) or type(bn) is not nn.BatchNorm3d:
        return False
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.transposed:
        return False
    if type(conv).forward is not nn.Conv3d.forward or bn.num_features != conv.out_channels:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn))
