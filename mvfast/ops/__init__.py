"""mvfast's fused ops. Each is a ``torch.library`` custom op in the ``mvfast`` namespace with a fake
kernel and registered autograd, so ``torch.compile(fullgraph=True)`` traces it whole."""

from mvfast.ops.netvlad import netvlad, netvlad_reference

__all__ = ["netvlad", "netvlad_reference"]
