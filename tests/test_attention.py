"""Varlen attention: every path equals the float64 per-sequence reference (values and gradients)."""

from __future__ import annotations

import logging

import pytest
import torch

from plait.ops import attention
from plait.ops.attention import reference_varlen_attention, select_backend, varlen_attention


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _qkv(tq: int, tk: int, heads: int, kv_heads: int, dim: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    make = lambda t, h: torch.randn(t, h, dim, generator=gen, dtype=dtype).requires_grad_(True)  # noqa: E731
    return make(tq, heads), make(tk, kv_heads), make(tk, kv_heads)


def _grads(out: torch.Tensor, tensors, seed: int) -> list[torch.Tensor]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weight = weight.to(out.device, out.dtype)
    return torch.autograd.grad((out * weight).sum(), tensors)


def _assert_matches_reference(q, k, v, cu_q, cu_k, causal: bool, backend: str = "bucketed", tol: float = 1e-5):
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=causal, backend=backend)
    ref = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in zip(_grads(out, (q, k, v), 1), _grads(ref, (q, k, v), 1)):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("lengths", [[7, 1, 33, 0, 16, 16, 5], [64], [3, 3, 3, 3], [1, 200, 2, 90]])
def test_bucketed_self_attention_matches_reference(lengths, kv_heads, causal):
    q, k, v = _qkv(sum(lengths), sum(lengths), 4, kv_heads, 8, seed=len(lengths))
    _assert_matches_reference(q, k, v, _cu(lengths), _cu(lengths), causal)


def test_bucketed_cross_attention_matches_reference_and_zeroes_keyless_queries():
    lengths_q, lengths_k = [4, 4, 4, 4, 0], [10, 0, 1, 37, 5]
    q, k, v = _qkv(sum(lengths_q), sum(lengths_k), 4, 4, 8, seed=3)
    _assert_matches_reference(q, k, v, _cu(lengths_q), _cu(lengths_k), causal=False)
    out = varlen_attention(q, k, v, _cu(lengths_q), _cu(lengths_k))
    assert torch.count_nonzero(out[4:8]) == 0


def test_sequences_never_attend_to_each_other():
    lengths = [5, 9, 12]
    q, k, v = _qkv(26, 26, 2, 2, 8, seed=4)
    base = varlen_attention(q, k, v, _cu(lengths), causal=False)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[5:14] += 3.0
    v2[5:14] -= 5.0
    moved = varlen_attention(q, k2, v2, _cu(lengths), causal=False)
    assert torch.equal(base[:5], moved[:5]) and torch.equal(base[14:], moved[14:])
    assert not torch.allclose(base[5:14], moved[5:14])


def test_causal_query_ignores_later_tokens_of_its_sequence():
    q, k, v = _qkv(10, 10, 2, 2, 8, seed=5)
    base = varlen_attention(q, k, v, _cu([10]), causal=True)
    v2 = v.detach().clone()
    v2[6:] += 1.0
    moved = varlen_attention(q, k, v2, _cu([10]), causal=True)
    assert torch.equal(base[:6], moved[:6]) and not torch.allclose(base[6:], moved[6:])


def test_empty_input_keeps_projections_in_the_graph():
    q, k, v = _qkv(0, 0, 2, 2, 8, seed=6)
    out = varlen_attention(q, k, v, torch.zeros(1, dtype=torch.int32))
    assert out.shape == (0, 2, 8)
    out.sum().backward()
    assert k.grad is not None and torch.count_nonzero(k.grad) == 0


def test_causal_needs_equal_lengths():
    q, k, v = _qkv(4, 5, 2, 2, 8, seed=7)
    with pytest.raises(ValueError, match="causal"):
        varlen_attention(q, k, v, _cu([4]), _cu([5]), causal=True)


def test_auto_picks_bucketed_on_cpu_and_logs_once(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_logged_paths", set())
    q = torch.zeros(1, 1, 8)
    with caplog.at_level(logging.INFO, logger="plait.ops.attention"):
        assert select_backend(q) == "bucketed"
        assert select_backend(q) == "bucketed"
    assert sum("bucketed path" in r.message for r in caplog.records) == 1


def test_reference_backend_is_selectable():
    q, k, v = _qkv(12, 12, 2, 2, 8, seed=8)
    out = varlen_attention(q, k, v, _cu([5, 7]), backend="reference")
    torch.testing.assert_close(out.double(), reference_varlen_attention(q, k, v, _cu([5, 7])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths need a GPU")
@pytest.mark.parametrize("backend", ["flash", "torch_varlen"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_paths_match_reference(backend, causal):
    if backend == "flash" and not attention.flash_attn_available():
        pytest.skip("flash-attn not installed")
    lengths = [7, 1, 33, 16, 90]
    q, k, v = (t.detach().cuda().bfloat16().requires_grad_(True) for t in _qkv(147, 147, 4, 4, 64, seed=9))
    _assert_matches_reference(q, k, v, _cu(lengths).cuda(), _cu(lengths).cuda(), causal, backend, tol=3e-2)
