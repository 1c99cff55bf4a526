"""The `plait` command line as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from plait.trainer.cli import main

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


@pytest.mark.parametrize("command, usage", [(["train", "run.yaml"], "plait train"),
                                            (["shards", "index", "x"], "plait shards index"),
                                            (["bench", "plan"], "plait bench plan")])
def test_an_unknown_flag_prints_its_sub_commands_usage(command, usage, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main([*command, "--bogus"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"usage: {usage}" in err and "unrecognized arguments: --bogus" in err


def test_bad_counts_and_missing_shards_stop_with_exit_2_and_write_nothing(tmp_path) -> None:
    for flag in ("--nproc", "--steps"):
        proc = run_plait("train", "configs/quickstart.yaml", flag, "0", check=False)
        assert proc.returncode == 2 and f"argument {flag}: must be at least 1, got 0" in proc.stderr
        assert "usage: plait train" in proc.stderr
    proc = run_plait("shards", "index", str(tmp_path / "nonexistent"), check=False)
    assert proc.returncode == 2 and "no such shard" in proc.stderr and str(tmp_path / "nonexistent") in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no index or manifest beside the missing path


def test_train_without_a_terminal_prints_a_line_per_logged_window(demo_dir, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "tracking": {"log_every": 2}, "eval": {"every": 0},
        "data": {"shards": str(demo_dir), "workers": 0, "packing": {"max_tokens": 512},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256}}}))
    stderr = run_plait("train", str(config), "--steps", "5").stderr  # captured: not a terminal
    lines = [line for line in stderr.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    for line in lines:
        assert re.search(r"\| loss \d+\.\d{4} \| [\d,]+ tok/s \| [\d,.]+ samples/s \| \d+\.\d{3} s/step \| ETA "
                         r"\d+:\d\d:\d\d \| mem \d+\.\d\d GB$", line), line
    for row in ("precision", "fp32", "encoder tokens per step", "learning rate"):
        assert row in stderr


def test_a_model_that_cannot_be_downloaded_stops_with_one_line(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                      "model": {"llm": {"name_or_path": "no-such-org/no-such-model"}}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as on a cluster node without internet, and without waiting
    proc = subprocess.run([sys.executable, "-m", "plait.trainer", "train", str(config), "--steps", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "model.llm.name_or_path: cannot load 'no-such-org/no-such-model'" in errors[0]
