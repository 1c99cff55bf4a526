"""Variable-length (packed) attention: one entry point, the fastest path per device, and a float64 reference.

Tokens of many sequences are packed back to back (`[T, H, D]`) and `cu_seqlens` marks where each
sequence starts; no token ever attends outside its own sequence. Paths:

- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16, when installed);
- `torch_varlen`: `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16);
- `bucketed`: sequences grouped into buckets of similar length (bins sqrt(2) apart), each bucket
  padded to its longest member and run through one `scaled_dot_product_attention` call. It does at
  most ~2x the work of a per-sequence loop but in a handful of calls, and beats a block-diagonal
  mask (which costs the square of the whole pack); it is the CPU path and the fallback everywhere;
- `reference`: a plain float64 loop over sequences, the ground truth every path is tested against.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

from plait.ops.segments import cu_to_lengths

logger = logging.getLogger(__name__)

Backend = Literal["auto", "flash", "torch_varlen", "bucketed", "reference"]
"""Attention paths; `auto` picks the fastest one available for the tensors at hand."""

_HALF = (torch.float16, torch.bfloat16)
_logged_paths: set[str] = set()


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable (it only installs on CUDA machines)."""
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    """True when this torch ships `torch.nn.attention.varlen` (CUDA only at run time)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def select_backend(q: torch.Tensor, backend: Backend = "auto") -> str:
    """Resolve `auto` to a concrete path for tensors like `q`, logging the choice once per path."""
    path = backend
    if backend == "auto":
        fast_ok = q.is_cuda and q.dtype in _HALF
        if fast_ok and flash_attn_available():
            path = "flash"
        elif fast_ok and torch_varlen_available():
            path = "torch_varlen"
        else:
            path = "bucketed"
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("varlen attention: using the %s path (device %s, dtype %s)", path, q.device.type, q.dtype)
    return path


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of packed `q [Tq, H, D]` over packed `k, v [Tk, Hkv, D]`, sequence by sequence.

    `cu_seqlens_*` are `[S+1]` offsets (`cu_seqlens_k` defaults to `cu_seqlens_q`); `Hkv` must divide
    `H` (grouped-query attention). `causal` needs equal query and key lengths per sequence. A query
    sequence with no keys gets zeros. Returns `[Tq, H, D]`.
    """
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    if q.shape[0] == 0 or q.is_meta:
        # No rows, or shapes only (the meta device): keep k and v in the graph so every projection gets a
        # (zero) gradient, as ZeRO-3 needs.
        return q + (k.sum() + v.sum()) * 0
    if max_seqlen_q is None:
        max_seqlen_q = int(cu_to_lengths(cu_seqlens_q).max())
    if max_seqlen_k is None:
        max_seqlen_k = int(cu_to_lengths(cu_seqlens_k).max())
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    path = select_backend(q, backend)
    if path == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
            softmax_scale=scale, causal=causal,
        )
    if path == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(
            q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
            scale=scale, window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1],
        )
    if path == "reference":
        return reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale).to(q.dtype)
    return _bucketed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale)


def _length_bins(lengths: torch.Tensor) -> torch.Tensor:
    """Bin index per length, bins sqrt(2) apart, so a bucket pads no sequence by more than ~41%."""
    return torch.ceil(2 * torch.log2(lengths.clamp(min=1).double())).long()


def _padded_rows(starts: torch.Tensor, lengths: torch.Tensor, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids `[B, longest]` of sequences padded to the longest (padding reads row `fill`), and a validity mask."""
    offsets = torch.arange(int(lengths.max()), device=starts.device)
    valid = offsets[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + offsets[None, :], fill), valid


def _take_padded(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`x[rows]` where row `len(x)` reads zeros; returns `[B, L, H, D]` laid out as SDPA's `[B, H, L, D]`."""
    return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])[rows].transpose(1, 2)


def _bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """SDPA over length buckets; see the module docstring."""
    cu_q, cu_k = cu_q.long(), cu_k.long()
    len_q, len_k = cu_to_lengths(cu_q), cu_to_lengths(cu_k)
    if causal and not torch.equal(len_q, len_k):
        raise ValueError("causal varlen attention needs equal query and key lengths per sequence")
    groups = k.shape[1] != q.shape[1]
    live = (len_q > 0) & (len_k > 0)
    bucket = _length_bins(len_q) * 1024 + _length_bins(len_k)
    # Queries of a sequence without keys get zeros.
    dead_rows = torch.repeat_interleave(~live & (len_q > 0), len_q).nonzero().squeeze(1)
    outputs, rows_out = [q.new_zeros((dead_rows.numel(), *q.shape[1:]))], [dead_rows]
    for b in torch.unique(bucket[live]).tolist():
        seqs = ((bucket == b) & live).nonzero().squeeze(1)
        rows_q, valid_q = _padded_rows(cu_q[seqs], len_q[seqs], q.shape[0])
        rows_k, valid_k = _padded_rows(cu_k[seqs], len_k[seqs], k.shape[0])
        # Causal with right padding: a real query only sees earlier (real) keys, so no mask is needed.
        mask = None if causal or bool(valid_k.all()) else valid_k[:, None, None, :]
        out = F.scaled_dot_product_attention(
            _take_padded(q, rows_q), _take_padded(k, rows_k), _take_padded(v, rows_k),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=groups,
        ).transpose(1, 2)
        outputs.append(out[valid_q])
        rows_out.append(rows_q[valid_q])
    rows = torch.cat(rows_out)
    inverse = torch.empty_like(rows)
    inverse[rows] = torch.arange(rows.numel(), device=rows.device)
    return torch.cat(outputs)[inverse]


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Float64 ground truth: explicit softmax attention, one sequence at a time (slow on purpose)."""
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = torch.zeros_like(q)
    for s in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1])
        k0, k1 = int(cu_seqlens_k[s]), int(cu_seqlens_k[s + 1])
        if q1 == q0 or k1 == k0:
            continue
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], k[k0:k1]) * scale
        if causal:
            future = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, -math.inf)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[k0:k1])
    return out
