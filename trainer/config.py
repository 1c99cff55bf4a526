"""The run config: one YAML file per run, loaded into typed sections and validated before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from plait.data.checks import check_at_least, check_positive
from plait.data.config import DataConfig
from plait.trainer.config_loader import ConfigError, apply_overrides, build, read_yaml
from plait.trainer.curriculum import CurriculumConfig
from plait.trainer.losses.config import LossConfig
from plait.trainer.model.config import ModelConfig
from plait.trainer.model.validate import validate_model


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate of the default parameter group."""
    weight_decay: float = 0.05
    """AdamW weight decay (never applied to norms, biases, embeddings or the temperature)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine to `min_lr_ratio`, warmup-stable-decay, or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    wsd_decay_fraction: float = 0.2
    """`wsd`: share of the run spent decaying at the end (the rest after warmup is stable)."""
    max_nonfinite_steps: int = 5
    """Stop, after a checkpoint, when this many optimizer steps in a row had a non-finite loss or gradient."""
    grad_clip: float = 1.0
    """Gradient norm clipping (0 disables)."""
    group_lr: dict[str, float] = field(default_factory=dict)
    """Peak LR per parameter group (encoder, resampler, llm, routers); missing groups use `lr`."""

    def __post_init__(self) -> None:
        check_positive(self, "lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas}")
        check_at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip")
        check_positive(self, "max_nonfinite_steps")
        if not 0 < self.wsd_decay_fraction <= 1:
            raise ValueError(f"wsd_decay_fraction: must be in (0, 1], got {self.wsd_decay_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for name, value in self.group_lr.items():
            if value < 0:
                raise ValueError(f"group_lr.{name}: must be >= 0, got {value}")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine: ZeRO stage, offload, precision, batch shape."""

    zero_stage: Optional[int] = None
    """ZeRO stage 0 (plain data parallel), 1, 2 or 3; null: the `config_file`'s stage, else 2."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer state (and parameters at stage 3) to CPU memory."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU (bf16 on CPU is ~4x slower)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (each a token budget per rank; see data.packing)."""
    keep_global_batch: bool = False
    """On a resume at another world size, set the accumulation so that ranks x accumulation (micro-batches per
    optimizer step) stays the checkpoint's; stops if it does not divide. Otherwise the step grows with the world."""
    config_file: str = ""
    """Optional DeepSpeed JSON (e.g. configs/deepspeed/zero3.json) merged under the values above."""

    def __post_init__(self) -> None:
        check_positive(self, "gradient_accumulation_steps")
        self.file_config: dict = {}  # the parsed `config_file`, read once at load (not a config field)
        if self.config_file:
            try:
                with open(self.config_file, encoding="utf-8") as handle:
                    self.file_config = json.load(handle)
            except OSError as err:
                raise ValueError(f"config_file: cannot read {self.config_file!r}: {err.strerror}") from None
            except json.JSONDecodeError as err:
                raise ValueError(f"config_file: {self.config_file} is not valid JSON: {err}") from None
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.stage}")
        if self.offload == "cpu" and self.stage == 0:
            raise ValueError("offload: cpu needs zero_stage 1, 2 or 3 (at stage 0 DeepSpeed ignores it and keeps the "
                             "optimizer state on the device)")

    @property
    def stage(self) -> int:
        """The ZeRO stage in force: `zero_stage`, else the config file's, else 2."""
        if self.zero_stage is not None:
            return self.zero_stage
        return int(self.file_config.get("zero_optimization", {}).get("stage", 2))


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written."""

    every: int = 100
    """Save every N optimizer steps (0: only at the end and on preemption)."""
    keep: int = 3
    """Keep the newest K checkpoints (0 keeps all)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when there is one."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "every", "keep")


@dataclass
class TrackingConfig:
    """MLflow experiment tracking (rank 0 only)."""

    uri: str = ""
    """Tracking URI; empty = $MLFLOW_TRACKING_URI, else a SQLite store in the run directory."""
    experiment: str = "plait"
    """MLflow experiment name."""
    log_every: int = 10
    """Send batched metrics every N steps."""
    peak_tflops: Optional[float] = None
    """Peak TFLOP/s of one device for MFU; null: the table of known accelerators (none for CPUs and others)."""

    def __post_init__(self) -> None:
        check_positive(self, "log_every")
        if self.peak_tflops is not None and not 0 < self.peak_tflops < float("inf"):
            raise ValueError(f"peak_tflops: must be a positive number or null, got {self.peak_tflops}")


@dataclass
class EvalConfig:
    """Held-out retrieval evaluation."""

    every: int = 100
    """Evaluate every N steps (0: only at the end)."""
    max_samples: int = 300
    """Held-out samples (all modalities together) used for retrieval R@k; the split is walked up to this many."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "every")
        check_positive(self, "max_samples")


@dataclass
class RunConfig:
    """One training run."""

    seed: int = 0
    """Seed of every random choice (data order, sizing, init)."""
    steps: int = 200
    """Optimizer steps to train."""
    run_dir: str = "runs/default"
    """Checkpoints, the local MLflow store and logs go here."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and loader."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Encoder, resampler, LLM and MoME layers."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Training objectives."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Step-keyed schedules (resolution, token drop, negatives, loss weights, freezing, LR)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def __post_init__(self) -> None:
        check_positive(self, "steps")
        validate_model(self)
        self.curriculum.check_sources([source.name for source in self.data.sources])


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load and validate a run config (defaults when `path` is None), applying `--set` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides, RunConfig)
    return build(RunConfig, data, source)


__all__ = ["ConfigError", "RunConfig", "load_config"]
