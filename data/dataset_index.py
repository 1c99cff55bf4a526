"""Lazy view of an indexed dataset for the plan: per-shard counts up front, sample rows only on demand.

The plan needs two things at very different scales. Up front it needs, for every shard, how many
usable samples of each modality it holds (the dataset index, one row per shard: 500,000 shards are
a few MB). While planning a window it needs the rows of the few samples a rank is about to take,
which live in that shard's manifest; those are read on demand and a handful are kept in an LRU cache.
Any object with the `ShardSource` methods (e.g. the bench's synthetic index) can stand in.
`EpochLayout` turns the counts into each modality's epoch stream, and `read_positions` maps stream
positions back to (shard, row) and reads just those rows.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.compute as pc

from plait.data.batch import MODALITIES
from plait.data.manifest import INDEX_NAME, read_index, read_manifest
from plait.data.rng import keyed_rng
from plait.data.remote import is_pipe
from plait.data.shardlist import expand_urls, is_remote

ROW_COLUMNS = ("key", "group", "sample_offset", "sample_size", "width", "height", "frames", "fps", "duration")
"""Per-sample columns the plan reads (`ShardSource.rows` returns exactly these)."""


class ShardSource(Protocol):
    """What the plan needs from a dataset: shard counts, shard URLs and the rows of chosen samples."""

    def counts(self) -> np.ndarray:
        """[num_shards, streams] int64 usable (status ok) samples per shard and stream (a stream per modality, or per
        source and modality: `plait.data.sources`)."""

    def shard_url(self, shard: int) -> str:
        """Path or URL the loader opens for shard number `shard`."""

    def rows(self, shard: int, stream: int, index: np.ndarray) -> dict[str, np.ndarray]:
        """ROW_COLUMNS of the usable samples of one stream in one shard, at positions `index` (manifest order)."""

    def identity(self) -> str:
        """A short hash naming the dataset (shards and counts), for the plan fingerprint."""


def refuse_commands(names: list[str], index: Path) -> None:
    """Raise ValueError naming the index row that holds a `pipe:` command: shard names read from data are never
    run, only `pipe:` specs a user writes in `data.shards` or on the command line."""
    for row, name in enumerate(names):
        if is_pipe(name):
            raise ValueError(f"{index}: row {row} names shard {name!r}; a `pipe:` command is run only when "
                             "written in data.shards (with data.index) or on the command line")


class DatasetIndex:
    """`plait-index.parquet` (shard → counts) plus per-shard manifests read lazily, newest few cached."""

    def __init__(self, root: str | Path, shards: list[str] | None = None, cache_size: int = 8) -> None:
        root = Path(root)
        self.root = root if root.is_dir() else root.parent
        table = read_index(root)
        names = table.column("shard").to_pylist()
        keep = np.arange(len(names))
        if shards is None:
            refuse_commands(names, self.root / INDEX_NAME)
        else:
            wanted = {self._resolve(s) for s in shards}
            keep = np.array([i for i, n in enumerate(names) if self._resolve(n) in wanted], dtype=np.int64)
            if len(keep) != len(wanted):
                raise ValueError(f"shards: {len(wanted) - len(keep)} shard(s) missing from {self.root / INDEX_NAME};"
                                 " run `plait shards index` again")
        self.names = [names[i] for i in keep]
        self.manifests = [table.column("manifest")[int(i)].as_py() for i in keep]
        self._counts = np.stack([table.column(m).to_numpy()[keep] for m in MODALITIES], axis=1).astype(np.int64)
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_spec(cls, spec: str, index: str = "", cache_size: int = 8) -> DatasetIndex:
        """The index of a shard spec: a folder holding the index, shards whose index sits in their common folder,
        or any shards (remote ones too) indexed into the folder `index`."""
        if os.path.isdir(spec) and not index:
            return cls(spec, cache_size=cache_size)
        urls = expand_urls(spec)
        if not urls:
            raise ValueError(f"shards: {spec!r} matches no shard")
        if index:
            return cls(index, shards=urls, cache_size=cache_size)
        if any(is_remote(u) for u in urls):
            raise ValueError(f"shards: {spec!r} names remote shards; set data.index to the folder that "
                             "`plait shards index SPEC --out DIR` wrote their index to")
        common = os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u in urls])
        return cls(common, shards=urls, cache_size=cache_size)

    def _resolve(self, name: str) -> str:
        """Absolute path of a shard named relative to the index folder (remote URLs unchanged)."""
        if is_remote(name):
            return name
        return os.path.abspath(name if os.path.isabs(name) else self.root / name)

    def counts(self) -> np.ndarray:
        """[num_shards, 3] usable samples per shard and modality."""
        return self._counts

    def shard_url(self, shard: int) -> str:
        """Absolute path (or remote URL) of the shard."""
        return self._resolve(self.names[shard])

    def identity(self) -> str:
        """Hash of shard names and counts."""
        digest = hashlib.blake2b(digest_size=8)
        digest.update("\0".join(self.names).encode())
        digest.update(self._counts.tobytes())
        return digest.hexdigest()

    def _modality_rows(self, shard: int, modality: int) -> dict[str, np.ndarray]:
        """All usable rows of one modality of one shard, cached (LRU)."""
        cached = self._cache.get((shard, modality))
        if cached is not None:
            self._cache.move_to_end((shard, modality))
            return cached
        table = read_manifest(self.root / self.manifests[shard], columns=["status", "modality", *ROW_COLUMNS])
        mask = pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["modality"], MODALITIES[modality]))
        table = table.filter(mask)
        if table.num_rows != self._counts[shard, modality]:
            raise ValueError(f"shards: manifest of {self.names[shard]} has {table.num_rows} usable "
                             f"{MODALITIES[modality]} samples, the index says {self._counts[shard, modality]};"
                             " run `plait shards index` again")
        rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ROW_COLUMNS}
        self._cache[(shard, modality)] = rows
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rows

    def rows(self, shard: int, modality: int, index: np.ndarray) -> dict[str, np.ndarray]:
        """The requested usable rows of one modality of one shard."""
        rows = self._modality_rows(shard, modality)
        return {name: column[index] for name, column in rows.items()}


@dataclass
class EpochLayout:
    """Each modality's epoch stream: usable samples of the shards in a keyed shard order, back to back."""

    order: np.ndarray
    """[num_shards] shard ids in epoch order."""
    cum: np.ndarray
    """[len(MODALITIES), num_shards + 1] stream position where each shard (in epoch order) starts."""

    @classmethod
    def build(cls, counts: np.ndarray, seed: int, epoch: int) -> EpochLayout:
        """Shard order of `epoch` from (seed, epoch) alone."""
        order = keyed_rng(seed, "plan-shard-order", epoch).permutation(len(counts))
        cum = np.zeros((counts.shape[1], len(counts) + 1), dtype=np.int64)
        np.cumsum(counts[order].T, axis=1, out=cum[:, 1:])
        return cls(order=order, cum=cum)

    @property
    def totals(self) -> np.ndarray:
        """[len(MODALITIES)] samples in each modality's stream."""
        return self.cum[:, -1]


def read_positions(source: ShardSource, layout: EpochLayout, stream: int,
                   positions: np.ndarray) -> dict[str, np.ndarray]:
    """Rows at sorted `positions` of one epoch stream, reading only the shards they fall in.

    Positions past the stream's size wrap around it (a source sampled with replacement); the rows keep the
    positions asked for, in the order of the samples they wrap to.
    """
    size = int(layout.cum[stream, -1])
    if len(positions) and positions[-1] >= size:
        order = np.argsort(positions % size, kind="stable")
        positions, wrapped = positions[order], positions[order] % size
    else:
        wrapped = positions
    j = np.searchsorted(layout.cum[stream], wrapped, side="right") - 1
    parts = []
    bounds = np.flatnonzero(np.diff(j)) + 1
    for chunk_j, chunk_wrapped, chunk_pos in zip(np.split(j, bounds), np.split(wrapped, bounds),
                                                 np.split(positions, bounds)):
        if not len(chunk_j):
            continue
        shard = int(layout.order[chunk_j[0]])
        rows = source.rows(shard, stream, chunk_wrapped - layout.cum[stream, chunk_j[0]])
        rows.update(shard=np.full(len(chunk_pos), shard, dtype=np.int64), position=chunk_pos,
                    stream=np.full(len(chunk_pos), stream, dtype=np.int64),
                    modality=np.full(len(chunk_pos), stream % len(MODALITIES), dtype=np.int64))
        parts.append(rows)
    return concat_rows(parts)


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate row dicts column by column (an empty list gives empty columns)."""
    names = (*ROW_COLUMNS, "shard", "position", "stream", "modality")
    if not parts:
        empty = {name: np.zeros(0, dtype=object if name in ("key", "group") else np.float64) for name in names}
        empty.update({name: np.zeros(0, np.int64) for name in ("shard", "position", "stream", "modality")})
        return empty
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


def take_rows(rows: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """The rows at `index`."""
    return {name: column[index] for name, column in rows.items()}
