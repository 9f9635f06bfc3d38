"""The onset tasks' leakage guard (issue 27): on an export that times a stay's diagnoses at its
discharge (the mimic scenario), an onset task asked during a stay counted the stay's own billing
codes as a new onset. The shipped configs exclude prediction times inside a stay (their
`rest_of_stay` window); `check --tasks` warns about a task whose positives are mostly such codes.

The reference here is computed from the events alone (stays paired admission -> next discharge in
plain Python), not with healthfm_core.data.checks.stay_leakage's helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import polars as pl
import pytest
import yaml

from healthfm_core.data.checks.task_check import count_tasks
from healthfm_core.data.labels.aces_tasks import TASK_DIR, AcesTask, aces_labels, load_task, task_from_text
from healthfm_core.data.sites.site import open_site
from simulations.synthetic import generate_federation

HORIZONS = [30, 365]


@pytest.fixture(scope="module")
def mimic_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mimic")
    manifest = generate_federation(out, "mimic", seed=0, n_subjects=80, progress=False)
    return next(s.root for s in manifest.sites if s.name == "community_hospital")


def unguarded(name: str, where: Path) -> AcesTask:
    """The shipped task without its guard (as the onset configs were before issue 27), written to a file."""
    raw = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
    raw["metadata"].pop("stay_window")
    raw["metadata"]["task"] = f"{raw['metadata']['task']}_unguarded"
    for window in ("rest_of_stay", "trigger_instant"):
        raw["windows"].pop(window)
    path = where / f"{name}_unguarded.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return task_from_text(path.read_text(), path)


def reference(
    root: Path, outcome_regex: str
) -> tuple[dict[int, list[tuple[datetime, datetime]]], dict[int, list[datetime]]]:
    """Per subject, its stays [admission, discharge) and its outcome times, from the events."""
    events = (
        pl.read_parquet(root / "data" / "*.parquet").filter(pl.col("time").is_not_null()).sort("subject_id", "time")
    )
    stays: dict[int, list[tuple[datetime, datetime]]] = defaultdict(list)
    outcomes: dict[int, list[datetime]] = defaultdict(list)
    open_admission: dict[int, datetime] = {}
    outcome = re.compile(outcome_regex)
    for sid, t, code in events.select("subject_id", "time", "code").iter_rows():
        if code.startswith("HOSPITAL_ADMISSION//"):
            open_admission.setdefault(sid, t)
        elif code.startswith("HOSPITAL_DISCHARGE//") and sid in open_admission:
            stays[sid].append((open_admission.pop(sid), t))
        if outcome.match(code):
            outcomes[sid].append(t)
    return stays, outcomes


def inside(stays: list[tuple[datetime, datetime]], t: datetime) -> tuple[datetime, datetime] | None:
    return next(((a, d) for a, d in stays if a <= t < d), None)


@pytest.mark.parametrize("name", ["cad", "t2d"])
def test_the_guard_drops_exactly_the_prediction_times_inside_a_stay(
    mimic_site: Path, name: str, tmp_path: Path
) -> None:
    guarded_task = load_task(name)
    stays, outcomes = reference(mimic_site, guarded_task.config["predicates"]["outcome"]["code"]["regex"])
    before = aces_labels(unguarded(name, tmp_path), mimic_site, HORIZONS)
    after = aces_labels(guarded_task, mimic_site, HORIZONS)
    for h in HORIZONS:
        old = cast(pl.DataFrame, pl.from_arrow(before[h]))
        new = cast(pl.DataFrame, pl.from_arrow(after[h]))
        assert isinstance(old, pl.DataFrame) and isinstance(new, pl.DataFrame)

        def same_stay(row: tuple) -> bool:
            sid, pt, positive = row
            stay = inside(stays[sid], pt)
            first = min((o for o in outcomes[sid] if o > pt), default=None)
            return bool(positive and stay and first is not None and abs(first - stay[1]) <= timedelta(days=1))

        # Before: positives that are the same stay's discharge codes (most of them at 30 d).
        leaky = sum(same_stay(r) for r in old.iter_rows())
        assert leaky > 0.5 * int(old["boolean_value"].sum()), (h, leaky)
        # After: none; the rows are the old rows outside every stay, with the same labels
        # (the rows after a subject's last stay included: ACES alone would drop them).
        assert sum(same_stay(r) for r in new.iter_rows()) == 0
        kept = [r for r in old.iter_rows() if inside(stays[r[0]], r[1]) is None]
        assert sorted(new.iter_rows()) == sorted(kept), h
        after_last = [r for r in kept if not any(a > r[1] or d > r[1] for a, d in stays[r[0]])]
        assert after_last and int(new["boolean_value"].sum()) > 0


def test_a_site_without_stays_keeps_every_row(mimic_site: Path, tmp_path: Path) -> None:
    """The same export without HOSPITAL_ADMISSION/DISCHARGE codes: the guard changes nothing (no
    row turns into an exclusion, no label changes)."""
    (tmp_path / "data").mkdir()
    events = pl.read_parquet(mimic_site / "data" / "*.parquet")
    events.filter(~pl.col("code").str.starts_with("HOSPITAL_")).write_parquet(tmp_path / "data" / "0.parquet")
    for name in ("cad", "hypertension"):
        old = aces_labels(unguarded(name, tmp_path), tmp_path, HORIZONS)
        new = aces_labels(load_task(name), tmp_path, HORIZONS)
        for h in HORIZONS:
            assert new[h].num_rows > 0 and cast(pl.DataFrame, pl.from_arrow(new[h]))["boolean_value"].sum() > 0, (
                name,
                h,
            )
            assert new[h].equals(old[h]), (name, h)


def test_check_warns_for_the_unguarded_task_only(mimic_site: Path, tmp_path: Path) -> None:
    copy = unguarded("cad", tmp_path)
    report = count_tasks(open_site(mimic_site), [TASK_DIR / "cad.yaml", copy.path], min_subjects=2)
    warned = [p for p in report.problems if p.kind == "same_stay_positives"]
    assert warned and all(p.file == str(copy.path) for p in warned), [str(p) for p in report.problems]
    assert "onset_cad_unguarded 30d" in warned[0].message
    counts = {(c.task, c.horizon_days): c.same_stay_positives for c in report.tasks}
    assert all(counts[("onset_cad", h)] == 0 for h in (30, 90, 180, 365))
    unguarded_30 = counts[("onset_cad_unguarded", 30)]
    assert unguarded_30 is not None and unguarded_30 > 0


@pytest.mark.slow  # aces-cli in its own processes (~1 min on 2 busy cores): CI's slow stage
def test_the_guarded_configs_label_as_aces_cli(mimic_site: Path, tmp_path: Path) -> None:
    """aces-cli runs each changed file as it is (365 d, the file's first query); its rows are
    ACES's in-process rows of that query, and a subset of the platform's rows with the same
    labels (the platform adds the censoring and the no-next-edge queries to the union)."""
    names = ["t2d", "cad", "hypertension", "copd"]
    out = tmp_path / "cli"
    out.mkdir()
    for name in names:
        (out / f"{name}.yaml").symlink_to(TASK_DIR / f"{name}.yaml")
    bin_dir = Path(sys.executable).parent
    shards = subprocess.run(
        [str(bin_dir / "expand_shards"), str(mimic_site / "data")], capture_output=True, text=True, check=True
    ).stdout.strip()
    cmd = [
        str(bin_dir / "aces-cli"),
        "--multirun",
        f"cohort_dir={out}",
        f"cohort_name={','.join(names)}",
        "data=sharded",
        "data.standard=meds",
        f"data.root={mimic_site / 'data'}",
        f"data.shard={shards}",
        f"log_dir={out}/.logs",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)  # a hang guard only
    assert done.returncode == 0, done.stderr[-4000:]
    events = pl.read_parquet(mimic_site / "data", columns=["subject_id", "time", "code"])
    births = {
        (int(s), w) for s, w in events.filter(pl.col("code") == "MEDS_BIRTH").select("subject_id", "time").iter_rows()
    }
    assert births
    for name in names:
        task = load_task(name)
        theirs = pl.concat([pl.read_parquet(f) for f in sorted((out / name).glob("*.parquet"))])
        theirs_rows = sorted(
            theirs.select(
                pl.col("subject_id").cast(pl.Int64),
                pl.col("prediction_time").cast(pl.Datetime("us")),
                "boolean_value",
            ).iter_rows()
        )
        raw = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())
        for key in ("censoring_window", "complete_on", "stay_window"):
            raw["metadata"].pop(key)
        as_written = task_from_text(yaml.safe_dump(raw, sort_keys=False), tmp_path / f"{name}_as_written.yaml")
        mine = cast(pl.DataFrame, pl.from_arrow(aces_labels(as_written, mimic_site, [365])[365]))
        assert isinstance(mine, pl.DataFrame)
        assert sorted(mine.iter_rows()) == theirs_rows, name
        assert theirs_rows and not births & {r[:2] for r in theirs_rows}, name  # aces-cli: no row at birth either
        union = cast(pl.DataFrame, pl.from_arrow(aces_labels(task, mimic_site, [365])[365]))
        assert isinstance(union, pl.DataFrame)
        assert set(theirs_rows) <= set(union.iter_rows()) and union.height > len(theirs_rows), name
