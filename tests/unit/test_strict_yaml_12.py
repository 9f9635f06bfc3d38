"""Strict files, YAML 1.2 all the way (issue 67, break 5), replayed as the red team found it:

- `dp: {<<: {mandatory: true, epsilon_cap: 3}, <<: {mandatory: false, epsilon_cap: 100}}` was
  accepted as optional DP with cap 100: the duplicate-key check skipped merge keys, and the later
  merge silently won. Merge keys are now refused in every strict file, naming the file and line.
- YAML 1.1 numbers where the docs promise YAML 1.2: `min_subjects: 020` read 16 (1.1's octal),
  `1:00` read 60 (sexagesimal). A plain number that YAML 1.1 and 1.2 read differently is now
  refused, naming file, line, field, value and both readings; YAML 1.2's own forms read as 1.2
  reads them (`0x1` is 1, `0o17` is 15, `1e5` is 100000.0).

Every reader of the strict loader gets this: site policies (client/policy.py), model configs,
task files, scenarios.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import PolicyError, load_policy
from healthfm_core.data.labels.aces_tasks import task_from_text
from healthfm_core.model.config import load_model_config
from healthfm_core.strict_files import StrictFileError, strict_yaml
from simulations.synthetic.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]

TWO_MERGES = "dp: {<<: {mandatory: true, epsilon_cap: 3, delta: 1.0e-5}, <<: {mandatory: false, epsilon_cap: 100, delta: 1.0e-5}}\n"


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site-policy.yaml"
    path.write_text(text)
    return path


def test_two_merge_keys_no_longer_turn_mandatory_dp_off(tmp_path: Path) -> None:
    path = _policy(tmp_path, "min_subjects: 20\n" + TWO_MERGES)
    with pytest.raises(PolicyError, match=rf"{path}: line 2: merge key <<: refused"):
        load_policy(path)


@pytest.mark.parametrize(
    "text",
    [
        # one merge, with a key beside it that overrides what it merged
        "base: &strict {mandatory: true, epsilon_cap: 3, delta: 1.0e-5}\ndp:\n  <<: *strict\n  mandatory: false\n",
        # block style, two merges of anchors
        "a: &a {mandatory: true}\nb: &b {mandatory: false}\ndp:\n  <<: *a\n  <<: *b\n  epsilon_cap: 3\n",
        # a list of mappings merged
        "dp:\n  <<: [{mandatory: false}, {mandatory: true}]\n  epsilon_cap: 3\n",
    ],
)
def test_a_merge_key_is_refused_wherever_it_stands(tmp_path: Path, text: str) -> None:
    path = _policy(tmp_path, text)
    with pytest.raises(PolicyError, match=rf"{path}: line \d+: merge key <<: refused"):
        load_policy(path)
    # An anchor and an alias alone (no merge) are no override: still read.
    assert strict_yaml("a: &x {b: 1}\nc: *x\n", "x.yaml") == {"a": {"b": 1}, "c": {"b": 1}}
    assert strict_yaml("'<<': text\n", "x.yaml") == {"<<": "text"}  # a quoted key is text


@pytest.mark.parametrize(
    ("value", "yaml11", "yaml12"),
    [
        ("020", "int 16", "int 20"),  # 1.1's octal
        ("017", "int 15", "int 17"),
        ("09", "str '09'", "int 9"),
        ("1:00", "int 60", "the text '1:00'"),  # 1.1's sexagesimal
        ("1:00:00", "int 3600", "the text '1:00:00'"),
        ("0b101", "int 5", "the text '0b101'"),
        ("1_000", "int 1000", "the text '1_000'"),
        ("-0x1", "int -1", "the text '-0x1'"),
        ("1:30.5", "float 90.5", "the text '1:30.5'"),
    ],
)
def test_a_number_yaml_1_1_reads_otherwise_is_refused_naming_both_readings(
    tmp_path: Path, value: str, yaml11: str, yaml12: str
) -> None:
    path = _policy(tmp_path, f"min_subjects: {value}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert f"{path}: line 1: field min_subjects: value {value}: YAML 1.1 reads {yaml11}, YAML 1.2 {yaml12}" in message
    assert "quote it if it is text" in message
    # Quoted, it is text (and the policy's integer field says so).
    path.write_text(f"min_subjects: '{value}'\n")
    with pytest.raises(PolicyError, match=r"field min_subjects: value .*Input should be a valid integer"):
        load_policy(path)
    # In a list, with no field to name, the line and value still are.
    with pytest.raises(StrictFileError, match=rf"x.yaml: line 2: value {value}: YAML 1.1 reads"):
        strict_yaml(f"a:\n  - {value}\n", "x.yaml")
    # An explicit tag does not settle it: `!!int 020` is 16 to YAML 1.1 as well.
    with pytest.raises(StrictFileError, match=rf"x.yaml: line 1: (field a: )?value {value}"):
        strict_yaml(f"a: !!int {value}\n", "x.yaml")


@pytest.mark.parametrize(
    ("value", "number"),
    [("0x1", 1), ("0x1F", 31), ("0o17", 15), ("0", 0), ("00", 0), ("-0", 0), ("+5", 5), ("20", 20)],
)
def test_yaml_1_2_integers_read_as_yaml_1_2_reads_them(tmp_path: Path, value: str, number: int) -> None:
    data = strict_yaml(f"a: {value}\n", "x.yaml")
    assert data == {"a": number} and type(data["a"]) is int
    if number >= 1:
        assert load_policy(_policy(tmp_path, f"min_subjects: {value}\n")).min_subjects == number


@pytest.mark.parametrize(
    ("value", "number"),
    [("1e5", 1e5), ("1.5", 1.5), (".5", 0.5), ("1.", 1.0), ("01.5", 1.5), ("-2E-3", -2e-3), ("1.0e+308", 1e308)],
)
def test_yaml_1_2_floats_read_as_yaml_1_2_reads_them(value: str, number: float) -> None:
    data = strict_yaml(f"a: {value}\n", "x.yaml")
    assert data == {"a": number} and type(data["a"]) is float


def test_every_reader_of_strict_files_refuses_merge_keys_and_ambiguous_numbers(tmp_path: Path) -> None:
    """Model configs, task files and scenarios go through the same loader as policies."""
    model = (REPO / "configs" / "model" / "tiny.yaml").read_text()
    assert load_model_config(str(_write(tmp_path, "m.yaml", model))).d_model == 32
    with pytest.raises(StrictFileError, match=r"m.yaml: line \d+: field d_model: value 032: YAML 1.1 reads int 26"):
        load_model_config(str(_write(tmp_path, "m.yaml", model.replace("d_model: 32", "d_model: 032", 1))))
    with pytest.raises(StrictFileError, match=r"m.yaml: line \d+: merge key <<: refused"):
        load_model_config(
            str(_write(tmp_path, "m.yaml", model + "wearable_defaults: &w {n_layers: 1}\nx:\n  <<: *w\n"))
        )
    task = (REPO / "configs" / "tasks" / "cad.yaml").read_text()
    assert task_from_text(task, "cad.yaml").name
    with pytest.raises(ValueError, match=r"cad.yaml: line \d+: merge key <<: refused"):
        task_from_text(task + "extra:\n  <<: {a: 1}\n", "cad.yaml")
    with pytest.raises(ValueError, match=r"cad.yaml: line \d+: field x: value 1:00: YAML 1.1 reads int 60"):
        task_from_text(task + "x: 1:00\n", "cad.yaml")
    scenario = (REPO / "configs" / "scenario" / "tiny.yaml").read_text()
    assert load_scenario(_write(tmp_path, "s.yaml", scenario)).name == "tiny"
    with pytest.raises(ValueError, match=r"s.yaml: line \d+: .*value 0100: YAML 1.1 reads int 64"):
        load_scenario(_write(tmp_path, "s.yaml", scenario + "seed_extra: 0100\n"))


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
