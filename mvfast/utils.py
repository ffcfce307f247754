"""Measuring what mvfast claims: memory saved for backward."""

from __future__ import annotations

from collections.abc import Callable

import torch


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn()`` runs.

    Tensors that share a storage (views, or one tensor saved by several ops) count once; inputs that are
    saved count too, since they stay alive for backward. This is how mvfast's memory claims are measured:

    >>> x = torch.randn(8, 300, 1024, requires_grad=True)
    >>> saved_bytes(lambda: mvfast.ops.attention_pool(x, w))  # doctest: +SKIP
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
