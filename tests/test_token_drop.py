"""Token dropping: per-sample rates, kept counts, and keyed uniform choice of the kept tokens."""

import numpy as np
import pytest

from plait.data.rng import hash_uniforms, keyed_seeds
from plait.data.token_drop import TokenDropConfig, drop_rates, kept_counts, kept_mask

IMAGE, AUDIO, VIDEO = 0, 1, 2


def test_constant_rate_and_counts():
    n = np.array([10, 100, 7, 1])
    rates = drop_rates(TokenDropConfig(), 0.3, n, np.zeros(4, dtype=np.int64), np.zeros(4))
    assert np.allclose(rates, 0.3)
    assert kept_counts(n, rates).tolist() == [7, 70, 5, 1]
    assert drop_rates(TokenDropConfig(), 0.0, n, np.zeros(4), np.zeros(4)).tolist() == [0.0] * 4


def test_beta_rates_centre_on_the_mean():
    u = (np.arange(20000) + 0.5) / 20000
    rates = drop_rates(TokenDropConfig(distribution="beta", beta_concentration=8.0), 0.4,
                       np.full(20000, 100), np.zeros(20000, dtype=np.int64), u)
    assert abs(rates.mean() - 0.4) < 0.005
    assert rates.std() > 0.1 and rates.min() >= 0.0 and rates.max() <= 0.9


def test_resolution_dependent_rates_grow_with_tokens_and_clip():
    cfg = TokenDropConfig(distribution="resolution", reference_tokens=200, max_rate=0.8)
    rates = drop_rates(cfg, 0.3, np.array([100, 200, 400, 2000]), np.zeros(4, dtype=np.int64), np.zeros(4))
    assert np.allclose(rates, [0.15, 0.3, 0.6, 0.8])


def test_only_configured_modalities_drop():
    cfg = TokenDropConfig(modalities=["image", "video"])
    rates = drop_rates(cfg, 0.5, np.full(3, 10), np.array([IMAGE, AUDIO, VIDEO]), np.zeros(3))
    assert rates.tolist() == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError, match="modalities"):
        TokenDropConfig(modalities=["text"])


def test_min_kept_floor():
    assert kept_counts(np.array([10, 3, 0]), np.array([0.95, 0.9, 0.5]), min_kept=2).tolist() == [2, 2, 0]


def _reference_mask(seeds, num_tokens, num_kept):
    """Per-sample loop: keep the num_kept tokens with the smallest hash score."""
    parts = []
    for seed, n, k in zip(seeds, num_tokens, num_kept):
        scores = hash_uniforms(np.full(n, seed, dtype=np.uint64), np.arange(n, dtype=np.uint64))
        mask = np.zeros(n, dtype=bool)
        mask[np.argsort(scores, kind="stable")[:k]] = True
        parts.append(mask)
    return np.concatenate(parts)


def test_kept_mask_matches_reference_and_counts():
    seeds = keyed_seeds(0, ["a", "b", "c", "d"], 0, "drop")
    n, k = np.array([50, 1, 0, 33]), np.array([20, 1, 0, 33])
    mask = kept_mask(seeds, n, k)
    assert np.array_equal(mask, _reference_mask(seeds, n, k))
    assert [int(part.sum()) for part in np.split(mask, np.cumsum(n)[:-1])] == [20, 1, 0, 33]


def test_kept_mask_is_independent_of_batch_and_uniform():
    seeds = keyed_seeds(1, [str(i) for i in range(400)], 0, "drop")
    n, k = np.full(400, 20), np.full(400, 5)
    mask = kept_mask(seeds, n, k).reshape(400, 20)
    assert np.array_equal(mask[123], kept_mask(seeds[123:124], n[:1], k[:1]))
    assert len({row.tobytes() for row in mask}) > 390  # different samples keep different subsets
    np.testing.assert_allclose(mask.mean(axis=0), 0.25, atol=0.08)
