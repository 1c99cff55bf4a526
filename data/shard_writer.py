"""Writing WebDataset tar shards: rotation by sample count, reproducible headers, atomic publish."""

from __future__ import annotations

import os
from pathlib import Path

import webdataset as wds

SHARD_PATTERN = "{prefix}-{index:06d}.tar"


class ShardSink:
    """Writes samples (`{"__key__": k, "jpg": bytes, "txt": str, ...}`) into numbered tar shards.

    Each shard is written under a temporary name and renamed when complete, so a crash never
    leaves a half-written shard that looks finished. Headers carry a fixed mtime so the same
    samples always give byte-identical shards.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 1000) -> None:
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard: must be > 0, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.paths: list[Path] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, sample: dict) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self._writer is None or self._count == self.samples_per_shard:
            self._close_current()
            path = self.out_dir / SHARD_PATTERN.format(prefix=self.prefix, index=len(self.paths))
            self.paths.append(path)
            self._writer = wds.TarWriter(str(path) + ".tmp", mtime=0, user="plait", group="plait")
            self._count = 0
        self._writer.write(sample)
        self._count += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            path = self.paths[-1]
            os.replace(str(path) + ".tmp", path)
            self._writer = None

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        self._close_current()
        return self.paths

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
