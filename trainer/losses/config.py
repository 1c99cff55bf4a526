"""Configuration of the training objectives (the `loss:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.data.checks import check_at_least, check_positive

WEIGHT_NAMES = ("contrastive", "caption", "balance", "z", "entropy_local", "entropy_global")
"""Loss components that carry a weight in the total."""


@dataclass
class ContrastiveConfig:
    """Symmetric InfoNCE between media and text embeddings, one loss per modality pair."""

    init_temperature: float = 0.07
    """Initial softmax temperature; the learnable `logit_scale` starts at log(1 / this)."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit_scale), applied in the forward (never in place)."""
    learn_temperature: bool = True
    """Train the temperature (otherwise it stays at its initial value)."""
    label_smoothing: float = 0.0
    """Target mass spread uniformly over all valid candidates."""
    multi_positive: bool = True
    """Samples sharing a group or caption id are extra positives; when False they are masked instead."""
    chunk_size: int = 4096
    """Candidates scored per chunk by the chunked InfoNCE (bounds memory to [B, chunk_size])."""

    def __post_init__(self) -> None:
        check_positive(self, "init_temperature")
        if self.max_logit_scale < 1.0 / self.init_temperature:
            raise ValueError(f"max_logit_scale: {self.max_logit_scale} is below 1 / init_temperature")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        check_at_least(self, 1, "chunk_size")


@dataclass
class QueueConfig:
    """Per modality pair ring buffers of past embeddings used as extra negatives."""

    size: int = 65536
    """Entries per modality pair (0 disables the queues)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of queued embeddings."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "size")


@dataclass
class HardNegativeConfig:
    """Negative sampling: a mix of random and hardest (top-k similar) negatives per query."""

    num_negatives: int = 0
    """Negatives kept per query from batch + queue; 0 keeps every negative (no sampling)."""
    hard_fraction: float = 0.3
    """Share of the kept negatives that are the hardest; the curriculum overrides it per step."""
    seed: int = 0
    """Seed of the random negatives (combined with step, rank, pair and direction)."""

    def __post_init__(self) -> None:
        check_at_least(self, 0, "num_negatives")
        if not 0.0 <= self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction: must be in [0, 1], got {self.hard_fraction}")


@dataclass
class CaptionConfig:
    """Token cross-entropy on caption tokens (CoCa-style captioning term)."""

    label_smoothing: float = 0.0
    """Label smoothing of the token cross-entropy."""
    ignore_index: int = -100
    """Target value of positions that are not caption tokens."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")


@dataclass
class BalanceConfig:
    """MoME router regularisers, computed per layer over the global batch."""

    entropy_threshold: float = 1.0
    """LIMoE global-entropy threshold as a fraction of log(num_experts); below it the term is active."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.entropy_threshold <= 1.0:
            raise ValueError(f"entropy_threshold: must be in [0, 1], got {self.entropy_threshold}")


@dataclass
class LossConfig:
    """All objectives and the weights of their sum (the curriculum may override weights per step)."""

    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """The contrastive (InfoNCE) loss."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    """Negative queues."""
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    """Random/hard negative sampling."""
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    """The captioning loss."""
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    """Router balance, z-loss and entropy terms."""
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "contrastive": 1.0,
            "caption": 2.0,
            "balance": 0.01,
            "z": 0.001,
            "entropy_local": 0.0,
            "entropy_global": 0.0,
        }
    )
    """Weight of each component in the total: contrastive, caption, balance, z, entropy_local/global."""

    def __post_init__(self) -> None:
        check_weights(self.weights)


def check_weights(weights: dict[str, float]) -> None:
    """Raise ValueError unless every weight names a known component and is >= 0."""
    for name, value in weights.items():
        if name not in WEIGHT_NAMES:
            raise ValueError(f"weights: unknown component {name!r}, expected one of {', '.join(WEIGHT_NAMES)}")
        if value < 0:
            raise ValueError(f"weights.{name}: must be >= 0, got {value}")
