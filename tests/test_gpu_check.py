"""benchmarks/gpu_check.py, the one-command device check, exercised without a GPU: the no-GPU line, the
arguments, the budget (a stage that overruns is stopped and reported), the pytest plugin's accounting, the
recovery from a lost CUDA context, the report writer on made-up results, and one --cpu-smoke run through
every stage on tiny shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def run_script(*args, env=None, timeout=300):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=ROOT,
        timeout=timeout,
    )


def write_tests(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def run_tests_stage(tmp_path, folder, *extra):
    """The tests stage alone on the tests in ``folder``: (completed process, its report entry)."""
    out = tmp_path / "out"
    p = run_script(
        "--cpu-smoke", "--stages", "tests", "--tests-path", folder, "--tests-k", "", "--out", out, *extra
    )
    report = json.loads((out / "report.json").read_text())
    return p, report["stages"][0]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    p = run_script("--out", tmp_path / "report", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], p.stdout
    assert not (tmp_path / "report").exists()


def test_arguments_defaults_and_errors(capsys):
    args = gpu_check.parse_args(["--out", "r"])
    assert args.stages == list(gpu_check.STAGES)
    assert args.budget < 480  # under 8 minutes, so that one device call of 10 minutes holds it
    assert args.tests_path == ["tests"] and args.tests_k == "cuda or triton"
    assert args.dtypes == ["float32", "bfloat16"] and not args.no_build
    assert "e2e" not in gpu_check.parse_args(["--cpu-smoke"]).stages
    assert gpu_check.parse_args(["--stage-budget", "tests=200"]).stage_budget == {"tests": 200.0}
    assert gpu_check.parse_args(["--hide-module", "av,foo", "--hide-module", "av"]).hide_module == [
        "av",
        "foo",
    ]
    for bad, words in [
        (["--stages", "build,lint"], "--stages: unknown stage 'lint'"),
        (["--stage-budget", "tests"], "--stage-budget: expected STAGE=SECONDS"),
        (["--stage-budget", "tests=-3"], "--stage-budget: expected STAGE=SECONDS"),
        (["--budget", "0"], "--budget must be a positive number"),
        (["--dtypes", "float16"], "--dtypes: expected some of float32, bfloat16, got 'float16'"),
        (["--impls", "eager,fast"], "--impls: expected some of"),
        (["--workers", "many"], "--workers: expected a number"),
    ]:
        with pytest.raises(SystemExit) as e:
            gpu_check.parse_args(bad)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_budget_is_shared_out_and_unused_time_passes_on():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    b = gpu_check.Budget(100, ["build", "tests", "ops"], clock=clock)
    left = 100 - gpu_check.RESERVE
    s = gpu_check.SHARES
    assert b.take("build") == pytest.approx(left * s["build"] / (s["build"] + s["tests"] + s["ops"]))
    now[0] = 10.0  # the build took 10 s of its share: the rest goes to the stages after it
    assert b.take("tests") == pytest.approx((left - 10) * s["tests"] / (s["tests"] + s["ops"]))
    now[0] = 20.0
    assert b.take("ops") == pytest.approx(left - 20)
    now[0] = 200.0
    assert b.left() == 0.0
    fixed = gpu_check.Budget(100, ["build", "tests"], {"tests": 30}, clock=clock, start=200.0)
    assert fixed.take("build") == pytest.approx(left - 30)
    assert fixed.take("tests") == pytest.approx(30)


def test_a_command_past_its_budget_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    t0 = time.monotonic()
    res = gpu_check.run_limited(
        [sys.executable, "-c", code], seconds=4, log=tmp_path / "log", env=dict(os.environ)
    )
    assert res["timed_out"] and time.monotonic() - t0 < 4 + 2
    assert "stopped at its budget" in (tmp_path / "log").read_text()
    pid = int(pid_file.read_text())
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(50):  # the grandchild, in the same process group, is gone too (or a zombie)
        if not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {pid} survived the stage's stop")


def test_tests_stage_counts_outcomes_and_what_needs_a_missing_module(tmp_path):
    folder = write_tests(
        tmp_path / "t",
        {
            "test_a.py": """
                import pytest

                def test_pass():
                    pass

                def test_fail():
                    assert 1 == 2, "one is not two"

                @pytest.mark.skip(reason="because")
                def test_skip():
                    pass

                @pytest.mark.xfail(reason="known")
                def test_xfail():
                    assert 0

                @pytest.fixture
                def broken():
                    raise RuntimeError("fixture broke")

                def test_error(broken):
                    pass

                def test_decodes():
                    import av  # noqa: F401

                def test_decodes_through_a_helper_that_names_the_package():
                    raise ImportError("decoding video needs PyAV (pip install av)")
            """,
            "test_needs_av_at_import.py": """
                import av  # noqa: F401

                def test_never():
                    pass
            """,
        },
    )
    p, t = run_tests_stage(tmp_path, folder, "--hide-module", "av")
    assert p.returncode == 1, p.stdout + p.stderr  # a failure: the command says so
    assert t["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 3, "xfailed": 1, "xpassed": 0}
    assert t["status"] == "failed" and t["not_run"] == 0
    assert {f["nodeid"].split("::")[-1]: f["outcome"] for f in t["failures"]} == {
        "test_fail": "failed",
        "test_error": "error",
    }
    assert "one is not two" in next(f["message"] for f in t["failures"] if f["outcome"] == "failed")
    assert [Path(m).name for m in t["skipped_modules"]["av"]] == ["test_needs_av_at_import.py"]
    assert t["skipped_tests_needing"] == {"av": 2}
    assert "need av" in t["note"]
    assert p.stdout.rstrip().splitlines()[-1].startswith("report: ")  # the summary is printed last


def test_a_lost_cuda_context_or_a_crash_reruns_the_rest_in_a_fresh_process(tmp_path):
    # On a GPU, gpu_check_pytest._context_lost() asks torch.cuda.synchronize(); here a flag file stands in.
    folder = write_tests(
        tmp_path / "t",
        {
            "conftest.py": """
                import os
                import gpu_check_pytest

                FLAG = os.path.join(os.path.dirname(__file__), "broken")
                gpu_check_pytest._context_lost = lambda: os.path.exists(FLAG)
            """,
            "test_x.py": """
                import os, signal

                HERE = os.path.dirname(__file__)

                def _pid(name):
                    with open(os.path.join(HERE, name + ".pid"), "w") as f:
                        f.write(str(os.getpid()))

                def test_a():
                    _pid("a")

                def test_b_breaks_the_context():
                    _pid("b")
                    open(os.path.join(HERE, "broken"), "w").close()
                    assert False, "an illegal memory access was encountered"

                def test_c():
                    _pid("c")

                def test_d_kills_its_process():
                    _pid("d")
                    os.kill(os.getpid(), signal.SIGKILL)

                def test_e():
                    _pid("e")
            """,
        },
    )
    p, t = run_tests_stage(tmp_path, folder)
    pid = {n: (folder / f"{n}.pid").read_text() for n in "abcde"}
    assert len(t["attempts"]) == 3, t["attempts"]
    assert pid["a"] == pid["b"] != pid["c"] == pid["d"] != pid["e"]
    assert t["counts"]["passed"] == 3 and t["counts"]["failed"] == 2 and t["not_run"] == 0
    failures = {f["nodeid"].split("::")[-1]: f for f in t["failures"]}
    assert failures["test_b_breaks_the_context"].get("lost_context")
    assert "died (signal 9)" in failures["test_d_kills_its_process"]["message"]


@pytest.mark.parametrize("killed", [False, True], ids=["stops-between-tests", "killed"])
def test_a_stage_that_reaches_its_budget_stops_and_says_so(tmp_path, killed):
    # Past the stage's soft deadline no new test starts; at its budget the test running is killed.
    sleep = "120" if killed else "max(0.0, gpu_check_pytest._state['deadline'] - time.time()) + 0.2"
    folder = write_tests(
        tmp_path / "t",
        {
            "test_slow.py": f"""
                import time
                import gpu_check_pytest

                def test_1_slow():
                    time.sleep({sleep})

                def test_2():
                    pass

                def test_3():
                    pass
            """
        },
    )
    t0 = time.monotonic()
    p, t = run_tests_stage(tmp_path, folder, "--budget", "15")  # the one stage gets 10 s
    assert time.monotonic() - t0 < 15 + 3, p.stdout
    assert t["status"] == "budget" and t["not_run"] == (3 if killed else 2), t
    assert (t["killed_while_running"] or "").endswith("::test_1_slow") == killed
    assert t["counts"]["passed"] == (0 if killed else 1)
    assert "not run (budget)" in t["note"]
    assert p.returncode == 1


def test_benchmark_child_past_its_deadline_records_every_item_as_not_run(tmp_path):
    results = tmp_path / "ops.jsonl"
    p = run_script(
        "--child",
        "ops",
        "--cpu-smoke",
        "--device",
        "cpu",
        "--deadline",
        time.time() - 1,
        "--results",
        results,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    events = gpu_check.read_jsonl(results)
    plan = next(e["keys"] for e in events if e["event"] == "plan")
    assert {tuple(k[:1] + k[2:4]) for k in plan} >= {
        (op, mode, dtype)
        for op in ("netvlad", "attention_pool", "conv3d_bn_relu")
        for mode in ("fwd", "fwd+bwd")
        for dtype in ("float32", "bfloat16")
    }
    stage = gpu_check.summarise_bench("ops", events, None, [], 10, 1)
    assert stage["status"] == "budget" and stage["counts"] == {"budget": len(plan)}


def _row(op, case, mode, dtype, impl, ms=None, status="ok", **extra):
    row = {"key": [op, case, mode, dtype, impl], "status": status, **extra}
    if ms is not None:
        row.update(
            median_s=ms / 1e3, reps=10, first_call_s=0.5, info={"device": "cuda", "saved_bytes": 2**20}
        )
    return row


def test_report_from_made_up_results(tmp_path):
    ops = [
        _row("netvlad", "B32", "fwd", "float32", "eager", 4.0),
        _row("netvlad", "B32", "fwd", "float32", "compile", 2.0),
        _row("netvlad", "B32", "fwd", "float32", "triton", 1.0),
        _row("netvlad", "B32", "fwd", "float32", "cuda", status="error", message="RuntimeError: boom\nmore"),
        _row("netvlad", "B32", "fwd", "bfloat16", "eager", 3.0),
        _row("netvlad", "B32", "fwd", "bfloat16", "triton", status="budget"),
    ]
    models = [
        _row("model", "paper", "infer-b64", "float32", "eager", 640.0),
        _row("model", "paper", "infer-b64", "float32", "triton", 320.0),
        _row("model", "paper", "train-b8", "float32", "cuda", status="skipped", message="cuda: not built"),
    ]
    bars = [
        dict(op="netvlad", case="B32", device="cuda", mode="fwd", impl="triton", base="eager", at_least=3.0),
        dict(
            op="netvlad", case="B32", device="cuda", mode="fwd", impl="triton", base="compile", at_least=3.0
        ),
        dict(
            op="netvlad", case="other", device="cuda", mode="fwd", impl="triton", base="eager", at_least=1.0
        ),
    ]
    env = {"device": "cuda", "gpu": "NVIDIA H200", "capability": "9.0", "driver": "580.1", "torch": "2.11"}
    report = {
        "command": "gpu_check.py --out x",
        "env": env,
        "budget_s": 450,
        "seconds": 321.0,
        "out": str(tmp_path),
        "stages": [
            {"stage": "build", "status": "ok", "seconds": 80, "budget_s": 140, "note": "built in 80 s"},
            {
                "stage": "tests",
                "status": "failed",
                "seconds": 100,
                "budget_s": 110,
                "note": "1 failed",
                "command": "pytest tests",
                "failures": [
                    {"nodeid": "tests/test_x.py::test_y[triton]", "outcome": "failed", "message": "E  bad"}
                ],
            },
            {"stage": "ops", "status": "failed", "seconds": 90, "budget_s": 110, "rows": ops, "bars": bars},
            {"stage": "models", "status": "ok", "seconds": 50, "budget_s": 75, "rows": models, "bars": []},
        ],
    }
    gpu_check.write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["stages"][2]["rows"][0]["median_s"] == pytest.approx(4e-3)
    # kernel cells: median (x vs eager / x vs compile)
    assert "| netvlad | B32 | float32 | fwd | 4.00 | 2.00 | ERROR | 1.00 (4.00x/2.00x) |" in md
    assert "| netvlad | B32 | bfloat16 | fwd | 3.00 |  |  | budget |" in md
    assert "640 [100/s]" in md and "320 (2.00x) [200/s]" in md  # batch 64 in 0.64 s: 100 videos/s
    assert "netvlad B32 fwd float32 cuda: error RuntimeError: boom" in md
    assert "### FAILED `tests/test_x.py::test_y[triton]`" in md
    assert saved["bars"][0].startswith("met") and saved["bars"][1].startswith("MISSED")
    assert len(saved["bars"]) == 2  # a bar for a case that was not planned is left out
    lines = gpu_check.summary_lines(saved)
    text = "\n".join(lines)
    assert len(text) < 12000
    assert "NVIDIA H200 (sm_90" in text and "driver  580.1" in text
    assert "FAILED tests/test_x.py::test_y[triton]: E  bad" in text
    assert "ERROR netvlad B32 fwd float32 cuda: RuntimeError: boom" in text
    assert lines[-1].strip().startswith("report: ")


def test_e2e_is_skipped_and_says_why_without_pyav(tmp_path):
    p = run_script("--cpu-smoke", "--stages", "e2e", "--hide-module", "av", "--out", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    stage = json.loads((tmp_path / "report.json").read_text())["stages"][0]
    assert stage["status"] == "skipped" and "needs av" in stage["note"]


def test_cpu_smoke_run_goes_through_every_stage(tmp_path):
    p = run_script("--cpu-smoke", "--out", tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["build", "tests", "ops", "models"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert stages["tests"]["counts"]["passed"] >= 1
    timed = {tuple(r["key"][i] for i in (0, 2, 3, 4)) for r in stages["ops"]["rows"] if r["status"] == "ok"}
    for op in ("netvlad", "attention_pool", "conv3d_bn_relu"):
        for mode in ("fwd", "fwd+bwd"):
            for dtype in ("float32", "bfloat16"):
                assert {(op, mode, dtype, "eager"), (op, mode, dtype, "cpu")} <= timed
    models = {(r["key"][2], r["key"][4]): r["status"] for r in stages["models"]["rows"]}
    assert models[("infer-b1", "cpu")] == models[("train-b8", "cpu")] == "ok"
    assert models[("infer-b64", "cpu")] == "skipped"  # throughput at batch 64 is for a GPU
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(
        ["report.json", "report.md", "build.log", "tests.log", "ops.log", "models.log"]
    )
    assert p.stdout.rstrip().splitlines()[-1].startswith("report: ")
