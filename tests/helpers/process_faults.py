"""What the deployed fault tests do to real processes: run a coordinator command in the
background, wait for a condition, kill a site with no goodbye, start it again with the same key
(tests/deploy/test_faults.py, tests/deploy/test_secure_dropout_deployed.py, tests/deploy/test_dashboard_browser.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers.deploy_fixtures import CLIENT, Process, descendants, join_args, run_coordinator
from server.deploy.provision import FederationPaths

# A killed site is answered for by the SuperLink 2 x its heartbeat interval after its last heartbeat:
# within 8 s at `join`'s 4 s (client/deploy/heartbeat.py). At Flower's own 30 s no heartbeat is more
# than 27.5 s old at the kill, so not before 32.5 s after it. This bound tells the two apart with
# 22 s to spare for a loaded machine's late pull (it is not a speed target: that is
# benchmarks/federation_round.py's).
NOTICED_WITHIN_S = 30.0


class Background:
    """A coordinator command (e.g. `launch --wait`) running in a thread."""

    def __init__(self, *args: str, timeout: float = 600) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
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
    return path.is_file() and any(
        json.loads(ln).get("event") == name for ln in path.read_text().splitlines() if ln.strip().endswith("}")
    )


def signal_tree(proc: Process, signum: int) -> list[int]:
    """Send signum to the join process and every process below it (the SuperNode is in a
    session of its own); the pids signalled."""
    pids = [proc.proc.pid, *descendants(proc.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return pids


def kill_hard(proc: Process) -> None:
    """SIGKILL the join process and everything below it: no goodbye to the SuperLink."""
    signal_tree(proc, signal.SIGKILL)
    proc.proc.wait(timeout=10)


def rejoin(
    federation: FederationPaths,
    sites: dict[str, Path],
    name: str,
    address: str,
    state: Path,
    log: Path,
) -> Process:
    """Start the site again with the same key and state, at once: the SuperLink refuses the key
    while it still counts the killed node as connected (until its heartbeat expires), and `join`
    itself retries until then, saying so."""
    proc = Process(
        [sys.executable, str(CLIENT), *join_args(federation, sites[name], name, address, state)],
        log.with_suffix(".out"),
    )
    if not proc.wait_for("joined: SuperNode", 900):
        proc.stop()
        raise AssertionError(f"{name} could not rejoin: {proc.output()[-2000:]}")
    return proc
