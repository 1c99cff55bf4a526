"""What each MoME layer reports about its routing, for the balance losses and metrics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RouterOutput:
    """Routing of one MoME layer over the tokens of one forward pass."""

    logits: torch.Tensor
    """[T, E] router logits (with gradient)."""
    topk_experts: torch.Tensor
    """[T, k] int64 experts each token was routed to (before capacity drops)."""
    modality: torch.Tensor
    """[T] int64 token modality code (index into `plait.data.batch.TOKEN_MODALITIES`)."""
    dropped: torch.Tensor | None = None
    """Scalar int64 (on the device): token-expert assignments dropped by the capacity limit; None without one."""
