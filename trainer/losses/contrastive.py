"""Symmetric InfoNCE per modality pair (image-text, audio-text, video-text), distributed and queued.

Each rank scores its own rows (queries) against the rows of *every* rank (gathered with
gradient, open_clip's local loss) plus the pair's negative queue, so the result equals the
single-process loss on the global batch (see `distributed.py` for the scaling convention).
All pairs go through one gather, so every rank issues the same collectives in the same order
even when it holds no sample of some modality, or none at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from plait.data.batch import MODALITIES
from plait.data.rng import joined_seed
from plait.ops.infonce import MatchIds, infonce_chunked
from plait.trainer.losses.config import ContrastiveConfig, HardNegativeConfig
from plait.trainer.losses.distributed import all_gather_host, gather_no_grad, gather_with_grad
from plait.trainer.losses.distributed import rank as dist_rank
from plait.trainer.losses.hard_negatives import select_negatives, similarity_report
from plait.trainer.losses.queue import QueueBank

PAIRS = tuple(f"{m}_text" for m in MODALITIES)
"""Modality pair names, in modality code order."""

KEY, GROUP, CAPTION = 0, 1, 2
"""Columns of the id rows (sample key hash, group, caption id)."""


@dataclass
class GatheredBatch:
    """Normalised embeddings and ids of every rank's rows, and where this rank's rows sit."""

    media: Tensor
    """[Ng, D] L2-normalised media embeddings (gradient flows back to the owning rank)."""
    text: Tensor
    """[Ng, D] L2-normalised text embeddings."""
    modality: Tensor
    """[Ng] int64 media modality codes, on the host (CPU): which pairs are present and where their rows are,
    known without a device sync."""
    ids: Tensor
    """[Ng, 3] int64 (key hash, group, caption id); -1 = none."""
    offset: int
    """First global row of this rank."""
    count: int
    """Rows of this rank."""
    sizes: list[int]
    """Row count of every rank, in rank order."""

    @property
    def world_size(self) -> int:
        """Ranks that contributed."""
        return len(self.sizes)


def _upcast(x: Tensor) -> Tensor:
    """Half-precision embeddings are scored in float32; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_batch(
    media: Tensor,
    text: Tensor,
    modality: Tensor,
    ids: Tensor,
    group: ProcessGroup | None = None,
) -> GatheredBatch:
    """Normalise and gather every rank's rows: one gather with gradient, one without (ids).

    `modality` is best given on the host (the trainer passes the loader's copy); codes on a device are read
    back (a sync on GPU).
    """
    sizes, global_modality = all_gather_host(modality, group)
    dim = media.shape[1]
    local = torch.cat([F.normalize(_upcast(media), dim=-1), F.normalize(_upcast(text), dim=-1)], dim=1)
    both = gather_with_grad(local, sizes, group)
    rank_index = dist_rank(group)
    return GatheredBatch(
        media=both[:, :dim],
        text=both[:, dim:],
        modality=global_modality,
        ids=gather_no_grad(ids.to(media.device, torch.long), sizes, group),
        offset=sum(sizes[:rank_index]),
        count=sizes[rank_index],
        sizes=sizes,
    )


@dataclass
class ContrastiveResult:
    """The contrastive loss (mean over pairs present in the global batch) and what to log."""

    loss: Tensor
    """Mean of the present pairs' symmetric losses (this rank's share, see distributed.py)."""
    pair_losses: dict[str, Tensor] = field(default_factory=dict)
    """Loss of each present pair."""
    metrics: dict[str, Tensor] = field(default_factory=dict)
    """Similarity statistics and counts per pair (detached)."""


@dataclass
class _Pair:
    """One modality pair's rows: global candidates and this rank's queries."""

    media: Tensor
    """[Np, D] media embeddings of the pair's rows on every rank."""
    text: Tensor
    """[Np, D] text embeddings of the same rows."""
    ids: Tensor
    """[Np, 3] ids of the same rows."""
    local: Tensor
    """Positions (within the pair) of this rank's rows; also their positive index."""


def pair_rows(batch: GatheredBatch, code: int) -> Tensor:
    """Global rows (host int64) of modality `code`, in rank order."""
    return (batch.modality == code).nonzero().squeeze(1)


def _generator(device: torch.device, *parts: int) -> torch.Generator | None:
    """A generator seeded from (seed, step, rank, pair, direction); none on the meta device (shapes only)."""
    if device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(joined_seed(*parts))


class ContrastiveLoss(nn.Module):
    """Owns the learnable temperature (`logit_scale`, no weight decay) and computes per-pair InfoNCE."""

    def __init__(self, config: ContrastiveConfig, hard: HardNegativeConfig) -> None:
        super().__init__()
        self.config, self.hard = config, hard
        # Shape [1], not 0-dim: DeepSpeed broadcasts and ZeRO-3 partitions parameters through byte views.
        init = torch.tensor([math.log(1.0 / config.init_temperature)])
        self.logit_scale = nn.Parameter(init, requires_grad=config.learn_temperature)

    def scale(self) -> Tensor:
        """exp(logit_scale) clamped in the forward (an in-place clamp would be undone by ZeRO-3), in float32 at
        least: under bf16 training the parameter is bf16, and exp in bf16 would round the temperature by up to 0.2%."""
        return _upcast(self.logit_scale).exp().clamp(max=self.config.max_logit_scale).squeeze(0)

    def _match_ids(self, pair: _Pair, queue_ids: Tensor) -> tuple[MatchIds, MatchIds]:
        """Exclude ids (key; plus group/caption without multi-positive) and share ids.

        One more exclude column drops, for every query, queue entries holding a sample of the
        current global batch: a stale copy of a current positive is never a negative (MoCo #24).
        """
        shared = [GROUP, CAPTION]
        exclude_cols = [KEY] if self.config.multi_positive else [KEY, *shared]
        share_cols = shared if self.config.multi_positive else []
        q_ids = pair.ids[pair.local]
        stale = torch.isin(queue_ids[:, KEY], pair.ids[:, KEY])
        flag = [
            torch.zeros_like(q_ids[:, :1]),
            torch.full_like(pair.ids[:, :1], -1),
            torch.where(stale, 0, -1)[:, None],
        ]
        sides = (q_ids, pair.ids, queue_ids)
        exclude = MatchIds(*(torch.cat([ids[:, exclude_cols], f], dim=1) for ids, f in zip(sides, flag)))
        return exclude, MatchIds(q_ids[:, share_cols], pair.ids[:, share_cols], queue_ids[:, share_cols])

    def _direction(
        self, query: Tensor, keys: Tensor, queue: Tensor, pair: _Pair, ids: tuple[MatchIds, MatchIds],
        hard_fraction: float, seed_parts: tuple[int, ...],
    ) -> tuple[Tensor, Tensor]:
        """Per-row losses and negative stats of one direction (queries against keys + queue)."""
        negatives = None
        if self.hard.num_negatives > 0:
            negatives = select_negatives(
                query.detach(), keys.detach(), queue, pair.local, *ids, self.hard.num_negatives,
                hard_fraction, _generator(query.device, self.hard.seed, *seed_parts), self.config.chunk_size,
            )
        return infonce_chunked(
            query, keys, queue, self.scale(), pair.local, *ids, negatives,
            self.config.label_smoothing, self.config.chunk_size,
        )

    def forward(
        self,
        batch: GatheredBatch,
        queues: QueueBank | None = None,
        *,
        step: int = 0,
        rank: int = 0,
        hard_fraction: float | None = None,
    ) -> ContrastiveResult:
        """Symmetric InfoNCE for every pair present in the global batch, against its queue."""
        fraction = self.hard.hard_fraction if hard_fraction is None else hard_fraction
        # Keeps the gathered rows (and the gather's backward all-reduce) in every rank's graph.
        anchor = 0.0 * (batch.media.sum() + batch.text.sum())
        result = ContrastiveResult(loss=anchor)
        for code, name in enumerate(PAIRS):
            host_rows = pair_rows(batch, code)
            if host_rows.numel() == 0:
                continue
            in_rank = (host_rows >= batch.offset) & (host_rows < batch.offset + batch.count)
            rows = host_rows.to(batch.media.device, non_blocking=True)
            local = in_rank.nonzero().squeeze(1).to(batch.media.device, non_blocking=True)
            pair = _Pair(batch.media[rows], batch.text[rows], batch.ids[rows], local)
            dim = pair.media.shape[1]
            empty = pair.media.new_empty(0, dim)
            queue_media, queue_text, queue_ids = (
                queues[name].contents() if queues is not None else (empty, empty, pair.ids.new_empty(0, 3))
            )
            ids = self._match_ids(pair, queue_ids)
            m2t, m2t_stats = self._direction(
                pair.media[pair.local], pair.text, queue_text, pair, ids, fraction, (step, rank, code, 0)
            )
            t2m, _ = self._direction(
                pair.text[pair.local], pair.media, queue_media, pair, ids, fraction, (step, rank, code, 1)
            )
            loss = (m2t.sum() + t2m.sum()) * (0.5 * batch.world_size / rows.numel())
            result.pair_losses[name] = loss
            positive_sim = (pair.media[pair.local] * pair.text[pair.local]).sum(1).detach()
            result.metrics.update(similarity_report(positive_sim, m2t_stats, f"sim/{name}"))
            result.metrics[f"contrastive/{name}/samples"] = torch.tensor(float(host_rows.numel()))
        if result.pair_losses:
            result.loss = anchor + torch.stack(list(result.pair_losses.values())).mean()
        result.metrics["contrastive/logit_scale"] = self.scale().detach()
        return result
