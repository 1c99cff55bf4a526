"""Shard indexing: per-shard manifests + dataset index, bad input recorded but never fatal."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from plait.data.indexer import index_dataset
from plait.data.manifest import INDEX_NAME, read_manifest
from plait.data.tar_scan import iter_samples

from conftest import run_plait


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _img2dataset_shards(out) -> None:
    """Shards laid out as img2dataset writes them (jpg + txt + json, its own NNNNN.parquet beside)."""
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=5, verbose=0) as sink:
        for n in range(10):
            key, i = f"{n // 5:05d}{n % 5:04d}", n % 5
            meta = {"key": key, "caption": f"photo {i}", "width": 40 + i, "height": 30, "status": "success"}
            sink.write({"__key__": key, "jpg": _jpeg(40 + i, 30, i), "txt": f"photo {i}", "json": json.dumps(meta)})
    for shard in range(2):
        (out / f"{shard:05d}.parquet").write_bytes(b"img2dataset's own file")


def test_img2dataset_layout(tmp_path) -> None:
    _img2dataset_shards(tmp_path)
    summary = index_dataset(str(tmp_path / "*.tar"), workers=1)
    assert (summary["samples"], summary["shards"], summary["bad"]) == (10, 2, 0)
    rows = read_manifest(tmp_path / "00000.tar.plait.parquet").to_pylist()
    assert [r["width"] for r in rows] == [40, 41, 42, 43, 44] and {r["height"] for r in rows} == {30}
    assert all(r["modality"] == "image" and r["caption_chars"] == 7 for r in rows)
    assert (tmp_path / "00000.parquet").read_bytes() == b"img2dataset's own file"


def test_offsets_are_byte_ranges_of_members(demo_dir) -> None:
    shard = sorted(demo_dir.glob("*.tar"))[1]
    data = shard.read_bytes()
    for row in read_manifest(str(shard) + ".plait.parquet").to_pylist():
        caption = data[row["txt_offset"]:row["txt_offset"] + row["txt_size"]].decode()
        assert str(json.loads(data[row["json_offset"]:row["json_offset"] + row["json_size"]])["digit"]) in caption
        fragment = data[row["sample_offset"]:row["sample_offset"] + row["sample_size"]]
        (sample,) = list(iter_samples(io.BytesIO(fragment), []))
        assert sample.key == row["key"] and sample.members[row["media_ext"]].size == row["media_size"]


def test_truncated_empty_and_corrupt_shards_are_reported(tmp_path, demo_dir) -> None:
    shards = sorted(demo_dir.glob("*.tar"))
    good = shards[0].read_bytes()
    (tmp_path / "a-good.tar").write_bytes(good)
    (tmp_path / "b-truncated.tar").write_bytes(good[: len(good) // 2 + 700])
    (tmp_path / "c-empty.tar").write_bytes(b"")
    corrupt = bytearray(shards[1].read_bytes())
    rows = read_manifest(str(shards[1]) + ".plait.parquet").to_pylist()
    victim = rows[4]
    corrupt[victim["media_offset"]:victim["media_offset"] + 64] = b"\x00" * 64
    (tmp_path / "d-corrupt-member.tar").write_bytes(bytes(corrupt))
    broken_header = bytearray(shards[2].read_bytes())
    hdr = read_manifest(str(shards[2]) + ".plait.parquet").to_pylist()[3]["sample_offset"]
    broken_header[hdr:hdr + 100] = b"\xff" * 100
    (tmp_path / "e-bad-header.tar").write_bytes(bytes(broken_header))

    proc = run_plait("shards", "index", str(tmp_path))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    index = {r["shard"]: r for r in pq.read_table(tmp_path / INDEX_NAME).to_pylist()}
    assert index["a-good.tar"]["status"] == "ok" and index["a-good.tar"]["ok"] == 20
    assert "truncated" in index["b-truncated.tar"]["status"] and index["b-truncated.tar"]["ok"] >= 5
    assert "empty" in index["c-empty.tar"]["status"] and index["c-empty.tar"]["samples"] == 0
    corrupt_rows = read_manifest(tmp_path / "d-corrupt-member.tar.plait.parquet").to_pylist()
    bad = [r for r in corrupt_rows if r["status"] != "ok"]
    assert [r["key"] for r in bad] == [victim["key"]] and "unreadable" in bad[0]["status"]
    assert index["d-corrupt-member.tar"]["ok"] == 19
    assert "corrupt tar data" in index["e-bad-header.tar"]["status"]
    assert index["e-bad-header.tar"]["ok"] >= 18, "samples after a corrupt header must still be indexed"
    assert summary["shards"] == 5 and summary["bad_shards"] == 3 and summary["bad"] >= 2


def test_pipe_shards_index_like_paths(tmp_path, demo_dir) -> None:
    shard = sorted(demo_dir.glob("*.tar"))[0]
    shutil.copy(shard, tmp_path / "x.tar")
    summary = index_dataset(f"pipe:cat {tmp_path / 'x.tar'}", out=tmp_path / "m", workers=1)
    assert summary["samples"] == 20 and summary["bad"] == 0
    piped = pq.read_table(next((tmp_path / "m").glob("*.plait.parquet"))).to_pylist()
    direct = read_manifest(str(shard) + ".plait.parquet").to_pylist()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "shard"} for r in rows]  # noqa: E731
    assert strip(piped) == strip(direct)


@pytest.mark.parametrize("command, status", [
    ("false", r"^unreadable: pipe:false exited 1$"),
    ("no-such-command-here", r"^unreadable: pipe:no-such-command-here exited 127: .*no-such-command-here.*not found"),
    ("head -c 30000 {shard}; echo disk quota exceeded >&2; exit 3", r"exited 3: disk quota exceeded$"),
])
def test_failing_pipes_are_bad_shards_with_their_exit_code(tmp_path, demo_dir, command, status) -> None:
    shard = sorted(demo_dir.glob("*.tar"))[0]
    good = f"pipe:cat {shard}"
    summary = index_dataset(f"{good}::pipe:{command.format(shard=shard)}", out=tmp_path / "m", workers=1)
    assert (summary["shards"], summary["bad_shards"], summary["samples"]) == (2, 1, 20)
    rows = pq.read_table(tmp_path / "m" / INDEX_NAME).to_pylist()
    assert rows[0]["status"] == "ok"
    assert re.search(status, rows[1]["status"]) and rows[1]["samples"] == 0
    proc = run_plait("shards", "index", f"pipe:{command.format(shard=shard)}", "--out", str(tmp_path / "cli"))
    assert json.loads(proc.stdout.strip().splitlines()[-1])["bad_shards"] == 1 and "Traceback" not in proc.stderr
