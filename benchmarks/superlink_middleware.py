"""What Flower's SuperLink middleware costs a call: Flower's SuperLink app as Flower builds it,
against the same app with the layers that act on some calls only gated to those calls
(server/deploy/flower_patches.py `gate_middleware`, healthfm_core/middleware_gate.py).

Both apps are Flower's own (flwr.superlink.main.create_app: its in-memory state, routers and nine
middleware layers), in process (httpx's ASGI transport: no socket, no TLS, so what is left is the
Python work of a call), with one SuperNode registered. The calls, each signed by that node as its
SuperNode signs them (so node authentication verifies each signature):
- `pull-messages` with nothing to pull, a Fleet call of a few hundred bytes, as a SuperNode's
  pulls of small objects and its confirmations are;
- `push-object` of a `small` model's float16 chunk (2.3 MB) for a run the SuperLink does not
  have: the body passes every layer, then the handler refuses it (the same refusal in both).
The two apps alternate in rounds, so both see the same machine. Printed: ms a call, median over
rounds and the rounds' range.

    python benchmarks/superlink_middleware.py [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from base64 import b64encode
from pathlib import Path
from typing import Any

import flwr.superlink.main as flower_superlink_app
import httpx
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes, sign_message
from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.deploy.flower_patches import gate_middleware  # noqa: E402

CHUNK_BYTES = 2_344_121  # a `small` train message's float16 blob (docs/performance.md)


def make_app(gate: bool, public_key: bytes) -> tuple[Any, int]:
    """Flower's SuperLink app (gated or not) and the node id of the SuperNode holding `public_key`."""
    flowers = flower_superlink_app._get_middleware
    if gate:
        gate_middleware()  # what superlink_main applies, undone below for the other app
    try:
        app = flower_superlink_app.create_app()
    finally:
        flower_superlink_app._get_middleware = flowers
    node_id = app.state.linkstate_factory.state().create_node("bench", "site", public_key, heartbeat_interval=60.0)
    return app, node_id


def signed(private_key: Any, public_key: bytes) -> dict[str, str]:
    timestamp = now().isoformat()
    return {
        "content-type": PROTOBUF_MEDIA_TYPE,
        FLEET_HTTP_PUBLIC_KEY_HEADER: b64encode(public_key).decode("ascii"),
        TIMESTAMP_HEADER: timestamp,
        FLEET_HTTP_SIGNATURE_HEADER: b64encode(sign_message(private_key, timestamp.encode("ascii"))).decode("ascii"),
    }


async def per_call_ms(app: Any, path: str, body: bytes, headers: dict[str, str], calls: int) -> tuple[float, int]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://superlink") as client:
        status = 0
        for _ in range(max(3, calls // 10)):  # warm
            status = (await client.post(path, content=body, headers=headers)).status_code
        start = asyncio.get_running_loop().time()
        for _ in range(calls):
            await client.post(path, content=body, headers=headers)
        return (asyncio.get_running_loop().time() - start) / calls * 1e3, status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls of a kind an app makes in each round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    private_key, public = generate_key_pairs()
    public_key = public_key_to_bytes(public)
    apps = {"Flower's": make_app(False, public_key), "gated": make_app(True, public_key)}

    def call(kind: str, node_id: int) -> tuple[str, bytes]:
        if kind == "pull-messages":
            return "/v1/fleet/pull-messages", PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()
        body = PushObjectRequest(
            node=Node(node_id=node_id), run_id=1, object_id="0" * 64, object_content=b"x" * CHUNK_BYTES
        )
        return "/v1/fleet/push-object", body.SerializeToString()

    kinds = {"pull-messages": args.calls, "push-object 2.3 MB": max(10, args.calls // 10)}
    times: dict[tuple[str, str], list[float]] = {}
    statuses: dict[tuple[str, str], int] = {}
    for _ in range(args.rounds):
        for kind, calls in kinds.items():
            for name, (app, node_id) in apps.items():
                path, body = call(kind.split()[0], node_id)
                # One signature a round (Flower accepts it for minutes): the signing is the client's cost.
                ms, status = asyncio.run(per_call_ms(app, path, body, signed(private_key, public_key), calls))
                times.setdefault((kind, name), []).append(ms)
                statuses[(kind, name)] = status
    print(f"ms a call, Flower's SuperLink app in process, median of {args.rounds} rounds [range]")
    print(f"{'call':20s} {'as Flower builds it':>24s} {'gated':>24s} {'saved':>7s}  answer")
    for kind in kinds:
        cells, medians = [], []
        for name in apps:
            t = times[(kind, name)]
            medians.append(statistics.median(t))
            cells.append(f"{medians[-1]:6.2f} [{min(t):.2f}-{max(t):.2f}]")
        answers = "/".join(str(statuses[(kind, name)]) for name in apps)
        print(f"{kind:20s} {cells[0]:>24s} {cells[1]:>24s} {medians[0] - medians[1]:7.2f}  {answers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
