"""`plait shards build`: WebDataset shards from a folder of media + captions, or from a JSONL/CSV/Parquet table."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq

from plait.data.media import modality_of, normalize_ext, sniff_ext
from plait.data.shard_writer import ShardSink

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "file", "filepath", "filename", "media", "image", "audio", "video")
BYTES_COLUMNS = ("bytes", "data", "image_bytes", "media_bytes")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
KEY_COLUMNS = ("id", "key", "uid")
GROUP_COLUMNS = ("group", "group_id")


@dataclass
class Record:
    """One sample to write, or the reason it was skipped."""

    key: str
    ext: str = ""
    media: bytes = b""
    caption: str = ""
    meta: dict | None = None
    skip: str = ""


def safe_key(text: str) -> str:
    """A webdataset key: no dots (they separate extensions) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "sample"


def folder_records(root: Path) -> Iterator[Record]:
    """Media files under `root` with a same-stem `.txt` caption and optional `.json` metadata."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = normalize_ext(path.suffix)
        if modality_of(ext) is None:
            continue
        key = safe_key(str(path.relative_to(root).with_suffix("")))
        caption_path, meta_path = path.with_suffix(".txt"), path.with_suffix(".json")
        if not caption_path.exists():
            yield Record(key, skip=f"{path}: no caption file {caption_path.name}")
            continue
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        yield Record(key, ext, path.read_bytes(), caption_path.read_text().strip(), meta)


def read_table(path: Path) -> pa.Table:
    """A JSONL, CSV or Parquet table."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return pyarrow.json.read_json(path)
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        return pyarrow.csv.read_csv(path, parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter))
    if suffix == ".parquet":
        return pq.read_table(path)
    raise ValueError(f"{path}: unsupported table format {suffix!r} (expected .jsonl, .csv or .parquet)")


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], path: Path, what: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{path}: no column {wanted!r} for the {what} (columns: {', '.join(columns)})")
        return wanted
    return next((c for c in candidates if c in columns), None)


def table_records(path: Path, columns: dict[str, str | None]) -> Iterator[Record]:
    """Rows of a table with a path or bytes column, a caption column and optional id/group columns."""
    table = read_table(path)
    names = table.column_names
    media_col = _pick(names, columns.get("path"), PATH_COLUMNS, path, "media path")
    bytes_col = _pick(names, columns.get("bytes"), BYTES_COLUMNS, path, "media bytes")
    caption_col = _pick(names, columns.get("caption"), CAPTION_COLUMNS, path, "caption")
    key_col = _pick(names, columns.get("key"), KEY_COLUMNS, path, "sample id")
    group_col = _pick(names, columns.get("group"), GROUP_COLUMNS, path, "group")
    if caption_col is None or (media_col is None and bytes_col is None):
        raise ValueError(f"{path}: needs a caption column and a path or bytes column (columns: {', '.join(names)})")
    for i, row in enumerate(table.to_pylist()):
        key = safe_key(str(row[key_col])) if key_col else f"{i:09d}"
        meta = {"group": str(row[group_col])} if group_col and row[group_col] is not None else None
        caption = str(row[caption_col] or "").strip()
        where = f"{path}: row {i} ({key})"
        if bytes_col and row[bytes_col]:
            data = bytes(row[bytes_col])
            yield _record(key, sniff_ext(data), data, caption, meta, where)
            continue
        media = Path(str(row[media_col] or ""))
        media = media if media.is_absolute() else path.parent / media
        if not media.is_file():
            yield Record(key, skip=f"{where}: no such file {media}")
            continue
        yield _record(key, normalize_ext(media.suffix), media.read_bytes(), caption, meta, where)


def _record(key: str, ext: str | None, data: bytes, caption: str, meta: dict | None, where: str) -> Record:
    if not ext or modality_of(ext) is None:
        return Record(key, skip=f"{where}: not a recognised media format")
    if not caption:
        return Record(key, skip=f"{where}: empty caption")
    return Record(key, ext, data, caption, meta)


def build_shards(source: str | Path, out: str | Path, samples_per_shard: int = 1000, prefix: str = "shard",
                 columns: dict[str, str | None] | None = None) -> dict:
    """Write shards from a folder or a table; returns {"written", "skipped", "shards", "skip_reasons"}."""
    source = Path(source)
    if source.is_dir():
        records = folder_records(source)
    elif source.is_file():
        records = table_records(source, columns or {})
    else:
        raise FileNotFoundError(f"{source}: no such folder or table")
    seen: Counter[str] = Counter()
    skipped: list[str] = []
    with ShardSink(out, prefix=prefix, samples_per_shard=samples_per_shard) as sink:
        for record in records:
            if record.skip:
                log.warning("skipped %s", record.skip)
                skipped.append(record.skip)
                continue
            seen[record.key] += 1
            key = record.key if seen[record.key] == 1 else f"{record.key}_{seen[record.key] - 1}"
            sample = {"__key__": key, record.ext: record.media, "txt": record.caption}
            if record.meta is not None:
                sample["json"] = json.dumps(record.meta, sort_keys=True)
            sink.write(sample)
    return {"written": sum(seen.values()), "skipped": len(skipped), "shards": len(sink.paths),
            "skip_reasons": skipped[:20]}
