"""The release gate's rule and record (client/release_gate.py), on synthetic (subject,
fingerprint) pairs: the cells of every version released fresh hold 0 or at least the minimum of
subjects, so no linear combination of releases describes fewer; presence flips need the minimum
of changed subjects; a held field sends what it sent last; the record survives a restart and a
damaged one fails closed, naming the file."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.release_gate import RELEASED_DIR, Candidates, ReleaseGate, ReleaseGateError, candidates_of, read_record
from healthfm_core.privacy.contributions import FieldPairs

M = 5  # the minimum of subjects


def field(
    subjects: set[int],
    changed: dict[int, int] | None = None,
    present: bool = True,
    value: Any = "count",
    name: str = "x",
) -> Candidates:
    """One field over `subjects` (fingerprint 0, or `changed`'s), its value their count."""
    ids = np.array(sorted(subjects), np.int64)
    prints = np.array([(changed or {}).get(int(s), 0) for s in ids], np.uint64)
    return candidates_of({name: (ids, prints, present, len(ids) if value == "count" else value)})


def linear_span_isolates_one(versions: list[set[int]]) -> bool:
    """Whether some combination of the versions' indicator vectors (coefficients -2..2) is the
    indicator of one subject: what differencing their released sums could single out."""
    universe = sorted(set().union(*versions))
    rows = np.array([[s in v for s in universe] for v in versions], float)
    for coefficients in itertools.product(range(-2, 3), repeat=len(versions)):
        combined = np.array(coefficients) @ rows
        if np.count_nonzero(combined) == 1 and combined.max() == 1:
            return True
    return False


W, U, V, S = set(range(100, 130)), set(range(200, 200 + M)), set(range(300, 300 + M)), {999}


def test_four_versions_pairwise_far_apart_cannot_single_out_a_subject(tmp_path: Path) -> None:
    a, b, c, d = W | U | V | S, W | U, W | V, W  # pairwise at least M apart; A - B - C + D = S
    assert all(len(x ^ y) >= M for x, y in itertools.combinations([a, b, c, d], 2))
    assert linear_span_isolates_one([a, b, c, d])
    gate = ReleaseGate(tmp_path, "evaluation", M)
    released = [v for v in (a, b, c, d) if not gate.release(field(v)).held]
    assert released == [a, b, d]  # C would make S a cell of one subject
    assert not linear_span_isolates_one(released)


def test_budgets_one_apart_and_one_new_value_are_held_and_send_the_last_release() -> None:
    gate = ReleaseGate(None, "code_stats", M)
    assert gate.release(field(W)).values == {"x": 30}
    for candidate in (field(W | S), field(W - {100}), field(W, changed={100: 7})):
        decision = gate.release(candidate)
        assert decision.held == {"x"} and decision.values == {"x": 30}
    assert gate.release(field(W | U)).values == {"x": 35}  # M new subjects: fresh
    assert gate.release(field(W | U, changed={s: 1 for s in list(W)[:M]})).values == {"x": 35}
    # Back to an earlier version's exact pairs: released (it adds no cell).
    assert gate.release(field(W)).values == {"x": 30}


def test_presence_flips_need_the_minimum_of_changed_subjects() -> None:
    gate = ReleaseGate(None, "code_stats", M)
    rare = set(range(M - 1))  # below the floor: absent
    assert gate.release(field(rare, present=False, value=None)).values == {"x": None}
    # One more subject has it: present now, but it would say that subject has it.
    assert gate.release(field(rare | {50})).held == {"x"}
    assert gate.release(field(rare | set(range(50, 50 + M)))).values == {"x": 2 * M - 1}
    # Falling below the floor by one subject is held too; all gone is released (absent).
    assert gate.release(field(rare | set(range(50, 49 + M)), present=False, value=None)).held == {"x"}
    assert gate.release(field(set(), present=False, value=None)).values == {"x": None}


def test_a_group_is_released_or_held_whole_and_a_complete_set_ends_a_vanished_field() -> None:
    gate = ReleaseGate(None, "evaluation", M)

    def key(train: set[int], held: set[int]) -> Candidates:
        pairs = FieldPairs.of(
            {
                n: (np.array(sorted(s), np.int64), np.zeros(len(s), np.uint64))
                for n, s in (("k/train", train), ("k/held", held))
            }
        )
        return Candidates(pairs, [True, True], [None, None], groups=["k", "k"])

    assert not gate.release(key(W, U | V)).held
    assert gate.release(key(W | S, U | V | set(range(400, 400 + M)))).held == {"k/train", "k/held"}
    stats = ReleaseGate(None, "code_stats", M)
    both = candidates_of(
        {"a": (np.arange(M), np.zeros(M, np.uint64), True, 1), "b": (np.arange(M), np.zeros(M, np.uint64), True, 2)},
        complete=True,
    )
    assert stats.release(both).values == {"a": 1, "b": 2}
    only_a = candidates_of({"a": (np.arange(M), np.zeros(M, np.uint64), True, 1)}, complete=True)
    assert stats.release(only_a).values == {"a": 1, "b": None}  # b's M subjects are gone: absent


def test_the_record_survives_a_restart_and_fails_closed_when_damaged(tmp_path: Path) -> None:
    gate = ReleaseGate(tmp_path, "code_stats", M)
    gate.release(field(W))
    gate.release(field(W | U))
    path = tmp_path / RELEASED_DIR / "code_stats.parquet"
    assert ReleaseGate(tmp_path, "code_stats", M).release(field(W | U | S)).values == {"x": 35}  # still held
    assert ReleaseGate(tmp_path, "code_stats", M).release(field(W | S)).held == {"x"}  # a cell of one
    intact = path.read_bytes()
    table = pq.read_table(path)
    meta = table.schema.metadata
    edits = {
        "truncated": intact[:-64],
        "a row dropped": _parquet(table.slice(1), meta),
        "a manifest edited": _parquet(
            table, {**meta, b"healthfm.released": meta[b"healthfm.released"].replace(b"35", b"36")}
        ),
        "no manifest": _parquet(table, {}),
    }
    for what, data in edits.items():
        path.write_bytes(data)
        with pytest.raises(ReleaseGateError, match=f"^{path}: .*damaged"):
            ReleaseGate(tmp_path, "code_stats", M)
        print(what, "refused")
    path.write_bytes(intact)
    assert read_record(path, "code_stats").fields[0].released == 35


def _parquet(table: pa.Table, metadata: dict[bytes, bytes]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(metadata), sink)
    return sink.getvalue().to_pybytes()


def test_the_record_grows_with_pairs_not_with_releases(tmp_path: Path) -> None:
    gate = ReleaseGate(tmp_path, "code_stats", M)
    for _ in range(20):
        gate.release(field(W))  # every launch with nothing changed: one version
    path = tmp_path / RELEASED_DIR / "code_stats.parquet"
    assert pq.read_table(path).num_rows == len(W)
    assert read_record(path, "code_stats").fields[0].states == [True]
