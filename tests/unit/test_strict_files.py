"""Strict files (issue 40, break 2): every YAML or JSON a site or coordinator reads goes through
healthfm_core/strict_files.py. Replayed as the red team found it: a policy with two `dp:` blocks
(mandatory with cap 3, then optional with cap 100) turned mandatory DP off, the last one silently
winning; `require_secure_aggregation: yes` and `on` were accepted; `threads: 100000` was accepted.
Each is now refused naming the file, the field and the value, and so is a duplicated key in the
JSON files and peer messages the platform reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.policy import PolicyError, load_policy
from client.threads import parse_threads
from healthfm_core.data.labels.aces_tasks import task_from_text
from healthfm_core.protocol import RoundConfig
from healthfm_core.protocol.secure_records import JSON_KEY, from_flat, to_flat
from healthfm_core.strict_files import DuplicateKeyError, StrictFileError, strict_json, strict_yaml
from secure_aggregation.messages import UnmaskRequest
from server.config import FederationConfig
from server.outcome import RunOutcome, read_outcome, write_outcome
from server.runlog import read_events

REPO = Path(__file__).resolve().parents[2]

TWO_DP_BLOCKS = """\
min_subjects: 20
dp:
  mandatory: true
  epsilon_cap: 3
  delta: 1.0e-5
threads: 2
dp:
  mandatory: false
  epsilon_cap: 100
  delta: 1.0e-5
"""


def test_a_policy_with_two_dp_blocks_is_refused_naming_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(TWO_DP_BLOCKS)
    with pytest.raises(PolicyError, match=rf"{path}: line 7: field dp: duplicated key \(first at line 2\)"):
        load_policy(path)
    as_json = tmp_path / "policy.json"  # the same in a JSON policy
    as_json.write_text(
        '{"dp": {"mandatory": true, "epsilon_cap": 3, "delta": 1e-5}, "dp": {"epsilon_cap": 100, "delta": 1e-5}}'
    )
    with pytest.raises(PolicyError, match=rf"{as_json}: field dp: duplicated key"):
        load_policy(as_json)
    nested = tmp_path / "nested.yaml"  # inside a block too
    nested.write_text("dp:\n  epsilon_cap: 3\n  delta: 1.0e-5\n  epsilon_cap: 100\n")
    with pytest.raises(PolicyError, match=rf"{nested}: line 4: field epsilon_cap: duplicated key"):
        load_policy(nested)


@pytest.mark.parametrize("word", ["yes", "on", "Yes", "OFF", "no"])
def test_a_yaml_1_1_boolean_is_refused_naming_file_field_and_value(tmp_path: Path, word: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"min_subjects: 2\nrequire_secure_aggregation: {word}\n")
    with pytest.raises(
        PolicyError, match=rf"{path}: line 2: field require_secure_aggregation: value '{word}': a boolean"
    ):
        load_policy(path)
    path.write_text(f"dp:\n  mandatory: {word}\n  epsilon_cap: 3\n  delta: 1.0e-5\n")
    with pytest.raises(PolicyError, match=rf"field mandatory: value '{word}'"):
        load_policy(path)


def test_true_and_false_are_the_booleans(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    for text, expected in (("true", True), ("True", True), ("false", False), ("FALSE", False)):
        path.write_text(f"require_secure_aggregation: {text}\n")
        assert load_policy(path).require_secure_aggregation is expected
    path.write_text("require_secure_aggregation: 'yes'\n")  # quoted: a string, and not a boolean
    with pytest.raises(
        PolicyError, match="field require_secure_aggregation: value 'yes': Input should be a valid boolean"
    ):
        load_policy(path)
    assert strict_yaml("country: 'no'\n", "x.yaml") == {"country": "no"}


def test_a_yaml_merge_key_is_refused_even_with_a_key_beside_it() -> None:
    """A key beside a merge overrides it in YAML: what the duplicate-key check exists to stop
    (issue 67, break 5; tests/unit/test_strict_yaml_12.py)."""
    with pytest.raises(StrictFileError, match=r"x.yaml: line 3: merge key <<: refused"):
        strict_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", "x.yaml")


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("threads: 100000", "threads"),
        ("threads: 0", "threads"),
        ("min_subjects: 0", "min_subjects"),
        ("min_subjects: 10000000", "min_subjects"),
        ("min_positives: 5000000", "min_positives"),
        ("secagg_min_holders: 0", "secagg_min_holders"),
        ("secagg_min_holders: 300", "secagg_min_holders"),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, max_grad_norm: 1.0e+6}", "dp.max_grad_norm"),
        ("dp: {epsilon_cap: 3, delta: 1.0e-5, noise_multiplier: 5000}", "dp.noise_multiplier"),
        ("dp: {epsilon_cap: 300, delta: 1.0e-5}", "dp.epsilon_cap"),
    ],
)
def test_every_number_of_the_policy_has_a_range(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(line + "\n")
    with pytest.raises(PolicyError, match=rf"{path}: field {field}: value"):
        load_policy(path)


def test_a_nodes_threads_setting_has_the_policys_range() -> None:
    assert parse_threads("1024") == 1024
    for bad in ("100000", 100000, "0"):
        with pytest.raises(ValueError, match=r"threads: value .*: a whole number from 1 to 1024, or auto"):
            parse_threads(bad)


def test_the_json_reader_refuses_duplicated_keys_at_any_depth() -> None:
    with pytest.raises(DuplicateKeyError, match=r"r.json: field a: duplicated key"):
        strict_json('{"a": 1, "a": 2}', "r.json")
    with pytest.raises(DuplicateKeyError, match=r"field b: duplicated key"):
        strict_json('[{"x": {"b": 1, "b": 1}}]', "r.json")
    with pytest.raises(StrictFileError, match=r"r.json: not valid JSON"):
        strict_json('{"a": ', "r.json")
    assert strict_json('{"a": {"b": [1, {"c": true}]}}', "r.json") == {"a": {"b": [1, {"c": True}]}}


def test_the_coordinators_files_refuse_duplicated_keys(tmp_path: Path) -> None:
    """outcome.json and rounds.jsonl: a line written with a key twice is refused, never skipped
    as a line cut short (rounds.jsonl skips those)."""
    write_outcome(tmp_path, RunOutcome(status="completed", started_at=1.0, rounds=2, rounds_done=2))
    text = (tmp_path / "outcome.json").read_text().rstrip().removesuffix("}")
    (tmp_path / "outcome.json").write_text(text + ', "status": "running"}')
    with pytest.raises(ValueError, match=r"outcome.json: field status: duplicated key"):
        read_outcome(tmp_path)
    events = tmp_path / "rounds.jsonl"
    events.write_text('{"event": "round", "round": 1}\n{"event": "round", "rou')  # cut short: skipped
    assert read_events(events) == [{"event": "round", "round": 1}]
    events.write_text('{"event": "round", "round": 1, "updated": true, "updated": false}\n')
    with pytest.raises(DuplicateKeyError, match=r"rounds.jsonl line 1: field updated: duplicated key"):
        read_events(events)


def test_a_peers_json_with_a_duplicated_key_is_refused() -> None:
    """A secure round's message (healthfm_core/protocol/secure_records.py) and a task definition a peer sends."""
    record = to_flat(UnmaskRequest(round=1, survivors=[1, 2, 3], groups=["shared"], withheld={}))
    text = str(record[JSON_KEY])
    record[JSON_KEY] = text[:-1] + ', "groups": ["shared", "genomics"]}'
    with pytest.raises(DuplicateKeyError, match=r"UnmaskRequest record: field groups: duplicated key"):
        from_flat(UnmaskRequest, record)
    task = (REPO / "configs" / "tasks" / "cad.yaml").read_text()
    assert task_from_text(task, "cad.yaml").name
    with pytest.raises(ValueError, match=r"cad.yaml: line \d+: field metadata: duplicated key"):
        task_from_text(task + "metadata:\n  horizons_days: [1]\n", "cad.yaml")


def test_booleans_a_peer_or_a_run_config_sends_are_strict(tmp_path: Path) -> None:
    flat = RoundConfig(round=1, rounds=1, local_steps=1, lr=1e-3, setup_sha256="x").to_flat()
    with pytest.raises(ValueError, match="secure_aggregation"):
        RoundConfig.from_flat({**flat, "secure-aggregation": "yes"})
    with pytest.raises(ValueError, match="secure_aggregation"):
        FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "secure-aggregation": "on"})
    cfg = FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "secure-aggregation": True})
    assert cfg.secure_aggregation is True
    assert json.loads(json.dumps(flat))["secure-aggregation"] is False
