"""How a public op calls its kernels: the custom op for torch.compile and Triton, and, for eager calls of
the compiled CPU/CUDA kernels, the same forward, context and backward without torch.library's Python
layers.

Each op is a ``torch.library`` custom op with a fake kernel and registered autograd, so that
``torch.compile(fullgraph=True)`` traces it whole. Called eagerly, that machinery is Python on every call:
the autograd layer re-binds the op's arguments to its schema (about 50 us for the 16 of conv3d_bn_relu on
the development CPU), then redispatches to a Python function that calls the compiled kernel op. Where the
tensors are large it does not matter; a small model's dozens of narrow layers felt it as much as their
kernels. So eager calls of the ``cpu`` and ``cuda`` backends (not traced by torch.compile or torch.jit) go

- through :func:`kernel_function`'s autograd.Function (the custom op's own setup_context and backward
  around the compiled kernel op) when a gradient is wanted,
- straight to the compiled kernel op when none is (inference, ``torch.no_grad``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mvfast.ops._op import kernel_function  # noqa: F401  (conv3d_bn_relu's, until it has an OpSpec)


def call(custom_op, function: type, forward: Callable, args: tuple, backend: str):
    """The op's outputs for ``args`` (the custom op's arguments without the backend) on ``backend``."""
    if backend == "triton" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return custom_op(*args, backend)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return function.apply(*args, backend)
    return forward(*args)
