"""Perceiver resampler (Flamingo): K learned latents per sample cross-attend to that sample's encoder tokens.

Keys and values are [sample's media tokens ; its latents] (as in Flamingo), so a sample without media
tokens still attends to something. All samples run in one packed varlen-attention call per layer.
Outputs the latents projected to the LLM width, `[N, K, d_llm]`, and a pooled media embedding for
the contrastive head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.ops.attention import Backend, varlen_attention
from plait.ops.segments import concat_segments_index, index_counts, lengths_to_cu
from plait.trainer.model.config import ResamplerConfig
from plait.trainer.model.encoder import FeedForward


class ResamplerLayer(nn.Module):
    """Latents attend to [media ; latents] of their own sample, then a gated FFN; both pre-norm residual."""

    def __init__(self, cfg: ResamplerConfig, backend: Backend) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_latents = cfg.num_latents
        self.head_dim = cfg.dim // cfg.num_heads
        self.backend = backend
        self.media_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.latent_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.to_q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.to_out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(
        self, latents: torch.Tensor, cu_latents: torch.Tensor, media: torch.Tensor, cu_media: torch.Tensor,
        max_media: int,
    ) -> torch.Tensor:
        """Updated packed latents `[N*K, dim]` given packed media tokens `[T, dim]` grouped by sample.

        `max_media` (host-side) is the most media tokens of one sample.
        """
        queries = self.latent_norm(latents)
        index, cu_keys = concat_segments_index(cu_media, cu_latents, media.shape[0], latents.shape[0])
        keys = torch.cat([self.media_norm(media), queries])[index]
        q = self.to_q(queries).view(queries.shape[0], self.num_heads, self.head_dim)
        k, v = self.to_kv(keys).view(keys.shape[0], 2, self.num_heads, self.head_dim).unbind(1)
        attn = varlen_attention(q, k, v, cu_latents, cu_keys, max_seqlen_q=self.num_latents,
                                max_seqlen_k=max_media + self.num_latents, backend=self.backend)
        latents = latents + self.to_out(attn.reshape(latents.shape))
        return latents + self.ffn(self.ffn_norm(latents))


class LearnedLatents(nn.Module):
    """The K learned latent queries, repeated for N samples.

    A module of its own (not a bare parameter of `Resampler`) so that ZeRO-3 gathers it around its own
    forward and backward; as a direct parameter of a module with children its gradient arrived after
    DeepSpeed had re-partitioned it.
    """

    def __init__(self, num_latents: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_latents, dim) * 0.02)

    def forward(self, num_samples: int) -> torch.Tensor:
        """Packed latents `[N*K, dim]`, sample by sample."""
        k, dim = self.weight.shape
        return self.weight.unsqueeze(0).expand(num_samples, k, dim).reshape(num_samples * k, dim)


@dataclass
class ResamplerOutput:
    """Fixed-size media summaries of the micro-batch's samples."""

    latents: torch.Tensor
    """[N, K, d_llm] latents in the LLM's input width (its soft prompt)."""
    media_embeds: torch.Tensor
    """[N, embed_dim] pooled media embedding (not normalised) for the contrastive loss."""


class Resampler(nn.Module):
    """Encoder tokens (any count per sample) -> K latents per sample + a pooled media embedding."""

    def __init__(
        self, cfg: ResamplerConfig, encoder_dim: int, llm_dim: int, embed_dim: int, backend: Backend = "auto"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(encoder_dim, cfg.dim)
        self.latents = LearnedLatents(cfg.num_latents, cfg.dim)
        self.layers = nn.ModuleList(ResamplerLayer(cfg, backend) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.dim, llm_dim)
        self.media_head = nn.Linear(cfg.dim, embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor, seg: torch.Tensor, num_samples: int, max_media: int) -> ResamplerOutput:
        """Resample encoder `tokens [T, encoder_dim]` owned by samples `seg [T]` (any order) into N x K latents.

        `max_media` (host-side, `PackedBatch.max_media_tokens`) is the most tokens one sample has.
        """
        order = torch.argsort(seg, stable=True)
        cu_media = lengths_to_cu(index_counts(seg, num_samples))
        media = self.input_proj(tokens[order])
        k = self.cfg.num_latents
        cu_latents = torch.arange(num_samples + 1, device=seg.device) * k
        dim = self.cfg.dim
        latents = self.latents(num_samples)
        for layer in self.layers:
            latents = layer(latents, cu_latents, media, cu_media, max_media)
        latents = self.norm(latents).view(num_samples, k, dim)
        return ResamplerOutput(self.out_proj(latents), self.media_head(latents.mean(dim=1)))
