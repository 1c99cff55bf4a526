"""The training loop, top to bottom: resume from the latest checkpoint, then step, log, checkpoint and evaluate
until the run length, a preemption signal, too many non-finite steps in a row or a rank's loader giving up.

    trainer = Trainer(config)
    try:
        result = trainer.train()
    finally:
        trainer.close()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from plait.data.loader import TooManyFailures
from plait.trainer.checkpoint import Checkpointer, PreemptionFlag, any_rank, rng_state, set_rng_state
from plait.trainer.config import RunConfig
from plait.trainer.config_loader import render_yaml, to_dict
from plait.trainer.curriculum import Curriculum, plot_curriculum
from plait.trainer.data_source import BatchSource
from plait.trainer.engine import build_engine, init_distributed, rebuild_engine
from plait.trainer.evaluate import flat_metrics, gather_embeddings, retrieval_metrics, summary
from plait.trainer.freezing import check_frozen_names, current_trainable, trainable_names
from plait.trainer.losses.distributed import host_group
from plait.trainer.model.accounting import estimate_flops, parameter_counts
from plait.trainer.optim import apply_schedule, frozen_prefixes, group_of
from plait.trainer.planned_batches import PlannedBatches
from plait.trainer.step_metrics import MetricWindow, device_peak_flops, grad_norms, plot_expert_heatmap
from plait.trainer.tracking import Tracker, resolve_uri
from plait.trainer.train_console import Progress, startup_summary

logger = logging.getLogger(__name__)

Fetched = TypeVar("Fetched")
"""What `Trainer._fetch` hands back: a step's micro-batches or the held-out batches."""


def kept_accumulation(saved: dict[str, Any], world: int) -> int:
    """The accumulation that keeps a checkpoint's micro-batches per optimizer step (ranks x accumulation) at `world`."""
    total = int(saved["world_size"]) * int(saved.get("accumulation", 1))
    if total % world:
        raise ValueError(f"deepspeed.keep_global_batch: the checkpoint's step of {total} micro-batches "
                         f"({saved['world_size']} ranks x {saved.get('accumulation', 1)}) does not divide over "
                         f"{world} ranks")
    if total // world != saved.get("accumulation", 1):
        logger.info("keep_global_batch: gradient_accumulation_steps %d at %d ranks (%d micro-batches per step)",
                    total // world, world, total)
    return total // world


class NonFiniteStop(RuntimeError):
    """Too many non-finite steps in a row; the run saved a checkpoint and stopped."""


class DataFailureStop(TooManyFailures):
    """A rank's loader gave up (too many bad samples in a row); every rank saved the checkpoint of the last completed
    step and stopped with that rank's message."""


def rank_failures(failure: str | None) -> list[str]:
    """Every rank's data failure message, in rank order (none when no rank failed): one host all-reduce, and a
    gather of the messages only when some rank failed."""
    if not dist.is_initialized() or not any_rank(failure is not None):
        return [] if failure is None else [failure]
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, failure, group=host_group())
    return [message for message in messages if message is not None]


class Trainer:
    """Owns the engine, data, curriculum, checkpointer and tracker of one run on this rank."""

    def __init__(self, cfg: RunConfig, data: BatchSource | None = None) -> None:
        init_distributed()
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.run_dir)
        self.curriculum = Curriculum.from_run(cfg)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep)
        resume = cfg.checkpoint.resume
        phases_frozen = [(i, phase.values.get("frozen", [])) for i, phase in enumerate(cfg.curriculum.phases)]
        self.freezable = frozen_prefixes(frozen for _, frozen in phases_frozen)
        saved = self.checkpointer.latest_meta() if resume else None
        if saved is not None and cfg.deepspeed.keep_global_batch:
            cfg.deepspeed.gradient_accumulation_steps = kept_accumulation(saved, self.world)
        self.frozen = sorted(self.curriculum.resolve(0).frozen if saved is None else saved.get("frozen", []))
        self.engine = build_engine(cfg, self.freezable, self.frozen,
                                   load_universal=resume and self.checkpointer.needs_universal())
        self.module = self.engine.module
        check_frozen_names(self.module, phases_frozen)
        self.device = self.engine.device
        self.data = data or PlannedBatches(cfg, self.rank, self.world)
        self.step, self.skipped_in_row, self.skipped_total = 0, 0, 0
        self._loss_history: list[float] = []
        self._pending_losses: list[torch.Tensor] = []
        self.last_components: dict[str, torch.Tensor | float] = {}
        self.retrieval: dict[str, dict[str, float]] = {}
        self.checkpoint_path: str | None = None
        self.preempted = False
        self.progress_metrics: dict[str, float] = {}
        self.expert_totals: torch.Tensor | None = None
        run_id = self._resume() if resume else None
        self.tracker = Tracker(resolve_uri(cfg.tracking.uri, self.run_dir), cfg.tracking.experiment, self.run_dir,
                               run_id=run_id, run_name=self.run_dir.name, enabled=self.rank == 0)
        self.window = MetricWindow()
        self.peak_flops = device_peak_flops(cfg.tracking.peak_tflops)
        self.preemption = PreemptionFlag()

    def _resume(self) -> str | None:
        """Load the latest checkpoint, if any: step, curriculum, data position, RNG; returns the MLflow run id."""
        loaded = self.checkpointer.load(self.engine)
        if loaded is None:
            return None
        run_state, rank_state = loaded
        self.step = int(run_state["step"])
        self.skipped_total = int(run_state["skipped_total"])
        self.skipped_in_row = int(run_state["skipped_in_row"])
        self.curriculum.load_state_dict(run_state["curriculum"], strict=False)
        self.data.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        return run_state["mlflow_run_id"]

    def _stage_params(self) -> None:
        """Resolved config as params and artifacts (a resumed run adds only what is new)."""
        self.tracker.log_params(to_dict(self.cfg))
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "resolved-config.yaml"
        config_path.write_text(render_yaml(self.cfg) + "\n")
        plot_path = self.run_dir / "curriculum.png"
        plot_curriculum(self.curriculum, plot_path, steps=self.cfg.steps)
        self.tracker.log_artifact(config_path)
        self.tracker.log_artifact(plot_path)
        self.tracker.flush()

    def train(self) -> dict[str, Any]:
        """Run until `cfg.steps`; returns the final result (the CLI's JSON line)."""
        counts = parameter_counts(self.module.model)
        if self.rank == 0:
            startup_summary(self.cfg, self.world, counts, self.curriculum, self.step, self.tracker)
        self._stage_params()
        progress = Progress(self.cfg.steps, self.step, enabled=self.rank == 0)
        running = True
        while running and self.step < self.cfg.steps:
            running = self.advance(progress)
        progress.close()
        return self.result()

    def advance(self, progress: Progress) -> bool:
        """One iteration of the loop: step, log, checkpoint and evaluate when due; False once the run must stop."""
        self.train_step()
        self.step += 1
        if self._logs_at(self.step):
            self._log()
        progress.update(self.step, self.progress_metrics)
        nonfinite_stop = self.skipped_in_row >= self.cfg.optim.max_nonfinite_steps
        self.preempted = self.preemption.requested()
        stop = self.preempted or nonfinite_stop
        every = self.cfg.checkpoint.every
        if stop or self.step == self.cfg.steps or (every and self.step % every == 0):
            self._save(self.data.state_dict())
        if nonfinite_stop:
            raise NonFiniteStop(f"{self.skipped_in_row} non-finite steps in a row up to step {self.step}; "
                                f"checkpoint {self.checkpoint_path}")
        if self.step == self.cfg.steps or (self.cfg.eval.every and self.step % self.cfg.eval.every == 0):
            self.evaluate()
        return not stop

    def _save(self, data_state: dict[str, Any]) -> None:
        """Checkpoint the last completed optimizer step on every rank, with the data position `data_state`."""
        self.checkpoint_path = self.checkpointer.save(self.engine, self.step, self._run_state(),
                                                      {"data": data_state, "rng": rng_state()}, self.frozen)

    def _fetch(self, fetch: Callable[[], Fetched]) -> Fetched:
        """`fetch()`'s batches once every rank's loader delivered its own, before any collective that uses them.

        When a rank's loader gives up, every rank saves the last completed step (with the data position from before
        the fetch) and raises that rank's message, instead of the others waiting for it in a collective until the
        distributed timeout.
        """
        position = self.data.state_dict()
        batches, failure = None, None
        try:
            batches = fetch()
        except TooManyFailures as err:
            failure = f"rank {self.rank}: {err}"
            logger.error("data failure on %s; stopping every rank", failure)
        failures = rank_failures(failure)
        if failures:
            self._save(position)
            raise DataFailureStop(f"{'; '.join(failures)}; every rank stopped at step {self.step} with checkpoint "
                                  f"{self.checkpoint_path}")
        return batches

    @property
    def losses(self) -> list[float]:
        """Mean loss of every optimizer step this process ran (reading it syncs with the device once)."""
        if self._pending_losses:
            self._loss_history.extend(torch.stack(self._pending_losses).tolist())
            self._pending_losses = []
        return self._loss_history

    def train_step(self) -> None:
        """One optimizer step over `gradient_accumulation_steps` micro-batches, skipped if non-finite.

        The step's micro-batches are all read first (`_fetch`), so a data failure on any rank stops every rank before
        the step changes anything. Losses, components and counters stay on the device; the host reads them only when
        logging.
        """
        gas = self.cfg.deepspeed.gradient_accumulation_steps
        hosts = self._fetch(lambda: [self.data.batch(self.step, micro) for micro in range(gas)])
        values = self.curriculum.at(self.step)
        self._follow_freezing(values.frozen)
        lrs = apply_schedule(self.engine.optimizer, self.step, self.cfg.optim, self.cfg.steps, values)
        queues = self.module.objective.queues
        rollback = queues.snapshot() if queues is not None else None
        components: dict[str, torch.Tensor | float] = {}
        counts: dict[str, torch.Tensor | float] = {}
        experts = None
        loss_sum = 0.0
        for micro, host in enumerate(hosts):
            batch = host.to(self.device)
            out = self.engine(batch, self.step, weights=values.loss_weights, hard_fraction=values.hard_negative_ratio)
            self.engine.backward(out.loss)
            if micro == gas - 1 and self._logs_at(self.step + 1):
                components.update(grad_norms(self.module, group_of))
            self.engine.step()
            loss_sum = loss_sum + out.loss.detach()
            for key, value in out.components.items():
                components[key] = components.get(key, 0.0) + value / gas
            self._count(counts, host, out.counters, out.captioning)
            experts = out.expert_counts if experts is None else experts + out.expert_counts
        self._pending_losses.append(loss_sum / gas)
        if not self.engine.was_step_applied():
            if rollback is not None:
                queues.restore(rollback)
            self.skipped_in_row += 1
            self.skipped_total += 1
            counts["skipped/nonfinite_steps"] = 1.0 / self.world
            logger.warning("step %d: non-finite loss or gradients; update skipped (%d in a row)",
                           self.step, self.skipped_in_row)
            self.window.add_step({}, counts, None)
            return
        self.skipped_in_row = 0
        components.update({f"lr/{group}": lr for group, lr in lrs.items()})
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            components["grad_norm"] = norm
        self.last_components = components
        self.window.add_step(components, counts, experts)

    def _follow_freezing(self, frozen: list[str]) -> None:
        """Rebuild the engine when this step's `frozen` modules change which parameters train."""
        frozen = sorted(frozen)
        if frozen == self.frozen:
            return
        self.frozen = frozen
        trainable = trainable_names(self.module, self.module.fixed_frozen, frozen)
        if trainable != current_trainable(self.module):
            logger.info("step %d: frozen modules now %s; rebuilding the engine", self.step, frozen or "none")
            self.engine = rebuild_engine(self.engine, self.cfg, self.freezable, frozen)

    def _logs_at(self, step: int) -> bool:
        """Whether metrics are sent after optimizer step `step` (1-based count of steps done)."""
        return step % self.cfg.tracking.log_every == 0 or step == self.cfg.steps

    def _count(self, counts: dict[str, torch.Tensor | float], batch, model_counters: dict[str, int | torch.Tensor],
               captioning: bool) -> None:
        """Add one micro-batch's samples, tokens, padding, drops, skipped samples and FLOPs to `counts` (from the
        host batch; the model's capacity drops stay a device scalar)."""
        tokens = sum(stream.num_tokens for stream in batch.streams.values())
        counts["samples"] = counts.get("samples", 0.0) + batch.num_samples
        counts["tokens"] = counts.get("tokens", 0.0) + tokens + int(batch.caption_ids.numel())
        counts["padding"] = counts.get("padding", 0.0) + sum(s.num_padding for s in batch.streams.values())
        counts["dropped"] = counts.get("dropped", 0.0) + batch.counters.get("dropped", 0)
        counts["count/capacity_dropped"] = counts.get("count/capacity_dropped", 0.0) + model_counters.get(
            "dropped_assignments", 0)
        for key, value in batch.counters.items():
            if key.startswith("skipped") or key.startswith("source/"):
                name = key if "/" in key else f"skipped/{key.removeprefix('skipped').strip('_') or 'samples'}"
                counts[name] = counts.get(name, 0.0) + value
        if self.peak_flops is not None:
            counts["flops"] = counts.get("flops", 0.0) + estimate_flops(self.module.model, batch, captioning).train

    def _log(self) -> None:
        """Reduce the window over ranks and send it (rank 0): the one point where a step reads the device."""
        metrics, experts = self.window.reduce(self.peak_flops)
        metrics["guard/skipped_steps_total"] = float(self.skipped_total)
        self.tracker.log_metrics(metrics, self.step)
        self.tracker.flush()
        self.progress_metrics = metrics
        if experts is not None:
            self.expert_totals = experts if self.expert_totals is None else self.expert_totals + experts
        self.window.reset()

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Retrieval R@1/5/10 per modality on the held-out batches (all ranks run; metrics on rank 0); none when
        the run holds nothing out (`data.plan.eval_fraction: 0`)."""
        if self.cfg.data.plan.eval_fraction == 0:
            return {}
        hosts = self._fetch(self.data.eval_batches)
        self.module.eval()
        parts = []
        for host in hosts:
            media, text = self.module.embed(host.to(self.device))
            parts.append((media, text, host.caption_key, host.modality))
        self.module.train()
        media, text, captions, modality = gather_embeddings(parts)
        if media is None:
            return {}
        metrics = retrieval_metrics(media, text, captions, modality)
        self.retrieval = summary(metrics)
        self.tracker.log_metrics(flat_metrics(metrics), self.step)
        self.tracker.flush()
        return self.retrieval

    def _run_state(self) -> dict[str, Any]:
        """What rank 0 saves beside the weights."""
        return {"step": self.step, "config": to_dict(self.cfg), "curriculum": self.curriculum.state_dict(),
                "mlflow_run_id": self.tracker.run_id,
                "skipped_total": self.skipped_total, "skipped_in_row": self.skipped_in_row}

    def result(self) -> dict[str, Any]:
        """The final JSON line."""
        losses = {k.removeprefix("loss/"): float(v) for k, v in self.last_components.items() if k.startswith("loss/")}
        return {"run_id": self.tracker.run_id, "tracking_uri": self.tracker.uri, "world_size": self.world,
                "steps": self.step, "loss": self.losses[-1] if self.losses else None, "losses": losses,
                "retrieval": self.retrieval, "checkpoint": self.checkpoint_path}

    def close(self, status: str = "FINISHED") -> None:
        """Upload the expert heatmap, end the MLflow run, restore signal handlers."""
        if self.rank == 0 and self.expert_totals is not None and status == "FINISHED":
            path = self.run_dir / "expert-utilisation.png"
            plot_expert_heatmap(self.expert_totals, path)
            self.tracker.log_artifact(path)
        self.tracker.finish(status)
        self.preemption.close()
