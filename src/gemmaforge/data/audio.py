"""Audio in: WAV files (stdlib ``wave``) and Gemma 4's log-mel features, equal to transformers 5.23's
``Gemma4AudioFeatureExtractor`` (numpy only, the same operations in the same order).

The features: 16 kHz audio, semicausal framing (``frame_length // 2`` zeros in front, so the first
20 ms frame is centred at t = 0), frames of 320 samples every 160 (10 ms), a periodic Hann window,
``|rfft|`` over 512 points, 128 HTK mel filters from 0 to 8 kHz (no area normalisation),
``log(mel + 1e-3)``; a frame is valid only when its whole window is real audio. Clips are padded
(right, zeros) to the longest in the batch rounded up to 128 samples and cut at 30 s; padded frames
are zeroed and masked.
"""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np

from ..errors import InputError


def read_wav(path: str | Path, sampling_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples in [-1, 1] of a PCM WAV file (8/16/24/32-bit; channels averaged),
    resampled to ``sampling_rate`` (FFT resampling) when given and different."""
    p = Path(path)
    try:
        with wave.open(str(p), "rb") as w:
            n_ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except FileNotFoundError:
        raise InputError(f"{p}: audio file not found") from None
    except (wave.Error, EOFError, OSError) as e:
        raise InputError(f"{p}: not a readable PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / float(1 << 31)
    else:
        raise InputError(f"{p}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    x = x.reshape(-1, n_ch).mean(axis=1) if n_ch > 1 else x
    if sampling_rate is not None and rate != sampling_rate and len(x):
        x = resample(x, rate, sampling_rate)
    return x.astype(np.float32)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal by zero-padding / truncating its spectrum."""
    n_out = max(1, int(round(len(x) * dst / src)))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = n_out // 2 + 1
    out = np.zeros(keep, dtype=np.complex128)
    out[: min(keep, len(spec))] = spec[: min(keep, len(spec))]
    return (np.fft.irfft(out, n_out) * (n_out / len(x))).astype(np.float32)


def hertz_to_mel(f):
    return 2595.0 * np.log10(1.0 + (f / 700.0))


def mel_to_hertz(m):
    return 700.0 * (np.power(10, m / 2595.0) - 1.0)


def mel_filter_bank(n_bins: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """``[n_bins, n_mels]`` triangular HTK mel filters (no normalisation), float64."""
    mel_freqs = np.linspace(hertz_to_mel(f_min), hertz_to_mel(f_max), n_mels + 2)
    filter_freqs = mel_to_hertz(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, n_bins)
    diff = np.diff(filter_freqs)
    slopes = np.expand_dims(filter_freqs, 0) - np.expand_dims(fft_freqs, 1)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


class Gemma4AudioFeatureExtractor:
    """Waveforms -> ``(input_features [B, T, 128] float32, input_features_mask [B, T] bool)``.

    Values from the checkpoint's ``processor_config.json`` / ``preprocessor_config.json`` can be passed
    as keyword arguments (the defaults are transformers' and the released checkpoints')."""

    def __init__(self, feature_size: int = 128, sampling_rate: int = 16_000, padding_value: float = 0.0,
                 frame_length_ms: float = 20.0, hop_length_ms: float = 10.0, min_frequency: float = 0.0,
                 max_frequency: float = 8000.0, preemphasis: float = 0.0, preemphasis_htk_flavor: bool = True,
                 fft_overdrive: bool = False, input_scale_factor: float = 1.0, mel_floor: float = 1e-3,
                 per_bin_mean=None, per_bin_stddev=None, max_length: int = 480_000, pad_to_multiple_of: int = 128,
                 **_ignored):
        self.feature_size = feature_size
        self.sampling_rate = sampling_rate
        self.min_frequency, self.max_frequency, self.fft_overdrive = min_frequency, max_frequency, fft_overdrive
        self.padding_value = padding_value
        self.preemphasis = preemphasis
        self.preemphasis_htk_flavor = preemphasis_htk_flavor
        self.input_scale_factor = input_scale_factor
        self.frame_length = int(round(sampling_rate * frame_length_ms / 1000.0))
        self.hop_length = int(round(sampling_rate * hop_length_ms / 1000.0))
        self.mel_floor = np.array(mel_floor, dtype=np.float64)
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if fft_overdrive else 1)
        self.window = np.hanning(self.frame_length + 1)[:-1].astype(np.float32)  # periodic Hann
        self.mel_filters = mel_filter_bank(self.fft_length // 2 + 1, feature_size, min_frequency, max_frequency,
                                           sampling_rate)
        self.per_bin_mean = None if per_bin_mean is None else np.array(per_bin_mean).reshape(1, 1, feature_size)
        self.per_bin_stddev = None if per_bin_stddev is None else np.array(per_bin_stddev).reshape(1, 1, feature_size)
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def _spectrogram(self, waveform: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One padded clip ``[N]`` (and its sample mask) -> log-mel ``[T, mel]`` float64 and frame mask ``[T]``."""
        w = waveform[None]  # (1, N)
        if self.input_scale_factor != 1.0:
            w = w * self.input_scale_factor
        pad_left = self.frame_length // 2  # semicausal: the first frame is centred at t = 0
        w = np.pad(w, ((0, 0), (pad_left, 0)), mode="constant")
        mask = np.pad(mask, (pad_left, 0), mode="constant", constant_values=0)
        size = self.frame_length + 1  # one extra sample for the pre-emphasis
        n_frames = (w.shape[1] - size) // self.hop_length + 1
        if n_frames <= 0:
            frames = np.zeros((1, 0, size), dtype=w.dtype)
        else:
            frames = np.lib.stride_tricks.as_strided(
                w, shape=(1, n_frames, size), strides=(w.strides[0], w.strides[1] * self.hop_length, w.strides[1]))
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:
                first = frames[..., :1] * (1.0 - self.preemphasis)
                rest = frames[..., 1:-1] - self.preemphasis * frames[..., :-2]
                frames = np.concatenate([first, rest], axis=-1)
            else:
                frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        spec = np.abs(np.fft.rfft(frames * self.window, n=self.fft_length, axis=-1))
        log_mel = np.log(np.matmul(spec, self.mel_filters) + self.mel_floor)
        if self.per_bin_mean is not None:
            log_mel = log_mel - self.per_bin_mean
        if self.per_bin_stddev is not None:
            log_mel = log_mel / self.per_bin_stddev
        log_mel = log_mel.squeeze(0)
        # a frame is valid when the last sample of its window is real audio
        ends = np.arange(log_mel.shape[0]) * self.hop_length + size - 1
        return log_mel, mask[ends].astype(bool)

    def __call__(self, audio, return_tensors: str | None = None):
        """``audio``: one waveform (1-D array / list of floats) or a list of them, at ``sampling_rate``."""
        if isinstance(audio, np.ndarray) and audio.ndim == 1 or (
                isinstance(audio, (list, tuple)) and audio and isinstance(audio[0], (int, float))):
            audio = [audio]
        clips = [np.asarray(a) for a in audio]
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise InputError(f"audio clip {i}: expected a 1-D waveform, got shape {c.shape}")
        clips = [c[: self.max_length] for c in clips]  # 30 s at most
        longest = max(len(c) for c in clips)
        m = self.pad_to_multiple_of
        target = longest if not m or longest % m == 0 else (longest // m + 1) * m
        feats, masks = [], []
        for c in clips:
            n = len(c)
            wav = np.pad(c, (0, target - n), "constant", constant_values=self.padding_value)
            if wav.dtype == np.float64:
                wav = wav.astype(np.float32)
            sample_mask = np.pad(np.ones(n, dtype=np.int32), (0, target - n))
            f, fm = self._spectrogram(wav, sample_mask)
            feats.append(f.astype(np.float32) * fm[..., None])
            masks.append(fm)
        out = {"input_features": np.stack(feats), "input_features_mask": np.stack(masks)}
        if return_tensors == "pt":
            import torch

            out = {k: torch.from_numpy(v) for k, v in out.items()}
        return out

    @staticmethod
    def num_soft_tokens(mask) -> int:
        """Audio soft tokens of one clip from its frame mask: the two stride-2 convolutions keep every
        second frame twice (what the tower's valid mask sums to)."""
        m = np.asarray(mask)
        return int(m[::2][::2].sum())
