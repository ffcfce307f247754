"""Small utilities: memory saved for backward (how mvfast's memory claims are measured) and atomic file
writes (checkpoints, cache entries)."""

from __future__ import annotations

import contextlib
import os
import secrets
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
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    pack.keeps_tensors = True  # a hook that keeps each tensor as it is (see mvfast.ops.conv3d_bn_relu)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


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
