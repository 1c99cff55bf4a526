"""The causal LM alone in a stock Hugging Face format, so `AutoModelForCausalLM.from_pretrained` loads it without plait.

An LLM without MoME layers saves as itself. A MoME layer has no stock counterpart, but a stock model only sees text,
and a MoME layer's text routing is exactly a stock MoE block when its router is per-modality without bias, it is
dropless and its experts are gated MLPs without biases of the config's activation. The block then gets the router's
text rows and the stacked experts as transformers 5 holds them (`experts.gate_up_proj [E, 2F, D]`, gate rows then up
rows, and `experts.down_proj [E, D, F]`; `save_pretrained` writes them back in the per-expert checkpoint layout):

- Qwen2 -> Qwen2-MoE: `mlp_only_layers` keep the dense MLPs. The shared expert sits behind Qwen2-MoE's sigmoid
  `shared_expert_gate`; its zero weight gives 0.5, so the down projection is stored doubled (exact in floating point).
  Without a shared expert the slot has width 0.
- Qwen3 -> Qwen3-MoE (no shared expert).
- Mistral, and Llama without biases -> Mixtral, when every layer is MoME (Mixtral always renormalises the top-k).

Anything else raises `StockExportError` naming each layer and why, rather than a model whose MLPs load as random
weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN

from plait.data.batch import TEXT_TOKEN
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.mome import MoMELayer

IDENTITY_KEYS = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path",
                           "plait_attention_backend"})
"""Dense config entries that name the class or plait's own settings rather than the network: not carried over."""


class StockExportError(ValueError):
    """The LLM's MoME layers have no exact stock transformers form; `reasons` says where and why."""

    def __init__(self, architecture: str, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__(f"{architecture} with MoME layers has no exact stock transformers form:\n  "
                         + "\n  ".join(reasons))


@dataclass(frozen=True)
class MoEShape:
    """What a stock MoE config needs to know about the LLM's MoME layers."""

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    normalize_topk: bool
    expert_width: int
    """F of the routed experts."""
    shared_width: int
    """F of the shared expert; 0 without one."""


def _qwen_moe_fields(shape: MoEShape) -> dict[str, Any]:
    """Qwen2-/Qwen3-MoE: experts in the listed layers only, top-k renormalised as configured."""
    return {"num_experts": shape.num_experts, "num_experts_per_tok": shape.top_k,
            "moe_intermediate_size": shape.expert_width, "norm_topk_prob": shape.normalize_topk,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(shape.num_layers) if i not in shape.moe_layers]}


def _qwen2_moe_fields(shape: MoEShape) -> dict[str, Any]:
    """Qwen2-MoE: as Qwen3-MoE plus the shared-expert slot; Qwen2's attention always has q/k/v biases."""
    return {**_qwen_moe_fields(shape), "shared_expert_intermediate_size": shape.shared_width, "qkv_bias": True}


def _mixtral_fields(shape: MoEShape) -> dict[str, Any]:
    """Mixtral: experts in every layer, of the dense `intermediate_size`."""
    return {"num_local_experts": shape.num_experts, "num_experts_per_tok": shape.top_k}


def _any_value(value: Any, dense: PretrainedConfig) -> bool:
    """A dense-only entry the MoE class reads just the same (carried over) or not at all."""
    return True


def _off(value: Any, dense: PretrainedConfig) -> bool:
    """A dense-only flag (biases) the MoE class hard-codes as off."""
    return not value


def _sliding_window_off(dense: PretrainedConfig) -> bool:
    """Qwen configs keep a `sliding_window` (and a layer layout) that only counts with `use_sliding_window`."""
    return getattr(dense, "use_sliding_window", None) is False


def _without_sliding_window(value: Any, dense: PretrainedConfig) -> bool:
    """A sliding-window layout entry, equivalent when the dense config has no sliding window."""
    return _sliding_window_off(dense)


@dataclass(frozen=True)
class StockMoE:
    """The transformers MoE class a dense family's MoME layers map onto, and what that class cannot express."""

    model_type: str
    fields: Callable[[MoEShape], dict[str, Any]]
    """Its MoE config entries."""
    shared_expert: bool = False
    """Has a (sigmoid-gated) shared-expert slot."""
    every_layer: bool = False
    """Has no dense-MLP layers."""
    always_normalizes: bool = False
    """Renormalises the top-k whatever the config says."""
    dense_only: Mapping[str, Callable[[Any, PretrainedConfig], bool]] = field(default_factory=dict)
    """Dense config entries the MoE config does not declare, with when their value is equivalent."""


STOCK_MOE: dict[str, StockMoE] = {
    "qwen2": StockMoE("qwen2_moe", _qwen2_moe_fields, shared_expert=True),
    "qwen3": StockMoE("qwen3_moe", _qwen_moe_fields,
                      dense_only={"head_dim": _any_value, "layer_types": _without_sliding_window,
                                  "max_window_layers": _without_sliding_window}),
    "mistral": StockMoE("mixtral", _mixtral_fields, every_layer=True, always_normalizes=True),
    "llama": StockMoE("mixtral", _mixtral_fields, every_layer=True, always_normalizes=True,
                      dense_only={"attention_bias": _off, "mlp_bias": _off, "pretraining_tp": _any_value}),
}
"""Dense `model_type` -> the stock MoE class its MoME layers become."""


def export_llm(llm: PackedCausalLM, out_dir: str | os.PathLike) -> None:
    """Write `llm`'s causal LM to `out_dir` in `save_pretrained` format: as itself without MoME layers, else as the
    stock MoE class of its family; raises `StockExportError` (before writing anything) when that is not exact."""
    model = llm.model
    moe = mome_layers(llm)
    if not moe:
        model.save_pretrained(out_dir)
        return
    config = stock_moe_config(llm)
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{p}.") for p in moe)}
    for prefix, layer in moe.items():
        state.update({f"{prefix}.{k}": v for k, v in moe_block_weights(layer, config).items()})
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(config)
    stock.load_state_dict(state, strict=True, assign=True)
    stock.tie_weights()
    stock.save_pretrained(out_dir)


def mome_layers(llm: PackedCausalLM) -> dict[str, MoMELayer]:
    """The decoder's MoME layers by module name in `llm.model` (`model.layers.1.mlp`), in layer order."""
    return {name: m for name, m in llm.model.named_modules() if isinstance(m, MoMELayer)}


def stock_moe_config(llm: PackedCausalLM) -> PretrainedConfig:
    """The stock MoE config equivalent to `llm` on text; raises `StockExportError` listing what is not expressible."""
    dense, layers = llm.model.config, llm.model.get_decoder().layers
    moe = {i: layer.mlp for i, layer in enumerate(layers) if isinstance(layer.mlp, MoMELayer)}
    reasons = [f"layer {i}: {r}" for i, layer in moe.items() for r in routing_problems(layer, dense.hidden_act)]
    target = STOCK_MOE.get(dense.model_type)
    if target is None:
        reasons.insert(0, f"model: model_type {dense.model_type!r} has no stock MoE class "
                          f"(mapped: {', '.join(STOCK_MOE)})")
    elif target.model_type not in CONFIG_MAPPING:
        reasons.insert(0, f"model: this transformers has no {target.model_type!r} for model_type "
                          f"{dense.model_type!r}")
    else:
        reasons += _target_problems(len(layers), moe, target, dense)
    if not reasons:
        try:
            config = AutoConfig.for_model(target.model_type, **_dense_entries(dense),
                                          **target.fields(_moe_shape(len(layers), moe)))
        except (ValueError, TypeError, StrictDataclassError) as err:
            reasons.append(f"config: transformers rejects it as {target.model_type!r}: {err}")
        else:
            reasons += config_problems(dense, config, target)
    if reasons:
        raise StockExportError(type(llm.model).__name__, reasons)
    return config


def _moe_shape(num_layers: int, moe: dict[int, MoMELayer]) -> MoEShape:
    """The MoE sizes of the MoME layers (one `MoMEConfig` and one dense MLP size make them all alike)."""
    first = next(iter(moe.values()))
    return MoEShape(num_layers=num_layers, moe_layers=tuple(moe), num_experts=first.cfg.num_experts,
                    top_k=first.cfg.top_k, normalize_topk=first.cfg.normalize_topk,
                    expert_width=first.w_out.shape[-1],
                    shared_width=0 if first.shared_w_out is None else first.shared_w_out.shape[-1])


def _dense_entries(dense: PretrainedConfig) -> dict[str, Any]:
    """The dense config's entries that describe the network (everything but its class and plait's settings)."""
    return {k: v for k, v in dense.to_dict().items() if k not in IDENTITY_KEYS}


def routing_problems(layer: MoMELayer, hidden_act: str) -> list[str]:
    """Why one MoME layer's text routing is not a plain top-k MoE block of `hidden_act` gated experts (empty: it is)."""
    reasons = []
    if layer.router.mode != "per_modality":
        reasons.append(f"router mode {layer.router.mode!r} (the text modality embedding is a logit bias no stock "
                       "router has)")
    if layer.router.bias is not None:
        reasons.append("router has per-modality biases (mome.router_bias)")
    if layer.cfg.capacity_factor is not None:
        reasons.append(f"mome.capacity_factor {layer.cfg.capacity_factor} drops tokens (stock MoE blocks are "
                       "dropless)")
    if not layer.gated:
        reasons.append("experts are not gated MLPs")
    if getattr(layer, "b_in", None) is not None or getattr(layer, "b_out", None) is not None:
        reasons.append("experts have biases")
    if getattr(layer, "shared_b_in", None) is not None or getattr(layer, "shared_b_out", None) is not None:
        reasons.append("shared expert has biases")
    if not _same_activation(layer.activation, hidden_act):
        reasons.append(f"activation {layer.activation!r} is not the config's hidden_act {hidden_act!r}")
    return reasons


def _same_activation(activation: Callable, hidden_act: str) -> bool:
    """Whether a MoME layer's activation is the one transformers builds for `hidden_act`."""
    if hidden_act not in ACT2FN:
        return False
    expected = ACT2FN[hidden_act]
    return type(activation) is type(expected) and repr(activation) == repr(expected)


def _target_problems(num_layers: int, moe: dict[int, MoMELayer], target: StockMoE,
                     dense: PretrainedConfig) -> list[str]:
    """Per layer, what `target`'s MoE class cannot hold: dense layers, shared experts, unnormalised top-k, widths."""
    name = CONFIG_MAPPING[target.model_type].__name__
    reasons = []
    for i in range(num_layers):
        layer = moe.get(i)
        if layer is None:
            if target.every_layer:
                reasons.append(f"layer {i}: dense MLP ({name} has experts in every layer)")
            continue
        if layer.shared_w_in is not None and not target.shared_expert:
            reasons.append(f"layer {i}: shared expert ({name} has none)")
        if target.always_normalizes and not layer.cfg.normalize_topk:
            reasons.append(f"layer {i}: mome.normalize_topk is false ({name} always renormalises the top-k)")
        if target.every_layer and layer.w_out.shape[-1] != dense.intermediate_size:
            reasons.append(f"layer {i}: experts of width {layer.w_out.shape[-1]}, {name} gives them "
                           f"intermediate_size {dense.intermediate_size}")
    return reasons


def config_problems(dense: PretrainedConfig, moe: PretrainedConfig, target: StockMoE) -> list[str]:
    """Dense config entries the MoE config drops or changes (so its dense parts would compute something else)."""
    declared = CONFIG_MAPPING[target.model_type]().to_dict()
    built = moe.to_dict()
    dense_name, moe_name = type(dense).__name__, type(moe).__name__
    reasons = []
    for key, value in _dense_entries(dense).items():
        if key == "sliding_window" and _sliding_window_off(dense):
            continue
        if key not in declared:
            equivalent = target.dense_only.get(key)
            if equivalent is None or not equivalent(value, dense):
                reasons.append(f"config: {dense_name}.{key} = {value!r} has no equivalent in {moe_name}")
        elif built.get(key) != value:
            reasons.append(f"config: {dense_name}.{key} = {value!r} becomes {built.get(key)!r} in {moe_name}")
    return reasons


def moe_block_weights(layer: MoMELayer, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The stock MoE block's tensors (names below the block) holding `layer`'s text routing and experts."""
    experts = layer.router.num_experts
    weights = {
        "gate.weight": layer.router.proj.weight[TEXT_TOKEN * experts:(TEXT_TOKEN + 1) * experts],
        "experts.gate_up_proj": layer.w_in,
        "experts.down_proj": layer.w_out,
    }
    if hasattr(config, "shared_expert_intermediate_size"):
        weights.update(_gated_shared_expert(layer))
    return {k: v.detach().clone() for k, v in weights.items()}


def _gated_shared_expert(layer: MoMELayer) -> dict[str, torch.Tensor]:
    """Qwen2-MoE's shared expert behind `sigmoid(0) = 0.5`: the down projection doubled; width 0 without one."""
    dim = layer.w_out.shape[1]
    if layer.shared_w_in is None:
        w_in, w_out = layer.w_in.new_zeros(0, dim), layer.w_out.new_zeros(dim, 0)
    else:
        w_in, w_out = layer.shared_w_in, 2 * layer.shared_w_out
    half = w_in.shape[0] // 2
    return {"shared_expert.gate_proj.weight": w_in[:half], "shared_expert.up_proj.weight": w_in[half:],
            "shared_expert.down_proj.weight": w_out, "shared_expert_gate.weight": w_in.new_zeros(1, dim)}
