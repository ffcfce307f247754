"""mvfast's fused ops. Each is a ``torch.library`` custom op in the ``mvfast`` namespace with a fake
kernel and registered autograd, so ``torch.compile(fullgraph=True)`` traces it whole."""

from mvfast.ops.netvlad import netvlad, netvlad_reference

# Each public op and the compiled kernel op that carries its CPU/CUDA kernels.
OPS = {"netvlad": "netvlad_fwd"}

__all__ = ["OPS", "netvlad", "netvlad_reference"]
