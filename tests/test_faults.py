"""Fault tests with real processes on 127.0.0.1: a SuperLink with TLS + SuperNode authentication and
three SuperNodes started with `client.py join` (fixtures in tests/deploy_fixtures.py).

- A SuperNode killed (SIGKILL) as round 1 starts: the round completes with the other two sites,
  the dead site is recorded (rounds.jsonl and the audit log) and contributes nothing; the site
  then rejoins with the same key and takes part in the next run.
- A ServerApp run stopped mid-run (`flwr stop`) and resumed from its last checkpoint ends with
  global weights (and server-optimiser state) bit-for-bit equal to an uninterrupted run's.

Elsewhere: an unregistered key cannot join (tests/test_deployment.py), a corrupted checkpoint is
refused on resume (tests/test_hardening.py). Both tests here take minutes on 2 cores: slow.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures are used by name
    CLIENT,
    SITES,
    TINY_RUN,
    Process,
    federation,
    join_args,
    joined,
    round_events,
    run_coordinator,
    sites,
    superlink,
)

from server.audit import AUDIT_FILE, read_audit_log
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.coordinator import read_launches
from server.flwr_control import CONNECTION, run_flwr
from server.provision import FederationPaths

pytestmark = pytest.mark.slow


class Background:
    """A coordinator command (e.g. `launch --wait`) running in a thread."""

    def __init__(self, *args: str, timeout: float = 600) -> None:
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(args, timeout), daemon=True)
        self.thread.start()

    def _run(self, args: tuple[str, ...], timeout: float) -> None:
        self.result = run_coordinator(*args, timeout=timeout)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator command did not finish"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def has_event(out: Path, name: str) -> bool:
    path = out / "rounds.jsonl"
    return path.is_file() and any(json.loads(ln).get("event") == name for ln in path.read_text().splitlines()
                                  if ln.strip().endswith("}"))


def kill_hard(proc: Process) -> None:
    """SIGKILL the join process and its SuperNode (its process group): no goodbye to the SuperLink."""
    os.killpg(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(timeout=10)


def rejoin(federation: FederationPaths, sites: dict[str, Path], name: str, address: str, state: Path,
           log: Path, attempts: int = 4) -> Process:
    """Start the site again with the same key and state; the SuperLink refuses the key while it
    still counts the dead node as connected (until its heartbeat expires), so retry."""
    for attempt in range(attempts):
        proc = Process([sys.executable, str(CLIENT), *join_args(federation, sites[name], name, address, state)],
                       log.with_suffix(f".{attempt}.out"))
        if proc.wait_for("joined: SuperNode", 120):
            return proc
        proc.stop()
        time.sleep(15)
    raise AssertionError(f"{name} could not rejoin: {proc.output()[-2000:]}")


def test_a_stopped_run_resumes_with_the_weights_of_an_uninterrupted_run(
        joined: dict[str, Process], federation: FederationPaths, tmp_path: Path) -> None:
    run = [*TINY_RUN, "-c", "server-optimizer-lr=0.01"]  # its moments must survive the stop too
    straight = tmp_path / "straight"
    result = run_coordinator("launch", str(federation.root), "--out-dir", str(straight), "--rounds", "3", *run,
                             "--wait", "--timeout", "540", timeout=580)
    assert result.returncode == 0, result.stderr

    out = tmp_path / "stopped"
    launch = Background("launch", str(federation.root), "--out-dir", str(out), "--rounds", "3", *run,
                        "--wait", "--timeout", "540", timeout=580)
    wait_until(lambda: latest_server_checkpoint(out / "checkpoints") is not None, 300, "round 1's checkpoint")
    run_id = next(r.run_id for r in reversed(read_launches(federation)) if r.out_dir == str(out.resolve()))
    stop = run_flwr(federation, ["stop", str(run_id), CONNECTION])
    assert stop.returncode == 0, stop.stdout + stop.stderr
    launch.join(300)
    assert launch.result.returncode != 0  # stopped, not completed
    stopped_at = load_server_checkpoint(latest_server_checkpoint(out / "checkpoints")).round
    assert 1 <= stopped_at < 3, stopped_at

    resumed = run_coordinator("resume", str(federation.root), "--out-dir", str(out), "--wait", "--timeout", "540",
                              timeout=580)
    assert resumed.returncode == 0, resumed.stderr
    events, rounds = round_events(out)
    assert any(e["event"] == "resume" and e["round"] == stopped_at for e in events)
    assert sorted(rounds) == [1, 2, 3]
    a = load_server_checkpoint(latest_server_checkpoint(straight / "checkpoints"))
    b = load_server_checkpoint(latest_server_checkpoint(out / "checkpoints"))
    assert a.round == b.round == 3 and a.setup.sha256 == b.setup.sha256
    assert a.arrays.keys() == b.arrays.keys() and a.strategy and a.strategy.keys() == b.strategy.keys()
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    for key in a.strategy:
        np.testing.assert_array_equal(a.strategy[key], b.strategy[key], err_msg=key)
    # The audit log of the stopped-and-resumed run holds every round once per site after the resume.
    records = list(read_audit_log(out / AUDIT_FILE))
    assert [r["resumed"] for r in records if r["record"] == "run"] == [False, True]


# Last in the module: the SuperLink may count the killed site's key as connected for a while
# (until its heartbeat expires), so a `joined` fixture right after it could be refused.
def test_a_killed_supernode_does_not_stall_the_round_and_the_site_rejoins(
        joined: dict[str, Process], federation: FederationPaths, sites: dict[str, Path], superlink: str,
        tmp_path: Path) -> None:
    victim = "hospital"
    out = tmp_path / "run"
    launch = Background("launch", str(federation.root), "--out-dir", str(out), "--rounds", "1", *TINY_RUN,
                        "--wait", "--timeout", "540", timeout=580)
    # Round 0 is over (setup logged): round 1's train messages are being sent now.
    wait_until(lambda: has_event(out, "setup"), 240, "round 0")
    kill_hard(joined[victim])
    t_killed = time.monotonic()
    launch.join(600)
    assert launch.result.returncode == 0, (launch.result.stdout, launch.result.stderr)
    # It did not wait for the whole round timeout (300 s): the SuperLink answered for the dead node.
    assert time.monotonic() - t_killed < 280

    _, rounds = round_events(out)
    event = rounds[1]
    assert set(event["sites"]) == set(SITES)
    dead = event["sites"][victim]
    assert dead["status"] in ("error", "no reply"), dead
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
    if dead["status"] == "error":
        assert "Node Unavailable" in by_site[victim]["reason"]
    assert by_site["biobank"]["groups_contributed"] == ["ehr", "genomics", "shared", "wearables"]

    # The site rejoins (same key, same state) and takes part in the next run.
    joined[victim] = rejoin(federation, sites, victim, superlink, tmp_path / f"state-{victim}",
                            tmp_path / f"rejoin-{victim}")
    out2 = tmp_path / "run2"
    again = run_coordinator("launch", str(federation.root), "--out-dir", str(out2), "--rounds", "1", *TINY_RUN,
                            "--wait", "--timeout", "420", timeout=480)
    assert again.returncode == 0, again.stderr
    _, rounds2 = round_events(out2)
    assert {s: e["status"] for s, e in rounds2[1]["sites"].items()} == {s: "ok" for s in SITES}
