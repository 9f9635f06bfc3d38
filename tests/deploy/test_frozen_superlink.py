"""A frozen SuperLink (its process stopped, SIGSTOP: its kernel still accepts connections, nothing
answers) is said so within each Control API call's own configured timeout, never the `flwr` CLI's
120 s: the page and /metrics within the dashboard's ASK_TIMEOUT_S, `coordinator status` (and a
`launch --wait`, which retries it) within FLWR_READ_TIMEOUT_S, and every site's state unknown,
never offline (issue 69). A real SuperLink behind nginx, two registered sites (none joined)."""

from __future__ import annotations

import inspect
import os
import signal
from collections.abc import Iterator

import pytest
from flwr.supercore.protobuf.client import ProtobufClient
from helpers.dashboard_fed import dashboard, samples
from helpers.deploy_fixtures import command, descendants, start_registered_superlink

from server.deploy.commands import main as coordinator_main
from server.deploy.dashboard.nodes import ASK_TIMEOUT_S, NodesCache, list_nodes
from server.deploy.flwr_control import (
    EXIT_UNREACHABLE,
    FLWR_READ_TIMEOUT_S,
    FLWR_TIMEOUT_S,
    SuperLinkUnreachable,
    run_status,
)
from server.deploy.provision import FederationPaths

pytestmark = pytest.mark.slow

SITE_NAMES = ("biobank", "hospital")


@pytest.fixture
def frozen(federation: FederationPaths) -> Iterator[FederationPaths]:
    """The federation's SuperLink started, seen answering, then stopped (SIGSTOP) until the test ends."""
    proc, _ = start_registered_superlink(federation, names=SITE_NAMES)
    try:
        link = [pid for pid in descendants(proc.proc.pid) if "server.deploy.superlink_main" in command(pid)]
        assert link, "no SuperLink process found below `coordinator superlink`"
        before = list_nodes(federation)
        assert before.answered, before.problem  # it answers before it is frozen
        assert len(before.nodes) == len(SITE_NAMES)
        for pid in link:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield federation
        finally:
            for pid in link:
                os.kill(pid, signal.SIGCONT)
        assert list_nodes(federation).answered  # and again once it runs
    finally:
        proc.stop()


def test_a_frozen_superlink_is_said_so_within_each_calls_configured_timeout(
    frozen: FederationPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    # The bounds held to: the page's ask within 2 s; the CLI's read before Flower's own client gives
    # up (its timeout, 30 s in flwr 1.41: after it the CLI says "unavailable", as for one that is down).
    flower_timeout = inspect.signature(ProtobufClient.__init__).parameters["timeout"].default
    assert ASK_TIMEOUT_S <= 2 and FLWR_READ_TIMEOUT_S < min(flower_timeout, FLWR_TIMEOUT_S)

    # The page's ask: ended by its own timeout, and said so with it.
    answer = list_nodes(frozen)
    assert not answer.answered and answer.nodes == {}
    assert f"Timeout: no answer within {ASK_TIMEOUT_S:g} s)" in answer.problem  # TLS or the request

    # The page and /metrics from the dashboard's own cache: the SuperLink down, every site unknown.
    page = dashboard(frozen, NodesCache(frozen).get)
    got = samples(page.get("/metrics").text)
    assert got[("healthfm_superlink_up", ())] == 0
    assert not [key for key in got if key[0] in ("healthfm_site_online", "healthfm_sites_online")]
    for site in SITE_NAMES:
        assert got[("healthfm_site_state", (("site", site), ("state", "unknown")))] == 1
        assert got[("healthfm_site_state", (("site", site), ("state", "offline")))] == 0
    assert "SuperLink not answering" in page.get("/").text

    # The coordinator's CLI reads: not answering after FLWR_READ_TIMEOUT_S (a wait retries that).
    with pytest.raises(SuperLinkUnreachable, match=rf"did not answer `flwr ls` within {FLWR_READ_TIMEOUT_S:g} s"):
        run_status(frozen, 1)
    assert coordinator_main(["status", str(frozen.root)]) == EXIT_UNREACHABLE
    assert f"within {FLWR_READ_TIMEOUT_S:g} s (frozen or overloaded?)" in capsys.readouterr().err
