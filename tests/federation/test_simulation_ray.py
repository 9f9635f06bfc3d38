"""Ray for the simulation (simulations/ray_start.py): the default run starts a private local
instance and never attaches to a cluster it could discover; `ray.address` set uses that cluster;
a failure to start is one line and exit status 1, never a hang.

The tests that start a real Ray cluster (`ray start --head`, its own temporary directory, made
discoverable through RAY_ADDRESS so no other Ray user of the machine sees it) are slow; they stop
only the processes they started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from simulations.ray_start import RaySettings, RayStartError, start_ray
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def test_settings_are_checked() -> None:
    assert RaySettings().address is None and RaySettings().object_store_mb >= 75
    with pytest.raises(ValidationError):
        RaySettings(object_store_mb=10)
    with pytest.raises(ValidationError):
        RaySettings.model_validate({"num_cpu": 2})  # a typo is refused, not ignored
    assert RaySettings(client_num_cpus=2).backend_config() == {"client_resources": {"num_cpus": 2, "num_gpus": 0.0}}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_an_address_nothing_answers_is_refused_at_once() -> None:
    port = _closed_port()
    t0 = time.perf_counter()
    with pytest.raises(RayStartError, match=f"nothing answers at 127.0.0.1:{port}") as err:
        start_ray(RaySettings(address=f"127.0.0.1:{port}"))
    assert time.perf_counter() - t0 < 30  # Ray itself retries such an address for minutes
    assert "\n" not in str(err.value)


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sim_args(data: Path, out: Path) -> list[str]:
    return [
        "scenario=tiny",
        "model=tiny",
        "n_subjects=30",
        f"data_dir={data}",
        f"out_dir={out}",
        f"hydra.run.dir={out}",
        "federation.rounds=1",
        "federation.local_steps=1",
        "federation.max_events=32",
        "federation.max_patches=4",
        "federation.eval_tasks=[wearable_resting_hr]",
        "federation.vocab_min_subjects=5",
        "federation.site.min_code_subjects=5",
        "federation.site.min_report_subjects=2",
        "federation.site.min_report_positives=1",
    ]


@pytest.mark.slow  # CI's slow stage (Makefile SLOW_CI): the default suite's 6 minutes
def test_the_cli_says_in_one_line_that_ray_did_not_start(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _closed_port()
    done = _run([*_sim_args(tmp_path / "data", tmp_path / "out"), f"ray.address=127.0.0.1:{port}"], env, 600)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("simulations.run: could not start the Ray cluster") and "Traceback" not in done.stderr


@pytest.mark.slow
def test_default_run_ignores_a_discoverable_cluster_and_an_address_uses_it(tmp_path: Path) -> None:
    generate_federation(tmp_path / "data", scenario="tiny", seed=0, n_subjects=30, progress=False)
    temp = tempfile.mkdtemp(prefix="hfray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _closed_port()
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--num-cpus",
            "2",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--block",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below by that group only
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert head.poll() is None and time.time() < deadline, "ray start --head did not come up"
                time.sleep(1)
        # Discoverable the way Ray discovers clusters: ray.init() with no address would attach.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": f"127.0.0.1:{port}"}
        for name, extra, expect in (
            ("default", [], "Ray: a local Ray instance"),
            ("address", [f"ray.address=127.0.0.1:{port}"], f"Ray: the Ray cluster at ray.address='127.0.0.1:{port}'"),
        ):
            out = tmp_path / name
            done = _run([*_sim_args(tmp_path / "data", out), *extra], env, 900)
            assert done.returncode == 0, done.stderr[-3000:]
            assert expect in done.stdout + done.stderr
            events = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
            assert [e["event"] for e in events] == ["setup", "round", "evaluate"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(temp, ignore_errors=True)
