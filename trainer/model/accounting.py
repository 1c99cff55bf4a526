"""Parameter counts and a FLOPs estimate per packed micro-batch (for MFU).

FLOPs count matrix multiplies only: 2 x rows x (in x out) for every weight a token actually goes through
(MoME: the router, k routed experts, the shared expert) and, for attention, 2 x 2 x head_dim x heads per
query-key pair of each real segment (causal: L(L+1)/2 pairs). Embedding lookups, norms and activations
are left out. Training FLOPs = 3 x forward (backward ~ twice the forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from plait.data.batch import PackedBatch
from plait.ops.segments import cu_to_lengths
from plait.trainer.model.llm import decoder_layers
from plait.trainer.model.mome import MoMELayer
from plait.trainer.model.multimodal import MultimodalModel


def numel(p: torch.Tensor) -> int:
    """Full element count, also of a ZeRO-3 partitioned parameter (`ds_numel`)."""
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass
class ParameterCounts:
    """Parameter totals of a model."""

    total: int
    """All parameters."""
    trainable: int
    """Parameters with `requires_grad`."""
    active_per_token: int
    """Parameters a token can touch: totals minus the routed experts it is not sent to (E - k per MoME layer)."""


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total, trainable and per-token active parameter counts (ZeRO-3 aware)."""
    params = list(model.parameters())
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoMELayer):
            per_expert = (numel(layer.w_in) + numel(layer.w_out)) // layer.cfg.num_experts
            inactive += per_expert * (layer.cfg.num_experts - layer.cfg.top_k)
    total = sum(numel(p) for p in params)
    return ParameterCounts(total, sum(numel(p) for p in params if p.requires_grad), total - inactive)


def active_matmul_params(module: nn.Module) -> int:
    """Weights one token multiplies through in `module` (Linear layers; MoME: router + k experts + shared)."""
    if isinstance(module, MoMELayer):
        per_expert = (numel(module.w_in) + numel(module.w_out)) // module.cfg.num_experts
        shared = numel(module.shared_w_in) + numel(module.shared_w_out) if module.shared_w_in is not None else 0
        return numel(module.router.proj.weight) + module.cfg.top_k * per_expert + shared
    if isinstance(module, (nn.Linear, nn.Conv1d, Conv1D)):
        return numel(module.weight)
    return sum(active_matmul_params(child) for child in module.children())


@dataclass
class FlopsEstimate:
    """Forward FLOPs of one micro-batch by component; `train` is what the trainer divides by time for MFU."""

    encoder: int
    """Encoder forward FLOPs (attention included)."""
    resampler: int
    """Resampler forward FLOPs (attention included)."""
    llm: int
    """LLM forward FLOPs: decoder on the packed row, lm_head on caption tokens, text projection."""
    attention: int
    """The query-key / attention-value part of the three numbers above."""

    @property
    def forward(self) -> int:
        """Forward FLOPs of the whole model."""
        return self.encoder + self.resampler + self.llm

    @property
    def train(self) -> int:
        """Forward + backward FLOPs (3 x forward)."""
        return 3 * self.forward


def estimate_flops(model: MultimodalModel, batch: PackedBatch, captioning: bool = True) -> FlopsEstimate:
    """FLOPs of `model` on `batch`, from the real segment lengths (no padding counted); `captioning` as in
    the model's forward."""
    enc, res, llm = model.encoder, model.resampler, model.llm
    streams = [batch.streams[name] for name in ("vision", "audio") if name in batch.streams]
    tokens = sum(s.num_tokens for s in streams)
    enc_flops, enc_attn = _native_flops(enc, [batch.streams[n] for n in enc.native if n in batch.streams])
    for name, tower in enc.towers.items():
        if name in batch.streams:
            matmul, attention = _tower_flops(name, tower, batch.streams[name])
            enc_flops, enc_attn = enc_flops + matmul, enc_attn + attention

    n, k, dim = batch.num_samples, res.cfg.num_latents, res.cfg.dim
    latents = n * k
    seg = torch.cat([s.seg[: s.num_tokens] for s in streams] or [torch.zeros(0, dtype=torch.long)])
    per_sample = torch.bincount(seg, minlength=n)
    res_attn = 4 * dim * k * int((per_sample + k).sum()) * res.cfg.depth
    layer = res.layers[0]
    per_latent = active_matmul_params(layer) - numel(layer.to_kv.weight)
    res_flops = 2 * tokens * numel(res.input_proj.weight) + res_attn
    res_flops += 2 * res.cfg.depth * (latents * per_latent + (tokens + latents) * numel(layer.to_kv.weight))
    res_flops += 2 * latents * numel(res.out_proj.weight) + 2 * n * numel(res.media_head.weight)

    captions = cu_to_lengths(batch.caption_cu_seqlens)
    sequences = torch.cat([captions + k, captions]) if captioning else captions
    rows = int(sequences.sum())
    text_cfg = llm.model.config.get_text_config()
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    layers = decoder_layers(llm.model)
    llm_attn = 4 * heads * head_dim * int((sequences * (sequences + 1) // 2).sum()) * len(layers)
    llm_flops = 2 * rows * active_matmul_params(layers) + llm_attn
    if captioning:
        llm_flops += 2 * int(captions.sum()) * numel(llm.model.get_output_embeddings().weight)
    llm_flops += 2 * n * numel(llm.text_projection.weight)
    return FlopsEstimate(enc_flops, res_flops, llm_flops, enc_attn + res_attn + llm_attn)


def _native_flops(enc: nn.Module, streams: list) -> tuple[int, int]:
    """(all, attention) forward FLOPs of plait's own encoder blocks over the native streams."""
    if not streams:
        return 0, 0
    tokens = sum(s.num_tokens for s in streams)
    pairs = sum(int((cu_to_lengths(s.cu_seqlens) ** 2).sum()) for s in streams)
    attention = 4 * enc.cfg.dim * pairs * enc.cfg.depth
    flops = 2 * sum(s.num_tokens * s.patches.shape[1] * enc.cfg.dim for s in streams)
    return flops + 2 * tokens * active_matmul_params(enc.blocks) + attention, attention


def _tower_flops(name: str, tower: nn.Module, stream) -> tuple[int, int]:
    """(all, attention) forward FLOPs of a pretrained tower: every row its layers see through its matmul weights,
    attention within its sequences (Whisper's rows are half its mel frames)."""
    if name == "audio":
        rows = stream.grids[:, 1] * tower.sizing.audio_patch // 2
        config = tower.encoder.config
    else:
        rows = cu_to_lengths(stream.cu_seqlens)
        config = tower.config
    attention = 4 * config.hidden_size * int((rows.long() ** 2).sum()) * config.num_hidden_layers
    return 2 * int(rows.sum()) * active_matmul_params(tower) + attention, attention
