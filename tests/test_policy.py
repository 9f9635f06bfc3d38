"""The site policy file: valid files load, every bad one fails naming file, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.policy import PolicyError, SitePolicy, load_policy
from healthfm_core.model.groups import GROUPS


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
