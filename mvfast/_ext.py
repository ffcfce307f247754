"""Loading of the compiled extension ``mvfast._C`` and what it was built with.

Importing ``mvfast._C`` registers the C++/CUDA kernels as ``torch.ops.mvfast.*`` ops. mvfast works
without it (the reference and Triton backends need no compiled code); the first use then says once how to
build it.
"""

from __future__ import annotations

import logging
import re

import torch  # loads libtorch and libc10, which _C links against

logger = logging.getLogger("mvfast")

BUILD_HINT = "build it with `pip install -e .` in the mvfast checkout (it needs a C++ compiler)"

try:
    from mvfast import _C  # noqa: F401  (registers the ops)

    ERROR: str | None = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    _C = None
    hint = BUILD_HINT
    if "undefined symbol" in str(e):
        # pip's build isolation compiles against the newest torch it may install, not the one imported here
        hint = (
            f"it was most likely built against another torch than this one ({torch.__version__}): rebuild "
            "it against this torch with `pip install -e . --no-build-isolation` in the mvfast checkout"
        )
    ERROR = f"the compiled extension mvfast._C could not be loaded ({e}); {hint}"

LOADED = _C is not None


def build_info() -> dict:
    """What the extension was compiled with: ``{"loaded", "cpu", "cuda", "cuda_version", "archs", "ptx",
    "error"}``; ``archs`` are the compute capabilities with machine code ("8.0", ...), ``ptx`` those whose
    PTX is embedded too (``TORCH_CUDA_ARCH_LIST`` entries with ``+PTX``), which newer GPUs compile at load."""
    if not LOADED:
        return {
            "loaded": False,
            "cpu": False,
            "cuda": False,
            "cuda_version": None,
            "archs": [],
            "ptx": [],
            "error": ERROR,
        }
    cuda_version, listed = _C.CUDA_VERSION, [a for a in _C.CUDA_ARCHS.split(",") if a]
    return {
        "loaded": True,
        "cpu": True,
        "cuda": bool(cuda_version),
        "cuda_version": cuda_version or None,
        "archs": [a.removesuffix("+PTX") for a in listed],
        "ptx": [a.removesuffix("+PTX") for a in listed if a.endswith("+PTX")],
        "error": None,
    }


def _capability(arch: str) -> tuple[int, int, bool] | None:
    """(major, minor, specific) of a TORCH_CUDA_ARCH_LIST entry such as "8.6" or "9.0a" (specific: the
    a/f variants, whose machine code runs on that capability only); None for what is not of that form (a
    name such as "Hopper")."""
    m = re.fullmatch(r"(\d+)\.(\d+)([af]?)", arch.strip())
    return (int(m.group(1)), int(m.group(2)), bool(m.group(3))) if m else None


def arch_reason(capability: tuple[int, int], archs: list[str], ptx: list[str]) -> str | None:
    """Why no kernel of a build for ``archs`` (machine code) and ``ptx`` (PTX) runs on a GPU of compute
    capability ``capability``, or None when one does, or when the list is empty or an entry cannot be
    read (the launch then says). Machine code for X.y runs on X.z for z >= y (X.y only for the a/f
    variants); PTX for X.y is compiled by the driver for any capability >= X.y."""
    major, minor = capability
    code, text = [_capability(a) for a in archs], [_capability(p) for p in ptx]
    if None in code or None in text or not code:  # unknown: a build that did not record its archs
        return None
    if any(a == major and (b == minor if specific else b <= minor) for a, b, specific in code):
        return None
    if any((a, b) <= (major, minor) for a, b, _ in text):
        return None
    built = ", ".join(archs) + (f" (PTX {', '.join(ptx)})" if ptx else "")
    return (
        f"mvfast._C's CUDA kernels were built for compute capabilities {built}, none of which runs on this "
        f"GPU ({major}.{minor}): rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor} "
        "(`pip install -e . --no-build-isolation` on this machine picks it)"
    )


BUILD = build_info()
