"""Datasets (UCF101 layout, folders, CSV manifests, the synthetic set), skipping bad files, collate."""

import csv
import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mvfast.data import (
    UCF101,
    Collate,
    DataConfig,
    SkipCounter,
    Skipped,
    SyntheticMicroVideos,
    VideoCSV,
    VideoFolder,
    collate,
    decode_video,
)
from mvfast.data import synthetic as syn
from mvfast.data.encode import encode_video

CFG = DataConfig(clip_len=4, size=32, resize=32, scene_frames=2, scene_size=32, test_clips=2)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """One tiny avi (MPEG-4 + MP3, the UCF101 format) and one mp4 without audio."""
    root = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (10, 32, 32, 3)).astype(np.uint8)
    t = np.arange(22050) / 44100
    avi = encode_video(
        root / "a.avi",
        frames,
        fps=20,
        codec="mpeg4",
        audio=0.3 * np.sin(2 * np.pi * 440 * t),
        audio_rate=44100,
        audio_codec="libmp3lame",
    )
    mp4 = encode_video(root / "b.mp4", frames[::-1].copy(), fps=20)
    return avi, mp4


def write_ucf(root, avi, missing=()):
    classes = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    # The official files have Windows line endings.
    (lists / "classInd.txt").write_bytes("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)).encode())
    train, test = [], []
    for i, c in enumerate(classes):
        # File names spell HandstandPushups as HandStandPushups, as in the real set.
        stem = "HandStandPushups" if c == "HandstandPushups" else c
        for g in (1, 2, 8):
            rel = f"{c}/v_{stem}_g{g:02d}_c01.avi"
            if rel not in missing:
                (root / c).mkdir(exist_ok=True)
                shutil.copy(avi, root / rel)
            (train if g == 8 else test).append(rel if g != 8 else f"{rel} {i + 1}")
    (lists / "trainlist01.txt").write_bytes("".join(f"{line}\r\n" for line in train).encode())
    (lists / "testlist01.txt").write_bytes("".join(f"{line}\r\n" for line in test).encode())
    return classes


def test_ucf101_official_layout(tmp_path, clip_files):
    classes = write_ucf(tmp_path, clip_files[0])
    train = UCF101(tmp_path, split=1, train=True, config=CFG, cache=tmp_path / "cache")
    test = UCF101(tmp_path, split=1, train=False, config=CFG, cache=False)
    assert train.classes == classes and len(train) == 3 and train.targets == [0, 1, 2]
    assert len(test.items) == 6 and len(test) == 12  # 2 clips per video
    assert test.targets == [0, 0, 1, 1, 2, 2]
    s = test[5]
    assert (s["label"], s["video_index"], s["clip_index"]) == (1, 2, 1)
    assert "HandStandPushups" in s["meta"]["path"]
    assert s["rgb"].shape == (3, 4, 32, 32) and s["audio_mask"].any()  # MP3 track decoded
    assert "text" not in s  # UCF101 has no titles; collate masks them


def test_ucf101_errors(tmp_path, clip_files):
    write_ucf(tmp_path, clip_files[0], missing=("YoYo/v_YoYo_g08_c01.avi",))
    with pytest.raises(ValueError, match="split must be 1, 2 or 3"):
        UCF101(tmp_path, split=4)
    with pytest.raises(FileNotFoundError, match="testlist02.txt"):
        UCF101(tmp_path, split=2, train=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UCF101(tmp_path / "nowhere")
    ds = UCF101(tmp_path, train=True, config=CFG, cache=False)  # a listed file is missing: left out
    assert len(ds) == 2
    bad = tmp_path / "ucfTrainTestlist" / "trainlist01.txt"
    bad.write_text("YoYo/v_YoYo_g08_c01.avi 1\n")
    with pytest.raises(ValueError, match="label 1 but classInd.txt numbers 'YoYo' as 3"):
        UCF101(tmp_path, train=True)


def make_folder(root, clip_files, bad=True):
    avi, mp4 = clip_files
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
    shutil.copy(avi, root / "cats" / "one.avi")
    shutil.copy(mp4, root / "cats" / "two.mp4")
    (root / "cats" / "two.txt").write_text("My cat sleeping\n")
    shutil.copy(mp4, root / "dogs" / "three.mp4")
    if bad:
        (root / "dogs" / "notes.mp4").write_text("this is text, renamed")
        (root / "dogs" / "empty.mp4").write_bytes(b"")
    (root / "dogs" / "readme.md").write_text("ignored")


def test_video_folder_titles_and_bad_files(tmp_path, clip_files, caplog):
    make_folder(tmp_path / "data", clip_files)
    ds = VideoFolder(tmp_path / "data", config=CFG, cache=False)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 5
    with caplog.at_level(logging.WARNING, logger="mvfast.data"):
        items = [ds[i] for i in range(5)]
    bad = [s for s in items if isinstance(s, Skipped)]
    assert sorted(b.path.rsplit("/", 1)[1] for b in bad) == ["empty.mp4", "notes.mp4"]
    assert "empty file" in caplog.text and "not a video" in caplog.text
    titled = [s for s in items if not isinstance(s, Skipped) and s["meta"]["title"]]
    assert len(titled) == 1 and titled[0]["text_mask"].sum() == 3
    assert ds.failures == 2  # counted in this process


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted_through_dataloader(tmp_path, clip_files, workers, caplog):
    make_folder(tmp_path / "data", clip_files)
    ds = VideoFolder(tmp_path / "data", config=CFG, train=True, cache=tmp_path / "cache")
    loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate)
    skips = SkipCounter()
    seen = 0
    for batch in loader:
        skips.update(batch)
        seen += batch["label"].numel()
        if batch["label"].numel():
            assert batch["rgb"].shape[0] == batch["label"].numel()
    assert seen == 3
    with caplog.at_level(logging.WARNING, logger="mvfast.data"):
        assert skips.end_epoch(epoch=0) == 2
    assert "skipped 2 undecodable file(s) in epoch 0" in caplog.text and "notes.mp4" in caplog.text
    assert skips.end_epoch() == 0  # reset


def test_empty_or_missing_datasets_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        VideoFolder(tmp_path / "empty")
    (tmp_path / "empty" / "cats").mkdir()
    with pytest.raises(ValueError, match="no videos"):
        VideoFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="manifest"):
        VideoCSV(tmp_path / "none.csv")


def test_video_csv(tmp_path, clip_files):
    avi, mp4 = clip_files
    shutil.copy(avi, tmp_path / "x.avi")
    rows = [
        {"path": "x.avi", "label": "sport", "title": "Goal!", "split": "train"},
        {"path": str(mp4), "label": "music", "title": "", "split": "train"},
        {"path": "x.avi", "label": "music", "title": "live", "split": "test"},
    ]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ds = VideoCSV(tmp_path / "m.csv", config=CFG, cache=False, split="train")
    assert ds.classes == ["music", "sport"] and ds.targets == [1, 0]
    assert ds[0]["text_mask"].tolist() == [True] and not ds[1]["text_mask"].any()
    assert len(VideoCSV(tmp_path / "m.csv", config=CFG, cache=False, split="test")) == 1
    (tmp_path / "bad.csv").write_text("file,class\nx.avi,a\n")
    with pytest.raises(ValueError, match=r"missing \['path', 'label'\]"):
        VideoCSV(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no rows with split='val'"):
        VideoCSV(tmp_path / "m.csv", split="val")


def test_video_csv_multi_label(tmp_path, clip_files):
    avi, mp4 = clip_files
    rows = [
        {"path": str(avi), "label": "cat|indoor"},
        {"path": str(mp4), "label": "dog | outdoor|dog"},  # spaces and a repeat
        {"path": str(avi), "label": ""},  # no label at all
    ]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    ds = VideoCSV(tmp_path / "m.csv", config=CFG, cache=False, train=False, multi_label=True)
    assert ds.classes == ["cat", "dog", "indoor", "outdoor"]
    assert [item.labels for item in ds.items] == [(0, 2), (1, 3), ()]
    clips = [ds[i] for i in range(0, len(ds), CFG.test_clips)]
    assert [c["label"].tolist() for c in clips] == [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    batch = collate(clips)
    assert batch["label"].shape == (3, 4) and batch["label"].dtype == torch.long
    with pytest.raises(ValueError, match="needs --multi-label"):
        VideoCSV(tmp_path / "m.csv")
    with pytest.raises(ValueError, match="'outdoor' of"):
        VideoCSV(tmp_path / "m.csv", multi_label=True, classes=["cat", "dog", "indoor"])


def sample(a_len=None, w_len=None, label=0):
    s = {
        "rgb": torch.randn(3, 4, 8, 8),
        "motion": torch.randn(2, 4, 8, 8),
        "frames": torch.randn(2, 3, 8, 8),
        "label": label,
        "meta": {},
    }
    if a_len is None:
        s["audio"], s["audio_mask"] = torch.zeros(1, 64), torch.zeros(1, dtype=torch.bool)
    else:
        s["audio"], s["audio_mask"] = torch.randn(a_len, 64), torch.ones(a_len, dtype=torch.bool)
    if w_len is not None:
        s["text"], s["text_mask"] = torch.arange(1, w_len + 1), torch.ones(w_len, dtype=torch.bool)
    return s


def test_collate_pads_and_masks():
    batch = collate(
        [sample(5, 2, 0), sample(None, None, 1), Skipped("/bad.mp4", "empty file"), sample(3, 4, 2)]
    )
    assert batch["rgb"].shape == (3, 3, 4, 8, 8) and batch["frames"].shape == (3, 2, 3, 8, 8)
    assert batch["audio"].shape == (3, 5, 64) and batch["audio_mask"].sum(1).tolist() == [5, 0, 3]
    assert batch["has_audio"].tolist() == [True, False, True]
    assert batch["text"].shape == (3, 4) and batch["text"].dtype == torch.long
    assert batch["text_mask"].sum(1).tolist() == [2, 0, 4] and batch["has_text"].tolist() == [
        True,
        False,
        True,
    ]
    assert batch["text"][0].tolist() == [1, 2, 0, 0]
    assert (batch["audio"][1] == 0).all() and batch["label"].tolist() == [0, 1, 2]
    assert batch["num_skipped"] == 1 and batch["skipped"] == [("/bad.mp4", "empty file")]
    fixed = Collate(audio_windows=8, title_tokens=3)([sample(5, 4), sample(10, 1)])
    assert fixed["audio"].shape == (2, 8, 64) and fixed["text"].shape == (2, 3)
    assert fixed["audio_mask"].sum(1).tolist() == [5, 8] and fixed["text_mask"].sum(1).tolist() == [3, 1]
    empty = collate([Skipped("/a", "x"), None])
    assert empty["label"].numel() == 0 and empty["num_skipped"] == 2 and "rgb" not in empty
    with pytest.raises(ValueError, match="audio_windows"):
        Collate(audio_windows=0)


# ---- the synthetic set ------------------------------------------------------------------------------------

TINY = {"num_classes": 4, "videos_per_class": 2, "seed": 3, "size": 48, "seconds": 1.0}


def test_class_design_needs_fusion():
    factors = syn.class_factors(10, seed=0)
    assert factors.shape == (10, 4) and len({tuple(f) for f in factors.tolist()}) == 10
    for m in range(4):
        # No single modality separates the classes: every value is shared by two classes.
        assert len(set(factors[:, m].tolist())) == 5
    shared = (factors[:, None] == factors[None]).sum(-1) - 4 * np.eye(10, dtype=int)
    assert shared.max() == 1  # any two modalities together tell every pair of classes apart


def test_synthetic_generation_is_deterministic_and_atomic(tmp_path):
    a = syn.generate(tmp_path / "a", **TINY)
    b = syn.generate(tmp_path / "b", **TINY)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in ("manifest.csv", "classes.txt", "info.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    # The rendered content is identical; x264 was seen to encode it with small run-to-run differences
    # (about 1.4 grey levels on average) when the file has an AAC track, so decoded pixels are compared.
    for rel in files_a:
        if rel.suffix == ".mp4":
            va, vb = decode_video(a / rel, CFG), decode_video(b / rel, CFG)
            assert np.abs(va.frames.astype(int) - vb.frames.astype(int)).mean() < 4, rel
            assert (va.audio is None) == (vb.audio is None)
            if va.audio is not None:
                np.testing.assert_allclose(va.audio, vb.audio, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left
    rows = list(csv.DictReader(open(a / "manifest.csv")))
    assert len(rows) == 8 and {r["split"] for r in rows} == {"train", "test"}
    info = json.loads((a / "info.json").read_text())
    assert info["num_classes"] == 4 and len(info["factors"]) == 4
    assert syn.generate(a, **TINY) == a  # already complete: kept
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        syn.generate(a, **dict(TINY, seed=4))


def test_concurrent_generation(tmp_path):
    code = f"import sys; from mvfast.data.synthetic import generate; generate(sys.argv[1], **{TINY!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "set")]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    assert len(list(csv.DictReader(open(tmp_path / "set" / "manifest.csv")))) == 8


def test_synthetic_cli(tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvfast.data.synthetic",
            "--out",
            str(out),
            "--classes",
            "2",
            "--videos-per-class",
            "2",
            "--size",
            "32",
            "--seconds",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 4 videos of 2 classes" in run.stdout and (out / "manifest.csv").is_file()


def test_synthetic_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MVFAST_CACHE", str(tmp_path / "home"))
    train = SyntheticMicroVideos(config=CFG, **{k: v for k, v in TINY.items()})
    assert train.folder.parent == tmp_path / "home" / "synthetic"
    test = SyntheticMicroVideos(train=False, config=CFG, **TINY)
    assert len(train) == 4 and len(test) == 4 * CFG.test_clips and len(train.classes) == 4
    rows = {r["path"]: r for r in csv.DictReader(open(train.folder / "manifest.csv"))}
    for i in range(len(train)):
        s = train[i]
        row = rows[str(train.items[i].path).split(str(train.folder) + "/")[1]]
        assert s["label"] == int(row["label"])
        assert bool(s["audio_mask"].any()) == (row["has_audio"] == "1")
        assert bool(s["text_mask"].any()) == bool(row["title"])
    batch = collate([train[i] for i in range(len(train))])
    assert batch["rgb"].shape == (4, 3, 4, 32, 32) and batch["motion"].abs().max() > 0.5
