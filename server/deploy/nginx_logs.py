"""nginx's logs rotated by `coordinator superlink`, by the rule of every log (healthfm_core/log_files.py).

nginx writes FED/server/nginx-access.log (a line per request: ~21 kB a `tiny` round with three
sites) and nginx-error.log and never rotates them itself. `superlink` checks their size as it
watches its processes; one past LOG_MAX_BYTES is renamed (.1, .2, ...; the oldest beyond
LOG_BACKUPS deleted) and nginx's master is sent SIGHUP: it opens the logs anew and starts new
workers with them, the old workers finishing their requests into the renamed files, so no line
is lost. Not SIGUSR1 (reopen): each worker would reopen the files itself, and workers running as
www-data cannot open anything in FED/server/ (mode 0700): they lost every later line.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from healthfm_core.log_files import LOG_MAX_BYTES, rotate
from server.deploy.proxy import NGINX_ACCESS_LOG, NGINX_ERROR_LOG


def rotate_nginx_logs(server_dir: Path, master_pid: int, max_bytes: int = LOG_MAX_BYTES) -> list[str]:
    """Rotate each nginx log under `server_dir` larger than `max_bytes`, then have the master
    (`master_pid`) open them anew (a graceful reload); the names rotated."""
    rotated = []
    for name in (NGINX_ACCESS_LOG, NGINX_ERROR_LOG):
        path = server_dir / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size > max_bytes:
            rotate(path)
            rotated.append(name)
    if rotated:
        with contextlib.suppress(ProcessLookupError):
            os.kill(master_pid, signal.SIGHUP)
    return rotated


__all__ = ["rotate_nginx_logs"]
