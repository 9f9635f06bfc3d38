"""The held-out cap per subject (EvalConfig.held_out_rows_per_subject, issue 67): a site scores at
most HELD_OUT_ROWS_PER_SUBJECT of a held-out subject's rows per task key, which bounds what its
reply may claim (server/eval_counts.py). Honest data never reaches it, so honest sites still
score every labelled row as MEDS-DEV does: checked on the MEDS sample datasets and on generated
sites of the hospital scenario (the one whose subjects have the most rows), for every shipped
ACES task; and where a subject does pass it, the site keeps that many of its rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from healthfm_core.data.labels.aces_tasks import TASK_DIR, aces_labels_shared, load_task
from healthfm_core.data.labels.tasks import HELD_OUT_ROWS_PER_SUBJECT, cap_rows_per_subject
from healthfm_core.data.sites.site import open_site

TASKS = ("t2d", "cad", "hypertension", "copd")


def _most_rows_of_a_subject(root: Path) -> int:
    """The most labelled rows one subject has in any task key of the shipped ACES tasks, or in
    timed event times (a bound on any onset task's rows: one row per prediction time)."""
    site = open_site(root)
    times = site.read_events(columns=["subject_id", "time"])
    times = times.filter(pa.compute.is_valid(times["time"]))
    pairs = np.unique(np.stack([times["subject_id"].to_numpy(), times["time"].cast(pa.int64()).to_numpy()]), axis=1)
    most = int(np.bincount(np.unique(pairs[0], return_inverse=True)[1]).max()) if pairs.size else 0
    for by_horizon in aces_labels_shared([load_task(TASK_DIR / f"{t}.yaml") for t in TASKS], root):
        for table in by_horizon.values():
            if table.num_rows:
                most = max(most, int(np.unique(table["subject_id"].to_numpy(), return_counts=True)[1].max()))
    return most


def test_the_meds_sample_datasets_never_reach_the_cap(meds_sample_sites: dict[str, Path]) -> None:
    for name, root in meds_sample_sites.items():
        most = _most_rows_of_a_subject(root)
        print(f"{name}: at most {most} rows a subject")
        assert most < HELD_OUT_ROWS_PER_SUBJECT, name


@pytest.mark.slow  # ACES over three generated hospitals (~1 min on two cores)
def test_generated_hospital_sites_never_reach_the_cap(tmp_path: Path) -> None:
    from simulations.synthetic import generate_federation

    manifest = generate_federation(tmp_path, "hospital", seed=0, n_subjects=60, progress=False)
    for site in manifest.sites:
        most = _most_rows_of_a_subject(Path(site.root))
        print(f"hospital/{site.name}: at most {most} rows a subject")
        assert most < HELD_OUT_ROWS_PER_SUBJECT // 2, site.name


def test_a_held_out_subject_past_the_cap_keeps_that_many_rows_and_others_every_row() -> None:
    subject = np.repeat([1, 2, 3], [10, 3, 8])
    times = pa.array(np.arange(len(subject)) * 3_600_000_000, pa.timestamp("us"))
    labels = pa.table({"subject_id": pa.array(subject, pa.int64()), "prediction_time": times})
    kept = cap_rows_per_subject(labels, 2, seed=0, every_row_of=np.array([1, 2]), every_row_cap=5)
    counts = dict(zip(*np.unique(kept["subject_id"].to_numpy(), return_counts=True), strict=True))
    assert counts == {1: 5, 2: 3, 3: 2}  # held out: 5 of 10 and all 3; train: 2 of 8
    everything = cap_rows_per_subject(labels, None, every_row_of=np.array([1, 2]), every_row_cap=None)
    assert everything.num_rows == len(subject)
    # The default cap keeps every row of subjects below it: the rows MEDS-DEV scores.
    assert cap_rows_per_subject(labels, 2, every_row_of=np.array([1, 2, 3])).num_rows == len(subject)
    with pytest.raises(ValueError, match="every_row_cap must be >= 1"):
        cap_rows_per_subject(labels, 2, every_row_of=np.array([1]), every_row_cap=0)
