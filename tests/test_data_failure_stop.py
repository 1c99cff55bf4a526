"""A data failure on one rank stops every rank: `plait train --nproc 2` on demo shards whose samples for rank 1 are
all corrupt from optimizer step 2 on. Rank 1's loader gives up (`data.max_consecutive_failures`) at step 2's second
micro-batch; both ranks save the checkpoint of step 2, print the same one-line error naming rank 1's key and shard,
and the run exits 2 within seconds (not at the distributed timeout). With the shards repaired, rerunning the same
command resumes from that checkpoint and matches an uninterrupted run loss for loss.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from plait.data.manifest import read_manifest

from conftest import logged_losses, run_plait
from test_train_distributed import write_config

LIMIT = 2
"""`data.max_consecutive_failures` of the run (rank 1's step 2 has one sample per micro-batch)."""
FAILS_AT = 2
"""The optimizer step whose micro-batches are corrupt on rank 1: steps 0 and 1 train."""
STEPS = 4
"""Run length asked for (the run stops at FAILS_AT)."""
FAIL_TO_EXIT_S = 60.0
"""Longest wait from the failing rank's error log to the process exit (the distributed timeout is 30 minutes)."""
RUN_TIMEOUT_S = 300.0
"""A run still going after this long hangs: its process group is killed and the test fails."""


def _config(path: Path, shards: Path, run_dir: Path) -> Path:
    return write_config(path, run_dir=str(run_dir), checkpoint={"every": 0},
                        data={"shards": str(shards), "workers": 1, "max_consecutive_failures": LIMIT,
                              "packing": {"max_tokens": 256}, "plan": {"eval_fraction": 0.0}},
                        deepspeed={"gradient_accumulation_steps": 2},
                        curriculum={"phases": [{"start": 0, "values": {"resolution": {16: 1.0}}}]})


def _rank1_keys_from(config: Path, step: int) -> list[str]:
    """Rank 1's planned sample keys of epoch 0 from optimizer step `step` on, in the order its loader reads them."""
    walk = run_plait("data", "walk", str(config), "--world-size", "2", "--epochs", "1").stdout.strip().splitlines()
    records = [json.loads(line) for line in walk[:-1]]
    assert all(r["epoch"] == 0 for r in records)
    earlier = {key for r in records if r["rank"] == 0 or r["step"] < step for key in r["keys"]}
    later = [key for r in records if r["rank"] == 1 and r["step"] >= step for key in r["keys"]]
    assert len(later) >= LIMIT and not earlier & set(later), "the corrupt samples must be rank 1's alone"
    return later


def _corrupt(shards: Path, keys: list[str]) -> dict[str, Path]:
    """Zero the media bytes of `keys` in the shards under `shards` (after indexing); returns each key's shard."""
    where = {}
    for shard in sorted(shards.glob("*.tar")):
        blob = bytearray(shard.read_bytes())
        for row in read_manifest(f"{shard}.plait.parquet").to_pylist():
            if row["key"] in keys:
                blob[row["media_offset"]:row["media_offset"] + row["media_size"]] = b"\x00" * row["media_size"]
                where[row["key"]] = shard
        shard.write_bytes(bytes(blob))
    assert set(where) == set(keys)
    return where


def _train_timed(config: Path, steps: int) -> tuple[int, list[str], float | None]:
    """`plait train --nproc 2`: exit code, output lines, and seconds from the first data failure log to the exit."""
    cmd = [sys.executable, "-m", "plait.trainer", "train", str(config), "--steps", str(steps), "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("the run hung: " + "\n".join(line for _, line in lines[-60:])) from None
    exited = time.monotonic()
    reader.join(timeout=30)
    failed = next((t for t, line in lines if "data failure on rank 1" in line), None)
    return code, [line for _, line in lines], None if failed is None else exited - failed



@pytest.mark.distributed
@pytest.mark.slow
def test_one_ranks_data_failure_stops_every_rank_with_a_checkpoint(demo_dir: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(demo_dir, shards)
    config = _config(tmp_path / "run.yaml", shards, tmp_path / "run")
    bad = _rank1_keys_from(config, FAILS_AT)
    where = _corrupt(shards, bad)
    code, lines, fail_to_exit = _train_timed(config, STEPS)
    output = "\n".join(lines[-80:])
    assert code == 2, output
    assert fail_to_exit is not None and fail_to_exit < FAIL_TO_EXIT_S, output
    print(f"failure to exit: {fail_to_exit:.1f} s")
    # Both ranks raised the same error: rank 1's message, naming the key its guard stopped at and that key's shard.
    named = bad[LIMIT - 1]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], output
    assert f"rank 1: {LIMIT} bad samples in a row; the last is key {named!r} in shard {where[named]}" in errors[0]
    assert f"every rank stopped at step {FAILS_AT} with checkpoint" in errors[0]
    assert not any(line.startswith('{"run_id"') for line in lines)
    # The latest checkpoint is complete, of the last good step, at world size 2, with both ranks' state.
    checkpoints = tmp_path / "run" / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    meta = json.loads((checkpoints / tag / "plait_meta.json").read_text())
    assert (tag, meta["step"], meta["world_size"]) == (f"step{FAILS_AT:08d}", FAILS_AT, 2)
    assert all((checkpoints / tag / f"plait_rank{r}.pt").is_file() for r in range(2))
    assert sorted(logged_losses(tmp_path / "run")) == list(range(1, FAILS_AT + 1))
    # The data repaired, the same command resumes from that checkpoint, exactly as a run that never failed.
    shutil.rmtree(shards)
    shutil.copytree(demo_dir, shards)
    resumed = json.loads(run_plait("train", str(config), "--steps", str(FAILS_AT + 1), "--nproc", "2")
                         .stdout.strip().splitlines()[-1])
    assert resumed["world_size"] == 2 and resumed["steps"] == FAILS_AT + 1
    straight = _config(tmp_path / "straight.yaml", shards, tmp_path / "straight")
    run_plait("train", str(straight), "--steps", str(FAILS_AT + 1), "--nproc", "2")
    assert logged_losses(tmp_path / "run") == logged_losses(tmp_path / "straight")
