"""Reading a weights file that a user has, whatever wrote it, into a plain state_dict, with a one-line error
for a file that is not one."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """{name: tensor} from a .safetensors file or a torch file (read with weights_only=True): a state_dict, or
    a dict holding one under "state_dict" or "model"; DataParallel's "module." prefixes are removed.

    Raises ValueError naming the file and what it holds instead when it is not one.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(
                f"{what} {str(path)!r}: not a readable safetensors file ({_first_line(e)})"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF and runtime errors, and weights_only refusing a class
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ValueError(
                f"{what} {str(path)!r}: a pickled object (a whole model?), not a state_dict; save "
                "model.state_dict() instead (files are read with weights_only=True)"
            ) from None
        raise ValueError(
            f"{what} {str(path)!r}: not a torch or safetensors file ({_first_line(e)})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        kind = type(obj).__name__ if not isinstance(obj, dict) else "a dict of other things than tensors"
        raise ValueError(f"{what} {str(path)!r}: holds {kind}, not a state_dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe_vgg(state: dict) -> str:
    """What VGG a state_dict of torchvision's layout is: "a VGG16 with BatchNorm and 1000 classes"."""
    import re

    convs = {int(m.group(1)) for k in state if (m := re.fullmatch(r"features\.(\d+)\.weight", k))}
    conv_layers = [i for i in convs if state[f"features.{i}.weight"].dim() == 4]
    if not conv_layers:
        return "not a VGG state_dict (no features.N conv weights)"
    bn = any(k.endswith("running_mean") and k.startswith("features.") for k in state)
    depth = {8: "VGG11", 10: "VGG13", 13: "VGG16", 16: "VGG19"}.get(len(conv_layers))
    name = depth or f"net of {len(conv_layers)} convolutions"
    last = state.get("classifier.6.weight")
    classes = f" and {last.shape[0]} classes" if last is not None else ""
    width = state[f"features.{min(conv_layers)}.weight"].shape[0]
    return f"a {name} {'with' if bn else 'without'} BatchNorm, first width {width}{classes}"
