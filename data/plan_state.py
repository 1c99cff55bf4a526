"""The sample plan's position (a few integers, the same on every rank) and the window mix arithmetic.

Position is world-size independent: an epoch is a sequence of windows; a window takes the next
`n[m]` samples of each modality's epoch stream (so the state needs only the stream cursors at the
window's start), and is consumed in one or more *segments* — a new segment starts whenever the
world size changes mid-window, re-planning only what the previous segments left.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from plait.data.batch import MODALITIES

STATE_VERSION = 1


@dataclass
class PlanState:
    """Where the plan is: epoch, window, and how far each world-size segment of the window got."""

    fingerprint: str = ""
    """Hash of everything that shapes the plan except the world size (seed, data, sizing, packing)."""
    epoch: int = 0
    """Current epoch."""
    step: int = 0
    """Next global step to plan."""
    window: int = 0
    """Window index within the epoch."""
    window_step: int = 0
    """Global step at which the current window started (its curriculum values are read there)."""
    cursors: list[int] = field(default_factory=lambda: [0] * len(MODALITIES))
    """Samples of each modality's epoch stream taken by the windows before the current one."""
    segments: list[list[int]] = field(default_factory=list)
    """[world_size, steps consumed] of each segment of the current window; the last is in progress."""

    def to_dict(self) -> dict:
        """Plain dict (JSON-able) for checkpoints."""
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, state: Mapping) -> PlanState:
        """Inverse of `to_dict`; raises ValueError on a state from another version."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"version: plan state version {state.get('version')} is not {STATE_VERSION}")
        return cls(fingerprint=str(state["fingerprint"]), epoch=int(state["epoch"]), step=int(state["step"]),
                   window=int(state["window"]), window_step=int(state["window_step"]),
                   cursors=[int(c) for c in state["cursors"]],
                   segments=[[int(w), int(s)] for w, s in state["segments"]])

    def nbytes(self) -> int:
        """Size of the state as compact JSON (what a checkpoint stores per rank)."""
        return len(json.dumps(self.to_dict(), separators=(",", ":")).encode())


def mix_weights(mix: Mapping[str, float]) -> np.ndarray | None:
    """Curriculum mix (modality → weight) as an array in MODALITIES order; None when empty (natural)."""
    if not mix:
        return None
    unknown = sorted(set(mix) - set(MODALITIES))
    if unknown:
        raise ValueError(f"mix: unknown sources {unknown}; the plan mixes by modality {list(MODALITIES)}")
    return np.array([float(mix.get(m, 0.0)) for m in MODALITIES])


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total` in proportion to `weights` (ties to the lower index)."""
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def window_take(remaining: np.ndarray, weights: np.ndarray | None, size: int) -> np.ndarray:
    """Samples of each modality the next window takes: `size` in total, split by weight.

    Every sample is used once per epoch, so the mix is realised by order: a modality with a larger
    weight is consumed sooner. When a weighted modality runs out its share goes to the others; when
    every weighted one is exhausted the rest follow in natural proportions (weight = what remains).
    """
    remaining = np.asarray(remaining, dtype=np.int64)
    budget = min(int(size), int(remaining.sum()))
    take = np.zeros(len(remaining), dtype=np.int64)
    w = remaining.astype(np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    while take.sum() < budget:
        room = remaining - take
        active = np.where(room > 0, w, 0.0)
        if active.sum() <= 0:
            w = remaining.astype(np.float64)
            continue
        take += np.minimum(_largest_remainder(budget - int(take.sum()), active), room)
    return take
