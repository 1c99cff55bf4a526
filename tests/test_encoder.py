"""Packed encoder: one packed pass equals per-sample passes (values and gradients); empty streams run."""

from __future__ import annotations

import pytest
import torch

from plait.data.sizing import SizingConfig
from plait.trainer.bench.model import make_batch
from plait.trainer.model.config import EncoderConfig, ModelConfig, MoMEConfig
from plait.trainer.model.encoder import Encoder, standardize_per_sample
from plait.trainer.model.mome import MoMELayer, RoutingContext

SPECS = [(0, (1, 3, 5), 4), (1, (1, 4, 6), 3), (2, (2, 2, 3), 5), (0, (1, 1, 1), 2), (1, (1, 2, 2), 1)]
"""image, audio, video, a one-patch image, a short audio clip."""
SIZING = SizingConfig(patch_size=4, audio_patch=4)
"""4x4 vision patches over 2-frame tubelets, 4x4 log-mel patches."""


def _encoder(**enc) -> tuple[Encoder, ModelConfig]:
    cfg = ModelConfig(encoder=EncoderConfig(dim=32, depth=2, num_heads=4, ffn_hidden=48, mome_layers=[0, 1], **enc),
                      mome=MoMEConfig(init="fresh", init_std=0.2))
    torch.manual_seed(0)
    return Encoder(cfg.encoder, cfg.mome, SIZING, RoutingContext()), cfg


def _loss(encoder: Encoder, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = encoder(batch)
    weight = torch.linspace(-1, 1, out.tokens.shape[1])
    return (out.tokens * weight).sum(), out.tokens


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_per_sample(checkpointing):
    encoder, cfg = _encoder(activation_checkpointing=checkpointing)
    batch = make_batch(SPECS, cfg, SIZING, seed=0)
    loss, tokens = _loss(encoder, batch)
    packed_grads = torch.autograd.grad(loss, list(encoder.parameters()), allow_unused=True)
    out = encoder(batch)
    total = 0
    for i in range(len(SPECS)):
        stream = "audio" if SPECS[i][0] == 1 else "vision"
        rows = out.seg == i
        one = make_batch([SPECS[i]], cfg, SIZING, seed=0)
        # Same patches as sample i of the packed batch.
        source = batch.streams[stream]
        one.streams[stream].patches = source.patches[source.seg == i]
        single_loss, single_tokens = _loss(encoder, one)
        torch.testing.assert_close(single_tokens, tokens[rows], atol=1e-5, rtol=1e-5)
        total = total + single_loss
    single_grads = torch.autograd.grad(total, list(encoder.parameters()), allow_unused=True)
    for (name, _), got, want in zip(encoder.named_parameters(), single_grads, packed_grads):
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_token_modalities_and_order():
    encoder, cfg = _encoder()
    out = encoder(make_batch(SPECS, cfg, SIZING, seed=0))
    # vision stream first (samples 0, 2, 3), then audio (1, 4); codes: image 1, audio 2, video 3.
    lengths = [15, 12, 1, 24, 4]
    assert out.seg.tolist() == sum(([s] * n for s, n in zip([0, 2, 3, 1, 4], lengths)), [])
    assert out.modality.tolist() == sum(([c] * n for c, n in zip([1, 3, 1, 2, 2], lengths)), [])


def test_mome_layers_route_by_token_modality():
    encoder, cfg = _encoder()
    assert all(isinstance(block.ffn, MoMELayer) for block in encoder.blocks)
    context = encoder.blocks[0].ffn.context
    with context.record() as outputs:
        out = encoder(make_batch(SPECS, cfg, SIZING, seed=0))
    assert len(outputs) == 2 and torch.equal(outputs[0].modality, out.modality)


def test_missing_stream_and_empty_batch_run_every_module():
    encoder, cfg = _encoder()
    only_images = make_batch([SPECS[0], SPECS[3]], cfg, SIZING, seed=1)
    assert "audio" not in only_images.streams
    assert encoder(only_images).tokens.shape == (16, 32)
    out = encoder(make_batch([], cfg, SIZING, seed=1))
    assert out.tokens.shape == (0, 32)
    out.tokens.sum().backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_tail_padding_is_ignored():
    encoder, cfg = _encoder()
    batch = make_batch(SPECS, cfg, SIZING, seed=0)
    base = encoder(batch).tokens
    vision = batch.streams["vision"]
    vision.patches = torch.cat([vision.patches, torch.randn(3, vision.patches.shape[1])])
    vision.coords = torch.cat([vision.coords, torch.zeros(3, 3, dtype=torch.long)])
    vision.seg = torch.cat([vision.seg, torch.full((3,), -1)])
    vision.num_padding = 3
    torch.testing.assert_close(encoder(batch).tokens, base)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        EncoderConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="mome_layers"):
        EncoderConfig(depth=2, mome_layers=[2])


def _reference_standardize(patches: torch.Tensor, seg: torch.Tensor, eps: float) -> torch.Tensor:
    """Float64 per-sample loop: (x - mean(x)) / sqrt(var(x) + eps) over all of one sample's values."""
    out = torch.empty_like(patches, dtype=torch.float64)
    for i in seg.unique().tolist():
        x = patches[seg == i].double()
        out[seg == i] = (x - x.mean()) / torch.sqrt(x.var(correction=0) + eps)
    return out


def test_standardize_per_sample_matches_reference():
    gen = torch.Generator().manual_seed(0)
    seg = torch.tensor([0, 0, 0, 2, 2, 3, 5, 5, 5, 5])
    scale = torch.tensor([1.0, 1, 1, 50, 50, 0.01, 3, 3, 3, 3])[:, None]
    patches = torch.rand(10, 12, generator=gen) * scale + seg[:, None].float()
    patches[5] = 0.25  # a one-token sample with constant values: all zeros, no NaN
    got = standardize_per_sample(patches, seg, num_samples=6, eps=1e-6)
    torch.testing.assert_close(got.double(), _reference_standardize(patches, seg, 1e-6), atol=1e-5, rtol=1e-5)
    assert got.dtype == patches.dtype and torch.equal(got[5], torch.zeros(12))


def test_sample_input_norm_ignores_per_sample_contrast_and_brightness():
    encoder, cfg = _encoder(vision_input_norm="sample")
    batch = make_batch(SPECS, cfg, SIZING, seed=0)
    base = encoder(batch).tokens
    vision = batch.streams["vision"]
    gain, offset = torch.tensor([3.0, 1, 0.2, 0.5, 1]), torch.tensor([0.5, 0, -2.0, 1.0, 0])
    vision.patches = vision.patches * gain[vision.seg, None] + offset[vision.seg, None]
    torch.testing.assert_close(encoder(batch).tokens, base, atol=1e-4, rtol=1e-4)
    raw, _ = _encoder()
    assert not torch.allclose(raw(batch).tokens, base, atol=1e-2)


def test_sample_input_norm_keeps_packing_exact():
    encoder, cfg = _encoder(vision_input_norm="sample")
    batch = make_batch(SPECS, cfg, SIZING, seed=0)
    out = encoder(batch)
    for i, (modality, _, _) in enumerate(SPECS):
        if modality == 1:
            continue
        one = make_batch([SPECS[i]], cfg, SIZING, seed=0)
        one.streams["vision"].patches = batch.streams["vision"].patches[batch.streams["vision"].seg == i]
        torch.testing.assert_close(encoder(one).tokens, out.tokens[out.seg == i], atol=1e-5, rtol=1e-5)
