"""Sample plan on synthetic indexes: many shards and ranks, lazy reads, compute balance, the scale bench."""

from __future__ import annotations

import argparse
import collections

import numpy as np

from plait.data.batch import MODALITIES
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig, SamplePlan, SplitSpec, split_mask
from plait.data.sizing import SizingConfig
from plait.data.token_drop import TokenDropConfig
from plait.trainer.bench import plan as bench_plan
from plait.trainer.bench.plan import SyntheticIndex

VALUES = ({224: 0.5, 448: 0.5}, 0.0, {})


def make_plan(source: SyntheticIndex, world: int, window: int, ranks=None, agree=None,
              max_sample_tokens: int = 2048) -> SamplePlan:
    """A plan over a synthetic index (samples fit the 2048-token budget unless max_sample_tokens says otherwise)."""
    return SamplePlan(source, seed=1, sizing=SizingConfig(max_sample_tokens=max_sample_tokens),
                      token_drop=TokenDropConfig(),
                      packing=PackingConfig(max_tokens=2048), values_at=lambda step: VALUES, world_size=world,
                      ranks=ranks, agree=agree, config=PlanConfig(window_samples=window))


def walk_epoch(plan: SamplePlan) -> list:
    """Every RankStep of the current epoch."""
    epoch, out = plan.upcoming_epoch(), []
    while plan.upcoming_epoch() == epoch:
        out.extend(plan.next_step())
    return out


def all_train_keys(source: SyntheticIndex) -> list[str]:
    """Reference: every synthetic row's key in the training split."""
    keys = []
    for shard, counts in enumerate(source.counts()):
        for modality, count in enumerate(counts):
            rows = source.rows(shard, modality, np.arange(count))
            keys += list(rows["key"][split_mask(rows["group"], SplitSpec(heldout=False, fraction=0.1))])
    return keys


def test_many_shards_and_ranks_every_key_once_and_elastic() -> None:
    source = SyntheticIndex(3000, 37, seed=2)
    steps = walk_epoch(make_plan(source, 7, window=500))
    keys = collections.Counter(r.key for s in steps for r in s.plan.samples)
    reference = all_train_keys(source)
    assert sorted(keys.elements()) == sorted(reference)
    assert len(set(collections.Counter(s.plan.rank for s in steps).values())) == 1
    plan = make_plan(source, 4, window=500)
    seen = [s for _ in range(5) for s in plan.next_step()]
    resized = make_plan(source, 7, window=500)
    resized.load_state_dict(plan.state_dict())
    seen += walk_epoch(resized)
    assert sorted(r.key for s in seen for r in s.plan.samples) == sorted(reference)


def test_samples_over_the_budget_are_reported_as_skipped_not_lost_silently() -> None:
    source = SyntheticIndex(3000, 37, seed=2)
    steps = walk_epoch(make_plan(source, 3, window=1000, max_sample_tokens=4096))
    placed = sum(len(s.plan.samples) for s in steps)
    skipped = sum(s.skipped.get("too_long", 0) for s in steps)
    assert skipped > 0 and placed + skipped == len(all_train_keys(source))


def test_a_rank_reads_only_the_shards_of_its_share() -> None:
    source = SyntheticIndex(200_000, 2000, seed=3)
    plan = make_plan(source, 64, window=64 * 64, ranks=[5], agree=lambda count: count)
    for _ in range(30):
        plan.next_step()
    windows = plan.state.window + 1
    assert 0 < len(source.reads) <= windows * 2 * len(MODALITIES)  # a slice spans at most 2 shards per stream


def test_cost_ordering_balances_ranks_better_than_unordered_batches() -> None:
    source = SyntheticIndex(20_000, 40, seed=4)
    steps = walk_epoch(make_plan(source, 8, window=4000))
    cost = collections.defaultdict(dict)
    for s in steps:
        cost[s.plan.step][s.plan.rank] = s.plan.cost
    table = np.array([[row[r] for r in range(8)] for _, row in sorted(cost.items())])
    busy = table.sum(axis=1) > 0

    def idle_fraction(t: np.ndarray) -> float:
        """Share of rank-time spent waiting for the slowest rank of each step."""
        return float(1 - t.sum() / (t.max(axis=1).sum() * t.shape[1]))

    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(col) for col in table.T], axis=1)  # same batches, no cost ordering
    assert idle_fraction(table[busy]) < 0.5 * idle_fraction(shuffled[shuffled.sum(axis=1) > 0])


def test_bench_reports_the_goals_at_reduced_scale() -> None:
    parser = argparse.ArgumentParser()
    bench_plan.add_arguments(parser)
    result = bench_plan.run(parser.parse_args(["--samples", "2e7", "--shards", "2e4", "--world-size", "256",
                                               "--steps", "20"]))
    assert {"peak_mem_mb", "plan_ms_per_step", "worst_ms_per_step", "state_bytes_per_rank"} <= set(result)
    assert result["curriculum_cuts"] >= 1  # the ramp over the second half re-sized the plan
    assert result["state_bytes_per_rank"] <= 1024 and result["samples_per_step_per_rank"] > 0
    assert result["mem_ratio_vs_10x_fewer_samples"] < 1.2
    assert result["shards_read"] <= result["windows"] * 2 * len(MODALITIES)
