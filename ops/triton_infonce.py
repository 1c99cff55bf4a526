"""Triton InfoNCE with a negative queue: the same losses, statistics and gradients as `infonce_chunked`.

The [B, N + Q] logits never exist, not even chunk by chunk in global memory. Forward: programs own a
block of query rows and a split of the candidates (keys, then the queue); each tile of dot products
is classified from the ids (own positive / excluded / shared positive / listed negative) and folded
into per-row partial sums (online logsumexp, target sums, negative statistics); the few split partials
per row are merged in torch. Backward recomputes the tiles twice: once per query block (gradient of
the queries and the temperature, split partials summed in torch) and once per candidate block
(gradient of the keys / queue rows, each written by one program): no atomics, deterministic.

Dot products take the query dtype (candidates are cast to it, as in the torch path) and accumulate in
float32 (float64 for float64 inputs); float32 dots use IEEE precision, never TF32. Imported only when
triton is importable; on CPU tensors the kernels run under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from plait.ops.infonce import NEG_STATS, MatchIds

_PARTIAL = 10
"""Per-row partial sums: row max, sum exp, positives (count, logit sum), valid (count, logit sum), NEG_STATS."""


@triton.jit
def _match(q_ids, c_ids, rows, row_ok, cols, col_ok, F: tl.constexpr):
    """[BB, BC] True where the query and candidate share any id >= 0 over F id fields."""
    hit = (rows[:, None] < 0) & (cols[None, :] < 0)
    for f in tl.static_range(F):
        qi = tl.load(q_ids + rows.to(tl.int64) * F + f, mask=row_ok, other=-1)
        ci = tl.load(c_ids + cols.to(tl.int64) * F + f, mask=col_ok, other=-1)
        hit = hit | ((qi[:, None] == ci[None, :]) & (qi[:, None] >= 0))
    return hit


@triton.jit
def _classify(rows, row_ok, cols, col_ok, col_offset, pos_index, ex_q, ex_c, sh_q, sh_c, neg, K,
              FE: tl.constexpr, FS: tl.constexpr, HAS_NEG: tl.constexpr):
    """(positive, valid) [BB, BC] masks of a tile, as `ops.infonce.classify`; out-of-range cells are invalid."""
    index = col_offset + cols
    own = index[None, :] == tl.load(pos_index + rows, mask=row_ok, other=-1)[:, None]
    excluded = _match(ex_q, ex_c, rows, row_ok, cols, col_ok, FE) & ~own
    positive = own | (_match(sh_q, sh_c, rows, row_ok, cols, col_ok, FS) & ~excluded)
    valid = ~excluded & row_ok[:, None] & col_ok[None, :]
    if HAS_NEG:
        listed = own & ~own
        for kk in range(K):
            n = tl.load(neg + rows.to(tl.int64) * K + kk, mask=row_ok, other=-1)
            listed = listed | (n[:, None] == index[None, :])
        valid = valid & (positive | listed)
    return positive & valid, valid


@triton.jit
def _dots(q, c, rows, row_ok, cols, col_ok, D, ACC: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BB, BC] dot products of query rows and candidate rows, D in BLOCK_D steps."""
    acc = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(q + rows.to(tl.int64)[:, None] * D + d[None, :], mask=row_ok[:, None] & (d < D)[None, :],
                    other=0.0).to(DOT)
        b = tl.load(c + cols.to(tl.int64)[:, None] * D + d[None, :], mask=col_ok[:, None] & (d < D)[None, :],
                    other=0.0).to(DOT)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _dlogits(dots, scale, positive, valid, rows, row_ok, lse, pos_count, valid_count, grad_loss, eps):
    """[BB, BC] d loss / d logits: (softmax - soft target) * upstream gradient, zero off the valid cells."""
    lse_r = tl.load(lse + rows, mask=row_ok, other=0.0)
    pos_n = tl.load(pos_count + rows, mask=row_ok, other=1.0)
    valid_n = tl.load(valid_count + rows, mask=row_ok, other=1.0)
    up = tl.load(grad_loss + rows, mask=row_ok, other=0.0).to(lse_r.dtype)
    probs = tl.where(valid, tl.exp(dots * scale - lse_r[:, None]), 0.0)
    target = (1.0 - eps) * positive.to(lse_r.dtype) / pos_n[:, None] + eps * valid.to(lse_r.dtype) / valid_n[:, None]
    return (probs - target) * up[:, None]


@triton.jit
def _forward_kernel(q, c, scale_ptr, pos_index, ex_q, ex_c, sh_q, sh_c, neg, partial,
                    B, C, D, K, col_offset, chunk, split_offset,
                    FE: tl.constexpr, FS: tl.constexpr, HAS_NEG: tl.constexpr, ACC: tl.constexpr,
                    DOT: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial sums of one query block over one candidate split, written to `partial[split, rows, :]`."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    split = tl.program_id(1)
    scale = tl.load(scale_ptr).to(ACC)
    zero = tl.zeros([BLOCK_B], ACC)
    row_max, sum_exp, neg_max = zero - float("inf"), zero, zero - float("inf")
    pos_n, pos_sum, valid_n, valid_sum, neg_n, neg_sum, neg_sq = zero, zero, zero, zero, zero, zero, zero
    lo = split * chunk
    hi = tl.minimum(lo + chunk, C)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < hi
        dots = _dots(q, c, rows, row_ok, cols, col_ok, D, ACC, DOT, IEEE, BLOCK_B, BLOCK_C, BLOCK_D)
        positive, valid = _classify(rows, row_ok, cols, col_ok, col_offset, pos_index, ex_q, ex_c, sh_q, sh_c,
                                    neg, K, FE, FS, HAS_NEG)
        logits = dots * scale
        masked = tl.where(valid, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(masked, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        sum_exp = sum_exp * tl.exp(row_max - safe) + tl.sum(tl.exp(masked - safe[:, None]), 1)
        row_max = new_max
        pos_n += tl.sum(positive.to(ACC), 1)
        pos_sum += tl.sum(tl.where(positive, logits, 0.0), 1)
        valid_n += tl.sum(valid.to(ACC), 1)
        valid_sum += tl.sum(tl.where(valid, logits, 0.0), 1)
        negative = valid & ~positive
        neg_n += tl.sum(negative.to(ACC), 1)
        neg_sum += tl.sum(tl.where(negative, dots, 0.0), 1)
        neg_sq += tl.sum(tl.where(negative, dots * dots, 0.0), 1)
        neg_max = tl.maximum(neg_max, tl.max(tl.where(negative, dots, float("-inf")), 1))
    base = partial + ((split_offset + split) * B + rows).to(tl.int64) * 10
    tl.store(base + 0, row_max, mask=row_ok)
    tl.store(base + 1, sum_exp, mask=row_ok)
    tl.store(base + 2, pos_n, mask=row_ok)
    tl.store(base + 3, pos_sum, mask=row_ok)
    tl.store(base + 4, valid_n, mask=row_ok)
    tl.store(base + 5, valid_sum, mask=row_ok)
    tl.store(base + 6, neg_n, mask=row_ok)
    tl.store(base + 7, neg_sum, mask=row_ok)
    tl.store(base + 8, neg_sq, mask=row_ok)
    tl.store(base + 9, neg_max, mask=row_ok)


@triton.jit
def _grad_query_kernel(q, c, scale_ptr, pos_index, ex_q, ex_c, sh_q, sh_c, neg,
                       lse, pos_count, valid_count, grad_loss, eps, grad_q, grad_scale,
                       B, C, D, K, col_offset, chunk, split_offset,
                       FE: tl.constexpr, FS: tl.constexpr, HAS_NEG: tl.constexpr, ACC: tl.constexpr,
                       DOT: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, FULL_D: tl.constexpr):
    """Split partials of `g @ candidates` (rows of one query block) and of `sum(g * dots)` per row."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    split = tl.program_id(1)
    scale = tl.load(scale_ptr).to(ACC)
    d = tl.arange(0, FULL_D)
    acc = tl.zeros([BLOCK_B, FULL_D], ACC)
    dscale = tl.zeros([BLOCK_B], ACC)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, C)
    for c0 in range(lo, hi, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < hi
        dots = _dots(q, c, rows, row_ok, cols, col_ok, D, ACC, DOT, IEEE, BLOCK_B, BLOCK_C, BLOCK_D)
        positive, valid = _classify(rows, row_ok, cols, col_ok, col_offset, pos_index, ex_q, ex_c, sh_q, sh_c,
                                    neg, K, FE, FS, HAS_NEG)
        g = _dlogits(dots, scale, positive, valid, rows, row_ok, lse, pos_count, valid_count, grad_loss, eps)
        dscale += tl.sum(g * dots, 1)
        cand = tl.load(c + cols.to(tl.int64)[:, None] * D + d[None, :], mask=col_ok[:, None] & (d < D)[None, :],
                       other=0.0).to(DOT)
        if IEEE:
            acc = tl.dot(g.to(DOT), cand, acc, input_precision="ieee")
        else:
            acc = tl.dot(g.to(DOT), cand, acc)
    out = ((split_offset + split) * B + rows).to(tl.int64)
    tl.store(grad_q + out[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & (d < D)[None, :])
    tl.store(grad_scale + out, dscale, mask=row_ok)


@triton.jit
def _grad_candidate_kernel(q, c, scale_ptr, pos_index, ex_q, ex_c, sh_q, sh_c, neg,
                           lse, pos_count, valid_count, grad_loss, eps, grad_c,
                           B, C, D, K, col_offset,
                           FE: tl.constexpr, FS: tl.constexpr, HAS_NEG: tl.constexpr, ACC: tl.constexpr,
                           DOT: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                           FULL_D: tl.constexpr):
    """`scale * g^T @ queries` for one block of candidate rows, over all query blocks."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    scale = tl.load(scale_ptr).to(ACC)
    d = tl.arange(0, FULL_D)
    acc = tl.zeros([BLOCK_C, FULL_D], ACC)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        dots = _dots(q, c, rows, row_ok, cols, col_ok, D, ACC, DOT, IEEE, BLOCK_B, BLOCK_C, BLOCK_D)
        positive, valid = _classify(rows, row_ok, cols, col_ok, col_offset, pos_index, ex_q, ex_c, sh_q, sh_c,
                                    neg, K, FE, FS, HAS_NEG)
        g = _dlogits(dots, scale, positive, valid, rows, row_ok, lse, pos_count, valid_count, grad_loss, eps)
        query = tl.load(q + rows.to(tl.int64)[:, None] * D + d[None, :], mask=row_ok[:, None] & (d < D)[None, :],
                        other=0.0).to(DOT)
        if IEEE:
            acc = tl.dot(tl.trans(g).to(DOT), query, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(g).to(DOT), query, acc)
    out = cols.to(tl.int64)
    tl.store(grad_c + out[:, None] * D + d[None, :], (acc * scale).to(grad_c.dtype.element_ty),
             mask=col_ok[:, None] & (d < D)[None, :])


_ACC = {torch.float64: tl.float64}
_DOT = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class _Problem:
    """The launch arguments shared by every kernel, and the candidate splits of both sources."""

    def __init__(self, query, keys, queue, scale, positive_index, exclude, share, negatives, chunk_size):
        cuda = query.is_cuda
        self.query, self.scale = query.contiguous(), scale
        self.b, self.d = query.shape
        self.acc_torch = torch.float64 if query.dtype == torch.float64 else torch.float32
        self.meta = {
            "FE": exclude.query.shape[1], "FS": share.query.shape[1], "HAS_NEG": negatives is not None,
            "ACC": _ACC.get(query.dtype, tl.float32), "DOT": _DOT[query.dtype],
            "IEEE": query.dtype in (torch.float32, torch.float64),
            "BLOCK_B": 32 if cuda else 16, "BLOCK_C": 64 if cuda else 16, "BLOCK_D": 64 if cuda else 16,
        }
        # The backward kernels hold a [block, D] fp32 accumulator: more warps keep it in registers on GPU.
        self.backward_warps = 8 if cuda else 4
        self.full_d = max(16, triton.next_power_of_2(self.d))
        self.pos_index = positive_index.contiguous().long()
        self.ex_q, self.sh_q = self.ids(exclude.query), self.ids(share.query)
        self.neg = negatives.contiguous().long() if negatives is not None else self.pos_index
        self.k = negatives.shape[1] if negatives is not None else 0
        target = 4 * torch.cuda.get_device_properties(query.device).multi_processor_count if cuda else 1
        row_blocks = triton.cdiv(self.b, self.meta["BLOCK_B"])
        self.sources = []
        offset, splits = 0, 0
        for emb, ex, sh in ((keys, exclude.keys, share.keys), (queue, exclude.queue, share.queue)):
            rows = emb.shape[0]
            wanted = max(1, triton.cdiv(target, row_blocks))
            chunk = min(chunk_size, triton.cdiv(triton.cdiv(rows, wanted), self.meta["BLOCK_C"]) * self.meta["BLOCK_C"])
            chunk = max(chunk, 1)
            count = triton.cdiv(rows, chunk) if rows and self.b else 0
            self.sources.append((emb.contiguous(), self.ids(ex), self.ids(sh), offset, chunk, splits, count))
            offset, splits = offset + rows, splits + count
        self.splits = splits

    def ids(self, ids: Tensor) -> Tensor:
        """Contiguous int64 ids; an empty id table is replaced by a real (never read) buffer for the pointer."""
        return ids.contiguous().long() if ids.numel() else self.pos_index

    def common(self, emb, ex, sh):
        """Positional arguments every kernel starts with."""
        return (self.query, emb, self.scale, self.pos_index, self.ex_q, ex, self.sh_q, sh, self.neg)


def _merge(partial: Tensor) -> Tensor:
    """Fold split partials [S, B, 10] into one row of sums per query [B, 10] (online logsumexp merge)."""
    row_max = partial[..., 0].amax(0)
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = partial.sum(0)
    sums[:, 0] = row_max
    sums[:, 1] = (partial[..., 1] * torch.exp(partial[..., 0] - safe)).sum(0)
    sums[:, 9] = partial[..., 9].amax(0)
    return sums


class _TritonInfoNCE(torch.autograd.Function):
    """Triton forward and backward of the chunked InfoNCE; grads for query, keys, queue and scale."""

    @staticmethod
    def forward(ctx, query, keys, queue, scale, positive_index, exclude, share, negatives, eps, chunk_size):
        prob = _Problem(query, keys, queue, scale, positive_index, exclude, share, negatives, chunk_size)
        partial = query.new_empty((prob.splits, prob.b, _PARTIAL), dtype=prob.acc_torch)
        for emb, ex, sh, offset, chunk, first, count in prob.sources:
            if count:
                grid = (triton.cdiv(prob.b, prob.meta["BLOCK_B"]), count)
                _forward_kernel[grid](*prob.common(emb, ex, sh), partial, prob.b, emb.shape[0], prob.d, prob.k,
                                      offset, chunk, first, **prob.meta)
        sums = _merge(partial) if prob.splits else partial.new_zeros((prob.b, _PARTIAL))
        if not prob.splits:
            sums[:, 0] = sums[:, 9] = float("-inf")
        safe = torch.where(torch.isfinite(sums[:, 0]), sums[:, 0], torch.zeros_like(sums[:, 0]))
        lse = safe + torch.log(sums[:, 1])
        pos_count, valid_count = sums[:, 2].clamp(min=1), sums[:, 4].clamp(min=1)
        loss = lse - (1.0 - eps) * sums[:, 3] / pos_count - eps * sums[:, 5] / valid_count
        ctx.save_for_backward(lse, pos_count, valid_count)
        ctx.problem, ctx.eps, ctx.grad_dtypes = prob, eps, (keys.dtype, queue.dtype)
        stats = sums[:, 6 : 6 + len(NEG_STATS)].to(query.dtype)
        ctx.mark_non_differentiable(stats)
        return loss.to(query.dtype), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        lse, pos_count, valid_count = ctx.saved_tensors
        prob, eps = ctx.problem, ctx.eps
        grad_loss = grad_loss.contiguous()
        extra = (lse, pos_count, valid_count, grad_loss, eps)
        grad_q = lse.new_zeros((prob.splits, prob.b, prob.d))
        grad_scale = lse.new_zeros((prob.splits, prob.b))
        grads = []
        for source, (emb, ex, sh, offset, chunk, first, count) in enumerate(prob.sources):
            shape = (emb.shape[0], prob.d)
            if count:
                grid = (triton.cdiv(prob.b, prob.meta["BLOCK_B"]), count)
                _grad_query_kernel[grid](*prob.common(emb, ex, sh), *extra, grad_q, grad_scale, prob.b, emb.shape[0],
                                         prob.d, prob.k, offset, chunk, first, FULL_D=prob.full_d,
                                         num_warps=prob.backward_warps, **prob.meta)
            grad = None
            if ctx.needs_input_grad[1 + source]:
                grad = emb.new_zeros(shape, dtype=ctx.grad_dtypes[source])
                if count:
                    grid = (triton.cdiv(emb.shape[0], prob.meta["BLOCK_C"]),)
                    _grad_candidate_kernel[grid](*prob.common(emb, ex, sh), *extra, grad, prob.b, emb.shape[0],
                                                 prob.d, prob.k, offset, FULL_D=prob.full_d,
                                                 num_warps=prob.backward_warps, **prob.meta)
            grads.append(grad)
        dtype = prob.query.dtype
        return (
            (grad_q.sum(0) * prob.scale).to(dtype) if ctx.needs_input_grad[0] else None,
            grads[0],
            grads[1],
            grad_scale.sum().to(prob.scale.dtype) if ctx.needs_input_grad[3] else None,
            None, None, None, None, None, None,
        )


def infonce_triton(
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
) -> tuple[Tensor, Tensor]:
    """Per-row InfoNCE losses [B] and negative statistics [B, 4], as `infonce_chunked` (same arguments).

    `chunk_size` caps the candidates one program walks; on CUDA splits are made smaller when that
    leaves streaming multiprocessors idle.
    """
    scale = torch.as_tensor(scale, dtype=query.dtype, device=query.device)
    return _TritonInfoNCE.apply(
        query, keys, queue, scale, positive_index, exclude, share, negatives, label_smoothing, chunk_size
    )
