"""The `data:` section of a run config: where samples come from and how the plan and loader treat them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from plait.data.checks import check_at_least, check_positive
from plait.data.loader import LoaderConfig
from plait.data.manifest import INDEX_NAME
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig
from plait.data.remote import check_protocols
from plait.data.shardlist import expand_urls, is_remote
from plait.data.sizing import SizingConfig
from plait.data.token_drop import TokenDropConfig


@dataclass
class DemoDataConfig:
    """The built-in demo dataset, built on first use when `data.shards` is empty."""

    out: str = ".plait/demo-data"
    """Folder holding one sub-folder per demo spec (version, samples, seed, shard size), built on first use."""
    samples: int = 600
    """Number of demo samples over the three modalities."""
    samples_per_shard: int = 100
    """Samples per demo tar shard."""

    def __post_init__(self) -> None:
        check_positive(self, "samples", "samples_per_shard")


@dataclass
class DataConfig:
    """Where samples come from and how the loader reads them."""

    shards: str = ""
    """Shard URLs: a folder, path, glob, brace range (`shard-{000..127}.tar`), fsspec URL (`https://`, `s3://`,
    `gs://`, ...) or `pipe:` command; empty = demo data."""
    index: str = ""
    """Local folder holding the index of `shards` (`plait shards index SPEC --out DIR`); needed for remote shards;
    empty = the shards' own folder."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    """The built-in demo dataset used when `shards` is empty."""
    workers: int = 2
    """DataLoader worker processes per rank (never changes which samples a rank sees)."""
    max_consecutive_failures: int = 100
    """Stop with an error naming shard and key after this many undecodable samples in a row."""
    sizing: SizingConfig = field(default_factory=SizingConfig)
    """Token grid of each sample (NaViT sizing)."""
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    """Random token dropping."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Packing of samples into per-rank micro-batches."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Epoch order, planning windows and the held-out split."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """Decode-time choices (SpecAugment, caption length) and DataLoader prefetch."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "workers")
        check_positive(self, "max_consecutive_failures")
        if self.shards:
            urls = expand_urls(self.shards)
            missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
            if missing or not urls:
                raise ValueError(f"shards: no such shard {missing[0] if missing else self.shards!r}")
            check_protocols(urls)
            if not self.index and any(is_remote(u) for u in urls):
                raise ValueError(f"index: required for remote shards {self.shards!r} (the folder "
                                 "`plait shards index SPEC --out DIR` wrote)")
        if self.index and not os.path.isfile(os.path.join(self.index, INDEX_NAME)):
            raise ValueError(f"index: no {INDEX_NAME} in {self.index!r} (run `plait shards index SPEC --out DIR`)")
