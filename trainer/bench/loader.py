"""`plait bench loader DATA`: our loader against each modality's decode-only ceiling and plain webdataset.

All pipelines read the same samples of DATA (an indexed shard folder; `--synthesize N` first writes N
photo-like JPEGs of 256-2048 px and N demo samples of every modality there). The ceiling runs only the
decoding library on the in-memory media, at the planned size: Pillow in draft mode for images, PyAV
decoding and scaling the planned frames for video, soundfile decoding the planned window for audio.
Ours runs read → decode → resize → patchify (→ log-mel) → tokenize → pack through `PlanLoader`, one
modality at a time and then over all of them (time-weighted). For images, the plain decode (full size)
and the usual webdataset `.decode("pil")` + fixed 224x224 resize give context. Rates are per worker, so
ratios compare the work one core does; rounds are interleaved and each pipeline keeps its best, which
tames a shared machine's noise.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from plait.data.decode_audio import decode_audio
from plait.data.decode_video import decode_video
from plait.data.demo import DemoSpec, write_demo
from plait.data.indexer import index_dataset
from plait.data.loader import LoaderConfig, PlanDataset, PlanLoader
from plait.data.manifest import read_index, read_manifest
from plait.data.packing import PackingConfig
from plait.data.plan_types import MicroBatchPlan, SampleRef, native_clip
from plait.data.preprocess import SampleDecoder
from plait.data.reader import read_local
from plait.data.rng import keyed_rng, keyed_seeds, keyed_uniforms
from plait.data.shard_writer import ShardSink
from plait.data.shardlist import is_remote
from plait.data.sizing import NUM_DRAWS, SizingConfig, size_samples
from plait.data.token_drop import TokenDropConfig
from plait.data.tokenizer import train_tokenizer

_NUMERIC = ("width", "height", "frames", "fps", "duration")
WDS_SIDE = 224
"""Fixed side of the webdataset baseline (the usual CLIP-style square resize)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("data", help="indexed shard folder (with plait-index.parquet)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of both pipelines")
    parser.add_argument("--synthesize", type=int, default=0, help="first write this many JPEGs (256-2048 px) to DATA")
    parser.add_argument("--side", type=int, default=224, help="planned image side R in pixels (aspect preserved)")
    parser.add_argument("--patch-size", type=int, default=16, help="spatial patch size in pixels")
    parser.add_argument("--samples-per-step", type=int, default=16, help="samples per planned micro-batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and the plan")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each pipeline's best round counts")
    parser.add_argument("--modalities", default="image,video,audio", help="modalities to measure, comma-separated")


def manifest_rows(root: str | Path, modalities: tuple[str, ...] = ("image", "audio", "video")) -> list[dict]:
    """Usable manifest rows of an indexed folder, in shard order, with `shard` resolved to an openable path."""
    root = Path(root)
    rows = []
    for shard in read_index(root).to_pylist():
        for row in read_manifest(root / shard["manifest"]).to_pylist():
            if row["status"] == "ok" and row["modality"] in modalities:
                name = row["shard"]
                row["shard"] = name if is_remote(name) or os.path.isabs(name) else str(root / name)
                rows.append(row)
    return rows


def manifest_plans(rows: list[dict], sizing: SizingConfig, samples_per_step: int, seed: int = 0,
                   resolution: dict[int, float] | None = None, drop_rate: float = 0.0) -> list[MicroBatchPlan]:
    """A stand-in for the sample plan: rows in order, sized with keyed draws, cut into fixed-size steps (rank 0)."""
    keys = [row["key"] for row in rows]
    columns = {name: np.array([np.nan if row[name] is None else row[name] for row in rows], dtype=np.float64)
               for name in _NUMERIC}
    columns["modality"] = np.array([row["modality"] for row in rows])
    uniforms = keyed_uniforms(keyed_seeds(seed, keys, 0, "size"), NUM_DRAWS)
    grids = size_samples(columns, sizing, TokenDropConfig(), resolution, drop_rate, uniforms)
    drop = keyed_seeds(seed, keys, 0, "drop")
    augment = keyed_seeds(seed, keys, 0, "augment") >> np.uint64(1)
    refs = [SampleRef(shard=row["shard"], key=row["key"], modality=row["modality"], group=row["group"],
                      sample_offset=row["sample_offset"], sample_size=row["sample_size"], grid=grids[i],
                      drop_seed=int(drop[i]), augment_seed=int(augment[i]),
                      native=native_clip(row["modality"], columns["frames"][i], columns["fps"][i]))
            for i, row in enumerate(rows)]
    return [MicroBatchPlan(epoch=0, step=step, rank=0, samples=refs[start:start + samples_per_step],
                           tokens=int(sum(r.grid.num_kept for r in refs[start:start + samples_per_step])))
            for step, start in enumerate(range(0, len(refs), samples_per_step))]


def synthesize(out: Path, count: int, seed: int) -> None:
    """Write `count` photo-like JPEGs and `count` demo samples of every modality into `out`, then index it."""
    synthesize_jpegs(out, count, seed)
    write_demo(out, DemoSpec(samples=count, seed=seed, samples_per_shard=max(count // 4, 3)))
    index_dataset(str(out), workers=1)


def synthesize_jpegs(out: Path, count: int, seed: int) -> None:
    """Write `count` photo-like JPEGs (smooth colour fields plus grain), half of them 1024-2048 px."""
    rng = keyed_rng(seed, "bench-loader-images")
    per_shard = max(count // 4, 1)
    with ShardSink(out, prefix="bench", samples_per_shard=per_shard) as sink:
        for i in range(count):
            low, high = (1024, 2048) if i % 2 else (256, 1024)
            width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
            y, x = np.mgrid[0:height, 0:width].astype(np.float32)
            phase = rng.uniform(0, 2 * np.pi, size=3)
            freq = rng.uniform(2, 8, size=3) / max(width, height)
            planes = [127 + 100 * np.sin(2 * np.pi * f * (x + 0.7 * y) + p) for f, p in zip(freq, phase)]
            pixels = np.stack(planes, axis=-1) + rng.normal(0, 6, size=(height, width, 3)).astype(np.float32)
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            sink.write({"__key__": f"bench{i:06d}", "jpg": buffer.getvalue(), "txt": f"synthetic image {i}"})


def _decode_only(ref: SampleRef, blob: bytes, decoder: SampleDecoder) -> None:
    """The decoding library's work for one planned sample, nothing else."""
    p = decoder.sizing.patch_size
    if ref.modality == "image":
        img = Image.open(io.BytesIO(blob))
        img.draft("RGB", (ref.grid.w * p, ref.grid.h * p))
        img.load()
    elif ref.modality == "video":
        frames, fps = ref.native
        decode_video(blob, decoder.frame_indices(frames, fps, ref.grid, ref.augment_seed), ref.grid.h * p,
                     ref.grid.w * p)
    else:
        decode_audio(blob, decoder.mel, ref.grid.start_s, ref.grid.span_s)


def decode_ceiling(rows: list[dict], plans: list[MicroBatchPlan], sizing: SizingConfig) -> float:
    """Samples/s of a bare loop running only the decoding libraries on the in-memory media at the planned size."""
    by_key = {row["key"]: row for row in rows}
    refs = [ref for plan in plans for ref in plan.samples]
    blobs = []
    for ref in refs:
        row = by_key[ref.key]
        blobs.append(read_local(row["shard"], [(row["media_offset"], row["media_size"])])[0])
    decoder = SampleDecoder(sizing)
    start = time.perf_counter()
    for ref, blob in zip(refs, blobs):
        _decode_only(ref, blob, decoder)
    return len(refs) / (time.perf_counter() - start)


def plain_decode(rows: list[dict]) -> float:
    """Samples/s of a bare Pillow loop decoding the in-memory JPEGs at full size (no draft), for context."""
    blobs = [read_local(row["shard"], [(row["media_offset"], row["media_size"])])[0] for row in rows]
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB")
    return len(blobs) / (time.perf_counter() - start)


def _is_image(sample: dict) -> bool:
    """The webdataset baseline reads the image samples of mixed shards."""
    return "jpg" in sample


def _fixed_square(sample: tuple[Image.Image, str]) -> tuple[torch.Tensor, str]:
    """The baseline's per-sample transform: square resize, float CHW in [0, 1]."""
    image, caption = sample
    pixels = np.array(image.convert("RGB").resize((WDS_SIDE, WDS_SIDE), Image.BILINEAR))
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0), caption


def _timed(items: DataLoader | PlanLoader, count: Callable[[object], tuple[int, int]]) -> tuple[float, float, int]:
    """(samples/s, tokens/s, samples) after the first item (worker start-up is not throughput), or over all of
    them when there is only one."""
    began = time.perf_counter()
    iterator = iter(items)
    first = count(next(iterator))
    start = time.perf_counter()
    samples = tokens = 0
    for item in iterator:
        n, t = count(item)
        samples += n
        tokens += t
    if not samples:
        (samples, tokens), start = first, began
    seconds = time.perf_counter() - start
    return samples / seconds, tokens / seconds, samples


def webdataset_rate(urls: list[str], workers: int, patch: int) -> tuple[float, float]:
    """Samples/s and tokens/s of webdataset + Pillow decode + fixed 224 px resize."""
    pipeline = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
                .select(_is_image).decode("pil").to_tuple("jpg", "txt").map(_fixed_square))
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers)
    per_image = (WDS_SIDE // patch) ** 2
    rate, token_rate, _ = _timed(loader, lambda item: (1, per_image))
    return rate, token_rate


def ours_rate(plans: list[MicroBatchPlan], sizing: SizingConfig, workers: int) -> tuple[float, float]:
    """Samples/s and tokens/s of PlanLoader (read, decode, resize, patchify or log-mel, tokenize, pack)."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer([f"synthetic image {i}" for i in range(200)], 300, scratch)
    dataset = PlanDataset(plans, tokenizer, sizing, PackingConfig(tail_padding="multiple"), LoaderConfig())
    loader = PlanLoader(dataset, workers=workers, persistent_workers=False)
    rate, token_rate, _ = _timed(loader, lambda batch: (batch.counters["samples"], batch.counters["tokens"]))
    return rate, token_rate


def _per_worker_rates(plans: list[MicroBatchPlan], rows: list[dict], sizing: SizingConfig,
                      workers: int) -> tuple[float, float, float]:
    """(decode ceiling samples/s, ours samples/s per worker, ours tokens/s per worker) on one modality's plans."""
    ours, tokens = ours_rate(plans, sizing, workers)
    per_worker = max(workers, 1)
    return decode_ceiling(rows, plans, sizing), ours / per_worker, tokens / per_worker


def run(args: argparse.Namespace) -> dict:
    """Measure ours against each modality's decode-only ceiling (and images against webdataset); per worker."""
    data = Path(args.data)
    if args.synthesize:
        synthesize(data, args.synthesize, args.seed)
    torch.set_num_threads(1)  # every pipeline gets one core per worker
    sizing = SizingConfig(patch_size=args.patch_size, max_side_patches=max(args.side // args.patch_size * 4, 2))
    rows = {m: manifest_rows(data, (m,)) for m in args.modalities.split(",") if m}
    rows = {m: r for m, r in rows.items() if r}
    if not rows:
        raise ValueError(f"data: no usable {args.modalities} samples indexed in {data}")
    plans = {m: manifest_plans(r, sizing, args.samples_per_step, args.seed, resolution={args.side: 1.0})
             for m, r in rows.items()}
    best: dict[str, tuple[float, ...]] = {}
    for _ in range(max(args.rounds, 1)):  # interleaved, so a busy moment on a shared machine hits every pipeline
        for modality in rows:
            figures = _per_worker_rates(plans[modality], rows[modality], sizing, args.workers)
            best[modality] = tuple(max(a, b) for a, b in zip(best.get(modality, figures), figures))
        if "image" in rows:
            urls = sorted({row["shard"] for row in rows["image"]})
            figures = (plain_decode(rows["image"]), *webdataset_rate(urls, args.workers, args.patch_size))
            best["context"] = tuple(max(a, b) for a, b in zip(best.get("context", figures), figures))
    out: dict = {"samples": sum(len(r) for r in rows.values()), "workers": args.workers}
    seconds_ceiling = seconds_ours = 0.0
    for modality, (ceiling, ours, tokens) in ((m, best[m]) for m in rows):
        n = len(rows[modality])
        seconds_ceiling, seconds_ours = seconds_ceiling + n / ceiling, seconds_ours + n / ours
        out.update({f"{modality}_samples": n, f"{modality}_decode_ceiling_samples_per_s": round(ceiling, 1),
                    f"{modality}_ours_samples_per_s_per_worker": round(ours, 1),
                    f"{modality}_ours_tokens_per_s_per_worker": round(tokens, 1),
                    f"{modality}_ours_over_decode_ceiling": round(ours / ceiling, 3)})
    out["ours_over_decode_ceiling"] = round(seconds_ceiling / seconds_ours, 3)
    if "context" in best:
        plain, wds_rate, wds_tokens = best["context"]
        per_worker = max(args.workers, 1)
        out.update({"plain_decode_samples_per_s": round(plain, 1),
                    "webdataset_samples_per_s_per_worker": round(wds_rate / per_worker, 1),
                    "webdataset_tokens_per_s_per_worker": round(wds_tokens / per_worker, 1),
                    "image_ours_over_webdataset": round(best["image"][1] * per_worker / wds_rate, 3),
                    "image_ours_over_plain_decode": round(best["image"][1] / plain, 3)})
    return out
