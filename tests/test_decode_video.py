"""Video decoder: TSN / dense frame choice properties, decoding exactly the wanted frames, skip reasons."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from plait.data.decode_errors import DecodeError
from plait.data.decode_video import decode_video, sample_frame_indices
from plait.data.demo import make_video, video_codec
from plait.data.rng import keyed_rng

SIDE = 32


def _numbered_mp4(frames: int, keyint: int = 8, fps: int = 10, path: Path | None = None) -> bytes:
    """An mp4 whose frame i shows i: left half (i // 16) * 16, right half (i % 16) * 16 (PyAV, constant QP).

    With a `path` the file is written there with the index (moov) first, as streaming sites serve it.
    """
    target = io.BytesIO() if path is None else str(path)
    options = {} if path is None else {"movflags": "faststart"}
    with av.open(target, mode="w", format="mp4", options=options) as container:
        codec = video_codec()
        options = {"qp": "20", "g": str(keyint)} if codec == "libx264" else {"g": str(keyint)}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.codec_context.thread_count = 1
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.empty((SIDE, SIDE, 3), np.uint8)
            pixels[:, : SIDE // 2] = (i // 16) * 16
            pixels[:, SIDE // 2:] = (i % 16) * 16
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return target.getvalue() if path is None else path.read_bytes()


def _frame_numbers(video: torch.Tensor) -> list[int]:
    """Read back the number each decoded frame shows (centre pixels, away from chroma edges)."""
    left = video[:, :, 8:24, 4:12].float().mean((1, 2, 3))
    right = video[:, :, 8:24, 20:28].float().mean((1, 2, 3))
    return (torch.round(left / 16) * 16 + torch.round(right / 16)).long().tolist()


@pytest.fixture(scope="module")
def numbered() -> bytes:
    return _numbered_mp4(120)


def test_uniform_is_evenly_spaced_segment_centres() -> None:
    idx = sample_frame_indices(100, 25.0, 8, "uniform")
    assert idx.tolist() == [6, 18, 31, 43, 56, 68, 81, 93]
    idx = sample_frame_indices(301, 30.0, 16, "uniform")
    gaps = np.diff(idx)
    assert idx.dtype == np.int64 and idx.min() >= 0 and idx.max() < 301 and gaps.max() - gaps.min() <= 1


def test_random_takes_one_frame_inside_each_segment() -> None:
    num, wanted = 97, 8
    seg = num / wanted
    draws = [sample_frame_indices(num, 30.0, wanted, "random", keyed_rng(0, "video", i)) for i in range(50)]
    for idx in draws:
        lo, hi = np.floor(np.arange(wanted) * seg), np.ceil((np.arange(wanted) + 1) * seg) - 1
        assert np.all((idx >= lo) & (idx <= hi))
    assert len({tuple(d) for d in draws}) > 40  # they really vary
    again = sample_frame_indices(num, 30.0, wanted, "random", keyed_rng(0, "video", 3))
    assert np.array_equal(again, draws[3])
    no_jitter = sample_frame_indices(num, 30.0, wanted, "random", keyed_rng(0, "video", 3), jitter=0.0)
    assert np.array_equal(no_jitter, sample_frame_indices(num, 30.0, wanted, "uniform"))
    with pytest.raises(ValueError, match="rng"):
        sample_frame_indices(num, 30.0, wanted, "random")


def test_dense_takes_frames_at_the_sample_rate() -> None:
    assert sample_frame_indices(100, 30.0, 4, "dense").tolist() == [48, 49, 50, 51]  # centred
    idx = sample_frame_indices(300, 30.0, 8, "dense", sample_fps=10.0)
    assert np.all(np.diff(idx) == 3)
    starts = {int(sample_frame_indices(300, 30.0, 8, "dense", keyed_rng(1, i), sample_fps=10.0)[0])
              for i in range(40)}
    assert min(starts) >= 0 and max(starts) <= 300 - 1 - 21 and len(starts) > 20


def test_time_window_and_short_clips() -> None:
    idx = sample_frame_indices(1000, 25.0, 8, "uniform", start_s=10.0, span_s=4.0)
    assert idx.min() >= 250 and idx.max() < 350
    short = sample_frame_indices(5, 10.0, 8, "uniform")
    assert short.min() >= 0 and short.max() == 4 and np.all(np.diff(short) >= 0) and set(short) == set(range(5))
    dense = sample_frame_indices(5, 10.0, 8, "dense")
    assert dense.tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


@pytest.mark.parametrize("seek_gap", [4, 1000])
def test_decode_returns_exactly_the_requested_frames(numbered: bytes, seek_gap: int) -> None:
    wanted = [0, 5, 17, 33, 70, 71, 119]
    video = decode_video(numbered, wanted, seek_gap=seek_gap)
    assert video.shape == (len(wanted), 3, SIDE, SIDE) and video.dtype == torch.uint8
    assert _frame_numbers(video) == wanted
    with av.open(io.BytesIO(numbered)) as container:  # reference: every frame, decoded in order
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert torch.equal(video, torch.from_numpy(full[wanted]).permute(0, 3, 1, 2))


def test_decode_keeps_request_order_and_repeats(numbered: bytes) -> None:
    wanted = [90, 3, 90, 45, 3]
    assert _frame_numbers(decode_video(numbered, wanted, seek_gap=8)) == wanted


def test_tsn_indices_decode_to_themselves(numbered: bytes) -> None:
    idx = sample_frame_indices(120, 10.0, 8, "random", keyed_rng(5, "clip"))
    assert _frame_numbers(decode_video(numbered, idx, seek_gap=10)) == idx.tolist()


def test_seeking_gives_bit_identical_frames_to_a_full_decode() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    data, _, extra = make_video(digits.images[0], int(digits.target[0]), keyed_rng(0, "test-video"))
    with av.open(io.BytesIO(data)) as container:
        full = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(full) == extra["frames"]
    idx = sample_frame_indices(len(full), 10.0, 4, "uniform")
    for gap in (1, 1000):
        got = decode_video(data, idx, seek_gap=gap)
        assert torch.equal(got, torch.from_numpy(full[idx]).permute(0, 3, 1, 2))


def test_resize_to_target(numbered: bytes) -> None:
    video = decode_video(numbered, [10, 20], height=16, width=48)
    assert video.shape == (2, 3, 16, 48)
    assert _frame_numbers(decode_video(numbered, [10, 20], height=SIDE, width=SIDE)) == [10, 20]


def test_frames_past_the_end(numbered: bytes) -> None:
    video = decode_video(numbered, [100, 119, 120])  # the container may overstate its length by a frame
    assert _frame_numbers(video) == [100, 119, 119]
    with pytest.raises(DecodeError) as err:
        decode_video(numbered, [10, 130, 140, 150])
    assert err.value.reason == "truncated"


def test_bad_video_bytes(numbered: bytes) -> None:
    cases = {b"": "empty", b"definitely not a video" * 30: "undecodable"}
    for data, reason in cases.items():
        with pytest.raises(DecodeError) as err:
            decode_video(data, [0])
        assert err.value.reason == reason
    with pytest.raises(DecodeError) as err:
        decode_video(numbered[: len(numbered) // 2], [0, 60, 110])
    assert err.value.reason in ("truncated", "undecodable")
    with pytest.raises(DecodeError) as err:
        decode_video(numbered, [0], max_pixels=SIDE * SIDE - 1)
    assert err.value.reason == "oversized"


def test_cut_faststart_mp4_decodes_its_head_and_reports_its_tail(tmp_path: Path) -> None:
    data = _numbered_mp4(120, path=tmp_path / "faststart.mp4")
    assert data[4:8] == b"ftyp" and b"moov" in data[:64]
    head = data[: int(len(data) * 0.6)]
    assert _frame_numbers(decode_video(head, [0, 10, 15])) == [0, 10, 15]
    with pytest.raises(DecodeError) as err:
        decode_video(head, [0, 60, 115])
    assert err.value.reason == "truncated"


def _decoded_shape(data: bytes) -> tuple[int, ...]:
    return tuple(decode_video(data, [0, 5], 16, 16).shape)


def test_scaling_starts_no_threads_so_forked_workers_decode(numbered: bytes) -> None:
    def native_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    decode_video(numbered, [0, 5], 16, 16)  # the parent scales first, as the loader does with 0 workers
    before = native_threads()
    assert decode_video(numbered, [1, 7, 9], 16, 16).shape == (3, 3, 16, 16)
    assert native_threads() == before
    # A scaler thread pool inherited through fork hung DataLoader workers; a forked child must decode.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_decoded_shape, (numbered,)).get(timeout=60) == (2, 3, 16, 16)
