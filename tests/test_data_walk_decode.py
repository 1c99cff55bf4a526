"""`plait data walk --decode`: the planned samples are really read and decoded; bad ones are counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from plait.data.manifest import read_manifest

from conftest import run_plait


def test_walk_decode_counts_a_sample_corrupted_after_indexing(demo_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "shards"
    shutil.copytree(demo_dir, data)
    shard = sorted(data.glob("*.tar"))[0]
    victim = next(r for r in read_manifest(str(shard) + ".plait.parquet").to_pylist() if r["modality"] == "image")
    blob = bytearray(shard.read_bytes())
    blob[victim["media_offset"]:victim["media_offset"] + victim["media_size"]] = b"\x00" * victim["media_size"]
    shard.write_bytes(bytes(blob))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'run'}\n"
        f"data: {{shards: {data}, plan: {{eval_fraction: 0.0}}, sizing: {{patch_size: 8, max_side_patches: 16}},"
        " packing: {max_tokens: 4096}}\n"
        "curriculum: {phases: [{start: 0, values: {resolution: {32: 1.0}}}]}\n")
    proc = run_plait("data", "walk", str(config), "--world-size", "1", "--epochs", "1", "--decode")
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    steps, summary = lines[:-1], lines[-1]
    keys = [k for step in steps for k in step["keys"]]
    assert victim["key"] in keys and summary["samples"] == 60
    skipped = [step["skipped"] for step in steps if step["skipped"]]
    assert skipped == [{"undecodable": 1}], skipped
