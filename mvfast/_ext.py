"""Loading of the compiled extension ``mvfast._C`` and what it was built with.

Importing ``mvfast._C`` registers the C++/CUDA kernels as ``torch.ops.mvfast.*`` ops. mvfast works
without it (the reference and Triton backends need no compiled code); the first use then says once how to
build it.
"""

from __future__ import annotations

import logging

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
    """What the extension was compiled with: ``{"loaded", "cpu", "cuda", "cuda_version", "archs",
    "error"}``."""
    if not LOADED:
        return {
            "loaded": False,
            "cpu": False,
            "cuda": False,
            "cuda_version": None,
            "archs": [],
            "error": ERROR,
        }
    cuda_version, archs = _C.CUDA_VERSION, _C.CUDA_ARCHS
    return {
        "loaded": True,
        "cpu": True,
        "cuda": bool(cuda_version),
        "cuda_version": cuda_version or None,
        "archs": [a for a in archs.split(",") if a],
        "error": None,
    }


BUILD = build_info()
