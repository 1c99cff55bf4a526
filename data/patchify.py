"""Decoded media → flat patches with (t, h, w) grid coordinates, all by reshapes (no loops).

Vision patches (images and video share the `vision` stream, so they share one layout) are
flattened as (channel=3, temporal_patch, p, p); an image is repeated temporal_patch times, as
Qwen2-VL does, so one patch embedding serves both. Audio patches are (time, mel) blocks of a
log-mel spectrogram, on the grid (t=0, h=time patch, w=mel patch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_coords(t: int, h: int, w: int) -> torch.Tensor:
    """[t*h*w, 3] int64 (t, h, w) coordinates in row-major (t slowest, w fastest) order."""
    axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, 3)


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [N, C, H, W] float frames to (height, width), antialiased when shrinking."""
    if frames.shape[-2:] == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def patchify_image(image: torch.Tensor, h: int, w: int, patch: int,
                   temporal_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image [3, H, W] float → patches [h*w, 3*temporal_patch*patch^2] and coords [h*w, 3]."""
    if image.dim() != 3:
        raise ValueError(f"image: expected [3, H, W], got shape {tuple(image.shape)}")
    pixels = resize(image[None], h * patch, w * patch)[0]
    blocks = pixels.reshape(3, h, patch, w, patch).permute(1, 3, 0, 2, 4)
    tubelets = blocks.unsqueeze(3).expand(h, w, 3, temporal_patch, patch, patch)
    return tubelets.reshape(h * w, -1), grid_coords(1, h, w)


def frame_indices(num_frames: int, wanted: int) -> torch.Tensor:
    """`wanted` frame indices spread evenly over `num_frames` (repeats frames if there are too few)."""
    positions = (torch.arange(wanted, dtype=torch.float64) + 0.5) * num_frames / wanted
    return positions.long().clamp_(max=num_frames - 1)


def patchify_video(frames: torch.Tensor, t: int, h: int, w: int, patch: int,
                   temporal_patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [F, 3, H, W] float → tubelets [t*h*w, 3*temporal_patch*patch^2] and coords [t*h*w, 3]."""
    if frames.dim() != 4:
        raise ValueError(f"frames: expected [F, 3, H, W], got shape {tuple(frames.shape)}")
    wanted = t * temporal_patch
    if frames.shape[0] != wanted:
        frames = frames[frame_indices(frames.shape[0], wanted)]
    pixels = resize(frames, h * patch, w * patch)
    blocks = pixels.reshape(t, temporal_patch, 3, h, patch, w, patch).permute(0, 3, 5, 2, 1, 4, 6)
    return blocks.reshape(t * h * w, -1), grid_coords(t, h, w)


def patchify_audio(mel: torch.Tensor, time_patches: int, patch: int,
                   pad_value: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel [n_mels, frames] → patches [time_patches*n_mels/patch, patch^2] and coords.

    The spectrogram is cropped or tail-padded (with `pad_value`, default its minimum, i.e.
    silence) to exactly time_patches*patch frames.
    """
    n_mels, num_frames = mel.shape
    if n_mels % patch:
        raise ValueError(f"mel: {n_mels} bins is not a multiple of the audio patch {patch}")
    needed = time_patches * patch
    if num_frames < needed:
        if pad_value is None:
            pad_value = float(mel.min()) if mel.numel() else 0.0
        mel = F.pad(mel, (0, needed - num_frames), value=pad_value)
    mel_patches = n_mels // patch
    blocks = mel[:, :needed].reshape(mel_patches, patch, time_patches, patch).permute(2, 0, 3, 1)
    return blocks.reshape(time_patches * mel_patches, patch * patch), grid_coords(1, time_patches, mel_patches)
