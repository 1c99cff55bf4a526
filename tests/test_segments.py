"""Segment helpers (offsets, lengths, row ids, concatenation) against plain Python loops on ragged packings."""

from __future__ import annotations

import pytest
import torch

from plait.ops.segments import (
    concat_segments_index,
    cu_from_starts,
    cu_to_lengths,
    lengths_to_cu,
    segment_ids,
    segment_positions,
)

RAGGED = [[3, 0, 5, 1], [0], [], [7], [0, 0, 2], [2, 0, 0], [1, 1, 1]]
"""Segment lengths: empty segments first, middle and last, a single segment, and zero segments."""


def _offsets(lengths: list[int]) -> list[int]:
    """Running sums starting at 0, by hand."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _cu(lengths: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(_offsets(lengths), dtype=dtype)


@pytest.mark.parametrize("lengths", RAGGED)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_lengths_to_cu_is_int64_running_sum(lengths, dtype):
    cu = lengths_to_cu(torch.tensor(lengths, dtype=dtype))
    assert cu.dtype == torch.int64
    assert cu.tolist() == _offsets(lengths)


@pytest.mark.parametrize("lengths", RAGGED)
def test_cu_to_lengths_inverts_offsets(lengths):
    got = cu_to_lengths(_cu(lengths))
    assert got.dtype == torch.int64
    assert got.tolist() == lengths


@pytest.mark.parametrize("lengths", RAGGED)
def test_segment_ids_and_positions_match_a_loop(lengths):
    ids, positions = [], []
    for s, n in enumerate(lengths):
        ids += [s] * n
        positions += list(range(n))
    got_ids, got_positions = segment_ids(_cu(lengths)), segment_positions(_cu(lengths))
    assert got_ids.dtype == got_positions.dtype == torch.int64
    assert got_ids.tolist() == ids
    assert got_positions.tolist() == positions


@pytest.mark.parametrize("lengths", RAGGED)
def test_cu_from_starts_recovers_the_non_empty_segments(lengths):
    mask = []
    for n in lengths:
        mask += [True] + [False] * (n - 1) if n else []
    got = cu_from_starts(torch.tensor(mask, dtype=torch.bool))
    assert got.dtype == torch.int64
    assert got.tolist() == _offsets([n for n in lengths if n])


@pytest.mark.parametrize(("lengths_a", "lengths_b"), [
    ([2, 0, 4], [1, 3, 1]), ([0, 0], [2, 0]), ([], []), ([5], [0]), ([0], [3]), ([1, 2, 0, 3], [0, 2, 2, 1]),
])
def test_concat_segments_index_interleaves_per_segment(lengths_a, lengths_b):
    cu_a, cu_b = _cu(lengths_a), _cu(lengths_b)
    a = torch.arange(sum(lengths_a))
    b = torch.arange(sum(lengths_b)) + 1000
    want, start_a, start_b = [], 0, 0
    for n_a, n_b in zip(lengths_a, lengths_b):
        want += a[start_a : start_a + n_a].tolist() + b[start_b : start_b + n_b].tolist()
        start_a, start_b = start_a + n_a, start_b + n_b
    index, cu_c = concat_segments_index(cu_a, cu_b)
    assert index.dtype == cu_c.dtype == torch.int64
    assert torch.cat([a, b])[index].tolist() == want
    assert cu_c.tolist() == _offsets([n_a + n_b for n_a, n_b in zip(lengths_a, lengths_b)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_helpers_stay_on_the_input_device():
    cu = _cu([2, 0, 3]).cuda()
    outputs = [cu_to_lengths(cu), segment_ids(cu), segment_positions(cu), lengths_to_cu(cu_to_lengths(cu)),
               cu_from_starts(segment_positions(cu) == 0), *concat_segments_index(cu, cu)]
    assert all(t.device == cu.device for t in outputs)
