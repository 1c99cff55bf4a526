"""Synthetic packed batches keyed by (seed, step, micro, rank): a stand-in `BatchSource` for trainer tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from plait.data.batch import MODALITIES, PackedBatch
from plait.data.rng import keyed_seed
from plait.data.sizing import SizingConfig
from plait.trainer.bench.model import make_batch
from plait.trainer.model.config import ModelConfig


class SyntheticBatches:
    """Random packed batches keyed by (seed, step, micro, rank): a stand-in loader for tests and smoke runs.

    `nan_steps` fill the patches of those steps with NaN (a real non-finite loss for the guard).
    Held-out captions repeat every `caption_classes` samples, so retrieval has duplicate-caption hits.
    """

    def __init__(self, cfg: ModelConfig, sizing: SizingConfig, seed: int, rank: int, samples: int = 3,
                 nan_steps: tuple[int, ...] = (), eval_batches: int = 2, caption_classes: int = 4) -> None:
        self.cfg, self.sizing, self.seed, self.rank, self.samples = cfg, sizing, seed, rank, samples
        self.nan_steps = set(nan_steps)
        self.num_eval, self.caption_classes = eval_batches, caption_classes
        self.served = 0

    def _specs(self, key: int) -> list[tuple[int, tuple[int, int, int], int]]:
        """Sample shapes: modalities cycle, grids and caption lengths drawn from the key."""
        gen = torch.Generator().manual_seed(key)
        sizes = torch.randint(1, 4, (self.samples, 3), generator=gen).tolist()
        specs = []
        for i, (a, b, c) in enumerate(sizes):
            modality = (key + i) % len(MODALITIES)
            frames = 2 * a if MODALITIES[modality] == "video" else 1
            specs.append((modality, (frames, b + 1, c + 1), 2 + c))
        return specs

    def _keyed(self, key: int) -> PackedBatch:
        """One batch whose keys and groups are unique to `key`."""
        batch = make_batch(self._specs(key), self.cfg, self.sizing, seed=key % (2**62))
        n = batch.num_samples
        return dataclasses.replace(batch, sample_key=[f"syn-{key}-{i}" for i in range(n)],
                                   group=torch.arange(n) + (key % 2**40) * 64)

    def batch(self, step: int, micro: int) -> PackedBatch:
        """Micro-batch `micro` of `step` on this rank."""
        self.served += 1
        batch = self._keyed(keyed_seed(self.seed, "train", step, micro, self.rank))
        if step in self.nan_steps:
            for stream in batch.streams.values():
                stream.patches.fill_(float("nan"))
        return batch

    def eval_batches(self) -> list[PackedBatch]:
        """Held-out batches whose captions come from a few classes (equal caption = hit)."""
        out = []
        for i in range(self.num_eval):
            batch = self._keyed(keyed_seed(self.seed, "eval", i, self.rank))
            lengths = torch.full((batch.num_samples,), 3)
            classes = (torch.arange(batch.num_samples) + i + self.rank) % self.caption_classes
            out.append(dataclasses.replace(
                batch,
                caption_ids=(classes[:, None] * 3 + torch.arange(3)).reshape(-1),
                caption_cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int(),
            ))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Batches are pure functions of their key; the count served is kept to show the state round-trips."""
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the served count."""
        self.served = int(state["served"])
