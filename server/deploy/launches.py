"""FED/server/launches.jsonl: one line per `coordinator launch` or `resume` (LaunchRecord), appended in
the order the launches were made, which is what `resume` relaunches and what the dashboard lists
(newest last in the file; Flower's run ids are random and say nothing of the order).

Apart from server/deploy/commands.py so that the dashboard, which reads it, imports none of the
commands' machinery (torch among it).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from healthfm_core.strict_files import strict_model
from server.deploy.provision import FederationPaths

LAUNCHES_FILE = "launches.jsonl"


class LaunchRecord(BaseModel):
    """One line of FED/server/launches.jsonl: what `resume` relaunches."""

    model_config = ConfigDict(extra="forbid")

    run_id: int
    out_dir: str
    run_config: dict[str, str | int | float | bool]
    launched_at: str
    resumed: bool = False


def launches_path(paths: FederationPaths) -> Path:
    return paths.server_dir / LAUNCHES_FILE


def record_launch(paths: FederationPaths, record: LaunchRecord) -> None:
    # One write() with O_APPEND: lines of launches made at the same time never interleave.
    fd = os.open(launches_path(paths), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (record.model_dump_json() + "\n").encode("utf-8"))
    finally:
        os.close(fd)


def read_launches(paths: FederationPaths) -> list[LaunchRecord]:
    """Every launch recorded, in the order they were made (ValueError naming the line that does not parse)."""
    path = launches_path(paths)
    if not path.is_file():
        return []
    return [
        strict_model(LaunchRecord, ln, f"{path}, line {i}")
        for i, ln in enumerate(path.read_text().splitlines(), 1)
        if ln.strip()
    ]


def resume_command(paths: FederationPaths, out_dir: str | Path) -> str:
    """The command that resumes the run of out_dir (what an interrupted run's outcome names)."""
    return f"python -m server.coordinator resume {shlex.quote(str(paths.root))} --out-dir {shlex.quote(str(out_dir))}"
