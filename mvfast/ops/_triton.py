"""What the Triton kernels share: Triton itself (stand-ins when it is missing, so that the op modules still
import), launch plans, the GPUs they are planned for, the precision of their products, and compiling a
plan ahead of time without a GPU.

``TRITON_INTERPRET=1`` must be in the environment before this is imported for the kernels to run on CPU
tensors (Triton reads it when ``@triton.jit`` wraps a function).

Launch plans: each op has one function, ``triton_plan``, of its shapes, dtype, precision and target GPU
that returns every kernel launch it makes (kernel, grid, tile sizes and other constexprs, warps, pipeline
stages), and its launchers run exactly those launches. The compile check (tests/test_triton_compile.py)
runs the launchers on meta tensors under :func:`recording`, which lists the launches with their very
arguments instead of running them, and compiles each with Triton's own compiler for sm_80, sm_86, sm_89
and sm_90 (:func:`compile_launch`), checking its shared memory against the arch: the check follows the
code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - the torch CUDA wheels bring triton
    AVAILABLE = False

    class _Stub:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = tl = _Stub()


# ---------------------------------------------------------------------------------------------------
# Targets

# Shared memory one block may use (the opt-in maximum), in bytes, by compute capability: A100 (sm_80)
# 163 KB, the Ampere and Ada consumer/workstation parts (sm_86, sm_89) 99 KB, H100/H200 (sm_90) 227 KB.
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = tuple(SHARED_MEMORY)


@dataclasses.dataclass(frozen=True)
class Target:
    """The GPU a plan is made for: its compute capability (10 * major + minor) and its SM count (how many
    programs fill it)."""

    arch: int
    sms: int

    @property
    def shared_memory(self) -> int:
        """Bytes of shared memory a block may use; an arch not in the table gets the smallest budget."""
        return SHARED_MEMORY.get(self.arch, min(SHARED_MEMORY.values()))


# The interpreter runs on the CPU and has no shared memory: its plans are those of an A100.
INTERPRETER = Target(80, 4)


def target(device: torch.device) -> Target:
    """The Target of the GPU that holds ``device`` (INTERPRETER for CPU tensors; the recording's target
    inside :func:`recording`)."""
    if _recording_target is not None:
        return _recording_target
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_target(index: int) -> Target:
    major, minor = torch.cuda.get_device_capability(index)
    return Target(10 * major + minor, torch.cuda.get_device_properties(index).multi_processor_count)


def device_guard(device: torch.device):
    """The context a launch runs in: the tensors' own GPU current (Triton launches on the current device
    and its current stream), nothing for CPU tensors under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------
# Precision of tl.dot on float32 operands
#
# On a GPU, tl.dot with input_precision="tf32" rounds both float32 operands to TF32 (10 mantissa bits,
# float32's exponent range) before the tensor cores multiply them, accumulating in float32; "ieee" is
# exact float32 on the FMA units. The interpreter computes exact float32 whichever is asked. Each kernel
# follows the switch of the PyTorch op it replaces, so that a float32 model is exactly as precise, and as
# fast, as in eager PyTorch: matrix products follow torch.get_float32_matmul_precision() (default
# "highest": no TF32), convolutions follow torch.backends.cudnn.allow_tf32 (default True: TF32).
# Products of 16-bit inputs that meet a float32 intermediate use TF32: it holds float16 and bfloat16
# values exactly and keeps float32's range, and the result is rounded to 16 bits anyway.


def matmul_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the matrix products in a kernel whose inputs have ``dtype``: as torch.matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def conv_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of a convolution kernel whose inputs have ``dtype``: as cuDNN's convolutions."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def next_pow2(n: int, at_least: int = 16) -> int:
    """Block size for a dimension of n: a power of two, and at least 16 (as ``tl.dot`` requires) unless
    ``at_least`` says otherwise."""
    return max(at_least, 1 << (max(n, 1) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------
# Launch plans

# CUDA's grid limits: up to 2**31 - 1 programs along axis 0, 65535 along axes 1 and 2. A dimension that
# grows with the data (the batch) goes on axis 0 or is bounded by the op's reasons (see netvlad's).
MAX_GRID = (2**31 - 1, 65535, 65535)


def grid_fits(grid: tuple[int, ...]) -> bool:
    """The grid is one CUDA launches (at most three axes, each within MAX_GRID)."""
    return len(grid) <= 3 and all(n <= most for n, most in zip(grid, MAX_GRID, strict=False))


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a plan: the kernel, its grid, its constexprs (tile sizes, precision, flags),
    warps and pipeline stages, and ``scalars``, runtime arguments that the plan itself decides (how work
    is split), passed by name after the launcher's own arguments."""

    kernel: object
    grid: tuple[int, ...]
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    scalars: dict = dataclasses.field(default_factory=dict)

    def __call__(self, device: torch.device, *args) -> None:
        """Run the launch on ``args`` with ``device`` (the tensors' device) current."""
        if _recorded is not None:
            _recorded.append((self, args))
            return
        if 0 in self.grid:
            return
        with device_guard(device):
            self.kernel[self.grid](
                *args, **self.scalars, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages
            )

    @property
    def name(self) -> str:
        return _fn(self.kernel).__name__


def mask_bytes(mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the bool mask as bytes, has_mask) as the kernels take them; without a mask an empty byte tensor
    stands in (never read), of the same type so that both cases are one compiled kernel."""
    if mask is None:
        return like.new_empty((0,), dtype=torch.uint8), 0
    return mask.contiguous().view(torch.uint8), 1


def pick(candidates, fits):
    """The first of ``candidates`` for which ``fits`` holds, else the last (the smallest): plans list
    their tile choices from the fastest down."""
    candidates = list(candidates)
    for c in candidates:
        if fits(c):
            return c
    return candidates[-1]


_recorded: list | None = None
_recording_target: Target | None = None


@contextlib.contextmanager
def recording(on: Target):
    """Within the block, launches are recorded instead of run, and planned for ``on`` whatever the
    tensors' device: the launchers can then be called on meta tensors to list what they would launch, with
    the very arguments (sizes, strides, dtypes). Yields the list of (Launch, args) it fills."""
    global _recorded, _recording_target
    previous = _recorded, _recording_target
    _recorded, _recording_target = [], on
    try:
        yield _recorded
    finally:
        _recorded, _recording_target = previous


# ---------------------------------------------------------------------------------------------------
# Compiling a launch ahead of time (no GPU needed): Triton's compiler and its bundled ptxas

_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}


def _fn(kernel):
    return getattr(kernel, "fn", kernel)


def specialization(launch: Launch, args: tuple) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``launch`` on ``args`` as Triton's JIT specialises them: tensors
    become typed pointers, 16-byte aligned (as PyTorch allocates them); integers equal to 1 become
    constexprs and multiples of 16 are marked so, unless the kernel says not to specialise them."""
    fn = _fn(launch.kernel)
    names = list(fn.__code__.co_varnames[: fn.__code__.co_argcount])
    values = dict(zip(names, args, strict=False)) | launch.scalars
    dns = {names[d] if isinstance(d, int) else d for d in _do_not_specialize(launch.kernel)}
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = values[name]
        if isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif isinstance(v, int):
            if v == 1 and name not in dns:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{launch.name}: argument {name} is a {type(v).__name__}")
    return signature, constexprs, attrs


def _do_not_specialize(kernel) -> tuple:
    """The kernel's do_not_specialize (the interpreter's functions keep it among their jit arguments: on
    the function from Triton 3.5, on its rewriter in 3.2 to 3.4; Triton 3.1's interpreter drops it)."""
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:
        kwargs = getattr(kernel, "kwargs", None)
        if kwargs is None:
            kwargs = getattr(getattr(kernel, "rewriter", None), "kwargs", {})
        dns = kwargs.get("do_not_specialize", ())
    return tuple(dns or ())


def compile_launch(launch: Launch, args: tuple, arch: int) -> dict:
    """Compile ``launch`` on ``args`` (as recorded) for sm_``arch`` with Triton's own compiler; returns
    its resource usage: shared memory (bytes), registers per thread, spilled bytes, compile seconds.

    Needs a process where TRITON_INTERPRET is not set (the kernels must be JIT functions)."""
    signature, constexprs, attrs = specialization(launch, args)
    return compile_kernel(
        launch.kernel, signature, constexprs, attrs, launch.num_warps, launch.num_stages, arch
    )


def compile_kernel(kernel, signature, constexprs, attrs, num_warps, num_stages, arch) -> dict:
    """compile_launch's work on its specialisation (picklable, for a pool of processes). seconds is the
    wall time, cpu_seconds the CPU time it took (ptxas included)."""
    import time

    from triton.backends.compiler import GPUTarget

    src = _ast_source(kernel, signature, constexprs, attrs)
    start, cpu = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryFile(mode="w+") as out:
        # Triton prints ptxas's -v report (registers, spill stores) when asked to.
        env = os.environ.get("TRITON_DUMP_PTXAS_LOG")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        try:
            with contextlib.redirect_stdout(out):
                compiled = triton.compile(
                    src,
                    target=GPUTarget("cuda", arch, 32),
                    options=dict(num_warps=num_warps, num_stages=num_stages),
                )
        finally:
            if env is None:
                os.environ.pop("TRITON_DUMP_PTXAS_LOG")
            else:
                os.environ["TRITON_DUMP_PTXAS_LOG"] = env
        out.seek(0)
        log = out.read()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    usage = _ptxas_usage(log) or _cuobjdump_usage(compiled.asm["cubin"])
    return dict(shared=int(compiled.metadata.shared), seconds=seconds, cpu_seconds=cpu, **usage)


def _ast_source(kernel, signature: dict, constexprs: dict, attrs: dict):
    """Triton's ASTSource of a specialisation (as :func:`specialization` makes it). From Triton 3.3 it takes
    it as it is. Triton 3.2 takes the signature of the arguments not declared ``tl.constexpr`` (an integer
    specialised to 1 keeps its type there and is among the constants too), the constants by name, and the
    attributes as an AttrsDescriptor of the argument indices divisible by 16 and equal to 1, as its JIT
    makes them; Triton 3.1 the same, with its own AttrsDescriptor."""
    import inspect

    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource).parameters:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    from triton.compiler.compiler import AttrsDescriptor

    declared = {p.name for p in kernel.params if p.is_constexpr}
    divisible = {i for (i,), props in attrs.items() if ["tt.divisibility", 16] in props}
    types, ones = {}, set()
    for i, (name, ty) in enumerate(signature.items()):
        if name in declared:
            continue
        if ty == "constexpr":  # an integer equal to 1
            ty = "i32"
            ones.add(i)
        types[name] = ty
    if hasattr(AttrsDescriptor, "from_hints"):  # Triton 3.2
        descriptor = AttrsDescriptor.from_hints({i: 16 for i in divisible} | {i: 1 for i in ones})
    else:  # Triton 3.1
        descriptor = AttrsDescriptor(divisible_by_16=divisible, equal_to_1=ones)
    return ASTSource(fn=kernel, signature=types, constants=constexprs, attrs=descriptor)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as one)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _ptxas_usage(log: str) -> dict | None:
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:  # a compile served from Triton's cache runs no ptxas
        return None
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return dict(
        registers=int(regs.group(1)),
        spill_stores=int(stores.group(1)) if stores else 0,
        spill_loads=int(loads.group(1)) if loads else 0,
    )


def _cuobjdump_usage(cubin: bytes) -> dict:
    """Registers and stack frame from the cubin (-1 where Triton bundles no cuobjdump). A Triton kernel
    has no local arrays and makes no calls, so its stack frame is register spill space."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):  # unknown rather than a failed compile
        return dict(registers=-1, spill_stores=-1, spill_loads=-1)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    spill = int(stack.group(1)) if stack else 0
    return dict(registers=int(regs.group(1)) if regs else -1, spill_stores=spill, spill_loads=spill)
