"""Loader: planned micro-batches → PackedBatch, against a float64 reference; workers, bad samples, resume, bench."""

from __future__ import annotations

import argparse
import logging
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plait.data.decode_audio import LogMelConfig, decode_audio, spec_augment
from plait.data.decode_image import decode_image
from plait.data.decode_video import decode_video, sample_frame_indices
from plait.data.loader import (SKIP_REASONS, FailureGuard, LoadedStep, LoaderConfig, PlanDataset, PlanLoader,
                               Skip, TooManyFailures, decode_plans, group_id)
from plait.data.media import probe
from plait.data.packing import PackingConfig, PatchedSample, pack_samples
from plait.data.patchify import patchify_audio, patchify_image, patchify_video
from plait.data.preprocess import log_mel_config
from plait.data.plan_types import MicroBatchPlan, SampleRef
from plait.data.rng import keyed_rng
from plait.data.sizing import SizingConfig
from plait.data.tokenizer import encode_captions, train_tokenizer
from plait.trainer.bench import loader as bench
from plait.trainer.model.encoder import unit_float
from plait.trainer.bench.loader import manifest_plans, manifest_rows

from conftest import unpack_stream

SIZING = SizingConfig(patch_size=8, side_distribution="native", max_sample_tokens=256, video_max_frames=4,
                      n_mels=32, audio_patch=8, hop_ms=20.0)
PACKING = PackingConfig(max_tokens=2048, tail_padding="multiple", pad_multiple=8)
CONFIG = LoaderConfig(max_caption_tokens=24)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    captions = [f"a {c} digit {d} moving {w}" for c in ("red", "blue", "green") for d in range(10)
                for w in ("left", "up")]
    return train_tokenizer(captions, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def rows(demo_dir: Path) -> list[dict]:
    return manifest_rows(demo_dir)


@pytest.fixture(scope="module")
def plans(rows) -> list[MicroBatchPlan]:
    return manifest_plans(rows, SIZING, samples_per_step=8, seed=3, drop_rate=0.25)


def dataset(plans, tokenizer, cfg: LoaderConfig = CONFIG) -> PlanDataset:
    return PlanDataset(plans, tokenizer, SIZING, PACKING, cfg)


def reference_sample(ref: SampleRef, tokenizer) -> PatchedSample:
    """The documented recipe in float64, from members read with tarfile (independent of the reader)."""
    with tarfile.open(ref.shard) as tar:
        members = {info.name.split(".", 1)[1]: tar.extractfile(info).read()
                   for info in tar.getmembers() if info.name.split(".", 1)[0] == ref.key}
    p, tp, grid = SIZING.patch_size, SIZING.temporal_patch, ref.grid
    if ref.modality == "image":
        pixels = decode_image(members["jpg"], grid.h * p, grid.w * p).double() / 255
        patches, coords = patchify_image(pixels, grid.h, grid.w, p, tp)
    elif ref.modality == "video":
        info = probe("mp4", members["mp4"])
        indices = sample_frame_indices(info["frames"], info["fps"], grid.frames, "dense", keyed_rng(ref.augment_seed),
                                       start_s=grid.start_s, span_s=grid.span_s, sample_fps=SIZING.video_sample_fps)
        frames = decode_video(members["mp4"], indices, grid.h * p, grid.w * p).double() / 255
        patches, coords = patchify_video(frames, grid.t, grid.h, grid.w, p, tp)
    else:
        mel = decode_audio(members["flac"], LogMelConfig(n_mels=32, hop_length=320), grid.start_s, grid.span_s)
        mel = spec_augment(mel.double(), CONFIG.spec, keyed_rng(ref.augment_seed))
        patches, coords = patchify_audio(mel, grid.h, SIZING.audio_patch)
    caption = members["txt"].decode().strip()
    ids = encode_captions(tokenizer, [caption], CONFIG.max_caption_tokens)[0]
    return PatchedSample(key=ref.key, modality=ref.modality, patches=patches, coords=coords, caption_ids=ids,
                         group=group_id(ref.group), num_kept=grid.num_kept, drop_seed=ref.drop_seed)


def as_model_input(batch):
    """The batch with its patches as the encoder reads them (uint8 pixels as float32 in [0, 1])."""
    streams = {name: replace(s, patches=unit_float(s.patches)) for name, s in batch.streams.items()}
    return replace(batch, streams=streams)


def assert_batches_equal(a, b, atol: float = 0.0) -> None:
    assert a.sample_key == b.sample_key
    assert a.counters == b.counters
    for name in ("modality", "group", "caption_ids", "caption_cu_seqlens"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.streams.keys() == b.streams.keys()
    for name, stream in a.streams.items():
        other = b.streams[name]
        for field in ("coords", "seg", "cu_seqlens"):
            assert torch.equal(getattr(stream, field), getattr(other, field)), (name, field)
        assert stream.max_seqlen == other.max_seqlen and stream.num_padding == other.num_padding
        assert torch.allclose(stream.patches.double(), other.patches.double(), atol=atol, rtol=0), name


def test_batches_match_a_float64_reference(plans, tokenizer):
    data = dataset(plans, tokenizer)
    modalities = set()
    for step, plan in enumerate(plans):
        batch = data[step].batch
        reference = pack_samples([reference_sample(ref, tokenizer) for ref in plan.samples], PACKING)
        reference.counters.update(planned=len(plan.samples), skipped=0, **{f"skipped_{r}": 0 for r in SKIP_REASONS})
        assert batch.streams["vision"].patches.dtype == torch.uint8  # pixels cross the worker boundary as bytes
        assert_batches_equal(as_model_input(batch), reference, atol=1e-6)
        assert batch.counters["dropped"] > 0  # token dropping really happened
        modalities.update(ref.modality for ref in plan.samples)
        for stream in as_model_input(batch).streams.values():
            assert stream.patches.dtype == torch.float32
    assert modalities == {"image", "audio", "video"}


def test_worker_count_never_changes_the_batches(plans, tokenizer):
    data = dataset(plans, tokenizer)
    runs = {workers: list(PlanLoader(data, workers=workers)) for workers in (0, 1, 2)}
    assert len(runs[0]) == len(plans)
    for workers in (1, 2):
        for a, b in zip(runs[0], runs[workers], strict=True):
            assert_batches_equal(a, b)


def corrupted_copy(rows: list[dict], tmp_path: Path, victim: dict, payload: bytes | None = None) -> str:
    """A copy of the victim's shard whose media bytes of `victim` are overwritten (same length)."""
    copy = str(tmp_path / Path(victim["shard"]).name)
    shutil.copy(victim["shard"], copy)
    with open(copy, "r+b") as f:
        f.seek(victim["media_offset"])
        f.write(payload if payload is not None else b"\x00" * victim["media_size"])
    return copy


def with_shard(plans: list[MicroBatchPlan], old: str, new: str) -> list[MicroBatchPlan]:
    return [replace(p, samples=[replace(r, shard=new) if r.shard == old else r for r in p.samples]) for p in plans]


def test_a_bad_sample_mid_batch_is_skipped_counted_and_costs_nothing_else(rows, plans, tokenizer, tmp_path):
    step, position = 1, 3
    victim_ref = plans[step].samples[position]
    victim = next(row for row in rows if row["key"] == victim_ref.key)
    copy = corrupted_copy(rows, tmp_path, victim)
    bad_plans = with_shard(plans, victim["shard"], copy)
    clean = dataset(plans, tokenizer)[step].batch
    loaded = dataset(bad_plans, tokenizer)[step]
    assert [s.key for s in loaded.skips] == [victim["key"]] and loaded.skips[0].shard == copy
    assert loaded.batch.counters["skipped"] == 1 and loaded.batch.counters["skipped_undecodable"] == 1
    assert loaded.batch.counters["planned"] == len(plans[step].samples) == loaded.batch.num_samples + 1
    assert loaded.batch.sample_key == [k for k in clean.sample_key if k != victim["key"]]
    for name, stream in loaded.batch.streams.items():
        rows_bad = unpack_stream(stream, loaded.batch.num_samples)
        rows_clean = unpack_stream(clean.streams[name], clean.num_samples)
        for i, key in enumerate(loaded.batch.sample_key):
            j = clean.sample_key.index(key)
            assert torch.equal(rows_bad[i][0], rows_clean[j][0]) and torch.equal(rows_bad[i][1], rows_clean[j][1])
    counts = decode_plans(bad_plans, tokenizer, SIZING, PACKING, workers=0, cfg=CONFIG)
    assert [c["step"] for c in counts] == [p.step for p in plans]
    assert sum(c["skipped"] for c in counts) == counts[step]["skipped"] == 1
    assert counts[step]["samples"] == counts[step]["planned"] - 1


def test_consecutive_failures_stop_the_run_naming_shard_and_key(rows, plans, tokenizer, tmp_path):
    shard = rows[0]["shard"]
    zeros = tmp_path / "zeros.tar"
    zeros.write_bytes(b"\x00" * Path(shard).stat().st_size)
    refs = [replace(r, shard=str(zeros)) for p in plans for r in p.samples if r.shard == shard]
    bad_plans = [MicroBatchPlan(0, step, 0, refs[2 * step: 2 * step + 2]) for step in range(3)]
    loader = PlanLoader(dataset(bad_plans, tokenizer), workers=0, max_consecutive_failures=3)
    batches = []
    with pytest.raises(TooManyFailures, match=f"3 bad samples in a row.*{refs[2].key}.*zeros.tar"):
        batches.extend(loader)
    assert len(batches) == 1 and batches[0].num_samples == 0 and batches[0].counters["skipped_corrupt"] == 2


def step_with(planned: int, bad: list[int], step: int = 0) -> LoadedStep:
    empty = pack_samples([], PACKING)
    return LoadedStep(step, empty, planned, [Skip(p, "s.tar", f"k{p}", "corrupt") for p in bad])


def test_failure_runs_cross_steps_reset_on_a_good_sample_and_log_rarely(caplog):
    guard = FailureGuard(max_consecutive_failures=4, log_interval_s=3600.0)
    with caplog.at_level(logging.WARNING, logger="plait.data.loader"):
        guard.update(step_with(4, [2, 3]))
        assert guard.run == 2
        guard.update(step_with(0, []))  # an empty step neither extends nor breaks the run
        assert guard.run == 2
        guard.update(step_with(3, [0]))
        assert guard.run == 0  # sample 1 of that step was good
        guard.update(step_with(3, [1, 2]))
        guard.update(step_with(1, [0]))
        assert guard.run == 3
    assert len([r for r in caplog.records if "skipped bad samples" in r.getMessage()]) == 1
    with pytest.raises(TooManyFailures, match="4 bad samples in a row.*k0.*s.tar"):
        guard.update(step_with(2, [0, 1]))


def test_empty_plans_give_empty_batches(tokenizer):
    loaded = dataset([MicroBatchPlan(0, 0, 0, [])], tokenizer)[0]
    assert loaded.batch.num_samples == 0 and not loaded.batch.streams and loaded.skips == []
    assert loaded.batch.counters["planned"] == 0 and loaded.batch.counters["skipped"] == 0


def test_resume_continues_with_the_same_batches(plans, tokenizer):
    data = dataset(plans, tokenizer)
    full = list(PlanLoader(data))
    first = PlanLoader(data)
    iterator = iter(first)
    next(iterator), next(iterator)
    state = first.state_dict()
    assert state == {"next_step": 2, "failure_run": 0}
    resumed = PlanLoader(data, workers=1)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for a, b in zip(rest, full[2:]):
        assert_batches_equal(a, b)


def test_plans_as_a_function_of_the_step(plans, tokenizer):
    by_function = PlanDataset(lambda step: plans[step], tokenizer, SIZING, PACKING, CONFIG, num_steps=2)
    assert len(by_function) == 2
    assert_batches_equal(by_function[1].batch, dataset(plans, tokenizer)[1].batch)
    with pytest.raises(ValueError, match="num_steps"):
        PlanDataset(lambda step: plans[step], tokenizer, SIZING, PACKING)


def test_pipe_shards_give_the_same_batches(plans, tokenizer, tmp_path):
    shard = plans[0].samples[0].shard
    piped = with_shard(plans[:1], shard, f"pipe:cat {shard}")
    cfg = replace(CONFIG, shard_cache=str(tmp_path))
    assert_batches_equal(dataset(piped, tokenizer, cfg)[0].batch, dataset(plans[:1], tokenizer)[0].batch)


def test_log_mel_front_end_comes_from_the_sizing_config():
    mel = log_mel_config(SizingConfig(n_mels=128, hop_ms=20.0, audio_patch=16))
    assert (mel.n_mels, mel.hop_length, mel.sample_rate) == (128, 320, 16_000)
    with pytest.raises(ValueError, match="prefetch_factor"):
        LoaderConfig(prefetch_factor=0)


def test_bench_reports_every_figure(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "bench"), "--synthesize", "8", "--workers", "0",
                              "--samples-per-step", "4", "--rounds", "1"])
    result = bench.run(args)
    counts = [result[f"{m}_samples"] for m in ("image", "video", "audio")]
    assert result["samples"] == sum(counts) == 16 and counts[0] > 8 and min(counts) > 0  # 8 JPEGs + 8 demo samples
    for key in ("plain_decode_samples_per_s", "webdataset_samples_per_s_per_worker", "image_ours_over_webdataset",
                "ours_over_decode_ceiling", *(f"{m}_{figure}" for m in ("image", "video", "audio") for figure in
                                              ("decode_ceiling_samples_per_s", "ours_samples_per_s_per_worker",
                                               "ours_tokens_per_s_per_worker", "ours_over_decode_ceiling"))):
        assert result[key] > 0, key
