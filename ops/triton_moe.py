"""Triton MoE token permute / un-permute with autograd: the same results as `ops.moe` on CUDA, no atomics.

`permute(x, plan)` equals `x[plan.token_index]` (rows grouped by expert) and `combine(y, plan, T)` equals
the torch `combine` (gate-weighted sum of each token's expert rows). Both backward passes are again a
gather or a gather-sum, so every output row is written by exactly one program and results are
deterministic. A token's assignments are found through a CSR view of the plan (assignment rows sorted
by token, `token_offsets [T+1]`), built with one stable sort of the A assignments.

Imported only when triton is importable; on CPU tensors the kernels run under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.ops.moe import ExpertDispatch

_MAX_BLOCK_D = 1024


@triton.jit
def _gather_rows_kernel(
    src, index, weight, other, out, grad_weight, D,
    HAS_WEIGHT: tl.constexpr, WANT_DOT: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row a: `out[a] = src[index[a]] * weight[a]`; with WANT_DOT also `grad_weight[a] = <src[index[a]], other[a]>`."""
    a = tl.program_id(0).to(tl.int64)
    row = tl.load(index + a)
    scale = tl.load(weight + a).to(ACC) if HAS_WEIGHT else 1.0
    dot = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        values = tl.load(src + row * D + cols, mask=mask, other=0.0).to(ACC)
        tl.store(out + a * D + cols, (values * scale).to(out.dtype.element_ty), mask=mask)
        if WANT_DOT:
            dot += values * tl.load(other + a * D + cols, mask=mask, other=0.0).to(ACC)
    if WANT_DOT:
        tl.store(grad_weight + a, tl.sum(dot, 0).to(grad_weight.dtype.element_ty))


@triton.jit
def _gather_sum_kernel(
    src, weight, rows, offsets, out, D,
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token t: `out[t] = sum_i weight[rows[i]] * src[rows[i]]` over i in [offsets[t], offsets[t+1])."""
    t = tl.program_id(0).to(tl.int64)
    # int32 loop bounds: an int64 induction variable gains nothing (A < 2**31) and costs registers.
    start = tl.load(offsets + t).to(tl.int32)
    end = tl.load(offsets + t + 1).to(tl.int32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        acc = tl.zeros([BLOCK_D], ACC)
        for i in range(start, end):
            a = tl.load(rows + i)
            values = tl.load(src + a * D + cols, mask=mask, other=0.0).to(ACC)
            if HAS_WEIGHT:
                values = values * tl.load(weight + a).to(ACC)
            acc += values
        tl.store(out + t * D + cols, acc.to(out.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulate in float64 for float64 tensors (the references), float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(d: int) -> int:
    """Columns one program handles per pass."""
    return min(triton.next_power_of_2(max(d, 1)), _MAX_BLOCK_D)


def token_csr(token_index: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment rows sorted by token, `[T+1]` offsets): where each token's assignments sit in the grouped rows."""
    rows = torch.argsort(token_index, stable=True)
    counts = torch.bincount(token_index, minlength=num_tokens)
    offsets = torch.zeros(num_tokens + 1, dtype=torch.long, device=token_index.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return rows, offsets


def gather_rows(
    src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`src[index] * weight[:, None]` (weight optional) as one Triton launch."""
    src = src.contiguous()
    out = src.new_empty((index.numel(), src.shape[1]))
    if index.numel():
        w = weight.contiguous() if weight is not None else src
        _gather_rows_kernel[(index.numel(),)](
            src, index.contiguous(), w, src, out, out, src.shape[1],
            HAS_WEIGHT=weight is not None, WANT_DOT=False, ACC=_acc_dtype(src.dtype), BLOCK_D=_block_d(src.shape[1]),
        )
    return out


def gather_rows_and_dot(
    src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, other: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(`src[index] * weight[:, None]`, rowwise `<src[index], other>` in weight's dtype) in one launch."""
    src, other = src.contiguous(), other.contiguous()
    out = other.new_empty((index.numel(), src.shape[1]))
    dots = weight.new_empty(index.numel())
    if index.numel():
        _gather_rows_kernel[(index.numel(),)](
            src, index.contiguous(), weight.contiguous(), other, out, dots, src.shape[1],
            HAS_WEIGHT=True, WANT_DOT=True, ACC=_acc_dtype(src.dtype), BLOCK_D=_block_d(src.shape[1]),
        )
    return out, dots


def gather_sum(
    src: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[t] = sum(weight[a] * src[a] for a in rows[offsets[t]:offsets[t+1]])` (weight optional)."""
    src = src.contiguous()
    num_out = offsets.numel() - 1
    out = src.new_empty((num_out, src.shape[1]))
    if num_out:
        w = weight.contiguous() if weight is not None else src
        _gather_sum_kernel[(num_out,)](
            src, w, rows, offsets, out, src.shape[1],
            HAS_WEIGHT=weight is not None, ACC=_acc_dtype(src.dtype), BLOCK_D=_block_d(src.shape[1]),
        )
    return out


class _Permute(torch.autograd.Function):
    """Forward: gather rows by assignment; backward: sum each token's assignment gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(token_index)
        ctx.num_tokens = x.shape[0]
        return gather_rows(x, token_index)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (token_index,) = ctx.saved_tensors
        rows, offsets = token_csr(token_index, ctx.num_tokens)
        return gather_sum(grad_out, rows, offsets), None


class _Combine(torch.autograd.Function):
    """Forward: gate-weighted sum per token; backward: gather the token gradient back per assignment (+ gate grad)."""

    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, gate: torch.Tensor, token_index: torch.Tensor, num_tokens: int):
        rows, offsets = token_csr(token_index, num_tokens)
        weight = gate.to(expert_out.dtype)
        ctx.save_for_backward(expert_out, weight, token_index)
        ctx.gate_dtype = gate.dtype
        return gather_sum(expert_out, rows, offsets, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        expert_out, weight, token_index = ctx.saved_tensors
        grad_expert, grad_gate = gather_rows_and_dot(grad_out, token_index, weight, expert_out)
        return grad_expert, grad_gate.to(ctx.gate_dtype), None, None


def permute(x: torch.Tensor, plan: ExpertDispatch) -> torch.Tensor:
    """Rows of `x [T, D]` in expert-grouped assignment order, `[A, D]` (= `x[plan.token_index]`)."""
    return _Permute.apply(x, plan.token_index)


def combine(expert_out: torch.Tensor, plan: ExpertDispatch, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of each token's expert rows: `[A, D]` grouped rows -> `[T, D]` (as `ops.moe.combine`)."""
    return _Combine.apply(expert_out, plan.gate, plan.token_index, num_tokens)
