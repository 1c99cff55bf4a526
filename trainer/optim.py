"""Parameter groups (encoder / resampler / llm / routers / objective x decay / no decay), the learning-rate
schedule (warmup + cosine, WSD or constant) and curriculum LR multipliers.

Groups hold only trainable parameters (`requires_grad`): frozen ones get no gradient and no Adam state
(`freezing.py` flips `requires_grad` and rebuilds the engine when a curriculum phase changes what is frozen).
Groups are also split by the module prefixes any phase freezes, so each group freezes and unfreezes as a whole
and a group that starts training again is a group of its own, with its own step count. Every step
`apply_schedule` writes each group's LR, so the schedule is a pure function of the step (exact on resume).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
import torch
from torch import nn

from plait.trainer.config import OptimConfig
from plait.trainer.curriculum import CurriculumValues
from plait.trainer.model.resampler import LearnedLatents

GROUPS = ("encoder", "resampler", "llm", "routers", "objective")
"""Parameter groups with their own peak LR (`optim.group_lr`) and curriculum multiplier (`lr_multipliers`)."""

MODEL_PREFIX = "model."
"""Where the MultimodalModel sits in the trained module; curriculum `frozen` names are relative to it."""

_NO_DECAY_LEAVES = ("bias", "logit_scale", "b_in", "b_out", "shared_b_in", "shared_b_out")
"""Parameter names that never get weight decay (biases, MoME expert biases stacked [E, F], the temperature)."""
_NO_DECAY_OWNERS = (nn.Embedding, LearnedLatents, nn.LayerNorm)
"""Modules whose parameters never get weight decay (embeddings, learned queries, norms)."""


def group_of(name: str) -> str:
    """The LR group of a parameter from its name in the trained module."""
    if ".router." in name:
        return "routers"
    for group in ("encoder", "resampler", "llm"):
        if name.startswith(f"{MODEL_PREFIX}{group}."):
            return group
    return "objective"


def decays(name: str, param: torch.Tensor, owner: nn.Module) -> bool:
    """Weight decay only on matrices: never on norms, biases, embeddings, latents or the temperature."""
    # A parameter zero.Init partitioned is an empty 1-D placeholder; `ds_shape` is its real shape.
    leaf = name.rsplit(".", 1)[-1]
    if len(getattr(param, "ds_shape", param.shape)) < 2 or leaf in _NO_DECAY_LEAVES:
        return False
    return not isinstance(owner, _NO_DECAY_OWNERS) and "norm" not in type(owner).__name__.lower()


def frozen_prefixes(phases_frozen: Iterable[list[str]]) -> list[str]:
    """Every module prefix any curriculum phase freezes (each parameter group is split by these)."""
    return sorted({prefix for frozen in phases_frozen for prefix in frozen})


def in_module(name: str, prefix: str) -> bool:
    """Whether parameter `name` of the trained module lies in model module `prefix` (a curriculum `frozen` name)."""
    relative = name.removeprefix(MODEL_PREFIX)
    return name.startswith(MODEL_PREFIX) and (relative == prefix or relative.startswith(prefix + "."))


def param_groups(module: nn.Module, cfg: OptimConfig, freezable: list[str] = ()) -> list[dict]:
    """AdamW param groups of the trainable parameters: one per (LR group, decay or not, freezable prefixes),
    empty ones left out.

    Each group also carries plain `name`, `group` and `peak_lr` keys (saved with the optimizer).
    """
    owners = {f"{name}.{leaf}" if name else leaf: mod
              for name, mod in module.named_modules() for leaf, _ in mod.named_parameters(recurse=False)}
    buckets: dict[tuple[str, bool, tuple[str, ...]], list[torch.nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        prefixes = tuple(p for p in freezable if in_module(name, p))
        key = (group_of(name), decays(name, param, owners[name]), prefixes)
        buckets.setdefault(key, []).append(param)
    groups = []
    for (group, decay, prefixes), params in sorted(buckets.items()):
        name = "/".join([group, "decay" if decay else "no_decay"] + ([",".join(prefixes)] if prefixes else []))
        peak = cfg.group_lr.get(group, cfg.lr)
        groups.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": peak,
                       "name": name, "group": group, "peak_lr": peak})
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig, freezable: list[str] = ()) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (the client optimizer DeepSpeed wraps; needs no JIT build)."""
    return torch.optim.AdamW(param_groups(module, cfg, freezable), lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Schedule multiplier at optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(cfg.wsd_decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
    return 1.0 - (1 - floor) * progress


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, total_steps: int,
                   values: CurriculumValues) -> dict[str, float]:
    """Write every group's LR for `step` (schedule x curriculum multiplier); returns the LR of each LR group
    that trains (a frozen one has no param group)."""
    factor = lr_factor(step, cfg, total_steps)
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        lr = group["peak_lr"] * factor * values.lr_multipliers.get(group["group"], 1.0)
        group["lr"] = lr
        lrs[group["group"]] = max(lrs.get(group["group"], 0.0), lr)
    return lrs
