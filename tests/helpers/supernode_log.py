"""A site's SuperNode log read from a moment on: the deployed tests time a kill on Flower's own
log lines, never by a sleep (tests/deploy/test_secure_dropout_deployed.py, tests/deploy/test_dashboard_browser.py)."""

from __future__ import annotations

from pathlib import Path


class SupernodeLog:
    """A site's SuperNode log (STATE/supernode.log) from the moment this is made: only the lines
    of the run about to start count."""

    def __init__(self, state: Path) -> None:
        self.path = state / "supernode.log"
        self.offset = self.path.stat().st_size

    def text(self) -> str:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            return f.read()

    def has(self, *lines: str) -> bool:
        """Whether `lines` appear in this order."""
        text, at = self.text(), 0
        for line in lines:
            at = text.find(line, at)
            if at < 0:
                return False
            at += len(line)
        return True
