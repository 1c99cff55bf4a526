"""Mixture-of-experts dispatch: group token-expert assignments by expert (one sort), run each expert once on
its contiguous block, and scatter the results back weighted by the gates. A plain loop is the reference.

Capacity (when set) keeps, for every expert, first all first-choice assignments in token order, then the
second choices, and so on (so a token's top choice is the last to be dropped); assignments beyond the
capacity are dropped and counted. A dropped assignment contributes nothing to its token's output.

`permute` / `combine` take the Triton kernels of `kernels.triton_moe` when triton is importable and the
tensors are on CUDA (`backend="auto"`), the torch code here otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from plait.kernels.fused import log_choice_once, use_triton

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
    """Assignments one expert may take: `ceil(factor * tokens * k / E)`, or None (dropless) without a factor."""
    if capacity_factor is None:
        return None
    return -(-int(capacity_factor * num_tokens * top_k) // num_experts)


def dispatch(
    topk_experts: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, capacity: int | None = None
) -> ExpertDispatch:
    """Group the `[T, k]` assignments by expert with one stable sort, dropping those past `capacity`."""
    num_tokens = topk_experts.shape[0]
    # Slot-major flattening + a stable sort by expert gives, inside each expert, slot 0 tokens first.
    experts = topk_experts.t().reshape(-1)
    order = torch.argsort(experts, stable=True)
    counts = torch.bincount(experts, minlength=num_experts)
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
        from plait.kernels import triton_moe

        return triton_moe.permute(x, plan)
    return x[plan.token_index]


def combine(
    expert_out: torch.Tensor, plan: ExpertDispatch, num_tokens: int, backend: KernelBackend = "auto"
) -> torch.Tensor:
    """Sum each token's expert outputs weighted by their gates: `[A, D]` grouped rows -> `[T, D]`."""
    if _triton_selected(backend, expert_out):
        from plait.kernels import triton_moe

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
) -> torch.Tensor:
    """Expert e's FFN on its block of `x` (`counts[e]` rows), for all e; weights are stacked per expert.

    `w_in [E, F or 2F, D]` (gated: gate rows then up rows), `w_out [E, D, F]`. Every expert runs, even on
    zero rows, so all expert weights are in the graph on every rank (ZeRO-3 needs identical work).
    """
    blocks = torch.split(x, counts.tolist())
    outs = [
        ffn_rows(block, w_in[e], w_out[e], activation, gated) for e, block in enumerate(blocks)
    ]
    return torch.cat(outs) if outs else x.new_zeros((0, w_out.shape[1]))


def ffn_rows(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor],
    gated: bool,
) -> torch.Tensor:
    """One FFN: `down(act(gate(x)) * up(x))` when gated (SwiGLU family), else `down(act(up(x)))`."""
    h = x @ w_in.t()
    if gated:
        g, u = h.chunk(2, dim=-1)
        h = activation(g) * u
    else:
        h = activation(h)
    return h @ w_out.t()


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
