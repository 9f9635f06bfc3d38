"""Write a synthetic federation: one docs/architecture.md site root per site, ground truth beside them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel
from tqdm.auto import tqdm

from healthfm_core.data.layout import WEARABLES_SUBDIRECTORY
from healthfm_core.data.synthetic.cohort import Cohort, simulate_cohort
from healthfm_core.data.synthetic.ehr import code_catalogue, simulate_ehr
from healthfm_core.data.synthetic.hospital import (
    hospital_onsets_table,
    simulate_hospital_ehr,
    write_hospital_events,
)
from healthfm_core.data.synthetic.mimic import simulate_mimic_ehr
from healthfm_core.data.synthetic.scenario import (
    ScenarioConfig,
    SiteSpec,
    load_scenario,
)
from healthfm_core.data.synthetic.truth import (
    latent_table,
    onsets_table,
    risk_table,
    subjects_table,
)
from healthfm_core.data.synthetic.wearables import (
    simulate_wearables,
    wear_period_table,
    wear_periods,
)
from healthfm_core.files import atomic_write_text

logger = logging.getLogger(__name__)

SPLIT_FRACTIONS = {meds.train_split: 0.8, meds.tuning_split: 0.1, meds.held_out_split: 0.1}
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1}


class SiteManifest(BaseModel):
    name: str
    kind: str
    root: Path
    truth_dir: Path
    n_subjects: int
    modalities: list[str]  # "ehr", "wearables", "genomics" present at the site
    subjects_per_modality: dict[str, int]
    ppg: bool
    n_events: int
    n_wearable_epochs: int


class FederationManifest(BaseModel):
    scenario: str
    seed: int
    out_dir: Path
    sites_dir: Path
    truth_dir: Path
    sites: list[SiteManifest]

    def site(self, name: str) -> SiteManifest:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r} in the federation (sites: {[s.name for s in self.sites]})")


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling directory that replaces `final` only when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **PARQUET_OPTIONS)


def _site_seed(seed: int, site: SiteSpec) -> np.random.SeedSequence:
    # Keyed by the site's name, so adding or reordering sites leaves the others unchanged.
    return np.random.SeedSequence([seed, zlib.crc32(site.name.encode())])


def _etl_version() -> str:
    try:
        return version("healthfm")
    except PackageNotFoundError:
        return "0+unknown"


def _splits(cohort: Cohort, rng: np.random.Generator) -> pa.Table:
    n = cohort.n
    order = rng.permutation(n)
    n_train = int(round(SPLIT_FRACTIONS[meds.train_split] * n))
    n_tuning = int(round(SPLIT_FRACTIONS[meds.tuning_split] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = meds.train_split
    split[order[n_train : n_train + n_tuning]] = meds.tuning_split
    split[order[n_train + n_tuning :]] = meds.held_out_split
    table = pa.table({"subject_id": cohort.subject_id, "split": pa.array(split, pa.string())})
    meds.SubjectSplitSchema.validate(table)  # raises on a mismatch
    return table


def _write_events(events: pa.Table, cohort: Cohort, site: SiteSpec, root: Path) -> None:
    """data/<i>.parquet: whole subjects per shard, rows already in MEDS order."""
    sid = events.column("subject_id").to_numpy()
    for i, lo in enumerate(range(0, cohort.n, site.subjects_per_shard)):
        hi = min(lo + site.subjects_per_shard, cohort.n)
        a, b = np.searchsorted(sid, [cohort.subject_id[lo], cohort.subject_id[hi - 1] + 1])
        shard = events.slice(a, b - a)
        meds.DataSchema.validate(shard)
        _write_parquet(shard, root / meds.data_subdirectory / f"{i}.parquet")


def _write_code_metadata(codes: list[str], scenario: ScenarioConfig, root: Path) -> None:
    catalogue = code_catalogue(scenario)
    table = pa.table(
        {
            "code": pa.array(codes, pa.string()),
            "description": pa.array([catalogue[c][0] for c in codes], pa.string()),
            "parent_codes": pa.array([catalogue[c][1] for c in codes], pa.list_(pa.string())),
        }
    )
    meds.CodeMetadataSchema.validate(table)
    _write_parquet(table, root / meds.code_metadata_filepath)


def _write_dataset_metadata(scenario: ScenarioConfig, site: SiteSpec, seed: int, root: Path) -> None:
    blob = {
        "dataset_name": f"healthfm-synthetic/{scenario.name}/{site.name}",
        "dataset_version": f"seed-{seed}",
        "etl_name": "healthfm_core.data.synthetic",
        "etl_version": _etl_version(),
        "meds_version": meds.__version__,
        "license": "CC0-1.0 (synthetic data, no real person)",
    }
    meds.DatasetMetadataSchema.validate(blob)
    path = root / meds.dataset_metadata_filepath
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(blob, indent=2) + "\n")


def generate_site(
    scenario: ScenarioConfig,
    site: SiteSpec,
    seed: int,
    sites_dir: Path,
    truth_dir: Path,
    site_index: int = 0,
    progress: bool = True,
) -> SiteManifest:
    """Simulate one site; write its root under sites_dir/<name> and truth under truth_dir/<name>."""
    rng_cohort, rng_ehr, rng_wear, rng_split = (np.random.default_rng(s) for s in _site_seed(seed, site).spawn(4))
    root, truth = sites_dir / site.name, truth_dir / site.name
    bar = tqdm(total=6, desc=f"site {site.name}", unit="stage", disable=not progress, leave=True)
    with _atomic_dir(root) as tmp_root, _atomic_dir(truth) as tmp_truth:
        bar.set_postfix_str("latent state and onsets")
        cohort = simulate_cohort(scenario, site, site_index, rng_cohort)
        bar.update()
        bar.set_postfix_str("EHR events")
        onsets = onsets_table(cohort, scenario)
        if site.ehr_format == "mimic":
            n_events = write_hospital_events(
                simulate_mimic_ehr(cohort, scenario, site, rng_ehr), cohort, site, tmp_root, PARQUET_OPTIONS
            )
        elif site.ehr_format == "hospital":
            hospital = simulate_hospital_ehr(cohort, scenario, site, rng_ehr)
            n_events = write_hospital_events(hospital, cohort, site, tmp_root, PARQUET_OPTIONS)
            onsets = hospital_onsets_table(onsets, hospital)
        else:
            events, codes = simulate_ehr(cohort, scenario, site, rng_ehr)
            _write_events(events, cohort, site, tmp_root)
            _write_code_metadata(codes, scenario, tmp_root)
            n_events = events.num_rows
        _write_parquet(_splits(cohort, rng_split), tmp_root / meds.subject_splits_filepath)
        _write_dataset_metadata(scenario, site, seed, tmp_root)
        bar.update()
        bar.set_postfix_str("wearables")
        w_subj, w_start = wear_periods(cohort, site, rng_wear)
        n_epochs = 0
        for i, chunk in enumerate(simulate_wearables(cohort, scenario, site, w_subj, w_start, rng_wear)):
            _write_parquet(chunk, tmp_root / WEARABLES_SUBDIRECTORY / f"{i}.parquet")
            n_epochs += chunk.num_rows
        wear_subjects = len(np.unique(w_subj))
        bar.update()
        bar.set_postfix_str("truth")
        _write_parquet(subjects_table(cohort, scenario), tmp_truth / "subjects.parquet")
        _write_parquet(onsets, tmp_truth / "onsets.parquet")
        _write_parquet(latent_table(cohort, scenario), tmp_truth / "latent.parquet")
        bar.update()
        _write_parquet(risk_table(cohort, scenario), tmp_truth / "risk.parquet")
        _write_parquet(wear_period_table(cohort, w_subj, w_start, site.wear_days), tmp_truth / "wear_periods.parquet")
        bar.update()
    bar.update()
    bar.close()

    counts = {"ehr": cohort.n, "wearables": wear_subjects, "genomics": int(cohort.has_genomics.sum())}
    return SiteManifest(
        name=site.name,
        kind=site.kind,
        root=root,
        truth_dir=truth,
        n_subjects=cohort.n,
        modalities=[m for m, c in counts.items() if c > 0],
        subjects_per_modality=counts,
        ppg=site.ppg,
        n_events=n_events,
        n_wearable_epochs=n_epochs,
    )


def generate_federation(
    out_dir: str | Path,
    scenario: str | Path | ScenarioConfig | dict = "default",
    seed: int = 0,
    n_subjects: int | None = None,
    progress: bool = True,
) -> FederationManifest:
    """Write OUT_DIR/sites/<site>/ (site roots), OUT_DIR/truth/ and OUT_DIR/manifest.json.

    `scenario` is a name under configs/scenario/, a YAML path, a mapping or a ScenarioConfig;
    `n_subjects` overrides every site's size (tests use tiny cohorts).
    """
    config = load_scenario(scenario).with_n_subjects(n_subjects)
    out = Path(out_dir).resolve()
    sites_dir, truth_dir = out / "sites", out / "truth"
    sites_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(truth_dir / "scenario.json", config.model_dump_json(indent=2) + "\n")
    manifests = []
    for i, site in enumerate(config.sites):
        logger.info("generating site %s (%s, %d subjects)", site.name, site.kind, site.n_subjects)
        manifests.append(generate_site(config, site, seed, sites_dir, truth_dir, site_index=i, progress=progress))
    stale = sorted(
        p.name
        for p in sites_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in {s.name for s in config.sites}
    )
    if stale:
        logger.warning("%s holds site directories not in scenario %r: %s", sites_dir, config.name, stale)
    manifest = FederationManifest(
        scenario=config.name, seed=seed, out_dir=out, sites_dir=sites_dir, truth_dir=truth_dir, sites=manifests
    )
    atomic_write_text(out / "manifest.json", manifest.model_dump_json(indent=2) + "\n")
    return manifest


def synthetic_sites(
    data_dir: str | Path, scenario: Mapping[str, Any] | str, seed: int, n_subjects: int | None
) -> FederationManifest:
    """The synthetic federation in data_dir: reused when generated from the same scenario, seed
    and size, generated (atomically, per site) otherwise."""
    data_dir = Path(data_dir)
    expected = load_scenario(dict(scenario) if isinstance(scenario, Mapping) else scenario).with_n_subjects(n_subjects)
    manifest_path, scenario_path = data_dir / "manifest.json", data_dir / "truth" / "scenario.json"
    if manifest_path.is_file() and scenario_path.is_file():
        try:
            manifest = FederationManifest.model_validate_json(manifest_path.read_text())
            saved = ScenarioConfig.model_validate_json(scenario_path.read_text())
        except ValueError as err:
            logger.warning("%s: cannot reuse (%s); generating again", data_dir, err)
        else:
            if saved == expected and manifest.seed == seed and all(Path(s.root).is_dir() for s in manifest.sites):
                logger.info("reusing synthetic sites in %s", manifest.sites_dir)
                return manifest
    logger.info("generating synthetic sites (scenario %s, seed %d) in %s", expected.name, seed, data_dir)
    return generate_federation(data_dir, scenario=expected, seed=seed, n_subjects=None)
