"""configs/examples/: each cluster config resolves through `plait config show` with no hub access and holds the
settings its header promises; the ~1B one is the model `plait bench gpu` and `make gpu-check` use; the pretrained
one is checked against real (tiny) checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from plait.trainer.bench import gpu
from plait.trainer.config import load_config
from pretrained_checkpoints import save_checkpoints

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "configs" / "examples"
PROMISES = {
    "vlm-1b-1node.yaml": {"stage": 2, "checkpointing": False, "hub_llm": False},
    "vlm-7b-8nodes.yaml": {"stage": 3, "checkpointing": True, "hub_llm": True},
    "pretrained.yaml": {"stage": 2, "checkpointing": False, "hub_llm": True},
}
"""What each example's header says it is: ZeRO stage, activation checkpointing, LLM from the hub."""


def test_every_example_is_tested_and_listed_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(PROMISES)
    for name in PROMISES:
        assert f"configs/examples/{name}" in readme, name


def _config_show(name: str, hf_home: Path) -> dict:
    """`plait config show` from the repository root with the hub unreachable; the resolved config."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "plait.trainer", "config", "show", f"configs/examples/{name}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_config_show_resolves_the_example_as_promised(name: str, tmp_path: Path) -> None:
    shown = _config_show(name, tmp_path / "hf")
    promise = PROMISES[name]
    assert not any((tmp_path / "hf").rglob("*")), "config show must not fetch anything"
    ds, model = shown["deepspeed"], shown["model"]
    assert ds["zero_stage"] == promise["stage"] and ds["precision"] == "bf16" and ds["offload"] == "none"
    assert ds["gradient_accumulation_steps"] >= 1
    file_stage = json.loads((REPO / ds["config_file"]).read_text())["zero_optimization"]["stage"]
    assert file_stage == ds["zero_stage"], "the DeepSpeed JSON merged under the section agrees on the stage"
    assert model["attention_backend"] == "flash" and model["llm"]["attn_implementation"] == "plait_varlen"
    assert model["encoder"]["activation_checkpointing"] is promise["checkpointing"]
    assert model["llm"]["gradient_checkpointing"] is promise["checkpointing"]
    hub_name = model["llm"]["name_or_path"]
    assert (hub_name is not None and "/" in hub_name and not (REPO / hub_name).exists()) is promise["hub_llm"]
    assert shown["data"]["shards"] == "", "a placeholder path would not load: the user sets data.shards"


def _parameters(name: str) -> int:
    """Parameters of an example's model built on the meta device (no memory, no hub)."""
    cfg = load_config(EXAMPLES / name)
    with torch.device("meta"):
        model = gpu.MultimodalModel(cfg.model, cfg.data.sizing)
    return gpu.parameter_counts(model).total


def test_the_1b_example_is_about_one_billion_parameters_and_is_the_bench_model(monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # the example's DeepSpeed JSON path is relative to the repository root
    assert 0.9e9 < _parameters("vlm-1b-1node.yaml") < 1.3e9
    example = load_config(EXAMPLES / "vlm-1b-1node.yaml").model
    assert gpu.billion_config() == dataclasses.replace(example, attention_backend="auto")


def test_the_pretrained_example_is_checked_against_its_checkpoints(tmp_path: Path) -> None:
    """With tiny local checkpoints in place of the hub names, config load reads each one: the mel front end follows
    Whisper's processor config, and a patch size the vision tower does not have stops with the field named."""
    ckpts = save_checkpoints(tmp_path, patch_size=8, n_mels=64)
    local = ["--set", f"model.llm.name_or_path={ckpts.llm}", "--set", f"model.encoder.vision.pretrained={ckpts.vision}",
             "--set", f"model.encoder.audio.pretrained={ckpts.audio}", "--set", "data.sizing.max_audio_seconds=1",
             "--set", "model.llm.mome_layers=[1]"]
    show = [sys.executable, "-m", "plait.trainer", "config", "show", str(EXAMPLES / "pretrained.yaml"), *local]
    proc = subprocess.run([*show, "--set", "data.sizing.patch_size=8"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    sizing = yaml.safe_load(proc.stdout)["data"]["sizing"]
    assert sizing["n_mels"] == 64 and sizing["hop_ms"] == 10.0
    proc = subprocess.run(show, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "data.sizing.patch_size: 16" in proc.stderr and "patch size 8" in proc.stderr
