"""nn.Modules over mvfast's ops: each holds its parameters and calls the op."""

from mvfast.nn.attention_pool import AttentionPool
from mvfast.nn.netvlad import NetVLAD

__all__ = ["AttentionPool", "NetVLAD"]
