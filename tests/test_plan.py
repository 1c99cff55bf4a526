"""Sample plan over real demo shards: every usable key once per epoch, equal steps, exact and elastic resume."""

from __future__ import annotations

import argparse
import collections
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from plait.data.batch import MODALITIES
from plait.data.dataset_index import DatasetIndex
from plait.data.demo import DemoSpec, write_demo
from plait.data.indexer import index_dataset
from plait.data.manifest import MANIFEST_SUFFIX
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig, SamplePlan
from plait.data.plan_state import PlanState, window_take
from plait.data.rng import keyed_seeds, keyed_uniforms
from plait.data.sizing import NUM_DRAWS, SizingConfig, size_sample
from plait.data.split import is_heldout
from plait.data.token_drop import TokenDropConfig
from plait.trainer import data_walk

MAX_TOKENS = 512
NATURAL = ({224: 1.0}, 0.0, {})


def natural(step: int) -> tuple:
    """Curriculum values that never change."""
    return NATURAL


def make_plan(root: Path, world: int, values_at=natural, window: int = 16, split: str = "train",
              ranks: list[int] | None = None, agree=None) -> SamplePlan:
    """A plan over an indexed folder with a small budget so windows hold several micro-batches."""
    return SamplePlan(DatasetIndex(root), seed=7, sizing=SizingConfig(), token_drop=TokenDropConfig(),
                      packing=PackingConfig(max_tokens=MAX_TOKENS), values_at=values_at, world_size=world,
                      ranks=ranks, agree=agree, config=PlanConfig(window_samples=window, split=split))


def walk_epoch(plan: SamplePlan) -> list:
    """Every RankStep of the plan's current epoch."""
    epoch, out = plan.upcoming_epoch(), []
    while plan.upcoming_epoch() == epoch:
        out.extend(plan.next_step())
    return out


def walk_steps(plan: SamplePlan, steps: int) -> list:
    """The RankSteps of the next `steps` steps."""
    return [s for _ in range(steps) for s in plan.next_step()]


def usable_keys(root: Path, heldout: bool = False, fraction: float = 0.1) -> list[str]:
    """Reference: keys with status ok in the wanted group split, straight from the manifests."""
    keys = []
    for path in sorted(Path(root).glob(f"*{MANIFEST_SUFFIX}")):
        table = pq.read_table(path, columns=["key", "status", "group"]).to_pylist()
        keys += [r["key"] for r in table if r["status"] == "ok" and is_heldout(r["group"], fraction) == heldout]
    return keys


def signature(steps: list) -> list[tuple]:
    """Everything a rank is fed, comparable across runs."""
    return [(s.plan.epoch, s.plan.step, s.plan.rank, tuple((r.key, r.grid, r.drop_seed, r.augment_seed)
                                                           for r in s.plan.samples)) for s in steps]


def epoch_keys(steps: list) -> collections.Counter:
    """How often each key appears."""
    return collections.Counter(r.key for s in steps for r in s.plan.samples)


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """47 demo samples in shards of 20, 20 and 7 (plus an empty-of-train-samples tail is possible)."""
    out = tmp_path_factory.mktemp("uneven")
    write_demo(out, DemoSpec(samples=47, samples_per_shard=20, seed=3))
    index_dataset(str(out), workers=1)
    return out


# ---------------------------------------------------------------- one epoch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_is_every_usable_train_key_once_with_equal_steps(demo_dir: Path, world: int) -> None:
    steps = walk_epoch(make_plan(demo_dir, world))
    counts = epoch_keys(steps)
    assert sorted(counts) == sorted(usable_keys(demo_dir))
    assert set(counts.values()) == {1}
    per_rank = collections.Counter(s.plan.rank for s in steps)
    assert set(per_rank) == set(range(world)) and len(set(per_rank.values())) == 1


@pytest.mark.parametrize("world", [2, 5])
def test_uneven_shards_give_equal_steps_and_every_key_once(uneven_dir: Path, world: int) -> None:
    assert sorted(DatasetIndex(uneven_dir).counts().sum(axis=1)) == [7, 20, 20]
    steps = walk_epoch(make_plan(uneven_dir, world, window=24))
    assert sorted(epoch_keys(steps).elements()) == sorted(usable_keys(uneven_dir))
    by_step = collections.defaultdict(list)
    for s in steps:
        by_step[s.plan.step].append(s.plan.rank)
    assert all(sorted(ranks) == list(range(world)) for ranks in by_step.values())
    if world == 5:  # more ranks than some windows have batches: ranks idle on empty micro-batches
        assert any(not s.plan.samples for s in steps)


def test_eval_split_is_the_heldout_groups(demo_dir: Path) -> None:
    steps = walk_epoch(make_plan(demo_dir, 2, split="eval"))
    assert sorted(epoch_keys(steps)) == sorted(usable_keys(demo_dir, heldout=True))
    train_groups = {r.group for s in walk_epoch(make_plan(demo_dir, 2)) for r in s.plan.samples}
    assert train_groups.isdisjoint({r.group for s in steps for r in s.plan.samples})


def test_micro_batches_fit_the_budget_and_refs_point_at_the_sample(demo_dir: Path) -> None:
    steps = walk_epoch(make_plan(demo_dir, 2))
    for s in steps:
        vision = sum(r.grid.num_kept for r in s.plan.samples if r.modality != "audio")
        audio = sum(r.grid.num_kept for r in s.plan.samples if r.modality == "audio")
        assert vision <= MAX_TOKENS and audio <= MAX_TOKENS and s.plan.tokens == vision + audio
        assert s.padding == (MAX_TOKENS - vision if vision else 0) + (MAX_TOKENS - audio if audio else 0)
        assert s.plan.cost == pytest.approx(sum(r.grid.num_kept ** 2 for r in s.plan.samples))
        modalities = [r.modality for r in s.plan.samples]
        assert modalities == sorted(modalities, key=lambda m: m == "audio")  # vision first
    ref = steps[2].plan.samples[0]
    with open(ref.shard, "rb") as handle:
        handle.seek(ref.sample_offset)
        fragment = handle.read(ref.sample_size)
    with tarfile.open(fileobj=io.BytesIO(fragment)) as tar:
        assert {Path(n).name.split(".")[0] for n in tar.getnames()} == {ref.key}


def test_grids_and_seeds_match_per_sample_reference(demo_dir: Path) -> None:
    rows = {}
    for path in Path(demo_dir).glob(f"*{MANIFEST_SUFFIX}"):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    values = ({112: 0.5, 224: 0.5}, 0.3, {})
    steps = walk_epoch(make_plan(demo_dir, 2, values_at=lambda step: values))
    for ref in (r for s in steps for r in s.plan.samples):
        u = keyed_uniforms(keyed_seeds(7, [ref.key], 0, "size"), NUM_DRAWS)[0]
        assert ref.grid == size_sample(rows[ref.key], SizingConfig(), TokenDropConfig(), values[0], values[1], u)
        assert ref.drop_seed == int(keyed_seeds(7, [ref.key], 0, "drop")[0])
        assert (ref.sample_offset, ref.sample_size, ref.group) == (
            rows[ref.key]["sample_offset"], rows[ref.key]["sample_size"], rows[ref.key]["group"])


def test_plan_is_deterministic_and_epochs_differ(demo_dir: Path) -> None:
    first, second = make_plan(demo_dir, 2), make_plan(demo_dir, 2)
    a, b = walk_epoch(first), walk_epoch(second)
    assert signature(a) == signature(b)
    keys_a = [r.key for s in a for r in s.plan.samples]
    keys_next = [r.key for s in walk_epoch(first) for r in s.plan.samples]
    assert sorted(keys_a) == sorted(keys_next) and keys_a != keys_next


def test_at_step_skips_ahead_like_a_dataloader_worker(demo_dir: Path) -> None:
    walked = walk_steps(make_plan(demo_dir, 2, ranks=None), 12)
    plan = make_plan(demo_dir, 2)
    picked = [s for step in (0, 2, 5, 6, 11) for s in plan.at_step(step)]
    assert signature(picked) == [x for x in signature(walked) if x[1] in (0, 2, 5, 6, 11)]
    with pytest.raises(ValueError, match="behind"):
        plan.at_step(3)


# ---------------------------------------------------------------- mixing


def test_mix_is_realised_by_order_and_every_sample_still_once(demo_dir: Path) -> None:
    images_first = lambda step: ({224: 1.0}, 0.0, {"image": 1.0} if step < 4 else {"audio": 0.5, "video": 0.5})
    steps = walk_epoch(make_plan(demo_dir, 2, values_at=images_first, window=8))
    assert sorted(epoch_keys(steps).elements()) == sorted(usable_keys(demo_dir))
    order = [r.modality for s in sorted(steps, key=lambda s: s.plan.step) for r in s.plan.samples]
    images = [i for i, m in enumerate(order) if m == "image"]
    assert images[: 8] == list(range(8))  # the first window (at step 0) is images only
    assert sum(s.mix["image"] for s in steps) == order.count("image")


@pytest.mark.parametrize("remaining, weights, size", [
    ([10, 10, 10], [1.0, 0.0, 0.0], 8), ([3, 10, 10], [1.0, 0.0, 0.0], 8), ([5, 7, 11], None, 9),
    ([0, 0, 4], [0.5, 0.5, 0.0], 10), ([100, 50, 20], [0.2, 0.3, 0.5], 60)])
def test_window_take_matches_reference(remaining, weights, size) -> None:
    take = window_take(np.array(remaining), None if weights is None else np.array(weights), size)
    assert take.sum() == min(size, sum(remaining)) and np.all(take <= remaining) and np.all(take >= 0)
    w = np.array(remaining if weights is None else weights, dtype=np.float64)
    if np.all(w * np.array(remaining) > 0) and np.all(take < remaining):  # no cap bound: proportional
        assert np.all(np.abs(take - size * w / w.sum()) < 1.0)
    if weights is not None and remaining[0] >= size and weights[0] == 1.0:
        assert take.tolist() == [size, 0, 0]


# ---------------------------------------------------------------- state and resume


def test_state_is_small_and_checked(demo_dir: Path) -> None:
    plan = make_plan(demo_dir, 2)
    walk_steps(plan, 3)
    state = plan.state_dict()
    assert PlanState.from_dict(json.loads(json.dumps(state))).nbytes() < 1024
    other = SamplePlan(DatasetIndex(demo_dir), seed=8, sizing=SizingConfig(), token_drop=TokenDropConfig(),
                       packing=PackingConfig(max_tokens=MAX_TOKENS), values_at=natural, world_size=2,
                       config=PlanConfig(window_samples=16))
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        plan.load_state_dict({**state, "version": 0})


@pytest.mark.parametrize("first", [1, 3, 9])
def test_exact_resume_matches_uninterrupted_walk(demo_dir: Path, first: int) -> None:
    total = 12  # crosses the epoch boundary
    uninterrupted = signature(walk_steps(make_plan(demo_dir, 2), total))
    plan = make_plan(demo_dir, 2)
    head = signature(walk_steps(plan, first))
    resumed = make_plan(demo_dir, 2)
    resumed.load_state_dict(json.loads(json.dumps(plan.state_dict())))
    assert head + signature(walk_steps(resumed, total - first)) == uninterrupted


@pytest.mark.parametrize("worlds, cut", [((2, 1), 2), ((1, 2), 3), ((2, 3, 1), 1), ((3, 2), 5)])
def test_elastic_resume_sees_every_key_once(demo_dir: Path, worlds: tuple[int, ...], cut: int) -> None:
    plan = make_plan(demo_dir, worlds[0])
    seen = walk_steps(plan, cut)
    for world in worlds[1:]:
        state = plan.state_dict()
        plan = make_plan(demo_dir, world)
        plan.load_state_dict(state)
        seen += walk_steps(plan, 1) if world != worlds[-1] else walk_epoch(plan)
    assert {s.plan.epoch for s in seen} == {0}
    assert sorted(epoch_keys(seen).elements()) == sorted(usable_keys(demo_dir))


def test_elastic_resume_state_is_exact_at_the_new_world_size(demo_dir: Path) -> None:
    plan = make_plan(demo_dir, 2)
    walk_steps(plan, 2)
    state = plan.state_dict()
    reference = make_plan(demo_dir, 1)
    reference.load_state_dict(state)
    expected = signature(walk_steps(reference, 6))
    again = make_plan(demo_dir, 1)
    again.load_state_dict(state)
    head = walk_steps(again, 1)
    third = make_plan(demo_dir, 1)
    third.load_state_dict(again.state_dict())
    assert signature(head + walk_steps(third, 5)) == expected


# ---------------------------------------------------------------- the walk command


def _walk_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[list[dict], dict]:
    """Run `plait data walk ...` through its own parser; returns (per-step lines, summary)."""
    parser = argparse.ArgumentParser()
    data_walk.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "walk", *argv])
    args.func(args)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return lines[:-1], lines[-1]


def test_walk_command_resume_equals_uninterrupted(demo_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: 3\ndata:\n  shards: {demo_dir}\n  packing: {{max_tokens: {MAX_TOKENS}}}\n")
    common = [str(config), "--set", "data.plan.window_samples=16"]
    full, summary = _walk_cli(capsys, *common, "--world-size", "2", "--steps", "7")
    assert summary["steps"] == 7 and len(full) == 14
    assert set(full[0]) >= {"epoch", "step", "rank", "keys", "tokens", "padding", "skipped"}
    state = tmp_path / "state.json"
    head, _ = _walk_cli(capsys, *common, "--world-size", "2", "--steps", "3", "--state-out", str(state))
    tail, _ = _walk_cli(capsys, *common, "--world-size", "2", "--steps", "4", "--state-in", str(state))
    assert head + tail == full
    rest, summary = _walk_cli(capsys, *common, "--world-size", "1", "--epochs", "1", "--state-in", str(state))
    keys = [k for line in head + rest for k in line["keys"]]
    assert sorted(keys) == sorted(usable_keys(demo_dir)) and summary["epoch"] == 1
    assert summary["state_bytes"] < 1024 and sum(summary["mix"].values()) == pytest.approx(1.0, abs=1e-3)
    assert set(summary["mix"]) == set(MODALITIES)
