"""Named sources over real demo shards: weights shape each window, an epoch uses each source once (or samples by
weight with replacement), weights follow the curriculum, resume is exact and elastic, metrics are per source."""

from __future__ import annotations

import collections
import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from plait.data.config import DataConfig, SourceConfig
from plait.data.dataset_index import DatasetIndex
from plait.data.demo import DemoSpec, write_demo
from plait.data.indexer import index_dataset
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig, SamplePlan
from plait.data.sizing import SizingConfig
from plait.data.sources import Sources
from plait.data.token_drop import TokenDropConfig
from plait.trainer.config import ConfigError, load_config

from conftest import run_plait
from test_plan import natural, signature, usable_keys, walk_epoch, walk_steps

WINDOW = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two indexed demo datasets: `big` (60 samples, 20 per modality) and `small` (72, of which its 24 images are
    used)."""
    out = {}
    for name, samples, seed in (("big", 60, 11), ("small", 72, 12)):
        folder = tmp_path_factory.mktemp(name)
        write_demo(folder, DemoSpec(samples=samples, samples_per_shard=12, seed=seed))
        index_dataset(str(folder), workers=1)
        out[name] = folder
    return out


def sources(folders: dict[str, Path], big: float = 1.0, small: float = 3.0) -> Sources:
    return Sources(["big", "small"], [DatasetIndex(folders["big"]), DatasetIndex(folders["small"])], [big, small],
                   ["", "image"])


def make_plan(source: Sources, world: int, sampling: str = "once", weights_at=None) -> SamplePlan:
    return SamplePlan(source, seed=3, sizing=SizingConfig(), token_drop=TokenDropConfig(),
                      packing=PackingConfig(max_tokens=512), values_at=natural, world_size=world,
                      config=PlanConfig(window_samples=WINDOW, sampling=sampling), source_weights_at=weights_at)


def _image_keys(folder: Path) -> set[str]:
    """Reference: usable image keys of a folder, from its manifests."""
    keys = set()
    for path in sorted(folder.glob("*.plait.parquet")):
        keys |= {r["key"] for r in pq.read_table(path, columns=["key", "modality", "status"]).to_pylist()
                 if r["modality"] == "image" and r["status"] == "ok"}
    return keys


def by_source(steps: list) -> collections.Counter:
    return collections.Counter((r.source, r.key) for s in steps for r in s.plan.samples)


def test_once_uses_every_sample_of_every_source_once_heavier_first(folders) -> None:
    plan = make_plan(sources(folders), world=2)
    plan.upcoming_epoch()
    first_window = plan._window_positions()
    taken = [len(p) for p in first_window]
    assert sum(taken[:3]) == 4 and sum(taken[3:]) == 12  # weights 1 : 3 of a 16-sample window
    assert taken[4:] == [0, 0]  # the small source gives images only
    steps = walk_epoch(plan)
    seen = by_source(steps)
    assert set(seen.values()) == {1}
    big = {k for s, k in seen if s == "big"}
    small = {k for s, k in seen if s == "small"}
    assert big == set(usable_keys(folders["big"]))
    assert small == set(usable_keys(folders["small"])) & _image_keys(folders["small"])
    order = [r.source for s in steps for r in s.plan.samples]
    assert order[: len(order) // 4].count("small") > order[-len(order) // 4:].count("small")


def test_weighted_samples_with_replacement_an_epoch_as_long_as_all_sources(folders) -> None:
    plan = make_plan(sources(folders, big=1.0, small=1.0), world=1, sampling="weighted")
    steps = walk_epoch(plan)
    assert plan.state.epoch == 1 and sum(plan.state.cursors) == 0
    seen = by_source(steps)
    small = [n for (s, _), n in seen.items() if s == "small"]
    big = [n for (s, _), n in seen.items() if s == "big"]
    assert set(big) == {1}  # half of the epoch's 84 positions is fewer than the big source's 60 samples
    assert max(small) == 2  # the other 42 positions wrap around the small source's 24 images
    assert 30 <= sum(small) <= 42 and 30 <= sum(big) <= 42  # 42 positions each, less the held-out groups


def test_source_weights_follow_the_curriculum_from_the_next_window(folders) -> None:
    def weights_at(step: int) -> dict[str, float]:
        return {"big": 1.0, "small": 0.0} if step < 2 else {"big": 0.0, "small": 1.0}

    plan = make_plan(sources(folders), world=1, weights_at=weights_at)
    steps = walk_epoch(plan)
    windows = collections.defaultdict(set)
    for s in steps:
        windows[s.plan.step].update(r.source for r in s.plan.samples)
    first_small = min(step for step, names in windows.items() if "small" in names)
    assert first_small >= 2 and all(names == {"big"} for step, names in windows.items() if step < 2 and names)
    assert windows[first_small] == {"small"}


def test_exact_and_elastic_resume_with_sources(folders) -> None:
    straight = make_plan(sources(folders), world=2)
    reference = walk_steps(straight, 12)
    first = make_plan(sources(folders), world=2)
    head = walk_steps(first, 5)
    resumed = make_plan(sources(folders), world=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert signature(head + walk_steps(resumed, 7)) == signature(reference)
    elastic = make_plan(sources(folders), world=3)
    elastic.load_state_dict(first.state_dict())
    rest = walk_epoch(elastic)
    seen = by_source(head) + by_source(rest)
    assert set(seen.values()) == {1}
    assert {k for s, k in seen if s == "big"} == set(usable_keys(folders["big"]))


def test_sources_config_is_checked_at_load(folders, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^sources: set either data.shards or data.sources"):
        DataConfig(shards=str(folders["big"]), sources=[SourceConfig(name="a", shards=str(folders["big"]))])
    with pytest.raises(ValueError, match=r"^sources: names must be unique, \['a'\]"):
        DataConfig(sources=[SourceConfig(name="a", shards=str(folders["big"])),
                            SourceConfig(name="a", shards=str(folders["small"]))])
    with pytest.raises(ValueError, match="^modality: 'text'"):
        SourceConfig(name="a", shards=str(folders["big"]), modality="text")
    with pytest.raises(ValueError, match="^weight"):
        SourceConfig(name="a", shards=str(folders["big"]), weight=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"sources": [{"name": "a", "shards": str(folders["big"])}]},
        "curriculum": {"phases": [{"start": 0}, {"start": 5, "values": {"source_weights": {"b": 1.0}}}]}}))
    with pytest.raises(ConfigError, match=r"c.yaml: curriculum.phases\[1\].values.source_weights: \['b'\] are not"):
        load_config(config)


@pytest.mark.slow
def test_training_on_two_sources_logs_each(folders, tmp_path: Path) -> None:
    config = {
        "seed": 1, "run_dir": str(tmp_path / "run"),
        "data": {"sources": [{"name": "big", "shards": str(folders["big"]), "weight": 1.0},
                             {"name": "small", "shards": str(folders["small"]), "weight": 2.0, "modality": "image"}],
                 "workers": 1, "packing": {"max_tokens": 512}, "plan": {"window_samples": 24},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256}},
        "curriculum": {"phases": [{"start": 0}, {"start": 2, "values": {"source_weights": {"small": 0.0}}}]},
        "checkpoint": {"every": 0}, "tracking": {"log_every": 1}, "eval": {"every": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    walked = run_plait("data", "walk", str(path), "--world-size", "2", "--steps", "2").stdout.strip().splitlines()
    records = [json.loads(line) for line in walked[:-1]]
    assert len(records) == 4 and all(sum(r["sources"].values()) == len(r["keys"]) for r in records)
    assert {name for r in records for name in r["sources"]} == {"big", "small"}
    result = json.loads(run_plait("train", str(path), "--steps", "4").stdout.strip().splitlines()[-1])
    assert result["steps"] == 4
    with sqlite3.connect(tmp_path / "run" / "mlflow.db") as db:
        rows = db.execute("select key, step, value from metrics where key like 'source/%'").fetchall()
    logged = collections.defaultdict(dict)
    for key, step, value in rows:
        logged[key][step] = value
    assert {"source/big/samples", "source/small/samples", "source/big/skipped"} <= set(logged)
    assert sum(logged["source/small/samples"].values()) > 0
    assert all(v == 0 for v in logged["source/big/skipped"].values())
