"""The sample plan: which samples every rank feeds the model at every step, from metadata alone.

How an epoch is laid out (all of it a pure function of seed, epoch, config and curriculum):
- Shards are put in a keyed order; each modality's *stream* is its usable samples in that order.
- The epoch is cut into windows of `window_samples`; a window takes the next n[m] samples of each
  stream, n split by the curriculum mix at the window's first step (the mix is realised by order,
  since every sample is used exactly once per epoch).
- Each rank takes an equal contiguous slice of every stream's part of the window (split by sample
  ranges, so any number of shards, ranks or workers works), drops held-out groups, shuffles (keyed),
  sizes samples with the curriculum values, packs them per encoder stream and orders its
  micro-batches by attention cost. All ranks run the same number of steps in the window (ranks with
  fewer micro-batches get empty ones) and the same keyed permutation of steps, so at each step every
  rank runs its k-th heaviest batch.
- If the world size changes mid-window, the samples no rank has consumed yet form a new *segment*
  split over the new world size; the state records (world size, steps) per segment of the window.
The state is a few integers (`PlanState`), identical on every rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from plait.data.batch import MODALITIES, STREAM_OF_MODALITY
from plait.data.checks import check_positive, check_table
from plait.data.dataset_index import EpochLayout, ShardSource, concat_rows, read_positions, take_rows
from plait.data.packing import PackingConfig, pack_lengths, padded_length, segment_costs
from plait.data.plan_state import PlanState, mix_weights, window_take
from plait.data.plan_types import MicroBatchPlan, SampleRef
from plait.data.rng import keyed_rng, keyed_seeds, keyed_uniforms
from plait.data.sizing import NUM_DRAWS, SampleGrids, SizingConfig, size_samples
from plait.data.split import is_heldout
from plait.data.token_drop import TokenDropConfig

VISION_CODES = np.array([MODALITIES.index(m) for m in MODALITIES if STREAM_OF_MODALITY[m] == "vision"])
"""Modality codes packed into the vision stream (the rest go to the audio stream)."""
ValuesAt = Callable[[int], tuple[Mapping[int, float], float, Mapping[str, float]]]
"""step → (resolution distribution, mean token drop rate, modality mix), e.g. from `Curriculum.at(step)`."""
AgreeMax = Callable[[int], int]
"""All-reduce MAX of an integer over the data-parallel ranks (lets a rank plan only its own share)."""


@dataclass(kw_only=True)
class PlanConfig:
    """How the epoch is cut into planning windows and which split is walked."""

    window_samples: int = 65536
    """Samples per window, for any world size: the shuffle and packing horizon; ranks share each window."""
    split: Literal["train", "eval"] = "train"
    """Walk the training groups or the held-out ones (split by group id, so no leakage)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Modality → share of each window until a curriculum phase sets `mix`; empty = natural proportions."""
    eval_fraction: float = 0.1
    """Fraction of groups held out (whole groups, chosen by a hash of the group id)."""
    manifest_cache: int = 8
    """Per-shard manifests kept in memory per modality stream (a rank reads one or two per window)."""

    def __post_init__(self) -> None:
        check_positive(self, "window_samples", "manifest_cache")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"split: must be train or eval, got {self.split!r}")
        self.mix = check_table("mix", self.mix, probabilities=True)
        unknown = sorted(set(self.mix) - set(MODALITIES))
        if unknown:
            raise ValueError(f"mix: unknown modalities {unknown}, expected some of {list(MODALITIES)}")


@dataclass
class RankStep:
    """One (step, rank) of the plan: the micro-batch and what the walk reports about it."""

    plan: MicroBatchPlan
    """The contract the loader consumes."""
    padding: int
    """Planned tail padding tokens over the batch's streams."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples the plan could not place, by reason (reported on the rank's first step of a segment)."""

    @property
    def mix(self) -> dict[str, int]:
        """Samples of each modality in this micro-batch (the realised mix)."""
        counts = {m: 0 for m in MODALITIES}
        for ref in self.plan.samples:
            counts[ref.modality] += 1
        return counts


@dataclass
class SplitSpec:
    """Which group-split a plan walks."""

    heldout: bool
    """True to walk the held-out (eval) groups, False for the training groups."""
    fraction: float
    """Fraction of groups held out (`is_heldout`)."""


@dataclass
class SizingInputs:
    """Everything that turns metadata into token grids, fixed for one window."""

    seed: int
    epoch: int
    sizing: SizingConfig
    token_drop: TokenDropConfig
    packing: PackingConfig
    resolution: Mapping[int, float]
    drop_rate: float


@dataclass
class RankPlan:
    """A rank's samples in one segment and its micro-batches, heaviest (attention cost) first."""

    rows: dict[str, np.ndarray]
    """Columns of the rank's samples: ROW_COLUMNS plus shard, position, modality."""
    grids: SampleGrids
    """Token grid of each sample."""
    batches: list[np.ndarray]
    """Sample indices (into `rows`) of each micro-batch, vision samples first."""
    cost: np.ndarray
    """[len(batches)] attention cost per micro-batch."""
    too_long: np.ndarray
    """Indices of samples longer than the token budget (never placed; reported as skipped)."""
    seeds: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-sample keyed seeds ('drop', 'augment'), filled only for ranks whose batches are materialised."""


def rank_share(positions: np.ndarray, world: int, rank: int) -> np.ndarray:
    """The rank's contiguous slice of `positions`: `np.array_split(positions, world)[rank]` without the others."""
    base, extra = divmod(len(positions), world)
    start = rank * base + min(rank, extra)
    return positions[start: start + base + (rank < extra)]


def split_mask(groups: np.ndarray, split: SplitSpec) -> np.ndarray:
    """Rows whose group belongs to the wanted split (one hash per distinct group)."""
    if not len(groups):
        return np.zeros(0, dtype=bool)
    unique, inverse = np.unique(groups.astype(str), return_inverse=True)
    heldout = np.fromiter((is_heldout(g, split.fraction) for g in unique), dtype=bool, count=len(unique))
    return heldout[inverse] == split.heldout


def _stream_bins(kept: np.ndarray, costs: np.ndarray, members: np.ndarray,
                 packing: PackingConfig) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Pack one encoder stream's samples; bins (sample indices) sorted by cost, heaviest first, and too-long ones."""
    packed = pack_lengths(kept[members], packing.max_tokens, packing.max_samples_per_sequence,
                          packing.window, costs[members])
    order = np.argsort(-packed.cost, kind="stable")
    bins = packed.members()
    return [members[bins[b]] for b in order], packed.cost[order], members[packed.bin_of < 0]


def plan_rank(source: ShardSource, layout: EpochLayout, positions: list[np.ndarray], inputs: SizingInputs,
              split: SplitSpec, shuffle_key: tuple) -> RankPlan:
    """Plan one rank's share (`positions[m]` of each modality's stream) of a window segment."""
    rows = concat_rows([read_positions(source, layout, m, p) for m, p in enumerate(positions) if len(p)])
    rows = take_rows(rows, np.flatnonzero(split_mask(rows["group"], split)))
    rows = take_rows(rows, keyed_rng(inputs.seed, "plan-shuffle", *shuffle_key).permutation(len(rows["key"])))
    uniforms = keyed_uniforms(keyed_seeds(inputs.seed, rows["key"], inputs.epoch, "size"), NUM_DRAWS)
    columns = {name: rows[name] for name in ("modality", "width", "height", "frames", "fps", "duration")}
    grids = size_samples(columns, inputs.sizing, inputs.token_drop, inputs.resolution, inputs.drop_rate, uniforms)
    costs = segment_costs(grids.num_kept, grids.t, inputs.packing.video_frame_segments)
    is_vision = np.isin(grids.modality, VISION_CODES)
    vision, vision_cost, vision_long = _stream_bins(grids.num_kept, costs, np.flatnonzero(is_vision), inputs.packing)
    audio, audio_cost, audio_long = _stream_bins(grids.num_kept, costs, np.flatnonzero(~is_vision), inputs.packing)
    # Pairing the k-th heaviest vision bin with the k-th heaviest audio bin keeps batches cost-ordered, so
    # at a given step every rank runs its k-th heaviest batch and no rank idles at the gradient all-reduce.
    count = max(len(vision), len(audio))
    empty = np.zeros(0, dtype=np.int64)
    batches = [np.concatenate([vision[k] if k < len(vision) else empty, audio[k] if k < len(audio) else empty])
               for k in range(count)]
    cost = np.zeros(count)
    cost[: len(vision)] += vision_cost
    cost[: len(audio)] += audio_cost
    return RankPlan(rows=rows, grids=grids, batches=batches, cost=cost,
                    too_long=np.concatenate([vision_long, audio_long]))


def add_seeds(plan: RankPlan, seed: int, epoch: int) -> None:
    """Fill the keyed per-sample seeds the loader needs (token choice for dropping, decode augmentation)."""
    for purpose in ("drop", "augment"):
        plan.seeds[purpose] = keyed_seeds(seed, plan.rows["key"], epoch, purpose)


def batch_padding(plan: RankPlan, batch: np.ndarray, packing: PackingConfig) -> tuple[int, int]:
    """(real tokens, tail padding tokens) of one micro-batch over the streams it has."""
    kept = plan.grids.num_kept[batch]
    is_vision = np.isin(plan.grids.modality[batch], VISION_CODES)
    tokens = padding = 0
    for mask in (is_vision, ~is_vision):
        if mask.any():
            stream_tokens = int(kept[mask].sum())
            tokens += stream_tokens
            padding += padded_length(stream_tokens, packing) - stream_tokens
    return tokens, padding


@dataclass
class _Segment:
    """One world-size segment of a window: every rank's plan (or only the materialised ones)."""

    world_size: int
    positions: list[np.ndarray]
    ranks: dict[int, RankPlan]
    steps: int
    order: np.ndarray


class SamplePlan:
    """Deterministic per-(step, rank) micro-batch plans with exact and elastic resume."""

    def __init__(self, source: ShardSource, *, seed: int, sizing: SizingConfig, token_drop: TokenDropConfig,
                 packing: PackingConfig, values_at: ValuesAt, world_size: int, ranks: list[int] | None = None,
                 config: PlanConfig | None = None, agree: AgreeMax | None = None, fingerprint_extra: str = "") -> None:
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        self.source, self.seed, self.values_at, self.world_size = source, seed, values_at, world_size
        self.sizing, self.token_drop, self.packing = sizing, token_drop, packing
        self.cfg = config or PlanConfig()
        self.ranks = list(range(world_size)) if ranks is None else list(ranks)
        if any(not 0 <= r < world_size for r in self.ranks):
            raise ValueError(f"ranks: {self.ranks} are not all in [0, {world_size})")
        self.agree = agree
        self.split = SplitSpec(heldout=self.cfg.split == "eval", fraction=self.cfg.eval_fraction)
        self._counts = source.counts()
        self.state = PlanState(fingerprint=self._fingerprint(fingerprint_extra))
        self._layout: EpochLayout | None = None
        self._segment: _Segment | None = None
        self._epoch_first_step: int | None = 0

    def _fingerprint(self, extra: str) -> str:
        """Hash of all plan inputs except the world size."""
        parts = {"seed": self.seed, "data": self.source.identity(), "sizing": asdict(self.sizing),
                 "token_drop": asdict(self.token_drop), "packing": asdict(self.packing),
                 "window": self.cfg.window_samples, "split": self.cfg.split, "mix": self.cfg.mix,
                 "eval_fraction": self.cfg.eval_fraction, "extra": extra}
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The plan position (same on every rank, a few hundred bytes)."""
        return self.state.to_dict()

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: same world size continues exactly; another one re-plans what the current window has left."""
        loaded = PlanState.from_dict(state)
        if loaded.fingerprint != self.state.fingerprint:
            raise ValueError(f"fingerprint: plan state {loaded.fingerprint} was made with other data or settings "
                             f"(now {self.state.fingerprint})")
        if loaded.segments and loaded.segments[-1][0] != self.world_size:
            if loaded.segments[-1][1] == 0:
                loaded.segments[-1][0] = self.world_size
            else:
                loaded.segments.append([self.world_size, 0])
        self.state = loaded
        self._layout, self._segment, self._epoch_first_step = None, None, None

    # ----------------------------------------------------------------- planning

    def layout(self) -> EpochLayout:
        """The current epoch's shard order and stream offsets."""
        if self._layout is None:
            self._layout = EpochLayout.build(self._counts, self.seed, self.state.epoch)
        return self._layout

    def _window_positions(self) -> list[np.ndarray]:
        """Stream positions of each modality that the current window takes."""
        state, totals = self.state, self.layout().totals
        _, _, mix = self.values_at(state.window_step)
        cursors = np.array(state.cursors, dtype=np.int64)
        take = window_take(totals - cursors, mix_weights(mix), self.cfg.window_samples)
        return [np.arange(c, c + n, dtype=np.int64) for c, n in zip(cursors, take)]

    def _inputs(self) -> SizingInputs:
        """Sizing inputs of the current window (curriculum values at its first step)."""
        resolution, drop_rate, _ = self.values_at(self.state.window_step)
        return SizingInputs(self.seed, self.state.epoch, self.sizing, self.token_drop, self.packing,
                            resolution, drop_rate)

    def _plan_segment(self, positions: list[np.ndarray], world: int, index: int, ranks: list[int],
                      agree: AgreeMax | None) -> _Segment:
        """Plan `ranks` of one segment; the step count is the max over all ranks (computed or agreed)."""
        inputs, state = self._inputs(), self.state
        planned = ranks if agree is not None else range(world)
        plans = {r: plan_rank(self.source, self.layout(), [rank_share(p, world, r) for p in positions], inputs,
                              self.split, (state.epoch, state.window, index, r)) for r in planned}
        longest = max((len(p.batches) for p in plans.values()), default=0)
        steps = agree(longest) if agree is not None else longest
        order = keyed_rng(self.seed, "plan-step-order", state.epoch, state.window, index).permutation(steps)
        return _Segment(world, positions, {r: plans[r] for r in ranks}, steps, order)

    @staticmethod
    def _remaining(segment: _Segment, consumed: int) -> list[np.ndarray]:
        """Positions of the segment that no rank consumed in its first `consumed` steps (too-long ones excluded)."""
        used = [np.zeros(0, dtype=np.int64)]
        done = set(segment.order[:consumed].tolist())
        for plan in segment.ranks.values():
            taken = [b for k, b in enumerate(plan.batches) if k in done] + [plan.too_long]
            index = np.concatenate(taken)
            used.append(plan.rows["position"][index] + plan.rows["modality"][index] * (1 << 48))
        used_ids = np.concatenate(used)
        return [p[~np.isin(p + m * (1 << 48), used_ids)] for m, p in enumerate(segment.positions)]

    def _build_segment(self) -> _Segment:
        """Re-plan the current window's earlier segments (if any), then plan the one in progress."""
        state = self.state
        if not state.segments:
            state.segments = [[self.world_size, 0]]
        positions = self._window_positions()
        for index, (world, consumed) in enumerate(state.segments[:-1]):
            earlier = self._plan_segment(positions, world, index, list(range(world)), None)
            positions = self._remaining(earlier, consumed)
        segment = self._plan_segment(positions, self.world_size, len(state.segments) - 1, self.ranks, self.agree)
        for plan in segment.ranks.values():
            add_seeds(plan, self.seed, state.epoch)
        return segment

    def _advance_window(self, take: list[np.ndarray]) -> None:
        """Move past the finished window (and epoch)."""
        state = self.state
        state.cursors = [c + len(p) for c, p in zip(state.cursors, take)]
        state.window += 1
        state.window_step = state.step
        state.segments = [[self.world_size, 0]]
        if np.array_equal(state.cursors, self.layout().totals):
            if self._epoch_first_step == state.step:
                raise ValueError(f"split: epoch {state.epoch} has no usable {self.cfg.split} samples")
            state.epoch, state.window, state.cursors = state.epoch + 1, 0, [0] * len(MODALITIES)
            self._layout, self._epoch_first_step = None, state.step
        self._segment = None

    def _current(self) -> _Segment:
        """The segment holding the next step, advancing past finished windows."""
        while True:
            if self._segment is None:
                self._segment = self._build_segment()
            if self.state.segments[-1][1] < self._segment.steps:
                return self._segment
            self._advance_window(self._window_positions())

    def upcoming_epoch(self) -> int:
        """Epoch of the next step (rolls past finished windows and epochs first)."""
        self._current()
        return self.state.epoch

    def at_step(self, step: int) -> list[RankStep]:
        """Plans at global `step`, skipping ahead (forward only: each DataLoader worker keeps its own copy)."""
        if step < self.state.step:
            raise ValueError(f"step: {step} is behind the plan (at {self.state.step}); load an earlier state")
        while self.state.step < step:
            segment = self._current()
            skip = min(step - self.state.step, segment.steps - self.state.segments[-1][1])
            self.state.segments[-1][1] += skip
            self.state.step += skip
        return self.next_step()

    def next_step(self) -> list[RankStep]:
        """Plans of this object's ranks for the next step, then advance."""
        segment = self._current()
        state = self.state
        within = state.segments[-1][1]
        slot = int(segment.order[within])
        out = [self._rank_step(segment, rank, slot, within == 0) for rank in self.ranks]
        state.segments[-1][1] += 1
        state.step += 1
        return out

    def _rank_step(self, segment: _Segment, rank: int, slot: int, first: bool) -> RankStep:
        """The micro-batch in `slot` of the rank's cost-ordered list (empty past its end)."""
        plan = segment.ranks[rank]
        batch = plan.batches[slot] if slot < len(plan.batches) else np.zeros(0, dtype=np.int64)
        rows, grids = plan.rows, plan.grids
        samples = [SampleRef(shard=self.source.shard_url(int(rows["shard"][i])), key=str(rows["key"][i]),
                             modality=MODALITIES[int(rows["modality"][i])], group=str(rows["group"][i]),
                             sample_offset=int(rows["sample_offset"][i]), sample_size=int(rows["sample_size"][i]),
                             grid=grids[int(i)], drop_seed=int(plan.seeds["drop"][i]),
                             augment_seed=int(plan.seeds["augment"][i])) for i in batch]
        tokens, padding = batch_padding(plan, batch, self.packing)
        cost = float(plan.cost[slot]) if slot < len(plan.batches) else 0.0
        micro = MicroBatchPlan(epoch=self.state.epoch, step=self.state.step, rank=rank, samples=samples,
                               tokens=tokens, cost=cost)
        skipped = {"too_long": len(plan.too_long)} if first and len(plan.too_long) else {}
        return RankStep(plan=micro, padding=padding, skipped=skipped)
