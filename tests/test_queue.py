"""Negative queues: ring writes of any size, duplicate masking, reports, state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from plait.data.rng import key_ids
from plait.trainer.losses.config import ContrastiveConfig, HardNegativeConfig, LossConfig, QueueConfig
from plait.trainer.losses.contrastive import ContrastiveLoss, gather_batch
from plait.trainer.losses.objective import Objective, ObjectiveInputs
from plait.trainer.losses.queue import NegativeQueue, QueueBank

F64 = torch.float64


def rows(start: int, n: int, d: int = 3):
    """n distinguishable rows (value = global row number) with ids (row, row // 2, -1)."""
    values = torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, d)
    ids = torch.stack([torch.arange(start, start + n), torch.arange(start, start + n) // 2, torch.full((n,), -1)], 1)
    return values, -values, ids


@pytest.mark.parametrize("sizes", [[3, 4, 12], [7, 7], [1, 1, 1, 1, 1, 1], [2, 0, 5]])
def test_ring_buffer_matches_reference_for_any_batch_size(sizes):
    queue = NegativeQueue(size=5, dim=3)
    written: dict[int, int] = {}
    total = 0
    for step, n in enumerate(sizes):
        queue.enqueue(*rows(total, n), step=step)
        for g in range(total, total + n):
            written[g % 5] = g
        total += n
    filled = min(total, 5)
    assert queue.count == filled and queue.ptr == total % 5
    media, text, ids = queue.contents()
    assert media.shape == (filled, 3)
    for slot, g in written.items():
        assert media[slot, 0].item() == g and text[slot, 0].item() == -g and ids[slot, 0].item() == g


def test_restore_undoes_every_enqueue_since_the_snapshot():
    bank = QueueBank(("image_text", "audio_text"), size=5, dim=3)
    bank["image_text"].enqueue(*rows(0, 3), step=0)
    expected_media = torch.tensor([[0.0] * 3, [1.0] * 3, [2.0] * 3, [0.0] * 3, [0.0] * 3])
    expected_ids = torch.tensor([[0, 0, -1], [1, 0, -1], [2, 1, -1], [-1, -1, -1], [-1, -1, -1]])
    expected_step = torch.tensor([0, 0, 0, -1, -1])
    snapshot = bank.snapshot()
    bank["image_text"].enqueue(*rows(3, 4), step=1)  # wraps over slots 0 and 1
    bank["audio_text"].enqueue(*rows(10, 2), step=1)
    bank.restore(snapshot)
    image, audio = bank["image_text"], bank["audio_text"]
    assert (image.ptr, image.count) == (3, 3) and (audio.ptr, audio.count) == (0, 0)
    assert torch.equal(image.media, expected_media) and torch.equal(image.text, -expected_media)
    assert torch.equal(image.ids, expected_ids) and torch.equal(image.step, expected_step)
    assert torch.equal(audio.media, torch.zeros(5, 3)) and torch.equal(audio.step, torch.full((5,), -1))
    image.enqueue(*rows(20, 1), step=2)  # the restored queue keeps writing at its pointer
    assert image.media[3, 0].item() == 20.0 and image.count == 4
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    loaded = QueueBank(("image_text", "audio_text"), size=5, dim=3)
    loaded.load_state_dict(torch.load(buffer, weights_only=False))
    assert (loaded["image_text"].ptr, loaded["image_text"].count) == (4, 4)
    assert torch.equal(loaded["image_text"].media, image.media) and torch.equal(loaded["image_text"].ids, image.ids)


def test_report_fill_and_age():
    queue = NegativeQueue(size=4, dim=2)
    assert queue.report(0)["fill"].item() == 0.0
    queue.enqueue(torch.ones(3, 2), torch.ones(3, 2), torch.zeros(3, 3, dtype=torch.long), step=2)
    queue.enqueue(torch.ones(2, 2), torch.ones(2, 2), torch.zeros(2, 3, dtype=torch.long), step=5)
    report = queue.report(7)
    assert report["fill"].item() == 1.0
    # Slots: step 5 (wrapped over slot 0), 2, 2, 5 -> ages 2, 5, 5, 2.
    assert report["age_mean"].item() == pytest.approx(3.5) and report["age_max"].item() == 5.0


def contrastive_inputs(seed: int, n: int = 4, d: int = 5, one_group: bool = False):
    g = torch.Generator().manual_seed(seed)
    media = torch.randn(n, d, generator=g, dtype=F64)
    text = torch.randn(n, d, generator=g, dtype=F64)
    keys = [f"s{i}" for i in range(n)]
    group = torch.full((n,), 102) if one_group else torch.arange(n) + 100
    ids = torch.stack([key_ids(keys), group, torch.full((n,), -1)], 1)
    return media, text, torch.zeros(n, dtype=torch.long), ids


def loss_with_queue(entries, multi_positive=True, one_group=False):
    """Image-text loss of a fixed batch against a queue holding `entries` (media, text, ids)."""
    media, text, modality, ids = contrastive_inputs(0, one_group=one_group)
    loss_fn = ContrastiveLoss(ContrastiveConfig(multi_positive=multi_positive), HardNegativeConfig()).double()
    bank = QueueBank(("image_text", "audio_text", "video_text"), size=8, dim=5, dtype=F64)
    if entries is not None:
        bank["image_text"].enqueue(*entries, step=0)
    return loss_fn(gather_batch(media, text, modality, ids), bank).loss


def test_queue_entry_with_a_current_key_is_never_a_negative():
    media, text, _, ids = contrastive_inputs(0)
    g = torch.Generator().manual_seed(9)
    others = torch.randn(3, 5, generator=g, dtype=F64)
    other_ids = torch.tensor([[11, -1, -1], [12, -1, -1], [13, -1, -1]])
    base = loss_with_queue((others, others, other_ids))
    # The same sample (key s1) seen earlier, with a stale embedding: must be masked out.
    stale = torch.nn.functional.normalize(torch.randn(1, 5, generator=g, dtype=F64), dim=-1)
    dup_ids = torch.tensor([[int(ids[1, 0]), -1, -1]])
    both = torch.cat([others, stale])
    with_dup = loss_with_queue((both, both, torch.cat([other_ids, dup_ids])))
    torch.testing.assert_close(with_dup, base, rtol=1e-12, atol=1e-12)
    as_negative = loss_with_queue((both, both, torch.cat([other_ids, torch.tensor([[99, -1, -1]])])))
    assert not torch.allclose(as_negative, base)


def test_queue_entry_sharing_a_group_is_masked_or_positive():
    g = torch.Generator().manual_seed(10)
    others = torch.randn(2, 5, generator=g, dtype=F64)
    plain = torch.tensor([[21, -1, -1], [22, -1, -1]])
    group_mate = torch.tensor([[21, -1, -1], [22, 102, -1]])  # shares the batch's group 102
    masked = loss_with_queue((others, others, group_mate), multi_positive=False, one_group=True)
    removed = loss_with_queue((others[:1], others[:1], plain[:1]), multi_positive=False, one_group=True)
    torch.testing.assert_close(masked, removed, rtol=1e-12, atol=1e-12)
    positive = loss_with_queue((others, others, group_mate), multi_positive=True, one_group=True)
    negative = loss_with_queue((others, others, plain), multi_positive=True, one_group=True)
    assert not torch.allclose(positive, negative) and not torch.allclose(positive, masked)


def objective_inputs(seed: int, n: int = 5, d: int = 4) -> ObjectiveInputs:
    g = torch.Generator().manual_seed(seed)
    return ObjectiveInputs(
        media_embeds=torch.randn(n, d, generator=g),
        text_embeds=torch.randn(n, d, generator=g),
        modality=torch.tensor([0, 1, 2, 0, 1])[:n],
        sample_key=[f"{seed}-{i}" for i in range(n)],
        group=torch.arange(n) + 10 * seed,
    )


def test_batch_is_enqueued_after_its_own_loss():
    objective = Objective(LossConfig(queue=QueueConfig(size=64)), embed_dim=4)
    no_queue = Objective(LossConfig(queue=QueueConfig(size=0)), embed_dim=4)
    first = objective(objective_inputs(1), step=0).components["loss/contrastive"]
    assert torch.equal(first, no_queue(objective_inputs(1), step=0).components["loss/contrastive"])
    # Same samples again: every queue entry shares a key with a current positive, so all are masked.
    again = objective(objective_inputs(1), step=1).components["loss/contrastive"]
    torch.testing.assert_close(again, first)
    objective(objective_inputs(2), step=2)
    assert objective.queues["image_text"].count == 6


def test_queue_and_temperature_survive_a_state_dict_round_trip():
    config = LossConfig(queue=QueueConfig(size=6))
    objective = Objective(config, embed_dim=4)
    for step in range(3):
        objective(objective_inputs(step + 1), step=step)
    with torch.no_grad():
        objective.contrastive.logit_scale.add_(0.25)
    buffer = io.BytesIO()
    torch.save(objective.state_dict(), buffer)
    buffer.seek(0)
    restored = Objective(config, embed_dim=4)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(restored.contrastive.logit_scale, objective.contrastive.logit_scale)
    for pair in ("image_text", "audio_text", "video_text"):
        a, b = objective.queues[pair], restored.queues[pair]
        assert (a.ptr, a.count) == (b.ptr, b.count)
        for name in ("media", "text", "ids", "step"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    next_a = objective(objective_inputs(9), step=3).loss
    next_b = restored(objective_inputs(9), step=3).loss
    assert torch.equal(next_a, next_b)
