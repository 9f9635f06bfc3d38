"""The SuperLink's middleware gate (server/deploy/flower_patches.py `gate_middleware`): Flower's
layers that act on some paths only are skipped on the others, and nothing a layer decides changes.

Flower's own SuperLink app (flwr.superlink.main.create_app, its in-memory state, its routers and
middleware), in process, built twice: as Flower builds it and gated. The same requests go to both
and must get the same answer: Fleet calls unsigned, signed by a key no node holds, signed by one
node's key while naming another, signed with a stale timestamp, and signed rightly; Control and
Runtime calls without credentials; paths that only look like a Fleet or Control path. The forged
Fleet calls must be refused (401) by the gated app, as node authentication refuses them without
the gate."""

from __future__ import annotations

import asyncio
import datetime
import functools
from base64 import b64encode
from typing import Any

import flwr.superlink.main as flower_superlink_app
import flwr.supernode.main as flower_supernode_app
import httpx
import pytest
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
from flwr.supercore.routers.runtime.tracing import RuntimeTracingMiddleware
from flwr.supernode.nodestate import NodeStateFactory
from starlette.middleware import Middleware

from client.deploy import flower_patches as client_patches
from healthfm_core.middleware_gate import FLOWER_TRACING_VARIABLE, GatedMiddleware
from server.deploy import flower_patches
from server.deploy.flower_patches import MIDDLEWARE_ACTS


class Keys:
    def __init__(self) -> None:
        self.private, public = generate_key_pairs()
        self.public = public_key_to_bytes(public)

    def headers(self, at: datetime.datetime | None = None) -> dict[str, str]:
        timestamp = (at or now()).isoformat()
        return {
            FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(self.public).decode("ascii"),
            TIMESTAMP_HEADER: timestamp,
            FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(self.private, timestamp.encode("ascii"))).decode(
                "ascii"
            ),
        }


def _register(app: Any, nodes: dict[str, Keys]) -> dict[str, int]:
    state = app.state.linkstate_factory.state()
    return {name: state.create_node("owner", name, k.public, heartbeat_interval=30.0) for name, k in nodes.items()}


@pytest.fixture
def apps(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, dict[str, Keys], tuple[dict[str, int], dict[str, int]]]:
    """Flower's SuperLink app as Flower builds it, and as superlink_main's process builds it (gated),
    each with the same two nodes registered."""
    nodes = {"biobank": Keys(), "hospital": Keys()}
    plain = flower_superlink_app.create_app()
    # Flower's builder back after the test (gate_middleware rebinds it for the whole process).
    monkeypatch.setattr(flower_superlink_app, "_get_middleware", flower_superlink_app._get_middleware)
    flower_patches.gate_middleware()
    flower_patches.gate_middleware()  # twice, as a process that imports twice: gated once
    gated_app = flower_superlink_app.create_app()
    return plain, gated_app, nodes, (_register(plain, nodes), _register(gated_app, nodes))


def _layers(app: Any) -> list[str]:
    return [
        (m.kwargs["layer"].cls.__name__ + " (gated)") if m.cls is GatedMiddleware else getattr(m.cls, "__name__", "?")
        for m in app.user_middleware
    ]


def test_the_gated_app_keeps_every_layer_and_gates_the_path_dependent_ones(apps: Any) -> None:
    plain, gated_app, _, _ = apps
    assert len(plain.user_middleware) == len(gated_app.user_middleware) == 9
    names = _layers(gated_app)
    print("\n".join(names))
    assert sum(n.endswith("(gated)") for n in names) == len(MIDDLEWARE_ACTS) == 7
    # Every class the gate knows is in Flower's list (a Flower that renamed one fails here).
    assert {m.cls for m in plain.user_middleware} >= set(MIDDLEWARE_ACTS)
    assert [n.removesuffix(" (gated)") for n in names] == _layers(plain)
    # Applied twice, still one gate a layer.
    assert not any(
        m.cls is GatedMiddleware and m.kwargs["layer"].cls is GatedMiddleware for m in gated_app.user_middleware
    )


def _post(app: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async def call() -> tuple[int, bytes]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://superlink") as c:
            r = await c.post(path, content=body, headers={"content-type": PROTOBUF_MEDIA_TYPE, **headers})
            return r.status_code, r.content

    return asyncio.run(call())


def _calls(
    ids: dict[str, int], nodes: dict[str, Keys], outsider: Keys
) -> dict[str, tuple[str, bytes, dict, int | None]]:
    """What each call is: path, body, headers, and the status it must get (None: Flower's, whatever it is)."""
    biobank, hospital = nodes["biobank"], nodes["hospital"]
    pull = PullMessagesRequest(node=Node(node_id=ids["biobank"])).SerializeToString()
    stale = now() - datetime.timedelta(hours=1)
    return {
        "fleet, unsigned": ("/v1/fleet/pull-messages", pull, {}, 401),
        "fleet, a key no node holds": ("/v1/fleet/pull-messages", pull, outsider.headers(), 401),
        "fleet, hospital's key naming biobank": ("/v1/fleet/pull-messages", pull, hospital.headers(), 401),
        "fleet, a stale signature": ("/v1/fleet/pull-messages", pull, biobank.headers(stale), 401),
        "fleet, signed rightly": ("/v1/fleet/pull-messages", pull, biobank.headers(), 200),
        "control, no credentials": ("/v1/control/list-runs", b"", {}, None),
        "runtime, no token": ("/v1/runtime/get-nodes", b"", {}, None),
        "a path under neither": ("/v1/fleetx/pull-messages", pull, {}, None),
        "fleet, an encoded slash": ("/v1/fleet%2Fpull-messages", pull, {}, None),
        "control, encoded": ("/v1/%63ontrol/list-runs", b"", {}, None),
    }


def test_forged_fleet_calls_are_refused_and_every_answer_is_flowers(apps: Any) -> None:
    plain, gated_app, nodes, (plain_ids, gated_ids) = apps
    outsider = Keys()
    flowers, ours = _calls(plain_ids, nodes, outsider), _calls(gated_ids, nodes, outsider)
    for what, (path, body, headers, expected) in ours.items():
        want = _post(plain, *flowers[what][:3])
        got = _post(gated_app, path, body, headers)
        print(f"{what}: Flower's {want[0]}, gated {got[0]}")
        assert got[0] == want[0], (what, got, want)
        if expected is not None:
            assert got[0] == expected, (what, got)
        if got[0] != 200:
            assert got[1] == want[1], (what, got, want)


def test_a_layer_the_gate_skips_is_not_entered_and_one_it_keeps_is() -> None:
    entered: list[str] = []

    class Counting:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            entered.append(scope["path"])
            await self.app(scope, receive, send)

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = GatedMiddleware(endpoint, layer=Middleware(Counting), acts=flower_patches._on_fleet_path)

    async def post_all() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://superlink") as c:
            for path in ("/v1/fleet/push-object", "/v1/runtime/push-object", "/v1/fleetx/a", "/v1/control/x"):
                assert (await c.post(path)).status_code == 204

    asyncio.run(post_all())
    assert entered == ["/v1/fleet/push-object"]


def test_the_supernode_runtime_api_runs_flowers_tracing_layer_only_when_tracing_is_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """client/deploy/flower_patches.py gate_tracing on Flower's own SuperNode app: the tracing
    layer is behind the gate, the gate asks Flower's variable at each call."""
    monkeypatch.setattr(flower_supernode_app, "RuntimeTracingMiddleware", RuntimeTracingMiddleware)
    client_patches.gate_tracing()
    client_patches.gate_tracing()
    app = flower_supernode_app.create_app(state_factory=NodeStateFactory(objectstore_factory=ObjectStoreFactory()))
    gates = [m.cls for m in app.user_middleware if isinstance(m.cls, functools.partial)]
    assert len(gates) == 1 and gates[0].func is GatedMiddleware
    assert gates[0].keywords["layer"].cls is RuntimeTracingMiddleware
    acts = gates[0].keywords["acts"]
    monkeypatch.delenv(FLOWER_TRACING_VARIABLE, raising=False)
    assert not acts({"type": "http"})
    monkeypatch.setenv(FLOWER_TRACING_VARIABLE, "1")
    assert acts({"type": "http"})
    # A call through the whole app still gets Flower's answer (no token: refused, as without the gate).
    status, body = _post(app, "/v1/runtime/pull-object", b"", {})
    assert status == 401, (status, body[:200])
