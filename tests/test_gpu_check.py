"""`make gpu-check` (launch/gpu_check.py) on a CPU machine: it refuses at once, and every part that needs no GPU
works: the one-GPU overrides of the ~1B example, the in-process training run, and the JSON line assembled
from that run's MLflow metrics."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from plait.trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)

STEPS = 4
PEAK_TFLOPS = 0.01
"""A CPU has no row in the peak table: the run is given one, so it logs an MFU."""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_make_gpu_check_refuses_without_cuda_fast_and_clearly() -> None:
    started = time.perf_counter()
    # -o: never (re)install from the test; the target runs as a user's `make gpu-check` would.
    proc = subprocess.run(["make", "-s", "-o", ".install-stamp", "gpu-check", f"PYTHON={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU here" in proc.stderr and "nothing was run" in proc.stderr
    assert proc.stdout == ""
    assert time.perf_counter() - started < 60
    direct = subprocess.run([sys.executable, str(REPO / "launch" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=120)
    assert direct.returncode == gpu_check.EXIT_NOT_RUN and direct.stdout == ""


def test_one_gpu_overrides_scale_the_1b_example_to_a_short_demo_run(tmp_path: Path) -> None:
    overrides = gpu_check.one_gpu_overrides(tmp_path / "run", 50, 989.0)
    cfg = load_config(gpu_check.EXAMPLE, overrides)  # from any directory: the DeepSpeed JSON path is absolute
    example = yaml.safe_load(gpu_check.EXAMPLE.read_text())
    assert cfg.steps == 50 and cfg.run_dir == str(tmp_path / "run") and cfg.data.shards == ""
    assert cfg.tracking.log_every == gpu_check.LOG_EVERY and cfg.tracking.peak_tflops == 989.0
    assert cfg.checkpoint.every == 0 and cfg.model.attention_backend == "auto"
    assert cfg.deepspeed.stage == example["deepspeed"]["zero_stage"] and cfg.deepspeed.precision == "bf16"
    assert cfg.model.llm.model_kwargs == example["model"]["llm"]["model_kwargs"]
    assert cfg.model.encoder.dim == example["model"]["encoder"]["dim"]
    assert load_config(gpu_check.EXAMPLE, gpu_check.one_gpu_overrides(tmp_path, 5, None)).tracking.peak_tflops is None


@pytest.fixture(scope="module")
def cpu_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict | None, Path]:
    """A tiny real run through `gpu_check.train` (DeepSpeed, gloo, MLflow in SQLite), metrics every step."""
    run_dir = tmp_path_factory.mktemp("gpu-check") / "run"
    config = run_dir.parent / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "run_dir": str(run_dir),
        "data": {"shards": str(demo_dir), "workers": 1, "packing": {"max_tokens": 512},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256}},
        "curriculum": {"phases": [{"start": 0, "values": {"resolution": {32: 1.0}}}]},
        "eval": {"every": 0, "max_samples": 12}}))
    overrides = [f"steps={STEPS}", "tracking.log_every=1", f"tracking.peak_tflops={PEAK_TFLOPS}"]
    saved = dict(os.environ)  # the one-rank process group's variables must not leak into later tests
    try:
        code, result = gpu_check.train(config, overrides)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, result, run_dir


def _logged(run_dir: Path, key: str) -> list[tuple[int, int, float]]:
    """(step, timestamp, value) rows of one metric, read from the run's SQLite store directly."""
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return db.execute("select step, timestamp, value from metrics where key = ? order by step", (key,)).fetchall()


@pytest.mark.slow
def test_training_in_process_returns_the_result_line(cpu_run) -> None:
    code, result, run_dir = cpu_run
    assert code == 0 and result is not None
    assert result["steps"] == STEPS and result["world_size"] == 1
    assert result["tracking_uri"].endswith(f"{run_dir}/mlflow.db")


@pytest.mark.slow
def test_the_json_line_holds_the_run_figures_after_the_warmup_window(cpu_run) -> None:
    code, result, run_dir = cpu_run
    keys = ("throughput/tokens_per_s", "throughput/mfu")
    history = gpu_check.metric_history(result["tracking_uri"], result["run_id"], keys)
    checks = {"device": "cpu", "check/attention.bucketed": "passed", "check/moe.triton": "skipped: needs CUDA"}
    syncs = gpu_check.Counter({"trainer/train.py:1": 2 * STEPS, "trainer/engine.py:2": STEPS})
    line = gpu_check.summary(checks, code, result, history, {"peak_memory_gib": 1.5}, syncs)

    tokens, mfu = _logged(run_dir, keys[0]), _logged(run_dir, keys[1])
    assert [step for step, _, _ in tokens] == list(range(1, STEPS + 1))
    after_warmup = [value for step, _, value in tokens if step > 1]
    assert line["tokens_per_s"] == pytest.approx(sum(after_warmup) / len(after_warmup))
    assert line["windows"] == STEPS - 1
    assert line["mfu"] == pytest.approx(sum(v for s, _, v in mfu if s > 1) / (STEPS - 1)) and line["mfu"] > 0
    assert line["step_time_s"] == pytest.approx((tokens[-1][1] - tokens[0][1]) / 1e3 / (STEPS - 1))
    assert line["step_time_s"] > 0
    assert line["passed"] and line["checks_passed"] and line["checks"]["moe.triton"] == "skipped: needs CUDA"
    assert line["peak_memory_gib"] == 1.5 and line["steps"] == STEPS and line["loss"] == result["loss"]
    assert line["host_syncs"] == 3 * STEPS and line["host_sync_sites"] == dict(syncs)
    assert line["run"]["run_id"] == result["run_id"]

    failed = gpu_check.summary({**checks, "check/infonce.torch": "failed"}, code, result, history, {}, syncs)
    assert not failed["passed"] and not failed["checks_passed"]
    crashed = gpu_check.summary(checks, 1, None, {}, {}, gpu_check.Counter())
    assert not crashed["passed"] and crashed["tokens_per_s"] is None and crashed["step_time_s"] is None


def test_a_run_that_raises_still_gives_the_check_an_exit_code(tmp_path: Path) -> None:
    code, result = gpu_check.train(tmp_path / "missing.yaml", [])
    assert code == gpu_check.EXIT_FAILED and result is None


def _warn(message: str) -> int:
    """Issue `message` as torch's sync debug mode would (a UserWarning); returns the line it is attributed to."""
    warnings.warn(message, UserWarning, stacklevel=1)
    return sys._getframe().f_lineno - 1


def test_sync_sites_count_only_host_sync_warnings_by_repository_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lines = [_warn(f"{gpu_check.SYNC_MESSAGE} (Triggered internally at CUDAFunctions.cpp:1)") for _ in range(3)]
        _warn("some other warning")
    sites = gpu_check.sync_sites(caught)
    assert sites == {f"tests/test_gpu_check.py:{lines[0]}": 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode needs CUDA")
def test_counted_host_syncs_finds_item_calls_on_cuda() -> None:
    x = torch.ones(4, device="cuda")
    with gpu_check.counted_host_syncs() as sites:
        for _ in range(3):
            x.sum().item()
    assert sum(sites.values()) >= 3 and any(site.startswith("tests/test_gpu_check.py:") for site in sites)
    assert torch.cuda.get_sync_debug_mode() == 0
