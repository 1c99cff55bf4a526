"""Shared fixtures: real demo shards written once per test session."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Triton reads this once, when first imported (any test module may import it first): the kernel tests
# run Triton on CPU tensors, which only its interpreter can do.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from plait.data.batch import PackedStream  # noqa: E402
from plait.data.demo import DemoSpec, write_demo  # noqa: E402
from plait.data.indexer import index_dataset  # noqa: E402

# Processes the tests start (CLI runs, ranks) share 2 cores: one thread each keeps them from thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 indexed demo samples (20 per modality) in 3 shards."""
    out = tmp_path_factory.mktemp("demo")
    write_demo(out, DemoSpec(samples=60, samples_per_shard=20))
    index_dataset(str(out), workers=1)
    return out


RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What an in-process group sets; left behind, the CLI runs a test starts would join that group's port."""


@pytest.fixture(autouse=True)
def _rank_env_undone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A process group a test makes in this process ends with it, and so do the rank variables it set."""
    for name in RANK_ENV:
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    yield
    if torch.distributed.is_initialized():
        import deepspeed

        deepspeed.comm.destroy_process_group()


def run_plait(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the `plait` CLI in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "plait.trainer", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"plait {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def logged_losses(run_dir: Path) -> dict[int, float]:
    """The total loss per step a run logged to its local MLflow store."""
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return dict(db.execute("select step, value from metrics where key = 'loss/total' order by step"))


def unpack_stream(stream: PackedStream, num_samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch position, the (patches, coords) rows of that sample (empty for samples not in the stream)."""
    real = stream.num_tokens
    counts = torch.bincount(stream.seg[:real], minlength=num_samples).tolist()
    return list(zip(torch.split(stream.patches[:real], counts), torch.split(stream.coords[:real], counts)))
