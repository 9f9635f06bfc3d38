"""The decisions behind fault recovery, without processes: which stopped SuperNode `join` restarts
and how long it waits (client/join.py), the SuperLink's longer SQLite wait (server/superlink_main.py)
and a busy SuperLink told apart from one that knows no run (server/flwr_control.py).

The processes themselves (a SuperNode restarted, a site rejoining, a SuperLink restarted) are in
tests/test_faults.py (slow)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flwr.supercore import sql_mixin

from client.join import (
    EXIT_CONNECTION_ENDED,
    EXIT_NOT_REGISTERED,
    EXIT_SUPERNODE_FAILED,
    NODE_RECORD,
    RESTART_BACKOFF,
    Attempt,
    JoinConfig,
    JoinError,
    connected_before,
    explain_exit,
    lost_connection_cause,
    restart_delay,
    restartable,
)
from server.flwr_control import SuperLinkBusy, SuperLinkUnreachable, check_reachable, write_connection
from server.provision import FederationPaths
from server.superlink_main import BUSY_TIMEOUT_MS, with_busy_timeout


def config(tmp_path: Path, **kw: object) -> JoinConfig:
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
