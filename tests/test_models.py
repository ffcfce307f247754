"""The multimodal model: every preset forward and backward, each modality missing, mixed batches, masked
values never reaching the output, backends agreeing, torch.compile without graph breaks, eval determinism,
the paper preset on the meta device, configuration errors and scene weights files."""

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from backend_params import kernel_backends

import mvfast
from mvfast.data import collate
from mvfast.data.config import DataConfig
from mvfast.models import MODALITIES, PRESETS, MicroVideoConfig, MicroVideoNet, create_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(tiny={}, frame2d=dict(scene_frames=3))


def make_batch(cfg: MicroVideoConfig, B=3, *, A=7, W=5, seed=0, mixed=False, drop=()):
    """A batch like mvfast.data.collate's for this config. mixed: sample 1 has no audio, sample 2 no title,
    and sample 0 has padded audio windows and title tokens. drop: keys (and their masks) left out."""
    g = torch.Generator().manual_seed(seed)
    T, S, Fr, s = cfg.clip_len, cfg.size, cfg.scene_frames, cfg.scene_size
    audio_mask = torch.ones(B, A, dtype=torch.bool)
    text_mask = torch.ones(B, W, dtype=torch.bool)
    if mixed:
        audio_mask[0, A - 2 :] = False
        text_mask[0, W - 2 :] = False
        audio_mask[1] = False
        text_mask[min(2, B - 1)] = False
    batch = {
        "rgb": torch.randn(B, 3, T, S, S, generator=g),
        "motion": 3 * torch.randn(B, 2, T, S, S, generator=g),
        "frames": torch.randn(B, Fr, 3, s, s, generator=g),
        "audio": torch.randn(B, A, 64, generator=g) - 2,
        "audio_mask": audio_mask,
        "has_audio": audio_mask.any(1),
        "text": torch.randint(1, cfg.vocab_size, (B, W), generator=g),
        "text_mask": text_mask,
        "has_text": text_mask.any(1),
        "label": torch.randint(0, cfg.num_classes, (B,), generator=g),
        "meta": [{} for _ in range(B)],
        "num_skipped": 0,
    }
    # padding as collate writes it (zeros), which tests then overwrite with garbage
    batch["audio"][~audio_mask] = 0
    batch["text"][~text_mask] = 0
    for key in drop:
        for k in (key, f"{key}_mask", f"has_{key}"):
            batch.pop(k, None)
    return batch


def garbage_in_masked(batch, seed=1):
    """The same batch with large random values wherever the masks say invalid."""
    g = torch.Generator().manual_seed(seed)
    out = dict(batch)
    am, tm = batch["audio_mask"], batch["text_mask"]
    out["audio"] = torch.where(
        am.unsqueeze(2), batch["audio"], 1e4 * torch.randn(batch["audio"].shape, generator=g)
    )
    out["text"] = torch.where(tm, batch["text"], torch.randint(1, 10**9, tm.shape, generator=g))
    return out


def _modality_of(key):
    for m in MODALITIES:
        if key in (m, f"{m}_mask", f"has_{m}"):
            return m
    return None


def model_of(name, num_classes=5, seed=0, **overrides):
    torch.manual_seed(seed)
    return create_model(name, num_classes, **{**SMALL.get(name, {}), **overrides})


def step(model, batch, seed=0):
    """Loss, logits and parameter gradients of one training step, with the dropout masks fixed by seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(batch)
    loss = model.loss(out, batch["label"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out, grads


def float64(model, batch):
    """float64 copies of the model and of the batch's floating-point tensors."""
    batch64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    return copy.deepcopy(model).double(), batch64


def check_out(model, out, B):
    cfg = model.config
    assert out["logits"].shape == (B, cfg.num_classes)
    assert torch.isfinite(out["logits"]).all()
    for name, a in out["aux_logits"].items():
        assert name in ("rgb", "motion") and a.shape == (B, cfg.num_classes)
    if out["attention"] is not None:
        assert out["attention"].shape == (B, cfg.scene_frames, cfg.attention_heads)


# ---------------------------------------------------------------------------------------------------
# Forward and backward


@pytest.mark.parametrize("name", ["tiny", "frame2d"])
@pytest.mark.parametrize("B", [1, 3])
def test_preset_forward_backward(name, B):
    model = model_of(name)
    batch = make_batch(model.config, B)
    loss, out, grads = step(model, batch)
    check_out(model, out, B)
    assert torch.isfinite(loss)
    if name == "tiny":
        assert set(out["aux_logits"]) == {"rgb", "motion"}
        assert out["attention"] is not None
        torch.testing.assert_close(out["attention"].sum(1), torch.ones(B, 1))
    else:
        assert out["aux_logits"] == {} and out["attention"] is None
    # every parameter learns, except the embedding rows of ids absent from the batch (zero gradients), the
    # attention's weights, which get gradient only when the frames differ (they do here), and a conv bias
    # that a BatchNorm follows (the scene VGGs' keep torchvision's): it cancels in training, and a fused
    # block gives it exactly zero gradient where the eager chain gives rounding noise
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in grads]
    assert missing == []
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
    cancelled = {
        id(m.conv.bias)
        for m in model.modules()
        if isinstance(m, (mvfast.nn.Conv2dBNReLU, mvfast.nn.Conv3dBNReLU))
    }
    params = dict(model.named_parameters())
    for n, g in grads.items():
        if id(params[n]) in cancelled:
            assert not g.any(), n
        elif n != "embed.weight":
            assert g.abs().sum() > 0, n


@pytest.mark.parametrize("missing", MODALITIES)
def test_each_modality_missing_from_batch(missing):
    model = model_of("tiny").eval()
    batch = make_batch(model.config, 2, drop=(missing,))
    with torch.no_grad():
        out = model(batch)
    check_out(model, out, 2)
    if missing in ("rgb", "motion"):
        assert set(out["aux_logits"]) == {"rgb", "motion"} - {missing}
    model.train()
    step(model, batch)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_missing_key_equals_masked_for_every_sample(modality):
    """A modality missing from the batch gives what samples without it give: masked, not zero-filled."""
    model = model_of("tiny").eval()
    full = make_batch(model.config, 3)
    masked = dict(full)
    masked[f"{modality}_mask"] = torch.zeros_like(full[f"{modality}_mask"])
    masked[f"has_{modality}"] = torch.zeros(3, dtype=torch.bool)
    dropped = make_batch(model.config, 3, drop=(modality,))
    model, full = float64(model, full)  # two code paths compared: in float64 (see test_backends_agree)
    with torch.no_grad():
        a = model(full)["logits"]
        b = model(float64(model, masked)[1])["logits"]
        c = model(float64(model, dropped)[1])["logits"]
    torch.testing.assert_close(b, c, rtol=0, atol=1e-12)
    assert not torch.allclose(a, b)


def test_missing_frames_masks_attention_and_scene():
    model = model_of("tiny").eval()
    with torch.no_grad():
        out = model(make_batch(model.config, 2, drop=("frames",)))
    assert torch.equal(out["attention"], torch.zeros(2, model.config.scene_frames, 1))


def test_mixed_batch_per_sample():
    """In a mixed batch each sample's logits are what it gets alone, with its absent modality dropped. In
    float64: a batch of 1 and a batch of 3 run the convolutions with other blockings, and float32 rounding
    differences would add up through the deep branches."""
    model, batch = float64(model_of("tiny").eval(), make_batch(model_of("tiny").config, 3, mixed=True))
    with torch.no_grad():
        logits = model(batch)["logits"]
        for i, drop in ((1, "audio"), (2, "text")):
            alone = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for k in (drop, f"{drop}_mask", f"has_{drop}"):
                alone.pop(k)
            torch.testing.assert_close(model(alone)["logits"], logits[i : i + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_masked_values_never_reach_the_output(train):
    model = model_of("tiny").train(train)
    batch = make_batch(model.config, 3, mixed=True)
    loss_a, out_a, grads_a = step(model, batch)
    loss_b, out_b, grads_b = step(model, garbage_in_masked(batch))
    torch.testing.assert_close(out_a["logits"], out_b["logits"], rtol=0, atol=0)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("modalities", [("rgb", "motion"), ("frames",), ("audio", "text"), ("rgb", "frames")])
def test_ablations(modalities):
    model = model_of("tiny", modalities=modalities)
    batch = make_batch(model.config, 2)
    loss, out, grads = step(model, batch)
    check_out(model, out, 2)
    assert (out["attention"] is not None) == ("frames" in modalities)
    # inputs of modalities that are not used are not read: their values change nothing
    model.eval()
    other = make_batch(model.config, 2, seed=7)
    other["audio_mask"][0, 3:] = False
    mixed = {k: (other[k] if _modality_of(k) not in (None, *modalities) else batch[k]) for k in batch}
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], model(mixed)["logits"], rtol=0, atol=0)


def test_collated_samples():
    """The model eats what mvfast.data.collate gives, audio and titles of different lengths or missing."""
    model = model_of("tiny")
    cfg = model.config
    samples = []
    for i, (A, W) in enumerate(((9, 4), (0, 6), (5, 0))):
        s = {
            "rgb": torch.randn(3, cfg.clip_len, cfg.size, cfg.size),
            "motion": torch.randn(2, cfg.clip_len, cfg.size, cfg.size),
            "frames": torch.randn(cfg.scene_frames, 3, cfg.scene_size, cfg.scene_size),
            "audio": torch.randn(max(A, 1), 64),
            "audio_mask": torch.arange(max(A, 1)) < A,
            "text": torch.randint(1, 100, (max(W, 1),)),
            "text_mask": torch.arange(max(W, 1)) < W,
            "label": i,
            "meta": {},
        }
        samples.append(s)
    batch = collate(samples)
    loss, out, _ = step(model, batch)
    check_out(model, out, 3)


def test_loss_is_ce_plus_weighted_aux():
    model = model_of("tiny", aux_weight=0.3)
    batch = make_batch(model.config, 3)
    out = model(batch)
    y = batch["label"]
    expected = F.cross_entropy(out["logits"], y) + 0.3 * (
        F.cross_entropy(out["aux_logits"]["rgb"], y) + F.cross_entropy(out["aux_logits"]["motion"], y)
    )
    torch.testing.assert_close(model.loss(out, y), expected)


def test_multi_label_loss_smoothing_and_class_weights():
    """multi_label: BCE with logits against multi-hot labels for the classifier and the behaviour heads,
    written out by hand here; label smoothing and class weights as documented on the config."""
    w = (1.0, 2.0, 0.5, 1.0, 3.0)
    model = model_of("tiny", aux_weight=0.3, multi_label=True, label_smoothing=0.2, class_weights=w)
    batch = make_batch(model.config, 3)
    out = model(batch)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)

    def bce(logits):
        t = y * 0.8 + 0.1  # each binary target 0.2 / 2 towards 1/2
        pos = torch.tensor(w)
        per = -(pos * t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits))
        return per.mean()

    expected = bce(out["logits"]) + 0.3 * (bce(out["aux_logits"]["rgb"]) + bce(out["aux_logits"]["motion"]))
    torch.testing.assert_close(model.loss(out, y), expected)
    single = model_of("tiny", label_smoothing=0.1, class_weights=w)
    out = single(batch)
    labels = batch["label"]
    want = F.cross_entropy(out["logits"], labels, weight=torch.tensor(w), label_smoothing=0.1)
    torch.testing.assert_close(single._loss(out["logits"], labels), want)
    with pytest.raises(ValueError, match="class_weights: expected 5 numbers"):
        model_of("tiny", class_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        model_of("tiny", label_smoothing=1.0)


def test_behaviour_classes_other_than_video_classes():
    model = model_of("tiny", num_behaviours=4, num_scenes=3)
    batch = make_batch(model.config, 2)
    _, out, _ = step(model, batch)
    check_out(model, out, 2)
    assert model.feature_dims()["joint"] == 4 * 3


# ---------------------------------------------------------------------------------------------------
# Backends, compile, determinism


@pytest.mark.parametrize("backend", [p for p in kernel_backends() if p.id == "cpu"])
def test_backends_agree(backend):
    """The kernel backend against the reference backend on the same model. Gradients are compared in
    float64: in float32 a ReLU or max-pooling decision within rounding of a tie goes either way, sending a
    gradient down another path (with channels-last layers the float32 reference itself strays from float64
    by percents on a few deep VGG weights), so a float32 comparison of gradients measures luck. Logits are
    also compared in float32, against float64."""
    name, _ = backend
    model = model_of("tiny", dropout=0.0, branch_dropout=0.0)  # no dropout masks to keep in step
    batch = make_batch(model.config, 3, mixed=True)
    model64, batch64 = float64(model, batch)
    with mvfast.backend("reference"):
        _, out_r, grads_r = step(model64, batch64)
    with mvfast.backend(name):
        _, out_k, grads_k = step(model64, batch64)
        _, out_32, _ = step(model, batch)
    torch.testing.assert_close(out_k["logits"], out_r["logits"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_k["attention"], out_r["attention"], rtol=1e-9, atol=1e-10)
    assert grads_k.keys() == grads_r.keys()
    for n in grads_r:
        torch.testing.assert_close(grads_k[n], grads_r[n], rtol=1e-7, atol=1e-9, msg=n)
    torch.testing.assert_close(out_32["logits"].double(), out_r["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_32["attention"].double(), out_r["attention"], rtol=1e-4, atol=1e-6)


def test_eval_is_deterministic():
    model = model_of("tiny").eval()
    batch = make_batch(model.config, 2)
    with torch.no_grad():
        a = model(batch)
        torch.manual_seed(123)  # the RNG state must not matter in eval
        b = model(batch)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["attention"], b["attention"])


@pytest.mark.parametrize("name", ["tiny", "frame2d"])
def test_return_features(name):
    # The embedding is the classifier's input: the classifier of it gives the logits (dropout is off in
    # eval), and the parts are those it is concatenated from.
    model = model_of(name).eval()
    B = 3
    batch = make_batch(model.config, B, mixed=True)
    with torch.no_grad():
        plain = model(batch)
        out = model(batch, return_features=True)
    assert torch.equal(plain["logits"], out["logits"]) and "features" not in plain
    f = out["features"]
    if name == "frame2d":
        assert set(f) == {"embedding"} and f["embedding"].shape == (B, model.frame2d.hidden)
        logits = model.frame2d.classifier[-1](f["embedding"])
        torch.testing.assert_close(logits, out["logits"], rtol=1e-5, atol=1e-5)
        return
    cfg = model.config
    assert f["embedding"].shape == (B, sum(model.feature_dims().values()))
    torch.testing.assert_close(model.classifier(f["embedding"]), out["logits"], rtol=1e-5, atol=1e-5)
    parts = torch.cat([model.norms[k](f[k]) for k in model.feature_dims()], dim=1)
    torch.testing.assert_close(parts, f["embedding"])
    assert f["behaviour"].shape == (B, cfg.behaviours) and f["scene"].shape == (B, cfg.num_scenes)
    assert f["frames_vlad"].shape == (B, cfg.frame_clusters * cfg.frame_dim)
    assert f["attention_weights"] is out["attention"]
    assert {"audio_vlad", "text_vlad", "attention", "joint"} <= set(f)


@pytest.mark.slow
def test_compile_fullgraph():
    model = model_of("tiny")
    batch = make_batch(model.config, 2, mixed=True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    model.eval()
    model64, batch64 = float64(model, batch)
    with torch.no_grad():
        # Inductor's code and eager's round differently: each is compared with float64, not with the other
        want = model64(batch64)
        comp = compiled(batch)
    torch.testing.assert_close(comp["logits"].double(), want["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(comp["attention"].double(), want["attention"], rtol=1e-4, atol=1e-6)
    # training: forward and backward through the compiled graph, no graph break
    model.train()
    out = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(batch)
    model.loss(out, batch["label"]).backward()
    assert model.classifier.weight.grad is not None


# ---------------------------------------------------------------------------------------------------
# The paper preset (meta device: shapes and parameter counts without allocating 1.7 GB)


def _meta_model(name, num_classes=101, **overrides):
    with torch.device("meta"):
        return MicroVideoNet(mvfast.models.preset_config(name, num_classes, **overrides))


def test_paper_preset_on_meta():
    model = _meta_model("paper")
    cfg = model.config
    assert (cfg.clip_len, cfg.size, cfg.scene_size, cfg.frame_clusters) == (16, 112, 224, 64)
    batch = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in make_batch(cfg, 1).items()}
    with mvfast.backend("reference"):
        out = model.eval()(batch)
    assert out["logits"].shape == (1, 101) and out["attention"].shape == (1, 8, 1)
    assert set(out["aux_logits"]) == {"rgb", "motion"}


def test_a_fresh_process_builds_the_model_on_meta():
    """The first import of torchvision, made by the scene VGG's constructor, inside the user's
    ``torch.device("meta")`` (torch 2.6 cannot import torch._dynamo there, pytorch/pytorch#153330)."""
    code = (
        "import sys, torch, mvfast\n"
        "assert 'torchvision' not in sys.modules\n"
        "with torch.device('meta'):\n"
        "    model = mvfast.models.create_model('paper', 101)\n"
        "assert {p.device.type for p in model.parameters()} == {'meta'}\n"
        "assert torch.empty(1).device.type == 'cpu'\n"
        "print(sum(p.numel() for p in model.parameters()))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == sum(p.numel() for p in _meta_model("paper").parameters())


def test_paper_scene_nets_are_torchvision_vgg():
    import torchvision

    model = _meta_model("paper")
    for net, ctor in zip(model.scene, (torchvision.models.vgg16, torchvision.models.vgg19), strict=True):
        with torch.device("meta"):
            ref = ctor(weights=None, num_classes=model.config.num_scenes)
        mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        assert mine == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_paper_behaviour_net_is_c3d_size():
    model = _meta_model("paper")
    net = model.behaviour["rgb"]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)] == [4096, 4096, 101]
    # C3D has 27.7 M convolution and 50.3 M fc6/fc7 parameters
    n = sum(p.numel() for p in net.parameters())
    assert 77e6 < n < 79e6


# ---------------------------------------------------------------------------------------------------
# Configuration


def test_create_model_errors():
    with pytest.raises(ValueError, match="tiny.*paper.*frame2d|presets"):
        create_model("huge", 10)
    with pytest.raises(ValueError, match="'widht'"):
        create_model("tiny", 10, widht=3)
    with pytest.raises(ValueError, match="modalities"):
        create_model("tiny", 10, modalities=("rgb", "smell"))
    with pytest.raises(ValueError, match="modalities"):
        create_model("tiny", 10, modalities=())
    with pytest.raises(ValueError, match="frame2d"):
        create_model("frame2d", 10, modalities=("frames", "audio"))
    with pytest.raises(ValueError, match="behaviour_layers"):
        create_model("tiny", 10, behaviour_layers=(8, "M", 8, "M", 8, "M", 8, "M"))
    with pytest.raises(ValueError, match="dropout"):
        create_model("tiny", 10, dropout=1.0)
    assert PRESETS == ("tiny", "paper", "frame2d")


def test_overrides_and_data_config():
    model = model_of("tiny", num_classes=7, dropout=0.25, modalities=["rgb", "motion"])
    cfg = model.config
    assert cfg.num_classes == 7 and cfg.dropout == 0.25 and cfg.modalities == ("rgb", "motion")
    assert model.dropout.p == 0.25
    data = cfg.data_config()
    assert (data.clip_len, data.size, data.scene_frames, data.scene_size) == (8, 64, 4, 64)
    assert data.resize >= data.size and data.max_title_tokens == cfg.max_title_tokens
    base = DataConfig(fps=25.0, test_clips=5)
    data = cfg.data_config(base)
    assert data.fps == 25.0 and data.test_clips == 5 and data.clip_len == 8
    paper = mvfast.models.preset_config("paper", 101).data_config()
    assert paper.resize >= 224 and paper.size == 112 and paper.clip_len == 16
    assert dataclasses.replace(cfg, dropout=0.1).dropout == 0.1


def test_scene_weights_file(tmp_path):
    donor = model_of("tiny", seed=1)
    paths = []
    for i, net in enumerate(donor.scene):
        paths.append(tmp_path / f"vgg{i}.pt")
        torch.save(net.state_dict(), paths[-1])
    model = model_of("tiny", seed=2, scene_weights=(str(paths[0]), None))
    for k, v in donor.scene[0].state_dict().items():
        assert torch.equal(model.scene[0].state_dict()[k], v)
    key = "features.0.weight"  # by state_dict key: features[0] is a fused Conv2dBNReLU in this model
    assert not torch.equal(model.scene[1].state_dict()[key], donor.scene[1].state_dict()[key])
    with pytest.raises(ValueError, match="num_scenes"):
        model_of("tiny", num_scenes=5, scene_weights=(str(paths[0]), None))


@pytest.mark.skipif(not hasattr(mvfast, "fuse"), reason="mvfast.fuse is not in this tree yet (issue 4)")
def test_fused_model_keeps_outputs_and_state_dict():
    torch.manual_seed(0)
    plain = MicroVideoNet(mvfast.models.preset_config("tiny", 5))
    fused = model_of("tiny")
    assert plain.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    batch = make_batch(plain.config, 2)
    plain.eval(), fused.eval()
    (plain64, batch64), fused64 = float64(plain, batch), copy.deepcopy(fused).double()
    with torch.no_grad():
        want = plain64(batch64)["logits"]
        torch.testing.assert_close(fused64(batch64)["logits"], want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused(batch)["logits"].double(), want, rtol=1e-4, atol=1e-5)


def _by_state_dict_key(model, grads):
    params = dict(model.named_parameters())
    key = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    return {key[id(params[n])]: g for n, g in grads.items()}


def test_fused_model_trains_as_the_plain_model():
    """A training step of the fused model against the plain one, in float64 (a float32 comparison of two
    whole networks through ReLUs and max-pools measures rounding luck, see test_backends_agree): loss,
    every gradient and every running statistic. The blocks' float32 accuracy is checked per block in
    tests/test_fuse.py and per op in the op tests."""
    torch.manual_seed(0)
    plain = MicroVideoNet(mvfast.models.preset_config("tiny", 5, dropout=0.0, branch_dropout=0.0))
    fused = model_of("tiny", dropout=0.0, branch_dropout=0.0)
    fused.load_state_dict(plain.state_dict())
    plain64, batch64 = float64(plain, make_batch(plain.config, 3, mixed=True))
    fused64 = copy.deepcopy(fused).double()
    loss_p, _, grads_p = step(plain64, batch64)
    loss_f, _, grads_f = step(fused64, batch64)
    # by state_dict key, which fusing keeps (the parameters' own names gain the blocks' ".0" / ".1")
    grads_p, grads_f = (_by_state_dict_key(m, g) for m, g in ((plain64, grads_p), (fused64, grads_f)))
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_p.keys()
    for n, g in grads_p.items():
        # a conv bias before a BatchNorm: exactly zero fused, rounding noise around zero eager
        torch.testing.assert_close(
            grads_f[n], g, rtol=1e-8, atol=1e-10 * max(g.abs().max().item(), 1.0), msg=n
        )
    sp, sf = plain64.state_dict(), fused64.state_dict()
    for k in sp:
        if "running" in k or "num_batches" in k:
            torch.testing.assert_close(sf[k], sp[k], rtol=1e-10, atol=1e-12, msg=k)


def test_info_reports_parameter_counts():
    from mvfast.info import model_report

    text = model_report()
    for name in PRESETS:
        assert name in text


def test_empty_batch():
    """A batch in which every file failed (collate gives B = 0 and no inputs) gives no logits, no error."""
    model = model_of("tiny").eval()
    with torch.no_grad():
        out = model({"label": torch.zeros(0, dtype=torch.long), "meta": [], "num_skipped": 2})
    assert out["logits"].shape == (0, 5)


def test_autocast():
    """Under autocast (here the CPU's bfloat16) the half-precision features meet float32 NetVLAD and
    attention parameters; the model casts them, and the logits stay close to float32's."""
    model = model_of("tiny").eval()
    batch = make_batch(model.config, 2)
    with torch.no_grad():
        ref = model(batch)["logits"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
    assert out["logits"].shape == ref.shape and torch.isfinite(out["logits"]).all()
    assert (out["logits"].float() - ref).abs().max() < 0.25 * ref.abs().max() + 0.1
