"""mvfast, its model and its data layer (configs, collate, datasets) work where PyAV is not installed; only
decoding or encoding a video needs it, and then the error names the package."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class NoAV(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "av" or name.startswith("av."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, NoAV())
    assert "av" not in sys.modules

    import torch

    import mvfast
    import mvfast.data
    import mvfast.models
    from mvfast.data import Collate, DataConfig, SkipCounter, VideoCSV, collate, tokenize

    model = mvfast.models.create_model("tiny", 3).eval()
    data = DataConfig().with_inputs(model.config.inputs())
    samples = []
    for label in range(2):
        text, text_mask = tokenize("a cat in a box", data.vocab_size, data.max_title_tokens)
        samples.append({
            "rgb": torch.randn(3, data.clip_len, data.size, data.size),
            "motion": torch.randn(2, data.clip_len, data.size, data.size),
            "frames": torch.randn(data.scene_frames, 3, data.scene_size, data.scene_size),
            "audio": torch.randn(5, 64),
            "audio_mask": torch.ones(5, dtype=torch.bool),
            "text": text,
            "text_mask": text_mask,
            "label": label,
        })
    batch = collate(samples)
    with torch.no_grad():
        logits = model(batch)["logits"]
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    assert Collate(audio_windows=8)(samples)["audio"].shape == (2, 8, 64)
    SkipCounter().update(batch)

    with open(sys.argv[1], "w") as f:
        f.write("path,label\\nmissing.mp4,cat\\n")
    dataset = VideoCSV(sys.argv[1], config=data, cache=False)
    assert len(dataset) == 1 and dataset.classes == ["cat"]
    blank = torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy()
    for call in (lambda: dataset[0], lambda: mvfast.data.encode_video("x.mp4", blank)):
        try:
            call()
        except ModuleNotFoundError as e:
            assert e.name == "av" and "PyAV" in str(e) and "pip install av" in str(e), e
        else:
            raise AssertionError("decoding or encoding without PyAV did not fail")
    assert "av" not in sys.modules
    print("ok")
    """
)


def test_mvfast_works_without_pyav(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "list.csv")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
