"""Check mvfast on a machine with an NVIDIA GPU in one command, within a time budget, and write a report.

    python benchmarks/gpu_check.py --out gpu-report/            # in the checkout's root, on the GPU machine

Stages, in order, each with its share of the total budget (--budget, default 450 s):

- build   the extension, in place, for the visible GPU's arch (``setup.py build_ext --inplace`` with
          FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST from the GPU; offline), then what it was built with and
          which backends can run; --no-build only does the second part.
- tests   pytest on tests/ with ``-k "cuda or triton"``: every CUDA and Triton test (on a GPU the Triton
          params run on CUDA tensors and the cuda ones are not skipped); pass/fail/skip counts, failures.
- ops     each op of benchmarks/test_bench_{netvlad,attention_pool,conv3d_bn_relu}.py, forward and
          forward+backward, at the suites' shapes, float32 and bfloat16, eager, torch.compile and the kernel
          backends, plus the suite's fused r3d_18; timed here with CUDA events (medians).
- models  the ``tiny`` and ``paper`` presets of benchmarks/test_bench_models.py: latency at batch 1,
          throughput at batch 64, the training step at batch 8.
- e2e     benchmarks/test_bench_train.py's CUDA cases through pytest-benchmark (needs PyAV to make its
          videos; skipped, and said so, when ``av`` is not installed).

The benchmark stages time the suites' own steps (their ``case_step``), so the check follows the benchmarks.
Each stage runs in a child process: past its budget it stops starting work and says so, and at the budget
it is killed, keeping what it wrote. A child whose CUDA context broke (an illegal address in a kernel)
is started again, skipping what was done. Unused time passes to the stages after it. The report is
report.md and report.json in --out, with one log per stage; the summary table is printed last.

Without a GPU the command says so in one line and exits 0. ``--cpu-smoke`` runs the stages on the CPU
with tiny shapes instead (no build), which is how tests/test_gpu_check.py checks this script in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check_pytest  # noqa: E402
import report as bench_report  # noqa: E402

STAGES = ("build", "tests", "ops", "models", "e2e")
# Nominal seconds of a 450 s run; the budget is shared out in these proportions among the stages still to
# run, so time a stage leaves unused goes to the ones after it. The build gets the most: a build cut short
# leaves the cuda backend with nothing to test, and what it does not use goes on to the tests.
SHARES = {"build": 170, "tests": 110, "ops": 100, "models": 60, "e2e": 10}
DEFAULT_BUDGET = 450.0
RESERVE = 5.0  # seconds kept for writing the report
KILL_WAIT = 3.0  # between SIGTERM and SIGKILL of a stage's process group
MAX_RESTARTS = 4  # fresh processes after a lost CUDA context or a crash, per stage
OPTIONAL = ("av",)  # modules that some tests and benchmarks need and a device machine may lack
TESTS_K = "cuda or triton"
OWN_TEST = "tests/test_gpu_check.py"  # would run this script again
DTYPES = ("float32", "bfloat16")  # of the ops stage
SMOKE_SHAPES = {  # --cpu-smoke: one tiny case per op suite, in its CASES' format
    "test_bench_netvlad": {"smoke-B2-M8-D16-K4": (2, 8, 16, 4)},
    "test_bench_attention_pool": {"smoke-B2-L8-D16-H2": (2, 8, 16, 2)},
    "test_bench_conv3d_bn_relu": {"smoke-N1-C4-2x6x6": (1, 4, 2, 6, 6)},
}
OP_SUITES = {
    "test_bench_netvlad": "netvlad",
    "test_bench_attention_pool": "attention_pool",
    "test_bench_conv3d_bn_relu": "conv3d_bn_relu",
}
MODELS_SUITE = "test_bench_models"


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Build, test and benchmark mvfast on an NVIDIA GPU within a time budget; write a report.",
    )
    p.add_argument("--out", type=Path, default=Path("gpu-report"), help="report folder (default gpu-report)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="total seconds (default %(default)s)")
    p.add_argument("--no-build", action="store_true", help="the extension is already built: do not build it")
    p.add_argument(
        "--build-with",
        choices=("setup", "pip"),
        default="setup",
        help="setup: setup.py build_ext --inplace (default); pip: pip install -e . --no-build-isolation "
        "--no-deps",
    )
    p.add_argument(
        "--stages",
        default=None,
        help=f"comma list of stages to run (default {','.join(STAGES)}; with --cpu-smoke all but e2e)",
    )
    p.add_argument(
        "--stage-budget",
        action="append",
        default=[],
        metavar="STAGE=SECONDS",
        help="a fixed budget for one stage instead of its share (repeatable)",
    )
    p.add_argument("--tests-k", default=TESTS_K, help="pytest -k expression of the tests stage")
    p.add_argument(
        "--tests-path",
        action="append",
        default=None,
        help="what the tests stage runs (repeatable; default tests, with --cpu-smoke tests/test_backends.py)",
    )
    p.add_argument(
        "--workers",
        default="auto",
        help="pytest-xdist workers for the tests stage: a number, 0 for none, or auto (8 where "
        "pytest-xdist is installed and a GPU is visible; Triton's kernel compiles are what takes time)",
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the ops stage")
    p.add_argument(
        "--impls",
        default=None,
        help="implementations to time (comma list of eager, compile, cpu, cuda, triton; default all)",
    )
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the stages on the CPU with tiny shapes (no build, no compile): checks this script",
    )
    p.add_argument(
        "--hide-module",
        action="append",
        default=[],
        help="treat this module as not installed (e.g. av), to rehearse a device machine that lacks it",
    )
    p.add_argument("--child", choices=("ops", "models"), help=argparse.SUPPRESS)
    p.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stages is None:
        args.stages = ",".join(s for s in STAGES if not (args.cpu_smoke and s == "e2e"))
    args.stages = [s for s in (x.strip() for x in args.stages.split(",")) if s]
    for s in args.stages:
        if s not in STAGES:
            p.error(f"--stages: unknown stage {s!r}; expected some of {', '.join(STAGES)}")
    fixed = {}
    for item in args.stage_budget:
        name, sep, secs = item.partition("=")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if not sep or name not in STAGES or value <= 0:
            p.error(f"--stage-budget: expected STAGE=SECONDS with STAGE in {', '.join(STAGES)}, got {item!r}")
        fixed[name] = value
    args.stage_budget = fixed
    if not args.budget > 0:
        p.error(f"--budget must be a positive number of seconds, got {args.budget}")
    args.dtypes = [d for d in (x.strip() for x in args.dtypes.split(",")) if d]
    for d in args.dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: expected some of {', '.join(DTYPES)}, got {d!r}")
    if args.impls is not None:
        args.impls = [i for i in (x.strip() for x in args.impls.split(",")) if i]
        for i in args.impls:
            if i not in ("eager", "compile", "cpu", "cuda", "triton"):
                p.error(f"--impls: expected some of eager, compile, cpu, cuda, triton, got {i!r}")
    if args.workers != "auto":
        try:
            args.workers = int(args.workers)
        except ValueError:
            args.workers = -1
        if args.workers < 0:
            p.error(f"--workers: expected a number >= 0 or auto, got {args.workers!r}")
    args.hide_module = sorted({m for item in args.hide_module for m in item.split(",") if m})
    if args.tests_path is None:
        args.tests_path = ["tests/test_backends.py"] if args.cpu_smoke else ["tests"]
    return args


# ---------------------------------------------------------------------------------------------------
# Budget


class Budget:
    """The total budget, shared among the stages still to run in proportion to their shares."""

    def __init__(
        self, total: float, stages: list[str], fixed: dict | None = None, clock=time.monotonic, start=None
    ):
        self.clock = clock
        self.start = clock() if start is None else start
        self.end = self.start + total - RESERVE
        self.pending = list(stages)
        self.fixed = dict(fixed or {})

    def left(self) -> float:
        return max(0.0, self.end - self.clock())

    def take(self, stage: str) -> float:
        """Seconds for ``stage`` (now starting), and the stage is no longer pending."""
        left = self.left()
        if stage in self.fixed:
            share = min(self.fixed[stage], left)
        else:
            weights = {s: SHARES[s] for s in self.pending if s not in self.fixed}
            fixed_after = sum(
                min(self.fixed[s], left) for s in self.pending if s in self.fixed and s != stage
            )
            share = max(0.0, left - fixed_after) * weights.get(stage, 0) / max(1, sum(weights.values()))
        self.drop(stage)
        return share

    def drop(self, stage: str) -> None:
        """``stage`` will not run: its share goes to the others."""
        if stage in self.pending:
            self.pending.remove(stage)


# ---------------------------------------------------------------------------------------------------
# Child processes


def child_env(args, *, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    paths = [str(ROOT), str(BENCH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    if args.cpu_smoke:  # a CPU run wherever it runs, GPU machines included
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)  # on a GPU the Triton kernels are compiled, not interpreted
    if args.hide_module:
        env["MVFAST_GPU_CHECK_HIDE"] = ",".join(args.hide_module)
    env.update(extra or {})
    return env


def run_limited(cmd: list[str], *, seconds: float, log: Path, env: dict, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` with its output appended to ``log``; at ``seconds`` its whole process group is stopped
    (SIGTERM, then SIGKILL). Returns {"rc", "seconds", "timed_out"}."""
    t0 = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if seconds <= 0:
            return {"rc": None, "seconds": 0.0, "timed_out": True}
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        timed_out = False
        try:
            proc.wait(timeout=max(0.1, seconds - KILL_WAIT))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
        except BaseException:
            _stop_group(proc)
            raise
        f.write(f"[gpu_check] exit {proc.returncode}{' (stopped at its budget)' if timed_out else ''}\n")
    return {"rc": proc.returncode, "seconds": time.monotonic() - t0, "timed_out": timed_out}


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_WAIT), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut off by a kill
    return out


def missing_modules(args) -> list[str]:
    return [m for m in OPTIONAL if m in args.hide_module or importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------------------------------------------
# Environment


def _run_text(cmd: list[str], timeout: float = 20.0) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def environment(torch, device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None,
        "triton": _version("triton"),
        "pytest": _version("pytest"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "pytest_xdist": _version("pytest-xdist"),
        "torchvision": _version("torchvision"),
        "git": _run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "device": device,
    }
    with contextlib.suppress(Exception):
        env["cudnn"] = torch.backends.cudnn.version()
    nvcc = None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            nvcc = os.path.join(home, "bin", "nvcc")
            break
    nvcc = nvcc or shutil.which("nvcc")
    text = _run_text([nvcc, "--version"]) if nvcc else None
    env["nvcc"] = text.splitlines()[-1].strip() if text else None
    if device == "cuda":
        try:
            _gpu_environment(torch, env)
        except Exception as e:  # the check goes on; its stages will say what does not work
            env["gpu"] = f"? ({type(e).__name__}: {e})"
    return env


def _gpu_environment(torch, env: dict) -> None:
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = props.name
    env["gpus"] = torch.cuda.device_count()
    env["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    env["sms"] = props.multi_processor_count
    env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    env["l2_mib"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None
    env["driver"] = env["sm_clock"] = None
    smi = _run_text(
        ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm", "--format=csv,noheader"]
    )
    if smi:
        parts = [s.strip() for s in smi.splitlines()[0].split(",")]
        env["driver"] = parts[0]
        env["sm_clock"] = " / ".join(parts[1:]) or None


def env_lines(env: dict) -> list[str]:
    lines = []
    if env.get("device") == "cuda":
        lines.append(
            f"GPU     {env.get('gpu')} (sm_{env.get('capability', '?').replace('.', '')}, "
            f"{env.get('sms')} SMs, {env.get('gpu_memory_gib')} GiB, L2 {env.get('l2_mib')} MiB; "
            f"{env.get('gpus')} visible)"
        )
        lines.append(f"driver  {env.get('driver')}   SM clock now / max: {env.get('sm_clock')}")
    else:
        lines.append("device  CPU (--cpu-smoke: tiny shapes, timings mean nothing)")
    lines.append(
        f"CUDA    torch's {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}, "
        f"nvcc: {env.get('nvcc') or 'not found'}"
    )
    lines.append(
        f"torch   {env.get('torch')}   Triton {env.get('triton')}   torchvision {env.get('torchvision')}   "
        f"Python {env.get('python')}   {env.get('cpus')} CPUs"
    )
    lines.append(
        f"pytest  {env.get('pytest')}   pytest-benchmark {env.get('pytest_benchmark')}   "
        f"pytest-xdist {env.get('pytest_xdist')}   git {env.get('git')}"
    )
    lines.append(
        f"float32 matmul precision {env.get('float32_matmul_precision')!r}, cudnn.allow_tf32 "
        f"{env.get('cudnn_allow_tf32')}"
    )
    return lines


# ---------------------------------------------------------------------------------------------------
# Stage: build


VERIFY = r"""
import glob, json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import gpu_check_pytest
gpu_check_pytest.hide_modules(os.environ.get("MVFAST_GPU_CHECK_HIDE", "").split(","))
import torch
out = {"import_error": None, "build": None, "backends": {}}
try:
    import mvfast
    from mvfast import _ext
    out["build"] = _ext.BUILD
    for dev in ("cpu", "cuda"):
        out["backends"][dev] = mvfast.backends(dev)
except Exception as e:
    out["import_error"] = f"import mvfast failed: {type(e).__name__}: {e}"
    so = sorted(glob.glob(os.path.join("mvfast", "_C*.so")))
    if so:  # what was built, read without the package
        import importlib.machinery, importlib.util
        try:
            loader = importlib.machinery.ExtensionFileLoader("mvfast._C", so[0])
            mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("mvfast._C", loader))
            loader.exec_module(mod)
            archs = [a for a in mod.CUDA_ARCHS.split(",") if a]
            out["build"] = {"loaded": True, "cuda_version": mod.CUDA_VERSION or None, "archs": archs,
                            "cuda": bool(mod.CUDA_VERSION)}
        except Exception as e2:
            out["build"] = {"loaded": False, "error": f"{type(e2).__name__}: {e2}"}
print("GPU_CHECK_VERIFY " + json.dumps(out))
"""


def stage_build(args, ctx, seconds: float) -> dict:
    log = ctx["out"] / "build.log"
    res = {"stage": "build", "budget_s": seconds}
    t0 = time.monotonic()
    if args.no_build or args.cpu_smoke:
        res["note"] = "not built (--no-build)" if args.no_build else "not built (--cpu-smoke)"
        built = None
    else:
        env = child_env(args, extra={"FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)})
        env.pop("MVFAST_NO_CUDA", None)
        env["TORCH_CUDA_ARCH_LIST"] = ctx["arch_list"]
        if args.build_with == "pip":
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-v",
                "-e",
                ".",
                "--no-build-isolation",
                "--no-deps",
            ]
        else:
            cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
        built = run_limited(cmd, seconds=max(0.0, seconds - 20.0), log=log, env=env)
        res["build_s"] = round(built["seconds"], 1)
        res["arch_list"] = ctx["arch_list"]
        res["command"] = " ".join(cmd[1:])
    verify = run_limited(
        [sys.executable, "-c", VERIFY],
        seconds=max(5.0, seconds - (time.monotonic() - t0)),
        log=log,
        env=child_env(args),
    )
    info = None
    for line in log.read_text(errors="replace").splitlines()[::-1]:
        if line.startswith("GPU_CHECK_VERIFY "):
            info = json.loads(line[len("GPU_CHECK_VERIFY ") :])
            break
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["extension"] = info
    if built is not None and (built["timed_out"] or built["rc"] != 0):
        res["status"] = "budget" if built["timed_out"] else "failed"
        why = "stopped at its budget" if built["timed_out"] else f"exit {built['rc']}"
        res["note"] = f"build {why} after {built['seconds']:.0f} s; see build.log"
        res["log_tail"] = _errors_tail(log)
    elif info is None:
        res["status"] = "error"
        res["note"] = f"could not check the extension (exit {verify['rc']}); see build.log"
        res["log_tail"] = _errors_tail(log)
    else:
        res["status"] = "ok"
        b = info.get("build") or {}
        cuda = (info.get("backends") or {}).get("cuda", {})
        parts = [res.get("note", f"built in {res.get('build_s')} s for {ctx['arch_list']}")]
        parts.append(
            f"extension: {'loaded' if b.get('loaded') else 'NOT loaded'}, CUDA kernels "
            f"{'for ' + ','.join(b.get('archs') or []) if b.get('cuda') else 'absent'}"
        )
        for name in ("cuda", "triton"):
            st = cuda.get(name)
            if st:
                parts.append(f"{name} backend: {'available' if st['available'] else st['reason']}")
        if info.get("import_error"):
            res["status"] = "failed"
            parts.append(info["import_error"])
        elif ctx["device"] == "cuda" and not (cuda.get("cuda") or {}).get("available"):
            res["status"] = "failed"  # the cuda backend's tests and benchmarks will be skipped
        res["note"] = "; ".join(parts)
    ctx["import_error"] = (info or {}).get("import_error")
    return res


def _errors_tail(log: Path, n: int = 30) -> str:
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    return "\n".join((errors or lines)[-n:])


# ---------------------------------------------------------------------------------------------------
# Stage: tests


def _xdist_workers(args, ctx) -> int:
    if args.workers != "auto":
        return args.workers
    if ctx["device"] != "cuda" or importlib.util.find_spec("xdist") is None:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def stage_tests(args, ctx, seconds: float) -> dict:
    log = ctx["out"] / "tests.log"
    t0 = time.monotonic()
    end = t0 + seconds
    missing = ctx["missing"]
    workers = _xdist_workers(args, ctx)
    final: dict[str, dict] = {}
    collect_errors: dict[str, dict] = {}
    total = None
    attempts = []
    killed_running = None
    while True:
        left = end - time.monotonic()
        if left < 5:
            break
        n = len(attempts)
        jsonl = ctx["tmp"] / f"tests-{n}.jsonl"
        skip = ctx["tmp"] / f"tests-{n}.skip"
        skip.write_text("".join(k + "\n" for k in final))
        grace = min(20.0, max(3.0, 0.1 * left))
        cmd = [sys.executable, "-m", "pytest", *args.tests_path] + (
            ["-k", args.tests_k] if args.tests_k else []
        )
        cmd += ["-p", "no:cacheprovider", "-p", "gpu_check_pytest", "-q", "--tb=short"]
        cmd += ["--continue-on-collection-errors", f"--ignore={OWN_TEST}"]
        cmd += ["--gpu-check-log", str(jsonl), "--gpu-check-skip", str(skip)]
        cmd += ["--gpu-check-deadline", f"{time.time() + left - KILL_WAIT - grace:.3f}"]
        if missing:
            cmd += ["--gpu-check-missing", ",".join(missing)]
        if args.hide_module:
            cmd += ["--gpu-check-hide", ",".join(args.hide_module)]
        if workers:
            cmd += ["-n", str(workers)]
        run = run_limited(cmd, seconds=left, log=log, env=child_env(args))
        events = read_jsonl(jsonl)
        started, done_now = [], set()
        for ev in events:
            if ev["event"] == "collected" and total is None:
                total = ev["n"]
            elif ev["event"] == "start":
                started.append(ev["nodeid"])
            elif ev["event"] == "test":
                final[ev["nodeid"]] = ev
                done_now.add(ev["nodeid"])
            elif ev["event"] == "collect_error":
                collect_errors[ev["nodeid"]] = ev
        running = [s for s in started if s not in done_now]
        attempt = {"rc": run["rc"], "seconds": round(run["seconds"], 1), "timed_out": run["timed_out"]}
        attempts.append(attempt)
        if not events and run["rc"] not in (0, 1, 5) and not run["timed_out"]:
            if workers:  # pytest-xdist could not start here: again without it
                attempt["note"] = "no test ran with pytest-xdist; running without it"
                workers = 0
                continue
            attempt["note"] = "pytest stopped before running any test; see tests.log"
            break
        if run["timed_out"]:
            killed_running = running[-1] if running else None
            break
        if running and run["rc"] is not None and run["rc"] < 0 and not workers:
            # the process died in a test (a segfault, say): record it and run the rest in a fresh process
            final[running[-1]] = {
                "event": "test",
                "nodeid": running[-1],
                "outcome": "failed",
                "message": f"the pytest process died (signal {-run['rc']}) while running this test",
            }
        lost = [
            k for k, r in final.items() if (r.get("reason") or "").startswith(gpu_check_pytest.LOST_REASON)
        ]
        retry = lost or (running and run["rc"] is not None and run["rc"] < 0)
        if not retry or len(attempts) > MAX_RESTARTS:
            break
        for k in lost + [k for k, r in final.items() if r.get("reason") == gpu_check_pytest.BUDGET_REASON]:
            final.pop(k, None)
    res = summarise_tests(final, collect_errors, total, killed_running, missing)
    if res["status"] == "error":
        res["log_tail"] = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    res.update(stage="tests", budget_s=seconds, seconds=round(time.monotonic() - t0, 1), attempts=attempts)
    res["command"] = " ".join(
        ["pytest", *args.tests_path]
        + ([f"-k {args.tests_k!r}"] if args.tests_k else [])
        + ([f"-n {workers}"] if workers else [])
    )
    return res


def summarise_tests(final: dict, collect_errors: dict, total, killed_running, missing) -> dict:
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    skip_reasons: dict[str, int] = {}
    failures, needs, budget_skipped, lost = [], {}, 0, 0
    for rec in final.values():
        outcome = rec.get("outcome") or "passed"
        reason = rec.get("reason") or ""
        if outcome == "skipped" and reason == gpu_check_pytest.BUDGET_REASON:
            budget_skipped += 1
            continue
        if outcome == "skipped" and reason.startswith(gpu_check_pytest.LOST_REASON):
            lost += 1
            continue
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "skipped":
            if rec.get("needs"):
                needs.setdefault(rec["needs"], []).append(rec["nodeid"])
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        if outcome in ("failed", "error", "xpassed"):
            failures.append({"nodeid": rec["nodeid"], "outcome": outcome, "message": rec.get("message", "")})
        if rec.get("lost_context"):
            failures[-1]["lost_context"] = True
    not_run = budget_skipped + lost + (1 if killed_running else 0)
    if total is not None:
        not_run = max(not_run, total - (len(final) - budget_skipped - lost))
    needs_modules = {}
    other_collect = []
    for ev in collect_errors.values():
        if ev.get("needs"):
            needs_modules.setdefault(ev["needs"], []).append(ev["nodeid"])
        else:
            other_collect.append(
                {"nodeid": ev["nodeid"], "outcome": "collect error", "message": ev["message"]}
            )
    res = {
        "counts": counts,
        "not_run": not_run,
        "selected": total,
        "failures": other_collect + failures,
        "skip_reasons": dict(sorted(skip_reasons.items(), key=lambda kv: -kv[1])),
        "skipped_modules": needs_modules,
        "skipped_tests_needing": {k: len(v) for k, v in needs.items()},
        "killed_while_running": killed_running,
    }
    bad = counts["failed"] + counts["error"] + counts["xpassed"] + len(other_collect)
    if total is None and not final:
        res["status"] = "error"
        res["note"] = "no test ran; see tests.log"
    else:
        res["status"] = "failed" if bad else ("budget" if not_run else "ok")
        res["note"] = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no tests"
        if not_run:
            res["note"] += f"; {not_run} not run (budget)"
        for mod, mods in needs_modules.items():
            res["note"] += f"; {len(mods)} modules skipped: need {mod}"
        for mod, n in res["skipped_tests_needing"].items():
            res["note"] += f"; {n} tests skipped: need {mod}"
        if any(f.get("lost_context") for f in failures):
            res["note"] += "; CUDA context lost (tests after it reran in a fresh process)"
    return res


# ---------------------------------------------------------------------------------------------------
# Stages: ops and models (children that time the suites' steps)


def stage_bench(kind: str, args, ctx, seconds: float) -> dict:
    log = ctx["out"] / f"{kind}.log"
    results = ctx["tmp"] / f"{kind}.jsonl"
    t0 = time.monotonic()
    end = t0 + seconds
    attempts = []
    killed = None
    while True:
        left = end - time.monotonic()
        if left < 5:
            break
        grace = min(20.0, max(3.0, 0.1 * left))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--results", str(results)]
        cmd += ["--deadline", f"{time.time() + left - KILL_WAIT - grace:.3f}", "--device", ctx["device"]]
        cmd += ["--dtypes", ",".join(args.dtypes)]
        if args.impls:
            cmd += ["--impls", ",".join(args.impls)]
        if args.cpu_smoke:
            cmd += ["--cpu-smoke"]
        run = run_limited(cmd, seconds=left, log=log, env=child_env(args))
        attempts.append({"rc": run["rc"], "seconds": round(run["seconds"], 1), "timed_out": run["timed_out"]})
        events = read_jsonl(results)
        done = {tuple(e["key"]) for e in events if e["event"] == "result"}
        running = [tuple(e["key"]) for e in events if e["event"] == "start" and tuple(e["key"]) not in done]
        if run["timed_out"]:
            killed = running[-1] if running else None
            break
        if run["rc"] == 0 or len(attempts) > MAX_RESTARTS:
            break
        if running:  # the child died in this item (a crash, or its CUDA context broke): skip it next time
            _append(
                results,
                {
                    "event": "result",
                    "key": list(running[-1]),
                    "status": "error",
                    "message": f"the process died (exit {run['rc']}) while timing this",
                },
            )
        elif run["rc"] != 3:
            break  # broke outside any item (an import, say): starting it again would do the same
    return summarise_bench(kind, read_jsonl(results), killed, attempts, seconds, time.monotonic() - t0)


def summarise_bench(kind, events, killed, attempts, budget_s, seconds) -> dict:
    plan = []
    bars = []
    results = {}
    fatal = None
    for e in events:
        if e["event"] == "plan":
            for k in e["keys"]:
                if tuple(k) not in {tuple(p) for p in plan}:
                    plan.append(k)
        elif e["event"] == "result":
            results[tuple(e["key"])] = e  # a later attempt's record wins
        elif e["event"] == "bars":
            bars = e["bars"]
        elif e["event"] == "fatal":
            fatal = e["message"]
    rows = []
    for k in plan:
        rec = results.get(tuple(k))
        if rec is None:
            rec = {"key": k, "status": "budget"}
            if killed is not None and tuple(k) == tuple(killed):
                rec["message"] = "stopped at the stage's budget while timing this"
        rows.append(rec)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    res = {
        "stage": kind,
        "budget_s": budget_s,
        "seconds": round(seconds, 1),
        "attempts": attempts,
        "rows": rows,
        "bars": bars,
        "counts": counts,
    }
    if fatal or not plan:
        res["status"] = "error"
        res["note"] = fatal or "the benchmark process did not start; see its log"
    else:
        res["status"] = "failed" if counts.get("error") else ("budget" if counts.get("budget") else "ok")
        res["note"] = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return res


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------
# Stage: e2e (pytest-benchmark on test_bench_train.py)


def stage_e2e(args, ctx, seconds: float) -> dict:
    log = ctx["out"] / "e2e.log"
    t0 = time.monotonic()
    bench_json = ctx["tmp"] / "e2e.json"
    jsonl = ctx["tmp"] / "e2e.jsonl"
    grace = min(20.0, max(3.0, 0.1 * seconds))
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_train.py", "--benchmark-only"]
    cmd += ["-k", ctx["device"], f"--benchmark-json={bench_json}", "-p", "no:cacheprovider", "-q"]
    cmd += ["-p", "gpu_check_pytest", "--gpu-check-log", str(jsonl)]
    cmd += ["--gpu-check-deadline", f"{time.time() + seconds - KILL_WAIT - grace:.3f}"]
    run = run_limited(cmd, seconds=seconds, log=log, env=child_env(args))
    tests = [e for e in read_jsonl(jsonl) if e["event"] == "test"]
    rows = []
    if bench_json.exists():
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            for b in json.loads(bench_json.read_text())["benchmarks"]:
                info = b.get("extra_info") or {}
                if "impl" in info and b.get("stats"):
                    rows.append({"extra_info": info, "stats": {"median": b["stats"]["median"]}})
    res = {
        "stage": "e2e",
        "budget_s": seconds,
        "seconds": round(time.monotonic() - t0, 1),
        "benchmarks": rows,
        "tests": [{k: t.get(k) for k in ("nodeid", "outcome", "reason", "message")} for t in tests],
    }
    failed = [t for t in tests if t["outcome"] in ("failed", "error")]
    if run["timed_out"]:
        res["status"], res["note"] = (
            "budget",
            "stopped at its budget (pytest-benchmark writes its JSON at the end)",
        )
    elif failed:
        res["status"], res["note"] = "failed", f"{len(failed)} failed; see e2e.log"
    elif not rows:
        res["status"], res["note"] = "error", f"no benchmark results (exit {run['rc']}); see e2e.log"
    else:
        res["status"], res["note"] = "ok", f"{len(rows)} timed"
    return res


# ---------------------------------------------------------------------------------------------------
# The benchmark child


class Timer:
    """Medians of a step's time: CUDA events around each call on a GPU, with the L2 cache flushed between
    calls (outside the timed region) so that inputs smaller than L2 are not timed from the cache; the host
    clock on the CPU."""

    def __init__(self, torch, device: str):
        self.torch = torch
        self.device = device
        self.flush = None
        if device == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 64 * 2**20
            self.flush = torch.empty(max(256 * 2**20, 2 * l2), dtype=torch.int8, device="cuda")

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def once(self, step) -> float:
        self.sync()
        t = time.perf_counter()
        step()
        self.sync()
        return time.perf_counter() - t

    def measure(self, step, deadline: float, *, target_s: float, min_reps: int, max_reps: int) -> dict:
        first = self.once(step)  # compiles, autotunes, loads modules: kept out of the median
        if 3 * first > deadline - time.time():
            raise BudgetSpent(f"the first call took {first:.1f} s, too long for the time left")
        est = min(self.once(step), self.once(step))
        left = deadline - time.time()
        reps = int(max(min_reps, min(max_reps, target_s / max(est, 1e-6))))
        reps = min(reps, int(0.8 * left / max(est, 1e-6)))
        if reps < min(3, min_reps):
            raise BudgetSpent(f"{left:.1f} s left, one call takes {est:.3f} s")
        times = []
        if self.device == "cuda":
            ev = [
                (self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True))
                for _ in range(reps)
            ]
            for start, stop in ev:
                self.flush.zero_()
                start.record()
                step()
                stop.record()
            self.torch.cuda.synchronize()
            times = [start.elapsed_time(stop) / 1e3 for start, stop in ev]
        else:
            times = [self.once(step) for _ in range(reps)]
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        return {
            "median_s": statistics.median(times),
            "p10_s": q[0],
            "p90_s": q[-1],
            "reps": reps,
            "first_call_s": first,
        }


class BudgetSpent(Exception):
    pass


def _key(op, case, mode, dtype, impl) -> list:
    return [op, case, mode, dtype, impl]


def child_plan(kind, args, suites) -> list[dict]:
    """Every item of the stage: kernels and eager first, then torch.compile (whose compiles are slow),
    float32 before bfloat16, so that what the budget cuts is what is least needed."""
    device = args.device
    if args.impls:
        wanted = set(args.impls)
    else:  # compiling on the CPU takes longer than the smoke run's whole budget
        wanted = {"eager", "compile", "cpu", "cuda", "triton"} - ({"compile"} if args.cpu_smoke else set())
    items = []

    def add(suite, impls, op, case, mode, dtype):
        items.extend(
            dict(suite=suite, op=op, case=case, mode=mode, dtype=dtype, impl=impl)
            for impl in impls[device]
            if impl in wanted
        )

    if kind == "ops":
        for name, op in OP_SUITES.items():
            suite = suites[name]
            for case in suite.CASES:
                for mode in suite.MODES:
                    for dtype in args.dtypes:
                        add(name, suite.IMPLS, op, case, mode, dtype)
        if not args.cpu_smoke:
            cv = suites["test_bench_conv3d_bn_relu"]
            add("r3d_18", cv.R3D_IMPLS, "r3d_18", "N1-16x112x112", "fwd", "float32")
    else:
        tm = suites[MODELS_SUITE]
        for case in ("tiny",) if args.cpu_smoke else tm.CASES:
            for mode in list(tm.MODES) + list(tm.GPU_MODES):
                add(MODELS_SUITE, tm.IMPLS, "model", case, mode, "float32")
    order = {d: i for i, d in enumerate(args.dtypes)}
    return sorted(
        items, key=lambda it: (it["impl"] == "compile", it["impl"] == "compile" and order[it["dtype"]])
    )


def run_child(args) -> int:
    gpu_check_pytest.hide_modules(os.environ.get("MVFAST_GPU_CHECK_HIDE", "").split(","))
    results = args.results
    try:
        import benchutil
        import torch

        names = list(OP_SUITES) if args.child == "ops" else [MODELS_SUITE]
        suites = {n: importlib.import_module(n) for n in names}
    except Exception as e:
        _append(
            results,
            {"event": "fatal", "message": f"importing the benchmark suites failed: {type(e).__name__}: {e}"},
        )
        print(f"[{args.child}] importing the suites failed: {type(e).__name__}: {e}", flush=True)
        return 2
    if args.cpu_smoke:
        for name, cases in SMOKE_SHAPES.items():
            if name in suites:
                suites[name].CASES.clear()
                suites[name].CASES.update(cases)
    device = args.device
    items = child_plan(args.child, args, suites)
    done = {tuple(e["key"]) for e in read_jsonl(results) if e["event"] == "result"}
    _append(
        results,
        {
            "event": "plan",
            "keys": [_key(it["op"], it["case"], it["mode"], it["dtype"], it["impl"]) for it in items],
        },
    )
    _append(results, {"event": "bars", "bars": [b for b in benchutil.BARS if b.get("device") == device]})
    timer = Timer(torch, device)
    params = {
        "ops": dict(target_s=0.3, min_reps=10, max_reps=200),
        "models": dict(target_s=1.5, min_reps=3, max_reps=50),
    }[args.child]
    if args.cpu_smoke:
        params = dict(target_s=0.02, min_reps=3, max_reps=5)
    for it in items:
        key = _key(it["op"], it["case"], it["mode"], it["dtype"], it["impl"])
        if tuple(key) in done:
            continue
        label = " ".join(str(k) for k in key)
        if time.time() > args.deadline:
            _append(
                results,
                {
                    "event": "result",
                    "key": key,
                    "status": "budget",
                    "message": "the stage's budget was spent before this",
                },
            )
            continue
        _append(results, {"event": "start", "key": key})
        rec = {"event": "result", "key": key}
        try:
            suite = suites.get(it["suite"], suites.get("test_bench_conv3d_bn_relu"))
            if it["suite"] == "r3d_18":
                reason = benchutil.unavailable(suite.R3D_IMPLS, device, it["impl"])
            elif it["suite"] == MODELS_SUITE:
                reason = suite.unavailable_case(device, it["case"], it["mode"], it["impl"])
            else:
                reason = benchutil.unavailable(suite.IMPLS, device, it["impl"])
            if reason:
                rec.update(status="skipped", message=reason)
            else:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                if it["suite"] == "r3d_18":
                    step, info = suite.r3d_18_step(device, it["impl"])
                elif it["suite"] == MODELS_SUITE:
                    step, info = suite.case_step(
                        device, it["case"], it["mode"], it["impl"], batch_size=2 if args.cpu_smoke else None
                    )
                else:
                    step, info = suite.case_step(
                        device, it["case"], it["mode"], it["impl"], getattr(torch, it["dtype"])
                    )
                timing = timer.measure(step, args.deadline, **params)
                rec.update(status="ok", info=info, **timing)
                if device == "cuda":
                    rec["peak_bytes"] = torch.cuda.max_memory_allocated()
                del step
        except BudgetSpent as e:
            rec.update(status="budget", message=f"not timed: {e}")
        except Exception as e:
            rec.update(status="error", message=f"{type(e).__name__}: {str(e).strip()[:1500]}")
            traceback.print_exc(file=sys.stdout)
        _append(results, rec)
        print(f"[{args.child}] {label}: {_describe(rec)}", flush=True)
        if rec["status"] == "error" and device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                print(f"[{args.child}] the CUDA context is lost; a fresh process continues", flush=True)
                return 3
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0


def _describe(rec: dict) -> str:
    if rec["status"] == "ok":
        return (
            f"{rec['median_s'] * 1e3:.3f} ms median of {rec['reps']} (first call {rec['first_call_s']:.2f} s)"
        )
    return f"{rec['status']}: {rec.get('message', '')}"


# ---------------------------------------------------------------------------------------------------
# Report


def _ms(s) -> str:
    if s is None:
        return ""
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def bench_results(rows: list[dict]) -> list[dict]:
    """The timed rows as pytest-benchmark-like dicts, for benchmarks/report.py (table, ratio, verdict). A
    non-float32 row carries its dtype in the case name, so that the suites' float32 bars match float32."""
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        op, case, mode, dtype, impl = r["key"]
        info = dict(r.get("info") or {})
        info.update(
            op=op, case=case if dtype == "float32" else f"{case} {dtype}", mode=mode, impl=impl, dtype=dtype
        )
        info.setdefault("device", "cuda")
        out.append({"extra_info": info, "stats": {"median": r["median_s"]}})
    return out


def pivot(rows: list[dict], *, per_second: bool = False) -> list[str]:
    """One line per (op, case, mode, dtype): each implementation's median, kernels with their ratios to
    eager and to torch.compile (baseline median / kernel median: > 1 is faster)."""
    groups: dict[tuple, dict] = {}
    impls: list[str] = []
    for r in rows:
        op, case, mode, dtype, impl = r["key"]
        groups.setdefault((op, case, dtype, mode), {})[impl] = r
        if impl not in impls:
            impls.append(impl)
    base = [i for i in ("eager", "compile") if i in impls]
    kernels = [i for i in ("cuda", "triton", "cpu") if i in impls]
    cols = base + kernels
    head = "| op | case | dtype | mode | " + " | ".join(f"{c} ms" for c in cols) + " |"
    lines = [head, "|" + "---|" * 4 + "---:|" * len(cols)]
    for key, g in groups.items():
        cells = []
        for impl in cols:
            r = g.get(impl)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append({"budget": "budget", "skipped": "skip"}.get(r["status"], "ERROR"))
            else:
                cell = _ms(r["median_s"])
                if impl in kernels:
                    ratios = [
                        f"{g[b]['median_s'] / r['median_s']:.2f}x"
                        if g.get(b, {}).get("status") == "ok"
                        else "-"
                        for b in base
                    ]
                    if ratios:
                        cell += f" ({'/'.join(ratios)})"
                if per_second and key[3].startswith("infer-b"):
                    batch = int(key[3][len("infer-b") :])
                    rate = batch / r["median_s"]
                    cell += f" [{rate:.0f}/s]" if rate >= 10 else f" [{rate:.2g}/s]"
                cells.append(cell)
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
    if kernels and base:
        lines.append("")
        lines.append(
            f"kernel cells: median ms ({'/'.join('x vs ' + b for b in base)}); > 1x is faster than it"
        )
    return lines


def problems(rows: list[dict], limit: int) -> list[str]:
    out = []
    for r in rows:
        if r["status"] == "error":
            out.append(f"ERROR {' '.join(r['key'])}: {_gist(r.get('message', ''))}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def _gist(text: str, width: int = 200, *, tail: bool = False) -> str:
    """The line of a failure's text that says most: pytest's first ``E`` line, else the first line (an
    exception's message) or, with ``tail``, the last (where a crash report ends)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()] or [""]
    e_lines = [line for line in lines if line.startswith("E ")]
    line = e_lines[0] if e_lines else lines[-1] if tail else lines[0]
    return line[:width]


def stage_table(stages: list[dict], note_width: int | None = None) -> list[str]:
    lines = ["| stage | status | seconds | budget | note |", "|---|---|---:|---:|---|"]
    for s in stages:
        note = (s.get("note") or "").replace("\n", " ")
        note = note[:note_width] if note_width else note
        secs, budget = s.get("seconds", 0), s.get("budget_s", 0)
        lines.append(f"| {s['stage']} | {s['status']} | {secs:.0f} | {budget:.0f} | {note} |")
    return lines


def summary_lines(report: dict) -> list[str]:
    """The summary printed last: the machine, the stages, the failures, the timing tables."""
    lines = ["", "=" * 30 + " mvfast GPU check: summary " + "=" * 30]
    lines += env_lines(report["env"])
    lines += [""] + stage_table(report["stages"], note_width=300)
    lines.append(f"total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget")
    by = {s["stage"]: s for s in report["stages"]}
    if by.get("build", {}).get("log_tail"):
        lines += ["", "build log (errors):"] + by["build"]["log_tail"].splitlines()[-8:]
    t = by.get("tests")
    if t and t.get("log_tail"):
        lines += ["", "tests log (end):"] + t["log_tail"].splitlines()[-8:]
    if t and t.get("failures"):
        lines += ["", f"test failures ({len(t['failures'])}; messages in report.md):"]
        for f in t["failures"][:15]:
            lines.append(
                f"  {f['outcome'].upper()} {f['nodeid']}: {_gist(f.get('message', ''), 160, tail=True)}"
            )
        if len(t["failures"]) > 15:
            lines.append(f"  ... and {len(t['failures']) - 15} more")
    for name, per_second in (("ops", False), ("models", True)):
        s = by.get(name)
        if s and s.get("rows"):
            lines += ["", f"{name}: median ms on {report['env'].get('gpu', 'the CPU')}"] + pivot(
                s["rows"], per_second=per_second
            )
            lines += problems(s["rows"], 8)
    e = by.get("e2e")
    if e and e.get("benchmarks"):
        lines += ["", "e2e (pytest-benchmark):", bench_report.table(e["benchmarks"])]
    bars = report.get("bars") or []
    if bars:
        lines += ["", "bars:"] + bars
    lines.append(f"\nreport: {report['out']}/report.md, report.json (logs beside them)")
    return lines


def markdown(report: dict) -> str:
    env = report["env"]
    md = [f"# mvfast GPU check, {env.get('date')}", ""]
    md += ["```"] + env_lines(env) + ["```", ""]
    md += ["## Stages", ""] + stage_table(report["stages"])
    md += [
        "",
        f"Total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"Command: `{report['command']}`",
        "",
    ]
    by = {s["stage"]: s for s in report["stages"]}
    b = by.get("build")
    if b:
        md += ["## Build", "", f"{b.get('note', '')}", ""]
        if b.get("command"):
            md += [
                f"`{b['command']}` with TORCH_CUDA_ARCH_LIST={b.get('arch_list')}: {b.get('build_s')} s",
                "",
            ]
        if b.get("log_tail"):
            md += ["```", b["log_tail"], "```", ""]
    t = by.get("tests")
    if t:
        md += ["## Tests", "", f"`{t.get('command')}`: {t.get('note', '')}", ""]
        if t.get("log_tail"):
            md += ["```", t["log_tail"], "```", ""]
        for mod, mods in (t.get("skipped_modules") or {}).items():
            md += [f"Modules skipped because `{mod}` is not installed: {', '.join(mods)}", ""]
        if t.get("skip_reasons"):
            md += ["Skip reasons:", ""] + [f"- {n} × {r}" for r, n in t["skip_reasons"].items()] + [""]
        for f in t.get("failures") or []:
            md += [
                f"### {f['outcome'].upper()} `{f['nodeid']}`",
                "",
                "```",
                (f.get("message") or "").strip(),
                "```",
                "",
            ]
    for name, per_second in (("ops", False), ("models", True)):
        s = by.get(name)
        if not s or not s.get("rows"):
            continue
        md += [f"## Benchmarks: {name}", "", *pivot(s["rows"], per_second=per_second), ""]
        if per_second:
            md += ["`[N/s]`: videos per second at that batch (throughput).", ""]
        results = bench_results(s["rows"])
        if results:
            md += [
                "All timed rows (benchmarks/report.py's table; peak memory in report.json):",
                "",
                bench_report.table(results),
                "",
            ]
        notes = [r for r in s["rows"] if r["status"] not in ("ok",)]
        if notes:
            md += (
                ["Not timed:", ""]
                + [f"- {' '.join(r['key'])}: {r['status']} {r.get('message', '')}".rstrip() for r in notes]
                + [""]
            )
    e = by.get("e2e")
    if e:
        md += ["## End to end (pytest-benchmark, test_bench_train.py)", "", e.get("note", ""), ""]
        if e.get("benchmarks"):
            md += [bench_report.table(e["benchmarks"]), ""]
    if report.get("bars"):
        md += ["## Bars", "", "```"] + report["bars"] + ["```", ""]
    md += [
        "## Reading the numbers",
        "",
        "Medians of CUDA-event timings of each step after warm-up (the first call, which compiles and "
        "autotunes, is reported apart in report.json as first_call_s), with L2 flushed between calls. "
        "A ratio is baseline median / kernel median from this one run: above 1 the kernel is faster. "
        "Compare ratios, not absolute times across machines; differences within the p10-p90 spread in "
        "report.json are noise.",
        "",
    ]
    return "\n".join(md)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bars = []
    results = []
    for s in report["stages"]:
        if s.get("rows"):
            results += bench_results(s["rows"])
        results += s.get("benchmarks") or []
        # a bar of a case this run did not plan (the CPU smoke run's tiny shapes) says nothing
        planned = {(r["key"][0], r["key"][1]) for r in s.get("rows") or []}
        bars += [
            bench_report.verdict(results, b) for b in s.get("bars") or [] if (b["op"], b["case"]) in planned
        ]
    report["bars"] = bars
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "report.json")
    (out / "report.md").write_text(markdown(report))


# ---------------------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    try:
        import torch
    except ImportError as e:
        say(f"gpu_check: torch cannot be imported ({e}); nothing to check")
        return 2
    with warnings.catch_warnings():  # a driver that cannot start warns; the one line below says it all
        warnings.simplefilter("ignore")
        gpu = not args.cpu_smoke and torch.cuda.is_available()
    if args.cpu_smoke:
        device = "cpu"
    elif not gpu:
        cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
        say(f"gpu_check: no CUDA GPU is visible (torch {torch.__version__}, {cuda}); nothing to check here")
        return 0
    else:
        device = "cuda"
    budget = Budget(args.budget, list(args.stages), args.stage_budget, start=t0)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("build.log", "tests.log", "ops.log", "models.log", "e2e.log"):
        (out / name).unlink(missing_ok=True)
    env = environment(torch, device)
    for line in env_lines(env):
        say(line)
    missing = missing_modules(args)
    stages = list(args.stages)
    if "e2e" in stages and "av" in missing:
        budget.drop("e2e")  # it will be skipped
    caps = (
        sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        if device == "cuda"
        else []
    )
    report = {
        "command": shlex.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "env": env,
        "budget_s": args.budget,
        "out": str(out),
        "missing_modules": missing,
        "stages": [],
        "seconds": 0.0,
    }
    if missing:
        say(
            f"not installed here: {', '.join(missing)} "
            "(the tests and benchmarks that need it are skipped and listed)"
        )
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = {
            "out": out,
            "tmp": Path(tmp),
            "device": device,
            "missing": missing,
            "arch_list": ";".join(f"{a}.{b}" for a, b in caps),
            "import_error": None,
        }
        for stage in stages:
            seconds = budget.take(stage)
            skip = None
            if ctx["import_error"] and stage != "build":
                skip = ctx["import_error"]
            elif stage == "e2e" and "av" in missing:
                skip = "needs av (PyAV) to make its videos, which is not installed here"
            elif seconds < 5:
                skip = "no time left in the budget"
            if skip:
                res = {"stage": stage, "status": "skipped", "seconds": 0.0, "budget_s": seconds, "note": skip}
            else:
                say(f"[{stage}] running, budget {seconds:.0f} s ...")
                try:
                    if stage == "build":
                        res = stage_build(args, ctx, seconds)
                    elif stage == "tests":
                        res = stage_tests(args, ctx, seconds)
                    elif stage in ("ops", "models"):
                        res = stage_bench(stage, args, ctx, seconds)
                    else:
                        res = stage_e2e(args, ctx, seconds)
                except KeyboardInterrupt:
                    report["stages"].append({"stage": stage, "status": "interrupted", "budget_s": seconds})
                    report["seconds"] = time.monotonic() - t0
                    write_report(report, out)
                    say("gpu_check: interrupted; partial report written")
                    return 130
                except Exception as e:  # a defect of this script: say so, keep the other stages
                    res = {"stage": stage, "status": "error", "budget_s": seconds, "seconds": 0.0}
                    res["note"] = f"gpu_check.py itself failed in this stage: {type(e).__name__}: {e}"
            report["stages"].append(res)
            report["seconds"] = time.monotonic() - t0
            write_report(report, out)
            say(f"[{stage}] {res['status']} in {res.get('seconds', 0):.0f} s: {res.get('note', '')}"[:400])
    report["seconds"] = time.monotonic() - t0
    write_report(report, out)
    for line in summary_lines(report):
        say(line)
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
