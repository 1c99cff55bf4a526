"""Leakage-safe train/eval split: a sample's split is a pure function of its group id."""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def group_unit(group: str) -> float:
    """A stable uniform number in [0, 1) for a group id (same on every machine and run)."""
    digest = hashlib.blake2b(group.encode("utf-8"), digest_size=8, person=b"plait-split").digest()
    return int.from_bytes(digest, "little") / _SCALE


def is_heldout(group: str, fraction: float) -> bool:
    """True when the group belongs to the held-out evaluation split."""
    return group_unit(group) < fraction
