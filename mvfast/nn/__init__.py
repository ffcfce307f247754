"""nn.Modules over mvfast's ops: each holds its parameters and calls the op; fuse/unfuse swap models'
Conv3d -> BatchNorm3d -> ReLU chains for Conv3dBNReLU and Conv2d -> BatchNorm2d -> ReLU chains for
Conv2dBNReLU."""

from mvfast.nn.attention_pool import AttentionPool
from mvfast.nn.conv2d_bn_relu import Conv2dBNReLU
from mvfast.nn.conv3d_bn_relu import Conv3dBNReLU
from mvfast.nn.fuse import fuse, unfuse
from mvfast.nn.netvlad import NetVLAD

__all__ = ["AttentionPool", "Conv2dBNReLU", "Conv3dBNReLU", "NetVLAD", "fuse", "unfuse"]
