"""Image decoder: draft-mode JPEG decode, EXIF orientation, colour modes and every skip reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from plait.data.decode_errors import DECODE_REASONS, DecodeError
from plait.data.decode_image import decode_image, open_image
from plait.data.media import probe


def _smooth_picture(width: int, height: int) -> np.ndarray:
    """A photo-like uint8 HxWx3 picture: gradients, a disc and soft stripes (no pixel noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = x / width, y / height
    disc = ((u - 0.6) ** 2 + (v - 0.4) ** 2 < 0.05).astype(np.float64)
    red = 255 * u
    green = 255 * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * v)) * (1 - disc) + 30 * disc
    blue = 255 * (1 - u) * v + 200 * disc
    return np.clip(np.stack([red, green, blue], -1), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _full_decode_resize(data: bytes, height: int, width: int) -> np.ndarray:
    """Reference: decode every pixel, turn it upright, then one bilinear resize with Pillow (as float64)."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR)).astype(np.float64)


def test_large_jpeg_draft_matches_full_decode() -> None:
    data = _encode(_smooth_picture(2048, 1536), quality=92)
    out = decode_image(data, 168, 224)
    assert out.dtype == torch.uint8 and out.shape == (3, 168, 224)
    reference = _full_decode_resize(data, 168, 224)
    diff = np.abs(out.permute(1, 2, 0).numpy().astype(np.float64) - reference)
    assert diff.mean() < 1.5, diff.mean()
    assert np.percentile(diff, 99) < 12


def test_small_downscale_matches_pillow_bilinear() -> None:
    data = _encode(_smooth_picture(320, 240), "PNG")
    out = decode_image(data, 150, 200).permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(out - _full_decode_resize(data, 150, 200)).max() <= 1  # torch's uint8 kernel rounds like Pillow


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    pixels = _smooth_picture(64, 40)
    pixels[:8, :16] = (255, 255, 0)  # a yellow corner makes every flip and turn distinguishable
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(pixels, "PNG", exif=exif.tobytes())
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert torch.equal(decode_image(data), torch.from_numpy(reference.copy()).permute(2, 0, 1))
    height, width = reference.shape[0] // 2, reference.shape[1] // 2
    half = decode_image(data, height, width).permute(1, 2, 0).numpy().astype(np.float64)
    assert np.abs(half - _full_decode_resize(data, height, width)).max() <= 1


def test_draft_decodes_fewer_pixels() -> None:
    data = _encode(_smooth_picture(2048, 1024), quality=90)
    img = open_image(data)
    img.draft("RGB", (256, 128))
    assert img.size == (256, 128)  # libjpeg's 1/8 scale: the smallest that still covers the target
    img = open_image(data)
    img.draft("RGB", (300, 150))
    assert img.size == (512, 256)  # 1/8 would be too small, so 1/4


def test_native_size_small_png_is_exact() -> None:
    pixels = _smooth_picture(37, 23)
    out = decode_image(_encode(pixels, "PNG"))
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1))


def test_exif_orientation_6_is_rotated_upright() -> None:
    pixels = np.zeros((40, 80, 3), np.uint8)  # stored landscape: left half red, right half blue
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    data = _encode(pixels, quality=95, exif=exif.tobytes())
    assert probe("jpg", data) == {"width": 40, "height": 80}
    out = decode_image(data, 80, 40)
    assert out.shape == (3, 80, 40)
    top, bottom = out[:, :30].float().mean((1, 2)), out[:, 50:].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    native = decode_image(data)
    assert native.shape == (3, 80, 40)


def test_transparency_is_composited_on_white_and_grayscale_becomes_rgb() -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200  # transparent but stored red
    rgba[8:, :, 3] = 255
    out = decode_image(_encode(rgba, "PNG"), 8, 8)
    assert out[:, :3].min() >= 250  # top half: transparent → white
    assert out[0, 5:].float().mean() > 190 and out[1, 5:].max() < 10
    gray = decode_image(_encode(np.full((10, 12), 77, np.uint8), "PNG"))
    assert gray.shape == (3, 10, 12) and (gray == 77).all()


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height (a decompression bomb's signature)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_become_rgb(mode: str) -> None:
    source = Image.fromarray(_smooth_picture(800, 600)).convert(mode)
    buf = io.BytesIO()
    source.save(buf, format="JPEG", quality=92)
    out = decode_image(buf.getvalue(), 90, 120)
    assert out.shape == (3, 90, 120)
    reference = _full_decode_resize(buf.getvalue(), 90, 120)
    assert np.abs(out.permute(1, 2, 0).numpy().astype(np.float64) - reference).mean() < 2.0


def test_decompression_bomb_is_rejected() -> None:
    with pytest.raises(DecodeError) as err:
        decode_image(_png_with_size(30_000, 30_000), 224, 224)
    assert err.value.reason == "oversized"
    data = _encode(_smooth_picture(300, 200), quality=80)
    with pytest.raises(DecodeError) as err:
        decode_image(data, 32, 32, max_pixels=300 * 200 - 1)
    assert err.value.reason == "oversized"
    assert decode_image(data, 32, 32, max_pixels=300 * 200).shape == (3, 32, 32)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"this is not an image at all" * 10, "undecodable"),
    (b"\xff\xd8\xff\xe0" + bytes(200), "undecodable"),
])
def test_bad_bytes_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_image(data, 32, 32)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_reported_truncated(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = _encode(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), fmt)
    with pytest.raises(DecodeError) as err:
        decode_image(data[: len(data) // 2], 32, 32)
    assert err.value.reason == "truncated"


def test_decode_error_contract() -> None:
    err = DecodeError("truncated", "half a file")
    assert err.reason == "truncated" and "half a file" in str(err)
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert again.reason == "truncated" and again.detail == "half a file"
    assert set(DECODE_REASONS) == {"empty", "undecodable", "truncated", "oversized"}
    with pytest.raises(ValueError, match="reason"):
        DecodeError("bad luck")
