"""Input validation shared by the ops: each error names the argument, what was expected and what was
given."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def tensor(
    op: str, name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, shape=None, dims: str = ""
) -> None:
    """Check that ``t`` is a tensor of rank ``ndim`` and one of ``dtypes``; ``shape`` may hold ints
    (exact) and None (any). ``dims`` names the expected dimensions in the rank error, e.g. "(N, C, H, W)"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        what = f"{ndim} dimensions {dims}" if dims else f"{ndim} dimensions"
        raise ValueError(f"{op}: {name} must have {what}, got shape {_shape(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and (
        len(shape) != t.dim() or any(s is not None and s != a for s, a in zip(shape, t.shape, strict=False))
    ):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{op}: {name} must have shape {want}, got {_shape(t)}")


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} must have the dtype of {ref_name} ({str(ref.dtype).replace('torch.', '')}), "
                f"got {str(t.dtype).replace('torch.', '')}"
            )


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all tensors must be on one device"
            )


def nonnegative_int(op: str, name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{op}: {name} must be a non-negative int, got {v!r}")
