"""Audio bytes → Whisper-style log-mel [n_mels, frames]: soundfile read, exact resampling, mel, SpecAugment.

Everything after the read is torch: a windowed-sinc polyphase resampler (one strided conv1d, any
rational ratio), a mel filterbank built from its formula (Slaney or HTK scale, Slaney area norm,
as Whisper uses), a 25 ms / 10 ms STFT, log10 with Whisper's clamp and scaling, and SpecAugment
time/frequency masks drawn from a generator the caller keys.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

from plait.data.checks import check_at_least, check_positive
from plait.data.decode_errors import DecodeError

_SHORT_READ_TOLERANCE = 0.05  # MP3 frame counts are estimates; a file more than 5% short was cut off
_LOG_FLOOR = 1e-10
_RIFF_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streaming writers leave the size unset
_KAISER_BETA = 8.6  # resampling window: about 80 dB stop-band attenuation
_SLANEY_BREAK_HZ, _SLANEY_BREAK_MEL = 1000.0, 15.0  # linear (200/3 Hz per mel) below, logarithmic above
_SLANEY_LOG_STEP = math.log(6.4) / 27.0  # 27 mels per factor 6.4 in frequency above the break


@dataclass(kw_only=True)
class LogMelConfig:
    """The audio front end: sample rate, STFT geometry and mel bins (defaults are Whisper's)."""

    sample_rate: int = 16_000
    """Rate every clip is resampled to before the STFT, in Hz."""
    n_mels: int = 80
    """Mel bins (Whisper v1/v2: 80, large-v3: 128)."""
    n_fft: int = 400
    """STFT window and FFT length in samples (25 ms at 16 kHz)."""
    hop_length: int = 160
    """STFT hop in samples (10 ms at 16 kHz: 100 frames per second)."""
    mel_scale: Literal["slaney", "htk"] = "slaney"
    """Mel scale: Slaney (linear below 1 kHz, as librosa and Whisper) or HTK (2595 log10(1 + f/700))."""
    f_min: float = 0.0
    """Lowest filter edge in Hz."""
    f_max: float = 0.0
    """Highest filter edge in Hz; 0 means the Nyquist frequency."""
    dynamic_range: float = 8.0
    """Log10 units kept below the clip's peak (8 = 80 dB, Whisper's clamp)."""
    resample_zero_crossings: int = 16
    """Windowed-sinc half-width of the resampling filter, in zero crossings of the sinc."""
    resample_rolloff: float = 0.95
    """Resampling cutoff as a fraction of the lower Nyquist frequency (leaves room for the transition band)."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "sample_rate", "n_mels", "n_fft", "hop_length", "resample_zero_crossings")
        nyquist = self.sample_rate / 2
        if not 0 <= self.f_min < (self.f_max or nyquist) <= nyquist:
            raise ValueError(f"f_min: need 0 <= f_min < f_max <= {nyquist}, got {self.f_min}, {self.f_max}")
        check_positive(self, "dynamic_range")
        if not 0 < self.resample_rolloff <= 1:
            raise ValueError(f"resample_rolloff: must be in (0, 1], got {self.resample_rolloff}")


@dataclass(kw_only=True)
class SpecAugmentConfig:
    """SpecAugment masking (Park et al. 2019), applied to training clips only."""

    freq_masks: int = 2
    """Frequency bands masked per clip."""
    freq_width: int = 27
    """Widest frequency band, in mel bins; each width is uniform in [0, freq_width]."""
    time_masks: int = 2
    """Time spans masked per clip."""
    time_width: int = 100
    """Widest time span, in frames; each width is uniform in [0, min(time_width, time_fraction x frames)]."""
    time_fraction: float = 0.2
    """Cap on one time mask as a fraction of the clip, so short clips keep most of their content."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "freq_masks", "freq_width", "time_masks", "time_width")
        if not 0 <= self.time_fraction <= 1:
            raise ValueError(f"time_fraction: must be in [0, 1], got {self.time_fraction}")


def _riff_cut_short(data: bytes) -> bool:
    """Whether a RIFF/WAVE file is shorter than its header says (libsndfile silently reads what is there)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    declared = int.from_bytes(data[4:8], "little")
    return declared not in _RIFF_UNKNOWN_SIZES and declared + 8 > len(data)


def read_audio(data: bytes, start_s: float = 0.0, span_s: float | None = None) -> tuple[np.ndarray, int]:
    """Decode only [start_s, start_s + span_s) of a clip: mono float32 samples and the native rate."""
    if not data:
        raise DecodeError("empty", "zero-byte audio")
    if _riff_cut_short(data):
        raise DecodeError("truncated", f"RIFF header declares {int.from_bytes(data[4:8], 'little') + 8} bytes, "
                                       f"got {len(data)}")
    try:
        sound = soundfile.SoundFile(io.BytesIO(data))
    except (soundfile.SoundFileError, RuntimeError, TypeError) as err:
        raise DecodeError("undecodable", f"{type(err).__name__}: {err}") from None
    with sound:
        rate, total = sound.samplerate, sound.frames
        if rate <= 0 or total <= 0:
            raise DecodeError("empty", f"{total} frames at {rate} Hz")
        start = min(max(int(round(start_s * rate)), 0), total - 1)
        wanted = total - start if span_s is None else min(max(int(round(span_s * rate)), 1), total - start)
        try:
            if start:
                sound.seek(start)
            samples = sound.read(wanted, dtype="float32", always_2d=True)
        except (soundfile.SoundFileError, RuntimeError) as err:
            raise DecodeError("truncated", f"{type(err).__name__}: {err}") from None
    if len(samples) < wanted * (1 - _SHORT_READ_TOLERANCE):
        raise DecodeError("truncated", f"read {len(samples)} of {wanted} frames")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    return np.ascontiguousarray(mono), rate


@functools.lru_cache(maxsize=32)
def _sinc_kernels(up: int, down: int, zero_crossings: int, rolloff: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filters [up, 1, down + 2*pad] (built in float64) and the left padding `pad`.

    Output sample q*up + i sits at input time q*down + i*down/up; phase i's filter holds the
    Kaiser-windowed sinc taps at input offsets -pad .. down + pad - 1 from q*down.
    """
    cutoff = rolloff * min(1.0, up / down)  # in cycles per input sample, relative to its Nyquist
    half_width = zero_crossings / cutoff  # in input samples
    pad = math.ceil(half_width)
    offsets = torch.arange(-pad, down + pad, dtype=torch.float64)
    phase_time = torch.arange(up, dtype=torch.float64)[:, None] * down / up
    tau = phase_time - offsets[None, :]
    inside = tau.abs() <= half_width
    window = torch.special.i0(_KAISER_BETA * torch.sqrt((1 - (tau / half_width) ** 2).clamp(min=0)))
    window = window / torch.special.i0(torch.tensor(_KAISER_BETA, dtype=torch.float64))
    taps = cutoff * torch.sinc(cutoff * tau) * window * inside
    return taps[:, None, :].to(dtype), pad


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 16,
             rolloff: float = 0.95) -> torch.Tensor:
    """Band-limited resampling of [..., T] float samples by the exact ratio new_rate / orig_rate.

    Returns ceil(T * new_rate / orig_rate) samples; the signal is taken as zero outside [0, T).
    """
    if orig_rate == new_rate:
        return wave
    if orig_rate < 1 or new_rate < 1:
        raise ValueError(f"orig_rate, new_rate: must be positive, got {orig_rate}, {new_rate}")
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    length = wave.shape[-1]
    n_out = -(-length * up // down)
    if length == 0:
        return wave.new_zeros(*wave.shape[:-1], 0)
    kernels, pad = _sinc_kernels(up, down, zero_crossings, rolloff, wave.dtype)
    blocks = -(-n_out // up)
    needed = (blocks - 1) * down + kernels.shape[-1]
    flat = wave.reshape(-1, 1, length)
    padded = F.pad(flat, (pad, max(needed - length - pad, 0)))
    out = F.conv1d(padded, kernels, stride=down)  # [B, up, blocks]: phase i of block q
    return out.transpose(1, 2).reshape(*wave.shape[:-1], blocks * up)[..., :n_out]


def hz_to_mel(freq: torch.Tensor, scale: str) -> torch.Tensor:
    """Hz → mel on the Slaney (linear to 1 kHz, then logarithmic) or HTK scale."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + freq / 700.0)
    above = _SLANEY_BREAK_MEL + torch.log(freq.clamp(min=1e-9) / _SLANEY_BREAK_HZ) / _SLANEY_LOG_STEP
    return torch.where(freq < _SLANEY_BREAK_HZ, freq * _SLANEY_BREAK_MEL / _SLANEY_BREAK_HZ, above)


def mel_to_hz(mel: torch.Tensor, scale: str) -> torch.Tensor:
    """Mel → Hz, the inverse of hz_to_mel."""
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    above = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return torch.where(mel < _SLANEY_BREAK_MEL, mel * _SLANEY_BREAK_HZ / _SLANEY_BREAK_MEL, above)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float = 0.0,
                   scale: str = "slaney") -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] float64 triangular filters, each scaled to unit area (Slaney norm).

    Cached and shared between calls: treat the result as read-only.
    """
    fft_freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, hi = torch.tensor([f_min, f_max or sample_rate / 2], dtype=torch.float64)
    mel_lo, mel_hi = float(hz_to_mel(lo, scale)), float(hz_to_mel(hi, scale))
    edges = mel_to_hz(torch.linspace(mel_lo, mel_hi, n_mels + 2, dtype=torch.float64), scale)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (fft_freqs - left) / (centre - left)
    falling = (right - fft_freqs) / (right - centre)
    triangles = torch.minimum(rising, falling).clamp(min=0.0)
    return triangles * (2.0 / (right - left))


def log_mel(wave: torch.Tensor, cfg: LogMelConfig) -> torch.Tensor:
    """Whisper log-mel of [T] samples at cfg.sample_rate: [n_mels, T // hop] float32, about in [-1, 1.5].

    Frame k covers the window centred on sample k * hop (reflect-padded at the ends).
    """
    frames = wave.shape[-1] // cfg.hop_length
    if frames < 1:
        raise ValueError(f"wave: {wave.shape[-1]} samples is shorter than one hop ({cfg.hop_length})")
    wave = wave.float()
    if wave.shape[-1] <= cfg.n_fft // 2:  # reflect padding needs more samples than it pads; zeros are silence
        wave = F.pad(wave, (0, cfg.n_fft // 2 + 1 - wave.shape[-1]))
    window = torch.hann_window(cfg.n_fft, dtype=wave.dtype)
    spectrum = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    power = spectrum[:, :frames].abs().square()  # drops the last frame, centred past the end (as Whisper)
    filters = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max, cfg.mel_scale)
    logs = (filters.to(power.dtype) @ power).clamp(min=_LOG_FLOOR).log10()
    logs = torch.maximum(logs, logs.max() - cfg.dynamic_range)
    return (logs + 4.0) / 4.0


def decode_audio(data: bytes, cfg: LogMelConfig, start_s: float = 0.0, span_s: float | None = None) -> torch.Tensor:
    """Audio bytes → log-mel [n_mels, frames] of the [start_s, start_s + span_s) crop at cfg.sample_rate."""
    samples, rate = read_audio(data, start_s, span_s)
    wave = resample(torch.from_numpy(samples), rate, cfg.sample_rate,
                    zero_crossings=cfg.resample_zero_crossings, rolloff=cfg.resample_rolloff)
    if wave.shape[-1] < cfg.hop_length:
        raise DecodeError("empty", f"{wave.shape[-1]} samples, less than one {cfg.hop_length}-sample hop")
    return log_mel(wave, cfg)


def spec_augment_masks(n_mels: int, frames: int, cfg: SpecAugmentConfig,
                       rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool masks (frequency [n_mels], time [frames]) of the bands SpecAugment hides, drawn from `rng`."""
    time_cap = min(cfg.time_width, int(cfg.time_fraction * frames))
    freq = _band_mask(n_mels, cfg.freq_masks, min(cfg.freq_width, n_mels), rng)
    time = _band_mask(frames, cfg.time_masks, time_cap, rng)
    return freq, time


def _band_mask(length: int, count: int, max_width: int, rng: np.random.Generator) -> torch.Tensor:
    """Union of `count` bands, each of width uniform in [0, max_width] at a uniform start that fits."""
    widths = rng.integers(0, max_width + 1, size=count)
    starts = (rng.random(count) * (length - widths + 1)).astype(np.int64)
    position = np.arange(length)[:, None]
    return torch.from_numpy(((position >= starts) & (position < starts + widths)).any(axis=1))


def spec_augment(mel: torch.Tensor, cfg: SpecAugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """A copy of log-mel [n_mels, frames] with SpecAugment bands set to the clip's mean."""
    freq, time = spec_augment_masks(mel.shape[0], mel.shape[1], cfg, rng)
    hidden = freq[:, None] | time[None, :]
    return mel.masked_fill(hidden, float(mel.mean()) if mel.numel() else 0.0)
