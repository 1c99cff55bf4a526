"""Token grid of each sample from its metadata alone, so the plan can count tokens without decoding.

Images keep their aspect ratio: a side length R is drawn (from the curriculum's resolution
distribution, NaViT's low-biased truncated normal, or the native size), and the image is resized
to about (R/p)^2 patches of shape h x w with w/h = width/height, clamped to [min, max] patches per
side. Video is (frames / temporal patch) x h x w tubelets; audio log-mel is (time / patch) x
(mel bins / patch) patches, laid out as the grid (t=1, h=time, w=mel). Everything is vectorised
over samples and driven by per-sample uniforms (`plait.data.rng.keyed_uniforms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

from plait.data.batch import AUDIO, IMAGE, MODALITIES, VIDEO
from plait.data.checks import check_at_least, check_positive, check_table
from plait.data.token_drop import TokenDropConfig, drop_rates, kept_counts

NUM_DRAWS = 4
"""Uniforms per sample: resolution choice, truncated-normal side, crop start, drop rate."""
_U_CHOICE, _U_SIDE, _U_CROP, _U_DROP = range(NUM_DRAWS)
_NUMERIC_FIELDS = ("width", "height", "frames", "fps", "duration")
_FALLBACK_FPS = 30.0  # only sets the crop span of a video whose metadata lacks fps


@dataclass(kw_only=True)
class SizingConfig:
    """Patch geometry and the limits that turn sample metadata into a token grid."""

    patch_size: int = 16
    """Spatial patch side in pixels (images and video)."""
    temporal_patch: int = 2
    """Video frames per tubelet; images are repeated this many times so both share one patch layout."""
    min_side_patches: int = 2
    """Fewest patches along either side of an image or video frame."""
    max_side_patches: int = 64
    """Most patches along either side of an image or video frame."""
    side_distribution: Literal["curriculum", "truncated_normal", "native"] = "curriculum"
    """Side length R source: curriculum resolution probabilities, NaViT's truncated normal, or native size."""
    resolution: dict[int, float] = field(default_factory=lambda: {224: 1.0})
    """`curriculum`: image side length in pixels → probability until a curriculum phase sets `resolution`."""
    side_mean: float = -0.5
    """Truncated normal on [-1, 1] (mapped to [min, max] side patches): mean; below 0 biases to low resolution."""
    side_std: float = 1.0
    """Truncated normal: standard deviation before truncation."""
    allow_upscale: bool = False
    """Whether an image may be resized to more pixels than it has (otherwise capped at its native area)."""
    max_sample_tokens: int = 4096
    """Most tokens one sample may have (before dropping); larger grids are scaled down to fit."""
    video_side_px: int = 224
    """Side length R of video frames (same area rule as images); video costs frames x this, so it is set apart."""
    video_max_frames: int = 32
    """Most frames decoded per clip (rounded down to a multiple of temporal_patch)."""
    video_sample_fps: float = 0.0
    """`dense`: frame rate at which clip frames are sampled; 0 takes consecutive native frames."""
    video_sampling: Literal["dense", "tsn", "uniform"] = "dense"
    """Which frames of a clip: `dense` a run of frames from a keyed window of the clip; `tsn` the whole clip
    cut into as many segments as frames, one keyed frame per segment in training and the centres at eval and
    inference; `uniform` the segment centres always."""
    video_jitter: float = 1.0
    """In [0, 1]: how far training may move a clip's frames from the centred choice (`dense`: the window start
    over the clip's slack; `tsn`: each frame within its segment); 0 = always centred."""
    n_mels: int = 80
    """Log-mel bins of the audio front end."""
    hop_ms: float = 10.0
    """Log-mel hop in milliseconds (100 frames per second at 10 ms)."""
    audio_patch: int = 16
    """Audio patch side, in mel frames and mel bins; n_mels must be a multiple of it."""
    max_audio_seconds: float = 30.0
    """Longer audio is cropped to a window of this length."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "patch_size", "temporal_patch", "min_side_patches", "max_sample_tokens",
                       "video_side_px", "video_max_frames", "n_mels", "audio_patch")
        if self.max_side_patches < self.min_side_patches:
            raise ValueError(f"max_side_patches: {self.max_side_patches} is below "
                             f"min_side_patches {self.min_side_patches}")
        check_positive(self, "side_std", "hop_ms", "max_audio_seconds")
        self.resolution = check_table("resolution", self.resolution, probabilities=True, side_lengths=True)
        if self.n_mels % self.audio_patch:
            raise ValueError(f"audio_patch: must divide n_mels={self.n_mels}, got {self.audio_patch}")
        check_at_least(self, 0, "video_sample_fps")
        if self.video_sampling not in ("dense", "tsn", "uniform"):
            raise ValueError(f"video_sampling: must be dense, tsn or uniform, got {self.video_sampling!r}")
        if not 0.0 <= self.video_jitter <= 1.0:
            raise ValueError(f"video_jitter: must be in [0, 1], got {self.video_jitter}")
        if self.video_max_frames < self.temporal_patch:
            raise ValueError(f"video_max_frames: must be >= temporal_patch={self.temporal_patch}")

    @property
    def vision_channels(self) -> int:
        """Values per vision patch: 3 colours x temporal_patch x patch_size^2."""
        return 3 * self.temporal_patch * self.patch_size**2

    @property
    def audio_channels(self) -> int:
        """Values per audio patch: audio_patch^2 log-mel values."""
        return self.audio_patch**2


@dataclass(frozen=True)
class SampleGrid:
    """The token grid and decode instructions of one sample."""

    modality: int
    """Index into MODALITIES."""
    t: int
    """Tubelets along time (1 for images and audio)."""
    h: int
    """Patches along height (audio: along time)."""
    w: int
    """Patches along width (audio: along mel bins)."""
    frames: int
    """Video frames to decode (t x temporal_patch); 1 for images, 0 for audio."""
    start_s: float
    """Audio/video crop start in seconds."""
    span_s: float
    """Audio/video crop length in seconds."""
    num_kept: int
    """Tokens left after token dropping."""

    @property
    def num_tokens(self) -> int:
        """Tokens before dropping."""
        return self.t * self.h * self.w


@dataclass
class SampleGrids:
    """Grids of many samples as parallel int64/float64 arrays (the plan's view)."""

    modality: np.ndarray
    """[N] int64 index into MODALITIES."""
    t: np.ndarray
    """[N] int64 tubelets along time."""
    h: np.ndarray
    """[N] int64 patches along height (audio: time)."""
    w: np.ndarray
    """[N] int64 patches along width (audio: mel)."""
    frames: np.ndarray
    """[N] int64 video frames to decode."""
    start_s: np.ndarray
    """[N] float64 crop start in seconds."""
    span_s: np.ndarray
    """[N] float64 crop length in seconds."""
    num_kept: np.ndarray
    """[N] int64 tokens left after dropping (the packing length)."""

    @property
    def num_tokens(self) -> np.ndarray:
        """Tokens per sample before dropping."""
        return self.t * self.h * self.w

    def __len__(self) -> int:
        return len(self.modality)

    def __getitem__(self, i: int) -> SampleGrid:
        return SampleGrid(int(self.modality[i]), int(self.t[i]), int(self.h[i]), int(self.w[i]),
                          int(self.frames[i]), float(self.start_s[i]), float(self.span_s[i]),
                          int(self.num_kept[i]))


def modality_codes(values: np.ndarray) -> np.ndarray:
    """Modality names or codes → int64 codes (index into MODALITIES)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    codes = np.full(values.shape, -1, dtype=np.int64)
    for code, name in enumerate(MODALITIES):
        codes[values == name] = code
    if (codes < 0).any():
        raise ValueError(f"modality: unknown values {sorted(set(values[codes < 0].tolist()))}")
    return codes


def sample_side_px(cfg: SizingConfig, resolution: Mapping[int, float] | None, width: np.ndarray,
                   height: np.ndarray, u_choice: np.ndarray, u_side: np.ndarray) -> np.ndarray:
    """Nominal side length R in pixels per sample, from the configured distribution."""
    if cfg.side_distribution == "native":
        return np.sqrt(width * height)
    if cfg.side_distribution == "truncated_normal":
        lo, hi = ndtr((-1.0 - cfg.side_mean) / cfg.side_std), ndtr((1.0 - cfg.side_mean) / cfg.side_std)
        x = cfg.side_mean + cfg.side_std * ndtri(lo + u_side * (hi - lo))
        span = cfg.max_side_patches - cfg.min_side_patches
        return (cfg.min_side_patches + (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * span) * cfg.patch_size
    if not resolution:
        raise ValueError("resolution: side_distribution 'curriculum' needs a non-empty resolution distribution")
    sides = np.array([float(side) for side in resolution], dtype=np.float64)
    cdf = np.cumsum(np.array(list(resolution.values()), dtype=np.float64))
    index = np.searchsorted(cdf / cdf[-1], u_choice, side="right")
    return sides[np.minimum(index, len(sides) - 1)]


def spatial_grid(cfg: SizingConfig, width: np.ndarray, height: np.ndarray, side_px: np.ndarray,
                 max_area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patches (h, w) covering about (side_px / p)^2 with the image's aspect ratio, within limits."""
    p = cfg.patch_size
    area = (side_px / p) ** 2
    if not cfg.allow_upscale:
        area = np.minimum(area, width * height / p**2)
    area = np.minimum(area, max_area)
    aspect = width / height
    lo, hi = cfg.min_side_patches, cfg.max_side_patches
    h = np.clip(np.floor(np.sqrt(area / aspect) + 0.5), lo, hi).astype(np.int64)
    w = np.clip(np.floor(np.sqrt(area * aspect) + 0.5), lo, hi).astype(np.int64)
    over = h * w > max_area
    if over.any():  # rounding or the min-side clamp overshot the cap: shrink the longer side
        longer_h = h >= w
        h = np.where(over & longer_h, np.maximum(max_area // w, 1), h)
        w = np.where(over & ~longer_h, np.maximum(max_area // h, 1), w)
    return h, w


def _column(columns: Mapping[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """A metadata column as float64 with missing values as NaN."""
    if name not in columns:
        return np.full(n, np.nan)
    return np.asarray(columns[name], dtype=np.float64)


def size_samples(columns: Mapping[str, np.ndarray], cfg: SizingConfig, drop_cfg: TokenDropConfig,
                 resolution: Mapping[int, float] | None, drop_rate: float,
                 uniforms: np.ndarray) -> SampleGrids:
    """Token grids and kept counts of many samples from metadata columns, vectorised.

    `columns` holds arrays `modality` (names or codes), `width`, `height`, `frames`, `fps`,
    `duration` (missing ones may be absent or NaN); `uniforms` is [N, NUM_DRAWS] per-sample
    draws, e.g. `keyed_uniforms(keyed_seeds(seed, keys, epoch, "size"), NUM_DRAWS)`.
    """
    modality = modality_codes(columns["modality"])
    n = len(modality)
    u = np.asarray(uniforms, dtype=np.float64).reshape(n, NUM_DRAWS)
    width, height = _column(columns, "width", n), _column(columns, "height", n)
    duration, fps = _column(columns, "duration", n), _column(columns, "fps", n)
    frames_in = _column(columns, "frames", n)
    frames_in = np.where(np.isnan(frames_in) | (frames_in <= 0), np.rint(duration * fps), frames_in)
    is_image, is_audio, is_video = modality == IMAGE, modality == AUDIO, modality == VIDEO
    visual = ~is_audio
    if np.any(visual & ~(width > 0) | visual & ~(height > 0)):
        raise ValueError("width, height: image and video samples need positive sizes")
    if np.any(is_video & ~(frames_in > 0)) or np.any(is_audio & ~(duration > 0)):
        raise ValueError("frames, duration: video needs frames (or duration x fps), audio needs duration")
    safe_w, safe_h = np.where(visual, width, 1.0), np.where(visual, height, 1.0)

    # Video: tubelets along time, capped by max frames, then fewer tubelets (not smaller frames) to fit the budget.
    tp = cfg.temporal_patch
    clip_frames = np.minimum(np.nan_to_num(frames_in, nan=tp), cfg.video_max_frames)
    t = np.where(is_video, np.maximum(clip_frames // tp, 1), 1).astype(np.int64)
    side_px = np.full(n, float(cfg.video_side_px))
    if is_image.any():
        side_px[is_image] = sample_side_px(cfg, resolution, width[is_image], height[is_image],
                                           u[is_image, _U_CHOICE], u[is_image, _U_SIDE])
    h, w = spatial_grid(cfg, safe_w, safe_h, side_px, np.full(n, cfg.max_sample_tokens))
    t = np.where(is_video, np.minimum(t, np.maximum(cfg.max_sample_tokens // (h * w), 1)), t)

    # Audio: (time / patch) x (mel / patch), cropped to max_audio_seconds and the token budget.
    mel_patches = cfg.n_mels // cfg.audio_patch
    frames_per_s = 1000.0 / cfg.hop_ms
    audio_s = np.minimum(np.nan_to_num(duration, nan=0.0), cfg.max_audio_seconds)
    time_patches = np.clip(np.floor(audio_s * frames_per_s / cfg.audio_patch), 1,
                           max(cfg.max_sample_tokens // mel_patches, 1)).astype(np.int64)
    h = np.where(is_audio, time_patches, h)
    w = np.where(is_audio, mel_patches, w)

    native_fps = np.where(fps > 0, fps, _FALLBACK_FPS)
    video_span = t * tp / (cfg.video_sample_fps if cfg.video_sample_fps > 0 else native_fps)
    span = np.where(is_audio, np.minimum(audio_s, time_patches * cfg.audio_patch / frames_per_s),
                    np.where(is_video, video_span, 0.0))
    whole = is_video & (cfg.video_sampling != "dense")  # segments over the whole clip: span 0 = to its end
    span = np.where(whole, 0.0, span)
    slack = np.maximum(np.nan_to_num(duration, nan=0.0) - span, 0.0)
    crop = np.where(is_video, u[:, _U_CROP] * cfg.video_jitter + (1.0 - cfg.video_jitter) / 2, u[:, _U_CROP])
    start = np.where(is_image | whole, 0.0, crop * slack)
    frames = np.where(is_video, t * tp, np.where(is_image, 1, 0)).astype(np.int64)

    num_tokens = t * h * w
    rates = drop_rates(drop_cfg, drop_rate, num_tokens, modality, u[:, _U_DROP])
    kept = kept_counts(num_tokens, rates, drop_cfg.min_kept)
    return SampleGrids(modality, t, h, w, frames, start, span, kept)


def size_sample(meta: Mapping[str, object], cfg: SizingConfig, drop_cfg: TokenDropConfig,
                resolution: Mapping[int, float] | None, drop_rate: float,
                rng: np.random.Generator | np.ndarray) -> SampleGrid:
    """Grid of one sample from its metadata row (a dict); `rng` is a keyed Generator or NUM_DRAWS uniforms."""
    u = rng.random(NUM_DRAWS) if isinstance(rng, np.random.Generator) else np.asarray(rng)
    columns = {name: np.array([float(meta[name])]) for name in _NUMERIC_FIELDS if meta.get(name) is not None}
    columns["modality"] = np.array([meta["modality"]])
    return size_samples(columns, cfg, drop_cfg, resolution, drop_rate, u[None, :])[0]
