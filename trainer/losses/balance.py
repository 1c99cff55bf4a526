"""MoME router regularisers, each computed per layer and averaged over layers.

- Balance (Switch): E * sum_i f_i * P_i. The routed fractions f (no gradient) come from the
  *global* batch, all-reduced across ranks, so a homogeneous micro-batch is not pushed onto every
  expert; P (mean router probability) keeps its gradient on each rank's own tokens.
- Router z-loss: mean over tokens of logsumexp(logits)^2.
- LIMoE entropies per token modality: local = mean token entropy (confident routing), global =
  max(0, tau - H(mean probability)) (use of many experts), tau = threshold * log(E).
Per-layer terms never mix across layers, so one layer's imbalance cannot cancel another's. One
all-reduce of per-layer statistics serves every term; see `distributed.py` for the gradient
convention (world_size * local sum / global count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from plait.data.batch import TOKEN_MODALITIES
from plait.ops.segments import index_counts
from plait.trainer.losses.config import BalanceConfig
from plait.trainer.losses.distributed import all_reduce_sum, world_size
from plait.trainer.model.routing import RouterOutput

NUM_MODALITIES = len(TOKEN_MODALITIES)


@dataclass
class BalanceResult:
    """Router regularisers (means over layers) and their per-layer / per-modality metrics."""

    balance: Tensor
    """Switch load-balance loss."""
    z_loss: Tensor
    """Router z-loss."""
    entropy_local: Tensor
    """LIMoE local (per-token) entropy."""
    entropy_global: Tensor
    """LIMoE thresholded global entropy deficit."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Flat per-layer and per-modality values for logging (detached)."""


def _layer_stats(router: RouterOutput, width: int) -> Tensor:
    """[M, 2 * width + 1] per token modality: routed counts, probability sums (zero-padded to
    `width` experts) and tokens; float64, no gradient."""
    logits = _upcast(router.logits.detach())
    probs = torch.nn.functional.pad(torch.softmax(logits, dim=-1), (0, width - logits.shape[1]))
    mod = router.modality.to(logits.device)
    routed = (mod[:, None] * width + router.topk_experts).reshape(-1)
    counts = index_counts(routed, NUM_MODALITIES * width).view(NUM_MODALITIES, width)
    prob_sums = probs.new_zeros(NUM_MODALITIES, width).index_add_(0, mod, probs)
    tokens = index_counts(mod, NUM_MODALITIES)
    return torch.cat([counts.double(), prob_sums.double(), tokens.double()[:, None]], dim=1)


def _upcast(x: Tensor) -> Tensor:
    """Half-precision router logits are regularised in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy(p: Tensor) -> Tensor:
    """Entropy along the last dim (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


class _LayerTerms:
    """The four regularisers of one layer, given its global statistics."""

    def __init__(self, router: RouterOutput, stats: Tensor, world: int, threshold: float) -> None:
        e = router.logits.shape[1]
        k = max(router.topk_experts.shape[1], 1)
        self.logits = _upcast(router.logits)
        self.probs = torch.softmax(self.logits, dim=-1)
        self.modality = router.modality.to(self.logits.device)
        self.counts, self.prob_sums, self.tokens = stats[:, :e], stats[:, e : 2 * e], stats[:, 2 * e]
        self.e, self.k, self.world, self.tau = e, k, world, threshold * math.log(e)

    def balance(self) -> Tensor:
        """E * sum_i f_i * P_i over all tokens (f global, P with local gradient)."""
        total = self.tokens.sum().clamp(min=1).to(self.logits.dtype)
        f = self.counts.sum(0).to(self.logits.dtype) / (total * self.k)
        return self.e * (f * self.probs.sum(0)).sum() * (self.world / total)

    def z_loss(self) -> Tensor:
        """mean_t logsumexp(logits_t)^2 over all tokens."""
        lse = torch.logsumexp(self.logits, dim=-1)
        return (lse * lse).sum() * (self.world / self.tokens.sum().clamp(min=1).to(lse.dtype))

    def _local_sums(self) -> Tensor:
        """[M, E] probability sums of this rank's tokens per modality, with gradient."""
        return self.probs.new_zeros(NUM_MODALITIES, self.e).index_add(0, self.modality, self.probs)

    def entropies(self) -> tuple[Tensor, Tensor]:
        """(local, global) LIMoE terms averaged over the modalities present in the global batch."""
        present = self.tokens > 0
        tokens = self.tokens.clamp(min=1).to(self.logits.dtype)
        token_entropy = _entropy(self.probs)
        per_mod = token_entropy.new_zeros(NUM_MODALITIES).index_add(0, self.modality, token_entropy)
        local = per_mod * self.world / tokens
        sums = self._local_sums()
        # Mean probability with the global value and the gradient of this rank's share (x world).
        mean_p = (self.prob_sums.to(sums.dtype) + self.world * (sums - sums.detach())) / tokens[:, None]
        deficit = torch.relu(self.tau - _entropy(mean_p))
        n = present.sum().clamp(min=1)
        return (local * present).sum() / n, (deficit * present).sum() / n

    def metrics(self, prefix: str) -> dict[str, Tensor]:
        """Per token modality (present globally): balance value and the largest expert load x E."""
        out: dict[str, Tensor] = {}
        tokens = self.tokens.clamp(min=1)[:, None]
        f = self.counts / (tokens * self.k)
        p = self.prob_sums / tokens
        for m, name in enumerate(TOKEN_MODALITIES):
            out[f"{prefix}/{name}/balance"] = (self.e * (f[m] * p[m]).sum()).float()
            out[f"{prefix}/{name}/max_load"] = (self.e * f[m].max()).float()
            out[f"{prefix}/{name}/tokens"] = self.tokens[m].float()
        return out


def balance_losses(
    routers: list[RouterOutput], config: BalanceConfig, group: ProcessGroup | None = None
) -> BalanceResult:
    """Balance, z-loss and entropy terms of every MoME layer over the global batch (one all-reduce)."""
    if not routers:
        zero = torch.zeros(())
        return BalanceResult(zero, zero, zero, zero)
    widest = max(r.logits.shape[1] for r in routers)
    stats = all_reduce_sum(torch.stack([_layer_stats(r, widest) for r in routers]), group)
    world = world_size(group)
    terms = [
        _LayerTerms(r, _unpad(s, r.logits.shape[1], widest), world, config.entropy_threshold)
        for r, s in zip(routers, stats)
    ]
    entropies = [t.entropies() for t in terms]
    metrics: dict[str, Tensor] = {}
    balances, zs = [], []
    for i, t in enumerate(terms):
        balances.append(t.balance())
        zs.append(t.z_loss())
        metrics[f"balance/layer{i}"] = balances[-1].detach()
        metrics[f"z_loss/layer{i}"] = zs[-1].detach()
        metrics.update({k: v.detach() for k, v in t.metrics(f"balance/layer{i}").items()})
    return BalanceResult(
        torch.stack(balances).mean(),
        torch.stack(zs).mean(),
        torch.stack([e[0] for e in entropies]).mean(),
        torch.stack([e[1] for e in entropies]).mean(),
        metrics,
    )


def _unpad(stats: Tensor, e: int, widest: int) -> Tensor:
    """Undo the padding of a layer's [M, 2 * widest + 1] statistics to [M, 2E + 1]."""
    return torch.cat([stats[:, :e], stats[:, widest : widest + e], stats[:, 2 * widest :]], dim=1)
