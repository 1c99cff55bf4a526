"""`plait shards build` from a media folder and from JSONL/CSV/Parquet tables."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from plait.data.manifest import read_manifest

from conftest import run_plait


def _media(demo_dir) -> dict[str, bytes]:
    """One jpg, one flac and one mp4 taken from the demo shards."""
    found: dict[str, bytes] = {}
    with tarfile.open(sorted(demo_dir.glob("*.tar"))[0]) as tar:
        for info in tar:
            ext = info.name.split(".", 1)[1]
            if ext in ("jpg", "flac", "mp4") and ext not in found:
                found[ext] = tar.extractfile(info).read()
    return found


def test_folder_with_captions(tmp_path, demo_dir) -> None:
    src = tmp_path / "src" / "nested"
    src.mkdir(parents=True)
    for ext, data in _media(demo_dir).items():
        (src / f"clip.{ext}").write_bytes(data) if ext != "jpg" else (src / "photo.jpeg").write_bytes(data)
    (src / "photo.txt").write_text("a photo\n")
    (src / "photo.json").write_text(json.dumps({"group": "g1"}))
    (src / "clip.txt").write_text("a clip")
    (src / "orphan.png").write_bytes(b"no caption beside me")
    proc = run_plait("shards", "build", "--input", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                     "--samples-per-shard", "2")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["written"] == 3 and result["skipped"] == 1 and result["shards"] == 2 and result["bad"] == 0
    assert "orphan.png" in result["skip_reasons"][0]
    rows = [r for p in sorted((tmp_path / "out").glob("*.plait.parquet")) for r in read_manifest(p).to_pylist()]
    by_modality = {r["modality"]: r for r in rows}
    assert set(by_modality) == {"image", "audio", "video"}
    assert by_modality["image"]["media_ext"] == "jpg" and by_modality["image"]["group"] == "g1"
    assert by_modality["audio"]["key"].startswith("nested_clip")


def test_tables_with_paths_and_bytes(tmp_path, demo_dir) -> None:
    media = _media(demo_dir)
    (tmp_path / "a.flac").write_bytes(media["flac"])
    (tmp_path / "table.jsonl").write_text(
        json.dumps({"id": "x1", "path": "a.flac", "caption": "a tone", "group": "tones"}) + "\n"
        + json.dumps({"id": "x2", "path": "missing.flac", "caption": "lost"}) + "\n")
    (tmp_path / "table.csv").write_text("file,text\na.flac,a tone again\n")
    pq.write_table(pa.table({"bytes": [media["jpg"], media["mp4"], b"junk"], "caption": ["img", "vid", "bad"]}),
                   tmp_path / "table.parquet")
    expected = {"table.jsonl": (1, 1), "table.csv": (1, 0), "table.parquet": (2, 1)}
    for name, (written, skipped) in expected.items():
        out = tmp_path / f"out-{name}"
        result = json.loads(run_plait("shards", "build", "--input", str(tmp_path / name), "--out", str(out))
                            .stdout.strip().splitlines()[-1])
        assert (result["written"], result["skipped"], result["bad"]) == (written, skipped, 0), name
    rows = read_manifest(tmp_path / "out-table.jsonl" / "shard-000000.tar.plait.parquet").to_pylist()
    assert rows[0]["key"] == "x1" and rows[0]["group"] == "tones" and rows[0]["modality"] == "audio"


def test_table_without_caption_column_is_an_error(tmp_path) -> None:
    (tmp_path / "t.csv").write_text("path,label\na.jpg,3\n")
    proc = run_plait("shards", "build", "--input", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"),
                     check=False)
    assert proc.returncode == 2 and "t.csv" in proc.stderr and "caption" in proc.stderr
