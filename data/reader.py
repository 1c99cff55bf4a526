"""Fetch the bytes of planned samples: byte ranges of local shards, one forward pass over streamed ones.

The refs of one micro-batch are grouped by shard. A local shard is read with `os.pread` over
coalesced ranges (neighbouring samples become one sequential read); a `pipe:` or URL shard is
opened once with webdataset's `gopen` and read forward, skipping to each sample's offset. Each
fragment (a sample's headers and members, as the manifest recorded it) is parsed with
`plait.data.tar_scan.iter_samples`. A sample that cannot be fetched is returned with the reason,
never raised, so one bad sample costs only itself.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import webdataset as wds

from plait.data.plan_types import SampleRef
from plait.data.shardlist import is_remote
from plait.data.tar_scan import ScannedSample, iter_samples

READ_REASONS = ("unreadable", "corrupt", "truncated", "oversized")
"""Why a sample can fail before decoding: shard I/O error, tar/key mismatch, shard ends inside it, too big to read."""
COALESCE_GAP = 1 << 20
"""Local reads: samples closer than this many bytes share one read (reading a gap beats a seek)."""
_SKIP_CHUNK = 1 << 20


@dataclass
class FetchedSample:
    """One planned sample's members, or why they could not be read."""

    ref: SampleRef
    """The planned sample."""
    sample: ScannedSample | None
    """Its members (data included), None when `reason` is set."""
    reason: str = ""
    """Empty when usable, else one of READ_REASONS."""
    detail: str = ""
    """What went wrong, for logs."""


def missing_shards(shards: Iterable[str]) -> list[str]:
    """Local shards that do not exist (streamed `pipe:`/URL shards cannot be checked without reading them)."""
    return sorted({s for s in shards if not is_remote(s) and not os.path.isfile(s)})


def check_shards(shards: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the missing local shards, so a run fails at start and not mid-epoch."""
    missing = missing_shards(shards)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")


def coalesce(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int, list[int]]]:
    """Merge (offset, size) ranges, in offset order, into spans (start, end, range indices) where gaps are <= gap."""
    spans: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(ranges)), key=lambda j: ranges[j][0]):
        start, end = ranges[i][0], ranges[i][0] + ranges[i][1]
        if spans and start - spans[-1][1] <= gap:
            first, last, members = spans[-1]
            spans[-1] = (first, max(last, end), members + [i])
        else:
            spans.append((start, end, [i]))
    return spans


def read_local(path: str, ranges: Sequence[tuple[int, int]], gap: int = COALESCE_GAP) -> list[bytes]:
    """The bytes of each (offset, size) range of a local file (short at the end of the file)."""
    out: list[bytes] = [b""] * len(ranges)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end, members in coalesce(ranges, gap):
            view = memoryview(os.pread(fd, end - start, start))
            for i in members:
                offset, size = ranges[i]
                out[i] = bytes(view[offset - start: offset - start + size])
    finally:
        os.close(fd)
    return out


def _read_exactly(stream: io.RawIOBase, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the stream)."""
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_stream(url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, size) range of a `pipe:`/URL shard, from one forward pass over it.

    Raises OSError when the stream ends early because its producer failed (e.g. `pipe:` exit status).
    """
    out: list[bytes] = [b""] * len(ranges)
    stream = wds.gopen(url, "rb")
    try:
        complete = _read_forward(stream, ranges, out)
    except BaseException:
        _close_quietly(stream)
        raise
    if complete:
        _close_quietly(stream)
    else:
        stream.close()  # a failed producer reports its exit status here
    return out


def _read_forward(stream: io.RawIOBase, ranges: Sequence[tuple[int, int]], out: list[bytes]) -> bool:
    """Fill `out` with the ranges, skipping forward between them; False when the stream ended first."""
    position = 0
    for start, end, members in coalesce(ranges, 0):
        while position < start:
            skipped = len(_read_exactly(stream, min(_SKIP_CHUNK, start - position)))
            if not skipped:
                return False
            position += skipped
        span = _read_exactly(stream, end - start)
        position += len(span)
        for i in members:
            offset, size = ranges[i]
            out[i] = span[offset - start: offset - start + size]
        if len(span) < end - start:
            return False
    return True


def _close_quietly(stream: object) -> None:
    """Close a gopen stream without raising on the producer's exit status.

    Stopping before the end makes a `pipe:` producer die of SIGPIPE; short reads already flagged
    every sample the stream failed to deliver.
    """
    if hasattr(stream, "ignore_errors"):
        stream.ignore_errors = True
    stream.close()


def parse_fragment(ref: SampleRef, fragment: bytes) -> FetchedSample:
    """Parse one sample's tar fragment and check it is the planned sample, complete and intact."""
    if len(fragment) < ref.sample_size:
        detail = f"{len(fragment)} of {ref.sample_size} bytes at {ref.sample_offset}"
        return FetchedSample(ref, None, "truncated", detail)
    problems: list[str] = []
    found = [s for s in iter_samples(io.BytesIO(fragment), problems) if s.key == ref.key]
    if not found:
        return FetchedSample(ref, None, "corrupt", f"no sample {ref.key!r} at offset {ref.sample_offset}; "
                                                   + "; ".join(problems))
    sample = found[0]
    trouble = problems + sample.problems
    if len(found) > 1 or trouble:
        reason = "truncated" if any("truncated" in p for p in trouble) else "corrupt"
        return FetchedSample(ref, None, reason, "; ".join(trouble) or "key repeated in fragment")
    return FetchedSample(ref, sample)


def fetch_samples(refs: Sequence[SampleRef], gap: int = COALESCE_GAP, max_bytes: int = 0) -> list[FetchedSample]:
    """Fetch and parse every ref (result in `refs` order), each shard opened once.

    Samples over `max_bytes` (0: no limit) are reported oversized without being read.
    """
    out: list[FetchedSample | None] = [None] * len(refs)
    by_shard: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        if max_bytes and ref.sample_size > max_bytes:
            out[i] = FetchedSample(ref, None, "oversized", f"{ref.sample_size} bytes, limit {max_bytes}")
        else:
            by_shard.setdefault(ref.shard, []).append(i)
    for shard, indices in by_shard.items():
        for i, result in zip(indices, _fetch_shard(shard, [refs[i] for i in indices], gap)):
            out[i] = result
    return out  # type: ignore[return-value]  # every slot was filled above


def _fetch_shard(shard: str, refs: list[SampleRef], gap: int) -> Iterator[FetchedSample]:
    """Fetch the refs of one shard; an I/O failure marks them all unreadable."""
    ranges = [(ref.sample_offset, ref.sample_size) for ref in refs]
    try:
        fragments = read_stream(shard, ranges) if is_remote(shard) else read_local(shard, ranges, gap)
    except OSError as err:
        for ref in refs:
            yield FetchedSample(ref, None, "unreadable", f"{type(err).__name__}: {err}")
        return
    for ref, fragment in zip(refs, fragments):
        yield parse_fragment(ref, fragment)
