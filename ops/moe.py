"""Mixture-of-experts dispatch: group token-expert assignments by expert (one sort), run each expert once on
its contiguous block, and scatter the results back weighted by the gates. A plain loop is the reference.

Capacity (when set) keeps, for every expert, first all first-choice assignments in token order, then the
second choices, and so on (so a token's top choice is the last to be dropped); assignments beyond the
capacity are dropped and counted. A dropped assignment contributes nothing to its token's output.

`grouped_ffn` runs each expert's FFN (gated or not, with or without biases) on its block: torch's grouped GEMM
where it takes the operands, with nothing read on the host, else a loop over the blocks.

`permute` / `combine` take the Triton kernels of `ops.triton_moe` when triton is importable and the
tensors are on CUDA (`backend="auto"`), the torch code here otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from plait.ops.fused import log_choice_once, use_triton
from plait.ops.segments import index_counts

KernelBackend = Literal["auto", "torch", "triton"]
"""`auto`: Triton on CUDA when triton is importable, torch otherwise; `triton` forces it (tests: TRITON_INTERPRET=1)."""


@dataclass
class ExpertDispatch:
    """Token-expert assignments grouped by expert, capacity already applied."""

    token_index: torch.Tensor
    """[A] int64 source token of each kept assignment, grouped by expert (expert 0's block first)."""
    gate: torch.Tensor
    """[A] gate weight of each kept assignment (carries the router gradient)."""
    counts: torch.Tensor
    """[E] int64 kept assignments per expert."""
    dropped: torch.Tensor
    """Scalar int64: assignments dropped by the capacity limit."""


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Assignments one expert may take: `ceil(factor * tokens * k / E)`, or None (dropless) without a factor.

    The factor is taken as the decimal it is written as (1.2 is 6/5), so no binary rounding moves the ceiling.
    """
    if capacity_factor is None:
        return None
    return math.ceil(Fraction(str(capacity_factor)) * num_tokens * top_k / num_experts)


def dispatch(
    topk_experts: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int | None = None
) -> ExpertDispatch:
    """Group the `[T, k]` assignments by expert with one stable sort, dropping those past `capacity`."""
    num_tokens = topk_experts.shape[0]
    # Slot-major flattening + a stable sort by expert gives, inside each expert, slot 0 tokens first.
    experts = topk_experts.t().reshape(-1)
    order = torch.argsort(experts, stable=True)
    counts = index_counts(experts, num_experts)
    gate = topk_weights.t().reshape(-1)[order]
    token_index = order % max(num_tokens, 1)
    if capacity is None:
        return ExpertDispatch(token_index, gate, counts, counts.new_zeros(()))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[experts[order]]
    keep = rank < capacity
    kept = counts.clamp(max=capacity)
    return ExpertDispatch(token_index[keep], gate[keep], kept, counts.sum() - kept.sum())


def _triton_selected(backend: KernelBackend, x: torch.Tensor) -> bool:
    """Resolve `backend` for tensors like `x`, logging the choice once."""
    triton = backend == "triton" or (backend == "auto" and use_triton(x))
    log_choice_once("moe permute/combine", "triton" if triton else "torch", x.device.type)
    return triton


def permute(x: torch.Tensor, plan: ExpertDispatch, backend: KernelBackend = "auto") -> torch.Tensor:
    """Token rows in expert-grouped assignment order: `[T, D]` -> `[A, D]` (`x[plan.token_index]`)."""
    if _triton_selected(backend, x):
        from plait.ops import triton_moe

        return triton_moe.permute(x, plan)
    return x[plan.token_index]


def combine(
    expert_out: torch.Tensor, plan: ExpertDispatch, num_tokens: int, backend: KernelBackend = "auto"
) -> torch.Tensor:
    """Sum each token's expert outputs weighted by their gates: `[A, D]` grouped rows -> `[T, D]`."""
    if _triton_selected(backend, expert_out):
        from plait.ops import triton_moe

        return triton_moe.combine(expert_out, plan, num_tokens)
    weighted = expert_out * plan.gate[:, None].to(expert_out.dtype)
    out = expert_out.new_zeros((num_tokens, expert_out.shape[1]))
    return out.index_add(0, plan.token_index, weighted)


def grouped_ffn(
    x: torch.Tensor,
    counts: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert e's FFN on its block of `x` (`counts[e]` rows), for all e; weights are stacked per expert.

    `w_in [E, F or 2F, D]` (gated: gate rows then up rows), `w_out [E, D, F]`, optional biases `b_in [E, F or 2F]`,
    `b_out [E, D]`. Every expert runs, even on zero rows, so all expert weights are in the graph on every rank
    (ZeRO-3 needs identical work). Where torch's grouped GEMM takes the operands it runs two grouped matmuls with
    the block offsets on the device and adds each row's expert bias by a device-side gather (no host sync);
    otherwise a loop over the blocks, which reads `counts` on the host.
    """
    if grouped_mm_supported(x, w_in, w_out):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        row_expert = _row_experts(counts, x.shape[0]) if b_in is not None or b_out is not None else None
        h = _add_bias(_ContiguousGrad.apply(torch.nn.functional.grouped_mm(x, w_in.transpose(1, 2), offs=offsets)),
                      b_in, row_expert)
        h = _activate(h, activation, gated)
        out = _ContiguousGrad.apply(torch.nn.functional.grouped_mm(h, w_out.transpose(1, 2), offs=offsets))
        return _add_bias(out, b_out, row_expert)
    blocks = torch.split(x, counts.tolist())
    outs = [
        ffn_rows(block, w_in[e], w_out[e], activation, gated, _expert(b_in, e), _expert(b_out, e))
        for e, block in enumerate(blocks)
    ]
    return torch.cat(outs) if outs else x.new_zeros((0, w_out.shape[1]))


def _row_experts(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] int64: the expert of each row of the expert-grouped block layout (no host read: `rows` is known)."""
    experts = torch.arange(counts.shape[0], device=counts.device)
    return torch.repeat_interleave(experts, counts, output_size=rows)


def _add_bias(h: torch.Tensor, bias: torch.Tensor | None, row_expert: torch.Tensor | None) -> torch.Tensor:
    """`h [A, N]` plus each row's expert bias (`bias [E, N]`); `h` unchanged without a bias."""
    return h if bias is None else h + bias[row_expert]


def _expert(bias: torch.Tensor | None, e: int) -> torch.Tensor | None:
    """Expert e's row of a stacked bias, or None."""
    return None if bias is None else bias[e]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped GEMM's backward rejects broadcast
    (stride-0) gradients such as those of a `.sum()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_mm_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs these operands: fp32/bf16 on CPU, bf16 on CUDA (sm80+),
    every row 16-byte aligned."""
    if x.dtype not in (torch.float32, torch.bfloat16) or w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type == "meta":
        if x.dtype != torch.bfloat16:
            return False
    elif x.device.type != "cpu":
        return False
    sizes = (*w_in.shape[1:], *w_out.shape[1:])
    return all(n * x.element_size() % 16 == 0 for n in sizes)


def _activate(h: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor], gated: bool) -> torch.Tensor:
    """The FFN's hidden activation: `act(gate) * up` when gated (gate columns first), else `act(h)`."""
    if gated:
        g, u = h.chunk(2, dim=-1)
        return activation(g) * u
    return activation(h)


def ffn_rows(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One FFN: `down(act(gate(x)) * up(x))` when gated (SwiGLU family), else `down(act(up(x)))`; optional
    biases `b_in [F or 2F]`, `b_out [D]`."""
    linear = torch.nn.functional.linear
    return linear(_activate(linear(x, w_in, b_in), activation, gated), w_out, b_out)


def reference_moe(
    x: torch.Tensor,
    topk_experts: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    capacity: int | None = None,
) -> torch.Tensor:
    """Plain loop over slots and tokens: `out[t] += w[t, j] * expert[e](x[t])`, honouring capacity in the same order."""
    num_tokens, top_k = topk_experts.shape
    out = torch.zeros_like(x)
    load: dict[int, int] = {}
    for j in range(top_k):
        for t in range(num_tokens):
            e = int(topk_experts[t, j])
            if capacity is not None and load.get(e, 0) >= capacity:
                continue
            load[e] = load.get(e, 0) + 1
            out[t] = out[t] + topk_weights[t, j] * expert_fn(e, x[t : t + 1])[0]
    return out
