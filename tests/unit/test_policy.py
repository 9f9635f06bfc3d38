"""The site policy file: valid files load, every bad one fails naming file, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import PolicyError, SitePolicy, load_policy
from healthfm_core.terms.dp_policy import EPSILON_CAP_MAX
from healthfm_core.terms.groups import GROUPS


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_json_policies_load_the_same(tmp_path: Path) -> None:
    yaml_text = """
min_subjects: 25
groups_allowed: [shared, ehr]
dp: {mandatory: true, epsilon_cap: 8, delta: 1.0e-6, max_grad_norm: 0.5, target_epsilon: 3}
"""
    json_text = (
        '{"min_subjects": 25, "groups_allowed": ["shared", "ehr"], "dp": {"mandatory": true, '
        '"epsilon_cap": 8, "delta": 1e-6, "max_grad_norm": 0.5, "target_epsilon": 3}}'
    )
    a, b = load_policy(write(tmp_path, "p.yaml", yaml_text)), load_policy(write(tmp_path, "p.json", json_text))
    assert a == b
    assert a.dp is not None and a.dp.epsilon_cap == 8 and a.dp.noise_multiplier is None
    assert a.allows("ehr") and not a.allows("wearables")


def test_an_empty_policy_allows_every_group_without_dp(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", ""))
    assert policy == SitePolicy() and policy.groups_allowed == list(GROUPS) and policy.dp is None


@pytest.mark.parametrize(
    "text, field, value",
    [
        ("min_subjects: 0", "min_subjects", "0"),
        ("groups_allowed: [shared, imaging]", "groups_allowed", "imaging"),
        ("dp: {epsilon_cap: -1, delta: 1.0e-5}", "dp.epsilon_cap", "-1"),
        ("dp: {epsilon_cap: 3, delta: 1.5}", "dp.delta", "1.5"),
        ("dp: {epsilon_cap: 3}", "dp.delta", ""),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, noise_multiplier: 1.0, target_epsilon: 2}", "dp", "noise_multiplier"),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, target_epsilon: 5}", "dp", "exceeds epsilon_cap"),
        ("min_subject: 10", "min_subject", "10"),  # a typo is an error, not a silent default
        # A cap that can never be reached is no cap: non-finite and non-numeric values are refused.
        ("dp: {epsilon_cap: .inf, delta: 1.0e-5}", "dp.epsilon_cap", "inf"),
        ("dp: {epsilon_cap: .nan, delta: 1.0e-5}", "dp.epsilon_cap", "nan"),
        ('dp: {epsilon_cap: "nan", delta: 1.0e-5}', "dp.epsilon_cap", "'nan'"),
        ("dp: {epsilon_cap: true, delta: 1.0e-5}", "dp.epsilon_cap", "True"),
        ('dp: {epsilon_cap: "8", delta: 1.0e-5}', "dp.epsilon_cap", "'8'"),
        ("dp: {epsilon_cap: 3, delta: .nan}", "dp.delta", "nan"),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, noise_multiplier: .inf}", "dp.noise_multiplier", "inf"),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, max_grad_norm: false}", "dp.max_grad_norm", "False"),
        ('dp: {epsilon_cap: 3, delta: 1.0e-5, mandatory: "yes"}', "dp.mandatory", "'yes'"),
    ],
)
def test_bad_fields_are_named_with_their_value(tmp_path: Path, text: str, field: str, value: str) -> None:
    path = write(tmp_path, "site-policy.yaml", text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert str(path) in message and f"field {field}:" in message and value in message


def test_unreadable_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the site policy"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(write(tmp_path, "p.json", "{min_subjects: 3"))
    with pytest.raises(PolicyError, match="must be a mapping"):
        load_policy(write(tmp_path, "p.yaml", "- 1\n- 2\n"))


def test_a_json_infinite_cap_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", '{"dp": {"epsilon_cap": Infinity, "delta": 1e-5}}')
    with pytest.raises(PolicyError, match=r"p.json: field dp.epsilon_cap: value inf: Input should be a finite number"):
        load_policy(path)


def test_delta_is_at_most_one_over_the_train_subjects_when_they_are_known(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "dp: {epsilon_cap: 3, delta: 0.001}")
    assert load_policy(path).dp is not None  # n unknown: checked at the round
    assert load_policy(path, train_subjects=1000).dp is not None  # exactly 1/n
    with pytest.raises(PolicyError, match=r"p.yaml: field dp.delta: value 0.001: .*above 1/n = 1/1001"):
        load_policy(path, train_subjects=1001)


# ------------------------------------------------------------------------ numbers in any spelling (issue 26, break 5)


@pytest.mark.parametrize(
    "spelling, value",
    [
        ("5", 5.0),
        ("5.0", 5.0),
        (".5", 0.5),
        ("5e0", 5.0),
        ("5E+0", 5.0),
        ("0.5e1", 5.0),
        ("1e2", 100.0),
        ("100", 100.0),
    ],
)
def test_an_epsilon_cap_parses_in_any_yaml_spelling(tmp_path: Path, spelling: str, value: float) -> None:
    """YAML 1.1 (PyYAML) reads `5e0` or `1e2` as a string: it used to be refused as one."""
    policy = load_policy(write(tmp_path, "p.yaml", f"dp: {{epsilon_cap: {spelling}, delta: 1e-5}}"))
    assert policy.dp is not None and policy.dp.epsilon_cap == value and policy.dp.delta == 1e-5


@pytest.mark.parametrize("spelling", ["1e308", "1.0e+308", "1.0e308", "1e+400", "100.001", "1e3"])
def test_an_epsilon_cap_above_the_maximum_is_refused_naming_file_field_and_value(tmp_path: Path, spelling: str) -> None:
    """The replayed break: `1.0e+308` was accepted (no cap), `1e308` refused as "a string"."""
    path = write(tmp_path, "site-policy.yaml", f"dp:\n  epsilon_cap: {spelling}\n  delta: 1.0e-5\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert f"{path}: field dp.epsilon_cap: value " in message and "string" not in message
    assert f"above the maximum {EPSILON_CAP_MAX:g}" in message or "finite number" in message  # 1e+400 is inf


def test_the_json_cap_is_bounded_as_well(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", '{"dp": {"epsilon_cap": 1e308, "delta": 1e-5}}')
    with pytest.raises(PolicyError, match=r"p.json: field dp.epsilon_cap: value 1e\+308: .*above the maximum 100"):
        load_policy(path)


@pytest.mark.parametrize(
    "spelling, value", [("1e-5", 1e-5), ("1.0e-5", 1e-5), ("1E-5", 1e-5), (".00001", 1e-5), ("+1e-5", 1e-5)]
)
def test_a_delta_parses_in_any_yaml_spelling(tmp_path: Path, spelling: str, value: float) -> None:
    policy = load_policy(write(tmp_path, "p.yaml", f"dp: {{epsilon_cap: 8, delta: {spelling}}}"))
    assert policy.dp is not None and policy.dp.delta == value


@pytest.mark.parametrize("spelling", ["1e0", "2e-0", "-1e-5", "0e0"])
def test_a_delta_out_of_range_is_refused_naming_file_field_and_value(tmp_path: Path, spelling: str) -> None:
    path = write(tmp_path, "p.yaml", f"dp: {{epsilon_cap: 8, delta: {spelling}}}")
    with pytest.raises(PolicyError, match=rf"{path}: field dp.delta: value -?[0-9.e+-]+: Input should be"):
        load_policy(path)
