"""`plait data walk CONFIG --world-size W (--steps N | --epochs E)`: what a run would feed each rank, without training.

Prints one JSON line per (micro-batch, rank) — {"epoch", "step", "micro", "rank", "keys", "tokens", "padding",
"skipped", "mix", "sources" (with data.sources), "resolution", "token_drop_rate"} with the optimizer step and the
sizing values in force — then a
summary as the final line. `--state-out` saves the plan state after the walk and
`--state-in` resumes from one (at any world size), exactly as a training run resumes its loader.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from plait.data.batch import MODALITIES
from plait.data.plan import RankStep, SamplePlan
from plait.data.plan_types import MicroBatchPlan
from plait.data.source import Dataset, open_dataset
from plait.trainer.config import RunConfig, load_config
from plait.trainer.console import emit_result
from plait.trainer.planned_batches import resolve_tokenizer, run_plan

Decoder = Callable[[MicroBatchPlan], dict[str, int]]
"""Reads and decodes a planned micro-batch; returns skipped-sample counts by reason (the `--decode` hook)."""


def step_record(step: RankStep, skipped: dict[str, int]) -> dict:
    """The JSON line of one (step, rank)."""
    plan = step.plan
    return {"epoch": plan.epoch, "step": plan.step, "micro": plan.micro, "rank": plan.rank,
            "keys": [s.key for s in plan.samples], "tokens": plan.tokens, "padding": step.padding, "skipped": skipped,
            "mix": step.mix, **({"sources": step.sources} if step.sources else {}), **step.values}


def walk(plan: SamplePlan, steps: int | None = None, epochs: int | None = None,
         decode: Decoder | None = None) -> dict:
    """Walk `steps` steps or to the end of `epochs` epochs, printing a JSON line per (step, rank); returns a summary."""
    if (steps is None) == (epochs is None):
        raise ValueError("steps, epochs: give exactly one")
    stop_epoch = plan.upcoming_epoch() + epochs if epochs is not None else None
    walked, samples = 0, 0
    mix = dict.fromkeys(MODALITIES, 0)
    while (steps is not None and walked < steps) or (stop_epoch is not None and plan.upcoming_epoch() < stop_epoch):
        for rank_step in plan.next_step():
            skipped = dict(rank_step.skipped)
            for reason, count in (decode(rank_step.plan) if decode else {}).items():
                skipped[reason] = skipped.get(reason, 0) + count
            sys.stdout.write(json.dumps(step_record(rank_step, skipped)) + "\n")
            samples += len(rank_step.plan.samples)
            for name, count in rank_step.mix.items():
                mix[name] += count
        walked += 1
    sys.stdout.flush()
    total = max(samples, 1)
    return {"world_size": plan.world_size, "steps": walked, "samples": samples, "epoch": plan.state.epoch,
            "next_step": plan.state.step, "mix": {m: round(c / total, 4) for m, c in mix.items()},
            "state_bytes": plan.state.nbytes()}


def make_decoder(cfg: RunConfig, index: Dataset) -> Decoder:
    """`--decode`: really read, decode and pack each planned micro-batch; returns its skipped samples by reason."""
    from plait.data.loader import decode_plans

    tokenizer = resolve_tokenizer(cfg, index)

    def decode(plan: MicroBatchPlan) -> dict[str, int]:
        (counts,) = decode_plans([plan], tokenizer, cfg.data.sizing, cfg.data.packing,
                                 max_consecutive_failures=cfg.data.max_consecutive_failures, cfg=cfg.data.loader)
        return {key.removeprefix("skipped_"): n for key, n in counts.items() if key.startswith("skipped_") and n}

    return decode


def _cmd_walk(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.set)
    index = open_dataset(cfg.data)
    plan = run_plan(cfg, index, args.world_size, plan_cfg=dataclasses.replace(cfg.data.plan, split=args.split))
    if args.state_in:
        plan.load_state_dict(json.loads(Path(args.state_in).read_text()))
    decode = make_decoder(cfg, index) if args.decode else None
    summary = walk(plan, steps=args.steps, epochs=args.epochs, decode=decode)
    if args.state_out:
        Path(args.state_out).write_text(json.dumps(plan.state_dict()))
        summary["state_out"] = args.state_out
    emit_result(summary)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `plait data walk`."""
    data = subparsers.add_parser("data", help="inspect the data plane").add_subparsers(dest="what", required=True)
    parser = data.add_parser("walk", help="print what each rank would be fed at each step, without training")
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--world-size", type=int, required=True, help="data-parallel ranks to plan for")
    until = parser.add_mutually_exclusive_group(required=True)
    until.add_argument("--steps", type=int, default=None, help="steps to walk")
    until.add_argument("--epochs", type=int, default=None, help="walk to the end of this many epochs")
    parser.add_argument("--state-in", default=None, help="resume from a saved plan state (any world size)")
    parser.add_argument("--state-out", default=None, help="save the plan state after the walk")
    parser.add_argument("--decode", action="store_true", help="also read and decode every planned sample")
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="which group split to walk")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.set_defaults(func=_cmd_walk)
