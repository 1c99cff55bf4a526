"""Tiny random SigLIP2 NaFlex, Qwen2 (with a trained tokenizer) and Whisper checkpoints saved as hub repos are,
for tests that start plait from pretrained towers by path (the code path a hub name takes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from plait.data.tokenizer import train_tokenizer

CAPTIONS = [f"a {colour} handwritten {digit} on a {back} background" for colour in ("red", "green", "blue")
            for digit in range(10) for back in ("white", "black")] + [f"the tone of {d}" for d in range(10)]
"""Text the tiny LLM's tokenizer is trained on (byte-level, so any caption encodes)."""


@dataclass(frozen=True)
class Checkpoints:
    """Directories of the saved tiny checkpoints."""

    vision: Path
    llm: Path
    audio: Path


def save_checkpoints(root: Path, patch_size: int = 8, n_mels: int = 80, vocab_size: int = 320) -> Checkpoints:
    """Write the three tiny checkpoints (weights, configs, processor configs, tokenizer) under `root`."""
    torch.manual_seed(0)
    paths = Checkpoints(root / "siglip2", root / "qwen2", root / "whisper")
    vision = Siglip2Config(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 64, "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "patch_size": patch_size, "num_patches": 16},
    )
    Siglip2Model(vision).save_pretrained(paths.vision)
    Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=64).save_pretrained(paths.vision)
    tokenizer = train_tokenizer(CAPTIONS, vocab_size, paths.llm)
    llm = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(llm).save_pretrained(paths.llm)
    audio = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=n_mels,
                          max_source_positions=64, max_target_positions=16, vocab_size=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                          suppress_tokens=None)
    WhisperForConditionalGeneration(audio).save_pretrained(paths.audio)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(paths.audio)
    return paths
