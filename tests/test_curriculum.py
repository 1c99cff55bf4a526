"""Curriculum: base values from the run config, phases change at the configured steps, ramps interpolate,
validation, resume, show."""

import logging
from pathlib import Path

import pytest
import yaml

from plait.trainer.config import ConfigError, load_config
from plait.trainer.config_loader import build
from plait.trainer.curriculum import (
    Curriculum,
    CurriculumConfig,
    CurriculumValues,
    curriculum_series,
    curriculum_table,
    plot_curriculum,
)
from plait.trainer.planned_batches import curriculum_values

CURRICULA = Path(__file__).resolve().parent.parent / "configs" / "curricula"
BASE = CurriculumValues(resolution={224: 1.0}, token_drop_rate=0.0, mix={}, hard_negative_ratio=0.0,
                        loss_weights={"contrastive": 1.0, "caption": 1.0}, frozen=[], lr_multipliers={})
"""Base values of the tests that exercise phases alone."""
RUN_WEIGHTS = {"contrastive": 1.0, "caption": 2.0, "balance": 0.01, "z": 0.001}
"""`loss.weights` of the run configs written by `_run_config`."""


def curriculum_from_mapping(mapping: dict) -> CurriculumConfig:
    """A curriculum section (with or without the `curriculum:` key) built as a run config builds it."""
    return build(CurriculumConfig, mapping.get("curriculum", mapping), source="<test>", prefix="curriculum")


def _curriculum(*phases) -> Curriculum:
    return Curriculum(curriculum_from_mapping({"curriculum": {"phases": list(phases)}}), BASE)


def _run_config(tmp_path: Path, phases: list[dict], weights: dict = RUN_WEIGHTS, **data):
    """A run config with `weights`, hard fraction 0.3, the given data sections and curriculum phases."""
    document = {"loss": {"weights": weights, "hard_negatives": {"hard_fraction": 0.3}},
                "data": data, "curriculum": {"phases": phases}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_config(path)


def test_default_run_config_holds_its_own_values_at_every_step():
    curriculum = Curriculum.from_run(load_config(None))
    expected = CurriculumValues(resolution={224: 1.0}, token_drop_rate=0.0, mix={}, hard_negative_ratio=0.3,
                                loss_weights={"contrastive": 1.0, "caption": 2.0, "balance": 0.01, "z": 0.001,
                                              "entropy_local": 0.0, "entropy_global": 0.0},
                                frozen=[], lr_multipliers={})
    for step in (0, 1, 12345):
        assert curriculum.at(step) == expected


def test_unset_values_come_from_the_run_config_at_every_step(tmp_path):
    cfg = _run_config(tmp_path, [{"start": 0, "values": {"resolution": {32: 1.0}}},
                                 {"start": 5, "values": {"loss_weights": {"contrastive": 0.5}}}],
                      token_drop={"rate": 0.1}, plan={"mix": {"image": 0.5, "audio": 0.25, "video": 0.25}})
    curriculum, plan_values = Curriculum.from_run(cfg), curriculum_values(Curriculum.from_run(cfg))
    for step in range(10):
        values = curriculum.at(step)
        contrastive = 1.0 if step < 5 else 0.5
        assert values.loss_weights == {"contrastive": contrastive, "caption": 2.0, "balance": 0.01, "z": 0.001}
        assert values.hard_negative_ratio == 0.3 and values.token_drop_rate == 0.1
        assert values.resolution == {32: 1.0} and values.mix == {"image": 0.5, "audio": 0.25, "video": 0.25}
        assert values.frozen == [] and values.lr_multipliers == {}
        assert plan_values(step) == ({32: 1.0}, 0.1, {"image": 0.5, "audio": 0.25, "video": 0.25})


def test_a_linear_ramp_of_one_weight_leaves_the_others_at_the_config(tmp_path):
    cfg = _run_config(tmp_path, [{"start": 0},
                                 {"start": 10, "transition": "linear", "ramp": 10,
                                  "values": {"loss_weights": {"caption": 1.0}}}])
    curriculum = Curriculum.from_run(cfg)
    for step, caption in [(0, 2.0), (9, 2.0), (10, 2.0), (15, 1.5), (18, 1.2), (20, 1.0), (99, 1.0)]:
        weights = curriculum.at(step).loss_weights
        assert weights == pytest.approx({"contrastive": 1.0, "caption": caption, "balance": 0.01, "z": 0.001})


def test_config_sizing_resolution_holds_until_a_phase_replaces_the_whole_table(tmp_path):
    cfg = _run_config(tmp_path, [{"start": 0}, {"start": 3, "values": {"resolution": {896: 1.0}}}],
                      sizing={"resolution": {224: 0.5, 448: 0.5}})
    curriculum = Curriculum.from_run(cfg)
    assert curriculum.at(2).resolution == {224: 0.5, 448: 0.5}
    assert curriculum.at(3).resolution == {896: 1.0}


def test_the_plot_series_draws_the_weights_the_run_applies(tmp_path):
    cfg = _run_config(tmp_path, [{"start": 0, "values": {"resolution": {32: 1.0}}},
                                 {"start": 50, "transition": "linear", "ramp": 50,
                                  "values": {"loss_weights": {"contrastive": 0.5}}}],
                      weights={"contrastive": 1.0, "caption": 0.0, "balance": 0.01, "z": 0.001})
    steps, series = curriculum_series(Curriculum.from_run(cfg), steps=200)
    assert steps[0] == 0 and steps[-1] == 200 and len(series) == len(steps)
    assert all(s["loss_weights"]["caption"] == 0.0 and s["loss_weights"]["balance"] == 0.01 for s in series)
    contrastive = dict(zip(steps.tolist(), (s["loss_weights"]["contrastive"] for s in series)))
    assert contrastive[0] == contrastive[50] == 1.0 and contrastive[100] == contrastive[200] == 0.5
    assert "caption:0" in curriculum_table(Curriculum.from_run(cfg))
    path = tmp_path / "curriculum.png"
    plot_curriculum(Curriculum.from_run(cfg), path, steps=200)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_different_config_base_changes_the_fingerprint(caplog):
    original = Curriculum.from_run(load_config(None))
    state = original.state_dict()
    assert Curriculum.from_run(load_config(None)).fingerprint == original.fingerprint
    changed = Curriculum.from_run(load_config(None, ["loss.hard_negatives.hard_fraction=0.5"]))
    assert changed.fingerprint != original.fingerprint
    with caplog.at_level(logging.WARNING):
        changed.load_state_dict(state, strict=False)
    assert "curriculum changed" in caplog.text


@pytest.mark.parametrize("override, field, message", [
    ("data.sizing.resolution={224: 0.6, 448: 0.3}", "data.sizing.resolution", "probabilities sum to 0.9"),
    ("data.sizing.resolution={0: 1.0}", "data.sizing.resolution", "side length 0 is not a positive integer"),
    ("data.sizing.resolution={}", "data.sizing.resolution", "needs at least one side length"),
    ("data.plan.mix={image: 0.5, text: 0.5}", "data.plan.mix", "unknown modalities ['text']"),
    ("data.plan.mix={image: 0.5}", "data.plan.mix", "probabilities sum to 0.5"),
    ("data.token_drop.rate=1.0", "data.token_drop.rate", "must be in [0, 1)"),
])
def test_base_value_fields_are_validated_naming_the_field(override, field, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.field == field and message in err.value.message


def test_seed_resolution_phases_change_at_configured_steps():
    c = Curriculum(load_config(CURRICULA / "resolution.yaml").curriculum, BASE)
    assert c.at(0).resolution == {224: 1.0} and c.at(19999).resolution == {224: 1.0}
    assert c.at(20000).resolution == {224: 1.0, 448: 0.0}  # a linear ramp starts from the old values
    assert c.at(20500).resolution == pytest.approx({224: 0.85, 448: 0.15})
    assert c.at(21000).resolution == {224: 0.7, 448: 0.3}
    assert c.at(39999).resolution == {224: 0.7, 448: 0.3}
    assert c.at(41000).resolution == pytest.approx({224: 0.4, 448: 0.4, 896: 0.2})
    assert c.phase_index(19999) == 0 and c.phase_index(20000) == 1 and c.phase_index(10**9) == 2
    for step in range(20000, 21001, 100):
        assert sum(c.at(step).resolution.values()) == pytest.approx(1.0)


def test_step_transition_carry_over_and_list_switch():
    c = _curriculum({"start": 0, "values": {"hard_negative_ratio": 0.3, "frozen": ["encoder"]}},
                    {"start": 10, "values": {"loss_weights": {"contrastive": 0.5}}},
                    {"start": 20, "transition": "linear", "ramp": 10, "values": {"frozen": [], "hard_negative_ratio": 0.7}})
    assert c.at(9).loss_weights == {"contrastive": 1.0, "caption": 1.0}
    assert c.at(10).loss_weights == {"contrastive": 0.5, "caption": 1.0} and c.at(10).hard_negative_ratio == 0.3
    assert c.at(19).frozen == ["encoder"] and c.at(20).frozen == []  # lists switch at the start
    assert c.at(25).hard_negative_ratio == pytest.approx(0.5)
    assert c.at(25).loss_weights == {"contrastive": 0.5, "caption": 1.0}


def test_sigmoid_drop_schedule_is_monotone_with_exact_ends():
    c = Curriculum(load_config(CURRICULA / "token_drop.yaml").curriculum, BASE)
    rates = [c.at(step).token_drop_rate for step in range(19000, 41001, 500)]
    assert rates[0] == 0.5 and rates[-1] == 0.0
    assert all(b <= a for a, b in zip(rates, rates[1:]))
    assert c.at(30000).token_drop_rate == pytest.approx(0.25)
    assert 0.45 < c.at(23000).token_drop_rate < 0.5  # slow start, unlike a linear ramp (0.425)


def test_weight_keys_carry_over_and_new_ones_ramp_from_their_neutral_value():
    c = _curriculum({"start": 0, "values": {"lr_multipliers": {"encoder": 0.1}}},
                    {"start": 100, "transition": "linear", "ramp": 100, "values": {"lr_multipliers": {"llm": 0.2}}})
    assert c.at(150).lr_multipliers == pytest.approx({"encoder": 0.1, "llm": 0.6})
    assert c.at(200).lr_multipliers == pytest.approx({"encoder": 0.1, "llm": 0.2})


def test_probability_tables_are_replaced_whole():
    c = _curriculum({"start": 0, "values": {"mix": {"image": 0.5, "audio": 0.5}}},
                    {"start": 10, "values": {"mix": {"video": 1.0}, "resolution": {448: 1.0}}})
    assert c.at(9).mix == {"image": 0.5, "audio": 0.5} and c.at(9).resolution == {224: 1.0}
    assert c.at(10).mix == {"video": 1.0} and c.at(10).resolution == {448: 1.0}


def test_resume_gives_identical_values_and_mismatch_is_refused(caplog):
    cfg = load_config(CURRICULA / "seed.yaml").curriculum
    original = Curriculum(cfg, BASE)
    trace = [original.at(step) for step in range(0, 45000, 997)]
    state = original.state_dict()
    resumed = Curriculum(load_config(CURRICULA / "seed.yaml").curriculum, BASE)
    resumed.load_state_dict(state)
    assert resumed.step == original.step
    assert [resumed.at(step) for step in range(0, 45000, 997)] == trace
    other = Curriculum(load_config(CURRICULA / "negatives.yaml").curriculum, BASE)
    with pytest.raises(ValueError, match="curriculum changed"):
        other.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state, strict=False)
    assert "curriculum changed" in caplog.text and other.step == state["step"]


def test_fingerprint_ignores_spelling_but_not_content():
    a = curriculum_from_mapping({"phases": [{"start": 0, "values": {"resolution": {224: 1.0}}}]})
    b = curriculum_from_mapping({"phases": [{"start": 0, "values": {"resolution": {"224": 1}}}]})
    c = curriculum_from_mapping({"phases": [{"start": 0, "values": {"resolution": {448: 1.0}}}]})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("phases, message", [
    ([{"start": 0}, {"start": 5, "values": {"resolution": {224: 0.6, 448: 0.3}}}],
     "curriculum.phases[1].values.resolution: probabilities sum to 0.9, expected 1"),
    ([{"start": 0}, {"start": 0}], "curriculum.phases[1].start: 0 is not after phases[0].start=0"),
    ([{"start": 0, "values": {"resolutoin": {224: 1.0}}}], "curriculum.phases[0].values.resolutoin: unknown value"),
    ([{"start": 0}, {"start": 10, "transition": "linear", "ramp": 20}, {"start": 20}],
     "curriculum.phases[1].ramp: 20 steps run past phases[2].start=20"),
    ([{"start": 3}], "curriculum.phases[0].start: the first phase must start at 0"),
    ([{"start": 0, "rampp": 3}], "curriculum.phases[0].rampp: unknown key"),
    ([{"start": 0}, {"start": 5, "transition": "linear"}], "curriculum.phases[1].ramp: a linear transition needs ramp > 0"),
    ([{"start": 0, "values": {"token_drop_rate": 1.5}}], "curriculum.phases[0].values.token_drop_rate: 1.5 is outside"),
    ([{"start": 0, "values": {"frozen": "encoder"}}], "curriculum.phases[0].values.frozen: expected a list"),
    ([{"start": 0, "values": {"resolution": {"big": 1.0}}}], "curriculum.phases[0].values.resolution: side length"),
    ([{"start": 0, "values": {"loss_weights": {"caption": -1}}}], "curriculum.phases[0].values.loss_weights.caption"),
])
def test_validation_names_the_field(phases, message):
    with pytest.raises(ConfigError) as err:
        curriculum_from_mapping({"curriculum": {"phases": phases}})
    assert str(err.value).startswith(f"<test>: {message}")


def test_shipped_curricula_load_and_seed_values():
    files = sorted(CURRICULA.glob("*.yaml"))
    assert {f.stem for f in files} >= {"resolution", "negatives", "freezing", "lr_groups", "loss_balance", "seed"}
    for path in files:
        load_config(path).curriculum
    seed = Curriculum(load_config(CURRICULA / "seed.yaml").curriculum, BASE)
    start, late = seed.at(0), seed.at(10**6)
    assert start.loss_weights == {"contrastive": 0.75, "caption": 0.25} and start.frozen == ["encoder"]
    assert late.loss_weights == {"contrastive": 0.5, "caption": 0.5} and late.frozen == []
    assert start.hard_negative_ratio == 0.3 and late.hard_negative_ratio == 0.7
    assert late.resolution == {224: 0.4, 448: 0.4, 896: 0.2}
    assert late.lr_multipliers == {"encoder": 0.1, "resampler": 1.0, "llm": 0.2}


def test_table_and_plot(tmp_path):
    curriculum = Curriculum(load_config(CURRICULA / "seed.yaml").curriculum, BASE)
    table = curriculum_table(curriculum)
    lines = table.splitlines()
    assert lines[0].split() == ["value", "phase", "0", "phase", "1", "phase", "2"]
    assert "linear/2000" in table and "*224:0.4 448:0.4 896:0.2" in table
    assert any(line.startswith("frozen") and "*encoder" in line for line in lines)
    path = tmp_path / "curriculum.png"
    plot_curriculum(curriculum, path, steps=50000)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10000


def test_cli_curriculum_show_prints_table_and_writes_png(tmp_path) -> None:
    from conftest import run_plait

    out = tmp_path / "plot.png"
    proc = run_plait("curriculum", "show", "configs/curricula/resolution.yaml", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "448:0.3" in proc.stderr and '"phases": 3' in proc.stdout.strip().splitlines()[-1]
