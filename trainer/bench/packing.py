"""`plait bench packing`: NaViT packing efficiency and planning cost on a NaViT-like size mix.

Synthesises metadata (images with sides 64-512 px and aspect 0.5-2, video clips of 8-32 frames,
audio of 1-30 s), plans it exactly as the data plane does (keyed uniforms → sizing → token
dropping → first-fit decreasing per encoder stream), and compares the padding with batches of the
same samples padded to their longest member. The cross-rank balance runs the training plan itself
(`run_plan` for `--ranks` ranks on a synthetic index) and reports the slowest rank's attention cost per
step over the mean.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from plait.data.batch import MODALITIES, STREAM_OF_MODALITY
from plait.data.packing import BinPacking, PackingConfig, PatchedSample, pack_lengths, pack_samples
from plait.data.patchify import grid_coords
from plait.data.rng import keyed_rng, keyed_seeds, keyed_uniforms
from plait.data.sizing import NUM_DRAWS, SampleGrids, SizingConfig, size_samples
from plait.data.token_drop import TokenDropConfig
from plait.trainer.bench.plan import SyntheticIndex
from plait.trainer.config import RunConfig
from plait.trainer.config_loader import build
from plait.trainer.planned_batches import run_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--max-tokens", type=int, default=4096, help="token budget per packed sequence")
    parser.add_argument("--num-samples", type=int, default=20000, help="samples in the synthetic mix")
    parser.add_argument("--window", type=int, default=4096, help="first-fit-decreasing look-ahead window")
    parser.add_argument("--max-samples-per-sequence", type=int, default=256, help="cap on samples per sequence")
    parser.add_argument("--patch-size", type=int, default=16, help="spatial patch size in pixels")
    parser.add_argument("--resolution", default="224:0.4,448:0.4,896:0.2", help="side_px:prob,... (curriculum phase)")
    parser.add_argument("--mix", default="image:0.8,video:0.1,audio:0.1", help="modality:prob,... of the synthetic mix")
    parser.add_argument("--drop-rate", type=float, default=0.0, help="mean token drop rate")
    parser.add_argument("--frame-segments", action="store_true", help="video frame groups as separate segments")
    parser.add_argument("--build-sequences", type=int, default=4, help="vision sequences built from tensors for timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic mix and of the plan")
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks of the cross-rank balance figure")
    parser.add_argument("--balance-steps", type=int, default=60, help="training-plan steps the balance is taken over")


def _parse_probs(text: str) -> dict[str, float]:
    """'a:0.5,b:0.5' → {'a': 0.5, 'b': 0.5}."""
    pairs = (item.split(":") for item in text.split(",") if item)
    return {key: float(value) for key, value in pairs}


def synthetic_metadata(n: int, mix: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Metadata columns of a NaViT-like mix: log-uniform sides and aspect ratios, clips and audio."""
    rng = keyed_rng(seed, "bench-packing-metadata")
    names = list(mix)
    modality = rng.choice(np.array(names), size=n, p=np.array([mix[m] for m in names]) / sum(mix.values()))
    side = np.exp(rng.uniform(np.log(64), np.log(512), n))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
    is_video, is_audio = modality == "video", modality == "audio"
    width = np.where(is_video, 640.0, side * np.sqrt(aspect))
    height = np.where(is_video, 360.0, side / np.sqrt(aspect))
    frames = np.where(is_video, rng.integers(8, 33, n), 1).astype(np.float64)
    fps = np.full(n, 30.0)
    duration = np.where(is_audio, rng.uniform(1.0, 30.0, n), np.where(is_video, frames / fps, np.nan))
    width, height = np.where(is_audio, np.nan, width), np.where(is_audio, np.nan, height)
    return {"modality": modality, "width": width, "height": height, "frames": frames, "fps": fps, "duration": duration}


def plan(columns: dict[str, np.ndarray], args: argparse.Namespace) -> tuple[SampleGrids, dict[str, object]]:
    """Size and pack every sample the way the data plane plans a step; returns grids and packings."""
    sizing = SizingConfig(patch_size=args.patch_size, max_sample_tokens=args.max_tokens)
    keys = [f"sample-{i:08d}" for i in range(len(columns["modality"]))]
    uniforms = keyed_uniforms(keyed_seeds(args.seed, keys, 0, "size"), NUM_DRAWS)
    resolution = {int(side): p for side, p in _parse_probs(args.resolution).items()}
    grids = size_samples(columns, sizing, TokenDropConfig(), resolution, args.drop_rate, uniforms)
    stream_of = np.array([STREAM_OF_MODALITY[m] for m in MODALITIES])[grids.modality]
    packings = {}
    for stream in ("vision", "audio"):
        members = np.flatnonzero(stream_of == stream)
        packing = pack_lengths(grids.num_kept[members], args.max_tokens, args.max_samples_per_sequence, args.window)
        packings[stream] = (members, packing)
    return grids, packings


def padded_batch_fraction(lengths: np.ndarray, batch_size: int) -> float:
    """Padding fraction of consecutive batches of `batch_size`, each padded to its longest sample."""
    if len(lengths) == 0:
        return 0.0
    padded_n = -(-len(lengths) // batch_size) * batch_size
    table = np.zeros(padded_n, dtype=np.int64)
    table[: len(lengths)] = lengths
    table = table.reshape(-1, batch_size)
    counts = np.minimum(batch_size, len(lengths) - batch_size * np.arange(len(table)))
    capacity = float((table.max(axis=1) * counts).sum())
    return 1.0 - float(lengths.sum()) / capacity


def build_ms_per_sequence(grids: SampleGrids, members: np.ndarray, packing: BinPacking,
                          args: argparse.Namespace) -> float:
    """Milliseconds to build one vision PackedBatch from patch tensors (first bins of the plan)."""
    channels = SizingConfig(patch_size=args.patch_size).vision_channels
    cfg = PackingConfig(max_tokens=args.max_tokens, video_frame_segments=args.frame_segments)
    bins = packing.members()[: args.build_sequences]
    batches = []
    for bin_members in bins:
        samples = []
        for i in members[bin_members]:
            g = grids[int(i)]
            samples.append(PatchedSample(key=str(i), modality=MODALITIES[g.modality],
                                         patches=torch.zeros(g.num_tokens, channels), coords=grid_coords(g.t, g.h, g.w),
                                         caption_ids=torch.zeros(16, dtype=torch.long),
                                         num_kept=g.num_kept, drop_seed=int(i)))
        batches.append(samples)
    start = time.perf_counter()
    for samples in batches:
        pack_samples(samples, cfg)
    return (time.perf_counter() - start) * 1e3 / max(len(batches), 1)


def rank_balance(args: argparse.Namespace) -> dict[str, float]:
    """How evenly the training plan spreads attention cost (sum of squared segment lengths) over `--ranks` ranks:
    the slowest rank's cost per step over the mean (1.0 = no rank waits at the gradient all-reduce), summed over
    `--balance-steps` steps of `run_plan` on a synthetic index with this bench's resolution mix."""
    resolution = {int(side): p for side, p in _parse_probs(args.resolution).items()}
    cfg = build(RunConfig, {"seed": args.seed, "data": {
        "packing": {"max_tokens": args.max_tokens, "max_samples_per_sequence": args.max_samples_per_sequence},
        "sizing": {"patch_size": args.patch_size, "max_sample_tokens": args.max_tokens, "resolution": resolution},
        "token_drop": {"rate": args.drop_rate}}}, "<bench packing>")
    plan = run_plan(cfg, SyntheticIndex(args.num_samples, max(args.num_samples // 1000, 1), args.seed), args.ranks)
    costs = np.array([[step.plan.cost for step in plan.next_step()] for _ in range(args.balance_steps)])
    return {"ranks": args.ranks, "slowest_rank_cost_over_mean": costs.max(1).sum() / max(costs.mean(1).sum(), 1e-9),
            "worst_step_slowest_over_mean": float((costs.max(1) / np.maximum(costs.mean(1), 1e-9)).max())}


def run(args: argparse.Namespace) -> dict:
    """Plan the synthetic mix and report padding, samples per sequence and planning cost."""
    columns = synthetic_metadata(args.num_samples, _parse_probs(args.mix), args.seed)
    plan(columns, args)  # warm-up (imports, caches) so the timing below is the steady state
    start = time.perf_counter()
    grids, packings = plan(columns, args)
    plan_us = (time.perf_counter() - start) * 1e6 / args.num_samples
    result: dict[str, object] = {"max_tokens": args.max_tokens, "num_samples": args.num_samples}
    tokens = capacity = sequences = placed = padded_capacity = 0.0
    for stream, (members, packing) in packings.items():
        lengths = grids.num_kept[members]
        fitted = packing.bin_of >= 0
        per_seq = max(int(round(fitted.sum() / max(packing.num_bins, 1))), 1)
        padded = padded_batch_fraction(lengths[fitted], per_seq)
        stream_capacity = packing.num_bins * args.max_tokens
        result[f"{stream}_padding_fraction"] = 1.0 - packing.tokens.sum() / max(stream_capacity, 1)
        result[f"{stream}_samples_per_sequence"] = fitted.sum() / max(packing.num_bins, 1)
        result[f"{stream}_padded_batch_padding_fraction"] = padded
        result[f"{stream}_skipped_samples"] = int((~fitted).sum())
        tokens += packing.tokens.sum()
        capacity += stream_capacity
        sequences += packing.num_bins
        placed += fitted.sum()
        padded_capacity += lengths[fitted].sum() / (1.0 - padded) if padded < 1 else 0.0
    result["dropped_fraction"] = 1.0 - grids.num_kept.sum() / grids.num_tokens.sum()
    result["build_ms_per_sequence"] = build_ms_per_sequence(grids, *packings["vision"], args)
    result["padding_fraction"] = 1.0 - tokens / capacity
    result["samples_per_sequence"] = placed / sequences
    result["plan_us_per_sample"] = plan_us
    result["padded_batch_padding_fraction"] = 1.0 - tokens / padded_capacity
    result["useful_tokens_ratio_vs_padded_batch"] = padded_capacity / capacity  # same tokens, less padding
    result.update(rank_balance(args))
    return {k: (round(float(v), 6) if isinstance(v, (float, np.floating)) else int(v)) for k, v in result.items()}
