"""Router regularisers: per-layer Switch balance, z-loss, LIMoE entropies against float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from plait.trainer.losses.balance import balance_losses
from plait.trainer.losses.config import BalanceConfig
from plait.trainer.model.routing import RouterOutput

F64 = torch.float64


def router(seed: int, tokens: int = 12, experts: int = 4, k: int = 2, modality=None) -> RouterOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, dtype=F64, requires_grad=True)
    mod = torch.randint(0, 4, (tokens,), generator=g) if modality is None else modality
    return RouterOutput(logits=logits, topk_experts=logits.detach().topk(k, dim=1).indices, modality=mod)


def formula(routers: list[RouterOutput], threshold: float = 1.0):
    """Mean over layers of each term, written from the definitions token by token."""
    bal, z, ent_local, ent_global = [], [], [], []
    for r in routers:
        t, e = r.logits.shape
        k = r.topk_experts.shape[1]
        p = torch.softmax(r.logits, dim=1)
        f = [sum(int((r.topk_experts[i] == j).sum()) for i in range(t)) / (t * k) for j in range(e)]
        bal.append(e * sum(f[j] * p[:, j].mean() for j in range(e)))
        z.append(sum(torch.logsumexp(r.logits[i], 0) ** 2 for i in range(t)) / t)
        locals_, globals_ = [], []
        for m in range(4):
            sel = [i for i in range(t) if int(r.modality[i]) == m]
            if not sel:
                continue
            h = [-(p[i] * torch.log(p[i])).sum() for i in sel]
            locals_.append(sum(h) / len(sel))
            mean_p = p[sel].mean(0)
            globals_.append(torch.relu(threshold * math.log(e) + (mean_p * torch.log(mean_p)).sum()))
        ent_local.append(sum(locals_) / len(locals_))
        ent_global.append(sum(globals_) / len(globals_))
    return [torch.stack(v).mean() for v in (bal, z, ent_local, ent_global)]


def test_every_term_equals_the_formula_with_gradients():
    routers = [router(0), router(1, tokens=9, experts=3, k=1), router(2, tokens=5, experts=4, k=1)]
    result = balance_losses(routers, BalanceConfig(entropy_threshold=0.9))
    got = [result.balance, result.z_loss, result.entropy_local, result.entropy_global]
    want = formula(routers, threshold=0.9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        leaves = [r.logits for r in routers]
        ga = torch.autograd.grad(a, leaves, allow_unused=True, materialize_grads=True, retain_graph=True)
        gb = torch.autograd.grad(b, leaves, allow_unused=True, materialize_grads=True, retain_graph=True)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-12)


def test_gradients_match_finite_differences():
    r = router(3, tokens=6, experts=3, k=2)

    def terms(logits):
        out = balance_losses([RouterOutput(logits, r.topk_experts, r.modality)], BalanceConfig(entropy_threshold=1.0))
        return out.balance, out.z_loss, out.entropy_local, out.entropy_global

    assert torch.autograd.gradcheck(terms, (r.logits,))


def test_one_layer_imbalance_cannot_cancel_another():
    """Layer A sends everything to expert 0, layer B to expert 1: each is maximally imbalanced."""
    t = 8
    modality = torch.zeros(t, dtype=torch.long)
    a = torch.tensor([[8.0, -8.0]], dtype=F64).repeat(t, 1).requires_grad_()
    b = torch.tensor([[-8.0, 8.0]], dtype=F64).repeat(t, 1).requires_grad_()
    routers = [
        RouterOutput(a, torch.zeros(t, 1, dtype=torch.long), modality),
        RouterOutput(b, torch.ones(t, 1, dtype=torch.long), modality),
    ]
    per_layer = balance_losses(routers, BalanceConfig()).balance
    assert per_layer.item() == pytest.approx(2.0, rel=1e-6)
    # Concatenating both layers' tokens (HF's way) would look perfectly balanced.
    topk = torch.cat([r.topk_experts for r in routers])
    both = RouterOutput(torch.cat([a, b]), topk, torch.cat([modality, modality]))
    concatenated = balance_losses([both], BalanceConfig()).balance
    assert concatenated.item() == pytest.approx(1.0, rel=1e-6)


def test_per_modality_metrics():
    """Text tokens all on expert 0, image tokens spread evenly over 2 experts."""
    modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    topk = torch.tensor([[0], [0], [0], [0], [0], [1], [0], [1]])
    logits = torch.zeros(8, 2, dtype=F64, requires_grad=True)
    metrics = balance_losses([RouterOutput(logits, topk, modality)], BalanceConfig()).metrics
    assert metrics["balance/layer0/text/max_load"].item() == pytest.approx(2.0)
    assert metrics["balance/layer0/image/max_load"].item() == pytest.approx(1.0)
    assert metrics["balance/layer0/text/balance"].item() == pytest.approx(1.0)
    assert metrics["balance/layer0/audio/tokens"].item() == 0.0
    assert metrics["balance/layer0/image/tokens"].item() == 4.0


def test_no_tokens_and_no_layers_give_connected_zeros():
    logits = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    empty = RouterOutput(logits, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    result = balance_losses([empty], BalanceConfig())
    total = result.balance + result.z_loss + result.entropy_local + result.entropy_global
    assert total.item() == 0.0
    total.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 4)
    none = balance_losses([], BalanceConfig())
    assert none.balance.item() == 0.0 and none.z_loss.item() == 0.0
