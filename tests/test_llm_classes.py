"""Every supported causal-LM class runs packed and upcycles to MoME: checked against the stock HF model's own forward.

Each class is a tiny random checkpoint (biases randomised, so upcycled biases matter) saved with `save_pretrained`
and loaded by path, as a hub name would be.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from plait.ops.moe import grouped_ffn, grouped_mm_supported
from plait.trainer.model.config import LLMConfig, MoMEConfig
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.llm_support import check_llm_supported
from plait.trainer.model.mome import MoMELayer, RoutingContext

ROPE = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "attention_dropout": 0.0}
CLASSES = {
    "llama": ("llama", ROPE),
    "llama-mlp-bias": ("llama", {**ROPE, "mlp_bias": True}),
    "qwen2": ("qwen2", ROPE),
    "qwen3": ("qwen3", {**ROPE, "head_dim": 8}),
    "mistral": ("mistral", ROPE),
    "phi": ("phi", {**ROPE, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
    "gpt2": ("gpt2", {"vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
                      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0}),
}
BIASED_MLP = {"llama-mlp-bias", "phi", "gpt2"}
LENGTHS = (7, 1, 12)
"""Three packed sequences of different lengths."""


Outputs = tuple[torch.Tensor, torch.Tensor]
"""(hidden states, logits) of the packed sequences."""


@pytest.fixture(scope="module", params=sorted(CLASSES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Outputs]:
    """(class id, directory, stock per-sequence outputs) of a tiny random checkpoint with non-zero biases."""
    model_type, kwargs = CLASSES[request.param]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, _stock_per_sequence(path)


def _packed(path: Path, mome: MoMEConfig, mome_layers: list[int]) -> PackedCausalLM:
    torch.manual_seed(2)
    cfg = LLMConfig(name_or_path=str(path), mome_layers=mome_layers)
    return PackedCausalLM(cfg, mome, embed_dim=8, context=RoutingContext()).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids `[20]`, their `cu_seqlens` and token modalities."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 100, (sum(LENGTHS),), generator=gen)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    return ids, cu, torch.randint(0, 4, ids.shape, generator=gen)


def _run_packed(llm: PackedCausalLM) -> Outputs:
    """(hidden states, logits) of the three sequences packed in one row."""
    ids, cu, modality = _inputs()
    with torch.no_grad():
        hidden = llm(llm.embed(ids), cu, max(LENGTHS), modality)
        return hidden, llm.logits(hidden)


def _stock_per_sequence(path: Path) -> Outputs:
    """(hidden states, logits) of the stock HF model run on each sequence alone, concatenated."""
    stock: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, cu, _ = _inputs()
    hidden, logits = [], []
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            one = ids[None, a:b]
            hidden.append(stock.base_model(input_ids=one).last_hidden_state[0])
            logits.append(stock(input_ids=one).logits[0])
    return torch.cat(hidden), torch.cat(logits)


def _assert_close(got: Outputs, want: Outputs) -> None:
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _mome_layer(llm: PackedCausalLM) -> MoMELayer:
    layers = [m for m in llm.model.modules() if isinstance(m, MoMELayer)]
    assert len(layers) == 1
    return layers[0]


def test_packed_equals_each_sequence_alone(checkpoint):
    _, path, dense = checkpoint
    _assert_close(_run_packed(_packed(path, MoMEConfig(), mome_layers=[])), dense)


def test_one_upcycled_expert_equals_the_dense_model(checkpoint):
    name, path, dense = checkpoint
    llm = _packed(path, MoMEConfig(num_experts=1, top_k=1), mome_layers=[1])
    layer = _mome_layer(llm)
    assert (layer.b_in is not None, layer.b_out is not None) == (name in BIASED_MLP,) * 2
    _assert_close(_run_packed(llm), dense)


def test_four_upcycled_experts_equal_dense_until_one_is_perturbed(checkpoint):
    _, path, dense = checkpoint
    llm = _packed(path, MoMEConfig(num_experts=4, top_k=2, normalize_topk=True), mome_layers=[1])
    with llm.context.record() as outputs:
        upcycled = _run_packed(llm)
    _assert_close(upcycled, dense)
    routed = (outputs[0].topk_experts == 0).any(-1)
    assert 0 < int(routed.sum()) < routed.numel()
    layer = _mome_layer(llm)
    with torch.no_grad():
        layer.w_out[0] += torch.randn(layer.w_out[0].shape, generator=torch.Generator().manual_seed(4))
    hidden, _ = _run_packed(llm)
    # MoME is in the last decoder layer: only the tokens sent to expert 0 change.
    assert ((hidden - dense[0]).abs().amax(-1)[routed] > 1e-3).all()
    torch.testing.assert_close(hidden[~routed], dense[0][~routed], atol=1e-5, rtol=1e-5)


def test_every_tested_class_passes_the_support_check(checkpoint):
    _, path, _ = checkpoint
    check_llm_supported(LLMConfig(name_or_path=str(path), mome_layers=[0, 1]))


TINY_BERT = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4}


@pytest.mark.parametrize(("model_type", "kwargs", "mome_layers", "message"), [
    ("gpt_neox", TINY_BERT, [1], "GPTNeoXForCausalLM layer 1 MLP GPTNeoXMLP has no gate_proj/up_proj/down_proj, "
                                 "fc1/fc2, c_fc/c_proj or w_in/w_out weights"),
    ("bert", TINY_BERT, [1], "BertLMHeadModel has no decoder layer list"),
    ("opt", {"vocab_size": 100, "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "word_embed_proj_dim": 32}, [1], "OPTForCausalLM layer 1 OPTDecoderLayer has no mlp"),
    ("t5", {"vocab_size": 100, "d_model": 32, "num_layers": 2}, [1], r"T5Config \(t5\) has no AutoModelForCausalLM"),
    ("llama", ROPE, [2], "LlamaForCausalLM mome_layers index 2 is out of range"),
], ids=["mlp", "layer-list", "no-mlp", "no-causal-lm", "index"])
def test_unsupported_llm_stops_at_the_support_check(model_type, kwargs, mome_layers, message):
    with pytest.raises(ValueError, match=f"^llm: {message}"):
        check_llm_supported(LLMConfig(model_type=model_type, model_kwargs=kwargs, mome_layers=mome_layers))


def test_support_check_of_the_default_llm_is_fast():
    check_llm_supported(LLMConfig())
    start = time.perf_counter()
    check_llm_supported(LLMConfig())
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["grouped_mm", "loop"])
def test_biased_grouped_ffn_matches_a_float64_row_loop(dtype, gated):
    gen = torch.Generator().manual_seed(0)
    counts, dim, hidden = torch.tensor([5, 0, 9, 2]), 16, 24
    width = 2 * hidden if gated else hidden
    shapes = {"x": (16, dim), "w_in": (4, width, dim), "b_in": (4, width), "w_out": (4, dim, hidden),
              "b_out": (4, dim)}
    leaves = {k: (0.3 * torch.randn(s, generator=gen, dtype=torch.float64)).requires_grad_() for k, s in shapes.items()}
    x, w_in, b_in, w_out, b_out = (leaves[k].to(dtype) for k in shapes)
    assert grouped_mm_supported(x, w_in, w_out) == (dtype == torch.float32)
    out = grouped_ffn(x, counts, w_in, w_out, F.gelu, gated, b_in, b_out).double()
    rows = []
    experts = [e for e, n in enumerate(counts.tolist()) for _ in range(n)]
    for r, e in enumerate(experts):
        h = leaves["w_in"][e] @ leaves["x"][r] + leaves["b_in"][e]
        act = F.gelu(h[:hidden]) * h[hidden:] if gated else F.gelu(h)
        rows.append(leaves["w_out"][e] @ act + leaves["b_out"][e])
    want = torch.stack(rows)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    params = list(leaves.values())
    got = torch.autograd.grad((out * weight).sum(), params)
    for g, w in zip(got, torch.autograd.grad((want * weight).sum(), params)):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
