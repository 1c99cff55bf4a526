"""The packed batch contract between the data plane and the model (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from plait.data.rng import caption_keys
from plait.ops.segments import cu_to_lengths, index_counts

MODALITIES = ("image", "audio", "video")
"""Media modalities, in the order of their integer codes in `PackedBatch.modality` (media codes)."""

IMAGE, AUDIO, VIDEO = (MODALITIES.index(m) for m in ("image", "audio", "video"))
"""Media codes by name."""

TOKEN_MODALITIES = ("text", *MODALITIES)
"""Token modality codes of encoder, LLM and router tokens (index = code): text, then the media in media-code order."""

TEXT_TOKEN = TOKEN_MODALITIES.index("text")
"""Token modality code of text tokens."""

_MEDIA_TOKEN_OFFSET = TOKEN_MODALITIES.index(MODALITIES[0])


def token_code(media_code: torch.Tensor) -> torch.Tensor:
    """Token modality codes (index into TOKEN_MODALITIES) of media codes (index into MODALITIES)."""
    return media_code + _MEDIA_TOKEN_OFFSET


STREAM_OF_MODALITY = {"image": "vision", "video": "vision", "audio": "audio"}
"""Encoder stream that carries each media modality."""


@dataclass
class PackedStream:
    """One encoder stream (`vision` = images and video, `audio`) packed without inner padding."""

    patches: torch.Tensor
    """[T, C] flattened patch values: uint8 pixels as the loader packs images and video (the encoder makes them
    float32 in [0, 1] on the device) or float values; rows past the last segment are tail padding."""
    coords: torch.Tensor
    """[T, 3] int64 (t, h, w) grid position of each patch."""
    seg: torch.Tensor
    """[T] int64 index of the owning sample in the batch (`PackedBatch` order); -1 for padding."""
    cu_seqlens: torch.Tensor
    """[S+1] int32 attention segment boundaries (a segment is a sample, or one video frame)."""
    max_seqlen: int
    """Length of the longest attention segment."""
    num_padding: int = 0
    """Tail padding rows at the end of `patches`."""
    samples: torch.Tensor | None = None
    """[S] int64 host: batch position of each sample in the stream, ascending (the stream's sample order)."""
    grids: torch.Tensor | None = None
    """[S, 3] int64 host: each sample's full (t, h, w) grid size before token dropping (position tables are
    resized to it)."""
    kept: torch.Tensor | None = None
    """[S] int64 host: tokens of each sample present in the stream (after dropping)."""

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the stream."""
        return int(self.patches.shape[0]) - self.num_padding


@dataclass
class PackedBatch:
    """Everything one rank feeds the model in one micro-batch; may hold zero samples."""

    streams: dict[str, PackedStream]
    """Encoder streams by name (`vision`, `audio`); a stream with no samples is absent."""
    modality: torch.Tensor
    """[N] int64 code of each sample's media modality (index into MODALITIES)."""
    sample_key: list[str]
    """[N] sample keys, for queue de-duplication and leakage checks."""
    group: torch.Tensor
    """[N] int64 group id (samples of one group are positives of each other)."""
    caption_ids: torch.Tensor
    """[Tc] int64 caption token ids of all samples, packed back to back."""
    caption_cu_seqlens: torch.Tensor
    """[N+1] int32 caption boundaries in `caption_ids`."""
    counters: dict[str, int] = field(default_factory=dict)
    """Counts for metrics: tokens, padding, dropped tokens, skipped samples by reason."""

    @property
    def num_samples(self) -> int:
        """Samples in this micro-batch (zero is allowed)."""
        return len(self.sample_key)

    @cached_property
    def caption_key(self) -> torch.Tensor:
        """[N] int64 key of each caption's token sequence (`data.rng.caption_keys`): equal captions, equal keys.

        Computed on the host where the batch is built; `to(device)` carries it over, so the step never reads
        captions back from the device.
        """
        return caption_keys(self.caption_ids, self.caption_cu_seqlens)

    @cached_property
    def host_modality(self) -> torch.Tensor:
        """`modality` in host memory (the losses read the batch's composition from it, never from the device)."""
        return self.modality

    @cached_property
    def caption_max_seqlen(self) -> int:
        """Length of the longest caption (host-side, like `PackedStream.max_seqlen`)."""
        return int(cu_to_lengths(self.caption_cu_seqlens).max()) if self.num_samples else 0

    @cached_property
    def max_media_tokens(self) -> int:
        """Most media tokens of one sample (host-side; the resampler's longest key sequence less its latents)."""
        counts = [int(index_counts(s.seg[: s.num_tokens], self.num_samples).max()) for s in self.streams.values()
                  if s.num_tokens]
        return max(counts, default=0)

    def _map(self, move) -> PackedBatch:
        """The batch with `move` applied to every tensor; host metadata (counters, lengths, keys) carried over."""
        streams = {name: replace(s, patches=move(s.patches), coords=move(s.coords), seg=move(s.seg),
                                 cu_seqlens=move(s.cu_seqlens)) for name, s in self.streams.items()}  # host fields kept
        out = replace(self, streams=streams, modality=move(self.modality), group=move(self.group),
                      caption_ids=move(self.caption_ids), caption_cu_seqlens=move(self.caption_cu_seqlens))
        out.__dict__.update(caption_key=move(self.caption_key), host_modality=self.host_modality,
                            caption_max_seqlen=self.caption_max_seqlen, max_media_tokens=self.max_media_tokens)
        return out

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch with every tensor on `device` (asynchronous from pinned memory); counters stay on the host."""
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        """The batch in page-locked host memory (the DataLoader calls this with `pin_memory=True`)."""
        return self._map(lambda x: x.pin_memory())
