"""Packed-segment bookkeeping: offsets (`cu_seqlens`), lengths and per-row segment ids, in pure torch.

A packing of S segments over T rows is described by int offsets `cu [S+1]` (`cu[0] = 0`, `cu[S] = T`);
segment s owns rows `cu[s]:cu[s+1]` and may be empty. Every helper works on the device of its input
and returns int64 (callers cast to int32 where a kernel wants it).
"""

from __future__ import annotations

import torch


def lengths_to_cu(lengths: torch.Tensor) -> torch.Tensor:
    """int64 offsets `[S+1]` from segment lengths `[S]`."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).long()


def cu_to_lengths(cu: torch.Tensor) -> torch.Tensor:
    """int64 segment lengths `[S]` from offsets `[S+1]`."""
    cu = cu.long()
    return cu[1:] - cu[:-1]


def index_counts(index: torch.Tensor, size: int) -> torch.Tensor:
    """[size] int64 occurrences of each value of `index` in [0, size): `bincount` without its device sync."""
    return torch.zeros(size, dtype=torch.long, device=index.device).index_add_(
        0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.long, device=index.device))


def cu_from_starts(is_start: torch.Tensor) -> torch.Tensor:
    """int64 offsets of a packing of T rows from a `[T]` bool mask marking the first row of each segment."""
    starts = is_start.nonzero().squeeze(1)
    return torch.cat([starts, starts.new_tensor([is_start.numel()])])


def segment_ids(cu: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """[T] int64 segment index of every row; passing `total` (= T, known on the host) avoids a device sync."""
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu_to_lengths(cu),
                                   output_size=total)


def _positions(cu: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Position within its segment of every row, given int64 `cu` and the rows' segment ids `seg`."""
    return torch.arange(seg.numel(), device=cu.device) - cu[seg]


def segment_positions(cu: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """[T] int64 position of every row within its own segment (restarting at 0), e.g. LLM position ids."""
    return _positions(cu.long(), segment_ids(cu, total))


def concat_segments_index(cu_a: torch.Tensor, cu_b: torch.Tensor, total_a: int | None = None,
                          total_b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack `[a_s ; b_s]` per segment: returns `index` with `c = cat([a, b])[index]`, and `cu_c`.

    `total_a` / `total_b` (the row counts, when known on the host) keep it free of device syncs.
    """
    cu_a, cu_b = cu_a.long(), cu_b.long()
    cu_c = cu_a + cu_b
    seg_a, seg_b = segment_ids(cu_a, total_a), segment_ids(cu_b, total_b)
    dst_a = cu_c[seg_a] + _positions(cu_a, seg_a)
    dst_b = cu_c[seg_b] + cu_to_lengths(cu_a)[seg_b] + _positions(cu_b, seg_b)
    dst = torch.cat([dst_a, dst_b])
    index = torch.empty_like(dst)
    index[dst] = torch.arange(dst.numel(), device=dst.device)
    return index, cu_c
