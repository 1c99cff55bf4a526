"""Chunked InfoNCE (online logsumexp, custom backward) against the materialised path and the formula."""

from __future__ import annotations

import math

import pytest
import torch

from plait.ops.infonce import MatchIds, infonce_chunked, infonce_reference


def make_case(seed: int, b: int = 5, n: int = 7, q: int = 11, d: int = 4, with_negatives: bool = False):
    """Random float64 inputs with ids that produce excluded, shared and plain candidates."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(q, d, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    positive_index = torch.randperm(n, generator=g)[:b]
    exclude = MatchIds(*(torch.randint(-1, 4, (rows, 1), generator=g) for rows in (b, n, q)))
    share = MatchIds(*(torch.randint(-1, 5, (rows, 2), generator=g) for rows in (b, n, q)))
    negatives = torch.randint(-1, n + q, (b, 4), generator=g) if with_negatives else None
    return query, keys, queue, scale, positive_index, exclude, share, negatives


def formula(query, keys, queue, scale, positive_index, exclude, share, negatives, eps):
    """Per-row loss written from the definition, one query and one candidate at a time."""
    cands = torch.cat([keys, queue])
    ex_c = torch.cat([exclude.keys, exclude.queue])
    sh_c = torch.cat([share.keys, share.queue])
    rows = []
    for i in range(query.shape[0]):
        pos, valid = [], []
        for j in range(cands.shape[0]):
            own = j == int(positive_index[i])
            shared = lambda a, c: any(int(x) >= 0 and int(x) == int(y) for x, y in zip(a, c))  # noqa: E731
            excluded = not own and shared(exclude.query[i], ex_c[j])
            is_pos = own or (not excluded and shared(share.query[i], sh_c[j]))
            keep = not excluded and (negatives is None or is_pos or j in negatives[i].tolist())
            if keep:
                valid.append(j)
                if is_pos:
                    pos.append(j)
        logits = {j: scale * (query[i] @ cands[j]) for j in valid}
        lse = torch.logsumexp(torch.stack(list(logits.values())), 0)
        target = sum((1 - eps) / len(pos) * logits[j] for j in pos) + sum(eps / len(valid) * logits[j] for j in valid)
        rows.append(lse - target)
    return torch.stack(rows)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_equals_reference_and_formula(with_negatives, chunk_size):
    case = make_case(0, with_negatives=with_negatives)
    chunked, stats = infonce_chunked(*case, label_smoothing=0.1, chunk_size=chunk_size)
    ref, ref_stats = infonce_reference(*case, label_smoothing=0.1)
    torch.testing.assert_close(chunked, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked, formula(*case, 0.1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats, ref_stats, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.5, 2.0, chunked.shape[0], dtype=torch.float64)
    inputs = [case[0], case[1], case[2], case[3]]
    grads = torch.autograd.grad((chunked * weights).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_chunked_gradients_match_finite_differences(with_negatives):
    case = make_case(1, b=3, n=4, q=5, d=3, with_negatives=with_negatives)
    query, keys, queue, scale, pidx, exclude, share, negatives = case

    def f(q, k, qu, s):
        return infonce_chunked(q, k, qu, s, pidx, exclude, share, negatives, 0.2, 2)[0]

    assert torch.autograd.gradcheck(f, (query, keys, queue, scale))


def test_plain_clip_case_matches_cross_entropy():
    """No queue, no ids, no smoothing: the row loss is cross-entropy over the keys."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    none = MatchIds.none(6, 6, 0)
    loss, _ = infonce_chunked(q, k, k.new_empty(0, 8), torch.tensor(3.0), torch.arange(6), none, none, chunk_size=4)
    want = torch.nn.functional.cross_entropy(3.0 * q @ k.T, torch.arange(6), reduction="none")
    torch.testing.assert_close(loss, want)


def test_empty_query_gives_empty_loss_and_zero_key_gradient():
    keys = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    query = keys.new_zeros(0, 3).requires_grad_()
    none = MatchIds.none(0, 4, 5)
    no_rows = torch.zeros(0, dtype=torch.long)
    loss, stats = infonce_chunked(query, keys, keys.new_zeros(5, 3), torch.tensor(1.0), no_rows, none, none)
    assert loss.shape == (0,) and stats.shape == (0, 4)
    loss.sum().backward()
    assert torch.equal(keys.grad, torch.zeros_like(keys))


def test_negative_stats_count_only_negatives():
    """One query, own positive plus a shared positive and two negatives: stats see the two negatives."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    keys = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    share = MatchIds(torch.tensor([[7]]), torch.tensor([[7], [7], [1], [2]]), torch.empty(0, 1, dtype=torch.long))
    args = (q, keys, keys.new_empty(0, 2), torch.tensor(1.0), torch.tensor([0]), MatchIds.none(1, 4, 0), share)
    _, stats = infonce_chunked(*args, chunk_size=2)
    count, total, total_sq, hardest = stats[0].tolist()
    assert (count, total, total_sq, hardest) == (2.0, -1.0, 1.0, 0.0)
    loss, _ = infonce_chunked(*args)
    want = math.log(math.e + math.exp(0.8) + 1 + math.exp(-1)) - (1.0 + 0.8) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)


def test_bench_reports_ratios_and_agrees_between_variants():
    """`plait bench contrastive` on a tiny problem: both variants give the same loss and gradient."""
    import argparse

    from plait.trainer.bench import contrastive as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--batch", "8", "--queue", "300", "--dim", "8", "--chunk-size", "64", "--repeats", "1"])
    out = bench.run(args)
    assert out["loss_abs_diff"] < 1e-5 and out["grad_sum_rel_diff"] < 1e-5
    assert out["chunked_peak_over_materialized"] > 0 and out["chunked_time_over_materialized"] > 0
