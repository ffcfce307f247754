"""The common base of :class:`~mvfast.nn.Conv2dBNReLU` and :class:`~mvfast.nn.Conv3dBNReLU`: one design,
parameterised by the conv and BatchNorm types and the fused op they run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mvfast.ops.conv3d_bn_relu import channels_last_input, cpu_prefers_channels_last


class ConvBNReLU(nn.Module):
    """``nn.Sequential(ConvNd, BatchNormNd, nn.ReLU)`` as one fused op. A subclass sets ``dims``,
    ``conv_type``, ``bn_type`` and ``op`` (the functional op, called with the conv's and the BatchNorm's
    tensors and hyper-parameters, as a staticmethod). See :class:`~mvfast.nn.Conv3dBNReLU` for the
    contract."""

    dims: int
    conv_type: type[nn.Module]
    bn_type: type[nn.Module]
    op: Callable[..., Tensor]
    # Set by ``mvfast.fuse(model, channels_last=...)``. True: convert x to channels-last (a no-op when it
    # is already, as the output of the block before it is), so the output is channels-last too. "auto"
    # (fuse's default): the same for CPU tensors in float32 or bfloat16, the layout the CPU kernels mostly
    # convolve in; elsewhere x's layout is kept. False: x's layout is kept.
    channels_last: bool | str = False

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
            raise ValueError(
                f"{type(self).__name__}: padding must be an int or a tuple of {self.dims} ints, got "
                f"{padding!r}"
            )
        kw = dict(device=device, dtype=dtype)
        self.add_module(
            "0",
            self.conv_type(
                in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **kw
            ),
        )
        self.add_module("1", self.bn_type(out_channels, eps, momentum, **kw))
        self.relu = relu

    @classmethod
    def from_modules(cls, conv: nn.Module, bn: nn.Module, relu: bool = True) -> ConvBNReLU:
        """A fused block over these very modules (shared, not copied): their parameters, buffers and
        hyper-parameters, and their training flags."""
        if not cls.fusable(conv, bn):
            raise ValueError(
                f"{cls.__name__}.from_modules: cannot fuse {conv} and {bn} (needs an "
                f"nn.{cls.conv_type.__name__} with zero padding given as ints and an "
                f"nn.{cls.bn_type.__name__} over its out channels)"
            )
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.add_module("0", conv)
        block.add_module("1", bn)
        block.relu = relu
        block.train(bn.training)
        return block

    @classmethod
    def fusable(cls, conv, bn) -> bool:
        """True when ``conv`` then ``bn`` can run as one block of this class: any ``conv_type`` subclass
        with zero padding given as numbers (not 'same'), a ``bn_type`` (not a subclass with its own
        forward) over its out channels, neither with hooks that the fused op would skip."""
        if not isinstance(conv, cls.conv_type) or type(bn) is not cls.bn_type:
            return False
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.transposed:
            return False
        if type(conv).forward is not cls.conv_type.forward or bn.num_features != conv.out_channels:
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn))

    @property
    def conv(self) -> nn.Module:
        return self._modules["0"]

    @property
    def bn(self) -> nn.Module:
        return self._modules["1"]

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = self.conv, self.bn
        # nn.BatchNorm's rules: batch statistics in training or without running statistics; the running
        # statistics are updated only in training.
        track = not bn.training or bn.track_running_stats
        if self.channels_last is True or (self.channels_last == "auto" and cpu_prefers_channels_last(x)):
            if not _functorch_wrapped(x):  # vmap has no memory formats but the contiguous one
                x = channels_last_input(x)
        return self.op(
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
        return f"relu={self.relu}" + (f", channels_last={self.channels_last!r}" if self.channels_last else "")


def _functorch_wrapped(x: Tensor) -> bool:
    """x is a tensor of torch.func's transforms (vmap's batched tensors and the like); never under
    torch.compile, which traces vmap itself."""
    if torch.compiler.is_compiling():
        return False
    query = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return query is not None and query(x)
