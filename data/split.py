"""Leakage-safe train/eval split: a sample's split is a pure function of its group id."""

from __future__ import annotations

from plait.data.rng import split_unit


def is_heldout(group: str, fraction: float) -> bool:
    """True when the group belongs to the held-out evaluation split (`rng.split_unit` below `fraction`)."""
    return split_unit(group) < fraction
