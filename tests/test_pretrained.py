"""The model as a library: embeddings of raw files equal the training forward's, through save and reload;
`plait embed` on an exported run prints what the Python API computes."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

from plait.data.demo import encode_mp4
from plait.data.indexer import index_dataset
from plait.data.shard_build import build_shards
from plait.data.tokenizer import train_tokenizer
from plait.trainer.config import load_config
from plait.trainer.model.pretrained import PretrainedModel, create_model
from plait.trainer.planned_batches import PlannedBatches

from conftest import run_plait
from test_train_distributed import tiny_config

CAPTIONS = {
    "photo": "a red square on a green field",
    "drawing": "a blue stripe on yellow",
    "tone": "a telephone tone",
    "clip": "a white dot moving right",
}
"""Sample key (file stem) → caption."""
FILES = {"photo": "photo.jpg", "drawing": "drawing.png", "tone": "tone.flac", "clip": "clip.mp4"}


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random colours (uint8 [H, W, 3])."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def write_raw(folder: Path) -> dict[str, Path]:
    """An image of each format, 0.4 s of audio (ten whole 4-frame patches: no crop to choose) and a
    4-frame clip (exactly the frames a clip is cut to: no offset to choose), each with its caption."""
    folder.mkdir()
    Image.fromarray(_image(40, 56, 0)).save(folder / FILES["photo"], quality=95)
    Image.fromarray(_image(48, 24, 1)).save(folder / FILES["drawing"])
    t = np.arange(6400) / 16000
    soundfile.write(folder / FILES["tone"], (0.4 * np.sin(2 * np.pi * 697 * t)).astype(np.float32), 16000,
                    format="FLAC")
    frames = np.stack([_image(32, 32, 10 + i) for i in range(4)])
    (folder / FILES["clip"]).write_bytes(encode_mp4(list(frames), fps=10))
    for key, caption in CAPTIONS.items():
        (folder / f"{key}.txt").write_text(caption)
    return {key: folder / name for key, name in FILES.items()}


@pytest.fixture(scope="module")
def run_config(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A tiny run over shards built from the raw files, every sample in training, no augmentation."""
    root = tmp_path_factory.mktemp("pretrained")
    files = write_raw(root / "raw")
    build_shards(root / "raw", root / "shards", samples_per_shard=2, prefix="s")
    index_dataset(str(root / "shards" / "s-*.tar"), out=root / "shards", workers=1)
    train_tokenizer(list(CAPTIONS.values()) * 4, 320, root / "tokenizer")
    config = tiny_config()
    config.update(run_dir=str(root / "run"), steps=2, checkpoint={"every": 0, "keep": 1})
    config["data"].update(shards=str(root / "shards"), plan={"eval_fraction": 0.0}, loader={"spec_augment": False})
    config["data"]["sizing"].update(patch_size=8, video_side_px=32, video_max_frames=4)
    config["model"]["llm"]["tokenizer"] = str(root / "tokenizer")
    config["curriculum"] = {"phases": [{"start": 0, "values": {"resolution": {32: 1.0}}}]}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, files


def training_embeddings(cfg, model: PretrainedModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key → (media, text) unit embeddings from the training forward on the planned, loaded batches."""
    data = PlannedBatches(cfg, rank=0, world_size=1)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    step = 0
    while len(out) < len(CAPTIONS):
        batch = data.batch(step, 0)
        with torch.no_grad():
            forward = model.model(batch, captioning=True)
        media = torch.nn.functional.normalize(forward.media_embeds, dim=-1)
        text = torch.nn.functional.normalize(forward.text_embeds, dim=-1)
        out.update({key: (media[i], text[i]) for i, key in enumerate(batch.sample_key)})
        step += 1
    return out


def test_encode_media_and_text_equal_the_training_forward_after_save_and_reload(run_config, tmp_path):
    path, files = run_config
    cfg = load_config(path)
    model = create_model(cfg)
    expected = training_embeddings(cfg, model)
    assert sorted(expected) == sorted(CAPTIONS)
    reloaded = PretrainedModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    keys = list(CAPTIONS)
    media = reloaded.encode_media([files[k] for k in keys])
    text = reloaded.encode_text([CAPTIONS[k] for k in keys])
    for i, key in enumerate(keys):
        torch.testing.assert_close(media[i], expected[key][0], atol=1e-6, rtol=0, msg=key)
        torch.testing.assert_close(text[i], expected[key][1], atol=1e-6, rtol=0, msg=key)
    assert torch.allclose(media.norm(dim=-1), torch.ones(len(keys)))


def test_decoded_arrays_embed_like_their_files(run_config):
    path, files = run_config
    model = create_model(load_config(path))
    png = np.array(Image.open(files["drawing"]).convert("RGB"))
    wave, rate = soundfile.read(files["tone"], dtype="float32")
    with av.open(str(files["clip"])) as container:
        clip = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    from_files = model.encode_media([files["drawing"], files["tone"], files["clip"]])
    from_arrays = model.encode_media([png, (wave, rate), (clip, 10.0)])
    torch.testing.assert_close(from_arrays, from_files, atol=1e-5, rtol=0)


def test_a_saved_directory_is_self_contained(run_config, tmp_path):
    path, files = run_config
    model = create_model(load_config(path))
    saved = model.save_pretrained(tmp_path / "saved")
    # A Llama with one MoME layer of two has no stock form (Mixtral has experts in every layer): no `llm/`.
    assert {p.name for p in saved.iterdir()} == {"plait_model.json", "model.safetensors", "tokenizer", "llm_config"}
    meta = json.loads((saved / "plait_model.json").read_text())
    assert meta["preprocess"]["image_side_px"] == 32 and meta["preprocess"]["sizing"]["patch_size"] == 8
    reloaded = PretrainedModel.from_pretrained(saved)
    for name, value in model.model.state_dict().items():
        assert torch.equal(value, reloaded.model.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="not a saved plait model"):
        PretrainedModel.from_pretrained(tmp_path)


@pytest.mark.slow
def test_plait_embed_on_an_exported_run_prints_the_api_similarities(run_config, tmp_path):
    path, files = run_config
    run_dir = tmp_path / "run"
    run_plait("train", str(path), "--run-dir", str(run_dir))
    exported = tmp_path / "export"
    written = json.loads(run_plait("export", str(run_dir), "--out", str(exported)).stdout.splitlines()[-1])
    assert written["step"] == 2 and written["out"] == str(exported)
    media, texts = [str(files[k]) for k in CAPTIONS], list(CAPTIONS.values())
    proc = run_plait("embed", str(exported), "--media", *media, "--text", *texts)
    printed = json.loads(proc.stdout.splitlines()[-1])
    model = PretrainedModel.from_pretrained(exported)
    expected = model.encode_media(media) @ model.encode_text(texts).T
    assert printed["media"] == media and printed["text"] == texts
    torch.testing.assert_close(torch.tensor(printed["similarity"]), expected, atol=1e-6, rtol=0)
    trained = torch.load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                         map_location="cpu", weights_only=False)["module"]
    name = "encoder.vision.proj.weight"
    assert torch.equal(model.model.state_dict()[name], trained[f"model.{name}"].float())
