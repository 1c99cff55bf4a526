"""Retrieval R@k against a float64 per-query reference; caption keys compare token sequences exactly."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from plait.data.rng import caption_keys
from plait.trainer.evaluate import KS, flat_metrics, recall_at_k, retrieval_metrics, summary


def _pack(captions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in captions])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    return torch.tensor([t for c in captions for t in c], dtype=torch.long), cu



def reference_recall(queries: torch.Tensor, keys: torch.Tensor, query_captions: list, key_captions: list,
                     ks: Sequence[int] = KS) -> dict[str, float]:
    """Float64 per-query loop version of `recall_at_k`."""
    hits = {k: 0 for k in ks}
    for i in range(queries.shape[0]):
        sims = [float(queries[i].double() @ keys[j].double()) for j in range(keys.shape[0])]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])
        for k in ks:
            hits[k] += any(key_captions[j] == query_captions[i] for j in order[:k])
    return {f"R@{k}": hits[k] / queries.shape[0] for k in ks}


def test_caption_keys_are_equal_exactly_for_equal_token_sequences():
    captions = [[5, 6, 7], [5, 6], [5, 6, 7], [7, 6, 5], [0], [5, 6, 7, 0], [2047] * 40, [2047] * 40, [0, 0]]
    keys = caption_keys(*_pack(captions))
    for i, a in enumerate(captions):
        for j, b in enumerate(captions):
            assert (keys[i] == keys[j]).item() == (a == b), (a, b)
    assert caption_keys(*_pack([])).shape == (0,)


def _normalised(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("n", [3, 17, 40])
def test_recall_matches_the_float64_reference(n):
    gen = torch.Generator().manual_seed(n)
    media, text = _normalised(n, 8, gen), _normalised(n, 8, gen)
    text = torch.nn.functional.normalize(text + 0.8 * media, dim=-1)
    captions = torch.randint(0, max(n // 3, 1), (n,), generator=gen)
    got = recall_at_k(media.float(), text.float(), captions, captions)
    want = reference_recall(media, text, captions.tolist(), captions.tolist())
    assert got == pytest.approx(want, abs=1e-12)
    back = recall_at_k(text.float(), media.float(), captions, captions)
    assert back == pytest.approx(reference_recall(text, media, captions.tolist(), captions.tolist()), abs=1e-12)


def test_retrieval_per_modality_and_duplicate_captions_count_as_hits():
    gen = torch.Generator().manual_seed(0)
    media = _normalised(6, 4, gen).float()
    # Image texts are exact copies (R@1 = 1); audio texts point at the other audio sample, which has the same caption.
    text = media.clone()
    text[3], text[4] = media[4], media[3]
    modality = torch.tensor([0, 0, 0, 1, 1, 2])
    captions = torch.tensor([10, 11, 12, 20, 20, 30])
    metrics = retrieval_metrics(media, text, captions, modality)
    assert set(metrics) == {"image", "audio", "video"}
    assert metrics["image"]["media_to_text"]["R@1"] == 1.0
    assert metrics["audio"]["media_to_text"]["R@1"] == 1.0 and metrics["audio"]["text_to_media"]["R@1"] == 1.0
    captions[4] = 21  # now the swapped audio pair is a miss at R@1 but a hit at R@5 (only two candidates)
    metrics = retrieval_metrics(media, text, captions, modality)
    assert metrics["audio"]["media_to_text"]["R@1"] == 0.0 and metrics["audio"]["media_to_text"]["R@5"] == 1.0
    assert summary(metrics)["audio"] == metrics["audio"]["media_to_text"]
    assert all("@" not in name for name in flat_metrics(metrics))
