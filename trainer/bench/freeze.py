"""`plait bench freeze`: optimizer-state and gradient bytes of one training step with modules frozen (default the
LLM) against the same model trained in full, as ratios measured in the same run.

Both engines are built from the same config and seed at ZeRO-0 on one rank, where gradients are the parameters'
`.grad` and the AdamW state is whole; ZeRO 1-3 divide both sides by the world size alike. Optimizer bytes are the
AdamW state (moments and step counts) plus any fp32 master copy DeepSpeed keeps beside the weights (bf16); gradient
bytes are the `.grad` tensors after the backward pass. Each engine takes one step on the same synthetic micro-batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import torch

from plait.trainer.bench.model import SampleSpec, make_batch
from plait.trainer.config import load_config
from plait.trainer.engine import build_engine, init_distributed
from plait.trainer.freezing import group_masters, inner_optimizer

SAMPLES: list[SampleSpec] = [(0, (1, 2, 3), 6), (1, (1, 2, 2), 5), (2, (2, 2, 2), 4)]
"""An image, an audio clip and a video (patch grids) with their caption lengths: every tower gets gradients."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Bench options."""
    parser.add_argument("--config", default="configs/quickstart.yaml", help="run config (model and precision)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for `plait train`")
    parser.add_argument("--frozen", nargs="+", default=["llm"], metavar="PREFIX",
                        help="model modules to freeze (curriculum `frozen` names)")


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Storage bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _step_bytes(engine, batch) -> dict[str, int]:
    """Gradient bytes after one backward pass and optimizer bytes after the step it feeds."""
    engine.backward(engine(batch.to(engine.device), 0).loss)
    grads = _bytes(p.grad for p in engine.module.parameters() if p.grad is not None)
    engine.step()
    weights = {id(p) for p in engine.module.parameters()}
    masters = [t for tensors in group_masters(engine).values() for t in tensors if id(t) not in weights]
    state = [t for entry in inner_optimizer(engine).state.values() for t in entry.values() if torch.is_tensor(t)]
    return {"grad_bytes": grads, "optimizer_bytes": _bytes(state) + _bytes(masters)}


def run(args: argparse.Namespace) -> dict:
    """Build the frozen and the fully trained engine, step each once, compare their bytes."""
    init_distributed()
    cfg = load_config(args.config, [*args.overrides, "deepspeed.zero_stage=0", "deepspeed.offload=none"])
    batch = make_batch(SAMPLES, cfg.model, cfg.data.sizing, seed=cfg.seed)
    trained_engine = build_engine(cfg)
    trained = _step_bytes(trained_engine, batch)
    params = sum(p.numel() for p in trained_engine.module.parameters())
    trained_engine.destroy()
    frozen_engine = build_engine(cfg, args.frozen, args.frozen)
    frozen = _step_bytes(frozen_engine, batch)
    trainable = sum(p.numel() for p in frozen_engine.module.parameters() if p.requires_grad)
    return {
        "optimizer_ratio": frozen["optimizer_bytes"] / trained["optimizer_bytes"],
        "grad_ratio": frozen["grad_bytes"] / trained["grad_bytes"],
        "optimizer_bytes_frozen": frozen["optimizer_bytes"],
        "optimizer_bytes_trained": trained["optimizer_bytes"],
        "grad_bytes_frozen": frozen["grad_bytes"],
        "grad_bytes_trained": trained["grad_bytes"],
        "frozen": args.frozen,
        "params": params,
        "trainable_params_frozen": trainable,
    }
