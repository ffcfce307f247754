"""pytest plugin of benchmarks/gpu_check.py: one JSON line per test, a time budget, and recovery from a lost
CUDA context.

    pytest -p gpu_check_pytest --gpu-check-log run.jsonl --gpu-check-deadline EPOCH ...

(benchmarks/ on sys.path). It writes, as they happen, so that a run killed at its budget still leaves
them: ``{"event": "collected", "n"}``, ``{"event": "start", "nodeid"}``, one ``{"event": "test",
"nodeid", "outcome", "reason", "message", "duration"}`` per test and ``{"event": "collect_error",
"nodeid", "message", "needs"}`` per module that failed to import. Under pytest-xdist the controller
writes them; the workers run the budget and context checks for the tests they run.

- Past ``--gpu-check-deadline`` (seconds since the epoch) every test still to run is skipped at setup
  with BUDGET_REASON, which takes microseconds, so the run ends at once and says what did not run.
- A failure after which ``torch.cuda.synchronize()`` itself fails (an illegal address, a device-side
  assert) leaves the process's CUDA context unusable, and every later CUDA test would fail with the same
  error. The tests after it in that process are skipped with LOST_REASON instead; gpu_check.py runs them
  again in a fresh process, deselecting those already done (``--gpu-check-skip FILE``, one node id a line).
- ``--gpu-check-missing av,...``: a failure whose cause is the import of one of these modules (not
  installed on this machine) is reported as skipped, "needs av", with the module named in ``needs``.

Only hooks that pytest has had for many releases are used, so that it works with the pytest installed on a
device machine, whatever its version.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

BUDGET_REASON = "gpu_check: the stage's time budget is spent"
LOST_REASON = "gpu_check: CUDA context lost in this process after"
# other names an ImportError's message may give a missing module by (its distribution's name)
ALIASES = {"av": ("PyAV",)}

_state: dict = {"log": None, "deadline": None, "skip": set(), "missing": (), "lost": None, "results": {}}


class _Hidden:
    """A meta-path finder under which importing one of ``names`` fails as if it were not installed: a
    rehearsal, on a machine that has the module, of one that lacks it."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def hide_modules(names) -> None:
    """Make ``import NAME`` fail in this process for each of ``names``."""
    names = [n for n in names if n]
    if names:
        sys.meta_path.insert(0, _Hidden(names))


def pytest_addoption(parser):
    group = parser.getgroup("gpu_check")
    group.addoption("--gpu-check-log", default=None, help="write one JSON line per test to this file")
    group.addoption("--gpu-check-deadline", type=float, default=None, help="skip tests after this epoch time")
    group.addoption("--gpu-check-skip", default=None, help="file of node ids to deselect (already done)")
    group.addoption("--gpu-check-missing", default="", help="modules not installed here (comma list)")
    group.addoption("--gpu-check-hide", default="", help="modules to hide, as if not installed (comma list)")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # pytest-xdist sets it on its workers


def pytest_configure(config):
    hide_modules(config.getoption("gpu_check_hide").split(","))
    _state["deadline"] = config.getoption("gpu_check_deadline")
    _state["missing"] = tuple(m for m in config.getoption("gpu_check_missing").split(",") if m)
    skip = config.getoption("gpu_check_skip")
    if skip:
        with open(skip) as f:
            _state["skip"] = {line.rstrip("\n") for line in f if line.strip()}
    path = config.getoption("gpu_check_log")
    if path and not _is_worker(config):
        _state["log"] = open(path, "a")  # closed in pytest_unconfigure


def pytest_unconfigure(config):
    if _state["log"] is not None:
        _state["log"].close()
        _state["log"] = None


def _write(record: dict) -> None:
    if _state["log"] is not None:
        _state["log"].write(json.dumps(record) + "\n")
        _state["log"].flush()


def pytest_collection_modifyitems(session, config, items):
    if not _state["skip"]:
        return
    keep = [it for it in items if it.nodeid not in _state["skip"]]
    done = [it for it in items if it.nodeid in _state["skip"]]
    if done:
        config.hook.pytest_deselected(items=done)
        items[:] = keep


def pytest_collection_finish(session):
    if not _is_worker(session.config):
        _write({"event": "collected", "n": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    # the controller of an xdist run collects nothing itself; every worker collects the same ids
    if not _state.get("counted"):
        _state["counted"] = True
        _write({"event": "collected", "n": len(ids)})


def _missing_cause(excinfo) -> str | None:
    """The module of ``--gpu-check-missing`` whose failed import caused this exception, if any."""
    seen = set()
    exc = excinfo.value if excinfo is not None else None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError):
            name = (getattr(exc, "name", None) or "").partition(".")[0]
            if name in _state["missing"]:
                return name
            for mod in _state["missing"]:
                if _names(mod, str(exc)):
                    return mod
        exc = exc.__cause__ or exc.__context__
    return None


def _names(mod: str, text: str) -> bool:
    return f"No module named '{mod}'" in text or any(alias in text for alias in ALIASES.get(mod, ()))


def _context_lost() -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize()
    except Exception:
        return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = _state["deadline"]
    if deadline is not None and time.time() > deadline:
        pytest.skip(BUDGET_REASON)
    if _state["lost"] is not None:
        pytest.skip(f"{LOST_REASON} {_state['lost']}")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item, call):
    # Runs where the test ran (an xdist worker too) and before the report is made, so that what it adds to
    # user_properties travels with the report to the controller. Returns None: pytest makes the report.
    if call.excinfo is None or call.excinfo.errisinstance(pytest.skip.Exception):
        return None
    needs = _missing_cause(call.excinfo)
    if needs:
        item.user_properties.append(("gpu_check_needs", needs))
    elif _state["lost"] is None and _context_lost():
        _state["lost"] = item.nodeid
        item.user_properties.append(("gpu_check_lost_context", True))
    return None


def pytest_runtest_logstart(nodeid, location):
    _write({"event": "start", "nodeid": nodeid})


def _text(report) -> str:
    try:
        text = report.longreprtext
    except Exception:
        text = str(report.longrepr)
    return text[-4000:]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
    else:
        reason = _text(report)
    return reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason


def pytest_runtest_logreport(report):
    if _state["log"] is None:
        return
    results = _state["results"]
    rec = results.setdefault(report.nodeid, {"event": "test", "nodeid": report.nodeid, "outcome": None})
    rec["duration"] = rec.get("duration", 0.0) + (getattr(report, "duration", 0.0) or 0.0)
    props = dict(getattr(report, "user_properties", None) or [])
    if props.get("gpu_check_needs"):
        rec["needs"] = props["gpu_check_needs"]
    if props.get("gpu_check_lost_context"):
        rec["lost_context"] = True
    when = report.when
    if when == "setup":
        if report.failed:
            rec.update(outcome="error", message=_text(report))
        elif report.skipped:
            rec.update(outcome="skipped", reason=_skip_reason(report))
    elif when == "call":
        if hasattr(report, "wasxfail"):
            rec["outcome"] = "xfailed" if report.skipped else "xpassed"
            rec["reason"] = str(report.wasxfail)
        elif report.failed:
            rec.update(outcome="failed", message=_text(report))
        elif report.skipped:
            rec.update(outcome="skipped", reason=_skip_reason(report))
        else:
            rec["outcome"] = "passed"
    elif when == "teardown":
        if report.failed and rec["outcome"] in (None, "passed", "skipped"):
            rec.update(outcome="error", message=_text(report))
    else:  # an xdist worker that crashed while running the test
        rec.update(outcome="failed", message=_text(report))
    if when != "setup" and when != "call":
        if rec.get("needs") and rec["outcome"] in ("failed", "error"):
            rec.update(outcome="skipped", reason=f"needs {rec['needs']}, which is not installed here")
        if rec["outcome"] is None:
            rec["outcome"] = "passed"
        _write(results.pop(report.nodeid))


def pytest_collectreport(report):
    if report.failed:
        text = _text(report)
        needs = None
        if "ImportError" in text or "ModuleNotFoundError" in text:
            needs = next((m for m in _state["missing"] if _names(m, text)), None)
        _write({"event": "collect_error", "nodeid": report.nodeid, "message": text, "needs": needs})
