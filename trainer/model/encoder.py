"""Packed media encoder: per-stream patch embedding + NaViT position embeddings, then pre-norm transformer
blocks over all media tokens of the micro-batch at once, with varlen attention and optional MoME FFNs.
A stream may instead go through a pretrained Hugging Face tower (`vision_tower`, `audio_tower`), also packed.

Vision patches (images and video tubelets) share one projection of 3*tp*p*p values: an image arrives
repeated over the tp frames of a tubelet (as in Qwen2-VL), so it is simply a one-tubelet video.
Audio log-mel patches (p*p values) have their own projection. Both streams are embedded every step,
even when empty, so ZeRO-3 ranks run the same modules in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.data.batch import TOKEN_MODALITIES, PackedBatch, PackedStream, token_code
from plait.data.sizing import SizingConfig
from plait.ops.attention import Backend, varlen_attention
from plait.trainer.model.config import EncoderConfig, MoMEConfig
from plait.trainer.model.mome import MoMELayer, RoutingContext, full_parameters

STREAMS = ("vision", "audio")
"""Encoder streams, in the order their tokens are concatenated."""


class FeedForward(nn.Module):
    """Dense gated FFN, `w_out(act(gate(x)) * up(x))` with gate and up stacked in `w_in`; no biases."""

    def __init__(self, dim: int, hidden: int, activation: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.activation = activation
        self.gated = True

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """FFN of `x [T, D]`; `modality` is accepted (and ignored) to match `MoMELayer`."""
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(self.activation(gate) * up)


class VarlenSelfAttention(nn.Module):
    """Multi-head self-attention over packed sequences (no cross-sequence attention)."""

    def __init__(self, dim: int, num_heads: int, backend: Backend = "auto") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Attention output for `x [T, D]` packed by `cu_seqlens`."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                               backend=self.backend)
        return self.proj(out.reshape(x.shape))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)) (dense or MoME)."""

    def __init__(self, cfg: EncoderConfig, ffn: nn.Module, backend: Backend) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = VarlenSelfAttention(cfg.dim, cfg.num_heads, backend)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = ffn

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, modality: torch.Tensor
    ) -> torch.Tensor:
        """Block output for packed tokens `x [T, D]` with token modality codes `modality [T]`."""
        x = x + self.attn(self.attn_norm(x), cu_seqlens, max_seqlen)
        return x + self.ffn(self.ffn_norm(x), modality)


class StreamEmbedding(nn.Module):
    """Patch projection + factorised learned (t, h, w) position embeddings (summed, NaViT) of one stream."""

    def __init__(self, patch_dim: int, dim: int, max_grid: list[int]) -> None:
        super().__init__()
        self.patch_dim = patch_dim
        self.proj = nn.Linear(patch_dim, dim)
        self.pos_t, self.pos_h, self.pos_w = (nn.Embedding(n, dim) for n in max_grid)
        tables = (self.pos_t, self.pos_h, self.pos_w)
        with full_parameters([t.weight for t in tables], write=True):
            for table in tables:
                nn.init.normal_(table.weight, std=0.02)

    def forward(self, patches: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Embeddings `[T, dim]` of `patches [T, patch_dim]` at grid `coords [T, 3]`."""
        t, h, w = coords.unbind(1)
        return self.proj(patches) + self.pos_t(t) + self.pos_h(h) + self.pos_w(w)


def standardize_per_sample(patches: torch.Tensor, seg: torch.Tensor, num_samples: int, eps: float) -> torch.Tensor:
    """Each sample's patches `[T, P]` minus that sample's mean over all its values, over sqrt(variance + eps).

    Statistics cover the tokens present (after token dropping); two passes keep the variance exact in fp32.
    """
    if patches.numel() == 0:
        return patches
    values = patches.float()
    count = torch.zeros(num_samples, device=values.device).index_add_(
        0, seg, torch.full_like(seg, values.shape[1], dtype=values.dtype))
    mean = torch.zeros(num_samples, device=values.device).index_add_(0, seg, values.sum(1)) / count.clamp(min=1)
    centered = values - mean[seg, None]
    var = torch.zeros(num_samples, device=values.device).index_add_(0, seg, centered.square().sum(1))
    inv_std = torch.rsqrt(var / count.clamp(min=1) + eps)
    return (centered * inv_std[seg, None]).to(patches.dtype)


@dataclass
class EncoderOutput:
    """Encoded media tokens of one micro-batch (vision stream first, then audio; tail padding removed)."""

    tokens: torch.Tensor
    """[T, dim] final-normed token features."""
    seg: torch.Tensor
    """[T] int64 owning sample of each token."""
    modality: torch.Tensor
    """[T] int64 token modality code (`data.batch.TOKEN_MODALITIES`): `token_code` of its sample's media code."""


def _real_part(stream: PackedStream | None, patch_dim: int, like: torch.Tensor) -> PackedStream:
    """The stream without tail padding; an empty stream when absent (ZeRO-3 still runs its modules)."""
    if stream is None:
        empty = torch.zeros(0, dtype=torch.long, device=like.device)
        return PackedStream(
            patches=like.new_zeros(0, patch_dim), coords=empty.view(0, 1).expand(0, 3), seg=empty,
            cu_seqlens=torch.zeros(1, dtype=torch.int32, device=like.device), max_seqlen=0,
            samples=torch.zeros(0, dtype=torch.long), grids=torch.zeros(0, 3, dtype=torch.long),
            kept=torch.zeros(0, dtype=torch.long),
        )
    n = stream.num_tokens
    return replace(stream, patches=unit_float(stream.patches[:n]), coords=stream.coords[:n], seg=stream.seg[:n],
                   num_padding=0)


def unit_float(patches: torch.Tensor) -> torch.Tensor:
    """Patch values as the model takes them: uint8 pixels (how the loader ships images and video, a quarter of the
    bytes) become float32 in [0, 1] where they are (on the device); float values pass through."""
    return patches.to(torch.float32).div_(255.0) if patches.dtype == torch.uint8 else patches


class Encoder(nn.Module):
    """Vision + audio patch streams -> packed transformer passes -> `EncoderOutput`.

    A stream with a pretrained tower (`cfg.vision` / `cfg.audio`) runs through it; the others share one pass of
    plait's own blocks. Patch sizes come from the data's sizing config, the one place the patch geometry lives.
    `load_weights=False` builds the towers' architectures only (a saved plait model brings their weights).
    """

    def __init__(self, cfg: EncoderConfig, mome: MoMEConfig, sizing: SizingConfig,
                 context: RoutingContext | None = None, backend: Backend = "auto", load_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_dims = {"vision": sizing.vision_channels, "audio": sizing.audio_channels}
        self.towers = nn.ModuleDict(_towers(cfg, sizing, backend, load_weights))
        self.native = [name for name in STREAMS if name not in self.towers]
        """Streams plait's own blocks encode."""
        if not self.native:
            return
        for name, grid in (("vision", cfg.vision_max_grid), ("audio", cfg.audio_max_grid)):
            if name in self.native:
                setattr(self, name, StreamEmbedding(self.patch_dims[name], cfg.dim, grid))
        self.modality_embed = nn.Embedding(len(TOKEN_MODALITIES), cfg.dim)
        with full_parameters([self.modality_embed.weight], write=True):
            nn.init.normal_(self.modality_embed.weight, std=0.02)
        self.blocks = nn.ModuleList()
        for i in range(cfg.depth):
            ffn = FeedForward(cfg.dim, cfg.ffn_hidden)
            if i in cfg.mome_layers:
                ffn = MoMELayer.from_dense(ffn, mome, context)
            self.blocks.append(EncoderBlock(cfg, ffn, backend))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, batch: PackedBatch) -> EncoderOutput:
        """Encode every media token of `batch`; samples never attend to each other."""
        like = next(self.parameters())
        parts = {name: _real_part(batch.streams.get(name), self.patch_dims[name], like) for name in STREAMS}
        pieces = [(STREAMS.index(name), *tower(parts[name])) for name, tower in self.towers.items()]
        if self.native:
            pieces.append((STREAMS.index(self.native[0]), *self._native_pass(batch, [parts[n] for n in self.native])))
        pieces.sort(key=lambda piece: piece[0])
        tokens, seg = torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces])
        modality = token_code(batch.modality.to(seg.device)[seg]) if seg.numel() else seg
        return EncoderOutput(tokens, seg, modality)

    def _native_pass(self, batch: PackedBatch, parts: list[PackedStream]) -> tuple[torch.Tensor, torch.Tensor]:
        """plait's own blocks over the native streams, concatenated in stream order: final-normed tokens and seg."""
        if self.cfg.vision_input_norm == "sample" and self.native[0] == "vision":
            vision = parts[0]
            parts[0] = replace(vision, patches=standardize_per_sample(vision.patches, vision.seg, batch.num_samples,
                                                                      self.cfg.norm_eps))
        embeddings = [getattr(self, name) for name in self.native]
        like = embeddings[0].proj.weight
        embedded = [emb(p.patches.to(like.dtype), p.coords) for emb, p in zip(embeddings, parts)]
        seg = torch.cat([p.seg for p in parts])
        modality = token_code(batch.modality.to(seg.device)[seg]) if seg.numel() else seg
        x = torch.cat(embedded) + self.modality_embed(modality)
        cus = [p.cu_seqlens.to(seg.device).long() for p in parts]
        cu_seqlens = torch.cat([cus[0]] + [cu[1:] + cus[0][-1] for cu in cus[1:]])
        max_seqlen = max(p.max_seqlen for p in parts)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cu_seqlens, max_seqlen, modality, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen, modality)
        return self.norm(x), seg


def _towers(cfg: EncoderConfig, sizing: SizingConfig, backend: Backend, load_weights: bool) -> dict[str, nn.Module]:
    """The pretrained towers the config names, by stream (imported only when one is configured)."""
    towers: dict[str, nn.Module] = {}
    if cfg.vision.pretrained:
        from plait.trainer.model.vision_tower import VisionTower

        towers["vision"] = VisionTower(cfg.vision.pretrained, sizing, cfg.dim, cfg.vision_max_grid[0], backend,
                                       load_weights)
    if cfg.audio.pretrained:
        from plait.trainer.model.audio_tower import AudioTower

        towers["audio"] = AudioTower(cfg.audio.pretrained, sizing, cfg.dim, backend, load_weights)
    return towers
