"""Write a synthetic federation: one docs/architecture.md site root per site, ground truth beside them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from collections.abc import Iterator, Mapping, Sequence
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

from healthfm_core.data.files.layout import WEARABLES_SUBDIRECTORY
from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import strict_model
from simulations.synthetic.appender import ParquetAppender
from simulations.synthetic.cohort import Cohort, simulate_cohort
from simulations.synthetic.ehr import code_catalogue, simulate_ehr
from simulations.synthetic.hospital import (
    hospital_onsets_table,
    simulate_hospital_ehr,
    used_codes,
    write_hospital_codes,
    write_hospital_shards,
)
from simulations.synthetic.mimic import simulate_mimic_ehr
from simulations.synthetic.scenario import (
    ScenarioConfig,
    SiteSpec,
    load_scenario,
)
from simulations.synthetic.truth import (
    latent_table,
    onsets_table,
    risk_table,
    subjects_table,
)
from simulations.synthetic.wearables import (
    simulate_wearables,
    wear_period_table,
    wear_periods,
)

logger = logging.getLogger(__name__)

SPLIT_FRACTIONS = {meds.train_split: 0.8, meds.tuning_split: 0.1, meds.held_out_split: 0.1}
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1}
# Subjects simulated at a time (rounded to whole shards): bounds memory under 1 GiB for the hospital
# format whatever the site's size; today's scenarios (<= 2,000 per site) are one batch.
BATCH_SUBJECTS = 2000


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


def _splits(subject_id: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """The site's split: one permutation over all its subjects (a few bytes per subject)."""
    n = len(subject_id)
    order = rng.permutation(n)
    n_train = int(round(SPLIT_FRACTIONS[meds.train_split] * n))
    n_tuning = int(round(SPLIT_FRACTIONS[meds.tuning_split] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = meds.train_split
    split[order[n_train : n_train + n_tuning]] = meds.tuning_split
    split[order[n_train + n_tuning :]] = meds.held_out_split
    table = pa.table({"subject_id": subject_id, "split": pa.array(split, pa.string())})
    meds.SubjectSplitSchema.validate(table)  # raises on a mismatch
    return table


def _write_events(events: pa.Table, cohort: Cohort, site: SiteSpec, root: Path, first_shard: int) -> None:
    """data/<first_shard + i>.parquet: whole subjects per shard, rows already in MEDS order."""
    sid = events.column("subject_id").to_numpy()
    for i, lo in enumerate(range(0, cohort.n, site.subjects_per_shard)):
        hi = min(lo + site.subjects_per_shard, cohort.n)
        a, b = np.searchsorted(sid, [cohort.subject_id[lo], cohort.subject_id[hi - 1] + 1])
        shard = events.slice(a, b - a)
        meds.DataSchema.validate(shard)
        _write_parquet(shard, root / meds.data_subdirectory / f"{first_shard + i}.parquet")


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
        "etl_name": "simulations.synthetic",
        "etl_version": _etl_version(),
        "meds_version": meds.__version__,
        "license": "CC0-1.0 (synthetic data, no real person)",
    }
    meds.DatasetMetadataSchema.validate(blob)
    path = root / meds.dataset_metadata_filepath
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(blob, indent=2) + "\n")


def batch_size(site: SiteSpec, batch_subjects: int) -> int:
    """Subjects simulated at a time: `batch_subjects` rounded down to whole shards (at least one)."""
    if batch_subjects < 1:
        raise ValueError(f"batch_subjects must be >= 1, got {batch_subjects}")
    return max(1, batch_subjects // site.subjects_per_shard) * site.subjects_per_shard


def generate_site(
    scenario: ScenarioConfig,
    site: SiteSpec,
    seed: int,
    sites_dir: Path,
    truth_dir: Path,
    site_index: int = 0,
    progress: bool = True,
    batch_subjects: int = BATCH_SUBJECTS,
) -> SiteManifest:
    """Simulate one site; write its root under sites_dir/<name> and truth under truth_dir/<name>.

    Subjects are simulated and written batch by batch (`batch_size`), so memory is bounded by a
    batch, not by the site. Batch 0 draws from the site's streams as a one-batch site always did
    (sites up to one batch are written exactly as before); batch b >= 1 from its own streams,
    spawned from the site's seed. Subjects are independent given the site, so batching changes
    which numbers are drawn, never their distribution; PRS z-scores are standardised within each
    batch (mean 0 and sd 1 per batch give mean 0 and sd 1 over the site)."""
    n = site.n_subjects
    per_batch = batch_size(site, batch_subjects)
    id_start = site.subject_id_start if site.subject_id_start is not None else 1_000_000 * (site_index + 1)
    site_seed = _site_seed(seed, site)
    first_streams = site_seed.spawn(4)
    rng_split = np.random.default_rng(first_streams[3])
    root, truth = sites_dir / site.name, truth_dir / site.name
    n_events = n_epochs = n_wear_files = wear_subjects = genomics = 0
    used: set[str] = set()
    catalogue: dict[str, str] = {}
    bar = tqdm(total=n, desc=f"site {site.name}", unit="subject", disable=not progress, leave=True)
    with _atomic_dir(root) as tmp_root, _atomic_dir(truth) as tmp_truth, ParquetAppender(PARQUET_OPTIONS) as out:
        for b, lo in enumerate(range(0, n, per_batch)):
            streams = first_streams[:3] if b == 0 else site_seed.spawn(3)
            rng_cohort, rng_ehr, rng_wear = (np.random.default_rng(s) for s in streams)
            part = site.model_copy(update={"n_subjects": min(per_batch, n - lo), "subject_id_start": id_start + lo})
            cohort = simulate_cohort(scenario, part, site_index, rng_cohort)
            first_shard = lo // site.subjects_per_shard
            onsets = onsets_table(cohort, scenario)
            if site.ehr_format in ("hospital", "mimic"):
                if site.ehr_format == "hospital":
                    hospital = simulate_hospital_ehr(cohort, scenario, part, rng_ehr)
                    onsets = hospital_onsets_table(onsets, hospital)
                else:
                    hospital = simulate_mimic_ehr(cohort, scenario, part, rng_ehr)
                n_events += write_hospital_shards(hospital, cohort, part, tmp_root, PARQUET_OPTIONS, first_shard)
                used |= used_codes(hospital)
                catalogue.update(hospital.catalogue)
                del hospital
            else:
                events, codes = simulate_ehr(cohort, scenario, part, rng_ehr)
                _write_events(events, cohort, part, tmp_root, first_shard)
                used.update(codes)
                n_events += events.num_rows
                del events
            w_subj, w_start = wear_periods(cohort, part, rng_wear)
            for chunk in simulate_wearables(cohort, scenario, part, w_subj, w_start, rng_wear):
                _write_parquet(chunk, tmp_root / WEARABLES_SUBDIRECTORY / f"{n_wear_files}.parquet")
                n_wear_files += 1
                n_epochs += chunk.num_rows
            wear_subjects += len(np.unique(w_subj))
            genomics += int(cohort.has_genomics.sum())
            out.append(subjects_table(cohort, scenario), tmp_truth / "subjects.parquet")
            out.append(onsets, tmp_truth / "onsets.parquet")
            out.append(latent_table(cohort, scenario), tmp_truth / "latent.parquet")
            out.append(risk_table(cohort, scenario), tmp_truth / "risk.parquet")
            out.append(wear_period_table(cohort, w_subj, w_start, site.wear_days), tmp_truth / "wear_periods.parquet")
            bar.update(cohort.n)
            del cohort, onsets
        if site.ehr_format in ("hospital", "mimic"):
            write_hospital_codes(used, catalogue, tmp_root, PARQUET_OPTIONS)
        else:
            _write_code_metadata([c for c in code_catalogue(scenario) if c in used], scenario, tmp_root)
        subject_id = np.arange(id_start, id_start + n, dtype=np.int64)
        _write_parquet(_splits(subject_id, rng_split), tmp_root / meds.subject_splits_filepath)
        _write_dataset_metadata(scenario, site, seed, tmp_root)
        out.close()  # the truth files are complete before their folder takes its place
    bar.close()

    counts = {"ehr": n, "wearables": wear_subjects, "genomics": genomics}
    return SiteManifest(
        name=site.name,
        kind=site.kind,
        root=root,
        truth_dir=truth,
        n_subjects=n,
        modalities=[m for m, c in counts.items() if c > 0],
        subjects_per_modality=counts,
        ppg=site.ppg,
        n_events=n_events,
        n_wearable_epochs=n_epochs,
    )


def select_sites(config: ScenarioConfig, sites: Sequence[str] | None) -> ScenarioConfig:
    """The scenario restricted to the named sites, each keeping the subject ids it has in the whole
    scenario (its position sets the default ids); so a site generated alone is the same site."""
    if sites is None:
        return config
    names = [s.name for s in config.sites]
    unknown = sorted(set(sites) - set(names))
    if unknown:
        raise ValueError(f"scenario {config.name!r} has no site(s) {unknown}; sites: {names}")
    kept = [
        s.model_copy(
            update={"subject_id_start": 1_000_000 * (i + 1) if s.subject_id_start is None else s.subject_id_start}
        )
        for i, s in enumerate(config.sites)
        if s.name in sites
    ]
    return config.model_copy(update={"sites": kept})


def generate_federation(
    out_dir: str | Path,
    scenario: str | Path | ScenarioConfig | dict = "default",
    seed: int = 0,
    n_subjects: int | None = None,
    progress: bool = True,
    sites: Sequence[str] | None = None,
    batch_subjects: int = BATCH_SUBJECTS,
) -> FederationManifest:
    """Write OUT_DIR/sites/<site>/ (site roots), OUT_DIR/truth/ and OUT_DIR/manifest.json.

    `scenario` is a name under configs/scenario/, a YAML path, a mapping or a ScenarioConfig;
    `n_subjects` overrides every site's size (tests use tiny cohorts); `sites` generates only
    the named sites (truth/scenario.json then holds those); `batch_subjects` bounds the subjects
    in memory at a time (generate_site).
    """
    config = select_sites(load_scenario(scenario).with_n_subjects(n_subjects), sites)
    out = Path(out_dir).resolve()
    sites_dir, truth_dir = out / "sites", out / "truth"
    sites_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(truth_dir / "scenario.json", config.model_dump_json(indent=2) + "\n")
    manifests = []
    for i, site in enumerate(config.sites):
        logger.info("generating site %s (%s, %d subjects)", site.name, site.kind, site.n_subjects)
        manifests.append(
            generate_site(
                config, site, seed, sites_dir, truth_dir, site_index=i, progress=progress, batch_subjects=batch_subjects
            )
        )
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
            manifest = strict_model(FederationManifest, manifest_path.read_text(), manifest_path)
            saved = strict_model(ScenarioConfig, scenario_path.read_text(), scenario_path)
        except ValueError as err:
            logger.warning("%s: cannot reuse (%s); generating again", data_dir, err)
        else:
            if saved == expected and manifest.seed == seed and all(Path(s.root).is_dir() for s in manifest.sites):
                logger.info("reusing synthetic sites in %s", manifest.sites_dir)
                return manifest
    logger.info("generating synthetic sites (scenario %s, seed %d) in %s", expected.name, seed, data_dir)
    return generate_federation(data_dir, scenario=expected, seed=seed, n_subjects=None)
