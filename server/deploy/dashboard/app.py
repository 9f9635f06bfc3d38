"""The dashboard's web app (Starlette, Jinja2 templates; the page's only script is static/live.js,
served from this package: no CDN, nothing fetched at run time).

    GET /                       the page: sites, runs, privacy, results, audit
    GET /panels                 the panels alone; live.js asks every POLL_S and swaps them in
    GET /plots/epsilon.svg      each DP site's cumulative epsilon
    GET /plots/forest-<id>.svg  run <id>'s AUROC forest plot
    GET /metrics                Prometheus's text format (metrics.py)

It never writes anything: GET and HEAD only, any other method is answered 405. With a token
(required by serve.py when bound beyond loopback) every request must carry it, as `Authorization:
Bearer TOKEN` or `?token=TOKEN`, compared in constant time; without, 401. Bound to loopback without
a token, only requests naming a loopback host are served (a web page elsewhere cannot reach it
through DNS rebinding). The view is read again when a watched file changes, and at least every
RECHECK_S (a ServerApp that died changes no file); the Control API is asked by a thread of its own
(nodes.py), never on a request's path: a frozen SuperLink slows no page.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.deploy.dashboard.files import RunFiles
from server.deploy.dashboard.metrics import metrics_text
from server.deploy.dashboard.nodes import NodesAnswer, NodesCache
from server.deploy.dashboard.plots import epsilon_svg, forest_svg
from server.deploy.dashboard.states import connection_state
from server.deploy.dashboard.view import RECHECK_S, FederationView, Launch, federation_view, watched_files

HERE = Path(__file__).parent
POLL_S = 2.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
HEADERS = {
    # Only this app's own script, styles and plots; no framing, no referrer (the token may be in the URL).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Snapshot:
    view: FederationView
    nodes: NodesAnswer
    version: str
    # When this version was first read: the panels are a function of the version (their ETag), so
    # two requests of one version get the same bytes whatever the clock says between them.
    since: str
    # The whole second the round in flight's durations are counted to (in the version while one is).
    now: float
    connection: dict[str, str]  # site -> its connection state (states.py)


class DashboardState:
    """The view, read again when the files change (or every RECHECK_S), with its plots."""

    def __init__(
        self,
        root: Path,
        launches: Callable[[], Sequence[Launch]],
        resume: Callable[[Path], str],
        nodes: Callable[[], NodesAnswer],
        releases: Sequence[Path] = (),
    ) -> None:
        self.root, self.launches, self.resume, self.nodes, self.releases = root, launches, resume, nodes, releases
        self.files = RunFiles()  # each run file parsed once per change
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._view: FederationView | None = None
        self._view_key: tuple[Any, ...] = ()
        self._view_text = ""
        self._plots: dict[str, bytes] = {}

    def fingerprint(self, launches: Sequence[Launch]) -> list[tuple[str, int, int]]:
        out = []
        for path in watched_files(self.root, launches, self.releases):
            try:
                st = path.stat()
                out.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(path), 0, -1))
        return out

    def snapshot(self) -> Snapshot:
        nodes = self.nodes()  # never waits on the SuperLink (nodes.py); outside the lock all the same
        with self._lock:
            problems = []
            try:
                launches = list(self.launches())
            except (OSError, ValueError) as err:  # launches.jsonl unreadable or a line that does not parse
                launches, problems = (
                    [],
                    [f"{self.root / 'server' / 'launches.jsonl'}: {' '.join(str(err).split())[:400]}"],
                )
            key = (self.fingerprint(launches), int(time.time() // RECHECK_S), tuple(problems))
            if self._view is None or key != self._view_key:
                self._view = federation_view(self.root, launches, self.resume, self.releases, problems, self.files)
                self._view_key = key
                # What changes the page besides its files: each run's status (a ServerApp gone).
                self._view_text = repr((key[0], [(r.launch, r.status, r.describe) for r in self._view.runs]))
            view = self._view
            now = float(int(time.time())) if any(r.live is not None for r in view.runs) else 0.0
            node_text = sorted((n, s.status, s.since) for n, s in nodes.nodes.items())
            digest = hashlib.sha256(repr((self._view_text, node_text, nodes.problem, now)).encode())
            version = digest.hexdigest()[:16]
            if self._snapshot is None or version != self._snapshot.version:
                if self._snapshot is None or self._snapshot.view is not view:
                    self._plots = {}
                since = time.strftime("%Y-%m-%d %H:%M:%S")
            else:
                since = self._snapshot.since
            connection = {
                site.name: connection_state(
                    site.registered,
                    nodes.answered,
                    state.status if (state := nodes.nodes.get(site.node_id)) is not None else None,
                )
                for site in view.sites
            }
            self._snapshot = Snapshot(view, nodes, version, since, now or time.time(), connection)
            return self._snapshot

    def plot(self, name: str, snap: Snapshot) -> bytes | None:
        with self._lock:
            if name in self._plots:
                return self._plots[name]
        data: bytes | None = None
        if name == "epsilon":
            data = epsilon_svg(snap.view.privacy)
        elif name.startswith("forest-") and name[len("forest-") :].isdigit():
            run_id = int(name[len("forest-") :])
            run = next((r for r in snap.view.runs if r.launch.run_id == run_id and r.evaluation), None)
            if run is not None and run.evaluation is not None and run.evaluation.points:
                title = f"run {run_id}: held-out AUROC after round {run.evaluation.round} (95% CI)"
                data = forest_svg(run.evaluation.points, title)
        if data is not None:
            with self._lock:
                self._plots[name] = data
        return data


def make_templates() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["seconds"] = lambda x: "-" if x is None else f"{x:.1f}"
    env.filters["bytes"] = lambda n: f"{int(n):,}"
    env.filters["clock"] = lambda t: time.strftime("%H:%M:%S", time.localtime(t))
    env.filters["duration"] = lambda s: f"{max(0, int(s))} s" if s < 120 else f"{int(s) // 60} min {int(s) % 60} s"
    env.filters["loss"] = lambda x: f"{x:.4f}"
    return env


def token_of(scope: Scope) -> str:
    """The token a request carries: `Authorization: Bearer TOKEN`, else `?token=`."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1")
            if text.lower().startswith("bearer "):
                return text[7:].strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("token", [""])[0]


class Guard:
    """GET and HEAD only (405 otherwise: the page never writes); the token when one is set (401
    without it, compared in constant time); without a token, loopback Host names only."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            response: Response = PlainTextResponse(
                "405: this page is read-only (GET only)\n", status_code=405, headers={"Allow": "GET, HEAD", **HEADERS}
            )
            await response(scope, receive, send)
            return
        if self.token is not None:
            given = token_of(scope).encode("utf-8")
            if not hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(self.token.encode()).digest()):
                response = PlainTextResponse(
                    "401: this dashboard needs its access token (Authorization: Bearer TOKEN, or ?token=TOKEN)\n",
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer", **HEADERS},
                )
                await response(scope, receive, send)
                return
        else:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
            if name not in LOOPBACK_HOSTS:
                response = PlainTextResponse(f"400: host {host!r} is not this machine's loopback\n", status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: DashboardState, token: str | None = None) -> ASGIApp:
    templates = make_templates()

    def context(request: Request, snap: Snapshot) -> dict[str, Any]:
        token = quote(request.query_params.get("token", ""), safe="")
        suffix = f"?v={snap.version}" + (f"&token={token}" if token else "")
        return {
            "auth": f"?token={token}" if token else "",
            "view": snap.view,
            "nodes": snap.nodes,
            "version": snap.version,
            "suffix": suffix,
            "poll_ms": int(POLL_S * 1000),
            "since": snap.since,
            "now": snap.now,
            "connection": snap.connection,
        }

    rendered: dict[tuple[str, str, str], str] = {}  # (template, version, token): its page
    lock = threading.Lock()

    def render(name: str, request: Request, snap: Snapshot) -> str:
        """A template's page, rendered once per version (the panels are a function of it) and token."""
        key = (name, snap.version, request.query_params.get("token", ""))
        with lock:
            if key in rendered:
                return rendered[key]
        html = templates.get_template(name).render(context(request, snap))
        with lock:
            if len(rendered) > 16:  # older versions
                rendered.clear()
            rendered[key] = html
        return html

    def page(request: Request) -> Response:
        return HTMLResponse(render("page.html", request, state.snapshot()), headers=HEADERS)

    def panels(request: Request) -> Response:
        snap = state.snapshot()
        return HTMLResponse(render("panels.html", request, snap), headers={**HEADERS, "ETag": f'"{snap.version}"'})

    def plot(request: Request) -> Response:
        name = str(request.path_params["name"])
        data = state.plot(name, state.snapshot())
        if data is None:
            return PlainTextResponse(f"404: no plot {name!r}\n", status_code=404, headers=HEADERS)
        return Response(data, media_type="image/svg+xml", headers=HEADERS)

    def metrics(request: Request) -> Response:
        snap = state.snapshot()
        return Response(
            metrics_text(snap.view, snap.nodes, snap.now),
            media_type="text/plain; version=0.0.4; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    def static(request: Request) -> Response:
        name = str(request.path_params["name"])
        kinds = {"live.js": "text/javascript", "page.css": "text/css"}
        if name not in kinds:
            return PlainTextResponse("404\n", status_code=404, headers=HEADERS)
        return Response((HERE / "static" / name).read_bytes(), media_type=kinds[name], headers=HEADERS)

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET", "HEAD"]),
            Route("/panels", panels, methods=["GET", "HEAD"]),
            Route("/plots/{name}.svg", plot, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET", "HEAD"]),
            Route("/static/{name}", static, methods=["GET", "HEAD"]),
        ]
    )
    return Guard(app, token)


def state_for(
    root: Path,
    launches: Callable[[], Sequence[Launch]],
    resume: Callable[[Path], str],
    nodes: NodesCache | Callable[[], NodesAnswer],
    releases: Sequence[Path] = (),
) -> DashboardState:
    return DashboardState(root, launches, resume, nodes.get if isinstance(nodes, NodesCache) else nodes, releases)
