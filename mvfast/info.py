"""``python -m mvfast.info``: versions, what the extension was compiled with, and which backend of each
op can run here (and why not).

``python -m mvfast.info --cuda-resources [--arch sm_90]``: the resource use of each compiled CUDA kernel
for one arch (registers, stack, static shared memory, local memory, and local-memory loads and stores
in its machine code), read from the built extension with cuobjdump; no GPU needed.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
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
        cuda = "no CUDA kernels"
        if b["cuda"]:
            ptx = f" (PTX {', '.join(b['ptx'])})" if b["ptx"] else ""
            cuda = f"CUDA {b['cuda_version']} for sm {', '.join(b['archs'])}{ptx}"
        add(f"mvfast._C: CPU kernels; {cuda}")
    else:
        add(f"mvfast._C: not loaded: {b['error']}")
    if torch.cuda.is_available():
        gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        add(f"GPU: {gpus}")
    else:
        add("GPU: none visible")
    interpreter_reason = _backend._INTERPRETER_REASON if _backend.TRITON_INTERPRET else None
    add(
        f"Triton: {'installed' if _backend.TRITON_AVAILABLE else 'not installed'}"
        f"{', interpreter on (TRITON_INTERPRET=1)' if _backend.TRITON_INTERPRET else ''}"
        f"{f' ({_backend._TRITON_REASON})' if _backend.TRITON_AVAILABLE and _backend._TRITON_REASON else ''}"
        f"{f' ({interpreter_reason})' if interpreter_reason else ''}"
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


# ---------------------------------------------------------------------------------------------------
# Resource use of the CUDA kernels, from the build


def find_cuobjdump() -> str | None:
    """The cuobjdump to read the extension with: ``MVFAST_CUOBJDUMP``, then PATH, the CUDA toolkit, and
    the copy that Triton's wheel carries (so a machine without a toolkit can still read a build)."""
    candidates = [os.environ.get("MVFAST_CUOBJDUMP"), shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates += ["/usr/local/cuda/bin/cuobjdump"] + sorted(glob.glob("/usr/local/cuda-*/bin/cuobjdump"))
    spec = importlib.util.find_spec("triton")  # its path, without importing it
    if spec is not None and spec.origin:
        bundled = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")
        candidates.append(os.path.join(bundled, "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_resources_unavailable(arch: str = "sm_90") -> str | None:
    """Why :func:`cuda_resources` cannot answer for ``arch`` here, or None when it can."""
    b = _ext.BUILD
    if not b["loaded"]:
        return f"mvfast._C is not loaded: {b['error']}"
    if not b["cuda"]:
        return "mvfast._C was built without its CUDA kernels (no nvcc, or MVFAST_NO_CUDA=1)"
    built = ["sm_" + a.replace(".", "") for a in b["archs"]]
    if arch not in built:
        return f"mvfast._C has no {arch} code (built for {', '.join(built)})"
    if find_cuobjdump() is None:
        return (
            "no cuobjdump found (MVFAST_CUOBJDUMP, PATH, CUDA_HOME/bin, /usr/local/cuda*/bin, "
            "triton/backends/nvidia/bin)"
        )
    return None


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout


_BUILTIN = {"v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char", "s": "short"}
_BUILTIN |= {"t": "unsigned short", "i": "int", "j": "unsigned int", "l": "long", "m": "unsigned long"}
_BUILTIN |= {"x": "long long", "y": "unsigned long long", "f": "float", "d": "double"}


def kernel_name(mangled: str) -> str | None:
    """The qualified name and template arguments of a mangled kernel, e.g. ``mvfast::netvlad::
    softmax_kernel<float>``, without ``(anonymous namespace)::``: enough of the Itanium mangling for
    mvfast's kernels (nested names, builtin and class types, bool and integer literals), so that the report
    reads the same where c++filt is missing. None for anything else."""
    pos = 0

    def source_name() -> str:
        nonlocal pos
        m = re.compile(r"\d+").match(mangled, pos)
        n = int(m.group())
        pos = m.end() + n
        return mangled[m.end() : pos]

    def nested() -> list[str]:  # after N, through the closing E
        nonlocal pos
        parts = []
        while mangled[pos] != "E":
            if mangled[pos] == "I":
                pos += 1
                parts[-1] += "<" + ", ".join(template_args()) + ">"
            else:
                name = source_name()
                if not name.startswith("_GLOBAL__N"):
                    parts.append(name)
        pos += 1
        return parts

    def template_args() -> list[str]:  # after I, through the closing E
        nonlocal pos
        args = []
        while mangled[pos] != "E":
            ch = mangled[pos]
            if ch in _BUILTIN:
                pos += 1
                args.append(_BUILTIN[ch])
            elif ch == "N":
                pos += 1
                args.append("::".join(nested()))
            elif ch.isdigit():
                args.append(source_name())
            elif ch == "L":
                m = re.compile(r"L([bil])(n?\d+)E").match(mangled, pos)
                pos = m.end()
                value = m.group(2).replace("n", "-")
                args.append({"1": "true", "0": "false"}[value] if m.group(1) == "b" else value)
            else:
                raise ValueError(ch)
        pos += 1
        return args

    if not mangled.startswith("_ZN"):
        return None
    pos = 3
    try:
        return "::".join(nested())
    except (ValueError, AttributeError, IndexError, KeyError):
        return None


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names: c++filt when there is one, else :func:`kernel_name`, else the
    mangled name. The readable name drops the return type, the argument list and
    ``(anonymous namespace)::``."""
    out = {n: kernel_name(n) or n for n in names}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt and names:
        res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=60)
        lines = res.stdout.splitlines()
        if res.returncode == 0 and len(lines) == len(names):
            for k, v in zip(names, lines, strict=True):
                v = v.replace("(anonymous namespace)::", "")
                v = v[5:] if v.startswith("void ") else v
                depth = 0
                for i, ch in enumerate(v):
                    depth += ch == "<"
                    depth -= ch == ">"
                    if ch == "(" and depth == 0:
                        v = v[:i]
                        break
                out[k] = v
    return out


def cuda_resources(arch: str = "sm_90") -> list[dict]:
    """Resource use of every CUDA kernel of mvfast._C for ``arch``, as ptxas compiled it: a dict per kernel
    with ``kernel`` (readable name), ``mangled``, ``registers`` (per thread), ``stack`` (bytes per thread),
    ``shared`` (static shared memory per block, bytes; dynamic shared memory is chosen at launch),
    ``local`` (local memory per thread, bytes: spills and local arrays), ``local_stores`` and
    ``local_loads`` (STL / LDL instructions in its machine code). Raises RuntimeError with the reason when
    it cannot be read here (see :func:`cuda_resources_unavailable`)."""
    why = cuda_resources_unavailable(arch)
    if why:
        raise RuntimeError(f"CUDA kernel resources: {why}")
    tool = find_cuobjdump()
    lib = _ext._C.__file__
    kernels: dict[str, dict] = {}
    usage = _run([tool, "-arch", arch, "--dump-resource-usage", lib])
    name = None
    for line in usage.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            kernels[name] = {
                "mangled": name,
                "registers": int(fields.get("REG", 0)),
                "stack": int(fields.get("STACK", 0)),
                "shared": int(fields.get("SHARED", 0)),
                "local": int(fields.get("LOCAL", 0)),
                "local_stores": 0,
                "local_loads": 0,
            }
            name = None
    name = None
    for line in _run([tool, "-arch", arch, "-sass", lib]).splitlines():
        m = re.match(r"\s*Function : (\S+)\s*$", line)
        if m:
            name = m.group(1) if m.group(1) in kernels else None
            continue
        if name and "/*" in line:
            op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
            if op and op.group(1) == "STL":
                kernels[name]["local_stores"] += 1
            elif op and op.group(1) == "LDL":
                kernels[name]["local_loads"] += 1
    readable = _demangle(list(kernels))
    rows = [{"kernel": readable[k], **v} for k, v in kernels.items()]
    return sorted(rows, key=lambda r: r["kernel"])


def cuda_resources_report(arch: str = "sm_90") -> str:
    why = cuda_resources_unavailable(arch)
    if why:
        return f"CUDA kernel resources for {arch}: unavailable: {why}"
    rows = cuda_resources(arch)
    width = max(len(r["kernel"]) for r in rows) if rows else 6
    cols = [("regs", "registers"), ("stack", "stack"), ("shared", "shared"), ("local", "local")]
    cols += [("STL", "local_stores"), ("LDL", "local_loads")]
    head = f"{'kernel':<{width}}" + "".join(f"  {title:>6}" for title, _ in cols)
    lines = [f"CUDA kernel resources for {arch} (mvfast._C, {find_cuobjdump()}):", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['kernel']:<{width}}" + "".join(f"  {r[key]:>6}" for _, key in cols))
    lines.append(
        "regs: registers per thread; stack, local: bytes per thread; shared: static bytes per block "
        "(dynamic shared memory is set at launch); STL/LDL: local-memory stores/loads in the machine code"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvfast.info", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cuda-resources",
        action="store_true",
        help="print the registers, stack, shared and local memory of each compiled CUDA kernel",
    )
    parser.add_argument("--arch", default="sm_90", help="the arch of --cuda-resources (default sm_90)")
    args = parser.parse_args(argv)
    if args.cuda_resources:
        print(cuda_resources_report(args.arch))
        return 0
    print(report())
    print(model_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
