"""Media file conventions (img2dataset / video2dataset / audio WebDatasets) and header-only probing."""

from __future__ import annotations

import io
import warnings

import av
import soundfile
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
AUDIO_EXTS = ("flac", "wav", "mp3", "ogg")
TEXT_EXTS = ("txt",)
META_EXTS = ("json",)

MAX_IMAGE_PIXELS = 178_956_970
"""Decompression-bomb guard: images above this many pixels are rejected (Pillow's own limit x2)."""

_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"\xff\xfb", "mp3"),
    (b"\xff\xf3", "mp3"),
    (b"\x1a\x45\xdf\xa3", "webm"),
)


def modality_of(ext: str) -> str | None:
    """`image`, `video` or `audio` for a media extension, else None."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in AUDIO_EXTS:
        return "audio"
    return None


def normalize_ext(ext: str) -> str:
    """Lower-case extension with the img2dataset spelling (`jpeg` → `jpg`)."""
    ext = ext.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def sniff_ext(data: bytes) -> str | None:
    """The media extension of raw bytes from their magic number, or None."""
    if data[:4] == b"RIFF" and data[8:12] in (b"WEBP", b"WAVE", b"AVI "):
        return {b"WEBP": "webp", b"WAVE": "wav", b"AVI ": "avi"}[data[8:12]]
    if data[4:8] == b"ftyp":
        return "mp4"
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return None


def probe(ext: str, data: bytes) -> dict:
    """Header-only metadata of one media member; raises ValueError with the reason when unusable."""
    if not data:
        raise ValueError("zero-byte member")
    kind = modality_of(ext)
    try:
        if kind == "image":
            return _probe_image(data)
        if kind == "audio":
            return _probe_audio(data)
        if kind == "video":
            return _probe_video(data)
    except ValueError:
        raise
    except Exception as err:  # every decoder library has its own exception types
        raise ValueError(f"unreadable {ext} header: {type(err).__name__}: {err}") from None
    raise ValueError(f"not a media extension: {ext}")


def _probe_image(data: bytes) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"oversized image {width}x{height}")
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if width <= 0 or height <= 0:
        raise ValueError(f"empty image {width}x{height}")
    return {"width": width, "height": height}


def _probe_audio(data: bytes) -> dict:
    info = soundfile.info(io.BytesIO(data))
    if info.frames <= 0 or info.samplerate <= 0:
        raise ValueError("empty audio")
    return {"sample_rate": int(info.samplerate), "duration": float(info.frames / info.samplerate)}


def _probe_video(data: bytes) -> dict:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        duration = float(stream.duration * stream.time_base) if stream.duration else 0.0
        if not duration and container.duration:
            duration = container.duration / av.time_base
        frames = int(stream.frames) or int(round(duration * fps))
        width, height = stream.codec_context.width, stream.codec_context.height
    if frames <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"empty video ({frames} frames, {width}x{height})")
    return {"width": width, "height": height, "frames": frames, "fps": fps, "duration": duration or frames / fps}

