"""Backend choice: which implementation of an op runs.

Backends:
- ``triton``: Triton kernels, on CUDA tensors (or on CPU tensors when ``TRITON_INTERPRET=1`` was set in
  the environment before import, which is how they are tested without a GPU);
- ``cuda``: the compiled CUDA kernels of ``mvfast._C``;
- ``cpu``: the compiled C++ kernels of ``mvfast._C``;
- ``reference``: pure PyTorch, always available;
- ``auto`` (the default): the fastest available for the tensors' device, falling back (and saying so
  once through ``logging``) when a kernel does not apply.

Choose with ``mvfast.set_backend(name)``, the context manager ``with mvfast.backend(name):``, or the
environment variable ``MVFAST_BACKEND``. A backend that is asked for by name and cannot run the call is an
error that lists why, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator

import torch

from mvfast import _ext

logger = logging.getLogger("mvfast")

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
KERNEL_BACKENDS = ("triton", "cuda", "cpu")
# auto's order of preference per device type
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


def _check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_current = _check_name(os.environ.get("MVFAST_BACKEND", "auto") or "auto", "MVFAST_BACKEND")


def set_backend(name: str) -> None:
    """Use backend ``name`` for every op from now on (``"auto"`` restores the default)."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    """The backend currently asked for (``"auto"`` unless set)."""
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: ``with mvfast.backend("reference"): ...`` runs the block on that backend."""
    global _current
    previous, _current = _current, _check_name(name)
    try:
        yield
    finally:
        _current = previous


# ---------------------------------------------------------------------------------------------------
# What is installed, computed once: these facts do not change while the process runs.


# The oldest Triton the kernels are tested with: 3.1 compiles them for sm_80-89 but its compiler aborts on
# three of the sm_90 plans (hopperMmaToLinearLayout), and its interpreter computes wrong values with NumPy 2.
OLDEST_TRITON = (3, 2)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as 3.6.0 or 2.4.0+git1234; ValueError where it is not one."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def _installed_triton() -> tuple[str, tuple[int, ...]] | None:
    """The installed Triton's version and (major, minor), or None where its metadata does not say (a source
    build)."""
    try:
        version = importlib.metadata.version("triton")
        return version, _release(version)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _triton_status() -> tuple[bool, bool, str | None]:
    """(importable, interpreter on, reason it is unusable or None)."""
    if importlib.util.find_spec("triton") is None:
        return False, False, "Triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    installed = _installed_triton()
    if installed is None:
        return True, interpret, None
    version, release = installed
    if release < OLDEST_TRITON:
        oldest = ".".join(map(str, OLDEST_TRITON))
        return True, interpret, f"mvfast's Triton kernels need Triton >= {oldest}; this is Triton {version}"
    return True, interpret, None


def _interpreter_reason() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the NumPy installed, or None.

    The interpreter of Triton 3.2 to 3.6 takes int() of the 1-element array that holds a scalar argument
    (such as the bound of a loop over a runtime size), which NumPy 2.4 refuses: "only 0-dimensional arrays
    can be converted to Python scalars" (NumPy 2.3 only warns; Triton 3.7 squeezes the array first).
    """
    import numpy

    installed = _installed_triton()
    if installed is None:
        return None
    version, triton = installed
    try:
        numpy_release = _release(numpy.__version__)
    except ValueError:
        return None
    if triton < (3, 7) and numpy_release >= (2, 4):
        return (
            f"Triton {version}'s interpreter cannot run mvfast's kernels with NumPy {numpy.__version__}, "
            "which refuses its int() of a 1-element array: NumPy < 2.4 or Triton >= 3.7 can"
        )
    return None


TRITON_AVAILABLE, TRITON_INTERPRET, _TRITON_REASON = _triton_status()
_INTERPRETER_REASON = _interpreter_reason() if TRITON_AVAILABLE else None
_GPU = torch.cuda.is_available()


def _device_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run on tensors of ``device`` (empty when it can)."""
    reasons = []
    if name == "reference":
        return reasons
    if name == "triton":
        if _TRITON_REASON is not None:
            reasons.append(_TRITON_REASON)
        elif TRITON_INTERPRET and _INTERPRETER_REASON is not None:
            reasons.append(f"under TRITON_INTERPRET=1: {_INTERPRETER_REASON}")
        elif device.type == "cpu" and not TRITON_INTERPRET:
            reasons.append(
                "on CPU tensors Triton kernels run only under TRITON_INTERPRET=1, set before "
                "mvfast is imported"
            )
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"Triton kernels run on CUDA tensors, not {device.type}")
        return reasons
    if not _ext.LOADED:
        return [_ext.ERROR]
    if name == "cpu":
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, not {device.type}")
    elif name == "cuda":
        if not _ext.BUILD["cuda"]:
            reasons.append(
                "mvfast._C was built without CUDA kernels (at build time: no nvcc, a CPU build of "
                "torch, or an nvcc of another major CUDA version than torch's; FORCE_CUDA=1 forces them)"
            )
        elif device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, not {device.type}")
        elif _GPU:
            why = _cuda_arch_reason(torch.cuda.current_device() if device.index is None else device.index)
            if why is not None:
                reasons.append(why)
    return reasons


@functools.cache
def _cuda_arch_reason(index: int) -> str | None:
    """Why the built CUDA kernels cannot run on GPU ``index``, or None when they can."""
    capability = torch.cuda.get_device_capability(index)
    return _ext.arch_reason(capability, _ext.BUILD["archs"], _ext.BUILD["ptx"])


def backends(device: str | torch.device | None = None) -> dict[str, dict]:
    """What each backend can do here: ``{name: {"available": bool, "reason": str | None}}``.

    ``device`` defaults to the GPU when one is visible, else the CPU.
    """
    if device is None:
        device = "cuda" if _GPU else "cpu"
    device = torch.device(device)
    out = {}
    for name in BACKENDS[1:]:
        reasons = _device_reasons(name, device)
        if name == "cuda" and not reasons and not _GPU:
            reasons = ["no CUDA GPU is visible"]
        out[name] = {"available": not reasons, "reason": "; ".join(reasons) or None}
    return out


# ---------------------------------------------------------------------------------------------------
# Per-call resolution, used by every op.

_logged: set = set()


def resolve(op: str, device: torch.device, op_reasons: Callable[[str], list[str]]) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``op_reasons(name)`` gives the op's own reasons why kernel backend ``name`` cannot take this call
    (a dtype it lacks, a size it does not handle), on top of the device checks here.
    """
    asked = _current
    if asked == "reference":
        return "reference"
    if asked != "auto":
        reasons = _device_reasons(asked, device) or op_reasons(asked)
        if reasons:
            raise RuntimeError(f"mvfast.{op}: backend {asked!r} cannot run this call: " + "; ".join(reasons))
        return asked
    skipped = []
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        if name == "reference":
            break
        reasons = _device_reasons(name, device) or op_reasons(name)
        if not reasons:
            return name
        skipped.append((name, reasons))
    if skipped and not torch.compiler.is_compiling():
        key = (op, device.type, tuple((n, tuple(r)) for n, r in skipped))
        if key not in _logged:
            _logged.add(key)
            logger.warning(
                "mvfast.%s on %s: using the reference backend (%s)",
                op,
                device.type,
                "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped),
            )
    return "reference"
