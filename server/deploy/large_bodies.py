"""The SuperLink's memory under large request bodies (issue 67, break 4).

Flower 1.41's SuperLink reads a request's whole body before it checks who sent it: node
authentication compares the node id inside the body (flwr/supercore/protobuf/translation.py parses
it, flwr/superlink/routers/fleet/node_auth.py checks after). A forged 300 MB push-object was read
whole, and its memory kept after the answer: the exception Flower raises for a body it refuses
holds the frame that holds the body (traceback -> frame -> request -> body, a reference cycle),
freed only at the garbage collector's next full collection, and the body's pieces, read into the C
heap, stayed with the process even then (glibc keeps freed heap memory for reuse). Measured on a
SuperLink behind nginx: 144 -> 718 MB after one 300 MB body, kept; `gc.collect()` alone brought it
to 312 MB, with `malloc_trim(0)` after it to 144 MB.

So LargeBodyGuard stands in front of Flower's layers (plain ASGI: it reads no body itself):

- A Fleet call announcing a body over PREAUTH_BYTES (or none: chunked) is authenticated from its
  headers before a byte of its body is read: Flower's own check of the signed timestamp
  (node_auth.authenticate_node, given a stand-in ActivateNodeRequest that carries the header's key)
  and the key registered with this SuperLink; otherwise 401, Flower's answer to a failed node
  authentication. A registered site's public key is no secret (nginx lets its header through,
  server/deploy/proxy.py); its signature is. Flower's own check then runs on the body as before.
- A request whose body was larger than PREAUTH_BYTES and that ended in an error (a status of 400 or
  more, or an exception): once it is answered, the garbage collector runs and the C heap's free
  memory goes back to the system (healthfm_core/memory_release.py), so what a refused body took is returned.
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode

from fastapi import HTTPException
from flwr.proto.fleet_pb2 import ActivateNodeRequest
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER
from flwr.superlink.dependencies.linkstate import get_linkstate
from flwr.superlink.routers.fleet.node_auth import authenticate_node
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from healthfm_core import memory_release
from healthfm_core.middleware_gate import request_path
from server.deploy.body_limit import SMALL_BODY_BYTES

FLEET_PREFIX = "/v1/fleet/"
PREAUTH_BYTES = SMALL_BODY_BYTES  # every Fleet route but push-object carries less (nginx's own bound)
REFUSED = json.dumps({"detail": "Invalid SuperNode authentication"}).encode()  # node_auth.py's 401


def announced_length(scope: Scope) -> int | None:
    """The request's Content-Length (None: none, or not a number)."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def preauthenticate(scope: Scope) -> bool:
    """Whether the call's headers carry a valid signature of a key this SuperLink registered
    (Flower's check, without the body)."""
    request = Request({**scope, "state": {}})  # its own state: Flower's layers fill the real one
    try:
        public_key = b64decode(request.headers[FLEET_HTTP_PUBLIC_KEY_HEADER], validate=True)
    except (KeyError, ValueError, binascii.Error):
        return False
    request.state.protobuf_request = ActivateNodeRequest(public_key=public_key)
    try:
        authenticate_node(request)  # the signed timestamp, its age, the key it claims
    except HTTPException:
        return False
    return get_linkstate(request).get_node_id_by_public_key(public_key) is not None


class LargeBodyGuard:
    """ASGI middleware: large Fleet bodies only from an authenticated node, memory returned after
    a large request that failed (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = announced_length(scope)
        large = length is None or length > PREAUTH_BYTES
        if (
            large
            and request_path(scope).startswith(FLEET_PREFIX)
            and not await run_in_threadpool(preauthenticate, scope)
        ):
            await send(
                {"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": REFUSED})
            return
        received = 0
        status = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        failed = True
        try:
            await self.app(scope, counted, recorded)
            failed = status >= 400
        finally:
            if failed and received > PREAUTH_BYTES:
                memory_release.release_memory()


__all__ = ["PREAUTH_BYTES", "LargeBodyGuard", "announced_length", "preauthenticate"]
