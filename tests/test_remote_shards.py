"""Remote shards: an HTTP server on 127.0.0.1 (with and without range requests) and `pipe:` commands give the
same samples, indexes and training losses as the local files, each streamed shard read once."""

from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from plait.data.config import DataConfig
from plait.data.dataset_index import DatasetIndex
from plait.data.indexer import index_dataset
from plait.data.manifest import INDEX_NAME
from plait.data.reader import check_shards, fetch_samples
from plait.data.remote import ShardCache
from plait.trainer.bench.loader import manifest_rows

from conftest import logged_losses, run_plait
from test_reader import members_of, refs_of

SHARDS = "demo-{000000..000002}.tar"


class ShardHandler(SimpleHTTPRequestHandler):
    """Serves a folder; answers `Range: bytes=a-b` with 206 when `ranges` is on, and records every request."""

    ranges = True
    log: list[tuple[str, str, int]]

    def do_GET(self) -> None:
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not (self.ranges and wanted and path.is_file()):
            self.log.append((self.path, self.headers.get("Range", ""), 200))
            return super().do_GET()
        data = path.read_bytes()
        start = int(wanted[1])
        end = min(int(wanted[2]) + 1 if wanted[2] else len(data), len(data))
        self.log.append((self.path, self.headers["Range"], 206))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data[start:end])

    def end_headers(self) -> None:
        if not self.ranges:
            self.send_header("Accept-Ranges", "none")
        super().end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet: requests are recorded in `log`."""


@contextmanager
def serving(folder: Path, ranges: bool) -> Iterator[tuple[str, list, bool]]:
    """(base URL, request log, whether it serves ranges) of a server on 127.0.0.1 serving `folder`."""
    log: list[tuple[str, str, int]] = []
    handler = type("Handler", (ShardHandler,), {"ranges": ranges, "log": log})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", log, ranges
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module", params=[True, False], ids=["ranges", "no-ranges"])
def server(request: pytest.FixtureRequest, demo_dir: Path) -> Iterator[tuple[str, list, bool]]:
    with serving(demo_dir, request.param) as served:
        yield served


def test_http_shards_read_the_same_samples_as_the_files(server, demo_dir: Path, tmp_path: Path) -> None:
    base, log, ranges = server
    rows = manifest_rows(demo_dir)
    refs = refs_of(rows)[::2]
    remote = [replace(r, shard=f"{base}/{Path(r.shard).name}") for r in refs]
    cache = ShardCache(str(tmp_path / "cache"))
    log.clear()
    batches = [remote[i: i + 4] for i in range(0, len(remote), 4)]
    fetched = [f for batch in batches for f in fetch_samples(batch, cache=cache)]
    assert [f.reason for f in fetched] == [""] * len(refs)
    assert members_of(fetched) == members_of(fetch_samples(refs))
    statuses = {status for _, _, status in log}
    copies = sorted((tmp_path / "cache").glob("*.tar"))
    if ranges:
        assert statuses == {206} and len(log) >= len(batches) and copies == []
    else:  # the server ignores ranges: every shard is copied once, then only read locally
        assert statuses == {200} and len(copies) == len({r.shard for r in refs})
        log.clear()
        assert members_of(fetch_samples(remote, cache=cache)) == members_of(fetch_samples(refs))
        assert log == []


def test_http_shards_index_like_the_files(server, demo_dir: Path, tmp_path: Path) -> None:
    base, _, _ = server
    summary = index_dataset(f"{base}/{SHARDS}", out=tmp_path / "index", workers=1)
    assert summary["shards"] == 3 and summary["samples"] == 60 and summary["bad"] == 0
    for shard in sorted(demo_dir.glob("*.tar")):
        remote = pq.read_table(tmp_path / "index" / f"{shard.name}.plait.parquet").to_pylist()
        local = pq.read_table(f"{shard}.plait.parquet").to_pylist()
        assert [r.pop("shard") for r in remote] == [f"{base}/{shard.name}"] * len(local)
        assert remote == [{k: v for k, v in r.items() if k != "shard"} for r in local]
    index = DatasetIndex.from_spec(f"{base}/{SHARDS}", index=str(tmp_path / "index"))
    assert index.shard_url(0) == f"{base}/demo-000000.tar"


def test_remote_specs_need_an_index_and_a_known_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="^shards: remote shards .* need an index folder"):
        DataConfig(shards="https://example.org/shard-{0..3}.tar")
    with pytest.raises(ValueError, match=f"^shards: no {INDEX_NAME} in index folder"):
        DataConfig(shards="https://example.org/shard-0.tar", index=str(tmp_path))
    with pytest.raises(ValueError, match="^shards: cannot open nosuchstore://bucket/a.tar"):
        DataConfig(shards="nosuchstore://bucket/a.tar", index=str(tmp_path))
    with pytest.raises(ValueError, match="^shards: cannot open nosuchstore://bucket/a.tar"):
        check_shards(["nosuchstore://bucket/a.tar"])


def test_an_index_naming_a_command_is_refused_and_runs_nothing(demo_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (tmp_path / "index").mkdir()
    shard = shutil.copy(sorted(demo_dir.glob("*.tar"))[0], tmp_path / "index" / "real.tar")
    index_dataset(f"pipe:touch {marker}; cat {shard}", out=tmp_path / "index", workers=1)
    marker.unlink()
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}: row 0 names shard 'pipe:touch"):
        DatasetIndex.from_spec(str(tmp_path / "index"))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"shards": str(tmp_path / "index")}}))
    for command in (["data", "walk", str(config), "--world-size", "1", "--steps", "1", "--decode"],
                    ["train", str(config), "--steps", "1"]):
        proc = run_plait(*command, check=False)
        assert proc.returncode == 2 and "row 0 names shard 'pipe:touch" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def _train(tmp_path: Path, name: str, data: dict) -> dict[int, float]:
    config = {
        "seed": 2, "run_dir": str(tmp_path / name),
        "data": {**data, "workers": 1, "packing": {"max_tokens": 512},
                 "loader": {"shard_cache": str(tmp_path / name / "cache")},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256}},
        "checkpoint": {"every": 0}, "tracking": {"log_every": 1}, "eval": {"every": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    result = json.loads(run_plait("train", str(path), "--steps", "3").stdout.strip().splitlines()[-1])
    assert result["steps"] == 3
    return logged_losses(tmp_path / name)


@pytest.mark.slow
def test_training_on_http_and_pipe_shards_matches_the_files(demo_dir: Path, tmp_path: Path) -> None:
    with serving(demo_dir, ranges=True) as (base, log, _):
        _train_remote(base, log, demo_dir, tmp_path)


def _train_remote(base: str, log: list, demo_dir: Path, tmp_path: Path) -> None:
    local = _train(tmp_path, "local", {"shards": str(demo_dir)})
    assert sorted(local) == [1, 2, 3]
    index_dataset(f"{base}/{SHARDS}", out=tmp_path / "http-index", workers=1)
    log.clear()
    assert _train(tmp_path, "http", {"shards": f"{base}/{SHARDS}", "index": str(tmp_path / "http-index")}) == local
    assert any(status == 206 for _, _, status in log)  # the loader read byte ranges
    runs = tmp_path / "runs"
    piped = f"pipe:echo run >> {runs}; cat {demo_dir}/{SHARDS}"
    index_dataset(piped, out=tmp_path / "pipe-index", workers=1)
    runs.unlink()
    assert _train(tmp_path, "pipe", {"shards": piped, "index": str(tmp_path / "pipe-index")}) == local
    assert runs.read_text().splitlines() == ["run"] * 3  # each shard's command ran once, for tokenizer and loader
