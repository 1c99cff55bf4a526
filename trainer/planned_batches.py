"""The real data source of a run: the sample plan read, decoded and packed by the loader (a `BatchSource`).

Each rank plans only its own share, once, in this process: the ranks agree on each segment's step count with
one all-reduce on a CPU group, and the loader's sampler hands each micro-batch's plan to a worker, so the
number of workers never changes a batch. The plan runs ahead of training by the loader's prefetch; the state
after each planned micro-batch is kept until training consumes it, and that is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from plait.data.batch import PackedBatch
from plait.data.loader import PlanDataset, PlanLoader, Plans
from plait.data.plan import AgreeMax, PlanConfig, SamplePlan, ValuesAt
from plait.data.plan_types import MicroBatchPlan
from plait.data.reader import check_shards
from plait.data.source import Dataset, build_plan, dataset_captions, open_dataset
from plait.data.tokenizer import load_tokenizer, train_tokenizer
from plait.trainer.config import RunConfig
from plait.trainer.curriculum import Curriculum
from plait.trainer.model.hub import from_checkpoint
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


SIZING_VALUES = ("resolution", "token_drop_rate")
"""Curriculum values the plan re-sizes for at the step they change (the mix applies from the next window)."""


def run_plan(cfg: RunConfig, index: Dataset, world_size: int, ranks: list[int] | None = None,
             plan_cfg: PlanConfig | None = None, agree: AgreeMax | None = None) -> SamplePlan:
    """The sample plan of a run for `ranks` (default all) of `world_size` ranks, following its curriculum."""
    curriculum = Curriculum.from_run(cfg)
    every = (plan_cfg or cfg.data.plan).replan_every

    def next_change(step: int) -> int | None:
        return curriculum.next_change(step, SIZING_VALUES, every)

    # The phases alone identify the schedule to the plan: it fingerprints the data sections (the base values) itself.
    return build_plan(cfg.data, index, cfg.seed, curriculum_values(curriculum), cfg.curriculum.fingerprint(),
                      world_size, ranks=ranks, plan_cfg=plan_cfg, agree=agree,
                      accumulation=cfg.deepspeed.gradient_accumulation_steps, next_change=next_change,
                      source_weights_at=lambda step: curriculum.resolve(step).source_weights)


def plan_micro_batch(plan: SamplePlan, index: int) -> tuple[MicroBatchPlan, dict[str, Any]]:
    """Micro-batch `index`'s plan for the plan's one rank and the plan state after it (what a rank hands its
    DataLoader workers, and what a checkpoint saves once that micro-batch is consumed)."""
    planned = plan.at_step(index)[0].plan
    return planned, plan.state_dict()


def agreement(world_size: int) -> AgreeMax | None:
    """All-reduce MAX over the ranks on a CPU (gloo) group of its own, so planning never waits on device work;
    None for a single rank."""
    if world_size == 1 or not dist.is_initialized():
        return None
    group = dist.new_group(backend="gloo")

    def agree(count: int) -> int:
        value = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return int(value)

    return agree


def prepare_data(cfg: RunConfig) -> Dataset:
    """The run's dataset, built and indexed by rank 0 when it is the demo data; every rank waits for it."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return open_dataset(cfg.data)
    index = open_dataset(cfg.data)
    if dist.is_initialized():
        dist.barrier()
    return index


def resolve_tokenizer(cfg: RunConfig, index: Dataset) -> PreTrainedTokenizerBase:
    """The run's tokenizer (`tokenizer_source`); a BPE trained on the captions into the run dir when it has none."""
    source = Path(tokenizer_source(cfg))
    rank = dist.get_rank() if dist.is_initialized() else 0
    trained = source == Path(cfg.run_dir) / TOKENIZER_DIR
    if trained and rank == 0 and not (source / "tokenizer.json").exists():
        vocab = int(cfg.model.llm.model_kwargs.get("vocab_size", 0))
        train_tokenizer(dataset_captions(index, TOKENIZER_CAPTIONS, cfg.data.loader.cache()), vocab, source)
        logger.info("trained a %d-token caption tokenizer into %s", vocab, source)
    if trained and dist.is_initialized():
        dist.barrier()
    field = "model.llm.tokenizer" if cfg.model.llm.tokenizer else "model.llm.name_or_path"
    return from_checkpoint(field, str(source), lambda: load_tokenizer(source))


class PlannedBatches:
    """Training and held-out micro-batches of one rank, from the plan through the loader."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.index = index = prepare_data(cfg)
        check_shards([index.shard_url(i) for i in range(len(index.names))])
        self.tokenizer = resolve_tokenizer(cfg, index)
        self.plan = run_plan(cfg, index, world_size, ranks=[rank], agree=agreement(world_size))
        self._consumed = self.plan.state_dict()
        self._ahead: dict[int, dict[str, Any]] = {}
        """Plan state after each micro-batch planned but not yet consumed (by micro-batch index)."""
        self._loader: PlanLoader | None = None
        self._batches: Iterator[PackedBatch] | None = None
        self._eval: list[PackedBatch] | None = None

    def _dataset(self, plans: Plans, num_steps: int, augment: bool) -> PlanDataset:
        data = self.cfg.data
        return PlanDataset(plans, self.tokenizer, data.sizing, data.packing, data.loader, num_steps=num_steps,
                           augment=augment)

    def _plan_next(self, index: int) -> MicroBatchPlan:
        """Micro-batch `index`'s plan (asked for in order by the loader's sampler), remembering the state after it."""
        planned, self._ahead[index] = plan_micro_batch(self.plan, index)
        return planned

    def _start(self) -> None:
        """Loader over the run's remaining micro-batches, starting where the plan stands."""
        total = self.plan.index_of(self.cfg.steps)
        start = self.plan.state.step
        self._ahead.clear()
        self._loader = PlanLoader(self._dataset(self._plan_next, max(total, start), True), self.cfg.data.workers,
                                  self.cfg.data.max_consecutive_failures, start_step=start)
        self._batches = iter(self._loader)

    def batch(self, step: int, micro: int) -> PackedBatch:
        """Micro-batch `micro` of optimizer step `step` (the loop asks for them in order)."""
        wanted = self.plan.index_of(step, micro)
        if self._batches is None:
            self._start()
        if wanted != self._loader.next_step:
            raise ValueError(f"step: asked for step {step} micro-batch {micro} (micro-batch {wanted}), the loader "
                             f"is at micro-batch {self._loader.next_step}")
        batch = next(self._batches)
        self._consumed = self._ahead.pop(wanted)
        return batch

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
            plans = self._dataset(lambda index: eval_plan.at_step(index)[0].plan, steps, False)
            loader = PlanLoader(plans, 0, cfg.data.max_consecutive_failures)
            self._eval = list(loader)
        return self._eval

    def state_dict(self) -> dict[str, Any]:
        """The position of the consumed micro-batches (world-size independent) and the loader's failure run."""
        guard = self._loader.state_dict()["failure_run"] if self._loader else 0
        return {"plan": self._consumed, "failure_run": guard}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the plan (re-planned when the world size changed); the loader restarts from there."""
        self.plan.load_state_dict(state["plan"])
        self._consumed = self.plan.state_dict()
        self._start()
        self._loader.load_state_dict({"next_step": self.plan.state.step, "failure_run": state["failure_run"]})
