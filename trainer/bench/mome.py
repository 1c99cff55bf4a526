"""`plait bench mome`: MoME forward + backward vs k x the dense FFN of the same sizes, and vs a per-sample
Python loop like the technique reference's (route each sample on its mean token, apply its top-k experts).

`mome_over_k_dense` is the cost of routing + sort-based dispatch over the expert matmuls themselves
(goal <= 1.2); `loop_over_mome` is how much faster grouped dispatch is than the per-sample loop (goal >= 10).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from plait.data.batch import TOKEN_MODALITIES
from plait.ops.segments import cu_to_lengths
from plait.trainer.model.config import MoMEConfig
from plait.trainer.model.encoder import FeedForward
from plait.trainer.model.mome import MoMELayer


def _seconds(step: Callable[[], torch.Tensor], repeats: int) -> float:
    """Best wall time of `repeats` forward + backward runs (after one warm-up)."""
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        step().sum().backward()
        if i:
            best = min(best, time.perf_counter() - start)
    return best


def expert_modules(layer: MoMELayer) -> nn.ModuleList:
    """The layer's routed experts as separate dense FFN modules, the way the reference's loop holds them."""
    experts = nn.ModuleList()
    for e in range(layer.cfg.num_experts):
        ffn = FeedForward(layer.w_in.shape[2], layer.w_out.shape[2])
        ffn.w_in.weight.data.copy_(layer.w_in[e])
        ffn.w_out.weight.data.copy_(layer.w_out[e])
        experts.append(ffn)
    return experts


def per_sample_loop(
    layer: MoMELayer, experts: nn.ModuleList, x: torch.Tensor, cu_seqlens: list[int], modality: torch.Tensor
) -> torch.Tensor:
    """The naive baseline: per sample, route on its mean token, run its top-k experts on all its tokens."""
    out = []
    for s in range(len(cu_seqlens) - 1):
        rows = x[cu_seqlens[s] : cu_seqlens[s + 1]]
        probs = layer.router(rows.mean(0, keepdim=True), modality[s : s + 1]).softmax(-1)[0]
        weights, chosen = probs.topk(layer.cfg.top_k)
        weights = weights / weights.sum()
        out.append(sum(w * experts[e](rows) for w, e in zip(weights, chosen.tolist())))
    return torch.cat(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--tokens", type=int, default=8192, help="tokens in the micro-batch")
    parser.add_argument("--samples", type=int, default=256, help="samples the tokens belong to (the loop's trip count)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=704, help="FFN hidden width (SwiGLU)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    """Times MoME, k x dense and the per-sample loop in one run; returns the ratios."""
    torch.manual_seed(args.seed)
    dense = FeedForward(args.dim, args.hidden)
    layer = MoMELayer.from_dense(dense, MoMEConfig(num_experts=args.experts, top_k=args.top_k, init="fresh"))
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.tokens, args.dim, generator=gen, requires_grad=True)
    cuts = torch.randperm(args.tokens - 1, generator=gen)[: args.samples - 1].add(1).sort().values.tolist()
    cu_seqlens = [0, *cuts, args.tokens]
    sample_modality = torch.randint(0, len(TOKEN_MODALITIES), (args.samples,), generator=gen)
    lengths = cu_to_lengths(torch.tensor(cu_seqlens))
    modality = torch.repeat_interleave(sample_modality, lengths)
    mome_s = _seconds(lambda: layer(x, modality), args.repeats)
    dense_s = _seconds(lambda: dense(x), args.repeats)
    experts = expert_modules(layer)
    loop_s = _seconds(lambda: per_sample_loop(layer, experts, x, cu_seqlens, sample_modality), args.repeats)
    return {
        "mome_over_k_dense": mome_s / (args.top_k * dense_s),
        "loop_over_mome": loop_s / mome_s,
        "mome_ms": 1e3 * mome_s,
        "dense_ms": 1e3 * dense_s,
        "loop_ms": 1e3 * loop_s,
        "tokens": args.tokens,
        "samples": args.samples,
        "experts": args.experts,
        "top_k": args.top_k,
        "threads": torch.get_num_threads(),
    }
