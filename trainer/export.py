"""`plait export CKPT --out DIR`: consolidated fp32 weights of the whole model, and the LLM in Hugging Face
`save_pretrained` format (its MoME layers keep plait's parameter names; dense layers load as usual).

Works from any ZeRO stage and world size: DeepSpeed's zero_to_fp32 merges the optimizer's fp32 shards.
The model config travels in the checkpoint, so no run config is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from plait.trainer.checkpoint import LATEST, latest_tag
from plait.trainer.config_loader import build
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.multimodal import MultimodalModel

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


def export(checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """Write `out/model_fp32.pt` (all weights) and `out/llm/` (HF format); returns what was written."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder, tag = resolve_checkpoint(checkpoint)
    state = run_state(folder, tag)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out / "model_fp32.pt")
    model = MultimodalModel(build(ModelConfig, state["config"]["model"], source=str(folder / tag)))
    own = {k.removeprefix(MODEL_PREFIX): v for k, v in weights.items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(own, strict=False)
    if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
        raise ValueError(f"{folder / tag}: checkpoint does not match its model config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.llm.model.save_pretrained(out / "llm")
    return {"checkpoint": str(folder / tag), "step": state["step"], "weights": str(out / "model_fp32.pt"),
            "llm": str(out / "llm"), "parameters": sum(v.numel() for v in weights.values())}
