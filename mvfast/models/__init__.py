"""The multimodal micro-video model of the paper and its presets.

model = mvfast.models.create_model("tiny", num_classes=10)     # or "paper", "frame2d"
out = model(batch)                    # batch: the dict of mvfast.data.collate
loss = model.loss(out, batch["label"])
model.config.inputs()                 # the inputs it reads and their sizes (an InputSpec)
model = mvfast.models.from_pretrained("export/")   # a folder of python -m mvfast.export (safetensors + JSON)
"""

from mvfast.models.branches import VGG, Behaviour3D
from mvfast.models.config import MODALITIES, PRESETS, InputSpec, MicroVideoConfig, preset_config
from mvfast.models.micro_video import MicroVideoNet, create_model
from mvfast.models.pretrained import TensorInputs, from_pretrained, save_pretrained

__all__ = [
    "MODALITIES",
    "PRESETS",
    "VGG",
    "Behaviour3D",
    "InputSpec",
    "MicroVideoConfig",
    "MicroVideoNet",
    "TensorInputs",
    "create_model",
    "from_pretrained",
    "preset_config",
    "save_pretrained",
]
