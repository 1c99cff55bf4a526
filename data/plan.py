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
from plait.data.plan_state import PlanState, mix_weights, stream_weights, weighted_take, window_take
from plait.data.plan_types import MicroBatchPlan, SampleRef, native_clip
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
WeightsAt = Callable[[int], Mapping[str, float]]
"""Optimizer step → weight of each named source (`Sources`), e.g. the curriculum's `source_weights`."""
NextChange = Callable[[int], "int | None"]
"""Optimizer step → the next later step at which the sizing values (resolution, token drop) change, or None."""


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
    sampling: Literal["once", "weighted"] = "once"
    """With several `data.sources`: `once` uses every sample of every source once per epoch (weights set the order:
    a heavier source is used up sooner, then the others fill the windows); `weighted` draws each window by weight
    alone, a source that runs out starting over (repeats within an epoch), an epoch being as many samples as all
    sources hold. Held-out walks are always `once`."""
    replan_every: int = 100
    """During a curriculum ramp of resolution or token drop, each rank re-sizes what it has left at least every
    this many optimizer steps (a step change takes effect at its own step)."""

    def __post_init__(self) -> None:
        check_positive(self, "window_samples", "manifest_cache", "replan_every")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.split not in ("train", "eval"):
            raise ValueError(f"split: must be train or eval, got {self.split!r}")
        if self.sampling not in ("once", "weighted"):
            raise ValueError(f"sampling: must be once or weighted, got {self.sampling!r}")
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
    values: dict[str, object] = field(default_factory=dict)
    """The curriculum's sizing values in force (resolution, token drop rate)."""

    @property
    def sources(self) -> dict[str, int]:
        """Samples of each named source in this micro-batch (empty for a single dataset)."""
        counts: dict[str, int] = {}
        for ref in self.plan.samples:
            if ref.source:
                counts[ref.source] = counts.get(ref.source, 0) + 1
        return counts

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
    """Plan one rank's share (`positions[k]` of each stream) of a window segment."""
    rows = concat_rows([read_positions(source, layout, k, p) for k, p in enumerate(positions) if len(p)])
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
    """One segment of a window: the plans of the ranks this process needs, its step count and step order."""

    world_size: int
    ranks: dict[int, RankPlan]
    steps: int
    """Steps every rank of the segment runs (the max over ranks, computed or agreed)."""
    limit: int
    """Steps before the curriculum's next sizing change cuts the segment (`steps` when it is not cut)."""
    order: np.ndarray
    values: dict[str, object]
    """The curriculum's sizing values the segment was planned with (resolution, token drop rate)."""


def leftover(plan: RankPlan, order: np.ndarray, consumed: int, streams: int) -> list[np.ndarray]:
    """Positions in each of the `streams` of the rank's samples not in its first `consumed` steps (too-long ones
    excluded: they never fit)."""
    done = [plan.batches[k] for k in order[:consumed].tolist() if k < len(plan.batches)]
    used = np.zeros(len(plan.rows["key"]), dtype=bool)
    used[np.concatenate([np.zeros(0, dtype=np.int64), plan.too_long, *done])] = True
    rows = plan.rows
    return [np.sort(rows["position"][~used & (rows["stream"] == k)]) for k in range(streams)]


class SamplePlan:
    """Deterministic per-(step, rank) micro-batch plans with exact and elastic resume.

    Steps are micro-batch indices; `accumulation` of them make an optimizer step, the unit `values_at` and
    `next_change` take. With `agree`, the plan computes only `ranks`' shares and agrees on each segment's
    step count through it; without, it plans every rank to find the count itself.
    """

    def __init__(self, source: ShardSource, *, seed: int, sizing: SizingConfig, token_drop: TokenDropConfig,
                 packing: PackingConfig, values_at: ValuesAt, world_size: int, ranks: list[int] | None = None,
                 config: PlanConfig | None = None, agree: AgreeMax | None = None, fingerprint_extra: str = "",
                 accumulation: int = 1, next_change: NextChange | None = None,
                 source_weights_at: WeightsAt | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size: must be >= 1, got {world_size}")
        if accumulation < 1:
            raise ValueError(f"accumulation: must be >= 1, got {accumulation}")
        self.source, self.seed, self.values_at, self.world_size = source, seed, values_at, world_size
        self.sizing, self.token_drop, self.packing = sizing, token_drop, packing
        self.cfg = config or PlanConfig()
        self.ranks = list(range(world_size)) if ranks is None else list(ranks)
        if any(not 0 <= r < world_size for r in self.ranks):
            raise ValueError(f"ranks: {self.ranks} are not all in [0, {world_size})")
        self.agree = agree
        self.next_change = next_change
        self.split = SplitSpec(heldout=self.cfg.split == "eval", fraction=self.cfg.eval_fraction)
        self._counts = source.counts()
        self.streams = self._counts.shape[1]
        several = self.streams > len(MODALITIES)
        self.sampling = self.cfg.sampling if self.cfg.split == "train" and several else "once"
        self.source_weights_at = source_weights_at
        self.state = PlanState(fingerprint=self._fingerprint(fingerprint_extra), accumulation=accumulation,
                               cursors=[0] * self.streams)
        self._layout: EpochLayout | None = None
        self._segment: _Segment | None = None
        self._epoch_first_step: int | None = 0

    def _fingerprint(self, extra: str) -> str:
        """Hash of all plan inputs except the world size and the accumulation."""
        parts = {"seed": self.seed, "data": self.source.identity(), "sizing": asdict(self.sizing),
                 "token_drop": asdict(self.token_drop), "packing": asdict(self.packing),
                 "window": self.cfg.window_samples, "split": self.cfg.split, "mix": self.cfg.mix,
                 "eval_fraction": self.cfg.eval_fraction, "replan_every": self.cfg.replan_every, "extra": extra}
        if self.streams > len(MODALITIES):
            parts["sampling"] = self.sampling
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=8).hexdigest()

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The plan position (same on every rank, a few hundred bytes)."""
        return self.state.to_dict()

    def load_state_dict(self, state: Mapping) -> None:
        """Resume: same world size continues exactly; another one re-plans what the current window has left.
        The accumulation continues as this plan's (re-anchored at the saved step when it differs)."""
        loaded = PlanState.from_dict(state)
        if loaded.fingerprint != self.state.fingerprint:
            raise ValueError(f"fingerprint: plan state {loaded.fingerprint} was made with other data or settings "
                             f"(now {self.state.fingerprint})")
        if loaded.segments and loaded.segments[-1][0] != self.world_size:
            pooled = [self.world_size, 0, -1, 0, loaded.optimizer_step(loaded.step)]
            if loaded.segments[-1][1] == 0:
                loaded.segments[-1] = pooled
            else:
                loaded.segments.append(pooled)
        loaded.set_accumulation(self.state.accumulation)
        self.state = loaded
        self._layout, self._segment, self._epoch_first_step = None, None, None

    def _new_segment(self, local: bool) -> list[int]:
        """A segment starting at the next micro-batch, not yet planned."""
        return [self.world_size, 0, -1, int(local), self.state.optimizer_step(self.state.step)]

    def index_of(self, step: int, micro: int = 0) -> int:
        """The micro-batch index of micro-batch `micro` of optimizer step `step`."""
        return self.state.first_index(step) + micro

    # ----------------------------------------------------------------- planning

    def layout(self) -> EpochLayout:
        """The current epoch's shard order and stream offsets."""
        if self._layout is None:
            self._layout = EpochLayout.build(self._counts, self.seed, self.state.epoch)
        return self._layout

    def _window_positions(self) -> list[np.ndarray]:
        """Positions in each stream that the current window takes (the mix and source weights at its start)."""
        state, totals = self.state, self.layout().totals
        step = state.segments[0][4]
        _, _, mix = self.values_at(step)
        cursors = np.array(state.cursors, dtype=np.int64)
        sources = self._source_weights(step)
        if self.sampling == "weighted":
            weights = stream_weights(totals, mix_weights(mix), sources)
            take = weighted_take(int(totals.sum() - cursors.sum()), weights, totals, self.cfg.window_samples)
        else:
            weights = stream_weights(totals - cursors, mix_weights(mix), sources)
            take = window_take(totals - cursors, weights, self.cfg.window_samples)
        return [np.arange(c, c + n, dtype=np.int64) for c, n in zip(cursors, take)]

    def _source_weights(self, step: int) -> np.ndarray | None:
        """Weight of each source at optimizer step `step` in source order; None for a single dataset."""
        names = getattr(self.source, "source_names", None)
        if names is None:
            return None
        weights = self.source_weights_at(step) if self.source_weights_at else self.source.weights
        return np.array([float(weights[name]) for name in names])

    def _source_name(self, stream: int) -> str:
        """Name of the source a stream belongs to ('' for a single dataset)."""
        names = getattr(self.source, "source_names", None)
        return names[stream // len(MODALITIES)] if names else ""

    def _epoch_done(self) -> bool:
        """Whether the windows so far used up the epoch (every stream, or as many samples as all hold)."""
        totals, cursors = self.layout().totals, np.asarray(self.state.cursors)
        if self.sampling == "weighted":
            return int(cursors.sum()) >= int(totals.sum())
        return bool(np.array_equal(cursors, totals))

    def _inputs(self, step: int) -> SizingInputs:
        """Sizing inputs of a segment starting at optimizer step `step` (the curriculum values there)."""
        resolution, drop_rate, _ = self.values_at(step)
        return SizingInputs(self.seed, self.state.epoch, self.sizing, self.token_drop, self.packing,
                            resolution, drop_rate)

    def _limit(self, start: int, step: int, steps: int) -> int:
        """Steps of a segment starting at micro-batch `start` (optimizer step `step`) before the curriculum next
        changes the sizing values."""
        change = self.next_change(step) if self.next_change else None
        return steps if change is None else min(steps, self.state.first_index(change) - start)

    def _plan_segment(self, index: int, start: int, shares: dict[int, list[np.ndarray]]) -> _Segment:
        """Plan the given ranks' shares of segment `index` (starting at micro-batch `start`); its step count is
        the saved one, else the max over ranks (all of them planned, or agreed)."""
        state = self.state
        world, _, steps, _, first_step = state.segments[index]
        inputs = self._inputs(first_step)
        plans = {r: plan_rank(self.source, self.layout(), share, inputs, self.split, (state.epoch, state.window,
                                                                                       index, r))
                 for r, share in shares.items()}
        if steps < 0:
            longest = max((len(p.batches) for p in plans.values()), default=0)
            steps = longest if len(plans) == world else self.agree(longest)
            state.segments[index][2] = steps
        order = keyed_rng(self.seed, "plan-step-order", state.epoch, state.window, index).permutation(steps)
        values = {"resolution": dict(inputs.resolution), "token_drop_rate": inputs.drop_rate}
        return _Segment(world, plans, steps, self._limit(start, first_step, steps), order, values)

    def _needed_ranks(self) -> list[list[int]]:
        """Ranks to plan in each segment of the window: every rank where the step count or a pooled leftover
        needs them all, else only this plan's ranks (a curriculum cut keeps each rank's leftover local)."""
        segments = self.state.segments
        everyone = self.agree is None
        needed = [self.ranks if not everyone else list(range(segments[-1][0]))]
        for k in range(len(segments) - 2, -1, -1):
            local = segments[k + 1][3] and not everyone
            needed.insert(0, needed[0] if local else list(range(segments[k][0])))
        return needed

    def _build_segment(self) -> _Segment:
        """Re-plan the current window's earlier segments (if any), then plan the one in progress."""
        state = self.state
        if not state.segments:
            state.segments = [self._new_segment(local=False)]
        pooled, kept = self._window_positions(), {}
        start = state.window_step
        for index, ranks in enumerate(self._needed_ranks()):
            world, consumed, _, local, _ = state.segments[index]
            shares = {r: kept[r] for r in ranks} if local else {r: [rank_share(p, world, r) for p in pooled]
                                                                 for r in ranks}
            segment = self._plan_segment(index, start, shares)
            if index == len(state.segments) - 1:
                break
            kept = {r: leftover(plan, segment.order, consumed, self.streams) for r, plan in segment.ranks.items()}
            pooled = [np.sort(np.concatenate([share[k] for share in kept.values()])) for k in range(self.streams)]
            start += consumed
        for plan in segment.ranks.values():
            add_seeds(plan, self.seed, state.epoch)
        return segment

    def _cut(self, segment: _Segment) -> _Segment:
        """The segment that follows a curriculum cut: each planned rank's leftover, re-planned at the new values."""
        state = self.state
        consumed = state.segments[-1][1]
        start = state.step
        kept = {r: leftover(plan, segment.order, consumed, self.streams) for r, plan in segment.ranks.items()}
        state.segments.append(self._new_segment(local=True))
        cut = self._plan_segment(len(state.segments) - 1, start, kept)
        for plan in cut.ranks.values():
            add_seeds(plan, self.seed, state.epoch)
        return cut

    def _advance_window(self, take: list[np.ndarray]) -> None:
        """Move past the finished window (and epoch)."""
        state = self.state
        state.cursors = [c + len(p) for c, p in zip(state.cursors, take)]
        state.window += 1
        state.window_step = state.step
        state.segments = [self._new_segment(local=False)]
        if self._epoch_done():
            if self._epoch_first_step == state.step:
                raise ValueError(f"split: epoch {state.epoch} has no usable {self.cfg.split} samples")
            state.epoch, state.window, state.cursors = state.epoch + 1, 0, [0] * self.streams
            self._layout, self._epoch_first_step = None, state.step
        self._segment = None

    def _current(self) -> _Segment:
        """The segment holding the next step, cutting at curriculum changes and advancing past finished windows."""
        while True:
            if self._segment is None:
                self._segment = self._build_segment()
            segment, consumed = self._segment, self.state.segments[-1][1]
            if consumed < segment.limit:
                return segment
            if segment.limit < segment.steps:
                self._segment = self._cut(segment)
            else:
                self._advance_window(self._window_positions())

    def upcoming_epoch(self) -> int:
        """Epoch of the next step (rolls past finished windows and epochs first)."""
        self._current()
        return self.state.epoch

    def at_step(self, index: int) -> list[RankStep]:
        """Plans at micro-batch `index`, skipping ahead (forward only)."""
        if index < self.state.step:
            raise ValueError(f"step: {index} is behind the plan (at {self.state.step}); load an earlier state")
        while self.state.step < index:
            segment = self._current()
            skip = min(index - self.state.step, segment.limit - self.state.segments[-1][1])
            self.state.segments[-1][1] += skip
            self.state.step += skip
        return self.next_step()

    def next_step(self) -> list[RankStep]:
        """Plans of this object's ranks for the next micro-batch, then advance."""
        segment = self._current()
        state = self.state
        within = state.segments[-1][1]
        slot = int(segment.order[within])
        out = [self._rank_step(segment, rank, slot, within == 0) for rank in self.ranks]
        state.segments[-1][1] += 1
        state.step += 1
        return out

    def _sample_ref(self, plan: RankPlan, i: int) -> SampleRef:
        """The loader's view of sample `i` of a rank's plan: where its bytes are and every choice made for it."""
        rows = plan.rows
        modality = MODALITIES[int(rows["modality"][i])]
        return SampleRef(shard=self.source.shard_url(int(rows["shard"][i])), key=str(rows["key"][i]),
                         modality=modality, group=str(rows["group"][i]), sample_offset=int(rows["sample_offset"][i]),
                         sample_size=int(rows["sample_size"][i]), grid=plan.grids[i],
                         drop_seed=int(plan.seeds["drop"][i]), augment_seed=int(plan.seeds["augment"][i]),
                         source=self._source_name(int(rows["stream"][i])),
                         native=native_clip(modality, rows["frames"][i], rows["fps"][i]))

    def _rank_step(self, segment: _Segment, rank: int, slot: int, first: bool) -> RankStep:
        """The micro-batch in `slot` of the rank's cost-ordered list (empty past its end)."""
        plan = segment.ranks[rank]
        batch = plan.batches[slot] if slot < len(plan.batches) else np.zeros(0, dtype=np.int64)
        samples = [self._sample_ref(plan, int(i)) for i in batch]
        tokens, padding = batch_padding(plan, batch, self.packing)
        cost = float(plan.cost[slot]) if slot < len(plan.batches) else 0.0
        state = self.state
        step = state.optimizer_step(state.step)
        micro = MicroBatchPlan(epoch=state.epoch, step=step, micro=state.step - state.first_index(step),
                               index=state.step, rank=rank, samples=samples, tokens=tokens, cost=cost)
        skipped = {"too_long": len(plan.too_long)} if first and len(plan.too_long) else {}
        return RankStep(plan=micro, padding=padding, skipped=skipped, values=segment.values)
