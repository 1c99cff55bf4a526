"""The built-in demo dataset: handwritten digits (scikit-learn's copy of UCI digits) as image, audio and video.

Every sample is learnable from its caption: an image names the digit and its colours, an audio clip is the
digit's DTMF telephone tone, a video shows the digit moving in one of four directions.
"""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from plait.data.rng import keyed_rng
from plait.data.shard_writer import ShardSink
from plait.data.split import is_heldout

SAMPLE_RATE = 16_000
DTMF_HZ = {  # ITU-T Q.23 (row, column) frequency pairs
    1: (697, 1209), 2: (697, 1336), 3: (697, 1477),
    4: (770, 1209), 5: (770, 1336), 6: (770, 1477),
    7: (852, 1209), 8: (852, 1336), 9: (852, 1477),
    0: (941, 1336),
}
COLOURS = {
    "black": (20, 20, 20), "white": (240, 240, 240), "red": (220, 30, 30), "green": (30, 170, 60),
    "blue": (30, 60, 220), "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (140, 50, 180),
    "cyan": (40, 210, 220), "gray": (128, 128, 128),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MODALITY_CYCLE = ("image", "audio", "video")
MIN_LUMA_CONTRAST = 0.3


DEMO_VERSION = 2
"""Bumped whenever the same spec would give other samples (2: images and videos grouped by source digit)."""


@dataclass(frozen=True)
class DemoSpec:
    """How many demo samples to make and how to split them."""

    samples: int = 600
    seed: int = 0
    samples_per_shard: int = 100
    eval_fraction: float = 0.1

    @property
    def dirname(self) -> str:
        """Folder name that identifies these samples, so data built from another spec is never reused."""
        return (f"v{DEMO_VERSION}-n{self.samples}-seed{self.seed}-shard{self.samples_per_shard}"
                f"-eval{self.eval_fraction:g}")


def _luma(rgb: tuple[int, int, int]) -> float:
    r, g, b = (c / 255 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrasting_pairs() -> list[tuple[str, str]]:
    """(foreground, background) colour names whose luminances differ clearly."""
    return [
        (fg, bg) for fg in COLOURS for bg in COLOURS
        if fg != bg and abs(_luma(COLOURS[fg]) - _luma(COLOURS[bg])) >= MIN_LUMA_CONTRAST
    ]


def _digit_mask(digit_image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The 8x8 digit (0..16) scaled to width x height as a float mask in [0, 1]."""
    small = Image.fromarray((digit_image / 16.0 * 255).astype(np.uint8), mode="L")
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _paint(mask: np.ndarray, fg: str, bg: str, rng: np.random.Generator) -> np.ndarray:
    """Blend foreground over background through the mask, with mild pixel noise; uint8 HxWx3."""
    fg_rgb, bg_rgb = np.array(COLOURS[fg], np.float32), np.array(COLOURS[bg], np.float32)
    img = bg_rgb + mask[..., None] * (fg_rgb - bg_rgb)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(digit_image: np.ndarray, digit: int, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """A digit drawn at 24–256 px with aspect 0.5–2 in two contrasting colours, as JPEG."""
    side = int(rng.integers(24, 257))
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    width, height = max(8, round(side * np.sqrt(aspect))), max(8, round(side / np.sqrt(aspect)))
    pairs = contrasting_pairs()
    fg, bg = pairs[int(rng.integers(len(pairs)))]
    pixels = _paint(_digit_mask(digit_image, width, height), fg, bg, rng)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    caption = f"a {fg} handwritten {digit} on a {bg} background"
    return buf.getvalue(), caption, {"foreground": fg, "background": bg}


def make_audio(digit: int, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """The digit's DTMF tone pair, 0.3–3 s at 16 kHz with noise and a random level, as FLAC."""
    duration = float(rng.uniform(0.3, 3.0))
    t = np.arange(int(duration * SAMPLE_RATE)) / SAMPLE_RATE
    low, high = DTMF_HZ[digit]
    level = float(rng.uniform(0.1, 0.8))
    wave = level * 0.5 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    wave += rng.normal(0.0, 0.02, t.shape)
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(wave, -1, 1).astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue(), f"the telephone tone for {digit}", {"duration": duration}


def video_codec() -> str:
    """H.264 where this FFmpeg build has it, MPEG-4 Part 2 otherwise."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_mp4(frames: list[np.ndarray], fps: int) -> bytes:
    """uint8 [H, W, 3] RGB frames as an mp4, the same bytes on every run (constant QP, one thread)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        codec = video_codec()
        # Constant QP: x264's CRF lookahead made the same frames encode differently run to run.
        stream = container.add_stream(codec, rate=fps, options={"qp": "20"} if codec == "libx264" else {})
        stream.codec_context.thread_count = 1
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video(digit_image: np.ndarray, digit: int, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """The digit moving across the frame in one of four directions, 8–32 frames, as mp4."""
    frames = int(rng.integers(8, 33))
    size = int(rng.choice([48, 64, 80]))
    glyph = size // 2
    direction = list(DIRECTIONS)[int(rng.integers(4))]
    dx, dy = DIRECTIONS[direction]
    pairs = contrasting_pairs()
    fg, bg = pairs[int(rng.integers(len(pairs)))]
    mask = _digit_mask(digit_image, glyph, glyph)
    travel = size - glyph
    pictures = []
    for i in range(frames):
        progress = i / (frames - 1)
        # Start at the edge opposite the direction of motion and cross the frame.
        x = round(travel * (progress if dx > 0 else 1 - progress)) if dx else travel // 2
        y = round(travel * (progress if dy > 0 else 1 - progress)) if dy else travel // 2
        canvas = np.zeros((size, size), np.float32)
        canvas[y:y + glyph, x:x + glyph] = mask
        pictures.append(_paint(canvas, fg, bg, rng))
    caption = f"a {digit} moving to the {direction}" if dx else f"a {digit} moving {direction}"
    return encode_mp4(pictures, fps=10), caption, {"direction": direction, "frames": frames}


@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8x8 digit images, their labels and the keyed order in which samples draw them (once per process)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target, keyed_rng(seed, "demo-order").permutation(len(digits.target))


def demo_sample(spec: DemoSpec, i: int) -> dict:
    """Sample `i` as a WebDataset dict, a pure function of (seed, i).

    The group is the source digit for images and videos alike, so a held-out handwritten digit is
    unseen in every modality (an image and a video drawn from one bitmap are near-duplicates).
    """
    images, targets, order = _digits(spec.seed)
    modality = MODALITY_CYCLE[i % 3]
    rng = keyed_rng(spec.seed, "demo-sample", i)
    source = int(order[(i // 3) % len(order)])
    digit = int(targets[source])
    key = f"demo{i:07d}"
    group = f"digit-{source}"
    if modality == "image":
        media, caption, extra = make_image(images[source], digit, rng)
        ext = "jpg"
    elif modality == "audio":
        media, caption, extra = make_audio(digit, rng)
        ext, group = "flac", f"tone-{key}"
    else:
        media, caption, extra = make_video(images[source], digit, rng)
        ext = "mp4"
    meta = {"key": key, "group": group, "modality": modality, "digit": digit, "caption": caption,
            "split": "eval" if is_heldout(group, spec.eval_fraction) else "train", **extra}
    return {"__key__": key, ext: media, "txt": caption, "json": json.dumps(meta, sort_keys=True)}


def demo_samples(spec: DemoSpec, workers: int = 1) -> Iterator[dict]:
    """The demo samples in order; `workers` > 1 encodes them in a process pool (same bytes)."""
    make = functools.partial(demo_sample, spec)
    if workers <= 1:
        yield from map(make, range(spec.samples))
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(make, range(spec.samples), chunksize=16)


def write_demo(out: str | Path, spec: DemoSpec, workers: int | None = None) -> tuple[list[Path], dict[str, int]]:
    """Write the demo shards into `out` (encoding on `workers` processes, default all cores); returns the
    shard paths and the count per modality."""
    counts = {m: 0 for m in MODALITY_CYCLE}
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    with ShardSink(out, prefix="demo", samples_per_shard=spec.samples_per_shard) as sink:
        for sample in demo_samples(spec, workers):
            counts[json.loads(sample["json"])["modality"]] += 1
            sink.write(sample)
    return sink.paths, counts
