"""Dropouts of a deployed secure round (issue 32), by killing real sites: a real SuperLink (TLS, node
authentication, nginx) and the four sites of tests/deploy/test_secure_deployment.py joined through
`client.py join`; a site dies by SIGKILL of its `join` process and everything below it (SuperNode,
app guard, ClientApp: no goodbye to the SuperLink), as a crashed site would.

The kill is timed on the site's own SuperNode log (STATE/supernode.log, Flower's lines), never by
a sleep: "Receiving: train.secagg_mask" (the mask stage's message pulled, after the keys and
shares stages: killed before its masked vector can leave), or "Sent successfully" after "Sending:
train.secagg_mask" (its masked vector is at the SuperLink; the unmask request cannot have been
sent yet, since the server sends it only once every masked reply is in or timed out). Each test
then asserts from the server's own records in which stage the site was lost, so a kill that
landed elsewhere fails the test rather than passing it.

References are plain deployed runs (`coordinator launch`, no secure aggregation) on the same
SuperNodes with the same seeds, aggregated by ModalityAwareFedAvg (server/strategy.py), which no
secure-aggregation code touches: for a site lost after masking, the plain run of all four (its
update is in the sum); for one lost before masking, a plain run where the same site is killed when
its train message arrives (the same setup, the plain average of the three survivors). A site killed
mid-run and joined again takes part again: its first secure round after it is a dropout (its setup
and secure-round state died with its SuperNode: "no setup"), the next one it holds its groups.

A dead site is named within seconds (issue 45): the SuperLink answers "Node Unavailable" for it 2 x
its heartbeat interval after its last heartbeat (`join`'s 4 s: within 8 s, not Flower's minute),
and the stage that waited for it records so: the mask stage when its reply came
(`reply_after_seconds` from `sent_at`), every stage its wait (`secure_aggregation.stage_seconds`).
Slow: real processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_fixtures import (
    Process,
    launch_args,
    round_events,
)
from helpers.process_faults import NOTICED_WITHIN_S, Background, kill_hard, rejoin
from helpers.secure_round_runs import (
    SITE_NAMES,
    assert_within_bounds,
    final_arrays,
    four_site_roots,
)
from helpers.supernode_log import SupernodeLog

from server.audit import AUDIT_FILE, read_audit_log
from server.deploy.flwr_control import EXIT_SITE_LOST
from server.deploy.provision import FederationPaths

pytestmark = pytest.mark.slow

# Each exchange waits at most this long; a dead site is answered for earlier by the SuperLink
# ("Node Unavailable", once its heartbeat expired: within 8 s of its death at join's 4 s interval).
STAGE_TIMEOUT_S = 120
HANG_S = 1500  # only catches a hang

MASK_RECEIVED = "Receiving: train.secagg_mask message"
MASK_SENT = "Sending: train.secagg_mask message"
PLAIN_TRAIN_RECEIVED = "Receiving: train message"


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four sites of helpers/secure_round_runs.py (deploy_fixtures joins them: this overrides its `sites`)."""
    return four_site_roots(tmp_path_factory)


@dataclass
class Deployment:
    """The module's SuperLink and four joined sites (deploy_fixtures), and what the tests do to them."""

    federation: FederationPaths
    joined: dict[str, Process]
    sites: dict[str, Path]
    superlink: str
    tmp: Path
    killed_at: dict[str, float] = field(default_factory=dict)  # wall clock of each kill

    def launch(self, out: Path, *config: str, rounds: int = 1) -> Background:
        """`rounds` rounds, the four sites, no evaluation, in the background."""
        four = ("-c", "min-nodes=4", "-c", "eval-tasks=", "-c", f"timeout-s={STAGE_TIMEOUT_S}")
        args = launch_args(self.federation, out, *four, *config, rounds=rounds, wait_s=HANG_S)
        return Background(*args, timeout=HANG_S + 60)

    def kill_when(self, run: Background, names: tuple[str, ...], *lines: str) -> None:
        """SIGKILL each site of `names` as soon as its SuperNode has logged `lines` (in order), in
        this run. Polls every 20 ms: the next stage's message reaches a site only after a server
        round trip and the SuperNode's next pull, far longer."""
        todo = {name: SupernodeLog(self.tmp / f"state-{name}") for name in names}
        deadline = time.monotonic() + HANG_S
        while todo:
            for name, log in list(todo.items()):
                if log.has(*lines):
                    self.killed_at[name] = time.time()
                    kill_hard(self.joined[name])
                    del todo[name]
            assert run.thread.is_alive() or not todo, f"the run ended before {sorted(todo)} logged {lines}"
            assert time.monotonic() < deadline, f"{sorted(todo)} never logged {lines}"
            time.sleep(0.02)

    def bring_back(self, name: str) -> None:
        """The killed site joins again (same key, same state dir): `join` retries until the
        SuperLink has let its dead SuperNode go."""
        state = self.tmp / f"state-{name}"
        self.joined[name] = rejoin(self.federation, self.sites, name, self.superlink, state, self.tmp / f"re-{name}")

    def killed_secure_round(
        self, victims: tuple[str, ...], lines: tuple[str, ...], *codes: int
    ) -> tuple[Background, dict, dict]:
        """A secure round into TMP/secure, `victims` killed once their SuperNodes logged `lines`;
        the finished launch (exit status one of `codes`), the round's event and its secure_aggregation."""
        run = self.launch(self.tmp / "secure", "-c", "secure-aggregation=true")
        self.kill_when(run, victims, *lines)
        finished(run, *codes)
        _, rounds = round_events(self.tmp / "secure")
        return run, rounds[1], rounds[1]["secure_aggregation"]


@pytest.fixture
def deployment(
    joined: dict[str, Process],
    federation: FederationPaths,
    sites: dict[str, Path],
    superlink: str,
    tmp_path: Path,
) -> Deployment:
    return Deployment(federation, joined, sites, superlink, tmp_path)


def finished(run: Background, *codes: int) -> None:
    run.join(HANG_S + 120)
    assert run.result is not None
    assert run.result.returncode in codes, (run.result.stdout, run.result.stderr)


def secure_record(out: Path) -> dict:
    [record] = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "secure-aggregation"]
    return record


def site_records(out: Path) -> dict[str, dict]:
    return {r["site"]: r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "site-round"}


def test_a_site_killed_after_sending_its_masked_vector_is_recovered_and_counted(
    deployment: Deployment, tmp_path: Path
) -> None:
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    finished(deployment.launch(plain_out), 0)

    _, event, info = deployment.killed_secure_round(("clinic",), (MASK_SENT, "Sent successfully"), 0)
    assert "error" not in info, info
    # The server's records say where the kill landed: after its masked vector, before unmasking.
    assert info["dropped_after_masking"] == ["clinic"] and info["dropped_before_masking"] == [], info
    assert event["updated"] is True
    # Still counted: wearables keeps its three holders, and the sums are the plain run's.
    assert info["unmasked"] == {
        "shared": sorted(SITE_NAMES),
        "ehr": sorted(SITE_NAMES),
        "wearables": ["biobank", "clinic", "hospital"],
    }
    assert "recovered" in event["sites"]["clinic"]["reason"], event["sites"]["clinic"]
    assert all(event["sites"][s]["status"] == "ok" for s in ("biobank", "hospital", "genomics")), event["sites"]
    # Killed before the unmask request left: that stage waited for it until the SuperLink named it
    # dead, seconds, not a minute (and not timeout-s).
    assert info["stage_seconds"]["unmask"] < NOTICED_WITHIN_S, info["stage_seconds"]
    assert secure_record(secure_out)["dropped_after_masking"] == ["clinic"]
    server_log = (secure_out / "server.log").read_text().splitlines()
    assert any(" clinic " in ln and "recovered" in ln for ln in server_log)
    assert_within_bounds(secure_out, plain_out, ["shared", "ehr", "wearables"])


def test_a_site_killed_before_masking_is_left_out_and_the_survivors_average_as_plain(
    deployment: Deployment, tmp_path: Path
) -> None:
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    # The reference: a plain round with the same setup, hospital killed as its train message arrives.
    run = deployment.launch(plain_out)
    deployment.kill_when(run, ("hospital",), PLAIN_TRAIN_RECEIVED)
    finished(run, EXIT_SITE_LOST)
    _, plain_rounds = round_events(plain_out)
    assert sorted(plain_rounds[1]["contributors"]["shared"]) == ["biobank", "clinic", "genomics"], plain_rounds[1]
    deployment.bring_back("hospital")

    _, event, info = deployment.killed_secure_round(("hospital",), (MASK_RECEIVED,), EXIT_SITE_LOST)
    assert "error" not in info, info
    # Lost after the keys and shares stages, before its masked vector: left out of every sum.
    assert info["dropped_before_masking"] == ["hospital"] and info["dropped_after_masking"] == [], info
    assert event["updated"] is True
    assert info["unmasked"] == {"shared": ["biobank", "clinic", "genomics"], "ehr": ["biobank", "clinic", "genomics"]}
    # wearables: two surviving holders (< min_holders 3), carried forward, as genomics
    assert sorted(info["withheld"]) == ["genomics", "wearables"], info["withheld"]
    dead = event["sites"]["hospital"]
    assert dead["status"] == "error" and dead["reason"].startswith("mask: Error: Node Unavailable"), dead
    noticed_at = event["timings"]["sent_at"] + dead["reply_after_seconds"]
    assert noticed_at - deployment.killed_at["hospital"] < NOTICED_WITHIN_S, (noticed_at, deployment.killed_at, dead)
    assert all(event["sites"][s]["status"] == "ok" for s in ("biobank", "clinic", "genomics")), event["sites"]
    assert secure_record(secure_out)["dropped_before_masking"] == ["hospital"]
    assert site_records(secure_out)["hospital"]["groups_contributed"] == []
    server_log = (secure_out / "server.log").read_text().splitlines()
    assert any(f" hospital     {dead['status']} " in ln and "(mask:" in ln for ln in server_log)
    assert_within_bounds(secure_out, plain_out, ["shared", "ehr"])


def test_too_few_survivors_fail_the_deployed_round_loudly_and_change_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    out = tmp_path / "secure"
    # Threshold 3 of 4: two sites lost before masking leave two. The coordinator is told: no site
    # trained in the run, and why.
    run, event, info = deployment.killed_secure_round(("hospital", "clinic"), (MASK_RECEIVED,), EXIT_SITE_LOST)
    assert run.result is not None
    assert "the secure round failed" in run.result.stderr, run.result.stderr
    assert event["updated"] is False
    assert "2 site(s) sent a masked vector < threshold 3" in info["error"], event
    assert secure_record(out)["error"] == info["error"]
    for name in ("hospital", "clinic"):
        assert event["sites"][name]["reason"].startswith("mask:"), event["sites"]
    assert "ERROR healthfm.server.secure_round: round 1: secure aggregation failed" in (out / "server.log").read_text()
    secure, initial = final_arrays(out)
    assert all(np.array_equal(secure[k], initial[k]) for k in initial)  # never a wrong average


def test_a_site_killed_mid_round_rejoins_and_takes_part_again_in_the_same_secure_run(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Its secure-round state died with it: after it joins again (the server waits up to a minute
    for it before round 2), its first stage needing the run's setup asks for it (a dropout of round
    2, nothing else in that round broken), and it is a full holder again in round 3."""
    out = tmp_path / "secure"
    run = deployment.launch(out, "-c", "secure-aggregation=true", rounds=3)
    deployment.kill_when(run, ("clinic",), MASK_SENT, "Sent successfully")
    deployment.bring_back("clinic")
    finished(run, 0)

    _, rounds = round_events(out)
    assert sorted(rounds) == [1, 2, 3]
    assert rounds[1]["secure_aggregation"]["dropped_after_masking"] == ["clinic"], rounds[1]["secure_aggregation"]
    second = rounds[2]
    info = second["secure_aggregation"]
    assert "error" not in info and second["updated"] is True, info
    assert second["sites"]["clinic"]["status"] == "no setup", second["sites"]["clinic"]
    assert info["dropped_before_masking"] == ["clinic"] and sorted(info["withheld"]) == ["genomics", "wearables"]
    third = rounds[3]
    info = third["secure_aggregation"]
    assert all(e["status"] == "ok" for e in third["sites"].values()), third["sites"]
    assert info["dropped_before_masking"] == info["dropped_after_masking"] == [], info
    assert info["unmasked"]["wearables"] == ["biobank", "clinic", "hospital"], info
