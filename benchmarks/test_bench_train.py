"""End to end: the tiny preset's training step (clips/s) and per-video inference latency, with decoding
included and excluded, on mvfast's kernels against the reference backend (eager PyTorch), in one run.

    pytest benchmarks/test_bench_train.py --benchmark-only

The videos are a small synthetic set generated into a temporary folder (real H.264 + AAC files).
"""

import pytest
import torch
from benchutil import BARS, GPU, measure

import mvfast
from mvfast._inference import predict_file, prepare
from mvfast.data import SyntheticMicroVideos, collate
from mvfast.data.samplers import SeededClips
from mvfast.models import create_model

BATCH = 8
DEVICES = ["cpu"] + (["cuda"] if GPU else [])
IMPLS = {"cpu": ["eager", "cpu"], "cuda": ["eager", "cuda", "triton"]}
ROUNDS = {"cpu": 5, "cuda": 20}
CASE = f"tiny-B{BATCH}"

for _mode in ("train step", "infer", "infer+decode"):
    BARS.append(dict(op="e2e", case=CASE, device="cpu", mode=_mode, impl="cpu", base="eager", at_least=1.0))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-synthetic")
    cfg = create_model("tiny", 4).config.data_config()
    opts = dict(num_classes=4, videos_per_class=3, size=96, seconds=2.0, config=cfg, cache=root / "cache")
    train = SyntheticMicroVideos(root, train=True, **opts)
    batch = collate([SeededClips(train, 0)[i % len(train)] for i in range(BATCH)])
    return cfg, train, batch


def _backend(impl):
    return "reference" if impl == "eager" else impl


def _step(data, device, impl, mode):
    """One timed step of ``mode`` with the tiny model (seeded: the same weights for every impl)."""
    cfg, train, batch = data
    torch.manual_seed(0)
    model = create_model("tiny", len(train.classes)).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    if mode == "train step":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            with mvfast.backend(_backend(impl)):
                loss = model.loss(model(batch), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    elif mode == "infer":
        # one video: its test clips, prepared (decoded) beforehand
        model.eval()
        clips, _ = prepare(train.items[0].path, cfg, train.items[0].title)
        clips = {k: v.to(device) if torch.is_tensor(v) else v for k, v in clips.items()}

        def step():
            with torch.no_grad(), mvfast.backend(_backend(impl)):
                model(clips)
    else:
        model.eval()
        item = train.items[0]

        def step():
            with mvfast.backend(_backend(impl)):
                predict_file(model, item.path, cfg, torch.device(device), item.title)

    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["train step", "infer", "infer+decode"])
def test_model(benchmark, data, device, impl, mode):
    if impl not in IMPLS[device]:
        pytest.skip(f"{impl} does not run on {device}")
    if impl != "eager" and not mvfast.backends(device)[impl]["available"]:
        pytest.skip(f"{impl}: {mvfast.backends(device)[impl]['reason']}")
    cfg = data[0]
    benchmark.group = f"e2e {CASE} {device} {mode}"
    info = dict(op="e2e", case=CASE, device=device, mode=mode, impl=impl)
    step = _step(data, device, impl, mode)
    against = {} if impl == "eager" else {"eager": _step(data, device, "eager", mode)}
    measure(benchmark, step, device, rounds=ROUNDS[device], info=info, against=against)
    if benchmark.stats is None:  # --benchmark-disable: one pass, nothing timed
        return
    median = benchmark.stats.stats.median
    if mode == "train step":
        benchmark.extra_info["clips_per_s"] = BATCH / median
    else:
        benchmark.extra_info["ms_per_video"] = median * 1e3
        benchmark.extra_info["clips_per_video"] = cfg.test_clips
