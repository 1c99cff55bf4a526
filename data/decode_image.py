"""Image bytes → uint8 [3, H, W] at the size sizing chose, decoding no more pixels than needed.

A JPEG much larger than its target is decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8
inside the inverse DCT, so a 2048 px photo bound for 224 px skips most of the decode work.
The smallest such scale that still covers the target is chosen, then one antialiased bilinear
resize (torch's uint8 kernel, the same filter patchify uses) lands on the exact size. EXIF
orientation is applied to the small result, not the source.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from plait.data.decode_errors import DecodeError
from plait.data.media import MAX_IMAGE_PIXELS

_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: x.transpose(-2, -1).flip(-1),  # rotate 90 degrees clockwise
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: x.transpose(-2, -1).flip(-2),  # rotate 90 degrees counter-clockwise
}
"""EXIF orientation tag value → the flip/transpose of stored [C, H, W] pixels that shows them upright."""
_SWAPS_AXES = (5, 6, 7, 8)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255, 255)


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only), rejecting empty, unreadable and oversized images."""
    if not data:
        raise DecodeError("empty", "zero-byte image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above half its own bomb limit; we enforce `max_pixels` ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise DecodeError("oversized", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DecodeError("undecodable", f"{type(err).__name__}: {err}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError("empty", f"image is {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError("oversized", f"image is {width}x{height}, more than {max_pixels} pixels")
    return img


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block (any parser error) must not cost us the pixels
        return 1
    return value if value in _UPRIGHT else 1


def _rgb_pixels(img: Image.Image) -> np.ndarray:
    """Writable uint8 [H, W, 3] RGB pixels; transparent pixels are composited over white.

    Compositing before the resize equals a premultiplied-alpha resize followed by compositing,
    since both are linear in the pixels.
    """
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, _WHITE)
        img.alpha_composite(rgba)
    return np.array(img.convert("RGB") if img.mode != "RGB" else img)


def resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [3, H, W] (torch's vectorised uint8 kernel, ~3x Pillow's)."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def _load(img: Image.Image) -> None:
    """Decode the pixels, mapping the decoder's complaints to skip reasons."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err)
        reason = "truncated" if isinstance(err, EOFError) or "truncated" in message.lower() else "undecodable"
        raise DecodeError(reason, f"{type(err).__name__}: {message}") from None


def decode_image(data: bytes, height: int | None = None, width: int | None = None, *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image to a contiguous uint8 [3, height, width] RGB tensor, upright per EXIF.

    `height`/`width` are the displayed (upright) target size; None keeps the native size.
    Raises DecodeError("empty" | "undecodable" | "truncated" | "oversized").
    """
    img = open_image(data, max_pixels)
    orientation = exif_orientation(img)
    swap = orientation in _SWAPS_AXES
    native_w, native_h = img.size
    upright_w, upright_h = (native_h, native_w) if swap else (native_w, native_h)
    target_w = upright_w if width is None else width
    target_h = upright_h if height is None else height
    if target_w < 1 or target_h < 1:
        raise ValueError(f"height, width: target size must be positive, got {target_h}x{target_w}")
    # Work in stored (pre-rotation) coordinates until the final reorientation.
    stored_w, stored_h = (target_h, target_w) if swap else (target_w, target_h)
    if img.format == "JPEG" and img.mode in ("RGB", "YCbCr", "L"):
        img.draft(img.mode if img.mode == "L" else "RGB", (stored_w, stored_h))
    _load(img)
    stored = torch.from_numpy(_rgb_pixels(img)).permute(2, 0, 1)  # channels-last memory: the fast resize path
    resized = resize_uint8(stored, stored_h, stored_w)
    return (_UPRIGHT[orientation](resized) if orientation != 1 else resized).contiguous()
