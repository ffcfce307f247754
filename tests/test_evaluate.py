"""python -m mvfast.evaluate and python -m mvfast.predict on a checkpoint of a short training run (shared with
tests/test_train.py), on the run's own data and on real-world files in ../shared/videos."""

import csv
import json
from pathlib import Path

import pytest
import torch
from _toy_model import run_cli, trained_run, use

import mvfast.evaluate
import mvfast.predict

REAL_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture()
def toy(monkeypatch, run):
    # in-process calls: the stand-in model and the run's cache folder
    monkeypatch.setenv("MVFAST_CACHE", str(run[1]))
    use(monkeypatch)


def synthetic_videos(run):
    return sorted((Path(run[1]) / "synthetic").glob("v*-c3-*/videos/*/*.mp4"))


def test_evaluate_writes_metrics_and_confusion(run, toy, tmp_path, capsys):
    out = tmp_path / "eval"
    assert mvfast.evaluate.main([str(run[0] / "best.pt"), "--out", str(out), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| top-1 |" in printed and "| mean class accuracy |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    # 3 validation videos x 2 test clips
    assert metrics["clip"]["count"] == 6 and metrics["video"]["count"] == 3
    for level in ("clip", "video"):
        for key in ("precision", "recall", "top1", "top5", "mean_class_accuracy", "loss"):
            assert 0 <= metrics[level][key] <= max(1, metrics[level]["loss"]), (level, key)
    rows = list(csv.reader(open(out / "confusion.csv")))
    assert len(rows) == 4 and len(rows[0]) == 4
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 3  # one count per video
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    # the run's own last validation, recomputed from the checkpoint, agrees
    last = list(csv.DictReader(open(run[0] / "metrics.csv")))[-1]
    ckpt = torch.load(run[0] / "last.pt", weights_only=True)
    assert mvfast.evaluate.main([str(run[0] / "last.pt"), "--out", str(out / "last"), "--workers", "0"]) == 0
    again = json.loads((out / "last" / "metrics.json").read_text())
    assert again["video"]["top1"] == pytest.approx(float(last["val_top1"]), abs=1e-5)
    assert again["clip"]["loss"] == pytest.approx(float(last["val_loss"]), rel=1e-4)
    assert ckpt["step"] == int(last["step"])


def test_evaluate_on_the_training_split_and_more_clips(run, toy, tmp_path):
    out = tmp_path / "train-split"
    args = [str(run[0]), "--on", "train", "--test-clips", "3", "--out", str(out), "--workers", "0"]
    assert mvfast.evaluate.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["video"]["count"] == 6 and metrics["clip"]["count"] == 18 and metrics["split"] == "train"


def test_predict_text_and_json(run, toy, capsys):
    videos = synthetic_videos(run)[:2]
    assert mvfast.predict.main([str(run[0] / "best.pt"), *map(str, videos), "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("decode") == 2 and "key frames (attention)" in text
    assert mvfast.predict.main([str(run[0] / "best.pt"), *map(str, videos), "--json", "--top-k", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["predictions"]) == 2
    classes = torch.load(run[0] / "best.pt", weights_only=True)["classes"]
    for p in result["predictions"]:
        probs = [t["prob"] for t in p["top"]]
        assert (
            len(probs) == 3
            and probs == sorted(probs, reverse=True)
            and sum(probs) == pytest.approx(1, abs=1e-4)
        )
        assert {t["label"] for t in p["top"]} == set(classes)
        assert p["decode_ms"] > 0 and p["model_ms"] > 0
        frames = p["key_frames"]
        assert len(frames) == 2 and sum(f["weight"] for f in frames) == pytest.approx(1, abs=1e-3)
        assert frames[0]["weight"] >= frames[1]["weight"] and 0 <= frames[0]["seconds"] <= 1.0


def test_predict_real_world_files(run, toy, capsys):
    if not REAL_VIDEOS.is_dir():
        pytest.skip(f"no real test videos at {REAL_VIDEOS}")
    files = sorted(p for p in REAL_VIDEOS.iterdir() if p.suffix in (".mp4", ".avi", ".mkv"))
    assert mvfast.predict.main([str(run[0] / "best.pt"), *map(str, files), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["video"] for p in result["predictions"]] == list(map(str, files))
    assert all("top" in p and p["key_frames"][-1]["seconds"] > 1.0 for p in result["predictions"])


def test_evaluate_on_real_world_files_as_a_csv(run, toy, tmp_path):
    if not REAL_VIDEOS.is_dir():
        pytest.skip(f"no real test videos at {REAL_VIDEOS}")
    files = sorted(p for p in REAL_VIDEOS.iterdir() if p.suffix in (".mp4", ".avi", ".mkv"))
    manifest = tmp_path / "real.csv"
    classes = torch.load(run[0] / "best.pt", weights_only=True)["classes"]
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "title", "split"])
        for i, p in enumerate(files):
            w.writerow([p, classes[i % 3], "a real video", "test"])
        w.writerow([files[0], classes[0], "", "train"])
    out = tmp_path / "real-eval"
    args = [str(run[0] / "best.pt"), "--data", "csv", "--data-root", str(manifest), "--out", str(out)]
    assert mvfast.evaluate.main([*args, "--workers", "0", "--no-cache"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["video"]["count"] == len(files) and metrics["clip"]["count"] == 2 * len(files)


def test_predict_skips_a_broken_file_and_reports_user_errors(run, toy, tmp_path, capsys):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 50)
    good = synthetic_videos(run)[0]
    # One file failed: exit 1 (issue 14), or 0 with --allow-failures; the output is the same.
    assert mvfast.predict.main([str(run[0]), str(broken), str(good), "--json"]) == 1
    capsys.readouterr()
    assert mvfast.predict.main([str(run[0]), str(broken), str(good), "--json", "--allow-failures"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "error" in result["predictions"][0] and "top" in result["predictions"][1]
    assert [p["status"] for p in result["predictions"]] == ["failed", "ok"]
    assert mvfast.predict.main([str(run[0]), str(broken)]) == 2
    assert "none of the 1 videos could be decoded" in capsys.readouterr().err
    assert mvfast.predict.main([str(run[0]), str(tmp_path / "nope.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert mvfast.predict.main([str(bad), str(good)]) == 2
    assert "not a valid checkpoint" in capsys.readouterr().err
    assert mvfast.evaluate.main([str(bad)]) == 2
    assert "not a valid checkpoint" in capsys.readouterr().err
    assert mvfast.evaluate.main([str(run[0]), "--data", "folder", "--data-root", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_subprocesses(run, tmp_path):
    # as a user runs them: one line on stderr for a mistake, exit 0 and output otherwise
    env = {"MVFAST_CACHE": str(run[1])}
    proc = run_cli("mvfast.predict", run[0] / "best.pt", synthetic_videos(run)[0], env=env)
    assert proc.returncode == 0 and "key frames" in proc.stdout, proc.stderr
    proc = run_cli("mvfast.evaluate", tmp_path / "missing.pt", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"mvfast.evaluate: error: checkpoint {str(tmp_path / 'missing.pt')!r} does not exist"
    )
