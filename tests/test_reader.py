"""Reader: byte-range and streamed reads of planned samples, against tarfile's own reading of the shard."""

from __future__ import annotations

import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from plait.data.plan_types import SampleRef
from plait.data.reader import check_shards, coalesce, fetch_samples, missing_shards, read_local, read_shard
from plait.data.remote import ShardCache
from plait.data.sizing import SampleGrid
from plait.trainer.bench.loader import manifest_rows

GRID = SampleGrid(modality=0, t=1, h=2, w=2, frames=1, start_s=0.0, span_s=0.0, num_kept=4)


def refs_of(rows: list[dict], shard: str | None = None) -> list[SampleRef]:
    return [SampleRef(shard=shard or row["shard"], key=row["key"], modality=row["modality"], group=row["group"],
                      sample_offset=row["sample_offset"], sample_size=row["sample_size"], grid=GRID, drop_seed=0,
                      augment_seed=0) for row in rows]


def tar_members(path: str) -> dict[str, dict[str, bytes]]:
    """Reference: every member of a shard by key and extension, read with tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


@pytest.fixture(scope="module")
def shard_rows(demo_dir: Path) -> list[dict]:
    rows = manifest_rows(demo_dir)
    first = rows[0]["shard"]
    return [row for row in rows if row["shard"] == first]


def members_of(fetched) -> list[dict[str, bytes]]:
    return [{ext: m.data for ext, m in f.sample.members.items()} for f in fetched]


def test_coalesce_merges_close_ranges_only():
    ranges = [(1000, 100), (0, 100), (150, 50), (5000, 10)]
    assert coalesce(ranges, 50) == [(0, 200, [1, 2]), (1000, 1100, [0]), (5000, 5010, [3])]
    assert coalesce(ranges, 10_000) == [(0, 5010, [1, 2, 0, 3])]
    assert coalesce(ranges, 0) == [(0, 100, [1]), (150, 200, [2]), (1000, 1100, [0]), (5000, 5010, [3])]


@pytest.mark.parametrize("gap", [0, 1 << 20])
def test_fetch_returns_each_planned_sample_in_plan_order(shard_rows, gap):
    refs = refs_of(shard_rows)
    order = refs[::-2] + refs[::2]  # out of offset order, one sample twice
    fetched = fetch_samples(order, gap)
    assert [f.ref.key for f in fetched] == [r.key for r in order]
    assert all(f.reason == "" for f in fetched)
    reference = tar_members(shard_rows[0]["shard"])
    assert members_of(fetched) == [reference[r.key] for r in order]


def test_pipe_reads_the_same_samples_as_the_path(shard_rows, tmp_path):
    path = shard_rows[0]["shard"]
    refs = refs_of(shard_rows)[1::3]
    cache = ShardCache(str(tmp_path / "cache"))
    by_path = fetch_samples(refs)
    by_pipe = fetch_samples([replace(r, shard=f"pipe:cat {path}") for r in refs], cache=cache)
    assert all(f.reason == "" for f in by_pipe)
    assert members_of(by_pipe) == members_of(by_path)
    ranges = [(r.sample_offset, r.sample_size) for r in refs]
    assert read_shard(f"pipe:cat {path}", ranges, cache=cache) == read_local(path, ranges)


def test_a_pipe_runs_once_however_often_its_shard_is_read(shard_rows, tmp_path):
    path, runs = shard_rows[0]["shard"], tmp_path / "runs"
    shard = f"pipe:echo run >> {runs}; cat {path}"
    cache = ShardCache(str(tmp_path / "cache"))
    refs = refs_of(shard_rows, shard)
    for batch in (refs[:2], refs[2:5], refs[:1]):
        assert [f.reason for f in fetch_samples(batch, cache=cache)] == [""] * len(batch)
    assert runs.read_text().splitlines() == ["run"]


def test_the_shard_cache_keeps_the_most_recent_copies_within_its_size(shard_rows, tmp_path):
    path = shard_rows[0]["shard"]
    size = Path(path).stat().st_size
    cache = ShardCache(str(tmp_path / "cache"), max_bytes=2 * size)
    copies = [cache.local_copy(f"pipe:cat {path} # {i}") for i in range(3)]
    assert [Path(c).exists() for c in copies] == [False, True, True]
    assert cache.cached(f"pipe:cat {path} # 0") is None
    assert Path(copies[2]).read_bytes() == Path(path).read_bytes()


def test_corrupt_header_in_the_middle_costs_only_that_sample(shard_rows, tmp_path):
    bad = str(tmp_path / "bad.tar")
    shutil.copy(shard_rows[0]["shard"], bad)
    victim = shard_rows[len(shard_rows) // 2]
    with open(bad, "r+b") as f:
        f.seek(victim["sample_offset"])
        f.write(b"\x5a" * 512)  # the sample's first header block becomes garbage
    for shard in (bad, f"pipe:cat {bad}"):
        fetched = fetch_samples(refs_of(shard_rows, shard), cache=ShardCache(str(tmp_path / "cache")))
        reasons = {f.ref.key: f.reason for f in fetched}
        assert reasons.pop(victim["key"]) == "corrupt"
        assert set(reasons.values()) == {""}
        reference = tar_members(shard_rows[0]["shard"])
        assert all(members_of([f])[0] == reference[f.ref.key] for f in fetched if not f.reason)


def test_truncated_shard_marks_the_cut_samples_truncated(shard_rows, tmp_path):
    cut = str(tmp_path / "cut.tar")
    data = Path(shard_rows[0]["shard"]).read_bytes()
    middle = shard_rows[len(shard_rows) // 2]
    Path(cut).write_bytes(data[: middle["sample_offset"] + middle["sample_size"] // 2])
    for shard in (cut, f"pipe:cat {cut}"):
        fetched = fetch_samples(refs_of(shard_rows, shard), cache=ShardCache(str(tmp_path / "cache")))
        position = len(shard_rows) // 2
        assert [f.reason for f in fetched[:position]] == [""] * position
        assert {f.reason for f in fetched[position:]} == {"truncated"}


def test_stale_offsets_and_missing_shards_are_reasons_not_crashes(shard_rows, tmp_path):
    refs = refs_of(shard_rows)
    moved = replace(refs[0], sample_offset=refs[1].sample_offset, sample_size=refs[1].sample_size)
    gone = replace(refs[2], shard=str(tmp_path / "gone.tar"))
    failing_pipe = replace(refs[3], shard=f"pipe:cat {tmp_path / 'gone.tar'}")
    fetched = fetch_samples([moved, gone, failing_pipe, refs[4]], cache=ShardCache(str(tmp_path / "cache")))
    assert [f.reason for f in fetched] == ["corrupt", "unreadable", "unreadable", ""]
    assert list((tmp_path / "cache").glob("*.tar")) == []  # the failed copy left nothing behind
    assert str(tmp_path / "gone.tar") in fetched[1].detail


def test_oversized_samples_are_not_read(shard_rows):
    refs = refs_of(shard_rows)[:3]
    limit = sorted(r.sample_size for r in refs)[1]
    fetched = fetch_samples(refs, max_bytes=limit)
    assert [f.reason for f in fetched] == ["oversized" if r.sample_size > limit else "" for r in refs]
    assert {f.reason for f in fetched} == {"", "oversized"}


def test_missing_shards_fail_at_start(shard_rows, tmp_path):
    present = shard_rows[0]["shard"]
    absent = str(tmp_path / "absent-000.tar")
    assert missing_shards([present, absent, "pipe:cat whatever", absent]) == [absent]
    check_shards([present, "pipe:cat whatever"])
    with pytest.raises(FileNotFoundError, match="absent-000.tar"):
        check_shards([present, absent])
