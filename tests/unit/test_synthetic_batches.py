"""The generator writes a site batch by batch of subjects: today's sizes give the files they always
gave, a batched site is a valid MEDS site, and memory does not grow with the number of subjects."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from healthfm_core.data.checks.site_check import check_site
from simulations.synthetic import generate_federation, load_scenario
from simulations.synthetic.generate import batch_size, select_sites

# Content digests (sha256 of the Arrow IPC stream of each file's table, 16 hex digits) of the
# files main's generator wrote before batching (commit ca981cb) at seed 0: `tiny` at 40 subjects,
# the first site of `hospital` and of `mimic` at 30 (generated with the rest of their federation).
BEFORE = {
    "tiny": {
        "sites/biobank/data/0.parquet": "054b35265abde58a",
        "sites/biobank/metadata/codes.parquet": "b40ed04bed4bdd0a",
        "sites/biobank/metadata/subject_splits.parquet": "845b81b6383561f2",
        "sites/biobank/wearables/0.parquet": "34124f2d0bd543d2",
        "sites/genomics/data/0.parquet": "6646439981590f79",
        "sites/genomics/metadata/codes.parquet": "b40ed04bed4bdd0a",
        "sites/genomics/metadata/subject_splits.parquet": "60eb4668fbefad62",
        "sites/hospital/data/0.parquet": "b0802a512ae6efe8",
        "sites/hospital/metadata/codes.parquet": "c82ea3aeab90ee4a",
        "sites/hospital/metadata/subject_splits.parquet": "f56147f54f9ab06b",
        "sites/hospital/wearables/0.parquet": "b1982ab5d06363af",
        "truth/biobank/latent.parquet": "cd9b1be076866a42",
        "truth/biobank/onsets.parquet": "54fc8f423e958242",
        "truth/biobank/risk.parquet": "fd49cab24681ceaf",
        "truth/biobank/subjects.parquet": "6d4bf02b79d64205",
        "truth/biobank/wear_periods.parquet": "eddf7c2ba0eb1f81",
        "truth/genomics/latent.parquet": "0e88b842fb0a1cca",
        "truth/genomics/onsets.parquet": "6e93bf59271ff5b5",
        "truth/genomics/risk.parquet": "eb9925a7bdaf6f24",
        "truth/genomics/subjects.parquet": "b8332bd806fc43e1",
        "truth/genomics/wear_periods.parquet": "2e86935a23170db3",
        "truth/hospital/latent.parquet": "20021d96b1ba727d",
        "truth/hospital/onsets.parquet": "618a7de34659d4ea",
        "truth/hospital/risk.parquet": "552bd426ec08c48a",
        "truth/hospital/subjects.parquet": "a3822e83e77d9d6e",
        "truth/hospital/wear_periods.parquet": "89233e2bac4d94b8",
    },
    "hospital": {
        "sites/general_hospital/data/0.parquet": "86ef38005a827579",
        "sites/general_hospital/metadata/codes.parquet": "9f9c9cca4816196f",
        "sites/general_hospital/metadata/subject_splits.parquet": "dcae9173f175441f",
        "truth/general_hospital/latent.parquet": "ab57d9b9527dbd33",
        "truth/general_hospital/onsets.parquet": "1b3eb477556e7fc5",
        "truth/general_hospital/risk.parquet": "9a07cbb7dd706d7c",
        "truth/general_hospital/subjects.parquet": "28dd821df1204f22",
        "truth/general_hospital/wear_periods.parquet": "2e86935a23170db3",
    },
    "mimic": {
        "sites/tertiary_icu/data/0.parquet": "b2460143b94c70c6",
        "sites/tertiary_icu/metadata/codes.parquet": "98dc2ee029519c6b",
        "sites/tertiary_icu/metadata/subject_splits.parquet": "ae5443e3d31ab741",
        "truth/tertiary_icu/latent.parquet": "df2e8120bd52fa0d",
        "truth/tertiary_icu/onsets.parquet": "ce1f5ce4d244007c",
        "truth/tertiary_icu/risk.parquet": "3bc8a8dfb6d79edc",
        "truth/tertiary_icu/subjects.parquet": "6910e08ea837b15f",
        "truth/tertiary_icu/wear_periods.parquet": "2e86935a23170db3",
    },
}


def _content_digest(path: Path) -> str:
    """The table's content and schema, independent of the parquet writer's bytes."""
    table = pq.read_table(path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): _content_digest(p) for p in sorted(out.rglob("*.parquet"))}


# The same file as written on another CPU: at bcbcb45, on an AMD EPYC with AVX2 only, `tiny`'s
# biobank onsets (event times integrated from the hazards in float64) came out with this digest
# while every data file matched; the digests above came from a machine where they matched. The
# onset table alone depends on the CPU's floating point (numpy's SIMD paths), as the evidence
# job's training does (docs/evidence/full/README.md).
ALSO_SEEN = {"tiny": {"truth/biobank/onsets.parquet": "840738722505f313"}}


@pytest.mark.parametrize(
    ("scenario", "n", "sites"),
    [("tiny", 40, None), ("hospital", 30, ["general_hospital"]), ("mimic", 30, ["tertiary_icu"])],
)
def test_one_batch_writes_the_files_of_before(tmp_path: Path, scenario: str, n: int, sites: list[str] | None) -> None:
    # A site of at most one batch draws exactly the numbers it drew before batching; a site
    # generated alone (`sites`) is the site it is in the whole federation (same ids, same seed).
    generate_federation(tmp_path, scenario, seed=0, n_subjects=n, progress=False, sites=sites)
    got = _digests(tmp_path)
    for path, digest in ALSO_SEEN.get(scenario, {}).items():
        if got.get(path) == digest:
            got[path] = BEFORE[scenario][path]
    assert got == BEFORE[scenario]


def _scenario(n_subjects: int, ehr_format: str = "synthetic", wearables: bool = True) -> dict:
    site = {"name": "s", "n_subjects": n_subjects, "subjects_per_shard": 25, "ehr_format": ehr_format}
    if wearables:
        site["modalities"] = {"ehr": 1.0, "wearables": 0.3, "genomics": 0.8}
        site["wear_days"] = 1
    return {"name": "batches", "sites": [site]}


@pytest.mark.parametrize("ehr_format", ["synthetic", "hospital"])
def test_batched_site_is_a_valid_meds_site(tmp_path: Path, ehr_format: str) -> None:
    fed = generate_federation(tmp_path, _scenario(110, ehr_format), seed=1, progress=False, batch_subjects=50)
    site = fed.sites[0]
    assert check_site(site.root).n_errors == 0
    shards = sorted((site.root / "data").glob("*.parquet"), key=lambda p: int(p.stem))
    assert [p.stem for p in shards] == ["0", "1", "2", "3", "4"]  # 110 subjects, 25 per shard
    seen: list[int] = []
    for path in shards:
        frame = pl.read_parquet(path)
        ids = frame["subject_id"].unique(maintain_order=True).to_list()
        assert ids == sorted(ids) and not set(ids) & set(seen), path  # whole subjects, in order
        seen += ids
        timed = frame.filter(pl.col("time").is_not_null())
        assert timed.sort(["subject_id", "time"], maintain_order=True)["time"].equals(timed["time"]), path
    assert seen == list(range(1_000_000, 1_000_110))
    assert site.n_events == sum(pq.read_metadata(p).num_rows for p in shards)
    codes = set(pl.read_parquet(site.root / "metadata/codes.parquet")["code"])
    assert codes == set(pl.concat([pl.read_parquet(p, columns=["code"]) for p in shards])["code"])
    splits = pl.read_parquet(site.root / "metadata/subject_splits.parquet")
    assert sorted(splits["subject_id"]) == seen
    subjects = pl.read_parquet(fed.truth_dir / "s/subjects.parquet")
    assert subjects["subject_id"].to_list() == seen
    assert (
        pq.read_metadata(fed.truth_dir / "s/subjects.parquet").num_row_groups == 3
    )  # one per batch: 50, 50, 10 subjects
    for col in [c for c in subjects.columns if c.startswith("prs_")]:
        # Each batch standardised: the site's scores keep mean 0 and sd 1 exactly.
        x = subjects[col].to_numpy().astype(np.float64)
        assert abs(x.mean()) < 1e-5 and abs(x.std() - 1.0) < 1e-5, col
    if ehr_format == "synthetic":
        wear = sorted((site.root / "wearables").glob("*.parquet"))
        assert wear and site.n_wearable_epochs == sum(pq.read_metadata(p).num_rows for p in wear)
    again = tmp_path / "again"
    generate_federation(again, _scenario(110, ehr_format), seed=1, progress=False, batch_subjects=50)
    assert _digests(again / "sites") == _digests(tmp_path / "sites")  # batches are deterministic


def _traced_peak(out: Path, n_subjects: int, batch_subjects: int) -> int:
    """Peak of Python's and numpy's allocations while generating (Arrow's pool is not traced)."""
    scenario = {**_scenario(n_subjects, wearables=False), "follow_up_years": 1.5}  # fewer steps: faster
    tracemalloc.start()
    try:
        generate_federation(out, scenario, seed=0, progress=False, batch_subjects=batch_subjects)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_subjects(tmp_path: Path) -> None:
    _traced_peak(tmp_path / "warm", 25, batch_subjects=25)  # one-time allocations (caches) paid here
    small = _traced_peak(tmp_path / "a", 50, batch_subjects=50)  # one batch
    large = _traced_peak(tmp_path / "b", 200, batch_subjects=50)  # four
    whole = _traced_peak(tmp_path / "c", 200, batch_subjects=200)
    assert large < 1.25 * small, (small, large)
    assert whole > 2.5 * small, (small, whole)  # the measure sees growth where there is some


def test_batch_size_and_site_selection_refuse_bad_input() -> None:
    spec = load_scenario("tiny").sites[0]  # 120 subjects per shard
    assert batch_size(spec, 1) == 120 and batch_size(spec, 2000) == 1920
    with pytest.raises(ValueError, match="batch_subjects must be >= 1, got 0"):
        batch_size(spec, 0)
    with pytest.raises(ValueError, match=r"no site\(s\) \['nowhere'\]"):
        select_sites(load_scenario("tiny"), ["nowhere"])
    kept = select_sites(load_scenario("tiny"), ["genomics"]).sites
    assert [(s.name, s.subject_id_start) for s in kept] == [("genomics", 3_000_000)]
