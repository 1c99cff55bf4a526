"""Curriculum freezing that saves memory: a frozen parameter has `requires_grad=False` and no place in the
optimizer (no gradient, no Adam state), and a phase that changes what is frozen gets a new DeepSpeed engine.

Names in `curriculum.phases[i].values.frozen` are module prefixes of the MultimodalModel (`encoder`, `llm`,
`encoder.blocks.0`, ...). Parameters the model itself keeps frozen (LoRA's base weights: `TrainModule.fixed_frozen`)
never train, whatever a phase says.

When the trainable set changes, `carry_optimizer_state` moves what the continuing parameters had in the old engine
into the new one: the fp32 masters and the AdamW state (moments and step count) of every param group present in
both. Param groups are split by the prefixes any phase freezes (`optim.param_groups`), so a continuing group holds
the same parameters in the same order before and after, and DeepSpeed lays out its flat fp32 partitions (ZeRO 1-3)
the same way: each rank copies its own partitions, no collective and no full copy of any tensor. A group that
starts training is a group of its own with no state: AdamW starts it at step 0 with zero moments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from plait.trainer.optim import in_module

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
"""DeepSpeed engine counters a rebuilt engine continues from (a resumed one loads them from the checkpoint)."""


def check_frozen_names(module: nn.Module, phases_frozen: Iterable[tuple[int, list[str]]]) -> None:
    """Every `frozen` name of every phase must name a module holding parameters."""
    names = [name for name, _ in module.named_parameters()]
    for index, frozen in phases_frozen:
        for prefix in frozen:
            if not any(in_module(name, prefix) for name in names):
                raise ValueError(f"curriculum.phases[{index}].values.frozen: {prefix!r} names no module with "
                                 "parameters (use a MultimodalModel prefix such as encoder, resampler or llm)")


def trainable_names(module: nn.Module, fixed_frozen: frozenset[str], frozen: Iterable[str]) -> frozenset[str]:
    """Names of the parameters that train while the modules `frozen` are frozen."""
    frozen = list(frozen)
    return frozenset(name for name, _ in module.named_parameters()
                     if name not in fixed_frozen and not any(in_module(name, prefix) for prefix in frozen))


def set_trainable(module: nn.Module, trainable: frozenset[str]) -> None:
    """`requires_grad` on exactly the `trainable` parameters; fails when nothing would train."""
    if not trainable:
        raise ValueError("curriculum.phases[*].values.frozen: the phase freezes every parameter; nothing would train")
    for name, param in module.named_parameters():
        param.requires_grad_(name in trainable)


def current_trainable(module: nn.Module) -> frozenset[str]:
    """Names of the parameters that have `requires_grad`."""
    return frozenset(name for name, param in module.named_parameters() if param.requires_grad)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW DeepSpeed steps: wrapped by the ZeRO or bf16 optimizer, or the engine's own at ZeRO-0 fp32."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def group_masters(engine) -> dict[str, list[torch.Tensor]]:
    """Per param group name, the fp32 tensors AdamW updates on this rank (its keys into the AdamW state).

    ZeRO-3: the flat partitions of the group's sub-groups; ZeRO-1/2 and bf16 at ZeRO-0: the group's flat
    partition; ZeRO-0 in fp32: the parameters themselves.
    """
    wrapper, inner = engine.optimizer, inner_optimizer(engine)
    names = [group["name"] for group in inner.param_groups]
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        masters: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for sub_group, group in sorted(wrapper.sub_group_to_group_id.items()):
            masters[names[group]].append(wrapper.fp32_partitioned_groups_flat[sub_group])
        return masters
    for flats in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(wrapper, flats):
            return {name: [flat] for name, flat in zip(names, getattr(wrapper, flats))}
    return {group["name"]: list(group["params"]) for group in inner.param_groups}


@dataclass
class OptimizerCarry:
    """What the continuing param groups had in an engine about to be destroyed."""

    masters: dict[str, list[torch.Tensor]]
    """Group name -> the fp32 tensors AdamW updated (`group_masters`)."""
    states: dict[str, list[dict]]
    """Group name -> the AdamW state of each of those tensors (empty before the group's first step)."""
    counters: dict[str, int]
    """The engine's step and sample counters (`ENGINE_COUNTERS`)."""


def capture_optimizer_state(engine) -> OptimizerCarry:
    """Keep references to the masters and AdamW state of every group of `engine` (call before `destroy`)."""
    state = inner_optimizer(engine).state
    masters = group_masters(engine)
    return OptimizerCarry(masters=masters,
                          states={name: [state.get(t, {}) for t in tensors] for name, tensors in masters.items()},
                          counters={name: getattr(engine, name) for name in ENGINE_COUNTERS})


def carry_optimizer_state(carry: OptimizerCarry, engine) -> None:
    """Give the groups `engine` shares with `carry` their masters and AdamW state (bitwise); new groups stay fresh."""
    state = inner_optimizer(engine).state
    for name, tensors in group_masters(engine).items():
        if name not in carry.masters:
            continue
        old = carry.masters[name]
        if [t.shape for t in tensors] != [t.shape for t in old]:
            raise RuntimeError(f"param group {name}: its partitions changed shape across the engine rebuild "
                               f"({[tuple(t.shape) for t in old]} -> {[tuple(t.shape) for t in tensors]})")
        for new, master, saved in zip(tensors, old, carry.states[name]):
            if new is not master:
                new.data.copy_(master.data)
            if saved:
                state[new] = saved
    for counter, value in carry.counters.items():
        setattr(engine, counter, value)


def release_engine(engine) -> None:
    """Destroy `engine` and detach it from its module, which the next engine wraps again.

    `destroy` leaves the engine's own forward hooks on the module, and a `_hp_mapping` of None on the parameters
    ZeRO-1/2 owned; without that attribute a parameter that is now frozen reads as having no gradient.
    """
    engine.destroy()
    for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
        handle = getattr(engine, hook, None)
        if handle is not None:
            handle.remove()
    for param in engine.module.parameters():
        if hasattr(param, "_hp_mapping") and param._hp_mapping is None:
            del param._hp_mapping
