"""One preprocessing path: media (bytes or decoded arrays) → decode at the grid's size → patchify → pack.

The loader feeds it grids the sample plan chose; inference (`MediaPreprocessor`) sizes each item
itself with the same sizing code, at a fixed image side and with no token dropping or augmentation.
Both end in `pack_samples`, so a sample reaches the model identically on either path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import numpy as np
import torch

from plait.data.batch import PackedBatch
from plait.data.checks import check_at_least
from plait.data.decode_audio import LogMelConfig, SpecAugmentConfig, decode_audio, log_mel, resample, spec_augment
from plait.data.decode_errors import DecodeError
from plait.data.decode_image import decode_image, resize_uint8
from plait.data.decode_video import decode_video, sample_frame_indices
from plait.data.manifest import MANIFEST_FLOAT32
from plait.data.media import modality_of, normalize_ext, probe, sniff_ext
from plait.data.packing import PackingConfig, PatchedSample, pack_samples
from plait.data.patchify import patchify_audio, patchify_image, patchify_video
from plait.data.rng import keyed_rng
from plait.data.sizing import NUM_DRAWS, SampleGrid, SizingConfig, size_sample
from plait.data.token_drop import TokenDropConfig

Media = Union[str, os.PathLike, bytes, np.ndarray, tuple[np.ndarray, float]]
"""A media item: a file path, encoded bytes, an image array [H, W, 3] uint8, a video (array [F, H, W, 3] uint8,
fps) or audio (mono waveform [T] float, sample rate)."""

CENTRE = 0.5
"""The uniform draw inference uses for every sizing choice: centred crops, the middle of a clip."""


def log_mel_config(sizing: SizingConfig) -> LogMelConfig:
    """The audio front end implied by the sizing config (n_mels and hop come from there only)."""
    base = LogMelConfig(n_mels=sizing.n_mels)
    return replace(base, hop_length=round(base.sample_rate * sizing.hop_ms / 1000.0))


class SampleDecoder:
    """One sample's media → (patches, coords) on a given grid (uint8 pixels for images and video, float log-mel
    for audio; the encoder turns pixels into float32 in [0, 1] on the device); raises DecodeError for unusable
    media."""

    def __init__(self, sizing: SizingConfig, spec: SpecAugmentConfig | None = None) -> None:
        self.sizing = sizing
        self.spec = spec
        """SpecAugment masks for audio (training), or None."""
        self.mel = log_mel_config(sizing)

    def encoded(self, modality: str, ext: str, data: bytes, grid: SampleGrid, augment_seed: int | None,
                native: tuple[int, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode encoded bytes straight to the grid's size, then patchify.

        `augment_seed` keys the clip's frame offset and SpecAugment; None takes the centred frames, unmasked.
        `native` is a video's (frame count, fps) when the index already has them (else the header is probed).
        """
        p = self.sizing.patch_size
        if modality == "image":
            return self._image(decode_image(data, grid.h * p, grid.w * p), grid)
        if modality == "video":
            frames, fps = native or _native(ext, data)
            indices = self.frame_indices(frames, fps, grid, augment_seed)
            return self._video(decode_video(data, indices, grid.h * p, grid.w * p), grid)
        return self._audio(decode_audio(data, self.mel, grid.start_s, grid.span_s), grid, augment_seed)

    def decoded(self, modality: str, item: np.ndarray | tuple[np.ndarray, float], grid: SampleGrid,
                augment_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize decoded arrays to the grid (the same frames, crops and mel front end as `encoded`), then patchify."""
        p = self.sizing.patch_size
        if modality == "image":
            pixels = torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1)
            return self._image(resize_uint8(pixels, grid.h * p, grid.w * p), grid)
        array, rate = item
        if modality == "video":
            indices = self.frame_indices(len(array), float(rate), grid, augment_seed)
            frames = torch.from_numpy(np.ascontiguousarray(array[indices])).permute(0, 3, 1, 2)
            return self._video(resize_uint8(frames, grid.h * p, grid.w * p), grid)
        start = int(round(grid.start_s * rate))
        crop = np.asarray(array, dtype=np.float32)[start:start + max(int(round(grid.span_s * rate)), 1)]
        wave = resample(torch.from_numpy(np.ascontiguousarray(crop)), int(rate), self.mel.sample_rate,
                        zero_crossings=self.mel.resample_zero_crossings, rolloff=self.mel.resample_rolloff)
        return self._audio(log_mel(wave, self.mel), grid, augment_seed)

    def frame_indices(self, frames: int, fps: float, grid: SampleGrid, augment_seed: int | None) -> np.ndarray:
        """The grid's frames from its time window by the sizing's `video_sampling`, keyed by the sample's
        augment seed (None: the centred choice)."""
        rng = keyed_rng(augment_seed) if augment_seed is not None else None
        sampling = self.sizing.video_sampling
        mode = "dense" if sampling == "dense" else "random" if sampling == "tsn" and rng is not None else "uniform"
        return sample_frame_indices(frames, fps, grid.frames, mode, rng, start_s=grid.start_s, span_s=grid.span_s,
                                    sample_fps=self.sizing.video_sample_fps, jitter=self.sizing.video_jitter)

    def _image(self, pixels: torch.Tensor, grid: SampleGrid) -> tuple[torch.Tensor, torch.Tensor]:
        return patchify_image(pixels, grid.h, grid.w, self.sizing.patch_size, self.sizing.temporal_patch)

    def _video(self, frames: torch.Tensor, grid: SampleGrid) -> tuple[torch.Tensor, torch.Tensor]:
        return patchify_video(frames, grid.t, grid.h, grid.w, self.sizing.patch_size, self.sizing.temporal_patch)

    def _audio(self, mel: torch.Tensor, grid: SampleGrid,
               augment_seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec is not None and augment_seed is not None:
            mel = spec_augment(mel, self.spec, keyed_rng(augment_seed))
        return patchify_audio(mel, grid.h, self.sizing.audio_patch)


def _probe(ext: str, data: bytes) -> dict:
    """Header metadata, with an unusable header as a DecodeError (a skip reason)."""
    try:
        return probe(ext, data)
    except ValueError as err:
        raise DecodeError("undecodable", str(err)) from None


def _native(ext: str, data: bytes) -> tuple[int, float]:
    """A clip's (frame count, fps) from its header."""
    info = _probe(ext, data)
    return int(info["frames"]), float(info["fps"])


@dataclass(kw_only=True)
class PreprocessConfig:
    """What turns raw media into model inputs at inference; saved with a model so inference cuts what training cut."""

    sizing: SizingConfig = field(default_factory=SizingConfig)
    """Patch geometry, limits and the audio front end (the run's `data.sizing`)."""
    image_side_px: int = 224
    """Image side length R (training draws R from the curriculum's resolution table; inference uses this one)."""
    video_frame_segments: bool = False
    """Each video frame group is its own attention segment (the run's `data.packing.video_frame_segments`)."""
    max_caption_tokens: int = 77
    """Longest caption in tokens, EOS included (the run's `data.loader.max_caption_tokens`)."""

    def __post_init__(self) -> None:
        check_at_least(self, 1, "image_side_px", "max_caption_tokens")


def _load(item: Media) -> tuple[str, str | None, bytes | np.ndarray | tuple[np.ndarray, float]]:
    """(modality, extension or None, encoded bytes or the decoded item) of one media item."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        ext = normalize_ext(path.suffix)
        if modality_of(ext) is None:
            raise ValueError(f"{path}: not a media file (extension {path.suffix!r})")
        return modality_of(ext), ext, path.read_bytes()
    if isinstance(item, bytes):
        ext = sniff_ext(item)
        if ext is None or modality_of(ext) is None:
            raise ValueError("media: bytes of an unknown format (no image, audio or video magic number)")
        return modality_of(ext), ext, item
    if isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[2] == 3:
        return "image", None, item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], np.ndarray):
        if item[0].ndim == 4 and item[0].shape[3] == 3:
            return "video", None, item
        if item[0].ndim == 1:
            return "audio", None, item
    raise ValueError("media: expected a path, bytes, an [H, W, 3] image, (a [F, H, W, 3] video, fps) or "
                     "(a [T] waveform, sample rate)")


def _metadata(modality: str, ext: str | None, item: bytes | np.ndarray | tuple[np.ndarray, float]) -> dict:
    """The metadata sizing needs, from a header (bytes) or the array's shape, at the manifest's precision."""
    if ext is not None:
        meta = {"modality": modality, **_probe(ext, item)}
    elif modality == "image":
        meta = {"modality": modality, "height": item.shape[0], "width": item.shape[1]}
    elif modality == "video":
        array, rate = item
        meta = {"modality": modality, "frames": len(array), "fps": rate, "height": array.shape[1],
                "width": array.shape[2], "duration": len(array) / rate}
    else:
        array, rate = item
        meta = {"modality": modality, "duration": len(array) / rate, "sample_rate": rate}
    return {**meta, **{name: float(np.float32(meta[name])) for name in MANIFEST_FLOAT32 if name in meta}}


class MediaPreprocessor:
    """Raw media items → one PackedBatch, sized and cut as the training loader cuts them (no augmentation)."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.decoder = SampleDecoder(cfg.sizing)
        self.no_drop = TokenDropConfig()

    def sample(self, item: Media, key: str) -> PatchedSample:
        """One item → its patches on the grid sizing gives it at `image_side_px`, centred crops, every token kept."""
        modality, ext, loaded = _load(item)
        meta = _metadata(modality, ext, loaded)
        grid = size_sample(meta, self.cfg.sizing, self.no_drop, {self.cfg.image_side_px: 1.0}, 0.0,
                           np.full(NUM_DRAWS, CENTRE))
        if ext is not None:
            patches, coords = self.decoder.encoded(modality, ext, loaded, grid, augment_seed=None)
        else:
            patches, coords = self.decoder.decoded(modality, loaded, grid, augment_seed=None)
        return PatchedSample(key=key, modality=modality, patches=patches, coords=coords,
                             caption_ids=torch.zeros(0, dtype=torch.long))

    def batch(self, items: Sequence[Media]) -> PackedBatch:
        """Every item packed into one batch (keys are positions), with no tail padding."""
        samples = [self.sample(item, str(i)) for i, item in enumerate(items)]
        tokens = max(sum(len(s.patches) for s in samples), 1)
        packing = PackingConfig(max_tokens=tokens, max_samples_per_sequence=0, tail_padding="multiple",
                                video_frame_segments=self.cfg.video_frame_segments)
        return pack_samples(samples, packing)
