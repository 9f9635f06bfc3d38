"""The decisions behind fault recovery, without processes: which stopped SuperNode `join` restarts
and how long it waits (client/deploy/join.py), read from that SuperNode's own lines only (issue 26, break 3), the SuperLink's longer SQLite wait (server/deploy/superlink_main.py)
and a busy SuperLink told apart from one that knows no run (server/deploy/flwr_control.py).

The processes themselves (a SuperNode restarted, a site rejoining, a SuperLink restarted) are in
tests/deploy/test_faults.py (slow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flwr.supercore import sql_mixin

from client.deploy.join import (
    ENDED_LINE,
    EXIT_CONNECTION_ENDED,
    EXIT_NOT_REGISTERED,
    EXIT_SUPERNODE_FAILED,
    NODE_RECORD,
    REJOIN_WINDOW_SECONDS,
    RESTART_BACKOFF,
    Attempt,
    JoinConfig,
    JoinError,
    Rejoin,
    connected_before,
    explain_exit,
    fresh_lines,
    lost_connection_cause,
    restart_delay,
    restartable,
)
from server.deploy.flower_patches import with_busy_timeout
from server.deploy.flwr_control import SuperLinkBusy, SuperLinkUnreachable, check_reachable, write_connection
from server.deploy.provision import FederationPaths
from server.deploy.superlink_main import BUSY_TIMEOUT_MS


def config(tmp_path: Path, **kw: Any) -> JoinConfig:
    return JoinConfig(site_root=tmp_path, superlink="127.0.0.1:9093", insecure=True, state_dir=tmp_path / "s", **kw)


def attempt(returncode: int, tail: list[str], node_id: str | None = "7") -> Attempt:
    return Attempt(returncode=returncode, node_id=node_id, tail=tail, connected_seconds=30.0, stop_requested=False)


def test_a_supernode_whose_connection_ended_is_restarted(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    tail = ["ERROR :      Server error '500 Internal Server Error' for url '.../v1/fleet/pull-messages'"]
    ended = attempt(EXIT_CONNECTION_ENDED, tail)
    error = explain_exit(ended.tail, ended.returncode, cfg, tmp_path / "log")
    assert error.status == EXIT_SUPERNODE_FAILED and "pull-messages" in str(error)
    assert restartable(ended, error, cfg)
    crashed = attempt(-9, [])
    assert restartable(crashed, explain_exit([], -9, cfg, tmp_path / "log"), cfg)


def test_a_supernode_stopped_by_the_sites_own_setup_or_its_wait_limit_is_not_restarted(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    port = attempt(1, ["OSError: [Errno 98] Address already in use"])
    assert not restartable(port, explain_exit(port.tail, 1, cfg, tmp_path / "log"), cfg)
    gave_up = attempt(1, ["WARNING :   Giving up reconnection after 60.00 seconds and 9 tries."])
    error = explain_exit(gave_up.tail, 1, cfg, tmp_path / "log")
    assert restartable(gave_up, error, cfg)  # no --max-wait-time: keep the site in the federation
    limited = config(tmp_path, max_wait_time=60.0)
    assert not restartable(gave_up, error, limited)  # the site admin asked it to give up


def test_the_restart_line_names_a_superlink_that_forgot_the_node() -> None:
    # Flower's SuperNode answers a 401 to its heartbeat with SIGINT to itself: exit 0, no error line.
    forgotten = attempt(0, ["INFO :      SuperNode ID: 7", "INFO :      SuperNode terminated gracefully."])
    assert lost_connection_cause(forgotten).startswith(
        "exit 0 after a 401 to its heartbeat: the SuperLink no longer knows node 7"
    )
    # ... or on a request, which it logs (seen with a pull after a SuperLink restart).
    pull = "httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://127.0.0.1:9/v1/fleet/pull-messages'"
    assert lost_connection_cause(attempt(-2, [pull])).startswith(
        "exit -2, 401 Unauthorized: the SuperLink no longer knows node 7"
    )
    failed = attempt(EXIT_CONNECTION_ENDED, ["ERROR :      Server error '500 Internal Server Error'"])
    assert (
        lost_connection_cause(failed)
        == f"exit {EXIT_CONNECTION_ENDED}: ERROR :      Server error '500 Internal Server Error'"
    )
    assert lost_connection_cause(attempt(-9, [])) == "exit -9"  # killed: nothing to explain


def test_restarts_back_off_up_to_a_minute() -> None:
    delays = [restart_delay(n) for n in range(1, 9)]
    assert delays == sorted(delays) and delays[0] == RESTART_BACKOFF[0] and delays[-1] == RESTART_BACKOFF[-1] == 60


def test_a_refused_key_is_retried_only_when_it_connected_before(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    assert not connected_before(state, "ecdsa-sha2-nistp384 AAAA")  # a fresh site: refused means refused
    (state / NODE_RECORD).write_text(json.dumps({"node_id": "7", "public_key": "ecdsa-sha2-nistp384 AAAA"}))
    assert connected_before(state, "ecdsa-sha2-nistp384 AAAA")
    assert not connected_before(state, "ecdsa-sha2-nistp384 BBBB")  # another key: not this site's session
    (state / NODE_RECORD).write_text("{")
    assert not connected_before(state, "ecdsa-sha2-nistp384 AAAA")
    tail = ["Failed to initialize the connection", "[code: 2004] Failed to activate SuperNode."]
    refused = explain_exit(tail, 1, config(tmp_path), tmp_path / "log")
    assert isinstance(refused, JoinError) and refused.status == EXIT_NOT_REGISTERED


# What a SuperNode of this site wrote to STATE/supernode.log before the one that just stopped: its
# ClientApp's old task token refused by the SuperNode's local Runtime API after a restart, and even
# an activation refused while the SuperLink still counted the killed node as online.
EARLIER_PROCESS = [
    "--- join 2026-11-20T10:00:00: python -m client.deploy.supernode_main ...",
    "INFO :      SuperNode ID: 7",
    "ERROR :     [/v1/runtime/acquire-task][ApiError:1008] Runtime task-token authentication failed.",
    "--- join 2026-11-20T10:01:00: python -m client.deploy.supernode_main ...",
    "ERROR :     Failed to initialize the connection to the SuperLink.",
    "[code: 2004] Failed to activate SuperNode.",
]
HEADER = "--- join 2026-11-20T10:05:00: python -m client.deploy.supernode_main ...\n"
PULL_401 = (
    "httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://127.0.0.1:9093/v1/fleet/pull-messages'"
)


def write_log(path: Path, current: list[str]) -> int:
    """A supernode.log: EARLIER_PROCESS, then the current process's header and lines; the offset
    where the current process's output starts (as run_supernode_once records it)."""
    path.write_text("\n".join(EARLIER_PROCESS) + "\n" + HEADER)
    offset = path.stat().st_size
    with open(path, "a") as f:
        f.write("".join(ln + "\n" for ln in current))
    return offset


def test_a_401_after_a_superlink_restart_is_retried_whatever_earlier_processes_logged(tmp_path: Path) -> None:
    """Break 3 replayed: the current SuperNode connected, its local Runtime API refused an earlier
    ClientApp's task token, then the restarted SuperLink answered 401 (it forgot the node). That
    is a lost connection: restarted with backoff, never 'key not registered' (exit 5)."""
    cfg = config(tmp_path)
    log = tmp_path / "supernode.log"
    current = [
        "INFO :      SuperNode ID: 8",
        "ERROR :     [/v1/runtime/pull-message][ApiError:1008] Runtime task-token authentication failed.",
        f"ERROR :     {PULL_401}",
        f"{ENDED_LINE} (its pull loop stopped on the error logged above)",
    ]
    offset = write_log(log, current)
    tail = fresh_lines(log, offset)
    assert tail == current  # nothing of the earlier processes
    assert explain_exit(tail, EXIT_CONNECTION_ENDED, cfg, log).status != EXIT_NOT_REGISTERED
    rejoin = Rejoin(cfg, public_key=None)
    for n in range(1, 4):  # every SuperLink restart: restarted again, never given up
        step = rejoin.after(attempt(EXIT_CONNECTION_ENDED, tail, node_id=str(7 + n)), now=100.0 * n)
        assert step.action == "restart" and step.delay == restart_delay(n), step
        assert "401 Unauthorized: the SuperLink no longer knows node" in step.message
    # The 401 to its heartbeat (Flower interrupts itself: exit 0), the same.
    heartbeat = ["INFO :      SuperNode ID: 9", "INFO :      SuperNode terminated gracefully."]
    offset = write_log(log, heartbeat)
    assert rejoin.after(attempt(0, fresh_lines(log, offset), node_id="9"), now=500.0).action == "restart"


def test_key_not_registered_is_said_only_for_the_current_processs_activation(tmp_path: Path) -> None:
    cfg = config(tmp_path, auth_key=tmp_path / "auth_key")
    log = tmp_path / "supernode.log"
    # The earlier process's 2004 is not this one's: this one met a SuperLink that is down.
    down = [
        "ERROR :     Failed to initialize the connection to the SuperLink.",
        "httpx.ConnectError: connection refused",
    ]
    offset = write_log(log, down)
    step = Rejoin(cfg, public_key=None).after(attempt(1, fresh_lines(log, offset), node_id=None), now=0.0)
    assert step.action == "fail" and step.error is not None
    assert step.error.status != EXIT_NOT_REGISTERED and "lost the SuperLink" in str(step.error)
    # This process's own activation refused, on a site that never connected: not registered.
    refused = [
        "ERROR :     Failed to initialize the connection to the SuperLink.",
        "[code: 2004] Failed to activate SuperNode.",
    ]
    offset = write_log(log, refused)
    step = Rejoin(cfg, public_key=None).after(attempt(1, fresh_lines(log, offset), node_id=None), now=0.0)
    assert step.action == "fail" and step.error is not None and step.error.status == EXIT_NOT_REGISTERED
    assert "refused this site's key" in str(step.error) and "not registered" in str(step.error)


def test_the_refusal_window_starts_again_after_each_connection(tmp_path: Path) -> None:
    """Each SuperLink restart may be followed by refusals while it still counts the killed node as
    online; a site that connected in between gets the whole window again (it used to get exit 5 at
    its second restart: the window ran from the first refusal ever)."""
    cfg = config(tmp_path)
    rejoin = Rejoin(cfg, public_key=None)
    lost = attempt(EXIT_CONNECTION_ENDED, [f"ERROR :     {PULL_401}"], node_id="7")
    refused = attempt(1, ["[code: 2004] Failed to activate SuperNode."], node_id=None)
    assert rejoin.after(lost, now=0.0).action == "restart"
    first = rejoin.after(refused, now=10.0)
    assert first.action == "retry" and "connected before" in first.message
    assert rejoin.after(refused, now=20.0) == type(first)("retry", first.delay, "")  # said once
    assert rejoin.after(lost, now=30.0).action == "restart"  # connected again, lost again
    assert rejoin.after(refused, now=1000.0).action == "retry"  # a new window
    assert rejoin.after(refused, now=1000.0 + REJOIN_WINDOW_SECONDS - 1).action == "retry"
    failed = rejoin.after(refused, now=1000.0 + REJOIN_WINDOW_SECONDS)
    assert failed.action == "fail" and failed.error is not None and failed.error.status == EXIT_NOT_REGISTERED


def test_fresh_lines_cut_a_long_output_at_a_line(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    offset = write_log(log, [f"line {i} " + "x" * 100 for i in range(300)])
    tail = fresh_lines(log, offset)
    assert len(tail) == 200 and tail[0].startswith("line 100 ") and tail[-1].startswith("line 299 ")
    # Read back from the end only (a SuperNode up for weeks): whole lines, never a cut one.
    offset = write_log(log, [f"line {i} " + "x" * 4000 for i in range(300)])
    tail = fresh_lines(log, offset)
    assert 0 < len(tail) < 200 and tail[-1].startswith("line 299 ") and all(ln.startswith("line ") for ln in tail)
    assert fresh_lines(tmp_path / "absent.log", 0) == []


def test_the_superlink_waits_longer_for_its_database_lock() -> None:
    pragmas = with_busy_timeout(sql_mixin.SQLITE_PRAGMAS, BUSY_TIMEOUT_MS)
    assert dict(pragmas)["busy_timeout"] == str(BUSY_TIMEOUT_MS) and BUSY_TIMEOUT_MS > 5000
    assert {k: v for k, v in pragmas if k != "busy_timeout"} == {
        k: v for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"
    }  # Flower's other pragmas unchanged
    with pytest.raises(ValueError, match="busy_timeout"):
        with_busy_timeout((("journal_mode", "WAL"),), BUSY_TIMEOUT_MS)


def test_an_internal_error_from_the_superlink_is_not_a_missing_run(tmp_path: Path) -> None:
    paths = FederationPaths(root=tmp_path)
    write_connection(paths, "127.0.0.1:9093", insecure=True)
    busy = subprocess.CompletedProcess([], 1, "Displaying information for run ID 5... Internal server error.", "")
    with pytest.raises(SuperLinkBusy) as err:
        check_reachable(paths, busy)
    assert isinstance(err.value, SuperLinkUnreachable) and "internal server error" in str(err.value)
    check_reachable(paths, subprocess.CompletedProcess([], 0, '{"success": true, "runs": []}', ""))
