"""Rank-0 console of a training run: the startup summary and the progress bar (loss, tokens/s, MFU, ETA)."""

from __future__ import annotations

import datetime
import resource
import time

import torch
from rich import progress as rich_progress
from rich.table import Table

from plait.trainer.config import RunConfig
from plait.trainer.console import console
from plait.trainer.curriculum import Curriculum
from plait.trainer.engine import uses_bf16
from plait.trainer.model.accounting import ParameterCounts
from plait.trainer.tracking import Tracker


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def startup_summary(cfg: RunConfig, world: int, counts: ParameterCounts, curriculum: Curriculum, step: int,
                    tracker: Tracker) -> None:
    """What is about to run: world size, ZeRO stage, parameters, data, curriculum phase, resume point."""
    table = Table(title="plait train", show_header=False, title_justify="left")
    phase = curriculum.phase_index(step)
    tokens_per_step = cfg.data.packing.max_tokens * world * cfg.deepspeed.gradient_accumulation_steps
    rows = [
        ("world size", str(world)),
        ("ZeRO stage", f"{cfg.deepspeed.stage} (offload: {cfg.deepspeed.offload})"),
        ("parameters", f"total {_millions(counts.total)}, trainable {_millions(counts.trainable)}, "
                       f"active/token {_millions(counts.active_per_token)}"),
        ("precision", "bf16" if uses_bf16(cfg) else "fp32"),
        ("batch", f"{tokens_per_step:,} encoder tokens per step ({cfg.data.packing.max_tokens:,} per micro-batch, "
                  f"{world} rank(s), accumulation {cfg.deepspeed.gradient_accumulation_steps}); samples per step "
                  f"vary, at most {cfg.data.packing.max_samples_per_sequence} per sequence"),
        ("learning rate", f"{cfg.optim.lr:g} peak, {cfg.optim.warmup_steps} warmup steps, {cfg.optim.schedule}"),
        ("data", data_summary(cfg)),
        ("curriculum", f"phase {phase + 1}/{len(cfg.curriculum.phases)} "
                       f"(from step {cfg.curriculum.phases[phase].start})"),
        ("steps", f"{step} -> {cfg.steps}" + (" (resumed)" if step else "")),
        ("run dir", cfg.run_dir),
        ("tracking", f"{tracker.uri} run {tracker.run_id}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def data_summary(cfg: RunConfig) -> str:
    """The run's data in a few words: its shards, its named sources, or the demo data."""
    if cfg.data.sources:
        return ", ".join(f"{s.name} (weight {s.weight:g})" for s in cfg.data.sources)
    return cfg.data.shards or f"demo ({cfg.data.demo.out})"


def progress_text(metrics: dict[str, float]) -> str:
    """`loss 2.3456 | 12,345 tok/s | MFU 41.2%`: each throughput part only when the last log carried it (MFU
    needs a known peak: `tracking.peak_tflops` or a device in `step_metrics.PEAK_TFLOPS`)."""
    tps = metrics.get("throughput/tokens_per_s")
    mfu = metrics.get("throughput/mfu")
    loss = metrics.get("loss/total")
    text = f"loss {loss:.4f}" if loss is not None else "loss -"
    text += f" | {tps:,.0f} tok/s" if tps is not None else ""
    text += f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
    return text


def _memory_gb() -> float:
    """Peak memory in GB: the device's allocator peak on CUDA (no sync), else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def log_line(step: int, total: int, metrics: dict[str, float], step_s: float) -> str:
    """One plain progress line (for logs without a terminal): step, loss, throughput, MFU, step time, ETA, memory."""
    samples = metrics.get("throughput/samples_per_s")
    eta = datetime.timedelta(seconds=round(step_s * max(total - step, 0)))
    return " | ".join([f"step {step}/{total}", progress_text(metrics)]
                      + ([f"{samples:,.1f} samples/s"] if samples is not None else [])
                      + [f"{step_s:.3f} s/step", f"ETA {eta}", f"mem {_memory_gb():.2f} GB"])


class Progress:
    """Rank 0's progress: a live bar (latest loss, tokens/s, MFU) on a terminal; without one (SLURM, `| tee`), one
    plain line per logged window (`tracking.log_every` steps). Silent off rank 0."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        self.total = total
        self.plain = enabled and not console.is_terminal
        self._printed: dict[str, float] | None = None
        self._since = (start, time.perf_counter())
        if not enabled or self.plain:
            return
        self.bar = rich_progress.Progress(
            rich_progress.TextColumn("step {task.completed}/{task.total}"),
            rich_progress.BarColumn(),
            rich_progress.TextColumn("{task.description}"),
            rich_progress.TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.bar.add_task("", total=total, completed=start)
        self.bar.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        """Move to `step` showing the last logged metrics (global mean loss, throughput): no device read per step."""
        if self.plain:
            if metrics and metrics is not self._printed:
                first, since = self._since
                now = time.perf_counter()
                console.print(log_line(step, self.total, metrics, (now - since) / max(step - first, 1)),
                              soft_wrap=True, highlight=False, markup=False)
                self._printed, self._since = metrics, (step, now)
            return
        if self.bar is None:
            return
        self.bar.update(self.task, completed=step, description=progress_text(metrics))

    def close(self) -> None:
        """Stop redrawing."""
        if self.bar is not None:
            self.bar.stop()
