"""Parameter groups (trainable parameters only, split by freezable prefixes), the no-decay rule, LR schedules and
curriculum LR multipliers."""

from __future__ import annotations

import math

import pytest
import torch

from plait.data.sizing import SizingConfig
from plait.trainer.config import OptimConfig
from plait.trainer.curriculum import CurriculumValues
from plait.trainer.engine import TrainModule
from plait.trainer.losses.config import LossConfig
from plait.trainer.optim import apply_schedule, build_optimizer, decays, frozen_prefixes, group_of, lr_factor

from synthetic import SyntheticBatches
from test_train_distributed import tiny_config

SIZING = SizingConfig(**tiny_config()["data"]["sizing"])
"""The tiny run's patch geometry."""


@pytest.fixture(scope="module")
def module() -> TrainModule:
    from plait.trainer.config_loader import build
    from plait.trainer.model.config import ModelConfig

    torch.manual_seed(0)
    config = tiny_config()
    return TrainModule(build(ModelConfig, config["model"]), SIZING,
                       build(LossConfig, {"queue": {"size": 8}}))


def _values(frozen: list[str], lr_multipliers: dict[str, float] | None = None) -> CurriculumValues:
    """Curriculum values of one step; `apply_schedule` reads only `lr_multipliers`."""
    return CurriculumValues(resolution={224: 1.0}, token_drop_rate=0.0, mix={}, hard_negative_ratio=0.0,
                            loss_weights={}, frozen=frozen, lr_multipliers=lr_multipliers or {})


def _named(module: TrainModule) -> dict[str, torch.nn.Parameter]:
    return dict(module.named_parameters())


def test_groups_cover_every_parameter_once_with_the_right_names(module):
    optimizer = build_optimizer(module, OptimConfig(), ["encoder"])
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(module.parameters()))
    names = {id(p): n for n, p in module.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group_of(names[id(p)]) == group["group"]
            assert group["name"].endswith("/encoder") == names[id(p)].startswith("model.encoder.")
    assert group_of("model.encoder.blocks.1.ffn.router.proj.weight") == "routers"
    assert group_of("model.llm.model.model.layers.1.mlp.router.proj.weight") == "routers"
    assert group_of("model.resampler.to_q.weight") == "resampler"
    assert group_of("model.llm.text_projection.weight") == "llm"
    assert group_of("objective.contrastive.logit_scale") == "objective"


def test_no_decay_on_norms_biases_embeddings_latents_and_temperature(module):
    owners = {f"{m}.{leaf}" if m else leaf: mod for m, mod in module.named_modules()
              for leaf, _ in mod.named_parameters(recurse=False)}
    params = _named(module)
    no_decay = {n for n, p in params.items() if not decays(n, p, owners[n])}
    expected_no_decay = {n for n in params if n.endswith("bias") or "norm" in n or "pos_" in n or "embed" in n
                         or n.endswith("latents.weight") or n.endswith("logit_scale")}
    assert no_decay == expected_no_decay
    assert "model.llm.model.model.layers.1.mlp.w_in" not in no_decay  # MoME expert weights decay
    optimizer = build_optimizer(module, OptimConfig(weight_decay=0.1))
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.1 if group["name"].split("/")[1] == "decay" else 0.0)


def _reference_factor(step: int, cfg: OptimConfig, total: int) -> float:
    """The schedules written out in float64 from their definitions."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / (total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
    decay_start = total - round(0.2 * total)
    if step < decay_start:
        return 1.0
    return 1 - (1 - cfg.min_lr_ratio) * min((step - decay_start) / (total - decay_start), 1.0)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_match_their_definitions(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    total = 100
    for step in range(total + 5):
        assert lr_factor(step, cfg, total) == pytest.approx(_reference_factor(step, cfg, total), abs=1e-12)
    assert lr_factor(0, cfg, total) == pytest.approx(0.1)
    assert lr_factor(10, cfg, total) == pytest.approx(1.0)
    if schedule != "constant":
        assert lr_factor(total, cfg, total) == pytest.approx(0.1)
        assert lr_factor(55, cfg, total) == pytest.approx(1.0 if schedule == "wsd" else 0.55)


def test_group_lr_multipliers_set_each_groups_lr_and_freezing_does_not(module):
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", group_lr={"encoder": 1e-5, "resampler": 1e-4})
    freezable = frozen_prefixes([["encoder"], ["llm"], []])
    optimizer = build_optimizer(module, cfg, freezable)
    lrs = apply_schedule(optimizer, 0, cfg, 10, _values(frozen=["llm"], lr_multipliers={"resampler": 0.5}))
    assert lrs == {"encoder": 1e-5, "resampler": 5e-5, "llm": 1e-3, "routers": 1e-3, "objective": 1e-3}
    # Routers are split by the module they sit in, so the encoder's freeze with it and the LLM's with the LLM.
    assert {g["name"] for g in optimizer.param_groups} >= {"routers/decay/encoder", "routers/decay/llm"}


def test_frozen_parameters_are_in_no_group_and_stay_bitwise_unchanged(module):
    cfg = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    encoder = [p for name, p in module.named_parameters() if name.startswith("model.encoder.")]
    for p in encoder:
        p.requires_grad_(False)
    try:
        optimizer = build_optimizer(module, cfg, ["encoder"])
        grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert not any(id(p) in grouped for p in encoder)
        assert not any(g["name"].endswith("/encoder") for g in optimizer.param_groups)
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        data = SyntheticBatches(module.model.cfg, SIZING, seed=0, rank=0)
        for step in range(2):
            apply_schedule(optimizer, step, cfg, 10, _values(frozen=["encoder"]))
            optimizer.zero_grad()
            module(data.batch(step, 0), step).loss.backward()
            optimizer.step()
    finally:
        for p in encoder:
            p.requires_grad_(True)
    for name, p in module.named_parameters():
        if name.startswith("model.encoder."):
            assert torch.equal(p, before[name]) and p.grad is None, name
    assert not torch.equal(_named(module)["model.resampler.out_proj.weight"],
                           before["model.resampler.out_proj.weight"])
