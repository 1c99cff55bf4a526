"""`plait train` from pretrained towers, end to end: tiny saved SigLIP2 NaFlex + Qwen2 (its own tokenizer, LoRA,
a MoME layer) + Whisper checkpoints loaded by path, on the demo shards; then `plait export`, whose `llm/` stock
transformers loads and whose directory `PretrainedModel.from_pretrained` reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import run_plait
from plait.trainer.model.pretrained import PretrainedModel
from pretrained_checkpoints import save_checkpoints


def _config(path: Path, demo_dir: Path, run_dir: Path, ckpts) -> Path:
    config = {
        "seed": 2, "steps": 3, "run_dir": str(run_dir),
        "data": {"shards": str(demo_dir), "workers": 1, "packing": {"max_tokens": 512},
                 "sizing": {"patch_size": 8, "max_side_patches": 8, "video_side_px": 32, "max_sample_tokens": 256,
                            "audio_patch": 16, "max_audio_seconds": 1.0}},
        "model": {"encoder": {"dim": 32, "vision": {"pretrained": str(ckpts.vision)},
                              "audio": {"pretrained": str(ckpts.audio)}, "mome_layers": []},
                  "resampler": {"dim": 32, "depth": 1, "num_latents": 4, "num_heads": 2, "ffn_hidden": 64},
                  "llm": {"name_or_path": str(ckpts.llm), "mome_layers": [1], "lora": {"r": 4}},
                  "mome": {"num_experts": 2, "top_k": 1}, "embed_dim": 32},
        "curriculum": {"phases": [{"start": 0, "values": {"resolution": {32: 1.0},
                                                          "frozen": ["encoder.towers.vision.encoder"]}},
                                  {"start": 2, "values": {"frozen": []}}]},
        "loss": {"queue": {"size": 0}, "weights": {"contrastive": 1.0, "caption": 1.0}},
        "checkpoint": {"every": 0}, "tracking": {"log_every": 1}, "eval": {"every": 0, "max_samples": 12},
        # ZeRO-1 keeps frozen weights (LoRA's base) in no optimizer shard: export must still find them.
        "deepspeed": {"zero_stage": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_train_from_pretrained_towers_then_export(demo_dir: Path, tmp_path: Path) -> None:
    ckpts = save_checkpoints(tmp_path / "hub")
    config = _config(tmp_path / "run.yaml", demo_dir, tmp_path / "run", ckpts)
    result = json.loads(run_plait("train", str(config)).stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and torch.isfinite(torch.tensor(result["loss"]))

    exported = json.loads(run_plait("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
                          .stdout.strip().splitlines()[-1])
    assert exported["llm"] == str(tmp_path / "out" / "llm")
    stock, info = AutoModelForCausalLM.from_pretrained(exported["llm"], output_loading_info=True)
    assert type(stock).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    model = PretrainedModel.from_pretrained(tmp_path / "out")
    image = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    media, text = model.encode_media([image]), model.encode_text(["a red handwritten 7"])
    assert media.shape == text.shape == (1, 32) and torch.isfinite(media @ text.T).all()
