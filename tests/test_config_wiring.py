"""Config fields reach what they configure: each non-default value, loaded as a run config, changes the part
that reads it (the DeepSpeed config, the optimizer, the losses, the model, the loader)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plait.data.loader import PlanDataset, PlanLoader
from plait.data.packing import PackingConfig
from plait.data.sizing import SizingConfig
from plait.trainer.config import load_config
from plait.trainer.engine import TrainModule, deepspeed_config
from plait.trainer.losses.objective import Objective
from plait.trainer.optim import build_optimizer

from test_train_distributed import tiny_config


def _module(overrides: list[str]) -> TrainModule:
    """The tiny run's module, built from a run config with `overrides`."""
    cfg = load_config(None, [f"{k}={v}" for k, v in _tiny_flat().items()] + overrides)
    return TrainModule(cfg.model, cfg.data.sizing, cfg.loss)


def _tiny_flat() -> dict[str, str]:
    """The tiny model's sections as `--set` overrides (JSON values)."""
    config = tiny_config()
    return {"model": json.dumps(config["model"]), "data.sizing": json.dumps(config["data"]["sizing"])}


def test_deepspeed_section_and_grad_clip_reach_the_engine_config():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.offload=cpu", "deepspeed.precision=bf16",
                             "deepspeed.gradient_accumulation_steps=4", "optim.grad_clip=0.5",
                             "deepspeed.config_file=configs/deepspeed/zero3.json"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["bf16"] == {"enabled": True} and ds["gradient_clipping"] == 0.5
    file_zero = cfg.deepspeed.file_config["zero_optimization"]
    assert all(ds["zero_optimization"][k] == v for k, v in file_zero.items() if k != "stage")
    plain = deepspeed_config(load_config(None, ["deepspeed.zero_stage=1", "deepspeed.precision=fp32"]))
    assert "offload_optimizer" not in plain["zero_optimization"] and plain["bf16"] == {"enabled": False}


def test_adamw_betas_come_from_the_config():
    module = _module([])
    cfg = load_config(None, ["optim.betas=[0.8, 0.9]"])
    optimizer = build_optimizer(module, cfg.optim)
    assert {group["betas"] for group in optimizer.param_groups} == {(0.8, 0.9)}


def test_temperature_fields_set_the_learnable_scale():
    cfg = load_config(None, ["loss.contrastive.init_temperature=0.05", "loss.contrastive.learn_temperature=false",
                             "loss.contrastive.max_logit_scale=25"])
    objective = Objective(cfg.loss, embed_dim=8)
    scale = objective.contrastive.logit_scale
    assert math.isclose(float(scale), math.log(20.0), rel_tol=1e-6) and not scale.requires_grad
    with torch.no_grad():
        scale.fill_(math.log(100.0))
    assert float(objective.contrastive.scale()) == pytest.approx(25.0)


def test_queue_dtype_sets_the_stored_embeddings():
    cfg = load_config(None, ["loss.queue.size=4", "loss.queue.dtype=bfloat16"])
    queue = Objective(cfg.loss, embed_dim=8).queues["image_text"]
    assert queue.media.dtype == queue.text.dtype == torch.bfloat16


def test_norm_eps_fields_reach_the_layer_norms():
    module = _module(["model.encoder.norm_eps=0.001", "model.resampler.norm_eps=0.002"])
    assert module.model.encoder.norm.eps == 0.001
    resampler_eps = {m.eps for m in module.model.resampler.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert resampler_eps == {0.002}


def test_loader_prefetch_factor_reaches_the_dataloader():
    cfg = load_config(None, ["data.loader.prefetch_factor=5"])
    dataset = PlanDataset([], tokenizer=None, sizing=SizingConfig(), packing=PackingConfig(), cfg=cfg.data.loader)
    assert PlanLoader(dataset, workers=1).loader.prefetch_factor == 5
