"""`plait bench plan`: sample-plan cost at LAION scale on a synthetic index (one rank's view).

Builds a synthetic dataset index (per-shard counts of a NaViT-like image/video/audio mix; sample rows
are generated only when a rank asks for them, like reading one shard's manifest) and plans `--steps`
optimizer steps for one rank of `--world-size` through the code a training rank runs: `run_plan` for one
rank with an `agree` all-reduce (stood in for here by the rank's own count) and `plan_micro_batch` per
micro-batch, under a curriculum whose resolution ramps over the second half (so the plan is cut and
re-sized every `--replan-every` steps). Reports peak traced memory, milliseconds per planned step (mean and
worst) and the state size, and, as the same-run baseline, the ratios against a dataset with 10x fewer
samples in as many shards (memory and time per step should not grow with the sample count)."""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np

from plait.data.batch import MODALITIES
from plait.data.plan import SamplePlan
from plait.data.plan_types import MicroBatchPlan
from plait.data.rng import hash_uniforms, keyed_rng, keyed_seed
from plait.trainer.config import RunConfig
from plait.trainer.config_loader import build
from plait.trainer.planned_batches import plan_micro_batch, run_plan

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
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps to plan")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--replan-every", type=int, default=10, help="data.plan.replan_every during the ramp")
    parser.add_argument("--window-samples", type=int, default=0,
                        help="samples per planning window (0: 64 per rank)")
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per packed sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the index and the plan")


def _config(args: argparse.Namespace) -> RunConfig:
    """A run whose curriculum moves the resolution mix towards large images over the second half."""
    window = args.window_samples or 64 * args.world_size
    ramp_start = max(args.steps // 2, 1)
    phases = [{"start": 0, "values": {"resolution": {224: 0.5, 448: 0.3, 896: 0.2}}},
              {"start": ramp_start, "transition": "linear", "ramp": max(args.steps // 4, 1),
               "values": {"resolution": {224: 0.2, 448: 0.4, 896: 0.4}}}]
    return build(RunConfig, {"seed": args.seed, "steps": args.steps, "curriculum": {"phases": phases},
                             "deepspeed": {"gradient_accumulation_steps": args.accumulation},
                             "data": {"packing": {"max_tokens": args.max_tokens},
                                      "plan": {"window_samples": window, "replan_every": args.replan_every}}},
                 "<bench plan>")


def _plan(source: SyntheticIndex, args: argparse.Namespace) -> SamplePlan:
    """One rank's plan as training builds it; its own count stands in for the all-reduce MAX of a step count."""
    return run_plan(_config(args), source, args.world_size, ranks=[args.rank], agree=lambda count: count)


def _walk(plan: SamplePlan, micro_batches: int) -> tuple[list[MicroBatchPlan], list[float], int]:
    """The rank's first micro-batches as its DataLoader workers get them, seconds per optimizer step, and the
    curriculum cuts met (new segments inside a window)."""
    planned, seconds, cuts = [], [], 0
    gas = plan.state.accumulation
    for step in range(micro_batches // gas):
        before = (plan.state.window, len(plan.state.segments))
        start = time.perf_counter()
        planned += [plan_micro_batch(plan, step * gas + micro)[0] for micro in range(gas)]
        seconds.append(time.perf_counter() - start)
        cuts += plan.state.window == before[0] and len(plan.state.segments) > before[1] > 0
    return planned, seconds, cuts


def _measure(samples: int, args: argparse.Namespace) -> dict:
    """Timed pass, then a traced pass (tracemalloc slows Python, so it never overlaps the timing)."""
    source = SyntheticIndex(samples, int(args.shards), args.seed)
    plan = _plan(source, args)
    start = time.perf_counter()
    plan.layout()
    setup = time.perf_counter() - start
    micro_batches = args.steps * args.accumulation
    planned, seconds, cuts = _walk(plan, micro_batches)
    tracemalloc.start()
    _walk(_plan(SyntheticIndex(samples, int(args.shards), args.seed), args), micro_batches)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_mem_mb": peak / 2**20, "plan_ms_per_step": 1000 * float(np.mean(seconds)),
            "worst_ms_per_step": 1000 * max(seconds), "setup_ms": 1000 * setup,
            "state_bytes_per_rank": plan.state.nbytes(),
            "samples_per_step": float(np.mean([len(p.samples) for p in planned])) * args.accumulation,
            "windows": plan.state.window + 1, "cuts": cuts,
            "shards_read": len(source.reads)}


def run(args: argparse.Namespace) -> dict:
    """Measure at the requested scale and at 10x fewer samples; report figures and ratios."""
    warm = _plan(SyntheticIndex(64 * args.world_size, 64, args.seed), args)
    _walk(warm, 5 * args.accumulation)  # first calls pay one-off import and cache costs that belong to neither
    full = _measure(int(args.samples), args)
    small = _measure(int(args.samples) // 10, args)
    return {
        "samples": int(args.samples), "shards": int(args.shards), "world_size": args.world_size,
        "steps": args.steps, "accumulation": args.accumulation,
        "samples_per_step_per_rank": round(full["samples_per_step"], 2),
        "windows": full["windows"], "curriculum_cuts": full["cuts"], "shards_read": full["shards_read"],
        "setup_ms": round(full["setup_ms"], 1),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mem_ratio_vs_10x_fewer_samples": round(full["peak_mem_mb"] / small["peak_mem_mb"], 3),
        "ms_ratio_vs_10x_fewer_samples": round(full["plan_ms_per_step"] / small["plan_ms_per_step"], 3),
        "peak_mem_mb": round(full["peak_mem_mb"], 2), "plan_ms_per_step": round(full["plan_ms_per_step"], 3),
        "worst_ms_per_step": round(full["worst_ms_per_step"], 3),
        "state_bytes_per_rank": full["state_bytes_per_rank"],
    }
