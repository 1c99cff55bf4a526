"""Fetch the bytes of planned samples: byte ranges of local shards, one forward pass over streamed ones.

The refs of one micro-batch are grouped by shard and their ranges coalesced (neighbouring samples
become one read). A local shard is read with `os.pread`, a URL shard by range requests, and a `pipe:`
shard (or a URL whose server ignores ranges) from its local copy (`plait.data.remote.ShardCache`). Each
fragment (a sample's headers and members, as the manifest recorded it) is parsed with
`plait.data.tar_scan.iter_samples`. A sample that cannot be fetched is returned with the reason,
never raised, so one bad sample costs only itself.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from plait.data.plan_types import SampleRef
from plait.data.remote import NoRangeReads, ShardCache, check_protocols, is_url, read_ranges
from plait.data.shardlist import is_remote
from plait.data.tar_scan import ScannedSample, iter_samples

READ_REASONS = ("unreadable", "corrupt", "truncated", "oversized")
"""Why a sample can fail before decoding: shard I/O error, tar/key mismatch, shard ends inside it, too big to read."""
COALESCE_GAP = 1 << 20
"""Local reads: samples closer than this many bytes share one read (reading a gap beats a seek)."""


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
    """Raise FileNotFoundError naming the missing local shards (ValueError for a URL no installed store opens),
    so a run fails at start and not mid-epoch."""
    shards = list(shards)
    try:
        check_protocols(shards)
    except ValueError as err:
        raise ValueError(f"shards: {err}") from None
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


def _split(ranges: Sequence[tuple[int, int]], spans: list[tuple[int, int, list[int]]],
           data: Sequence[bytes]) -> list[bytes]:
    """The bytes of each range, cut out of the bytes read for the coalesced spans holding them."""
    out: list[bytes] = [b""] * len(ranges)
    for (start, _, members), span in zip(spans, data):
        view = memoryview(span)
        for i in members:
            offset, size = ranges[i]
            out[i] = bytes(view[offset - start: offset - start + size])
    return out


def read_local(path: str, ranges: Sequence[tuple[int, int]], gap: int = COALESCE_GAP) -> list[bytes]:
    """The bytes of each (offset, size) range of a local file (short at the end of the file)."""
    spans = coalesce(ranges, gap)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _split(ranges, spans, [os.pread(fd, end - start, start) for start, end, _ in spans])
    finally:
        os.close(fd)


def read_shard(shard: str, ranges: Sequence[tuple[int, int]], gap: int = COALESCE_GAP,
               cache: ShardCache | None = None) -> list[bytes]:
    """The bytes of each (offset, size) range of a local, URL or `pipe:` shard.

    URLs are read by range requests; a `pipe:` or a URL without range support is read from its local copy.
    """
    if not is_remote(shard):
        return read_local(shard, ranges, gap)
    cache = cache or ShardCache()
    copy = cache.cached(shard)
    if copy is None and is_url(shard):
        spans = coalesce(ranges, gap)
        try:
            return _split(ranges, spans, read_ranges(shard, [(start, end) for start, end, _ in spans]))
        except NoRangeReads:
            pass
    try:
        return read_local(copy or cache.local_copy(shard), ranges, gap)
    except FileNotFoundError:  # evicted by another worker between the lookup and the read
        return read_local(cache.local_copy(shard), ranges, gap)


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


def fetch_samples(refs: Sequence[SampleRef], gap: int = COALESCE_GAP, max_bytes: int = 0,
                  cache: ShardCache | None = None) -> list[FetchedSample]:
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
        for i, result in zip(indices, _fetch_shard(shard, [refs[i] for i in indices], gap, cache)):
            out[i] = result
    return out  # type: ignore[return-value]  # every slot was filled above


def _fetch_shard(shard: str, refs: list[SampleRef], gap: int, cache: ShardCache | None) -> Iterator[FetchedSample]:
    """Fetch the refs of one shard; an I/O failure marks them all unreadable."""
    ranges = [(ref.sample_offset, ref.sample_size) for ref in refs]
    try:
        fragments = read_shard(shard, ranges, gap, cache)
    except OSError as err:
        for ref in refs:
            yield FetchedSample(ref, None, "unreadable", f"{type(err).__name__}: {err}")
        return
    for ref, fragment in zip(refs, fragments):
        yield parse_fragment(ref, fragment)
