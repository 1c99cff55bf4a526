"""Run configs: typed, documented, validated with errors naming file and dotted field."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from plait.trainer.config import RunConfig, load_config
from plait.trainer.config_loader import ConfigError, field_docs

from conftest import run_plait


def _dataclasses(cls: type, seen: set | None = None) -> set[type]:
    seen = seen if seen is not None else set()
    seen.add(cls)
    for hint in typing.get_type_hints(cls).values():
        for tp in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(tp) and tp not in seen:
                _dataclasses(tp, seen)
    return seen


def test_defaults_work_and_every_field_is_documented() -> None:
    config = load_config(None)
    assert isinstance(config, RunConfig)
    for cls in _dataclasses(RunConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_docs(cls)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 3.0e-4\ndata:\n  plan: {eval_fraction: 0.2}\n")
    config = load_config(path, ["optim.warmup_steps=3", "deepspeed.zero_stage=3"])
    assert config.steps == 7 and config.optim.lr == 3e-4 and config.optim.warmup_steps == 3
    assert config.deepspeed.zero_stage == 3 and config.data.plan.eval_fraction == 0.2


@pytest.mark.parametrize("text, field, words", [
    ("optim: {lrr: 1}", "optim.lrr", "did you mean 'lr'"),
    ("steps: ten", "steps", "expected int"),
    ("steps: -5", "steps", "must be > 0"),
    ("curriculum: {phases: [{start: 0, values: {mix: {image: 0.5, audio: 0.3}}}]}",
     "curriculum.phases[0].values.mix", "sum to 0.8"),
    ("data: {shards: '/no/such/shard-{000..003}.tar'}", "data.shards", "no such shard"),
    ("deepspeed: {zero_stage: 4}", "deepspeed.zero_stage", "0, 1, 2 or 3"),
    ("deepspeed: {precision: fp16}", "deepspeed.precision", "not one of"),
    ("checkpoint: {resume: 3}", "checkpoint.resume", "expected bool"),
])
def test_bad_values_name_file_and_field(tmp_path, text: str, field: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.field == field and str(path) in str(err.value) and words in str(err.value)


def test_cli_exits_2_before_any_work(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data: {plan: {eval_fraction: 2.0}}\n")
    proc = run_plait("config", "show", str(path), check=False)
    assert proc.returncode == 2
    assert "data.plan.eval_fraction" in proc.stderr and str(path) in proc.stderr and proc.stdout == ""


def test_config_show_prints_resolved_values(tmp_path) -> None:
    proc = run_plait("config", "show", "/dev/null", "--set", "optim.lr=0.25", "--set", "seed=9")
    assert "lr: 0.25  # Peak learning rate" in proc.stdout and "seed: 9" in proc.stdout


def test_patch_geometry_lives_in_data_sizing_only() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.encoder.vision_patch_size=8"])
    assert err.value.field == "model.encoder.vision_patch_size"


def test_overrides_merge_into_dict_fields_and_reach_list_items(tmp_path) -> None:
    defaults = load_config(None).model.llm.model_kwargs
    merged = load_config(None, ["model.llm.model_kwargs.num_hidden_layers=4"]).model.llm.model_kwargs
    assert merged == {**defaults, "num_hidden_layers": 4} and len(defaults) > 2  # one key changed, none lost
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"curriculum": {"phases": [
        {"start": 0, "values": {"resolution": {224: 1.0}}},
        {"start": 1000, "values": {"token_drop_rate": 0.25}}]}}))
    phases = load_config(config, ["curriculum.phases[1].start=500",
                                  "curriculum.phases[1].values.hard_negative_ratio=0.5"]).curriculum.phases
    assert [p.start for p in phases] == [0, 500]
    assert phases[1].values == {"token_drop_rate": 0.25, "hard_negative_ratio": 0.5}
    with pytest.raises(ConfigError, match=r"curriculum.phases\[2\]: no item 2 \(the list has 2\)"):
        load_config(config, ["curriculum.phases[2].start=5"])
