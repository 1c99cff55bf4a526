"""`plait bench model`: useful tokens/s of the whole model (forward + backward) on NaViT-like samples, packed
into one micro-batch vs the same samples in padded-to-longest batches.

The padded baseline pads every sample's media to the longest in its batch (and every caption to the
longest caption), which is the cost of a classic `[B, L_max]` batch; only real tokens count as useful.
"""

from __future__ import annotations

import argparse
import time

import torch

from plait.data.batch import MODALITIES, STREAM_OF_MODALITY, PackedBatch, PackedStream
from plait.data.sizing import SizingConfig
from plait.ops.segments import lengths_to_cu
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.multimodal import MultimodalModel

SampleSpec = tuple[int, tuple[int, int, int], int]
"""(modality code, (t, h, w) patch grid, caption tokens) of one synthetic sample."""


def _stream(specs: list[tuple[int, tuple[int, int, int]]], patch_dim: int, gen: torch.Generator) -> PackedStream:
    """One packed stream: sample i owns t*h*w patches on its grid, one attention segment per sample."""
    lengths = torch.tensor([t * h * w for _, (t, h, w) in specs], dtype=torch.long)
    grids = [torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1)
             for _, (t, h, w) in specs]
    owners = torch.tensor([owner for owner, _ in specs], dtype=torch.long)
    return PackedStream(
        patches=torch.randn(int(lengths.sum()), patch_dim, generator=gen),
        coords=torch.cat([g.reshape(-1, 3) for g in grids]),
        seg=torch.repeat_interleave(owners, lengths),
        cu_seqlens=lengths_to_cu(lengths).int(),
        max_seqlen=int(lengths.max()),
        samples=owners,
        grids=torch.tensor([grid for _, grid in specs], dtype=torch.long),
        kept=lengths,
    )


def make_batch(specs: list[SampleSpec], cfg: ModelConfig, sizing: SizingConfig, seed: int = 0) -> PackedBatch:
    """A `PackedBatch` of random patches (of `sizing`'s patch geometry) and captions with the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    by_stream: dict[str, list[tuple[int, tuple[int, int, int]]]] = {"vision": [], "audio": []}
    for i, (modality, grid, _) in enumerate(specs):
        by_stream[STREAM_OF_MODALITY[MODALITIES[modality]]].append((i, grid))
    dims = {"vision": sizing.vision_channels, "audio": sizing.audio_channels}
    caption_lengths = torch.tensor([c for _, _, c in specs], dtype=torch.long)
    vocab = int(cfg.llm.model_kwargs.get("vocab_size", 2048))
    return PackedBatch(
        streams={name: _stream(s, dims[name], gen) for name, s in by_stream.items() if s},
        modality=torch.tensor([m for m, _, _ in specs], dtype=torch.long),
        sample_key=[f"sample-{seed}-{i}" for i in range(len(specs))],
        group=torch.arange(len(specs)),
        caption_ids=torch.randint(0, vocab, (int(caption_lengths.sum()),), generator=gen),
        caption_cu_seqlens=lengths_to_cu(caption_lengths).int(),
    )


def navit_mix(count: int, seed: int) -> list[SampleSpec]:
    """Images of 64-512 px at patch 16 with random aspect ratios (4-1024 patches), 8-32-token captions."""
    gen = torch.Generator().manual_seed(seed)
    sides = torch.randint(2, 33, (count, 2), generator=gen).tolist()
    captions = torch.randint(8, 33, (count,), generator=gen).tolist()
    return [(0, (1, h, w), c) for (h, w), c in zip(sides, captions)]


def _padded(specs: list[SampleSpec]) -> list[SampleSpec]:
    """Each sample grown to the batch's longest media grid and caption (same cost as a padded batch)."""
    longest = max(specs, key=lambda s: s[1][0] * s[1][1] * s[1][2])[1]
    caption = max(c for _, _, c in specs)
    return [(m, longest, caption) for m, _, _ in specs]


def _step_seconds(model: MultimodalModel, batches: list[PackedBatch]) -> float:
    """Seconds for forward + backward over all batches."""
    start = time.perf_counter()
    for batch in batches:
        out = model(batch)
        loss = out.caption_logits.logsumexp(-1).sum() + (out.media_embeds * out.text_embeds).sum()
        loss.backward()
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--samples", type=int, default=64, help="samples in the packed micro-batch")
    parser.add_argument("--padded-batch", type=int, default=8, help="samples per padded batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is kept)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    """Useful tokens/s packed vs padded; baseline measured in the same run."""
    torch.manual_seed(args.seed)
    cfg, sizing = ModelConfig(), SizingConfig()
    model = MultimodalModel(cfg, sizing)
    specs = navit_mix(args.samples, args.seed)
    packed = [make_batch(specs, cfg, sizing, args.seed)]
    chunks = [specs[i : i + args.padded_batch] for i in range(0, len(specs), args.padded_batch)]
    padded = [make_batch(_padded(chunk), cfg, sizing, args.seed) for chunk in chunks]
    useful = sum(h * w * t + c for _, (t, h, w), c in specs)
    padded_tokens = sum(b.streams["vision"].num_tokens + b.caption_ids.numel() for b in padded)
    _step_seconds(model, packed + padded)
    packed_s = min(_step_seconds(model, packed) for _ in range(args.repeats))
    padded_s = min(_step_seconds(model, padded) for _ in range(args.repeats))
    return {
        "packed_over_padded": padded_s / packed_s,
        "packed_useful_tokens_per_s": useful / packed_s,
        "padded_useful_tokens_per_s": useful / padded_s,
        "padding_fraction": 1 - useful / padded_tokens,
        "samples": args.samples,
        "padded_batch": args.padded_batch,
        "threads": torch.get_num_threads(),
    }
