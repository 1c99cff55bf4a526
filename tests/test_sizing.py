"""Sizing: token grids from metadata only, aspect kept, limits respected, distributions as configured."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.data.batch import AUDIO, IMAGE, VIDEO
from plait.data.rng import keyed_seeds, keyed_uniforms
from plait.data.sizing import NUM_DRAWS, SizingConfig, size_sample, size_samples
from plait.data.token_drop import TokenDropConfig

NO_DROP = TokenDropConfig()


def _uniforms(n: int, seed: int = 0) -> np.ndarray:
    return keyed_uniforms(keyed_seeds(seed, [str(i) for i in range(n)]), NUM_DRAWS)


def _images(width, height) -> dict:
    width = np.asarray(width, dtype=np.float64)
    return {"modality": np.full(len(width), "image"), "width": width, "height": np.asarray(height, dtype=np.float64)}


def test_image_grid_keeps_aspect_and_targets_area():
    g = size_sample({"modality": "image", "width": 640, "height": 480}, SizingConfig(), NO_DROP, {448: 1.0}, 0.0,
                    np.zeros(NUM_DRAWS))
    assert (g.modality, g.t, g.h, g.w, g.frames) == (IMAGE, 1, 24, 32, 1)
    assert g.num_kept == g.num_tokens == 768


@settings(max_examples=150, deadline=None)
@given(width=st.integers(1, 5000), height=st.integers(1, 5000), side=st.sampled_from([32, 224, 448, 896]),
       patch=st.sampled_from([4, 8, 16]), upscale=st.booleans())
def test_image_grid_properties(width, height, side, patch, upscale):
    cfg = SizingConfig(patch_size=patch, min_side_patches=1, max_side_patches=48, max_sample_tokens=1024,
                       allow_upscale=upscale)
    g = size_samples(_images([width], [height]), cfg, NO_DROP, {side: 1.0}, 0.0, _uniforms(1))[0]
    assert 1 <= g.h <= 48 and 1 <= g.w <= 48 and g.h * g.w <= 1024
    target = min((side / patch) ** 2, 1024, np.inf if upscale else width * height / patch**2)
    assert g.h * g.w <= max(target * 1.5 + 2 * (g.h + g.w), 1)  # rounding of each side adds at most half a row/column
    clamped = g.h in (1, 48) or g.w in (1, 48)
    if not clamped and g.h > 3 and g.w > 3:
        assert abs(np.log((g.w / g.h) / (width / height))) < 0.6


def test_categorical_resolution_frequencies():
    cfg = SizingConfig(allow_upscale=True)
    n = 20000
    grids = size_samples(_images(np.full(n, 1000.0), np.full(n, 1000.0)), cfg, NO_DROP, {224: 0.7, 448: 0.3}, 0.0,
                         _uniforms(n))
    assert set(np.unique(grids.h)) == {14, 28}
    assert abs((grids.h == 14).mean() - 0.7) < 0.015


def test_truncated_normal_is_biased_low_and_bounded():
    cfg = SizingConfig(side_distribution="truncated_normal", allow_upscale=True, min_side_patches=4,
                       max_side_patches=40, max_sample_tokens=10**6)
    n = 5000
    grids = size_samples(_images(np.full(n, 800.0), np.full(n, 800.0)), cfg, NO_DROP, None, 0.0, _uniforms(n))
    assert grids.h.min() >= 4 and grids.h.max() <= 40
    assert np.median(grids.h) < 22 and grids.h.max() > 35


def test_native_side_and_no_upscale():
    cfg = SizingConfig(side_distribution="native", patch_size=8)
    g = size_samples(_images([64], [32]), cfg, NO_DROP, None, 0.0, _uniforms(1))[0]
    assert (g.h, g.w) == (4, 8)
    small = size_samples(_images([64], [64]), SizingConfig(patch_size=8), NO_DROP, {256: 1.0}, 0.0, _uniforms(1))[0]
    assert (small.h, small.w) == (8, 8)


def test_video_grid_and_token_cap():
    cfg = SizingConfig(video_max_frames=32, temporal_patch=2, video_side_px=224, max_sample_tokens=2048)
    meta = {"modality": "video", "width": 320, "height": 320, "frames": 90, "fps": 30.0, "duration": 3.0}
    g = size_sample(meta, cfg, NO_DROP, {224: 1.0}, 0.0, np.full(NUM_DRAWS, 0.5))
    assert g.modality == VIDEO and (g.h, g.w) == (14, 14)
    assert g.t == 2048 // 196 and g.frames == 2 * g.t and g.num_tokens <= 2048
    assert g.span_s == pytest.approx(g.frames / 30.0)
    assert 0.0 <= g.start_s <= 3.0 - g.span_s
    short = size_sample({**meta, "frames": 5, "duration": None}, cfg, NO_DROP, None, 0.0, np.zeros(NUM_DRAWS))
    assert short.t == 2 and short.frames == 4


def test_audio_grid_and_crop():
    cfg = SizingConfig(audio_patch=16, n_mels=80, hop_ms=10.0, max_audio_seconds=30.0)
    g = size_sample({"modality": "audio", "duration": 12.3}, cfg, NO_DROP, None, 0.0, np.full(NUM_DRAWS, 0.5))
    assert (g.modality, g.t, g.h, g.w, g.frames) == (AUDIO, 1, 1230 // 16, 5, 0)
    long = size_sample({"modality": "audio", "duration": 60.0}, cfg, NO_DROP, None, 0.0, np.full(NUM_DRAWS, 0.999))
    assert long.h == 3000 // 16 and long.span_s <= 30.0
    assert 0.0 <= long.start_s <= 60.0 - long.span_s and long.start_s > 29.0


def test_single_and_vectorised_paths_agree():
    rows = [{"modality": "image", "width": 300, "height": 700}, {"modality": "audio", "duration": 4.5},
            {"modality": "video", "width": 640, "height": 360, "frames": 40, "fps": 25.0, "duration": 1.6}]
    u = _uniforms(len(rows), seed=3)
    drop = TokenDropConfig(distribution="beta")
    columns = {name: np.array([r.get(name, np.nan) for r in rows], dtype=np.float64)
               for name in ("width", "height", "frames", "fps", "duration")}
    columns["modality"] = np.array([r["modality"] for r in rows])
    grids = size_samples(columns, SizingConfig(), drop, {224: 0.5, 448: 0.5}, 0.3, u)
    for i, row in enumerate(rows):
        assert grids[i] == size_sample(row, SizingConfig(), drop, {224: 0.5, 448: 0.5}, 0.3, u[i])


def test_drop_rate_reduces_kept_tokens():
    grids = size_samples(_images([640], [640]), SizingConfig(), NO_DROP, {224: 1.0}, 0.25, _uniforms(1))
    assert grids.num_tokens[0] == 196 and grids.num_kept[0] == 147


def test_config_and_metadata_validation():
    with pytest.raises(ValueError, match="audio_patch"):
        SizingConfig(audio_patch=7)
    with pytest.raises(ValueError, match="max_side_patches"):
        SizingConfig(min_side_patches=8, max_side_patches=4)
    with pytest.raises(ValueError, match="width"):
        size_sample({"modality": "image", "width": 10}, SizingConfig(), NO_DROP, {224: 1.0}, 0.0, np.zeros(NUM_DRAWS))
    with pytest.raises(ValueError, match="modality"):
        size_sample({"modality": "text"}, SizingConfig(), NO_DROP, {224: 1.0}, 0.0, np.zeros(NUM_DRAWS))
    with pytest.raises(ValueError, match="resolution"):
        size_sample({"modality": "image", "width": 9, "height": 9}, SizingConfig(), NO_DROP, {}, 0.0, np.zeros(NUM_DRAWS))
