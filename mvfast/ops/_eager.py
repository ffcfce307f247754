"""How a public op calls its kernels: the custom op for torch.compile and Triton, and, for eager calls of
the compiled CPU/CUDA kernels, the same forward, context and backward without torch.library's Python
layers.

Each op is a ``torch.library`` custom op with a fake kernel and registered autograd, so that
``torch.compile(fullgraph=True)`` traces it whole. Called eagerly, that machinery is Python on every call:
the autograd layer re-binds the op's arguments to its schema (about 50 us for the 16 of conv3d_bn_relu on
the development CPU), then redispatches to a Python function that calls the compiled kernel op. Where the
tensors are large it does not matter; a small model's dozens of narrow layers felt it as much as their
kernels. So eager calls of the ``cpu`` and ``cuda`` backends (not traced by torch.compile or torch.jit) go

- through :func:`kernel_function`'s autograd.Function (the custom op's own setup_context and backward
  around the compiled kernel op) when a gradient is wanted,
- straight to the compiled kernel op when none is (inference, ``torch.no_grad``).

Autocast: each op has an autocast rule, ``cast(args, dtype)``, the arguments it runs on in autocast's
dtype. The public function applies it first thing (:func:`autocast_dtype`, :func:`autocast_off`) and
runs itself again with autocast off, so that its checks, every backend and both routes see the cast
arguments; :func:`register_autocast` registers the same rule as the custom op's Autocast kernel on the
CPU and CUDA, for a direct call of the custom op. Either way the kernels run with autocast off: the
matrix products inside the compiled kernels would otherwise be autocast themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor


def kernel_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function whose forward is ``forward(*args)`` (the custom op's arguments without the
    trailing backend) and whose setup_context and backward are the custom op's."""

    def fwd(*args):
        return forward(*args[:-1])

    # autograd.Function.apply binds the arguments to inspect.signature(forward) on every call; a signature
    # given up front spares inspect building it each time (~10 us a call).
    fwd.__signature__ = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(
        name,
        (torch.autograd.Function,),
        {
            # vmap runs the forward per sample, as it does the custom op
            "generate_vmap_rule": True,
            "forward": staticmethod(fwd),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(bwd),
        },
    )


def call(custom_op, function: type, forward: Callable, args: tuple, backend: str):
    """The op's outputs for ``args`` (the custom op's arguments without the backend) on ``backend``."""
    if backend == "triton" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return custom_op(*args, backend)
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return function.apply(*args, backend)
    return forward(*args)


# ---------------------------------------------------------------------------------------------------
# Autocast

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """Autocast's dtype where it is on for x's device (CPU or CUDA), else None."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return None  # the common case, in one cheap query (torch.compile traces the one below)
    device = x.device.type
    if device in AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(x: Tensor):
    """The context that turns autocast off on x's device."""
    return torch.autocast(x.device.type, enabled=False)


def to_autocast(t, dtype: torch.dtype):
    """t in autocast's dtype when autocast would cast it (a floating tensor other than float64, as
    autocast leaves float64 alone); anything else as it is. The cast is differentiable: the gradient of a
    float32 parameter stays float32."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def cast_all(args: tuple, dtype: torch.dtype) -> tuple:
    """The autocast rule of an op that takes every floating tensor in one dtype."""
    return tuple(to_autocast(a, dtype) for a in args)


_AUTOCAST_LIB = torch.library.Library("mvfast", "IMPL")


def register_autocast(name: str, cast: Callable) -> None:
    """The Autocast kernels of the custom op ``mvfast::<name>`` on the CPU and CUDA: its arguments (the
    backend last) go through ``cast`` in autocast's dtype, then the op runs with that autocast key
    excluded, as torch.library.register_autocast does (which casts every floating tensor to one fixed
    dtype; this takes the dtype autocast was entered with and the op's own rule)."""
    op = getattr(torch.ops.mvfast, name).default
    for device in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device)
        keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device=device, keys=keys):
            args = (*cast(args[:-1], torch.get_autocast_dtype(device)), args[-1])
            with torch._C._ExcludeDispatchKeyGuard(keys):
                return op(*args)

        _AUTOCAST_LIB.impl(name, kernel, key, with_keyset=True)
