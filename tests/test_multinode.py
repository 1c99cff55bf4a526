"""Multi-node launch scripts, simulated as 2 nodes x 1 process on this machine (issue 8 acceptance).

Each "node" is its own launcher invocation (`launch/multinode.sh` per-node mode, `launch/torchrun.sh`,
`launch/slurm_node.sh` with SLURM variables); the two meet at 127.0.0.1 on a free port, train the tiny demo
config on CPU/gloo, checkpoint, and resume the same MLflow run. The SLURM test also preempts one node with
SIGUSR1 and checks the requeue contract (both nodes checkpoint and exit 75).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from plait.trainer.engine import free_port
from plait.trainer.train_command import EXIT_PREEMPTED, RESULT_PREFIX

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
NODES = 2
TIMEOUT = 240
"""Seconds one pair of node invocations may take (the CPU is shared)."""

TINY = {
    "seed": 0,
    "data": {"workers": 0,
             "sizing": {"patch_size": 8, "audio_patch": 16, "video_side_px": 32, "max_side_patches": 16,
                        "max_sample_tokens": 512},
             "packing": {"max_tokens": 1024}},
    # A tiny model without MoME layers: these tests are about launching, not the model.
    "model": {"encoder": {"dim": 32, "depth": 2, "num_heads": 4, "ffn_hidden": 48, "mome_layers": []},
              "resampler": {"dim": 32, "depth": 1, "num_latents": 4, "num_heads": 4, "ffn_hidden": 48},
              "llm": {"model_kwargs": {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 48,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                      "mome_layers": []},
              "embed_dim": 16},
    "loss": {"queue": {"size": 8}, "hard_negatives": {"num_negatives": 4}},
    "curriculum": {"phases": [{"start": 0, "values": {"resolution": {32: 1.0}}}]},
    "eval": {"every": 0, "max_samples": 8},
    "tracking": {"log_every": 1},
}
"""A run that trains in seconds on the demo data (run_dir and demo folder come from the test)."""

NodeEnv = Callable[[int], dict[str, str]]
"""Node rank -> the variables that make a launcher invocation that node."""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Path:
    """The tiny run config on the session's indexed demo data."""
    path = tmp_path_factory.mktemp("multinode") / "run.yaml"
    data = {**TINY, "data": {**TINY["data"], "demo": {"out": str(demo_dir)}}}
    path.write_text(yaml.safe_dump(data))
    return path


def _base_env() -> dict[str, str]:
    """CPU DeepSpeed, one thread per rank, nothing inherited that would pin a rank or world size."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
           and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _start_nodes(cmd: list[str], node_env: NodeEnv, cwd: Path) -> list[subprocess.Popen]:
    """Start one invocation of `cmd` per node, each in its own session (so a failure can stop all of it)."""
    port = str(free_port())
    return [subprocess.Popen(cmd, env={**_base_env(), "MASTER_PORT": port, **node_env(node)}, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for node in range(NODES)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output) of every node; whatever is left of them is killed if they overrun."""
    try:
        outputs = [proc.communicate(timeout=TIMEOUT)[0] for proc in procs]
        return [(proc.returncode, output) for proc, output in zip(procs, outputs)]
    finally:
        _kill(procs)


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each node's session (launcher and ranks); nodes already gone are skipped."""
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _run_nodes(cmd: list[str], node_env: NodeEnv, cwd: Path) -> dict:
    """Run all nodes to the end; each must exit 0; returns rank 0's result line (printed on node 0)."""
    outputs = _finish(_start_nodes(cmd, node_env, cwd))
    assert [code for code, _ in outputs] == [0] * NODES, "\n\n".join(out[-4000:] for _, out in outputs)
    return _result(outputs[0][1])


def _result(output: str) -> dict:
    """The result JSON line in a node's output (a launcher may prefix the rank's lines)."""
    lines = [line[line.index(RESULT_PREFIX):] for line in output.splitlines() if RESULT_PREFIX in line]
    assert len(lines) == 1, output[-4000:]
    return json.loads(lines[0])


def _train_and_resume(cmd: list[str], node_env: NodeEnv, tmp_path: Path) -> None:
    """2 steps (checkpoint), then the same command with 3 steps continues the run: world size 2 both times."""
    run_dir = tmp_path / "run"
    cmd = [*cmd, "--run-dir", str(run_dir)]
    first = _run_nodes([*cmd, "--steps", "2"], node_env, tmp_path)
    assert first["world_size"] == 2 and first["steps"] == 2
    assert first["checkpoint"] == str(run_dir / "checkpoints" / "step00000002")
    _assert_both_ranks_saved(run_dir, "step00000002")
    resumed = _run_nodes([*cmd, "--steps", "3"], node_env, tmp_path)
    assert resumed["world_size"] == 2 and resumed["steps"] == 3
    assert resumed["run_id"] == first["run_id"]
    assert _run_ids(run_dir) == [first["run_id"]]
    # Steps 1-2 were logged by the first pair and 3 by the second: nothing retrained from step 0.
    assert _metric_steps(run_dir, first["run_id"]) == [1, 2, 3]
    _assert_both_ranks_saved(run_dir, "step00000003")


def _assert_both_ranks_saved(run_dir: Path, tag: str) -> None:
    """The checkpoint is complete (latest points at it) and holds each rank's optimizer partition."""
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == tag
    assert (checkpoints / tag / "plait_meta.json").is_file()
    for rank in range(NODES):
        assert list((checkpoints / tag).glob(f"*zero_pp_rank_{rank}_*optim_states.pt")), sorted(
            p.name for p in (checkpoints / tag).iterdir())


def _query(run_dir: Path, sql: str, *params: str) -> list[tuple]:
    """Rows of a read-only query on the run's MLflow SQLite store ([] while it does not exist yet)."""
    db = run_dir / "mlflow.db"
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.Error:
        return []


def _run_ids(run_dir: Path) -> list[str]:
    """Every MLflow run in the run directory's store."""
    return [row[0] for row in _query(run_dir, "select run_uuid from runs")]


def _metric_steps(run_dir: Path, run_id: str) -> list[int]:
    """The steps at which `run_id` logged its total loss, in order."""
    rows = _query(run_dir, "select step from metrics where run_uuid = ? and key = 'loss/total' order by step", run_id)
    return [row[0] for row in rows]


@pytest.mark.distributed
def test_multinode_sh_per_node_mode_trains_checkpoints_and_resumes(config: Path, tmp_path: Path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    cmd = [str(LAUNCH / "multinode.sh"), str(hostfile), str(config)]
    _train_and_resume(cmd, lambda node: {"NODE_RANK": str(node), "NUM_GPUS": "1"}, tmp_path)
    # Per-node mode uses each node's own environment: nothing is written for ssh.
    assert not (tmp_path / ".deepspeed_env").exists()


@pytest.mark.distributed
def test_torchrun_sh_two_nodes_trains_checkpoints_and_resumes(config: Path, tmp_path: Path):
    cmd = [str(LAUNCH / "torchrun.sh"), str(config)]
    _train_and_resume(cmd, lambda node: {"NNODES": "2", "NODE_RANK": str(node), "NPROC_PER_NODE": "1"}, tmp_path)


def _slurm_env(node: int) -> dict[str, str]:
    """What SLURM sets for the one task on `node` of a 2-node job (GPUS_PER_NODE is the job script's)."""
    return {"SLURM_JOB_NODELIST": "node0,node1", "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
            "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1"}


def _wait_until_logged(procs: list[subprocess.Popen], run_dir: Path, step: int) -> bool:
    """Wait until rank 0 has logged `step` (training is under way); False if a node exits or time runs out."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(proc.poll() is None for proc in procs):
        rows = _query(run_dir, "select max(step) from metrics")
        if rows and rows[0][0] is not None and rows[0][0] >= step:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.distributed
def test_slurm_node_sh_sigusr1_checkpoints_both_ranks_and_exits_75(config: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    cmd = [str(LAUNCH / "slurm_node.sh"), str(config), "--run-dir", str(run_dir), "--steps", "100000",
           "--set", "checkpoint.every=0"]
    procs = _start_nodes(cmd, _slurm_env, tmp_path)
    started = _wait_until_logged(procs, run_dir, 2)
    if started:
        # SLURM's warning signal before the time limit, to node 1's task only.
        os.kill(procs[1].pid, signal.SIGUSR1)
    else:
        _kill(procs)
    outputs = _finish(procs)
    logs = "\n\n".join(out[-4000:] for _, out in outputs)
    assert started, logs
    assert [code for code, _ in outputs] == [EXIT_PREEMPTED] * NODES, logs
    # Node 1's script handed the signal to its own rank only (not to node 0's, though it runs on the same
    # machine); rank 0 stopped too because the ranks agree on a preemption.
    assert "received SIGUSR1" in outputs[1][1] and "received SIGUSR1" not in outputs[0][1], logs
    assert (tmp_path / "hostfile.4242.node1").read_text() == "node0 slots=1\nnode1 slots=1\n"
    result = _result(outputs[0][1])
    assert result["world_size"] == 2 and 2 <= result["steps"] < 100000
    tag = f"step{result['steps']:08d}"
    assert result["checkpoint"] == str(run_dir / "checkpoints" / tag)
    _assert_both_ranks_saved(run_dir, tag)
