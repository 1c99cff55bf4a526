"""NaViT token dropping: per-sample drop rates, kept-token counts and which tokens are kept.

The mean rate at a step comes from the curriculum (`token_drop_rate`, which may follow NaViT's
sigmoid schedule; `TokenDropConfig.rate` until a phase sets it). This module spreads it over
samples (constant, Beta around the mean, or in proportion to resolution) and picks the kept
tokens with a counter-based keyed hash, so the same sample keeps the same tokens whatever
batch, worker or rank it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.special import betaincinv

from plait.data.batch import MODALITIES
from plait.data.rng import hash_uniforms


@dataclass(kw_only=True)
class TokenDropConfig:
    """The mean drop rate before any curriculum phase sets one, and how it becomes a per-sample rate."""

    rate: float = 0.0
    """Mean fraction of droppable tokens dropped per sample until a curriculum phase sets `token_drop_rate`."""
    distribution: Literal["constant", "beta", "resolution"] = "constant"
    """Per-sample rate: the mean itself, Beta-distributed around it, or proportional to token count."""
    beta_concentration: float = 10.0
    """Beta(a, b) with a + b = this and a / (a + b) = mean rate; larger is tighter around the mean."""
    reference_tokens: int = 256
    """`resolution`: a sample with this many tokens gets the mean rate; rate grows linearly with tokens."""
    max_rate: float = 0.9
    """No sample drops more than this fraction of its tokens."""
    min_kept: int = 1
    """Never keep fewer tokens than this (or all of them if the sample is smaller)."""
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Modalities whose tokens may be dropped; the others always keep every token."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"rate: must be in [0, 1), got {self.rate}")
        if self.beta_concentration <= 0:
            raise ValueError(f"beta_concentration: must be > 0, got {self.beta_concentration}")
        if self.reference_tokens < 1:
            raise ValueError(f"reference_tokens: must be >= 1, got {self.reference_tokens}")
        if not 0.0 <= self.max_rate < 1.0:
            raise ValueError(f"max_rate: must be in [0, 1), got {self.max_rate}")
        if self.min_kept < 1:
            raise ValueError(f"min_kept: must be >= 1, got {self.min_kept}")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"modalities: unknown {unknown}, expected a subset of {list(MODALITIES)}")


def drop_rates(
    cfg: TokenDropConfig,
    mean_rate: float,
    num_tokens: np.ndarray,
    modality: np.ndarray,
    u: np.ndarray,
) -> np.ndarray:
    """Per-sample drop rates for samples of `num_tokens` tokens, from one uniform draw `u` each."""
    num_tokens = np.asarray(num_tokens, dtype=np.float64)
    if not 0.0 <= mean_rate < 1.0:
        raise ValueError(f"mean_rate: must be in [0, 1), got {mean_rate}")
    if mean_rate == 0.0:
        return np.zeros_like(num_tokens)
    if cfg.distribution == "constant":
        rates = np.full_like(num_tokens, mean_rate)
    elif cfg.distribution == "beta":
        a = mean_rate * cfg.beta_concentration
        rates = betaincinv(a, cfg.beta_concentration - a, np.asarray(u, dtype=np.float64))
    else:
        rates = mean_rate * num_tokens / cfg.reference_tokens
    droppable = np.isin(modality, [MODALITIES.index(m) for m in cfg.modalities])
    return np.where(droppable, np.clip(rates, 0.0, cfg.max_rate), 0.0)


def kept_counts(num_tokens: np.ndarray, rates: np.ndarray, min_kept: int = 1) -> np.ndarray:
    """Tokens kept per sample: round(n * (1 - rate)), at least min(n, min_kept)."""
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    kept = np.rint(num_tokens * (1.0 - np.asarray(rates, dtype=np.float64))).astype(np.int64)
    return np.clip(kept, np.minimum(num_tokens, min_kept), num_tokens)


def kept_mask(seeds: np.ndarray, num_tokens: np.ndarray, num_kept: np.ndarray) -> np.ndarray:
    """Boolean mask over the concatenated tokens of all samples: which tokens each sample keeps.

    Sample i keeps the `num_kept[i]` of its tokens with the smallest hash(seeds[i], token index),
    a uniformly random subset that depends only on the sample's own seed. Fully vectorised.
    """
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    total = int(num_tokens.sum())
    owner = np.repeat(np.arange(len(num_tokens)), num_tokens)
    starts = np.cumsum(num_tokens) - num_tokens
    local = np.arange(total) - starts[owner]
    scores = hash_uniforms(np.asarray(seeds, dtype=np.uint64)[owner], local.astype(np.uint64))
    order = np.lexsort((scores, owner))
    rank = np.arange(total) - starts[owner[order]]
    mask = np.empty(total, dtype=bool)
    mask[order] = rank < np.asarray(num_kept, dtype=np.int64)[owner[order]]
    return mask
