"""NaViT packing: first-fit-decreasing bins over sample lengths, and PackedBatch building/unpacking.

Planning works on lengths only (`pack_lengths`), so the plan packs from metadata.
Building (`pack_samples`) concatenates the patched samples of one bin per encoder stream, drops
tokens with each sample's keyed seed, and pads only at the tail of each stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from plait.data.batch import MODALITIES, STREAM_OF_MODALITY, PackedBatch, PackedStream
from plait.data.checks import check_at_least
from plait.data.token_drop import kept_mask
from plait.ops.segments import cu_from_starts, cu_to_lengths, lengths_to_cu

STREAMS = ("vision", "audio")
"""Encoder stream names, in the order they are built."""


@dataclass(kw_only=True)
class PackingConfig:
    """Sequence budget and layout of packed micro-batches."""

    max_tokens: int = 4096
    """Token budget of one packed sequence (per encoder stream)."""
    max_samples_per_sequence: int = 256
    """Cap on samples in one sequence (bounds per-sample work such as resampler latents); 0 = no cap."""
    window: int = 4096
    """First-fit-decreasing look-ahead: samples are reordered only within windows of this many."""
    video_frame_segments: bool = False
    """Each video tubelet slice (frame group) is its own attention segment, instead of one per clip."""
    tail_padding: Literal["max_tokens", "multiple"] = "max_tokens"
    """Pad each stream to max_tokens (static shapes) or only up to a multiple of pad_multiple."""
    pad_multiple: int = 1
    """`multiple` padding granularity (1 = no padding)."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_tokens", "window", "pad_multiple")
        check_at_least(self, 0, "max_samples_per_sequence")


@dataclass
class BinPacking:
    """Assignment of samples to bins (packed sequences) with per-bin totals."""

    bin_of: np.ndarray
    """[N] int64 bin of each sample; -1 when it cannot fit (longer than max_tokens)."""
    tokens: np.ndarray
    """[B] int64 tokens per bin."""
    cost: np.ndarray
    """[B] float64 attention cost per bin (sum of the samples' costs, default length^2)."""
    count: np.ndarray
    """[B] int64 samples per bin."""

    @property
    def num_bins(self) -> int:
        """Bins opened."""
        return len(self.tokens)

    def members(self) -> list[np.ndarray]:
        """Sample indices of each bin, in the order they were placed (longest first)."""
        placed = np.flatnonzero(self.bin_of >= 0)
        order = placed[np.argsort(self.bin_of[placed], kind="stable")]
        return np.split(order, np.cumsum(self.count)[:-1]) if self.num_bins else []


def _first_fit_decreasing(lengths: np.ndarray, max_tokens: int, cap: int) -> tuple[np.ndarray, int]:
    """FFD of one window: local bin index per item (input order) and bins opened."""
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(len(lengths), dtype=np.int64)  # free tokens per open bin; -1 once the bin is at the cap
    filled = np.zeros(len(lengths), dtype=np.int64)
    local = np.empty(len(lengths), dtype=np.int64)
    opened = 0
    for item in order:  # FFD is sequential by nature; the inner search over bins is vectorised
        size = lengths[item]
        j = int(np.argmax(room[:opened] >= size)) if opened else 0
        if not opened or room[j] < size:
            j = opened
            room[j] = max_tokens
            opened += 1
        room[j] -= size
        filled[j] += 1
        if cap and filled[j] >= cap:
            room[j] = -1
        local[item] = j
    return local, opened


def pack_lengths(lengths: np.ndarray, max_tokens: int, max_per_bin: int = 0, window: int = 4096,
                 costs: np.ndarray | None = None) -> BinPacking:
    """First-fit decreasing of `lengths` into bins of `max_tokens`, window by window, in input order.

    Bins are numbered in window order, so the plan stays a stream; the last bin of each window may
    be part-full. `costs` (default length^2, the attention cost) are summed per bin for balancing.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    costs = lengths.astype(np.float64) ** 2 if costs is None else np.asarray(costs, dtype=np.float64)
    bin_of = np.full(len(lengths), -1, dtype=np.int64)
    num_bins = 0
    for start in range(0, len(lengths), window):
        items = np.arange(start, min(start + window, len(lengths)))
        items = items[lengths[items] <= max_tokens]
        local, opened = _first_fit_decreasing(lengths[items], max_tokens, max_per_bin)
        bin_of[items] = local + num_bins
        num_bins += opened
    placed = bin_of >= 0
    return BinPacking(
        bin_of=bin_of,
        tokens=np.bincount(bin_of[placed], weights=lengths[placed], minlength=num_bins).astype(np.int64),
        cost=np.bincount(bin_of[placed], weights=costs[placed], minlength=num_bins),
        count=np.bincount(bin_of[placed], minlength=num_bins).astype(np.int64),
    )


def segment_costs(num_kept: np.ndarray, t: np.ndarray, frame_segments: bool) -> np.ndarray:
    """Attention cost per sample: sum of squared segment lengths (a clip split into t frame groups)."""
    kept = np.asarray(num_kept, dtype=np.float64)
    return kept**2 / np.asarray(t, dtype=np.float64) if frame_segments else kept**2


@dataclass
class PatchedSample:
    """One decoded and patchified sample, ready to pack."""

    key: str
    """Sample key (unique in the dataset)."""
    modality: str
    """'image', 'audio' or 'video'."""
    patches: torch.Tensor
    """[n, C] all patches of the sample's grid (before dropping): uint8 pixels or float features (log-mel)."""
    coords: torch.Tensor
    """[n, 3] int64 (t, h, w) grid coordinates of the patches."""
    caption_ids: torch.Tensor
    """[L] int64 caption token ids."""
    group: int = -1
    """Group id (samples of one group are positives of each other)."""
    num_kept: int | None = None
    """Tokens to keep after dropping (None = all)."""
    drop_seed: int = 0
    """uint64 keyed seed choosing which tokens are kept (e.g. keyed_seeds(seed, [key], epoch, 'drop'))."""


def _segment_starts(seg: torch.Tensor, t: torch.Tensor, frame_segments: bool) -> torch.Tensor:
    """[T] bool: rows that start an attention segment (the first row, a new sample, or a new frame group)."""
    change = seg[1:] != seg[:-1]
    if frame_segments:
        change |= t[1:] != t[:-1]
    return torch.cat([torch.ones(min(len(seg), 1), dtype=torch.bool), change])


def padded_length(num_tokens: int, cfg: PackingConfig) -> int:
    """Stream length after tail padding."""
    if cfg.tail_padding == "max_tokens":
        if num_tokens > cfg.max_tokens:
            raise ValueError(f"max_tokens: stream has {num_tokens} tokens, more than {cfg.max_tokens}")
        return cfg.max_tokens
    return -(-num_tokens // cfg.pad_multiple) * cfg.pad_multiple


def build_stream(samples: Sequence[PatchedSample], indices: Sequence[int],
                 cfg: PackingConfig) -> tuple[PackedStream, int]:
    """Pack the samples at `indices` (batch positions) into one stream; returns it and tokens dropped.

    Each sample's kept patches are written once, straight into the padded stream, in their own dtype: uint8
    pixels stay uint8 (a quarter of the bytes through worker IPC, pinned memory and the host-to-device copy;
    the encoder turns them into float32 in [0, 1] on the device).
    """
    members = [samples[i] for i in indices]
    sizes = np.array([len(s.patches) for s in members], dtype=np.int64)
    kept = np.array([s.num_kept if s.num_kept is not None else n for s, n in zip(members, sizes)], dtype=np.int64)
    if np.any((kept < 0) | (kept > sizes)):
        raise ValueError("num_kept: must be between 0 and the sample's token count")
    num_tokens = int(kept.sum())
    padding = padded_length(num_tokens, cfg) - num_tokens
    dropping = bool(np.any(kept < sizes))
    mask = kept_mask(np.array([s.drop_seed for s in members], dtype=np.uint64), sizes, kept) if dropping else None
    first = members[0].patches
    patches = torch.empty(num_tokens + padding, first.shape[1], dtype=first.dtype)
    coords = torch.zeros(num_tokens + padding, 3, dtype=torch.long)
    row_start, start = np.concatenate([[0], np.cumsum(sizes)]), np.concatenate([[0], np.cumsum(kept)])
    for i, sample in enumerate(members):
        rows = None
        if mask is not None and kept[i] < sizes[i]:
            rows = torch.from_numpy(np.flatnonzero(mask[row_start[i]:row_start[i + 1]]))
        patches[start[i]:start[i + 1]] = sample.patches if rows is None else sample.patches.index_select(0, rows)
        sample_coords = sample.coords if rows is None else sample.coords.index_select(0, rows)
        coords[start[i]:start[i + 1]] = sample_coords
    patches[num_tokens:] = 0
    seg = torch.repeat_interleave(torch.as_tensor(indices, dtype=torch.long), torch.from_numpy(kept))
    cu_seqlens = cu_from_starts(_segment_starts(seg, coords[:num_tokens, 0], cfg.video_frame_segments)).to(torch.int32)
    stream = PackedStream(
        patches=patches,
        coords=coords,
        seg=torch.cat([seg, seg.new_full((padding,), -1)]),
        cu_seqlens=cu_seqlens,
        max_seqlen=int(cu_to_lengths(cu_seqlens).max()) if num_tokens else 0,
        num_padding=padding,
        samples=torch.as_tensor(indices, dtype=torch.long),
        grids=torch.stack([s.coords.max(0).values + 1 if len(s.coords) else s.coords.new_zeros(3)
                           for s in members]).to(torch.long),
        kept=torch.from_numpy(kept),
    )
    return stream, int(sizes.sum() - kept.sum())


def pack_samples(samples: Sequence[PatchedSample], cfg: PackingConfig) -> PackedBatch:
    """Build one PackedBatch from the samples of a bin (batch order = `samples` order)."""
    codes = [MODALITIES.index(s.modality) for s in samples]
    streams: dict[str, PackedStream] = {}
    counters = {"samples": len(samples), "tokens": 0, "padding": 0, "dropped": 0}
    for name in STREAMS:
        indices = [i for i, s in enumerate(samples) if STREAM_OF_MODALITY[s.modality] == name]
        if not indices:
            continue
        stream, dropped = build_stream(samples, indices, cfg)
        streams[name] = stream
        counters.update({f"tokens_{name}": stream.num_tokens, f"padding_{name}": stream.num_padding,
                         f"dropped_{name}": dropped})
        counters["tokens"] += stream.num_tokens
        counters["padding"] += stream.num_padding
        counters["dropped"] += dropped
    caption_lengths = torch.tensor([len(s.caption_ids) for s in samples], dtype=torch.long)
    return PackedBatch(
        streams=streams,
        modality=torch.tensor(codes, dtype=torch.long),
        sample_key=[s.key for s in samples],
        group=torch.tensor([s.group for s in samples], dtype=torch.long),
        caption_ids=torch.cat([s.caption_ids.long() for s in samples]) if samples else torch.zeros(0, dtype=torch.long),
        caption_cu_seqlens=lengths_to_cu(caption_lengths).to(torch.int32),
        counters=counters,
    )
