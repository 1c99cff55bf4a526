"""The whole model: packed encoder -> Perceiver resampler -> packed causal LM, one forward per micro-batch.

The LLM runs once on one packed row holding, for every sample, the captioning sequence
[K latents ; caption tokens] and then, for every sample, the text-only sequence [caption tokens]:
captioning logits come from the first kind (loss on caption tokens only), the text embedding from the
last token of the second. Packed attention keeps all 2N sequences apart, so this equals two passes.
Without captioning (its loss weight is 0) the row holds only the text-only sequences.

ZeRO-3: every submodule runs every step in the same order, also on an empty micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.data.batch import TEXT_TOKEN, PackedBatch, token_code
from plait.data.sizing import SizingConfig
from plait.ops.segments import concat_segments_index, cu_to_lengths
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.encoder import Encoder
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.mome import RoutingContext
from plait.trainer.model.resampler import Resampler
from plait.trainer.model.routing import RouterOutput


@dataclass
class ModelOutput:
    """What the losses and metrics need from one forward pass."""

    media_embeds: torch.Tensor
    """[N, embed_dim] media embeddings (projected, not normalised)."""
    text_embeds: torch.Tensor
    """[N, embed_dim] caption embeddings: last caption token of the text-only pass, projected, not normalised."""
    caption_logits: torch.Tensor
    """[M, V] logits predicting each caption token (M = all caption tokens; the first from the last latent)."""
    caption_targets: torch.Tensor
    """[M] int64 caption token ids the logits predict."""
    router_outputs: list[RouterOutput] = field(default_factory=list)
    """One per MoME layer run in this pass (encoder layers first, then LLM layers)."""
    counters: dict[str, int | torch.Tensor] = field(default_factory=dict)
    """`encoder_tokens`, `llm_tokens` (ints), `dropped_assignments` (capacity drops over all MoME layers, a
    device scalar: read only when logging)."""


@dataclass
class LLMPacking:
    """Where things sit in the LLM's packed row."""

    cu_seqlens: torch.Tensor
    """[2N+1] offsets of the N captioning then N text-only sequences."""
    caption_positions: torch.Tensor
    """[Tc] row of each caption token in the captioning sequences."""
    text_last: torch.Tensor
    """[N] row of the last token of each text-only sequence."""
    index: torch.Tensor
    """Row order: `row = cat([latents, captions, captions])[index]`."""


def pack_text_only(caption_cu: torch.Tensor, total_captions: int) -> LLMPacking:
    """Layout of [caption_i] for all i: no captioning sequences (`index` orders the captions themselves)."""
    caption_cu = caption_cu.long()
    return LLMPacking(
        cu_seqlens=caption_cu,
        caption_positions=caption_cu.new_zeros(0),
        text_last=caption_cu[1:] - 1,
        index=torch.arange(total_captions, device=caption_cu.device),
    )


def pack_llm_inputs(num_samples: int, num_latents: int, caption_cu: torch.Tensor, total_captions: int) -> LLMPacking:
    """Layout of [latents_i ; caption_i] for all i, followed by [caption_i] for all i.

    Sizes come from the host (`total_captions` = caption tokens), so building it never waits on the device.
    """
    caption_cu = caption_cu.long()
    latent_cu = torch.arange(num_samples + 1, device=caption_cu.device) * num_latents
    latent_rows = num_samples * num_latents
    index, captioning_cu = concat_segments_index(latent_cu, caption_cu, latent_rows, total_captions)
    captioned = latent_rows + total_captions
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    caption_positions = inverse[latent_rows:]
    text_rows = torch.arange(total_captions, device=index.device) + index.numel()
    return LLMPacking(
        cu_seqlens=torch.cat([captioning_cu, caption_cu[1:] + captioned]),
        caption_positions=caption_positions,
        text_last=caption_cu[1:] - 1 + captioned,
        index=torch.cat([index, text_rows]),
    )


class MultimodalModel(nn.Module):
    """encoder (media tokens) -> resampler (K latents/sample) -> llm (captioning + text embedding).

    `sizing` gives the patch geometry the encoder's patch embeddings take (the data plane cuts the patches);
    `load_weights=False` skips the pretrained LLM's and towers' weights (a saved plait model brings its own).
    LoRA adapters are added by `add_adapters` after the build (outside zero.Init under ZeRO-3).
    """

    def __init__(self, cfg: ModelConfig, sizing: SizingConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.routing = RoutingContext()
        backend = cfg.attention_backend
        self.encoder = Encoder(cfg.encoder, cfg.mome, sizing, self.routing, backend, load_weights)
        self.llm = PackedCausalLM(cfg.llm, cfg.mome, cfg.embed_dim, self.routing, backend, load_weights)
        self.resampler = Resampler(cfg.resampler, cfg.encoder.dim, self.llm.hidden_size, cfg.embed_dim, backend)

    def add_adapters(self) -> None:
        """LoRA on the LLM when `cfg.llm.lora` is set (its own weights are then frozen); call once, after the build."""
        if self.cfg.llm.lora is not None:
            from plait.trainer.model.lora import apply_lora

            apply_lora(self.llm.model, self.cfg.llm.lora)

    def forward(self, batch: PackedBatch, captioning: bool = True) -> ModelOutput:
        """One packed micro-batch (possibly empty) -> embeddings, caption logits/targets, routing.

        `captioning=False` skips the [latents ; caption] sequences: empty caption logits and targets.
        """
        with self.routing.record() as router_outputs:
            encoded = self.encoder(batch)
            n = batch.num_samples
            resampled = self.resampler(encoded.tokens, encoded.seg, n, batch.max_media_tokens)
            caption_ids = batch.caption_ids
            captions = self.llm.embed(caption_ids)
            text_codes = torch.full_like(caption_ids, TEXT_TOKEN)
            caption_cu = batch.caption_cu_seqlens
            total, longest = caption_ids.shape[0], batch.caption_max_seqlen
            if captioning:
                k = self.cfg.resampler.num_latents
                packing = pack_llm_inputs(n, k, caption_cu, total)
                longest = longest + k if n else 0
                latents = resampled.latents.reshape(n * k, captions.shape[1]).to(captions.dtype)
                row = torch.cat([latents, captions, captions])[packing.index]
                media_codes = token_code(batch.modality).repeat_interleave(k)
                modality = torch.cat([media_codes, text_codes, text_codes])[packing.index]
                targets = caption_ids
            else:
                packing = pack_text_only(caption_cu, total)
                row, modality, targets = captions, text_codes, caption_ids[:0]
            hidden = self.llm(row, packing.cu_seqlens, longest, modality)
            caption_rows = hidden[packing.caption_positions - 1]
            if not captioning:
                # No rows, but the latents stay in the graph: every parameter gets a (zero) gradient every
                # step, as on an empty micro-batch (ZeRO-3 resumes exactly only then).
                caption_rows = caption_rows + 0.0 * resampled.latents.sum()
            caption_logits = self.llm.logits(caption_rows)
            text_embeds = self.llm.text_projection(hidden[packing.text_last])
        counters = {
            "encoder_tokens": int(encoded.tokens.shape[0]),
            "llm_tokens": int(row.shape[0]),
            "dropped_assignments": sum((r.dropped for r in router_outputs if r.dropped is not None),
                                       torch.zeros((), dtype=torch.long, device=row.device)),
        }
        return ModelOutput(resampled.media_embeds, text_embeds, caption_logits, targets,
                           list(router_outputs), counters)


    def embed_media(self, batch: PackedBatch) -> torch.Tensor:
        """[N, embed_dim] media embeddings (not normalised): the encoder and resampler alone.

        For inference outside DeepSpeed; under ZeRO-3 every rank must run `forward`, which uses every module.
        """
        encoded = self.encoder(batch)
        return self.resampler(encoded.tokens, encoded.seg, batch.num_samples, batch.max_media_tokens).media_embeds

    def embed_text(self, caption_ids: torch.Tensor, caption_cu: torch.Tensor) -> torch.Tensor:
        """[N, embed_dim] text embeddings (not normalised): the LLM over the text-only sequences, as in `forward`."""
        longest = int(cu_to_lengths(caption_cu).max()) if caption_cu.numel() > 1 else 0
        packing = pack_text_only(caption_cu.to(caption_ids.device), caption_ids.shape[0])
        hidden = self.llm(self.llm.embed(caption_ids), packing.cu_seqlens, longest,
                          torch.full_like(caption_ids, TEXT_TOKEN))
        return self.llm.text_projection(hidden[packing.text_last])
