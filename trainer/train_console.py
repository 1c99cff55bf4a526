"""Rank-0 console of a training run: the startup summary and the progress bar (loss, tokens/s, MFU, ETA)."""

from __future__ import annotations

from rich import progress as rich_progress
from rich.table import Table

from plait.trainer.config import RunConfig
from plait.trainer.console import console
from plait.trainer.curriculum import Curriculum
from plait.trainer.model.accounting import ParameterCounts
from plait.trainer.tracking import Tracker


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def startup_summary(cfg: RunConfig, world: int, counts: ParameterCounts, curriculum: Curriculum, step: int,
                    tracker: Tracker) -> None:
    """What is about to run: world size, ZeRO stage, parameters, data, curriculum phase, resume point."""
    table = Table(title="plait train", show_header=False, title_justify="left")
    phase = curriculum.phase_index(step)
    rows = [
        ("world size", str(world)),
        ("ZeRO stage", f"{cfg.deepspeed.stage} (offload: {cfg.deepspeed.offload})"),
        ("parameters", f"total {_millions(counts.total)}, trainable {_millions(counts.trainable)}, "
                       f"active/token {_millions(counts.active_per_token)}"),
        ("data", cfg.data.shards or f"demo ({cfg.data.demo.out})"),
        ("curriculum", f"phase {phase + 1}/{len(cfg.curriculum.phases)} "
                       f"(from step {cfg.curriculum.phases[phase].start})"),
        ("steps", f"{step} -> {cfg.steps}" + (" (resumed)" if step else "")),
        ("run dir", cfg.run_dir),
        ("tracking", f"{tracker.uri} run {tracker.run_id}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


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


class Progress:
    """A progress bar whose description carries the latest loss, tokens/s and MFU; silent off rank 0."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if not enabled:
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
        if self.bar is None:
            return
        self.bar.update(self.task, completed=step, description=progress_text(metrics))

    def close(self) -> None:
        """Stop redrawing."""
        if self.bar is not None:
            self.bar.stop()
