"""Curriculum: phases change at the configured steps, ramps interpolate, validation, resume, show."""

import logging
from pathlib import Path

import pytest

from plait.trainer.curriculum import (
    Curriculum,
    CurriculumConfig,
    CurriculumValues,
    curriculum_from_mapping,
    curriculum_table,
    load_curriculum,
    plot_curriculum,
)

CURRICULA = Path(__file__).resolve().parent.parent / "configs" / "curricula"


def _curriculum(*phases) -> Curriculum:
    return Curriculum(curriculum_from_mapping({"curriculum": {"phases": list(phases)}}))


def test_default_config_resolves_defaults():
    assert Curriculum(CurriculumConfig()).at(12345) == CurriculumValues()


def test_seed_resolution_phases_change_at_configured_steps():
    c = Curriculum(load_curriculum(CURRICULA / "resolution.yaml"))
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
    assert c.at(10).loss_weights == {"contrastive": 0.5} and c.at(10).hard_negative_ratio == 0.3
    assert c.at(19).frozen == ["encoder"] and c.at(20).frozen == []  # lists switch at the start
    assert c.at(25).hard_negative_ratio == pytest.approx(0.5)
    assert c.at(25).loss_weights == {"contrastive": 0.5}


def test_sigmoid_drop_schedule_is_monotone_with_exact_ends():
    c = Curriculum(load_curriculum(CURRICULA / "token_drop.yaml"))
    rates = [c.at(step).token_drop_rate for step in range(19000, 41001, 500)]
    assert rates[0] == 0.5 and rates[-1] == 0.0
    assert all(b <= a for a, b in zip(rates, rates[1:]))
    assert c.at(30000).token_drop_rate == pytest.approx(0.25)
    assert 0.45 < c.at(23000).token_drop_rate < 0.5  # slow start, unlike a linear ramp (0.425)


def test_missing_dict_keys_ramp_from_their_neutral_value():
    c = _curriculum({"start": 0, "values": {"lr_multipliers": {"encoder": 0.1}}},
                    {"start": 100, "transition": "linear", "ramp": 100, "values": {"lr_multipliers": {"llm": 0.2}}})
    assert c.at(150).lr_multipliers == pytest.approx({"encoder": 0.55, "llm": 0.6})


def test_resume_gives_identical_values_and_mismatch_is_refused(caplog):
    cfg = load_curriculum(CURRICULA / "seed.yaml")
    original = Curriculum(cfg)
    trace = [original.at(step) for step in range(0, 45000, 997)]
    state = original.state_dict()
    resumed = Curriculum(load_curriculum(CURRICULA / "seed.yaml"))
    resumed.load_state_dict(state)
    assert resumed.step == original.step
    assert [resumed.at(step) for step in range(0, 45000, 997)] == trace
    other = Curriculum(load_curriculum(CURRICULA / "negatives.yaml"))
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
    ([{"start": 0, "rampp": 3}], "curriculum.phases[0].rampp: unknown field"),
    ([{"start": 0}, {"start": 5, "transition": "linear"}], "curriculum.phases[1].ramp: a linear transition needs ramp > 0"),
    ([{"start": 0, "values": {"token_drop_rate": 1.5}}], "curriculum.phases[0].values.token_drop_rate: 1.5 is outside"),
    ([{"start": 0, "values": {"frozen": "encoder"}}], "curriculum.phases[0].values.frozen: expected a list"),
    ([{"start": 0, "values": {"resolution": {"big": 1.0}}}], "curriculum.phases[0].values.resolution: side length"),
    ([{"start": 0, "values": {"loss_weights": {"caption": -1}}}], "curriculum.phases[0].values.loss_weights.caption"),
])
def test_validation_names_the_field(phases, message):
    with pytest.raises(ValueError) as err:
        curriculum_from_mapping({"curriculum": {"phases": phases}})
    assert str(err.value).startswith(message)


def test_shipped_curricula_load_and_seed_values():
    files = sorted(CURRICULA.glob("*.yaml"))
    assert {f.stem for f in files} >= {"resolution", "negatives", "freezing", "lr_groups", "loss_balance", "seed"}
    for path in files:
        load_curriculum(path)
    seed = Curriculum(load_curriculum(CURRICULA / "seed.yaml"))
    start, late = seed.at(0), seed.at(10**6)
    assert start.loss_weights == {"contrastive": 0.75, "caption": 0.25} and start.frozen == ["encoder"]
    assert late.loss_weights == {"contrastive": 0.5, "caption": 0.5} and late.frozen == []
    assert start.hard_negative_ratio == 0.3 and late.hard_negative_ratio == 0.7
    assert late.resolution == {224: 0.4, 448: 0.4, 896: 0.2}
    assert late.lr_multipliers == {"encoder": 0.1, "resampler": 1.0, "llm": 0.2}


def test_table_and_plot(tmp_path):
    cfg = load_curriculum(CURRICULA / "seed.yaml")
    table = curriculum_table(cfg)
    lines = table.splitlines()
    assert lines[0].split() == ["value", "phase", "0", "phase", "1", "phase", "2"]
    assert "linear/2000" in table and "*224:0.4 448:0.4 896:0.2" in table
    assert any(line.startswith("frozen") and "*encoder" in line for line in lines)
    path = tmp_path / "curriculum.png"
    plot_curriculum(cfg, path, steps=50000)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10000


def test_cli_curriculum_show_prints_table_and_writes_png(tmp_path) -> None:
    from conftest import run_plait

    out = tmp_path / "plot.png"
    proc = run_plait("curriculum", "show", "configs/curricula/resolution.yaml", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "448:0.3" in proc.stderr and '"phases": 3' in proc.stdout.strip().splitlines()[-1]
