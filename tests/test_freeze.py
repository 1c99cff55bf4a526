"""Curriculum freezing that saves memory (one rank, in-process): frozen parameters get no gradient and no Adam state
and stay bitwise unchanged; unfreezing gives them fresh AdamW state (their first update is a float64 AdamW first
step) while the continuing parameters keep theirs; resume across the switch is exact, from before and after it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from synthetic import SyntheticBatches
from test_train_distributed import write_config

LLM = "model.llm."
"""Where the LLM's parameters sit in the trained module (curriculum name `llm`)."""


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One MLflow store for the module's runs (each new SQLite store costs seconds), written at the end of a run."""
    return {"log_every": 100, "uri": f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"}


def _config(folder: Path, phases: list[dict], tracking: dict | None = None, overrides: tuple[str, ...] = ()):
    """The tiny run config at ZeRO-0 with `phases` as its curriculum; a constant LR, so a shorter run steps like a
    longer one."""
    from plait.trainer.config import load_config

    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder / "run.yaml", curriculum={"phases": phases}, tracking=tracking or {})
    return load_config(path, [f"run_dir={folder / 'run'}", "deepspeed.zero_stage=0", "optim.schedule=constant",
                              "checkpoint.every=0", "data.plan.eval_fraction=0", *overrides])


def _trainer(cfg, steps: int):
    from plait.trainer.train import Trainer

    cfg.steps = steps
    return Trainer(cfg, data=SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank=0))


def _train(cfg, steps: int):
    """Train (resuming from the run's latest checkpoint) to `steps`; the trainer."""
    trainer = _trainer(cfg, steps)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def _state_bytes(engine) -> int:
    """Bytes of every tensor in the AdamW state (the client optimizer itself at ZeRO-0 in fp32)."""
    state = getattr(engine.optimizer, "optimizer", engine.optimizer).state
    return sum(t.numel() * t.element_size() for entry in state.values() for t in entry.values() if torch.is_tensor(t))


def _step(engine, batch, step: int) -> dict[str, torch.Tensor]:
    """One optimizer step; the full float64 gradient of every trainable parameter, read before the update."""
    from deepspeed.utils import safe_get_full_grad

    engine.backward(engine(batch, step).loss)
    grads = {n: safe_get_full_grad(p).double() for n, p in engine.module.named_parameters() if p.requires_grad}
    engine.step()
    return grads


def _fp32(param: torch.Tensor) -> torch.Tensor:
    """The full fp32 value of a parameter (ZeRO's master, or the parameter itself at ZeRO-0)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return (param if full is None else full).detach().double().clone()


def _adamw(param, grad, exp_avg, exp_avg_sq, step: int, cfg) -> torch.Tensor:
    """Parameter after AdamW step number `step` (1-based) from its moments before it, in float64, no weight decay."""
    beta1, beta2 = cfg.optim.betas
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + 1e-8
    return param - cfg.optim.lr * (exp_avg / (1 - beta1**step)) / denom


def test_llm_frozen_for_the_whole_run_has_no_grad_no_adam_state_and_stays_bitwise(tmp_path):
    from plait.trainer.engine import build_engine, init_distributed

    init_distributed()
    cfg = _config(tmp_path, [{"start": 0, "values": {"resolution": {16: 1.0}}}])
    data = SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank=0)
    engine = build_engine(cfg, ["llm"], ["llm"])
    params = dict(engine.module.named_parameters())
    llm = {n: p.detach().clone() for n, p in params.items() if n.startswith(LLM)}
    others = {n: p.detach().clone() for n, p in params.items() if not n.startswith(LLM)}
    for step in range(2):
        _step(engine, data.batch(step, 0), step)
    assert all(torch.equal(params[n], value) for n, value in llm.items())
    assert all(not torch.equal(params[n], value) for n, value in others.items() if value.abs().sum() > 0)
    # No param group and no Adam state holds an LLM weight; a backward leaves them without gradient.
    optimizer = engine.optimizer
    held = {id(p) for group in optimizer.param_groups for p in group["params"]} | {id(p) for p in optimizer.state}
    assert not any(id(params[n]) in held for n in llm)
    engine.backward(engine(data.batch(2, 0), 2).loss)
    assert all(params[n].grad is None and not params[n].requires_grad for n in llm)
    assert all(params[n].grad is not None for n in others)
    # The same model with the LLM trained holds at least both its moments more.
    full = build_engine(cfg)
    _step(full, data.batch(0, 0), 0)
    llm_elements = sum(value.numel() for value in llm.values())
    assert _state_bytes(full) - _state_bytes(engine) >= 2 * 4 * llm_elements


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_unfreezing_gives_fresh_adamw_state_and_the_rest_keeps_theirs(tmp_path, stage):
    from plait.trainer.engine import build_engine, init_distributed, rebuild_engine

    init_distributed()
    cfg = _config(tmp_path, [{"start": 0, "values": {"resolution": {16: 1.0}}}],
                  overrides=(f"deepspeed.zero_stage={stage}", "optim.weight_decay=0", "optim.grad_clip=0"))
    data = SyntheticBatches(cfg.model, cfg.data.sizing, cfg.seed, rank=0)
    engine = build_engine(cfg, ["llm"], ["llm"])
    first = _step(engine, data.batch(0, 0), 0)
    assert first and not any(name.startswith(LLM) for name in first)
    engine = rebuild_engine(engine, cfg, ["llm"], [])
    params = dict(engine.module.named_parameters())
    assert all(p.requires_grad for p in params.values())
    before = {n: _fp32(p) for n, p in params.items()}
    grads = _step(engine, data.batch(1, 0), 1)
    beta1, beta2 = cfg.optim.betas
    for name, param in params.items():
        # Continuing parameters take AdamW's second step from the moments of the first (its gradient known); the
        # LLM takes a first step from zero moments.
        continuing = name in first
        exp_avg = (1 - beta1) * first[name] if continuing else torch.zeros_like(before[name])
        exp_avg_sq = (1 - beta2) * first[name] ** 2 if continuing else torch.zeros_like(before[name])
        expected = _adamw(before[name], grads[name], exp_avg, exp_avg_sq, 2 if continuing else 1, cfg)
        torch.testing.assert_close(_fp32(param), expected, rtol=0, atol=1e-6, msg=name)


def test_resume_across_an_unfreeze_is_exact_from_before_and_after_it(tmp_path, tracking):
    phases = [{"start": 0, "values": {"frozen": ["llm"], "resolution": {16: 1.0}}},
              {"start": 1, "values": {"frozen": ["encoder"]}}]
    full = _train(_config(tmp_path / "full", phases, tracking), 3)
    part = _config(tmp_path / "part", phases, tracking)
    # The checkpoint at step 1 holds the engine from before the switch (LLM frozen), the one at 2 the one after.
    runs = [_train(part, steps) for steps in (1, 2, 3)]
    assert [run.frozen for run in runs] == [["llm"], ["encoder"], ["encoder"]]
    assert [loss for run in runs for loss in run.losses] == full.losses
    weights = dict(full.module.named_parameters())
    assert all(torch.equal(weights[n], p) for n, p in runs[-1].module.named_parameters())


def test_bench_freeze_measures_the_llms_gradient_and_adam_bytes(tmp_path):
    from plait.data.sizing import SizingConfig
    from plait.trainer.bench.freeze import run
    from plait.trainer.cli import build_parser
    from plait.trainer.config_loader import build
    from plait.trainer.engine import TrainModule
    from plait.trainer.losses.config import LossConfig
    from plait.trainer.model.config import ModelConfig

    config = write_config(tmp_path / "run.yaml")
    argv = ["bench", "freeze", "--config", str(config), "--set", "deepspeed.precision=fp32"]
    result = run(build_parser(argv).parse_args(argv))
    data = yaml.safe_load(config.read_text())
    module = TrainModule(build(ModelConfig, data["model"]), SizingConfig(**data["data"]["sizing"]), LossConfig())
    llm = sum(p.numel() for n, p in module.named_parameters() if n.startswith(LLM))
    # fp32: the LLM's gradients (4 bytes an element) and both its moments (8) are what freezing saves.
    assert result["grad_bytes_trained"] - result["grad_bytes_frozen"] == 4 * llm
    assert result["optimizer_bytes_trained"] - result["optimizer_bytes_frozen"] >= 8 * llm
    assert 0 < result["grad_ratio"] < 1 and 0 < result["optimizer_ratio"] < 1
    assert result["grad_ratio"] == result["grad_bytes_frozen"] / result["grad_bytes_trained"]
