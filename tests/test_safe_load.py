"""Crafted checkpoint files never run code: plait's rank state and DeepSpeed's model states are refused by name,
by `plait train` (resume) and `plait export`; real checkpoints of every kind load through the weights-only path."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from plait.trainer.safe_load import UnsafeCheckpoint, check_files, safe_load

from conftest import run_plait


class RunsCode:
    """Unpickling this runs `touch MARKER` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def test_rng_and_plain_states_round_trip_and_code_is_refused(tmp_path: Path) -> None:
    state = {"rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "data": {"step": 3, "cursors": [1, 2, 3]}, "queue": torch.arange(6.0).view(2, 3)}
    torch.save(state, tmp_path / "good.pt")
    loaded = safe_load(tmp_path / "good.pt")
    assert loaded["rng"]["python"] == state["rng"]["python"] and loaded["data"] == state["data"]
    assert np.array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert torch.equal(loaded["queue"], state["queue"])
    check_files(tmp_path)
    marker = tmp_path / "marker"
    torch.save({"data": RunsCode(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"bad\.pt: refers to posix\.system"):
        check_files(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match=r"bad\.pt"):
        safe_load(tmp_path / "bad.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, run dir) of a 1-step run with a checkpoint."""
    out = tmp_path_factory.mktemp("safe")
    config = {"seed": 0, "run_dir": str(out / "run"),
              "data": {"shards": str(demo_dir), "workers": 0, "packing": {"max_tokens": 512},
                       "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32,
                                  "max_sample_tokens": 256}},
              "checkpoint": {"every": 1}, "eval": {"every": 0}}
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run_plait("train", str(path), "--steps", "1")
    return path, out / "run"


def _tamper(path: Path, marker: Path) -> None:
    """Add an object that runs code to a real checkpoint file (read safely, written back with the payload)."""
    state = safe_load(path)
    state["extra"] = RunsCode(marker)
    torch.save(state, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["plait_rank0.pt", "mp_rank_00_model_states.pt"])
def test_resume_and_export_refuse_a_crafted_checkpoint(trained, tmp_path: Path, name: str) -> None:
    config, run_dir = trained
    folder = run_dir / "checkpoints" / "step00000001"
    original = (folder / name).read_bytes()
    marker = tmp_path / "marker"
    try:
        _tamper(folder / name, marker)
        for command in (["train", str(config), "--steps", "2"], ["export", str(run_dir), "--out", str(tmp_path / "out")]):
            proc = run_plait(*command, check=False)
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert f"{folder / name}: refers to posix.system" in proc.stderr
            assert not marker.exists()
    finally:
        (folder / name).write_bytes(original)
