"""`plait export CKPT --out DIR`: a checkpoint's model as the directory `PretrainedModel.save_pretrained` writes
(config and preprocessing, fp32 weights, tokenizer, the dense LLM config, and the LLM in a stock Hugging Face format:
MoME layers as a stock MoE class, or no `llm/` and a warning saying why when that is not exact).

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
from plait.trainer.safe_load import check_files, safe_load, weights_only
from plait.trainer.model.pretrained import CONFIG_NAME, LLM_DIR, PretrainedModel, preprocess_config, tokenizer_source

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


def model_states(folder: Path, tag: str) -> dict[str, Any]:
    """DeepSpeed's rank-0 model states: the module state (whole below ZeRO-3) and plait's run state."""
    check_files(folder / tag)
    return safe_load(folder / tag / "mp_rank_00_model_states.pt")


def run_state(folder: Path, tag: str) -> dict[str, Any]:
    """The plait run state DeepSpeed saved as client state (step, config, curriculum, ...)."""
    return model_states(folder, tag)["plait"]


def with_frozen(weights: dict[str, torch.Tensor], module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (zero_to_fp32's) plus the frozen parameters it leaves out at ZeRO 0/1 (no optimizer shard holds
    them there), taken from the module state; ZeRO-3's empty placeholders and extra states are not weights."""
    missing = {k: v for k, v in module_state.items()
               if k not in weights and isinstance(v, torch.Tensor) and v.numel() > 0}
    return {**weights, **{k: v.float() if v.is_floating_point() else v for k, v in missing.items()}}


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
    states = model_states(folder, tag)
    state = states["plait"]
    cfg = saved_run_config(state, folder.parent)
    model = PretrainedModel(cfg.model, preprocess_config(cfg), load_tokenizer(tokenizer_source(cfg)),
                            load_weights=False)
    with weights_only():
        weights = with_frozen(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag), states["module"])
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


def export(checkpoint: str | Path, out: str | Path, merge_lora: bool = False) -> dict[str, Any]:
    """Write the checkpoint's model as a `save_pretrained` directory; returns what was written (`llm`: the stock
    Hugging Face LLM's folder, None when it has no exact stock form).

    `merge_lora` folds the LLM's LoRA adapters into its weights in the saved model as well (its config then has
    no `lora`); `llm/` always holds them merged.
    """
    model, written = load_trained(checkpoint)
    if merge_lora and model.model.cfg.llm.lora is not None:
        model.merge_adapters()
    llm = model.save_pretrained(out) / LLM_DIR
    return {**written, "out": str(out), "parameters": sum(p.numel() for p in model.model.parameters()),
            "llm": str(llm) if llm.is_dir() else None}
