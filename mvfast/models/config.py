"""The model's settings: one dataclass, and the presets ``tiny``, ``paper`` and ``frame2d``.

Every field has the ``paper`` value as its default; a preset is a set of overrides on top::

    cfg = mvfast.models.preset_config("tiny", num_classes=10, modalities=("rgb", "motion"))
    cfg.inputs()                      # what it eats: InputSpec(modalities=..., clip_len=8, size=64, ...)

The model does not know the data pipeline: it states its inputs (:class:`InputSpec`) and whoever feeds it
builds the data settings from them (``DataConfig().with_inputs(cfg.inputs())``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODALITIES = ("rgb", "motion", "frames", "audio", "text")
"""Every input the model knows: the RGB clip, its motion field, the scene frames, the audio windows and the
title tokens (the keys of the batch dict of :func:`mvfast.data.collate`)."""

ARCHITECTURES = ("multimodal", "frame2d")

AUDIO_BINS = 64
"""Log-mel bins per audio window (fixed by mvfast.data)."""


@dataclass(frozen=True)
class InputSpec:
    """What a model needs from the data pipeline: the inputs it reads and their sizes.

    ``DataConfig.with_inputs(spec)`` gives the data settings whose samples have exactly these shapes.
    """

    modalities: tuple[str, ...]
    """The batch keys the model reads (out of MODALITIES)."""
    clip_len: int
    """T, frames of the rgb and motion clips."""
    size: int
    """H = W of the rgb and motion clips."""
    scene_frames: int
    """F, scene frames per video."""
    scene_size: int
    """h = w of the scene frames."""
    vocab_size: int
    """Hashed title vocabulary the token ids index (id 0 is padding)."""
    max_title_tokens: int
    """W, title tokens kept."""
    resize: int | None = None
    """Side of the decoded square the clips are cut from, where the model fixes it; None leaves it to the data
    settings (raised to at least `size` and `scene_size`)."""

    @classmethod
    def of(cls, config) -> InputSpec:
        """The spec of a model config that has these fields (resize may be missing)."""
        values = {f.name: getattr(config, f.name, None) for f in dataclasses.fields(cls)}
        return cls(**{**values, "modalities": tuple(values["modalities"])})


# C3D (Tran et al. 2015): conv1a, pool1 (1x2x2), conv2a, pool2, conv3a-b, pool3, conv4a-b, pool4, conv5a-b,
# pool5. An int is a Conv3d(3x3x3)-BN-ReLU block with that many channels; "S" pools space only (1x2x2),
# "M" pools time and space (2x2x2).
C3D_LAYERS = (64, "S", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


@dataclass(frozen=True)
class MicroVideoConfig:
    """Settings of :class:`mvfast.models.MicroVideoNet`; the defaults are the ``paper`` preset.

    Widths and sizes are plain fields, so a preset is a short list of overrides and an ablation is one more
    (``modalities=("rgb", "motion")``).
    """

    num_classes: int = 101
    """Video classes (the classifier's outputs)."""
    modalities: tuple[str, ...] = MODALITIES
    """Inputs the model uses, a subset of MODALITIES. Others in the batch are ignored; one listed here but
    missing from a batch is treated as absent for every sample of it (masked)."""
    architecture: str = "multimodal"
    """"multimodal": the paper's model. "frame2d": the "traditional CNN model" of Table 1, a 2D CNN (the
    first of `scene_nets`) on each scene frame with its class logits averaged over the frames."""

    # Inputs: what the data pipeline must produce (see inputs())
    clip_len: int = 16
    """T, frames of the rgb and motion clips (C3D: 16)."""
    size: int = 112
    """H = W of the rgb and motion clips (C3D: 112)."""
    resize: int | None = None
    """Side of the decoded square the clips are cropped from; None: the data settings', raised to at least
    `size` and `scene_size`."""
    scene_frames: int = 8
    """F, scene frames per video."""
    scene_size: int = 224
    """h = w of the scene frames (VGG: 224)."""
    vocab_size: int = 16384
    """Hashed title vocabulary (id 0 is padding)."""
    max_title_tokens: int = 32
    """W, title tokens kept."""

    # Behaviour branch (eq. 3-5): one 3D CNN on rgb, one on motion
    num_behaviours: int | None = None
    """N_a, behaviour classes of each 3D CNN head; None: num_classes (the heads then also give the auxiliary
    logits directly)."""
    behaviour_layers: tuple = C3D_LAYERS
    """The 3D CNN's layers: an int is a Conv3d(3x3x3)-BatchNorm3d-ReLU block with that many channels, "S" a
    1x2x2 max pooling, "M" a 2x2x2 max pooling."""
    behaviour_stem_stride: tuple[int, int, int] = (1, 1, 1)
    """Stride (t, h, w) of the first convolution (2 in space makes a small model much cheaper)."""
    behaviour_pool: tuple[int, int, int] = (1, 4, 4)
    """Adaptive average pooling of the last feature map before the head ((1, 4, 4) gives C3D's 8192
    features at 16x112x112)."""
    behaviour_fc: tuple[int, ...] = (4096, 4096)
    """Hidden fully connected layers of the head (C3D's fc6, fc7)."""

    # Scene branch (eq. 1-2): VGG16 (global) and VGG19 (local) on each scene frame
    num_scenes: int = 64
    """N_s, scene classes (latent scenes learned end to end, or the classes of the weights given)."""
    scene_nets: tuple[str, ...] = ("vgg16", "vgg19")
    """torchvision VGG configurations ("vgg11", "vgg13", "vgg16", "vgg19") whose scene probabilities are
    averaged and whose penultimate features are concatenated per frame."""
    scene_width: float = 1.0
    """Multiplier of torchvision's VGG channel widths (1.0 is the real VGG)."""
    scene_pool: int = 7
    """Adaptive average pooling side before the VGG classifier (torchvision: 7)."""
    scene_fc: int = 4096
    """Width of the VGG classifier's two hidden layers (torchvision: 4096)."""
    scene_batch_norm: bool = False
    """BatchNorm after each VGG convolution (torchvision's vgg16_bn layout) instead of plain vgg16."""
    scene_weights: tuple[str | None, ...] | None = None
    """Paths of state_dicts to load into the scene nets, one per entry of `scene_nets` (None skips one), e.g.
    torchvision's ``vgg16-397923af.pth`` with num_scenes=1000. Loaded with torch.load(weights_only=True);
    nothing is ever downloaded."""

    channels_last: bool = True
    """Run the 3D CNNs and the VGGs in channels-last memory layout (channels_last_3d / channels_last): the
    inputs are converted once and every layer keeps the layout. oneDNN's and cuDNN's convolutions are faster
    in it: on the 2-core development CPU the tiny preset's training step took about 0.9x the time of NCHW on
    the reference backend and 0.8x with mvfast's fused blocks, which read and write it directly. Parameters
    and checkpoints are the same either way."""

    # Local features and their aggregation (eq. 7-13)
    frame_dim: int = 1024
    """D of the per-frame visual features (the VGG features projected)."""
    audio_dim: int = 128
    """D of the per-window audio features (the log-mel window projected)."""
    text_dim: int = 300
    """D of the title token embeddings."""
    frame_clusters: int = 64
    """K of the NetVLAD over the frames."""
    audio_clusters: int = 64
    """K of the NetVLAD over the audio windows."""
    text_clusters: int = 64
    """K of the NetVLAD over the title tokens."""
    ghost_clusters: int = 0
    """Ghost clusters of each NetVLAD."""
    attention_heads: int = 1
    """Heads of the attention pooling over the frames (the paper: 1); 0 turns it off."""

    # Classifier and training
    dropout: float = 0.5
    """Dropout before the classifier (Table 2: 0.5 is best)."""
    branch_dropout: float = 0.5
    """Dropout in the 3D CNN heads and the VGG classifiers (C3D and VGG: 0.5)."""
    aux_weight: float = 0.5
    """Weight of the behaviour heads' auxiliary loss in :meth:`MicroVideoNet.loss`."""
    multi_label: bool = False
    """Each video has any number of the classes: the loss is binary cross-entropy with logits per class and
    the scores are sigmoids (independent per class) instead of a softmax over the classes; labels are
    multi-hot (Tensor[B, num_classes])."""
    label_smoothing: float = 0.0
    """Label smoothing of the loss: single-label, cross-entropy's (the target gets 1 - e + e/C, the others
    e/C); multi-label, every binary target moves e/2 towards 1/2."""
    class_weights: tuple[float, ...] | None = None
    """A weight per class in the loss (single-label: cross-entropy's ``weight``; multi-label: BCE's
    ``pos_weight``, the weight of a class's positives against its negatives); None weighs all alike.
    ``python -m mvfast.train --class-weights auto`` sets them from the training labels."""

    def __post_init__(self):
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "behaviour_layers", tuple(self.behaviour_layers))
        object.__setattr__(self, "scene_nets", tuple(self.scene_nets))
        if self.scene_weights is not None:
            object.__setattr__(self, "scene_weights", tuple(self.scene_weights))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(self.class_weights))
        _validate(self)

    @property
    def behaviours(self) -> int:
        """N_a."""
        return self.num_classes if self.num_behaviours is None else self.num_behaviours

    def uses(self, modality: str) -> bool:
        return modality in self.modalities

    def inputs(self) -> InputSpec:
        """The inputs this model reads and their sizes."""
        return InputSpec.of(self)

    def data_config(self, base=None):
        """``base`` (default ``mvfast.data.DataConfig()``) with this model's input sizes, a shortcut for
        ``base.with_inputs(self.inputs())``."""
        if base is None:
            # Imported only here, for this shortcut: the model itself does not depend on the data layer.
            from mvfast.data.config import DataConfig

            base = DataConfig()
        return base.with_inputs(self.inputs())

    def replace(self, **changes) -> MicroVideoConfig:
        """A copy with some fields changed (validated again; an unknown field is a ValueError)."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)


def _check_fields(changes: dict) -> None:
    known = {f.name for f in dataclasses.fields(MicroVideoConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(
            f"MicroVideoConfig has no field {', '.join(map(repr, unknown))}; the fields are: "
            f"{', '.join(sorted(known))}"
        )


def _positive_int(cfg, name: str, least: int = 1) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"MicroVideoConfig.{name}: expected an int >= {least}, got {v!r}")


def _validate(cfg: MicroVideoConfig) -> None:
    for name in (
        "num_classes",
        "clip_len",
        "size",
        "scene_frames",
        "scene_size",
        "max_title_tokens",
        "num_scenes",
        "scene_pool",
        "scene_fc",
        "frame_dim",
        "audio_dim",
        "text_dim",
        "frame_clusters",
        "audio_clusters",
        "text_clusters",
    ):
        _positive_int(cfg, name)
    _positive_int(cfg, "vocab_size", 2)
    _positive_int(cfg, "ghost_clusters", 0)
    _positive_int(cfg, "attention_heads", 0)
    if cfg.num_behaviours is not None:
        _positive_int(cfg, "num_behaviours")
    if cfg.resize is not None:
        _positive_int(cfg, "resize")
        if cfg.resize < max(cfg.size, cfg.scene_size):
            raise ValueError(
                f"MicroVideoConfig.resize: expected >= size ({cfg.size}) and scene_size ({cfg.scene_size}), "
                f"got {cfg.resize}"
            )
    if not cfg.modalities:
        raise ValueError(f"MicroVideoConfig.modalities: expected a non-empty subset of {MODALITIES}, got ()")
    bad = [m for m in cfg.modalities if m not in MODALITIES]
    if bad or len(set(cfg.modalities)) != len(cfg.modalities):
        raise ValueError(
            f"MicroVideoConfig.modalities: expected distinct names out of {MODALITIES}, got {cfg.modalities}"
        )
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"MicroVideoConfig.architecture: expected one of {ARCHITECTURES}, got {cfg.architecture!r}"
        )
    if cfg.architecture == "frame2d" and cfg.modalities != ("frames",):
        raise ValueError(
            f"MicroVideoConfig.modalities: the frame2d architecture uses the scene frames only, so "
            f"modalities must be ('frames',), got {cfg.modalities}"
        )
    for name in ("dropout", "branch_dropout"):
        p = getattr(cfg, name)
        if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"MicroVideoConfig.{name}: expected a probability in [0, 1), got {p!r}")
    if not isinstance(cfg.aux_weight, (int, float)) or cfg.aux_weight < 0:
        raise ValueError(f"MicroVideoConfig.aux_weight: expected a number >= 0, got {cfg.aux_weight!r}")
    if not isinstance(cfg.multi_label, bool):
        raise ValueError(f"MicroVideoConfig.multi_label: expected True or False, got {cfg.multi_label!r}")
    if not isinstance(cfg.label_smoothing, (int, float)) or not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(
            f"MicroVideoConfig.label_smoothing: expected a number in [0, 1), got {cfg.label_smoothing!r}"
        )
    if cfg.class_weights is not None:
        w = cfg.class_weights
        if len(w) != cfg.num_classes or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in w
        ):
            raise ValueError(
                f"MicroVideoConfig.class_weights: expected {cfg.num_classes} numbers > 0 (one per class), "
                f"got {len(w)}: {list(w)[:5]}{'...' if len(w) > 5 else ''}"
            )
    if not (isinstance(cfg.scene_width, (int, float)) and cfg.scene_width > 0):
        raise ValueError(f"MicroVideoConfig.scene_width: expected a number > 0, got {cfg.scene_width!r}")
    vgg = ("vgg11", "vgg13", "vgg16", "vgg19")
    if not cfg.scene_nets or any(n not in vgg for n in cfg.scene_nets):
        raise ValueError(f"MicroVideoConfig.scene_nets: expected names out of {vgg}, got {cfg.scene_nets}")
    if cfg.scene_weights is not None and len(cfg.scene_weights) != len(cfg.scene_nets):
        raise ValueError(
            f"MicroVideoConfig.scene_weights: expected one path (or None) per scene net {cfg.scene_nets}, "
            f"got {cfg.scene_weights}"
        )
    if cfg.architecture == "multimodal" and (cfg.uses("rgb") or cfg.uses("motion")):
        _check_behaviour_layers(cfg)


def _check_behaviour_layers(cfg: MicroVideoConfig) -> None:
    """The layers must hold at least one convolution, and the clip must survive every pooling."""
    layers = cfg.behaviour_layers
    if not any(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        raise ValueError(f"MicroVideoConfig.behaviour_layers: expected at least one int, got {layers}")
    stride = cfg.behaviour_stem_stride
    if len(stride) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stride):
        raise ValueError(f"MicroVideoConfig.behaviour_stem_stride: expected 3 ints >= 1, got {stride}")
    t, s = -(-cfg.clip_len // stride[0]), -(-cfg.size // max(stride[1:]))
    for v in layers:
        if v in ("S", "M"):
            t, s = (t // 2 if v == "M" else t), s // 2
            if t < 1 or s < 1:
                raise ValueError(
                    f"MicroVideoConfig.behaviour_layers: {layers} pools a {cfg.clip_len}x{cfg.size}x"
                    f"{cfg.size} clip below one voxel; use fewer poolings or larger inputs"
                )
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"MicroVideoConfig.behaviour_layers: expected positive ints, 'S' or 'M', "
                f"got {v!r} in {layers}"
            )
    pool = cfg.behaviour_pool
    if len(pool) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in pool):
        raise ValueError(f"MicroVideoConfig.behaviour_pool: expected 3 ints >= 1, got {pool}")
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in cfg.behaviour_fc):
        raise ValueError(f"MicroVideoConfig.behaviour_fc: expected ints >= 1, got {cfg.behaviour_fc}")


# ---------------------------------------------------------------------------------------------------
# Presets

# What tiny and frame2d share: 8x64x64 clips cut from an 80 px square, 64 px scene frames, and torchvision's
# VGG layer structure (13 and 16 convolutions) at 1/16 of its widths, with BatchNorm (fused by mvfast), a
# 1x1 pooled map and 64-wide hidden layers.
_SMALL = dict(
    clip_len=8,
    size=64,
    resize=80,
    scene_size=64,
    scene_width=1 / 16,
    scene_pool=1,
    scene_fc=64,
    scene_batch_norm=True,
    branch_dropout=0.1,
)

_PRESETS: dict[str, dict] = {
    # Narrow everything, 64x64 inputs, small K: trains on a laptop CPU in minutes. The 3D CNNs stride 2 in
    # space at once and have four narrow blocks; the VGGs keep torchvision's layer structure (13 and 16
    # convolutions) at 1/16 of its widths with a 1x1 pooled map and 64-wide hidden layers.
    "tiny": dict(
        **_SMALL,
        scene_frames=4,
        max_title_tokens=16,
        behaviour_layers=(8, "S", 16, "M", 32, "M", 64),
        behaviour_stem_stride=(1, 2, 2),
        behaviour_pool=(1, 1, 1),
        behaviour_fc=(),
        num_scenes=16,
        frame_dim=128,
        audio_dim=64,
        text_dim=64,
        frame_clusters=8,
        audio_clusters=8,
        text_clusters=8,
    ),
    # The paper's model: C3D-size 3D CNNs at 16x112x112, full VGG16 and VGG19 at 224, K = 64.
    "paper": {},
    # The "traditional CNN model" of Table 1 at the tiny preset's scale: a 2D CNN (VGG16 layout, 1/16 width)
    # on every scene frame, logits averaged over the frames. For the paper's scale override
    # scene_width=1.0, scene_pool=7, scene_fc=4096, scene_size=224, scene_batch_norm=False.
    "frame2d": dict(
        **_SMALL, architecture="frame2d", modalities=("frames",), scene_frames=8, scene_nets=("vgg16",)
    ),
}

PRESETS = tuple(_PRESETS)
"""Names accepted by :func:`mvfast.models.create_model`."""


def preset_config(name: str, num_classes: int, **overrides) -> MicroVideoConfig:
    """The MicroVideoConfig of preset ``name`` with ``num_classes`` and any field overridden.

    Raises ValueError for an unknown preset (listing the presets) or an unknown field (naming it).
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; the presets are: {', '.join(PRESETS)}")
    _check_fields(overrides)
    if "num_classes" in overrides:
        raise ValueError("num_classes is an argument of its own, not an override")
    fields = {**_PRESETS[name], **overrides, "num_classes": num_classes}
    return MicroVideoConfig(**fields)
