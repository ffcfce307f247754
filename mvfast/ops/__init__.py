"""mvfast's fused ops. Each is a ``torch.library`` custom op in the ``mvfast`` namespace with a fake
kernel and registered autograd, so ``torch.compile(fullgraph=True)`` traces it whole."""

from mvfast.ops.attention_pool import attention_pool, attention_pool_reference
from mvfast.ops.conv2d_bn_relu import conv2d_bn_relu, conv2d_bn_relu_reference
from mvfast.ops.conv3d_bn_relu import conv3d_bn_relu, conv3d_bn_relu_reference
from mvfast.ops.netvlad import netvlad, netvlad_reference

# Each public op and the compiled kernel op that carries its CPU/CUDA kernels (conv2d_bn_relu runs on
# conv3d_bn_relu's, over a depth of 1).
OPS = {
    "netvlad": "netvlad_fwd",
    "attention_pool": "attention_pool_fwd",
    "conv3d_bn_relu": "conv3d_bn_relu_fwd",
    "conv2d_bn_relu": "conv3d_bn_relu_fwd",
}

__all__ = [
    "OPS",
    "attention_pool",
    "attention_pool_reference",
    "conv2d_bn_relu",
    "conv2d_bn_relu_reference",
    "conv3d_bn_relu",
    "conv3d_bn_relu_reference",
    "netvlad",
    "netvlad_reference",
]
