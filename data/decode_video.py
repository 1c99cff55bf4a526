"""Video: which frames to take (TSN segments or a dense run) and decoding only those frames with PyAV.

Frame choice is a pure function of (frame count, fps, wanted frames, mode, generator), so the
plan and any worker agree on it. Decoding seeks to the keyframe before a wanted frame when the
next wanted frame is far ahead, decodes forward, and converts (resize + RGB in one swscale call)
only the wanted frames.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Literal

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter

from plait.data.decode_errors import DecodeError
from plait.data.media import MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

SamplingMode = Literal["uniform", "random", "dense"]
"""`uniform`: TSN at eval (segment centres); `random`: TSN in training (one random frame per segment);
`dense`: consecutive frames at a chosen frame rate."""
_END_SLACK = 3  # frame counts from headers or duration x fps can overstate by a frame or two; more is a cut file


def _window(num_frames: int, fps: float, start_s: float, span_s: float) -> tuple[int, int]:
    """[first, last) native frames covering [start_s, start_s + span_s); span 0 means to the end."""
    first = min(max(int(math.floor(start_s * fps)), 0), num_frames - 1) if start_s > 0 else 0
    last = num_frames if span_s <= 0 else min(num_frames, int(math.ceil((start_s + span_s) * fps)))
    return first, max(last, first + 1)


def sample_frame_indices(num_frames: int, fps: float, wanted: int, mode: SamplingMode,
                         rng: np.random.Generator | None = None, *, start_s: float = 0.0, span_s: float = 0.0,
                         sample_fps: float = 0.0, jitter: float = 1.0) -> np.ndarray:
    """Sorted int64 indices of the `wanted` frames to decode from a clip of `num_frames` at `fps`.

    The window [start_s, start_s + span_s) (default: the whole clip) is cut into `wanted` equal
    segments. `uniform` takes each segment's centre; `random` takes one frame per segment at
    centre + jitter * U(-1/2, 1/2) of a segment (jitter 1 = anywhere in it, TSN). `dense` takes
    frames fps / sample_fps apart (sample_fps 0: consecutive), starting at a random point of the
    window's slack (scaled by jitter) when `rng` is given, else centred. Too short a window repeats frames.
    """
    if num_frames < 1 or wanted < 1:
        raise ValueError(f"num_frames, wanted: must be >= 1, got {num_frames}, {wanted}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter: must be in [0, 1], got {jitter}")
    if not fps > 0 and (start_s > 0 or span_s > 0 or sample_fps > 0):
        raise ValueError(f"fps: a time window or sample_fps needs a positive fps, got {fps}")
    first, last = _window(num_frames, fps, start_s, span_s)
    length = last - first
    steps = np.arange(wanted, dtype=np.float64)
    if mode == "dense":
        stride = fps / sample_fps if sample_fps > 0 else 1.0
        slack = max(length - (wanted - 1) * stride - 1, 0.0)
        offset = slack * (0.5 + jitter * (rng.random() - 0.5)) if rng is not None else slack / 2
        positions = offset + steps * stride
    elif mode in ("uniform", "random"):
        if mode == "random" and rng is None:
            raise ValueError("rng: random (training) sampling needs a generator")
        within = 0.5 + jitter * (rng.random(wanted) - 0.5) if mode == "random" else 0.5
        positions = (steps + within) * length / wanted
    else:
        raise ValueError(f"mode: must be uniform, random or dense, got {mode!r}")
    return first + np.minimum(np.floor(positions).astype(np.int64), length - 1)


class _FrameIndexer:
    """Native frame index of a decoded frame from its timestamp, and the timestamp to seek to for an index."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        rate = stream.average_rate or stream.guessed_rate
        self.rate = Fraction(rate) if rate else None
        self.time_base = Fraction(stream.time_base) if stream.time_base else None
        self.start = stream.start_time or 0
        self.previous = -1

    @property
    def can_seek(self) -> bool:
        """Seeking needs timestamps ↔ frame numbers, i.e. a frame rate and a time base."""
        return self.rate is not None and self.time_base is not None

    def index(self, frame: av.VideoFrame) -> int:
        """Frame number of `frame`; counts frames when timestamps are missing."""
        if self.can_seek and frame.pts is not None:
            self.previous = round((frame.pts - self.start) * self.time_base * self.rate)
        else:
            self.previous += 1
        return self.previous

    def pts(self, index: int) -> int:
        """Stream timestamp at which frame `index` is shown."""
        return self.start + math.floor(Fraction(index) / (self.rate * self.time_base))


def _open(data: bytes, max_pixels: int) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """Open the container and its first video stream, rejecting empty, unreadable and oversized input."""
    if not data:
        raise DecodeError("empty", "zero-byte video")
    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, ValueError, OSError) as err:
        raise DecodeError("undecodable", f"{type(err).__name__}: {err}") from None
    try:
        return container, _video_stream(container, max_pixels)
    except DecodeError:
        container.close()
        raise


def _video_stream(container: av.container.InputContainer, max_pixels: int) -> av.video.stream.VideoStream:
    """The first video stream, if it has a sane frame size."""
    if not container.streams.video:
        raise DecodeError("empty", "no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise DecodeError("oversized", f"video frames are {width}x{height}, more than {max_pixels} pixels")
    if width <= 0 or height <= 0:
        raise DecodeError("empty", f"video frames are {width}x{height}")
    return stream


def _seek(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          indexer: _FrameIndexer, target: int) -> Iterator[av.VideoFrame]:
    """Frames from the keyframe at or before `target`; from the top if the demuxer lands past it."""
    container.seek(indexer.pts(target), stream=stream, backward=True)
    frames = container.decode(stream)
    first = next(frames, None)
    if first is not None and indexer.index(first) <= target:
        return itertools.chain([first], frames)
    container.seek(indexer.start, stream=stream, backward=True)
    return container.decode(stream)


def _advance(frames: Iterator[av.VideoFrame], indexer: _FrameIndexer,
             target: int) -> tuple[int, av.VideoFrame] | None:
    """Decode forward to the first frame numbered `target` or later; at the end of the stream the
    last frame seen (numbered below target), or None if there was none."""
    found = None
    for frame in frames:
        found = indexer.index(frame), frame
        if found[0] >= target:
            break
    return found


def _decode_wanted(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                   targets: np.ndarray, seek_gap: int) -> Iterator[tuple[int, int, av.VideoFrame]]:
    """Yield (target, index, frame) per sorted unique target: the first frame numbered target or
    later, or once the stream has ended, its last frame (index < target)."""
    indexer = _FrameIndexer(stream)
    frames = container.decode(stream)
    current, latest, ended = -1, None, False
    for target in targets.tolist():
        if not ended and (latest is None or current < target):  # else a timestamp gap already passed it
            if indexer.can_seek and target - current > seek_gap and target > seek_gap:
                frames = _seek(container, stream, indexer, target)
            found = _advance(frames, indexer, target)
            if found is not None:
                current, latest = found
            ended = found is None or current < target
            if latest is None:
                return
        yield target, current, latest


def decode_video(data: bytes, indices: Sequence[int] | np.ndarray, height: int | None = None,
                 width: int | None = None, *, seek_gap: int = 48, max_pixels: int = MAX_IMAGE_PIXELS,
                 threads: int = 1) -> torch.Tensor:
    """Decode the frames at `indices` (native frame numbers) to uint8 [len(indices), 3, height, width].

    None keeps the native size. Wanted frames just past the real end (the container overstated
    its length by a frame or two) repeat the last frame; any further and the file counts as truncated.
    `seek_gap`: seek instead of decoding forward when the next wanted frame is further ahead
    than this (about a keyframe interval). `threads`: decoder threads; 1 suits DataLoader workers,
    which already use every core. Raises DecodeError.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0 or (indices < 0).any():
        raise ValueError(f"indices: need a non-empty 1-D list of frame numbers >= 0, got {indices}")
    targets = np.unique(indices)
    container, stream = _open(data, max_pixels)
    stream.codec_context.thread_count = threads
    size = {"width": width or stream.codec_context.width, "height": height or stream.codec_context.height}
    got: dict[int, np.ndarray] = {}
    # One single-threaded scaler per clip: `to_ndarray(width=..)` starts a libswscale thread pool for every
    # frame (about 10x the cost), and a pool inherited through fork would hang a DataLoader worker.
    rgb = VideoReformatter()
    try:
        last_frame, last_pixels = None, None  # a frame reused for several targets is converted once
        for target, index, frame in _decode_wanted(container, stream, targets, seek_gap):
            if target - index > _END_SLACK:
                raise DecodeError("truncated", f"frame {target} wanted, the stream ends at frame {index}")
            if frame is not last_frame:
                scaled = rgb.reformat(frame, format="rgb24", interpolation="BILINEAR", threads=1, **size)
                last_frame, last_pixels = frame, scaled.to_ndarray()
            got[target] = last_pixels
    except av.FFmpegError as err:
        logger.debug("video decode stopped early: %s", err)
    finally:
        container.close()
    if len(got) < len(targets):
        raise DecodeError("truncated", f"decoded {len(got)} of {len(targets)} wanted frames")
    stacked = np.stack([got[int(i)] for i in indices])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
