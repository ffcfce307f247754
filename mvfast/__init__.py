"""mvfast: multimodal micro-video classification built around fused kernels."""

__version__ = "0.1.0"
