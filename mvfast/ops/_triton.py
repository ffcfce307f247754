"""Triton, when installed; stand-ins otherwise so that modules defining kernels still import.

``TRITON_INTERPRET=1`` must be in the environment before this is imported for the kernels to run on CPU
tensors (Triton reads it when ``@triton.jit`` wraps a function).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - the torch CUDA wheels bring triton
    AVAILABLE = False

    class _Stub:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _Stub()


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of a ``tl.dot`` with float32 operands in a kernel whose inputs have ``dtype``.

    float32 inputs: TF32 exactly when PyTorch's own float32 matmuls use it
    (``torch.set_float32_matmul_precision``), so a float32 kernel is as precise as the eager PyTorch it
    replaces. 16-bit inputs: TF32, which holds float16 and bfloat16 values exactly (10 mantissa bits) and
    keeps float32's range for the intermediates.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def next_pow2(n: int, at_least: int = 16) -> int:
    """Block size for a dimension of n: a power of two, and at least 16, as ``tl.dot`` requires."""
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())
