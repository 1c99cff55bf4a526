"""Negative queues: per modality pair ring buffers of past media/text embeddings.

Each rank enqueues the *gathered* global batch, so every rank holds the same queue without any
extra collective. Entries keep the sample key hash, group and caption id (for masking
duplicates and positives) and the step they were enqueued (for age reporting). Writes are
out of place: the chunked InfoNCE saves the queue for its backward, which must see the queue
as it was in the forward, and a snapshot (to roll back a skipped step) is just references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

ID_FIELDS = ("key", "group", "caption")
"""Columns of the int64 id rows kept with every entry (-1 = none)."""


@dataclass(frozen=True)
class QueueSnapshot:
    """One queue's buffers, pointer and fill count at a moment (buffers by reference: writes replace them)."""

    media: Tensor
    text: Tensor
    ids: Tensor
    step: Tensor
    ptr: int
    count: int


class NegativeQueue(nn.Module):
    """A ring buffer of normalised (media, text) embedding pairs with their ids and enqueue step.

    The write pointer and fill count are host integers (kept in the state dict as extra state),
    so reading the queue never synchronises with the device.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.size = size
        self.ptr = 0
        self.count = 0
        self.register_buffer("media", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("text", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ids", torch.full((size, len(ID_FIELDS)), -1, dtype=torch.long))
        self.register_buffer("step", torch.full((size,), -1, dtype=torch.long))

    def get_extra_state(self) -> dict[str, int]:
        """Pointer and fill count, saved beside the buffers."""
        return {"ptr": self.ptr, "count": self.count}

    def set_extra_state(self, state: dict[str, int]) -> None:
        """Restore pointer and fill count."""
        self.ptr, self.count = int(state["ptr"]), int(state["count"])

    def snapshot(self) -> QueueSnapshot:
        """The queue as it is now, for `restore` (no copy: enqueue replaces the buffers, never writes in place)."""
        return QueueSnapshot(self.media, self.text, self.ids, self.step, self.ptr, self.count)

    def restore(self, snapshot: QueueSnapshot) -> None:
        """Put the queue back as it was at `snapshot`, dropping everything enqueued since."""
        self.media, self.text, self.ids, self.step = snapshot.media, snapshot.text, snapshot.ids, snapshot.step
        self.ptr, self.count = snapshot.ptr, snapshot.count

    def contents(self) -> tuple[Tensor, Tensor, Tensor]:
        """(media [F, D], text [F, D], ids [F, 3]) of the valid entries (they fill rows 0..F-1)."""
        return self.media[: self.count], self.text[: self.count], self.ids[: self.count]

    @torch.no_grad()
    def enqueue(self, media: Tensor, text: Tensor, ids: Tensor, step: int) -> None:
        """Write rows at the ring pointer (wrapping; any row count, only the last `size` kept)."""
        if self.size == 0 or media.shape[0] == 0:
            return
        n = media.shape[0]
        skip = max(n - self.size, 0)
        # As if written one row at a time: rows overwritten within this call are skipped.
        media, text, ids = media[skip:], text[skip:], ids[skip:]
        rows = (self.ptr + skip + torch.arange(n - skip, device=self.media.device)) % self.size
        self.media = self.media.index_put((rows,), media.to(self.media.dtype))
        self.text = self.text.index_put((rows,), text.to(self.text.dtype))
        self.ids = self.ids.index_put((rows,), ids.to(self.ids.device))
        self.step = self.step.index_put((rows,), torch.full_like(rows, step))
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def report(self, step: int) -> dict[str, Tensor]:
        """Fill fraction and age (steps since enqueue) of the valid entries."""
        age = (step - self.step[: self.count]).float()
        fill = torch.tensor(self.count / max(self.size, 1))
        if self.count == 0:
            return {"fill": fill, "age_mean": torch.zeros(()), "age_max": torch.zeros(())}
        return {"fill": fill, "age_mean": age.mean(), "age_max": age.max()}


class QueueBank(nn.Module):
    """One `NegativeQueue` per modality pair, named like the pairs (`image_text`, ...)."""

    def __init__(self, pairs: tuple[str, ...], size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.queues = nn.ModuleDict({pair: NegativeQueue(size, dim, dtype) for pair in pairs})

    def __getitem__(self, pair: str) -> NegativeQueue:
        return self.queues[pair]

    def snapshot(self) -> dict[str, QueueSnapshot]:
        """Every queue as it is now: take one before a step so a skipped step can be undone with `restore`."""
        return {pair: queue.snapshot() for pair, queue in self.queues.items()}

    def restore(self, snapshot: dict[str, QueueSnapshot]) -> None:
        """Undo every enqueue since `snapshot` (a skipped step's non-finite embeddings must not become negatives)."""
        for pair, state in snapshot.items():
            self.queues[pair].restore(state)

    def report(self, step: int) -> dict[str, Tensor]:
        """Flat `queue/<pair>/<stat>` metrics."""
        return {f"queue/{pair}/{k}": v for pair, q in self.queues.items() for k, v in q.report(step).items()}
