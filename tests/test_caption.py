"""Caption loss: token cross-entropy on caption tokens only, against the formula."""

from __future__ import annotations

import torch

from plait.trainer.losses.caption import caption_loss
from plait.trainer.losses.config import CaptionConfig

F64 = torch.float64


def formula(logits, targets, eps, ignore=-100):
    """Mean over caption tokens of -(1 - eps) log p_target - eps * mean_v log p_v."""
    terms = []
    for row, t in zip(logits, targets.tolist()):
        if t == ignore:
            continue
        logp = row - torch.logsumexp(row, 0)
        terms.append(-(1 - eps) * logp[t] - eps * logp.mean())
    return torch.stack(terms).mean()


def test_caption_loss_equals_formula_on_caption_tokens_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 9, generator=g, dtype=F64, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 8, -100, 5, 1])
    for eps in (0.0, 0.1):
        loss, count = caption_loss(logits, targets, CaptionConfig(label_smoothing=eps))
        want = formula(logits, targets, eps)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        assert count.item() == 5
        (got_grad,) = torch.autograd.grad(loss, logits)
        (want_grad,) = torch.autograd.grad(want, logits)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
        assert torch.equal(got_grad[1], torch.zeros(9, dtype=F64))


def test_caption_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    targets = torch.tensor([1, -100, 4, 0])
    config = CaptionConfig(label_smoothing=0.2)
    assert torch.autograd.gradcheck(lambda x: caption_loss(x, targets, config)[0], (logits,))


def test_no_caption_tokens_gives_a_connected_zero():
    logits = torch.zeros(0, 6, requires_grad=True)
    loss, count = caption_loss(logits, torch.zeros(0, dtype=torch.long), CaptionConfig())
    assert loss.item() == 0.0 and count.item() == 0
    loss.backward()
    assert logits.grad.shape == (0, 6)
    all_ignored = torch.zeros(3, 6, requires_grad=True)
    loss, count = caption_loss(all_ignored, torch.full((3,), -100), CaptionConfig())
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0 and torch.equal(all_ignored.grad, torch.zeros(3, 6))
