"""The site's privacy ledger: the DP accountant's state in the site's own durable storage.

Epsilon must accumulate over every round of every run and survive a restart of the SuperNode,
so the accountant is never created fresh for a round (Flower's Opacus example does, and reports
each round's epsilon as if it were the only one). The ledger keeps Opacus's RDP accountant
history, a list of (noise_multiplier, sample_rate, steps), plus one audit entry per round.
Epsilon is always recomputed from the history, so a later change of delta stays correct.

File: <state_dir>/privacy_ledger.json, written to a temporary file and renamed (a crash leaves
the previous ledger, never half a file).
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opacus.accountants import RDPAccountant
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from healthfm_core.files import atomic_write_text

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = ".privacy_ledger.lock"
LEDGER_VERSION = 1


class LedgerRound(BaseModel):
    """One DP training round at the site (audit trail; the accountant uses `history`)."""

    model_config = ConfigDict(extra="forbid")
    round: int = Field(ge=0)
    run: str  # the run's setup sha256 (prefix): which federation run spent it
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    epsilon_after: float = Field(ge=0)
    unix_time: float


class LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = LEDGER_VERSION
    mechanism: str = "rdp"
    history: list[tuple[float, float, int]] = Field(default_factory=list)  # Opacus accountant.history
    rounds: list[LedgerRound] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> LedgerFile:
        if self.version != LEDGER_VERSION:
            raise ValueError(f"ledger version {self.version} is not supported (expected {LEDGER_VERSION})")
        if self.mechanism != RDPAccountant.mechanism():
            raise ValueError(f"mechanism {self.mechanism!r}: only 'rdp' ledgers are supported")
        for sigma, q, steps in self.history:
            if not (sigma > 0 and 0 < q <= 1 and steps > 0):
                raise ValueError(f"history entry ({sigma}, {q}, {steps}) is not (noise>0, 0<rate<=1, steps>0)")
        total, logged = sum(s for *_, s in self.history), sum(r.steps for r in self.rounds)
        if total != logged:
            raise ValueError(f"history holds {total} steps but the rounds log {logged}")
        return self


def _extends(history: list[tuple], recorded: list[tuple]) -> bool:
    """Whether an accountant's history continues the recorded one. Opacus merges consecutive
    steps of equal (noise, rate), so the last recorded entry may only have grown."""
    if not recorded:
        return True
    if len(history) < len(recorded) or history[: len(recorded) - 1] != recorded[:-1]:
        return False
    (n, q, s), (n0, q0, s0) = history[len(recorded) - 1], recorded[-1]
    return (n, q) == (n0, q0) and s >= s0


class LedgerError(ValueError):
    """The ledger file is unreadable or inconsistent: DP training must stop until an admin looks."""


class PrivacyLedger:
    """The accountant of one site, loaded from and saved to its state directory.

    The file is the only truth: it is re-read for every question and every record (it is
    small), under an exclusive lock when recording, so several processes serving the same
    site (Ray workers, a restarted SuperNode) never lose each other's spend. A writer whose
    accountant started before another's record fails the history check instead of
    overwriting it.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self._read()  # a damaged ledger is refused at once

    @property
    def data(self) -> LedgerFile:
        return self._read()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> LedgerFile:
        if not self.path.exists():
            return LedgerFile()
        try:
            return LedgerFile.model_validate_json(self.path.read_text(encoding="utf-8"))
        except (ValidationError, ValueError, OSError) as err:
            # Never start afresh over a damaged ledger: that would reset the spent budget to 0.
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({err}); refusing DP training") from None

    # ------------------------------------------------------------------ accounting

    def accountant(self) -> RDPAccountant:
        """A fresh Opacus RDP accountant holding the site's whole history (attach it to the
        optimizer: it steps on every DP step, and `record` saves what it accumulated)."""
        acc = RDPAccountant()
        acc.load_state_dict({"history": [tuple(h) for h in self.data.history], "mechanism": acc.mechanism()})
        return acc

    @property
    def steps(self) -> int:
        return sum(s for *_, s in self.data.history)

    def epsilon(self, delta: float) -> float:
        acc = self.accountant()
        return float(acc.get_epsilon(delta)) if acc.history else 0.0

    def projected_epsilon(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after `steps` more steps at (noise_multiplier, sample_rate), without spending them."""
        acc = self.accountant()
        for _ in range(steps):  # Opacus merges equal consecutive entries
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(acc.get_epsilon(delta))

    def record(self, accountant: RDPAccountant, *, round: int, run: str, noise_multiplier: float,
               sample_rate: float, max_grad_norm: float, delta: float) -> float:
        """Save the accountant's history after a round and log the round; returns epsilon now."""
        history = [(float(n), float(q), int(s)) for n, q, s in accountant.history]
        with self._locked():
            current = self._read()
            steps = sum(s for *_, s in history) - sum(s for *_, s in current.history)
            if steps <= 0:
                raise ValueError(f"accountant holds {steps} new steps: nothing to record")
            if not _extends(history, [tuple(h) for h in current.history]):
                raise ValueError("accountant history does not extend the ledger's history")
            epsilon = float(accountant.get_epsilon(delta))
            entry = LedgerRound(round=round, run=run, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                steps=steps, max_grad_norm=max_grad_norm, delta=delta, epsilon_after=epsilon,
                                unix_time=time.time())
            self._write(LedgerFile(history=history, rounds=[*current.rounds, entry]))
        log.info("privacy ledger %s: round %d spent %d steps (noise %.3g, rate %.4g); epsilon %.4f at delta %.1e",
                 self.path, round, steps, noise_multiplier, sample_rate, epsilon, delta)
        return epsilon

    def _write(self, data: LedgerFile) -> None:
        atomic_write_text(self.path, data.model_dump_json(indent=1))


__all__ = ["LEDGER_FILE", "LedgerError", "LedgerRound", "PrivacyLedger"]
