"""mvfast: multimodal micro-video classification built around fused kernels.

Usage::

    import mvfast
    y = mvfast.ops.netvlad(x, weight, bias, centroids, mask)      # fused op
    vlad = mvfast.nn.NetVLAD(dim=512, clusters=32)                   # module over it
    model = mvfast.models.create_model("tiny", num_classes=10)       # the paper's multimodal model
    with mvfast.backend("reference"): ...                            # choose the implementation
    mvfast.backends()                                                # what can run here, and why not
    model, n = mvfast.fuse(model)                                    # Conv+BN+ReLU (2D, 3D) -> fused
"""

__version__ = "0.1.0"

from mvfast import _ext  # noqa: E402, F401, I001  (first: loads mvfast._C, which registers the kernels)
from mvfast import nn, ops  # noqa: E402
from mvfast import models  # noqa: E402  (after nn: the model is built of its modules)
from mvfast._backend import BACKENDS, backend, backends, get_backend, set_backend  # noqa: E402
from mvfast.nn.fuse import fuse, unfuse  # noqa: E402

__all__ = [
    "BACKENDS",
    "backend",
    "backends",
    "get_backend",
    "set_backend",
    "fuse",
    "unfuse",
    "models",
    "nn",
    "ops",
    "__version__",
]
