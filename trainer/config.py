"""The run config: one YAML file per run, loaded into typed sections and validated before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from plait.data.checks import check_at_least, check_positive
from plait.data.loader import LoaderConfig
from plait.data.packing import PackingConfig
from plait.data.plan import PlanConfig
from plait.data.shardlist import expand_urls, is_remote
from plait.data.sizing import SizingConfig
from plait.data.token_drop import TokenDropConfig
from plait.trainer.config_loader import ConfigError, apply_overrides, build, read_yaml
from plait.trainer.curriculum import CurriculumConfig
from plait.trainer.losses.config import LossConfig
from plait.trainer.model.config import ModelConfig

@dataclass
class DemoDataConfig:
    """The built-in demo dataset, built on first use when `data.shards` is empty."""

    out: str = ".plait/demo-data"
    """Folder holding one sub-folder per demo spec (version, samples, seed, shard size), built on first use."""
    samples: int = 600
    """Number of demo samples over the three modalities."""
    samples_per_shard: int = 100
    """Samples per demo tar shard."""

    def __post_init__(self) -> None:
        check_positive(self, "samples", "samples_per_shard")


@dataclass
class DataConfig:
    """Where samples come from and how the loader reads them."""

    shards: str = ""
    """Shard URLs: a path, glob, brace range (`shard-{000..127}.tar`) or `pipe:` command; empty = demo data."""
    demo: DemoDataConfig = field(default_factory=DemoDataConfig)
    """The built-in demo dataset used when `shards` is empty."""
    workers: int = 2
    """DataLoader worker processes per rank (never changes which samples a rank sees)."""
    max_consecutive_failures: int = 100
    """Stop with an error naming shard and key after this many undecodable samples in a row."""
    sizing: SizingConfig = field(default_factory=SizingConfig)
    """Token grid of each sample (NaViT sizing)."""
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    """Random token dropping."""
    packing: PackingConfig = field(default_factory=PackingConfig)
    """Packing of samples into per-rank micro-batches."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """Epoch order, planning windows and the held-out split."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """Decode-time choices (SpecAugment, caption length) and DataLoader prefetch."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "workers")
        check_positive(self, "max_consecutive_failures")
        if self.shards:
            urls = expand_urls(self.shards)
            missing = [u for u in urls if not is_remote(u) and not os.path.exists(u)]
            if missing or not urls:
                raise ValueError(f"shards: no such shard {missing[0] if missing else self.shards!r}")


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
    """Micro-batches per optimizer step."""
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

    def __post_init__(self) -> None:
        check_positive(self, "log_every")


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
        self._check_patch_sizes()

    def _check_patch_sizes(self) -> None:
        """The encoder's patch embedding must match the patches the data plane cuts."""
        enc, sizing = self.model.encoder, self.data.sizing
        pairs = (("vision_patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch"),
                 ("audio_patch_size", "audio_patch"))
        for model_field, data_field in pairs:
            if getattr(enc, model_field) != getattr(sizing, data_field):
                raise ValueError(
                    f"model.encoder.{model_field}: {getattr(enc, model_field)} differs from "
                    f"data.sizing.{data_field} = {getattr(sizing, data_field)}; they must match")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load and validate a run config (defaults when `path` is None), applying `--set` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return build(RunConfig, data, source)


__all__ = ["ConfigError", "RunConfig", "load_config"]
