"""`plait export CKPT --out DIR`: a checkpoint's model as the directory `PretrainedModel.save_pretrained` writes
(config and preprocessing, fp32 weights, tokenizer, and the LLM in Hugging Face format, whose MoME layers keep
plait's parameter names).

Works from any ZeRO stage and world size: DeepSpeed's zero_to_fp32 merges the optimizer's fp32 shards.
The run config travels in the checkpoint, so none is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plait.data.tokenizer import load_tokenizer
from plait.trainer.checkpoint import LATEST, latest_tag
from plait.trainer.config import RunConfig
from plait.trainer.config_loader import build
from plait.trainer.model.pretrained import CONFIG_NAME, PretrainedModel, preprocess_config, tokenizer_source

MODEL_PREFIX = "model."
"""Where the MultimodalModel's weights sit in the trained module's state dict."""


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run dir, a checkpoints folder or one checkpoint folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / LATEST).is_file() or not (path / "plait_meta.json").is_file():
        tag = latest_tag(path)
        if tag is None:
            raise FileNotFoundError(f"{path}: no complete checkpoint")
        return path, tag
    return path.parent, path.name


def run_state(folder: Path, tag: str) -> dict[str, Any]:
    """The plait run state DeepSpeed saved as client state (step, config, curriculum, ...)."""
    states = torch.load(folder / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["plait"]


def saved_run_config(state: dict[str, Any], run_dir: Path) -> RunConfig:
    """The run config a checkpoint saved, without re-checking the paths only training reads (shards, DeepSpeed
    JSON: the checkpoint may have moved machines); `run_dir` is where the checkpoint lies now."""
    saved = dict(state["config"])
    saved["data"] = {**saved.get("data", {}), "shards": ""}
    saved["deepspeed"] = {**saved.get("deepspeed", {}), "config_file": ""}
    saved["run_dir"] = str(run_dir)
    return build(RunConfig, saved, source=str(run_dir))


def load_trained(checkpoint: str | Path) -> tuple[PretrainedModel, dict[str, Any]]:
    """The trained model of a checkpoint (any ZeRO stage and world size) with its tokenizer, and the run state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = resolve_checkpoint(checkpoint)
    state = run_state(folder, tag)
    cfg = saved_run_config(state, folder.parent)
    model = PretrainedModel(cfg.model, preprocess_config(cfg), load_tokenizer(tokenizer_source(cfg)),
                            load_llm_weights=False)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    own = {k.removeprefix(MODEL_PREFIX): v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.model.load_state_dict(own, strict=False)
    if unexpected or [k for k in missing if k in dict(model.model.named_parameters())]:
        raise ValueError(f"{folder / tag}: checkpoint does not match its model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), {"checkpoint": str(folder / tag), "step": state["step"]}


def load_any(path: str | Path) -> PretrainedModel:
    """A saved model directory (`plait export`, `save_pretrained`), else a checkpoint or run directory."""
    if (Path(path) / CONFIG_NAME).is_file():
        return PretrainedModel.from_pretrained(path)
    return load_trained(path)[0]


def export(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's model as a `save_pretrained` directory; returns what was written."""
    model, written = load_trained(checkpoint)
    model.save_pretrained(out)
    return {**written, "out": str(out), "parameters": sum(p.numel() for p in model.model.parameters())}
