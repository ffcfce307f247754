"""``mvfast.nn.AttentionPool``: the module over :func:`mvfast.ops.attention_pool`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mvfast.ops import attention_pool


class AttentionPool(nn.Module):
    """Attention pooling (paper eq. 10-13) of a set of local features into one feature per head.

    Args:
        dim: D, the size of each local feature.
        heads: H, the number of attention heads (the paper uses 1).

    Shape:
        x (Tensor[B, L, D]), mask (Tensor[B, L], bool, True = valid, optional) -> Tensor[B, H, D]; with
        ``return_weights=True`` also the attention weights Tensor[B, L, H] (the key frames).

    There is no bias: a per-head bias is constant over the set and cancels in the softmax. The weights
    start at zero, so a fresh module averages the valid features (eq. 12, the uniform special case) and
    learns where to look from there.
    """

    def __init__(self, dim: int, heads: int = 1, device=None, dtype=None):
        super().__init__()
        for name, v in (("dim", dim), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AttentionPool: {name} must be an int >= 1, got {v!r}")
        self.dim, self.heads = dim, heads
        self.weight = nn.Parameter(torch.empty(heads, dim, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def output_dim(self) -> int:
        return self.heads * self.dim

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, return_weights: bool = False):
        return attention_pool(x, self.weight, None, mask, return_weights=return_weights)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"
