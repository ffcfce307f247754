"""Fine-tuning and the training options, through python -m mvfast.train as a user runs it (the stand-in model
of tests/_toy_model.py): --init-from with new classes, --freeze, --lr-mult; multi-label data with class
weights and label smoothing, evaluated and predicted; --accumulate, --ema, --optimizer sgd, --patience;
SyncBatchNorm's conversion of the fused blocks."""

import csv
import json
from pathlib import Path

import pytest
import torch
from _toy_model import TINY_DATA, run_cli, trained_run, use

import mvfast.evaluate
import mvfast.predict

pytestmark = pytest.mark.slow

QUICK = ["--no-progress", "--workers", "0", "--inference-videos", "0", "--batch-size", "2"]
DATA_OPTS = ["--resize", "32", "--test-clips", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture()
def env(run):
    return {"MVFAST_CACHE": str(run[1])}


def videos(run) -> list[Path]:
    return sorted((Path(run[1]) / "synthetic").glob("v*-c3-*/videos/*/*.mp4"))


def manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def two_class_csv(run, tmp_path) -> Path:
    """The synthetic videos of two of the three classes, renamed: new classes for fine-tuning."""
    rows = []
    for i, v in enumerate(
        p for p in videos(run) if p.parent.name != sorted({q.parent.name for q in videos(run)})[2]
    ):
        rows.append({"path": v, "label": f"new-{v.parent.name}", "split": "test" if i % 3 == 2 else "train"})
    return manifest(tmp_path / "two.csv", rows)


def weights(path, key="model"):
    return torch.load(path, weights_only=True)[key]


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, line


def test_init_from_new_classes_with_frozen_parts_and_lr_mult(run, tmp_path, env):
    source = run[0] / "best.pt"
    out = tmp_path / "ft"
    proc = run_cli(
        "mvfast.train", "--data", "csv", "--data-root", two_class_csv(run, tmp_path), *DATA_OPTS, *QUICK,
        "--init-from", source, "--freeze", "rgb,frame_conv", "--lr-mult", "motion=0.1", "--steps", "2",
        "--warmup-steps", "0", "--out", out, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = proc.stdout
    assert f"--init-from {source}: preset tiny, 3 classes -> 2; loaded" in log, log
    reinit = next(line for line in log.splitlines() if "re-initialised for the new classes" in line)
    heads = ("classifier.weight", "classifier.bias", "rgb.head.weight", "motion.head.bias")
    assert all(k in reinit for k in heads) and "conv" not in reinit, reinit
    assert "classifier.weight ((3, 40) in the checkpoint, (2, 40) here)" in reinit, reinit
    assert "warning: --freeze keeps 2 freshly initialised tensors" in log  # rgb.head is frozen too
    old, new = weights(source), weights(out / "last.pt")
    for k in old:
        if k.startswith(("rgb.", "frame_conv.")) and not k.startswith("rgb.head."):
            assert torch.equal(new[k], old[k]), k  # frozen: weights and BatchNorm statistics as loaded
    assert not torch.equal(new["motion.conv.weight"], old["motion.conv.weight"])  # trained
    assert new["classifier.weight"].shape[0] == 2
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["history"]) == 1  # a new run from step 0, not a resume
    lrs = {g.get("lr_mult", 1.0): g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0]) and lrs[1.0] > 0


def test_init_from_another_preset_or_bad_parts(run, tmp_path, env):
    base = ["mvfast.train", *TINY_DATA, *QUICK, "--steps", "1", "--out", tmp_path / "x"]
    proc = run_cli(*base, "--init-from", run[0] / "best.pt", "--preset", "paper", env=env)
    assert_user_error(proc, "preset 'tiny'", "preset 'paper'", "differ in shape", "rgb.conv.weight")
    proc = run_cli(*base, "--freeze", "scene_net", env=env)
    assert_user_error(proc, "--freeze", "scene_net", "its parts are rgb, motion")
    proc = run_cli(*base, "--lr-mult", "rgb=fast", env=env)
    assert_user_error(proc, "--lr-mult rgb", "number")
    proc = run_cli(*base, "--resume", "--init-from", run[0] / "best.pt", env=env)
    assert_user_error(proc, "--resume", "--init-from")
    proc = run_cli(*base, "--optimizer", "adam", env=env)
    assert_user_error(proc, "--optimizer", "adamw, sgd")


@pytest.fixture(scope="module")
def multi_label_run(run, tmp_path_factory):
    """A multi-label run on the synthetic videos: each has its class and, every other one, "bright"."""
    root = tmp_path_factory.mktemp("multi")
    rows = []
    for i, v in enumerate(videos(run)):
        labels = v.parent.name + ("|bright" if i % 2 == 0 else "")
        rows.append({"path": v, "label": labels, "split": "test" if i % 3 == 2 else "train"})
    data = manifest(root / "tags.csv", rows)
    out = root / "run"
    proc = run_cli(
        "mvfast.train", "--data", "csv", "--data-root", data, *DATA_OPTS, *QUICK, "--multi-label",
        "--class-weights", "auto", "--label-smoothing", "0.1", "--epochs", "2", "--out", out,
        env={"MVFAST_CACHE": str(run[1])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, data, proc


def test_multi_label_training(multi_label_run):
    out, _, proc = multi_label_run
    assert "val loss" in proc.stdout and "mAP" in proc.stdout and "class weights (auto)" in proc.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    for key in ("val_map", "val_micro_f1", "val_macro_f1", "val_clip_map", "train_micro_f1"):
        assert 0 <= float(rows[-1][key]) <= 1, key
    summary = json.loads((out / "summary.json").read_text())
    assert "map" in summary["val"] and "best_val_map" in summary and "| mAP |" in proc.stdout
    spec = torch.load(out / "best.pt", weights_only=True)["model_spec"]["overrides"]
    assert spec["multi_label"] is True and spec["label_smoothing"] == 0.1
    # 4 classes (3 + bright), 6 training videos: bright on 3 of them -> pos_weight (6 - 3) / 3 = 1; the
    # others on 2 -> 2
    assert sorted(spec["class_weights"]) == [1.0, 2.0, 2.0, 2.0]


def test_multi_label_evaluate_and_predict(run, multi_label_run, tmp_path, monkeypatch, capsys):
    out, _, _ = multi_label_run
    monkeypatch.setenv("MVFAST_CACHE", str(run[1]))
    use(monkeypatch)
    target = tmp_path / "eval"
    args = [str(out / "best.pt"), "--out", str(target), "--workers", "0", "--threshold", "0.3"]
    assert mvfast.evaluate.main(args) == 0
    printed = capsys.readouterr().out
    assert "| mAP |" in printed and "| macro F1 |" in printed
    metrics = json.loads((target / "metrics.json").read_text())
    assert metrics["threshold"] == 0.3 and metrics["video"]["count"] == 3
    assert len(metrics["video"]["per_class"]["ap"]) == 4 and "bright" in metrics["classes"]
    per_class = list(csv.DictReader(open(target / "per_class.csv")))
    assert [r["class"] for r in per_class] == metrics["classes"]
    predictions = list(csv.DictReader(open(target / "predictions.csv")))
    assert len(predictions) == 3
    for row in predictions:
        predicted = [c for c in row["predicted (score >= 0.3)"].split("|") if c]
        assert predicted == sorted(
            (c for c in metrics["classes"] if float(row[c]) >= 0.3), key=lambda c: -float(row[c])
        )
        assert row["labels"]  # every validation video has its class
    video = predictions[0]["path"]
    assert mvfast.predict.main([str(out / "best.pt"), video, "--json", "--threshold", "0.4"]) == 0
    result = json.loads(capsys.readouterr().out)["predictions"][0]
    scores = {t["label"]: t["prob"] for t in result["top"]}
    assert result["labels"] == sorted((c for c, p in scores.items() if p >= 0.4), key=lambda c: -scores[c])


def test_accumulate_and_ema(run, tmp_path, env):
    out = tmp_path / "ema"
    proc = run_cli(
        "mvfast.train", *TINY_DATA, *QUICK, "--accumulate", "2", "--ema", "--ema-decay", "0.5",
        "--epochs", "1", "--out", out, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 accumulated" in proc.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    # 6 training videos, batch 2: 3 batches, so 2 optimizer steps (of 2 batches and of 1)
    assert ckpt["step"] == 2 and int(ckpt["ema"]["n_averaged"]) == 2
    ema = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    best = weights(out / "best.pt")
    assert best.keys() == ckpt["model"].keys()
    for k, v in best.items():
        assert torch.equal(v, ema[k]), k  # best.pt holds the average, last.pt both
    assert not torch.equal(ema["classifier.weight"], ckpt["model"]["classifier.weight"])


def test_sgd_and_early_stopping(run, tmp_path, env):
    out = tmp_path / "stop"
    # a learning rate so small that validation cannot improve after the first epoch: patience 1 stops at 2
    proc = run_cli(
        "mvfast.train", *TINY_DATA, *QUICK, "--optimizer", "sgd", "--lr", "1e-12", "--min-lr", "1e-13",
        "--patience", "1", "--epochs", "6", "--out", out, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "early stop: validation top1 has not improved for 1 validations" in proc.stdout, proc.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["early_stopped"]
    assert "momentum_buffer" in next(iter(ckpt["optimizer"]["state"].values()))  # SGD with momentum
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped"] and summary["epochs"] == 2
    again = run_cli("mvfast.train", "--out", out, "--resume", env=env)  # an early-stopped run stays stopped
    assert again.returncode == 0 and torch.load(out / "last.pt", weights_only=True)["step"] == 6, again.stderr


def test_accumulated_gradients_equal_one_batch(run, tmp_path, env):
    """Two batches of one, accumulated, make the step one batch of two makes (no BatchNorm, no dropout: the
    audio and title parts of the stand-in model)."""
    common = [*TINY_DATA, "--no-progress", "--workers", "0", "--inference-videos", "0", "--steps", "1"]
    common += ["--modalities", "audio,text", "--dropout", "0", "--warmup-steps", "0", "--optimizer", "sgd"]
    whole = run_cli("mvfast.train", *common, "--batch-size", "2", "--out", tmp_path / "a", env=env)
    parts = run_cli(
        "mvfast.train", *common, "--batch-size", "1", "--accumulate", "2", "--out", tmp_path / "b", env=env
    )
    assert whole.returncode == 0 and parts.returncode == 0, whole.stderr + parts.stderr
    a, b = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    from _toy_model import create_model

    torch.manual_seed(0)  # the run's seed: its initial weights
    start = create_model("tiny", 3, modalities=("audio", "text"), dropout=0.0).state_dict()
    assert not torch.equal(a["classifier.weight"], start["classifier.weight"])  # the step did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_sync_batchnorm_unfuses_the_fused_blocks():
    """The fused Conv+BN+ReLU blocks compute batch statistics inside their op: SyncBatchNorm needs them
    unfused, with the same parameters and state_dict keys."""
    from mvfast._optim import sync_batchnorm
    from mvfast.models import create_model
    from mvfast.nn._conv_bn_relu import ConvBNReLU

    model = create_model("tiny", 4)
    keys = list(model.state_dict())
    params = {id(p) for p in model.parameters()}
    fused = sum(isinstance(m, ConvBNReLU) for m in model.modules())
    assert fused > 0
    n = sync_batchnorm(model)
    assert n >= fused and not any(isinstance(m, ConvBNReLU) for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == n
    assert not any(type(m) in (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d) for m in model.modules())
    assert list(model.state_dict()) == keys and {id(p) for p in model.parameters()} == params
