"""The causal LM on packed sequences: any `AutoModelForCausalLM`, always `use_cache=False`, position ids
restarting per sequence (rotary and learned absolute positions alike), MoME FFNs swapped into chosen decoder
layers. The decoder is `get_decoder()` (the base model: `LlamaModel`, `PhiModel`, `GPT2Model`, ...) and its layers
the one layer list in it (`model.layers`, GPT-2's `transformer.h`); `llm_support.check_llm_supported` probes all
of this on the meta device when the config loads.

Cross-sequence isolation: transformers 5 only detects packing from `position_ids` when the cache is off
(with it on, sequences silently attend to each other), so the cache is disabled in the config and in
every call. With `attn_implementation="plait_varlen"` attention goes through plait's varlen dispatch
(`hf_attention`: flash-attn / torch varlen on CUDA, bucketed SDPA on CPU, never a [T, T] mask); `sdpa` uses
transformers' block-diagonal mask, `flash_attention_2` its own varlen path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel,
)
from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.integrations.deepspeed import prevent_arange_dtype_change

from plait.data.batch import TEXT_TOKEN
from plait.ops.attention import Backend
from plait.ops.segments import segment_positions
from plait.trainer.model.config import LLMConfig, MoMEConfig
from plait.trainer.model.hf_attention import VARLEN_KWARGS, varlen_kwargs
from plait.trainer.model.hub import from_checkpoint
from plait.trainer.model.mome import DENSE_FFN_FORMS, MoMELayer, RoutingContext, dense_ffn_layout, full_parameters

logger = logging.getLogger(__name__)

class _Zero3Config:
    """What transformers asks of its `HfDeepSpeedConfig` (which needs accelerate): the config dict and its stage."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        """Whether the config partitions parameters."""
        return self.config.get("zero_optimization", {}).get("stage") == 3


_zero3: _Zero3Config | None = None
"""The config transformers sees while `transformers_zero3` runs (it keeps only a weak reference)."""


@contextmanager
def transformers_zero3(ds_config: dict) -> Iterator[None]:
    """Let transformers see ZeRO-3 while the model is built under `deepspeed.zero.Init(ds_config)` (enter it first).

    `from_pretrained` then creates the LLM partitioned and only rank 0 reads checkpoint values, module by module
    (transformers' own ZeRO-3 loading); the other ranks read shapes only. As in that path, float `torch.arange`
    (RoPE frequencies) keeps its dtype instead of taking zero.Init's.
    """
    global _zero3
    _zero3 = _Zero3Config(ds_config)
    set_hf_deepspeed_config(_zero3)
    try:
        with prevent_arange_dtype_change():
            yield
    finally:
        unset_hf_deepspeed_config()
        _zero3 = None


@contextmanager
def _seeded_init_partitioned() -> Iterator[None]:
    """Build from a config under zero.Init with the random draws of a plain build: same seed, same weights.

    transformers' own ZeRO-3 path skips torch's default init and re-initialises on rank 0 only (other draws, and
    the other ranks' generators left behind). Instead it is told nothing, and each `_initialize_weights` call runs
    on its module's gathered parameters (with its children's, which `_init_weights` may touch).
    """
    if _zero3 is None:
        yield
        return
    holder, original = _zero3, PreTrainedModel._initialize_weights

    def gathered(self: PreTrainedModel, module: nn.Module, is_custom_code: bool = False) -> None:
        if getattr(module, "_is_hf_initialized", False):
            return
        params = [p for m in (module, *module.children()) for p in m.parameters(recurse=False)]
        with full_parameters(params, write=True):
            original(self, module, is_custom_code)

    unset_hf_deepspeed_config()
    PreTrainedModel._initialize_weights = gathered
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original
        set_hf_deepspeed_config(holder)


def llm_config(cfg: LLMConfig) -> PretrainedConfig:
    """The LLM's transformers config: `name_or_path`'s, or `model_type`'s built with `model_kwargs`."""
    if cfg.name_or_path:
        return AutoConfig.from_pretrained(cfg.name_or_path)
    return AutoConfig.for_model(cfg.model_type, **cfg.model_kwargs)


def causal_lm_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_config`, failing with the config class named when its model type has no causal LM."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(f"llm: {type(config).__name__} ({config.model_type}) has no AutoModelForCausalLM class")
    return AutoModelForCausalLM.from_config(config)


def configure_causal_lm(model: PreTrainedModel, cfg: LLMConfig, backend: Backend = "auto") -> None:
    """Set the attention implementation, turn the cache off and store `backend`; reject final logit softcapping."""
    try:
        model.set_attn_implementation(cfg.attn_implementation)
    except (ImportError, ValueError) as error:
        raise ValueError(f"llm: {type(model).__name__} cannot use attn_implementation {cfg.attn_implementation!r}: "
                         f"{error}") from error
    model.config.use_cache = False
    model.config.plait_attention_backend = backend
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError(f"llm: {type(model).__name__} has final logit softcapping (unsupported: logits come from "
                         "lm_head)")


def build_causal_lm(cfg: LLMConfig, backend: Backend = "auto", load_weights: bool = True) -> PreTrainedModel:
    """A hub checkpoint (`name_or_path`) or a model built from `model_type` + `model_kwargs`; cache off.

    `backend` is the varlen path `plait_varlen` attention takes (stored on the config, read per call).
    `load_weights=False` builds `name_or_path`'s architecture only (its weights come from elsewhere).
    Under `transformers_zero3` and zero.Init every parameter is created partitioned, with the values a plain
    build gives.
    """
    if cfg.name_or_path and load_weights:
        model = from_checkpoint("model.llm.name_or_path", cfg.name_or_path,
                                lambda: AutoModelForCausalLM.from_pretrained(cfg.name_or_path))
    else:
        config = from_checkpoint("model.llm.name_or_path", cfg.name_or_path, lambda: llm_config(cfg))
        with _seeded_init_partitioned():
            model = causal_lm_from_config(config)
    configure_causal_lm(model, cfg, backend)
    return model


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder's list of layers: the `ModuleList` child of `get_decoder()` holding `num_hidden_layers` of them
    (`model.layers` in Llama, Qwen, Mistral and Phi; `transformer.h` in GPT-2)."""
    expected = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    lists = [child for child in model.get_decoder().children()
             if isinstance(child, nn.ModuleList) and expected in (None, len(child))]
    if len(lists) != 1:
        raise ValueError(f"llm: {type(model).__name__} has no decoder layer list (a ModuleList of {expected} layers "
                         f"in its decoder {type(model.get_decoder()).__name__})")
    return lists[0]


def mome_mlp(model: PreTrainedModel, index: int) -> nn.Module:
    """The MLP of decoder layer `index` (a `mome_layers` entry), checked to be a dense FFN MoME can upcycle."""
    name, layers = type(model).__name__, decoder_layers(model)
    if not 0 <= index < len(layers):
        raise ValueError(f"llm: {name} mome_layers index {index} is out of range ({len(layers)} decoder layers)")
    mlp = getattr(layers[index], "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"llm: {name} layer {index} {type(layers[index]).__name__} has no mlp")
    if dense_ffn_layout(mlp) is None:
        raise ValueError(f"llm: {name} layer {index} MLP {type(mlp).__name__} has no {DENSE_FFN_FORMS} weights")
    return mlp


class PackedCausalLM(nn.Module):
    """HF causal LM run on one packed row: embeds ids, returns final hidden states and caption logits."""

    def __init__(
        self,
        cfg: LLMConfig,
        mome: MoMEConfig,
        embed_dim: int,
        context: RoutingContext | None = None,
        backend: Backend = "auto",
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.context = context
        self.model = build_causal_lm(cfg, backend, load_weights)
        layers = decoder_layers(self.model)
        for i in cfg.mome_layers:
            layers[i].mlp = MoMELayer.from_dense(mome_mlp(self.model, i), mome, context)
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.text_projection = nn.Linear(self.hidden_size, embed_dim, bias=False)

    @property
    def hidden_size(self) -> int:
        """Width of the LLM's hidden states and input embeddings."""
        return self.model.config.get_text_config().hidden_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings `[T, d]` of token ids `[T]`."""
        return self.model.get_input_embeddings()(ids)

    def forward(
        self, inputs_embeds: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, modality: torch.Tensor
    ) -> torch.Tensor:
        """Final (normed) hidden states `[T, d]` of packed sequences; none attends outside its own sequence.

        `modality [T]` (token modality codes, `data.batch.TOKEN_MODALITIES`) routes the MoME layers.
        """
        if inputs_embeds.shape[0] == 0:
            # transformers cannot run a zero-length row: run one dummy text token (a zero row still tied to the
            # graph) so ZeRO-3 ranks stay in step, and return an empty slice so every parameter gets a zero grad.
            dummy = inputs_embeds.sum(0, keepdim=True)
            positions = torch.zeros(1, dtype=torch.long, device=dummy.device)
            self._set_modality(torch.full_like(positions, TEXT_TOKEN))
            return self._hidden(dummy, positions, positions.new_tensor([0, 1]), 1)[:0]
        self._set_modality(modality)
        positions = segment_positions(cu_seqlens, inputs_embeds.shape[0])
        return self._hidden(inputs_embeds, positions, cu_seqlens, max_seqlen)

    def _set_modality(self, modality: torch.Tensor) -> None:
        """Hand token modalities to the MoME layers (HF calls `mlp(hidden)` with nothing else)."""
        if self.context is not None:
            self.context.modality = modality

    def _hidden(self, embeds: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """One call of the base decoder on a packed row: its final (normed) hidden states `[T, d]`."""
        kwargs = varlen_kwargs(cu, max_seqlen) if self.model.config._attn_implementation in VARLEN_KWARGS else {}
        out = self.model.get_decoder()(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                                       **kwargs)
        return out.last_hidden_state[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits `[M, V]` from hidden states `[M, d]`."""
        return self.model.get_output_embeddings()(hidden)
