"""Mixture-of-Modality-Experts FFN: per-token, modality-aware top-k routing over stacked experts.

A `MoMELayer` replaces the FFN of chosen encoder and LLM layers. Experts are stacked into two
parameters (`w_in [E, 2F, D]`, `w_out [E, D, F]`) and all run every step (on zero rows when no token
picks them), so every rank touches the same parameters in the same order: under ZeRO-3 ranks that
route to different experts cannot hang. `mark_zero3_leaf_modules` additionally makes DeepSpeed gather
a MoME layer's parameters once on entry rather than per sub-module.

HF decoder layers call `mlp(hidden)` with no room for token modalities, so those come through a
shared `RoutingContext` that the multimodal model fills before each forward; layers also report their
`RouterOutput` there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from plait.data.batch import TOKEN_MODALITIES
from plait.kernels.moe import combine, dispatch, expert_capacity, ffn_rows, grouped_ffn, permute
from plait.kernels.segments import index_counts
from plait.trainer.model.config import MoMEConfig
from plait.trainer.model.routing import RouterOutput


class RoutingContext:
    """Token modalities of the running forward, and the router outputs of the MoME layers it ran."""

    def __init__(self) -> None:
        self.modality: torch.Tensor | None = None
        """[T] token modality codes for layers that are not handed them (HF decoder MLPs)."""
        self.outputs: list[RouterOutput] = []
        """Router outputs reported since `record()` started."""
        self.recording = False
        """Off outside `record()`, so activation-checkpoint recomputes report nothing twice."""

    @contextmanager
    def record(self) -> Iterator[list[RouterOutput]]:
        """Collect the router outputs of one forward pass into the yielded list."""
        self.outputs, self.recording = [], True
        try:
            yield self.outputs
        finally:
            self.recording = False

    def report(self, output: RouterOutput) -> None:
        """Called by each MoME layer after routing."""
        if self.recording:
            self.outputs.append(output)


class ModalityRouter(nn.Module):
    """Router logits `[T, E]` that depend on the token and its modality (per-modality routers or modality embedding)."""

    def __init__(self, dim: int, cfg: MoMEConfig) -> None:
        super().__init__()
        modalities, experts = len(TOKEN_MODALITIES), cfg.num_experts
        self.mode = cfg.router
        self.num_experts = experts
        out = experts * modalities if cfg.router == "per_modality" else experts
        self.proj = nn.Linear(dim, out, bias=False)
        self.modality_embed = nn.Embedding(modalities, dim) if cfg.router == "modality_embedding" else None
        self.bias = nn.Parameter(torch.zeros(modalities, experts)) if cfg.router_bias else None
        tables = [self.proj] + ([self.modality_embed] if self.modality_embed is not None else [])
        with full_parameters([t.weight for t in tables], write=True):
            for table in tables:
                nn.init.normal_(table.weight, std=cfg.init_std)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Logits of tokens `x [T, D]` with modality codes `modality [T]`, in at least fp32 whatever the training
        dtype (routing and the balance and z losses hinge on small logit differences)."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        weight = self.proj.weight.to(x.dtype)
        if self.modality_embed is not None:
            logits = nn.functional.linear(x + self.modality_embed(modality).to(x.dtype), weight)
        else:
            every = nn.functional.linear(x, weight).view(x.shape[0], len(TOKEN_MODALITIES), self.num_experts)
            index = modality.view(-1, 1, 1).expand(-1, 1, self.num_experts)
            logits = every.gather(1, index).squeeze(1)
        if self.bias is not None:
            logits = logits + self.bias[modality].to(x.dtype)
        return logits


def dense_ffn_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Callable, bool]:
    """(w_in, w_out, activation, gated) of a dense FFN: an HF gated MLP (gate/up/down_proj) or a plait FeedForward."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(layer.bias is not None for layer in layers):
            raise ValueError("mome: upcycling an MLP with biases is not supported")
        w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return w_in, mlp.down_proj.weight, mlp.act_fn, True
    if all(hasattr(mlp, n) for n in ("w_in", "w_out", "activation", "gated")):
        return mlp.w_in.weight, mlp.w_out.weight, mlp.activation, mlp.gated
    raise ValueError(f"mome: cannot read the dense FFN weights of {type(mlp).__name__}")


class MoMELayer(nn.Module):
    """Modality-aware top-k MoE FFN over stacked experts, with optional capacity and shared expert."""

    def __init__(
        self,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor],
        gated: bool,
        cfg: MoMEConfig,
        context: RoutingContext | None = None,
    ) -> None:
        """Experts start as copies of the dense `w_in [F', D]`, `w_out [D, F]` (cfg.init `upcycle`) or fresh."""
        super().__init__()
        self.cfg = cfg
        self.activation = activation
        self.gated = gated
        self.context = context
        experts = cfg.num_experts
        self.w_in = nn.Parameter(w_in.detach().clone().unsqueeze(0).repeat(experts, 1, 1))
        self.w_out = nn.Parameter(w_out.detach().clone().unsqueeze(0).repeat(experts, 1, 1))
        if cfg.init == "fresh":
            nn.init.normal_(self.w_in, std=cfg.init_std)
            nn.init.normal_(self.w_out, std=cfg.init_std)
        self.router = ModalityRouter(w_in.shape[1], cfg)
        self.shared_w_in = nn.Parameter(self.w_in[0].detach().clone()) if cfg.shared_expert else None
        self.shared_w_out = nn.Parameter(self.w_out[0].detach().clone()) if cfg.shared_expert else None

    @classmethod
    def from_dense(cls, mlp: nn.Module, cfg: MoMEConfig, context: RoutingContext | None = None) -> MoMELayer:
        """Replace a dense FFN (HF gated MLP or plait FeedForward), upcycling its weights when configured.

        Under zero.Init the dense weights are already partitioned: they are gathered (read only) while the
        experts copy them, and the new layer's own parameters are partitioned when its construction ends.
        """
        with full_parameters(mlp.parameters()):
            w_in, w_out, activation, gated = dense_ffn_weights(mlp)
            return cls(w_in, w_out, copy.deepcopy(activation), gated, cfg, context)

    def forward(self, hidden: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
        """FFN output, same shape as `hidden [..., D]`; `modality` (flat token codes) defaults to the context's."""
        if modality is None:
            if self.context is None or self.context.modality is None:
                raise RuntimeError("MoMELayer needs token modalities: pass them or set the RoutingContext")
            modality = self.context.modality
        x = hidden.reshape(-1, hidden.shape[-1])
        logits = self.router(x, modality)
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.cfg.top_k, dim=-1)
        if self.cfg.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        capacity = expert_capacity(x.shape[0], self.cfg.top_k, self.cfg.num_experts, self.cfg.capacity_factor)
        plan = dispatch(experts, weights.to(x.dtype), self.cfg.num_experts, capacity)
        routed = grouped_ffn(permute(x, plan), plan.counts, self.w_in, self.w_out, self.activation, self.gated)
        out = combine(routed, plan, x.shape[0])
        if self.shared_w_in is not None:
            out = out + ffn_rows(x, self.shared_w_in, self.shared_w_out, self.activation, self.gated)
        if self.context is not None:
            self.context.report(RouterOutput(logits=logits, topk_experts=experts, modality=modality,
                                             dropped=plan.dropped if capacity is not None else None))
        return out.view(hidden.shape)


def assignment_counts(output: RouterOutput, num_experts: int) -> torch.Tensor:
    """[len(TOKEN_MODALITIES), E] int64: token-expert assignments per token modality and expert (before drops)."""
    modalities = len(TOKEN_MODALITIES)
    flat = output.modality[:, None] * num_experts + output.topk_experts
    return index_counts(flat, modalities * num_experts).view(modalities, num_experts)


@contextmanager
def full_parameters(params: Iterable[nn.Parameter], write: bool = False) -> Iterator[None]:
    """Inside the block, `params` hold their full values even when zero.Init has already partitioned them.

    For init code that reads or writes a submodule's parameters after that submodule was built. With `write`,
    rank 0's values are kept (every rank computes the same ones from the same seed, so the random draws stay
    in step). Outside ZeRO-3 it does nothing, so a plain build is exactly what it was.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if write else None):
        yield


def mark_zero3_leaf_modules(model: nn.Module) -> None:
    """Tell DeepSpeed ZeRO-3 to gather each MoME layer's parameters once on entry (call before `initialize`)."""
    from deepspeed.utils import set_z3_leaf_modules

    if any(isinstance(m, MoMELayer) for m in model.modules()):
        set_z3_leaf_modules(model, [MoMELayer])
