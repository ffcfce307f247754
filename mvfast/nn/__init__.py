"""nn.Modules over mvfast's ops: each holds its parameters and calls the op."""

from mvfast.nn.netvlad import NetVLAD

__all__ = ["NetVLAD"]
