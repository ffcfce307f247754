"""The edge every command shares: a user's mistake as one line, the entry point, the processes under
torchrun, the device and the kernels.

A :class:`CLIError` is a user's mistake (a missing path, an unknown preset, a corrupt checkpoint): the
commands print it as one line and exit with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


class CLIError(Exception):
    """A user error, printed as ``prog: error: message`` without a traceback."""


def run_main(prog: str, fn, argv) -> int:
    """Runs ``fn(argv)``: its exit status where it returns an int (predict's and extract's 1 when some
    videos failed), else 0; 2 (and one line on stderr) on a :class:`CLIError`."""
    import logging

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        code = fn(argv)
        return code if isinstance(code, int) and not isinstance(code, bool) else 0
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


DEVICE_HELP = "auto (this process's GPU if there is one, else the CPU), cpu, cuda or cuda:N"
BACKEND_HELP = "mvfast kernels: auto, cpu, cuda, triton or reference (python -m mvfast.info says which run)"


def add_device_flags(parser) -> None:
    """--device and --backend, for the commands that take no other TrainConfig settings."""
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP} (default: auto)")
    parser.add_argument("--backend", default="auto", help=f"{BACKEND_HELP} (default: auto)")


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """ "auto" (this process's GPU under torchrun, else the CPU), "cpu", "cuda" or "cuda:N"."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"bad device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return device


@dataclass
class Processes:
    """This process among torchrun's (RANK, WORLD_SIZE and LOCAL_RANK; one process without torchrun), and
    its device. :meth:`start` joins the process group (gloo on CPUs, nccl on GPUs) when there are several."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls, device: str = "auto") -> Processes:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        chosen = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)))
        if world > 1:
            if chosen.type == "cuda":
                torch.cuda.set_device(chosen)
            dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        return cls(rank, world, chosen)

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """`obj` of every rank (all_gather_object), on every rank."""
        if not self.ddp:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def share(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, flag: bool, op) -> bool:
        """`flag` combined over the ranks: dist.ReduceOp.MIN (all of them) or MAX (any of them)."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return bool(t.item())

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def close(self) -> None:
        if self.ddp:
            dist.destroy_process_group()


class StopSignal:
    """Ctrl-C or SIGTERM inside the block sets `name` (SIGINT, SIGTERM) for a long job to stop at its next
    boundary, saving what it has (training: last.pt at the next step); a second signal interrupts at once."""

    def __enter__(self):
        self.name = None
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, _frame):
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


def set_backend(name: str, device: torch.device) -> None:
    """mvfast.set_backend with an unavailable backend reported before any work starts."""
    import mvfast

    if name not in mvfast.BACKENDS:
        raise CLIError(f"unknown backend {name!r}; choose from {', '.join(mvfast.BACKENDS)}")
    if name not in ("auto", "reference"):
        status = mvfast.backends(device)[name]
        if not status["available"]:
            raise CLIError(f"backend {name!r} cannot run on {device.type}: {status['reason']}")
    mvfast.set_backend(name)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (asynchronously from pinned memory on a GPU), other values as is."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
