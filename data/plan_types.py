"""The contract between the sample plan (which samples each rank takes at each step) and the loader."""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.data.sizing import SampleGrid


@dataclass(frozen=True)
class SampleRef:
    """One planned sample: where its bytes are and every per-sample choice already made by the plan."""

    shard: str
    """Shard URL or path as the loader opens it (local path, or `pipe:` command)."""
    key: str
    """Sample key (unique in the dataset)."""
    modality: str
    """'image', 'audio' or 'video'."""
    group: str
    """Group id from the manifest (samples of one group are positives of each other)."""
    sample_offset: int
    """Byte offset of the sample's first tar header in the shard."""
    sample_size: int
    """Bytes from that header to the end of its last member (a readable tar fragment)."""
    grid: SampleGrid
    """Token grid, decode window (frames, start, span) and kept-token count chosen by sizing."""
    drop_seed: int
    """uint64 keyed seed choosing which tokens are kept (token dropping)."""
    augment_seed: int
    """Keyed seed of decode-time randomness (TSN segment choice, SpecAugment)."""
    source: str = ""
    """Name of the `data.sources` entry it comes from ('' for a single dataset)."""
    native: tuple[int, float] | None = None
    """A video's (frame count, fps) as the index recorded them, so the loader need not probe the clip again."""


def native_clip(modality: str, frames: float, fps: float) -> tuple[int, float] | None:
    """A video's indexed (frame count, fps) for `SampleRef.native`; None for other media or when the index lacks
    them (the loader then probes the clip)."""
    if modality != "video" or not (frames >= 1 and fps > 0):
        return None
    return int(frames), float(fps)


@dataclass
class MicroBatchPlan:
    """What one rank feeds the model at one step of one epoch; `samples` may be empty."""

    epoch: int
    """Epoch this step belongs to."""
    step: int
    """Optimizer step of the run."""
    rank: int
    """Data-parallel rank."""
    samples: list[SampleRef] = field(default_factory=list)
    """Planned samples in batch order (vision samples first, then audio)."""
    tokens: int = 0
    """Planned encoder tokens (after dropping) over both streams."""
    cost: float = 0.0
    """Planned attention cost (sum of squared segment lengths), the balancing criterion."""
    micro: int = 0
    """Micro-batch of the optimizer step (gradient accumulation), from 0."""
    index: int = 0
    """Position in the run's sequence of micro-batches (the order the loader delivers them in)."""
