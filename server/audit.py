"""The audit log: the federation's security record, OUT_DIR/audit.jsonl.

JSON lines, append-only, each record flushed and fsynced before the run goes on, each chained to
the one before it (`prev_sha256`: the sha256 of the previous line's bytes; "" for the first), so
a deleted, edited or reordered record is detected by `verify_audit_log`.

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

from healthfm_core.strict_files import DuplicateKeyError, StrictFileError, strict_json

AUDIT_FILE = "audit.jsonl"


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


class AuditLog:
    """Appends records to OUT_DIR/audit.jsonl (fsync per record); a resumed run continues the chain."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = ""
        if self.path.is_file():
            last = b""
            with open(self.path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        last = line.rstrip(b"\n")
            self._prev = _line_hash(last) if last else ""

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


def read_audit_log(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of an audit log, verifying the chain as it goes (AuditLogError on a break)."""
    path = Path(path)
    prev = ""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = raw.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                record = strict_json(line, f"{path} line {number}")
            except StrictFileError as err:
                raise AuditLogError(str(err)) from None
            if record.get("prev_sha256") != prev:
                raise AuditLogError(
                    f"{path} line {number}: field prev_sha256 {str(record.get('prev_sha256'))[:12]!r} "
                    f"does not match the previous line ({prev[:12]!r}): edited or reordered"
                )
            prev = _line_hash(line)
            yield record


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
    """Check the whole chain; the number of records."""
    return sum(1 for _ in read_audit_log(path))


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
    "AuditLog",
    "AuditLogError",
    "audit_from_rounds",
    "read_audit_lines",
    "read_audit_log",
    "round_records",
    "run_record",
    "site_round_records",
    "verify_audit_log",
]
