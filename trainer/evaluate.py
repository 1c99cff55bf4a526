"""Retrieval evaluation: R@1/5/10 per modality, media->text and text->media, on held-out samples.

A retrieved item is a hit when its caption equals the query's own caption (so duplicate captions, e.g.
"a 7 moving to the left" for two videos, all count). Captions are compared through 62-bit keys of their
token ids (`data.rng.caption_keys`), computed for a whole packed batch at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from plait.data.batch import MODALITIES

KS = (1, 5, 10)
"""Cut-offs reported as R@k."""


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, query_captions: torch.Tensor,
                key_captions: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Fraction of queries with a same-caption key among their top-k by cosine similarity (inputs normalised)."""
    sims = queries.float() @ keys.float().T
    top = sims.topk(min(max(ks), keys.shape[0]), dim=1).indices
    hits = key_captions[top] == query_captions[:, None]
    return {f"R@{k}": float(hits[:, :k].any(1).double().mean()) for k in ks}


def retrieval_metrics(media: torch.Tensor, text: torch.Tensor, captions: torch.Tensor, modality: torch.Tensor,
                      ks: Sequence[int] = KS) -> dict[str, dict[str, dict[str, float]]]:
    """{modality: {"media_to_text": {R@k}, "text_to_media": {R@k}}} over the samples of each modality."""
    out = {}
    for code, name in enumerate(MODALITIES):
        rows = modality == code
        if not bool(rows.any()):
            continue
        m, t, c = media[rows], text[rows], captions[rows]
        out[name] = {"media_to_text": recall_at_k(m, t, c, c, ks), "text_to_media": recall_at_k(t, m, c, c, ks)}
    return out


def summary(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{modality: {R@k}} media→text, for the final JSON line (both directions go to tracking)."""
    return {name: dict(d["media_to_text"]) for name, d in metrics.items()}


def flat_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """`eval/<modality>/<direction>/R_at_k` -> value, for tracking (MLflow names may not contain '@')."""
    return {f"eval/{m}/{d}/{k.replace('@', '_at_')}": v
            for m, dirs in metrics.items() for d, ks in dirs.items() for k, v in ks.items()}


def gather_embeddings(parts: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                      ) -> tuple[torch.Tensor, ...]:
    """Concatenate this rank's (media, text, caption key, modality) batches and all-gather them over ranks."""
    parts = list(parts)
    local = [torch.cat([p[i] for p in parts]).cpu() if parts else None for i in range(4)]
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return tuple(local)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return tuple(torch.cat([g[i] for g in gathered if g[i] is not None]) for i in range(4))
