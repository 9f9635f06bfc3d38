"""A federation folder for the dashboard's fast tests (tests/deploy/test_dashboard*.py): provisioned,
its registry written by the coordinator's own writer, and runs launched from it as the coordinator
records them (launches.jsonl), their out-dirs holding the run tests/dashboard_record.py recorded
(tests/data/dashboard_run/: three sites, genomics under DP, secure aggregation, hospital killed
after round 1, a federated evaluation); and the page served in this process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from server.deploy.commands import LaunchRecord, _record_launch, read_launches, resume_command
from server.deploy.dashboard.app import create_app, state_for
from server.deploy.dashboard.nodes import NodesAnswer, NodeState, utc_text
from server.deploy.dashboard.view import Launch
from server.deploy.provision import FederationPaths, ProvisionConfig, provision
from server.deploy.registry import RegisteredSite, SiteRegistry, registry_path, write_registry

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "tests" / "data" / "dashboard_run"
NODES = {"biobank": 100, "hospital": 101, "genomics": 102}  # as tests/dashboard_record.py ran them


def provisioned(root: Path, sites: Mapping[str, int] = NODES, register: bool = True) -> FederationPaths:
    """FED provisioned with `sites`, registered with their node ids unless not `register`."""
    paths = provision(ProvisionConfig(federation_dir=root, sites=sorted(sites))).paths
    if register:
        registered = [
            RegisteredSite(name=n, public_key=paths.registered_public_key(n).read_text().strip(), node_id=i)
            for n, i in sorted(sites.items())
        ]
        write_registry(registry_path(paths), SiteRegistry(sites=registered))
    return paths


def recorded_events() -> list[dict[str, Any]]:
    return [json.loads(x) for x in (RECORDED / "rounds.jsonl").read_text().splitlines() if x.strip()]


def launch_recorded(
    paths: FederationPaths,
    run_id: int,
    out: Path,
    edit: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda e: e,
    launched_at: str = "",
) -> Path:
    """The recorded run copied into `out` as run `run_id` (its events through `edit`; None drops
    one), and its launch recorded after those before it."""
    out.mkdir(parents=True)
    for f in RECORDED.iterdir():
        shutil.copyfile(f, out / f.name)
    events = []
    for event in recorded_events():
        edited = edit({**event, "run_id": run_id} if event["event"] in ("setup", "resume") else event)
        if edited is not None:
            events.append(json.dumps(edited))
    (out / "rounds.jsonl").write_text("\n".join(events) + "\n")
    outcome = json.loads((out / "outcome.json").read_text())
    (out / "outcome.json").write_text(json.dumps({**outcome, "run_id": run_id}))
    record = LaunchRecord(run_id=run_id, out_dir=str(out), run_config={"rounds": 2}, launched_at=launched_at)
    _record_launch(paths, record)
    return out


def online(*up: str, sites: Mapping[str, int] = NODES) -> NodesAnswer:
    return NodesAnswer(
        {
            i: NodeState("online" if n in up else "offline", utc_text("2026-11-25T13:00:00.5+00:00"), 0.0)
            for n, i in sites.items()
        },
        asked_at=1.0,
    )


def dashboard(
    paths: FederationPaths, nodes: NodesAnswer | Callable[[], NodesAnswer] | None = None, token: str | None = None
) -> TestClient:
    """The dashboard's app over `paths`, the Control API's answer `nodes` (or what asks it)."""

    def launches() -> list[Launch]:
        return [Launch(r.run_id, Path(r.out_dir), r.launched_at, r.resumed) for r in read_launches(paths)]

    answer = nodes if nodes is not None else online("biobank", "genomics")
    ask = answer if callable(answer) else (lambda: answer)
    state = state_for(paths.root, launches, lambda out: resume_command(paths, out), ask)
    return TestClient(create_app(state, token), base_url="http://127.0.0.1:8765")


def section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}">')
    return html[start : html.index("</section>", start)]


def row(html: str, attribute: str, value: str) -> str:
    start = html.index(f'<tr {attribute}="{value}"')
    return html[start : html.index("</tr>", start)]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics' samples by (name, sorted labels), through prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
