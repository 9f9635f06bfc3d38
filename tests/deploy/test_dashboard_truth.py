"""The dashboard tells the truth in every state issue 69 found it misleading in (each test a replay
that failed before): launch order (Flower's run ids are random), a SuperLink that does not answer,
lost / refusing / rejected sites told apart, privacy rounds as the ledger counts them, the round in
flight, the audit chain's tail, provisioned sites, bounded /metrics series, no torch in the
dashboard's process, and its URL said only once it serves.

The run is the one tests/dashboard_record.py recorded (tests/helpers/dashboard_fed.py); a round
of it is rewritten where a state needs it, each site's entry built with the server's own
SiteOutcome (server/round.py) and Flower's own error reason, as a plain round writes them. The
round in flight is written by the ServerApp's own writer (server/live_round.py). The same states
in a deployed run, in a browser: tests/deploy/test_dashboard_browser.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from helpers.dashboard_fed import (
    NODES,
    dashboard,
    launch_recorded,
    online,
    provisioned,
    recorded_events,
    row,
    samples,
    section,
)
from markupsafe import escape

from healthfm_core.protocol import PrivacySpend
from server.audit import AUDIT_FILE, AuditLog
from server.deploy.dashboard.nodes import NodesCache
from server.deploy.flwr_control import EXIT_USAGE, write_connection
from server.deploy.provision import FederationPaths
from server.live_round import TRAINING, LiveRound
from server.outcome import RunOutcome, write_outcome
from server.round import SiteOutcome
from server.run_claim import claim_for_launch, release, set_run_id

REPO = Path(__file__).resolve().parents[2]
CAP_REASON = "epsilon after this round would be 40.31 > the policy's cap 40 (spent 0.81 at delta 0.001)"
REJECTED_REASON = "update norm 512.3 of group shared is above this round's bound 40.0"


def _round_1() -> dict[str, Any]:
    return next(e for e in recorded_events() if e["event"] == "round" and e["round"] == 1)


def three_states(event: dict[str, Any]) -> dict[str, Any]:
    """Round 2 as a plain round writes it when hospital's node stopped its heartbeat (Flower
    answers for it), genomics refused at its epsilon cap and biobank's reply was rejected."""
    if event.get("event") != "round" or event["round"] != 2:
        return event
    spent = _round_1()["sites"]["genomics"]["dp"]
    sites = {
        "hospital": SiteOutcome(node_id=101, status="error", reason=NODE_UNAVAILABLE_ERROR_REASON),
        "genomics": SiteOutcome(
            node_id=102,
            status="refused",
            reason=CAP_REASON,
            dp=PrivacySpend(epsilon=spent["epsilon"], delta=spent["delta"], epsilon_cap=40.0).model_dump(
                exclude_none=True
            ),
        ),
        "biobank": SiteOutcome(node_id=100, status="rejected", reason=REJECTED_REASON),
    }
    rejected = [
        {"site": "hospital", "node_id": 101, "reason": f"error reply: {NODE_UNAVAILABLE_ERROR_REASON}"},
        {"site": "genomics", "node_id": 102, "reason": f"refused by the site: {CAP_REASON}"},
        {"site": "biobank", "node_id": 100, "reason": REJECTED_REASON},
    ]
    plain = {k: v for k, v in event.items() if k != "secure_aggregation"}
    return {
        **plain,
        "sites": {name: entry.to_event() for name, entry in sites.items()},
        "rejected": rejected,
        "contributors": {},
        "under_holders_control": {},
        "updated": False,
        "epsilon": {"genomics": spent["epsilon"]},
    }


@pytest.fixture(scope="module")
def states_fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    root = tmp_path_factory.mktemp("states")
    paths = provisioned(root / "fed")
    launch_recorded(paths, 7, root / "run", edit=three_states)
    return paths


def test_runs_and_the_last_round_trained_follow_launch_order(tmp_path: Path) -> None:
    paths = provisioned(tmp_path / "fed")
    launch_recorded(paths, 9, tmp_path / "first", launched_at="2026-11-25T10:00:00")

    def a_day_later(event: dict[str, Any]) -> dict[str, Any]:
        return {**event, "time": event["time"] + 86_400}

    # Flower's run id of the later launch is the smaller one (they are random).
    launch_recorded(paths, 3, tmp_path / "second", edit=a_day_later, launched_at="2026-11-26T10:00:00")
    html = dashboard(paths).get("/").text
    runs = section(html, "runs")
    assert runs.index('data-run="3"') < runs.index('data-run="9"')  # newest launch first
    sites = section(html, "sites")
    assert "run 3, round 2" in row(sites, "data-site", "biobank")
    assert "run 3, round 1" in row(sites, "data-site", "hospital")  # killed after round 1 of both
    assert "ran the bundle of runs 9, 3" in row(sites, "data-site", "genomics")
    audit = section(html, "audit")
    assert audit.index('data-run="3"') < audit.index('data-run="9"')
    got = samples(dashboard(paths).get("/metrics").text)
    assert got[("healthfm_run_info", (("run_id", "3"), ("status", "completed")))] == 1


def test_lost_refusing_and_rejected_sites_are_told_apart(states_fed: FederationPaths) -> None:
    html = dashboard(states_fed, online("biobank", "genomics")).get("/").text
    second = row(section(html, "runs"), "data-round", "2")
    cells = {name: second[second.index(f'data-site="{name}"') :] for name in NODES}
    assert cells["hospital"].startswith('data-site="hospital" data-state="lost"')
    assert "Node Unavailable" in cells["hospital"].split("</td>")[0]
    assert cells["genomics"].startswith('data-site="genomics" data-state="refusing"')
    assert str(escape(CAP_REASON)) in cells["genomics"].split("</td>")[0]
    assert cells["biobank"].startswith('data-site="biobank" data-state="rejected"')
    assert "no update" in second  # nothing was averaged
    sites = section(html, "sites")
    assert 'state-lost">lost</span> in run 7 round 2' in row(sites, "data-site", "hospital")
    assert 'state-refusing">refusing</span> in run 7 round 2: ' + str(escape(CAP_REASON)) in row(
        sites, "data-site", "genomics"
    )
    assert 'state-rejected">rejected</span> in run 7 round 2' in row(sites, "data-site", "biobank")

    got = samples(dashboard(states_fed, online("biobank", "genomics")).get("/metrics").text)
    for site, state in (("hospital", "lost"), ("genomics", "refusing"), ("biobank", "rejected")):
        assert got[("healthfm_site_round_state", (("site", site), ("state", state)))] == 1
        others = [v for (n, labels), v in got.items() if n == "healthfm_site_round_state" and ("site", site) in labels]
        assert sum(others) == 1, site
    assert got[("healthfm_replies_rejected_total", ())] == 1  # biobank's: not the refusal, not the dead node


def test_the_privacy_panel_counts_the_rounds_the_ledger_counts(states_fed: FederationPaths) -> None:
    # genomics trained round 1 under DP and refused round 2 at its cap: its ledger reserved one round.
    round_1 = _round_1()["sites"]["genomics"]["dp"]
    privacy = row(section(dashboard(states_fed).get("/").text, "privacy"), "data-site", "genomics")
    assert f'class="num epsilon">{round_1["epsilon"]:.3f} / <span class="cap">40<' in privacy
    assert 'class="num dp-rounds">1<' in privacy
    assert 'class="last">run 7 round 1<' in privacy
    assert f'class="num noise">{round_1["noise_multiplier"]}<' in privacy  # the last round trained's
    assert 'class="refused">1 (last: run 7 round 2)<' in privacy
    got = samples(dashboard(states_fed).get("/metrics").text)
    assert got[("healthfm_site_dp_rounds", (("site", "genomics"),))] == 1
    assert got[("healthfm_site_epsilon", (("site", "genomics"),))] == round_1["epsilon"]


def test_the_round_in_flight_is_shown(tmp_path: Path) -> None:
    paths = provisioned(tmp_path / "fed")

    def plain_round_1(event: dict[str, Any]) -> dict[str, Any] | None:
        if event["event"] == "evaluate" or event.get("round") == 2:
            return None  # the run has done round 1 of 3
        if event["event"] != "round":
            return event
        plain = {k: v for k, v in event.items() if k != "secure_aggregation"}
        plain["contributors"] = {"shared": ["biobank", "genomics", "hospital"], "genomics": ["biobank"]}
        plain["under_holders_control"] = {"genomics": ["biobank"]}
        plain["losses"] = {"total": 3.25, "mlm": 1.5}
        plain["timings"] = {**event["timings"], "configure_seconds": 61.5}  # a minute waiting for min-nodes
        return plain

    out = launch_recorded(paths, 5, tmp_path / "run", edit=plain_round_1)
    (out / "evaluation.json").unlink()
    write_outcome(out, RunOutcome(run_id=5, status="running", rounds_done=1, rounds=3, started_at=time.time()))
    claim, _ = claim_for_launch(out, lambda run_id: None)  # this process: a live ServerApp's stand-in claim
    claim = set_run_id(out, claim, 5)
    try:
        page = dashboard(paths)
        table = row(section(page.get("/").text, "runs"), "data-round", "1")
        assert "shared: biobank, genomics, hospital; genomics: biobank" in table
        assert "genomics averaged from 1 site" in table and "total 3.2500" in table and "mlm 1.5000" in table
        assert ">61.5<" in table  # before sending: the wait for min-nodes

        live = LiveRound(out, 5, 3)  # what the ServerApp writes
        live.begin_round(2)
        live.waiting_for_sites(["biobank", "genomics"], 3, 60.0)
        runs = section(page.get("/").text, "runs")
        assert 'data-live-round="2" data-phase="waiting for sites"' in runs
        assert "Round 2 of 3 in flight" in runs and "2 of min-nodes 3 connected</span> (biobank, genomics)" in runs
        got = samples(page.get("/metrics").text)
        assert got[("healthfm_round_in_flight", ())] == 2
        assert got[("healthfm_round_phase", (("phase", "waiting for sites"),))] == 1

        live.sent(TRAINING, {"biobank": ["ehr", "genomics", "shared"], "genomics": ["ehr", "genomics", "shared"]})
        live.replied("biobank")
        runs = section(page.get("/").text, "runs")
        assert 'data-phase="training"' in runs
        assert 'Waiting for: <span class="warn">genomics</span>' in runs and "Replied: biobank after" in runs
        assert "genomics: biobank, genomics; shared: biobank, genomics" in runs
        assert "shared is held by 2 sites here (biobank, genomics)" in runs
        assert samples(page.get("/metrics").text)[("healthfm_round_sites_awaited", ())] == 1

        live.aggregated(
            2,
            {
                "biobank": {"status": "ok"},
                "genomics": {"status": "ok"},
                "hospital": {"status": "absent", "reason": "not connected to the SuperLink"},
            },
            contributors={"shared": ["biobank", "genomics"], "wearables": ["biobank"]},
            under_holders_control={"shared": ["biobank", "genomics"], "wearables": ["biobank"]},
            losses={"total": 2.5},
            updated=True,
        )
        runs = section(page.get("/").text, "runs")
        assert "Round 2 aggregated at" in runs and "(its record follows once written)" in runs
        assert "hospital absent (not connected to the SuperLink)" in runs
        assert "wearables averaged from 1 site (biobank)" in runs and "Losses: total 2.5000" in runs
        live.ended()
        assert "in flight" not in section(page.get("/").text, "runs")
    finally:
        release(out, claim)


def test_the_audit_chains_tail_is_anchored(tmp_path: Path) -> None:
    paths = provisioned(tmp_path / "fed")
    out = launch_recorded(paths, 7, tmp_path / "run")
    log = out / AUDIT_FILE
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)
    page = dashboard(paths)

    def chain() -> str:
        return row(section(page.get("/").text, "audit"), "data-run", "7")

    assert 'class="ok">verified</span>: 10 records' in chain()
    log.write_bytes(b"".join(lines[:-1]))  # the last record deleted: what is left still chains
    assert "broken</span> after 9 good records" in chain() and "its tail was cut or edited" in chain()
    assert samples(page.get("/metrics").text)[("healthfm_audit_chain_ok", ())] == 0
    edited = lines[-1].replace(
        b'"reported": ["biobank", "genomics"]', b'"reported": ["biobank", "genomics", "hospital"]'
    )
    assert edited != lines[-1]
    log.write_bytes(b"".join([*lines[:-1], edited]))  # the last record edited
    assert "broken</span> after 10 good records" in chain() and "its tail was cut or edited" in chain()
    log.write_bytes(original)
    assert 'class="ok">verified</span>' in chain()
    # A run resumed on the cut log: its AuditLog records what it found before it goes on.
    log.write_bytes(b"".join(lines[:-1]))
    AuditLog(log).write_evaluation(2, ["biobank"], {})
    text = chain()
    assert 'class="ok">verified</span>: 11 records' in text
    assert "a resume found 9 records where the anchor said 10 and recorded it" in text


def test_provisioned_sites_are_shown_before_they_register(tmp_path: Path) -> None:
    paths = provisioned(tmp_path / "fed", register=False)
    html = dashboard(paths).get("/").text
    for name in NODES:
        site = row(section(html, "sites"), "data-site", name)
        assert 'data-connection="provisioned"' in site and "not registered yet" in site
    got = samples(dashboard(paths).get("/metrics").text)
    assert got[("healthfm_sites_provisioned", ())] == 3 and got[("healthfm_sites_registered", ())] == 0
    assert got[("healthfm_site_state", (("site", "hospital"), ("state", "provisioned")))] == 1


def test_metrics_add_no_series_per_launch(tmp_path: Path) -> None:
    paths = provisioned(tmp_path / "fed")
    for run_id in (11, 4, 27):
        launch_recorded(paths, run_id, tmp_path / f"run-{run_id}")
    text = dashboard(paths).get("/metrics").text
    labelled = {name for (name, labels) in samples(text) if any(k == "run_id" for k, _ in labels)}
    assert labelled == {"healthfm_run_info"}
    assert [labels for (name, labels) in samples(text) if name == "healthfm_run_info"] == [
        (("run_id", "27"), ("status", "completed"))
    ]


@pytest.fixture
def frozen_superlink(tmp_path: Path) -> Iterator[FederationPaths]:
    """A federation whose saved Control API address accepts connections and never answers: a
    SuperLink process stopped (SIGSTOP) looks so from outside (its kernel still accepts)."""
    paths = provisioned(tmp_path / "fed")
    launch_recorded(paths, 7, tmp_path / "run")
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # kept open, never read, never answered
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    write_connection(paths, f"127.0.0.1:{listener.getsockname()[1]}", insecure=True)
    try:
        yield paths
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def test_a_superlink_that_does_not_answer_makes_every_site_unknown_never_offline(
    frozen_superlink: FederationPaths,
) -> None:
    page = dashboard(frozen_superlink, NodesCache(frozen_superlink).get)
    got = samples(page.get("/metrics").text)  # at once: the first ask has not ended yet
    assert got[("healthfm_superlink_up", ())] == 0
    assert not [key for key in got if key[0] in ("healthfm_site_online", "healthfm_sites_online")]
    for name in NODES:
        assert got[("healthfm_site_state", (("site", name), ("state", "unknown")))] == 1
        assert got[("healthfm_site_state", (("site", name), ("state", "offline")))] == 0
    html = page.get("/").text
    assert "SuperLink not answering" in html
    deadline = time.monotonic() + 120  # only catches a hang: the ask ends at its 1.5 s limit
    while "no answer within 1.5 s" not in html and time.monotonic() < deadline:
        time.sleep(0.2)
        html = page.get("/").text
    assert "SuperLink not answering: the SuperLink&#39;s Control API at 127.0.0.1:" in html
    assert "no answer within 1.5 s" in html
    for name in NODES:
        assert 'data-connection="unknown"' in row(section(html, "sites"), "data-site", name)
    assert samples(page.get("/metrics").text)[("healthfm_superlink_up", ())] == 0
    # An ask that hangs past any limit of its own: the page still answers, saying so.
    hung = dashboard(frozen_superlink, NodesCache(frozen_superlink, timeout=3600).get)
    assert "SuperLink not answering: the SuperLink&#39;s Control API has not answered" in hung.get("/").text


def test_the_dashboard_imports_no_torch_and_says_its_url_only_once_it_serves(states_fed: FederationPaths) -> None:
    code = f"""
import socket, sys
import server.deploy.dashboard.app
print("app loads torch:", "torch" in sys.modules, flush=True)
taken = socket.create_server(("127.0.0.1", 0))  # another process's page, say
import server.coordinator
rc = server.coordinator.main(["dashboard", {str(states_fed.root)!r}, "--port", str(taken.getsockname()[1])])
print("exit", rc, "torch:", "torch" in sys.modules, flush=True)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "app loads torch: False" in done.stdout, (done.stdout, done.stderr)
    assert f"exit {EXIT_USAGE} torch: False" in done.stdout, (done.stdout, done.stderr)
    assert "http://" not in done.stdout
    assert "cannot listen there" in done.stderr and "another process listens there" in done.stderr


def test_the_servers_words_for_a_lost_site_are_the_ones_the_page_reads() -> None:
    import inspect
    from types import SimpleNamespace

    from flwr.server.superlink.linkstate import utils as linkstate
    from flwr.superlink.grid import http_grid

    from server.deploy.dashboard.states import round_state
    from server.round import record_absent

    # Flower answers for a site that delivered nothing: each of its words reads "lost".
    for reason in (
        linkstate.NODE_UNAVAILABLE_ERROR_REASON,
        linkstate.MESSAGE_UNAVAILABLE_ERROR_REASON,
        linkstate.REPLY_MESSAGE_UNAVAILABLE_ERROR_REASON,
    ):
        assert round_state("error", f"keys: {reason}") == "lost", reason
    # The site died while uploading its reply (seen in tests/deploy/test_dashboard_browser.py).
    died = "Reply message objects are unavailable. The sender may not have completed the upload"
    assert died in " ".join(inspect.getsource(http_grid).replace('"', " ").split())
    assert round_state("error", f"keys: {died} before the object-push session expired.") == "lost"
    assert round_state("error", "ValueError: a bug at the site") == "error"
    # A site of the run that is not connected, as the round records it.
    roster = SimpleNamespace(sites={101: SimpleNamespace(site="hospital")}, node_groups={101: ["ehr"]})
    sites: dict[str, SiteOutcome] = {}
    record_absent(SimpleNamespace(get_node_ids=lambda: []), 30.0, roster, sites)  # type: ignore[arg-type]
    assert round_state(sites["hospital"].status, sites["hospital"].reason or "") == "lost"
