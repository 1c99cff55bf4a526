"""The training objective: weighted sum of contrastive, caption and router losses, and what to log.

`Objective` is an nn.Module so the learnable temperature (`contrastive.logit_scale`) and the
negative queues (buffers plus extra state) travel with the model: register it as a submodule of
the module DeepSpeed wraps, call it inside that module's forward, and exclude parameters named
`*logit_scale` from weight decay. Every returned loss is this rank's share: after DeepSpeed
averages gradients over ranks they equal the gradients of the single-process global loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from plait.data.rng import key_ids
from plait.trainer.losses.balance import balance_losses
from plait.trainer.losses.caption import caption_loss
from plait.trainer.losses.config import LossConfig, check_weights
from plait.trainer.losses.contrastive import PAIRS, ContrastiveLoss, GatheredBatch, gather_batch, pair_rows
from plait.trainer.losses.distributed import rank as dist_rank
from plait.trainer.losses.queue import QueueBank
from plait.trainer.model.routing import RouterOutput

QUEUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ObjectiveInputs:
    """Everything one rank feeds the losses in one micro-batch (N, M and T may be 0)."""

    media_embeds: Tensor
    """[N, D] media embeddings (unnormalised, with gradient)."""
    text_embeds: Tensor
    """[N, D] text embeddings of the paired captions."""
    modality: Tensor
    """[N] int64 media modality code (index into data.batch.MODALITIES), best on the host: the losses read the
    batch's composition from it (the trainer passes the loader's copy; device codes are read back)."""
    sample_key: list[str]
    """[N] sample keys (hashed; a queue entry with a current key is never a negative)."""
    group: Tensor
    """[N] int64 group id; samples of one group are positives of each other (-1 = none)."""
    caption_id: Tensor | None = None
    """[N] int64 caption id (e.g. a hash of the text); equal ids are positives (-1 = none)."""
    caption_logits: Tensor | None = None
    """[M, V] LM logits at the positions predicting caption tokens."""
    caption_targets: Tensor | None = None
    """[M] int64 caption tokens to predict (ignore_index where not a caption token)."""
    router_outputs: list[RouterOutput] = field(default_factory=list)
    """Routing of every MoME layer (same number of layers on every rank)."""


@dataclass
class ObjectiveOutput:
    """The total loss to backpropagate and every component and statistic, detached, for logging."""

    loss: Tensor
    """Weighted total."""
    components: dict[str, Tensor]
    """Flat name -> 0-dim tensor (call .item() only when logging, to avoid device syncs)."""


class Objective(nn.Module):
    """Contrastive (with queues, hard negatives, soft labels) + caption + router regularisers."""

    def __init__(self, config: LossConfig, embed_dim: int, group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.config, self.group = config, group
        self.contrastive = ContrastiveLoss(config.contrastive, config.hard_negatives)
        self.queues = None
        if config.queue.size > 0:
            self.queues = QueueBank(PAIRS, config.queue.size, embed_dim, QUEUE_DTYPES[config.queue.dtype])

    def weights(self, overrides: dict[str, float] | None = None) -> dict[str, float]:
        """Loss weights: the configured ones updated by the curriculum's `overrides`."""
        merged = dict(self.config.weights)
        if overrides:
            check_weights(overrides)
            merged.update(overrides)
        return merged

    @staticmethod
    def captioning(weights: dict[str, float]) -> bool:
        """Whether the caption loss counts. At weight 0 the model skips the captioning sequences; the (empty)
        caption term stays in the graph, so every parameter still gets a gradient, but is not logged."""
        return weights.get("caption", 0.0) > 0

    def _ids(self, inputs: ObjectiveInputs) -> Tensor:
        """[N, 3] (key hash, group, caption id) on the embeddings' device."""
        n, device = inputs.media_embeds.shape[0], inputs.media_embeds.device
        caption = inputs.caption_id if inputs.caption_id is not None else torch.full((n,), -1, device=device)
        keys = key_ids(inputs.sample_key).view(n).to(device, non_blocking=True)
        return torch.stack([keys, inputs.group.view(n).to(device), caption.view(n).to(device)], dim=1)

    def _caption(self, inputs: ObjectiveInputs) -> Tensor:
        """Caption CE (a graph-connected zero with an all-reduce when this rank has no captions)."""
        logits, targets = inputs.caption_logits, inputs.caption_targets
        if logits is None or targets is None:
            logits = inputs.text_embeds.new_zeros(0, 1)
            targets = torch.zeros(0, dtype=torch.long, device=logits.device)
        return caption_loss(logits, targets, self.config.caption, self.group)[0]

    @torch.no_grad()
    def _enqueue(self, batch: GatheredBatch, step: int) -> None:
        """Push the global batch into each pair's queue."""
        for code, name in enumerate(PAIRS):
            rows = pair_rows(batch, code).to(batch.media.device, non_blocking=True)
            self.queues[name].enqueue(batch.media[rows].detach(), batch.text[rows].detach(), batch.ids[rows], step)

    def forward(
        self,
        inputs: ObjectiveInputs,
        *,
        step: int,
        weights: dict[str, float] | None = None,
        hard_fraction: float | None = None,
    ) -> ObjectiveOutput:
        """All losses of one micro-batch; `weights` and `hard_fraction` come from the curriculum."""
        merged = self.weights(weights)
        batch = gather_batch(inputs.media_embeds, inputs.text_embeds, inputs.modality, self._ids(inputs), self.group)
        contrastive = self.contrastive(
            batch, self.queues, step=step, rank=dist_rank(self.group), hard_fraction=hard_fraction
        )
        routers = balance_losses(inputs.router_outputs, self.config.balance, self.group)
        parts = {
            "contrastive": contrastive.loss,
            "caption": self._caption(inputs),
            "balance": routers.balance,
            "z": routers.z_loss,
            "entropy_local": routers.entropy_local,
            "entropy_global": routers.entropy_global,
        }
        total = sum(merged.get(name, 0.0) * value for name, value in parts.items())
        if not self.captioning(merged):
            parts.pop("caption")
        components = {f"loss/{name}": value.detach() for name, value in parts.items()}
        components.update({f"loss/contrastive/{k}": v.detach() for k, v in contrastive.pair_losses.items()})
        components.update(contrastive.metrics)
        components.update(routers.metrics)
        components.update({f"weight/{name}": torch.tensor(w) for name, w in merged.items()})
        if self.queues is not None and self.training:
            # After the loss: this step's positives must not sit in the queue as negatives.
            self._enqueue(batch, step)
            components.update(self.queues.report(step))
        components["loss/total"] = total.detach()
        return ObjectiveOutput(loss=total, components=components)
