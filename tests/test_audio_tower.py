"""Whisper audio tower: packed clips equal Hugging Face's per-clip encoder; front end and config checks."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from plait.data.batch import PackedStream
from plait.data.decode_audio import log_mel
from plait.data.packing import PackingConfig, PatchedSample, pack_samples
from plait.data.patchify import patchify_audio, patchify_image
from plait.data.preprocess import log_mel_config
from plait.data.sizing import SizingConfig
from plait.trainer.model.audio_tower import AudioTower, check_audio_tower, whisper_front_end

N_MELS, PATCH = 16, 8
SIZING = SizingConfig(n_mels=N_MELS, audio_patch=PATCH, max_audio_seconds=1.2)
"""16 mel bins in 8x8 patches; clips of at most 120 frames fit the tiny model's 64 positions (128 frames)."""
CLIP_FRAMES = (16, 48, 32)
OUT_DIM = 24


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random WhisperForConditionalGeneration and its feature extractor, saved as a hub repo is."""
    config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=N_MELS,
                           max_source_positions=64, max_target_positions=16, vocab_size=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("whisper")
    WhisperForConditionalGeneration(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=N_MELS).save_pretrained(out)
    return out


def _clip_encoder(whisper_dir: Path, weights: dict[str, torch.Tensor], frames: int) -> WhisperEncoder:
    """The checkpoint's encoder with max_source_positions = frames / 2 (HF's encoder takes exactly that many)."""
    weights = {**weights, "embed_positions.weight": weights["embed_positions.weight"][: frames // 2]}
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(whisper_dir, max_source_positions=frames // 2))
    encoder.load_state_dict(weights)
    return encoder.eval()


def _audio_batch(mels: list[torch.Tensor], num_kept: int | None = None):
    """An image then the clips, packed: the clips sit at batch positions 1.. of the audio stream."""
    image, coords = patchify_image(torch.rand(3, 32, 32), 2, 2, 16, 2)
    samples = [PatchedSample("img", "image", image, coords, torch.zeros(1, dtype=torch.long))]
    for i, mel in enumerate(mels):
        patches, coords = patchify_audio(mel, mel.shape[1] // PATCH, PATCH)
        samples.append(PatchedSample(f"a{i}", "audio", patches, coords, torch.zeros(1, dtype=torch.long),
                                     num_kept=num_kept))
    return pack_samples(samples, PackingConfig(max_tokens=64, tail_padding="multiple"))


def test_packed_clips_equal_hf_encoder_per_clip(whisper_dir):
    tower = AudioTower(str(whisper_dir), SIZING, OUT_DIM).eval()
    generator = torch.Generator().manual_seed(1)
    mels = [torch.rand(N_MELS, n, generator=generator) * 2 - 1 for n in CLIP_FRAMES]
    weights = WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.encoder.state_dict()
    with torch.no_grad():
        tokens, seg = tower(_audio_batch(mels).streams["audio"])
        assert tokens.shape == (sum(CLIP_FRAMES) // 2, OUT_DIM)
        assert seg.tolist() == [i + 1 for i, n in enumerate(CLIP_FRAMES) for _ in range(n // 2)]
        for i, mel in enumerate(mels):
            hidden = _clip_encoder(whisper_dir, weights, mel.shape[1])(input_features=mel[None]).last_hidden_state[0]
            want = hidden @ tower.proj.weight.T + tower.proj.bias
            torch.testing.assert_close(tokens[seg == i + 1], want, atol=1e-5, rtol=1e-5)


def test_loads_encoder_only_and_architecture_only(whisper_dir, tmp_path):
    reference = WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.encoder.state_dict()
    WhisperForConditionalGeneration.from_pretrained(whisper_dir).model.encoder.save_pretrained(tmp_path)
    loaded = AudioTower(str(tmp_path), SIZING, OUT_DIM).encoder
    built = AudioTower(str(whisper_dir), SIZING, OUT_DIM, load_weights=False).encoder
    assert loaded.config._attn_implementation == built.config._attn_implementation == "plait_varlen"
    for name, value in reference.items():
        assert torch.equal(loaded.state_dict()[name], value), name
        assert built.state_dict()[name].shape == value.shape, name
    assert not torch.equal(built.conv1.weight, reference["conv1.weight"])


def test_empty_stream_runs_every_module(whisper_dir):
    tower = AudioTower(str(whisper_dir), SIZING, OUT_DIM)
    called = set()
    for name, module in tower.named_modules():
        if not list(module.children()):
            module.register_forward_hook(lambda m, args, out, name=name: called.add(name))
    empty = torch.zeros(0, dtype=torch.long)
    stream = PackedStream(patches=torch.zeros(0, PATCH * PATCH), coords=empty.view(0, 1).expand(0, 3), seg=empty,
                          cu_seqlens=torch.zeros(1, dtype=torch.int32), max_seqlen=0, samples=empty,
                          grids=torch.zeros(0, 3, dtype=torch.long), kept=empty)
    tokens, seg = tower(stream)
    assert tokens.shape == (0, OUT_DIM) and seg.shape == (0,)
    tokens.sum().backward()
    assert called == {name for name, m in tower.named_modules() if not list(m.children())}
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)


def test_dropped_audio_tokens_raise(whisper_dir):
    tower = AudioTower(str(whisper_dir), SIZING, OUT_DIM)
    batch = _audio_batch([torch.rand(N_MELS, 16)], num_kept=3)
    with pytest.raises(ValueError, match=r"data\.token_drop\.modalities"):
        tower(batch.streams["audio"])


def test_front_end_and_check(whisper_dir):
    assert whisper_front_end(str(whisper_dir)) == {"n_mels": N_MELS, "hop_ms": 10.0, "sample_rate": 16000,
                                                   "n_fft": 400}
    check_audio_tower(str(whisper_dir), SIZING)


@pytest.mark.parametrize("change", [{"n_mels": 32}, {"hop_ms": 20.0}, {"max_audio_seconds": 2.0}, {"audio_patch": 1}])
def test_check_rejects_mismatches(whisper_dir, change):
    field = next(iter(change))
    with pytest.raises(ValueError, match=rf"data\.sizing\.{field}"):
        check_audio_tower(str(whisper_dir), replace(SIZING, **change))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    time = torch.arange(16000) / 16000
    wave = 0.3 * torch.sin(2 * math.pi * 440 * time) + 0.05 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    ours = log_mel(wave, log_mel_config(SizingConfig(n_mels=n_mels, audio_patch=16)))
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    unpadded = extractor(wave.numpy(), sampling_rate=16000, padding="longest", return_tensors="pt").input_features[0]
    padded = extractor(wave.numpy(), sampling_rate=16000, return_tensors="pt").input_features[0]
    torch.testing.assert_close(ours, unpadded.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[:, :-1], padded[:, : ours.shape[1] - 1].float(), atol=1e-5, rtol=0)
    assert (ours[:, -1] - padded[:, ours.shape[1] - 1]).abs().max() > 1e-3
