"""The coordinator's dashboard (server/deploy/dashboard/) on recorded files: a provisioned federation,
its registry and launches written by the coordinator's own writers, and a run the real server
recorded (tests/dashboard_record.py: three sites, one under DP, secure aggregation with a group
withheld, a site killed after round 1, a federated evaluation) copied from tests/data/dashboard_run/.
Each panel's content, /metrics through prometheus_client's parser, the token, GET only, nothing
written. The page in a real browser against a deployed run: tests/deploy/test_dashboard_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.dashboard_fed import RECORDED, dashboard, launch_recorded, provisioned, row, samples, section
from starlette.testclient import TestClient

from server.audit import AUDIT_FILE
from server.deploy.commands import LaunchRecord, _record_launch, main, read_launches
from server.deploy.dashboard.nodes import NodesAnswer, list_nodes
from server.deploy.dashboard.plots import epsilon_svg
from server.deploy.dashboard.serve import check_address, read_token
from server.deploy.dashboard.view import Launch, privacy_views
from server.deploy.flwr_control import EXIT_USAGE, CoordinatorError, write_connection
from server.deploy.provision import FederationPaths
from server.outcome import RunOutcome, write_outcome

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-dashboard-token-0123456789"


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    root = tmp_path_factory.mktemp("dash") / "fed"
    paths = provisioned(root)
    launch_recorded(paths, 7, root.parent / "runs" / "fed1", launched_at="T7")
    # A second run whose ServerApp died without a word: its outcome still says running, its claim
    # names a process that is gone (a `launch` process that claimed the out-dir and exited).
    dead = root.parent / "runs" / "fed2"
    dead.mkdir()
    write_outcome(dead, RunOutcome(run_id=8, status="running", rounds_done=1, rounds=5, started_at=1.0))
    claim = (
        "from pathlib import Path; from server.run_claim import claim_for_launch, set_run_id; "
        f"h, _ = claim_for_launch(Path({str(dead)!r}), lambda r: None); set_run_id(Path({str(dead)!r}), h, 8)"
    )
    subprocess.run([sys.executable, "-c", claim], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})
    _record_launch(paths, LaunchRecord(run_id=8, out_dir=str(dead), run_config={"rounds": 5}, launched_at="T8"))
    return paths


def client(paths: FederationPaths, token: str | None = None, nodes: NodesAnswer | None = None) -> TestClient:
    return dashboard(paths, nodes, token)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*")) if p.is_file()}


def test_each_panel_shows_what_the_run_recorded(fed: FederationPaths) -> None:
    html = client(fed).get("/").text
    sites = section(html, "sites")
    biobank, hospital, genomics = (row(sites, "data-site", n) for n in ("biobank", "hospital", "genomics"))
    assert "online" in biobank and "ehr, wearables, genomics" in biobank
    assert "offline" in hospital and "last seen 2026-11-25 13:00:00 UTC" in hospital
    assert "run 7, round 2" in biobank and "run 7, round 1" in hospital  # the killed site's last round
    assert re.search(r'class="dp">yes<', genomics) and re.search(r'class="dp">no<', biobank)
    assert "ran the bundle of run 7" in genomics

    runs = section(html, "runs")
    assert 'data-run="7"' in runs and "completed 2 of 2 rounds; lost site(s): hospital" in runs
    second = row(runs, "data-round", "2")
    cell = second[second.index('data-site="hospital"') :]
    assert "lost</span> (no reply): keys: no reply within timeout-s 30 s" in cell
    assert "withheld: " in second and "wearables</span> (1 surviving holder(s) &lt; min_holders 2" in second
    assert "unmasked: " in row(runs, "data-round", "1") and "withheld: none" in row(runs, "data-round", "1")
    # The run whose ServerApp is gone: interrupted, with the command that resumes it.
    fed2 = runs[runs.index('data-run="8"') :]
    assert 'class="status-interrupted">interrupted' in fed2 and "is gone" in fed2
    assert f"resume {fed.root} --out-dir {fed.root.parent / 'runs' / 'fed2'}" in fed2

    privacy = section(html, "privacy")
    events = [json.loads(x) for x in (RECORDED / "rounds.jsonl").read_text().splitlines()]
    spent = [e["sites"]["genomics"]["dp"]["epsilon"] for e in events if e["event"] == "round"]
    # The cap the DP site's policy sets (tests/dashboard_record.py's 40), as its replies reported it.
    [cap] = {e["sites"]["genomics"]["dp"]["epsilon_cap"] for e in events if e["event"] == "round"}
    assert cap == 40.0
    assert f'class="num epsilon">{spent[-1]:.3f} / <span class="cap">40<' in row(privacy, "data-site", "genomics")
    assert "biobank" not in privacy  # no DP there
    svg = client(fed).get("/plots/epsilon.svg")
    assert svg.status_code == 200 and svg.text.lstrip().startswith("<?xml") and "genomics" in svg.text
    assert "genomics's cap (40)" in svg.text
    # The cap's line: dashed, in the colour of the site's curve (the first site's, C0).
    assert re.search(r"stroke-dasharray: [\d.,]+; stroke-dashoffset: [\d.]+; stroke: #1f77b4", svg.text)

    results = section(html, "results")
    evaluation = json.loads((RECORDED / "evaluation.json").read_text())
    pooled = evaluation["federation"]["onset_hypertension_365d"]
    assert f"{pooled['auroc']:.3f} [{pooled['low']:.3f}, {pooled['high']:.3f}] over 2 site(s)" in results
    assert "no reply from this site: no usable evaluation reply" in row(results, "data-site", "hospital")
    assert re.search(r"AUROC \d\.\d+ \[\d\.\d+, \d\.\d+\]", row(results, "data-site", "biobank"))
    forest = client(fed).get("/plots/forest-7.svg")
    assert forest.status_code == 200 and "onset_hypertension_365d" in forest.text
    assert client(fed).get("/plots/forest-99.svg").status_code == 404

    audit = section(html, "audit")
    records = len((RECORDED / AUDIT_FILE).read_text().splitlines())
    assert f"verified</span>: {records} records" in row(audit, "data-run", "7")
    assert "the last one its anchor's" in row(audit, "data-run", "7")


def test_a_broken_audit_chain_is_shown_where_it_breaks(fed: FederationPaths, tmp_path: Path) -> None:
    run = Path(read_launches(fed)[0].out_dir)
    original = (run / AUDIT_FILE).read_bytes()
    lines = original.splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"status": "ok"', b'"status": "no reply"')
    try:
        (run / AUDIT_FILE).write_bytes(b"".join(lines))
        audit = section(client(fed).get("/").text, "audit")
        assert "broken</span> after 4 good records" in audit and "line 5: field prev_sha256" in audit
        assert "healthfm_audit_logs_unverified 1.0" in client(fed).get("/metrics").text
    finally:
        (run / AUDIT_FILE).write_bytes(original)


def test_metrics_parse_with_prometheus_client(fed: FederationPaths, tmp_path: Path) -> None:
    # The newest launch is the current run: run 8, whose ServerApp died after round 1.
    got = samples(client(fed).get("/metrics").text)
    assert got[("healthfm_run_info", (("run_id", "8"), ("status", "interrupted")))] == 1
    assert (
        got[("healthfm_runs", (("status", "interrupted"),))] == 1
        and got[("healthfm_runs", (("status", "completed"),))] == 1
    )
    assert got[("healthfm_run_rounds_done", ())] == 1 and got[("healthfm_run_rounds_planned", ())] == 5

    # A federation whose current run is the recorded one.
    paths = provisioned(tmp_path / "fed")
    launch_recorded(paths, 7, tmp_path / "run")
    response = client(paths).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    events = [json.loads(x) for x in (RECORDED / "rounds.jsonl").read_text().splitlines()]
    rounds = [e for e in events if e["event"] == "round"]
    assert got[("healthfm_run_rounds_done", ())] == 2
    assert got[("healthfm_sites_online", ())] == 2 and got[("healthfm_site_online", (("site", "hospital"),))] == 0
    assert got[("healthfm_site_state", (("site", "hospital"), ("state", "offline")))] == 1
    assert got[("healthfm_round_seconds", (("phase", "round"),))] == rounds[-1]["timings"]["round_seconds"]
    assert got[("healthfm_bytes_sent_total", ())] == sum(e["bytes_sent"] for e in rounds)
    assert got[("healthfm_bytes_received_total", ())] == sum(e["bytes_received"] for e in rounds)
    assert got[("healthfm_replies_rejected_total", ())] == 0  # hospital was lost, not rejected
    assert got[("healthfm_site_round_state", (("site", "hospital"), ("state", "lost")))] == 1
    assert got[("healthfm_site_rounds_total", (("site", "hospital"), ("state", "ok")))] == 1
    assert got[("healthfm_site_epsilon", (("site", "genomics"),))] == rounds[-1]["epsilon"]["genomics"]
    assert got[("healthfm_site_epsilon_cap", (("site", "genomics"),))] == 40.0
    assert got[("healthfm_site_dp_rounds", (("site", "genomics"),))] == 2
    assert not any(name == "healthfm_site_epsilon_cap" and labels != (("site", "genomics"),) for name, labels in got)
    assert got[("healthfm_audit_chain_ok", ())] == 1


def test_a_site_that_reports_no_cap_is_drawn_without_one(tmp_path: Path) -> None:
    """Replies of sites older than dp.epsilon-cap: the spend still shows, the cap says so, no gauge."""
    lines = []
    for line in (RECORDED / "rounds.jsonl").read_text().splitlines():
        event = json.loads(line)
        for entry in (event.get("sites") or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("dp"), dict):
                entry["dp"].pop("epsilon_cap", None)
        lines.append(json.dumps(event))
    (tmp_path / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    [view] = privacy_views([Launch(7, tmp_path)])
    assert view.site == "genomics" and view.points and view.epsilon_cap is None
    assert "cap (" not in epsilon_svg([view]).decode()


def test_the_token_is_required_and_only_get_is_answered(fed: FederationPaths) -> None:
    before = tree(fed.root.parent)
    guarded = client(fed, token=TOKEN)
    for path in ("/", "/panels", "/metrics", "/plots/epsilon.svg", "/static/live.js"):
        assert guarded.get(path).status_code == 401, path
        assert guarded.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
        assert guarded.get(path, params={"token": TOKEN[:5]}).status_code == 401
    assert guarded.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    page = guarded.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and "plots/epsilon.svg?v=" in page.text and f"token={TOKEN}" in page.text
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        for c in (guarded, client(fed)):
            answer = c.request(method, "/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD", method
    # Without a token, only a loopback Host is served (DNS rebinding).
    assert client(fed).get("/", headers={"Host": "evil.example:8765"}).status_code == 400
    assert tree(fed.root.parent) == before  # nothing written


def test_the_panels_change_when_a_round_is_recorded(fed: FederationPaths, tmp_path: Path) -> None:
    c = client(fed)
    first = c.get("/panels")
    version = re.search(r'data-version="(\w+)"', first.text)
    assert version and c.get("/panels").text == first.text
    run = Path(read_launches(fed)[1].out_dir)
    write_outcome(run, RunOutcome(run_id=8, status="failed", reason="a test", rounds_done=1, rounds=5, started_at=1.0))
    try:
        again = c.get("/panels").text
        assert version.group(1) not in again and "failed after 1 of 5 rounds: a test" in again
    finally:
        write_outcome(run, RunOutcome(run_id=8, status="running", rounds_done=1, rounds=5, started_at=1.0))


def test_a_superlink_that_does_not_answer_is_said_not_every_site_offline(fed: FederationPaths, tmp_path: Path) -> None:
    paths = FederationPaths(root=tmp_path)
    (tmp_path / "server").mkdir()
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    write_connection(paths, f"127.0.0.1:{port}", insecure=True)
    answer = list_nodes(paths, timeout=5)
    assert answer.nodes == {} and f"127.0.0.1:{port} did not answer (ConnectError" in answer.problem
    sites = section(client(fed, nodes=answer).get("/").text, "sites")
    assert "unknown" in row(sites, "data-site", "biobank") and ">online<" not in row(sites, "data-site", "biobank")
    assert "healthfm_superlink_up 0.0" in client(fed, nodes=answer).get("/metrics").text


def test_beyond_loopback_it_needs_a_token_and_never_the_sites_port(
    fed: FederationPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HEALTHFM_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(
        CoordinatorError, match="--host 0.0.0.0: beyond this machine the dashboard needs an access token"
    ):
        check_address(fed, "0.0.0.0", 8765, None)
    check_address(fed, "0.0.0.0", 8765, TOKEN)
    check_address(fed, "::1", 8765, None)
    with pytest.raises(CoordinatorError, match="--port 9093: that is the sites'"):
        check_address(fed, "127.0.0.1", 9093, None)
    (fed.server_dir / "nginx.conf").write_text("server {\n        listen 0.0.0.0:9443 ssl;\n}\n")
    try:
        with pytest.raises(CoordinatorError, match="--port 9443"):
            check_address(fed, "127.0.0.1", 9443, None)
    finally:
        (fed.server_dir / "nginx.conf").unlink()
    short = tmp_path / "token"
    short.write_text("abc\n")
    with pytest.raises(CoordinatorError, match=f"--token-file {short}: the token has 3 characters"):
        read_token(str(short))
    short.write_text(TOKEN + "\n")
    assert read_token(str(short)) == TOKEN
    # Through the command line: refused before anything listens.
    assert main(["dashboard", str(fed.root), "--host", "0.0.0.0"]) == EXIT_USAGE
    assert main(["dashboard", str(fed.root), "--port", "9093"]) == EXIT_USAGE


def test_a_file_that_does_not_parse_is_named_on_the_page(fed: FederationPaths) -> None:
    launches = fed.server_dir / "launches.jsonl"
    run = Path(read_launches(fed)[0].out_dir)
    kept = launches.read_bytes(), (run / "evaluation.json").read_bytes()
    try:
        launches.write_bytes(kept[0] + b'{"run_id": "nine"}\n')
        page = client(fed).get("/")
        assert page.status_code == 200 and f'class="problem">{launches}: ' in page.text and "run_id" in page.text
        launches.write_bytes(kept[0])
        (run / "evaluation.json").write_text(
            '{"round": 2, "sites": {"biobank": {"onset_hypertension_365d.n": "many"}}}'
        )
        runs = section(client(fed).get("/").text, "runs")
        assert f"{run / 'evaluation.json'}: not an evaluation" in runs
    finally:
        launches.write_bytes(kept[0])
        (run / "evaluation.json").write_bytes(kept[1])


def test_the_bundles_built_are_listed_with_their_sha256(fed: FederationPaths) -> None:
    bundle = fed.server_dir / "healthfm-federation.0123abcd.fab"
    bundle.write_bytes(b"not a real bundle: only its hash is read")
    try:
        sites = section(client(fed).get("/").text, "sites")
        digest = __import__("hashlib").sha256(bundle.read_bytes()).hexdigest()
        assert f'<code>{bundle.name}</code> sha256 <code class="bundle">{digest}</code>' in sites
    finally:
        bundle.unlink()
