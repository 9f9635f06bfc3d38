"""Each site's real ClientApp called in this process (no SuperLink, no Ray): a Grid for tests that run
the real FederationServer against real sites in a few seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import make_client_app
from simulations.synthetic import FederationManifest, generate_federation


class InProcessGrid(Grid):
    """Each site's real ClientApp called in this process with one Context per node, errors
    turned into error replies as Flower does. A restarted SuperNode is a fresh Context: what
    `restart` does to a node before the given train exchange."""

    def __init__(self, node_configs: dict[int, dict], restart: tuple[int, int] | None = None) -> None:
        self.app = make_client_app()
        self.node_configs = node_configs
        self.contexts = {n: self._fresh(n) for n in node_configs}
        self.restart, self.train_exchanges = restart, 0

    def _fresh(self, node: int) -> Context:
        return Context(
            run_id=1, node_id=node, node_config=dict(self.node_configs[node]), state=RecordDict(), run_config={}
        )

    def set_run(self, run) -> None:  # noqa: ANN001 - unused by FederationServer
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        raise NotImplementedError

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_exchanges += 1
            if self.restart is not None and self.restart[1] == self.train_exchanges:
                self.contexts[self.restart[0]] = self._fresh(self.restart[0])  # the SuperNode restarted
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{self.train_exchanges}-{i}-{msg.metadata.dst_node_id}"
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as err:  # what a SuperNode sends back when its ClientApp raises
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        return replies


class RecordingGrid(InProcessGrid):
    """InProcessGrid keeping every exchange: what the server sent and every reply it received."""

    def __init__(self, node_configs: dict[int, dict]) -> None:
        super().__init__(node_configs)
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        self.exchanges.append((messages, replies))
        return replies

    def exchange(self, message_type: str) -> tuple[list[Message], list[Message]]:
        [found] = [(m, r) for m, r in self.exchanges if m and m[0].metadata.message_type == message_type]
        return found


def set_serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process before main() (the Message constructor reads it)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_serverapp_identity(monkeypatch)


def tiny_nodes(tmp_path: Path) -> tuple[FederationManifest, dict[int, dict[str, Any]]]:
    """The tiny scenario's three sites (30 subjects each) as InProcessGrid node configs, node ids
    100.., each with its own state dir under tmp_path."""
    manifest = generate_federation(tmp_path / "data", scenario="tiny", seed=0, n_subjects=30, progress=False)
    nodes: dict[int, dict[str, Any]] = {
        100 + i: {
            "site-root": str(s.root),
            "site-name": s.name,
            "min-code-subjects": 5,
            "min-report-subjects": 2,
            "state-dir": str(tmp_path / f"state-{s.name}"),
        }
        for i, s in enumerate(manifest.sites)
    }
    return manifest, nodes
