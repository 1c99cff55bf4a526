"""Whether plait can run an LLM config, checked when the config loads instead of deep inside the build.

`check_llm_supported` builds the architecture on the meta device (no weights, no memory) and runs the same
helpers `llm.build_causal_lm` and `PackedCausalLM` use: causal-LM class, attention implementation, decoder layer
list, and the MLP of every `mome_layers` entry.
"""

from __future__ import annotations

import torch

from plait.trainer.model.config import LLMConfig
from plait.trainer.model.llm import causal_lm_from_config, configure_causal_lm, llm_config, mome_mlp
from plait.trainer.model.mome import dense_ffn_weights


def check_llm_supported(cfg: LLMConfig) -> None:
    """Raise `ValueError("llm: <Class> ...")` naming what the LLM of `cfg` lacks for plait's packed, MoME build.

    A `name_or_path` whose config cannot be read here (offline, not cached) raises the OSError unchanged.
    """
    try:
        config = llm_config(cfg)
    except ValueError as error:
        source = f"name_or_path {cfg.name_or_path!r}" if cfg.name_or_path else f"model_type {cfg.model_type!r}"
        raise ValueError(f"llm: no transformers config for {source}: {error}") from error
    with torch.device("meta"):
        model = causal_lm_from_config(config)
    configure_causal_lm(model, cfg)
    for index in cfg.mome_layers:
        dense_ffn_weights(mome_mlp(model, index))
