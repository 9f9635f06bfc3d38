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
    directory (both files): the key's budget record does.
  - The budget belongs to the site's key, not to a directory. With a KeyBinding (a deployed
    site: `join --auth-key`), every write also rewrites the key's budget record beside the key
    (healthfm_core/privacy/budget_record.py: key fingerprint, ledger id and path, steps, rounds,
    epsilon). A state directory that lacks the ledger the record names (missing, fresh, another
    id, an older copy) is refused until the admin restores it or starts a new budget
    (`start_new_budget`, `join --new-privacy-budget`), which the new ledger carries in
    `new_budget` and the site reports to the server (PrivacySpend.new_budget_at). Write order:
    ledger, mark, record. Each later file is a summary of the one before, and a summary behind
    its ledger (a crash between two writes) is accepted and caught up at the next write, while
    one ahead of it means a lost or rolled-back ledger and is refused: so a crash can never make
    the site look as if it spent less. A record that cannot be written refuses the round (it
    is probed before anything is reserved; a failure after the reservation leaves the round
    counted). Without a binding (simulations, `--insecure` tests without a key) the budget is
    bound to the state directory alone.
  - History and rounds agree. The history is the accountant's input and the rounds log what
    was reserved: each round's steps must be the history's next steps at the round's noise and
    rate, and the epsilon recomputed from the history up to that round (Opacus's RDP analysis,
    the same accountant the engine uses) must equal its `epsilon_after`; a ledger whose history
    was edited (e.g. 10x the noise, to report less spend) names the file and the first round
    that disagrees.
  - Any decoding problem (not UTF-8, not JSON, a field missing or mistyped) is a LedgerError
    naming the file.

Files: <state_dir>/privacy_ledger.json and privacy_ledger.mark.json, each written to a temporary
file and renamed (a crash leaves the previous file, never half a file), under
<state_dir>/.privacy_ledger.lock; with a binding, <auth_key>.privacy.json.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from healthfm_core.files import atomic_write_text
from healthfm_core.privacy.budget_record import (
    RECORD_VERSION,
    BudgetRecord,
    KeyBinding,
    ReplacedLedger,
    SpentLedger,
    read_record,
    write_record,
)
from healthfm_core.strict_files import StrictFileError, strict_model

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
MARK_FILE = "privacy_ledger.mark.json"
LOCK_FILE = ".privacy_ledger.lock"
LEDGER_VERSION = 2
MECHANISM = "rdp"  # Opacus RDPAccountant.mechanism(): the only accountant a ledger holds

HistoryEntry = tuple[float, float, int]  # Opacus RDPAccountant.history: (noise_multiplier, sample_rate, steps)
# A recomputed epsilon equals the recorded one up to float noise (the same computation; Opacus or
# numpy versions may differ in the last bits); an edited history moves it by far more.
EPSILON_RTOL = 1e-9


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


class NewBudget(_Strict):
    """Why this ledger started from zero although the site's key had a ledger before: the admin
    passed `join --new-privacy-budget` (reported to the server, kept in its audit log)."""

    started_at: float  # unix time
    replaces: str  # the ledger id given up ("": none known)
    replaced_steps: int | None = Field(ge=0)  # what it had spent, as far as the site knows
    replaced_epsilon: float | None = Field(ge=0, allow_inf_nan=False)


class LedgerFile(_Strict):
    version: int
    mechanism: str
    ledger_id: str  # random, set at the first write; the mark holds it too
    history: list[HistoryEntry]  # Opacus accountant.history, every reservation included
    rounds: list[LedgerRound]
    # Optional, unlike every other field: ledgers written before it existed have none.
    new_budget: NewBudget | None = None

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
        if (self.history or self.rounds or self.new_budget) and not self.ledger_id:
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


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    # Opacus's compute_rdp is this vector times the steps; the vector is the costly part.
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    vec = rdp.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(x) for x in vec)


def _history_epsilon(history: list[HistoryEntry], delta: float) -> float:
    """RDPAccountant.get_epsilon(delta) over `history`, computed as it does (the RDP of each
    entry summed over Opacus's orders, then converted), with each (noise, rate)'s RDP computed once."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    total = sum([np.array(_rdp_per_step(n, q)) * s for n, q, s in history])
    eps, _ = rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


RoundKey = tuple[int, str, float, float, int, float, float]  # round, reservation, noise, rate, steps, delta, epsilon


@functools.lru_cache(maxsize=64)
def _history_problem(history: tuple[HistoryEntry, ...], rounds: tuple[RoundKey, ...]) -> str | None:
    """Why the history and the rounds log disagree (None when they agree): each round, in
    reservation order, takes its steps from the history at its own noise and rate, and the
    epsilon of the history up to there is its epsilon_after."""
    prefix: list[HistoryEntry] = []
    index, left = 0, (history[0][2] if history else 0)
    for rnd, rid, sigma, q, steps, delta, recorded in rounds:
        where = f"round {rnd} (reservation {rid})"
        need = steps
        while need > 0:
            if index >= len(history):
                return f"{where}: field history: ends before the round's {steps} steps"
            n, rate, _ = history[index]
            if (n, rate) != (sigma, q):
                return (
                    f"{where}: field history: value ({n!r}, {rate!r}) for the round's steps, but the round "
                    f"reserved them at noise_multiplier {sigma!r}, sample_rate {q!r}"
                )
            take = min(need, left)
            if prefix and prefix[-1][:2] == (n, rate):  # as Opacus merges equal consecutive steps
                prefix[-1] = (n, rate, prefix[-1][2] + take)
            else:
                prefix.append((n, rate, take))
            need, left = need - take, left - take
            if left == 0:
                index += 1
                left = history[index][2] if index < len(history) else 0
        epsilon = _history_epsilon(prefix, delta)
        if not math.isclose(epsilon, recorded, rel_tol=EPSILON_RTOL, abs_tol=1e-12):
            return (
                f"{where}: field epsilon_after: value {recorded!r}, but the history up to this round gives "
                f"epsilon {epsilon!r} at delta {delta:g}"
            )
    return None


def history_problem(data: LedgerFile) -> str | None:
    """Why `data`'s history disagrees with its rounds log, or None (cached per content)."""
    rounds = tuple(
        (r.round, r.reservation, r.noise_multiplier, r.sample_rate, r.steps, r.delta, r.epsilon_after)
        for r in data.rounds
    )
    history = tuple((float(n), float(q), int(s)) for n, q, s in data.history)
    return _history_problem(history, rounds)


def spent_summary(path: Path, data: LedgerFile) -> SpentLedger:
    """What `data` has spent, for the key's record: its last round's epsilon at that round's delta."""
    last = data.rounds[-1] if data.rounds else None
    return SpentLedger(
        ledger_id=data.ledger_id,
        ledger=str(path),
        steps=data.steps,
        rounds=len(data.rounds),
        epsilon=last.epsilon_after if last else 0.0,
        delta=last.delta if last else None,
    )


def _describe(spent: SpentLedger) -> str:
    at = f" at delta {spent.delta:g}" if spent.delta is not None else ""
    return f"{spent.steps} DP steps over {spent.rounds} rounds, epsilon {spent.epsilon:.4g}{at}"


class PrivacyLedger:
    """The accountant of one site, in its state directory.

    The files are the only truth: they are re-read for every question and every change (they
    are small), and every change (`reserve`, `commit`) holds an exclusive lock from the read to
    the write, so several processes or threads serving the same site (Ray workers, a restarted
    SuperNode, two runtimes) never lose each other's spend nor overdraw the cap together.

    binding: the site key's fingerprint and budget record (a deployed site); None binds the
    budget to the state directory alone (simulations, sites without a key).
    verify: False opens a ledger that may be refused, only to `start_new_budget` over it (every
    question and change still reads and checks the files).
    """

    def __init__(self, state_dir: str | Path, binding: KeyBinding | None = None, *, verify: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.mark_path = self.state_dir / MARK_FILE
        self.binding = binding
        if verify:
            self._read()  # a damaged, missing or foreign ledger is refused at once

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

    def _text(self, path: Path, what: str) -> str | None:
        """A file's text, None when it does not exist; LedgerError naming it otherwise."""
        try:
            return path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            raise LedgerError(f"{path}: cannot read the {what} ({err}); refusing DP training") from None
        except UnicodeDecodeError as err:
            raise LedgerError(f"{path}: the {what} is not UTF-8 text ({err}); refusing DP training") from None

    def _read_mark(self) -> LedgerMark | None:
        text = self._text(self.mark_path, "privacy ledger's mark")
        if text is None:
            return None
        try:
            return strict_model(LedgerMark, text, self.mark_path)
        except StrictFileError as err:
            raise LedgerError(f"privacy ledger mark unreadable; refusing DP training: {err}") from None
        except ValidationError as err:
            raise LedgerError(
                f"privacy ledger mark unreadable; refusing DP training:\n  {_problems(self.mark_path, err)}"
            ) from None

    def _read_record(self) -> BudgetRecord | None:
        if self.binding is None:
            return None
        try:
            record = read_record(self.binding.record)
        except ValueError as err:
            raise LedgerError(f"{err}; refusing DP training") from None
        if record is not None and record.key_sha256 != self.binding.key_sha256:
            raise LedgerError(
                f"{self.binding.record}: field key_sha256: value {record.key_sha256!r} is not this site's key "
                f"({self.binding.key_sha256}): the record of another key beside this one; refusing DP training "
                "(move it back beside its own key, or start a new budget with `join --new-privacy-budget`)"
            )
        return record

    def _read_file(self) -> LedgerFile:
        """The state directory's ledger, checked against its mark and its own rounds log."""
        mark = self._read_mark()
        text = self._text(self.path, "privacy ledger")
        if text is None:
            if mark is not None:
                raise LedgerError(
                    f"{self.path}: the privacy ledger is missing, but {self.mark_path} records that this site already "
                    f"spent {mark.steps} DP steps over {mark.rounds} rounds; refusing DP training (restore the ledger "
                    "from a backup; never start afresh)"
                )
            return _fresh()
        try:
            data = strict_model(LedgerFile, text, self.path)
        except StrictFileError as err:  # a duplicated key: which value did it spend? Never guess
            raise LedgerError(f"privacy ledger unreadable; refusing DP training: {err}") from None
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
        if problem := history_problem(data):
            raise LedgerError(
                f"{self.path}: {problem}: the history and the rounds log disagree (an edited ledger); "
                "refusing DP training"
            )
        return data

    def _check_record(self, data: LedgerFile, record: BudgetRecord | None) -> None:
        """Refuse a ledger that is not the one the key's record names, or is behind it."""
        if record is None or self.binding is None:
            return
        mine, key = record.current, self.binding.record
        restore = (
            f"Restore that ledger (with its {MARK_FILE}) into {self.state_dir}, or start a new budget with "
            "`client.py join --new-privacy-budget` (reported to the coordinator's audit log)"
        )
        if data.ledger_id != mine.ledger_id:
            if data.new_budget is not None and data.new_budget.replaces == mine.ledger_id:
                return  # a new budget started, its record not yet written (a crash between the two)
            if not data.ledger_id and mine.steps == 0:
                return  # the key's ledger had spent nothing: nothing is lost
            held = "holds no privacy ledger" if not data.ledger_id else f"holds another ledger ({data.ledger_id})"
            raise LedgerError(
                f"{self.path}: this state directory {held}, but the budget record of this site's key, {key}, "
                f"records that the key's ledger {mine.ledger_id} ({mine.ledger}) spent {_describe(mine)}; "
                f"refusing DP training. {restore}"
            )
        if data.steps < mine.steps or len(data.rounds) < mine.rounds:
            raise LedgerError(
                f"{self.path}: holds {data.steps} steps over {len(data.rounds)} rounds, but the budget record of this "
                f"site's key, {key}, records {_describe(mine)}: an older copy; refusing DP training. {restore}"
            )
        now = spent_summary(self.path, data)
        if (data.steps, len(data.rounds)) == (mine.steps, mine.rounds) and not math.isclose(
            now.epsilon, mine.epsilon, rel_tol=EPSILON_RTOL, abs_tol=1e-12
        ):
            raise LedgerError(
                f"{self.path}: its last round records epsilon {now.epsilon!r}, but the budget record of this site's "
                f"key, {key}, records {mine.epsilon!r} for the same {mine.steps} steps: an edited copy; "
                "refusing DP training"
            )

    def _read(self) -> LedgerFile:
        data = self._read_file()
        self._check_record(data, self._read_record())
        return data

    def _probe_record(self) -> None:
        """Fail before reserving anything when the key's record could not be written."""
        if self.binding is None:
            return
        folder = self.binding.record.parent
        probe = folder / f".{self.binding.record.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise LedgerError(
                f"{self.binding.record}: cannot write the key's privacy budget record ({err}); refusing DP "
                "training (the record keeps the site's spend when the state directory is lost)"
            ) from None

    def _write(self, data: LedgerFile) -> None:
        # Ledger, mark, then the key's record: each a summary of the one before, so a crash
        # between two writes leaves a summary behind its ledger (accepted, caught up at the next
        # write), never ahead of it (which reads as a lost ledger).
        atomic_write_text(self.path, data.model_dump_json(indent=1))
        mark = LedgerMark(version=LEDGER_VERSION, ledger_id=data.ledger_id, steps=data.steps, rounds=len(data.rounds))
        atomic_write_text(self.mark_path, mark.model_dump_json(indent=1))
        self._write_record(data)

    def _write_record(self, data: LedgerFile, replaced: list[ReplacedLedger] | None = None) -> None:
        if self.binding is None:
            return
        previous = self._read_record()
        record = BudgetRecord(
            version=RECORD_VERSION,
            key_sha256=self.binding.key_sha256,
            current=spent_summary(self.path, data),
            replaced=[*(previous.replaced if previous is not None else []), *(replaced or [])],
            updated_at=time.time(),
        )
        try:
            write_record(self.binding.record, record)
        except OSError as err:
            raise LedgerError(
                f"{self.binding.record}: cannot write the key's privacy budget record ({err}); the ledger "
                f"{self.path} counts the spend; refusing DP training until the record can be written"
            ) from None

    def sync_record(self) -> LedgerFile:
        """Check the ledger against the key's record and bring the record up to it (a site that
        spent before it had a record, or a crash after the ledger's write); `join` calls it
        before the SuperNode starts. LedgerError when DP training would be refused."""
        with self._locked():
            data = self._read()
            self._probe_record()
            record = self._read_record()
            if data.ledger_id and (record is None or record.current != spent_summary(self.path, data)):
                self._write_record(data)
            return data

    def start_new_budget(self) -> NewBudget | None:
        """`join --new-privacy-budget`: where this state directory's ledger is refused (missing
        while the key's record says it spent, another ledger, damaged, edited), set it aside
        (renamed *.replaced-TIME) and start a new, empty ledger that says so (`new_budget`). The
        key's record keeps the given-up ledger's spend in `replaced`. None (nothing changed)
        where the ledger is accepted: the flag never discards a ledger that holds."""
        with self._locked():
            try:
                self._read()
                return None
            except LedgerError as err:
                why = str(err)
            self._probe_record()
            try:
                record = self._read_record()
            except LedgerError:
                record = None  # a damaged or foreign record is replaced by the new one
            now = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
            for path in (self.path, self.mark_path):
                if path.exists():
                    path.rename(path.with_name(f"{path.name}.replaced-{stamp}"))
            old = record.current if record is not None else None
            new_budget = NewBudget(
                started_at=now,
                replaces=old.ledger_id if old is not None else "",
                replaced_steps=old.steps if old is not None else None,
                replaced_epsilon=old.epsilon if old is not None else None,
            )
            data = LedgerFile(
                version=LEDGER_VERSION,
                mechanism=MECHANISM,
                ledger_id=uuid.uuid4().hex,
                history=[],
                rounds=[],
                new_budget=new_budget,
            )
            atomic_write_text(self.path, data.model_dump_json(indent=1))
            mark = LedgerMark(version=LEDGER_VERSION, ledger_id=data.ledger_id, steps=0, rounds=0)
            atomic_write_text(self.mark_path, mark.model_dump_json(indent=1))
            if self.binding is not None:
                gone = [ReplacedLedger(**old.model_dump(), replaced_at=now)] if old is not None else []
                if record is None and self.binding.record.exists():  # unreadable: keep it beside, for the admin
                    self.binding.record.rename(
                        self.binding.record.with_name(f"{self.binding.record.name}.replaced-{stamp}")
                    )
                self._write_record(data, replaced=gone)
        log.warning(
            "privacy ledger %s: NEW PRIVACY BUDGET started (--new-privacy-budget), ledger %s replacing %s "
            "(spent %s steps, epsilon %s); it was refused because: %s",
            self.path,
            data.ledger_id,
            new_budget.replaces or "(none known)",
            new_budget.replaced_steps if new_budget.replaced_steps is not None else "unknown",
            f"{new_budget.replaced_epsilon:.4g}" if new_budget.replaced_epsilon is not None else "unknown",
            why,
        )
        return new_budget

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
        run_limit: tuple[str, float] | None = None,
    ) -> Reservation:
        """Check the cap and count the round's `steps` in one step under the lock, before training.
        Raises BudgetExceeded (nothing written) when epsilon would pass `epsilon_cap`, or, with
        `run_limit` (a run label prefix, a limit), when the epsilon of the rounds whose run starts
        with that prefix, this one included, would pass the limit (one run's own spend: the
        accountant over those rounds alone)."""
        if steps <= 0:
            raise ValueError(f"cannot reserve {steps} steps")
        with self._locked():
            current = self._read()
            self._probe_record()  # a record that cannot be written refuses the round before it is counted
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
            if run_limit is not None:
                prefix, limit = run_limit
                mine = [
                    (r.noise_multiplier, r.sample_rate, r.steps) for r in current.rounds if r.run.startswith(prefix)
                ]
                run_spend = _epsilon([*mine, (noise_multiplier, sample_rate, steps)], delta)
                if not (math.isfinite(run_spend) and run_spend <= limit):
                    raise BudgetExceeded(
                        f"this run's epsilon after this round would be {run_spend:.4g} > its limit {limit:g} "
                        f"(spent {_epsilon(mine, delta) if mine else 0.0:.4g} in this run at delta {delta:g})"
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
                    new_budget=current.new_budget,
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
    "KeyBinding",
    "LedgerError",
    "LedgerFile",
    "LedgerRound",
    "NewBudget",
    "PrivacyLedger",
    "Reservation",
    "history_problem",
    "spent_summary",
]
