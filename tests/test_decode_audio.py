"""Audio decoder: exact resampling, log-mel against its formula in float64, SpecAugment, skip reasons."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile
import torch

from plait.data.decode_audio import (LogMelConfig, SpecAugmentConfig, decode_audio, hz_to_mel, log_mel,
                                     mel_filterbank, read_audio, resample, spec_augment, spec_augment_masks)
from plait.data.decode_errors import DecodeError
from plait.data.demo import DTMF_HZ, make_audio
from plait.data.rng import keyed_rng


def _encode(wave: np.ndarray, rate: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave.astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def _resample_reference(x: np.ndarray, orig: int, new: int, zero_crossings: int = 16,
                        rolloff: float = 0.95) -> np.ndarray:
    """y[n] = sum_k x[k] h(n*orig/new - k), h a Kaiser-windowed sinc at the lower Nyquist (float64)."""
    g = math.gcd(orig, new)
    up, down = new // g, orig // g
    cutoff = rolloff * min(1.0, up / down)
    half = zero_crossings / cutoff
    k = np.arange(len(x))
    out = np.empty(-(-len(x) * up // down))
    for n in range(len(out)):
        tau = n * down / up - k
        window = np.i0(8.6 * np.sqrt(np.clip(1 - (tau / half) ** 2, 0, None))) / np.i0(8.6)
        out[n] = np.sum(x * cutoff * np.sinc(cutoff * tau) * window * (np.abs(tau) <= half))
    return out


@pytest.mark.parametrize(("orig", "new"), [(44100, 16000), (8000, 16000), (48000, 16000), (16000, 22050)])
def test_resample_matches_float64_formula(orig: int, new: int) -> None:
    x = np.random.default_rng(orig).standard_normal(400)
    expected = _resample_reference(x, orig, new)
    got64 = resample(torch.from_numpy(x), orig, new)
    assert got64.shape == expected.shape
    np.testing.assert_allclose(got64.numpy(), expected, atol=1e-10)
    got32 = resample(torch.from_numpy(x).float(), orig, new)
    np.testing.assert_allclose(got32.numpy(), expected, atol=2e-5)
    batched = resample(torch.from_numpy(np.stack([x, -x])), orig, new)
    np.testing.assert_allclose(batched[1].numpy(), -expected, atol=1e-10)


def _peak_hz(wave: np.ndarray, rate: int) -> tuple[float, float]:
    """Frequency and amplitude of the strongest Hann-windowed spectral line."""
    window = np.hanning(len(wave))
    spectrum = np.abs(np.fft.rfft(wave * window)) * 2 / window.sum()
    peak = int(spectrum.argmax())
    return peak * rate / len(wave), float(spectrum[peak])


@pytest.mark.parametrize(("rate", "fmt"), [(8000, "FLAC"), (44100, "WAV"), (44100, "FLAC")])
def test_file_resampled_to_16k_keeps_frequency_and_level(rate: int, fmt: str) -> None:
    data = _encode(_tone(1000.0, rate, 1.0), rate, fmt)
    samples, native = read_audio(data)
    assert native == rate
    wave = resample(torch.from_numpy(samples), rate, 16000).numpy()
    assert len(wave) == 16000
    freq, level = _peak_hz(wave[2000:-2000], 16000)
    assert abs(freq - 1000.0) <= 16000 / 12000  # within one FFT bin
    assert abs(level - 0.5) < 0.01


def test_downsampling_removes_tones_above_the_new_nyquist() -> None:
    x = _tone(12000.0, 44100, 0.5) + _tone(3000.0, 44100, 0.5, 0.1)
    y = resample(torch.from_numpy(x), 44100, 16000).numpy()[1000:-1000]
    freq, level = _peak_hz(y, 16000)
    assert abs(freq - 3000.0) < 3 and abs(level - 0.1) < 0.005  # the 12 kHz tone did not alias to 4 kHz
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y)))) * 2 / np.hanning(len(y)).sum()
    alias = spectrum[int(3900 * len(y) / 16000):int(4100 * len(y) / 16000)].max()
    assert alias < 0.5 * 1e-3  # > 60 dB below the 0.5 input level


def _slaney_mel(freq: float) -> float:
    return 3 * freq / 200 if freq < 1000 else 15 + math.log(freq / 1000) * 27 / math.log(6.4)


def _slaney_hz(mel: float) -> float:
    return 200 * mel / 3 if mel < 15 else 1000 * math.exp((mel - 15) * math.log(6.4) / 27)


def _filterbank_reference(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangles between consecutive mel-spaced edges, each divided by half its Hz width (loops)."""
    top = _slaney_mel(rate / 2)
    edges = [_slaney_hz(top * i / (n_mels + 1)) for i in range(n_mels + 2)]
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        for b in range(n_fft // 2 + 1):
            f = b * rate / n_fft
            weight = min((f - left) / (centre - left), (right - f) / (right - centre))
            bank[m, b] = max(weight, 0.0) * 2 / (right - left)
    return bank


def _log_mel_reference(x: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """Straight from the formula in float64: framed DFT power · mel filters → log10, Whisper clamp/scale."""
    n_fft, hop = cfg.n_fft, cfg.hop_length
    padded = np.pad(x, n_fft // 2, mode="reflect")
    frames = len(x) // hop
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    segments = np.stack([padded[k * hop:k * hop + n_fft] * window for k in range(frames)])
    bins = np.arange(n_fft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft), bins) / n_fft)
    power = np.abs(segments @ dft) ** 2
    mel = _filterbank_reference(cfg.sample_rate, n_fft, cfg.n_mels) @ power.T
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - 8.0)
    return (logs + 4.0) / 4.0


def test_slaney_scale_constants() -> None:
    assert float(hz_to_mel(torch.tensor(1000.0, dtype=torch.float64), "slaney")) == pytest.approx(15.0)
    assert float(hz_to_mel(torch.tensor(6400.0, dtype=torch.float64), "slaney")) == pytest.approx(42.0)
    assert float(hz_to_mel(torch.tensor(1000.0, dtype=torch.float64), "htk")) == pytest.approx(999.99, abs=0.1)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_matches_formula(n_mels: int) -> None:
    bank = mel_filterbank(16000, 400, n_mels)
    np.testing.assert_allclose(bank.numpy(), _filterbank_reference(16000, 400, n_mels), rtol=1e-9, atol=1e-12)


def test_log_mel_matches_float64_reference() -> None:
    cfg = LogMelConfig()
    rng = np.random.default_rng(3)
    x = _tone(440.0, 16000, 0.4) + _tone(2500.0, 16000, 0.4, 0.2) + 0.01 * rng.standard_normal(6400)
    x[3000:3500] = 0.0  # a silent stretch exercises the dynamic-range clamp
    got = log_mel(torch.from_numpy(x).float(), cfg)
    expected = _log_mel_reference(x, cfg)
    assert got.shape == expected.shape == (80, 40) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=5e-5)


def test_decode_audio_of_demo_dtmf_peaks_in_the_right_mel_bins() -> None:
    data, _, extra = make_audio(5, keyed_rng(0, "test-audio"))
    cfg = LogMelConfig(n_mels=128)
    mel = decode_audio(data, cfg)
    assert mel.shape == (128, int(extra["duration"] * 16000) // 160)
    bank = mel_filterbank(16000, 400, 128)
    profile = mel.mean(dim=1)
    for freq in DTMF_HZ[5]:
        expected_bin = int(bank[:, round(freq * 400 / 16000)].argmax())
        assert profile[expected_bin] > profile.median() + 0.5


def test_decode_audio_crop_reads_only_the_window() -> None:
    rate = 44100
    wave = np.concatenate([_tone(500.0, rate, 1.0), _tone(3000.0, rate, 1.0)])
    data = _encode(wave, rate, "FLAC")
    samples, _ = read_audio(data, start_s=1.25, span_s=0.5)
    assert len(samples) == rate // 2
    np.testing.assert_allclose(samples, wave[int(1.25 * rate):int(1.75 * rate)], atol=1e-4)
    mel = decode_audio(data, LogMelConfig(), start_s=1.25, span_s=0.5)
    assert mel.shape == (80, 50)


def test_stereo_is_averaged_to_mono() -> None:
    stereo = np.stack([_tone(300.0, 16000, 0.2), np.zeros(3200)], axis=1)
    buf = io.BytesIO()
    soundfile.write(buf, stereo, 16000, format="WAV", subtype="FLOAT")
    samples, _ = read_audio(buf.getvalue())
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(("make", "reason"), [
    (lambda flac, wav: b"", "empty"),
    (lambda flac, wav: b"not audio at all" * 20, "undecodable"),
    (lambda flac, wav: flac[: len(flac) // 2], "truncated"),
    (lambda flac, wav: wav[: len(wav) // 2], "truncated"),
    (lambda flac, wav: _encode(np.zeros(50), 16000, "WAV"), "empty"),
])
def test_bad_audio_raises_with_reason(make, reason: str) -> None:
    x = 0.3 * np.random.default_rng(0).standard_normal(16000)
    data = make(_encode(x, 16000, "FLAC"), _encode(x, 16000, "WAV"))
    with pytest.raises(DecodeError) as err:
        decode_audio(data, LogMelConfig())
    assert err.value.reason == reason


def test_spec_augment_masks_bands_deterministically() -> None:
    cfg = SpecAugmentConfig(freq_masks=1, freq_width=10, time_masks=2, time_width=30, time_fraction=0.2)
    mel = torch.randn(80, 300)
    first = spec_augment(mel, cfg, keyed_rng(7, "specaug", "clip-a"))
    again = spec_augment(mel, cfg, keyed_rng(7, "specaug", "clip-a"))
    other = spec_augment(mel, cfg, keyed_rng(7, "specaug", "clip-b"))
    assert torch.equal(first, again) and not torch.equal(first, other)
    freq, time = spec_augment_masks(80, 300, cfg, keyed_rng(7, "specaug", "clip-a"))
    hidden = freq[:, None] | time[None, :]
    assert torch.all(first[hidden] == mel.mean()) and torch.equal(first[~hidden], mel[~hidden])
    freq_widths, time_widths = set(), set()
    for clip in range(300):
        freq, time = spec_augment_masks(80, 300, cfg, keyed_rng(7, "specaug", clip))
        rows = torch.nonzero(freq).flatten()
        if len(rows):  # one frequency band: contiguous
            assert int(rows[-1] - rows[0]) + 1 == len(rows)
        freq_widths.add(len(rows))
        time_widths.add(int(time.sum()))
    assert freq_widths == set(range(11))  # every width 0..F occurs, never more
    assert max(time_widths) <= 2 * 30 and max(time_widths) > 30


def test_spec_augment_time_masks_respect_fraction_of_short_clips() -> None:
    cfg = SpecAugmentConfig(freq_masks=0, time_masks=1, time_width=100, time_fraction=0.1)
    widths = {int(spec_augment_masks(80, 50, cfg, keyed_rng(1, i))[1].sum()) for i in range(100)}
    assert widths == set(range(6))


def test_configs_validate() -> None:
    with pytest.raises(ValueError, match="n_mels"):
        LogMelConfig(n_mels=0)
    with pytest.raises(ValueError, match="f_min"):
        LogMelConfig(f_min=9000.0)
    with pytest.raises(ValueError, match="time_fraction"):
        SpecAugmentConfig(time_fraction=1.5)
