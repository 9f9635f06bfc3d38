"""A small valid site written with pyarrow, to be broken one way at a time (tests of the site's
reading, checks, tokens and vocabulary; the `site_tables` and `write_site` fixtures in conftest.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

EVENT_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64()),
        pa.field("time", pa.timestamp("us")),
        pa.field("code", pa.string()),
        pa.field("numeric_value", pa.float32()),
    ]
)


WEAR_SCHEMA = pa.schema(
    [
        pa.field("subject_id", pa.int64()),
        pa.field("time", pa.timestamp("us")),
        pa.field("enmo_mg", pa.float32()),
        pa.field("hr_bpm", pa.float32()),
    ]
)


# Shard paths under data/ in make_site_tables.
TRAIN = "train/0.parquet"


HELD = "held_out/0.parquet"


def set_cell(table: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    idx = table.schema.get_field_index(column)
    return table.set_column(idx, table.schema.field(idx), pa.array(values, table.schema.field(idx).type))


@dataclass
class SiteTables:
    """Everything a site root holds, in memory; `write_site` puts it on disk."""

    shards: dict[str, pa.Table]  # path under data/ -> MEDS events
    codes: pa.Table | None
    splits: pa.Table | None
    wearables: dict[str, pa.Table] = field(default_factory=dict)  # path under wearables/
    dataset: dict[str, Any] | None = field(default_factory=lambda: {"dataset_name": "tiny", "meds_version": "0.4.1"})
    n_wear_epochs: int = 0


def _events(rows: list[tuple[int, datetime | None, str, float | None]]) -> pa.Table:
    cols = list(zip(*rows))
    return pa.table({n: list(c) for n, c in zip(EVENT_SCHEMA.names, cols)}, schema=EVENT_SCHEMA)


def make_site_tables() -> SiteTables:
    """3 subjects in 2 shards, MIMIC-style dates in the 2100s, real-looking codes.

    subject 1: PRS + EHR + wearables (with HR); subject 2: EHR + wearables (no HR);
    subject 3: PRS + birth only (genomics, not EHR).
    """
    t0 = datetime(2150, 3, 1, 8, 0)
    train = _events(
        [
            (1, None, "PRS//T2D", 1.25),
            (1, None, "PRS//CAD", -0.5),
            (1, datetime(2090, 5, 17), "MEDS_BIRTH", None),
            (1, t0, "ICD10//E11.9", None),
            (1, t0, "LAB//51087//UNK", 6.5),
            (1, t0 + timedelta(days=40), "ICD10//E11.9", None),
            (1, t0 + timedelta(days=40), "LAB//51087//UNK", 7.1),
            (2, datetime(2101, 1, 2), "MEDS_BIRTH", None),
            (2, t0 + timedelta(days=3), "ICD10//I10", None),
            (2, t0 + timedelta(days=3), "LAB//51087//UNK", 5.4),
            (2, t0 + timedelta(days=90), "MEDS_DEATH", None),
        ]
    )
    held_out = _events(
        [
            (3, None, "PRS//T2D", -0.1),
            (3, datetime(2070, 7, 7), "MEDS_BIRTH", None),
        ]
    )
    codes = pa.table(
        {
            "code": [
                "PRS//T2D",
                "PRS//CAD",
                "MEDS_BIRTH",
                "MEDS_DEATH",
                "ICD10//E11.9",
                "ICD10//I10",
                "LAB//51087//UNK",
            ],
            "description": ["T2D PRS", "CAD PRS", "birth", "death", "T2D", "hypertension", "HbA1c"],
            "parent_codes": pa.array([None] * 7, pa.list_(pa.string())),
        }
    )
    splits = pa.table({"subject_id": pa.array([1, 2, 3], pa.int64()), "split": ["train", "train", "held_out"]})
    n = 240  # two hours of 30-second epochs per subject
    start = datetime(2150, 3, 2)
    times = [start + timedelta(seconds=30 * i) for i in range(n)]
    wear1 = pa.table(
        {
            "subject_id": [1] * n,
            "time": times,
            "enmo_mg": [20.0 + (i % 7) for i in range(n)],
            "hr_bpm": [60.0 + (i % 11) for i in range(n)],
        },
        schema=WEAR_SCHEMA,
    )
    wear2 = pa.table(
        {"subject_id": [2] * n, "time": times, "enmo_mg": [5.0] * n, "hr_bpm": [None] * n},
        schema=WEAR_SCHEMA,
    )
    return SiteTables(
        shards={"train/0.parquet": train, "held_out/0.parquet": held_out},
        codes=codes,
        splits=splits,
        wearables={"0.parquet": pa.concat_tables([wear1, wear2])},
        n_wear_epochs=2 * n,
    )


def write_site_tables(tables: SiteTables, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, table in tables.shards.items():
        path = root / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    (root / "metadata").mkdir(exist_ok=True)
    if tables.codes is not None:
        pq.write_table(tables.codes, root / "metadata" / "codes.parquet")
    if tables.splits is not None:
        pq.write_table(tables.splits, root / "metadata" / "subject_splits.parquet")
    if tables.dataset is not None:
        (root / "metadata" / "dataset.json").write_text(json.dumps(tables.dataset))
    for rel, table in tables.wearables.items():
        path = root / "wearables" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    return root
