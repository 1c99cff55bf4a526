"""The `plait` command line as a user runs it."""

from __future__ import annotations

import json

from conftest import run_plait


def test_bench_list_and_index_bench(demo_dir) -> None:
    listing = run_plait("bench", "--help").stdout
    for name in ("index", "packing", "contrastive"):
        assert name in listing
    result = json.loads(run_plait("bench", "index", str(demo_dir), "--workers", "1").stdout.strip().splitlines()[-1])
    assert result["samples"] == 60 and result["samples_per_s"] > 0


def test_unknown_command_is_a_usage_error() -> None:
    proc = run_plait("no-such-command", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bad_counts_and_missing_shards_stop_with_exit_2_and_write_nothing(tmp_path) -> None:
    for flag in ("--nproc", "--steps"):
        proc = run_plait("train", "configs/quickstart.yaml", flag, "0", check=False)
        assert proc.returncode == 2 and f"argument {flag}: must be at least 1, got 0" in proc.stderr
        assert "usage: plait train" in proc.stderr
    proc = run_plait("shards", "index", str(tmp_path / "nonexistent"), check=False)
    assert proc.returncode == 2 and "no such shard" in proc.stderr and str(tmp_path / "nonexistent") in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no index or manifest beside the missing path
