"""The plan follows the curriculum at the step it names: resolution and token-drop switches and ramps re-size what
each rank has left, with every sample still once per epoch, exact and elastic resume across the switch, and
gradient accumulation counted in optimizer steps (changeable on resume)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.data.dataset_index import DatasetIndex
from plait.data.manifest import MANIFEST_SUFFIX
from plait.data.rng import keyed_seeds, keyed_uniforms
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig, SamplePlan
from plait.data.sizing import NUM_DRAWS, SizingConfig, size_sample
from plait.data.token_drop import TokenDropConfig
from plait.trainer.config import RunConfig
from plait.trainer.curriculum import Curriculum, CurriculumConfig, base_values
from test_plan import _walk_cli, epoch_keys, signature, usable_keys, walk_epoch, walk_steps

SWITCH = 2
"""Optimizer step at which the resolution doubles."""


def switching(step: int) -> tuple:
    """Resolution 112 before SWITCH, 224 from it."""
    return ({112: 1.0} if step < SWITCH else {224: 1.0}), 0.0, {}


def at_switch(step: int) -> int | None:
    """The one change point of `switching`."""
    return SWITCH if step < SWITCH else None


def make_plan(root: Path, world: int, accumulation: int = 1, window: int = 64, ranks: list[int] | None = None,
              agree=None) -> SamplePlan:
    """A plan whose window outlasts the switch, so only a cut can make it exact."""
    return SamplePlan(DatasetIndex(root), seed=7, sizing=SizingConfig(), token_drop=TokenDropConfig(),
                      packing=PackingConfig(max_tokens=512), values_at=switching, world_size=world, ranks=ranks,
                      agree=agree, config=PlanConfig(window_samples=window), accumulation=accumulation,
                      next_change=at_switch)


def manifest_rows(root: Path) -> dict[str, dict]:
    """Every manifest row by key."""
    rows = {}
    for path in Path(root).glob(f"*{MANIFEST_SUFFIX}"):
        rows.update({r["key"]: r for r in pq.read_table(path).to_pylist()})
    return rows


def test_a_resolution_switch_reaches_the_batches_at_its_step(demo_dir: Path) -> None:
    steps = walk_epoch(make_plan(demo_dir, 2))
    assert sorted(epoch_keys(steps).elements()) == sorted(usable_keys(demo_dir))
    assert {s.plan.step for s in steps} >= {SWITCH - 1, SWITCH, SWITCH + 1}
    rows = manifest_rows(demo_dir)
    for s in steps:
        resolution = switching(s.plan.step)[0]
        assert s.values["resolution"] == resolution
        for ref in s.plan.samples:  # each sample sized at the values of the step it is fed at
            u = keyed_uniforms(keyed_seeds(7, [ref.key], 0, "size"), NUM_DRAWS)[0]
            assert ref.grid == size_sample(rows[ref.key], SizingConfig(), TokenDropConfig(), resolution, 0.0, u)


@pytest.mark.parametrize("first", [SWITCH - 1, SWITCH, SWITCH + 1])
def test_exact_resume_across_the_switch(demo_dir: Path, first: int) -> None:
    total = SWITCH + 4
    uninterrupted = signature(walk_steps(make_plan(demo_dir, 2), total))
    plan = make_plan(demo_dir, 2)
    head = signature(walk_steps(plan, first))
    resumed = make_plan(demo_dir, 2)
    resumed.load_state_dict(json.loads(json.dumps(plan.state_dict())))
    assert head + signature(walk_steps(resumed, total - first)) == uninterrupted


@pytest.mark.parametrize("worlds", [(2, 1), (1, 3)])
def test_elastic_resume_after_the_switch_sees_every_key_once(demo_dir: Path, worlds: tuple[int, int]) -> None:
    plan = make_plan(demo_dir, worlds[0])
    seen = walk_steps(plan, SWITCH + 1)
    state = plan.state_dict()
    plan = make_plan(demo_dir, worlds[1])
    plan.load_state_dict(state)
    seen += walk_epoch(plan)
    assert {s.plan.epoch for s in seen} == {0}
    assert sorted(epoch_keys(seen).elements()) == sorted(usable_keys(demo_dir))


def test_accumulation_counts_optimizer_steps_and_can_change_on_resume(demo_dir: Path) -> None:
    plan = make_plan(demo_dir, 1, accumulation=2)
    steps = walk_steps(plan, 2 * SWITCH + 2)
    assert [(s.plan.step, s.plan.micro, s.plan.index) for s in steps[:4]] == [(0, 0, 0), (0, 1, 1), (1, 0, 2),
                                                                             (1, 1, 3)]
    assert {s.values["resolution"][224] if 224 in s.values["resolution"] else 0 for s in steps[2 * SWITCH:]} == {1.0}
    assert all(112 in s.values["resolution"] for s in steps[:2 * SWITCH])
    assert plan.index_of(SWITCH + 1) == 2 * SWITCH + 2
    state = plan.state_dict()
    single = make_plan(demo_dir, 1, accumulation=1)
    single.load_state_dict(state)
    assert single.index_of(SWITCH + 1) == 2 * SWITCH + 2 and single.index_of(SWITCH + 2) == 2 * SWITCH + 3
    continued = make_plan(demo_dir, 1, accumulation=2)
    continued.load_state_dict(state)
    a, b = walk_steps(single, 4), walk_steps(continued, 4)
    assert [s.plan.step for s in a] == [SWITCH + 1 + k for k in range(4)]
    assert [s.plan.step for s in b] == [SWITCH + 1, SWITCH + 1, SWITCH + 2, SWITCH + 2]
    assert [[r.key for r in s.plan.samples] for s in a] == [[r.key for r in s.plan.samples] for s in b]
    mid = make_plan(demo_dir, 1, accumulation=2)
    walk_steps(mid, 3)
    with pytest.raises(ValueError, match="mid-step"):
        make_plan(demo_dir, 1, accumulation=1).load_state_dict(mid.state_dict())


def test_next_change_follows_phase_starts_and_ramps_every_replan_steps() -> None:
    phases = CurriculumConfig(phases=[
        {"start": 0}, {"start": 10, "values": {"loss_weights": {"caption": 0.5}}},
        {"start": 20, "values": {"resolution": {448: 1.0}}},
        {"start": 40, "transition": "linear", "ramp": 25, "values": {"token_drop_rate": 0.5}}])
    curriculum = Curriculum(phases, base_values(RunConfig()))
    names = ("resolution", "token_drop_rate")
    expected = {0: 20, 19: 20, 20: 40, 39: 40, 40: 50, 49: 50, 50: 60, 60: 65, 64: 65, 65: None}
    assert {step: curriculum.next_change(step, names, 10) for step in expected} == expected


def _rank_main(rank: int, root: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)

    def agree(count: int) -> int:
        value = torch.tensor([count])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    plan = make_plan(Path(root), 2, ranks=[rank], agree=agree)
    head = walk_steps(plan, SWITCH + 1)
    resumed = make_plan(Path(root), 2, ranks=[rank], agree=agree)
    resumed.load_state_dict(plan.state_dict())
    steps = head + walk_epoch(resumed)
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"world": dist.get_world_size(), "steps": [[s.plan.step, [r.key for r in s.plan.samples]] for s in steps]}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_planning_only_their_share_cut_and_resume_like_the_full_plan(demo_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_rank_main, args=(str(demo_dir), port, str(tmp_path)), nprocs=2, start_method="spawn")
    full = walk_epoch(make_plan(demo_dir, 2))
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["world"] == 2
        assert got["steps"] == [[s.plan.step, [r.key for r in s.plan.samples]] for s in full if s.plan.rank == rank]


def test_walk_command_shows_the_switch_at_its_step(demo_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  shards: {demo_dir}\n  packing: {{max_tokens: 512}}\n  plan: {{window_samples: 64}}\n"
                      "deepspeed: {gradient_accumulation_steps: 2}\n"
                      "curriculum:\n  phases:\n    - {start: 0, values: {resolution: {112: 1.0}}}\n"
                      f"    - {{start: {SWITCH}, values: {{resolution: {{224: 1.0}}}}}}\n")
    lines, summary = _walk_cli(capsys, str(config), "--world-size", "2", "--steps", str(2 * SWITCH + 2))
    assert [(line["step"], line["micro"]) for line in lines if line["rank"] == 0] == [
        (k // 2, k % 2) for k in range(2 * SWITCH + 2)]
    assert {line["step"]: line["resolution"] for line in lines} == {
        step: {"112" if step < SWITCH else "224": 1.0} for step in range(SWITCH + 1)}
