"""The data plane's factory: a run's dataset (its shards, or the demo data built on first use) and its sample plan."""

from __future__ import annotations

from pathlib import Path

from plait.data.config import DataConfig
from plait.data.dataset_index import DatasetIndex
from plait.data.manifest import INDEX_NAME, caption_and_group
from plait.data.plan import AgreeMax, NextChange, PlanConfig, SamplePlan, ValuesAt, WeightsAt
from plait.data.remote import ShardCache, open_shard
from plait.data.sources import Sources
from plait.data.tar_scan import iter_samples


Dataset = DatasetIndex | Sources
"""A run's indexed data: one dataset, or named sources."""


def open_dataset(data: DataConfig) -> Dataset:
    """The indexed dataset of `data.shards`, the named `data.sources`, or the demo data (written and indexed on
    first use)."""
    if data.sources:
        indexes = [DatasetIndex.from_spec(s.shards, index=s.index, cache_size=data.plan.manifest_cache)
                   for s in data.sources]
        return Sources([s.name for s in data.sources], indexes, [s.weight for s in data.sources],
                       [s.modality for s in data.sources])
    if data.shards:
        return DatasetIndex.from_spec(data.shards, index=data.index, cache_size=data.plan.manifest_cache)
    from plait.data.demo import DemoSpec, write_demo
    from plait.data.indexer import index_dataset

    spec = DemoSpec(samples=data.demo.samples, samples_per_shard=data.demo.samples_per_shard)
    out = Path(data.demo.out) / spec.dirname
    if not (out / INDEX_NAME).exists():
        write_demo(out, spec)
        index_dataset(str(out), out=out, workers=1)
    return DatasetIndex(out, cache_size=data.plan.manifest_cache)


def build_plan(data: DataConfig, index: Dataset, seed: int, values_at: ValuesAt, fingerprint: str,
               world_size: int, ranks: list[int] | None = None, plan_cfg: PlanConfig | None = None,
               agree: AgreeMax | None = None, accumulation: int = 1, next_change: NextChange | None = None,
               source_weights_at: WeightsAt | None = None) -> SamplePlan:
    """The sample plan over `index` for `ranks` (default all) of `world_size` ranks.

    `values_at` gives the curriculum's data values at a step (`source_weights_at` the sources' weights);
    `fingerprint` identifies that schedule in the state.
    """
    return SamplePlan(index, seed=seed, sizing=data.sizing, token_drop=data.token_drop, packing=data.packing,
                      values_at=values_at, world_size=world_size, ranks=ranks, config=plan_cfg or data.plan,
                      agree=agree, fingerprint_extra=fingerprint, accumulation=accumulation,
                      next_change=next_change, source_weights_at=source_weights_at)


def dataset_captions(index: Dataset, limit: int, cache: ShardCache) -> list[str]:
    """Up to `limit` captions, shard by shard in index order (for training a tokenizer)."""
    captions: list[str] = []
    for shard in range(len(index.names)):
        with open_shard(index.shard_url(shard), cache) as stream:
            for sample in iter_samples(stream, []):
                caption, _ = caption_and_group(sample, sample.key)
                if caption:
                    captions.append(caption)
                if len(captions) >= limit:
                    return captions
    return captions
