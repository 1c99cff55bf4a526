"""Keyed random generators and stable ids: every random choice and every hashed key is a function of its key.

A key is `(seed, *parts)`, e.g. `(seed, epoch, sample_key, "drop")`. The parts are hashed with
BLAKE2b, so the same key gives the same stream on any machine, process or worker count, and
different keys give independent streams. Nothing here reads or writes global RNG state.

All hashing of the project lives here: keyed seeds and generators, `key_id` (the stable id of a
string key, compared only for equality), `caption_keys` (the same for caption token sequences), and
two older digests whose values must never change: `split_unit` (chooses the held-out groups) and
`joined_seed` (seeds the hard-negative sampler).
"""

from __future__ import annotations

import hashlib
import struct

from collections.abc import Sequence

import numpy as np
import torch
from numpy.random.bit_generator import ISeedSequence

from plait.ops.segments import cu_to_lengths, segment_ids, segment_positions

KeyPart = int | str | bytes
"""One component of a key: an integer (seed, epoch, step, rank), a string (sample key, purpose) or bytes."""

_INT = struct.Struct("<q")
_SCALE64 = float(1 << 64)
_CAPTION_PRIMES = (2**31 - 1, 2**31 - 19)
"""Two Mersenne-like primes; a caption key is two 31-bit polynomial hashes side by side."""
_CAPTION_BASE = 1_000_003
"""Polynomial hash base of caption keys."""


def _encode(parts: tuple[KeyPart, ...]) -> bytes:
    """Serialise key parts unambiguously (type tag + length), so ("a", "bc") != ("ab", "c")."""
    chunks = []
    for part in parts:
        if isinstance(part, (int, np.integer)) and not isinstance(part, bool):
            value = int(part)
            if -(1 << 63) <= value < (1 << 63):
                chunks.append(b"i" + _INT.pack(value))
            else:
                raw = str(value).encode()
                chunks.append(b"I" + _INT.pack(len(raw)) + raw)
        elif isinstance(part, str):
            raw = part.encode()
            chunks.append(b"s" + _INT.pack(len(raw)) + raw)
        elif isinstance(part, (bytes, bytearray)):
            chunks.append(b"b" + _INT.pack(len(part)) + bytes(part))
        else:
            raise TypeError(f"key part must be int, str or bytes, got {type(part).__name__}")
    return b"".join(chunks)


def key_digest(seed: int, *parts: KeyPart, size: int = 32) -> bytes:
    """BLAKE2b digest (`size` bytes) of the key `(seed, *parts)`."""
    return hashlib.blake2b(_encode((seed, *parts)), digest_size=size).digest()


def _seed63(digest: bytes) -> int:
    """The 63-bit non-negative integer of an 8-byte digest (fits torch.Generator.manual_seed and int64)."""
    return int.from_bytes(digest, "little") >> 1


def keyed_seed(seed: int, *parts: KeyPart) -> int:
    """A 63-bit non-negative integer seed derived from the key (fits torch.Generator.manual_seed)."""
    return _seed63(key_digest(seed, *parts, size=8))


def key_id(key: str) -> int:
    """Stable 63-bit non-negative id of a string key (sample key, group): equal strings, equal ids, everywhere.

    For ids compared only for equality (queue de-duplication, positives); never -1, the "no id" marker.
    """
    return keyed_seed(0, key, "id")


def key_ids(keys: Sequence[str]) -> torch.Tensor:
    """[N] int64 `key_id` of each key, e.g. a batch's sample keys."""
    return torch.tensor([key_id(key) for key in keys], dtype=torch.long)


def split_unit(group: str) -> float:
    """Stable uniform in [0, 1) of a group string, for the train/eval split.

    Its own BLAKE2b scheme (personalised `plait-split`, no key encoding): its values decide which groups
    are held out (the demo's held-out digits), so they must never change.
    """
    digest = hashlib.blake2b(group.encode("utf-8"), digest_size=8, person=b"plait-split").digest()
    return int.from_bytes(digest, "little") / _SCALE64


def joined_seed(*parts: int) -> int:
    """63-bit seed of integer parts joined by ':' (seeds the hard-negative sampler: its values must not change)."""
    return _seed63(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest())


class _DigestSeed(ISeedSequence):
    """Feeds a digest straight into a bit generator, skipping SeedSequence's slower mixing (2x faster)."""

    __slots__ = ("digest",)

    def __init__(self, digest: bytes) -> None:
        self.digest = digest

    def generate_state(self, n_words: int, dtype: type = np.uint32) -> np.ndarray:
        """Return the first `n_words` words of the digest (it is long enough for PCG64)."""
        needed = n_words * np.dtype(dtype).itemsize
        if needed > len(self.digest):
            raise ValueError(f"digest has {len(self.digest)} bytes, bit generator needs {needed}")
        return np.frombuffer(self.digest, dtype=dtype, count=n_words).copy()


def keyed_rng(seed: int, *parts: KeyPart) -> np.random.Generator:
    """A numpy Generator (PCG64) for the key `(seed, *parts)`; ~4 µs, cheap enough per sample."""
    return np.random.Generator(np.random.PCG64(_DigestSeed(key_digest(seed, *parts))))


def keyed_seeds(seed: int, keys: list[str] | np.ndarray, *parts: KeyPart) -> np.ndarray:
    """uint64 seeds of `(seed, key, *parts)` for many keys (`keyed_seed` is the same value >> 1)."""
    out = np.empty(len(keys), dtype=np.uint64)
    suffix = _encode(parts)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(_encode((seed, str(key))) + suffix, digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a strong, vectorised integer mixer."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) from (seed, counter) pairs, elementwise with broadcasting.

    Counter-based: the value for (seed, counter) never depends on the other elements, so a
    sample's draws are the same whether it is processed alone or inside any batch.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    counters = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(seeds ^ (counters * np.uint64(0xD1B54A32D192ED03)))
        bits = _splitmix64(mixed + seeds)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keyed_uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """[N, count] uniforms: row i holds draws 0..count-1 of the per-sample seed `seeds[i]`."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    return hash_uniforms(seeds[:, None], np.arange(count, dtype=np.uint64)[None, :])


def _pow_mod(base: int, exponent: torch.Tensor, modulus: int) -> torch.Tensor:
    """base ** exponent % modulus elementwise (square-and-multiply over the exponent's bits)."""
    result = torch.ones_like(exponent)
    power = torch.full_like(exponent, base % modulus)
    e = exponent.clone()
    while bool((e > 0).any()):
        result = torch.where(e & 1 == 1, result * power % modulus, result)
        power = power * power % modulus
        e = e >> 1
    return result


def caption_keys(caption_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] int64 key of each caption's token sequence (equal sequences -> equal keys; collisions ~2^-62).

    Vectorised over a packed batch; the contrastive caption ids and retrieval hits compare these keys.
    """
    cu = cu_seqlens.long().cpu()
    ids = caption_ids.long().cpu() + 1
    n = cu.numel() - 1
    lengths, seg, position = cu_to_lengths(cu), segment_ids(cu), segment_positions(cu)
    key = torch.zeros(n, dtype=torch.long)
    for modulus in _CAPTION_PRIMES:
        terms = ids % modulus * _pow_mod(_CAPTION_BASE, position, modulus) % modulus
        sums = torch.zeros(n, dtype=torch.long).index_add_(0, seg, terms) % modulus
        key = key * (2**31) + (sums + lengths) % modulus
    return key
