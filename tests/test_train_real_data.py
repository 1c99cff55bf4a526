"""`plait train` on the real data plane (demo shards → plan → loader → model → DeepSpeed), 2 ranks.

Exact resume: 4 steps ≡ 2 steps + stop + rerun of the same command to 4, loss for loss (bitwise), with the
loader position, queues, curriculum and RNG restored from the checkpoint. Every run accumulates 2 micro-batches
per step; the elastic resume at 1 rank keeps the global batch (`deepspeed.keep_global_batch`) by accumulating 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import logged_losses, run_plait


def _config(path: Path, demo_dir: Path, run_dir: Path) -> Path:
    config = {
        "seed": 1, "run_dir": str(run_dir),
        "data": {"shards": str(demo_dir), "workers": 1, "packing": {"max_tokens": 512},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256,
                            "video_sampling": "tsn", "video_jitter": 0.8}},
        "curriculum": {"phases": [{"start": 0, "values": {"resolution": {32: 1.0}, "hard_negative_ratio": 0.5}},
                                  {"start": 3, "values": {"resolution": {32: 0.5, 48: 0.5}}}]},
        "loss": {"queue": {"size": 64}, "hard_negatives": {"num_negatives": 8}},
        "deepspeed": {"gradient_accumulation_steps": 2, "keep_global_batch": True},
        "checkpoint": {"every": 0}, "tracking": {"log_every": 1}, "eval": {"every": 0, "max_samples": 12},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, steps: int, nproc: int) -> dict:
    proc = run_plait("train", str(config), "--steps", str(steps), "--nproc", str(nproc))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _latest_meta(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints"
    return json.loads((folder / (folder / "latest").read_text().strip() / "plait_meta.json").read_text())



@pytest.mark.distributed
@pytest.mark.slow
def test_exact_then_elastic_resume_on_demo_shards(demo_dir: Path, tmp_path: Path) -> None:
    straight = _train(_config(tmp_path / "a.yaml", demo_dir, tmp_path / "a"), 4, 2)
    config = _config(tmp_path / "b.yaml", demo_dir, tmp_path / "b")
    first = _train(config, 2, 2)
    resumed = _train(config, 4, 2)
    assert straight["world_size"] == first["world_size"] == resumed["world_size"] == 2
    assert resumed["run_id"] == first["run_id"] and resumed["steps"] == 4
    assert sorted(logged_losses(tmp_path / "a")) == [1, 2, 3, 4]
    assert logged_losses(tmp_path / "b") == logged_losses(tmp_path / "a")
    assert _latest_meta(tmp_path / "b")["accumulation"] == 2
    elastic = _train(config, 5, 1)
    assert elastic["world_size"] == 1 and elastic["steps"] == 5 and elastic["run_id"] == first["run_id"]
    assert sorted(logged_losses(tmp_path / "b")) == [1, 2, 3, 4, 5]
    meta = _latest_meta(tmp_path / "b")
    assert (meta["world_size"], meta["accumulation"], meta["step"]) == (1, 4, 5)
