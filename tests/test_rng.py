"""Keyed generators: deterministic per key, independent across keys, no global RNG state; stable key ids."""

import hashlib

import numpy as np
import pytest
import torch

from plait.data.rng import (
    hash_uniforms,
    joined_seed,
    key_digest,
    key_id,
    key_ids,
    keyed_rng,
    keyed_seed,
    keyed_seeds,
    keyed_uniforms,
    split_unit,
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
    keyed_uniforms(keyed_seeds(3, ["a", "b"]), 5)
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.get_rng_state())


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


def test_key_ids_are_equal_exactly_for_equal_keys():
    keys = ["a", "b", "a", "", "sample-00017", "b ", "sample-00017"]
    ids = key_ids(keys)
    assert ids.dtype == torch.int64 and bool((ids >= 0).all())
    for i, a in enumerate(keys):
        for j, b in enumerate(keys):
            assert (ids[i] == ids[j]).item() == (a == b), (a, b)
    assert [key_id(k) for k in keys] == ids.tolist()
    assert key_ids([]).shape == (0,)


def test_split_unit_keeps_its_digest():
    """The held-out groups must never move: BLAKE2b(group, person 'plait-split') / 2^64, pinned."""
    for group in ["digit-7", "tone-12", "", "gruppe-ü"]:
        digest = hashlib.blake2b(group.encode(), digest_size=8, person=b"plait-split").digest()
        assert split_unit(group) == int.from_bytes(digest, "little") / 2.0**64
    assert split_unit("digit-7") == 0.2807476588068578


def test_joined_seed_keeps_its_digest():
    """The hard-negative sampler's seeds must never move: BLAKE2b of the ':'-joined parts, 63 bits, pinned."""
    digest = hashlib.blake2b(b"7:0:3:1:0", digest_size=8).digest()
    assert joined_seed(7, 0, 3, 1, 0) == int.from_bytes(digest, "little") >> 1
    assert joined_seed(0, 5, 1, 2, 0) == 2001459139292606323
