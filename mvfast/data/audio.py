"""Audio features: 16 kHz mono log-mel frames, pooled into a bounded number of windows.

The front end follows VGGish (the usual audio feature of micro-video models): 25 ms periodic-Hann windows
with a 10 ms hop, the magnitude of a 512-point FFT, 64 triangular mel bands between 125 and 7500 Hz on the
HTK mel scale, then log(mel + 0.01). Each audio *window* given to the model is the mean of
`DataConfig.audio_pool` consecutive 10 ms frames (40 ms by default); tracks longer than
`DataConfig.max_audio_windows` windows are average-pooled over time down to that bound, so A is bounded and
the whole track is still seen.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 400  # 25 ms at 16 kHz
HOP_SAMPLES = 160  # 10 ms
N_FFT = 512  # next power of two above the window, as VGGish
N_MELS = 64
F_MIN = 125.0
F_MAX = 7500.0
LOG_OFFSET = 0.01


def hz_to_mel(hz):
    """HTK mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * np.expm1(np.asarray(mel, dtype=np.float64) / 1127.0)


def mel_band_edges(n_mels: int = N_MELS, f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """Lower edge, centre and upper edge of each band in Hz: (n_mels, 3)."""
    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    hz = mel_to_hz(mels)
    return np.stack([hz[:-2], hz[1:-1], hz[2:]], axis=1)


def mel_filterbank(
    n_mels: int = N_MELS,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> torch.Tensor:
    """Triangular mel filters, (n_fft // 2 + 1, n_mels) float32, so that mel = spectrum @ filters.

    The triangles are linear in mel (not in Hz), as in VGGish, and the DC bin gets no weight.
    """
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank: expected 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, "
            f"f_max={f_max}, sample_rate={sample_rate}"
        )
    bin_mel = hz_to_mel(np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1))[:, None]  # (bins, 1)
    edges = hz_to_mel(mel_band_edges(n_mels, f_min, f_max))  # (n_mels, 3) in mel
    lower, centre, upper = edges[:, 0], edges[:, 1], edges[:, 2]
    rising = (bin_mel - lower) / (centre - lower)
    falling = (upper - bin_mel) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return torch.from_numpy(weights.astype(np.float32))


def to_mono_float(samples: np.ndarray, planar: bool, channels: int) -> np.ndarray:
    """One decoded audio frame (``AudioFrame.to_ndarray()``) as float32 mono in [-1, 1]: (S,)."""
    x = samples if planar else samples.reshape(-1, channels).T  # (channels, S)
    if x.dtype == np.uint8:
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return x.astype(np.float32, copy=False).mean(axis=0)


def _smooth(n: int) -> bool:
    for f in (2, 3, 5, 7):
        while n % f == 0:
            n //= f
    return n == 1


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a mono waveform by its spectrum: (S,) -> (round(S * target / rate),).

    Truncating the spectrum is an ideal low-pass below the new Nyquist frequency. The track is first padded
    with silence to a length whose FFTs are fast and that maps to a whole number of output samples (a
    track's own length is whatever the codec gave: 89088 samples of AAC became 64644 = 4 * 3 * 5387, whose
    inverse FFT took 5x as long), which also keeps its end from wrapping round into its start. Done with
    NumPy and torch rather than FFmpeg's resampler, which runs a filter graph with its own threads: a
    DataLoader worker forked while such threads existed in its parent was seen to hang.
    """
    if rate == target or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    n_out = max(1, round(wave.size * target / rate))
    g = math.gcd(int(rate), int(target))
    a, b = int(rate) // g, int(target) // g  # a input samples span b output samples exactly
    padded, out = wave.size, n_out
    if a <= 4096:  # else an unusual rate, for which no padding makes both lengths fast
        k = -(-wave.size // a)
        while not (_smooth(a * k) and _smooth(b * k)):
            k += 1
        padded, out = a * k, b * k
    x = torch.zeros(padded, dtype=torch.float64)
    x[: wave.size] = torch.from_numpy(np.asarray(wave, dtype=np.float64))
    spectrum = torch.fft.rfft(x)
    bins = out // 2 + 1
    if spectrum.numel() >= bins:
        spectrum = spectrum[:bins]
    else:
        spectrum = torch.cat([spectrum, spectrum.new_zeros(bins - spectrum.numel())])
    y = torch.fft.irfft(spectrum, n=out) * (out / padded)
    return y[:n_out].numpy().astype(np.float32)


_FILTERBANK: torch.Tensor | None = None
_WINDOW: torch.Tensor | None = None


def log_mel(waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Log-mel frames of a 16 kHz mono waveform.

    Args:
        waveform (Tensor[S]): samples in [-1, 1] at 16 kHz.

    Returns:
        Tensor[N, 64] float32 with N = 1 + (S - 400) // 160 frames (a non-empty waveform shorter than one
        window is zero-padded to one frame; an empty one gives N = 0).
    """
    global _FILTERBANK, _WINDOW
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.dim() != 1:
        raise ValueError(f"log_mel: waveform must be 1-D (S,), got shape {tuple(wav.shape)}")
    if wav.numel() == 0:
        return torch.zeros(0, N_MELS)
    if wav.numel() < WINDOW_SAMPLES:
        wav = F.pad(wav, (0, WINDOW_SAMPLES - wav.numel()))
    if _FILTERBANK is None:
        _FILTERBANK = mel_filterbank()
        _WINDOW = torch.hann_window(WINDOW_SAMPLES, periodic=True)
    frames = wav.unfold(0, WINDOW_SAMPLES, HOP_SAMPLES)  # (N, 400), a view
    spectrum = torch.fft.rfft(frames * _WINDOW, n=N_FFT).abs()  # (N, 257)
    return torch.log(spectrum @ _FILTERBANK + LOG_OFFSET)  # (N, 64)


def pool_windows(frames: torch.Tensor, pool: int, max_windows: int) -> torch.Tensor:
    """Average `pool` consecutive log-mel frames into one window, then bound the count.

    Args:
        frames (Tensor[N, 64]): log-mel frames.

    Returns:
        Tensor[A, 64] with A = min(ceil(N / pool), max_windows); the last window averages what is left.
    """
    n = frames.shape[0]
    if n == 0:
        return frames
    a = math.ceil(n / pool)
    x = frames.t().unsqueeze(0)  # (1, 64, N)
    x = F.avg_pool1d(x, kernel_size=pool, stride=pool, ceil_mode=True) if pool > 1 else x  # (1, 64, A)
    if a > max_windows:
        x = F.adaptive_avg_pool1d(x, max_windows)
    return x.squeeze(0).t().contiguous()  # (A, 64)


def audio_features(waveform: np.ndarray | torch.Tensor, pool: int, max_windows: int) -> torch.Tensor:
    """Windows of a 16 kHz mono waveform: (A, 64) float32, A <= max_windows (A = 0 for no samples)."""
    return pool_windows(log_mel(waveform), pool, max_windows)
