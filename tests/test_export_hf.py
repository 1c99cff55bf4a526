"""The exported `llm/` loads in stock transformers with every weight and computes plait's text logits: MoME layers as
Qwen2-MoE / Qwen3-MoE / Mixtral blocks, or a clear error naming each layer that has no exact stock form."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from plait.data.batch import TEXT_TOKEN
from plait.trainer.config import load_config
from plait.trainer.model.config import LLMConfig, MoMEConfig
from plait.trainer.model.hf_export import StockExportError, export_llm
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.mome import MoMELayer, RoutingContext
from plait.trainer.model.pretrained import PretrainedModel, create_model

from test_pretrained import CAPTIONS, run_config  # noqa: F401  (the tiny-run fixture of the save/load tests)

TINY = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2}
"""A 3-layer decoder; Qwen3 additionally gets a head_dim that is not hidden_size / heads."""
CU = torch.tensor([0, 7, 12])
"""Two packed text sequences of 7 and 5 tokens."""


def _llm(model_type: str, mome_layers: list[int], kwargs: dict | None = None, **mome) -> PackedCausalLM:
    """A tiny plait LLM whose MoME experts and routers are perturbed apart (upcycled experts start identical)."""
    torch.manual_seed(0)
    cfg = LLMConfig(model_type=model_type, model_kwargs={**TINY, **(kwargs or {})}, mome_layers=mome_layers)
    llm = PackedCausalLM(cfg, MoMEConfig(num_experts=4, top_k=2, **mome), embed_dim=8, context=RoutingContext())
    with torch.no_grad():
        for layer in (m for m in llm.modules() if isinstance(m, MoMELayer)):
            for param in layer.parameters():
                param.add_(torch.randn_like(param) * (0.5 if param is layer.router.proj.weight else 0.05))
    return llm.eval()


def _text_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (int(CU[-1]),), generator=torch.Generator().manual_seed(1))


def _plait_text_logits(llm: PackedCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """plait's next-token logits of the packed text sequences (every token routed as text)."""
    with torch.no_grad():
        hidden = llm(llm.embed(ids), CU, int((CU[1:] - CU[:-1]).max()), torch.full_like(ids, TEXT_TOKEN))
        return llm.logits(hidden)


def _load_stock(path):
    """The exported LLM as stock transformers loads it, after checking every weight matched."""
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _assert_stock_logits_equal(llm: PackedCausalLM, stock) -> None:
    ids = _text_ids()
    expected = _plait_text_logits(llm, ids)
    with torch.no_grad():
        for a, b in zip(CU[:-1].tolist(), CU[1:].tolist()):
            got = stock(ids[None, a:b]).logits[0]
            torch.testing.assert_close(got, expected[a:b], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("model_type", "mome_layers", "kwargs", "mome", "stock_class"), [
    ("qwen2", [1], None, {}, "Qwen2MoeForCausalLM"),
    ("qwen2", [1], None, {"shared_expert": True, "normalize_topk": False}, "Qwen2MoeForCausalLM"),
    ("qwen3", [0, 2], {"head_dim": 16}, {"normalize_topk": False}, "Qwen3MoeForCausalLM"),
    ("mistral", [0, 1, 2], {"tie_word_embeddings": True}, {}, "MixtralForCausalLM"),
    ("llama", [0, 1, 2], None, {}, "MixtralForCausalLM"),
    ("qwen2", [], None, {}, "Qwen2ForCausalLM"),
], ids=["qwen2", "qwen2-shared-unnormalised", "qwen3", "mistral-tied", "llama", "dense"])
def test_exported_llm_loads_in_stock_transformers_with_plait_text_logits(tmp_path, model_type, mome_layers, kwargs,
                                                                         mome, stock_class):
    llm = _llm(model_type, mome_layers, kwargs, **mome)
    export_llm(llm, tmp_path / "llm")
    stock = _load_stock(tmp_path / "llm")
    assert type(stock).__name__ == stock_class
    dense = [i for i in range(TINY["num_hidden_layers"]) if i not in mome_layers]
    assert all(hasattr(stock.model.layers[i].mlp, "gate_proj") for i in dense)
    assert all(hasattr(stock.model.layers[i].mlp, "experts") for i in mome_layers)
    _assert_stock_logits_equal(llm, stock)


@pytest.mark.parametrize(("model_type", "mome_layers", "mome", "reasons"), [
    ("qwen2", [1], {"router_bias": True}, ["layer 1: router has per-modality biases (mome.router_bias)"]),
    ("qwen2", [1, 2], {"router": "modality_embedding", "capacity_factor": 1.0},
     ["layer 1: router mode 'modality_embedding'", "layer 1: mome.capacity_factor 1.0 drops tokens",
      "layer 2: router mode 'modality_embedding'"]),
    ("mistral", [1], {}, ["layer 0: dense MLP (MixtralConfig has experts in every layer)", "layer 2: dense MLP"]),
    ("qwen3", [1], {"shared_expert": True}, ["layer 1: shared expert (Qwen3MoeConfig has none)"]),
], ids=["router-bias", "embedding-capacity", "mixtral-dense-layers", "qwen3-shared"])
def test_mome_without_an_exact_stock_form_names_each_layer_and_why(tmp_path, model_type, mome_layers, mome, reasons):
    llm = _llm(model_type, mome_layers, **mome)
    with pytest.raises(StockExportError) as raised:
        export_llm(llm, tmp_path / "llm")
    for reason in reasons:
        assert any(r.startswith(reason) for r in raised.value.reasons), raised.value.reasons
        assert reason in str(raised.value)
    assert not (tmp_path / "llm").exists()


def test_llama_with_biases_is_not_mixtral():
    llm = _llm("llama", [0, 1, 2], {"attention_bias": True})
    with pytest.raises(StockExportError, match=r"config: LlamaConfig.attention_bias = True has no equivalent in "
                                               r"MixtralConfig"):
        export_llm(llm, "unused")


def test_saved_model_keeps_its_dense_llm_and_embeddings_with_a_stock_moe_llm(run_config, tmp_path):  # noqa: F811
    path, files = run_config
    overrides = ["model.llm.model_type=qwen2", "model.mome.shared_expert=true"]
    model = create_model(load_config(path, overrides))
    saved = model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in saved.iterdir()} == {"plait_model.json", "model.safetensors", "tokenizer", "llm_config",
                                                 "llm"}
    assert type(_load_stock(saved / "llm")).__name__ == "Qwen2MoeForCausalLM"
    reloaded = PretrainedModel.from_pretrained(saved)
    assert type(reloaded.model.llm.model).__name__ == "Qwen2ForCausalLM"
    media, texts = [files[k] for k in CAPTIONS], list(CAPTIONS.values())
    torch.testing.assert_close(reloaded.encode_text(texts), model.encode_text(texts), atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded.encode_media(media), model.encode_media(media), atol=1e-6, rtol=0)


def test_saved_model_without_a_stock_llm_writes_none_and_reloads(run_config, tmp_path, caplog):  # noqa: F811
    path, _ = run_config
    model = create_model(load_config(path, ["model.mome.router_bias=true"]))
    (tmp_path / "saved" / "llm").mkdir(parents=True)  # a stale export there must not survive
    saved = model.save_pretrained(tmp_path / "saved")
    assert not (saved / "llm").exists() and (saved / "llm_config" / "config.json").is_file()
    assert "layer 1: router has per-modality biases" in caplog.text
    reloaded = PretrainedModel.from_pretrained(saved)
    for name, value in model.model.state_dict().items():
        assert torch.equal(value, reloaded.model.state_dict()[name]), name
