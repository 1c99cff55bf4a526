"""`plait bench plan`: sample-plan cost at LAION scale on a synthetic index (one rank's view).

Builds a synthetic dataset index (per-shard counts of a NaViT-like image/video/audio mix; sample rows
are generated only when a rank asks for them, like reading one shard's manifest) and plans `--steps`
steps for one rank of `--world-size`, the way a training rank does: it plans only its own share of
each window and agrees on the window's step count with one all-reduce (stood in for here by its own
count). Reports peak traced memory, milliseconds per planned step and the state size, and, as the
same-run baseline, the ratios against a dataset with 10x fewer samples in as many shards (memory and
time per step should not grow with the sample count).
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np

from plait.data.batch import MODALITIES
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig, SamplePlan
from plait.data.rng import hash_uniforms, keyed_rng, keyed_seed
from plait.data.sizing import SizingConfig
from plait.data.token_drop import TokenDropConfig

MIX = (0.8, 0.1, 0.1)
"""Synthetic share of image, audio and video samples (MODALITIES order)."""
_DRAWS = 4


class SyntheticIndex:
    """A `ShardSource` of `samples` samples in `shards` shards; rows are generated from their position on demand."""

    def __init__(self, samples: int, shards: int, seed: int = 0) -> None:
        rng = keyed_rng(seed, "synthetic-index")
        per_shard = rng.multinomial(samples, np.full(shards, 1.0 / shards)).astype(np.int64)
        counts = np.empty((shards, len(MODALITIES)), dtype=np.int64)
        counts[:, 1] = rng.binomial(per_shard, MIX[1])
        counts[:, 2] = rng.binomial(per_shard - counts[:, 1], MIX[2] / (1.0 - MIX[1]))
        counts[:, 0] = per_shard - counts[:, 1] - counts[:, 2]
        self._counts, self.seed, self.samples = counts, seed, samples
        self.reads: set[int] = set()
        """Shards whose rows were asked for (what a real index would have had to open)."""

    def counts(self) -> np.ndarray:
        """[shards, 3] samples per shard and modality."""
        return self._counts

    def shard_url(self, shard: int) -> str:
        """A made-up shard path."""
        return f"synthetic/shard-{shard:06d}.tar"

    def identity(self) -> str:
        """Names the synthetic dataset."""
        return f"synthetic-{self.samples}-{len(self._counts)}-{self.seed}"

    def rows(self, shard: int, modality: int, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at `index`: log-uniform image sides and aspects, 8-64 frame clips, 1-30 s audio."""
        self.reads.add(shard)
        index = np.asarray(index, dtype=np.int64)
        u = hash_uniforms(np.uint64(keyed_seed(self.seed, "rows", shard, modality)),
                          (index[:, None] * _DRAWS + np.arange(_DRAWS)).astype(np.uint64))
        n = len(index)
        name = MODALITIES[modality]
        side, aspect = np.exp(np.log(64) + u[:, 0] * np.log(16)), np.exp(np.log(0.5) + u[:, 1] * np.log(4))
        frames = np.floor(8 + u[:, 2] * 57)
        duration = frames / 30.0 if name == "video" else 1.0 + u[:, 3] * 29.0
        keys = np.array([f"s{shard:06d}-{name}-{i}" for i in index], dtype=object)
        nan = np.full(n, np.nan)
        return {
            "key": keys, "group": keys.copy(), "sample_offset": index * 100_000,
            "sample_size": np.full(n, 100_000, dtype=np.int64),
            "width": {"image": side * np.sqrt(aspect), "video": np.full(n, 640.0)}.get(name, nan),
            "height": {"image": side / np.sqrt(aspect), "video": np.full(n, 360.0)}.get(name, nan),
            "frames": frames if name == "video" else nan, "fps": np.full(n, 30.0) if name == "video" else nan,
            "duration": duration if name != "image" else nan,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--samples", type=float, default=5e9, help="samples in the synthetic index")
    parser.add_argument("--shards", type=float, default=5e5, help="shards in the synthetic index")
    parser.add_argument("--world-size", type=int, default=4096, help="data-parallel ranks")
    parser.add_argument("--rank", type=int, default=0, help="the rank whose plan is timed")
    parser.add_argument("--steps", type=int, default=200, help="steps to plan")
    parser.add_argument("--window-samples", type=int, default=0,
                        help="samples per planning window (0: 64 per rank)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per packed sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the index and the plan")


def _plan(source: SyntheticIndex, args: argparse.Namespace) -> SamplePlan:
    """One rank's plan; its own count stands in for the all-reduce MAX of the window's step count."""
    window = args.window_samples or 64 * args.world_size
    return SamplePlan(source, seed=args.seed, sizing=SizingConfig(), token_drop=TokenDropConfig(),
                      packing=PackingConfig(max_tokens=args.max_tokens),
                      values_at=lambda step: ({224: 0.5, 448: 0.3, 896: 0.2}, 0.0, {}),
                      world_size=args.world_size, ranks=[args.rank], config=PlanConfig(window_samples=window),
                      agree=lambda count: count)


def _measure(samples: int, args: argparse.Namespace) -> dict:
    """Timed pass, then a traced pass (tracemalloc slows Python, so it never overlaps the timing)."""
    source = SyntheticIndex(samples, int(args.shards), args.seed)
    plan = _plan(source, args)
    start = time.perf_counter()
    plan.layout()
    setup = time.perf_counter() - start
    start = time.perf_counter()
    planned = [plan.next_step()[0] for _ in range(args.steps)]
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    traced = _plan(SyntheticIndex(samples, int(args.shards), args.seed), args)
    for _ in range(args.steps):
        traced.next_step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_mem_mb": peak / 2**20, "plan_ms_per_step": 1000 * elapsed / args.steps,
            "setup_ms": 1000 * setup, "state_bytes_per_rank": plan.state.nbytes(),
            "samples_per_step": float(np.mean([len(s.plan.samples) for s in planned])),
            "windows": plan.state.window + 1, "shards_read": len(source.reads)}


def run(args: argparse.Namespace) -> dict:
    """Measure at the requested scale and at 10x fewer samples; report figures and ratios."""
    warm = _plan(SyntheticIndex(64 * args.world_size, 64, args.seed), args)
    for _ in range(5):  # first calls pay one-off import and cache costs that belong to neither measurement
        warm.next_step()
    full = _measure(int(args.samples), args)
    small = _measure(int(args.samples) // 10, args)
    return {
        "samples": int(args.samples), "shards": int(args.shards), "world_size": args.world_size,
        "steps": args.steps, "samples_per_step_per_rank": round(full["samples_per_step"], 2),
        "windows": full["windows"], "shards_read": full["shards_read"], "setup_ms": round(full["setup_ms"], 1),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mem_ratio_vs_10x_fewer_samples": round(full["peak_mem_mb"] / small["peak_mem_mb"], 3),
        "ms_ratio_vs_10x_fewer_samples": round(full["plan_ms_per_step"] / small["plan_ms_per_step"], 3),
        "peak_mem_mb": round(full["peak_mem_mb"], 2), "plan_ms_per_step": round(full["plan_ms_per_step"], 3),
        "state_bytes_per_rank": full["state_bytes_per_rank"],
    }
