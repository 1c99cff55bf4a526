"""LoRA through peft on tiny Llama (a MoME layer swapped in) and GPT-2 (Conv1D) LLMs: unchanged output at init,
merge equal to the float64 sum W + alpha/r * B A and to the unmerged forward, stock keys after merge, frozen base,
and a single-process ZeRO-3 build whose adapters match a plain build's and whose engine forward matches it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from plait.data.batch import TEXT_TOKEN
from plait.trainer.model.config import LLMConfig, LoRAConfig, MoMEConfig
from plait.trainer.model.lora import apply_lora, has_lora, merge_lora
from plait.trainer.model.mome import MoMELayer, RoutingContext

KINDS = ("llama", "gpt2")
"""Llama with a MoME layer in decoder layer 1; GPT-2 (Conv1D projections, biases, tied head) without."""

CONFIGS = {
    "llama": (LlamaConfig, {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2}),
    "gpt2": (GPT2Config, {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16,
                          "bos_token_id": 0, "eos_token_id": 0}),
}
TOKENS = 12


def _swap_mome(model: PreTrainedModel, kind: str) -> Optional[RoutingContext]:
    """Llama: decoder layer 1's MLP becomes an upcycled MoME layer routing text tokens; GPT-2 stays dense."""
    if kind != "llama":
        return None
    context = RoutingContext()
    context.modality = torch.full((TOKENS,), TEXT_TOKEN)
    layer = model.model.layers[1]
    layer.mlp = MoMELayer.from_dense(layer.mlp, MoMEConfig(num_experts=4, top_k=2), context)
    return context


def _model(kind: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config_cls, kwargs = CONFIGS[kind]
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs), attn_implementation="sdpa")
    _swap_mome(model, kind)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (1, TOKENS), generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids().to(next(model.parameters()).device)).logits


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _randomize_adapters(model: nn.Module) -> None:
    """Give every adapter large random A and B, so that it visibly changes the output."""
    gen = torch.Generator().manual_seed(3)
    for layer in _lora_layers(model).values():
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            weight.data.copy_(torch.randn(weight.shape, generator=gen) * 0.3)


def _merged_reference(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per wrapped layer (by base weight key), W + alpha/r * B @ A in float64, in the base layer's layout."""
    expected = {}
    for name, layer in _lora_layers(model).items():
        base = layer.get_base_layer()
        a, b = (layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double())
        delta = (b @ a) * (layer.lora_alpha["default"] / layer.r["default"])
        expected[f"{name}.weight"] = base.weight.double() + (delta.T if isinstance(base, Conv1D) else delta)
    return expected


@pytest.mark.parametrize("kind", KINDS)
def test_init_leaves_output_unchanged_and_freezes_all_but_adapters_and_mome(kind: str):
    model = _model(kind)
    stock = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    assert has_lora(model) and not has_lora(stock)
    assert torch.equal(_logits(model), _logits(stock))
    for name, param in model.named_parameters():
        adapter = ".lora_A.default." in name or ".lora_B.default." in name
        mome = name.startswith("model.layers.1.mlp.") and kind == "llama"
        assert param.requires_grad == (adapter or mome), name
    wrapped = _lora_layers(model)
    assert "lm_head" not in wrapped and not any(".router" in n for n in wrapped)
    if kind == "llama":
        assert len(wrapped) == 7 + 4 and model.model.layers[1].mlp.router.proj.weight.requires_grad
    else:
        assert len(wrapped) == 2 * 4 and all(isinstance(m.get_base_layer(), Conv1D) for m in wrapped.values())


@pytest.mark.parametrize("kind", KINDS)
def test_merge_folds_adapters_into_stock_layers(kind: str, tmp_path: Path):
    model = _model(kind)
    stock_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    _randomize_adapters(model)
    base = _logits(_model(kind))
    unmerged = _logits(model)
    assert (unmerged - base).abs().max() > 1e-2
    expected = _merged_reference(model)
    merge_lora(model)
    assert not has_lora(model) and not hasattr(model, "peft_config")
    assert not any("lora" in type(m).__module__ or "peft" in type(m).__module__ for m in model.modules())
    assert list(model.state_dict()) == stock_keys
    state = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model), unmerged, rtol=0, atol=1e-5)
    if kind == "gpt2":
        model.save_pretrained(tmp_path)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        torch.testing.assert_close(_logits(loaded), unmerged, rtol=0, atol=1e-5)


def test_named_targets_only_and_never_the_router():
    model = _model("llama")
    # "proj" names the router's projection (the only module called exactly that): it is excluded, not wrapped.
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj", "proj"]))
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert set(_lora_layers(model)) == expected
    assert isinstance(model.model.layers[1].mlp.router.proj, nn.Linear)


def test_same_seed_same_adapters_and_config_errors():
    first, second = _model("llama"), _model("llama")
    torch.manual_seed(5)
    apply_lora(first, LoRAConfig(r=4))
    torch.manual_seed(5)
    apply_lora(second, LoRAConfig(r=4))
    pairs = zip(first.state_dict().items(), second.state_dict().items())
    assert all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in pairs)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(first, LoRAConfig(r=4))
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_model("gpt2"), LoRAConfig(r=4, target_modules=["all-linear", "c_fc"]))


@pytest.fixture
def single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-process DeepSpeed group in this process (conftest ends it with the test)."""
    from plait.trainer.engine import init_distributed

    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    init_distributed()


ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
         "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 2**31 - 1}


def _partitioned_model(kind: str) -> PreTrainedModel:
    """The `_model` build under zero.Init as plait does it (`build_causal_lm`): every base weight partitioned."""
    import deepspeed

    from plait.trainer.model.llm import build_causal_lm, transformers_zero3

    torch.manual_seed(0)
    cfg = LLMConfig(model_type=kind, model_kwargs=CONFIGS[kind][1], attn_implementation="sdpa", mome_layers=[])
    with transformers_zero3(ZERO3), deepspeed.zero.Init(config_dict_or_path=ZERO3):
        model = build_causal_lm(cfg)
        _swap_mome(model, kind)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_zero3_partitioned_base_gets_plain_build_adapters_and_trains(kind: str, single_rank: None):
    import deepspeed

    from plait.trainer.model.mome import mark_zero3_leaf_modules

    model, plain = _partitioned_model(kind), _model(kind)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    torch.manual_seed(1)
    apply_lora(plain, LoRAConfig(r=4, alpha=8.0))
    adapters = {n: p for n, p in model.named_parameters() if not hasattr(p, "ds_id")}
    plain_adapters = {n: p for n, p in plain.named_parameters() if ".lora_" in n}
    assert adapters.keys() == plain_adapters.keys()
    assert all(torch.equal(adapters[n].cpu(), p) for n, p in plain_adapters.items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in plain.named_parameters() if p.requires_grad]
    _randomize_adapters(model)
    _randomize_adapters(plain)
    mark_zero3_leaf_modules(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable), config=ZERO3)
    if kind == "llama":
        model.model.layers[1].mlp.context.modality = model.model.layers[1].mlp.context.modality.to(engine.device)
    torch.testing.assert_close(_logits(engine).cpu(), _logits(plain), rtol=0, atol=1e-5)


def test_zero3_adapters_created_inside_zero_init_are_refused(single_rank: None):
    import deepspeed

    model = _partitioned_model("gpt2")
    with deepspeed.zero.Init(config_dict_or_path=ZERO3), pytest.raises(RuntimeError, match="outside zero.Init"):
        apply_lora(model, LoRAConfig(r=4))
