"""python -m mvfast.predict and python -m mvfast.extract over files, folders and manifests: output files,
status per file, exit codes, resuming, timelines, and 2 ranks under torchrun (gloo), on a checkpoint of the
short training run that tests/test_train.py shares, with the stand-in model."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from _toy_model import TOY, run_cli, trained_run, use

import mvfast.extract
import mvfast.predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture()
def toy(monkeypatch, run):
    monkeypatch.setenv("MVFAST_CACHE", str(run[1]))
    use(monkeypatch)


@pytest.fixture(scope="module")
def videos(run):
    return sorted((Path(run[1]) / "synthetic").glob("v*-c3-*/videos/*/*.mp4"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, videos):
    """Four good videos in two sub-folders, and a file that is no video by its name (skipped)."""
    root = tmp_path_factory.mktemp("folder")
    for i, v in enumerate(videos[:4]):
        target = root / f"part{i % 2}" / f"v{i}.mp4"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(v, target)
    (root / "notes.txt").write_text("not a video")
    return root


def cut_short(path: Path, frames: int = 30) -> Path:
    """An MP4 with its index first (faststart), cut in half: it decodes some frames, then FFmpeg complains."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width = vs.height = 64
        vs.pix_fmt = "yuv420p"
        for f in rng.integers(0, 255, (frames, 64, 64, 3)).astype(np.uint8):
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ckpt(run):
    return str(run[0] / "best.pt")


def test_folder_and_manifests_to_jsonl_and_csv(run, toy, folder, videos, tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "path", "title"])
        w.writerow(["x", os.path.relpath(videos[4], tmp_path), "a title"])
    listing = tmp_path / "more.txt"
    listing.write_text(f"# a comment\n\n{videos[5]}\n{videos[0]}\n")
    out = tmp_path / "preds.jsonl"
    args = [ckpt(run), str(folder), str(manifest), str(listing), "--out", str(out), "--workers", "1"]
    assert mvfast.predict.main([*args, "--batch-size", "3", "--all-probs", "--top-k", "2"]) == 0
    rows = read_jsonl(out)
    # the folder's 4 (sorted, recursively), the CSV's 1, the list's 2
    assert [Path(r["video"]).name for r in rows[:4]] == ["v0.mp4", "v2.mp4", "v1.mp4", "v3.mp4"]
    assert rows[4]["video"] == str(videos[4]) and rows[5]["video"] == str(videos[5])
    assert rows[6]["video"] == str(videos[0]) and len(rows) == 7
    classes = torch.load(run[0] / "best.pt", weights_only=True)["classes"]
    for r in rows:
        assert r["status"] == "ok" and len(r["top"]) == 2 and r["clips"] == 2
        assert set(r["probs"]) == set(classes) and sum(r["probs"].values()) == pytest.approx(1, abs=1e-4)
        assert r["top"][0]["prob"] == max(r["probs"].values())
        assert len(r["key_frames"]) == 2 and sum(f["weight"] for f in r["key_frames"]) == pytest.approx(
            1, abs=1e-3
        )
    assert not out.with_name(out.name + ".parts").exists()  # the chunks were merged and removed
    assert "7 videos: 7 ok, 0 partial, 0 failed" in capsys.readouterr().err

    # The same through the batch-1 path of today's predict_file: the same probabilities.
    from mvfast._checkpoint import load_for_inference
    from mvfast._inference import predict_file

    loaded = load_for_inference(ckpt(run))
    one = predict_file(loaded.model, videos[4], loaded.data_config, torch.device("cpu"), "a title")
    got = {t["label"]: t["prob"] for t in rows[4]["top"]}
    for label, p in got.items():
        assert one["probs"][classes.index(label)].item() == pytest.approx(p, abs=1e-5)

    out_csv = tmp_path / "preds.csv"
    assert mvfast.predict.main([ckpt(run), str(folder), "--out", str(out_csv), "--workers", "0"]) == 0
    table = list(csv.DictReader(open(out_csv)))
    assert len(table) == 4 and all(r["status"] == "ok" and r["top1_label"] in classes for r in table)
    assert {"video", "top1_prob", "top_labels", "key_frames", "decode_ms"} <= set(table[0])


def test_rerun_resumes_and_keeps_what_is_done(run, toy, folder, videos, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    first = [ckpt(run), str(videos[0]), str(videos[1]), "--out", str(out), "--workers", "0"]
    assert mvfast.predict.main(first) == 0
    before = {r["video"]: r for r in read_jsonl(out)}
    # A killed run left a chunk behind: its row counts as done (its made-up top-1 survives the merge).
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    fake = {"video": str(videos[2]), "status": "ok", "top": [{"label": "made-up", "index": 0, "prob": 1.0}]}
    (parts / "r000-000000.jsonl").write_text(json.dumps(fake) + "\n")
    capsys.readouterr()
    again = [ckpt(run), *(str(v) for v in videos[:4]), "--out", str(out), "--workers", "0", "--chunk", "1"]
    assert mvfast.predict.main(again) == 0
    rows = {r["video"]: r for r in read_jsonl(out)}
    assert list(rows) == [str(v) for v in videos[:4]]
    assert rows[str(videos[0])] == before[str(videos[0])]  # not run again
    assert rows[str(videos[2])]["top"][0]["label"] == "made-up"
    assert rows[str(videos[3])]["status"] == "ok"
    assert "1 run now" in capsys.readouterr().err and not parts.exists()


def test_bad_files_each_get_a_status_line(run, toy, videos, tmp_path, capsys, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(videos[0], bad / "good.mp4")
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("this is not a video\n" * 20)
    data = videos[1].read_bytes()
    (bad / "broken.mp4").write_bytes(data[: len(data) // 2])  # its index (at the end) is gone
    cut_short(bad / "cut.mp4")
    (bad / "gone.mkv").symlink_to(tmp_path / "nowhere.mkv")  # unreadable: a link to nothing
    unreadable = bad / "locked.avi"
    shutil.copy(videos[2], unreadable)
    unreadable.chmod(0)
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{videos[3]}\nmissing/one.mp4\n{tmp_path / 'two.mp4'}\n")
    out = tmp_path / "preds.jsonl"
    args = [ckpt(run), str(bad), str(manifest), "--out", str(out), "--workers", "2", "--batch-size", "2"]
    assert mvfast.predict.main(args) == 1
    err = capsys.readouterr().err
    warned = caplog.text
    assert "lists 2 paths that do not exist" in warned and "missing/one.mp4" in warned and "two.mp4" in warned
    rows = {Path(r["video"]).name: r for r in read_jsonl(out)}
    assert len(rows) == 10
    assert rows["good.mp4"]["status"] == "ok" and rows[videos[3].name]["status"] == "ok"
    assert "empty file" in rows["empty.mp4"]["error"]
    assert "not a video" in rows["text.mp4"]["error"]
    assert "truncated or corrupt" in rows["broken.mp4"]["error"]
    assert "not found" in rows["gone.mkv"]["error"] or "No such file" in rows["gone.mkv"]["error"]
    assert "does not exist (listed in" in rows["one.mp4"]["error"] and rows["two.mp4"]["status"] == "failed"
    cut = rows["cut.mp4"]
    assert cut["status"] == "partial" and 0 < cut["frames_kept"] < 30 and "truncated" in cut["reason"]
    assert cut["top"]
    locked = rows["locked.avi"]
    if os.geteuid() == 0:  # root reads any file
        assert locked["status"] == "ok"
    else:
        assert locked["status"] == "failed" and "ermission" in locked["error"]
    assert "videos failed" in err
    # --allow-failures: the same rows, exit 0; a rerun tries the failed ones again only
    assert mvfast.predict.main([*args, "--allow-failures"]) == 0
    assert "done before" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 10


def test_timeline_of_windows(run, toy, videos, tmp_path):
    out = tmp_path / "timeline.jsonl"
    args = [ckpt(run), str(videos[0]), "--out", str(out), "--window", "0.4", "--stride", "0.2"]
    assert mvfast.predict.main([*args, "--workers", "0", "--top-k", "1"]) == 0
    (row,) = read_jsonl(out)
    timeline = row["timeline"]
    # 1 s at 12.5 fps = 13 frames; windows of 5 frames every 2 (0.16 s): starts 0, 2, ..., 8
    assert [t["start"] for t in timeline] == [0.0, 0.16, 0.32, 0.48, 0.64]
    assert all(t["end"] - t["start"] == pytest.approx(0.4) and len(t["top"]) == 1 for t in timeline)
    assert all(
        len(t["key_frames"]) == 2 and t["start"] <= t["key_frames"][0]["seconds"] < t["end"] for t in timeline
    )
    assert row["clips"] == 2 * len(timeline) and "key_frames" not in row
    assert (
        mvfast.predict.main([ckpt(run), str(videos[0]), "--out", str(tmp_path / "t.csv"), "--window", "1"])
        == 2
    )


def test_user_errors(run, toy, videos, tmp_path, capsys):
    base = [ckpt(run), str(videos[0])]
    for extra, needle in [
        (["--out", str(tmp_path / "x.txt")], "--out must end in"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--stride", "1"], "--stride needs --window"),
        (["--window", "0"], "--window must be > 0"),
        (["--json", "--out", str(tmp_path / "x.jsonl")], "give one of them"),
    ]:
        assert mvfast.predict.main([*base, *extra]) == 2, extra
        assert needle in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.mp4,1\n")
    assert mvfast.predict.main([ckpt(run), str(bad)]) == 2
    assert "needs a header with a path column" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mvfast.predict.main([ckpt(run), str(empty)]) == 2
    assert "no videos found" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text('{"a": 1}\n')
    assert mvfast.predict.main([*base, "--out", str(other)]) == 2
    assert "not a predictions file" in capsys.readouterr().err


def torchrun(*args, env):
    """2 local processes (gloo), retried once as tests/test_train.py does on this loaded machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TOY]
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *map(str, args)], env=full_env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        first = proc.stdout + proc.stderr
        proc = subprocess.run(
            [*cmd, *map(str, args)], env=full_env, capture_output=True, text=True, timeout=240
        )
        proc.first = first
    return proc


def test_torchrun_two_ranks_shard_and_merge(run, folder, videos, tmp_path):
    env = {"MVFAST_CACHE": str(run[1])}
    out = tmp_path / "preds.jsonl"
    inputs = [str(folder), str(videos[4]), str(videos[5])]
    proc = torchrun(
        "mvfast.predict", ckpt(run), *inputs, "--out", out, "--workers", "1", "--no-progress", env=env
    )
    assert proc.returncode == 0, getattr(proc, "first", "") + proc.stdout + proc.stderr
    rows = read_jsonl(out)
    # every input once, in input order, from both ranks' chunks
    assert [Path(r["video"]).name for r in rows] == [
        "v0.mp4",
        "v2.mp4",
        "v1.mp4",
        "v3.mp4",
        videos[4].name,
        videos[5].name,
    ]
    assert all(r["status"] == "ok" for r in rows) and not out.with_name(out.name + ".parts").exists()
    assert proc.stderr.count("6 videos: 6 ok") == 1  # rank 0 sums up

    feats = tmp_path / "feats"
    proc = torchrun(
        "mvfast.extract", ckpt(run), *inputs, "--out", feats, "--format", "npz", "--workers", "0", env=env
    )
    assert proc.returncode == 0, getattr(proc, "first", "") + proc.stdout + proc.stderr
    index = read_jsonl(feats / "index.jsonl")
    with np.load(feats / "features.npz") as f:
        assert f["embedding"].shape[0] == len(index) == 6
    assert [r["row"] for r in index] == list(range(6))


def test_extract_embeddings_and_parts(run, toy, folder, videos, tmp_path, capsys):
    from mvfast._checkpoint import load_for_inference
    from mvfast._inference import prepare

    out = tmp_path / "feats"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"")
    args = [ckpt(run), str(folder), str(bad), "--out", str(out), "--workers", "1"]
    assert mvfast.extract.main([*args, "--parts", "all"]) == 1  # the empty file failed
    index = read_jsonl(out / "index.jsonl")
    assert [r["status"] for r in index] == ["ok"] * 4 + ["failed"]
    first = index[0]
    emb = np.load(out / first["files"]["embedding"])
    # the embedding is the mean over the test clips of the model's features["embedding"]
    loaded = load_for_inference(ckpt(run))
    batch, _ = prepare(first["video"], loaded.data_config, None)
    with torch.no_grad():
        expect = loaded.model(batch, return_features=True)["features"]["embedding"].mean(0)
    np.testing.assert_allclose(emb, expect.numpy(), rtol=1e-5, atol=1e-6)
    assert set(first["files"]) >= {"embedding", "attention_weights"}
    weights = np.load(out / first["files"]["attention_weights"])
    assert weights.shape == (2, 1) and weights.sum() == pytest.approx(1, abs=1e-5)

    # one .npz with an index, resumed: a second run adds a video and rewrites the file
    npz = tmp_path / "npz"
    assert mvfast.extract.main([ckpt(run), str(videos[0]), "--out", str(npz), "--format", "npz"]) == 0
    assert (
        mvfast.extract.main([ckpt(run), str(videos[0]), str(videos[1]), "--out", str(npz), "--format", "npz"])
        == 0
    )
    assert "1 done before" in capsys.readouterr().err
    index = {Path(r["video"]).name: r for r in read_jsonl(npz / "index.jsonl")}
    assert [r["row"] for r in index.values()] == [0, 1]
    single = tmp_path / "single"
    assert mvfast.extract.main([ckpt(run), str(videos[1]), "--out", str(single)]) == 0
    (one,) = read_jsonl(single / "index.jsonl")
    with np.load(npz / "features.npz") as f:
        assert f["embedding"].shape == (2, emb.shape[0])
        np.testing.assert_array_equal(
            f["embedding"][index[videos[1].name]["row"]], np.load(single / one["files"]["embedding"])
        )

    st = tmp_path / "st"
    assert (
        mvfast.extract.main(
            [
                ckpt(run),
                str(videos[0]),
                "--out",
                str(st),
                "--format",
                "safetensors",
                "--parts",
                "attention_weights",
            ]
        )
        == 0
    )
    from safetensors.numpy import load_file

    tensors = load_file(st / "features.safetensors")
    assert set(tensors) == {"embedding", "attention_weights"} and tensors["embedding"].shape[0] == 1
    assert mvfast.extract.main([ckpt(run), str(videos[0]), "--out", str(st), "--parts", "nope"]) == 2
    assert "unknown part" in capsys.readouterr().err


def test_cli_subprocess(run, folder, tmp_path):
    out = tmp_path / "p.jsonl"
    proc = run_cli("mvfast.predict", ckpt(run), folder, "--out", out, env={"MVFAST_CACHE": str(run[1])})
    assert proc.returncode == 0 and "4 ok" in proc.stderr, proc.stderr
    assert len(read_jsonl(out)) == 4
