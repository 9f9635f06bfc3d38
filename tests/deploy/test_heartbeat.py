"""A dead site noticed within seconds (issue 45): the site's SuperNode sends a heartbeat interval of
4 s instead of Flower's 30 (client/deploy/heartbeat.py, set by client/deploy/flower_patches.py
`set_heartbeat`), and the SuperLink accepts it (server/deploy/flower_patches.py
`set_min_heartbeat_interval`; Flower refuses under 10 s). These run Flower's own code with the
names set: the interval the node sends, the pause its heartbeat loop takes, the SuperLink's
check and its expiry; and they fail when a Flower upgrade renames what the patches set (each patch
then refuses to start instead of leaving a site on Flower's 60 s). The deployed dead-site tests
(tests/deploy/test_faults.py, tests/deploy/test_secure_dropout_deployed.py) assert the round noticed it."""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import flwr.supercore.heartbeat as flower_heartbeat
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
import flwr.supernode.fleet_http_connection as flower_connection
import pytest
from flwr.common.constant import HEARTBEAT_PATIENCE
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.supercore.constant import NodeStatus
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.servicer.fleet.fleet_handlers import InvalidHeartbeatIntervalError, _validate_heartbeat_interval

from client.deploy.flower_patches import set_heartbeat
from client.deploy.heartbeat import HEARTBEAT_INTERVAL_S, call_budget
from client.deploy.join import JoinConfig, supernode_command
from healthfm_core.rebind import rebind
from server.deploy.flower_patches import set_min_heartbeat_interval
from server.deploy.superlink_main import MIN_HEARTBEAT_INTERVAL_S, parse

SUPERNODE_NAMES = [
    (flower_connection, "HEARTBEAT_DEFAULT_INTERVAL"),
    (flower_heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
    (flower_heartbeat, "HEARTBEAT_CALL_TIMEOUT"),
]


@pytest.fixture
def flower_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's constants as they were, restored after the test."""
    for module, name in [*SUPERNODE_NAMES, (flower_fleet, "HEARTBEAT_MIN_INTERVAL")]:
        monkeypatch.setattr(module, name, getattr(module, name))


def code_names(code: types.CodeType) -> set[str]:
    """Every global name `code` and the functions defined inside it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return names


def test_flower_still_reads_the_heartbeat_names_the_patches_set() -> None:
    # The interval the node sends (on activation and with each heartbeat) is the connection
    # module's binding; the pause between heartbeats the heartbeat module's; the SuperLink checks
    # an interval against the fleet handlers' binding. A copy taken elsewhere would not follow.
    connect = flower_connection.http_request_response.__wrapped__  # type: ignore[attr-defined]  # under @contextmanager
    assert "HEARTBEAT_DEFAULT_INTERVAL" in code_names(connect.__code__)
    assert {"HEARTBEAT_DEFAULT_INTERVAL", "HEARTBEAT_CALL_TIMEOUT"} <= set(HeartbeatSender._run.__code__.co_names)
    assert "HEARTBEAT_MIN_INTERVAL" in _validate_heartbeat_interval.__code__.co_names
    assert HEARTBEAT_PATIENCE == 2  # the expiry is 2 x the interval: docs/coordinator.md says 8 s


@pytest.mark.usefixtures("flower_constants")
def test_a_site_sends_its_interval_and_beats_often_enough_for_it() -> None:
    set_heartbeat(HEARTBEAT_INTERVAL_S)
    assert flower_connection.HEARTBEAT_DEFAULT_INTERVAL == HEARTBEAT_INTERVAL_S == 4
    # Flower's own heartbeat loop, run once: the pause it takes before the next heartbeat.
    waits: list[float] = []

    class Stop:
        def __init__(self) -> None:
            self.set_ = False

        def is_set(self) -> bool:
            return self.set_

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            self.set_ = True
            return True

    beats: list[int] = []

    def beat() -> bool:
        beats.append(1)
        return True

    sender = HeartbeatSender(beat)
    sender._stop_event = Stop()  # type: ignore[assignment]
    sender._run()
    assert beats == [1]
    # (4 - 2) x 0.7-0.9: four or five heartbeats within the SuperLink's 2 x 4 s
    assert len(waits) == 1 and 1.4 - 1e-9 <= waits[0] <= 1.8 + 1e-9, waits
    assert call_budget(30) == 5 and call_budget(4) == 2  # Flower's own from 10 s up


@pytest.mark.usefixtures("flower_constants")
def test_the_superlink_accepts_a_four_second_heartbeat_only_once_its_floor_is_lowered() -> None:
    with pytest.raises(InvalidHeartbeatIntervalError, match=r"\[10, 1800\]"):
        _validate_heartbeat_interval(HEARTBEAT_INTERVAL_S)  # Flower's own floor refuses it
    set_min_heartbeat_interval(MIN_HEARTBEAT_INTERVAL_S)
    _validate_heartbeat_interval(HEARTBEAT_INTERVAL_S)
    with pytest.raises(InvalidHeartbeatIntervalError):
        _validate_heartbeat_interval(MIN_HEARTBEAT_INTERVAL_S / 2)


def test_the_superlink_counts_a_silent_node_dead_two_intervals_after_its_last_heartbeat() -> None:
    # Flower's in-memory state (the SuperLink's default here): a node that beat at 4 s is offline
    # 8 s after its last heartbeat, and a message to it is then answered "Node Unavailable".
    state = InMemoryLinkState(NoOpFederationManager(), InMemoryObjectStore())
    node = state.create_node("aid", "site", b"key", heartbeat_interval=30)
    before = time.time()
    assert state.activate_node(node, HEARTBEAT_INTERVAL_S)
    assert state.acknowledge_node_heartbeat(node, HEARTBEAT_INTERVAL_S)
    after = time.time()
    expiry = HEARTBEAT_PATIENCE * HEARTBEAT_INTERVAL_S
    assert before + expiry <= state.nodes[node].online_until <= after + expiry
    # Past it, the SuperLink's own check tags it offline.
    state.nodes[node].online_until = time.time() - 0.001
    state._check_and_tag_offline_nodes([node])
    assert state.nodes[node].status == NodeStatus.OFFLINE


@pytest.mark.usefixtures("flower_constants")
@pytest.mark.parametrize("module,name", SUPERNODE_NAMES)
def test_a_renamed_flower_name_stops_the_site_from_starting(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str
) -> None:
    monkeypatch.delattr(module, name)
    before = {(m.__name__, n): getattr(m, n, None) for m, n in SUPERNODE_NAMES}
    with pytest.raises(RuntimeError, match=f"has no {name}.*refusing to start"):
        set_heartbeat(HEARTBEAT_INTERVAL_S)
    # Refused before anything was set in that module.
    assert all(getattr(m, n, None) == before[(m.__name__, n)] for m, n in SUPERNODE_NAMES if m is module)


@pytest.mark.usefixtures("flower_constants")
def test_a_renamed_flower_name_stops_the_superlink_from_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(flower_fleet, "HEARTBEAT_MIN_INTERVAL")
    with pytest.raises(RuntimeError, match="has no HEARTBEAT_MIN_INTERVAL.*server/deploy/flower_patches.py"):
        set_min_heartbeat_interval(MIN_HEARTBEAT_INTERVAL_S)


def test_rebind_sets_nothing_when_one_name_is_missing() -> None:
    module = types.ModuleType("flower_like")
    module.A = 1  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="flower_like has no B: here"):
        rebind(module, {"A": 2, "B": 3}, "here")
    assert module.A == 1


def test_join_passes_the_sites_interval_and_refuses_one_the_superlink_cannot_take(tmp_path: Path) -> None:
    def command(**kw: Any) -> list[str]:
        cfg = JoinConfig(site_root=tmp_path, superlink="h:1", insecure=True, state_dir=tmp_path, **kw)
        return supernode_command(cfg, tmp_path / "node-config.toml", 9094)

    default, slow_link = command(), command(heartbeat_interval=30)
    assert default[default.index("--heartbeat-interval") + 1] == str(HEARTBEAT_INTERVAL_S)
    assert slow_link[slow_link.index("--heartbeat-interval") + 1] == "30.0"
    assert slow_link.index("--heartbeat-interval") < next(
        i for i, a in enumerate(slow_link) if a.endswith("flower-supernode")
    )
    for bad in (1.0, 3600.0):
        with pytest.raises(ValueError, match="heartbeat_interval"):
            command(heartbeat_interval=bad)


def test_the_superlink_launcher_reads_its_floor_then_hands_flower_its_own(capsys: pytest.CaptureFixture) -> None:
    assert parse(["--min-heartbeat-interval", "3", "/venv/bin/flower-superlink", "--insecure"]) == (
        3.0,
        ["/venv/bin/flower-superlink", "--insecure"],
    )
    assert parse(["/venv/bin/flower-superlink"]) == (MIN_HEARTBEAT_INTERVAL_S, ["/venv/bin/flower-superlink"])
    for bad in (["--min-heartbeat-interval", "0", "/venv/bin/flower-superlink"], []):
        with pytest.raises(SystemExit) as exit_:
            parse(bad)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--min-heartbeat-interval 0: must be above 0" in err and "flower-superlink is required" in err
