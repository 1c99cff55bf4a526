"""Triton MoE permute/combine and Triton InfoNCE against their float64 references (values and gradients).

The kernels run on CPU tensors through Triton's interpreter (`TRITON_INTERPRET=1`, set in conftest.py
before anything imports Triton).
"""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton")

from plait.ops import triton_moe
from plait.ops.fused import use_triton
from plait.ops.infonce import MatchIds, infonce_chunked, infonce_reference
from plait.ops.moe import (
    combine, dispatch, expert_capacity, ffn_rows, grouped_ffn, permute, reference_moe,
)
from test_infonce_kernel import make_case


def _moe_inputs(seed: int, tokens: int = 11, dim: int = 6, experts: int = 3, hidden: int = 4):
    """float64 tokens, router logits and SwiGLU expert weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(experts, 2 * hidden, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(experts, dim, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    return x, logits, w_in, w_out


def _moe(x, logits, w_in, w_out, top_k, capacity, backend):
    """Route top-k, dispatch, run the experts on grouped rows, combine (the MoME layer's data path)."""
    weights, chosen = logits.softmax(-1).topk(top_k)
    plan = dispatch(chosen, weights, w_in.shape[0], capacity)
    rows = permute(x, plan, backend)
    routed = grouped_ffn(rows, plan.counts, w_in, w_out, torch.nn.functional.silu, True)
    return combine(routed, plan, x.shape[0], backend)


def _moe_reference(x, logits, w_in, w_out, top_k, capacity):
    """The plain loop over slots and tokens from ops.moe."""
    weights, chosen = logits.softmax(-1).topk(top_k)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        return ffn_rows(rows, w_in[e], w_out[e], torch.nn.functional.silu, True)

    return reference_moe(x, chosen, weights, expert, capacity)


@pytest.mark.parametrize("top_k,factor", [(1, None), (2, None), (2, 0.5)])
def test_triton_moe_equals_reference(top_k, factor):
    inputs = _moe_inputs(top_k)
    capacity = expert_capacity(inputs[0].shape[0], top_k, inputs[2].shape[0], factor)
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    results = {}
    for name in ("reference", "torch", "triton"):
        if name == "reference":
            out = _moe_reference(*inputs, top_k, capacity)
        else:
            out = _moe(*inputs, top_k, capacity, name)
        results[name] = (out, *torch.autograd.grad((out * upstream).sum(), inputs))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_triton_combine_float32_and_dropped_tokens():
    g = torch.Generator().manual_seed(3)
    chosen = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    gate = torch.rand(4, 2, generator=g, requires_grad=True)
    plan = dispatch(chosen, gate, 2, capacity=2)
    out_rows = torch.randn(int(plan.counts.sum()), 5, generator=g, requires_grad=True)
    got = combine(out_rows, plan, 4, "triton")
    want = combine(out_rows.double(), dispatch(chosen, gate.double(), 2, capacity=2), 4, "torch")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32
    # Token 3 lost both assignments to the capacity: its row is exactly zero.
    assert torch.equal(got[3], torch.zeros(5))
    grads = torch.autograd.grad(got.square().sum(), (out_rows, gate))
    again = dispatch(chosen, gate, 2, capacity=2)
    want_grads = torch.autograd.grad(combine(out_rows, again, 4, "torch").square().sum(), (out_rows, gate))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_permute_empty_and_csr():
    x = torch.randn(0, 4, requires_grad=True)
    plan = dispatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 3)
    assert permute(x, plan, "triton").shape == (0, 4)
    rows, offsets = triton_moe.token_csr(torch.tensor([2, 0, 2, 1, 0]), 4)
    assert offsets.tolist() == [0, 2, 3, 5, 5]
    assert rows.tolist() == [1, 4, 3, 0, 2]


def _cloned(case):
    """Fresh leaves of a make_case tuple (so each path gets its own gradients)."""
    return tuple(
        t.detach().clone().requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point() else t
        for t in case
    )


def _loss_and_grads(fn, case, upstream, **kwargs):
    """(loss, stats, d/d query, keys, queue, scale) of the weighted per-row losses."""
    case = _cloned(case)
    loss, stats = fn(*case, **kwargs)
    leaves = [t for t in case[:4] if t.requires_grad]
    return (loss, stats, *torch.autograd.grad((loss * upstream).sum(), leaves))


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_triton_infonce_equals_reference_float64(with_negatives, chunk_size):
    case = make_case(1, b=6, n=7, q=13, d=5, with_negatives=with_negatives)
    upstream = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _loss_and_grads(infonce_chunked, case, upstream, label_smoothing=0.1, chunk_size=chunk_size,
                          backend="triton")
    want = _loss_and_grads(infonce_reference, case, upstream, label_smoothing=0.1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_triton_infonce_float32_no_ids_and_mixed_queue_dtype():
    g = torch.Generator().manual_seed(4)
    b, n, q, d = 5, 5, 20, 24
    query = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    queue = torch.nn.functional.normalize(torch.randn(q, d, generator=g), dim=-1).to(torch.bfloat16).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    ids = MatchIds.none(b, n, q)
    args = (torch.arange(b), ids, ids)
    loss, stats = infonce_chunked(query, keys, queue, scale, *args, chunk_size=8, backend="triton")
    grads = torch.autograd.grad(loss.sum(), (query, keys, queue, scale))
    ref_leaves = [t.detach().double().requires_grad_() for t in (query, keys, queue, scale)]
    ref_loss, ref_stats = infonce_reference(*ref_leaves, *args)
    ref_grads = torch.autograd.grad(ref_loss.sum(), ref_leaves)
    assert loss.dtype == torch.float32 and grads[2].dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.double(), ref_stats, rtol=1e-5, atol=1e-5)
    for got, want, tol in zip(grads, ref_grads, (1e-4, 1e-4, 1e-2, 1e-4)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_triton_infonce_empty_queue_and_frozen_keys():
    query, keys, queue, scale, pidx, exclude, share, _ = make_case(5, b=4, n=6, q=0, d=3)
    keys = keys.detach()
    got, _ = infonce_chunked(query, keys, queue, scale, pidx, exclude, share, backend="triton")
    want, _ = infonce_reference(query, keys, queue, scale, pidx, exclude, share)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_q, grad_queue = torch.autograd.grad(got.sum(), (query, queue))
    torch.testing.assert_close(grad_q, torch.autograd.grad(want.sum(), query)[0], rtol=1e-12, atol=1e-12)
    assert grad_queue.shape == (0, 3)


def test_auto_keeps_torch_on_cpu(caplog):
    case = make_case(0)
    assert not use_triton(case[0])
    with caplog.at_level(logging.INFO, logger="plait.ops.fused"):
        from plait.ops import fused

        fused._logged.discard(("chunked infonce", "torch"))
        infonce_chunked(*case)
    assert "chunked infonce: using torch" in caplog.text
