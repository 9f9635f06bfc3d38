"""Reading a valid site (healthfm_core.data.sites.site); the check itself is in test_site_check.py."""

from __future__ import annotations

from typing import cast

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers.site_tables import HELD, TRAIN, make_site_tables, set_cell, write_site_tables

from healthfm_core.data.files.layout import PRS_PREFIX, WEARABLES_SCHEMA, hash_splits
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import Site, SiteDataError, open_site


def test_open_site_reads_events_wearables_splits_and_codes(site_tables, write_site):
    site = open_site(write_site(site_tables))
    assert isinstance(site, Site)
    assert [p.relative_to(site.root).as_posix() for p in site.data_files] == [
        "data/held_out/0.parquet",
        "data/train/0.parquet",
    ]
    assert site.modalities == ["ehr", "wearables", "genomics"]
    assert site.subject_counts == {"ehr": 2, "wearables": 2, "genomics": 2}
    assert site.modality_subjects("genomics").tolist() == [1, 3]

    shards = list(site.iter_event_shards(columns=["subject_id", "code"]))
    assert [t.column_names for t in shards] == [["subject_id", "code"]] * 2
    assert sum(t.num_rows for t in shards) == site.summary.n_events

    ev = site.read_events([2])
    assert set(ev.column("subject_id").to_pylist()) == {2}
    train = site_tables.shards[TRAIN]
    assert ev.num_rows == train.filter(pc.equal(train.column("subject_id"), 2)).num_rows
    assert site.read_events().num_rows == site.summary.n_events

    wear = site.read_wearables([2])
    assert wear.schema.equals(WEARABLES_SCHEMA, check_metadata=False)
    assert wear.num_rows == site_tables.n_wear_epochs // 2
    assert wear.column("hr_bpm").null_count == wear.num_rows
    assert site.read_wearables([3]).num_rows == 0

    assert sorted(site.subject_splits().to_pylist(), key=lambda r: r["subject_id"]) == [
        {"subject_id": 1, "split": "train"},
        {"subject_id": 2, "split": "train"},
        {"subject_id": 3, "split": "held_out"},
    ]
    assert "LAB//51087//UNK" in site.code_metadata().column("code").to_pylist()


def test_read_events_adds_missing_numeric_value(site_tables, write_site):
    site_tables.shards[HELD] = site_tables.shards[HELD].drop_columns(["numeric_value"])
    site_tables.shards[HELD] = site_tables.shards[HELD].filter(
        pc.invert(pc.starts_with(site_tables.shards[HELD].column("code"), PRS_PREFIX))
    )
    site = open_site(write_site(site_tables))
    ev = site.read_events([3])
    assert ev.schema.field("numeric_value").type == pa.float32()
    assert ev.column("numeric_value").null_count == ev.num_rows == 1


def test_wearables_absent_gives_an_empty_table_with_the_schema(site_tables, write_site):
    site_tables.wearables = {}
    site = open_site(write_site(site_tables))
    wear = site.read_wearables()
    assert wear.num_rows == 0 and wear.schema.equals(WEARABLES_SCHEMA)
    assert "wearables" not in site.modalities


def test_absent_splits_file_gives_a_deterministic_split(site_tables, write_site):
    site_tables.splits = None
    site = open_site(write_site(site_tables))
    assert not site.summary.splits_from_file
    splits = site.subject_splits()
    assert sorted(splits.column("subject_id").to_pylist()) == [1, 2, 3]
    assert splits.equals(hash_splits(np.array([1, 2, 3])))


def test_hash_split_is_stable_and_near_80_10_10():
    ids = np.arange(20_000, dtype=np.int64)
    split = hash_splits(ids).column("split").to_pylist()
    frac = {k: split.count(k) / len(split) for k in ("train", "tuning", "held_out")}
    assert frac["train"] == pytest.approx(0.8, abs=0.02)
    assert frac["tuning"] == pytest.approx(0.1, abs=0.01)
    # A subset of subjects gets the same split as in the full list.
    sub = hash_splits(ids[::7]).column("split").to_pylist()
    assert sub == split[::7]


def test_open_site_raises_with_every_error(site_tables, write_site):
    t = site_tables.shards[TRAIN]
    t = set_cell(t, "numeric_value", 4, float("nan"))
    site_tables.shards[TRAIN] = set_cell(t, "code", 8, "")
    root = write_site(site_tables)
    with pytest.raises(SiteDataError) as info:
        open_site(root)
    kinds = {p.kind for p in info.value.problems}
    assert {"non_finite_value", "empty_code"} <= kinds
    assert "data/train/0.parquet" in str(info.value)


def test_text_value_as_string_is_read_as_large_string(site_tables, write_site):
    """meds < 0.4 wrote text_value as string; MEDS 0.4's align casts it: accepted, read as large_string."""
    t = site_tables.shards[HELD]
    site_tables.shards[HELD] = t.append_column("text_value", pa.array(["array v2", None], pa.string()))
    site = open_site(write_site(site_tables))
    assert site.report.problems == []
    assert site.read_events([3]).schema.field("text_value").type == pa.large_string()


def test_read_events_puts_static_rows_first_whatever_the_file_order(site_tables, write_site):
    """Static rows after, or between, a subject's timed rows (MEDS does not place them) are read
    first; timed rows keep their order, ties in file order; subjects keep the file's order."""
    t = site_tables.shards[TRAIN]
    order = [2, 4, 3, 1, 5, 0, 6, 7, 9, 8, 10]  # subject 1's static rows (0, 1) between its timed rows
    site_tables.shards[TRAIN] = t.take(pa.array(order))
    site = open_site(write_site(site_tables))
    assert site.report.problems == []
    got = site.read_events([1, 2], columns=["subject_id", "time", "code"])
    times = got.column("time").to_pylist()
    codes = got.column("code").to_pylist()
    assert got.column("subject_id").to_pylist() == [1] * 7 + [2] * 4
    assert times[:2] == [None, None] and None not in times[2:]
    assert codes[:2] == ["PRS//CAD", "PRS//T2D"]  # file order among static rows
    # The timed rows as the file has them (same-time rows in file order): LAB before E11 at t0.
    assert codes[2:7] == ["MEDS_BIRTH", "LAB//51087//UNK", "ICD10//E11.9", "ICD10//E11.9", "LAB//51087//UNK"]
    assert codes[7:] == ["MEDS_BIRTH", "LAB//51087//UNK", "ICD10//I10", "MEDS_DEATH"]


def test_read_events_selects_subjects_of_an_int32_shard(site_tables, write_site):
    for rel, t in site_tables.shards.items():
        site_tables.shards[rel] = t.set_column(0, "subject_id", t.column("subject_id").cast(pa.int32()))
    site = open_site(write_site(site_tables))
    ev = site.read_events([2, 3])
    assert ev.schema.field("subject_id").type == pa.int64()
    assert sorted(set(ev.column("subject_id").to_pylist())) == [2, 3]


def test_a_polars_export_gives_the_same_vocabulary_and_sequences(site_tables, write_site, tmp_path):
    """The pipeline downstream of the reader (code statistics, token sequences) sees a polars
    export (large_string code, float64 values, static rows last) as the canonical site."""
    canonical = open_site(write_site_tables(make_site_tables(), tmp_path / "canonical"))
    root = write_site(site_tables)
    for rel, table in site_tables.shards.items():
        df = cast(pl.DataFrame, pl.from_arrow(table)).with_columns(pl.col("numeric_value").cast(pl.Float64))
        df.sort(["subject_id", "time"], nulls_last=True, maintain_order=True).write_parquet(root / "data" / rel)
    site = open_site(root)
    vocab = build_vocabulary([site_code_stats(canonical, min_subjects=1)], min_subjects=1)
    assert build_vocabulary([site_code_stats(site, min_subjects=1)], min_subjects=1) == vocab
    a, b = SiteSequences.from_site(canonical, vocab), SiteSequences.from_site(site, vocab)
    for name in (
        "subject_ids",
        "ev_offsets",
        "ev_time_us",
        "ev_codes",
        "ev_values",
        "st_offsets",
        "st_codes",
        "prs",
        "prs_valid",
        "birth_us",
    ):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
