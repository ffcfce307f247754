"""A small stand-in for ``mvfast.models`` that follows its contract, so the command-line tools can be tested
fast and independently of the real model.

Contract: ``create_model(name, num_classes, **overrides)`` and ``preset_config(name, num_classes,
**overrides)`` with presets "tiny", "paper", "frame2d"; ``MODALITIES``; ``model.config`` with
``num_classes``, ``modalities``, ``dropout``, ``aux_weight``, ``multi_label``, ``label_smoothing``,
``class_weights`` and ``inputs()`` (the fields of ``mvfast.models.InputSpec``); ``model(batch)`` -> {"logits"
(B, C), "aux_logits" {name: (B, C)}, "attention" (B, F, H) or None}, and with ``return_features=True`` also
"features" {"embedding" (B, D), ...}; ``model.loss(out, labels)`` (labels int64[B], or multi-hot [B, C] with
multi_label); ``model.class_heads()``.

In a test process: ``install()`` puts it in place of ``mvfast.models``. As a script it does that and then
runs a module as ``python -m`` would (also under torchrun)::

    python tests/_toy_model.py mvfast.train --steps 4 ...
"""

from __future__ import annotations

import dataclasses
import runpy
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvfast.models.config import MODALITIES, InputSpec


@dataclass(frozen=True)
class MicroVideoConfig:
    num_classes: int = 10
    modalities: tuple[str, ...] = MODALITIES
    dropout: float = 0.5
    aux_weight: float = 0.3
    width: int = 8
    clip_len: int = 4
    size: int = 32
    scene_frames: int = 2
    scene_size: int = 32
    vocab_size: int = 512
    max_title_tokens: int = 8
    frames_only: bool = False
    multi_label: bool = False
    label_smoothing: float = 0.0
    class_weights: tuple | None = None

    def __post_init__(self):
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(
                f"MicroVideoConfig.modalities: expected a non-empty subset of {MODALITIES}, got {bad}"
            )

    def inputs(self) -> InputSpec:
        return InputSpec.of(self)


PRESETS = {
    "tiny": MicroVideoConfig(),
    "paper": MicroVideoConfig(width=16),
    "frame2d": MicroVideoConfig(modalities=("frames",), frames_only=True),
}


class _Clip3d(nn.Module):
    def __init__(self, cin, width, num_classes):
        super().__init__()
        self.conv = nn.Conv3d(cin, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        f = F.relu(self.bn(self.conv(x))).mean((2, 3, 4))  # (B, width)
        return f, self.head(f)


class MicroVideoNet(nn.Module):
    def __init__(self, config: MicroVideoConfig):
        super().__init__()
        self.config = c = config
        w = c.width
        self.rgb = _Clip3d(3, w, c.num_classes)
        self.motion = _Clip3d(2, w, c.num_classes)
        self.frame_conv = nn.Conv2d(3, w, 3, stride=2, padding=1)
        self.frame_score = nn.Linear(w, 1)
        self.audio = nn.Linear(64, w)
        self.text = nn.Embedding(c.vocab_size, w)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(w * len(c.modalities), c.num_classes)

    def forward(self, batch, return_features=False):
        c, feats, aux, attention = self.config, [], {}, None
        for name in ("rgb", "motion"):
            if name in c.modalities:
                f, logits = getattr(self, name)(batch[name])
                feats.append(f)
                aux[name] = logits
        if "frames" in c.modalities:
            x = batch["frames"]  # (B, F, 3, h, w)
            B, Fr = x.shape[:2]
            f = F.relu(self.frame_conv(x.flatten(0, 1))).mean((2, 3)).reshape(B, Fr, -1)  # (B, F, w)
            attention = self.frame_score(f).softmax(1)  # (B, F, 1)
            feats.append((attention * f).sum(1))
        if "audio" in c.modalities:
            m = batch["audio_mask"].unsqueeze(-1).float()
            feats.append(self.audio((batch["audio"] * m).sum(1) / m.sum(1).clamp(min=1)))
        if "text" in c.modalities:
            m = batch["text_mask"].unsqueeze(-1).float()
            feats.append((self.text(batch["text"]) * m).sum(1) / m.sum(1).clamp(min=1))
        h = torch.cat(feats, 1)
        out = {"logits": self.classifier(self.dropout(h)), "aux_logits": aux, "attention": attention}
        if return_features:
            out["features"] = {"embedding": h}
            if attention is not None:
                out["features"]["attention_weights"] = attention
        return out

    def loss(self, out, labels):
        loss = self._loss(out["logits"], labels)
        for logits in out["aux_logits"].values():
            loss = loss + self.config.aux_weight * self._loss(logits, labels)
        return loss

    def _loss(self, logits, labels):
        c = self.config
        weight = None if c.class_weights is None else torch.tensor(c.class_weights, device=logits.device)
        if c.multi_label:
            target = labels.float() * (1 - c.label_smoothing) + 0.5 * c.label_smoothing
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
        return F.cross_entropy(logits, labels, weight=weight, label_smoothing=c.label_smoothing)

    def class_heads(self):
        return ["classifier.", "rgb.head.", "motion.head."]


def preset_config(name: str, num_classes: int, **overrides) -> MicroVideoConfig:
    if name not in PRESETS:
        raise ValueError(f"create_model: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(MicroVideoConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"create_model: unknown config fields {unknown}")
    for key in ("modalities", "class_weights"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(overrides[key])
    return dataclasses.replace(PRESETS[name], num_classes=num_classes, **overrides)


def create_model(name: str, num_classes: int, **overrides) -> MicroVideoNet:
    return MicroVideoNet(preset_config(name, num_classes, **overrides))


def _module() -> types.ModuleType:
    module = types.ModuleType("mvfast.models")
    module.create_model = create_model
    module.preset_config = preset_config
    module.MODALITIES = MODALITIES
    module.PRESETS = PRESETS
    module.MicroVideoConfig = MicroVideoConfig
    module.MicroVideoNet = MicroVideoNet
    return module


def install() -> types.ModuleType:
    """Makes ``import mvfast.models`` give this module's contract, for the rest of the process (a
    subprocess of the command-line tests)."""
    import mvfast

    module = _module()
    sys.modules["mvfast.models"] = module
    mvfast.models = module
    return module


def use(monkeypatch) -> types.ModuleType:
    """``install`` for one test: the real mvfast.models (module and package attribute) come back after it."""
    import mvfast

    module = _module()
    monkeypatch.setitem(sys.modules, "mvfast.models", module)
    monkeypatch.setattr(mvfast, "models", module, raising=False)
    return module


if __name__ == "__main__":
    install()
    target = sys.argv[1]
    sys.argv = [target, *sys.argv[2:]]
    runpy.run_module(target, run_name="__main__", alter_sys=True)


# ---------------------------------------------------------------------------------------------------------
# Helpers of the command-line tests

TOY = __file__
# A synthetic set of 3 classes x 3 videos (2 train, 1 validation each) of 32 px and 1 s, clips of 4 frames.
TINY_DATA = [
    "--synthetic-classes", "3", "--synthetic-videos", "3", "--synthetic-size", "32",
    "--synthetic-seconds", "1", "--resize", "32", "--test-clips", "2",
]  # fmt: skip
TINY_RUN = [*TINY_DATA, "--epochs", "3", "--batch-size", "2", "--ckpt-every", "2", "--no-progress"]


def run_cli(module: str, *args, env: dict | None = None, timeout: float = 120, **kwargs):
    """Runs ``python -m module args`` with the toy model in place of mvfast.models."""
    import os
    import subprocess

    return subprocess.run(
        [sys.executable, TOY, module, *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


_RUNS: dict = {}


def trained_run(tmp_path_factory) -> tuple:
    """(output folder, MVFAST_CACHE folder, completed process) of one short training run, shared by the
    test modules of a session."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNS:
        cache = tmp_path_factory.mktemp("mvfast-cache")
        out = tmp_path_factory.mktemp("run") / "out"
        run = run_cli(
            "mvfast.train", "--out", out, *TINY_RUN, "--workers", "1", env={"MVFAST_CACHE": str(cache)}
        )
        assert run.returncode == 0, run.stdout + run.stderr
        _RUNS[key] = (out, cache, run)
    return _RUNS[key]
