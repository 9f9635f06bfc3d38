"""The `mimic` synthetic scenario: three MIMIC-IV-shaped hospitals on which MEDS-DEV's tasks run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from healthfm_core.data.labels.aces_tasks import aces_labels_shared
from healthfm_core.data.labels.meds_dev_tasks import meds_dev_task, meds_dev_task_names, predicates_file
from healthfm_core.terms.task_spec import OWN_WINDOWS
from simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow  # the default-size scenario and check on it (~15 s): make test-slow
REPO = Path(__file__).resolve().parents[2]
NINE = meds_dev_task_names()  # the nine tasks MEDS-DEV 0.0.14 ships (test_meds_dev_tasks.py checks the list)
# The lab codes the brief's MIMIC-IV predicates name, with a plausible range and the abnormal side.
LABS = {
    "LAB//50912//mg/dL": (0.2, 12.0, lambda v: v > 1.3),
    "LAB//50983//mEq/L": (110.0, 160.0, lambda v: v < 135),
    "LAB//50882//mEq/L": (5.0, 40.0, lambda v: v < 22),
    "LAB//50811//g/dL": (4.0, 19.0, lambda v: v < 13),
    "LAB//51300//K/uL": (0.5, 60.0, lambda v: v > 11),
    "LAB//51265//K/uL": (5.0, 900.0, lambda v: v < 150),
    "LAB//220052//mmHg": (30.0, 150.0, lambda v: v < 65),
    "LAB//220181//mmHg": (30.0, 150.0, lambda v: v < 65),
}


@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scenario at its default size, as `python -m simulations.synthetic OUT --scenario mimic`."""
    out = tmp_path_factory.mktemp("mimic")
    manifest = generate_federation(out, "mimic", seed=0, progress=False)
    return {s.name: Path(s.root) for s in manifest.sites}


def _events(root: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((root / "data").glob("*.parquet"))])


def test_three_sites_one_with_several_shards_rows_in_meds_order(mimic: dict[str, Path]) -> None:
    assert len(mimic) == 3
    shards = {name: sorted((root / "data").glob("*.parquet")) for name, root in mimic.items()}
    assert max(len(s) for s in shards.values()) > 1
    for name, files in shards.items():
        seen: set[int] = set()
        for f in files:
            meds.DataSchema.align(pq.read_table(f))
            df = pl.read_parquet(f)
            assert df.equals(df.sort(["subject_id", "time"], nulls_last=False, maintain_order=True)), f
            ids = set(df["subject_id"].unique().to_list())
            assert not ids & seen, f"{name}: a subject in two shards"
            seen |= ids


def test_stays_icu_stays_deaths_and_codes_look_like_mimic(mimic: dict[str, Path]) -> None:
    for name, root in mimic.items():
        df = _events(root).filter(pl.col("time").is_not_null())
        codes = set(df["code"].unique().to_list())
        assert meds.birth_code in codes and meds.death_code in codes
        assert all(re.fullmatch(r"HOSPITAL_ADMISSION//[^/]+//[^/]+", c) for c in codes if c.startswith("HOSPITAL_ADM"))
        assert "HOSPITAL_DISCHARGE//DIED" in codes and any(c.startswith("ICU_ADMISSION//") for c in codes)
        assert any(c.startswith("DIAGNOSIS//ICD//9//") for c in codes)
        assert any(c.startswith("DIAGNOSIS//ICD//10//") for c in codes)

        def times(prefix: str, df: pl.DataFrame = df) -> pl.DataFrame:
            return (
                df.filter(pl.col("code").str.starts_with(prefix))
                .select("subject_id", "time")
                .sort("subject_id", "time")
            )

        adm, dis = times("HOSPITAL_ADMISSION//"), times("HOSPITAL_DISCHARGE//")
        assert adm.height == dis.height and adm.height > 2 * len(df["subject_id"].unique()) // 3
        stays = adm.rename({"time": "admit"}).with_columns(dis["time"].alias("discharge"))
        assert (stays["discharge"] > stays["admit"]).all()
        # Every ICU stay lies inside a hospital stay.
        icu = times("ICU_ADMISSION//").rename({"time": "icu_in"})
        inside = icu.join(stays, on="subject_id").filter(
            (pl.col("icu_in") > pl.col("admit")) & (pl.col("icu_in") < pl.col("discharge"))
        )
        assert inside["icu_in"].n_unique() == icu.height
        # Diagnoses are timed at a discharge of the same subject.
        dx = times("DIAGNOSIS//").unique()
        assert dx.join(dis, on=["subject_id", "time"], how="anti").height == 0
        # Some deaths in the ICU (at an ICU discharge), some in hospital, some after discharge.
        death = times(meds.death_code)
        at_icu_out = death.join(times("ICU_DISCHARGE//"), on=["subject_id", "time"]).height
        at_discharge = death.join(dis, on=["subject_id", "time"]).height
        assert 0 < at_icu_out < at_discharge < death.height
        # Readmissions within 30 days of a discharge.
        nxt = stays.with_columns(pl.col("admit").shift(-1).over("subject_id").alias("next"))
        gap = (nxt["next"] - nxt["discharge"]).dt.total_days()
        assert ((gap >= 0) & (gap <= 30)).sum() > 10, name


def test_labs_carry_the_itemids_of_meds_dev_mimic_predicates_with_abnormal_values(mimic: dict[str, Path]) -> None:
    named = {
        c
        for p in yaml.safe_load(predicates_file("MIMIC-IV").read_text())["predicates"].values()
        for c in (p["code"].get("any", []) if isinstance(p["code"], dict) else [p["code"]])
    }
    for name, root in mimic.items():
        df = _events(root)
        for code, (low, high, abnormal) in LABS.items():
            assert code in named
            values = df.filter(pl.col("code") == code)["numeric_value"].to_numpy()
            assert values.size > 50 and (values >= low).all() and (values <= high).all(), (name, code)
            flagged = abnormal(values)
            assert 0.02 < flagged.mean() < 0.8, (name, code, flagged.mean())


def test_every_meds_dev_task_has_positives_at_every_site(mimic: dict[str, Path]) -> None:
    """MEDS-DEV's nine tasks with the MIMIC-IV predicates (the abnormal-lab tasks with the
    documented rewrite of their `code: null` ranges) have both classes at each site."""
    tasks = [meds_dev_task(t, "MIMIC-IV") for t in NINE]
    for name, root in mimic.items():
        for task, labels in zip(tasks, aces_labels_shared(tasks, root), strict=True):
            y = labels[OWN_WINDOWS]["boolean_value"].to_pylist()
            assert 0 < sum(y) < len(y), (name, task.name, len(y), sum(y))


def _check(root: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO / "client" / "client.py"), "check", str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,  # a hang guard only
    )
    assert done.returncode == 0, (root, done.stdout[-2000:], done.stderr[-2000:])
    assert "ERROR" not in done.stdout and "WARNING" not in done.stdout, done.stdout


def test_client_check_accepts_the_multi_shard_site(mimic: dict[str, Path]) -> None:
    _check(mimic["tertiary_icu"])


@pytest.mark.slow
def test_client_check_accepts_the_other_sites(mimic: dict[str, Path]) -> None:
    for name, root in mimic.items():
        if name != "tertiary_icu":
            _check(root)
