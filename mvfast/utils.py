"""Small utilities: memory saved for backward (how mvfast's memory claims are measured) and atomic file
writes (checkpoints, cache entries)."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import torch


def saved_bytes(fn: Callable[[], object], exclude=()) -> int:
    """Bytes of the distinct storages that autograd saves for backward while ``fn()`` runs.

    Tensors that share a storage (views, or one tensor saved by several ops) count once; inputs that are
    saved count too, since they stay alive for backward, except the storages of the tensors in
    ``exclude`` (a model's parameters, to count activations only). This is how mvfast's memory claims are
    measured:

    >>> x = torch.randn(8, 300, 1024, requires_grad=True)
    >>> saved_bytes(lambda: mvfast.ops.attention_pool(x, w))  # doctest: +SKIP
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t is _probe.tensor:  # the hooks query of torches before 2.8 (saved_tensor_hooks_keep_tensors)
            _probe.kept = True
            return t
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    pack.keeps_tensors = True  # a hook that keeps each tensor as it is (saved_tensor_hooks_keep_tensors)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


class _Probe(threading.local):
    tensor: torch.Tensor | None = None
    kept = False


_probe = _Probe()
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_keep_tensors() -> bool:
    """No saved-tensor hooks are active, or only one that keeps each tensor as it is (saved_bytes's
    counting hook, marked ``keeps_tensors``). Hooks that move or drop saved tensors
    (torch.autograd.graph.save_on_cpu, activation checkpointing) must see every tensor a fused block keeps,
    so no block holds another's z for later then (mvfast.ops.conv3d_bn_relu)."""
    if _top_hooks is None:  # torch < 2.8 has no query (a private one): ask a saved probe tensor instead
        return _probed_hooks_keep_tensors()
    try:
        hooks = _top_hooks(False)
    except TypeError:  # another signature of the private query: assume hooks, so no block holds another's z
        return False
    return hooks is None or getattr(hooks[0], "keeps_tensors", False)


def _probed_hooks_keep_tensors() -> bool:
    # A product saves its inputs: with hooks active, the innermost pair packs the probe, and the saved
    # tensor then refuses hooks of its own; saved_bytes's hook says so when it is the pair that packed it
    # (other hooks marked keeps_tensors count as hooks that move tensors here). About 3 us a call on the
    # development CPU.
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False  # no real tensor may be made here: as if hooks were active
    if _probe.tensor is None:
        _probe.tensor = torch.zeros(1, requires_grad=True)
    t, _probe.kept = _probe.tensor, False
    try:
        with torch.enable_grad():
            y = t.mul(t)
    except RuntimeError:  # traced under a fake mode: as above
        return False
    if y.grad_fn is None:  # inference mode: nothing is saved
        return True
    try:
        y.grad_fn._raw_saved_self.register_hooks(_same, _same)
    except RuntimeError:  # "... whose hooks have already been set"
        return _probe.kept
    return True


def _same(t):
    return t


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file to write that replaces ``path`` only once the block has finished: it is written beside
    ``path`` under a temporary name, synced, then renamed over it, so a reader (or a run killed while
    writing) sees the old file or the new one, never part of one. On an error the temporary file is
    removed. The file gets the mode the umask gives, like one written in place.

    >>> with atomic_write("runs/x/last.pt") as f:  # doctest: +SKIP
    ...     torch.save(state, f)
    """
    path = Path(path)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, uniquely named temporary file beside `path`, open for writing, with the mode the umask gives
    (tempfile.mkstemp would make it 0600, and the rename would keep that: a teammate could not read it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"atomic_write: no free temporary name beside {str(path)!r}")
