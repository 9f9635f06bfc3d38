"""The audit log: the federation's security record, OUT_DIR/audit.jsonl.

JSON lines, append-only, each record flushed and fsynced before the run goes on, each chained to
the one before it (`prev_sha256`: the sha256 of the previous line's bytes; "" for the first), so
a deleted, edited or reordered record is detected by `verify_audit_log`. The chain alone cannot
catch an edit or a deletion of its last records (what is left still chains), so the log's head is
anchored beside it: OUT_DIR/audit.anchor.json (`AuditAnchor`: the record count and the sha256 of
the last line), rewritten (atomically) after each record is appended. `check_audit_log` reads both
and says "verified" only when the chain holds and its head is the anchor's; `verify_audit_log`
raises otherwise. A log one or more records ahead of its anchor, whose first records end at the
anchor's head, is a write between the two files (or a crash there): said so, not verified, and
anchored again by the next AuditLog opened on it; one that is shorter than its anchor or whose
head differs was cut or edited: a resumed run's AuditLog then writes an `anchor-mismatch` record
(what the anchor said, what it found) before going on, so the chain carries the evidence.

Records:
  {"record": "run", ...}         at the start of every run and resume: round completed so far, the
                                 sites (node id, modalities, subject counts, groups), the limits
  {"record": "site-round", ...}  per round and per site addressed: status (ok | rejected | refused |
                                 error | no reply), reason, groups sent / returned / contributed
                                 to the average, num-examples per group, the site's reported
                                 cumulative epsilon and delta, bytes received; and
                                 `new_privacy_budget` ({"started_at", "replaced_epsilon"}) when
                                 the site's admin started its privacy ledger anew (`join
                                 --new-privacy-budget`): its epsilon counts from then

  {"record": "secure-aggregation", ...}  per round under secure aggregation: the groups unmasked
                                 (and their sites), the groups withheld (carried forward) and why,
                                 the sites that dropped out before / after masking, and the error
                                 that failed the round, if one did (server/secure_round.py)
  {"record": "evaluation", ...}  per federated evaluation: the sites that reported, and every
                                 site of the run that did not, with why (`absent`)
  {"record": "anchor-mismatch", ...}  an AuditLog opened on a log that disagrees with its anchor
                                 (cut or edited after the anchor was written): the anchor's
                                 `anchor_records`, `anchor_sha256` and what was found,
                                 `found_records`, `found_sha256`

A site of the run that was not addressed in a round (not connected, or it refused the setup) has a
site-round record too, status "absent" with the reason: every site absent from a round is on record.

rounds.jsonl holds the same facts inside its round events (with timings, losses, ...): a
site-round record is *derived* from a round event by `site_round_records`, the one builder used
both by the ServerApp as the round ends and by `audit_from_rounds` (rebuild or cross-check an
audit log from rounds.jsonl).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import DuplicateKeyError, StrictFileError, strict_json, strict_model

AUDIT_FILE = "audit.jsonl"
ANCHOR_SUFFIX = ".anchor.json"  # audit.jsonl -> audit.anchor.json


def site_round_records(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The audit records of one round event (a rounds.jsonl `round` object, or the same fields):
    one per site, sorted by site name."""
    rnd = int(event["round"])
    contributors: Mapping[str, list[str]] = event.get("contributors") or {}
    rejected: dict[str, list[str]] = {}
    for r in event.get("rejected") or []:
        rejected.setdefault(r["site"], []).append(r["reason"])
    out = []
    for site, entry in sorted(event["sites"].items()):
        dp = entry.get("dp") or {}
        budget = (
            {"new_privacy_budget": {"started_at": dp["new_budget_at"], "replaced_epsilon": dp.get("replaced_epsilon")}}
            if dp.get("new_budget_at") is not None
            else {}
        )
        out.append(
            {
                "record": "site-round",
                "round": rnd,
                "site": site,
                "node_id": entry.get("node_id"),
                "status": entry.get("status", "no reply"),
                "reason": entry.get("reason"),
                "rejected": rejected.get(site, []),
                "groups_sent": list(entry.get("groups_sent", [])),
                "groups_received": list(entry.get("groups_received", [])),
                "groups_contributed": sorted(g for g, sites in contributors.items() if site in sites),
                "num_examples": dict(entry.get("num_examples", {})),
                "epsilon": dp.get("epsilon"),
                "delta": dp.get("delta"),
                "bytes_received": entry.get("bytes_received", 0),
                # its update scaled down to the other holders' median (server/clipping.py)
                **({"clipped": dict(entry["clipped"])} if entry.get("clipped") else {}),
                **budget,
            }
        )
    return out


def round_records(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every audit record of one round event: its site-round records, then (secure aggregation)
    its secure-aggregation record."""
    out = site_round_records(event)
    secure = event.get("secure_aggregation")
    if secure is not None:
        out.append({"record": "secure-aggregation", "round": int(event["round"]), **dict(secure)})
    return out


def run_record(event: Mapping[str, Any], limits: Mapping[str, Any]) -> dict[str, Any]:
    """The audit record of a run's start (a rounds.jsonl `setup` or `resume` event) and its limits."""
    return {
        "record": "run",
        "resumed": event.get("event") == "resume",
        "round": int(event["round"]),
        "setup_sha256": event.get("setup_sha256"),
        "checkpoint": event.get("checkpoint"),
        "sites": dict(event.get("sites", {})),
        "limits": dict(limits),
    }


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


class AuditAnchor(BaseModel):
    """The log's head, written beside it after every record (audit.anchor.json)."""

    model_config = ConfigDict(extra="forbid")

    records: int = Field(ge=0)
    head_sha256: str  # the sha256 of the last record's line ("" with no record)
    time: float


def anchor_path(path: str | Path) -> Path:
    """Where the anchor of the audit log at `path` lies: audit.jsonl -> audit.anchor.json."""
    path = Path(path)
    return path.with_name(path.stem + ANCHOR_SUFFIX)


def read_anchor(path: str | Path) -> AuditAnchor | None:
    """The anchor of the audit log at `path` (None: there is none); AuditLogError naming the file
    when it does not parse."""
    where = anchor_path(path)
    try:
        text = where.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise AuditLogError(f"{where}: cannot read the audit log's anchor ({err})") from None
    try:
        return strict_model(AuditAnchor, text, where)
    except (StrictFileError, ValidationError, ValueError) as err:
        raise AuditLogError(f"{where}: not an audit anchor ({' '.join(str(err).split())[:300]})") from None


def _write_anchor(path: Path, records: int, head: str) -> None:
    anchor = AuditAnchor(records=records, head_sha256=head, time=time.time())
    atomic_write_text(anchor_path(path), anchor.model_dump_json() + "\n", mode=0o600)


class AuditLog:
    """Appends records to OUT_DIR/audit.jsonl (fsync per record) and anchors its head beside it; a
    resumed run continues the chain (after an `anchor-mismatch` record when the log disagrees with
    its anchor: see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hashes: list[str] = []
        if self.path.is_file():
            with open(self.path, "rb") as fh:
                hashes = [_line_hash(line.rstrip(b"\n")) for line in fh if line.strip()]
        self._prev, self._records = (hashes[-1] if hashes else ""), len(hashes)
        try:
            anchor, unreadable = read_anchor(self.path), ""
        except AuditLogError as err:
            anchor, unreadable = None, str(err)
        if anchor is None and not hashes and not unreadable:
            return  # a new log: anchored by its first record
        if anchor is not None and anchor.records == len(hashes) and anchor.head_sha256 == self._prev:
            return
        if anchor is not None and 0 < anchor.records < len(hashes) and hashes[anchor.records - 1] == anchor.head_sha256:
            _write_anchor(self.path, self._records, self._prev)  # records after it: a stop between the two writes
            return
        # Cut, edited, or its anchor missing (a log from before anchors, or the anchor deleted):
        # the chain says so before it goes on, and is anchored again from here.
        self.write(
            {
                "record": "anchor-mismatch",
                "anchor_records": anchor.records if anchor is not None else None,
                "anchor_sha256": anchor.head_sha256 if anchor is not None else None,
                "anchor_problem": unreadable or ("no anchor" if anchor is None else ""),
                "found_records": len(hashes),
                "found_sha256": self._prev,
            }
        )

    def write(self, record: Mapping[str, Any]) -> None:
        full = {"time": time.time(), **record, "prev_sha256": self._prev}
        line = json.dumps(full, sort_keys=True, default=_json_default).encode("utf-8")
        # O_APPEND: concurrent writers cannot overwrite each other; one write() per record.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        self._prev = _line_hash(line)
        self._records += 1
        _write_anchor(self.path, self._records, self._prev)

    def write_run(self, event: Mapping[str, Any], limits: Mapping[str, Any]) -> None:
        self.write(run_record(event, limits))

    def write_round(self, event: Mapping[str, Any]) -> None:
        for record in round_records(event):
            self.write(record)

    def write_evaluation(self, rnd: int, reported: list[str], absent: Mapping[str, str]) -> None:
        self.write({"record": "evaluation", "round": rnd, "reported": list(reported), "absent": dict(absent)})


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class AuditLogError(ValueError):
    """An audit log whose chain of hashes is broken (edited, truncated inside, reordered)."""


def _chained(line: bytes, number: int, prev: str, path: Path) -> tuple[dict[str, Any], str]:
    """Line `number` of an audit log (no newline) checked against the previous line's sha256: its
    record and its own sha256 (AuditLogError naming the line where the chain breaks)."""
    try:
        record = strict_json(line, f"{path} line {number}")
    except StrictFileError as err:
        raise AuditLogError(str(err)) from None
    if record.get("prev_sha256") != prev:
        raise AuditLogError(
            f"{path} line {number}: field prev_sha256 {str(record.get('prev_sha256'))[:12]!r} "
            f"does not match the previous line ({prev[:12]!r}): edited or reordered"
        )
    return record, _line_hash(line)


def read_audit_log(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of an audit log, verifying the chain as it goes (AuditLogError on a break; its
    tail against the anchor: check_audit_log)."""
    path, prev = Path(path), ""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\n")
            if line.strip():
                record, prev = _chained(line, number, prev, path)
                yield record


class AuditCheck(BaseModel):
    """An audit log checked: its chain from the first record and its head against the anchor."""

    records: int  # records that chain (up to the break, if any)
    problem: str = ""  # where the chain breaks, or why its head is not the anchor's ("": verified)
    after_anchor: int = 0  # records after an anchor that matches the ones before (a write in progress)
    mismatches: list[dict[str, Any]] = Field(default_factory=list)  # its anchor-mismatch records

    @property
    def verified(self) -> bool:
        return not self.problem


class ChainReader:
    """An audit log's chain read so far: `feed` it the log's whole lines as they are appended (the
    dashboard reads only what a growing log added), `check` it against the anchor."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.hashes: list[str] = []  # each record's line sha256
        self.mismatches: list[dict[str, Any]] = []
        self.problem = ""  # where the chain broke (nothing after it is read)
        self.lines = 0  # lines consumed, blank ones too (the next line's number is lines + 1)

    def feed(self, data: bytes) -> None:
        """Whole lines (each ending in a newline) that follow what was fed before."""
        for raw in data.splitlines():
            self.lines += 1
            if self.problem or not raw.strip():
                continue
            try:
                record, digest = _chained(raw, self.lines, self.hashes[-1] if self.hashes else "", self.path)
            except AuditLogError as err:
                self.problem = str(err)
                continue
            self.hashes.append(digest)
            if record.get("record") == "anchor-mismatch":
                self.mismatches.append(record)

    def check(self, anchor: AuditAnchor | None) -> AuditCheck:
        """The chain read so far against `anchor` (read before the log's bytes: a record appended
        between the two reads is after the anchor, never a cut)."""
        hashes, where = self.hashes, anchor_path(self.path)
        head = hashes[-1] if hashes else ""
        after = 0
        if self.problem:
            problem = self.problem
        elif anchor is None:
            problem = f"{where} not found: the log's last records cannot be checked (a cut or edited tail goes unseen)"
        elif anchor.records == len(hashes) and anchor.head_sha256 == head:
            problem = ""
        elif 0 < anchor.records < len(hashes) and hashes[anchor.records - 1] == anchor.head_sha256:
            after = len(hashes) - anchor.records
            problem = (
                f"{after} record(s) after its anchor {where} ({anchor.records} records): being written, "
                "or appended by something else"
            )
        else:
            problem = (
                f"its last records do not match its anchor {where}: {len(hashes)} records ending "
                f"{head[:12] or 'nowhere'}, the anchor says {anchor.records} ending {anchor.head_sha256[:12]}: "
                "its tail was cut or edited"
            )
        return AuditCheck(records=len(hashes), problem=problem, after_anchor=after, mismatches=list(self.mismatches))


def check_audit_log(path: str | Path) -> AuditCheck:
    """The chain and its anchor (module docstring): `verified` only when every record chains to the
    one before and the last is the one the anchor names, at the anchor's count."""
    reader = ChainReader(path)
    try:
        anchor = read_anchor(path)  # first: a record appended after this read is ahead of it, not a cut
        data = reader.path.read_bytes()
    except (AuditLogError, OSError) as err:
        return AuditCheck(records=0, problem=str(err))
    reader.feed(data[: data.rfind(b"\n") + 1])  # a last line without its newline is still being written
    return reader.check(anchor)


def read_audit_lines(path: str | Path) -> list[dict[str, Any]]:
    """The records of an audit log without checking the chain (a missing file: none; a line that
    is not a JSON object: skipped), for a resume that only asks what is already recorded."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            record = strict_json(line, path)
        except DuplicateKeyError:  # not a line cut short: one written so
            raise
        except StrictFileError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def verify_audit_log(path: str | Path) -> int:
    """Check the whole chain and its anchor (AuditLogError saying where it fails); the number of records."""
    check = check_audit_log(path)
    if not check.verified:
        raise AuditLogError(check.problem)
    return check.records


def audit_from_rounds(rounds_path: str | Path) -> list[dict[str, Any]]:
    """The round records (round_records) that rounds.jsonl implies (without time and chain fields), in order."""
    out: list[dict[str, Any]] = []
    for line in Path(rounds_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            event = strict_json(line, rounds_path)
            if event.get("event") == "round":
                out.extend(round_records(event))
    return out


__all__ = [
    "AUDIT_FILE",
    "AuditAnchor",
    "AuditCheck",
    "AuditLog",
    "AuditLogError",
    "ChainReader",
    "anchor_path",
    "check_audit_log",
    "audit_from_rounds",
    "read_audit_lines",
    "read_anchor",
    "read_audit_log",
    "round_records",
    "run_record",
    "site_round_records",
    "verify_audit_log",
]
