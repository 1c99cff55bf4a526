"""Packing: FFD bins on lengths, PackedBatch building/unpacking, patchify — each against a plain reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.data.batch import MODALITIES
from plait.data.packing import (
    PackingConfig,
    PatchedSample,
    pack_lengths,
    pack_samples,
    segment_costs,
)
from plait.data.patchify import frame_indices, grid_coords, patchify_audio, patchify_image, patchify_video
from plait.data.token_drop import kept_mask

from conftest import unpack_stream

# ---------------------------------------------------------------- bin packing on lengths


def _reference_ffd(lengths, max_tokens, cap, window):
    """Plain-Python first-fit decreasing per window, as lists."""
    bin_of, offset = [-1] * len(lengths), 0
    for start in range(0, len(lengths), window):
        items = [i for i in range(start, min(start + window, len(lengths))) if lengths[i] <= max_tokens]
        items.sort(key=lambda i: -lengths[i])
        room, count = [], []
        for i in items:
            j = next((b for b in range(len(room)) if room[b] >= lengths[i] and (not cap or count[b] < cap)), None)
            if j is None:
                room.append(max_tokens)
                count.append(0)
                j = len(room) - 1
            room[j] -= lengths[i]
            count[j] += 1
            bin_of[i] = offset + j
        offset += len(room)
    return bin_of


@settings(max_examples=120, deadline=None)
@given(lengths=st.lists(st.integers(0, 80), max_size=120), cap=st.integers(0, 6), window=st.integers(1, 60))
def test_pack_lengths_matches_reference_and_invariants(lengths, cap, window):
    packing = pack_lengths(np.array(lengths, dtype=np.int64), 64, cap, window)
    assert packing.bin_of.tolist() == _reference_ffd(lengths, 64, cap, window)
    lengths = np.array(lengths, dtype=np.int64)
    assert np.all((packing.bin_of == -1) == (lengths > 64))
    assert np.all(packing.tokens <= 64) and (not cap or np.all(packing.count <= cap))
    assert np.all(packing.count >= 1)
    for b, members in enumerate(packing.members()):
        assert np.all(packing.bin_of[members] == b)
        assert packing.tokens[b] == lengths[members].sum()
        assert packing.cost[b] == pytest.approx(float((lengths[members].astype(float) ** 2).sum()))
        assert len(set(i // window for i in members)) == 1  # look-ahead never crosses a window


def test_pack_lengths_fills_bins_tightly():
    lengths = np.random.default_rng(0).integers(16, 1200, 5000)
    packing = pack_lengths(lengths, 4096, 256, 5000)
    assert 1 - lengths.sum() / (packing.num_bins * 4096) < 0.01


def test_segment_costs():
    assert segment_costs(np.array([10, 12]), np.array([1, 4]), False).tolist() == [100.0, 144.0]
    assert segment_costs(np.array([10, 12]), np.array([1, 4]), True).tolist() == [100.0, 36.0]


# ---------------------------------------------------------------- building and unpacking batches

GRIDS = {
    "image": st.tuples(st.just(1), st.integers(1, 6), st.integers(1, 6)),
    "video": st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    "audio": st.tuples(st.just(1), st.integers(1, 8), st.integers(1, 3)),
}
CHANNELS = {"image": 6, "video": 6, "audio": 4}


@st.composite
def sample_specs(draw):
    modality = draw(st.sampled_from(MODALITIES))
    t, h, w = draw(GRIDS[modality])
    kept = draw(st.integers(0, t * h * w))
    return modality, (t, h, w), kept, draw(st.integers(0, 2**63)), draw(st.integers(0, 5))


def _make_samples(specs):
    samples = []
    for i, (modality, (t, h, w), kept, seed, caption_len) in enumerate(specs):
        n = t * h * w
        patches = torch.rand(n, CHANNELS[modality], dtype=torch.float64)
        patches[:, 0], patches[:, 1] = i, torch.arange(n)  # identity of every token, exact in float64
        samples.append(PatchedSample(key=f"k{i}", modality=modality, patches=patches, coords=grid_coords(t, h, w),
                                     caption_ids=torch.arange(caption_len) + 100 * i, group=i // 2,
                                     num_kept=kept, drop_seed=seed))
    return samples


@settings(max_examples=80, deadline=None)
@given(specs=st.lists(sample_specs(), min_size=0, max_size=10), frame_segments=st.booleans(), slack=st.integers(0, 5))
def test_pack_samples_properties(specs, frame_segments, slack):
    samples = _make_samples(specs)
    stream_tokens = {"vision": 0, "audio": 0}
    for s in samples:
        stream_tokens["audio" if s.modality == "audio" else "vision"] += s.num_kept
    max_tokens = max(stream_tokens.values()) + slack or 1
    batch = pack_samples(samples, PackingConfig(max_tokens=max_tokens, video_frame_segments=frame_segments))

    assert batch.sample_key == [s.key for s in samples]
    assert batch.modality.tolist() == [MODALITIES.index(s.modality) for s in samples]
    assert batch.group.tolist() == [s.group for s in samples]
    caption_lengths = [len(s.caption_ids) for s in samples]
    assert batch.caption_cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(caption_lengths, dtype=int)]).tolist()
    assert torch.equal(batch.caption_ids, torch.cat([s.caption_ids for s in samples]) if samples else batch.caption_ids)
    total_dropped = sum(len(s.patches) - s.num_kept for s in samples)
    assert batch.counters["dropped"] == total_dropped

    for name, stream in batch.streams.items():
        members = [i for i, s in enumerate(samples) if ("audio" if s.modality == "audio" else "vision") == name]
        real = stream.num_tokens
        assert stream.patches.shape[0] == max_tokens  # no sequence exceeds max_tokens; padding only at the tail
        assert torch.all(stream.seg[real:] == -1) and torch.all(stream.seg[:real] >= 0)
        assert real == sum(samples[i].num_kept for i in members) == batch.counters[f"tokens_{name}"]
        unpacked = unpack_stream(stream, len(samples))
        for i, s in enumerate(samples):
            rows = stream.patches[:real][stream.seg[:real] == i]
            if i not in members:
                assert len(rows) == 0 and len(unpacked[i][0]) == 0
                continue
            token_ids = rows[:, 1].long()
            assert torch.all(rows[:, 0] == i) and len(rows) == s.num_kept
            assert torch.all(torch.diff(token_ids) > 0)  # each kept token exactly once, in grid order
            mask = torch.from_numpy(kept_mask(np.array([s.drop_seed], dtype=np.uint64), [len(s.patches)], [s.num_kept]))
            assert torch.equal(token_ids, torch.nonzero(mask).flatten())
            assert torch.equal(stream.coords[:real][stream.seg[:real] == i], s.coords[token_ids])
            assert torch.equal(unpacked[i][0], s.patches[mask]) and torch.equal(unpacked[i][1], s.coords[mask])
        # cu_seqlens are exactly the runs of (sample) or (sample, frame)
        key = stream.seg[:real] * 1000 + (stream.coords[:real, 0] if frame_segments else 0)
        boundaries = [0] + [j for j in range(1, real) if key[j] != key[j - 1]] + [real] if real else [0]
        assert stream.cu_seqlens.dtype == torch.int32 and stream.cu_seqlens.tolist() == boundaries
        assert stream.max_seqlen == (max(np.diff(boundaries)) if real else 0)


def test_tail_padding_modes_and_budget_check():
    samples = _make_samples([("image", (1, 3, 3), 9, 0, 2)])
    multiple = pack_samples(samples, PackingConfig(tail_padding="multiple", pad_multiple=4))
    assert multiple.streams["vision"].patches.shape[0] == 12 and multiple.counters["padding"] == 3
    exact = pack_samples(samples, PackingConfig(tail_padding="multiple"))
    assert exact.streams["vision"].num_padding == 0
    with pytest.raises(ValueError, match="max_tokens"):
        pack_samples(samples, PackingConfig(max_tokens=8))


def test_empty_batch():
    batch = pack_samples([], PackingConfig())
    assert batch.num_samples == 0 and batch.streams == {} and batch.caption_cu_seqlens.tolist() == [0]


# ---------------------------------------------------------------- patchify against float64 loops


def _reference_image(x, h, w, p, tp):
    return torch.stack([x[:, i * p:(i + 1) * p, j * p:(j + 1) * p].unsqueeze(1).expand(3, tp, p, p).reshape(-1)
                        for i in range(h) for j in range(w)])


def _reference_video(x, t, h, w, p, tp):
    return torch.stack([x[k * tp:(k + 1) * tp, :, i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(0, 1).reshape(-1)
                        for k in range(t) for i in range(h) for j in range(w)])


def _reference_audio(mel, tt, p):
    return torch.stack([mel[f * p:(f + 1) * p, k * p:(k + 1) * p].T.reshape(-1)
                        for k in range(tt) for f in range(mel.shape[0] // p)])


def _check_values_and_grads(fast, reference, x):
    """Same values, and the same input gradient for a random linear loss."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = fast(xa), reference(xb)
    assert torch.equal(a, b)
    weight = torch.randn_like(a)
    (a * weight).sum().backward()
    (b * weight).sum().backward()
    assert torch.allclose(xa.grad, xb.grad)


def test_patchify_image_matches_reference():
    h, w, p, tp = 3, 5, 4, 2
    x = torch.randn(3, h * p, w * p, dtype=torch.float64)
    _check_values_and_grads(lambda v: patchify_image(v, h, w, p, tp)[0], lambda v: _reference_image(v, h, w, p, tp), x)
    assert torch.equal(patchify_image(x, h, w, p, tp)[1], grid_coords(1, h, w))


def test_patchify_image_resizes_with_antialias():
    x = torch.randn(3, 37, 53, dtype=torch.float64)
    patches, coords = patchify_image(x, 2, 3, 8, 1)
    resized = F.interpolate(x[None], size=(16, 24), mode="bilinear", antialias=True)[0]
    assert torch.equal(patches, _reference_image(resized, 2, 3, 8, 1)) and coords.shape == (6, 3)
    flat = patchify_image(torch.full((3, 10, 7), 0.25, dtype=torch.float64), 4, 4, 4, 2)[0]
    assert torch.allclose(flat, torch.full_like(flat, 0.25))


def test_patchify_video_matches_reference():
    t, h, w, p, tp = 2, 2, 3, 4, 2
    x = torch.randn(t * tp, 3, h * p, w * p, dtype=torch.float64)
    _check_values_and_grads(lambda v: patchify_video(v, t, h, w, p, tp)[0],
                            lambda v: _reference_video(v, t, h, w, p, tp), x)
    assert torch.equal(patchify_video(x, t, h, w, p, tp)[1], grid_coords(t, h, w))
    assert frame_indices(10, 4).tolist() == [1, 3, 6, 8] and frame_indices(2, 4).tolist() == [0, 0, 1, 1]
    assert patchify_video(x[:3], t, h, w, p, tp)[0].shape == (t * h * w, 3 * tp * p * p)


def test_patchify_audio_matches_reference_and_pads():
    mel = torch.randn(12, 20, dtype=torch.float64)
    _check_values_and_grads(lambda v: patchify_audio(v, 5, 4)[0], lambda v: _reference_audio(v, 5, 4), mel)
    patches, coords = patchify_audio(mel, 7, 4)
    padded = F.pad(mel, (0, 8), value=float(mel.min()))
    assert torch.equal(patches, _reference_audio(padded, 7, 4)) and torch.equal(coords, grid_coords(1, 7, 3))
    with pytest.raises(ValueError, match="multiple"):
        patchify_audio(torch.zeros(10, 8), 1, 4)


def test_benchmark_mix_pads_under_one_percent():
    import argparse

    from plait.trainer.bench import packing as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    result = bench.run(parser.parse_args(["--num-samples", "6000", "--build-sequences", "1", "--drop-rate", "0.2"]))
    assert result["padding_fraction"] <= 0.01 and result["vision_skipped_samples"] == 0
    assert result["padded_batch_padding_fraction"] > 0.2 and result["samples_per_sequence"] > 2
    assert abs(result["dropped_fraction"] - 0.2) < 0.01
    # The training plan's cost-ordered, step-aligned batches keep 8 ranks of 750 samples within 10% here.
    assert result["ranks"] == 8 and 1.0 <= result["slowest_rank_cost_over_mean"] < 1.1
