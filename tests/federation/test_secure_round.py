"""Secure aggregation wired into the federated round (issue 32): the real FederationServer and each
site's real ClientApp (in this process: tests/helpers/in_process_grid.py; in Flower's simulation engine:
the slow test at the end), four sites of different modality mixes.

The reference is a plain run of the same federation with the same seeds: every site trains the same
round on the same global arrays, so the secure run's global arrays must equal the plain run's
(ModalityAwareFedAvg on the sites' real replies) within the quantisation bound the secure round
states per group, in every group unmasked; the group two sites hold (genomics, min_holders 3) is
withheld: carried forward, and said so in rounds.jsonl and the audit log. The attack replay runs on
every message the secure run's server received. Slow (SLOW_CI): dropouts before and after masking,
too few survivors, DP sites, a site without a sample of one of its groups, four rounds on keys made
once (secagg-key-rounds) with a coordinator changing a round's config after its keys, and the
round in Flower's simulation engine (tests/deploy/test_secure_deployment.py: the same four sites deployed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from helpers.in_process_grid import InProcessGrid, RecordingGrid
from helpers.secure_round_runs import (
    DroppingGrid,
    assert_within_bounds,
    fed_config,
    final_arrays,
    four_site_node_configs,
    run,
    the_round,
)

from client.policy import PolicyError, load_policy
from healthfm_core.protocol import ARRAYS_RECORD, RoundConfig
from healthfm_core.protocol.flat import from_flat, to_flat
from healthfm_core.protocol.packing import unpack_record
from healthfm_core.protocol.secure_records import (
    KEYS_MESSAGE,
    MASK_MESSAGE,
    SECAGG_CONFIG_RECORD,
    SECAGG_RECORD,
    SHARES_MESSAGE,
    UNMASK_MESSAGE,
    key_round_records,
)
from healthfm_core.release import CARD_MD_FILE, RELEASE_FILE, load_release
from healthfm_core.terms.groups import parameter_group
from secure_aggregation.config import SecAggConfig
from secure_aggregation.layout import group_vector
from secure_aggregation.messages import EncryptedShares, KeyDirectory, MaskedInput, PublicKeys, UnmaskShares
from secure_aggregation.replay import attack, fisher_z, looks_random, true_updates
from secure_aggregation.replay import main as replay
from secure_aggregation.simulate import Transcript
from secure_aggregation.transcript import read_secure_round
from server.audit import AUDIT_FILE, audit_from_rounds, read_audit_log
from server.config import FederationConfig
from server.deploy.commands import report_outcome
from server.deploy.flwr_control import EXIT_OK
from server.outcome import read_outcome
from server.release import release_run
from server.runlog import read_events
from server.transcript import read_plain_round, read_round_config
from simulations.synthetic import generate_federation


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The four sites of helpers/secure_round_runs.py, as the in-process grid's node configs."""
    return four_site_node_configs(tmp_path_factory)


class Runs(NamedTuple):
    plain: Path
    secure: Path
    plain_grid: RecordingGrid
    secure_grid: RecordingGrid


@pytest.fixture(scope="module")
def plain_and_secure(sites: dict[int, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    plain_grid, secure_grid = RecordingGrid(sites), RecordingGrid(sites)
    plain = run(plain_grid, tmp_path_factory.mktemp("plain"), record_transcript=True)
    secure = run(secure_grid, tmp_path_factory.mktemp("secure"), secure_aggregation=True, record_transcript=True)
    return Runs(plain, secure, plain_grid, secure_grid)


def test_the_secure_average_equals_the_plain_one_within_its_stated_bound(plain_and_secure: Runs) -> None:
    plain_out, secure_out = plain_and_secure.plain, plain_and_secure.secure
    assert_within_bounds(secure_out, plain_out, ["shared", "ehr", "wearables"])
    info = the_round(secure_out)["secure_aggregation"]
    assert "error" not in info, info
    assert info["unmasked"] == {
        "shared": ["biobank", "clinic", "genomics", "hospital"],
        "ehr": ["biobank", "clinic", "genomics", "hospital"],
        "wearables": ["biobank", "clinic", "hospital"],
    }


def test_under_an_fp16_downlink_the_plain_and_secure_rounds_land_on_the_same_float32_master(
    sites: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    """The plain round averages against what the sites received (float16 values) and moves the
    result onto the master; the secure one adds the unmasked mean update to the master itself.
    Both must give one global: a plain round that kept the float16 frame would differ from the
    secure one by float16's rounding of every weight (~1e-5 here), far above the stated bound."""
    plain_grid, secure_grid = RecordingGrid(sites), RecordingGrid(sites)
    plain = run(plain_grid, tmp_path / "plain", downlink="fp16")
    secure = run(secure_grid, tmp_path / "secure", downlink="fp16", secure_aggregation=True)
    for grid, kind in ((plain_grid, "train"), (secure_grid, MASK_MESSAGE)):
        sent, _ = grid.exchange(kind)
        for msg in sent:
            arrays = unpack_record(msg.content.array_records[ARRAYS_RECORD], where=kind)
            assert {str(v.dtype) for v in arrays.values() if v.dtype.kind == "f"} == {"float16"}, kind
    assert_within_bounds(secure, plain, ["shared", "ehr", "wearables"])
    secure_arrays, initial = final_arrays(secure)
    for key, value in initial.items():  # genomics (two holders) is withheld: the master to the bit
        if parameter_group(key) == "genomics":
            np.testing.assert_array_equal(secure_arrays[key], value)


@pytest.mark.slow
def test_a_site_lost_after_masking_is_recovered_and_still_counted(
    sites: dict[int, dict[str, Any]], plain_and_secure: Runs, tmp_path: Path
) -> None:
    plain_out = plain_and_secure.plain
    out = run(DroppingGrid(sites, {UNMASK_MESSAGE: {"clinic"}}), tmp_path / "run", secure_aggregation=True)
    info = the_round(out)["secure_aggregation"]
    assert info["dropped_after_masking"] == ["clinic"] and info["dropped_before_masking"] == []
    assert_within_bounds(out, plain_out, ["shared", "ehr", "wearables"])  # its masked update is in the sum


@pytest.mark.slow
def test_a_site_lost_before_masking_is_recovered_and_left_out(sites: dict[int, dict[str, Any]], tmp_path: Path) -> None:
    plain = run(DroppingGrid(sites, {"train": {"hospital"}}), tmp_path / "plain")
    out = run(DroppingGrid(sites, {MASK_MESSAGE: {"hospital"}}), tmp_path / "secure", secure_aggregation=True)
    event = the_round(out)
    info = event["secure_aggregation"]
    assert info["dropped_before_masking"] == ["hospital"]
    assert event["sites"]["hospital"]["status"] == "no reply"
    # wearables: two surviving holders now, withheld; shared and ehr over the three others
    assert sorted(info["withheld"]) == ["genomics", "wearables"]
    assert_within_bounds(out, plain, ["shared", "ehr"])


@pytest.mark.slow
def test_too_few_survivors_fail_the_round_loudly_and_change_nothing(
    sites: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    out = run(DroppingGrid(sites, {MASK_MESSAGE: {"hospital", "clinic"}}), tmp_path / "run", secure_aggregation=True)
    secure, initial = final_arrays(out)
    assert all(np.array_equal(secure[k], initial[k]) for k in initial)
    event = the_round(out)
    assert (
        event["updated"] is False
        and "2 site(s) sent a masked vector < threshold 3" in event["secure_aggregation"]["error"]
    )
    assert event["sites"]["biobank"]["reason"].startswith("the secure round failed:"), event["sites"]
    assert event["sites"]["hospital"]["reason"].startswith("mask: no reply"), event["sites"]
    [record] = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "secure-aggregation"]
    assert record["error"] == event["secure_aggregation"]["error"]
    assert "ERROR healthfm.server.secure_round: round 1: secure aggregation failed" in (out / "server.log").read_text()


def test_a_group_with_too_few_holders_is_carried_forward_and_recorded(plain_and_secure: Runs) -> None:
    plain_out, secure_out = plain_and_secure.plain, plain_and_secure.secure
    plain, initial = final_arrays(plain_out)
    secure, _ = final_arrays(secure_out)
    genomics = [k for k in initial if parameter_group(k) == "genomics"]
    assert all(np.array_equal(secure[k], initial[k]) for k in genomics)  # carried forward
    assert any(not np.array_equal(plain[k], initial[k]) for k in genomics)  # the plain run averaged two sites
    event = the_round(secure_out)
    withheld = event["secure_aggregation"]["withheld"]
    assert list(withheld) == ["genomics"] and "2 surviving holder(s) < min_holders 3" in withheld["genomics"]
    assert "genomics" not in event["contributors"]
    assert all(e["status"] == "ok" and e["reply_after_seconds"] >= 0 for e in event["sites"].values()), event["sites"]
    [record] = [r for r in read_audit_log(secure_out / AUDIT_FILE) if r["record"] == "secure-aggregation"]
    assert record["round"] == 1 and record["withheld"] == withheld
    [start] = [r for r in read_audit_log(secure_out / AUDIT_FILE) if r["record"] == "run"]
    assert start["limits"]["secure_aggregation"] is True and start["limits"]["secagg_min_holders"] == 3
    # the audit log's round records are exactly those rounds.jsonl implies
    implied = [r for r in audit_from_rounds(secure_out / "rounds.jsonl") if r["record"] == "secure-aggregation"]
    assert implied == [{k: v for k, v in record.items() if k not in ("time", "prev_sha256")}]
    assert "withheld (carried forward)" in (secure_out / "server.log").read_text()


def test_the_replay_finds_nothing_opened_below_the_floor_in_an_honest_round(plain_and_secure: Runs) -> None:
    """`python -m secure_aggregation.replay` on the secure run's transcript: genomics (two holders)
    was withheld, nothing was opened over fewer than 3 holders (tests/federation/test_site_floors.py: a
    transcript where it was is exit 1)."""
    assert replay([str(plain_and_secure.secure / "transcript")]) == 0
    assert replay([str(plain_and_secure.secure / "transcript"), "--min-holders", "5"]) == 1  # 4 holders < 5


def test_a_group_withheld_in_every_round_is_reported_untrained_in_the_outcome_and_the_release(
    plain_and_secure: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 40: genomics (two holders < min_holders 3) was withheld in every round, one WARNING a
    round, and the run said "completed", exit 0, its release carrying genomics' initial weights
    unmarked. Now launch's result, outcome.json, release.json and the model card name it."""
    secure, plain = plain_and_secure.secure, plain_and_secure.plain
    outcome = read_outcome(secure)
    assert outcome is not None and outcome.status == "completed"
    assert list(outcome.untrained_groups) == ["genomics"]
    assert outcome.untrained_groups["genomics"].startswith(
        "withheld in 1 of 1 round(s); round 1: 2 surviving holder(s)"
    )
    assert "untrained group(s), their weights the initialisation: genomics (withheld in 1 of 1" in outcome.describe()
    assert report_outcome(1, "finished:completed", secure) == EXIT_OK
    said = capsys.readouterr()
    assert "untrained group(s)" in said.out and "warning: run 1: group genomics was never trained" in said.err
    assert read_outcome(plain) is not None and read_outcome(plain).untrained_groups == {}  # type: ignore[union-attr]

    release = release_run(secure, tmp_path / "model")
    meta = json.loads((release / RELEASE_FILE).read_text())
    assert list(meta["untrained_groups"]) == ["genomics"] and "genomics" not in meta["groups_trained"]
    card = (release / CARD_MD_FILE).read_text()
    assert "**Untrained parameter groups**" in card and "genomics (withheld in 1 of 1 round(s)" in card
    assert load_release(release, trust_unsigned=True).meta.untrained_groups == meta["untrained_groups"]


def test_groups_of_one_or_two_holders_are_named_in_the_round_record_and_the_log(plain_and_secure: Runs) -> None:
    """Issue 40: no aggregation rule bounds a group against its 1-2 holders, so every round says
    who holds it: the plain run averaged genomics from biobank and genomics; the secure run
    withheld it (fewer than 3 holders) and names nothing."""
    plain = the_round(plain_and_secure.plain)
    assert plain["under_holders_control"] == {"genomics": ["biobank", "genomics"]}
    log = (plain_and_secure.plain / "server.log").read_text()
    assert "round 1: group 'genomics' was averaged from 2 site(s) (biobank, genomics): under their control" in log
    assert the_round(plain_and_secure.secure)["under_holders_control"] == {}


def test_a_site_requiring_secure_aggregation_refuses_a_plain_round(
    sites: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\nrequire_secure_aggregation: true\n")
    nodes = {n: ({**c, "policy": str(policy)} if c["site-name"] == "clinic" else c) for n, c in sites.items()}
    clinic = the_round(run(InProcessGrid(nodes), tmp_path / "run", local_steps=1))["sites"]["clinic"]
    assert clinic["status"] == "refused" and "requires secure aggregation" in clinic["reason"], clinic


def test_the_policy_key_and_the_run_config_key_parse_strictly(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("require_secure_aggregation: true\n")
    assert load_policy(path).require_secure_aggregation is True
    path.write_text("require_secure_aggregation: 'yes'\n")
    with pytest.raises(PolicyError, match="require_secure_aggregation"):
        load_policy(path)
    cfg = FederationConfig.from_run_config(
        {"out-dir": str(tmp_path), "model": "tiny", "secure-aggregation": True, "secagg-min-holders": 4}
    )
    assert cfg.secure_aggregation and cfg.secagg_min_holders == 4
    flat = RoundConfig(round=1, rounds=1, local_steps=1, lr=1e-3, setup_sha256="x", secure_aggregation=True).to_flat()
    assert RoundConfig.from_flat(flat).secure_aggregation is True


@pytest.mark.slow
def test_in_flowers_simulation_engine_the_secure_round_equals_the_plain_one(
    sites: dict[int, dict[str, Any]], plain_and_secure: Runs, tmp_path: Path
) -> None:
    """The same round in Flower's simulation engine (Ray actors, each site's SiteRound kept in its
    node's Context.state between the four stages) against the plain run of the same seeds."""
    from simulations.run import run_federation_simulation

    plain_out = plain_and_secure.plain
    out = run_federation_simulation(
        fed_config(tmp_path / "sim", secure_aggregation=True), list(sites.values()), num_cpus=2
    )
    event = the_round(out)
    assert all(e["status"] == "ok" for e in event["sites"].values()), event["sites"]
    assert list(event["secure_aggregation"]["withheld"]) == ["genomics"]
    assert_within_bounds(out, plain_out, ["shared", "ehr", "wearables"])


@pytest.mark.slow
def test_dp_sites_report_their_spend_under_secure_aggregation(sites: dict[int, dict[str, Any]], tmp_path: Path) -> None:
    """DP-SGD at each site is unchanged by secure aggregation: its ledger spends, and the round
    records each site's cumulative epsilon as without it (counts stay masked)."""
    from server.config import PrivacyRequest

    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\nrequire_secure_aggregation: true\ndp:\n  epsilon_cap: 50\n  delta: 1.0e-2\n")
    nodes = {n: {**c, "policy": str(policy), "state-dir": str(tmp_path / f"state-{n}")} for n, c in sites.items()}
    out = run(
        InProcessGrid(nodes),
        tmp_path / "run",
        secure_aggregation=True,
        privacy=PrivacyRequest(noise_multiplier=1.0, delta=1e-2),
    )
    event = the_round(out)
    assert "error" not in event["secure_aggregation"], event["secure_aggregation"]
    assert sorted(event["epsilon"]) == ["biobank", "clinic", "genomics", "hospital"]
    for site, entry in event["sites"].items():
        assert entry["status"] == "ok" and entry["dp"]["epsilon"] > 0 and entry["dp"]["delta"] == 1e-2, (site, entry)
        assert "num_examples" not in entry and "losses" not in entry  # masked, or not sent
    assert event["updated"] is True


@pytest.mark.slow
def test_a_site_without_a_sample_of_one_of_its_groups_sits_the_secure_round_out(tmp_path: Path) -> None:
    """The tiny hospital (30% of subjects with wearables) draws no wearable sample in 2 steps x 8
    at seed 0 (as the deployed test saw): it refuses the secure round, saying why, and is a
    dropout; its peers' round still completes without a wrong average."""
    manifest = generate_federation(tmp_path / "data", scenario="tiny", seed=0, n_subjects=30, progress=False)
    policy = tmp_path / "policy.yaml"  # the sites accept the coordinator's min_holders 2
    policy.write_text("min_subjects: 2\nsecagg_min_holders: 2\n")
    nodes = {
        100 + i: {
            "site-root": str(s.root),
            "site-name": s.name,
            "min-code-subjects": 5,
            "min-report-subjects": 2,
            "policy": str(policy),
        }
        for i, s in enumerate(manifest.sites)
    }
    out = run(
        InProcessGrid(nodes), tmp_path / "run", secure_aggregation=True, seed=0, min_nodes=3, secagg_min_holders=2
    )
    event = the_round(out)
    hospital = event["sites"]["hospital"]
    assert hospital["status"] == "refused" and "no sample of group(s) ['wearables']" in hospital["reason"], hospital
    info = event["secure_aggregation"]
    assert info["dropped_before_masking"] == ["hospital"] and "error" not in info, info
    assert info["unmasked"]["shared"] == ["biobank", "genomics"]


def test_an_attacker_given_every_message_the_server_received_learns_no_sites_update(plain_and_secure: Runs) -> None:
    """The attack replay on the wired round's recorded transcript (record-transcript): it holds every
    reply of the secure run's four exchanges (what the server, and the SuperLink relaying them,
    received; checked against the grid's own record) and the server's own messages (its config,
    key directory and unmask request). secure_aggregation/replay.py's attacker (which recovers a
    site's update once given its secrets: tests/unit/test_secure_aggregation_attack.py's positive
    control) estimates each site's update of each group no closer to the truth than a random
    guess. The truth: the same site's update in the plain run of the same seeds (its recorded
    reply's arrays less the initial ones, clipped as the secure round clips)."""
    grid = plain_and_secure.secure_grid

    def replies(message_type: str, cls: type[Any]) -> list[Any]:
        return [from_flat(cls, r.content.config_records[SECAGG_RECORD]) for r in grid.exchange(message_type)[1]]

    header, recorded = read_secure_round(plain_and_secure.secure / "transcript" / "round-1")
    keys_sent, _ = grid.exchange(KEYS_MESSAGE)
    config = from_flat(SecAggConfig, keys_sent[0].content.config_records[SECAGG_RECORD])
    shares_sent, _ = grid.exchange(SHARES_MESSAGE)
    assert recorded.config == config
    assert recorded.directory == from_flat(KeyDirectory, shares_sent[0].content.config_records[SECAGG_RECORD])
    assert recorded.request is not None and list(recorded.request.withheld) == ["genomics"]
    assert recorded.received == Transcript(
        keys=sorted(replies(KEYS_MESSAGE, PublicKeys), key=lambda m: m.node_id),
        shares=sorted(replies(SHARES_MESSAGE, EncryptedShares), key=lambda m: m.node_id),
        masked=sorted(replies(MASK_MESSAGE, MaskedInput), key=lambda m: m.node_id),
        unmask=sorted(replies(UNMASK_MESSAGE, UnmaskShares), key=lambda m: m.node_id),
    )
    assert sorted(header.sites.values()) == ["biobank", "clinic", "genomics", "hospital"]
    assert read_round_config(plain_and_secure.secure / "transcript" / "round-1").secure_aggregation is True
    estimates = attack(recorded)

    # The plain run's transcript holds each site's reply as the server parsed it (the grid's).
    _, initial = final_arrays(plain_and_secure.plain)
    _, plain_replies = read_plain_round(plain_and_secure.plain / "transcript" / "round-1")
    for reply in plain_and_secure.plain_grid.exchange("train")[1]:
        trained = unpack_record(reply.content.array_records[ARRAYS_RECORD], where="plain reply")
        kept = plain_replies[reply.metadata.src_node_id].arrays
        assert sorted(kept) == sorted(trained) and all(np.array_equal(kept[k], trained[k]) for k in trained)
    truths = true_updates({n: r.arrays for n, r in plain_replies.items()}, initial, config)
    counts = {n: r.group_examples for n, r in plain_replies.items()}
    assert set(estimates) == set(truths) and len(truths) == 13  # 4 + 4 + 3 + 2 (site, group) updates
    assert not any(e.self_mask_removed for (_, g), e in estimates.items() if g == "genomics")
    zs = {key: fisher_z(estimates[key].values, truths[key]) for key in truths}
    assert looks_random(zs), zs
    # The truths are the right ones: their count-weighted average is the secure round's update of
    # `shared` (the aggregate the server is entitled to).
    secure, _ = final_arrays(plain_and_secure.secure)
    holders = [n for n in config.sample if "shared" in config.groups[n]]
    average = sum(counts[n]["shared"] * truths[(n, "shared")] for n in holders) / sum(
        counts[n]["shared"] for n in holders
    )
    applied = group_vector({k: secure[k].astype(np.float64) - initial[k] for k in initial}, "shared")
    assert float(np.corrcoef(average, applied)[0, 1]) > 0.999


class LoweringGrid(RecordingGrid):
    """RecordingGrid whose coordinator lowers min_holders to 1 in the mask messages of one round: a
    round whose keys were made ahead, under min_holders 3."""

    def __init__(self, node_configs: dict[int, dict], round_: int) -> None:
        super().__init__(node_configs)
        self.round = round_

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        for msg in messages:
            records = msg.content.config_records
            if (
                msg.metadata.message_type == MASK_MESSAGE
                and RoundConfig.from_flat(records["config"]).round == self.round
            ):
                config = from_flat(SecAggConfig, records[SECAGG_CONFIG_RECORD])
                records[SECAGG_CONFIG_RECORD] = ConfigRecord(to_flat(config.model_copy(update={"min_holders": 1})))
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.slow  # 8-18 s: four trained rounds; tests/unit/test_secure_aggregation.py: the protocol's side
def test_keys_made_once_serve_the_rounds_ahead_and_a_changed_config_makes_them_afresh(
    sites: dict[int, dict[str, Any]], tmp_path: Path
) -> None:
    """secagg-key-rounds (default 8): round 1's keys and shares exchange makes the keys of rounds 1-4,
    one key pair set and seed set each; round 2 runs on them with its own clip norms (two exchanges:
    mask, unmask), and its masks cancel (an uncancelled mask is a sum outside its bound: the round
    would fail). In round 3 the coordinator lowers min_holders in the mask messages, which would open
    genomics over its two holders: every site refuses (its keys were made for min_holders 3), the
    round fails and changes nothing, and round 4 makes its keys afresh."""
    grid = LoweringGrid(sites, round_=3)
    out = run(grid, tmp_path / "run", secure_aggregation=True, rounds=4, record_transcript=True)
    types = [sent[0].metadata.message_type for sent, _ in grid.exchanges if sent]
    secure_types = [t for t in types if t in (KEYS_MESSAGE, SHARES_MESSAGE, MASK_MESSAGE, UNMASK_MESSAGE)]
    keys_and_shares, mask_and_unmask = [KEYS_MESSAGE, SHARES_MESSAGE], [MASK_MESSAGE, UNMASK_MESSAGE]
    # round 1: keys and shares for rounds 1-4; round 2: on them; round 3: refused at the mask stage;
    # round 4: afresh
    expected = [*keys_and_shares, *mask_and_unmask, *mask_and_unmask, MASK_MESSAGE, *keys_and_shares, *mask_and_unmask]
    assert secure_types == expected
    keys_sent, _ = grid.exchanges[types.index(KEYS_MESSAGE)]
    configs = [from_flat(SecAggConfig, r) for r in key_round_records(keys_sent[0].content.config_records, "keys")]
    assert [c.round for c in configs] == [1, 2, 3, 4]
    rounds = {e["round"]: e for e in read_events(out / "rounds.jsonl") if e["event"] == "round"}
    info = {r: e["secure_aggregation"] for r, e in rounds.items()}
    assert [info[r]["keys_exchanged_in_round"] for r in (1, 2, 4)] == [1, 1, 4]
    assert sorted(info[1]["stage_seconds"]) == ["keys", "mask", "shares", "unmask"]
    assert sorted(info[2]["stage_seconds"]) == ["mask", "unmask"]  # two exchanges, as the issue asks
    for r in (1, 2, 4):
        assert rounds[r]["updated"] is True and "error" not in info[r], info[r]
        assert info[r]["unmasked"]["wearables"] == ["biobank", "clinic", "hospital"]
        assert list(info[r]["withheld"]) == ["genomics"]
    assert rounds[3]["updated"] is False and "sent a masked vector < threshold" in info[3]["error"]
    for entry in rounds[3]["sites"].values():
        assert "changes min_holders from the config this site made its keys for" in entry["reason"], entry
    # Each round's transcript holds the keys and shares its round ran on (made in round 1 for round 2)
    # and replays: nothing opened over fewer than 3 holders.
    _, second = read_secure_round(out / "transcript" / "round-2")
    assert second.config is not None and second.config.round == 2 and second.directory is not None
    assert second.config.clip_norm != configs[1].clip_norm  # its own clip norms, not round 1's provisional ones
    assert {k.round for k in second.received.keys} == {2} and second.directory.round == 2
    assert len(second.received.shares) == 4 and len(second.received.masked) == 4
    assert replay([str(out / "transcript")]) == 0
