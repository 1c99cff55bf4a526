"""Named sources: several indexed datasets seen by the plan as one `ShardSource` with a stream per (source, modality).

Stream `s * len(MODALITIES) + m` holds source `s`'s usable samples of modality `m`; a source restricted to one
modality has empty streams for the others. Shards are numbered source after source. A single dataset (one
`DatasetIndex`) is the one-source case: its streams are the modalities themselves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from plait.data.batch import MODALITIES
from plait.data.dataset_index import DatasetIndex

NUM_MODALITIES = len(MODALITIES)


class Sources:
    """Several `DatasetIndex`es, each with a name, a relative weight and optionally one modality."""

    def __init__(self, names: Sequence[str], indexes: Sequence[DatasetIndex], weights: Sequence[float],
                 modalities: Sequence[str]) -> None:
        self.source_names = list(names)
        self.indexes = list(indexes)
        self.weights = dict(zip(names, (float(w) for w in weights)))
        """Configured weight of each source (the curriculum's `source_weights` start from these)."""
        self.modalities = list(modalities)
        self.first = np.cumsum([0] + [len(index.names) for index in indexes])
        """Global number of each source's first shard (and the total at the end)."""
        self.names = [name for index in indexes for name in index.names]
        blocks = []
        for s, index in enumerate(indexes):
            counts = np.zeros((len(index.names), NUM_MODALITIES * len(indexes)), dtype=np.int64)
            block = index.counts().copy()
            if modalities[s]:
                block[:, [m for m in range(NUM_MODALITIES) if MODALITIES[m] != modalities[s]]] = 0
            counts[:, s * NUM_MODALITIES:(s + 1) * NUM_MODALITIES] = block
            blocks.append(counts)
        self._counts = np.concatenate(blocks)

    def _local(self, shard: int) -> tuple[int, int]:
        """(source number, shard number within it) of a global shard number."""
        source = int(np.searchsorted(self.first, shard, side="right") - 1)
        return source, shard - int(self.first[source])

    def counts(self) -> np.ndarray:
        """[num_shards, streams] usable samples per shard and stream."""
        return self._counts

    def shard_url(self, shard: int) -> str:
        """Path or URL of a global shard number."""
        source, local = self._local(shard)
        return self.indexes[source].shard_url(local)

    def rows(self, shard: int, stream: int, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of one stream's samples in one global shard."""
        source, local = self._local(shard)
        return self.indexes[source].rows(local, stream % NUM_MODALITIES, index)

    def identity(self) -> str:
        """Hash of the sources' names, modality restrictions and datasets (weights are plan inputs of their own)."""
        digest = hashlib.blake2b(digest_size=8)
        for name, index, modality in zip(self.source_names, self.indexes, self.modalities):
            digest.update(f"{name}\0{modality}\0{index.identity()}\0".encode())
        return digest.hexdigest()
