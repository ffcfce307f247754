"""Backend choice: set_backend, the context manager, MVFAST_BACKEND, auto's fallback, errors for
backends that cannot run, mvfast without its extension, and python -m mvfast.info."""

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

import mvfast
from mvfast import _backend, _ext

# the module, not the function of the same name that mvfast.ops exports
netvlad_module = importlib.import_module("mvfast.ops.netvlad")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 5, 8, generator=g),
        torch.randn(3, 8, generator=g),
        None,
        torch.randn(3, 8, generator=g),
    )


def python(code, **env):
    """Run code in a fresh interpreter (so import-time settings apply) and return the completed process."""
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_set_backend_and_context_manager():
    assert mvfast.get_backend() == "auto"
    mvfast.set_backend("reference")
    assert mvfast.get_backend() == "reference"
    with mvfast.backend("cpu"):
        assert mvfast.get_backend() == "cpu"
        with mvfast.backend("auto"):
            assert mvfast.get_backend() == "auto"
        assert mvfast.get_backend() == "cpu"
    assert mvfast.get_backend() == "reference"


def test_context_manager_restores_after_an_error():
    with pytest.raises(KeyError):
        with mvfast.backend("reference"):
            raise KeyError
    assert mvfast.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["gpu", "", None, 3])
def test_unknown_backend_is_an_error(bad):
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cuda, cpu, reference"):
        mvfast.set_backend(bad)


def test_backend_that_cannot_run_the_call_says_why():
    with mvfast.backend("cuda"):
        with pytest.raises(RuntimeError, match=r"netvlad: backend 'cuda' cannot run this call: (?i:.*cuda)"):
            mvfast.ops.netvlad(*_inputs())


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    with mvfast.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mvfast.ops.netvlad(*_inputs())


def test_op_specific_reason_float64_on_triton():
    triton = _backend.backends("cpu")["triton"]
    if not triton["available"]:  # then the call is refused for that reason, whatever its dtype
        pytest.skip(f"triton: {triton['reason']}")
    x, w, b, c = (t.double() if t is not None else None for t in _inputs())
    with mvfast.backend("triton"):
        with pytest.raises(RuntimeError, match="not float64"):
            mvfast.ops.netvlad(x, w, b, c)


@pytest.mark.skipif(not _ext.LOADED, reason=f"mvfast._C not loaded: {_ext.ERROR}")
def test_auto_uses_the_cpu_kernel_when_built(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("auto ran the reference")

    monkeypatch.setattr(netvlad_module, "netvlad_reference", boom)
    out = mvfast.ops.netvlad(*_inputs())
    assert out.shape == (2, 24)


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_ext, "LOADED", False)
    monkeypatch.setattr(_ext, "ERROR", "pretend mvfast._C is missing")
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="mvfast"):
        a = mvfast.ops.netvlad(*_inputs())
        b = mvfast.ops.netvlad(*_inputs())
    fallbacks = [r for r in caplog.records if "using the reference backend" in r.getMessage()]
    assert len(fallbacks) == 1
    assert "pretend mvfast._C is missing" in fallbacks[0].getMessage()
    torch.testing.assert_close(a, b)
    with mvfast.backend("cpu"), pytest.raises(RuntimeError, match="pretend mvfast._C is missing"):
        mvfast.ops.netvlad(*_inputs())


def test_backends_report():
    table = mvfast.backends("cpu")
    assert set(table) == {"triton", "cuda", "cpu", "reference"}
    assert table["reference"] == {"available": True, "reason": None}
    assert table["cuda"]["available"] is False and table["cuda"]["reason"]
    assert table["cpu"]["available"] == _ext.LOADED


def test_environment_variable_sets_the_backend():
    p = python("import mvfast; print(mvfast.get_backend())", MVFAST_BACKEND="reference")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "reference"
    p = python("import mvfast", MVFAST_BACKEND="fastest")
    assert p.returncode != 0
    assert "MVFAST_BACKEND must be one of auto, triton, cuda, cpu, reference; got 'fastest'" in p.stderr


def test_import_without_the_extension_runs_the_reference():
    code = (
        "import sys, logging; sys.modules['mvfast._C'] = None\n"
        "logging.basicConfig()\n"
        "import torch, mvfast\n"
        "print(mvfast._ext.LOADED, mvfast.backends('cpu')['cpu']['reason'])\n"
        "y = mvfast.ops.netvlad(torch.randn(2, 5, 8), torch.randn(3, 8), None, torch.randn(3, 8))\n"
        "print(tuple(y.shape))\n"
    )
    p = python(code)
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.strip().splitlines()
    assert first.startswith("False") and "pip install -e ." in first
    assert second == "(2, 24)"
    assert "using the reference backend" in p.stderr


@pytest.mark.parametrize(
    "version, usable", [("3.1.0", False), ("3.0.0", False), ("3.2.0", True), ("3.8.0+git1234", True)]
)
def test_a_triton_older_than_the_kernels_need_is_refused_by_reason(monkeypatch, version, usable):
    import importlib.metadata
    import importlib.util

    from mvfast import _backend

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version)
    _, _, reason = _backend._triton_status()
    if usable:
        assert reason is None
    else:
        assert reason == f"mvfast's Triton kernels need Triton >= 3.2; this is Triton {version}"


@pytest.mark.parametrize(
    "triton, numpy_version, usable",
    [
        ("3.2.0", "2.4.6", False),
        ("3.6.0", "2.4.0", False),
        ("3.2.0", "2.3.5", True),
        ("3.7.0", "2.4.6", True),
    ],
)
def test_an_interpreter_that_numpy_breaks_is_refused_by_reason(monkeypatch, triton, numpy_version, usable):
    import importlib.metadata
    import importlib.util

    import numpy

    from mvfast import _backend

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: triton)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = _backend._interpreter_reason()
    if usable:
        assert reason is None
    else:
        assert reason == (
            f"Triton {triton}'s interpreter cannot run mvfast's kernels with NumPy {numpy_version}, which "
            "refuses its int() of a 1-element array: NumPy < 2.4 or Triton >= 3.7 can"
        )


def test_the_interpreter_reason_counts_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "_TRITON_REASON", None)
    monkeypatch.setattr(_backend, "_INTERPRETER_REASON", "pretend NumPy breaks the interpreter")
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", True)
    for device in ("cpu", "cuda"):
        reasons = _backend._device_reasons("triton", torch.device(device))
        assert reasons == ["under TRITON_INTERPRET=1: pretend NumPy breaks the interpreter"], reasons
    # compiled for a GPU, the kernels never meet NumPy
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    assert _backend._device_reasons("triton", torch.device("cuda")) == []
    assert "TRITON_INTERPRET=1, set before" in _backend._device_reasons("triton", torch.device("cpu"))[0]


@pytest.mark.parametrize(
    "capability, archs, ptx, runs",
    [
        ((9, 0), ["8.0", "8.6", "8.9", "9.0"], ["9.0"], True),  # H100/H200: its machine code
        ((8, 7), ["8.0", "8.6", "8.9", "9.0"], [], True),  # Orin: 8.6's machine code runs on 8.7
        ((10, 0), ["8.0", "8.6", "8.9", "9.0"], ["9.0"], True),  # B200: the driver compiles 9.0's PTX
        ((12, 0), ["8.0", "8.6", "8.9", "9.0"], ["9.0"], True),
        ((10, 0), ["8.0", "8.6", "8.9", "9.0"], [], False),  # machine code never crosses a major version
        ((9, 0), ["8.0"], [], False),
        ((7, 5), ["8.0", "8.6", "8.9", "9.0"], ["9.0"], False),  # PTX runs only on its arch and newer
        ((8, 0), ["8.6"], [], False),  # nor runs on an older minor
        ((9, 0), ["9.0a"], [], True),  # the arch-specific variant runs on its own capability
        ((10, 0), ["10.0a"], [], True),
        ((10, 3), ["10.0a"], [], False),  # and only there
        ((10, 0), ["8.0", "Hopper"], [], True),  # an entry it cannot read: the launch will say
        ((10, 0), [], [], True),  # nor a build that recorded no archs
    ],
)
def test_which_gpus_the_cuda_build_runs_on(capability, archs, ptx, runs):
    why = _ext.arch_reason(capability, archs, ptx)
    assert (why is None) == runs, why
    if not runs:
        cc = f"{capability[0]}.{capability[1]}"
        assert f"({cc})" in why and f"TORCH_CUDA_ARCH_LIST={cc}" in why and ", ".join(archs) in why, why


def test_build_info_reads_the_ptx_archs(monkeypatch):
    class FakeC:
        CUDA_VERSION, CUDA_ARCHS = "13.0", "8.0,8.6,8.9,9.0+PTX"

    monkeypatch.setattr(_ext, "_C", FakeC)
    b = _ext.build_info()
    assert b["cuda"] and b["archs"] == ["8.0", "8.6", "8.9", "9.0"] and b["ptx"] == ["9.0"], b
    FakeC.CUDA_VERSION, FakeC.CUDA_ARCHS = "", ""
    b = _ext.build_info()
    assert not b["cuda"] and b["archs"] == [] and b["ptx"] == [], b


def test_a_gpu_the_cuda_build_does_not_cover_is_refused_by_reason(monkeypatch, caplog):
    """On a GPU no built arch runs on, the cuda backend is unavailable with the reason (its first launch
    would fail with "no kernel image is available"), and auto moves on to the next backend."""
    monkeypatch.setattr(_backend, "_GPU", True)
    monkeypatch.setitem(_ext.BUILD, "loaded", True)
    monkeypatch.setitem(_ext.BUILD, "cuda", True)
    monkeypatch.setitem(_ext.BUILD, "archs", ["8.0", "9.0"])
    monkeypatch.setitem(_ext.BUILD, "ptx", [])
    monkeypatch.setattr(_ext, "LOADED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    asked = []

    def capability(index):
        asked.append(index)
        return {0: (9, 0), 1: (10, 0)}[index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    _backend._cuda_arch_reason.cache_clear()
    try:
        assert _backend._device_reasons("cuda", torch.device("cuda", 0)) == []
        reasons = _backend._device_reasons("cuda", torch.device("cuda"))  # the current device: 1
        assert len(reasons) == 1 and "none of which runs on this GPU (10.0)" in reasons[0], reasons
        assert _backend.backends("cuda")["cuda"] == {"available": False, "reason": reasons[0]}
        _backend._device_reasons("cuda", torch.device("cuda", 1))
        assert asked == [0, 1], asked  # each GPU is asked once
        with mvfast.backend("cuda"), pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run.*10\.0"):
            _backend.resolve("netvlad", torch.device("cuda", 1), lambda name: [])
        # auto: Triton first where it can run (pretended away here), then cuda, refused, then the reference
        monkeypatch.setattr(_backend, "_TRITON_REASON", "pretend Triton is missing")
        monkeypatch.setattr(_backend, "_logged", set())
        with caplog.at_level(logging.WARNING, logger="mvfast"):
            assert _backend.resolve("netvlad", torch.device("cuda", 1), lambda name: []) == "reference"
            assert _backend.resolve("netvlad", torch.device("cuda", 0), lambda name: []) == "cuda"
        assert "cuda: mvfast._C's CUDA kernels were built for compute capabilities 8.0, 9.0" in caplog.text
    finally:
        _backend._cuda_arch_reason.cache_clear()


def test_an_extension_built_against_another_torch_says_how_to_rebuild():
    # what the dynamic loader says of an _C compiled against another torch (pip's build isolation builds
    # against the newest torch it may install): the hint is the rebuild against this one, not the same install
    code = (
        "import sys, importlib.abc\n"
        "class Stale(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'mvfast._C':\n"
        "            raise ImportError('_C.so: undefined symbol: _ZN3c106ivalue14ConstantString6create')\n"
        "sys.meta_path.insert(0, Stale())\n"
        "import torch, mvfast\n"
        "print(mvfast._ext.LOADED, mvfast._ext.ERROR)\n"
    )
    p = python(code)
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    assert out.startswith("False") and "undefined symbol" in out, out
    assert f"another torch than this one ({torch.__version__})" in out, out
    assert "pip install -e . --no-build-isolation" in out, out


def test_info_command():
    p = subprocess.run(
        [sys.executable, "-m", "mvfast.info"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert f"torch {torch.__version__}" in out
    assert "mvfast._C:" in out and "op netvlad:" in out
    assert "cpu  reference available" in out
    if _ext.LOADED:
        assert "cpu  cpu       available" in out
