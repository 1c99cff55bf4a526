"""MFU's peak FLOP/s: the table of known accelerators by the names torch reports, the `tracking.peak_tflops`
override and its validation, and the progress line that shows MFU whenever the metrics carry it."""

from __future__ import annotations

import re

import pytest
import torch

from plait.trainer.config import ConfigError, load_config
from plait.trainer.step_metrics import PEAK_TFLOPS, device_peak_flops, peak_tflops_of
from plait.trainer.train_console import progress_text

ISSUE_PEAKS = {"A100": 312.0, "H100 SXM": 989.0, "H200": 989.0, "B200": 2250.0, "MI300X": 1307.0}
"""Dense bf16 TFLOP/s the issue asks for, by accelerator."""

DEVICE_NAMES = [
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H200", "H200"),
    ("NVIDIA B200", "B200"),
    ("AMD Instinct MI300X", "MI300X"),
    ("AMD Instinct MI300X VF", "MI300X"),
]
"""Strings `torch.cuda.get_device_name()` returns on those accelerators (CUDA and ROCm builds)."""


@pytest.mark.parametrize(("name", "accelerator"), DEVICE_NAMES, ids=[n for n, _ in DEVICE_NAMES])
def test_known_accelerators_get_their_dense_bf16_peak(name: str, accelerator: str) -> None:
    assert peak_tflops_of(name) == ISSUE_PEAKS[accelerator]


def test_variants_with_other_clocks_or_other_chips_are_not_taken_for_the_sxm_part() -> None:
    sxm = peak_tflops_of("NVIDIA H100 80GB HBM3")
    assert peak_tflops_of("NVIDIA H100 PCIe") < sxm
    assert peak_tflops_of("NVIDIA H100 NVL") < sxm
    assert peak_tflops_of("NVIDIA H200 NVL") < peak_tflops_of("NVIDIA H200")
    assert peak_tflops_of("NVIDIA L4") < peak_tflops_of("NVIDIA L40S")
    # GB200 is not a B200 at another name: no row claims it, so it reports no MFU rather than a wrong one.
    assert peak_tflops_of("NVIDIA GB200") is None
    assert peak_tflops_of("NVIDIA GeForce RTX 4090") is None
    assert peak_tflops_of("cpu") is None


def test_every_row_is_the_first_match_of_a_name_built_from_it() -> None:
    """A row shadowed by an earlier, broader row would never be used."""
    for index, (pattern, peak) in enumerate(PEAK_TFLOPS):
        name = "NVIDIA " + pattern.replace("\\b", "").replace(".*", " ")
        first = next(i for i, (p, _) in enumerate(PEAK_TFLOPS) if re.search(p, name, re.IGNORECASE))
        assert first == index, (pattern, name)
        assert peak_tflops_of(name) == peak


def test_device_peak_flops_reads_the_cuda_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops() == ISSUE_PEAKS["H100 SXM"] * 1e12
    assert device_peak_flops(500.0) == 500.0 * 1e12  # the override wins over the table
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    assert device_peak_flops() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case")
def test_a_cpu_has_no_peak_unless_one_is_given() -> None:
    assert device_peak_flops() is None
    assert device_peak_flops(0.25) == 0.25e12


def test_peak_tflops_config_field() -> None:
    assert load_config(None).tracking.peak_tflops is None
    assert load_config(None, ["tracking.peak_tflops=989"]).tracking.peak_tflops == 989.0
    for bad in ("0", "-3", ".nan", ".inf"):
        with pytest.raises(ConfigError, match="tracking.peak_tflops: must be a positive number"):
            load_config(None, [f"tracking.peak_tflops={bad}"])
    with pytest.raises(ConfigError, match="tracking.peak_tflops"):
        load_config(None, ["tracking.peak_tflops=fast"])


def test_progress_line_shows_mfu_whenever_the_metrics_carry_it() -> None:
    logged = {"loss/total": 2.5, "throughput/tokens_per_s": 12345.0}
    assert progress_text({**logged, "throughput/mfu": 0.4123}) == "loss 2.5000 | 12,345 tok/s | MFU 41.2%"
    without = progress_text(logged)
    assert "MFU" not in without and "12,345 tok/s" in without
