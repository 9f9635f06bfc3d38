"""Every log the platform writes is rotated by size (healthfm_core/log_files.py): a federation that
runs for weeks holds at most (1 + LOG_BACKUPS) x LOG_MAX_BYTES of each. The site's SuperNode log
and app-guard log through `join` (the reason a SuperNode stopped is still read from its own lines
after a rotation), the ServerApp's server.log through logging, nginx's logs renamed while the real
nginx runs (its workers as www-data when root starts it) and opened anew without losing a line."""

from __future__ import annotations

import logging
import logging.handlers
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from client.deploy.join import JoinConfig, copy_to_log, run_supernode_once
from healthfm_core.log_files import LOG_BACKUPS, RotatingLog, backup_path, rotating_handler
from server.deploy.door import open_door
from server.deploy.nginx_logs import rotate_nginx_logs
from server.deploy.provision import ProvisionConfig, provision
from server.deploy.proxy import NGINX_ACCESS_LOG, find_nginx, start_proxy, wait_listening


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _files(path: Path) -> list[Path]:
    return [p for p in [path, *(backup_path(path, n) for n in range(1, LOG_BACKUPS + 2))] if p.exists()]


def test_a_rotating_log_keeps_its_newest_lines_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "site.log"
    path.write_text("from before\n")  # an existing log is appended to, and counted
    with RotatingLog(path, max_bytes=1000) as log:
        assert log.size == len("from before\n") and log.generation == 0
        for i in range(400):
            log.write(f"line {i:04d} {'x' * 40}\n")  # 51 bytes a line
        log.flush()
        assert log.generation > LOG_BACKUPS  # rotated often, the oldest files dropped
        assert log.size == path.stat().st_size
    files = _files(path)
    assert files == [path, *(backup_path(path, n) for n in range(1, LOG_BACKUPS + 1))]
    assert all(p.stat().st_size <= 1000 for p in files)
    kept = "".join(p.read_text() for p in reversed(files)).splitlines()
    # The newest lines, in order, none cut: what was dropped is only the oldest.
    assert kept[-1].startswith("line 0399 ") and len(kept) == len({*kept})
    numbers = [int(ln.split()[1]) for ln in kept]
    assert numbers == list(range(numbers[0], 400))
    # A line longer than the bound goes whole into a fresh file.
    with RotatingLog(path, max_bytes=1000) as log:
        log.write("y" * 3000 + "\n")
    assert path.read_text() == "y" * 3000 + "\n"


def test_a_stopped_supernodes_lines_are_read_from_its_own_output_after_the_log_rotated(tmp_path: Path) -> None:
    """The reason a SuperNode stopped comes from its own last lines (join's Attempt.tail): after
    a rotation they start at the new file's beginning, not at the offset noted in the old one."""
    cfg = JoinConfig(site_root=tmp_path, superlink="127.0.0.1:9", insecure=True, state_dir=tmp_path / "s")
    path = tmp_path / "supernode.log"
    path.write_text("".join(f"an earlier process's line {i}\n" for i in range(50)))
    script = "import sys\nfor i in range(300): print(f'node line {i:03d} ' + 'z' * 40)\nsys.exit(3)"
    with RotatingLog(path, max_bytes=2000) as log:
        attempt = run_supernode_once(cfg, [sys.executable, "-c", script], log, threading.Event(), lambda _: None)
        assert log.generation > 0
    assert attempt.returncode == 3
    assert attempt.tail and attempt.tail[-1].startswith("node line 299 ")
    assert all(ln.startswith("node line ") for ln in attempt.tail)  # never a line of another process
    numbers = [int(ln.split()[2]) for ln in attempt.tail]
    assert numbers == list(range(numbers[0], 300))


def test_the_app_guards_output_is_copied_into_its_rotating_log(tmp_path: Path) -> None:
    path = tmp_path / "app-guard.log"
    script = "for i in range(2000): print(f'guard line {i:04d} ' + 'g' * 30, flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    copy_to_log(proc.stdout, path, max_bytes=4096)
    assert proc.wait(timeout=60) == 0
    files = _files(path)
    assert len(files) == 1 + LOG_BACKUPS and all(p.stat().st_size <= 4096 for p in files)
    assert path.read_text().splitlines()[-1].startswith("guard line 1999 ")


def test_server_log_rotates_by_the_same_rule(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    handler = rotating_handler(path)
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    handler.maxBytes = 2000
    logger = logging.getLogger("healthfm.test_log_rotation")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(300):
            logger.info("round %d: %s", i, "r" * 40)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = _files(path)
    assert len(files) == 1 + LOG_BACKUPS and all(p.stat().st_size <= 2000 for p in files)
    assert path.read_text().splitlines()[-1].endswith("round 299: " + "r" * 40)


def test_nginx_logs_are_renamed_and_reopened_without_losing_a_line(tmp_path: Path) -> None:
    try:
        find_nginx()
    except Exception as err:  # `make setup-system` installs it
        pytest.skip(str(err))
    fed = provision(ProvisionConfig(federation_dir=tmp_path / "fed", sites=["north"])).paths
    open_door(fed, None)  # the door's files, as `superlink` writes them before nginx starts
    port = _free_port()
    nginx = start_proxy(fed, "127.0.0.1", port, _free_port())  # nothing behind it: nginx answers itself
    ctx = ssl.create_default_context(cafile=str(fed.ca_cert))

    def ask(n: int, tag: str) -> None:
        for i in range(n):  # outside the Fleet routes: 403 from nginx, one access line each
            try:
                urllib.request.urlopen(f"https://localhost:{port}/{tag}-{i}", context=ctx, timeout=30)
            except urllib.error.HTTPError as err:
                assert err.code == 403

    access = fed.server_dir / NGINX_ACCESS_LOG
    try:
        wait_listening("127.0.0.1", port, nginx)
        ask(20, "before")
        assert rotate_nginx_logs(fed.server_dir, nginx.pid, max_bytes=10**9) == []  # under the bound
        assert NGINX_ACCESS_LOG in rotate_nginx_logs(fed.server_dir, nginx.pid, max_bytes=100)
        deadline = time.monotonic() + 30
        # nginx's master opens the logs anew on SIGHUP, for new workers: until they serve, the
        # lines go on into the renamed file.
        while not (access.exists() and "/between-" in access.read_text()) and time.monotonic() < deadline:
            ask(1, "between")
            time.sleep(0.1)
        ask(20, "after")
    finally:
        nginx.terminate()
        nginx.wait(timeout=30)
    old, new = backup_path(access, 1).read_text(), access.read_text()
    assert len(re.findall(r"GET /before-\d+ ", old)) == 20 and "/before-" not in new
    assert len(re.findall(r"GET /after-\d+ ", new)) == 20 and "/after-" not in old  # every line, once
