"""`plait bench gpu` on a CPU machine: GPU parts reported as skipped, CPU-checkable parts as passed."""

from __future__ import annotations

import argparse
import json
import time

import pytest
import torch
from conftest import run_plait

from plait.trainer.bench import gpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of the GPU bench")

CPU_CHECKABLE = ("attention.bucketed", "moe.torch", "infonce.torch", "fused")
GPU_ONLY = ("attention.flash", "attention.torch_varlen", "moe.triton", "infonce.triton")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_reports_gpu_parts_skipped_and_prints_table_last():
    proc = run_plait("bench", "gpu", "--small")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu"
    for name in CPU_CHECKABLE:
        assert result[f"check/{name}"] == "passed", name
    for name in GPU_ONLY:
        assert result[f"check/{name}"].startswith("skipped: needs CUDA"), name
    for name in ("attention", "moe", "infonce", "train_step"):
        assert result[f"time/{name}"].startswith("skipped: needs CUDA"), name
    # The table is the last thing on the console, after every log line.
    assert "plait bench gpu (cpu" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("└")


def test_cpu_timings_run_every_section_end_to_end():
    result = gpu.run(_args("--small", "--cpu-timings", "--repeats", "1", "--peak-tflops", "0.5"))
    for name in ("attention", "moe", "infonce", "train_step"):
        assert result[f"time/{name}"] == "passed", name
    assert result["attention_path"] == "bucketed"
    assert result["train_step_ms"] > 0 and result["train_model_tflops_per_s"] > 0
    # A CPU has no row in the peak table: the given peak makes its MFU.
    assert result["mfu"] == pytest.approx(result["train_model_tflops_per_s"] / 0.5)
    assert result["train_params"] > 1_000_000
    assert "moe_triton_ms" not in result


def test_checks_only_skips_every_timing():
    result = gpu.run(_args("--small", "--cpu-timings", "--checks-only"))
    for name in CPU_CHECKABLE:
        assert result[f"check/{name}"] == "passed", name
    for name in ("attention", "moe", "infonce", "train_step"):
        assert result[f"time/{name}"] == "skipped: --checks-only", name
    assert "train_step_ms" not in result


def test_sections_fail_or_time_out_without_losing_the_run():
    args = _args("--section-timeout-s", "0.2")
    started = time.perf_counter()

    def broken() -> tuple[str, str]:
        raise RuntimeError("kernel exploded")

    def hangs() -> tuple[str, str]:
        time.sleep(5)
        return "passed", ""

    assert gpu._guarded("broken", broken, args, started) == ("failed: RuntimeError", "kernel exploded")
    status, _ = gpu._guarded("hangs", hangs, args, started)
    assert status == "failed: SectionTimeout" and time.perf_counter() - started < 2
    spent = _args("--budget-s", "0")
    assert gpu._guarded("late", hangs, spent, started) == ("skipped: time budget spent", "")


def test_billion_config_is_about_one_billion_parameters():
    cfg = gpu.billion_config()
    with torch.device("meta"):
        model = gpu.MultimodalModel(cfg, gpu.SizingConfig())
    total = gpu.parameter_counts(model).total
    assert 0.9e9 < total < 1.3e9
