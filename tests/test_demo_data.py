"""The built-in demo dataset: real, deterministic, learnable media covering all three modalities."""

from __future__ import annotations

import io
import json
import tarfile

import av
import numpy as np
import soundfile
from PIL import Image

from plait.data.demo import COLOURS, DTMF_HZ, SAMPLE_RATE, DemoSpec, _luma, contrasting_pairs, write_demo
from plait.data.manifest import read_index, read_manifest
from plait.trainer.config import load_config
from plait.data.source import open_dataset

from conftest import run_plait


def test_cli_300_samples_indexed_ok_and_byte_identical(tmp_path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    out = run_plait("demo-data", "--out", str(first), "--samples", "300")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"samples": 300, "shards": 3, "modalities": {"image": 100, "audio": 100, "video": 100}}
    index = json.loads(run_plait("shards", "index", str(first)).stdout.strip().splitlines()[-1])
    assert (index["samples"], index["shards"], index["bad"]) == (300, 3, 0)
    run_plait("demo-data", "--out", str(second), "--samples", "300")
    for shard in sorted(first.glob("*.tar")):
        assert shard.read_bytes() == (second / shard.name).read_bytes(), shard.name


def _members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def test_media_match_their_captions(demo_dir) -> None:
    samples = _members(sorted(demo_dir.glob("*.tar"))[0])
    seen = set()
    for key, members in samples.items():
        meta = json.loads(members["json"])
        caption = members["txt"].decode()
        assert str(meta["digit"]) in caption and meta["split"] in ("train", "eval")
        if "jpg" in members:
            img = Image.open(io.BytesIO(members["jpg"]))
            assert 0.5 / 1.1 <= img.width / img.height <= 2.0 * 1.1
            assert max(img.size) >= 12 and f"{meta['foreground']} handwritten" in caption
        elif "flac" in members:
            wave, rate = soundfile.read(io.BytesIO(members["flac"]))
            assert rate == SAMPLE_RATE and 0.3 <= len(wave) / rate <= 3.0
            spectrum = np.abs(np.fft.rfft(wave))
            freqs = np.fft.rfftfreq(len(wave), 1 / rate)
            top = sorted(freqs[np.argsort(spectrum)[-2:]])
            assert np.allclose(top, DTMF_HZ[meta["digit"]], atol=5), (key, top)
        else:
            with av.open(io.BytesIO(members["mp4"])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert 8 <= len(frames) <= 32 and meta["direction"] in caption
        seen.add(meta["modality"])
    assert seen == {"image", "audio", "video"}


def test_colour_pairs_have_clear_contrast() -> None:
    pairs = contrasting_pairs()
    assert len(pairs) >= 20
    assert all(abs(_luma(COLOURS[a]) - _luma(COLOURS[b])) >= 0.3 for a, b in pairs)


def test_split_is_by_group(demo_dir) -> None:
    rows = [r for m in sorted(demo_dir.glob("*.plait.parquet")) for r in read_manifest(m).to_pylist()]
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)
    assert read_index(demo_dir).num_rows == 3
    # The image and the video drawn from one handwritten digit share its group, hence its split.
    rows.sort(key=lambda r: r["key"])
    for image, audio, video in zip(rows[0::3], rows[1::3], rows[2::3]):
        assert (image["modality"], audio["modality"], video["modality"]) == ("image", "audio", "video")
        assert image["group"] == video["group"] != audio["group"]
    split = {}
    for shard in sorted(demo_dir.glob("*.tar")):
        for sample in _members(shard).values():
            meta = json.loads(sample["json"])
            assert split.setdefault(meta["group"], meta["split"]) == meta["split"]


def test_parallel_build_is_byte_identical(tmp_path) -> None:
    spec = DemoSpec(samples=24, samples_per_shard=10, seed=5)
    one, _ = write_demo(tmp_path / "one", spec, workers=1)
    two, counts = write_demo(tmp_path / "two", spec, workers=2)
    assert counts == {"image": 8, "audio": 8, "video": 8} and [p.name for p in one] == [p.name for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


def test_run_builds_each_demo_spec_in_its_own_folder(tmp_path) -> None:
    small = load_config(None, [f"data.demo.out={tmp_path}", "data.demo.samples=9", "data.demo.samples_per_shard=5"])
    index = open_dataset(small.data)
    assert index.root == tmp_path / DemoSpec(samples=9, samples_per_shard=5).dirname
    assert [n.rsplit("/", 1)[-1] for n in index.names] == ["demo-000000.tar", "demo-000001.tar"]
    # Another sample count never reuses the folder built for the first one.
    larger = open_dataset(load_config(None, [f"data.demo.out={tmp_path}", "data.demo.samples=12",
                                             "data.demo.samples_per_shard=5"]).data)
    assert larger.root != index.root and len(larger.names) == 3
    assert open_dataset(small.data).root == index.root
    cached = load_config(None, [f"data.demo.out={tmp_path}", "data.demo.samples=9", "data.demo.samples_per_shard=5",
                                "data.plan.manifest_cache=1"])
    assert open_dataset(cached.data)._cache_size == 1
