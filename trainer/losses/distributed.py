"""Collectives for the losses: variable-size gathers (with and without gradient) and sums.

Every function is a no-op on one process (torch.distributed not initialised). Ranks may hold
different row counts, zero included: sizes travel with the host-side metadata (a gloo group over the
same ranks, so the device is never read back), rows are padded to the largest, gathered, then
un-padded. Callers must issue the same collectives in the same order on every rank, whatever their
data.

Gradient convention: a loss term that is a mean over the global batch is returned on each rank
as `world_size * (sum over local rows) / global_count`; DeepSpeed's gradient averaging over
ranks then yields exactly the gradient of the single-process loss on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def is_distributed() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in `group` (1 without torch.distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in `group` (0 without torch.distributed)."""
    return dist.get_rank(group) if is_distributed() else 0


_HOST_GROUPS: dict[tuple[int, ...], ProcessGroup] = {}


def host_group(group: ProcessGroup | None = None) -> ProcessGroup | None:
    """A gloo group over `group`'s ranks for host-side metadata: `group` itself when it already is gloo.

    Created on first use; every rank reaches it at the same point (the first loss of the run).
    """
    if dist.get_backend(group) == dist.Backend.GLOO:
        return group
    ranks = tuple(dist.get_process_group_ranks(group or dist.group.WORLD))
    if ranks not in _HOST_GROUPS:
        _HOST_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo")
    return _HOST_GROUPS[ranks]


def all_gather_host(values: Tensor, group: ProcessGroup | None = None) -> tuple[list[int], Tensor]:
    """Every rank's host (CPU) int64 vector `values`: (their lengths in rank order, their concatenation).

    Host to host over gloo, so a step that needs the global batch's shape never waits for the device.
    """
    values = values.detach().to("cpu", torch.long)
    if not is_distributed():
        return [values.numel()], values
    gloo = host_group(group)
    count = torch.tensor([values.numel()], dtype=torch.long)
    counts = [torch.empty_like(count) for _ in range(world_size(group))]
    dist.all_gather(counts, count, group=gloo)
    sizes = [int(c) for c in counts]
    return sizes, _gather_padded(values, sizes, gloo)


def _gather_padded(x: Tensor, sizes: list[int], group: ProcessGroup | None) -> Tensor:
    """Concatenate every rank's rows of `x` (row counts `sizes`) through a padded all_gather."""
    longest = max(max(sizes), 1)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: rank(ctx.group)])
        return grad[start : start + ctx.sizes[rank(ctx.group)]], None, None


def gather_with_grad(x: Tensor, sizes: list[int], group: ProcessGroup | None = None) -> Tensor:
    """Rows of every rank (rank order) with gradient flowing back to each rank's own rows."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x, sizes, group)


@torch.no_grad()
def gather_no_grad(x: Tensor, sizes: list[int], group: ProcessGroup | None = None) -> Tensor:
    """Rows of every rank (rank order), detached; used for ids and queue features."""
    if not is_distributed():
        return x.detach()
    return _gather_padded(x.detach(), sizes, group)


@torch.no_grad()
def all_reduce_sum(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Sum of `x` over ranks (a new tensor; `x` is left alone)."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, group=group)
    return out
