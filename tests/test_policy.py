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
    json_text = ('{"min_subjects": 25, "groups_allowed": ["shared", "ehr"], "dp": {"mandatory": true, '
                 '"epsilon_cap": 8, "delta": 1e-6, "max_grad_norm": 0.5, "target_epsilon": 3}}')
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
