"""A task's rows are ACES's: a task triggered at an admission gets its rows at every site, in
`check --tasks` and in the site's evaluation; the per-subject cap is a cost knob applied to
ACES's rows afterwards, the same in both.

Before, the platform asked every ACES task at up to 4 hash-drawn event times per subject and kept
the ACES rows that fell on them, so a task whose prediction time is a trigger plus a window (24 h
after an ICU admission) got 0 rows everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from healthfm_core.data.checks.task_check import count_tasks
from healthfm_core.data.labels.aces_tasks import aces_labels
from healthfm_core.data.labels.meds_dev_tasks import meds_dev_task
from healthfm_core.data.labels.task_spec import aces_task, resolve_tasks
from healthfm_core.data.labels.tasks import _draw_key, cap_rows_per_subject
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.site_eval import task_labels_at_site
from simulations.synthetic import generate_federation

MORTALITY = "meds-dev:mortality/in_icu/first_24h@MIMIC-IV"


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest = generate_federation(tmp_path_factory.mktemp("mimic"), "mimic", seed=5, n_subjects=150, progress=False)
    return Path(manifest.sites[0].root)


def _reference_cap(labels: pa.Table, n: int, seed: int, held_out: set[int] = frozenset()) -> set[tuple[int, int]]:  # type: ignore[assignment]
    """The cap by hand: per subject, the n rows whose draw key is smallest (python loop); every
    row of a `held_out` subject."""
    sid = labels["subject_id"].to_numpy()
    t = labels["prediction_time"].cast(pa.int64()).to_numpy()
    keys = _draw_key(sid, t, seed)
    kept: set[tuple[int, int]] = set()
    for s in np.unique(sid):
        rows = sorted((int(keys[i]), int(t[i])) for i in np.flatnonzero(sid == s))
        kept.update((int(s), ti) for _, ti in (rows if int(s) in held_out else rows[:n]))
    return kept


def test_a_task_triggered_at_icu_admission_gets_rows_in_check_and_in_evaluation(site_root: Path) -> None:
    site = open_site(site_root)
    (aces_all,) = aces_labels(meds_dev_task("mortality/in_icu/first_24h", "MIMIC-IV"), site_root).values()
    assert aces_all.num_rows > 20 and pc_sum(aces_all) > 0  # the world has stays and deaths
    (spec,) = resolve_tasks([MORTALITY])
    (labels,) = task_labels_at_site(site, [spec], n_per_subject=64).values()
    assert isinstance(labels, pa.Table)
    # ACES's rows, every one (64 per subject is more than any subject's ICU stays)
    assert _pairs(labels) == _pairs(aces_all)
    report = count_tasks(site, [Path(MORTALITY)], n_per_subject=64)
    (counted,) = report.tasks
    assert sum(s.rows for s in counted.splits.values()) == aces_all.num_rows
    assert sum(s.positives or 0 for s in counted.splits.values()) == pc_sum(aces_all)


def test_the_cap_keeps_n_rows_per_subject_by_the_seeded_draw_in_check_and_evaluation(site_root: Path) -> None:
    site = open_site(site_root)
    (spec,) = resolve_tasks(["meds-dev:readmission/general_hospital/30d@MIMIC-IV"])
    (aces_all,) = aces_labels(aces_task(spec), site_root).values()
    counts = cast(pl.DataFrame, pl.from_arrow(aces_all.select(["subject_id"]))).group_by("subject_id").len()
    assert cast(int, counts["len"].max()) > 2  # some subjects have more rows than the cap
    held_out = set(site.held_out_subjects().tolist())
    held_rows = {p for p in _pairs(aces_all) if p[0] in held_out}
    assert len(held_rows) > 2 * len(held_out & {p[0] for p in held_rows})  # held_out has subjects above the cap
    for seed in (0, 7):
        (capped,) = task_labels_at_site(site, [spec], n_per_subject=2, seed=seed).values()
        assert isinstance(capped, pa.Table)
        # train and tuning at the cap, held_out scored on every labelled row
        assert _pairs(capped) == _reference_cap(aces_all, 2, seed, held_out)
        assert {p for p in _pairs(capped) if p[0] in held_out} == held_rows
        report = count_tasks(
            site, [Path("meds-dev:readmission/general_hospital/30d@MIMIC-IV")], n_per_subject=2, seed=seed
        )
        (counted,) = report.tasks
        assert sum(s.rows for s in counted.splits.values()) == aces_all.num_rows  # ACES's full counts
        assert counted.evaluated is not None
        assert sum(s.rows for s in counted.evaluated.values()) == capped.num_rows  # what the evaluation takes
        assert counted.evaluated["held_out"] == counted.splits["held_out"]
    # "all": every row in every split
    (every,) = task_labels_at_site(site, [spec], n_per_subject="all").values()
    assert isinstance(every, pa.Table) and _pairs(every) == _pairs(aces_all)
    # a subject sample gets exactly its subjects' rows among all
    (capped,) = task_labels_at_site(site, [spec], n_per_subject=2).values()
    assert isinstance(capped, pa.Table)
    some = np.unique(capped["subject_id"].to_numpy())[::3]
    (sampled,) = task_labels_at_site(site, [spec], n_per_subject=2, subjects=some).values()
    assert isinstance(sampled, pa.Table)
    assert _pairs(sampled) == {p for p in _pairs(capped) if p[0] in set(some.tolist())}


def test_the_cap_refuses_zero_and_keeps_everything_with_none() -> None:
    table = pa.table(
        {
            "subject_id": pa.array([2, 1, 1, 2], pa.int64()),
            "prediction_time": pa.array([5, 3, 1, 4], pa.int64()).cast(pa.timestamp("us")),
            "boolean_value": [True, False, True, False],
        }
    )
    everything = cap_rows_per_subject(table, None)
    assert everything["subject_id"].to_pylist() == [1, 1, 2, 2]
    assert everything["prediction_time"].cast(pa.int64()).to_pylist() == [1, 3, 4, 5]
    assert everything["boolean_value"].to_pylist() == [True, False, False, True]
    with pytest.raises(ValueError, match="n_per_subject must be >= 1"):
        cap_rows_per_subject(table, 0)


def pc_sum(labels: pa.Table) -> int:
    return int(np.sum(labels["boolean_value"].to_numpy(zero_copy_only=False)))


def _pairs(labels: pa.Table) -> set[tuple[int, int]]:
    sid = labels["subject_id"].to_numpy()
    t = labels["prediction_time"].cast(pa.int64()).to_numpy()
    return set(zip(sid.tolist(), t.tolist(), strict=True))
