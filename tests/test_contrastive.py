"""Contrastive loss: symmetric InfoNCE per pair, soft labels, temperature, hard negatives, objective total."""

from __future__ import annotations

import math

import pytest
import torch

from plait.data.rng import key_ids
from plait.ops.infonce import MatchIds
from plait.trainer.losses.config import ContrastiveConfig, HardNegativeConfig, LossConfig, QueueConfig
from plait.trainer.losses.contrastive import PAIRS, ContrastiveLoss, gather_batch
from plait.trainer.losses.hard_negatives import select_negatives
from plait.trainer.losses.objective import Objective, ObjectiveInputs

F64 = torch.float64


def make_batch(seed: int, n: int = 9, d: int = 6):
    """Float64 embeddings over the three modalities with some shared groups and captions."""
    g = torch.Generator().manual_seed(seed)
    media = torch.randn(n, d, generator=g, dtype=F64, requires_grad=True)
    text = torch.randn(n, d, generator=g, dtype=F64, requires_grad=True)
    modality = torch.tensor([0, 1, 0, 2, 0, 1, 0, 2, 0])[:n]
    group = torch.tensor([5, 6, 5, -1, 7, 6, 8, 9, 7])[:n]
    caption = torch.tensor([-1, -1, -1, -1, 3, -1, 3, -1, -1])[:n]
    keys = [f"k{i}" for i in range(n)]
    return media, text, modality, group, caption, keys


def ids_of(keys, group, caption):
    return torch.stack([key_ids(keys), group, caption], dim=1)


def formula_loss(media, text, modality, group, caption, keys, scale, multi_positive, eps):
    """Mean over present pairs of the symmetric soft-target InfoNCE, written out per row."""
    media = torch.nn.functional.normalize(media, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    pair_losses = []
    for code in range(3):
        rows = [i for i in range(len(keys)) if int(modality[i]) == code]
        if not rows:
            continue
        total = 0.0
        for queries, cands in ((media, text), (text, media)):
            for i in rows:
                valid, pos = [], []
                for j in rows:
                    related = (group[i] >= 0 and group[i] == group[j]) or (caption[i] >= 0 and caption[i] == caption[j])
                    same_key = keys[i] == keys[j]
                    if i == j or (multi_positive and related and not (same_key and i != j)):
                        valid.append(j)
                        pos.append(j)
                    elif not related and not same_key:
                        valid.append(j)
                logits = torch.stack([scale * queries[i] @ cands[j] for j in valid])
                logp = logits - torch.logsumexp(logits, 0)
                y = torch.tensor([(1 - eps) * (j in pos) / len(pos) + eps / len(valid) for j in valid], dtype=F64)
                total = total - (y * logp).sum()
        pair_losses.append(total / (2 * len(rows)))
    return torch.stack(pair_losses).mean()


@pytest.mark.parametrize("multi_positive", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_contrastive_equals_formula(multi_positive, eps):
    media, text, modality, group, caption, keys = make_batch(0)
    config = ContrastiveConfig(multi_positive=multi_positive, label_smoothing=eps, chunk_size=2)
    loss_fn = ContrastiveLoss(config, HardNegativeConfig()).double()
    batch = gather_batch(media, text, modality, ids_of(keys, group, caption))
    got = loss_fn(batch).loss
    scale = math.exp(loss_fn.logit_scale.item())
    want = formula_loss(media, text, modality, group, caption, keys, scale, multi_positive, eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(got, [media, text])
    g_want = torch.autograd.grad(want, [media, text])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_contrastive_gradients_match_finite_differences():
    media, text, modality, group, caption, keys = make_batch(1, n=6, d=3)
    loss_fn = ContrastiveLoss(ContrastiveConfig(label_smoothing=0.1, chunk_size=2), HardNegativeConfig()).double()
    ids = ids_of(keys, group, caption)

    def loss_at(m, t):
        return loss_fn(gather_batch(m, t, modality, ids)).loss

    assert torch.autograd.gradcheck(loss_at, (media, text))
    (analytic,) = torch.autograd.grad(loss_at(media, text), loss_fn.logit_scale)
    h = 1e-6
    values = []
    for delta in (h, -h):
        with torch.no_grad():
            loss_fn.logit_scale.fill_(math.log(1 / 0.07) + delta)
            values.append(loss_at(media, text).item())
    assert analytic.item() == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6)


def test_temperature_starts_at_007_and_is_clamped_in_forward():
    loss_fn = ContrastiveLoss(ContrastiveConfig(), HardNegativeConfig())
    assert loss_fn.scale().item() == pytest.approx(1 / 0.07)
    media, text, modality, group, caption, keys = make_batch(2)
    batch = gather_batch(media.float(), text.float(), modality, ids_of(keys, group, caption))
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(500.0))
    loss = loss_fn(batch).loss
    assert loss_fn.scale().item() == pytest.approx(100.0)
    (grad,) = torch.autograd.grad(loss, loss_fn.logit_scale)
    assert grad.item() == 0.0
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(500.0))


def test_pairs_absent_from_batch_are_skipped_and_empty_batch_backpropagates():
    media, text, modality, group, caption, keys = make_batch(3)
    only_image = modality == 0
    loss_fn = ContrastiveLoss(ContrastiveConfig(), HardNegativeConfig()).double()
    idx = only_image.nonzero().squeeze(1)
    batch = gather_batch(media[idx], text[idx], modality[idx], ids_of([keys[i] for i in idx], group[idx], caption[idx]))
    result = loss_fn(batch)
    assert set(result.pair_losses) == {"image_text"}
    empty = gather_batch(media[:0], text[:0], modality[:0], torch.zeros(0, 3, dtype=torch.long))
    zero = loss_fn(empty).loss
    zero.backward()
    assert zero.item() == 0.0 and media.grad is not None and torch.equal(media.grad, torch.zeros_like(media))


def test_select_negatives_hard_random_mix():
    g = torch.Generator().manual_seed(4)
    b, n, q, d = 4, 6, 30, 5
    query = torch.randn(b, d, generator=g, dtype=F64)
    keys = torch.randn(n, d, generator=g, dtype=F64)
    queue = torch.randn(q, d, generator=g, dtype=F64)
    pidx = torch.tensor([0, 1, 2, 3])
    cand_key = torch.arange(n + q)
    cand_key[10] = 1  # a queue copy of query 1's sample: never a negative
    exclude = MatchIds(pidx[:, None], cand_key[:n, None], cand_key[n:, None])
    none = MatchIds.none(b, n, q)
    sims = query @ torch.cat([keys, queue]).T
    args = (query, keys, queue, pidx, exclude, none)
    hard_only = select_negatives(*args, 5, 1.0, torch.Generator().manual_seed(0), chunk_size=7)
    for i in range(b):
        allowed = [j for j in range(n + q) if j != int(pidx[i]) and int(cand_key[j]) != int(pidx[i])]
        want = sorted(allowed, key=lambda j: -sims[i, j].item())[:5]
        assert hard_only[i].tolist() == want
    mixed = select_negatives(*args, 8, 0.5, torch.Generator().manual_seed(1), chunk_size=7)
    again = select_negatives(*args, 8, 0.5, torch.Generator().manual_seed(1), chunk_size=7)
    assert torch.equal(mixed, again)
    for i in range(b):
        picks = mixed[i].tolist()
        assert len(set(picks)) == 8 and all(j != int(pidx[i]) and int(cand_key[j]) != int(pidx[i]) for j in picks)
        assert picks[:4] == hard_only[i].tolist()[:4]
    none = MatchIds.none(1, 2, 0)
    gen = torch.Generator().manual_seed(0)
    few = select_negatives(query[:1], keys[:2], queue[:0], pidx[:1], none, none, 4, 0.5, gen)
    assert sorted(few[0].tolist()) == [-1, -1, -1, 1]


def test_hard_negative_loss_uses_only_selected_negatives():
    media, text, modality, group, caption, keys = make_batch(5)
    cfg = ContrastiveConfig(multi_positive=False)
    sampled = ContrastiveLoss(cfg, HardNegativeConfig(num_negatives=1, hard_fraction=1.0)).double()
    batch = gather_batch(media, text, modality, ids_of(keys, group, caption))
    got = sampled(batch).pair_losses["image_text"]
    rows = (modality == 0).nonzero().squeeze(1)
    m = torch.nn.functional.normalize(media[rows], dim=-1)
    t = torch.nn.functional.normalize(text[rows], dim=-1)
    grp, cap = group[rows], caption[rows]
    scale = sampled.scale()
    total = 0.0
    for q, c in ((m, t), (t, m)):
        for i in range(len(rows)):
            related = [
                (grp[i] >= 0 and grp[i] == grp[j]) or (cap[i] >= 0 and cap[i] == cap[j]) for j in range(len(rows))
            ]
            ok = [j for j in range(len(rows)) if j != i and not related[j]]
            hardest = max(ok, key=lambda j: (q[i] @ c[j]).item())
            logits = scale * torch.stack([q[i] @ c[i], q[i] @ c[hardest]])
            total = total + torch.logsumexp(logits, 0) - logits[0]
    torch.testing.assert_close(got, total / (2 * len(rows)))


def test_objective_total_is_weighted_sum_and_logs_every_component():
    media, text, modality, group, caption, keys = make_batch(6)
    config = LossConfig(queue=QueueConfig(size=16))
    objective = Objective(config, embed_dim=6).double()
    v = 11
    logits = torch.randn(5, v, dtype=F64, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 3, 4])
    inputs = ObjectiveInputs(media, text, modality, keys, group, caption, logits, targets)
    weights = {"contrastive": 0.5, "caption": 3.0}
    out = objective(inputs, step=0, weights=weights)
    c = out.components
    want = 0.5 * c["loss/contrastive"] + 3.0 * c["loss/caption"] + 0.01 * c["loss/balance"] + 0.001 * c["loss/z"]
    torch.testing.assert_close(out.loss.detach(), want)
    logged = ("loss/total", "loss/contrastive/image_text", "sim/image_text/pos_mean", "queue/image_text/fill")
    assert all(name in c for name in (*logged, "contrastive/logit_scale", "loss/z"))
    assert c["queue/image_text/fill"].item() == pytest.approx(5 / 16)
    with pytest.raises(ValueError, match="weights"):
        objective(inputs, step=1, weights={"contrastiv": 1.0})
    assert set(PAIRS) == {"image_text", "audio_text", "video_text"}


def test_caption_weight_zero_turns_captioning_off():
    media, text, modality, group, caption, keys = make_batch(6)
    objective = Objective(LossConfig(queue=QueueConfig(size=0)), embed_dim=6).double()
    assert objective.captioning(objective.weights())
    weights = objective.weights({"caption": 0.0})
    assert weights["caption"] == 0.0 and weights["contrastive"] == objective.config.weights["contrastive"]
    assert not objective.captioning(weights)
    # The model then returns no caption logits; the objective neither computes nor logs a caption term.
    inputs = ObjectiveInputs(media, text, modality, keys, group, caption, None, None)
    out = objective(inputs, step=0, weights={"caption": 0.0})
    assert "loss/caption" not in out.components
    torch.testing.assert_close(out.loss.detach(), out.components["loss/total"])


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="^label_smoothing"):
        ContrastiveConfig(label_smoothing=1.0)
    with pytest.raises(ValueError, match="^hard_fraction"):
        HardNegativeConfig(hard_fraction=1.5)
    with pytest.raises(ValueError, match="^weights.caption"):
        LossConfig(weights={"caption": -1.0})
