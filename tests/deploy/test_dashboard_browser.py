"""The coordinator's dashboard in a real browser against deployed runs (issues 44 and 69): Debian's
chromium, headless, driven by Selenium through Debian's chromedriver (`make setup-system` installs
both; nothing is downloaded), watching `coordinator dashboard` while a real SuperLink (TLS, SuperNode
authentication, nginx; tests/helpers/deploy_fixtures.py) runs three joined sites: genomics under DP
by its own policy, which also requires secure aggregation (it refuses every plain round), and
`intruder` provisioned but never registered. The page must show each state as it happens, by
itself (its script polls):

  - intruder provisioned, not registered; the three sites online;
  - run 1, every round under secure aggregation: the round in flight (its phase, who it waits
    for), the rounds with their secure aggregation and genomics' epsilon; hospital killed
    (SIGKILL of its `join` and everything below it) as the last of three rounds opens: offline,
    *lost* in round 3 (never "rejected"), the run completed with hospital lost;
  - run 2, plain rounds, min-nodes 3: round 0 waiting for sites (2 of 3), until hospital joins
    again; genomics *refusing* each round (its policy), its privacy rounds still its ledger's and
    its epsilon its ledger's; each group's holders, the groups averaged from 1-2 sites, the losses;
    run 2 listed first and the sites' last round trained naming it, whatever Flower's run ids;
  - the audit chain's last record deleted: not verified; put back: verified;
  - the SuperLink frozen (SIGSTOP), then killed: the page and /metrics say it does not answer
    and every site's connection is unknown, none offline.

Every wait polls the page for the state it expects (no fixed sleep). The dashboard runs with an
access token, carried by the page's URL.

DASHBOARD_SCREENSHOTS=DIR saves the page's screenshots there (docs/coordinator.md's come from it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers.deploy_fixtures import (
    REPO,
    SITES,
    Process,
    command,
    descendants,
    free_port,
    launch_args,
    module_sites,
    round_events,
    start_registered_superlink,
)
from helpers.process_faults import Background, kill_hard, rejoin
from helpers.supernode_log import SupernodeLog
from prometheus_client.parser import text_string_to_metric_families

from healthfm_core.privacy.ledger import PrivacyLedger
from server.audit import AUDIT_FILE
from server.deploy.flwr_control import EXIT_SITE_LOST
from server.deploy.provision import FederationPaths
from simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DP_SITE, KILLED = "genomics", "hospital"
TOKEN = "browser-test-token-0123456789abcdef"
KEYS_RECEIVED = "Receiving: query.secagg_keys message"  # a secure round's first message at a site
ROUNDS = 3  # hospital is killed in the last
WAIT_S = 900  # only catches a hang: each wait ends as soon as the page shows its state
# genomics joins with the sites' policy plus this (deploy_fixtures.joined): a DP site by its own
# policy, which trains only in secure rounds (it refuses run 2's plain ones). The secure rounds open
# groups of 2 holders: each site's own floor (secagg_min_holders, default 3, issue 40) lowered to
# that, as a consortium of three would.
_FLOOR = "secagg_min_holders: 2\n"
DP_POLICY = (
    "require_secure_aggregation: true\n"
    "dp:\n  mandatory: true\n  epsilon_cap: 50.0\n  delta: 1.0e-3\n  noise_multiplier: 1.0\n"
)
SITE_POLICY_EXTRA = {site: _FLOOR + (DP_POLICY if site == DP_SITE else "") for site in SITES}
PLAIN_ROUNDS = 2  # run 2
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny scenario's three sites with every subject holding each modality its site has: a
    secure round needs a sample of every group a site holds (tiny's 30% wearables at hospital
    leaves it without one in some rounds, and it refuses them)."""
    scenario = yaml.safe_load((REPO / "configs" / "scenario" / "tiny.yaml").read_text())
    for site in scenario["sites"]:
        site["modalities"] = {m: 1.0 for m in site["modalities"]}
    manifest = generate_federation(tmp_path_factory.mktemp("data"), scenario, seed=0, n_subjects=30, progress=False)
    return {s.name: Path(s.root) for s in manifest.sites}


@pytest.fixture(scope="module")
def superlink_process(federation: FederationPaths, request: pytest.FixtureRequest) -> Iterator[tuple[Process, str]]:
    """deploy_fixtures' SuperLink, its process kept: the test freezes it, then kills it."""
    proc, address = start_registered_superlink(federation, names=module_sites(request))
    try:
        yield proc, address
    finally:
        for pid in superlink_pids(proc):
            try:
                os.kill(pid, signal.SIGCONT)  # a stopped process takes no SIGTERM
            except ProcessLookupError:
                pass
        proc.stop()


@pytest.fixture(scope="module")
def superlink(superlink_process: tuple[Process, str]) -> str:
    return superlink_process[1]


def superlink_pids(proc: Process) -> list[int]:
    """The SuperLink itself (server.deploy.superlink_main running flower-superlink) below `coordinator superlink`."""
    return [pid for pid in descendants(proc.proc.pid) if "server.deploy.superlink_main" in command(pid)]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).exists():
            pytest.fail(f"{program} not found: install Debian's chromium and chromium-driver (make setup-system)")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager never fetches a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(federation: FederationPaths, tmp_path: Path) -> Iterator[str]:
    """`coordinator dashboard FED` with an access token; its base URL."""
    token_file = tmp_path / "dashboard-token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    proc = Process(
        [sys.executable, "-m", "server.coordinator", "dashboard", str(federation.root), "--port", str(port)]
        + ["--token-file", str(token_file)],
        tmp_path / "dashboard.out",
    )
    try:
        assert proc.wait_for("dashboard of", 300), proc.output()[-3000:]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def fetch(url: str, token: str | None = TOKEN) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def read(driver: object, css: str, attribute: str = "") -> str:
    """The text, its blanks as single spaces (or `attribute`), of the first element `css` selects
    ("" when there is none), read by the page's own script: atomic with the panels' swap (live.js),
    never a stale element."""
    script = (
        "const e = document.querySelector(arguments[0]);"
        "return e === null ? '' : (arguments[1] ? (e.getAttribute(arguments[1]) || '') : e.innerText);"
    )
    text = str(driver.execute_script(script, css, attribute))  # type: ignore[attr-defined]
    return text if attribute else " ".join(text.split())  # cells and lines apart by one space


def panel(driver: object, name: str) -> str:
    return read(driver, f"#{name}")


def site_row(driver: object, site: str) -> str:
    return read(driver, f'#sites tr[data-site="{site}"]')


def attribute(driver: object, css: str, name: str) -> str:
    return read(driver, css, name)


def text_of(driver: object, css: str) -> str:
    return read(driver, css)


def shows(
    driver: object,
    what: str,
    check: Callable[[], bool],
    shots: Path | None,
    shot: str = "",
    run: Background | None = None,
) -> None:
    """Wait until the page (updating itself) passes `check`; a screenshot then, when asked. With
    `run`: a launch that has ended without the page showing it fails the test at once."""
    deadline = time.monotonic() + WAIT_S
    while not check():
        ended = run is not None and not run.thread.is_alive()
        assert not ended or check(), f"the run ended ({run.result}) before the page showed {what}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"the page never showed {what}:\n{panel(driver, 'panels')[:4000]}"
        time.sleep(0.5)
    if shots is not None and shot:
        screenshot(driver, shots / shot)


def screenshot(driver: object, path: Path) -> None:
    """Once every plot on the page has loaded (the panels were just swapped in)."""
    loaded = "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
    deadline = time.monotonic() + 60
    while not driver.execute_script(loaded) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]


def metrics(dashboard: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = fetch(dashboard + "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_page_follows_deployed_runs_as_they_happen(
    browser: object,
    dashboard: str,
    joined: dict[str, Process],
    superlink_process: tuple[Process, str],
    federation: FederationPaths,
    sites: dict[str, Path],
    tmp_path: Path,
) -> None:
    shots = Path(os.environ["DASHBOARD_SCREENSHOTS"]) if os.environ.get("DASHBOARD_SCREENSHOTS") else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    assert fetch(dashboard + "/", token=None)[0] == 401
    assert fetch(dashboard + "/", token="wrong-token-0123456789")[0] == 401
    browser.get(f"{dashboard}/?token={TOKEN}")  # type: ignore[attr-defined]
    shows(browser, "every site online", lambda: all(" online since " in site_row(browser, s) for s in SITES), None)
    # Provisioned (deploy_fixtures' federation), never registered: shown, as such.
    assert attribute(browser, '#sites tr[data-site="intruder"]', "data-connection") == "provisioned"
    assert "not registered yet" in site_row(browser, "intruder")

    # Run 1: secure aggregation; hospital killed as its last round opens.
    first = tmp_path / "run-1"
    hospital_log = SupernodeLog(tmp_path / f"state-{KILLED}")
    killer = threading.Thread(target=kill_at_last_round, args=(hospital_log, joined[KILLED]), daemon=True)
    killer.start()
    run = Background(
        *launch_args(
            federation,
            first,
            "-c",
            "secure-aggregation=true",
            "-c",
            "secagg-min-holders=2",
            # Keys made for one round at a time, so round 3 opens with its own keys message, the
            # moment hospital dies (by default round 1's exchange makes the later rounds' keys too).
            "-c",
            "secagg-key-rounds=1",
            "-c",
            "timeout-s=120",
            "-c",
            "min-nodes=2",
            rounds=ROUNDS,
            wait_s=WAIT_S,
        ),
        timeout=WAIT_S + 120,
    )

    def in_flight() -> bool:  # the round in flight, beyond round 0: its phase and who it waits for
        phase = attribute(browser, "#runs .live", "data-phase")
        return attribute(browser, "#runs .live", "data-live-round") not in ("", "0") and phase != ""

    shows(browser, "a round of run 1 in flight", in_flight, shots, run=run)
    live = text_of(browser, "#runs .live")
    assert f"of {ROUNDS} in flight" in live, live

    def round_on_page() -> bool:
        runs = panel(browser, "runs")
        return "running" in runs and any(f"Rounds: {rnd} of {ROUNDS} done" in runs for rnd in (1, 2))

    shows(browser, "round 1 or 2 of the running run", round_on_page, shots, run=run)
    runs = panel(browser, "runs")
    assert "unmasked: shared (biobank, genomics, hospital)" in runs, runs
    shows(
        browser, "genomics' epsilon", lambda: DP_SITE in panel(browser, "privacy"), shots, "dashboard-running.png", run
    )
    assert "yes" in site_row(browser, DP_SITE).split()[-1:] and "no" in site_row(browser, "biobank").split()[-1:]

    killer.join(WAIT_S)
    assert joined[KILLED].proc.poll() is not None, "hospital was not killed"
    # The SuperLink counts the node offline once its heartbeat expires; the page asks its Control API.
    shows(browser, "hospital offline", lambda: " offline" in site_row(browser, KILLED), shots)

    def ended() -> bool:
        runs = panel(browser, "runs")
        return f"completed {ROUNDS} of {ROUNDS} rounds; lost site(s): hospital" in runs

    shows(browser, "run 1 completed without hospital", ended, shots, "dashboard-completed.png")
    run.join(WAIT_S + 120)
    assert run.result is not None
    assert run.result.returncode == EXIT_SITE_LOST, (run.result.stdout, run.result.stderr)
    first_id = _run_id(first)
    _, rounds = round_events(first)
    last = rounds[ROUNDS]["sites"][KILLED]
    assert last["status"] != "ok"
    cell = f'#runs .run[data-run="{first_id}"] tr[data-round="{ROUNDS}"] td[data-site="{KILLED}"]'
    assert attribute(browser, cell, "data-state") == "lost", text_of(browser, cell)  # never "rejected"
    assert f"lost in run {first_id} round {ROUNDS}" in site_row(browser, KILLED)
    runs = panel(browser, "runs")
    assert f"{last['reason']}" in runs, runs
    assert "withheld: wearables" in runs  # one surviving holder of two in the last round
    assert "verified: " in panel(browser, "audit")
    results = panel(browser, "results")
    assert f"federated evaluation after round {ROUNDS}" in results and "no reply from this site" in results
    if shots is not None:
        browser.execute_script("document.getElementById('privacy').scrollIntoView()")  # type: ignore[attr-defined]
        screenshot(browser, shots / "dashboard-privacy-results.png")
    got = metrics(dashboard)
    assert got[("healthfm_sites_online", ())] == 2
    assert got[("healthfm_run_rounds_done", ())] == ROUNDS
    assert got[("healthfm_site_round_state", (("site", KILLED), ("state", "lost")))] == 1
    assert got[("healthfm_site_epsilon", (("site", DP_SITE),))] == rounds[ROUNDS]["epsilon"][DP_SITE]

    # Run 2: plain rounds, min-nodes 3 with hospital down: round 0 waits for it; genomics refuses.
    browser.execute_script("document.getElementById('runs').scrollIntoView()")  # type: ignore[attr-defined]
    second = tmp_path / "run-2"
    run = Background(
        *launch_args(
            federation, second, "-c", "min-nodes=3", "-c", "timeout-s=900", rounds=PLAIN_ROUNDS, wait_s=WAIT_S
        ),
        timeout=WAIT_S + 120,
    )

    def waiting_for_sites() -> bool:
        return attribute(browser, "#runs .live", "data-phase") == "waiting for sites"

    shows(browser, "run 2 waiting for min-nodes", waiting_for_sites, shots, "dashboard-waiting.png", run)
    live = text_of(browser, "#runs .live")
    assert "Round 0 (the setup) in flight" in live and "2 of min-nodes 3 connected" in live, live
    back = rejoin(federation, sites, KILLED, superlink_process[1], tmp_path / f"state-{KILLED}", tmp_path / "rejoin")
    try:
        shows(browser, "hospital online again", lambda: " online since " in site_row(browser, KILLED), None)

        def second_done() -> bool:
            return f"completed {PLAIN_ROUNDS} of {PLAIN_ROUNDS} rounds" in panel(browser, "runs")

        shows(browser, "run 2 completed", second_done, shots, "dashboard-plain.png")
        run.join(WAIT_S + 120)
    finally:
        back.stop()
    second_id = _run_id(second)
    _, plain = round_events(second)
    runs = panel(browser, "runs")
    assert runs.index(f"run {second_id} ") < runs.index(f"run {first_id} ")  # the newest launch first
    assert f"run {second_id}, round {PLAIN_ROUNDS}" in site_row(browser, "biobank")  # its last round trained
    row = f'#runs .run[data-run="{second_id}"] tr[data-round="{PLAIN_ROUNDS}"]'
    assert attribute(browser, f'{row} td[data-site="{DP_SITE}"]', "data-state") == "refusing"
    assert "require_secure_aggregation" in text_of(browser, f'{row} td[data-site="{DP_SITE}"]')
    assert f"refusing in run {second_id} round {PLAIN_ROUNDS}" in site_row(browser, DP_SITE)
    holders = text_of(browser, f"{row} td.holders")
    for group, who in plain[PLAIN_ROUNDS]["contributors"].items():
        assert f"{group}: {', '.join(who)}" in holders, holders
    assert "genomics averaged from 1 site" in holders, holders  # biobank's alone: genomics refused
    losses = text_of(browser, f"{row} td.losses")
    assert f"total {plain[PLAIN_ROUNDS]['losses']['total']:.4f}" in losses, losses
    # The privacy rounds are the ledger's: refused rounds spent nothing.
    [ledger_file] = (tmp_path / f"state-{DP_SITE}").rglob("privacy_ledger.json")  # where `join` keeps it
    ledger = PrivacyLedger(ledger_file.parent)
    privacy = text_of(browser, f'#privacy tr[data-site="{DP_SITE}"]')
    assert f"{ledger.epsilon(1e-3):.3f} / 50" in privacy, privacy
    assert text_of(browser, f'#privacy tr[data-site="{DP_SITE}"] td.dp-rounds') == str(len(ledger.data.rounds))
    assert text_of(browser, f'#privacy tr[data-site="{DP_SITE}"] td.noise') == "1.0"
    assert text_of(browser, f'#privacy tr[data-site="{DP_SITE}"] td.refused').startswith(f"{PLAIN_ROUNDS} (last: ")

    # The audit chain's tail: its last record deleted, then put back.
    log = second / AUDIT_FILE
    kept = log.read_bytes()
    chain = f'#audit tr[data-run="{second_id}"] td.chain'
    log.write_bytes(b"".join(kept.splitlines(keepends=True)[:-1]))
    try:
        shows(browser, "the cut audit log not verified", lambda: "broken" in text_of(browser, chain), shots)
        assert "its tail was cut or edited" in text_of(browser, chain)
        assert metrics(dashboard)[("healthfm_audit_chain_ok", ())] == 0
    finally:
        log.write_bytes(kept)
    shows(browser, "the audit log verified again", lambda: text_of(browser, chain).startswith("verified"), None)

    # The SuperLink frozen, then killed: unknown on the page and in /metrics, never offline.
    link = superlink_pids(superlink_process[0])
    assert link, "no SuperLink process found"
    for pid in link:
        os.kill(pid, signal.SIGSTOP)
    try:
        unknown_everywhere(browser, dashboard, "the frozen SuperLink")
    finally:
        for pid in link:
            os.kill(pid, signal.SIGCONT)
    shows(browser, "the SuperLink answering again", lambda: "not answering" not in panel(browser, "panels"), None)
    for pid in link:
        os.kill(pid, signal.SIGKILL)
    unknown_everywhere(browser, dashboard, "the killed SuperLink")
    assert fetch(dashboard + "/", token=None)[0] == 401


def unknown_everywhere(browser: object, dashboard: str, what: str) -> None:
    """The page and /metrics say the SuperLink does not answer, every site's connection unknown."""
    shows(browser, f"{what} not answering", lambda: "SuperLink not answering" in panel(browser, "panels"), None)
    shows(
        browser,
        f"every site unknown with {what}",
        lambda: all(attribute(browser, f'#sites tr[data-site="{s}"]', "data-connection") == "unknown" for s in SITES),
        None,
    )
    started = time.monotonic()
    got = metrics(dashboard)
    status, page = fetch(dashboard + "/")
    print(f"{what}: /metrics and the page answered in {time.monotonic() - started:.2f} s")  # a figure, not a bound
    assert status == 200 and "SuperLink not answering" in page
    assert got[("healthfm_superlink_up", ())] == 0
    assert not [key for key in got if key[0] in ("healthfm_site_online", "healthfm_sites_online")]
    for site in SITES:
        assert got[("healthfm_site_state", (("site", site), ("state", "unknown")))] == 1


def kill_at_last_round(log: SupernodeLog, site: Process) -> None:
    deadline = time.monotonic() + WAIT_S
    while not log.has(*[KEYS_RECEIVED] * ROUNDS) and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_hard(site)


def _run_id(out: Path) -> int:
    events, _ = round_events(out)
    return int(next(e["run_id"] for e in events if e["event"] == "setup"))
