"""Helpers for the benchmark suites: timing that waits for the GPU, bytes saved for backward, and the
performance bars each suite declares."""

from __future__ import annotations

import statistics
import time

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


def measure(benchmark, fn, device: str, *, rounds: int, info: dict, against: dict | None = None) -> None:
    """Time fn() (synchronised on the GPU) with warm-up, and record what the report needs.

    With ``against`` ({impl: step} of the baselines of fn's group), fn and the baselines then also take
    turns, round by round, and ``extra_info["turns_ms"]`` keeps each one's median over those rounds, which
    the bars use: on a machine whose speed drifts between tests (a shared VM), each test's own median can
    move by 30%, while steps that take turns see the same drift."""

    def target():
        fn()
        sync(device)

    benchmark.extra_info.update(info)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2, iterations=1)
    if against and not benchmark.disabled:
        benchmark.extra_info["turns_ms"] = take_turns({info["impl"]: fn, **against}, device, rounds)


def measure_case(benchmark, case_step, impls: dict, step, info: dict, *, rounds: int) -> None:
    """:func:`measure` of the step of one case of an op suite (``info``: its op, case, device, mode and
    impl), a kernel's taking turns with the case's eager and compile steps from the suite's
    ``case_step(device, case, mode, impl)``."""
    device, impl = info["device"], info["impl"]
    against = {}
    if impl not in ("eager", "compile"):
        against = {
            b: case_step(device, info["case"], info["mode"], b)[0]
            for b in ("eager", "compile")
            if b in impls[device]
        }
    measure(benchmark, step, device, rounds=rounds, info=info, against=against)


def take_turns(steps: dict, device: str, rounds: int) -> dict[str, float]:
    """The median ms of each step over ``rounds`` rounds in which every step runs once, in an order that
    rotates from round to round, after two warm-up calls each."""
    names = list(steps)
    for name in names:
        for _ in range(2):
            steps[name]()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
