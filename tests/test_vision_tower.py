"""Pretrained vision towers run packed: each sample's tokens equal the HF vision model's own forward on it alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionModel, Siglip2Config,
                          Siglip2ImageProcessorPil, Siglip2Model, Siglip2VisionModel, SiglipConfig,
                          SiglipImageProcessorPil, SiglipModel, SiglipVisionModel, ViTConfig)

from plait.data.batch import PackedBatch, PackedStream
from plait.data.packing import PackingConfig, PatchedSample, pack_samples
from plait.data.patchify import grid_coords, patchify_image, patchify_video
from plait.data.sizing import SizingConfig
from plait.trainer.model.vision_tower import VisionTower, check_vision_tower

SIZING = SizingConfig(patch_size=4)
"""4x4 patches over 2-frame tubelets."""
P, TP = SIZING.patch_size, SIZING.temporal_patch
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "patch_size": P}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "vocab_size": 99}
MEAN, STD = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
FAMILIES = {  # config, full model, vision model, image processor, native grid (4x4 patches)
    "siglip": (SiglipConfig, SiglipModel, SiglipVisionModel, SiglipImageProcessorPil, {"image_size": 16}),
    "clip": (CLIPConfig, CLIPModel, CLIPVisionModel, CLIPImageProcessorPil, {"image_size": 16}),
    "siglip2": (Siglip2Config, Siglip2Model, Siglip2VisionModel, Siglip2ImageProcessorPil, {"num_patches": 16}),
}
GRIDS = [(4, 4), (3, 5), (6, 2)]
"""(h, w) patch grids of the test images: native, and two other shapes (position tables resized)."""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random full checkpoints (vision + text) with their image processors, saved as hub repos are."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    paths = {}
    for family, (config_cls, model_cls, _, processor_cls, native) in FAMILIES.items():
        paths[family] = root / family
        model_cls(config_cls(vision_config={**VISION, **native}, text_config=TEXT)).save_pretrained(paths[family])
        processor_cls(image_mean=MEAN.tolist(), image_std=STD.tolist()).save_pretrained(paths[family])
    return paths


def _reference(family: str, path: Path) -> torch.nn.Module:
    return FAMILIES[family][2].from_pretrained(path, attn_implementation="eager").eval()


def _tower(path: Path, **kwargs) -> VisionTower:
    return VisionTower(str(path), SIZING, out_dim=8, max_frames=4, **kwargs).eval()


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """An image [3, H, W] in [0, 1] normalised as its processor does."""
    return (image - MEAN[:, None, None]) / STD[:, None, None]


def _naflex_patches(pixels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[h*w, p*p*3] patches in HF's NaFlex layout (row-major patches, each (p, p, C)-flattened)."""
    return pixels.reshape(3, h, P, w, P).permute(1, 3, 2, 4, 0).reshape(h * w, -1)


def _hf_forward(model: torch.nn.Module, family: str, image: torch.Tensor) -> torch.Tensor:
    """HF's last_hidden_state `[N, D]` of one image at its own resolution."""
    pixels = _pixels(image)
    h, w = pixels.shape[1] // P, pixels.shape[2] // P
    with torch.no_grad():
        if family == "siglip2":
            out = model(pixel_values=_naflex_patches(pixels, h, w)[None], spatial_shapes=torch.tensor([[h, w]]),
                        pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long))
        else:
            out = model(pixel_values=pixels[None], interpolate_pos_encoding=True)
    return out.last_hidden_state[0]


def _hf_on_kept(model: torch.nn.Module, family: str, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """HF's own modules on the tokens at `coords` only: full-image embeddings, rows kept, then the encoder."""
    pixels = _pixels(image)
    h, w = pixels.shape[1] // P, pixels.shape[2] // P
    rows = coords[:, 1] * w + coords[:, 2]
    with torch.no_grad():
        if family == "siglip2":
            x = model.embeddings(_naflex_patches(pixels, h, w)[None], torch.tensor([[h, w]]))
        else:
            x = model.embeddings(pixels[None], interpolate_pos_encoding=True)
        if family == "clip":
            x = model.pre_layrnorm(x[:, torch.cat([torch.zeros(1, dtype=torch.long), rows + 1])])
            return model.encoder(inputs_embeds=x).last_hidden_state[0]
        return model.post_layernorm(model.encoder(inputs_embeds=x[:, rows]).last_hidden_state)[0]


def _image(key: str, image: torch.Tensor, num_kept: int | None = None) -> PatchedSample:
    patches, coords = patchify_image(image, image.shape[1] // P, image.shape[2] // P, P, TP)
    return PatchedSample(key, "image", patches, coords, torch.zeros(1, dtype=torch.long), num_kept=num_kept,
                         drop_seed=7)


def _audio(key: str) -> PatchedSample:
    return PatchedSample(key, "audio", torch.rand(4, SIZING.audio_channels), grid_coords(1, 4, 1),
                         torch.zeros(1, dtype=torch.long))


def _pack(samples: list[PatchedSample], frame_segments: bool = False) -> PackedBatch:
    return pack_samples(samples, PackingConfig(tail_padding="multiple", video_frame_segments=frame_segments))


def _random_images(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h * P, w * P, generator=gen) for h, w in GRIDS]


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_images_equal_hf_forward_of_each_image_alone(checkpoints, family):
    tower, reference = _tower(checkpoints[family]), _reference(family, checkpoints[family])
    images = _random_images()
    # An audio sample at batch position 1: the vision stream holds batch positions 0, 2, 3.
    batch = _pack([_image("a", images[0]), _audio("b"), _image("c", images[1]), _image("d", images[2])])
    stream = batch.streams["vision"]
    with torch.no_grad():
        hidden, seg = tower.features(stream)
        out, out_seg = tower(stream)
    lengths = [h * w + (family == "clip") for h, w in GRIDS]
    assert seg.tolist() == out_seg.tolist() == [p for p, n in zip([0, 2, 3], lengths) for _ in range(n)]
    assert out.shape == (sum(lengths), 8)
    for got, image in zip(hidden.split(lengths), images):
        torch.testing.assert_close(got, _hf_forward(reference, family, image), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_tokens_keep_their_full_grid_positions(checkpoints, family):
    tower, reference = _tower(checkpoints[family]), _reference(family, checkpoints[family])
    images = _random_images(2)
    stream = _pack([_image("a", images[1], num_kept=9), _image("b", images[2], num_kept=5)]).streams["vision"]
    with torch.no_grad():
        hidden, _ = tower.features(stream)
    lengths = [n + (family == "clip") for n in (9, 5)]
    for got, image, coords in zip(hidden.split(lengths), images[1:], stream.coords.split([9, 5])):
        torch.testing.assert_close(got, _hf_on_kept(reference, family, image, coords), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
def test_video_frame_groups_equal_their_mean_frame_until_the_temporal_table_moves(checkpoints, family):
    tower, reference = _tower(checkpoints[family]), _reference(family, checkpoints[family])
    frames = torch.rand(2 * TP, 3, 2 * P, 3 * P, generator=torch.Generator().manual_seed(3))
    patches, coords = patchify_video(frames, 2, 2, 3, P, TP)
    video = PatchedSample("v", "video", patches, coords, torch.zeros(1, dtype=torch.long))
    stream = _pack([_image("a", _random_images()[1]), video], frame_segments=True).streams["vision"]
    with torch.no_grad():
        hidden, seg = tower.features(stream)
        first, second = hidden[15:].split(6)
        torch.testing.assert_close(first, _hf_forward(reference, family, frames[:TP].mean(0)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second, _hf_forward(reference, family, frames[TP:].mean(0)), atol=1e-5, rtol=1e-5)
        tower.embed.temporal[1].normal_()
        moved, _ = tower.features(stream)
    assert seg.tolist() == [0] * 15 + [1] * 12
    torch.testing.assert_close(moved[:21], hidden[:21], atol=0, rtol=0)
    assert (moved[21:] - second).abs().min() > 0


def _empty_stream() -> PackedStream:
    empty = torch.zeros(0, dtype=torch.long)
    return PackedStream(patches=torch.zeros(0, SIZING.vision_channels), coords=empty.view(0, 1).expand(0, 3),
                        seg=empty, cu_seqlens=torch.zeros(1, dtype=torch.int32), max_seqlen=0, samples=empty,
                        grids=torch.zeros(0, 3, dtype=torch.long), kept=empty)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_stream_and_video_reach_every_parameter(checkpoints, family):
    tower = _tower(checkpoints[family]).train()
    out, seg = tower(_empty_stream())
    assert out.shape == (0, 8) and seg.shape == (0,)
    out.sum().backward()  # ZeRO-3 ranks run the same modules: even no tokens give every parameter a gradient
    assert all(p.grad is not None for p in tower.parameters())
    frames = torch.rand(2 * TP, 3, 2 * P, 3 * P, generator=torch.Generator().manual_seed(4))
    patches, coords = patchify_video(frames, 2, 2, 3, P, TP)
    stream = _pack([PatchedSample("v", "video", patches, coords, torch.zeros(1, dtype=torch.long))]).streams["vision"]
    tower.zero_grad()
    out, seg = tower(stream)
    assert out.shape == (12 + (family == "clip"), 8) and seg.tolist() == [0] * out.shape[0]
    out.square().sum().backward()
    assert tower.embed.temporal.grad[:2].abs().sum() > 0 and tower.embed.temporal.grad[2:].abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_only_checkpoint_and_architecture_only_build(checkpoints, family, tmp_path):
    full = _tower(checkpoints[family])
    _reference(family, checkpoints[family]).save_pretrained(tmp_path)
    FAMILIES[family][3](image_mean=MEAN.tolist(), image_std=STD.tolist()).save_pretrained(tmp_path)
    vision_only, bare = _tower(tmp_path), _tower(tmp_path, load_weights=False)
    weights = {k: v for k, v in full.state_dict().items() if not k.startswith("proj.")}
    for k, v in vision_only.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=0, rtol=0)
    assert vision_only.state_dict().keys() == bare.state_dict().keys() == full.state_dict().keys()
    bare.load_state_dict(full.state_dict())
    stream = _pack([_image("a", _random_images()[1])]).streams["vision"]
    with torch.no_grad():
        torch.testing.assert_close(bare(stream)[0], full(stream)[0], atol=0, rtol=0)


def test_check_vision_tower_rejects_bad_checkpoints(checkpoints, tmp_path):
    check_vision_tower(str(checkpoints["siglip2"]), SIZING)
    with pytest.raises(ValueError, match=r"data\.sizing\.patch_size: 16 but .*siglip has patch size 4"):
        check_vision_tower(str(checkpoints["siglip"]), SizingConfig(patch_size=16))
    with pytest.raises(ValueError, match=r"data\.sizing\.patch_size: 8 but"):
        VisionTower(str(checkpoints["clip"]), SizingConfig(patch_size=8), out_dim=8, max_frames=4)
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=P).save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match=r"model\.encoder\.vision\.pretrained: .*v is a 'vit' checkpoint"):
        check_vision_tower(str(tmp_path / "v"), SIZING)
    SiglipVisionModel.from_pretrained(checkpoints["siglip"]).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=r"model\.encoder\.vision\.pretrained: .*bare has no image processor config"):
        check_vision_tower(str(tmp_path / "bare"), SIZING)
