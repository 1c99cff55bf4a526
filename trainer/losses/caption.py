"""Captioning loss: token cross-entropy on caption tokens only, averaged over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from plait.trainer.losses.config import CaptionConfig
from plait.trainer.losses.distributed import all_reduce_sum, world_size


def caption_loss(
    logits: Tensor, targets: Tensor, config: CaptionConfig, group: ProcessGroup | None = None
) -> tuple[Tensor, Tensor]:
    """(loss, global caption-token count): mean token CE over every rank's caption tokens.

    `logits` [M, V] and `targets` [M] (positions to skip hold `config.ignore_index`; M may be 0).
    Always issues one all-reduce, so a rank without caption tokens still takes part.
    """
    count = (targets != config.ignore_index).sum().to(torch.float64)
    local_sum = F.cross_entropy(
        logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
        targets,
        ignore_index=config.ignore_index,
        label_smoothing=config.label_smoothing,
        reduction="sum",
    )
    # The zero term keeps the logits in the graph when this rank has no caption token.
    local_sum = local_sum + 0.0 * logits.sum()
    total = all_reduce_sum(count, group)
    return local_sum * (world_size(group) / total.clamp(min=1).to(local_sum.dtype)), total
