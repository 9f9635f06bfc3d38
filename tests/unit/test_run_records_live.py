"""The run's records the dashboard reads while a run goes (issue 69): live.json as the ServerApp's
writer leaves it at each phase, the audit log's anchor (its tail edited, cut, or a stop between
the two writes), and the dashboard's reads of growing files, which must equal a whole read."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from server.audit import (
    AUDIT_FILE,
    AuditLog,
    AuditLogError,
    anchor_path,
    check_audit_log,
    read_anchor,
    read_audit_log,
    verify_audit_log,
)
from server.deploy.dashboard.files import RunFiles
from server.live_round import AGGREGATING, ENDED, LIVE_FILE, TRAINING, WAITING_FOR_SITES, LiveRound, LiveState
from server.runlog import EventLog, read_events


def live(path: Path) -> LiveState:
    return LiveState.model_validate_json((path / LIVE_FILE).read_bytes())


def test_live_json_follows_the_phases(tmp_path: Path) -> None:
    writer = LiveRound(tmp_path, run_id=5, rounds=3)
    writer.begin_round(2)
    writer.waiting_for_sites(["biobank"], 3, 60.0)
    first = live(tmp_path)
    assert (first.round, first.phase, first.connected, first.required, first.limit_s) == (
        2,
        WAITING_FOR_SITES,
        ["biobank"],
        3,
        60.0,
    )
    writer.waiting_for_sites(["genomics", "biobank"], 3, 60.0)  # who is connected changed: the same wait
    second = live(tmp_path)
    assert second.connected == ["biobank", "genomics"] and second.since == first.since
    writer.sent(TRAINING, {"hospital": ["ehr", "shared"], "biobank": ["shared"]})
    writer.replied("biobank")
    writer.replied("nobody")  # not addressed: nothing changes
    state = live(tmp_path)
    assert state.phase == TRAINING and state.groups == {"ehr": ["hospital"], "shared": ["biobank", "hospital"]}
    assert state.waiting_for == ["hospital"] and list(state.replied) == ["biobank"]
    writer.replied("hospital", "Error: Node Unavailable")  # the SuperLink answers for a dead node
    assert live(tmp_path).errors == {"hospital": "Error: Node Unavailable"} and live(tmp_path).waiting_for == []
    writer.phase(AGGREGATING)
    writer.aggregated(2, {"biobank": {"status": "ok"}, "hospital": {"status": "no reply", "reason": "timeout"}},
                      contributors={"shared": ["biobank"]}, under_holders_control={"shared": ["biobank"]},
                      losses={"total": 1.5}, updated=True)  # fmt: skip
    state = live(tmp_path)
    assert state.phase == AGGREGATING and state.waiting_for == [] and state.last is not None
    assert state.last.statuses == {"biobank": "ok", "hospital": "no reply"} and state.last.reasons == {
        "hospital": "timeout"
    }
    writer.ended()
    assert live(tmp_path).phase == ENDED and live(tmp_path).last == state.last  # the last round kept


def test_a_live_file_that_cannot_be_written_never_stops_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / LIVE_FILE).mkdir()  # a directory where the file goes: every write fails
    writer = LiveRound(tmp_path, run_id=1, rounds=1)
    with caplog.at_level(logging.WARNING, logger="healthfm.server"):
        writer.phase(TRAINING)
        writer.phase(AGGREGATING)
    assert len([r for r in caplog.records if "live state" in r.getMessage()]) == 1  # said once
    LiveRound().phase(TRAINING)  # without an out-dir: nothing written, nothing raised


def _log(tmp_path: Path, records: int) -> Path:
    path = tmp_path / AUDIT_FILE
    log = AuditLog(path)
    for i in range(records):
        log.write_evaluation(i, ["biobank"], {})
    return path


def test_the_anchor_catches_the_last_record_cut_or_edited(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    anchor = read_anchor(path)
    assert anchor is not None and anchor.records == 3 and verify_audit_log(path) == 3
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    assert len(list(read_audit_log(path))) == 2  # the chain alone sees nothing
    with pytest.raises(AuditLogError, match="its tail was cut or edited"):
        verify_audit_log(path)
    path.write_bytes(b"".join([*lines[:-1], lines[-1].replace(b'"round": 2', b'"round": 7')]))
    with pytest.raises(AuditLogError, match="3 records ending"):
        verify_audit_log(path)
    path.write_bytes(b"".join(lines))
    anchor_path(path).unlink()
    check = check_audit_log(path)
    assert not check.verified and "not found" in check.problem


def test_a_stop_between_the_two_writes_is_anchored_again_and_a_cut_is_recorded(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    kept = anchor_path(path).read_bytes()
    AuditLog(path).write_evaluation(2, [], {})
    anchor_path(path).write_bytes(kept)  # the record written, its anchor not: a stop between the two
    check = check_audit_log(path)
    assert check.after_anchor == 1 and not check.verified
    AuditLog(path)  # the run resumed
    assert verify_audit_log(path) == 3  # anchored again, nothing recorded: a write, not a cut
    assert not [r for r in read_audit_log(path) if r["record"] == "anchor-mismatch"]

    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-1]))  # cut
    AuditLog(path).write_evaluation(3, [], {})
    records = list(read_audit_log(path))
    assert verify_audit_log(path) == 4
    [mismatch] = [r for r in records if r["record"] == "anchor-mismatch"]
    assert (mismatch["anchor_records"], mismatch["found_records"]) == (3, 2)
    assert check_audit_log(path).mismatches == [mismatch]


def test_growing_files_are_read_as_a_whole_read_reads_them(tmp_path: Path) -> None:
    files = RunFiles()

    def read(path: Path) -> list[dict[str, Any]]:  # every event folded, in order, as the file grew
        return files.fold(path, "events", list, list.append, list) or []

    events = EventLog(tmp_path / "rounds.jsonl")
    audit = AuditLog(tmp_path / AUDIT_FILE)
    for rnd in range(1, 6):
        events.write("round", round=rnd, sites={})
        audit.write_evaluation(rnd, ["biobank"], {})
        assert read(events.path) == read_events(events.path)
        assert files.audit(audit.path) == check_audit_log(audit.path)
        assert [e["round"] for e in read(events.path)] == list(range(1, rnd + 1))
    # A line being written (no newline yet) waits for its end.
    with open(events.path, "a") as fh:
        fh.write('{"event": "round", "round": 6')
    assert len(read(events.path)) == 5
    with open(events.path, "a") as fh:
        fh.write(', "sites": {}}\n')
    assert read(events.path) == read_events(events.path) and len(read_events(events.path)) == 6
    # An edit before the end (same size): read again from the start, never the stale parse.
    text = events.path.read_text().replace('"round": 2', '"round": 9')
    stat = events.path.stat()
    events.path.write_text(text)
    os.utime(events.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even its time put back
    assert [e["round"] for e in read(events.path)] == [1, 9, 3, 4, 5, 6]
    lines = audit.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"round": 2', b'"round": 8')
    audit.path.write_bytes(b"".join(lines))
    check = files.audit(audit.path)
    assert check is not None and "line 3" in check.problem and check == check_audit_log(audit.path)
    assert json.loads(anchor_path(audit.path).read_text())["records"] == 5
