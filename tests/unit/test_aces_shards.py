"""A task's labels do not depend on which shard holds a subject.

ES-ACES 0.7 changes a parsed config in place when it queries with it (`extract_subtree` adds a
window's root offset to the endpoint), so a config reused for a second shard asks that shard for
one more horizon of follow-up, and later shards lose their negatives. A site is written as three
shards holding the same subjects under three id ranges: every shard must get the same labels, and
they must equal ACES's own query over all events at once with a config ACES loaded itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from aces import predicates as aces_predicates
from aces import query as aces_query
from aces.config import TaskExtractorConfig
from omegaconf import DictConfig

from healthfm_core.data.labels.aces_tasks import aces_labels, aces_labels_shared, load_task
from simulations.synthetic import generate_federation

N_SHARDS = 3
OFFSET = 1_000_000  # subject ids of shard k: 1..n + k * OFFSET


@pytest.fixture(scope="module")
def sharded_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), "hospital", seed=3, n_subjects=60, progress=False)
    source = sorted(p for p in fed.sites_dir.iterdir() if p.is_dir())[0]
    events = pa.concat_tables(pq.read_table(p) for p in sorted((source / "data").rglob("*.parquet")))
    first = pc.min(events["subject_id"]).as_py()  # this site's ids start at 10**7: start at 1
    events = events.set_column(0, "subject_id", pc.subtract(events["subject_id"], pa.scalar(first - 1, pa.int64())))
    root = tmp_path_factory.mktemp("sharded")
    (root / "data").mkdir()
    for k in range(N_SHARDS):
        shifted = events.set_column(0, "subject_id", pc.add(events["subject_id"], pa.scalar(k * OFFSET, pa.int64())))
        pq.write_table(shifted, root / "data" / f"{k}.parquet")
    return root


def _per_shard(table: pa.Table) -> list[pl.DataFrame]:
    df = cast(pl.DataFrame, pl.from_arrow(table))
    assert isinstance(df, pl.DataFrame)
    out = []
    for k in range(N_SHARDS):
        part = df.filter((pl.col("subject_id") // OFFSET) == k)
        out.append(part.with_columns(pl.col("subject_id") - k * OFFSET).sort("subject_id", "prediction_time"))
    return out


def _aces_alone(task_name: str, horizon: int, variant: tuple[bool, bool], root: Path, tmp: Path) -> pl.DataFrame:
    """ACES's own loader and query over the whole site as one frame (no shards, no cache)."""
    task = load_task(task_name)
    path = tmp / f"{task_name}_{horizon}_{variant[0]}_{variant[1]}.yaml"
    path.write_text(yaml.safe_dump(task.config_for(horizon, *variant), sort_keys=False))
    merged = tmp / "merged"
    merged.mkdir(exist_ok=True)
    if not (merged / "all.parquet").exists():
        pq.write_table(
            pa.concat_tables(pq.read_table(p) for p in sorted((root / "data").glob("*.parquet"))),
            merged / "all.parquet",
        )
    cfg = TaskExtractorConfig.load(path)
    preds = aces_predicates.get_predicates_df(
        cfg, DictConfig({"path": str(merged / "all.parquet"), "standard": "meds"})
    )
    result = aces_query.query(TaskExtractorConfig.load(path), preds)
    return result.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("index_timestamp").cast(pl.Datetime("us")).alias("prediction_time"),
        (pl.col("label") > 0).alias("boolean_value"),
    )


@pytest.mark.parametrize("task_name", ["t2d", "cad"])
def test_labels_are_the_same_in_every_shard_and_equal_aces_alone(
    sharded_site: Path, task_name: str, tmp_path: Path
) -> None:
    task = load_task(task_name)
    horizons = [30, 365]
    by_reader = {
        "aces_labels": aces_labels(task, sharded_site, horizons_days=horizons),
        "aces_labels_shared": aces_labels_shared([load_task(task_name)], sharded_site)[0],
    }
    for reader, tables in by_reader.items():
        for h in horizons:
            shards = _per_shard(tables[h])
            assert shards[0].height > 0 and shards[0]["boolean_value"].sum() > 0, (reader, h)
            for k in range(1, N_SHARDS):
                assert shards[k].equals(shards[0]), (
                    f"{reader}, {h}d: shard {k} has {shards[k].height} rows, shard 0 {shards[0].height}"
                )
    # The reference: ACES alone, one query per variant over all shards' events at once.
    for h in horizons:
        parts = [
            _aces_alone(task_name, h, v, sharded_site, tmp_path)
            for v in [
                (c, o)
                for c in ([False, True] if task.metadata.complete_on else [False])
                for o in ([False, True] if task.metadata.stay_window else [False])
            ]
        ]
        expected = (
            pl.concat(parts).unique(subset=["subject_id", "prediction_time"]).sort("subject_id", "prediction_time")
        )
        got = cast(pl.DataFrame, pl.from_arrow(by_reader["aces_labels"][h])).sort("subject_id", "prediction_time")
        assert isinstance(got, pl.DataFrame)
        assert got.equals(expected.select(got.columns)), f"{h}d: {got.height} rows vs ACES alone {expected.height}"
