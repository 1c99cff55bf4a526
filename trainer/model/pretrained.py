"""The model as a library: build it from a run config or a saved directory, embed media and captions.

    model = create_model("configs/quickstart.yaml", tokenizer=tok)   # or PretrainedModel.from_pretrained(DIR)
    media = model.encode_media(["digit.png", "tone.flac", "clip.mp4"])
    text = model.encode_text(["a red handwritten 7 on a blue background"])
    similarity = media @ text.T

Media go through the loader's own preprocessing (`plait.data.preprocess`), captions through its caption
encoding, and both through the training forward's embedding heads, so the embeddings are the ones training
computes for the same samples. A saved directory holds everything: `plait_model.json` (model config and
preprocessing settings), `model.safetensors` (all weights), `tokenizer/`, `llm_config/` (the dense LLM config
plait rebuilds its LLM from), `vision_tower/` / `audio_tower/` (a pretrained tower's config and processor config)
and `llm/` (the causal LM in a stock Hugging Face format with any LoRA adapters merged, for use without plait;
absent when its MoME layers have no exact stock form, see `hf_export`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import cached_file

from plait.data.preprocess import Media, MediaPreprocessor, PreprocessConfig
from plait.data.tokenizer import encode_captions, load_tokenizer
from plait.ops.segments import lengths_to_cu
from plait.trainer.config_loader import build, to_dict
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.hf_export import StockExportError, export_llm
from plait.trainer.model.llm import PackedCausalLM
from plait.trainer.model.lora import has_lora, merge_lora
from plait.trainer.model.multimodal import MultimodalModel

if TYPE_CHECKING:
    from plait.trainer.config import RunConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "plait_model.json"
"""Model config and preprocessing settings of a saved directory."""
WEIGHTS_NAME = "model.safetensors"
"""Every weight of the model."""
TOKENIZER_DIR = "tokenizer"
"""The caption tokenizer, in `save_pretrained` format."""
LLM_DIR = "llm"
"""The causal LM alone, in a stock Hugging Face `save_pretrained` format (absent when it has none)."""
LLM_CONFIG_DIR = "llm_config"
"""The LLM's own (dense) Hugging Face config, the architecture `from_pretrained` builds plait's LLM from."""
TOWER_DIRS = {"vision": "vision_tower", "audio": "audio_tower"}
"""Per pretrained tower: its checkpoint's config and processor config (architecture and preprocessing)."""
FORMAT_VERSION = 2
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
                 load_weights: bool = True) -> None:
        super().__init__()
        self.model = MultimodalModel(model_cfg, preprocess.sizing, load_weights=load_weights)
        self.model.add_adapters()
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

    def merge_adapters(self) -> None:
        """Fold the LLM's LoRA adapters into its weights; the model config no longer asks for LoRA."""
        merge_lora(self.model.llm.model)
        cfg = self.model.cfg
        self.model.cfg = replace(cfg, llm=replace(cfg.llm, lora=None))

    def save_pretrained(self, out: str | os.PathLike) -> Path:
        """Write a self-contained directory (config, weights, tokenizer, LLM config, stock HF LLM when it has an exact
        stock form) that `from_pretrained` reads."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "model": to_dict(self.model.cfg), "preprocess": to_dict(self.preprocess.cfg)}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_model(self.model, str(out / WEIGHTS_NAME))
        self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        self.model.llm.model.config.save_pretrained(out / LLM_CONFIG_DIR)
        for stream, tower in tower_sources(self.model.cfg).items():
            save_tower_config(tower, out / TOWER_DIRS[stream])
        save_stock_llm(self.model.llm, out / LLM_DIR)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> PretrainedModel:
        """Load a directory written by `save_pretrained` (or `plait export`); no hub access is needed."""
        path = Path(path)
        meta = read_meta(path)
        model_cfg = build(ModelConfig, meta["model"], source=str(path / CONFIG_NAME), prefix="model")
        model_cfg = replace(model_cfg, llm=replace(model_cfg.llm, name_or_path=str(path / LLM_CONFIG_DIR)))
        towers = {stream: replace(getattr(model_cfg.encoder, stream), pretrained=str(path / TOWER_DIRS[stream]))
                  for stream in tower_sources(model_cfg)}
        model_cfg = replace(model_cfg, encoder=replace(model_cfg.encoder, **towers))
        preprocess = build(PreprocessConfig, meta["preprocess"], source=str(path / CONFIG_NAME), prefix="preprocess")
        model = cls(model_cfg, preprocess, load_tokenizer(path / TOKENIZER_DIR), load_weights=False)
        load_model(model.model, str(path / WEIGHTS_NAME), device=str(device))
        return model.to(device).eval()


def save_stock_llm(llm: PackedCausalLM, out: Path) -> None:
    """Write the LLM to `out` in its stock Hugging Face form (LoRA adapters merged into a copy); without one, log
    why and leave no `out` (a model whose MLPs load as random weights is worse than none)."""
    shutil.rmtree(out, ignore_errors=True)
    if has_lora(llm.model):
        llm = copy.deepcopy(llm)
        merge_lora(llm.model)
    try:
        export_llm(llm, out)
    except StockExportError as err:
        logger.warning("%s not written: %s", out, err)


def tower_sources(cfg: ModelConfig) -> dict[str, str]:
    """The pretrained tower checkpoint of each stream that has one."""
    towers = {"vision": cfg.encoder.vision.pretrained, "audio": cfg.encoder.audio.pretrained}
    return {stream: source for stream, source in towers.items() if source}


def save_tower_config(source: str, out: Path) -> None:
    """Copy a tower checkpoint's config and processor config (architecture and preprocessing; weights are in
    `model.safetensors`)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copyfile(cached_file(source, name), out / name)


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
