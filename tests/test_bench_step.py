"""`plait bench step` runs the real train loop and the bare engine on the same batches and reports their ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_step_times_the_loop_against_the_bare_engine(tmp_path: Path, demo_dir: Path):
    from test_train_distributed import write_config

    config = write_config(tmp_path / "run.yaml", data={"shards": str(demo_dir), "workers": 0})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "plait.trainer", "bench", "step", "--config", str(config),
                           "--steps", "3", "--set", "tracking.log_every=2"],
                          env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["log_every"] == 2 and result["micro_batches_per_step"] == 1
    assert result["full_step_ms"] > 0 and result["bare_step_ms"] > 0
    assert result["full_over_bare"] == pytest.approx(result["full_step_ms"] / result["bare_step_ms"])
