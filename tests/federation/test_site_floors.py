"""The site's own floors (issue 40, break 1): what a site enforces whatever the coordinator's run
config says, replayed as the red team ran it.

- The secure-aggregation floor: the coordinator ran `launch -c secagg-min-holders=1` and unmasked
  genomics over its holders alone (one site's update exactly), exit 0. A site's policy now holds
  `secagg_min_holders` (default 3): a round whose config lets the server open a group over fewer
  holders is refused at its first stage, named to the coordinator, and no update is masked, so
  none is revealed. The replay tool exits 1 on a transcript where a group was opened below the floor.
- Plain rounds: a site whose policy says `require_secure_aggregation: true` refuses every update
  that would leave in the clear, also a plain train message whose config claims secure aggregation.

The real FederationServer and each site's real ClientApp in this process (tests/helpers/in_process_grid.py),
the four sites of tests/federation/test_secure_round.py (genomics held by two of them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message
from helpers.in_process_grid import InProcessGrid
from helpers.secure_aggregation_fixtures import MIXES, make_config
from helpers.secure_round_runs import (
    four_site_node_configs,
    run,
    the_round,
)

from client.policy import PolicyError, load_policy
from healthfm_core.protocol import RoundConfig
from secure_aggregation.errors import SecAggRefusal
from secure_aggregation.replay import main as replay
from secure_aggregation.site import SiteRound
from secure_aggregation.transcript import read_secure_round
from server.audit import AUDIT_FILE, read_audit_log
from server.outcome import read_outcome
from server.runlog import read_events


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The four sites of helpers/secure_round_runs.py, as the in-process grid's node configs."""
    return four_site_node_configs(tmp_path_factory)


def test_a_round_config_below_the_site_floor_is_refused_before_any_key() -> None:
    config = make_config(MIXES, threshold=3, min_holders=1)
    with pytest.raises(SecAggRefusal, match=r"min_holders 1 is below this site's floor 3"):
        SiteRound(config, 3)  # genomics' single holder: the default floor
    with pytest.raises(SecAggRefusal, match=r"min_holders 2 is below this site's floor 4"):
        SiteRound(make_config(MIXES, threshold=3, min_holders=2), 1, site_min_holders=4)
    SiteRound(config, 3, site_min_holders=1)  # a site that lowered its own floor takes part


def test_the_floor_is_a_policy_setting_with_a_default_and_a_range(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("min_subjects: 2\n")
    assert load_policy(path).secagg_min_holders == 3
    path.write_text("secagg_min_holders: 5\n")
    assert load_policy(path).secagg_min_holders == 5
    for bad in ("0", "1000", "'3'", "3.0", "true"):
        path.write_text(f"secagg_min_holders: {bad}\n")
        with pytest.raises(PolicyError, match=rf"{path}: field secagg_min_holders: value"):
            load_policy(path)


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"policy-{abs(hash(text))}.yaml"
    path.write_text(text)
    return path


def test_a_coordinator_asking_min_holders_1_is_refused_by_every_site_and_nothing_is_unmasked(
    sites: dict[int, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The red team's attack: `-c secagg-min-holders=1`. Every site (no policy: the default floor
    3) refuses the round at its keys stage, saying why; the round fails with the global model
    unchanged; the server received no masked vector and no unmask share: genomics' holders'
    updates were never revealed. The refusal is in rounds.jsonl, the audit log and the outcome."""
    out = run(
        InProcessGrid(sites), tmp_path / "run", secure_aggregation=True, secagg_min_holders=1, record_transcript=True
    )
    event = the_round(out)
    for name, entry in event["sites"].items():
        assert entry["status"] == "refused", (name, entry)
        assert "keys: round 1: the round's min_holders 1 is below this site's floor 3" in entry["reason"], entry
    info = event["secure_aggregation"]
    assert info["min_holders"] == 1 and "< threshold" in info["error"], info
    assert event["updated"] is False and event["contributors"] == {}
    _, transcript = read_secure_round(out / "transcript" / "round-1")
    assert transcript.received.keys == [] and transcript.received.masked == [] and transcript.received.unmask == []
    refused = [r for r in read_audit_log(out / AUDIT_FILE) if r.get("status") == "refused"]
    assert refused and all("below this site's floor 3" in r["reason"] for r in refused), refused
    outcome = read_outcome(out)  # every site refused every round: the run says it trained none of them
    assert outcome is not None and sorted(outcome.sites_lost) == sorted(c["site-name"] for c in sites.values())
    assert all("below this site's floor 3" in why for why in outcome.sites_lost.values()), outcome.sites_lost
    assert sorted(outcome.untrained_groups) == ["ehr", "genomics", "shared", "wearables"]


@pytest.mark.slow
def test_the_single_holder_protects_itself_when_the_other_sites_accept(
    sites: dict[int, dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Only the genomics site keeps the default floor; the others lower theirs to 1 and take part.
    The genomics site sits the round out (refused, named); its update is in no masked vector the
    server received, and the replay, run on the round's transcript, flags what the others let open
    (biobank's genomics alone) against the default floor: exit 1. Round 2 runs on the keys round 1's
    exchange made (secagg-key-rounds): the genomics site is not asked again, and round 2 says it
    refused, and where."""
    lenient = _policy(tmp_path, "min_subjects: 2\nsecagg_min_holders: 1\n")
    nodes = {n: (c if c["site-name"] == "genomics" else {**c, "policy": str(lenient)}) for n, c in sites.items()}
    out = run(
        InProcessGrid(nodes),
        tmp_path / "run",
        secure_aggregation=True,
        secagg_min_holders=1,
        record_transcript=True,
        rounds=2,
    )
    rounds = {e["round"]: e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"}
    second = rounds[2]
    assert second["secure_aggregation"]["keys_exchanged_in_round"] == 1 and second["updated"] is True, second
    assert second["sites"]["genomics"]["status"] == "refused", second["sites"]
    assert second["sites"]["genomics"]["reason"].endswith("(the keys exchange of round 1)"), second["sites"]
    assert "below this site's floor 3" in second["sites"]["genomics"]["reason"]
    event = rounds[1]
    genomics = event["sites"]["genomics"]
    assert genomics["status"] == "refused" and "below this site's floor 3" in genomics["reason"], genomics
    node = next(n for n, c in nodes.items() if c["site-name"] == "genomics")
    header, transcript = read_secure_round(out / "transcript" / "round-1")
    assert node not in {m.node_id for m in transcript.received.masked}
    assert node not in {k.node_id for k in transcript.received.keys}
    assert event["secure_aggregation"]["unmasked"]["genomics"] == ["biobank"]  # the others' own choice
    assert replay([str(out / "transcript")]) == 1  # biobank's genomics opened alone: below 3
    assert replay([str(out / "transcript"), "--min-holders", "1"]) == 0  # the floor those sites chose


class ClaimingSecureGrid(InProcessGrid):
    """A coordinator that sends a plain train message (its update would come back in the clear)
    whose round config claims secure aggregation."""

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == "train":
                [(name, record)] = list(msg.content.config_records.items())
                cfg = RoundConfig.from_flat(record).model_copy(update={"secure_aggregation": True})
                msg.content.config_records[name] = ConfigRecord(cfg.to_flat())
        return super().send_and_receive(messages, timeout=timeout)


def test_a_site_requiring_secure_aggregation_refuses_a_plain_message_claiming_it(
    sites: dict[int, dict[str, Any]],
    tmp_path: Path,
) -> None:
    policy = _policy(tmp_path, "min_subjects: 2\nrequire_secure_aggregation: true\n")
    nodes = {  # two of the four sites: enough to show it, half the training
        n: ({**c, "policy": str(policy)} if c["site-name"] == "clinic" else c)
        for n, c in sites.items()
        if c["site-name"] in ("clinic", "hospital")
    }
    event = the_round(run(ClaimingSecureGrid(nodes), tmp_path / "run", local_steps=1, min_nodes=2))
    clinic = event["sites"]["clinic"]
    assert clinic["status"] == "refused" and "requires secure aggregation" in clinic["reason"], clinic
    assert "in the clear" in clinic["reason"]
    assert all("clinic" not in holders for holders in event["contributors"].values()), event["contributors"]
    assert event["sites"]["hospital"]["status"] == "ok"  # the others trained: the lie changed nothing for them
