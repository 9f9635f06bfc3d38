"""Fault tests with real processes on 127.0.0.1: a SuperLink with TLS + SuperNode authentication and
three SuperNodes started with `client.py join` (fixtures in tests/helpers/deploy_fixtures.py).

- A ServerApp run stopped mid-run (`flwr stop`) and resumed from its last checkpoint ends with
  global weights (and server-optimiser state) bit-for-bit equal to an uninterrupted run's.
- A site frozen (SIGSTOP) past the round timeout: the run goes on and completes without it, the
  coordinator is told the site was lost (exit 4); after it, `join` leaves no Flower process behind.
- A SuperNode killed mid-round and restarted (same key, same node id): it gets the setup again
  and trains in a later round of the same run; every round it missed is in the audit log.
- A SuperNode killed (SIGKILL) as round 1 starts: the round completes with the other two sites,
  the dead site is recorded (rounds.jsonl and the audit log) and contributes nothing, answered for
  by the SuperLink within seconds of the kill (its 4 s heartbeat, not Flower's 30 s); the site
  then rejoins with the same key and takes part in the next run.
- The SuperLink killed mid-run (with its ServerApp): `launch --wait` says it is unreachable (exit
  5, not "no such run"); restarted on the same database, `resume` ends with the weights of an
  uninterrupted run, bit for bit.

Elsewhere: an unregistered key cannot join (tests/deploy/test_deployment.py), a corrupted checkpoint is
refused on resume (tests/deploy/test_hardening.py). Both tests here take minutes on 2 cores: slow.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_fixtures import (
    SITES,
    TINY_RUN,
    Process,
    alive,
    command,
    descendants,
    round_events,
    run_coordinator,
)
from helpers.process_faults import NOTICED_WITHIN_S, Background, has_event, kill_hard, rejoin, signal_tree, wait_until

from server.audit import AUDIT_FILE, read_audit_log
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.deploy.commands import read_launches
from server.deploy.flwr_control import CONNECTION, EXIT_SITE_LOST, EXIT_UNREACHABLE, run_flwr
from server.deploy.provision import FederationPaths
from server.deploy.registry import read_registry, registry_path
from server.outcome import read_outcome

pytestmark = pytest.mark.slow

# Generous limits that only catch a hang: on a loaded 2-core CI machine a 3-round tiny run takes
# minutes (each message starts a ClientApp process), and nothing here asserts on speed.
RUN_TIMEOUT = "2400"  # the coordinator's own `--wait --timeout`
HANG_S = 2500  # the test's limit around a coordinator command or a wait
ROUND_TIMEOUT_S = 1200  # timeout-s where a test shows a round did not wait it out


# One uninterrupted run, shared by the tests that resume (its out-dir outlives the test that made it).
RESUME_RUN = [*TINY_RUN, "-c", "server-optimizer-lr=0.01"]  # the optimiser's moments must survive too
# Rounds of the stopped run: `flwr stop` is asked once round 1's checkpoint exists and takes a few
# seconds (a CLI process, then the SuperLink stopping the ServerApp); with 3 tiny rounds the run
# sometimes finished first.
RESUME_ROUNDS = 6
_STRAIGHT: list[Path] = []


def straight_run(federation: FederationPaths, tmp_path: Path) -> Path:
    if not _STRAIGHT:
        out = tmp_path / "straight"
        result = run_coordinator(
            "launch",
            str(federation.root),
            "--out-dir",
            str(out),
            "--rounds",
            str(RESUME_ROUNDS),
            *RESUME_RUN,
            "--wait",
            "--timeout",
            RUN_TIMEOUT,
            timeout=HANG_S,
        )
        assert result.returncode == 0, result.stderr
        _STRAIGHT.append(out)
    return _STRAIGHT[0]


def assert_same_weights(straight: Path, out: Path) -> None:
    latest_a = latest_server_checkpoint(straight / "checkpoints")
    latest_b = latest_server_checkpoint(out / "checkpoints")
    assert latest_a is not None and latest_b is not None
    a = load_server_checkpoint(latest_a)
    b = load_server_checkpoint(latest_b)
    assert a.round == b.round == RESUME_ROUNDS and a.setup.sha256 == b.setup.sha256
    assert a.arrays.keys() == b.arrays.keys() and a.strategy and a.strategy.keys() == b.strategy.keys()
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    for key in a.strategy:
        np.testing.assert_array_equal(a.strategy[key], b.strategy[key], err_msg=key)


def test_a_stopped_run_resumes_with_the_weights_of_an_uninterrupted_run(
    joined: dict[str, Process], federation: FederationPaths, tmp_path: Path
) -> None:
    run = RESUME_RUN
    straight = straight_run(federation, tmp_path)

    out = tmp_path / "stopped"
    launch = Background(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        str(RESUME_ROUNDS),
        *run,
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        timeout=HANG_S,
    )
    wait_until(lambda: latest_server_checkpoint(out / "checkpoints") is not None, HANG_S, "round 1's checkpoint")
    run_id = next(r.run_id for r in reversed(read_launches(federation)) if r.out_dir == str(out.resolve()))
    stop = run_flwr(federation, ["stop", str(run_id), CONNECTION])
    assert stop.returncode == 0, stop.stdout + stop.stderr
    launch.join(HANG_S)
    assert launch.result is not None
    assert launch.result.returncode != 0  # stopped, not completed
    latest = latest_server_checkpoint(out / "checkpoints")
    assert latest is not None
    stopped_at = load_server_checkpoint(latest).round
    assert 1 <= stopped_at < RESUME_ROUNDS, stopped_at

    resumed = run_coordinator(
        "resume", str(federation.root), "--out-dir", str(out), "--wait", "--timeout", RUN_TIMEOUT, timeout=HANG_S
    )
    assert resumed.returncode == 0, resumed.stderr
    events, rounds = round_events(out)
    assert any(e["event"] == "resume" and e["round"] == stopped_at for e in events)
    assert sorted(rounds) == list(range(1, RESUME_ROUNDS + 1))
    assert_same_weights(straight, out)
    # The audit log of the stopped-and-resumed run holds every round once per site after the resume.
    records = list(read_audit_log(out / AUDIT_FILE))
    assert [r["resumed"] for r in records if r["record"] == "run"] == [False, True]


def test_a_frozen_site_does_not_stop_the_run_and_join_leaves_nothing_behind(
    joined: dict[str, Process], federation: FederationPaths, tmp_path: Path
) -> None:
    victim = "genomics"
    out = tmp_path / "run"
    launch = Background(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "2",
        *TINY_RUN,
        "-c",
        "timeout-s=180",
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        timeout=HANG_S,
    )
    wait_until(lambda: has_event(out, "round"), HANG_S, "round 1")
    frozen = signal_tree(joined[victim], signal.SIGSTOP)  # past the round timeout: it never answers
    try:
        launch.join(HANG_S)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    result = launch.result
    assert result is not None
    # The run went on and completed without the frozen site, and the coordinator says it lost it.
    assert result.returncode == EXIT_SITE_LOST, (result.stdout, result.stderr)
    assert "finished:completed" in result.stdout and f"lost site(s): {victim}" in result.stderr
    _, rounds = round_events(out)
    assert sorted(rounds) == [1, 2] and rounds[1]["sites"][victim]["status"] == "ok"
    last = rounds[2]["sites"]
    # Round 2 of this tiny run can take under a second: on a busy machine the freeze may land
    # after the site's round-2 reply, and the site is then lost at the evaluation (asserted below)
    # instead of in round 2. Either way it is named lost and the run goes on without it.
    frozen_in_round_2 = last[victim]["status"] != "ok"
    if frozen_in_round_2:
        assert last[victim]["status"] in ("error", "no reply", "absent") and last[victim]["reason"], last[victim]
    assert all(last[s]["status"] == "ok" for s in SITES if s != victim) and rounds[2]["updated"] is True
    outcome = read_outcome(out)
    assert outcome is not None
    assert outcome.status == "completed" and set(outcome.sites_lost) == {victim}
    audit = list(read_audit_log(out / AUDIT_FILE))
    missed = [r for r in audit if r["record"] == "site-round" and r["round"] == 2 and r["site"] == victim]
    assert missed and (missed[0]["status"] != "ok") == frozen_in_round_2
    if frozen_in_round_2:
        assert missed[0]["reason"]
    evaluation = [r for r in audit if r["record"] == "evaluation"]
    assert evaluation and victim in evaluation[-1]["absent"] and victim not in evaluation[-1]["reported"]
    server_log = (out / "server.log").read_text()  # the deployed ServerApp's INFO log
    assert "round 2/2" in server_log and "evaluation after round 2" in server_log

    # No Flower process outlives `join` (SIGTERM to join only: it takes its SuperNode's group down).
    for name, proc in joined.items():
        tree = descendants(proc.proc.pid)
        names = " ".join(command(pid) for pid in tree)
        assert "flower-supernode" in names, (name, names)
        os.kill(proc.proc.pid, signal.SIGTERM)
        proc.proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.5)
        left = {pid: command(pid) for pid in tree if alive(pid)}
        assert not left, (name, left)


def test_a_restarted_supernode_gets_the_setup_again_and_trains(
    joined: dict[str, Process], federation: FederationPaths, sites: dict[str, Path], superlink: str, tmp_path: Path
) -> None:
    victim = "hospital"
    out = tmp_path / "run"
    launch = Background(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "3",
        *TINY_RUN,
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        timeout=HANG_S,
    )
    wait_until(lambda: has_event(out, "setup"), HANG_S, "round 0")
    kill_hard(joined[victim])  # mid round 1
    joined[victim] = rejoin(
        federation, sites, victim, superlink, tmp_path / f"state-{victim}", tmp_path / f"rejoin-{victim}"
    )
    launch.join(HANG_S)
    result = launch.result
    outcome = read_outcome(out)
    assert result is not None and outcome is not None
    # 0; or 4 only when another site was lost meanwhile (on a machine loaded enough for the
    # SuperLink's SQLite to answer a SuperNode "500 database is locked", that SuperNode stalls).
    assert result.returncode == (EXIT_SITE_LOST if outcome.sites_lost else 0), (result.stdout, result.stderr)
    assert victim not in outcome.sites_lost and outcome.status == "completed"
    _, rounds = round_events(out)
    assert sorted(rounds) == [1, 2, 3]
    assert rounds[1]["sites"][victim]["status"] != "ok"
    # Back: it asked for the setup, got it again, and trained in the same run.
    assert any(rounds[r]["sites"][victim].get("setup_resent") for r in (2, 3)), rounds
    assert rounds[3]["sites"][victim]["status"] == "ok" and victim in rounds[3]["contributors"]["shared"]
    audit = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "site-round" and r["site"] == victim]
    assert audit[0]["round"] == 1 and audit[0]["status"] != "ok" and audit[0]["reason"]
    assert audit[-1]["round"] == 3 and audit[-1]["status"] == "ok"
    evaluation = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "evaluation"]
    assert victim in evaluation[-1]["reported"] and victim not in evaluation[-1]["absent"]


# Last in the module: the SuperLink may count the killed site's key as connected for a while
# (until its heartbeat expires), so a `joined` fixture right after it could be refused.
def test_a_killed_supernode_does_not_stall_the_round_and_the_site_rejoins(
    joined: dict[str, Process], federation: FederationPaths, sites: dict[str, Path], superlink: str, tmp_path: Path
) -> None:
    victim = "hospital"
    out = tmp_path / "run"
    launch = Background(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "1",
        *TINY_RUN,
        "-c",
        f"timeout-s={ROUND_TIMEOUT_S}",
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        timeout=HANG_S,
    )
    # Round 0 is over (setup logged): round 1's train messages are being sent now.
    wait_until(lambda: has_event(out, "setup"), HANG_S, "round 0")
    killed_at = time.time()
    kill_hard(joined[victim])
    launch.join(HANG_S)
    # The run completes without the site; killed in the run's only round, it never trained in
    # this run, so the coordinator names it lost (issue 26: no site drops out silently).
    assert launch.result is not None
    assert launch.result.returncode == EXIT_SITE_LOST, (launch.result.stdout, launch.result.stderr)
    assert "finished:completed" in launch.result.stdout and f"lost site(s): {victim}" in launch.result.stderr

    _, rounds = round_events(out)
    event = rounds[1]
    # The round did not wait out its timeout: the SuperLink answered for the dead node once its
    # heartbeat expired, and the round recorded when that answer came (wall clock, as sent_at).
    assert set(event["sites"]) == set(SITES)
    dead = event["sites"][victim]
    assert dead["status"] == "error" and "Node Unavailable" in dead["reason"], dead
    noticed_at = event["timings"]["sent_at"] + dead["reply_after_seconds"]
    assert noticed_at - killed_at < NOTICED_WITHIN_S, (noticed_at - killed_at, event["timings"], dead)
    for name in set(SITES) - {victim}:
        assert event["sites"][name]["status"] == "ok", (name, event["sites"][name])
    assert event["updated"] is True
    assert all(victim not in names for names in event["contributors"].values())
    assert sorted(event["contributors"]["shared"]) == sorted(set(SITES) - {victim})
    assert not any(name.startswith("node-") for name in event["sites"])  # errors attributed to the site
    # The audit log says the same, per site, with the reason.
    records = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "site-round"]
    by_site = {r["site"]: r for r in records}
    assert set(by_site) == set(SITES)
    assert by_site[victim]["status"] == dead["status"] and by_site[victim]["groups_contributed"] == []
    assert "Node Unavailable" in by_site[victim]["reason"]
    assert by_site["biobank"]["groups_contributed"] == ["ehr", "genomics", "shared", "wearables"]

    # The site rejoins (same key, same state) and takes part in the next run.
    joined[victim] = rejoin(
        federation, sites, victim, superlink, tmp_path / f"state-{victim}", tmp_path / f"rejoin-{victim}"
    )
    out2 = tmp_path / "run2"
    again = run_coordinator(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out2),
        "--rounds",
        "1",
        *TINY_RUN,
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        timeout=HANG_S,
    )
    assert again.returncode == 0, again.stderr
    _, rounds2 = round_events(out2)
    assert {s: e["status"] for s, e in rounds2[1]["sites"].items()} == {s: "ok" for s in SITES}


def superlink_wrapper(federation: FederationPaths) -> int:
    """The pid of `python -m server.coordinator superlink FED` (the superlink fixture's process)."""
    found = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if "server.coordinator superlink" in command(int(p.parent.name))
        and str(federation.root) in command(int(p.parent.name))
    ]
    assert len(found) == 1, found
    return found[0]


# After every other test here: it replaces the module's SuperLink.
def test_a_killed_superlink_is_reported_unreachable_and_the_run_resumes_bit_identical(
    joined: dict[str, Process], federation: FederationPaths, superlink: str, tmp_path: Path
) -> None:
    straight = straight_run(federation, tmp_path)
    out = tmp_path / "run"
    launch = Background(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        str(RESUME_ROUNDS),
        *RESUME_RUN,
        "--wait",
        "--timeout",
        RUN_TIMEOUT,
        "--unreachable-grace",
        "20",
        timeout=HANG_S,
    )
    wait_until(lambda: latest_server_checkpoint(out / "checkpoints") is not None, HANG_S, "round 1's checkpoint")
    wrapper = superlink_wrapper(federation)
    tree = [wrapper, *descendants(wrapper)]  # flower-superlink, its SuperExec and the run's ServerApp
    assert any("flwr-serverapp" in command(pid) for pid in tree), [command(p) for p in tree]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    launch.join(HANG_S)
    result = launch.result
    assert result is not None
    assert result.returncode == EXIT_UNREACHABLE, (result.stdout, result.stderr)
    assert "unreachable" in result.stderr and "knows no run" not in result.stdout + result.stderr
    latest = latest_server_checkpoint(out / "checkpoints")
    assert latest is not None
    stopped_at = load_server_checkpoint(latest).round
    assert stopped_at < RESUME_ROUNDS

    port = superlink.rsplit(":", 1)[1]
    again = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(federation.root), "--port", port]
        + ["--parent-pid", str(os.getpid())],
        tmp_path / "superlink-again.out",
    )
    try:
        assert again.wait_for("Uvicorn running on https://127.0.0.1", 900), again.output()[-3000:]
        resumed = run_coordinator(
            "resume", str(federation.root), "--out-dir", str(out), "--wait", "--timeout", RUN_TIMEOUT, timeout=HANG_S
        )
        assert resumed.returncode == 0, (resumed.stdout, resumed.stderr)
        events, rounds = round_events(out)
        assert any(e["event"] == "resume" and e["round"] == stopped_at for e in events)
        assert sorted(rounds) == list(range(1, RESUME_ROUNDS + 1))
        assert_same_weights(straight, out)
        # The restarted SuperLink (state in memory) registered the sites again under new node ids,
        # and each site's `join` came back under its new one by itself.
        registry = read_registry(registry_path(federation))
        for name, proc in joined.items():
            site = registry.get(name)
            assert site is not None and f"rejoined: SuperNode {site.node_id} " in proc.output(), proc.output()[-2000:]
            assert "the SuperLink no longer knows node" in proc.output(), proc.output()[-2000:]  # the cause named
    finally:
        for proc in joined.values():  # the sites first, while their SuperLink still answers
            proc.stop()
        again.stop()
