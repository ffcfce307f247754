"""``python -m mvfast.info``: versions, what the extension was compiled with, and which backend of each
op can run here (and why not)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

import mvfast
from mvfast import _backend, _ext
from mvfast.ops import OPS


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def op_backends(op: str, device: str) -> dict[str, dict]:
    """``mvfast.backends(device)`` narrowed to one op: a build that predates the op lacks its kernels."""
    table = _backend.backends(device)
    for name in ("cpu", "cuda"):
        if table[name]["available"] and not hasattr(torch.ops.mvfast, f"{OPS[op]}"):
            table[name] = {"available": False, "reason": f"mvfast._C has no {op} kernels; rebuild it"}
    return table


def report() -> str:
    lines = []
    add = lines.append
    add(f"mvfast {mvfast.__version__} ({mvfast.__file__})")
    add(f"python {platform.python_version()} on {platform.platform()}")
    add(
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}, "
        f"numpy {_version('numpy')}, av {_version('av')}"
    )
    b = _ext.BUILD
    if b["loaded"]:
        cuda = f"CUDA {b['cuda_version']} for sm {', '.join(b['archs'])}" if b["cuda"] else "no CUDA kernels"
        add(f"mvfast._C: CPU kernels; {cuda}")
    else:
        add(f"mvfast._C: not loaded: {b['error']}")
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        add(f"GPU: {gpus}")
    else:
        add("GPU: none visible")
    add(
        f"Triton: {'installed' if _backend.TRITON_AVAILABLE else 'not installed'}"
        f"{', interpreter on (TRITON_INTERPRET=1)' if _backend.TRITON_INTERPRET else ''}"
    )
    add(f"backend asked for: {_backend.get_backend()} (MVFAST_BACKEND, mvfast.set_backend, mvfast.backend)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in OPS:
        add(f"op {op}:")
        for dev in devices:
            for name, st in op_backends(op, dev).items():
                state = "available" if st["available"] else f"unavailable: {st['reason']}"
                add(f"  {dev:<4} {name:<9} {state}")
    return "\n".join(lines)


def model_report(num_classes: int = 101) -> str:
    """Parameters of each model preset, counted on the meta device (nothing is allocated, so the paper
    preset's 1.7 GB of weights cost nothing here)."""
    from mvfast.models import PRESETS, MicroVideoNet, preset_config

    lines = [f"model presets (parameters for {num_classes} classes; create with mvfast.models.create_model):"]
    for name in PRESETS:
        with torch.device("meta"):
            model = MicroVideoNet(preset_config(name, num_classes))
        parts = {}
        for pname, p in model.named_parameters():
            top = pname.split(".")[0]
            parts[top] = parts.get(top, 0) + p.numel()
        total = sum(parts.values())
        detail = ", ".join(f"{k} {_count(v)}" for k, v in parts.items())
        lines.append(f"  {name:<8} {_count(total):>7}  ({detail})")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def main() -> int:
    print(report())
    print(model_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
