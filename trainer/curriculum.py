"""Declarative training curriculum: phases keyed by step, resolved to concrete values at any step.

YAML shape (the `curriculum:` section of a run config, or a file under configs/curricula/):

    curriculum:
      phases:
        - {start: 0, values: {resolution: {224: 1.0}, loss_weights: {contrastive: 0.75, caption: 0.25}}}
        - {start: 1000, transition: linear, ramp: 200, values: {resolution: {224: 0.7, 448: 0.3}}}

A phase lists only what changes; other values carry over from the previous phase, and a value no
phase has set yet is the run config's (`base_values`: `loss.weights`, `loss.hard_negatives.hard_fraction`,
`data.sizing.resolution`, `data.token_drop.rate`, `data.plan.mix`, `data.sources[].weight`). Weight dicts
(`loss_weights`, `lr_multipliers`, `source_weights`) update only the keys a phase names; probability tables
(`resolution`, `mix`) and lists replace the whole value. With `transition: linear` or `sigmoid`, numbers and dicts of numbers
move from the previous phase's values to this phase's over `ramp` steps starting at `start`; lists
switch at `start`. Values are a pure function of (config, step), so a resumed run sees exactly what
the uninterrupted one saw; checkpoints store the fingerprint of phases and base values to prove it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from plait.data.checks import check_table, is_number

if TYPE_CHECKING:
    from plait.trainer.config import RunConfig

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class CurriculumValues:
    """Everything the curriculum controls, resolved at one step (no defaults: see `base_values`)."""

    resolution: dict[int, float]
    """Image side length in pixels → probability (sizing's `curriculum` side distribution)."""
    token_drop_rate: float
    """Mean fraction of encoder tokens dropped per sample (NaViT); use a sigmoid transition for its schedule."""
    mix: dict[str, float]
    """Modality → sampling probability; empty = the data's natural proportions."""
    hard_negative_ratio: float
    """Fraction of contrastive negatives drawn as hard negatives (the rest easy/random)."""
    loss_weights: dict[str, float]
    """Loss name → weight (e.g. contrastive, caption, balance, z); a missing loss has weight 0."""
    frozen: list[str]
    """Module name prefixes frozen in this phase (e.g. encoder, resampler, llm)."""
    lr_multipliers: dict[str, float]
    """Parameter group → multiplier on the base learning rate; a missing group has multiplier 1."""
    source_weights: dict[str, float] = field(default_factory=dict)
    """Source name → relative weight in each window (`data.sources`); takes effect from the next window."""


def base_values(cfg: RunConfig) -> CurriculumValues:
    """What holds before (and without) any phase: each value from its home in the run config.

    Nothing is frozen and every group's multiplier is 1 (per-group peak LRs are `optim.group_lr`).
    """
    return CurriculumValues(resolution=dict(cfg.data.sizing.resolution), token_drop_rate=cfg.data.token_drop.rate,
                            mix=dict(cfg.data.plan.mix), hard_negative_ratio=cfg.loss.hard_negatives.hard_fraction,
                            loss_weights=dict(cfg.loss.weights), frozen=[], lr_multipliers={},
                            source_weights={source.name: source.weight for source in cfg.data.sources})


_KINDS: dict[str, str] = {
    "resolution": "probabilities",
    "token_drop_rate": "number",
    "mix": "probabilities",
    "hard_negative_ratio": "number",
    "loss_weights": "weights",
    "frozen": "names",
    "lr_multipliers": "weights",
    "source_weights": "weights",
}
"""How each value is validated and interpolated: numbers and dicts ramp, names switch."""

_MISSING_KEY = {"resolution": 0.0, "mix": 0.0, "loss_weights": 0.0, "lr_multipliers": 1.0, "source_weights": 0.0}
"""What a dict key absent on one side of a ramp counts as (a weight dict key first set by that phase)."""

_RANGES = {"token_drop_rate": (0.0, 0.99), "hard_negative_ratio": (0.0, 1.0)}
"""Closed ranges of the scalar values."""

_SIGMOID_SHARPNESS = 10.0
"""Steepness of the sigmoid transition over its ramp (NaViT-style smooth schedule)."""


def _check_scalar(path: str, name: str, value: object) -> float:
    """Validate a number value and return it as float."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{path}: expected a number, got {value!r}")
    lo, hi = _RANGES.get(name, (0.0, math.inf))
    if not lo <= value <= hi:
        raise ValueError(f"{path}: {value} is outside [{lo}, {hi}]")
    return float(value)


def validate_values(values: Mapping[str, object], path: str = "values") -> dict[str, object]:
    """Check a phase's partial values and return them normalised (floats, int resolution keys)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: expected a mapping of value name to value, got {values!r}")
    out: dict[str, object] = {}
    for name, value in values.items():
        kind = _KINDS.get(name)
        where = f"{path}.{name}"
        if kind is None:
            raise ValueError(f"{where}: unknown value, expected one of {sorted(_KINDS)}")
        if kind == "number":
            out[name] = _check_scalar(where, name, value)
        elif kind == "names":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: expected a list of names, got {value!r}")
            out[name] = list(value)
        else:
            out[name] = check_table(where, value, probabilities=kind == "probabilities",
                                    side_lengths=name == "resolution")
    return out


@dataclass(kw_only=True)
class PhaseConfig:
    """One curriculum phase: from `start`, the listed values apply (others carry over)."""

    start: int = 0
    """First step of the phase (the first phase starts at 0)."""
    transition: Literal["step", "linear", "sigmoid"] = "step"
    """How numbers move from the previous phase's values: at once, linearly, or along a sigmoid."""
    ramp: int = 0
    """Steps the linear/sigmoid transition takes, starting at `start` (0 = a step change)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Values this phase sets (names as in CurriculumValues); unlisted ones (and weight keys) carry over."""

    def __post_init__(self) -> None:
        if not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start: must be a non-negative integer, got {self.start!r}")
        if self.transition not in ("step", "linear", "sigmoid"):
            raise ValueError(f"transition: must be step, linear or sigmoid, got {self.transition!r}")
        if not isinstance(self.ramp, int) or self.ramp < 0:
            raise ValueError(f"ramp: must be a non-negative integer, got {self.ramp!r}")
        if self.transition != "step" and self.ramp == 0:
            raise ValueError(f"ramp: a {self.transition} transition needs ramp > 0")
        self.values = validate_values(self.values)


def _default_phases() -> list[PhaseConfig]:
    """One phase that sets nothing: the run config's values hold throughout."""
    return [PhaseConfig()]


@dataclass(kw_only=True)
class CurriculumConfig:
    """The curriculum: phases in order of strictly increasing start step."""

    phases: list[PhaseConfig] = field(default_factory=_default_phases)
    """Phases; the first starts at step 0 with a step transition."""

    def __post_init__(self) -> None:
        phases = []
        names = {f.name for f in fields(PhaseConfig)}
        for i, phase in enumerate(self.phases):
            if not isinstance(phase, PhaseConfig):
                unknown = sorted(set(phase) - names)
                if unknown:
                    raise ValueError(f"phases[{i}].{unknown[0]}: unknown field, expected one of {sorted(names)}")
                try:
                    phase = PhaseConfig(**phase)
                except ValueError as err:
                    raise ValueError(f"phases[{i}].{err}") from None
            phases.append(phase)
        self.phases = phases
        if not phases:
            raise ValueError("phases: needs at least one phase")
        if phases[0].start != 0:
            raise ValueError(f"phases[0].start: the first phase must start at 0, got {phases[0].start}")
        if phases[0].transition != "step":
            raise ValueError("phases[0].transition: the first phase has nothing to ramp from; use step")
        for i in range(1, len(phases)):
            if phases[i].start <= phases[i - 1].start:
                raise ValueError(f"phases[{i}].start: {phases[i].start} is not after "
                                 f"phases[{i - 1}].start={phases[i - 1].start}")
            if phases[i - 1].start + phases[i - 1].ramp > phases[i].start:
                raise ValueError(f"phases[{i - 1}].ramp: {phases[i - 1].ramp} steps run past "
                                 f"phases[{i}].start={phases[i].start}")

    def check_sources(self, names: list[str]) -> None:
        """Raise ValueError naming the phase whose `source_weights` names something other than `names`."""
        for i, phase in enumerate(self.phases):
            weights = phase.values.get("source_weights", {})
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise ValueError(f"curriculum.phases[{i}].values.source_weights: {unknown} are not data.sources "
                                 f"(those are {names})")
            if weights and not any(weights.values()) and set(weights) == set(names):
                raise ValueError(f"curriculum.phases[{i}].values.source_weights: every source has weight 0")

    def fingerprint(self) -> str:
        """Stable hash of the normalised phases (with equal base values, equal values at every step)."""
        return _digest([asdict(p) for p in self.phases])


def _digest(data: object) -> str:
    """Stable hex hash of JSON-able data."""
    canonical = json.dumps(data, sort_keys=True, default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _shape(transition: str, progress: float) -> float:
    """Fraction of the way from old to new values at `progress` in [0, 1] of the ramp."""
    if transition == "linear":
        return progress
    k = _SIGMOID_SHARPNESS
    low, high = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
    return (1 / (1 + math.exp(-k * (progress - 0.5))) - low) / (high - low)


def _settle(name: str, old: object, new: object) -> object:
    """A phase's value over the previous one: weight dicts update the named keys, the rest replace."""
    return {**old, **new} if _KINDS[name] == "weights" else new


def _blend(name: str, old: object, new: object, f: float) -> object:
    """Interpolate one value a fraction `f` of the way from `old` to `new`."""
    kind = _KINDS[name]
    if kind == "names":
        return list(new)
    if kind == "number":
        return old + f * (new - old)
    missing = _MISSING_KEY[name]
    keys = list(dict.fromkeys([*old, *new]))
    return {k: old.get(k, missing) + f * (new.get(k, missing) - old.get(k, missing)) for k in keys}


class Curriculum:
    """Resolves a CurriculumConfig over base values at any step; the state for checkpoints is (fingerprint, step)."""

    def __init__(self, cfg: CurriculumConfig, base: CurriculumValues) -> None:
        self.cfg = cfg
        base_dict = asdict(base)
        if not base_dict["source_weights"]:  # runs without sources keep the fingerprints they always had
            del base_dict["source_weights"]
        self.fingerprint = _digest({"phases": cfg.fingerprint(), "base": base_dict})
        self.step = 0
        self._starts = [phase.start for phase in cfg.phases]
        self._targets: list[dict[str, object]] = []
        current = asdict(base)
        for phase in cfg.phases:
            current = {name: _settle(name, old, phase.values[name]) if name in phase.values else old
                       for name, old in current.items()}
            self._targets.append(current)

    @classmethod
    def from_run(cls, cfg: RunConfig) -> Curriculum:
        """The run's curriculum over its config's base values (what the trainer, plan and `show` all use)."""
        return cls(cfg.curriculum, base_values(cfg))

    def phase_values(self, index: int) -> CurriculumValues:
        """Values phase `index` settles at once its ramp is over."""
        return CurriculumValues(**copy.deepcopy(self._targets[index]))

    def phase_index(self, step: int) -> int:
        """Index of the phase in force at `step`."""
        return max(bisect_right(self._starts, step) - 1, 0)

    def at(self, step: int) -> CurriculumValues:
        """Values at `step` (also remembered as the current step for `state_dict`)."""
        self.step = int(step)
        return self.resolve(step)

    def resolve(self, step: int) -> CurriculumValues:
        """Values at `step`, without touching the checkpointed step (for tables and plots)."""
        i = self.phase_index(step)
        phase, target = self.cfg.phases[i], self._targets[i]
        resolved = target
        if i > 0 and phase.transition != "step" and step < phase.start + phase.ramp:
            f = _shape(phase.transition, (step - phase.start) / phase.ramp)
            previous = self._targets[i - 1]
            resolved = {name: _blend(name, previous[name], target[name], f) for name in target}
        return CurriculumValues(**copy.deepcopy(resolved))

    def next_change(self, step: int, names: tuple[str, ...], every: int) -> int | None:
        """The first step after `step` at which one of `names` may change: the start of a later phase that sets
        one, or inside such a phase's ramp the next multiple of `every` steps into it (or the ramp's end)."""
        changes = []
        for phase in self.cfg.phases[1:]:
            if not any(name in phase.values for name in names):
                continue
            end = phase.start + phase.ramp
            if phase.start > step:
                changes.append(phase.start)
            elif step < end:
                changes.append(min(phase.start + ((step - phase.start) // every + 1) * every, end))
        return min(changes, default=None)

    def state_dict(self) -> dict[str, object]:
        """Checkpoint state: the fingerprint (phases and base values) and the current step."""
        return {"fingerprint": self.fingerprint, "step": self.step}

    def load_state_dict(self, state: Mapping[str, object], strict: bool = True) -> None:
        """Restore the step; a different fingerprint raises (strict) or warns (the schedule or its base changed)."""
        if state["fingerprint"] != self.fingerprint:
            message = (f"curriculum changed since the checkpoint (fingerprint {state['fingerprint']} → "
                       f"{self.fingerprint}); a resumed run will not match the original")
            if strict:
                raise ValueError(message)
            logger.warning(message)
        self.step = int(state["step"])


def _format(value: object) -> str:
    """Compact text of one value for the table."""
    if isinstance(value, dict):
        return " ".join(f"{k}:{v:.3g}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ",".join(value) or "-"
    return f"{value:.3g}"


def curriculum_table(curriculum: Curriculum) -> str:
    """Plain-text table: one column per phase (start, transition) and one row per value, resolved."""
    cfg = curriculum.cfg
    settled = [asdict(curriculum.phase_values(i)) for i in range(len(cfg.phases))]
    header = ["value"] + [f"phase {i}" for i in range(len(cfg.phases))]
    rows = [header,
            ["start"] + [str(p.start) for p in cfg.phases],
            ["transition"] + [p.transition if p.transition == "step" else f"{p.transition}/{p.ramp}"
                              for p in cfg.phases]]
    for f in fields(CurriculumValues):
        cells = []
        for i, phase in enumerate(cfg.phases):
            mark = "*" if f.name in phase.values else " "
            cells.append(mark + _format(settled[i][f.name]))
        rows.append([f.name] + cells)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + ["(* = set in this phase; other values carry over, unset ones are the run config's)"])


def curriculum_series(curriculum: Curriculum, steps: int | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Up to 400 steps over 0..steps (default: 25% past the last change) and the values resolved at each."""
    last = max(p.start + p.ramp for p in curriculum.cfg.phases)
    steps = steps or max(int(last * 1.25), 10)
    xs = np.unique(np.linspace(0, steps, 400).astype(np.int64))
    return xs, [asdict(curriculum.resolve(int(x))) for x in xs]


def plot_curriculum(curriculum: Curriculum, path: str | Path, steps: int | None = None) -> None:
    """Write a PNG of every value that is set, as the run applies it (`curriculum_series`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = curriculum.cfg
    xs, series = curriculum_series(curriculum, steps)
    panels = [name for name, kind in _KINDS.items() if kind != "names" and any(s[name] for s in series)]
    figure = Figure(figsize=(8, 1.8 * len(panels) + 0.6), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for axis, name in zip(axes, panels):
        keys = [name] if _KINDS[name] == "number" else list(dict.fromkeys(k for s in series for k in s[name]))
        for key in keys:
            ys = [s[name] if key == name else s[name].get(key, _MISSING_KEY[name]) for s in series]
            axis.plot(xs, ys, label=str(key))
        for phase in cfg.phases[1:]:
            axis.axvline(phase.start, color="grey", linestyle=":", linewidth=0.8)
        axis.set_ylabel(name, fontsize=8)
        axis.legend(fontsize=7, loc="upper right")
    for i, phase in enumerate(cfg.phases):
        axes[0].annotate(f"frozen: {_format(curriculum.phase_values(i).frozen)}", (phase.start, 1.0),
                         xycoords=("data", "axes fraction"), va="bottom", fontsize=7)
    axes[-1].set_xlabel("step")
    figure.savefig(path, dpi=100)
