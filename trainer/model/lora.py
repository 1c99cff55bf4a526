"""LoRA adapters (peft) on the Hugging Face causal LM, injected in place, and their merge back into the base weights.

`peft.inject_adapter_in_model` wraps the targeted layers where they sit (no `PeftModel` around the LLM), so
`PackedCausalLM` runs unchanged. MoME layers never get adapters: their experts and routers keep training in full,
every other LLM weight is frozen. Under ZeRO-3 the base weights are already partitioned when adapters are added:
peft reads their shapes from `in_features`/`out_features` (Linear) and `ds_shape` (GPT-2's Conv1D), and the adapters
are plain parameters that DeepSpeed partitions at `initialize`.
"""

from __future__ import annotations

import logging

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from plait.trainer.model.config import LoRAConfig
from plait.trainer.model.mome import MoMELayer

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
"""peft's shorthand for every linear (and Conv1D) layer but the output head."""


def _excluded_modules(model: PreTrainedModel) -> list[str]:
    """Full names of the modules that never get an adapter: the output head and everything inside a MoME layer."""
    head = model.get_output_embeddings()
    names = [name for name, module in model.named_modules() if head is not None and module is head]
    for prefix, module in model.named_modules():
        if isinstance(module, MoMELayer):
            names += [f"{prefix}.{name}" for name, _ in module.named_modules() if name]
    return names


def peft_config(model: PreTrainedModel, cfg: LoRAConfig) -> LoraConfig:
    """The peft `LoraConfig` of `cfg` for `model` (Conv1D layers, as in GPT-2, store their weight transposed)."""
    targets = list(cfg.target_modules)
    if ALL_LINEAR in targets and len(targets) > 1:
        raise ValueError(f"lora.target_modules: `{ALL_LINEAR}` must stand alone, got {targets}")
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        exclude_modules=_excluded_modules(model),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        bias="none",
    )


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of every wrapped layer."""
    return [p for m in model.modules() if isinstance(m, LoraLayer)
            for name in m.adapter_layer_names for p in getattr(m, name).parameters()]


def _mome_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every MoME layer (experts, routers): new or upcycled, they keep training under LoRA."""
    return [p for m in model.modules() if isinstance(m, MoMELayer) for p in m.parameters()]


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of `model` carries a LoRA adapter."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


def apply_lora(model: PreTrainedModel, cfg: LoRAConfig) -> None:
    """Add LoRA adapters to `cfg.target_modules` of `model` in place and freeze every weight but adapters and MoME.

    Adapter init draws from torch's default generator (lora_A; lora_B starts at zero, so the output is unchanged):
    the same seed gives the same adapters on every rank. Call it outside zero.Init.
    """
    if has_lora(model):
        raise ValueError(f"lora: {type(model).__name__} already has LoRA adapters")
    inject_adapter_in_model(peft_config(model, cfg), model)
    adapters = _adapter_parameters(model)
    if any(hasattr(p, "ds_id") for p in adapters):
        raise RuntimeError("apply_lora: the adapters came out partitioned (called inside deepspeed.zero.Init, which "
                           "skips their init); call it after the build, outside zero.Init")
    trainable = {id(p) for p in adapters + _mome_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)
    wrapped = sum(isinstance(m, LoraLayer) for m in model.modules())
    logger.info("lora: adapters (r=%d) on %d layers of %s", cfg.r, wrapped, type(model).__name__)


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain base layer back in its place (stock architecture).

    Needs full weights: merge a consolidated model (as `plait export` loads it), not a ZeRO-3 partitioned one.
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(f"merge_lora: {type(model).__name__} is ZeRO-3 partitioned; merge a consolidated model")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in layers:
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
