"""The real data source of a run: the sample plan read, decoded and packed by the loader (a `BatchSource`).

Micro-batch `micro` of optimizer step `step` is plan step `step * accumulation + micro`. Workers plan
for themselves (the plan is forward-only and cheap), so the number of workers never changes a batch;
a plan copy in this process follows the consumed steps and is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from plait.data.batch import PackedBatch
from plait.data.dataset_index import DatasetIndex
from plait.data.loader import PlanDataset, PlanLoader
from plait.data.plan import PlanConfig, SamplePlan, ValuesAt
from plait.data.reader import check_shards
from plait.data.source import build_plan, dataset_captions, open_dataset
from plait.data.tokenizer import load_tokenizer, train_tokenizer
from plait.trainer.config import RunConfig
from plait.trainer.curriculum import Curriculum
from plait.trainer.model.pretrained import TOKENIZER_DIR, tokenizer_source

logger = logging.getLogger(__name__)

TOKENIZER_CAPTIONS = 100_000
"""Captions read to train a tokenizer for an LLM built from config (no tokenizer of its own)."""


def curriculum_values(curriculum: Curriculum) -> ValuesAt:
    """step → (resolution, token drop rate, mix): the data values of the run's curriculum."""

    def values_at(step: int) -> tuple[dict[int, float], float, dict[str, float]]:
        values = curriculum.resolve(step)
        return values.resolution, values.token_drop_rate, values.mix

    return values_at


def run_plan(cfg: RunConfig, index: DatasetIndex, world_size: int, ranks: list[int] | None = None,
             plan_cfg: PlanConfig | None = None) -> SamplePlan:
    """The sample plan of a run for `ranks` (default all) of `world_size` ranks, following its curriculum."""
    # The phases alone identify the schedule to the plan: it fingerprints the data sections (the base values) itself.
    return build_plan(cfg.data, index, cfg.seed, curriculum_values(Curriculum.from_run(cfg)),
                      cfg.curriculum.fingerprint(), world_size, ranks=ranks, plan_cfg=plan_cfg)


def prepare_data(cfg: RunConfig) -> DatasetIndex:
    """The run's dataset, built and indexed by rank 0 when it is the demo data; every rank waits for it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return open_dataset(cfg.data)
    index = open_dataset(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    return index


def resolve_tokenizer(cfg: RunConfig, index: DatasetIndex) -> PreTrainedTokenizerBase:
    """The run's tokenizer (`tokenizer_source`); a BPE trained on the captions into the run dir when it has none."""
    source = Path(tokenizer_source(cfg))
    rank = dist.get_rank() if dist.is_initialized() else 0
    trained = source == Path(cfg.run_dir) / TOKENIZER_DIR
    if trained and rank == 0 and not (source / "tokenizer.json").exists():
        vocab = int(cfg.model.llm.model_kwargs.get("vocab_size", 0))
        train_tokenizer(dataset_captions(index, TOKENIZER_CAPTIONS), vocab, source)
        logger.info("trained a %d-token caption tokenizer into %s", vocab, source)
    if trained and dist.is_initialized():
        dist.barrier()
    return load_tokenizer(source)


class PlannedBatches:
    """Training and held-out micro-batches of one rank, from the plan through the loader."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.accumulation = cfg.deepspeed.gradient_accumulation_steps
        self.index = index = prepare_data(cfg)
        check_shards([index.shard_url(i) for i in range(len(index.names))])
        self.tokenizer = resolve_tokenizer(cfg, index)
        self.plan = run_plan(cfg, index, world_size, ranks=[rank])
        self._loader: PlanLoader | None = None
        self._batches: Iterator[PackedBatch] | None = None
        self._eval: list[PackedBatch] | None = None

    def _dataset(self, plan: SamplePlan, num_steps: int, spec_augment: bool) -> PlanDataset:
        data = self.cfg.data
        loader_cfg = dataclasses.replace(data.loader, spec_augment=data.loader.spec_augment and spec_augment)
        return PlanDataset(lambda step: plan.at_step(step)[0].plan, self.tokenizer, data.sizing, data.packing,
                           loader_cfg, num_steps=num_steps)

    def _start(self) -> None:
        """Loader over the run's remaining plan steps, starting where the plan copy stands."""
        total = self.cfg.steps * self.accumulation
        start = self.plan.state.step
        worker_plan = run_plan(self.cfg, self.index, self.world, ranks=[self.rank])
        worker_plan.load_state_dict(self.plan.state_dict())
        self._loader = PlanLoader(self._dataset(worker_plan, max(total, start), True), self.cfg.data.workers,
                                  self.cfg.data.max_consecutive_failures, start_step=start)
        self._batches = iter(self._loader)

    def batch(self, step: int, micro: int) -> PackedBatch:
        """Micro-batch `micro` of optimizer step `step` (the loop asks for them in order)."""
        wanted = step * self.accumulation + micro
        if self._batches is None:
            self._start()
        if wanted != self.plan.state.step:
            raise ValueError(f"step: asked for plan step {wanted}, the loader is at {self.plan.state.step}")
        self.plan.next_step()
        return next(self._batches)

    def eval_batches(self) -> list[PackedBatch]:
        """The held-out split, one pass, decoded once (every rank gets the same number of batches)."""
        if self._eval is None:
            cfg = self.cfg
            eval_cfg = dataclasses.replace(cfg.data.plan, split="eval")
            eval_plan = run_plan(cfg, self.index, self.world, ranks=[self.rank], plan_cfg=eval_cfg)
            steps = 0
            samples = 0
            probe = run_plan(cfg, self.index, self.world, plan_cfg=eval_cfg)
            while probe.upcoming_epoch() == 0 and samples < cfg.eval.max_samples:
                samples += sum(len(s.plan.samples) for s in probe.next_step())
                steps += 1
            loader = PlanLoader(self._dataset(eval_plan, steps, False), 0, cfg.data.max_consecutive_failures)
            self._eval = list(loader)
        return self._eval

    def state_dict(self) -> dict[str, Any]:
        """The plan position (world-size independent) and the loader's failure run."""
        guard = self._loader.state_dict()["failure_run"] if self._loader else 0
        return {"plan": self.plan.state_dict(), "failure_run": guard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the plan (re-planned when the world size changed); the loader restarts from there."""
        self.plan.load_state_dict(state["plan"])
        self._batches = None
        self._start()
        self._loader.load_state_dict({"next_step": self.plan.state.step, "failure_run": state["failure_run"]})
