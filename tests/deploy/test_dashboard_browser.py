"""The coordinator's dashboard in a real browser against a deployed run (issue 44): Debian's chromium,
headless, driven by Selenium through Debian's chromedriver (`make setup-system` installs both;
nothing is downloaded), watching `coordinator dashboard` while a real SuperLink (TLS, SuperNode
authentication, nginx; tests/helpers/deploy_fixtures.py) runs three joined sites: genomics under DP by its
own policy, every round under secure aggregation, hospital killed (SIGKILL of its `join` and
everything below it) as the last of three rounds opens. The page must show each as it happens, by
itself (its script polls): the sites online, the running run's rounds with their secure aggregation
and genomics' epsilon, hospital offline and left out of round 3 with its reason, the run completed with hospital
lost, the audit chain verified, the evaluation's reasons. Every wait polls the page for the state
it expects (no fixed sleep). The dashboard runs with an access token, carried by the page's URL.

DASHBOARD_SCREENSHOTS=DIR saves the page's screenshots there (docs/coordinator.md's come from it).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers.deploy_fixtures import REPO, SITES, Process, free_port, launch_args, round_events
from helpers.process_faults import Background, kill_hard
from helpers.supernode_log import SupernodeLog
from prometheus_client.parser import text_string_to_metric_families

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
# genomics joins with the sites' policy plus this (deploy_fixtures.joined): a DP site by its own policy.
# The run's secure rounds open groups of 2 holders: each site's own floor (secagg_min_holders,
# default 3, issue 40) lowered to that, as a consortium of three would.
_FLOOR = "secagg_min_holders: 2\n"
SITE_POLICY_EXTRA = {
    site: _FLOOR
    + (
        "dp:\n  mandatory: true\n  epsilon_cap: 50.0\n  delta: 1.0e-3\n  noise_multiplier: 1.0\n"
        if site == DP_SITE
        else ""
    )
    for site in SITES
}
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


def panel(driver: object, name: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.ID, name).text)  # type: ignore[attr-defined]
    except (NoSuchElementException, StaleElementReferenceException):  # swapped in while read
        return ""


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


def site_row(driver: object, site: str) -> str:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return str(driver.find_element(By.CSS_SELECTOR, f'#sites tr[data-site="{site}"]').text)  # type: ignore[attr-defined]
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def test_the_page_follows_a_deployed_run_as_it_happens(
    browser: object,
    dashboard: str,
    joined: dict[str, Process],
    federation: FederationPaths,
    tmp_path: Path,
) -> None:
    shots = Path(os.environ["DASHBOARD_SCREENSHOTS"]) if os.environ.get("DASHBOARD_SCREENSHOTS") else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    assert fetch(dashboard + "/", token=None)[0] == 401
    assert fetch(dashboard + "/", token="wrong-token-0123456789")[0] == 401
    browser.get(f"{dashboard}/?token={TOKEN}")  # type: ignore[attr-defined]
    shows(browser, "every site online", lambda: all(" online since " in site_row(browser, s) for s in SITES), None)

    out = tmp_path / "run"
    # hospital dies as the last round's first message reaches it (its SuperNode's log says so); the
    # server hears of it from the SuperLink, at once or within 2 heartbeats. Round 2, whole, is the
    # page's time to show the run running: a round without hospital can end within half a second
    # of the one before (seen on an idle machine, where a 2-round run never showed round 1).
    hospital_log = SupernodeLog(tmp_path / f"state-{KILLED}")
    killer = threading.Thread(target=kill_at_last_round, args=(hospital_log, joined[KILLED]), daemon=True)
    killer.start()
    run = Background(
        *launch_args(
            federation,
            out,
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

    shows(browser, "the run completed without hospital", ended, shots, "dashboard-completed.png")
    run.join(WAIT_S + 120)
    assert run.result is not None
    assert run.result.returncode == EXIT_SITE_LOST, (run.result.stdout, run.result.stderr)
    _, rounds = round_events(out)
    last = rounds[ROUNDS]["sites"][KILLED]
    assert last["status"] != "ok"
    runs = panel(browser, "runs")
    assert f"{last['status']}: {last['reason']}" in runs, runs
    assert "withheld: wearables" in runs  # one surviving holder of two in the last round
    assert "verified: " in panel(browser, "audit")
    epsilon = rounds[ROUNDS]["epsilon"][DP_SITE]
    assert f"{epsilon:.3f}" in panel(browser, "privacy")
    results = panel(browser, "results")
    assert f"federated evaluation after round {ROUNDS}" in results and "no reply from this site" in results
    if shots is not None:
        browser.execute_script("document.getElementById('privacy').scrollIntoView()")  # type: ignore[attr-defined]
        screenshot(browser, shots / "dashboard-privacy-results.png")

    status, text = fetch(dashboard + "/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    run_id = (("run_id", str(_run_id(out))),)
    assert samples[("healthfm_sites_online", ())] == 2
    assert samples[("healthfm_run_rounds_done", run_id)] == ROUNDS
    assert samples[("healthfm_site_epsilon", (("site", DP_SITE),))] == epsilon
    assert fetch(dashboard + "/", token=None)[0] == 401


def kill_at_last_round(log: SupernodeLog, site: Process) -> None:
    deadline = time.monotonic() + WAIT_S
    while not log.has(*[KEYS_RECEIVED] * ROUNDS) and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_hard(site)


def _run_id(out: Path) -> int:
    events, _ = round_events(out)
    return int(next(e["run_id"] for e in events if e["event"] == "setup"))
