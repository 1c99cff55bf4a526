"""Parquet manifests: one per shard (a row per sample, with byte offsets) plus a small dataset index.

A dataset of billions of samples never needs one giant file: the plan reads the dataset index
(shard → counts and media totals) and opens a shard's manifest only when it is about to be consumed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from plait.data.media import META_EXTS, TEXT_EXTS, modality_of, probe
from plait.data.remote import drain, open_stream
from plait.data.tar_scan import ScannedSample, iter_samples

MANIFEST_SUFFIX = ".plait.parquet"
"""Per-shard manifest name suffix (img2dataset already writes `NNNNN.parquet` beside its shards)."""
INDEX_NAME = "plait-index.parquet"
"""The dataset index: one row per shard."""

SAMPLE_SCHEMA = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()), ("modality", pa.string()),
    ("group", pa.string()), ("sample_offset", pa.int64()), ("sample_size", pa.int64()),
    ("media_ext", pa.string()), ("media_offset", pa.int64()), ("media_size", pa.int64()),
    ("txt_offset", pa.int64()), ("txt_size", pa.int64()), ("json_offset", pa.int64()), ("json_size", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("frames", pa.int32()), ("fps", pa.float32()),
    ("duration", pa.float32()), ("sample_rate", pa.int32()), ("caption_chars", pa.int32()),
])

MANIFEST_FLOAT32 = tuple(f.name for f in SAMPLE_SCHEMA if f.type == pa.float32())
"""Metadata stored as float32: sizing sees these values rounded so, on every path."""

SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("manifest", pa.string()), ("status", pa.string()), ("samples", pa.int64()),
    ("ok", pa.int64()), ("bad", pa.int64()), ("image", pa.int64()), ("audio", pa.int64()), ("video", pa.int64()),
    ("image_pixels", pa.int64()), ("video_frames", pa.int64()), ("audio_seconds", pa.float64()),
    ("caption_chars", pa.int64()),
])


def manifest_name(shard: str) -> str:
    """File name of a shard's manifest: `shard-000001.tar` → `shard-000001.tar.plait.parquet`."""
    return os.path.basename(shard.rstrip("/")) + MANIFEST_SUFFIX


def caption_and_group(sample: ScannedSample, key: str) -> tuple[str | None, str]:
    """Caption from `.txt` (else the JSON's caption/text) and group from the JSON (else the key)."""
    meta: dict = {}
    for ext in META_EXTS:
        member = sample.members.get(ext)
        if member is not None and member.data:
            try:
                loaded = json.loads(member.data)
                meta = loaded if isinstance(loaded, dict) else {}
            except (ValueError, UnicodeDecodeError):
                meta = {}
    caption = None
    for ext in TEXT_EXTS:
        member = sample.members.get(ext)
        if member is not None and member.data is not None:
            caption = member.data.decode("utf-8", errors="replace").strip()
    caption = caption or meta.get("caption") or meta.get("text")
    group = meta.get("group", meta.get("group_id"))
    return caption, str(group) if group is not None else key


def sample_row(shard: str, sample: ScannedSample) -> dict:
    """The manifest row of one sample; `status` is `ok` or the reason it cannot be used."""
    caption, group = caption_and_group(sample, sample.key)
    row: dict = {"shard": shard, "key": sample.key, "group": group, "sample_offset": sample.offset,
                 "sample_size": sample.size, "caption_chars": len(caption) if caption else 0}
    for ext in TEXT_EXTS + META_EXTS:
        member = sample.members.get(ext)
        if member is not None:
            row[f"{ext}_offset"], row[f"{ext}_size"] = member.data_offset, member.size
    # `seg.jpg` style multi-dot extensions are typed by their last part.
    media = [(ext, ext.rsplit(".", 1)[-1], m) for ext, m in sample.members.items()
             if modality_of(ext.rsplit(".", 1)[-1])]
    problems = list(sample.problems)
    if not media:
        problems.append("no media member (expected jpg/png/webp, mp4/webm or flac/wav/mp3)")
    elif len(media) > 1:
        problems.append(f"several media members: {', '.join(e for e, _, _ in media)}")
    else:
        ext, kind, member = media[0]
        row.update(media_ext=ext, media_offset=member.data_offset, media_size=member.size,
                   modality=modality_of(kind))
        if member.data is not None:
            try:
                row.update(probe(kind, member.data))
            except ValueError as err:
                problems.append(str(err))
    if not caption:
        problems.append("no caption (.txt or json caption)")
    row["status"] = "ok" if not problems else "; ".join(problems)
    return row


def index_shard(url: str, shard_name: str | None = None) -> tuple[list[dict], str]:
    """Scan one shard: its sample rows and its shard-level status (`ok` or what went wrong)."""
    name = shard_name or url
    problems: list[str] = []
    try:
        with open_stream(url) as stream:
            rows = [sample_row(name, s) for s in iter_samples(stream, problems)]
            drain(stream)
    except OSError as err:  # cannot open, read error, or a `pipe:` that failed: nothing it gave can be trusted
        return [], f"unreadable: {err}"
    if not rows and not problems:
        problems.append("empty shard (no samples)")
    return rows, "ok" if not problems else "; ".join(problems)


def shard_summary(shard: str, manifest: str, rows: list[dict], status: str) -> dict:
    """The dataset-index row of one shard: counts and media totals over its usable samples."""
    ok = [r for r in rows if r["status"] == "ok"]
    by = {m: [r for r in ok if r.get("modality") == m] for m in ("image", "audio", "video")}
    return {
        "shard": shard, "manifest": manifest, "status": status, "samples": len(rows), "ok": len(ok),
        "bad": len(rows) - len(ok), **{m: len(v) for m, v in by.items()},
        "image_pixels": sum(r["width"] * r["height"] for r in by["image"]),
        "video_frames": sum(r["frames"] for r in by["video"]),
        "audio_seconds": float(sum(r["duration"] for r in by["audio"])),
        "caption_chars": sum(r["caption_chars"] for r in ok),
    }


def write_table(rows: list[dict], schema: pa.Schema, path: str | Path) -> None:
    """Write rows as Parquet atomically (temporary name, then rename)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = f"{path}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_index(root: str | Path) -> pa.Table:
    """The dataset index of a folder (or an index file path)."""
    path = Path(root)
    return pq.read_table(path / INDEX_NAME if path.is_dir() else path)


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One shard's manifest."""
    return pq.read_table(path, columns=columns)
