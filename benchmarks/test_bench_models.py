"""The whole model: per-video inference latency (batch 1, eval), throughput (batch 64, eval; GPU only)
and the training step (batch 8: forward, loss, backward) of the ``tiny`` and ``paper`` presets, with
mvfast's kernels against the same model on the reference backend (eager PyTorch) and torch.compile of it,
in the same run. CUDA cases run where a GPU is.

    pytest benchmarks/test_bench_models.py --benchmark-only

Inputs are random tensors of the shapes the data pipeline gives the preset (4 s of audio: 100 windows; one
sample in four without audio, one without a title). The paper preset's training step is skipped on the CPU:
one step of batch 8 is about 9 TFLOP (two C3Ds at 16x112x112, VGG16 and VGG19 on 64 frames at 224) and
needs more than 20 GB of activations, minutes per round on a small CPU. Its inference runs two rounds.

The tiny model's training step is mostly convolution through oneDNN, the same work on every backend; what
mvfast changes is everything around it: the 37 Conv+BN+ReLU blocks (the 3D CNNs' and, fused by
``create_model``, the scene VGGs') run their BatchNorm statistics, normalisation, ReLU and backward as
vectorised kernels over the channels-last tensors the model keeps, plus the three NetVLADs and the
attention pooling. On such narrow layers (4 to 64 channels) the fixed cost per call matters as much as
the kernels: see mvfast.ops.conv3d_bn_relu.run_kernels. On a machine that other processes load, kernels
that open an OpenMP parallel region for tiny work stall for whole scheduler slices; compare ratios from
quiet runs only.
"""

import pytest
import torch
from benchutil import BARS, GPU, measure, unavailable

import mvfast
from mvfast.models import create_model

CASES = ("tiny", "paper")
MODES = {"infer-b1": 1, "train-b8": 8}
# throughput: on a GPU, where a batch of 64 videos is a realistic serving batch
GPU_MODES = {"infer-b64": 64}
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "compile", "cpu"], "cuda": ["eager", "compile", "cuda", "triton"]}
ROUNDS = {("tiny", "cpu"): 10, ("paper", "cpu"): 2, ("tiny", "cuda"): 30, ("paper", "cuda"): 5}
NUM_CLASSES = 10

BARS.append(
    dict(op="model", case="tiny", device="cpu", mode="train-b8", impl="cpu", base="eager", at_least=1.2)
)

_models: dict = {}
_compiled: dict = {}


def _model(case, device):
    if (case, device) not in _models:
        torch.manual_seed(0)
        _models[(case, device)] = create_model(case, NUM_CLASSES).to(device)
    return _models[(case, device)]


def _batch(cfg, B, device):
    g = torch.Generator().manual_seed(0)
    A, W = 100, cfg.max_title_tokens // 2
    audio_mask = torch.ones(B, A, dtype=torch.bool)
    text_mask = torch.ones(B, W, dtype=torch.bool)
    audio_mask[1::4] = False  # no audio track
    text_mask[2::4] = False  # no title
    batch = {
        "rgb": torch.randn(B, 3, cfg.clip_len, cfg.size, cfg.size, generator=g),
        "motion": torch.randn(B, 2, cfg.clip_len, cfg.size, cfg.size, generator=g),
        "frames": torch.randn(B, cfg.scene_frames, 3, cfg.scene_size, cfg.scene_size, generator=g),
        "audio": torch.randn(B, A, 64, generator=g) * audio_mask.unsqueeze(2),
        "audio_mask": audio_mask,
        "has_audio": audio_mask.any(1),
        "text": torch.randint(1, cfg.vocab_size, (B, W), generator=g) * text_mask,
        "text_mask": text_mask,
        "has_text": text_mask.any(1),
        "label": torch.randint(0, cfg.num_classes, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _forward(impl, case, device, mode):
    """model(batch) for this implementation: the reference backend eagerly or compiled, or a kernel
    backend."""
    model = _model(case, device)
    if impl == "compile":
        key = (case, device, mode)
        if key not in _compiled:
            _compiled[key] = torch.compile(model, dynamic=False)
        fn = _compiled[key]
    else:
        fn = model
    backend = "reference" if impl in ("eager", "compile") else impl

    def forward(batch):
        with mvfast.backend(backend):
            return fn(batch)

    return model, forward


def unavailable_case(device, case, mode, impl):
    """Why this case does not run here (a skip reason), or None."""
    reason = unavailable(IMPLS, device, impl)
    if reason:
        return reason
    if mode in GPU_MODES and device != "cuda":
        return f"{mode} is measured on a GPU only"
    if case == "paper" and mode == "train-b8" and device == "cpu":
        return "the paper preset's training step (~9 TFLOP, >20 GB of activations) is for a GPU"
    return None


def case_step(device, case, mode, impl, batch_size=None):
    """The step one benchmark times and its extra_info; benchmarks/gpu_check.py times the same steps.
    ``batch_size`` overrides the mode's batch (gpu_check's CPU smoke run)."""
    model, forward = _forward(impl, case, device, mode)
    batch = _batch(model.config, batch_size or {**MODES, **GPU_MODES}[mode], device)
    info = dict(op="model", case=case, device=device, mode=mode, impl=impl)

    if mode.startswith("infer"):
        model.eval()

        def step():
            with torch.no_grad():
                forward(batch)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            out = forward(batch)
            model.loss(out, batch["label"]).backward()

    return step, info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", list(MODES) + list(GPU_MODES))
@pytest.mark.parametrize("impl", ["eager", "compile", "cpu", "cuda", "triton"])
def test_model(benchmark, device, case, mode, impl):
    reason = unavailable_case(device, case, mode, impl)
    if reason:
        pytest.skip(reason)
    step, info = case_step(device, case, mode, impl)
    benchmark.group = f"model {case} {device} {mode}"
    rounds = ROUNDS[(case, device)]
    if case == "paper":
        benchmark.extra_info.update(info)
        target = (lambda: (step(), torch.cuda.synchronize())) if device == "cuda" else step
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=1, iterations=1)
    else:
        measure(benchmark, step, device, rounds=rounds, info=info)
