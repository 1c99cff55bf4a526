"""`plait bench index DIR`: manifest indexing throughput (samples/s) on real shards."""

from __future__ import annotations

import argparse
import tempfile
import time

from plait.data.indexer import index_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="folder, glob or brace range of tar shards")
    parser.add_argument("--workers", type=int, default=0, help="processes (0: one per core)")


def run(args: argparse.Namespace) -> dict:
    """Index into a scratch folder (the dataset's own manifests are left alone) and time it."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = index_dataset(args.shards, out=out, workers=args.workers)
        seconds = time.perf_counter() - start
    return {"samples": summary["samples"], "shards": summary["shards"], "seconds": round(seconds, 3),
            "samples_per_s": round(summary["samples"] / seconds, 1)}
