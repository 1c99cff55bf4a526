"""Walk a tar stream sample by sample, with byte offsets, surviving corrupt headers and truncation."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

BLOCK = tarfile.BLOCKSIZE


@dataclass
class Member:
    """One tar member: `KEY.EXT` with the byte range of its header and data."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    data: bytes | None
    """The member's bytes, or None when the stream ended inside them (truncated)."""

    @property
    def end(self) -> int:
        """Offset just past the member's data padding (where the next header starts)."""
        return self.data_offset + -(-self.size // BLOCK) * BLOCK


@dataclass
class ScannedSample:
    """Consecutive members sharing a key, as webdataset groups them."""

    key: str
    members: dict[str, Member] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Reasons this sample is unusable found while reading (duplicate member, truncation)."""

    @property
    def offset(self) -> int:
        """Header offset of the first member."""
        return min(m.header_offset for m in self.members.values())

    @property
    def size(self) -> int:
        """Bytes from the first header to the end of the last member: a readable tar fragment."""
        return max(m.end for m in self.members.values()) - self.offset


def split_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` → (`dir/abc`, `seg.jpg`): the key ends at the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def iter_members(stream: IO[bytes], problems: list[str]) -> Iterator[Member]:
    """Yield members of a tar stream; corrupt headers are skipped and reported in `problems`."""
    expected = 0
    try:
        # ignore_zeros makes tarfile scan past an invalid header block by block instead of stopping silently.
        tar = tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True)
    except (tarfile.ReadError, EOFError) as err:
        problems.append("empty shard (no samples)" if "empty" in str(err) else f"unreadable tar: {err}")
        return
    with tar:
        try:
            for info in tar:
                if info.offset != expected:
                    problems.append(f"corrupt tar data: skipped bytes {expected}..{info.offset}")
                if not info.isfile():
                    expected = info.offset_data
                    continue
                member = Member(info.name, info.offset, info.offset_data, info.size, None)
                try:
                    member.data = tar.extractfile(info).read()
                except (tarfile.ReadError, OSError, EOFError) as err:
                    problems.append(f"truncated tar: member {info.name}: {err}")
                    yield member
                    return
                expected = member.end
                yield member
        except (tarfile.ReadError, EOFError) as err:
            problems.append(f"truncated or unreadable tar: {err}")


def iter_samples(stream: IO[bytes], problems: list[str]) -> Iterator[ScannedSample]:
    """Group members into samples by key; shard-level problems are appended to `problems`."""
    current: ScannedSample | None = None
    for member in iter_members(stream, problems):
        key, ext = split_name(member.name)
        if current is not None and key != current.key:
            yield current
            current = None
        if current is None:
            current = ScannedSample(key)
        if member.data is None:
            current.problems.append("truncated member")
        if ext in current.members:
            current.problems.append(f"duplicate member {ext}")
        current.members[ext] = member
    if current is not None:
        yield current
