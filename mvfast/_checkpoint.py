"""Checkpoints of ``python -m mvfast.train``: written atomically, read with ``weights_only=True``.

A run folder holds two kinds:

- ``last.pt``, the training state (kind "training"): the model, optimizer and loss scaler, the step, epoch
  and batch position, the history, every rank's RNG state and training counts. ``--resume`` continues it
  bit for bit.
- ``best.pt``, the model (kind "weights"): its weights and what evaluate and predict need to use them.

Both carry the run's settings (``config``), the model's ``model_spec`` (preset, classes, overrides), its
``data_config`` and ``classes``, so either builds the model again (:func:`model_from_checkpoint`).

A folder written by ``python -m mvfast.export`` (``model.safetensors`` + ``config.json``, no pickle) reads as
a checkpoint of kind "exported" with the same keys (:func:`load_checkpoint`), so every command that takes a
checkpoint takes it too; :func:`init_from` starts a new run from either.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch

from mvfast._cli import CLIError
from mvfast.utils import atomic_write

FORMAT = 1
TRAINING, WEIGHTS, EXPORTED = "training", "weights", "exported"
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save into a temporary file beside `path`, then os.replace: readers see the old file or the
    new one, never half of one (also when the process is killed while writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by python -m mvfast.train (or its run folder's last.pt), loaded with
    weights_only=True; ``ckpt["path"]`` says where it was read from."""
    path = Path(path)
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        return load_exported(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CLIError(f"no checkpoint (last.pt) in folder {str(path)!r}")
        path = found
    if not path.is_file():
        raise CLIError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file: zip, pickle, EOF, runtime errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(
            f"cannot read checkpoint {str(path)!r}: not a valid checkpoint file ({reason})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CLIError(f"{str(path)!r} is not an mvfast training checkpoint")
    ckpt.setdefault("kind", TRAINING)  # written before best.pt held the weights alone
    ckpt["path"] = str(path)
    return ckpt


def load_exported(folder: Path) -> dict:
    """An exported folder as a checkpoint dict (kind "exported"): the weights of model.safetensors and what
    config.json says (model_spec, data_config, classes, the run's settings)."""
    import json

    try:
        meta = json.loads((folder / EXPORT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CLIError(f"{str(folder / EXPORT_CONFIG)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "mvfast-export":
        raise CLIError(f"{str(folder / EXPORT_CONFIG)!r} is not the config of an mvfast export")
    weights = folder / EXPORT_WEIGHTS
    if not weights.is_file():
        raise CLIError(f"exported folder {str(folder)!r} has no {EXPORT_WEIGHTS}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CLIError(f"cannot read {str(weights)!r}: {str(e).splitlines()[0]}") from None
    return {
        "format": FORMAT,
        "kind": EXPORTED,
        "model": state,
        "model_spec": meta["model_spec"],
        "data_config": meta["data_config"],
        "classes": meta["classes"],
        "config": meta.get("settings", {}),
        "path": str(folder),
    }


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint a run in `folder` would resume from (last.pt), or None."""
    last = Path(folder) / "last.pt"
    return last if last.is_file() else None


def require_training_state(ckpt: dict) -> dict:
    if ckpt["kind"] != TRAINING:
        raise CLIError(
            f"{ckpt['path']!r} holds the model's weights only; resume from the run's last.pt "
            f"({str(Path(ckpt['path']).with_name('last.pt'))!r})"
        )
    return ckpt


def plain(value):
    """Tuples as lists, inside dicts and lists too: what YAML, JSON and weights_only loads keep as written."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def model_spec(preset: str, num_classes: int, overrides: dict) -> dict:
    """What builds the model again: the preset, the classes and the config fields overridden."""
    return {"preset": preset, "num_classes": num_classes, "overrides": plain(overrides)}


def build_model(spec: dict):
    """mvfast.models.create_model from a :func:`model_spec`, a bad preset or override as a CLIError."""
    from mvfast.models import create_model

    overrides = dict(spec["overrides"])
    if "modalities" in overrides:
        overrides["modalities"] = tuple(overrides["modalities"])
    try:
        return create_model(spec["preset"], spec["num_classes"], **overrides)
    except (ValueError, TypeError) as e:
        raise CLIError(
            f"cannot build model {spec['preset']!r} with {spec['overrides'] or 'no overrides'}: {e}"
        ) from None


def data_config_to_dict(cfg) -> dict:
    return plain(dataclasses.asdict(cfg))


def data_config_from_dict(d: dict):
    from mvfast.data import DataConfig

    return DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def model_from_checkpoint(ckpt: dict, device="cpu"):
    """(model in eval mode with the checkpoint's weights, its DataConfig, class names)."""
    spec = ckpt["model_spec"]
    # The scene weights files were read when the run began; the checkpoint holds what they became.
    overrides = {k: v for k, v in spec["overrides"].items() if k != "scene_weights"}
    model = build_model({**spec, "overrides": overrides})
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CLIError(
            f"checkpoint {ckpt.get('path')!r} does not fit model {spec['preset']!r}: {e}"
        ) from None
    model.to(device).eval()
    return model, data_config_from_dict(ckpt["data_config"]), list(ckpt["classes"])


def init_from(model, path, classes: list, preset: str) -> tuple[list[str], list[str]]:
    """Loads into `model` every tensor of the checkpoint or exported folder at `path` whose name and shape
    match, for a new run on `classes`; returns the lines that say what was loaded and what not, and why, and
    the names of the tensors left as initialised.

    When the classes differ from the checkpoint's (in number or names), the layers whose outputs are the
    classes (``model.class_heads()``: the classifier, and the behaviour heads where they give the classes)
    keep their fresh initialisation even where their shapes happen to match. A checkpoint of another preset,
    or one of which nothing fits, is a CLIError that lists what did not match.
    """
    ckpt = load_checkpoint(path)
    theirs, mine = ckpt["model"], model.state_dict()
    spec = ckpt["model_spec"]
    old_classes = [str(c) for c in ckpt["classes"]]
    same_classes = old_classes == [str(c) for c in classes]
    heads = () if same_classes else tuple(getattr(model, "class_heads", lambda: ())())
    shape = {
        k: f"{tuple(theirs[k].shape)} in the checkpoint, {tuple(v.shape)} here"
        for k, v in mine.items()
        if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)
    }
    new_classes = [k for k in mine if k in theirs and heads and k.startswith(heads)]
    head_shapes = {k: why for k, why in shape.items() if k in new_classes}
    shape = {k: why for k, why in shape.items() if k not in new_classes}
    missing = [k for k in mine if k not in theirs]
    unused = [k for k in theirs if k not in mine]
    loaded = [k for k in mine if k in theirs and k not in shape and k not in new_classes]
    where = f"--init-from {ckpt['path']}"
    if spec["preset"] != preset or not loaded:
        listing = "; ".join(f"{k}: {why}" for k, why in list(shape.items())[:3])
        raise CLIError(
            f"{where} holds a model of preset {spec['preset']!r} with {len(old_classes)} classes, not one "
            f"for preset {preset!r}: {len(loaded)} of {len(mine)} tensors match; {len(shape)} differ in "
            f"shape ({listing or 'none'}), {len(missing)} are missing, {len(unused)} are unused"
        )
    with torch.no_grad():
        for k in loaded:
            mine[k].copy_(theirs[k])

    def names(keys, why=None):
        shown = [f"{k} ({why[k]})" if why and k in why else k for k in keys[:6]]
        return ", ".join(shown) + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "")

    change = "the same classes" if same_classes else f"{len(old_classes)} classes -> {len(classes)}"
    lines = [f"{where}: preset {preset}, {change}; loaded {len(loaded)} of {len(mine)} tensors"]
    if new_classes:
        lines.append(f"  re-initialised for the new classes: {names(new_classes, head_shapes)}")
    if shape:
        lines.append(f"  re-initialised, shape differs: {names(list(shape), shape)}")
    if missing:
        lines.append(f"  re-initialised, not in the checkpoint: {names(missing)}")
    if unused:
        lines.append(f"  not used, not in this model: {names(unused)}")
    return lines, [*new_classes, *shape, *missing]


@dataclasses.dataclass
class InferenceModel:
    """What predict and extract run: the model (eval mode, on its device), its DataConfig, the class names,
    and where it was read from."""

    model: torch.nn.Module
    data_config: object
    classes: list
    source: str
    threshold: float = 0.5  # a multi-label model's: the labels are the classes scored at least this


def load_for_inference(path: str | os.PathLike, device="cpu") -> InferenceModel:
    """The model that predict and extract run, from a checkpoint of python -m mvfast.train (best.pt,
    last.pt), a run folder (its last.pt) or a folder of python -m mvfast.export; user errors as CLIError."""
    ckpt = load_checkpoint(path)
    model, data_cfg, classes = model_from_checkpoint(ckpt, device)
    threshold = float((ckpt.get("config") or {}).get("threshold", 0.5))
    return InferenceModel(model, data_cfg, classes, ckpt["path"], threshold)


def rng_state() -> dict:
    """Python's, NumPy's, torch's and every GPU's random state, in types torch.load(weights_only) reads."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
