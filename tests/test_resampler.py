"""Perceiver resampler: packed over many samples equals one sample at a time (values and gradients)."""

from __future__ import annotations

import torch

from plait.trainer.model.config import ResamplerConfig
from plait.trainer.model.resampler import Resampler

ENC, LLM, EMBED = 24, 40, 12


def _resampler() -> Resampler:
    torch.manual_seed(0)
    cfg = ResamplerConfig(dim=32, depth=2, num_latents=5, num_heads=4, ffn_hidden=48)
    return Resampler(cfg, ENC, LLM, EMBED)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of 4 samples (9, 0, 17, 3 tokens) in scrambled order, as two encoder streams would give them."""
    gen = torch.Generator().manual_seed(seed)
    seg = torch.repeat_interleave(torch.tensor([0, 2, 3]), torch.tensor([9, 17, 3]))
    seg = seg[torch.randperm(seg.numel(), generator=gen)]
    return torch.randn(seg.numel(), ENC, generator=gen), seg


def _longest(seg: torch.Tensor) -> int:
    """Most tokens of one sample (what the batch hands the resampler from the host)."""
    return int(seg.unique(return_counts=True)[1].max())


def _loss(out) -> torch.Tensor:
    return (out.latents * torch.linspace(-1, 1, LLM)).sum() + (out.media_embeds * torch.linspace(1, 2, EMBED)).sum()


def test_packed_equals_per_sample_values_and_gradients():
    model = _resampler()
    tokens, seg = _inputs()
    params = list(model.parameters())
    packed = model(tokens, seg, 4, _longest(seg))
    assert packed.latents.shape == (4, 5, LLM) and packed.media_embeds.shape == (4, EMBED)
    packed_grads = torch.autograd.grad(_loss(packed), params)
    total = 0
    for i in range(4):
        rows = seg == i
        one = model(tokens[rows], torch.zeros(int(rows.sum()), dtype=torch.long), 1, int(rows.sum()))
        torch.testing.assert_close(one.latents[0], packed.latents[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(one.media_embeds[0], packed.media_embeds[i], atol=1e-5, rtol=1e-5)
        total = total + _loss(one)
    for got, want in zip(torch.autograd.grad(total, params), packed_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_latents_only_see_their_own_sample():
    model = _resampler()
    tokens, seg = _inputs()
    base = model(tokens, seg, 4, _longest(seg)).latents
    moved = tokens.clone()
    moved[seg == 2] += 1.0
    out = model(moved, seg, 4, _longest(seg)).latents
    assert torch.allclose(out[[0, 1, 3]], base[[0, 1, 3]], rtol=0, atol=1e-5) and not torch.allclose(out[2], base[2])


def test_zero_samples_keep_every_parameter_in_the_graph():
    model = _resampler()
    out = model(torch.zeros(0, ENC), torch.zeros(0, dtype=torch.long), 0, 0)
    assert out.latents.shape == (0, 5, LLM) and out.media_embeds.shape == (0, EMBED)
    _loss(out).backward()
    assert all(p.grad is not None for p in model.parameters())
