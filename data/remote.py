"""Shards that are not local files: `pipe:` commands and URLs of any fsspec store (http(s), s3, gs, ...).

A URL whose store answers byte-range requests is read like a local file, one request per coalesced span.
A `pipe:` command, or a URL whose server ignores ranges, can only be read from the start: it is copied once,
sequentially, into a local `ShardCache`, and every later read of it is a local one. The cache is shared by
a node's loader workers (a lock file keeps two of them from copying the same shard) and keeps the most
recently used shards within its size limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec

_COPY_CHUNK = 1 << 22
_STDERR_TAIL = 2000
"""Bytes of a failed command's standard error kept for its error message."""


class NoRangeReads(OSError):
    """The store behind a URL cannot serve byte ranges (e.g. an HTTP server that ignores `Range`)."""


def is_pipe(url: str) -> bool:
    """True for `pipe:` commands (run by a shell; only ever from what a user typed)."""
    return url.startswith("pipe:")


def is_url(url: str) -> bool:
    """True for URLs with a scheme (`http://`, `s3://`, `file://`, ...), opened through fsspec."""
    return "://" in url and not is_pipe(url)


def check_protocols(urls: Iterable[str]) -> None:
    """Raise ValueError naming the first URL whose store fsspec cannot open (unknown scheme, missing package)."""
    seen: set[str] = set()
    for url in urls:
        protocol = url.split("://", 1)[0] if is_url(url) else ""
        if protocol and protocol not in seen:
            seen.add(protocol)
            try:
                fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as err:
                raise ValueError(f"cannot open {url}: {err}") from None


class PipeStream(io.RawIOBase):
    """The standard output of a `pipe:` shell command, read forward.

    Closing it after the end of the output raises OSError with the command's exit code and the tail of its
    standard error when it failed; closing it earlier stops the command, which is not a failure.
    """

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=self._stderr, start_new_session=True)
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        count = self._proc.stdout.readinto(buffer)
        self._ended = self._ended or not count
        return count

    def close(self) -> None:
        if self.closed:
            return
        self._proc.stdout.close()
        if not self._ended:  # stopped early: end the command's whole process group, whatever it is doing
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
        code = self._proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read()[-_STDERR_TAIL:].decode(errors="replace").strip()
        self._stderr.close()
        super().close()
        if code and self._ended:
            raise OSError(f"pipe:{self.command} exited {code}" + (f": {tail}" if tail else ""))


def drain(stream: BinaryIO) -> None:
    """Read a stream to its end (so that closing a `pipe:` reports the command's exit code)."""
    while stream.read(_COPY_CHUNK):
        pass


def open_stream(url: str) -> BinaryIO:
    """The shard as a forward-only binary stream (closing a failed `pipe:` raises with its exit code)."""
    if is_pipe(url):
        return io.BufferedReader(PipeStream(url[len("pipe:"):]), _COPY_CHUNK)
    return fsspec.open(url, "rb", block_size=0).open()


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes (fewer only at the end of the stream), however the stream splits its reads."""
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def open_shard(url: str, cache: ShardCache) -> BinaryIO:
    """The whole shard as a binary stream from its start: a `pipe:` from its local copy (made once), a URL
    streamed, a path opened."""
    if is_pipe(url):
        return open(cache.local_copy(url), "rb")
    return open_stream(url) if is_url(url) else open(url, "rb")


def read_ranges(url: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (start, end) span of a URL shard by range requests (short at the end of the file).

    Raises NoRangeReads when the store answers with the whole file instead.
    """
    try:
        fs, path = fsspec.core.url_to_fs(url)
        with fs.open(path, "rb", cache_type="none") as handle:
            if getattr(handle, "size", None) is None or not handle.seekable():  # fsspec's streamed HTTP file
                raise NoRangeReads(f"{url}: the store cannot seek")
            out = []
            for start, end in spans:
                handle.seek(start)
                out.append(read_exactly(handle, end - start))
            return out
    except ValueError as err:  # fsspec's HTTP file, when the server answers a range with the whole body
        raise NoRangeReads(f"{url}: {err}") from None
    except OSError:
        raise
    except Exception as err:  # a store's own errors (e.g. an HTTP 5xx) are I/O errors of this shard
        raise OSError(f"{url}: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class ShardCache:
    """Local copies of streamed shards under `root`, the least recently used removed beyond `max_bytes`."""

    root: str = ""
    """Folder of the copies; empty = `plait-shard-cache-<uid>` in the system temporary folder."""
    max_bytes: int = 8 << 30
    """Size the copies are kept within (a shard being copied may exceed it on its own)."""

    def folder(self) -> Path:
        """The cache folder (created on first use)."""
        folder = Path(self.root or os.path.join(tempfile.gettempdir(), f"plait-shard-cache-{os.getuid()}"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _path(self, url: str) -> Path:
        return self.folder() / (hashlib.blake2b(url.encode(), digest_size=12).hexdigest() + ".tar")

    def cached(self, url: str) -> str | None:
        """Path of the shard's local copy (marked as just used), or None when there is none."""
        path = self._path(url)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return str(path)

    def local_copy(self, url: str) -> str:
        """Path of a complete local copy of the shard, copying it first (once per node) when there is none."""
        path = self._path(url)
        if self.cached(url):
            return str(path)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                self._copy(url, path)
                self._evict(keep=path)
        return str(path)

    def _copy(self, url: str, path: Path) -> None:
        """Stream the shard into `path` through a temporary name, so a failed copy leaves nothing behind."""
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        try:
            with open_stream(url) as stream, open(partial, "wb") as out:
                shutil.copyfileobj(stream, out, _COPY_CHUNK)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used copies (never `keep`) until the rest fit in `max_bytes`."""
        copies = []
        for copy in self.folder().glob("*.tar"):
            try:
                copies.append((copy.stat(), copy))
            except FileNotFoundError:  # another node-local worker evicted it meanwhile
                continue
        total = 0
        for stat, copy in sorted(copies, key=lambda c: c[0].st_mtime, reverse=True):
            total += stat.st_size
            if total > self.max_bytes and copy != keep:
                copy.unlink(missing_ok=True)
