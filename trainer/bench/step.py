"""`plait bench step`: the trainer's overhead, the full `plait train` loop iteration against a bare DeepSpeed
forward / backward / step of the same engine on the same batches.

Both sides get the same decoded micro-batches, read once from the run's own loader beforehand, so data
loading (`plait bench loader`) is left out; what remains is everything the loop adds around the engine:
schedule and curriculum, the transfer, counters, metric windows and their logging, the preemption check and
the progress line. Full and bare steps alternate, each bare step on the batches of the loop step just before
it, so machine noise hits both; the ratio is of the total times (logging steps included). Goal: <= 1.05.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from plait.data.batch import PackedBatch
from plait.trainer.config import load_config
from plait.trainer.train import Trainer
from plait.trainer.train_console import Progress


class FixedBatches:
    """A `BatchSource` serving a fixed list of micro-batches in order, cycling."""

    def __init__(self, batches: list[PackedBatch], accumulation: int) -> None:
        self.batches, self.accumulation = batches, accumulation

    def batch(self, step: int, micro: int) -> PackedBatch:
        return self.batches[(step * self.accumulation + micro) % len(self.batches)]

    def eval_batches(self) -> list[PackedBatch]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _full_seconds(trainer: Trainer, progress: Progress) -> float:
    """Wall time of one iteration of the train loop."""
    start = time.perf_counter()
    trainer.advance(progress)
    return time.perf_counter() - start


def _bare_seconds(trainer: Trainer, step: int) -> float:
    """Wall time of step `step`'s micro-batches through the engine alone (same weights and negatives)."""
    engine, values = trainer.engine, trainer.curriculum.at(step)
    start = time.perf_counter()
    for micro in range(trainer.cfg.deepspeed.gradient_accumulation_steps):
        batch = trainer.data.batch(step, micro).to(trainer.device)
        out = engine(batch, step, weights=values.loss_weights, hard_fraction=values.hard_negative_ratio)
        engine.backward(out.loss)
        engine.step()
    return time.perf_counter() - start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--config", default="configs/quickstart.yaml", help="run config (model, data, engine)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for `plait train`")
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind, interleaved")


def run(args: argparse.Namespace) -> dict:
    """Times the loop and the bare engine on the same batches; returns their ratio."""
    with tempfile.TemporaryDirectory(prefix="plait-bench-step-") as run_dir:
        cfg = load_config(args.config, [*args.overrides, f"run_dir={run_dir}", "steps=1000000000",
                                        "checkpoint.every=0", "eval.every=0", "checkpoint.resume=false"])
        trainer = Trainer(cfg)
        try:
            gas = cfg.deepspeed.gradient_accumulation_steps
            batches = [trainer.data.batch(s, m) for s in range(args.steps) for m in range(gas)]
            trainer.data = FixedBatches(batches, gas)
            progress = Progress(cfg.steps, trainer.step, enabled=False)
            _full_seconds(trainer, progress)
            _bare_seconds(trainer, trainer.step - 1)
            full, bare = [], []
            for _ in range(args.steps):
                # Each bare step repeats the batches of the loop step just timed, on the same machine state.
                full.append(_full_seconds(trainer, progress))
                bare.append(_bare_seconds(trainer, trainer.step - 1))
        finally:
            trainer.close()
    return {
        "full_over_bare": sum(full) / sum(bare),
        "full_step_ms": 1e3 * sum(full) / args.steps,
        "bare_step_ms": 1e3 * sum(bare) / args.steps,
        "steps": args.steps,
        "log_every": cfg.tracking.log_every,
        "micro_batches_per_step": gas,
    }
