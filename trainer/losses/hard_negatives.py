"""Negative sampling for InfoNCE: the hardest negatives mixed with random ones, plus a collapse monitor.

For each query, `select_negatives` keeps `round(K * hard_fraction)` negatives of highest
similarity and fills the rest with uniformly random negatives drawn from the remainder, so no
candidate is picked twice. Both picks are a running top-k over chunks (similarity, then
random scores), so the [B, N + Q] scores never exist at once. Positives and excluded candidates
(shared key, or group/caption when they are not positives) are never picked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from plait.ops.infonce import NEG_STATS, MatchIds, classify, iter_chunks, selected


def _running_topk(best: tuple[Tensor, Tensor], scores: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """Merge a chunk's scores [B, C] (column j = candidate start + j) into the best k so far."""
    cols = torch.arange(start, start + scores.shape[1], device=scores.device).expand_as(scores)
    values = torch.cat([best[0], scores], dim=1)
    index = torch.cat([best[1], cols], dim=1)
    top, where = values.topk(min(k, values.shape[1]), dim=1)
    return top, index.gather(1, where)


@torch.no_grad()
def select_negatives(
    query: Tensor,
    keys: Tensor,
    queue: Tensor,
    positive_index: Tensor,
    exclude: MatchIds,
    share: MatchIds,
    num_negatives: int,
    hard_fraction: float,
    generator: torch.Generator,
    chunk_size: int = 4096,
) -> Tensor:
    """[B, num_negatives] indices into [keys; queue] of the kept negatives (-1 where too few exist)."""
    b = query.shape[0]
    num_hard = round(num_negatives * hard_fraction)
    empty = (query.new_empty(b, 0), torch.empty(b, 0, dtype=torch.long, device=query.device))
    hard = empty
    for chunk in iter_chunks(keys, queue, exclude, share, chunk_size):
        if num_hard == 0:
            break
        positive, valid = classify(chunk, positive_index, exclude.query, share.query, None)
        sim = (query @ chunk.emb.to(query.dtype).T).masked_fill(positive | ~valid, float("-inf"))
        hard = _running_topk(hard, sim, chunk.start, num_hard)
    hard_index = torch.where(torch.isfinite(hard[0]), hard[1], -1)
    rand = empty
    for chunk in iter_chunks(keys, queue, exclude, share, chunk_size):
        if num_hard == num_negatives:
            break
        positive, valid = classify(chunk, positive_index, exclude.query, share.query, None)
        free = valid & ~positive & ~selected(hard_index, chunk.start, chunk.emb.shape[0])
        scores = torch.rand(free.shape, generator=generator, device=query.device, dtype=query.dtype)
        rand = _running_topk(rand, scores.masked_fill(~free, float("-inf")), chunk.start, num_negatives - num_hard)
    rand_index = torch.where(torch.isfinite(rand[0]), rand[1], -1)
    out = torch.cat([hard_index, rand_index], dim=1)
    return torch.nn.functional.pad(out, (0, num_negatives - out.shape[1]), value=-1)


def similarity_report(positive_sim: Tensor, neg_stats: Tensor, prefix: str) -> dict[str, Tensor]:
    """Collapse monitor: mean/std of positive and negative similarities and the hardest negative."""
    count, total, total_sq, hardest = (neg_stats[:, i] for i in range(len(NEG_STATS)))
    n = count.sum().clamp(min=1)
    neg_mean = total.sum() / n
    neg_var = (total_sq.sum() / n - neg_mean**2).clamp(min=0)
    finite = torch.isfinite(hardest)
    out = {
        "pos_mean": positive_sim.mean() if positive_sim.numel() else positive_sim.new_zeros(()),
        "pos_std": positive_sim.std(correction=0) if positive_sim.numel() else positive_sim.new_zeros(()),
        "neg_mean": neg_mean,
        "neg_std": neg_var.sqrt(),
        "hardest_neg_mean": torch.where(finite, hardest, 0.0).sum() / finite.sum().clamp(min=1),
    }
    return {f"{prefix}/{k}": v.detach() for k, v in out.items()}
