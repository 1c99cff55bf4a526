"""Checkpoint validity and purge, RNG capture, the preemption flag, and a SIGKILL during saves."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.trainer.checkpoint import (LATEST, META, PreemptionFlag, complete_tags, latest_tag, purge, rng_state,
                                      set_rng_state, tag_of)

from plait.trainer.train import kept_accumulation
from test_train_distributed import LAUNCH, write_config


def _fake_checkpoint(folder: Path, step: int, complete: bool = True) -> str:
    tag = tag_of(step)
    (folder / tag).mkdir(parents=True)
    (folder / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (folder / tag / META).write_text(json.dumps({"step": step, "world_size": 1, "zero_stage": 2}))
    return tag


def test_latest_names_only_complete_checkpoints(tmp_path: Path):
    assert latest_tag(tmp_path) is None
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20)
    (tmp_path / LATEST).write_text(tag_of(20))
    # A save killed before its marker: `latest` still names step 20, and a scan ignores step 30.
    _fake_checkpoint(tmp_path, 30, complete=False)
    assert latest_tag(tmp_path) == tag_of(20)
    assert complete_tags(tmp_path) == [tag_of(10), tag_of(20)]
    # `latest` naming an incomplete folder falls back to the newest complete one.
    (tmp_path / LATEST).write_text(tag_of(30))
    assert latest_tag(tmp_path) == tag_of(20)


@pytest.mark.parametrize(("saved", "world", "expected"), [((2, 2), 1, 4), ((2, 2), 4, 1), ((4, 3), 6, 2), ((1, 1), 1, 1)])
def test_keep_global_batch_keeps_ranks_times_accumulation(saved: tuple[int, int], world: int, expected: int):
    meta = {"world_size": saved[0], "accumulation": saved[1]}
    assert kept_accumulation(meta, world) == expected
    assert expected * world == saved[0] * saved[1]


def test_keep_global_batch_that_cannot_divide_names_the_field():
    with pytest.raises(ValueError, match=r"deepspeed.keep_global_batch.*6 micro-batches.*4 ranks"):
        kept_accumulation({"world_size": 2, "accumulation": 3}, 4)


def test_purge_keeps_the_newest_k_and_their_universal_copies(tmp_path: Path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
        (tmp_path / f"{tag_of(step)}_universal").mkdir()
    _fake_checkpoint(tmp_path, 5, complete=False)
    removed = purge(tmp_path, keep=2, protect=tag_of(4))
    assert removed == [tag_of(1), tag_of(2)]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [tag_of(3), f"{tag_of(3)}_universal", tag_of(4), f"{tag_of(4)}_universal", tag_of(5)]
    assert purge(tmp_path, keep=0, protect=tag_of(4)) == []


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


def test_preemption_flag_is_set_by_sigterm_and_sigusr1_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        flag = PreemptionFlag()
        assert not flag.requested()
        os.kill(os.getpid(), sig)
        assert flag.signalled and flag.requested()
        flag.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigkill_during_saves_leaves_a_loadable_latest(tmp_path: Path, demo_dir: Path):
    config = write_config(tmp_path / "run.yaml", checkpoint={"every": 1, "keep": 2}, data={"shards": str(demo_dir)})
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(LAUNCH), str(config), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd + ["--steps", "100000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = run_dir / "checkpoints"
    deadline = time.time() + 180
    # Saving every step, most of the wall time is spent saving; kill as soon as a few exist.
    while time.time() < deadline and proc.poll() is None and len(complete_tags(checkpoints)) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    tag = latest_tag(checkpoints)
    assert tag is not None and (checkpoints / tag / META).is_file()
    step = int(tag.removeprefix("step"))
    resumed = subprocess.run(cmd + ["--steps", str(step + 1)], env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["steps"] == step + 1 and result["checkpoint"].endswith(tag_of(step + 1))
    _check_export(run_dir, tmp_path / "export", step + 1)


def _check_export(run_dir: Path, out: Path, step: int) -> None:
    """`plait export` of the run: the saved model's weights equal the checkpoint's; no stock `llm/` (one MoME layer
    of two has no Mixtral form; tests/test_export_hf.py checks the stock LLMs)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from plait.trainer.export import export
    from plait.trainer.model.pretrained import PretrainedModel

    written = export(run_dir, out)
    assert written["step"] == step and written["llm"] is None and not (out / "llm").exists()
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag_of(step))
    model = PretrainedModel.from_pretrained(out).model.state_dict()
    assert len(model) > 10
    for name, value in model.items():
        assert torch.equal(value, trained["model." + name]), name
