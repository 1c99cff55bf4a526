"""`plait bench contrastive`: InfoNCE against a large queue, chunked vs materialised logits.

Each variant runs forward + backward in its own spawned process (on CPU the peak is the rise
of the resident set; on CUDA the allocator's peak), then is timed over `--repeats` runs.
Example: `plait bench contrastive --batch 256 --queue 65536 --dim 256`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch

from plait.ops.infonce import MatchIds, infonce_chunked, infonce_reference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Problem size, chunking, device and repeats."""
    parser.add_argument("--batch", type=int, default=256, help="queries per rank")
    parser.add_argument("--queue", type=int, default=65536, help="queue entries")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension")
    parser.add_argument("--chunk-size", type=int, default=4096, help="candidates per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each measuring process")


def _inputs(args: argparse.Namespace) -> tuple:
    """Deterministic normalised query/keys/queue with key ids (a few queue duplicates of batch keys)."""
    g = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)

    def unit(rows: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=g), dim=-1).to(dev)

    query, keys, queue = unit(args.batch).requires_grad_(), unit(args.batch).requires_grad_(), unit(args.queue)
    key_ids = torch.arange(args.batch, device=dev)[:, None]
    queue_ids = (torch.arange(args.queue, device=dev) + args.batch)[:, None]
    queue_ids[: args.batch // 8] = key_ids[: args.batch // 8]
    exclude = MatchIds(key_ids, key_ids, queue_ids)
    share = MatchIds.none(args.batch, args.batch, args.queue, dev)
    scale = torch.tensor(1 / 0.07, device=dev, requires_grad=True)
    return query, keys, queue, scale, torch.arange(args.batch, device=dev), exclude, share


def _step(variant: str, inputs: tuple, chunk_size: int) -> tuple[float, float]:
    """One forward + backward; returns (loss, sum of query-gradient entries) as a cross-check."""
    query, keys, queue, scale, pidx, exclude, share = inputs
    for t in (query, keys, scale):
        t.grad = None
    if variant == "chunked":
        loss, _ = infonce_chunked(query, keys, queue, scale, pidx, exclude, share, chunk_size=chunk_size)
    else:
        loss, _ = infonce_reference(query, keys, queue, scale, pidx, exclude, share)
    loss.mean().backward()
    return float(loss.detach().mean()), float(query.grad.abs().sum())


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _measure(variant: str, args: argparse.Namespace, results: multiprocessing.Queue) -> None:
    """Peak extra memory of the first step, then the median time of `repeats` steps."""
    torch.set_num_threads(args.threads)
    inputs = _inputs(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib() * 1024
    check = _step(variant, inputs, args.chunk_size)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        _step(variant, inputs, args.chunk_size)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    results.put({"peak_bytes": max(peak, 1), "time_s": statistics.median(times), "check": check})


def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Measure one variant in a fresh process so peaks do not mix."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, args, results))
    proc.start()
    out = results.get()
    proc.join()
    return out


def run(args: argparse.Namespace) -> dict:
    """Chunked vs materialised InfoNCE: peak memory and time ratios, plus a value cross-check."""
    chunked = _run_variant("chunked", args)
    materialized = _run_variant("materialized", args)
    return {
        "batch": args.batch,
        "queue": args.queue,
        "dim": args.dim,
        "chunk_size": args.chunk_size,
        "device": args.device,
        "chunked_peak_mib": chunked["peak_bytes"] / 2**20,
        "materialized_peak_mib": materialized["peak_bytes"] / 2**20,
        "chunked_time_s": chunked["time_s"],
        "materialized_time_s": materialized["time_s"],
        "loss_abs_diff": abs(chunked["check"][0] - materialized["check"][0]),
        "grad_sum_rel_diff": abs(chunked["check"][1] / materialized["check"][1] - 1.0),
        "chunked_peak_over_materialized": chunked["peak_bytes"] / materialized["peak_bytes"],
        "chunked_time_over_materialized": chunked["time_s"] / materialized["time_s"],
    }
