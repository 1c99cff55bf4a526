"""Mixture-of-Modality-Experts FFN: per-token, modality-aware top-k routing over stacked experts.

A `MoMELayer` replaces the FFN of chosen encoder and LLM layers, upcycled from any dense form in
`FFN_LAYOUTS`: HF gated `gate_proj/up_proj/down_proj` (with or without biases), Linear `fc1/fc2` (Phi),
GPT-2's `c_fc/c_proj` Conv1D (weights stored `[in, out]`, output dropout kept) and plait's `FeedForward`.
Experts are stacked into two parameters (`w_in [E, F', D]`, `w_out [E, D, F]`, `F' = 2F` when gated), plus
`b_in [E, F']` and `b_out [E, D]` when the dense FFN has biases. All experts run every step (on zero rows
when no token picks them), so every rank touches the same parameters in the same order: under ZeRO-3 ranks
that route to different experts cannot hang. `mark_zero3_leaf_modules` additionally makes DeepSpeed gather
a MoME layer's parameters once on entry rather than per sub-module.

HF decoder layers call `mlp(hidden)` with no room for token modalities, so those come through a
shared `RoutingContext` that the multimodal model fills before each forward; layers also report their
`RouterOutput` there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from plait.data.batch import TOKEN_MODALITIES
from plait.ops.moe import combine, dispatch, expert_capacity, ffn_rows, grouped_ffn, permute
from plait.ops.segments import index_counts
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


@dataclass(frozen=True)
class FFNLayout:
    """Where a dense FFN class keeps its projections, activation and output dropout."""

    inputs: tuple[str, ...]
    """Projections stacked into `w_in` (gated: gate then up)."""
    output: str
    """The down projection (`w_out`)."""
    activation: str
    """The activation attribute."""
    gated: bool | None
    """Whether `act(gate) * up`; None: the module's own `gated` attribute says."""
    dropout: str | None = None
    """The `nn.Dropout` applied to the FFN output, if the class has one."""

    @property
    def names(self) -> str:
        """The projections as written in errors: `fc1/fc2`."""
        return "/".join((*self.inputs, self.output))


FFN_LAYOUTS = (
    FFNLayout(("gate_proj", "up_proj"), "down_proj", "act_fn", gated=True),  # Llama, Qwen, Mistral (mlp_bias or not)
    FFNLayout(("fc1",), "fc2", "activation_fn", gated=False),  # Phi
    FFNLayout(("c_fc",), "c_proj", "act", gated=False, dropout="dropout"),  # GPT-2 (Conv1D)
    FFNLayout(("w_in",), "w_out", "activation", gated=None),  # plait FeedForward
)
"""The dense FFN forms MoME upcycles, matched in this order."""
DENSE_FFN_FORMS = ", ".join(layout.names for layout in FFN_LAYOUTS[:-1]) + f" or {FFN_LAYOUTS[-1].names}"
"""The projection sets `dense_ffn_layout` recognises, for error messages."""


@dataclass
class DenseFFN:
    """A dense FFN's weights in MoME's layout: `w_in [F', D]` (gated: gate rows then up rows), `w_out [D, F]`."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    b_in: torch.Tensor | None
    """[F'], or None when no input projection has a bias."""
    b_out: torch.Tensor | None
    """[D], or None."""
    activation: Callable[[torch.Tensor], torch.Tensor]
    gated: bool
    dropout: nn.Module | None
    """Dropout on the FFN output (GPT-2), or None."""


def _is_projection(module: object) -> bool:
    """A Linear, or transformers' Conv1D (a Linear whose weight is stored `[in, out]`)."""
    return isinstance(module, (nn.Linear, Conv1D))


def dense_ffn_layout(mlp: nn.Module) -> FFNLayout | None:
    """The layout of `mlp` among `FFN_LAYOUTS` (its projections are Linear/Conv1D, its activation callable), or None."""
    for layout in FFN_LAYOUTS:
        projections = (*layout.inputs, layout.output)
        if all(_is_projection(getattr(mlp, n, None)) for n in projections) and callable(
            getattr(mlp, layout.activation, None)
        ):
            return layout
    return None


def _projection(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight `[out, in]`, bias `[out]` or None) of a Linear or Conv1D."""
    weight = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
    return weight, layer.bias


def dense_ffn_weights(mlp: nn.Module) -> DenseFFN:
    """The weights of a dense FFN of one of the `FFN_LAYOUTS` forms (HF gated, fc1/fc2, GPT-2 Conv1D, FeedForward)."""
    layout = dense_ffn_layout(mlp)
    if layout is None:
        raise ValueError(f"mome: {type(mlp).__name__} has no {DENSE_FFN_FORMS} weights")
    inputs = [_projection(getattr(mlp, name)) for name in layout.inputs]
    w_out, b_out = _projection(getattr(mlp, layout.output))
    if all(b is None for _, b in inputs):
        b_in = None
    else:
        b_in = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in inputs])
    dropout = getattr(mlp, layout.dropout, None) if layout.dropout else None
    return DenseFFN(
        w_in=torch.cat([w for w, _ in inputs]) if len(inputs) > 1 else inputs[0][0],
        w_out=w_out,
        b_in=b_in,
        b_out=b_out,
        activation=getattr(mlp, layout.activation),
        gated=mlp.gated if layout.gated is None else layout.gated,
        dropout=dropout if isinstance(dropout, nn.Dropout) else None,
    )


def _copy(tensor: torch.Tensor | None) -> nn.Parameter | None:
    """A parameter holding a detached copy of `tensor` (None stays None)."""
    return None if tensor is None else nn.Parameter(tensor.detach().clone())


def _stacked(tensor: torch.Tensor | None, experts: int) -> nn.Parameter | None:
    """A parameter holding `experts` copies of `tensor` along a new first dimension (None stays None)."""
    return None if tensor is None else nn.Parameter(tensor.detach().clone().unsqueeze(0).repeat_interleave(experts, 0))


class MoMELayer(nn.Module):
    """Modality-aware top-k MoE FFN over stacked experts, with optional capacity, shared expert and biases."""

    def __init__(self, dense: DenseFFN, cfg: MoMEConfig, context: RoutingContext | None = None) -> None:
        """Experts start as copies of the dense FFN (cfg.init `upcycle`) or fresh (normal weights, zero biases).

        Parameters, in order: `w_in [E, F', D]`, `w_out [E, D, F]`, `b_in [E, F']`, `b_out [E, D]` (biases only
        when the dense FFN has them), with a shared expert `shared_w_in`, `shared_w_out`, `shared_b_in`,
        `shared_b_out`, then the router's. Random draws: expert weights (fresh init), then the router.
        """
        super().__init__()
        self.cfg = cfg
        self.activation = copy.deepcopy(dense.activation)
        self.gated = dense.gated
        self.context = context
        experts = cfg.num_experts
        self.w_in = _stacked(dense.w_in, experts)
        self.w_out = _stacked(dense.w_out, experts)
        self.b_in = _stacked(dense.b_in, experts)
        self.b_out = _stacked(dense.b_out, experts)
        if cfg.init == "fresh":
            nn.init.normal_(self.w_in, std=cfg.init_std)
            nn.init.normal_(self.w_out, std=cfg.init_std)
            for bias in (self.b_in, self.b_out):
                if bias is not None:
                    nn.init.zeros_(bias)
        self.router = ModalityRouter(dense.w_in.shape[1], cfg)
        shared = cfg.shared_expert
        self.shared_w_in = _copy(self.w_in[0]) if shared else None
        self.shared_w_out = _copy(self.w_out[0]) if shared else None
        self.shared_b_in = _copy(self.b_in[0]) if shared and self.b_in is not None else None
        self.shared_b_out = _copy(self.b_out[0]) if shared and self.b_out is not None else None
        self.dropout = copy.deepcopy(dense.dropout)

    @classmethod
    def from_dense(cls, mlp: nn.Module, cfg: MoMEConfig, context: RoutingContext | None = None) -> MoMELayer:
        """Replace a dense FFN (any `FFN_LAYOUTS` form), upcycling its weights when configured.

        Under zero.Init the dense weights are already partitioned: they are gathered (read only) while the
        experts copy them, and the new layer's own parameters are partitioned when its construction ends.
        """
        with full_parameters(mlp.parameters()):
            return cls(dense_ffn_weights(mlp), cfg, context)

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
        routed = grouped_ffn(permute(x, plan), plan.counts, self.w_in, self.w_out, self.activation, self.gated,
                             self.b_in, self.b_out)
        out = combine(routed, plan, x.shape[0])
        if self.shared_w_in is not None:
            out = out + ffn_rows(x, self.shared_w_in, self.shared_w_out, self.activation, self.gated,
                                 self.shared_b_in, self.shared_b_out)
        if self.dropout is not None:
            out = self.dropout(out)
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
