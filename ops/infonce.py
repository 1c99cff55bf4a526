"""InfoNCE against in-batch keys plus a large negative queue, computed in chunks.

One direction of a contrastive loss: each query row scores every candidate (the batch `keys`
[N, D], then the `queue` [Q, D]) and takes a soft-target cross-entropy over the valid ones.
`infonce_chunked` never holds the [B, N + Q] logits: the forward keeps an online logsumexp
and the custom backward recomputes each chunk. `infonce_reference` materialises everything
and is the autograd reference the chunked path is tested against. On CUDA, when triton is importable,
`infonce_chunked` runs the Triton kernels of `ops.triton_infonce` instead (same results).

Candidate classes for query i and candidate j (ids come from `MatchIds`, -1 matches nothing):
own positive (j == positive_index[i]) -> positive; sharing an `exclude` id -> excluded;
sharing a `share` id -> positive; otherwise negative. When `negatives` is given, only the
listed negatives stay (positives always stay). Targets: (1 - eps) spread over positives plus
eps spread over all valid candidates (label smoothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from plait.ops.fused import log_choice_once, use_triton

NEG_STATS = ("count", "sum", "sum_sq", "max")
"""Columns of the per-row negative-similarity statistics (raw dot products, not scaled)."""


@dataclass(frozen=True)
class MatchIds:
    """Integer ids relating queries to candidates: equal ids >= 0 match, -1 matches nothing."""

    query: Tensor
    """[B, F] ids of each query."""
    keys: Tensor
    """[N, F] ids of each in-batch key."""
    queue: Tensor
    """[Q, F] ids of each queue entry."""

    @staticmethod
    def none(b: int, n: int, q: int, device: torch.device | str = "cpu") -> MatchIds:
        """Ids with no fields: nothing matches."""
        return MatchIds(*(torch.empty(rows, 0, dtype=torch.long, device=device) for rows in (b, n, q)))


@dataclass(frozen=True)
class CandidateChunk:
    """A slice of the candidates (keys or queue) with its ids and position."""

    start: int
    """Index of the first row in the combined [keys; queue] numbering."""
    source: int
    """0 for keys, 1 for queue."""
    lo: int
    """First row inside the source tensor."""
    emb: Tensor
    """[C, D] candidate embeddings."""
    exclude: Tensor
    """[C, Fe] exclude ids."""
    share: Tensor
    """[C, Fs] share ids."""


def iter_chunks(
    keys: Tensor, queue: Tensor, exclude: MatchIds, share: MatchIds, chunk_size: int
) -> Iterator[CandidateChunk]:
    """Walk the keys, then the queue, in chunks of at most `chunk_size` rows."""
    sources = ((keys, exclude.keys, share.keys), (queue, exclude.queue, share.queue))
    offset = 0
    for source, (emb, ex, sh) in enumerate(sources):
        for lo in range(0, emb.shape[0], chunk_size):
            hi = min(lo + chunk_size, emb.shape[0])
            yield CandidateChunk(offset + lo, source, lo, emb[lo:hi], ex[lo:hi], sh[lo:hi])
        offset += emb.shape[0]


def match(query_ids: Tensor, cand_ids: Tensor) -> Tensor:
    """[B, C] True where query and candidate share any id >= 0 (one pass per id field)."""
    out = torch.zeros(query_ids.shape[0], cand_ids.shape[0], dtype=torch.bool, device=query_ids.device)
    for f in range(query_ids.shape[1]):
        q = query_ids[:, f, None]
        out |= (q == cand_ids[None, :, f]) & (q >= 0)
    return out


def selected(negatives: Tensor, start: int, length: int) -> Tensor:
    """[B, length] True at the listed negative indices that fall in [start, start + length)."""
    local = negatives - start
    local = torch.where((local >= 0) & (local < length), local, length)
    out = torch.zeros(negatives.shape[0], length + 1, dtype=torch.bool, device=negatives.device)
    out.scatter_(1, local, True)
    return out[:, :length]


def classify(
    chunk: CandidateChunk,
    positive_index: Tensor,
    exclude_query: Tensor,
    share_query: Tensor,
    negatives: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(positive, valid) [B, C] masks of one chunk; positives are always valid."""
    length = chunk.emb.shape[0]
    cols = torch.arange(chunk.start, chunk.start + length, device=positive_index.device)
    own = cols[None, :] == positive_index[:, None]
    excluded = match(exclude_query, chunk.exclude) & ~own
    positive = own | (match(share_query, chunk.share) & ~excluded)
    valid = ~excluded
    if negatives is not None:
        valid &= positive | selected(negatives, chunk.start, length)
    return positive, valid


@dataclass
class _Accumulator:
    """Per-row running sums of the forward pass."""

    row_max: Tensor
    sum_exp: Tensor
    pos_count: Tensor
    pos_logit: Tensor
    valid_count: Tensor
    valid_logit: Tensor
    neg_stats: Tensor

    @staticmethod
    def zeros(b: int, like: Tensor) -> _Accumulator:
        """Empty accumulators for `b` rows in the dtype/device of `like`."""
        z = like.new_zeros(b)
        stats = like.new_zeros(b, len(NEG_STATS))
        stats[:, 3] = float("-inf")
        sums = (z.clone() for _ in range(5))
        return _Accumulator(torch.full_like(z, float("-inf")), *sums, stats)

    def add(self, dots: Tensor, logits: Tensor, positive: Tensor, valid: Tensor) -> None:
        """Fold one chunk of logits into the online logsumexp and the target sums."""
        masked = logits.masked_fill(~valid, float("-inf"))
        new_max = torch.maximum(self.row_max, masked.amax(1))
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        self.sum_exp = self.sum_exp * torch.exp(self.row_max - safe) + torch.exp(masked - safe[:, None]).sum(1)
        self.row_max = new_max
        pos = positive & valid
        self.pos_count += pos.sum(1)
        self.pos_logit += torch.where(pos, logits, 0.0).sum(1)
        self.valid_count += valid.sum(1)
        self.valid_logit += torch.where(valid, logits, 0.0).sum(1)
        neg = valid & ~positive
        self.neg_stats[:, 0] += neg.sum(1)
        self.neg_stats[:, 1] += torch.where(neg, dots, 0.0).sum(1)
        self.neg_stats[:, 2] += torch.where(neg, dots * dots, 0.0).sum(1)
        chunk_max = dots.masked_fill(~neg, float("-inf")).amax(1)
        self.neg_stats[:, 3] = torch.maximum(self.neg_stats[:, 3], chunk_max)

    def lse(self) -> Tensor:
        """Logsumexp over all valid candidates so far."""
        safe = torch.where(torch.isfinite(self.row_max), self.row_max, torch.zeros_like(self.row_max))
        return safe + torch.log(self.sum_exp)


def _targets(positive: Tensor, valid: Tensor, pos_count: Tensor, valid_count: Tensor, eps: float) -> Tensor:
    """[B, C] soft targets: (1 - eps) over positives + eps over valid candidates."""
    pos = (positive & valid).to(pos_count.dtype)
    return (1.0 - eps) * pos / pos_count[:, None] + eps * valid.to(pos_count.dtype) / valid_count[:, None]


class _ChunkedInfoNCE(torch.autograd.Function):
    """Online-logsumexp forward, recomputing backward; grads for query, keys, queue and scale."""

    @staticmethod
    def forward(ctx, query, keys, queue, scale, positive_index, exclude, share, negatives, eps, chunk_size):
        acc = _Accumulator.zeros(query.shape[0], query)
        for chunk in iter_chunks(keys, queue, exclude, share, chunk_size):
            dots = query @ chunk.emb.to(query.dtype).T
            positive, valid = classify(chunk, positive_index, exclude.query, share.query, negatives)
            acc.add(dots, dots * scale, positive, valid)
        pos_count = acc.pos_count.clamp(min=1)
        valid_count = acc.valid_count.clamp(min=1)
        lse = acc.lse()
        loss = lse - (1.0 - eps) * acc.pos_logit / pos_count - eps * acc.valid_logit / valid_count
        ctx.save_for_backward(query, keys, queue, scale, positive_index, lse, pos_count, valid_count)
        ctx.extra = (exclude, share, negatives, eps, chunk_size)
        ctx.mark_non_differentiable(acc.neg_stats)
        return loss, acc.neg_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        query, keys, queue, scale, positive_index, lse, pos_count, valid_count = ctx.saved_tensors
        exclude, share, negatives, eps, chunk_size = ctx.extra
        need_q, need_k, need_queue, need_scale = ctx.needs_input_grad[:4]
        grad_q = torch.zeros_like(query)
        grads = (torch.zeros_like(keys) if need_k else None, torch.zeros_like(queue) if need_queue else None)
        grad_scale = torch.zeros_like(scale)
        for chunk in iter_chunks(keys, queue, exclude, share, chunk_size):
            emb = chunk.emb.to(query.dtype)
            dots = query @ emb.T
            positive, valid = classify(chunk, positive_index, exclude.query, share.query, negatives)
            probs = torch.exp(dots * scale - lse[:, None]).masked_fill(~valid, 0.0)
            g = (probs - _targets(positive, valid, pos_count, valid_count, eps)) * grad_loss[:, None]
            grad_q += (g @ emb) * scale
            grad_scale += (g * dots).sum()
            if grads[chunk.source] is not None:
                hi = chunk.lo + emb.shape[0]
                grads[chunk.source][chunk.lo : hi] = ((g.T @ query) * scale).to(grads[chunk.source].dtype)
        return (
            grad_q if need_q else None,
            grads[0],
            grads[1],
            grad_scale if need_scale else None,
            None, None, None, None, None, None,
        )


def infonce_chunked(
    query: Tensor,
    keys: Tensor,
    queue: Tensor,
    scale: Tensor,
    positive_index: Tensor,
    exclude: MatchIds,
    share: MatchIds,
    negatives: Tensor | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int = 4096,
    backend: Literal["auto", "torch", "triton"] = "auto",
) -> tuple[Tensor, Tensor]:
    """Per-row InfoNCE losses [B] and negative-similarity stats [B, 4] without [B, N+Q] logits.

    `positive_index` [B] indexes each query's own positive in `keys`; `negatives` [B, K]
    (indices into [keys; queue], -1 = none) restricts the negatives; `scale` is a 0-dim tensor.
    `backend`: `auto` is Triton on CUDA when triton is importable, this torch code otherwise.
    """
    triton = backend == "triton" or (backend == "auto" and use_triton(query))
    log_choice_once("chunked infonce", "triton" if triton else "torch", query.device.type)
    if triton:
        from plait.ops.triton_infonce import infonce_triton

        return infonce_triton(
            query, keys, queue, scale, positive_index, exclude, share, negatives, label_smoothing, chunk_size
        )
    scale = torch.as_tensor(scale, dtype=query.dtype, device=query.device)
    return _ChunkedInfoNCE.apply(
        query, keys, queue, scale, positive_index, exclude, share, negatives, label_smoothing, chunk_size
    )


def infonce_reference(
    query: Tensor,
    keys: Tensor,
    queue: Tensor,
    scale: Tensor,
    positive_index: Tensor,
    exclude: MatchIds,
    share: MatchIds,
    negatives: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The same losses and stats as `infonce_chunked`, from fully materialised logits (autograd)."""
    candidates = torch.cat([keys, queue.to(keys.dtype)]).to(query.dtype)
    whole = CandidateChunk(
        0, 0, 0, candidates,
        torch.cat([exclude.keys, exclude.queue]), torch.cat([share.keys, share.queue]),
    )
    positive, valid = classify(whole, positive_index, exclude.query, share.query, negatives)
    dots = query @ candidates.T
    log_probs = torch.log_softmax((dots * scale).masked_fill(~valid, float("-inf")), dim=1)
    pos_count = (positive & valid).sum(1).clamp(min=1).to(query.dtype)
    valid_count = valid.sum(1).clamp(min=1).to(query.dtype)
    targets = _targets(positive, valid, pos_count, valid_count, label_smoothing)
    loss = -(targets * log_probs.masked_fill(~valid, 0.0)).sum(1)
    stats = query.new_zeros(query.shape[0], len(NEG_STATS))
    with torch.no_grad():
        neg = valid & ~positive
        stats[:, 0] = neg.sum(1)
        stats[:, 1] = torch.where(neg, dots, 0.0).sum(1)
        stats[:, 2] = torch.where(neg, dots * dots, 0.0).sum(1)
        stats[:, 3] = dots.masked_fill(~neg, float("-inf")).amax(1) if dots.shape[1] else float("-inf")
    return loss, stats
