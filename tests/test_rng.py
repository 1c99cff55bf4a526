"""Keyed generators: deterministic per key, independent across keys, no global RNG state."""

import numpy as np
import pytest
import torch

from plait.data.rng import (
    hash_uniforms,
    key_digest,
    keyed_rng,
    keyed_seed,
    keyed_seeds,
    keyed_torch_generator,
    keyed_uniforms,
)


def test_same_key_same_stream_and_different_keys_differ():
    a = keyed_rng(7, 0, "sample-1").random(8)
    assert np.array_equal(a, keyed_rng(7, 0, "sample-1").random(8))
    for other in [(8, 0, "sample-1"), (7, 1, "sample-1"), (7, 0, "sample-2"), (7, 0, "sample-1", "drop")]:
        assert not np.array_equal(a, keyed_rng(*other).random(8))


def test_key_encoding_is_unambiguous():
    assert key_digest(0, "a", "bc") != key_digest(0, "ab", "c")
    assert key_digest(0, 1) != key_digest(0, "1")
    assert key_digest(0, b"x") != key_digest(0, "x")
    assert key_digest(0, 2**70) != key_digest(0, 2**70 + 1)
    assert key_digest(0, np.int64(5)) == key_digest(0, 5)


def test_bad_part_type_raises():
    with pytest.raises(TypeError):
        keyed_rng(0, 1.5)


def test_global_rng_state_untouched():
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    keyed_rng(3, "k").random(100)
    torch.rand(4, generator=keyed_torch_generator(3, "k"))
    keyed_uniforms(keyed_seeds(3, ["a", "b"]), 5)
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.get_rng_state())


def test_torch_generator_is_keyed():
    a = torch.rand(5, generator=keyed_torch_generator(1, "x"))
    assert torch.equal(a, torch.rand(5, generator=keyed_torch_generator(1, "x")))
    assert not torch.equal(a, torch.rand(5, generator=keyed_torch_generator(1, "y")))


def test_vectorised_seeds_match_scalar_seed():
    keys = ["alpha", "beta", "gamma"]
    seeds = keyed_seeds(11, keys, 2, "size")
    assert [int(s) >> 1 for s in seeds] == [keyed_seed(11, k, 2, "size") for k in keys]
    assert len(set(seeds.tolist())) == 3


def test_uniforms_do_not_depend_on_batch_composition():
    seeds = keyed_seeds(0, [f"k{i}" for i in range(50)])
    full = keyed_uniforms(seeds, 4)
    for i in (0, 17, 49):
        assert np.array_equal(full[i], keyed_uniforms(seeds[i : i + 1], 4)[0])
    assert np.array_equal(hash_uniforms(seeds[3], np.uint64(2)), full[3, 2])


def test_uniforms_are_uniform_and_uncorrelated():
    u = keyed_uniforms(keyed_seeds(5, [str(i) for i in range(20000)]), 3)
    assert u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_allclose(u.mean(axis=0), 0.5, atol=0.01)
    np.testing.assert_allclose(np.histogram(u[:, 0], bins=10, range=(0, 1))[0] / len(u), 0.1, atol=0.01)
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
