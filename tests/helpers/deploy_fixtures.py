"""Real Flower processes on 127.0.0.1 for the deployment and fault tests (tests/deploy/test_deployment.py,
tests/deploy/test_faults.py): a provisioned federation, a SuperLink with TLS + SuperNode authentication,
SuperNodes started with `client.py join`, and helpers to run the coordinator and read a run's log.

The SuperLink listens on 127.0.0.1 only and sites reach its Fleet API through the nginx proxy that
`coordinator superlink` starts on the public port (server/deploy/proxy.py). Every site runs only app
bundles its policy approved (client/deploy/app_guard.py): the `superlink` fixture builds the federation's
bundle (`coordinator bundle`) and approves it (`client.py approve`) in the sites' policy file
(`site_policy(federation)`), which `join_args` passes.

Every process runs in its own session and is killed (SIGTERM, then SIGKILL, its whole group) in
the fixtures' teardown, whatever the test did. Module-scoped fixtures: each test module that
imports them gets its own federation and SuperLink.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.deploy.join import probe_superlink
from server.deploy.commands import main as coordinator_main
from server.deploy.provision import FederationPaths

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client" / "client.py"
SITES = ("biobank", "hospital", "genomics")
EXPECTED_GROUPS = {
    "biobank": ["ehr", "genomics", "shared", "wearables"],
    "hospital": ["ehr", "shared", "wearables"],  # no genomics
    "genomics": ["ehr", "genomics", "shared"],  # no wearables
}
POLICY = ["--node-config", "min-code-subjects=5", "--node-config", "min-report-subjects=2"]


def env() -> dict[str, str]:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    # The Flower processes (flwr-serverapp, flwr-clientapp) import this checkout, not whichever
    # one the environment has installed (an editable install may point at another worktree).
    e["PYTHONPATH"] = str(REPO)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A background process in its own session, output to a file, killed with its group."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                return text in self.output()
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self._log.close()


def run_client(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CLIENT), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
    )


def run_coordinator(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.coordinator", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from simulations.synthetic import generate_federation

    manifest = generate_federation(
        tmp_path_factory.mktemp("data"), scenario="tiny", seed=0, n_subjects=30, progress=False
    )
    roots = {s.name: Path(s.root) for s in manifest.sites}
    assert set(roots) == set(SITES)
    return roots


def module_sites(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The sites the fixtures provision, register and join: the test module's SITE_NAMES (a module
    with other sites also overrides the `sites` fixture), else SITES."""
    return tuple(getattr(request.module, "SITE_NAMES", SITES))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> FederationPaths:
    root = tmp_path_factory.mktemp("deploy") / "fed"
    names = (*module_sites(request), "intruder")
    rc = coordinator_main(["provision", str(root), *[a for s in names for a in ("--site", s)]])
    assert rc == 0
    return FederationPaths(root=root)


def start_superlink(federation: FederationPaths, *options: str, out: Path | None = None) -> tuple[Process, str]:
    """`coordinator superlink FED OPTIONS` (TLS, SuperNode authentication, nginx) on a free port of
    127.0.0.1, once it says it is ready; the process and the proxy's address."""
    port = free_port()
    proc = Process(
        [sys.executable, "-m", "server.coordinator", "superlink", str(federation.root), "--port", str(port), *options]
        + ["--parent-pid", str(os.getpid())],  # gone with this process, even when it is killed
        out or federation.root / "superlink.out",
    )
    try:
        assert proc.wait_for("SuperLink ready", 600), proc.output()[-3000:]
        address = f"127.0.0.1:{port}"
        probe_superlink(address, federation.ca_cert, timeout=10)
    except BaseException:
        proc.stop()
        raise
    return proc, address


def start_registered_superlink(
    federation: FederationPaths, *options: str, out: Path | None = None, names: tuple[str, ...] = SITES
) -> tuple[Process, str]:
    """start_superlink, then the sites `names` registered (`coordinator register`) and the
    federation's app bundle approved in site_policy(federation). Stops it on any failure."""
    proc, address = start_superlink(federation, *options, out=out)
    try:
        result = run_coordinator(
            "register", str(federation.root), *[a for s in names for a in ("--site", s)], timeout=1800
        )
        assert result.returncode == 0, result.stderr
        # "(already)": an in-memory SuperLink registered the registry's sites itself at its start.
        assert [ln.removesuffix(" (already)") for ln in result.stdout.splitlines() if ln.startswith("registered")] == [
            f"registered {s}" for s in names
        ]
        approve_federation_bundle(federation, site_policy(federation))
    except BaseException:
        proc.stop()
        raise
    return proc, address


@pytest.fixture(scope="module")
def superlink(federation: FederationPaths, request: pytest.FixtureRequest) -> Iterator[str]:
    """A SuperLink with TLS and SuperNode authentication on 127.0.0.1 behind its nginx proxy (the
    address yielded is the proxy's); every site but `intruder` registered; the federation's app
    bundle approved in site_policy(federation)."""
    proc, address = start_registered_superlink(federation, names=module_sites(request))
    try:
        yield address
    finally:
        proc.stop()


def site_policy(federation: FederationPaths) -> Path:
    """The sites' policy file: no minimum beyond the node config's, the federation's bundle approved."""
    return federation.root.parent / "site-policy.yaml"


def approve_federation_bundle(federation: FederationPaths, policy: Path) -> str:
    """`coordinator bundle`, then `client.py approve` into `policy`; the bundle's sha256."""
    if not policy.exists():
        policy.write_text("min_subjects: 1\n")
    built = run_coordinator("bundle", str(federation.root), timeout=300)
    assert built.returncode == 0, built.stderr
    bundle = next(ln.split(" ", 2)[2] for ln in built.stdout.splitlines() if ln.startswith("app bundle "))
    digest = next(ln.split()[1] for ln in built.stdout.splitlines() if ln.startswith("sha256 "))
    approved = run_client("approve", bundle, "--policy", str(policy), timeout=300)
    assert approved.returncode == 0, approved.stderr
    assert digest in approved.stdout and "clientapp  client.client_app:app" in approved.stdout
    return digest


def join_args(
    federation: FederationPaths, site_root: Path, key_site: str, address: str, state: Path, policy: Path | None = None
) -> list[str]:
    policy = policy or site_policy(federation)
    return [
        "join",
        str(site_root),
        "--superlink",
        address,
        "--root-cert",
        str(federation.site(key_site).ca_cert),
        "--auth-key",
        str(federation.site(key_site).private_key),
        "--state-dir",
        str(state),
        "--no-progress",
        # One torch thread, not `auto`: runs compared bit for bit must train with the same thread
        # count, and test_faults.py compares a resume with an uninterrupted run made by another
        # test's sites, whose state dirs (auto's record per setup, client/threads.py) it lacks.
        "--threads",
        "1",
        *(["--policy", str(policy)] if policy.exists() else []),
        *POLICY,
    ]


@pytest.fixture
def joined(
    superlink: str,
    federation: FederationPaths,
    sites: dict[str, Path],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[dict[str, Process]]:
    """The sites joined through `client.py join`, each with its own key. A site the test module's
    SITE_POLICY_EXTRA names joins with the sites' policy plus that YAML (e.g. a `dp:` section)."""
    extra: dict[str, str] = getattr(request.module, "SITE_POLICY_EXTRA", {})
    procs: dict[str, Process] = {}
    try:
        for name in module_sites(request):
            policy = None
            if name in extra:
                policy = tmp_path / f"policy-{name}.yaml"
                policy.write_text(site_policy(federation).read_text() + extra[name])
            procs[name] = Process(
                [
                    sys.executable,
                    str(CLIENT),
                    *join_args(federation, sites[name], name, superlink, tmp_path / f"state-{name}", policy),
                ],
                tmp_path / f"join-{name}.out",
            )
        for proc in procs.values():
            assert proc.wait_for("joined: SuperNode", 600), proc.output()[-3000:]
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def round_events(out: Path) -> tuple[list[dict], dict[int, dict]]:
    events = [json.loads(ln) for ln in (out / "rounds.jsonl").read_text().splitlines() if ln.strip()]
    return events, {e["round"]: e for e in events if e["event"] == "round"}


TINY_RUN = [
    "--model",
    "tiny",
    "-c",
    "local-steps=2",
    "-c",
    "batch-size=8",
    "-c",
    "max-events=64",
    "-c",
    "max-patches=8",
    "-c",
    "min-nodes=3",
    "-c",
    "vocab-min-subjects=5",
    "-c",
    "eval-tasks=onset_hypertension_365d",
    "-c",
    "eval-n-boot=10",
    "-c",
    "timeout-s=300",
]


def launch_args(federation: FederationPaths, out: Path, *config: str, rounds: int = 1, wait_s: int = 900) -> list[str]:
    """`coordinator launch` of TINY_RUN into `out` with `config` (run config options) added, waiting
    for the run's end at most `wait_s` seconds."""
    wait = ["--wait", "--timeout", str(wait_s)]
    return ["launch", str(federation.root), "--out-dir", str(out), "--rounds", str(rounds), *TINY_RUN, *config, *wait]


def check_rounds(rounds: dict[int, dict], expected: list[int]) -> None:
    assert sorted(rounds) == expected
    for rnd, event in rounds.items():
        assert set(event["sites"]) == set(SITES), rnd
        for site, entry in event["sites"].items():
            assert entry["status"] == "ok", (rnd, site, entry)
            assert entry["groups_sent"] == EXPECTED_GROUPS[site], (rnd, site)
            assert set(entry["groups_received"]) <= set(EXPECTED_GROUPS[site]), (rnd, site)
            assert {"ehr", "shared"} <= set(entry["groups_received"]), (rnd, site)
            assert set(entry["num_examples"]) == set(entry["groups_received"])


def descendants(pid: int) -> list[int]:
    """Every live process below pid (whatever session or group it moved to), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
