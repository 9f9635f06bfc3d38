"""Which sites are online: Flower's Control API (ListNodes), asked in this process.

The `flwr supernode ls` command asks the same (flwr/cli/supernode/ls.py), but each call is a new
Python process of about 1.2 CPU-seconds; the page asks every few seconds, so it talks to the
Control API itself, at the loopback address `coordinator superlink` saved (FED/server/flwr-home,
with the federation's CA), and keeps the answer for NODES_TTL_S. A SuperLink that does not answer
is shown as such, never as every site offline.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from flwr.proto.control_pb2 import ListNodesRequest
from flwr.supercore.control import ControlHttpClient

from server.deploy.flwr_control import CoordinatorError, read_connection
from server.deploy.provision import FederationPaths

NODES_TTL_S = 5.0
ASK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NodeState:
    status: str  # Flower's words: online, offline, registered, unregistered
    since: str  # when it last came online (online) or went offline (offline), ISO time, UTC
    online_until: float  # unix time its heartbeat keeps it online until (0: unknown)


@dataclass(frozen=True)
class NodesAnswer:
    nodes: dict[int, NodeState]
    asked_at: float
    problem: str = ""  # the SuperLink did not answer (the page says so)


def list_nodes(paths: FederationPaths, timeout: float = ASK_TIMEOUT_S) -> NodesAnswer:
    """Every node the SuperLink knows, by node id."""
    now = time.time()
    try:
        connection = read_connection(paths)
    except CoordinatorError as err:
        return NodesAnswer({}, now, str(err))
    address = str(connection.get("address", ""))
    insecure = bool(connection.get("insecure", False))
    verify: str | bool = False if insecure else str(connection.get("root-certificates", ""))
    scheme = "http" if insecure else "https"
    try:
        # No retries and no Flower interceptors: one request, and an old SuperLink's version
        # complaint must not exit this process (the CLI's RuntimeVersionHttpInterceptor does).
        client = ControlHttpClient(f"{scheme}://{address}", verify=verify, timeout=timeout)
        try:
            answer = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
    except Exception as err:  # any transport or protocol failure: the SuperLink did not answer usefully
        why = " ".join(str(err).split())[:200]
        return NodesAnswer(
            {}, now, f"the SuperLink's Control API at {address} did not answer ({type(err).__name__}: {why})"
        )
    nodes = {}
    for info in answer.nodes_info:
        since = info.last_activated_at if info.status == "online" else info.last_deactivated_at
        nodes[int(info.node_id)] = NodeState(str(info.status), utc_text(since), float(info.online_until or 0.0))
    return NodesAnswer(nodes, now)


def utc_text(iso: str) -> str:
    """Flower's ISO time (2026-11-25T13:46:17.181298+00:00) as 2026-11-25 13:46:17 UTC; "" if none."""
    if not iso:
        return ""
    try:
        when = datetime.fromisoformat(iso).astimezone(UTC)
    except ValueError:
        return iso
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


class NodesCache:
    """list_nodes, asked at most every NODES_TTL_S whatever the number of pages open."""

    def __init__(self, paths: FederationPaths, ttl: float = NODES_TTL_S) -> None:
        self.paths, self.ttl = paths, ttl
        self._lock = threading.Lock()
        self._answer: NodesAnswer | None = None

    def get(self) -> NodesAnswer:
        with self._lock:
            if self._answer is None or time.time() - self._answer.asked_at >= self.ttl:
                self._answer = list_nodes(self.paths)
            return self._answer
