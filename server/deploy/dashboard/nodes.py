"""Which sites are online: Flower's Control API (ListNodes), asked in this process.

The `flwr supernode ls` command asks the same (flwr/cli/supernode/ls.py), but each call is a new
Python process of about 1.2 CPU-seconds; the page asks every few seconds, so it talks to the
Control API itself, at the loopback address `coordinator superlink` saved (FED/server/flwr-home,
with the federation's CA).

Never on a page's path: a thread of its own asks every NODES_EVERY_S, each ask limited to
ASK_TIMEOUT_S, and a page (or a /metrics scrape) takes the last answer. A SuperLink that is down
answers at once with a refused connection; a frozen one (its process stopped, its machine
swapping) accepts the connection and says nothing: the ask ends at ASK_TIMEOUT_S, and an ask
that has not ended by then (a request that hangs below the timeout's reach) is itself the answer
"not answering". Either way the page says the SuperLink does not answer within seconds, and
never shows a site offline for it: what the sites are is unknown.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from flwr.proto.control_pb2 import ListNodesRequest
from flwr.supercore.control import ControlHttpClient

from server.deploy.flwr_control import CoordinatorError, read_connection
from server.deploy.provision import FederationPaths

NODES_EVERY_S = 2.0  # the page asks for its panels every 2 s (app.py POLL_S)
ASK_TIMEOUT_S = 1.5  # a SuperLink on this machine answers ListNodes in milliseconds


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

    @property
    def answered(self) -> bool:
        """The SuperLink answered: its nodes' states are known (else every site's is unknown)."""
        return not self.problem


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
        if "Timeout" in type(err).__name__:  # httpx's: a SuperLink that accepts and says nothing (frozen)
            why = f"no answer within {timeout:g} s"
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
    """list_nodes, asked by a thread of its own every `every` seconds (started by the first get):
    get() never waits on the SuperLink, but for the first answer (at most ASK_TIMEOUT_S)."""

    def __init__(
        self,
        paths: FederationPaths,
        every: float = NODES_EVERY_S,
        timeout: float = ASK_TIMEOUT_S,
        ask: Callable[[FederationPaths, float], NodesAnswer] = list_nodes,
    ) -> None:
        self.paths, self.every, self.timeout, self.ask = paths, every, timeout, ask
        self._lock = threading.Lock()
        self._answered = threading.Event()
        self._answer: NodesAnswer | None = None
        self._asking_since: float | None = None
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while True:
            with self._lock:
                self._asking_since = time.time()
            answer = self.ask(self.paths, self.timeout)
            with self._lock:
                self._answer, self._asking_since = answer, None
            self._answered.set()
            time.sleep(self.every)

    def get(self) -> NodesAnswer:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, name="control-api", daemon=True)
                self._thread.start()
        self._answered.wait(min(self.timeout, ASK_TIMEOUT_S))  # the first answer, if it comes soon
        with self._lock:
            answer, since = self._answer, self._asking_since
        now = time.time()
        if since is not None and now - since > self.timeout:  # an ask past its own limit: not answering
            return NodesAnswer(
                {},
                since,
                f"the SuperLink's Control API has not answered for {now - since:.0f} s "
                f"(asked at {time.strftime('%H:%M:%S', time.localtime(since))})",
            )
        if answer is None:
            return NodesAnswer({}, now, "the SuperLink's Control API has not answered yet")
        return answer
