"""Fused norm / AdamW factory: torch on CPU, equal to float64 formulas; the PyPI `apex` is never taken for NVIDIA's."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from plait.ops import fused


def test_norms_are_torch_on_cpu_and_match_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    layer = fused.make_norm("layernorm", 6, eps=1e-5).double()
    rms = fused.make_norm("rmsnorm", 6, eps=1e-5).double()
    assert type(layer) is torch.nn.LayerNorm and type(rms) is torch.nn.RMSNorm
    with torch.no_grad():
        for norm in (layer, rms):
            norm.weight.copy_(torch.randn(6, generator=g))
        layer.bias.copy_(torch.randn(6, generator=g))
    centred = x - x.mean(-1, keepdim=True)
    want_ln = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + 1e-5) * layer.weight + layer.bias
    want_rms = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5) * rms.weight
    for got, want in ((layer(x), want_ln), (rms(x), want_rms)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(*grads, rtol=1e-12, atol=1e-12)


def _adamw_reference(p, grads, lr, betas, eps, wd):
    """Decoupled-weight-decay Adam in float64, step by step."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        p = p * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (torch.sqrt(v_hat) + eps)
    return p


def test_adamw_is_foreach_on_cpu_and_matches_formula(caplog):
    g = torch.Generator().manual_seed(1)
    start = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grads = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    param = torch.nn.Parameter(start.clone())
    fused._logged.discard(("adamw", "torch AdamW(foreach=True)"))
    with caplog.at_level(logging.INFO, logger="plait.ops.fused"):
        opt = fused.make_adamw([{"params": [param]}], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] and not opt.defaults["fused"]
    assert "adamw: using torch AdamW(foreach=True) (cpu)" in caplog.text
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    want = _adamw_reference(start, grads, 0.05, (0.8, 0.95), 1e-6, 0.1)
    torch.testing.assert_close(param.detach(), want, rtol=1e-12, atol=1e-12)


def test_apex_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="apex.normalization needs NVIDIA apex on a CUDA device"):
        fused.make_norm("rmsnorm", 8, choice="apex")
    with pytest.raises(ValueError, match="apex.optimizers"):
        fused.make_adamw([torch.nn.Parameter(torch.zeros(2))], choice="apex")


def test_pypi_apex_is_not_nvidia_apex(tmp_path, monkeypatch):
    # The PyPI package named `apex` has neither sub-package: it must never count as NVIDIA apex.
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    assert fused._module_exists("apex")
    assert not fused.apex_available("normalization") and not fused.apex_available("optimizers")
    assert type(fused.make_norm("layernorm", 4)) is torch.nn.LayerNorm


def test_triton_only_for_cuda_tensors():
    assert not fused.use_triton(torch.zeros(1))
    assert fused.triton_available() == fused._module_exists("triton")
