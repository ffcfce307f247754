"""Export a trained model for serving: artefacts that run without the training code.

    python -m mvfast.export runs/train/best.pt --out export/
    python -m mvfast.export runs/train/best.pt --out export/ --formats safetensors,pt2   # skip the slow ones

Writes into --out:

- model.safetensors + config.json: the weights (no pickle) and the model's config, classes, data settings
  and the run's settings. ``mvfast.models.from_pretrained("export/")`` loads them, and every command that
  takes a checkpoint (evaluate, predict, train --init-from) takes the folder.
- model.pt2: a torch.export program with a dynamic batch, audio length and title length. Its graph calls
  mvfast's kernels (``torch.ops.mvfast.*``, those of the --backend it was exported with), so it runs where
  mvfast is installed: ``import mvfast; torch.export.load("export/model.pt2").module()(*inputs)``.
- model_aoti.pt2: the same program compiled ahead of time by AOTInductor for the CPU
  (``torch._inductor.aoti_load_package``; it calls the mvfast kernels, so import mvfast first).
- model.onnx: exported through the reference backend (standard ONNX operators only, no mvfast ops), for
  onnxruntime (``pip install "mvfast[export]"``).

Every artefact's inputs are the model's inputs as tensors in the order config.json lists (rgb, motion,
frames, audio, audio_mask, text, text_mask: the modalities the model uses) and its outputs logits, scores
(softmax, or a sigmoid per class for a multi-label model) and attention (the key frames' weights) where the
model has it. Unless --no-check, each artefact is loaded and run on the same inputs as the eager model, and
export.json records its largest difference and its latency against eager, measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from mvfast._checkpoint import atomic_write_text, load_checkpoint, model_from_checkpoint
from mvfast._cli import CLIError, run_main, set_backend

FORMATS = ("safetensors", "pt2", "aoti", "onnx")
FILES = {
    "safetensors": "model.safetensors",
    "pt2": "model.pt2",
    "aoti": "model_aoti.pt2",
    "onnx": "model.onnx",
}
# Largest difference from the eager model allowed for each artefact (float32 logits and scores).
TOLERANCE = {"pt2": 1e-5, "aoti": 1e-5, "onnx": 1e-4}


class ExportError(Exception):
    """An exporter failed; the message names the artefact and the part of the model it failed in."""


def failing_part(model: torch.nn.Module, error: BaseException) -> str | None:
    """The innermost submodule of `model` whose forward was running when `error` was raised, as
    "name (Type)", or None."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = error.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in names and names[id(owner)]:
            found = owner
        tb = tb.tb_next
    cause = error.__cause__ or error.__context__
    if found is None and cause is not None and cause is not error:
        return failing_part(model, cause)
    return None if found is None else f"{names[id(found)]} ({type(found).__name__})"


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _run_exporter(what: str, wrapper, fn, hint: str | None = None):
    from mvfast.nn.fuse import fused_state_dict_keys

    try:
        with fused_state_dict_keys():
            return fn()
    except Exception as e:  # every exporter raises its own types; the user needs where and why
        part = failing_part(wrapper.model, e)
        where = f" in {part.removeprefix('model.')}" if part else ""
        also = f"; {hint}" if hint else ""
        raise ExportError(f"cannot export {what}: the exporter failed{where}: {_first_line(e)}{also}") from e


def export_program(wrapper, example: tuple):
    """torch.export of the model (a :class:`mvfast.models.TensorInputs`) with the dynamic dimensions."""
    return _run_exporter(
        "model.pt2 (torch.export)",
        wrapper,
        lambda: torch.export.export(wrapper, example, dynamic_shapes=wrapper.dynamic_shapes()),
    )


def aoti_available() -> bool:
    import torch._inductor

    return hasattr(torch._inductor, "aoti_compile_and_package")


def export_aoti(program, path: Path) -> Path:
    import torch._inductor

    wrapper = program.module()
    return Path(
        _run_exporter(
            "model_aoti.pt2 (AOTInductor)",
            wrapper,
            lambda: torch._inductor.aoti_compile_and_package(program, package_path=str(path)),
        )
    )


_ONNX_WORKS = (
    "mvfast's ONNX export works with torch 2.6 and onnxscript<0.3, and with torch 2.14: update torch for "
    "model.onnx"
)


def onnx_stack_problem() -> str | None:
    """Why this torch's ONNX exporter is known to fail with the installed onnxscript, or None.

    torch 2.6's exporter fails with onnxscript 0.3 and newer, on this model as on a plain Conv3d ->
    BatchNorm3d: 0.3.2 and 0.4.0 in its version conversion pass ("The model contains functions"), 0.5.7,
    0.6.2 and 0.7.2 in translating the batch norm ("'tuple' object has no attribute 'dtype'"). onnxscript
    0.2.7 exports the model, with protobuf < 7 (protobuf 7's int fields refuse 0.2's booleans).

    torch 2.5's exporter fails on this model with both onnxscript versions tried: 0.7.2 as 2.6's does, 0.2.7
    building a constant from a list ("unhashable type: 'list'"). torch 2.4's torch.onnx.export has no
    ``dynamo`` and ``dynamic_shapes`` arguments (they came with 2.5), so it cannot export from torch.export's
    program with the named dynamic dimensions (batch, audio windows, title tokens).
    """
    try:
        import onnxscript
    except ImportError:
        return None
    from torch.torch_version import TorchVersion

    if (2, 6) <= torch.__version__ < (2, 7) and TorchVersion(onnxscript.__version__) >= (0, 3):
        return (
            f"torch {torch.__version__}'s ONNX exporter fails with onnxscript {onnxscript.__version__} (0.3 "
            "and newer, even on a plain Conv3d + BatchNorm3d); onnxscript 0.2.7 works: "
            "pip install 'onnxscript<0.3' 'protobuf<7', or update torch"
        )
    if torch.__version__ < (2, 5):
        return (
            f"torch {torch.__version__}'s torch.onnx.export has no dynamo exporter with dynamic shapes "
            f"(its dynamo= and dynamic_shapes= came with torch 2.5); {_ONNX_WORKS}"
        )
    if (2, 5) <= torch.__version__ < (2, 6):
        return (
            f"torch {torch.__version__}'s ONNX exporter fails on this model with onnxscript "
            f"{onnxscript.__version__} (0.2.7 and 0.7.2 were tried); {_ONNX_WORKS}"
        )
    return None


def export_onnx(wrapper, example: tuple, path: Path) -> Path:
    """model.onnx through the reference backend: the exporter sees only standard operators."""
    import mvfast

    try:
        import onnxscript  # noqa: F401  torch.onnx's exporter needs it
    except ImportError:
        raise CLIError('ONNX export needs onnx and onnxscript: pip install "mvfast[export]"') from None

    if torch.__version__ < (2, 5):  # the call would fail: "unexpected keyword argument 'dynamic_shapes'"
        raise ExportError(f"cannot export model.onnx (torch.onnx): {onnx_stack_problem()}")

    def run():
        # (torch.onnx warns once per axis that its name is shared by inputs, which is how they are meant)
        with mvfast.backend("reference"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name")
            torch.onnx.export(
                wrapper,
                example,
                str(path),
                input_names=wrapper.input_names(),
                output_names=wrapper.output_names(),
                dynamic_shapes=wrapper.dynamic_shapes(),
                dynamo=True,
                verbose=False,
            )
        return path

    return _run_exporter("model.onnx (torch.onnx)", wrapper, run, hint=onnx_stack_problem())


def onnx_session(path: Path):
    try:
        import onnxruntime
    except ImportError:
        raise CLIError('running model.onnx needs onnxruntime: pip install "mvfast[export]"') from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(session, names: list[str]):
    def run(*inputs):
        feeds = {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

    return run


def median_ms(fn, inputs: tuple, repeats: int, warmup: int = 1) -> float:
    """The median of ``repeats`` timed calls of ``fn(*inputs)`` under no_grad, in ms, after ``warmup``."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_difference(a: tuple, b: tuple) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b, strict=True))


def export(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m mvfast.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint of python -m mvfast.train (or its run folder)")
    parser.add_argument("--out", required=True, help="the folder to write the artefacts into")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated artefacts out of {','.join(FORMATS)} (default: all; safetensors always)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        help="the mvfast kernels model.pt2 and model_aoti.pt2 call: auto, cpu or reference (default: auto)",
    )
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True,
        help="load and run each artefact against the eager model, and time both (default: on)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per artefact (default: 20)")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise CLIError(f"unknown --formats {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be >= 1, got {args.repeats}")
    if "aoti" in formats and not aoti_available():
        raise CLIError(
            f"--formats aoti needs AOTInductor's packaging (torch._inductor.aoti_compile_and_package, torch "
            f"2.6+); this is torch {torch.__version__}: export the other formats, or update torch"
        )
    device = torch.device("cpu")  # the artefacts are for CPU serving; AOTInductor compiles C++ here
    set_backend(args.backend, device)
    ckpt = load_checkpoint(args.checkpoint)
    model, data_cfg, classes = model_from_checkpoint(ckpt, device)
    out = Path(args.out)
    try:
        return write_artefacts(model, ckpt, data_cfg, classes, out, formats, args.check, args.repeats)
    except ExportError as e:
        raise CLIError(str(e)) from None


@torch.no_grad()
def write_artefacts(model, ckpt, data_cfg, classes, out: Path, formats, check=True, repeats=20) -> dict:
    from mvfast._checkpoint import data_config_to_dict
    from mvfast.models import TensorInputs, save_pretrained

    wrapper = TensorInputs(model).eval()
    save_pretrained(
        model, out, classes=classes, model_spec=ckpt["model_spec"], data_config=data_config_to_dict(data_cfg),
        settings=ckpt.get("config", {}), inputs=wrapper.input_names(), outputs=wrapper.output_names(),
    )  # fmt: skip
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    example = wrapper.example_inputs(batch=2)
    # the check: another batch size and other lengths than the export's example, at batch 1 too
    inputs = {b: wrapper.example_inputs(batch=b, audio=9, title=3, seed=b) for b in (1, 3)}
    eager = {b: wrapper(*x) for b, x in inputs.items()}
    runners = {}
    program = None
    if "pt2" in formats or "aoti" in formats:
        program = export_program(wrapper, example)
    if "pt2" in formats:
        torch.export.save(program, out / FILES["pt2"])
        print(f"wrote {out / FILES['pt2']}")
        runners["pt2"] = lambda: torch.export.load(out / FILES["pt2"]).module()
    if "aoti" in formats:
        t0 = time.perf_counter()
        export_aoti(program, out / FILES["aoti"])
        print(f"wrote {out / FILES['aoti']} (compiled in {time.perf_counter() - t0:.0f} s)")
        runners["aoti"] = lambda: torch._inductor.aoti_load_package(str(out / FILES["aoti"]))
    if "onnx" in formats:
        export_onnx(wrapper, example, out / FILES["onnx"])
        print(f"wrote {out / FILES['onnx']}")
        runners["onnx"] = lambda: onnx_runner(onnx_session(out / FILES["onnx"]), wrapper.input_names())
    report = {"checkpoint": ckpt["path"], "artefacts": [FILES[f] for f in formats] + ["config.json"]}
    if check:
        report["checks"] = checks(wrapper, runners, inputs, eager, repeats)
        atomic_write_text(out / "export.json", json.dumps(report, indent=1) + "\n")
        print(check_table(report["checks"]))
        failed = [c for c in report["checks"] if not c["ok"]]
        if failed:
            raise CLIError(
                "exported artefacts differ from the eager model: "
                + "; ".join(
                    f"{c['artefact']} by {c['max_difference']:.2e} (allowed {c['tolerance']:g})"
                    for c in failed
                )
            )
    return report


def checks(wrapper, runners: dict, inputs: dict, eager: dict, repeats: int) -> list[dict]:
    """Each artefact loaded, run at every batch of `inputs` against the eager outputs, and timed at batch 1
    with the eager model in the same run."""
    results = []
    eager_ms = median_ms(wrapper, inputs[1], repeats)
    for name, load in runners.items():
        run = load()
        diff = max(max_difference(run(*x), eager[b]) for b, x in inputs.items())
        ms = median_ms(run, inputs[1], repeats)
        results.append(
            {
                "artefact": FILES[name],
                "max_difference": diff,
                "tolerance": TOLERANCE[name],
                "ok": diff <= TOLERANCE[name],
                "batch1_ms": ms,
                "eager_batch1_ms": eager_ms,
                "speedup_vs_eager": eager_ms / ms,
            }
        )
    return results


def check_table(rows: list[dict]) -> str:
    lines = ["| artefact | max difference from eager | batch-1 latency | eager (same run) | eager / it |"]
    lines.append("|---|---:|---:|---:|---:|")
    for r in rows:
        lines.append(
            f"| {r['artefact']} | {r['max_difference']:.1e} (<= {r['tolerance']:g}) | "
            f"{r['batch1_ms']:.2f} ms | {r['eager_batch1_ms']:.2f} ms | {r['speedup_vs_eager']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main("mvfast.export", export, argv)


if __name__ == "__main__":
    sys.exit(main())
