"""Helpers for the benchmark suites: timing that waits for the GPU, bytes saved for backward, and the
performance bars each suite declares."""

from __future__ import annotations

import torch

import mvfast
from mvfast._backend import KERNEL_BACKENDS
from mvfast.utils import saved_bytes  # noqa: F401  (re-exported to the suites)

GPU = torch.cuda.is_available()

# Bars the issues require, declared by the suites: dicts of op, case, device, mode, impl, base, at_least.
BARS: list[dict] = []
# Tables of their own that suites add to the end of the run: functions of the results (benchmark dicts with
# extra_info and stats) that return markdown, or "" when they have nothing to show.
TABLES: list = []


def unavailable(impls: dict, device: str, impl: str) -> str | None:
    """Why ``impl`` cannot run on ``device`` (a skip reason), or None: an implementation the suite does not
    time on that device, or a kernel backend that mvfast says cannot run there."""
    if impl not in impls[device]:
        return f"{impl} does not run on {device}"
    if impl in KERNEL_BACKENDS and not mvfast.backends(device)[impl]["available"]:
        return f"{impl}: {mvfast.backends(device)[impl]['reason']}"
    return None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(benchmark, fn, device: str, *, rounds: int, info: dict) -> None:
    """Time fn() (synchronised on the GPU) with warm-up, and record what the report needs."""

    def target():
        fn()
        sync(device)

    benchmark.extra_info.update(info)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2, iterations=1)
