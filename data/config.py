"""The `data:` section of a run config: where samples come from and how the plan and loader treat them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from plait.data.batch import MODALITIES
from plait.data.checks import check_at_least, check_positive
from plait.data.loader import LoaderConfig
from plait.data.manifest import INDEX_NAME
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig
from plait.data.reader import missing_shards
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


def check_shard_spec(name: str, shards: str, index: str) -> None:
    """Raise ValueError naming the field when a shard spec matches nothing, names a missing local shard or a store
    no installed fsspec package opens, or is remote without an index folder."""
    urls = expand_urls(shards)
    missing = missing_shards(urls)
    if missing or not urls:
        raise ValueError(f"{name}: no such shard {missing[0] if missing else shards!r}")
    try:
        check_protocols(urls)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if not index and any(is_remote(u) for u in urls):
        raise ValueError(f"{name}: remote shards {shards!r} need an index folder (what "
                         "`plait shards index SPEC --out DIR` wrote)")
    if index and not os.path.isfile(os.path.join(index, INDEX_NAME)):
        raise ValueError(f"{name}: no {INDEX_NAME} in index folder {index!r} (run `plait shards index SPEC --out DIR`)")


@dataclass
class SourceConfig:
    """One named dataset of a mixture (e.g. one image, video or audio set)."""

    name: str = ""
    """Name in metrics (`data/source/NAME/...`) and in the curriculum's `source_weights`."""
    shards: str = ""
    """Its shards, in any form `data.shards` accepts."""
    index: str = ""
    """Folder holding its index (needed for remote shards; empty = the shards' own folder)."""
    weight: float = 1.0
    """Share of each window drawn from it, relative to the other sources (the curriculum can change it)."""
    modality: str = ""
    """Use only its samples of this modality (image, audio or video); empty = all it holds."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name: a source needs a name without '/', got {self.name!r}")
        if not self.shards:
            raise ValueError(f"shards: source {self.name!r} names no shards")
        check_shard_spec("shards", self.shards, self.index)
        check_positive(self, "weight")
        if self.modality and self.modality not in MODALITIES:
            raise ValueError(f"modality: {self.modality!r} is not one of {list(MODALITIES)}")


@dataclass
class DataConfig:
    """Where samples come from and how the loader reads them."""

    shards: str = ""
    """Shard URLs: a folder, path, glob, brace range (`shard-{000..127}.tar`), fsspec URL (`https://`, `s3://`,
    `gs://`, ...) or `pipe:` command; empty = demo data."""
    index: str = ""
    """Local folder holding the index of `shards` (`plait shards index SPEC --out DIR`); needed for remote shards;
    empty = the shards' own folder."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Named datasets mixed by weight (instead of `shards`); see `plan.sampling` for what an epoch is."""
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
        if self.shards and self.sources:
            raise ValueError("sources: set either data.shards or data.sources, not both")
        if self.shards:
            check_shard_spec("shards", self.shards, self.index)
        elif self.index:
            raise ValueError("index: set only with data.shards")
        names = [source.name for source in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"sources: names must be unique, {repeated} repeat")
