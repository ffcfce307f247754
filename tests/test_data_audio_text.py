"""Audio log-mel features and title tokens."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mvfast.data import DataConfig, decode_video
from mvfast.data.audio import (
    LOG_OFFSET,
    N_MELS,
    SAMPLE_RATE,
    log_mel,
    mel_band_edges,
    mel_filterbank,
    pool_windows,
)
from mvfast.data.encode import encode_video
from mvfast.data.text import PAD_ID, token_id, tokenize, words


def test_filterbank_bands_cover_125_to_7500_hz():
    fb = mel_filterbank()
    assert fb.shape == (257, N_MELS) and (fb >= 0).all()
    assert (fb.sum(0) > 0).all()  # every band gets some FFT bin
    edges = mel_band_edges()
    assert edges[0, 0] == pytest.approx(125) and edges[-1, 2] == pytest.approx(7500)
    assert (np.diff(edges[:, 1]) > 0).all()
    assert fb[0].sum() == 0  # no DC
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(f_max=9000)


@pytest.mark.parametrize("hz", [300.0, 1000.0, 3000.0, 6000.0])
def test_tone_peaks_in_its_mel_band(hz):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    mel = log_mel(0.5 * np.sin(2 * np.pi * hz * t))
    assert mel.shape == (1 + (SAMPLE_RATE - 400) // 160, N_MELS)
    expected = int(np.argmin(np.abs(mel_band_edges()[:, 1] - hz)))
    assert abs(int(mel.mean(0).argmax()) - expected) <= 1


def test_silence_and_lengths():
    assert torch.equal(log_mel(np.zeros(800)), torch.full((3, N_MELS), float(np.log(LOG_OFFSET))))
    assert log_mel(np.zeros(0)).shape == (0, N_MELS)
    assert log_mel(np.zeros(100)).shape == (1, N_MELS)  # shorter than a window: one padded frame
    with pytest.raises(ValueError, match=r"1-D \(S,\)"):
        log_mel(np.zeros((2, 100)))


def test_pool_windows_averages_and_bounds():
    frames = torch.arange(10, dtype=torch.float32)[:, None].expand(10, 64)
    pooled = pool_windows(frames, pool=4, max_windows=100)
    assert pooled[:, 0].tolist() == [1.5, 5.5, 8.5]  # the last window averages the two left
    bounded = pool_windows(torch.randn(1000, 64), pool=1, max_windows=50)
    assert bounded.shape == (50, 64)
    assert pool_windows(torch.zeros(0, 64), 4, 8).shape == (0, 64)


def test_decoded_tone_through_aac_and_resampling(tmp_path):
    # 22.05 kHz AAC, resampled to 16 kHz mono by the decoder path.
    t = np.arange(22050) / 22050
    frames = np.zeros((10, 32, 32, 3), np.uint8)
    path = encode_video(tmp_path / "tone.mp4", frames, fps=10, audio=0.5 * np.sin(2 * np.pi * 2000 * t))
    video = decode_video(path, DataConfig(resize=32, size=32, scene_size=32))
    expected = int(np.argmin(np.abs(mel_band_edges()[:, 1] - 2000)))
    assert abs(int(video.audio.mean(0).argmax()) - expected) <= 1


def test_words_and_tokens():
    assert words("Hello, WORLD! It's 2024 — café") == ["hello", "world", "it", "s", "2024", "café"]
    ids, mask = tokenize("Cat cat DOG", vocab_size=1000, max_tokens=8)
    assert ids[0] == ids[1] != ids[2] and mask.tolist() == [True] * 3
    assert ((ids >= 1) & (ids < 1000)).all()
    ids, mask = tokenize("a b c d e", vocab_size=50, max_tokens=3, pad_to=5)
    assert mask.tolist() == [True, True, True, False, False] and ids[3:].tolist() == [PAD_ID, PAD_ID]
    ids, mask = tokenize("  ...  ")
    assert ids.tolist() == [PAD_ID] and mask.tolist() == [False]
    with pytest.raises(TypeError, match="title must be a str"):
        tokenize(None)
    with pytest.raises(ValueError, match="pad_to=1 is shorter"):
        tokenize("a b", pad_to=1)


def test_token_ids_are_stable_across_processes():
    # Pinned values: a change of hash would silently change every trained model's vocabulary.
    assert (token_id("sunset", 16384), token_id("beach", 16384)) == (15100, 13100)
    code = "from mvfast.data.text import token_id; print(token_id('sunset', 16384), token_id('beach', 16384))"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    assert outs == {f"{token_id('sunset', 16384)} {token_id('beach', 16384)}"}
