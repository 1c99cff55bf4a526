"""`plait shards index`: write per-shard manifests and the dataset index, in parallel over shards."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

from plait.data.manifest import (INDEX_NAME, SAMPLE_SCHEMA, SHARD_SCHEMA, index_shard, manifest_name,
                                 shard_summary, write_table)
from plait.data.reader import missing_shards
from plait.data.shardlist import expand_urls, is_remote

log = logging.getLogger(__name__)


def _default_out(urls: list[str]) -> Path:
    local = [u for u in urls if not is_remote(u)]
    if not local:
        raise ValueError("shards are remote (pipe: or URL): pass --out DIR for the manifests")
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(u)) for u in local]))


def _shard_name(url: str, out: Path) -> str:
    """How the index refers to a shard: relative to the index folder when inside it, else as given."""
    if is_remote(url):
        return url
    rel = os.path.relpath(os.path.abspath(url), out)
    return url if rel.startswith("..") else rel


def _index_one(job: tuple[str, str, str]) -> dict:
    url, name, manifest = job
    rows, status = index_shard(url, name)
    write_table(rows, SAMPLE_SCHEMA, manifest)
    if status != "ok":
        log.warning("shard %s: %s", url, status)
    return shard_summary(name, os.path.basename(manifest), rows, status)


def index_dataset(spec: str, out: str | Path | None = None, workers: int = 0) -> dict:
    """Index every shard of `spec`; returns {"samples", "shards", "bad", "bad_shards", "index"}."""
    urls = expand_urls(spec)
    missing = missing_shards(urls)
    if not urls or missing:
        raise FileNotFoundError(f"no shards match {spec!r}" if not urls else f"no such shard {missing[0]!r}")
    out_dir = Path(out) if out else _default_out(urls)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [_shard_name(u, out_dir) for u in urls]
    manifests = [str(out_dir / manifest_name(n)) for n in names]
    if len(set(manifests)) != len(manifests):
        raise ValueError("two shards share a file name; index them into separate --out folders")
    jobs = list(zip(urls, names, manifests))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            summaries = pool.map(_index_one, jobs, chunksize=1)
    else:
        summaries = [_index_one(job) for job in jobs]
    write_table(summaries, SHARD_SCHEMA, out_dir / INDEX_NAME)
    return {
        "samples": sum(s["samples"] for s in summaries),
        "shards": len(summaries),
        "bad": sum(s["bad"] for s in summaries),
        "bad_shards": sum(s["status"] != "ok" for s in summaries),
        "index": str(out_dir / INDEX_NAME),
    }
