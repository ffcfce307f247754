"""The model as a folder of weights and settings, without pickle: ``model.safetensors`` + ``config.json``.

    mvfast.models.save_pretrained(model, "export/", classes=["cat", "dog"])
    model = mvfast.models.from_pretrained("export/")     # in eval mode; model.config as saved
    model.classes                                          # the class names, when the folder has them

``python -m mvfast.export`` writes such a folder (with the data settings and the run's settings beside the
model's config) and the compiled artefacts next to it. :class:`TensorInputs` is the model with positional
tensor inputs and tuple outputs, the form that torch.export, AOTInductor and ONNX take.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from mvfast.models.config import MicroVideoConfig

FORMAT = "mvfast-export"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def save_pretrained(model, folder: str | os.PathLike, *, classes=None, **extra) -> Path:
    """Writes model.safetensors (the state_dict) and config.json (the model's config, `classes` and any
    `extra` JSON-able entries) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
    config = dataclasses.asdict(model.config)
    config["scene_weights"] = None  # read when the model was built; the weights hold what they became
    meta = {"format": FORMAT, "version": 1, "model_config": _plain(config)}
    if classes is not None:
        meta["classes"] = [str(c) for c in classes]
    meta.update(_plain(extra))
    (folder / CONFIG).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of an exported folder, checked to be one; ValueError otherwise."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} is not an exported mvfast model: no {CONFIG}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not the config of an mvfast export")
    return meta


def from_pretrained(folder: str | os.PathLike, device="cpu"):
    """The model of an exported folder (:func:`save_pretrained`, ``python -m mvfast.export``), in eval mode,
    with ``model.classes`` when the folder names them. Only the safetensors weights and the JSON config are
    read: no pickle."""
    from safetensors.torch import load_file

    from mvfast.models.micro_video import MicroVideoNet
    from mvfast.nn.fuse import fuse

    meta = read_config(folder)
    fields = {f.name for f in dataclasses.fields(MicroVideoConfig)}
    values = {k: v for k, v in meta["model_config"].items() if k in fields}
    model = MicroVideoNet(MicroVideoConfig(**{**values, "scene_weights": None}))
    fuse(model, channels_last=False)  # the layout is the config's (channels_last), set at the branches' input
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    model.classes = meta.get("classes")
    return model.to(device).eval()


class TensorInputs(nn.Module):
    """``model`` called with positional tensors, one per input of :meth:`input_names`, returning a tuple in
    the order of :meth:`output_names`: logits (B, C), scores (B, C: softmax, or a sigmoid per class for a
    multi-label model) and, where the model has attention, the key frames' weights (B, F, H)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.names = []
        for m in cfg.modalities:
            self.names += [m, f"{m}_mask"] if m in ("audio", "text") else [m]
        self.multi_label = bool(getattr(cfg, "multi_label", False))
        self.has_attention = (
            getattr(cfg, "architecture", "multimodal") == "multimodal"
            and "frames" in cfg.modalities
            and getattr(cfg, "attention_heads", 0) > 0
        )

    def input_names(self) -> list[str]:
        return list(self.names)

    def output_names(self) -> list[str]:
        return ["logits", "scores", *(["attention"] if self.has_attention else [])]

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.model(dict(zip(self.names, inputs, strict=True)))
        logits = out["logits"]
        scores = logits.sigmoid() if self.multi_label else logits.softmax(1)
        return (logits, scores, out["attention"]) if self.has_attention else (logits, scores)

    def example_inputs(self, batch: int = 2, audio: int = 6, title: int = 5, seed: int = 0) -> tuple:
        """Random inputs of the model's sizes; the last audio window and title token of sample 0 masked."""
        cfg = self.model.config
        g = torch.Generator().manual_seed(seed)
        shapes = {
            "rgb": (batch, 3, cfg.clip_len, cfg.size, cfg.size),
            "motion": (batch, 2, cfg.clip_len, cfg.size, cfg.size),
            "frames": (batch, cfg.scene_frames, 3, cfg.scene_size, cfg.scene_size),
            "audio": (batch, audio, 64),
        }
        out = []
        for name in self.names:
            if name in shapes:
                out.append(torch.randn(shapes[name], generator=g))
            elif name == "text":
                out.append(torch.randint(1, cfg.vocab_size, (batch, title), generator=g))
            else:  # a mask
                mask = torch.ones(batch, audio if name == "audio_mask" else title, dtype=torch.bool)
                mask[0, -1] = False
                out.append(mask)
        return tuple(out)

    def dynamic_shapes(self, max_batch: int = 4096) -> tuple:
        """torch.export's dynamic dimensions: the batch, the audio windows and the title tokens."""
        from torch.export import Dim

        batch = Dim("batch", min=1, max=max_batch)
        audio, title = Dim("audio", min=1, max=1 << 20), Dim("title", min=1, max=1 << 16)
        dims = {"audio": {0: batch, 1: audio}, "audio_mask": {0: batch, 1: audio}}
        dims.update({"text": {0: batch, 1: title}, "text_mask": {0: batch, 1: title}})
        # one entry, for forward's *inputs
        return (tuple(dims.get(name, {0: batch}) for name in self.names),)
