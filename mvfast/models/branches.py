"""The model's branches: the 3D CNN of the behaviour branch and the VGG of the scene branch.

Both are built of plain PyTorch layers (Conv3d -> BatchNorm3d -> ReLU in an nn.Sequential for each 3D block,
torchvision's Conv2d -> BatchNorm2d -> ReLU for the VGG's with batch_norm), so their state_dict keys are
PyTorch's and ``mvfast.fuse`` swaps the blocks for fused ones in place.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn


def _torchvision_vgg():
    """torchvision's ``cfgs`` and ``make_layers``, imported on first use (only the model needs torchvision).

    The first import runs outside any torch function mode, such as the default device of
    ``with torch.device("meta")``, in which a model is built to count its parameters (mvfast.info does so
    for the paper preset's 1.7 GB of weights): torchvision imports torch._dynamo, and on torch 2.6 that
    import calls ``.item()`` on a tensor that the mode puts on the meta device and fails
    (pytorch/pytorch#153330; 2.4, 2.5 and 2.14 import it there).
    """
    if "torchvision.models.vgg" not in sys.modules:
        modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
        try:
            import torchvision.models.vgg  # noqa: F401
        finally:
            for mode in reversed(modes):
                torch._C._push_on_torch_function_stack(mode)
    from torchvision.models.vgg import cfgs, make_layers

    return cfgs, make_layers


def conv3d_block(cin: int, cout: int, stride=(1, 1, 1)) -> nn.Sequential:
    """Conv3d(3x3x3, no bias: BN follows) -> BatchNorm3d -> ReLU."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=False),
    )


class Behaviour3D(nn.Module):
    """A C3D-style 3D CNN (paper eq. 3-5): blocks and poolings, then a head giving N_a behaviour logits.

    Args:
        in_channels: 3 for RGB, 2 for motion (dx, dy).
        layers: ints (Conv3d-BN-ReLU blocks of that width), "S" (1x2x2 max pooling), "M" (2x2x2).
        num_outputs: N_a.
        stem_stride: stride of the first convolution.
        pool: adaptive average pooling (t, h, w) of the last feature map.
        fc: widths of the hidden fully connected layers of the head.
        dropout: before each linear layer of the head.

    Shape: x (Tensor[B, C, T, H, W]) -> logits (Tensor[B, N_a]).
    """

    def __init__(
        self, in_channels, layers, num_outputs, stem_stride=(1, 1, 1), pool=(1, 1, 1), fc=(), dropout=0.5
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        c, stride = in_channels, tuple(stem_stride)
        for v in layers:
            if v == "S":
                blocks.append(nn.MaxPool3d((1, 2, 2), (1, 2, 2)))
            elif v == "M":
                blocks.append(nn.MaxPool3d(2, 2))
            else:
                blocks.append(conv3d_block(c, v, stride))
                c, stride = v, (1, 1, 1)
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(pool)
        head: list[nn.Module] = []
        width = c * pool[0] * pool[1] * pool[2]
        for h in fc:
            head += [nn.Dropout(dropout), nn.Linear(width, h), nn.ReLU(inplace=False)]
            width = h
        head += [nn.Dropout(dropout), nn.Linear(width, num_outputs)]
        self.head = nn.Sequential(*head)
        for m in self.features.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C', T', H', W')
        x = self.pool(x).flatten(1)  # (B, C' * pool)
        return self.head(x)  # (B, N_a)


class VGG(nn.Module):
    """torchvision's VGG with its widths scaled, its pooled map and hidden widths settable, and its
    penultimate features exposed.

    With ``width=1``, ``pool=7``, ``hidden=4096`` the modules and state_dict are exactly those of
    ``torchvision.models.vgg16(weights=None, num_classes=...)`` (``vgg16_bn`` with ``batch_norm``), so
    torchvision's weights files load into it. The layers are built by torchvision's own ``make_layers`` from
    its ``cfgs``.

    Shape: x (Tensor[N, 3, h, w]) -> (features Tensor[N, hidden], logits Tensor[N, num_classes]).
    """

    CFG = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}

    def __init__(self, name, num_classes, width=1.0, pool=7, hidden=4096, batch_norm=False, dropout=0.5):
        super().__init__()
        cfgs, make_layers = _torchvision_vgg()
        cfg = [v if v == "M" else max(1, round(v * width)) for v in cfgs[self.CFG[name]]]
        self.features = make_layers(cfg, batch_norm=batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((pool, pool))
        self.classifier = nn.Sequential(
            nn.Linear(cfg[-2] * pool * pool, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self.hidden = hidden
        # torchvision's initialisation of the convolutions; the linear layers keep PyTorch's default rather
        # than torchvision's N(0, 0.01), which at narrow widths shrinks the signal ~10x per layer and slows
        # early training.
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.features(x)  # (N, C, h', w')
        x = self.avgpool(x).flatten(1)  # (N, C * pool * pool)
        feats = self.classifier[:-1](x)  # (N, hidden): fc7 after ReLU and dropout
        return feats, self.classifier[-1](feats)  # (N, num_classes)

    def load_weights(self, path) -> None:
        """Loads a VGG state_dict file into this net: torchvision's own (``vgg16-397923af.pth``,
        ``vgg19_bn-c79401a0.pth``, ...: ``torchvision.models.vgg16().state_dict()`` saved by torch.save), one
        wrapped in a checkpoint dict ({"state_dict": ...} or {"model": ...}, "module." prefixes of
        DataParallel removed), or a .safetensors file. torch files are read with weights_only=True.

        torchvision's key layout is this net's own (its layers are built by torchvision's make_layers), so
        the file maps key for key. A file of another VGG (depth, BatchNorm or not, widths, classes) or not a
        state_dict at all is a ValueError of one line saying which.
        """
        from mvfast.models._weights import describe_vgg, read_state_dict

        state = read_state_dict(path, "scene weights")
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        unexpected = [k for k in state if k not in mine]
        if missing or unexpected:
            raise ValueError(
                f"scene weights {str(path)!r} are {describe_vgg(state)}, not a state_dict of this scene net "
                f"({describe_vgg(mine)}; set scene_nets and scene_batch_norm to the file's): "
                f"{len(missing)} keys missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:2]})"
            )
        wrong = [
            f"{k}: file {tuple(v.shape)}, model {tuple(mine[k].shape)}"
            for k, v in state.items()
            if tuple(v.shape) != tuple(mine[k].shape)
        ]
        if wrong:
            raise ValueError(
                f"scene weights {str(path)!r} do not fit the scene net (set num_scenes, or num_classes for "
                f"frame2d, to the file's classes, scene_width=1, scene_pool=7, scene_fc=4096, and "
                f"scene_batch_norm as the file was trained): " + "; ".join(wrong[:4])
            )
        self.load_state_dict(state)
