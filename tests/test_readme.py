"""The README's examples, as a user copies them: its Python blocks run, and every flag its command lines pass
is one the command has."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def python_block(first_line: str) -> str:
    """The block, preceded by blank lines so that a traceback gives its README line numbers."""
    text = README.read_text(encoding="utf-8")
    found = [b for b in blocks("python") if b.startswith(first_line)]
    assert len(found) == 1, f"README: no single python block starting with {first_line!r}"
    return "\n" * text[: text.index("```python\n" + found[0])].count("\n") + "\n" + found[0]


def substitute(code: str, replacements: dict[str, str]) -> str:
    """The block with the README's placeholders (a user's own files) replaced; each must be there."""
    for old, new in replacements.items():
        assert old in code, f"README block changed: {old!r} is gone; update this test"
        code = code.replace(old, new)
    return code


def with_claims(code: str) -> str:
    """``f()  # n == 20 blocks`` becomes ``f(); assert n == 20  # ...``: the README's numbers are checked."""
    out = []
    for line in code.splitlines():
        m = re.fullmatch(r"([^#]*\S)(\s*#\s*(\w+ == \d+)\b.*)", line)
        out.append(f"{m.group(1)}; assert {m.group(3)}{m.group(2)}" if m else line)
    return "\n".join(out) + "\n"


def run_block(code: str, namespace: dict | None = None) -> dict:
    namespace = {"__name__": "readme", **(namespace or {})}
    exec(compile(with_claims(code), str(README), "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------------------------
# Command lines


def command_lines() -> list[tuple[str, list[str]]]:
    """(module, flags) of every ``python -m mvfast.X`` / ``torchrun ... -m mvfast.X`` line in a bash block."""
    found = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            m = re.search(r"-m (mvfast\.\w+)(.*)", line)
            if m:
                found.append((m.group(1), FLAG.findall(m.group(2))))
    return found


def test_the_readme_shows_the_commands_and_its_claims():
    assert (
        with_claims("model, n = f()   # n == 20 blocks")
        == "model, n = f(); assert n == 20   # n == 20 blocks\n"
    )
    modules = {m for m, _ in command_lines()}
    assert {"mvfast.train", "mvfast.evaluate", "mvfast.predict", "mvfast.extract", "mvfast.export"} <= modules


def help_flags(module: str) -> set[str]:
    """The flags ``python -m <module> --help`` lists (its main, in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0, module
    return set(FLAG.findall(out.getvalue()))


@pytest.mark.parametrize("module", sorted({m for m, _ in command_lines()}))
def test_every_flag_in_the_readme_is_the_commands(module):
    flags = {f for m, fs in command_lines() if m == module for f in fs}
    known = help_flags(module)
    assert flags <= known, f"{module} has no {sorted(flags - known)}"


# Flags of other tools the README names (pip, setup.py, pytest-benchmark): not mvfast's to check.
OTHER_TOOLS = {"--no-build-isolation", "--no-deps", "--inplace", "--benchmark-only", "--benchmark-json"}
SCRIPTS = ("benchmarks/gpu_check.py", "benchmarks/serving.py", "tests/test_triton_compile.py")
COMMANDS = ("train", "evaluate", "predict", "extract", "export", "sweep", "info", "demo")


def test_every_flag_the_readme_names_anywhere_exists():
    """Prose too: each --flag is an mvfast command's, one of a script the README runs, or another tool's."""
    known = set(OTHER_TOOLS)
    for name in COMMANDS:
        known |= help_flags(f"mvfast.{name}")
    root = README.parent
    for script in SCRIPTS:
        proc = subprocess.run(
            [sys.executable, script, "--help"], cwd=root, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, (script, proc.stderr)
        known |= set(FLAG.findall(proc.stdout))
    named = set(FLAG.findall(README.read_text(encoding="utf-8")))
    assert named <= known, f"the README names flags nothing has: {sorted(named - known)}"


# ---------------------------------------------------------------------------------------------------
# Python blocks


def test_the_ops_block():
    ns = run_block(python_block("import torch, mvfast"))
    x, vlad, attn = ns["x"], ns["vlad"], ns["attn"]
    assert ns["desc"].shape == (8, 64 * 1024)
    assert ns["pooled"].shape == (8, 1, 1024) and ns["weights"].shape == (8, 300, 1)
    torch.testing.assert_close(ns["y"], ns["desc"])  # "the same results"
    torch.testing.assert_close(ns["v"], ns["pooled"])
    assert type(ns["model"]).__name__ == "VGG" and not any(
        type(m).__module__.startswith("mvfast") for m in ns["model"].modules()
    )  # unfused back to the plain modules
    assert x.shape == (8, 300, 1024) and vlad.centroids.shape == (64, 1024) and attn.weight.shape == (1, 1024)


def test_the_backends_block():
    import mvfast

    try:
        ns = run_block(python_block('mvfast.set_backend("cpu")'), {"mvfast": mvfast})
    finally:
        mvfast.set_backend("auto")
    assert "mvfast" in ns


def test_the_model_block():
    import mvfast
    from mvfast.data import DataConfig

    cfg = mvfast.models.create_model("tiny", num_classes=10).config
    B, A, W = 2, 20, 6
    g = torch.Generator().manual_seed(0)
    batch = {
        "rgb": torch.randn(B, 3, cfg.clip_len, cfg.size, cfg.size, generator=g),
        "motion": torch.randn(B, 2, cfg.clip_len, cfg.size, cfg.size, generator=g),
        "frames": torch.randn(B, cfg.scene_frames, 3, cfg.scene_size, cfg.scene_size, generator=g),
        "audio": torch.randn(B, A, 64, generator=g),
        "audio_mask": torch.ones(B, A, dtype=torch.bool),
        "text": torch.randint(1, cfg.vocab_size, (B, W), generator=g),
        "text_mask": torch.ones(B, W, dtype=torch.bool),
        "label": torch.tensor([3, 7]),
    }
    ns = run_block(
        python_block("model = mvfast.models.create_model"),
        dict(mvfast=mvfast, DataConfig=DataConfig, batch=batch),
    )
    assert ns["out"]["logits"].shape == (B, 10)
    assert ns["out"]["attention"].shape[:2] == (B, cfg.scene_frames)
    assert torch.isfinite(ns["loss"]) and ns["loss"].dim() == 0
    assert ns["data_config"].clip_len == cfg.clip_len and ns["data_config"].size == cfg.size


def test_the_data_block(tmp_path, monkeypatch):
    pytest.importorskip("av")
    from test_data_datasets import write_ucf

    from mvfast.data.encode import encode_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (20, 48, 48, 3)).astype(np.uint8)
    t = np.arange(22050) / 44100
    encode_video(tmp_path / "clip.mp4", frames, fps=10, audio=0.3 * np.sin(2 * np.pi * 440 * t))
    avi = encode_video(tmp_path / "a.avi", frames[:8], fps=10, codec="mpeg4")
    write_ucf(tmp_path / "UCF101", avi)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MVFAST_CACHE", str(tmp_path / "cache"))
    code = substitute(
        python_block("from mvfast.data import"),
        {
            # the default set is 240 videos; the same call on a small one
            "SyntheticMicroVideos(train=True)": (
                "SyntheticMicroVideos(train=True, num_classes=2, videos_per_class=2, size=32, seconds=0.5)"
            ),
            '"/data/UCF101"': repr(str(tmp_path / "UCF101")),
        },
    )
    ns = run_block(code, {"torch": torch})
    sample = ns["sample"]
    assert sample["rgb"].shape == (3, 16, 112, 112) and sample["motion"].shape == (2, 16, 112, 112)
    assert sample["audio"].shape[1] == 64 and sample["audio_mask"].any() and sample["text_mask"].any()
    assert len(ns["train"]) == 2 and len(ns["ucf"]) == 3
    assert ns["loader"].batch_size == 8
