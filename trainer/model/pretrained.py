"""The model as a library: build it from a run config or a saved directory, embed media and captions.

    model = create_model("configs/quickstart.yaml", tokenizer=tok)   # or PretrainedModel.from_pretrained(DIR)
    media = model.encode_media(["digit.png", "tone.flac", "clip.mp4"])
    text = model.encode_text(["a red handwritten 7 on a blue background"])
    similarity = media @ text.T

Media go through the loader's own preprocessing (`plait.data.preprocess`), captions through its caption
encoding, and both through the training forward's embedding heads, so the embeddings are the ones training
computes for the same samples. A saved directory holds everything: `plait_model.json` (model config and
preprocessing settings), `model.safetensors` (all weights), `tokenizer/`, and `llm/` (the causal LM in
Hugging Face format, for use without plait).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from plait.data.preprocess import Media, MediaPreprocessor, PreprocessConfig
from plait.data.tokenizer import encode_captions, load_tokenizer
from plait.kernels.segments import lengths_to_cu
from plait.trainer.config_loader import build, to_dict
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.multimodal import MultimodalModel

if TYPE_CHECKING:
    from plait.trainer.config import RunConfig

CONFIG_NAME = "plait_model.json"
"""Model config and preprocessing settings of a saved directory."""
WEIGHTS_NAME = "model.safetensors"
"""Every weight of the model."""
TOKENIZER_DIR = "tokenizer"
"""The caption tokenizer, in `save_pretrained` format."""
LLM_DIR = "llm"
"""The causal LM alone, in Hugging Face `save_pretrained` format."""
FORMAT_VERSION = 1
"""Layout version of a saved directory."""


def tokenizer_source(cfg: RunConfig) -> str:
    """A run's caption tokenizer: `model.llm.tokenizer`, else the LLM's own, else the BPE trained into the run dir."""
    llm = cfg.model.llm
    return llm.tokenizer or llm.name_or_path or str(Path(cfg.run_dir) / TOKENIZER_DIR)


def preprocess_config(cfg: RunConfig) -> PreprocessConfig:
    """Inference preprocessing of a run: its sizing and packing, images at the most likely side of its last step."""
    from plait.trainer.curriculum import Curriculum

    resolution = Curriculum.from_run(cfg).resolve(cfg.steps).resolution
    side = max(resolution, key=lambda s: (resolution[s], s))
    return PreprocessConfig(sizing=cfg.data.sizing, image_side_px=side,
                            video_frame_segments=cfg.data.packing.video_frame_segments,
                            max_caption_tokens=cfg.data.loader.max_caption_tokens)


class PretrainedModel(nn.Module):
    """A MultimodalModel with its tokenizer and preprocessing: raw media and strings in, unit embeddings out."""

    def __init__(self, model_cfg: ModelConfig, preprocess: PreprocessConfig, tokenizer: PreTrainedTokenizerBase,
                 load_llm_weights: bool = True) -> None:
        super().__init__()
        self.model = MultimodalModel(model_cfg, preprocess.sizing, load_llm_weights=load_llm_weights)
        self.preprocess = MediaPreprocessor(preprocess)
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        """Where the weights are (inputs are moved there)."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_media(self, items: Sequence[Media]) -> torch.Tensor:
        """[N, embed_dim] L2-normalised float32 embeddings of media files, bytes or decoded arrays."""
        batch = self.preprocess.batch(items).to(self.device)
        return nn.functional.normalize(self.model.embed_media(batch).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, embed_dim] L2-normalised float32 embeddings of captions."""
        ids = encode_captions(self.tokenizer, list(texts), self.preprocess.cfg.max_caption_tokens)
        cu = lengths_to_cu(torch.tensor([len(i) for i in ids], dtype=torch.long))
        flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
        return nn.functional.normalize(self.model.embed_text(flat.to(self.device), cu).float(), dim=-1)

    def save_pretrained(self, out: str | os.PathLike) -> Path:
        """Write a self-contained directory (config, weights, tokenizer, HF LLM) that `from_pretrained` reads."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "model": to_dict(self.model.cfg), "preprocess": to_dict(self.preprocess.cfg)}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(self.model, str(out / WEIGHTS_NAME))
        self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        self.model.llm.model.save_pretrained(out / LLM_DIR)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedModel:
        """Load a directory written by `save_pretrained` (or `plait export`); no hub access is needed."""
        path = Path(path)
        meta = read_meta(path)
        model_cfg = build(ModelConfig, meta["model"], source=str(path / CONFIG_NAME), prefix="model")
        model_cfg = replace(model_cfg, llm=replace(model_cfg.llm, name_or_path=str(path / LLM_DIR)))
        preprocess = build(PreprocessConfig, meta["preprocess"], source=str(path / CONFIG_NAME), prefix="preprocess")
        model = cls(model_cfg, preprocess, load_tokenizer(path / TOKENIZER_DIR), load_llm_weights=False)
        load_model(model.model, str(path / WEIGHTS_NAME), device=str(device))
        return model.to(device).eval()


def read_meta(path: Path) -> dict[str, Any]:
    """The saved directory's `plait_model.json`, checked for a layout this version reads."""
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{path}: not a saved plait model (no {CONFIG_NAME})")
    meta = json.loads(config.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{config}: format {meta.get('format')!r}, this plait reads format {FORMAT_VERSION}")
    return meta


def create_model(config: RunConfig | str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None,
                 overrides: Sequence[str] = ()) -> PretrainedModel:
    """A freshly initialised model of a run config (a path or a RunConfig), initialised as `plait train` does.

    `tokenizer` defaults to the run's (`tokenizer_source`), which exists once the run has started.
    """
    from plait.trainer.config import load_config

    cfg = config if not isinstance(config, (str, os.PathLike)) else load_config(config, list(overrides))
    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_source(cfg))
    torch.manual_seed(cfg.seed)
    return PretrainedModel(cfg.model, preprocess_config(cfg), tokenizer).eval()
