"""The site's privacy ledger: the DP accountant's state in the site's own durable storage.

Epsilon must accumulate over every round of every run and survive a restart of the SuperNode,
so the accountant is never created fresh for a round (Flower's Opacus example does, and reports
each round's epsilon as if it were the only one). The ledger keeps Opacus's RDP accountant
history, a list of (noise_multiplier, sample_rate, steps), plus one entry per round. Epsilon is
always recomputed from the history, so a later change of delta stays correct.

It fails closed:
  - Reserve, then train. A round's projected spend is checked against the cap and written into
    the history in one step under the file lock (`reserve`), before any training; `commit`
    only marks it trained. Two runtimes on one state directory therefore can never both spend
    the same budget, and a round that fails or crashes after its reservation stays counted.
  - Strict files. Every field of the ledger is required and typed (`{}` is not an empty
    ledger, it is an error naming the file and each missing field).
  - The site remembers that it spent. Every write also writes a second, small record, the
    mark (<state_dir>/privacy_ledger.mark.json: the ledger's id, its step and round counts).
    A ledger missing while the mark exists, a ledger with another id, or one holding fewer
    steps than the mark (an older copy put back) is refused. The ledger is written first,
    then the mark, so a crash between the two leaves a ledger ahead of its mark (accepted,
    nothing lost). A ledger without a mark is accepted and the mark rewritten at the next
    write: no spend is lost. What the mark cannot detect is the loss of the whole state
    directory (both files): that is the site's durable storage and must be backed up as such.

Files: <state_dir>/privacy_ledger.json and privacy_ledger.mark.json, each written to a temporary
file and renamed (a crash leaves the previous file, never half a file), under
<state_dir>/.privacy_ledger.lock.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from healthfm_core.files import atomic_write_text

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
MARK_FILE = "privacy_ledger.mark.json"
LOCK_FILE = ".privacy_ledger.lock"
LEDGER_VERSION = 2
MECHANISM = "rdp"  # Opacus RDPAccountant.mechanism(): the only accountant a ledger holds

HistoryEntry = tuple[float, float, int]  # Opacus RDPAccountant.history: (noise_multiplier, sample_rate, steps)


class LedgerError(ValueError):
    """The ledger is unreadable, inconsistent or missing: DP training must stop until an admin looks."""


class BudgetExceeded(ValueError):
    """A round's projected spend would pass the site's epsilon cap: nothing was reserved."""


class _Strict(BaseModel):
    # Strict: a string, a bool or a missing field is never coerced into a number or a default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LedgerRound(_Strict):
    """One DP training round at the site. Its `steps` are in the history from the moment it was
    reserved, whatever became of the round."""

    round: int = Field(ge=0)
    run: str  # the run's setup sha256 (prefix): which federation run spent it
    reservation: str  # this round's id (two runtimes may train the same round number)
    status: Literal["reserved", "trained"]  # reserved: training under way, failed or crashed (still counted)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    sample_rate: float = Field(gt=0, le=1, allow_inf_nan=False)
    steps: int = Field(gt=0)  # reserved, and counted in the history
    steps_taken: int | None = Field(ge=0)  # set when trained
    max_grad_norm: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1, allow_inf_nan=False)
    epsilon_after: float = Field(ge=0, allow_inf_nan=False)  # the site's epsilon right after the reservation
    reserved_at: float  # unix time
    trained_at: float | None

    @model_validator(mode="after")
    def _status_fields(self) -> LedgerRound:
        trained = self.status == "trained"
        if trained != (self.steps_taken is not None) or trained != (self.trained_at is not None):
            raise ValueError(
                f"round {self.round} ({self.reservation}): status {self.status!r} with steps_taken "
                f"{self.steps_taken} and trained_at {self.trained_at}"
            )
        if self.steps_taken is not None and self.steps_taken > self.steps:
            raise ValueError(f"round {self.round}: {self.steps_taken} steps taken > {self.steps} reserved")
        return self


class LedgerFile(_Strict):
    version: int
    mechanism: str
    ledger_id: str  # random, set at the first write; the mark holds it too
    history: list[HistoryEntry]  # Opacus accountant.history, every reservation included
    rounds: list[LedgerRound]

    @model_validator(mode="after")
    def _consistent(self) -> LedgerFile:
        if self.version != LEDGER_VERSION:
            raise ValueError(f"ledger version {self.version} is not supported (expected {LEDGER_VERSION})")
        if self.mechanism != MECHANISM:
            raise ValueError(f"mechanism {self.mechanism!r}: only 'rdp' ledgers are supported")
        for sigma, q, steps in self.history:
            if not (math.isfinite(sigma) and sigma > 0 and math.isfinite(q) and 0 < q <= 1 and steps > 0):
                raise ValueError(f"history entry ({sigma}, {q}, {steps}) is not (noise>0, 0<rate<=1, steps>0)")
        total, logged = sum(s for *_, s in self.history), sum(r.steps for r in self.rounds)
        if total != logged:
            raise ValueError(f"history holds {total} steps but the rounds log {logged}")
        ids = [r.reservation for r in self.rounds]
        if len(set(ids)) != len(ids):
            raise ValueError("a reservation id appears twice in rounds")
        if (self.history or self.rounds) and not self.ledger_id:
            raise ValueError("ledger_id is empty in a ledger that holds rounds")
        return self

    @property
    def steps(self) -> int:
        return sum(s for *_, s in self.history)


class LedgerMark(_Strict):
    """The site's second record that it spent: which ledger, and how much it held at least."""

    version: int
    ledger_id: str
    steps: int = Field(ge=0)
    rounds: int = Field(ge=0)


class Reservation(_Strict):
    """A round's spend, reserved in the ledger before training."""

    id: str
    round: int
    steps: int
    delta: float
    epsilon_after: float  # the site's epsilon with this round counted


def _problems(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(file)"
        value = "(missing)" if e["type"] == "missing" else repr(e.get("input"))
        if len(value) > 120:
            value = value[:117] + "..."
        lines.append(f"{path}: field {field}: value {value}: {e['msg']}")
    return "\n  ".join(lines)


def _fresh() -> LedgerFile:
    return LedgerFile(version=LEDGER_VERSION, mechanism=MECHANISM, ledger_id="", history=[], rounds=[])


def _accountant(history: list[HistoryEntry]) -> RDPAccountant:
    # Imported here: Opacus costs every process ~2 s and ~115 MB (sympy, scipy, torch.distributed)
    # and only a site that trains or reports under DP needs it.
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": acc.mechanism()})
    return acc


def _epsilon(history: list[HistoryEntry], delta: float) -> float:
    return _cached_epsilon(tuple((float(n), float(q), int(s)) for n, q, s in history), float(delta))


@functools.lru_cache(maxsize=256)
def _cached_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    # RDP to (epsilon, delta) over Opacus's orders takes a noticeable fraction of a second.
    return float(_accountant(list(history)).get_epsilon(delta)) if history else 0.0


class PrivacyLedger:
    """The accountant of one site, in its state directory.

    The files are the only truth: they are re-read for every question and every change (they
    are small), and every change (`reserve`, `commit`) holds an exclusive lock from the read to
    the write, so several processes or threads serving the same site (Ray workers, a restarted
    SuperNode, two runtimes) never lose each other's spend nor overdraw the cap together.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.mark_path = self.state_dir / MARK_FILE
        self._read()  # a damaged or missing ledger is refused at once

    @property
    def data(self) -> LedgerFile:
        return self._read()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # flock holds per open file: a second open (another runtime, thread or process) waits.
        with open(self.state_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read_mark(self) -> LedgerMark | None:
        try:
            text = self.mark_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LedgerError(
                f"{self.mark_path}: cannot read the privacy ledger's mark ({err}); refusing DP training"
            ) from None
        try:
            return LedgerMark.model_validate_json(text)
        except ValidationError as err:
            raise LedgerError(
                f"privacy ledger mark unreadable; refusing DP training:\n  {_problems(self.mark_path, err)}"
            ) from None

    def _read(self) -> LedgerFile:
        mark = self._read_mark()
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if mark is not None:
                raise LedgerError(
                    f"{self.path}: the privacy ledger is missing, but {self.mark_path} records that this site already "
                    f"spent {mark.steps} DP steps over {mark.rounds} rounds; refusing DP training (restore the ledger "
                    "from a backup; never start afresh)"
                ) from None
            return _fresh()
        except OSError as err:
            raise LedgerError(f"{self.path}: cannot read the privacy ledger ({err}); refusing DP training") from None
        try:
            data = LedgerFile.model_validate_json(text)
        except ValidationError as err:
            # Never start afresh over a damaged ledger: that would reset the spent budget to 0.
            raise LedgerError(
                f"privacy ledger unreadable; refusing DP training:\n  {_problems(self.path, err)}"
            ) from None
        if mark is not None:
            if mark.ledger_id != data.ledger_id:
                raise LedgerError(
                    f"{self.path}: field ledger_id: value {data.ledger_id!r} is not the ledger this site "
                    f"wrote ({mark.ledger_id!r} in {self.mark_path}); refusing DP training"
                )
            if data.steps < mark.steps or len(data.rounds) < mark.rounds:
                raise LedgerError(
                    f"{self.path}: holds {data.steps} steps over {len(data.rounds)} rounds, but {self.mark_path} records "
                    f"{mark.steps} steps over {mark.rounds} rounds: an older or edited copy; refusing DP training"
                )
        return data

    def _write(self, data: LedgerFile) -> None:
        # Ledger first, then the mark: a crash between them leaves the ledger ahead (accepted).
        atomic_write_text(self.path, data.model_dump_json(indent=1))
        mark = LedgerMark(version=LEDGER_VERSION, ledger_id=data.ledger_id, steps=data.steps, rounds=len(data.rounds))
        atomic_write_text(self.mark_path, mark.model_dump_json(indent=1))

    # ------------------------------------------------------------------ accounting

    def accountant(self) -> RDPAccountant:
        """A fresh Opacus RDP accountant holding the site's whole history (reservations included)."""
        return _accountant(self.data.history)

    @property
    def steps(self) -> int:
        return self.data.steps

    def epsilon(self, delta: float) -> float:
        """The site's epsilon at `delta` over every reserved step (a round under way counts)."""
        return _epsilon(self.data.history, delta)

    def projected_epsilon(self, delta: float, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after `steps` more steps at (noise_multiplier, sample_rate), without spending them."""
        acc = self.accountant()
        for _ in range(steps):  # Opacus merges equal consecutive entries
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return _epsilon(acc.history, delta)

    def reserve(
        self,
        *,
        round: int,
        run: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        delta: float,
        epsilon_cap: float,
    ) -> Reservation:
        """Check the cap and count the round's `steps` in one step under the lock, before training.
        Raises BudgetExceeded (nothing written) when epsilon would pass `epsilon_cap`."""
        if steps <= 0:
            raise ValueError(f"cannot reserve {steps} steps")
        with self._locked():
            current = self._read()
            acc = _accountant(current.history)
            for _ in range(steps):
                acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
            history = [(float(n), float(q), int(s)) for n, q, s in acc.history]
            projected = _epsilon(history, delta)
            if not (math.isfinite(projected) and projected <= epsilon_cap):
                spent = _epsilon(current.history, delta)
                raise BudgetExceeded(
                    f"epsilon after this round would be {projected:.4g} > the policy's cap "
                    f"{epsilon_cap:g} (spent {spent:.4g} at delta {delta:g})"
                )
            entry = LedgerRound(
                round=round,
                run=run,
                reservation=uuid.uuid4().hex,
                status="reserved",
                noise_multiplier=noise_multiplier,
                sample_rate=sample_rate,
                steps=steps,
                steps_taken=None,
                max_grad_norm=max_grad_norm,
                delta=delta,
                epsilon_after=projected,
                reserved_at=time.time(),
                trained_at=None,
            )
            self._write(
                LedgerFile(
                    version=LEDGER_VERSION,
                    mechanism=current.mechanism,
                    ledger_id=current.ledger_id or uuid.uuid4().hex,
                    history=history,
                    rounds=[*current.rounds, entry],
                )
            )
        log.info(
            "privacy ledger %s: round %d reserved %d steps (noise %.3g, rate %.4g); epsilon %.4f at delta %.1e",
            self.path,
            round,
            steps,
            noise_multiplier,
            sample_rate,
            projected,
            delta,
        )
        return Reservation(id=entry.reservation, round=round, steps=steps, delta=delta, epsilon_after=projected)

    def commit(self, reservation: Reservation, steps_taken: int) -> float:
        """Mark a reserved round trained; returns the site's epsilon now, at the reservation's delta
        (every reservation counted, other runtimes' included)."""
        with self._locked():
            current = self._read()
            index = next((i for i, r in enumerate(current.rounds) if r.reservation == reservation.id), None)
            if index is None:
                raise LedgerError(
                    f"{self.path}: reservation {reservation.id} of round {reservation.round} is not in the ledger"
                )
            entry = current.rounds[index]
            if entry.status != "reserved":
                raise LedgerError(f"{self.path}: reservation {reservation.id} is already {entry.status!r}")
            if not 0 <= steps_taken <= entry.steps:
                raise LedgerError(f"{self.path}: round {entry.round} took {steps_taken} steps, {entry.steps} reserved")
            done = entry.model_copy(update={"status": "trained", "steps_taken": steps_taken, "trained_at": time.time()})
            rounds = [
                *current.rounds[:index],
                LedgerRound.model_validate(done.model_dump()),
                *current.rounds[index + 1 :],
            ]
            self._write(LedgerFile.model_validate({**current.model_dump(), "rounds": [r.model_dump() for r in rounds]}))
            epsilon = _epsilon(current.history, reservation.delta)
        log.info(
            "privacy ledger %s: round %d trained (%d steps); site epsilon %.4f at delta %.1e",
            self.path,
            entry.round,
            steps_taken,
            epsilon,
            reservation.delta,
        )
        return epsilon


__all__ = [
    "LEDGER_FILE",
    "MARK_FILE",
    "BudgetExceeded",
    "LedgerError",
    "LedgerFile",
    "LedgerRound",
    "PrivacyLedger",
    "Reservation",
]
