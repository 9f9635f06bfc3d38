"""Issue 67, finding 6: every count a site releases, in a metric or in a reason, obeys the floor
in subjects. A withheld task's reason read "held_out ... 23 positives": 23 rows of 4 patients,
below the site's floor of 5 subjects. Now a count that fewer than the minimum of distinct
subjects stand behind is SMALL_CELL (shown "<5"), and a reason or metric that holds one can be
neither built at the site nor read from a reply."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from healthfm_core.eval.site_eval import held_out_class_subjects, task_split_counts, withheld_reason
from healthfm_core.protocol import SMALL_CELL, EvalReply, SplitCount, TaskMetrics, TaskReason

FLOOR = 5


def labels(held_out: list[tuple[int, bool]]) -> tuple[pa.Table, dict[int, str]]:
    """Labels whose train and tuning splits are large and whose held_out split holds `held_out`
    rows (subject, label)."""
    rows = [(1000 + i, i % 3 == 0) for i in range(60)] + [(2000 + i, i % 2 == 0) for i in range(20)] + held_out
    table = pa.table({"subject_id": pa.array([s for s, _ in rows], pa.int64()), "boolean_value": [y for _, y in rows]})
    split = {s: "train" if s < 2000 else "tuning" if s < 3000 else "held_out" for s, _ in rows}
    return table, split


def reason_of(held_out: list[tuple[int, bool]]) -> TaskReason:
    table, split = labels(held_out)
    split_of = np.vectorize(split.get, otypes=[object])
    counts, classes = task_split_counts(table, split_of), held_out_class_subjects(table, split_of)
    reason = withheld_reason(counts, FLOOR, True, FLOOR, held_out_classes=classes)
    assert reason is not None
    return reason


def test_a_reason_from_four_subjects_23_positive_rows_shows_no_23() -> None:
    # 23 positive rows of 4 patients (and 7 negative rows of those and one more): too few subjects.
    held = [(3000 + i % 4, True) for i in range(23)] + [(3000 + i % 5, False) for i in range(7)]
    reason = reason_of(held)
    assert reason.kind == "too_few_positives"  # 5 subjects, 4 of them with a positive row
    records = EvalReply(reasons={"onset": reason}, withheld=1, min_subjects=FLOOR).to_records()
    assert 23 not in records.values() and records["onset.held_out.positives"] == SMALL_CELL
    assert "23" not in reason.describe() and "<5 positives" in reason.describe()
    # Four subjects in all: the rows go too (30 rows of 4 subjects).
    few = reason_of([(3000 + i % 4, i < 23) for i in range(30)])
    assert few.kind == "too_few_subjects"
    assert few.splits["held_out"] == SplitCount(rows=SMALL_CELL, subjects=SMALL_CELL, positives=SMALL_CELL)
    assert "30" not in few.describe() and "23" not in few.describe()


def test_counts_below_the_floor_in_subjects_can_be_neither_built_nor_read() -> None:
    with pytest.raises(ValueError, match="counted from fewer than 5 subjects"):
        TaskReason(kind="too_few_subjects", minimum=FLOOR, splits={"held_out": SplitCount(rows=23, subjects=-1)})
    with pytest.raises(ValueError, match="positives 23 with 4 subjects of a positive row"):
        TaskReason(
            kind="too_few_positives",
            minimum=FLOOR,
            splits={"held_out": SplitCount(rows=40, subjects=20, positives=23, positive_subjects=4)},
        )
    reason = reason_of([(3000 + i % 4, True) for i in range(23)] + [(3000 + i % 5, False) for i in range(7)])
    wire = EvalReply(reasons={"onset": reason}, withheld=1, min_subjects=FLOOR).to_records()
    with pytest.raises(ValueError, match="small cell"):
        EvalReply.from_records({**wire, "onset.held_out.positives": 23, "onset.held_out.subjects": -1})
    # A metric's positives of too few subjects: held-out n 40, 3 positive rows.
    metric = {"a.auroc": 0.7, "a.n": 40, "a.positives": 3, "min-subjects": FLOOR}
    with pytest.raises(ValueError, match="field a.positives: positives 3 is below the site's minimum 5"):
        EvalReply.from_records(metric)
    with pytest.raises(ValueError, match="n less positives 2"):
        EvalReply.from_records({**metric, "a.positives": 38})
    assert EvalReply.from_records({**metric, "a.positives": SMALL_CELL}).tasks["a"] == TaskMetrics(
        n=40, auroc=0.7, positives=SMALL_CELL
    )
