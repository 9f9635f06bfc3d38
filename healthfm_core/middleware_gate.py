"""An ASGI middleware layer run only for the requests it acts on.

Flower 1.41's HTTP servers (the SuperLink's, a SuperNode's Runtime API) put Starlette
BaseHTTPMiddleware layers in front of every call. Such a layer costs its call whether it acts or
not: a task group, two memory streams, the request body passed through. On this project's 2-core
VM, skipping six of the SuperLink's nine saved 1.65 ms of a 4.5 ms call, about 0.3 ms of Python
under the GIL per layer and call (benchmarks/superlink_middleware.py).
Several of Flower's layers act on some paths or settings only and hand every other request on
untouched. `GatedMiddleware` asks the layer's own question of the request first and skips the
layer where the answer is no; which layers, and the question for each, are each side's patch
(server/deploy/flower_patches.py, client/deploy/flower_patches.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from starlette.datastructures import URL
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

# Flower's RuntimeTracingMiddleware reads this at every call and does nothing unless it is "1".
FLOWER_TRACING_VARIABLE = "FLWR_TRACING_ENABLED"


def request_path(scope: Scope) -> str:
    """The path Flower's middleware reads (`request.url.path`: starlette's URL of the scope)."""
    return URL(scope=scope).path


def flower_tracing_enabled(scope: Scope) -> bool:
    """Whether Flower's RuntimeTracingMiddleware acts on a call now (read per call, as it does)."""
    return os.getenv(FLOWER_TRACING_VARIABLE) == "1"


class GatedMiddleware:
    """The middleware `layer`, run for the HTTP requests `acts(scope)` says it acts on; every other
    request goes straight to the app under it (what the layer does with it, at none of its cost).
    Other scopes (lifespan) go through the layer, as without the gate."""

    def __init__(self, app: ASGIApp, *, layer: Middleware, acts: Callable[[Scope], bool]) -> None:
        self.app = app
        self.layer: ASGIApp = layer.cls(app, *layer.args, **layer.kwargs)
        self.acts = acts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.acts(scope):
            await self.app(scope, receive, send)
        else:
            await self.layer(scope, receive, send)
