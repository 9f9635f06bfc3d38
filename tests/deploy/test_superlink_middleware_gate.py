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
from flwr.proto.message_pb2 import PushObjectRequest
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
from healthfm_core import memory_release
from healthfm_core.middleware_gate import FLOWER_TRACING_VARIABLE, GatedMiddleware
from server.deploy import flower_patches, large_bodies
from server.deploy.flower_patches import MIDDLEWARE_ACTS
from server.deploy.large_bodies import PREAUTH_BYTES


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


# ---------------------------------------------------------------------------- large bodies (issue 67, break 4)


def _asgi_post(
    app: Any, path: str, body: bytes, headers: dict[str, str], piece: int = 64 * 1024
) -> tuple[int, bytes, int]:
    """POST `body` straight to the ASGI app in pieces, as uvicorn hands them on; the status, the
    answer and how many body bytes the app read."""
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)] or [b""]
    read = 0
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not pieces:
            return {"type": "http.disconnect"}
        chunk = pieces.pop(0)
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pieces)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    sent = {"content-type": PROTOBUF_MEDIA_TYPE, "content-length": str(len(body)), **headers}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in sent.items()],
        "client": ("127.0.0.1", 1),
        "server": ("superlink", 80),
    }
    asyncio.run(app(scope, receive, send))
    return out["status"], out["body"], read


@pytest.fixture
def guarded(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Any, Any, dict[str, Keys], tuple[dict[str, int], dict[str, int]], list[int]]:
    """Flower's app, and superlink_main's (gated and guarded), the same node registered in each;
    and a record of each release_memory call (the real one runs)."""
    monkeypatch.setattr(flower_superlink_app, "_get_middleware", flower_superlink_app._get_middleware)
    plain = flower_superlink_app.create_app()
    flower_patches.gate_middleware()
    flower_patches.guard_large_bodies()
    flower_patches.guard_large_bodies()  # twice: guarded once
    app = flower_superlink_app.create_app()
    nodes = {"biobank": Keys()}
    released: list[int] = []
    real = memory_release.release_memory

    def counted() -> None:
        released.append(1)
        real()

    monkeypatch.setattr(memory_release, "release_memory", counted)
    return plain, app, nodes, (_register(plain, nodes), _register(app, nodes)), released


def test_a_large_fleet_body_is_read_only_from_an_authenticated_registered_node(guarded: Any) -> None:
    """Flower read a push-object's whole body before checking its sender: three made-up headers, or
    a registered site's public key (no secret) with a forged signature, made the SuperLink hold 300 MB.
    LargeBodyGuard authenticates a body over PREAUTH_BYTES from the headers first: a forged, stale or
    unknown one is refused with Flower's 401 before a byte of the body is read; a rightly signed
    one reaches Flower, which answers as without the guard."""
    plain, app, nodes, (plain_ids, ids), released = guarded
    names = [m.cls.__name__ if isinstance(m.cls, type) else "?" for m in app.user_middleware]
    assert names[0] == "LargeBodyGuard" and names.count("LargeBodyGuard") == 1 and len(names) == 10
    biobank, outsider = nodes["biobank"], Keys()

    def push(node_id: int) -> bytes:
        content = b"\0" * (2 * 1024 * 1024)
        return PushObjectRequest(
            node=Node(node_id=node_id), run_id=1, object_id="0" * 64, object_content=content
        ).SerializeToString()

    request = push(ids["biobank"])
    assert len(request) > PREAUTH_BYTES
    forged_signature = {**biobank.headers(), FLEET_HTTP_SIGNATURE_HEADER: b64encode(b"\1" * 96).decode()}
    stale = biobank.headers(now() - datetime.timedelta(hours=1))
    for what, headers in {
        "no headers": {},
        "made-up headers": {
            FLEET_HTTP_PUBLIC_KEY_HEADER: "bWFkZS11cA==",
            FLEET_HTTP_SIGNATURE_HEADER: "c2ln",
            TIMESTAMP_HEADER: "x",
        },
        "a registered key, a forged signature": forged_signature,
        "a registered key, a stale signature": stale,
        "an unregistered key, signed": outsider.headers(),
    }.items():
        status, body, read = _asgi_post(app, "/v1/fleet/push-object", request, headers)
        print(f"{what}: {status}, {read} body bytes read")
        assert (status, read) == (401, 0), (what, status, body[:200])
        assert body == large_bodies.REFUSED
    assert released == []  # nothing was read, nothing to give back
    # Rightly signed: Flower reads it and answers as it does without the guard.
    status, body, read = _asgi_post(app, "/v1/fleet/push-object", request, biobank.headers())
    want = _post(plain, "/v1/fleet/push-object", push(plain_ids["biobank"]), biobank.headers())
    assert read == len(request) and status == want[0] != 401, (status, body[:200], want)
    # Small bodies are Flower's alone (its own node authentication reads and refuses them).
    small = PullMessagesRequest(node=Node(node_id=ids["biobank"])).SerializeToString()
    status, _, read = _asgi_post(app, "/v1/fleet/pull-messages", small, forged_signature)
    assert (status, read) == (401, len(small))


def test_a_large_body_that_fails_has_its_memory_given_back(guarded: Any) -> None:
    """A refused large body's memory stayed with the SuperLink: Flower's exception keeps the body in
    a reference cycle and glibc keeps freed heap. After a large request that failed, the guard
    collects and trims (release_memory); not after a small one or one that succeeded."""
    _, app, nodes, (_, ids), released = guarded
    garbage = b"\xff" * (3 * 1024 * 1024)  # no protobuf: Flower answers 400 after reading it all
    status, _, read = _asgi_post(app, "/v1/fleet/push-object", garbage, nodes["biobank"].headers())
    assert (status, read, released) == (400, len(garbage), [1])
    status, _, _ = _asgi_post(app, "/v1/fleet/push-object", garbage[:1000], nodes["biobank"].headers())
    assert status == 400 and released == [1]  # small: left to the collector
    pull = PullMessagesRequest(node=Node(node_id=ids["biobank"])).SerializeToString()
    assert _asgi_post(app, "/v1/fleet/pull-messages", pull, nodes["biobank"].headers())[0] == 200
    assert released == [1]
