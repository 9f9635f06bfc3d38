"""Where training checkpoints lie: one directory per step, step-NNNNNNNN, holding META_FILE once
it is whole (checkpoint.py writes it last, then renames the directory into place). Imports no
torch: a run's outcome (server/outcome.py) and the coordinator's dashboard look for checkpoints
without loading one.
"""

from __future__ import annotations

import re
from pathlib import Path

META_FILE = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint under root with the highest step (directories named step-NNNNNNNN)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / META_FILE).is_file()
    ]
    return max(found)[1] if found else None
