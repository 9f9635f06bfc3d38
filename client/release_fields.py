"""The fields of each message a site sends, as the release gate sees them (client/release_gate.py):
which figure is one field, which subjects contribute to it and with what fingerprint
(healthfm_core/privacy/contributions.py), when it is present, and the message rebuilt from what
the gate lets leave.

  capabilities   subjects.<modality> (each subject with the modality; absent, sent as 0, below
                 the policy's minimum), rows (each subject's event rows and epochs)
  code_stats     totals (n_subjects, n_events: each subject's event rows), wearables
                 (n_wearable_subjects), code/<code> (the subject's rows of the code, by value;
                 absent below min_code_subjects: not named), channel/<channel>
  evaluation     task/<key>/<split> (the subject's labelled rows and record; present from
                 min_report_subjects subjects; a task key's splits are one group), count/rows
                 (num_examples: the embedded rows), count/held_out (the held-out subjects a
                 sample was drawn from)

The head's statistics, updates and tuning losses are its task key's train and tuning fields, the
same as the evaluation's (client/head_rows.py), so a head release and an evaluation of the same
rows are one version, and two of different rows are cells of one diagram.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from client.release_gate import Candidates, Decision, candidates_of
from healthfm_core.data.files.layout import HELD_OUT_SPLIT, SPLITS
from healthfm_core.data.sequences.code_stats import CodeStats, NumericStats, SiteCodeStats
from healthfm_core.privacy.contributions import (
    FieldPairs,
    SiteContributions,
    count_fingerprint,
    label_fingerprints,
    row_fingerprints,
)
from healthfm_core.protocol import SiteCapabilities, TaskReason

_CODE, _CHANNEL, _TOTALS, _WEARABLES = "code/", "channel/", "totals", "wearables"
_SUBJECTS, _ROWS = "subjects.", "rows"
ROWS_FIELD, HELD_OUT_FIELD = "count/rows", "count/held_out"


def _presence(subjects: np.ndarray) -> np.ndarray:
    """The fingerprint of a figure that only counts a subject (it has the modality, or epochs)."""
    return np.zeros(len(subjects), np.uint64)


def capabilities_candidates(
    caps: SiteCapabilities, modality_subjects: Callable[[str], np.ndarray], site: SiteContributions
) -> Candidates:
    parts: dict[str, tuple[np.ndarray, np.ndarray, bool, Any]] = {}
    for modality, n in sorted(caps.subjects.items()):
        ids = np.unique(np.asarray(modality_subjects(modality), np.int64))
        parts[_SUBJECTS + modality] = (ids, _presence(ids), n > 0, int(n))
    has = (site.events > 0) | (site.epochs > 0)
    rows = count_fingerprint(site.events[has], site.epochs[has])
    parts[_ROWS] = (site.subject[has], rows, True, int(caps.rows))
    return candidates_of(parts, complete=True)


def released_capabilities(caps: SiteCapabilities, decision: Decision) -> SiteCapabilities:
    """The capabilities as they leave: each count as released (a modality's count never
    released is left out: the server then counts the modality as held, as before counts)."""
    values = decision.values
    subjects = {m: int(values[_SUBJECTS + m]) for m in caps.subjects if values.get(_SUBJECTS + m) is not None}
    rows = values.get(_ROWS)
    return caps.model_copy(update={"subjects": subjects, "rows": int(rows) if rows is not None else 0})


def released_subject_counts(values: Mapping[str, Any]) -> dict[str, int]:
    """Subjects per modality as the capabilities released them last (ReleaseGate.released)."""
    return {n[len(_SUBJECTS) :]: int(v) for n, v in values.items() if n.startswith(_SUBJECTS) and v is not None}


def code_stats_candidates(stats: SiteCodeStats, site: SiteContributions) -> Candidates:
    """Every code and channel the site has (named or not), its totals and wearable count."""
    has_events, has_epochs = site.events > 0, site.epochs > 0
    totals = FieldPairs(
        [_TOTALS],
        np.zeros(int(has_events.sum()), np.int32),
        site.subject[has_events],
        count_fingerprint(site.events[has_events]),
    )
    wearers = site.subject[has_epochs]
    wearables = FieldPairs([_WEARABLES], np.zeros(len(wearers), np.int32), wearers, _presence(wearers))
    pairs = FieldPairs.joined([("", totals), ("", wearables), (_CODE, site.codes), (_CHANNEL, site.channels)])
    present, values = (
        [True, stats.n_wearable_subjects > 0],
        [
            {"n_subjects": stats.n_subjects, "n_events": stats.n_events},
            stats.n_wearable_subjects,
        ],
    )
    for name in pairs.names[2:]:
        kind, _, key = name.partition("/")
        got: CodeStats | NumericStats | None = (stats.codes if kind + "/" == _CODE else stats.wearables).get(key)
        present.append(got is not None)
        values.append(got.model_dump(mode="json") if got is not None else None)
    return Candidates(pairs, present, values, complete=True)


def released_code_stats(stats: SiteCodeStats, decision: Decision) -> SiteCodeStats:
    """The statistics as they leave: every field as the gate let it (its last released value
    when held; a code or channel never released is not named)."""
    values = decision.values
    totals = values.get(_TOTALS) or {"n_subjects": 0, "n_events": 0}
    codes = {
        name[len(_CODE) :]: CodeStats.model_validate(v)
        for name, v in values.items()
        if name.startswith(_CODE) and v is not None
    }
    channels = {
        name[len(_CHANNEL) :]: NumericStats.model_validate(v)
        for name, v in values.items()
        if name.startswith(_CHANNEL) and v is not None
    }
    return SiteCodeStats(
        min_subjects=stats.min_subjects,
        n_subjects=int(totals["n_subjects"]),
        n_events=int(totals["n_events"]),
        codes=dict(sorted(codes.items())),
        n_wearable_subjects=int(values.get(_WEARABLES) or 0),
        wearables=dict(sorted(channels.items())),
    )


def task_field(key: str, split: str) -> str:
    return f"task/{key}/{split}"


def task_candidates(
    labels: Mapping[str, pa.Table | TaskReason],
    split_of: Callable[[np.ndarray], np.ndarray],
    site: SiteContributions,
    minimum: int,
    splits: Sequence[str] = SPLITS,
    extra: Mapping[str, tuple[np.ndarray, np.ndarray, bool, Any]] | None = None,
) -> Candidates:
    """Each task key's `splits` (a key's rows there and its subjects' records; present from
    `minimum` subjects), one group per key; `extra` fields (a count) each its own group."""
    parts: dict[str, tuple[np.ndarray, np.ndarray, bool, Any]] = {}
    groups: dict[str, str] = {}
    for key, table in labels.items():
        if isinstance(table, TaskReason):
            continue  # no labels here: nothing counted leaves (the reason has no count)
        by_split = label_fingerprints(table, split_of(table["subject_id"].to_numpy()), site)
        for split in splits:
            ids, fingerprints = by_split.get(split, (np.zeros(0, np.int64), np.zeros(0, np.uint64)))
            parts[task_field(key, split)] = (ids, fingerprints, len(ids) >= minimum, None)
            groups[task_field(key, split)] = key
    for name, part in (extra or {}).items():
        parts[name], groups[name] = part, name
    pairs = FieldPairs.of({n: (p[0], p[1]) for n, p in parts.items()})
    return Candidates(
        pairs,
        [parts[n][2] for n in pairs.names],
        [parts[n][3] for n in pairs.names],
        groups=[groups[n] for n in pairs.names],
    )


def held_keys(decision: Decision) -> set[str]:
    """The task keys the gate held."""
    return {name.split("/")[1] for name in decision.held if name.startswith("task/")}


def held_out_count(
    split_ids: Mapping[str, np.ndarray], minimum: int
) -> tuple[np.ndarray, np.ndarray, bool, int | None]:
    """The held-out subjects a sample is drawn from (TaskMetrics.available_subjects)."""
    ids = np.unique(np.asarray(split_ids[HELD_OUT_SPLIT], np.int64))
    present = len(ids) >= minimum
    return ids, _presence(ids), present, len(ids) if present else None


def rows_count(tables: Sequence[pa.Table], site: SiteContributions, minimum: int) -> Candidates:
    """num_examples: the distinct (subject, prediction time) rows of the tables (those embedded)."""
    if tables:
        union = pa.concat_tables(
            [t.select(["subject_id", "prediction_time"]) for t in tables], promote_options="default"
        )
        union = union.group_by(["subject_id", "prediction_time"]).aggregate([])
        ids, fingerprints = row_fingerprints(
            union["subject_id"].to_numpy(), union["prediction_time"].cast(pa.int64()).to_numpy(), site
        )
    else:
        ids, fingerprints, union = np.zeros(0, np.int64), np.zeros(0, np.uint64), None
    present = len(ids) >= minimum
    n = union.num_rows if union is not None and present else 0  # below the minimum: not said
    return candidates_of({ROWS_FIELD: (ids, fingerprints, present, n)})


__all__ = [
    "HELD_OUT_FIELD",
    "ROWS_FIELD",
    "capabilities_candidates",
    "code_stats_candidates",
    "held_keys",
    "held_out_count",
    "released_capabilities",
    "released_code_stats",
    "released_subject_counts",
    "rows_count",
    "task_candidates",
    "task_field",
]
