"""What the train loop needs from the data plane (`PlannedBatches` is the product's; tests bring stand-ins).

The loop asks for micro-batch `micro` of optimizer step `step`; the real loader (`plait.data.loader`) keeps
its own position and returns its next planned micro-batch, restoring that position from `state_dict`.
"""

from __future__ import annotations

from typing import Any, Protocol

from plait.data.batch import PackedBatch


class BatchSource(Protocol):
    """Per-rank training micro-batches and held-out batches, with checkpointable position."""

    def batch(self, step: int, micro: int) -> PackedBatch:
        """Micro-batch `micro` of optimizer step `step` for this rank (may hold zero samples)."""

    def eval_batches(self) -> list[PackedBatch]:
        """This rank's held-out batches (the same count on every rank: ZeRO-3 ranks run forwards together)."""

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`."""
