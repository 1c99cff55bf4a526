"""MoME layer and sort-based dispatch against plain reference loops (float64, values and gradients)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from plait.ops.moe import dispatch, expert_capacity, ffn_rows, reference_moe
from plait.trainer.model.config import MoMEConfig
from plait.trainer.model.encoder import FeedForward
from plait.trainer.model.mome import MoMELayer, RoutingContext, assignment_counts

DIM, HIDDEN = 16, 24


def _layer(seed: int = 0, **mome) -> MoMELayer:
    torch.manual_seed(seed)
    cfg = MoMEConfig(**{"num_experts": 4, "top_k": 2, "init": "fresh", "init_std": 0.3, **mome})
    return MoMELayer.from_dense(FeedForward(DIM, HIDDEN), cfg, RoutingContext()).double()


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, torch.randint(0, 4, (n,), generator=gen)


def _reference(layer: MoMELayer, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Routing written out with a loop over modalities, then the reference token loop."""
    probs = torch.zeros(x.shape[0], layer.cfg.num_experts, dtype=x.dtype)
    for m in range(4):
        rows = modality == m
        logits = layer.router(x[rows], torch.full((int(rows.sum()),), m))
        probs = probs.index_put((rows.nonzero().squeeze(1),), logits.softmax(-1))
    weights, experts = probs.topk(layer.cfg.top_k, dim=-1)
    if layer.cfg.normalize_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    capacity = expert_capacity(x.shape[0], layer.cfg.top_k, layer.cfg.num_experts, layer.cfg.capacity_factor)
    expert = lambda e, rows: ffn_rows(rows, layer.w_in[e], layer.w_out[e], F.silu, True)  # noqa: E731
    out = reference_moe(x, experts, weights, expert, capacity)
    if layer.shared_w_in is not None:
        out = out + ffn_rows(x, layer.shared_w_in, layer.shared_w_out, F.silu, True)
    return out


def _check_against_reference(layer: MoMELayer, n: int = 37, seed: int = 1) -> None:
    x, modality = _tokens(n, seed)
    out = layer(x, modality)
    ref = _reference(layer, x, modality)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    params = [x, layer.w_in, layer.w_out, layer.router.proj.weight]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    for got, want in zip(torch.autograd.grad((out * weight).sum(), params),
                         torch.autograd.grad((ref * weight).sum(), params)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("router", ["per_modality", "modality_embedding"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_mome_matches_reference_loop(router, top_k):
    _check_against_reference(_layer(router=router, top_k=top_k, router_bias=True))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_match_reference_loop(capacity_factor):
    _check_against_reference(_layer(capacity_factor=capacity_factor))


def test_shared_expert_and_unnormalised_gates_match_reference():
    _check_against_reference(_layer(shared_expert=True, normalize_topk=False))


def test_one_expert_top1_equals_the_dense_ffn_it_upcycles():
    torch.manual_seed(0)
    dense = FeedForward(DIM, HIDDEN).double()
    layer = MoMELayer.from_dense(dense, MoMEConfig(num_experts=1, top_k=1)).double()
    x, modality = _tokens(29, 2)
    torch.testing.assert_close(layer(x, modality), dense(x), atol=1e-12, rtol=1e-12)


def test_upcycled_hf_mlp_equals_dense_with_one_expert():
    cfg = AutoConfig.for_model("qwen2", vocab_size=50, hidden_size=DIM, intermediate_size=HIDDEN,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    mlp = AutoModelForCausalLM.from_config(cfg).model.layers[0].mlp.double()
    layer = MoMELayer.from_dense(mlp, MoMEConfig(num_experts=1, top_k=1)).double()
    x, modality = _tokens(11, 3)
    torch.testing.assert_close(layer(x[None], modality), mlp(x[None]), atol=1e-12, rtol=1e-12)


def test_upcycled_experts_with_normalised_topk_equal_the_dense_ffn():
    torch.manual_seed(0)
    dense = FeedForward(DIM, HIDDEN).double()
    layer = MoMELayer.from_dense(dense, MoMEConfig(num_experts=4, top_k=2)).double()
    x, modality = _tokens(19, 4)
    torch.testing.assert_close(layer(x, modality), dense(x), atol=1e-12, rtol=1e-12)


def test_capacity_keeps_first_choices_first_and_counts_drops():
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    weights = torch.full((4, 2), 0.5)
    plan = dispatch(experts, weights, num_experts=3, capacity=2)
    # Expert 0 is asked by tokens 0, 1, 2 (first choices) and 3 (second): keeps tokens 0 and 1.
    assert plan.counts.tolist() == [2, 2, 1]
    assert plan.token_index.tolist() == [0, 1, 3, 0, 2]
    assert int(plan.dropped) == 3


def test_per_modality_routers_use_their_own_weights():
    layer = _layer()
    x, _ = _tokens(5, 5)
    w = layer.router.proj.weight.view(4, 4, DIM)
    for m in range(4):
        logits = layer.router(x, torch.full((5,), m))
        torch.testing.assert_close(logits, x @ w[m].t())


def test_router_outputs_are_recorded_only_while_recording():
    layer = _layer(capacity_factor=0.5)
    x, modality = _tokens(40, 6)
    layer.context.modality = modality
    with layer.context.record() as outputs:
        layer(x)
    layer(x)
    assert len(outputs) == 1
    out = outputs[0]
    assert out.logits.shape == (40, 4) and out.topk_experts.shape == (40, 2)
    assert torch.equal(out.modality, modality) and out.dropped > 0
    counts = assignment_counts(out, 4)
    for m in range(4):
        for e in range(4):
            assert counts[m, e] == int((out.topk_experts[modality == m] == e).sum())


def test_empty_input_gives_every_parameter_a_gradient():
    layer = _layer(shared_expert=True)
    x, modality = _tokens(0, 7)
    layer(x, modality).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_missing_modality_is_an_error():
    layer = MoMELayer.from_dense(FeedForward(DIM, HIDDEN), MoMEConfig())
    with pytest.raises(RuntimeError, match="modalities"):
        layer(torch.zeros(3, DIM))


@pytest.mark.parametrize(("field", "value"), [("top_k", 5), ("capacity_factor", 0.0), ("num_experts", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoMEConfig(**{field: value})


@pytest.mark.parametrize("gated", [True, False])
def test_grouped_gemm_path_equals_each_expert_on_its_block(gated):
    from plait.ops.moe import grouped_ffn, grouped_mm_supported

    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(int(counts.sum()), 16, generator=gen, requires_grad=True)
    w_in = torch.randn(4, 48 if gated else 24, 16, generator=gen, requires_grad=True)
    w_out = torch.randn(4, 16, 24, generator=gen, requires_grad=True)
    assert grouped_mm_supported(x, w_in, w_out) and not grouped_mm_supported(x.double(), w_in.double(), w_out.double())
    out = grouped_ffn(x, counts, w_in, w_out, F.silu, gated)
    starts = [0, *counts.cumsum(0).tolist()]
    blocks = enumerate(zip(starts, starts[1:]))
    want = torch.cat([ffn_rows(x[a:b], w_in[e], w_out[e], F.silu, gated) for e, (a, b) in blocks])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # A broadcast gradient (what `.sum()` sends back) reaches every operand.
    got = torch.autograd.grad(out.sum(), (x, w_in, w_out))
    for g, w in zip(got, torch.autograd.grad(want.sum(), (x, w_in, w_out))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _phi_mlp() -> torch.nn.Module:
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiMLP

    torch.manual_seed(0)
    mlp = PhiMLP(PhiConfig(hidden_size=DIM, intermediate_size=HIDDEN)).double()
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    return mlp


def test_parameters_of_a_bias_free_ffn_are_unchanged_and_biases_follow_the_weights():
    plain = MoMELayer.from_dense(FeedForward(DIM, HIDDEN), MoMEConfig(shared_expert=True))
    assert [n for n, _ in plain.named_parameters()] == ["w_in", "w_out", "shared_w_in", "shared_w_out",
                                                        "router.proj.weight"]
    biased = MoMELayer.from_dense(_phi_mlp(), MoMEConfig(shared_expert=True))
    assert [n for n, _ in biased.named_parameters()] == ["w_in", "w_out", "b_in", "b_out", "shared_w_in",
                                                         "shared_w_out", "shared_b_in", "shared_b_out",
                                                         "router.proj.weight"]
    assert biased.b_in.shape == (4, HIDDEN) and biased.b_out.shape == (4, DIM) and biased.dropout is None


def test_biased_experts_and_shared_expert_each_equal_the_dense_mlp():
    mlp = _phi_mlp()
    layer = MoMELayer.from_dense(mlp, MoMEConfig(num_experts=4, top_k=2, shared_expert=True)).double()
    x, modality = _tokens(13, 8)
    # Routed experts (normalised gates) give the dense output once, the shared expert once more.
    torch.testing.assert_close(layer(x, modality), 2 * mlp(x), atol=1e-12, rtol=1e-12)


def test_gpt2_conv1d_mlp_upcycles_transposed_and_keeps_its_dropout():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    mlp = GPT2MLP(HIDDEN, GPT2Config(n_embd=DIM, resid_pdrop=0.25)).double().eval()
    layer = MoMELayer.from_dense(mlp, MoMEConfig(num_experts=1, top_k=1)).double().eval()
    assert isinstance(layer.dropout, torch.nn.Dropout) and layer.dropout.p == 0.25
    x, modality = _tokens(9, 9)
    torch.testing.assert_close(layer(x, modality), mlp(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("tokens", "top_k", "experts", "factor"),
                         [(10, 1, 4, 1.25), (8, 1, 4, 1.25), (10, 1, 4, 1.2), (7, 2, 3, 1.0), (3, 2, 8, 0.5)])
def test_capacity_is_the_documented_ceiling(tokens, top_k, experts, factor):
    # Reference in integers: factor = p/q as written, capacity = the smallest c with c * E * q >= p * tokens * k.
    p, q = Fraction(str(factor)).as_integer_ratio()
    expected = next(c for c in range(tokens * top_k + 1) if c * experts * q >= p * tokens * top_k)
    assert expert_capacity(tokens, top_k, experts, factor) == expected
