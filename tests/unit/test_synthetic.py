"""The synthetic federation: layout per docs/architecture.md, determinism, and that its signal is real."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from healthfm_core.data.checks.site_check import check_site
from healthfm_core.data.files.layout import WEARABLES_SCHEMA
from simulations.synthetic import (
    FederationManifest,
    ScenarioConfig,
    generate_federation,
    load_scenario,
    onset_risk,
    oracle_risk,
)
from simulations.synthetic.__main__ import main as cli_main
from simulations.synthetic.generate import _atomic_dir

MEDS_DATA_SCHEMA = pa.schema(
    [("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()), ("numeric_value", pa.float32())]
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationManifest:
    return generate_federation(tmp_path_factory.mktemp("fed"), "tiny", seed=3, progress=False)


@pytest.fixture(scope="module")
def scenario() -> ScenarioConfig:
    return load_scenario("tiny")


def _events(root: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((root / "data").glob("*.parquet"))])


def _truth(fed: FederationManifest, site: str, name: str) -> pl.DataFrame:
    return pl.read_parquet(fed.truth_dir / site / f"{name}.parquet")


def _incident(fed: FederationManifest, site: str) -> pl.DataFrame:
    """Per subject x disease: incident (diagnosed during follow-up, not prevalent) flag."""
    return (
        _truth(fed, site, "onsets")
        .filter(~pl.col("prevalent"))
        .with_columns(pl.col("diagnosis_time").is_not_null().alias("onset"))
    )


def _two_proportion_z(a: np.ndarray, b: np.ndarray) -> float:
    p = (a.sum() + b.sum()) / (len(a) + len(b))
    se = np.sqrt(p * (1 - p) * (1 / len(a) + 1 / len(b)))
    return float((a.mean() - b.mean()) / se)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# Determinism, layout, validation


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_federation(tmp_path / "a", "tiny", seed=7, n_subjects=40, progress=False)
    b = generate_federation(tmp_path / "b", "tiny", seed=7, n_subjects=40, progress=False)
    c = generate_federation(tmp_path / "c", "tiny", seed=8, n_subjects=40, progress=False)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa.keys() == fb.keys()
    manifest = "manifest.json"
    for name in fa:
        if name != manifest:
            assert fa[name] == fb[name], name
    assert fa[manifest].replace(str(tmp_path / "a").encode(), b"X") == fb[manifest].replace(
        str(tmp_path / "b").encode(), b"X"
    )
    assert a.model_dump(exclude={"out_dir", "sites_dir", "truth_dir", "sites"}) == b.model_dump(
        exclude={"out_dir", "sites_dir", "truth_dir", "sites"}
    )
    assert fa["sites/biobank/data/0.parquet"] != fc["sites/biobank/data/0.parquet"]
    assert c.seed == 8


def test_site_layout_and_meds_schemas(fed: FederationManifest) -> None:
    for site in fed.sites:
        root = site.root
        assert {p.name for p in root.iterdir()} <= {"data", "metadata", "wearables"}
        shards = sorted((root / "data").glob("*.parquet"))
        assert shards
        seen: set[int] = set()
        all_codes: set[str] = set()
        for shard in shards:
            table = pq.read_table(shard)
            assert table.schema.remove_metadata() == MEDS_DATA_SCHEMA, shard
            meds.DataSchema.validate(table)
            df = cast(pl.DataFrame, pl.from_arrow(table))
            sid = df["subject_id"].to_numpy()
            # Contiguous subjects, each in one shard only.
            starts = np.r_[0, np.flatnonzero(np.diff(sid)) + 1]
            assert len(np.unique(sid)) == len(starts), shard
            assert not seen & set(sid.tolist())
            seen |= set(sid.tolist())
            # Static rows first, then non-decreasing time, within each subject.
            t = df["time"].cast(pl.Int64).fill_null(np.iinfo(np.int64).min).to_numpy()
            same = sid[1:] == sid[:-1]
            assert np.all(t[1:][same] >= t[:-1][same]), shard
            assert df["numeric_value"].drop_nulls().is_finite().all()
            all_codes |= set(df["code"].unique().to_list())
        assert len(seen) == site.n_subjects
        codes = pq.read_table(root / meds.code_metadata_filepath)
        meds.CodeMetadataSchema.validate(codes)
        assert codes.schema.field("parent_codes").type == pa.list_(pa.string())
        assert set(codes.column("code").to_pylist()) == all_codes
        splits = pq.read_table(root / meds.subject_splits_filepath)
        meds.SubjectSplitSchema.validate(splits)
        assert set(splits.column("subject_id").to_pylist()) == seen
        assert set(splits.column("split").to_pylist()) == {meds.train_split, meds.tuning_split, meds.held_out_split}
        meds.DatasetMetadataSchema.validate(json.loads((root / meds.dataset_metadata_filepath).read_text()))
        for path in sorted((root / "wearables").glob("*.parquet")):
            w = pq.read_table(path)
            assert w.schema.remove_metadata() == WEARABLES_SCHEMA, path
            us = w.column("time").cast(pa.int64()).to_numpy()
            assert np.all(us % 30_000_000 == 0)
            assert cast(float, cast(pl.DataFrame, pl.from_arrow(w))["enmo_mg"].min()) >= 0


def test_every_site_passes_check_site(fed: FederationManifest) -> None:
    for site in fed.sites:
        report = check_site(site.root)
        assert report.ok and not report.problems, [str(p) for p in report.problems]
        assert report.summary is not None
        assert sorted(report.summary.modalities) == sorted(site.modalities)
        assert report.summary.subjects_per_modality == site.subjects_per_modality


def test_truth_lives_outside_site_roots(fed: FederationManifest) -> None:
    for site in fed.sites:
        assert not site.truth_dir.resolve().is_relative_to(site.root.resolve())
        assert not fed.truth_dir.resolve().is_relative_to(site.root.resolve())
        for f in site.root.rglob("*"):
            assert "truth" not in f.name and "risk" not in f.name
        assert (site.truth_dir / "risk.parquet").is_file() and (site.truth_dir / "onsets.parquet").is_file()


def test_modality_fractions_and_ppg(fed: FederationManifest, scenario: ScenarioConfig) -> None:
    for spec in scenario.sites:
        site = fed.site(spec.name)
        n = site.n_subjects
        for modality in ("wearables", "genomics"):
            want = spec.fraction(modality)
            got = site.subjects_per_modality[modality] / n
            # Binomial tolerance (wearables also need time for a wear period: slightly fewer).
            assert abs(got - want) <= 4 * np.sqrt(want * (1 - want) / n) + 0.03, (spec.name, modality, got, want)
        events = _events(site.root)
        n_prs = events.filter(pl.col("code").str.starts_with("PRS//"))["subject_id"].n_unique()
        assert n_prs == site.subjects_per_modality["genomics"]
        wear_files = sorted((site.root / "wearables").glob("*.parquet"))
        if spec.fraction("wearables") == 0:
            assert not wear_files
            continue
        hr = pl.concat([pl.read_parquet(p, columns=["hr_bpm"]) for p in wear_files])["hr_bpm"]
        if spec.ppg:
            assert hr.null_count() == 0 and cast(float, hr.min()) >= 20 and cast(float, hr.max()) <= 250
        else:
            assert hr.null_count() == len(hr)


def test_mimic_style_dates_in_2100s(fed: FederationManifest) -> None:
    years = _events(fed.site("hospital").root)["time"].drop_nulls().dt.year()
    assert cast(int, years.max()) > 2100
    assert cast(int, _events(fed.site("biobank").root)["time"].drop_nulls().dt.year().max()) < 2030


# ------------------------------------------------------------------------------------------
# Clinical structure


def test_repeated_diagnoses_medications_follow_and_truth_matches_data(
    fed: FederationManifest, scenario: ScenarioConfig
) -> None:
    for site in fed.sites:
        ev = _events(site.root)
        births = ev.filter(pl.col("code") == "MEDS_BIRTH")
        assert births["time"].null_count() == 0 and births["subject_id"].n_unique() == site.n_subjects
        onsets = _truth(fed, site.name, "onsets")
        for name, disease in scenario.diseases.items():
            dx = ev.filter(pl.col("code") == disease.code)
            per_subject = dx.group_by("subject_id").agg(
                pl.col("time").n_unique().alias("n"), pl.col("time").min().alias("first")
            )
            assert (per_subject["n"] >= 2).sum() > 0, (site.name, name)  # repeated codes exist
            truth = onsets.filter((pl.col("disease") == name) & pl.col("diagnosis_time").is_not_null())
            joined = truth.join(per_subject, on="subject_id", how="full", coalesce=True)
            assert joined["first"].null_count() == 0 and joined["diagnosis_time"].null_count() == 0
            assert (joined["first"] == joined["diagnosis_time"]).all()
            for med in disease.medications:
                first_med = (
                    ev.filter(pl.col("code") == med).group_by("subject_id").agg(pl.col("time").min().alias("med"))
                )
                m = first_med.join(per_subject, on="subject_id", how="left")
                assert m["first"].null_count() == 0, f"{med} without {disease.code}"
                assert (m["med"] >= m["first"]).all()
        deaths = ev.filter(pl.col("code") == "MEDS_DEATH")
        last = ev.group_by("subject_id").agg(pl.col("time").max().alias("last"))
        assert (deaths.join(last, on="subject_id")["time"] == deaths.join(last, on="subject_id")["last"]).all()


def test_visit_rate_rises_with_morbidity(fed: FederationManifest) -> None:
    site = fed.site("genomics")
    ev = _events(site.root)
    visits = ev.filter(pl.col("code").str.starts_with("ENCOUNTER//")).group_by("subject_id").len()
    subjects = _truth(fed, site.name, "subjects").filter(pl.col("death_time").is_null())
    n_dx = (
        _truth(fed, site.name, "onsets")
        .group_by("subject_id")
        .agg(pl.col("diagnosis_time").is_not_null().sum().alias("n_dx"))
    )
    df = subjects.join(visits, on="subject_id").join(n_dx, on="subject_id")
    assert cast(float, df.filter(pl.col("n_dx") >= 2)["len"].mean()) > 1.3 * cast(
        float, df.filter(pl.col("n_dx") == 0)["len"].mean()
    )


def test_labs_follow_the_latent_state(fed: FederationManifest) -> None:
    site = fed.site("biobank")
    ev = _events(site.root)
    subjects = _truth(fed, site.name, "subjects")
    hba1c = (
        ev.filter(pl.col("code") == "LAB//4548-4//%")
        .group_by("subject_id")
        .agg(pl.col("numeric_value").mean().alias("v"))
    )
    bmi = (
        ev.filter(pl.col("code") == "VITAL//39156-5//kg/m2")
        .group_by("subject_id")
        .agg(pl.col("numeric_value").mean().alias("v"))
    )
    for table in (hba1c, bmi):
        df = table.join(subjects, on="subject_id")
        assert np.corrcoef(df["v"].to_numpy(), df["metabolic_mean"].to_numpy())[0, 1] > 0.3


# ------------------------------------------------------------------------------------------
# Signal: PRS, latent state, wearables before onset


def test_prs_raises_onset_rate(fed: FederationManifest, scenario: ScenarioConfig) -> None:
    top_all, bottom_all = [], []
    for site in fed.sites:
        ev = _events(site.root)
        if "genomics" not in site.modalities:
            continue
        inc = _incident(fed, site.name)
        for name, disease in scenario.diseases.items():
            assert disease.beta_prs > 0
            prs = ev.filter(pl.col("code") == f"PRS//{disease.prs_trait}").select(
                "subject_id", pl.col("numeric_value").alias("prs")
            )
            df = inc.filter(pl.col("disease") == name).join(prs, on="subject_id")
            q = df["prs"].quantile(0.8), df["prs"].quantile(0.2)
            top_all.append(df.filter(pl.col("prs") >= q[0])["onset"].to_numpy())
            bottom_all.append(df.filter(pl.col("prs") <= q[1])["onset"].to_numpy())
    top, bottom = np.concatenate(top_all), np.concatenate(bottom_all)
    print(
        f"onset rate top PRS quintile {top.mean():.3f}, bottom {bottom.mean():.3f}, z={_two_proportion_z(top, bottom):.1f}"
    )
    assert top.mean() > 1.5 * bottom.mean()
    assert _two_proportion_z(top, bottom) > 3.0


@pytest.mark.parametrize(("disease", "dim"), [("T2D", "metabolic"), ("CAD", "fitness"), ("HTN", "metabolic")])
def test_latent_state_raises_onset_rate(
    fed: FederationManifest, scenario: ScenarioConfig, disease: str, dim: str
) -> None:
    sign = np.sign(scenario.diseases[disease].beta_latent[dim])
    frames = []
    for site in fed.sites:
        inc = _incident(fed, site.name).filter(pl.col("disease") == disease)
        frames.append(
            inc.join(_truth(fed, site.name, "subjects"), on="subject_id").select(
                "onset", pl.col(f"{dim}_mean").alias("x") * sign
            )
        )
    df = pl.concat(frames)
    hi = df.filter(pl.col("x") >= df["x"].quantile(0.8))["onset"].to_numpy()
    lo = df.filter(pl.col("x") <= df["x"].quantile(0.2))["onset"].to_numpy()
    print(f"{disease} by {dim}: top {hi.mean():.3f}, bottom {lo.mean():.3f}, z={_two_proportion_z(hi, lo):.1f}")
    assert hi.mean() > 1.5 * lo.mean()
    assert _two_proportion_z(hi, lo) > 3.0


def test_wearables_shift_before_onset(fed: FederationManifest) -> None:
    """Wear periods in the year before a T2D/CAD diagnosis: higher HR, lower activity than age-matched
    periods of subjects who never develop any of the diseases."""
    site = fed.site("biobank")
    periods = _truth(fed, site.name, "wear_periods")
    onsets = _truth(fed, site.name, "onsets")
    subjects = _truth(fed, site.name, "subjects").select("subject_id", "age_at_start")
    wear = pl.concat([pl.read_parquet(p) for p in sorted((site.root / "wearables").glob("*.parquet"))])
    per_period = (
        wear.join_asof(periods.sort("start"), left_on="time", right_on="start", by="subject_id", check_sortedness=False)
        .group_by("subject_id", "start", "end")
        .agg(pl.col("hr_bpm").mean().alias("hr"), pl.col("enmo_mg").mean().alias("enmo"))
    )
    dx = (
        onsets.filter(pl.col("disease").is_in(["T2D", "CAD"]) & ~pl.col("prevalent"))
        .group_by("subject_id")
        .agg(pl.col("diagnosis_time").min().alias("dx"))
    )
    ever = onsets.group_by("subject_id").agg(
        (pl.col("diagnosis_time").is_not_null() | pl.col("prevalent")).any().alias("ever")
    )
    p = per_period.join(dx, on="subject_id", how="left").join(ever, on="subject_id").join(subjects, on="subject_id")
    cases = p.filter((pl.col("dx") > pl.col("end")) & (pl.col("dx") - pl.col("end") < pl.duration(days=365)))
    controls = p.filter(~pl.col("ever"))
    assert len(cases) >= 15 and len(controls) >= 50
    c_age, c_hr, c_enmo = (controls[c].to_numpy() for c in ("age_at_start", "hr", "enmo"))
    hr_rows, enmo_rows = [], []
    for age, hr, enmo in cases.select("age_at_start", "hr", "enmo").iter_rows():
        match = np.abs(c_age - age) < 5
        if match.sum() >= 5:
            hr_rows.append(hr - c_hr[match].mean())
            enmo_rows.append(np.log(enmo) - np.log(c_enmo[match]).mean())
    d_hr, d_enmo = np.array(hr_rows), np.array(enmo_rows)
    assert len(d_hr) >= 10
    t_hr = d_hr.mean() / (d_hr.std(ddof=1) / np.sqrt(len(d_hr)))
    t_enmo = d_enmo.mean() / (d_enmo.std(ddof=1) / np.sqrt(len(d_enmo)))
    print(
        f"pre-onset periods {len(d_hr)}: HR {d_hr.mean():+.2f} bpm (t={t_hr:.1f}), log ENMO {d_enmo.mean():+.3f} (t={t_enmo:.1f})"
    )
    assert d_hr.mean() > 1.5 and t_hr > 2.5, (d_hr.mean(), t_hr)
    assert d_enmo.mean() < -0.05 and t_enmo < -2.5, (d_enmo.mean(), t_enmo)


# ------------------------------------------------------------------------------------------
# Ground-truth risk


def test_onset_risk_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    h_year, lag, horizon, step = 0.8, 120.0, 180.0, 30.0
    hazard = np.full((3, 40), h_year)
    # Subject 0 healthy at t, subject 1 subclinical since 50 days, subject 2 already diagnosed.
    t = np.array([100.0, 100.0, 100.0])
    risk = onset_risk(hazard, step, np.array([np.inf, 50.0, 0.0]), np.array([np.inf, np.inf, 90.0]), lag, t, horizon)
    n = 400_000
    s = rng.exponential(365.25 / h_year, n)
    d = s + rng.gamma(2.0, lag / 2, n)
    assert abs(risk[0] - np.mean(d <= horizon)) < 0.005
    lagged = rng.gamma(2.0, lag / 2, n)
    lagged = lagged[lagged > 50.0]
    assert abs(risk[1] - np.mean(lagged <= 50.0 + horizon)) < 0.005
    assert np.isnan(risk[2])
    # Several horizons at once give the same as one at a time, and risk grows with the horizon.
    many = onset_risk(
        hazard, step, np.array([np.inf, 50.0, 0.0]), np.array([np.inf, np.inf, 90.0]), lag, t, [30, 90, 180, 365]
    )
    np.testing.assert_allclose(many[:, 2], risk, rtol=1e-12)
    assert np.all(np.diff(many[:2], axis=1) > 0)


def test_truth_risk_is_calibrated_and_discriminates(fed: FederationManifest, scenario: ScenarioConfig) -> None:
    end = np.datetime64(scenario.start_date, "us") + np.timedelta64(
        int(scenario.follow_up_years * 365.25 * 86400e6), "us"
    )
    rows = []
    for site in fed.sites:
        if site.name == "hospital":  # dates shifted: another end of follow-up
            continue
        risk = _truth(fed, site.name, "risk").filter(
            cast(pl.Expr, pl.col("prediction_time") + pl.duration(days=365) <= end)
        )
        deaths = _truth(fed, site.name, "subjects").select("subject_id", "death_time")
        dx = _truth(fed, site.name, "onsets").filter(pl.col("disease") == "T2D").select("subject_id", "diagnosis_time")
        df = (
            risk.filter(pl.col("at_risk_T2D"))
            .join(deaths, on="subject_id")
            .join(dx, on="subject_id")
            .filter(
                pl.col("death_time").is_null()
                | (pl.col("death_time") > pl.col("prediction_time") + pl.duration(days=365))
            )
        )
        df = df.with_columns(
            (
                (pl.col("diagnosis_time") > pl.col("prediction_time"))
                & (pl.col("diagnosis_time") <= pl.col("prediction_time") + pl.duration(days=365))
            )
            .fill_null(False)
            .alias("y")
        )
        rows.append(df)
        # oracle_risk at the same times reproduces the stored risk.
        sub = df.head(200)
        again = oracle_risk(
            fed.truth_dir, site.name, "T2D", sub["subject_id"].to_numpy(), sub["prediction_time"].to_numpy(), 365
        )
        np.testing.assert_allclose(again, sub["risk_T2D_365d"].to_numpy(), rtol=1e-4, atol=1e-6)
    df = pl.concat(rows)
    y, r = df["y"].to_numpy(), df["risk_T2D_365d"].to_numpy()
    # Calibration in the large (rows of one subject are correlated: generous tolerance).
    assert abs(r.mean() - y.mean()) < 0.25 * y.mean() + 0.005, (r.mean(), y.mean())
    ranks = np.argsort(np.argsort(r)) + 1
    auroc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
    print(f"T2D 365d oracle: mean risk {r.mean():.4f}, observed {y.mean():.4f}, AUROC {auroc:.3f}, n={len(y)}")
    assert auroc > 0.75


def test_oracle_without_prs_takes_out_the_hazards_prs_term(fed: FederationManifest, scenario: ScenarioConfig) -> None:
    # Issue 31's "oracle without PRS": the hazard divided by exp(beta_prs * PRS); where the
    # subject is still healthy and the risk small, the risk scales by about that factor.
    site = fed.sites[0].name
    risk = _truth(fed, site, "risk").filter(pl.col("at_risk_T2D")).head(300)
    prs = _truth(fed, site, "subjects").select("subject_id", "prs_T2D")
    sub = risk.join(prs, on="subject_id")
    args = (fed.truth_dir, site, "T2D", sub["subject_id"].to_numpy(), sub["prediction_time"].to_numpy(), 365)
    with_prs, without = oracle_risk(*args), oracle_risk(*args, with_prs=False)
    beta = scenario.diseases["T2D"].beta_prs
    assert beta > 0
    ok = np.isfinite(with_prs) & (with_prs > 1e-6) & (with_prs < 0.02)
    assert ok.sum() > 50
    ratio = without[ok] / with_prs[ok]
    expected = np.exp(-beta * sub["prs_T2D"].to_numpy()[ok])
    # Small risks ~ proportional to the hazard; a subclinical subject's risk is the lag's alone.
    close = np.abs(np.log(ratio / expected)) < 0.05
    assert close.mean() > 0.8, close.mean()
    np.testing.assert_array_equal(np.isnan(with_prs), np.isnan(without))


# ------------------------------------------------------------------------------------------
# Configs, CLI, atomic writes


def test_default_scenario_has_the_four_site_kinds() -> None:
    sc = load_scenario("default")
    assert len(sc.sites) >= 4 and all(s.n_subjects == 2000 for s in sc.sites)
    mixes = {frozenset(m for m in ("ehr", "wearables", "genomics") if s.fraction(m) > 0) for s in sc.sites}
    assert {
        frozenset({"ehr", "wearables", "genomics"}),
        frozenset({"ehr"}),
        frozenset({"ehr", "wearables"}),
        frozenset({"ehr", "genomics"}),
    } <= mixes
    assert any(s.date_offset_years >= 88 for s in sc.sites)  # dates in the 2100s
    assert {s.ppg for s in sc.sites if s.fraction("wearables") > 0} == {True, False}


def test_bad_scenarios_name_the_field(tmp_path: Path) -> None:
    base = load_scenario("tiny").model_dump(mode="json")
    bad_ehr = json.loads(json.dumps(base))
    bad_ehr["sites"][0]["modalities"] = {"ehr": 0.5}
    with pytest.raises(ValueError, match="modalities.ehr"):
        load_scenario(bad_ehr)
    bad_mod = json.loads(json.dumps(base))
    bad_mod["sites"][0]["modalities"] = {"ehr": 1.0, "imaging": 0.2}
    with pytest.raises(ValueError, match="imaging"):
        load_scenario(bad_mod)
    dup = json.loads(json.dumps(base))
    dup["sites"][1]["name"] = dup["sites"][0]["name"]
    with pytest.raises(ValueError, match="duplicate site name"):
        load_scenario(dup)
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nsites:\n  - name: a\n    n_subjects: -3\n")
    with pytest.raises(ValueError, match=r"(?s)broken.yaml.*sites.0.n_subjects"):
        load_scenario(path)
    with pytest.raises(FileNotFoundError, match="known scenarios"):
        load_scenario("no_such_scenario")


def test_cli_writes_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path), "--scenario", "tiny", "--seed", "1", "--n-subjects", "25", "--quiet"]) == 0
    manifest = FederationManifest.model_validate_json((tmp_path / "manifest.json").read_text())
    assert [s.n_subjects for s in manifest.sites] == [25, 25, 25]
    assert (tmp_path / "sites" / "biobank" / "data" / "0.parquet").is_file()
    assert "biobank" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "x"), "--scenario", "nope", "--quiet"]) == 2


def test_failed_write_leaves_previous_site_intact(tmp_path: Path) -> None:
    final = tmp_path / "site"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with _atomic_dir(final) as tmp:
            (tmp / "half.parquet").write_text("partial")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["site"]
    assert [p.name for p in final.iterdir()] == ["keep.txt"]
