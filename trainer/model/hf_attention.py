"""plait's varlen attention as a transformers attention function, for every HF model plait runs packed.

Registered as `plait_varlen`: a model set to it attends over one packed row `[1, H, T, D]` sequence by sequence
(flash-attn / torch varlen on CUDA, bucketed SDPA on CPU, never a [T, T] mask), causal or not as the module says
(`is_causal`: decoders yes, vision and audio encoders no). Sequence bounds come as `cu_seq_lens_q` (with
`max_length_q`), or from the restarts of `position_ids` when only those reach the layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

from plait.ops.attention import varlen_attention
from plait.ops.segments import cu_from_starts

PLAIT_VARLEN = "plait_varlen"
"""Name of plait's varlen attention in transformers' attention registry."""
VARLEN_KWARGS = ("plait_varlen", "flash_attention_2")
"""Attention implementations that take the packed bounds as `cu_seq_lens_*` / `max_length_*` kwargs."""


def plait_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: varlen attention over one packed row `[1, H, T, D]`."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = cu_from_starts(kwargs["position_ids"][0] == 0)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu, max_seqlen_q=kwargs.get("max_length_q"),
                           max_seqlen_k=kwargs.get("max_length_k"), causal=getattr(module, "is_causal", True),
                           scale=scaling, backend=getattr(module.config, "plait_attention_backend", "auto"))
    return out.unsqueeze(0), None


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, torch.Tensor | int]:
    """The kwargs that carry packed sequence bounds to `plait_varlen` (and flash_attention_2) layers."""
    cu = cu_seqlens.to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_seqlen, "max_length_k": max_seqlen}


# No mask function is registered: transformers then builds no mask and does not look for packed sequences in
# the position ids (a device-to-host read every forward); the sequence bounds travel as cu_seqlens instead.
AttentionInterface.register(PLAIT_VARLEN, plait_varlen_attention)
