"""How an op's kernels are registered and called, written once for every op from its :class:`OpSpec`.

Each op ``mvfast::<name>`` is a ``torch.library`` custom op (the spec's schema with a trailing
``str backend``) with a fake kernel, registered autograd and an Autocast kernel, so that
``torch.compile(fullgraph=True)`` traces it whole; its backward is the custom op
``mvfast::<name>_backward``, with a fake of its own. The compiled CPU/CUDA kernels are the ops
``mvfast::<name>_fwd`` and ``mvfast::<name>_bwd`` (csrc/ops.cpp): both custom ops call them for every
backend but ``triton``, and they get fake kernels here too, so that torch.compile traces a backward that
calls them directly.

The eager route. Called eagerly, the custom op's machinery is Python on every call: the autograd layer
re-binds the op's arguments to its schema (about 50 us for the 16 of conv3d_bn_relu on the development
CPU), then redispatches to a Python function that calls the compiled kernel op. Where the tensors are large
it does not matter; a small model's dozens of narrow layers felt it as much as their kernels. So eager
calls of the ``cpu`` and ``cuda`` backends (not traced by torch.compile or torch.jit) go (:meth:`Op.call`)

- through an autograd.Function (the custom op's own setup_context and backward around the compiled kernel
  op) when a gradient is wanted,
- straight to the compiled kernel op when none is (inference, ``torch.no_grad``).

Gradients. Outputs that carry no gradient are never materialised as zeros
(``ctx.set_materialize_grads(False)``: for conv3d_bn_relu's z that was 2 ms of memset per small-model
step), so an op's backward sees None for every output no gradient reached; where none reached any output
it is not called at all. The compiled kernels' backward op is called directly in an ordinary backward;
Triton's Python kernels, and a backward that records a graph (create_graph=True), go through the backward
custom op: it has no derivative and says so, where the compiled op would be dropped from the graph with a
warning and the second derivative silently wrong.

Autocast. Each op has an autocast rule, ``autocast(args, dtype)``: the arguments it runs on in autocast's
dtype. The public function applies it first thing (:func:`autocast_dtype`, :func:`autocast_off`) and runs
itself again with autocast off, so that its checks, every backend and both routes see the cast arguments;
the same rule is the custom op's Autocast kernel on the CPU and CUDA, for a direct call of the custom op.
Either way the kernels run with autocast off: the matrix products inside the compiled kernels would
otherwise be autocast themselves. So do the backward kernels when backward is called inside an autocast
region.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """What one op is, for :class:`Op` to register. ``args`` below are the custom op's arguments
    without the trailing backend; ``bargs`` the backward op's, likewise."""

    name: str  # mvfast::<name>, <name>_backward; the compiled kernels <name>_fwd, <name>_bwd
    schema: str  # "(Tensor x, ...) -> (Tensor, ...)", without the backend
    backward_schema: str
    fake: Callable  # fake(*args, backend): the custom op's outputs as empty tensors
    backward_fake: Callable  # backward_fake(*bargs, backend)
    triton_forward: Callable  # triton_forward(*args)
    triton_backward: Callable  # triton_backward(*bargs)
    setup_context: Callable  # setup_context(ctx, args, outputs); ctx.backend is set
    # backward(ctx, run, *grads) -> a gradient (or None) per argument, the backend's included, where
    # run(ctx, *bargs) runs the backward kernels; grads of outputs no gradient reached are None
    backward: Callable
    autocast: Callable  # autocast(args, dtype) -> args
    # the compiled forward's arguments, where they differ from the custom op's
    kernel_args: Callable | None = None
    kernel_fake: Callable | None = None  # the compiled forward's fake (default: fake(*args, "cpu"))


class Op:
    """The registrations of one :class:`OpSpec` and its eager route, :meth:`call`."""

    def __init__(self, spec: OpSpec, function_name: str):
        self.spec = spec
        name = spec.name
        backend_schema = spec.schema.replace(") ->", ", str backend) ->", 1)
        back_schema = spec.backward_schema.replace(") ->", ", str backend) ->", 1)
        # the compiled kernel ops, when mvfast._C is loaded
        kernels = hasattr(torch.ops.mvfast, f"{name}_fwd")
        fwd = getattr(torch.ops.mvfast, f"{name}_fwd") if kernels else None
        bwd = getattr(torch.ops.mvfast, f"{name}_bwd") if kernels else None
        kernel_args = spec.kernel_args
        triton_forward, triton_backward = spec.triton_forward, spec.triton_backward

        if kernel_args is None:
            self.kernel_forward = fwd
        else:

            def kernel_forward(*args):
                return fwd(*kernel_args(*args))

            self.kernel_forward = kernel_forward

        def forward(*args):
            if args[-1] == "triton":
                return triton_forward(*args[:-1])
            return self.kernel_forward(*args[:-1])

        def backward_impl(*bargs):
            if bargs[-1] == "triton":
                return triton_backward(*bargs[:-1])
            return bwd(*bargs[:-1])

        custom = torch.library.custom_op(f"mvfast::{name}", forward, mutates_args=(), schema=backend_schema)
        custom.register_fake(spec.fake)
        back = torch.library.custom_op(
            f"mvfast::{name}_backward", backward_impl, mutates_args=(), schema=back_schema
        )
        back.register_fake(spec.backward_fake)
        if kernels:
            fwd_fake = spec.kernel_fake or (lambda *args: spec.fake(*args, "cpu"))
            torch.library.register_fake(f"mvfast::{name}_fwd", fwd_fake)
            torch.library.register_fake(f"mvfast::{name}_bwd", lambda *b: spec.backward_fake(*b, "cpu"))

        backward_op = getattr(torch.ops.mvfast, f"{name}_backward")

        def run(ctx, *bargs):
            if ctx.backend == "triton" or torch.is_grad_enabled():
                return backward_op(*bargs, ctx.backend)
            return bwd(*bargs)

        n_args = len(custom._opoverload._schema.arguments)
        spec_setup, spec_backward = spec.setup_context, spec.backward

        def setup_context(ctx, inputs, output):
            ctx.backend = inputs[-1]
            ctx.set_materialize_grads(False)
            spec_setup(ctx, inputs[:-1], output)

        def backward(ctx, *grads):
            # What setup_context left on the node for a later op (``as_source``: conv3d_bn_relu's z, for
            # the block it feeds) is no one's once this node's backward runs: let go of it.
            if hasattr(ctx, "as_source"):
                del ctx.as_source
            if all(g is None for g in grads):
                return (None,) * n_args  # undefined: no gradient reached any output (gradcheck tests this)
            if torch._C._is_any_autocast_enabled():
                # a backward called inside an autocast region (the engine runs it on this thread on the
                # CPU, and carries the state into its CUDA threads): the kernels' own products must not be
                # autocast, as in the forward
                with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
                    return spec_backward(ctx, run, *grads)
            return spec_backward(ctx, run, *grads)

        custom.register_autograd(backward, setup_context=setup_context)
        register_autocast(name, spec.autocast)
        self.custom_op = getattr(torch.ops.mvfast, name)
        self.function = kernel_function(function_name, self.kernel_forward, setup_context, backward)

    def call(self, args: tuple, backend: str):
        """The op's outputs for ``args`` (without the backend) on ``backend``: the custom op under
        torch.compile, torch.jit.trace and for Triton, else the eager route."""
        if backend == "triton" or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self.custom_op(*args, backend)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args, backend)
        return self.kernel_forward(*args)


def kernel_function(name: str, forward: Callable, setup_context: Callable, backward: Callable) -> type:
    """An autograd.Function whose forward is ``forward(*args)`` (the custom op's arguments without the
    trailing backend) and whose setup_context and backward are the custom op's."""

    def fwd(*args):
        return forward(*args[:-1])

    # autograd.Function.apply binds the arguments to inspect.signature(forward) on every call; a signature
    # given up front spares inspect building it each time (~10 us a call).
    fwd.__signature__ = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])

    return type(
        name,
        (torch.autograd.Function,),
        {
            # vmap runs the forward per sample, as it does the custom op
            "generate_vmap_rule": True,
            "forward": staticmethod(fwd),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate, and save their statistics, in for x: float64 for float64, else
    float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# Autocast


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """Autocast's dtype where it is on for x's device (CPU or CUDA), else None (and for an x that is not a
    tensor, which the op's checks then name)."""
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return None  # the common case, in one cheap query (torch.compile traces the one below)
    if not isinstance(x, Tensor):
        return None
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
_AUTOCAST_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU) | torch._C.DispatchKeySet(
    torch._C.DispatchKey.AutocastCUDA
)


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
