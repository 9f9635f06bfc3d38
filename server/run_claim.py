"""Which run owns an out-dir: OUT_DIR/run.lock, so that one run at a time writes there.

Two launches into one out-dir once both wrote its rounds.jsonl, audit.jsonl and outcome.json: the
outcome belonged to the other run and the audit chain broke. Now an out-dir is claimed:

- `launch` claims it before it starts a run (role "launch", its own pid), refusing an out-dir a
  live run holds with OutDirInUse naming that run; once Flower has given the run id it writes it
  into the claim (set_run_id).
- The ServerApp takes the claim over as it starts (adopt_for_serverapp: role "serverapp", its
  pid), before it writes anything there, and gives it back when it ends (release). It refuses an
  out-dir that another live run holds, again before writing anything.
- A claim whose holder is gone is stale: whoever comes next takes it over, saying so. A process is
  told apart from a later one with the same pid by its start time (/proc/PID/stat).

Every read-modify-write of the claim happens under an exclusive flock of OUT_DIR/.run.lock.guard,
so two processes never both believe they hold it. While the ServerApp holds it, its pid says
whether the run is still alive (serverapp_gone): outcome.json's "running" is only believed while it is.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import strict_model

log = logging.getLogger("healthfm.server")

CLAIM_FILE = "run.lock"
GUARD_FILE = ".run.lock.guard"
# How long a ServerApp waits for the `launch` that started it to write the run id into the claim
# (it does so as soon as `flwr run` returns); only then can it tell its own launch from another's.
ADOPT_WAIT_S = 120.0


class OutDirInUse(RuntimeError):
    """The out-dir is claimed by another run that is still alive."""


class Holder(BaseModel):
    """OUT_DIR/run.lock."""

    model_config = ConfigDict(extra="forbid")

    run_id: int | None  # None: a `launch` that has not heard its run id yet
    role: Literal["launch", "serverapp"]
    pid: int
    started: str  # the process's start time (/proc/PID/stat field 22): tells a reused pid apart
    host: str
    since: float

    def describe(self) -> str:
        who = "its ServerApp" if self.role == "serverapp" else "`launch`"
        run = f"run {self.run_id}" if self.run_id is not None else "a run being launched"
        return f"{run} ({who}, pid {self.pid} on {self.host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))})"


def process_start(pid: int) -> str:
    """When process pid started (clock ticks since boot), "" when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    return "" if fields[0] in ("Z", "X") else fields[19]


def me(run_id: int | None, role: Literal["launch", "serverapp"]) -> Holder:
    pid = os.getpid()
    return Holder(
        run_id=run_id, role=role, pid=pid, started=process_start(pid), host=socket.gethostname(), since=time.time()
    )


def holder_alive(holder: Holder) -> bool | None:
    """Whether the claim's process is still running; None when it runs on another host (unknown)."""
    if holder.host != socket.gethostname():
        return None
    if Path("/proc/self/stat").is_file():
        return process_start(holder.pid) == holder.started and holder.started != ""
    try:  # no /proc: only whether some process has that pid
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def guarded(out_dir: Path) -> Iterator[None]:
    """An exclusive lock on the out-dir's claim for one read-modify-write."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(out_dir / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def read_claim(out_dir: Path) -> Holder | None:
    """The out-dir's claim; None if unclaimed. OutDirInUse naming the file when it does not parse
    (refusing is safer than writing beside an unknown run: the coordinator removes it)."""
    path = Path(out_dir) / CLAIM_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise OutDirInUse(f"{path}: unreadable claim ({err}); remove it if no run uses {out_dir}") from None
    try:
        return strict_model(Holder, text, path)
    except ValueError as err:  # pydantic's ValidationError, or a duplicated key (StrictFileError)
        why = " ".join(str(err).split())[:200]
        raise OutDirInUse(f"{path}: not a run claim ({why}); remove it if no run uses {out_dir}") from None


def _write(out_dir: Path, holder: Holder) -> None:
    atomic_write_text(Path(out_dir) / CLAIM_FILE, holder.model_dump_json() + "\n")


def _in_use(out_dir: Path, holder: Holder, hint: str) -> OutDirInUse:
    return OutDirInUse(f"out-dir {out_dir} is in use by {holder.describe()}: {hint}")


def claim_for_launch(out_dir: Path, run_live: Callable[[int], bool | None]) -> tuple[Holder, Holder | None]:
    """Claim out_dir for a `launch` of this process; (the claim, the stale claim it replaced).
    run_live(run_id): whether Flower still runs that run (None: cannot tell), asked about a claim
    left by a `launch` that has exited before its ServerApp took over."""
    out_dir = Path(out_dir)
    with guarded(out_dir):
        current = read_claim(out_dir)
        if current is not None:
            alive = holder_alive(current)
            if alive is None:
                raise _in_use(out_dir, current, "it runs on another host; choose another --out-dir")
            if not alive and current.role == "launch" and current.run_id is not None:
                # Its `launch` exited (no --wait) before the ServerApp took the claim over: ask Flower.
                alive = run_live(current.run_id) is not False
            if alive:
                raise _in_use(
                    out_dir,
                    current,
                    "choose another --out-dir, or wait for that run to end (or `flwr stop` it)",
                )
        mine = me(None, "launch")
        _write(out_dir, mine)
        return mine, current


def set_run_id(out_dir: Path, holder: Holder, run_id: int) -> Holder:
    """Write the run id Flower gave into the launch's claim (unless its ServerApp already took it over)."""
    with guarded(Path(out_dir)):
        current = read_claim(out_dir)
        if current is not None and current.role == "launch" and current.pid == holder.pid and current.run_id is None:
            holder = holder.model_copy(update={"run_id": run_id})
            _write(out_dir, holder)
        return holder  # the launch's own claim, whoever holds the out-dir now


def adopt_for_serverapp(
    out_dir: Path, run_id: int | None, wait_s: float = ADOPT_WAIT_S
) -> tuple[Holder, Holder | None]:
    """The ServerApp of run_id takes the out-dir over; (its claim, a stale claim it replaced).
    OutDirInUse if another live run holds it. A claim of a live `launch` that does not know its
    run id yet is waited for (up to wait_s): it is this run's launch or another's."""
    out_dir = Path(out_dir)
    deadline = time.monotonic() + wait_s
    while True:
        with guarded(out_dir):
            current = read_claim(out_dir)
            alive = holder_alive(current) if current is not None else False
            if current is None or not alive or (run_id is not None and current.run_id == run_id):
                mine = me(run_id, "serverapp")
                _write(out_dir, mine)
                stale = current if current is not None and current.run_id != run_id else None
                return mine, stale
            if alive is None or current.run_id is not None or time.monotonic() > deadline:
                raise _in_use(out_dir, current, "this run writes nothing there; launch it with another out-dir")
        time.sleep(0.2)


def _identity(holder: Holder) -> tuple[str, int, str, str]:
    return holder.role, holder.pid, holder.started, holder.host


def release(out_dir: Path, holder: Holder) -> bool:
    """Give the claim back if this holder still holds it; whether it did."""
    out_dir = Path(out_dir)
    with guarded(out_dir):
        try:
            current = read_claim(out_dir)
        except OutDirInUse:
            return False
        if current is None or _identity(current) != _identity(holder):
            return False
        (out_dir / CLAIM_FILE).unlink(missing_ok=True)
        return True


def serverapp_gone(out_dir: Path, run_id: int) -> str | None:
    """Why run_id's ServerApp is known to be gone from out_dir (None: alive, or unknown). Only a
    run that claimed the out-dir can be judged: its claim released (it ended) or its process dead."""
    try:
        current = read_claim(Path(out_dir))
    except OutDirInUse:
        return None
    if current is None or current.run_id != run_id:  # released (it ended), or an older run: unknown
        return None
    alive = holder_alive(current)
    if alive is False:
        who = "ServerApp" if current.role == "serverapp" else "`launch` (its ServerApp never started)"
        return f"its {who}, pid {current.pid}, is gone"
    return None


__all__ = [
    "CLAIM_FILE",
    "GUARD_FILE",
    "Holder",
    "OutDirInUse",
    "adopt_for_serverapp",
    "claim_for_launch",
    "holder_alive",
    "process_start",
    "read_claim",
    "release",
    "serverapp_gone",
    "set_run_id",
]
