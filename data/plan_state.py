"""The sample plan's position (a few integers, the same on every rank) and the window mix arithmetic.

Position is world-size independent: an epoch is a sequence of windows; a window takes the next
`n[m]` samples of each modality's epoch stream (so the state needs only the stream cursors at the
window's start), and is consumed in one or more *segments*. A new segment starts whenever the world
size changes mid-window (what no rank consumed is pooled and split over the new world size) or the
curriculum's sizing values change (each rank re-plans what it has left at the new values).
Steps are counted in micro-batches; `accumulation` micro-batches make one optimizer step, counted
from `anchor` (re-anchored when a resumed run changes its gradient accumulation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from plait.data.batch import MODALITIES

STATE_VERSION = 2


@dataclass
class PlanState:
    """Where the plan is: epoch, window, and how far each world-size segment of the window got."""

    fingerprint: str = ""
    """Hash of everything that shapes the plan except the world size (seed, data, sizing, packing)."""
    epoch: int = 0
    """Current epoch."""
    step: int = 0
    """Next micro-batch to plan (its index in the run's sequence of micro-batches)."""
    window: int = 0
    """Window index within the epoch."""
    window_step: int = 0
    """Micro-batch index at which the current window started."""
    cursors: list[int] = field(default_factory=lambda: [0] * len(MODALITIES))
    """Samples of each stream (modality, or source and modality) taken by the windows before the current one."""
    segments: list[list[int]] = field(default_factory=list)
    """[world_size, steps consumed, steps planned (-1 until planned), local, first optimizer step] of each segment
    of the current window, the last in progress; `local` 1 = a curriculum cut (each rank keeps its leftover),
    0 = pooled; the curriculum values are read at the first optimizer step."""
    accumulation: int = 1
    """Micro-batches per optimizer step since `anchor`."""
    anchor: list[int] = field(default_factory=lambda: [0, 0])
    """[micro-batch index, optimizer step] where the current `accumulation` took effect."""

    def optimizer_step(self, index: int) -> int:
        """The optimizer step micro-batch `index` belongs to."""
        return self.anchor[1] + (index - self.anchor[0]) // self.accumulation

    def first_index(self, step: int) -> int:
        """The index of the first micro-batch of optimizer step `step`."""
        return self.anchor[0] + (step - self.anchor[1]) * self.accumulation

    def set_accumulation(self, accumulation: int) -> None:
        """Continue with `accumulation` micro-batches per step from the next one (which must start a step)."""
        if accumulation == self.accumulation:
            return
        if (self.step - self.anchor[0]) % self.accumulation:
            raise ValueError(f"gradient_accumulation_steps: the plan stands mid-step (micro-batch {self.step}); "
                             "accumulation can change only between optimizer steps")
        self.anchor = [self.step, self.optimizer_step(self.step)]
        self.accumulation = accumulation

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
                   segments=[[int(v) for v in segment] for segment in state["segments"]],
                   accumulation=int(state["accumulation"]), anchor=[int(v) for v in state["anchor"]])

    def nbytes(self) -> int:
        """Size of the state as compact JSON (what a checkpoint stores per rank)."""
        return len(json.dumps(self.to_dict(), separators=(",", ":")).encode())


def mix_weights(mix: Mapping[str, float]) -> np.ndarray | None:
    """Curriculum mix (modality → weight) as an array in MODALITIES order; None when empty (natural)."""
    if not mix:
        return None
    unknown = sorted(set(mix) - set(MODALITIES))
    if unknown:
        raise ValueError(f"mix: unknown modalities {unknown}, expected some of {list(MODALITIES)} (sources are "
                         "weighted by source_weights)")
    return np.array([float(mix.get(m, 0.0)) for m in MODALITIES])


def stream_weights(sizes: np.ndarray, mix: np.ndarray | None, sources: np.ndarray | None) -> np.ndarray | None:
    """Weight of each (source, modality) stream: the source's weight times the modality mix within it.

    `sizes` are the streams' sizes (what remains of them, for sampling once per epoch): they split a source
    among its modalities when there is no mix, and say which modalities a source has. With one source the
    weights are the mix itself (None: natural proportions).
    """
    if sources is None:
        return mix
    sizes = np.asarray(sizes, dtype=np.float64).reshape(len(sources), -1)
    within = sizes if mix is None else np.where(sizes > 0, mix[None, :], 0.0)
    totals = within.sum(axis=1, keepdims=True)
    within = np.divide(within, totals, out=np.zeros_like(within), where=totals > 0)
    return (np.asarray(sources, dtype=np.float64)[:, None] * within).ravel()


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers summing to `total` in proportion to `weights` (ties to the lower index)."""
    exact = total * weights / weights.sum()
    out = np.floor(exact).astype(np.int64)
    short = total - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    return out


def weighted_take(left: int, weights: np.ndarray, sizes: np.ndarray, size: int) -> np.ndarray:
    """Samples of each stream the next window takes when sources are sampled with replacement: `size` (at most
    the `left` samples of the epoch) split by weight alone, a stream's positions wrapping around its size."""
    budget = min(int(size), int(left))
    sizes = np.asarray(sizes, dtype=np.float64)
    w = np.where(sizes > 0, np.asarray(weights, dtype=np.float64), 0.0)
    if budget <= 0:
        return np.zeros(len(w), dtype=np.int64)
    return _largest_remainder(budget, w if w.sum() > 0 else sizes)  # no weighted stream left: natural proportions


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
