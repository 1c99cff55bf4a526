"""Which fused implementation to use, decided at run time: NVIDIA apex on CUDA when importable, else torch.

- norms: apex `FusedLayerNorm` / `FusedRMSNorm`, else `torch.nn.LayerNorm` / `torch.nn.RMSNorm`;
- AdamW: apex `FusedAdam(adam_w_mode=True)`, else `torch.optim.AdamW(fused=True)` on CUDA and
  `AdamW(foreach=True)` on CPU;
- Triton kernels (`ops.triton_moe`, `ops.triton_infonce`): when triton is importable and the
  tensors are on CUDA.

apex is NVIDIA's (built from source); the unrelated PyPI package named `apex` is never used: it is
recognised by lacking `apex.normalization` / `apex.optimizers`. Every choice is logged once.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

Choice = Literal["auto", "apex", "torch"]
"""`auto` picks apex on CUDA when NVIDIA apex is importable, torch otherwise."""

_logged: set[tuple[str, str]] = set()


def log_choice_once(what: str, choice: str, detail: str = "") -> None:
    """One info line per (what, choice) per process, so a run's log says which fast path it used."""
    if (what, choice) not in _logged:
        _logged.add((what, choice))
        logger.info("%s: using %s%s", what, choice, f" ({detail})" if detail else "")


def _module_exists(name: str) -> bool:
    """True when `name` is importable (a missing parent package counts as not importable)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def apex_available(part: Literal["normalization", "optimizers"] = "normalization") -> bool:
    """True when NVIDIA apex's `part` sub-package is importable (never true for the PyPI `apex`)."""
    return _module_exists(f"apex.{part}")


def triton_available() -> bool:
    """True when the triton package is importable."""
    return _module_exists("triton")


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton kernels run when triton is importable and every tensor is on CUDA (torch paths elsewhere)."""
    return all(t.is_cuda for t in tensors) and triton_available()


def _resolve(choice: Choice, device: torch.device, part: Literal["normalization", "optimizers"]) -> str:
    """`apex` or `torch` for `device`; asking for apex where it cannot run is an error."""
    apex_ok = device.type == "cuda" and apex_available(part)
    if choice == "apex" and not apex_ok:
        raise ValueError(f"fused: apex.{part} needs NVIDIA apex on a CUDA device (device {device.type})")
    return "apex" if choice == "apex" or (choice == "auto" and apex_ok) else "torch"


def make_norm(
    kind: Literal["layernorm", "rmsnorm"],
    dim: int,
    eps: float = 1e-6,
    device: torch.device | str = "cpu",
    choice: Choice = "auto",
) -> nn.Module:
    """A LayerNorm or RMSNorm over the last dim (learned scale; LayerNorm also a bias), fused where possible."""
    device = torch.device(device)
    picked = _resolve(choice, device, "normalization")
    if picked == "apex":
        from apex.normalization import FusedLayerNorm, FusedRMSNorm

        norm = FusedLayerNorm(dim, eps=eps) if kind == "layernorm" else FusedRMSNorm(dim, eps=eps)
    else:
        norm = nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)
    log_choice_once(kind, f"{picked} {type(norm).__name__}", device.type)
    return norm.to(device)


def make_adamw(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    choice: Choice = "auto",
) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) in its fastest form for the device of the parameters."""
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    device = first.device
    picked = _resolve(choice, device, "optimizers")
    if picked == "apex":
        from apex.optimizers import FusedAdam

        optimizer = FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
        detail = "apex FusedAdam"
    else:
        cuda = device.type == "cuda"
        flags = {"fused": True} if cuda else {"foreach": True}
        optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **flags)
        detail = f"torch AdamW({next(iter(flags))}=True)"
    log_choice_once("adamw", detail, device.type)
    return optimizer
