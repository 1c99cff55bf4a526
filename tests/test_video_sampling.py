"""Video frames by config (`data.sizing.video_sampling`): TSN, uniform and dense on the demo's real mp4s, keyed by
sample (the same frames in any worker and on any rerun), centred for held-out batches and at inference."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.data.decode_video import decode_video
from plait.data.loader import PlanDataset, PlanLoader
from plait.data.media import probe
from plait.data.packing import PackingConfig
from plait.data.patchify import patchify_video
from plait.data.preprocess import SampleDecoder
from plait.data.sizing import SampleGrid, SizingConfig, size_sample
from plait.data.token_drop import TokenDropConfig
from plait.data.tokenizer import train_tokenizer
from plait.trainer.bench.loader import manifest_plans, manifest_rows
from plait.trainer.config import ConfigError, load_config

from conftest import unpack_stream

BASE = SizingConfig(patch_size=8, side_distribution="native", max_sample_tokens=512, video_max_frames=8,
                    video_side_px=32)
SEEDS = range(24)


def sizing(sampling: str, **fields) -> SizingConfig:
    return replace(BASE, video_sampling=sampling, **fields)


@pytest.fixture(scope="module")
def clips(demo_dir: Path) -> list[tuple[bytes, dict]]:
    """(mp4 bytes, header) of the demo's videos with at least 16 frames, read with tarfile."""
    found = []
    for shard in sorted(demo_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                if info.name.endswith(".mp4"):
                    data = tar.extractfile(info).read()
                    header = probe("mp4", data)
                    if header["frames"] >= 16:
                        found.append((data, header))
    assert len(found) >= 3
    return found


def grid_of(header: dict, cfg: SizingConfig, crop: float = 0.5) -> SampleGrid:
    meta = {"modality": "video", "width": header["width"], "height": header["height"], "frames": header["frames"],
            "fps": header["fps"], "duration": header["duration"]}
    return size_sample(meta, cfg, TokenDropConfig(), None, 0.0, np.array([0.5, 0.5, crop, 0.5]))


def chosen_frames(cfg: SizingConfig, header: dict, grid: SampleGrid, seed: int | None) -> list[int]:
    """Native frame numbers the decoder takes, read back from a clip whose frame i has every pixel equal to i."""
    n, p = int(header["frames"]), cfg.patch_size
    numbered = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, grid.h * p, grid.w * p, 3))
    patches, coords = SampleDecoder(cfg).decoded("video", (numbered, header["fps"]), grid, seed)
    values = patches.to(torch.int64)  # the decoder's uint8 pixels
    frames = []
    for t in range(grid.t):
        unique, counts = torch.unique(values[coords[:, 0] == t], return_counts=True)
        frames += np.repeat(unique.numpy(), (counts * cfg.temporal_patch // counts.sum()).numpy()).tolist()
    return frames


def centres(n: int, wanted: int) -> list[int]:
    return [int((i + 0.5) * n / wanted) for i in range(wanted)]


def test_uniform_and_held_out_tsn_take_the_segment_centres_of_the_whole_clip(clips) -> None:
    for _, header in clips:
        for cfg, seed in ((sizing("uniform"), 7), (sizing("uniform"), None), (sizing("tsn"), None)):
            grid = grid_of(header, cfg)
            assert (grid.start_s, grid.span_s) == (0.0, 0.0)
            assert chosen_frames(cfg, header, grid, seed) == centres(int(header["frames"]), grid.frames)


def test_tsn_takes_one_keyed_frame_in_each_segment(clips) -> None:
    cfg = sizing("tsn")
    for _, header in clips:
        n, grid = int(header["frames"]), grid_of(header, cfg)
        seen = set()
        for seed in SEEDS:
            frames = chosen_frames(cfg, header, grid, seed)
            assert frames == chosen_frames(cfg, header, grid, seed)
            for i, frame in enumerate(frames):
                assert i * n <= (frame + 1) * grid.frames and frame * grid.frames < (i + 1) * n
            seen.add(tuple(frames))
        assert len(seen) > len(SEEDS) // 2
        zero = sizing("tsn", video_jitter=0.0)
        assert all(chosen_frames(zero, header, grid, seed) == centres(n, grid.frames) for seed in SEEDS)


def test_dense_takes_consecutive_frames_from_a_window_the_jitter_scales(clips) -> None:
    for _, header in clips:
        fps = float(header["fps"])
        for crop in (0.0, 0.3, 1.0):
            cfg = sizing("dense")
            grid = grid_of(header, cfg, crop)
            frames = chosen_frames(cfg, header, grid, 3)
            assert np.all(np.diff(frames) == 1) and len(frames) == grid.frames
            slack = header["duration"] - grid.span_s
            assert slack > 0 and grid.span_s == pytest.approx(grid.frames / fps)
            assert grid.start_s == pytest.approx(crop * slack)
            assert grid_of(header, sizing("dense", video_jitter=0.0), crop).start_s == pytest.approx(slack / 2)
            assert grid_of(header, sizing("dense", video_jitter=0.5), crop).start_s == pytest.approx(
                (0.25 + crop / 2) * slack)


@pytest.mark.parametrize("sampling", ["tsn", "uniform", "dense"])
def test_the_real_mp4_gives_exactly_the_chosen_frames(clips, sampling: str) -> None:
    cfg = sizing(sampling)
    p, tp = cfg.patch_size, cfg.temporal_patch
    for data, header in clips:
        grid = grid_of(header, cfg)
        every = decode_video(data, np.arange(int(header["frames"])), grid.h * p, grid.w * p)
        for seed in (1, None):
            patches, coords = SampleDecoder(cfg).encoded("video", "mp4", data, grid, seed)
            frames = every[chosen_frames(cfg, header, grid, seed)]
            reference, reference_coords = patchify_video(frames.double() / 255, grid.t, grid.h, grid.w, p, tp)
            assert torch.equal(coords, reference_coords)
            torch.testing.assert_close(patches.double() / 255, reference, rtol=0, atol=1e-7)


def _video_rows(batch, plan) -> list[torch.Tensor]:
    per_sample = unpack_stream(batch.streams["vision"], len(plan.samples))
    return [patches for (patches, _), ref in zip(per_sample, plan.samples, strict=True) if ref.modality == "video"]


def test_frames_are_keyed_by_sample_whatever_the_workers_and_centred_when_held_out(demo_dir: Path,
                                                                                    tmp_path: Path) -> None:
    cfg = sizing("tsn")
    tokenizer = train_tokenizer([f"a digit {d} moving" for d in range(10)], 300, tmp_path)
    plans = manifest_plans(manifest_rows(demo_dir), cfg, samples_per_step=10, seed=5)
    packing = PackingConfig(max_tokens=4096)
    train = PlanDataset(plans, tokenizer, cfg, packing)
    runs = [list(PlanLoader(train, workers=workers)) for workers in (0, 2)]
    reseeded = [replace(plan, samples=[replace(ref, augment_seed=ref.augment_seed + 1) for ref in plan.samples])
                for plan in plans]
    held_out = [list(PlanLoader(PlanDataset(p, tokenizer, cfg, packing, augment=False), workers=0))
                for p in (plans, reseeded)]
    other_seed = list(PlanLoader(PlanDataset(reseeded, tokenizer, cfg, packing), workers=0))
    changed = 0
    for step, plan in enumerate(plans):
        videos = _video_rows(runs[0][step], plan)
        assert all(torch.equal(a, b) for a, b in zip(videos, _video_rows(runs[1][step], plan), strict=True))
        assert all(torch.equal(a, b) for a, b in zip(_video_rows(held_out[0][step], plan),
                                                     _video_rows(held_out[1][step], plan), strict=True))
        changed += sum(not torch.equal(a, b) for a, b in zip(videos, _video_rows(other_seed[step], plan)))
    assert sum(ref.modality == "video" for plan in plans for ref in plan.samples) >= 10 and changed > 0


def test_bad_sampling_fields_stop_at_config_load(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  sizing:\n    video_sampling: tsm\n")
    with pytest.raises(ConfigError, match="data.sizing.video_sampling"):
        load_config(config)
    config.write_text("data:\n  sizing:\n    video_jitter: 1.5\n")
    with pytest.raises(ConfigError, match=r"data.sizing.video_jitter.*\[0, 1\]"):
        load_config(config)
