"""Tasks as data: an ACES task config (es-aces), optionally with horizons, run on one site's MEDS root.

A task file is a plain ACES config. Without `metadata.horizons_days` (a MEDS-DEV task, any ACES
file as its authors wrote it) it is a task with its own windows: one label table, under the key
OWN_WINDOWS (0, never a horizon: horizons are >= 1 day), evaluated under the task's bare name.
A task file may add, in `metadata` (which ACES ignores), what ACES cannot say (configs/tasks/*.yaml):

    metadata:
      horizons_days: [30, 90, 180, 365]   # one label table per horizon
      horizon_window: target              # its `end` becomes `start + <h>d` for each horizon
      censoring_window: followup          # optional: requires follow-up through the horizon ...
      complete_on: outcome_or_death       # ... unless this predicate occurs in the horizon window
      stay_window: rest_of_stay           # optional: an event-bound window `start -> <edge>` ...
                                          # ... that also holds when no <edge> follows at all
      history_window: history             # optional: a window up to the trigger, with one `has` ...
      min_history_events: 1               # ... predicate, which must hold at least this often in it

An ACES window tree is a conjunction, so "followed up through the horizon OR the outcome/death
happened inside it" is the union of two ACES queries: the config as written, and the config without
`censoring_window` whose horizon window requires `complete_on` at least once. Both see the same
predicates, so a row found by both has the same label.

`stay_window` is the onset tasks' leakage guard (configs/tasks/*.yaml): a window from the trigger
to the next hospital admission or discharge (`end: start -> stay_edge`) that may hold no discharge,
so a prediction time inside a stay (its next edge is that stay's discharge, where MIMIC-IV times
the stay's diagnoses) is excluded. ACES drops a row whose bounding event never comes, which would
drop every prediction time after a subject's last stay (and every row of a site without stays):
the loader adds the query where that window runs to the end of the record with no edge in it, so
those rows are kept as they were. The two are disjoint (an edge follows or none does). With both
rules a task runs up to four queries; aces-cli on the file gives the first (as written).

`history_window` is the onset tasks' minimum history: the shipped files trigger at a clinical
event (any code but MEDS_BIRTH / MEDS_DEATH: never at a birth, death or static row) and require
at least `min_history_events` clinical events (MEDS rows, as ACES counts a window) strictly
before the prediction time (a window from the record's start to the trigger, end exclusive). The loader writes the count into that window's
one `has` predicate, so the file as written (1) is what aces-cli runs.

    task = load_task("configs/tasks/t2d.yaml")          # or load_task("t2d")
    labels = aces_labels(task, site_root)               # {horizon_days: LabelSchema table}
                                                        # ({OWN_WINDOWS: table} without horizons)

ACES reads each data/**/*.parquet shard with polars; MEDS keeps a subject in one shard, so shards
are queried separately and concatenated. Static rows (null time) are dropped by ACES: an outcome
recorded only as a static row is invisible here (today's onset_labels counts it as prevalent).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import meds
import numpy as np
import polars as pl
import pyarrow as pa
import yaml
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from healthfm_core.data.files.frames import to_polars
from healthfm_core.data.files.layout import parquet_files
from healthfm_core.data.files.parquet_guard import open_parquet
from healthfm_core.data.labels.tasks import LABEL_SCHEMA_BOOL, validate_labels
from healthfm_core.strict_files import StrictFileError, strict_yaml
from healthfm_core.terms.task_spec import OWN_WINDOWS

# ACES is imported where a task is parsed or extracted: with its networkx, bigtree and matplotlib
# it costs a process ~0.9 s and ~70 MB, and a site's process needs it only to evaluate.
if TYPE_CHECKING:
    from aces.config import TaskExtractorConfig

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parents[3] / "configs" / "tasks"


class TaskMetadata(BaseModel):
    """The `metadata` block of a task file: ours (task, horizons), MEDS-DEV's (description,
    links, contacts, supported_datasets), and anything else, kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    task: str | None = None
    horizons_days: list[int] | None = Field(default=None, min_length=1)
    horizon_window: str | None = None
    censoring_window: str | None = None
    complete_on: str | None = None
    stay_window: str | None = None
    history_window: str | None = None
    min_history_events: int | None = Field(default=None, ge=1)
    description: str | None = None
    links: list[str] = Field(default_factory=list)
    contacts: list[dict[str, Any]] = Field(default_factory=list)
    supported_datasets: list[str] | None = None
    meds_dev: dict[str, Any] | None = None  # where a MEDS-DEV task came from (healthfm_core.data.labels.meds_dev_tasks)

    @model_validator(mode="after")
    def _horizons_together(self) -> TaskMetadata:
        if (self.horizons_days is None) != (self.horizon_window is None):
            raise ValueError(
                f"horizons_days and horizon_window go together (got {self.horizons_days!r}, {self.horizon_window!r})"
            )
        if self.censoring_window is not None and self.horizon_window is None:
            raise ValueError("censoring_window needs horizons (horizons_days, horizon_window)")
        if self.horizons_days is not None and any(h < 1 for h in self.horizons_days):
            raise ValueError(f"horizons_days {self.horizons_days}: a horizon is at least 1 day")
        if self.min_history_events is not None and self.history_window is None:
            raise ValueError("min_history_events needs history_window (the window it counts in)")
        return self


def history_predicate(window: dict, path: Path) -> str:
    """The one predicate a history window counts (its `has`); ValueError naming the file."""
    has = window.get("has") or {}
    if len(has) != 1:
        raise ValueError(
            f"{path}, field metadata.history_window: its window must have exactly one `has` predicate, got {sorted(has)}"
        )
    return str(next(iter(has)))


def stay_edge(window: dict, path: Path) -> str:
    """The predicate bounding a stay window (`end: start -> <edge>`); ValueError naming the file."""
    end = str(window.get("end") or "")
    head, arrow, edge = end.partition("->")
    if not arrow or head.strip() != "start" or not edge.strip():
        raise ValueError(f"{path}, field metadata.stay_window: its window's end must be 'start -> <edge>', got {end!r}")
    return edge.strip()


class AcesTask(BaseModel):
    """A loaded task file: its name, path, metadata and the raw ACES config (metadata removed)."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path
    metadata: TaskMetadata
    config: dict

    @property
    def horizons(self) -> list[int]:
        """The keys of the task's label tables: its horizons, or [OWN_WINDOWS]."""
        return list(self.metadata.horizons_days or [OWN_WINDOWS])

    def config_for(self, horizon_days: int, complete_variant: bool = False, open_stay: bool = False) -> dict:
        """The ACES config for one horizon; `complete_variant` is the second query of the
        censoring union, `open_stay` the stay window's query without a next edge (module
        docstring). A task without horizons has one config, its own (horizon_days OWN_WINDOWS)."""
        cfg = copy.deepcopy(self.config)
        windows = cfg.get("windows") or {}
        if self.metadata.min_history_events is not None and self.metadata.history_window is not None:
            history = windows[self.metadata.history_window]
            history["has"] = {history_predicate(history, self.path): f"({self.metadata.min_history_events}, None)"}
        if open_stay:
            if self.metadata.stay_window is None:
                raise ValueError(f"{self.path}: task {self.name!r} has no metadata.stay_window")
            stay = windows[self.metadata.stay_window]
            stay["has"] = {stay_edge(stay, self.path): "(None, 0)"}  # no edge until the record ends
            stay["end"] = None
        if self.metadata.horizon_window is None:
            if horizon_days != OWN_WINDOWS or complete_variant:
                raise ValueError(f"{self.path}: task {self.name!r} has its own windows, no horizon {horizon_days}d")
            return cfg
        windows[self.metadata.horizon_window]["end"] = f"start + {int(horizon_days)}d"
        if complete_variant:
            windows.pop(self.metadata.censoring_window)
            has = windows[self.metadata.horizon_window].setdefault("has", {}) or {}
            has[self.metadata.complete_on] = "(1, None)"
            windows[self.metadata.horizon_window]["has"] = has
        return cfg


PREDICTION_TIME_CODE = "HEALTHFM//PREDICTION_TIME"  # aces_labels_shared(times_as_events=True)
MARK_PREDICATE = "healthfm_prediction_time"  # the trigger of a times_as_events query: PREDICTION_TIME_CODE

# Parsed ACES configs by their YAML text: ACES parses with ruamel from a file (~7 ms a config on
# a quiet machine, far more on a busy one) and an evaluation asks for the same few configs again
# and again (every task at every horizon and variant, when validating and when extracting). ACES
# changes the config it queries with (es-aces 0.7 `extract_subtree` adds each window's root
# offset to the parsed endpoint in place), so every query needs its own copy: `_parse` returns a
# deepcopy (~1/20 of a parse), and callers call it once per query, never once per task.
# Keyed by the config's repr, not its YAML text: dumping it took ~4 ms a call (as long as the
# rest of a cache hit five times over, and load_task validates every horizon and variant), repr
# ~0.03 ms; for the plain values a YAML config holds, equal reprs are equal configs.
_PARSED: dict[str, TaskExtractorConfig] = {}


def _parsed(cfg: dict, where: str) -> TaskExtractorConfig:
    """ACES loads configs from files only; each distinct config is parsed once per process. The
    cached parse itself: never to be queried with (see _PARSED)."""
    from aces.config import TaskExtractorConfig

    key = repr(cfg)
    if key not in _PARSED:
        if len(_PARSED) >= 256:  # a long-lived process asked for many tasks: start afresh
            _PARSED.clear()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "task.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            try:
                _PARSED[key] = TaskExtractorConfig.load(path)
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{where}: not a valid ACES task config: {exc}") from exc
    return _PARSED[key]


def _parse(cfg: dict, where: str) -> TaskExtractorConfig:
    """A private copy of ACES's parse of `cfg`, to query with."""
    return copy.deepcopy(_parsed(cfg, where))


def aces_config(cfg: dict, where: str) -> TaskExtractorConfig:
    """ACES's parse of a config (a private copy; ValueError naming `where` if ACES refuses it)."""
    return _parse(cfg, where)


def _query_config(
    task: AcesTask, horizon_days: int, variant: tuple[bool, bool], at_marks: bool = False
) -> TaskExtractorConfig:
    """A fresh parsed config for one ACES query (`variant`: config_for's complete_variant,
    open_stay): a config that was queried once is not the config any more (see _PARSED), and
    reusing it made a site's k-th shard ask for k extra horizons of follow-up. `at_marks`: triggered
    at the PREDICTION_TIME_CODE events instead of the task's own trigger (times_as_events)."""
    cfg = task.config_for(horizon_days, *variant)
    if at_marks:
        cfg["predicates"] = {**(cfg.get("predicates") or {}), MARK_PREDICATE: {"code": PREDICTION_TIME_CODE}}
        cfg["trigger"] = MARK_PREDICATE
    return _parse(cfg, _where(task.path, horizon_days))


def _where(path: Path, horizon_days: int) -> str:
    return f"{path}" if horizon_days == OWN_WINDOWS else f"{path} (horizon {horizon_days}d)"


def load_task(task: str | Path) -> AcesTask:
    """A task by name (configs/tasks/<name>.yaml) or path, validated by ACES for every horizon."""
    path = Path(task)
    if not (path.suffix in {".yaml", ".yml"} or path.exists()):
        path = TASK_DIR / f"{task}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_DIR.glob("*.yaml")) if TASK_DIR.is_dir() else []
        raise FileNotFoundError(f"task {str(task)!r}: no file {path} (known tasks: {known})")
    return task_from_text(path.read_text(), path)


def task_from_text(text: str, path: str | Path, horizons_days: Sequence[int] | None = None) -> AcesTask:
    """A task from the text of its file (`path` names it in errors: a file, or where a peer sent
    it from); `horizons_days` replaces metadata.horizons_days (empty or None: the file's own; a
    task without horizons accepts none). Validated by ACES for every horizon."""
    path = Path(path)
    try:
        raw = strict_yaml(text, path)
    except StrictFileError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    meta_raw = dict(raw.pop("metadata", None) or {})
    if horizons_days:
        if meta_raw.get("horizon_window") is None:
            raise ValueError(
                f"{path}, field metadata.horizon_window: the task has its own windows and no horizons; "
                f"horizons {list(horizons_days)} cannot apply"
            )
        meta_raw["horizons_days"] = [int(h) for h in horizons_days]
    try:
        meta = TaskMetadata.model_validate(meta_raw)
    except ValidationError as exc:
        raise ValueError(f"{path}, field metadata: {exc}") from exc
    windows = raw.get("windows") or {}
    for field, value in (
        ("horizon_window", meta.horizon_window),
        ("censoring_window", meta.censoring_window),
        ("stay_window", meta.stay_window),
        ("history_window", meta.history_window),
    ):
        if value is not None and value not in windows:
            raise ValueError(f"{path}, field metadata.{field}: no window {value!r} (windows: {sorted(windows)})")
    if (meta.censoring_window is None) != (meta.complete_on is None):
        raise ValueError(
            f"{path}, field metadata: censoring_window and complete_on go together "
            f"(got {meta.censoring_window!r}, {meta.complete_on!r})"
        )
    if meta.complete_on is not None and meta.complete_on not in (raw.get("predicates") or {}):
        raise ValueError(f"{path}, field metadata.complete_on: no predicate {meta.complete_on!r}")
    if meta.stay_window is not None:
        stay_edge(windows[meta.stay_window], path)
    if meta.history_window is not None:
        history_predicate(windows[meta.history_window], path)
    out = AcesTask(name=meta.task or path.stem, path=path, metadata=meta, config=raw)
    for h in out.horizons:
        for v in _variants(out):
            _parsed(out.config_for(h, *v), _where(path, h))  # validation only: no copy to query with
    return out


def _shards(site_root: Path) -> list[Path]:
    shards = parquet_files(site_root, meds.data_subdirectory)  # links out of the root refused
    if not shards:
        raise FileNotFoundError(f"{site_root / meds.data_subdirectory}: no *.parquet shards")
    return shards


def _labels(result: pl.DataFrame) -> pl.DataFrame:
    if result.is_empty() or "index_timestamp" not in result.columns:
        return pl.DataFrame(
            schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us"), "boolean_value": pl.Boolean}
        )
    return result.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("index_timestamp").cast(pl.Datetime("us")).alias("prediction_time"),
        (pl.col("label") > 0).alias("boolean_value"),
    )


def _meds_frame(shard: Path) -> pl.DataFrame:
    """A shard as ACES's MEDS loader reads it (aces.predicates.generate_plain_predicates_from_meds)."""
    open_parquet(shard)  # its footer checked before pyarrow allocates for it
    return pl.read_parquet(shard, use_pyarrow=True).rename({"time": "timestamp"})


def _predicates_from_frame(cfg: TaskExtractorConfig, data: pl.DataFrame) -> pl.DataFrame:
    """What aces.predicates.get_predicates_df gives for a MEDS shard (es-aces 0.7), from the
    shard's frame already in memory: one read serves every task and variant of an evaluation.
    tests/unit/test_aces_shared.py checks it against get_predicates_df on the synthetic sites.
    A PREDICTION_TIME_CODE event (times_as_events) holds only MARK_PREDICATE: it is where to
    predict, not a clinical event a task's own predicates (its history) may count."""
    from aces.predicates import PRED_CNT_TYPE
    from aces.types import ANY_EVENT_COLUMN, END_OF_RECORD_KEY, START_OF_RECORD_KEY

    plain = cfg.plain_predicates
    for name, p in plain.items():  # one column at a time, as ACES adds them
        data = data.with_columns(data["code"].cast(pl.Utf8).alias("code"))
        expr = p.MEDS_eval_expr()
        if name != MARK_PREDICATE:
            expr = expr & (pl.col("code") != PREDICTION_TIME_CODE).fill_null(True)
        data = data.with_columns(expr.cast(PRED_CNT_TYPE).alias(name))
    cols = list(plain)
    data = (
        data.select(["subject_id", "timestamp", *cols])
        .group_by(["subject_id", "timestamp"], maintain_order=True)
        .agg(*(pl.col(c).sum().cast(PRED_CNT_TYPE).alias(c) for c in cols))
    )
    data = data.sort(by=["subject_id", "timestamp"], nulls_last=False)
    static = [name for name, p in plain.items() if p.static]
    for name, code in cfg.derived_predicates.items():
        if any(x in static for x in code.input_predicates):
            data = data.with_columns([pl.col(v).first().over("subject_id").alias(v) for v in static])
        data = data.with_columns(code.eval_expr().cast(PRED_CNT_TYPE).alias(name))
    special: list[str] = []
    for window in cfg.windows.values():
        if ANY_EVENT_COLUMN in window.referenced_predicates and ANY_EVENT_COLUMN not in special:
            special.append(ANY_EVENT_COLUMN)
        for key in (START_OF_RECORD_KEY, END_OF_RECORD_KEY):
            if key in window.constraint_predicates and key not in special:
                special.append(key)
    if cfg.trigger.predicate in (ANY_EVENT_COLUMN, START_OF_RECORD_KEY, END_OF_RECORD_KEY):
        if cfg.trigger.predicate not in special:
            special.append(cfg.trigger.predicate)
    if ANY_EVENT_COLUMN in special:
        data = data.with_columns(
            pl.when(pl.col("timestamp").is_not_null())
            .then(pl.lit(1))
            .otherwise(pl.lit(None))
            .alias(ANY_EVENT_COLUMN)
            .cast(PRED_CNT_TYPE)
        )
    for key, agg in ((START_OF_RECORD_KEY, "min"), (END_OF_RECORD_KEY, "max")):
        if key in special:
            edge = getattr(pl.col("timestamp"), agg)().over("subject_id")
            data = data.with_columns([(pl.col("timestamp") == edge).cast(PRED_CNT_TYPE).alias(key)])
    return data


def _time_events(prediction_times: pa.Table | None) -> pl.DataFrame:
    """The prediction times as MEDS events of code PREDICTION_TIME_CODE (timestamp, as ACES names it)."""
    keep = _keep_times(prediction_times)
    if keep is None:
        raise ValueError("times_as_events needs prediction_times")
    return keep.select(
        "subject_id", pl.col("prediction_time").alias("timestamp"), pl.lit(PREDICTION_TIME_CODE).alias("code")
    )


def _keep_times(prediction_times: pa.Table | None) -> pl.DataFrame | None:
    if prediction_times is None:
        return None
    return (
        to_polars(prediction_times.select(["subject_id", "prediction_time"]))
        .with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")))
        .unique()
    )


def _finish(task: AcesTask, h: int, parts: list[pl.DataFrame], keep: pl.DataFrame | None) -> pa.Table:
    """One horizon's label table from its per-shard, per-variant query results."""
    df = pl.concat(parts) if parts else _labels(pl.DataFrame())  # no shard held a wanted subject
    clash = (
        df.group_by(["subject_id", "prediction_time"])
        .agg(pl.col("boolean_value").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
    )
    if clash.height:  # the two queries of the union must agree where both keep a row
        raise ValueError(
            f"{task.path}: horizon {h}d: the two ACES queries label {clash.height} row(s) differently, "
            f"e.g. subject_id {clash['subject_id'][0]}"
        )
    df = df.unique(subset=["subject_id", "prediction_time"], keep="first")
    if keep is not None:
        df = df.join(keep, on=["subject_id", "prediction_time"], how="inner")
    df = df.sort(["subject_id", "prediction_time"])
    return validate_labels(df.to_arrow().cast(LABEL_SCHEMA_BOOL))


def _variants(task: AcesTask) -> list[tuple[bool, bool]]:
    """The (complete_variant, open_stay) queries whose union is the task's rows."""
    complete = [False, True] if task.metadata.censoring_window is not None else [False]
    open_stay = [False, True] if task.metadata.stay_window is not None else [False]
    return [(c, o) for c in complete for o in open_stay]


class _OneShardCohort(logging.Filter):
    """Drops ES-ACES's "All labels in the extracted cohort are the same" warning while shards are
    queried one at a time: a query covers one shard (with a subject sample, a few subjects), not
    the task's cohort, and the site reports a task with a single class itself (one_class)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("All labels in the extracted cohort are the same")


@contextlib.contextmanager
def _quiet_one_shard_cohorts() -> Iterator[None]:
    aces_log, quiet = logging.getLogger("aces.query"), _OneShardCohort()
    aces_log.addFilter(quiet)
    try:
        yield
    finally:
        aces_log.removeFilter(quiet)


def aces_labels(
    task: AcesTask | str | Path,
    site_root: str | Path,
    horizons_days: Sequence[int] | None = None,
    prediction_times: pa.Table | None = None,
) -> dict[int, pa.Table]:
    """LabelSchema tables (subject_id, prediction_time, boolean_value) per horizon, sorted; a
    task without horizons has one, under OWN_WINDOWS.

    `prediction_times` (subject_id, prediction_time) keeps only those rows of ACES's output (ACES
    predicts at every trigger event; a time that is no trigger event gets no row).
    ACES reads the shards itself (its own loader): the reference for `aces_labels_shared`.
    """
    from aces import predicates as aces_predicates
    from aces import query as aces_query

    task = task if isinstance(task, AcesTask) else load_task(task)
    horizons = list(horizons_days) if horizons_days is not None else task.horizons
    variants = _variants(task)
    parts: dict[int, list[pl.DataFrame]] = {h: [] for h in horizons}
    with _quiet_one_shard_cohorts():  # each query is one shard and one variant of the union
        for shard in _shards(Path(site_root)):
            data_cfg = DictConfig({"path": str(shard), "standard": "meds"})
            for v in variants:
                # Predicates do not depend on the horizon: computed once per shard and variant.
                preds = aces_predicates.get_predicates_df(_query_config(task, horizons[0], v), data_cfg)
                for h in horizons:
                    parts[h].append(_labels(aces_query.query(_query_config(task, h, v), preds)))
    keep = _keep_times(prediction_times)
    return {h: _finish(task, h, parts[h], keep) for h in horizons}


def aces_labels_shared(
    tasks: Sequence[AcesTask],
    site_root: str | Path,
    prediction_times: pa.Table | None = None,
    subjects: np.ndarray | None = None,
    times_as_events: bool = False,
) -> list[dict[int, pa.Table]]:
    """`aces_labels(task, site_root, prediction_times=...)` for each task (its metadata's
    horizons), with each shard read once for all of them instead of once per task and variant
    (an evaluation asks for many tasks; tests/unit/test_aces_shared.py checks the tables are equal).
    `subjects`: only these subjects' events are queried, and so only their labels come out;
    exact, since ACES finds a subject's windows in that subject's own events (a capped
    evaluation's sample: tests/federation/test_eval_sample.py checks the rows equal theirs among all).

    `times_as_events`: each prediction time joins its subject's record as a timed event of code
    PREDICTION_TIME_CODE, which no task predicate reads. A task triggered at every timed event
    (`_ANY_EVENT`, as configs/tasks/ are) then predicts at times where the record has no event
    of its own, e.g. the end of a wear period (the wearable table is not in the MEDS events).
    The query is then triggered at those events (MARK_PREDICATE) instead of the task's trigger,
    and the task's own predicates do not hold at them: a time with no clinical history before it
    still gets no row. Such an event is an observation of the subject at that time for
    `_ANY_EVENT` (a censoring window that asks for any event after the horizon sees it)."""
    from aces import query as aces_query

    parts: list[dict[int, list[pl.DataFrame]]] = [{h: [] for h in t.horizons} for t in tasks]
    wanted = None if subjects is None else pl.Series(np.asarray(subjects, dtype=np.int64))
    marks = _time_events(prediction_times) if times_as_events else None
    with _quiet_one_shard_cohorts():
        for shard in _shards(Path(site_root)):
            frame = _meds_frame(shard)
            if marks is not None:
                own = marks.join(frame.select("subject_id").unique(), on="subject_id", how="semi")
                frame = pl.concat([frame, own], how="diagonal_relaxed").sort(
                    ["subject_id", "timestamp"], maintain_order=True
                )
            if wanted is not None:
                frame = frame.filter(pl.col("subject_id").is_in(wanted.implode()))
                if frame.is_empty():  # none of the sample's subjects is in this shard
                    continue
            for task, out in zip(tasks, parts, strict=True):
                horizons = task.horizons
                edge = (
                    stay_edge(task.config["windows"][task.metadata.stay_window], task.path)
                    if task.metadata.stay_window
                    else None
                )
                at_marks = marks is not None
                for v in _variants(task):
                    preds = _predicates_from_frame(_query_config(task, horizons[0], v, at_marks), frame)
                    if edge is not None and not v[1] and not (preds[edge] > 0).any():
                        continue  # no stay edge in this shard: the bounded query finds no row (the open one finds them)
                    for h in horizons:
                        out[h].append(_labels(aces_query.query(_query_config(task, h, v, at_marks), preds)))
    keep = _keep_times(prediction_times)
    return [{h: _finish(t, h, p[h], keep) for h in t.horizons} for t, p in zip(tasks, parts, strict=True)]


def predicate_rows(task: AcesTask, site_root: str | Path) -> dict[str, int]:
    """Per predicate of the task (plain and derived, as ACES computes them for its queries), the
    number of (subject, time) rows where it holds at the site. A predicate at 0 makes every
    window that needs it empty and every label that counts it False: with es-aces 0.7.3 and
    polars 1.x a predicate with `code: null` and a value range is one (ACES issue #192)."""
    counts: dict[str, int] = {}
    for shard in _shards(Path(site_root)):
        frame = _meds_frame(shard)
        seen: set[str] = set()
        for v in _variants(task):  # predicates do not depend on the horizon
            cfg = _query_config(task, task.horizons[0], v)
            preds = _predicates_from_frame(cfg, frame)
            for name in [*cfg.plain_predicates, *cfg.derived_predicates]:
                if name not in seen:
                    seen.add(name)
                    counts[name] = counts.get(name, 0) + int((preds[name] > 0).sum())
    return counts


def trigger_matches_birth(task: AcesTask) -> bool:
    """Whether the task's trigger holds at a timed MEDS_BIRTH row (alone at its time), as ACES
    computes it: such a task predicts at birth, a negative with an empty history (`_ANY_EVENT`
    and `_RECORD_START` do; the shipped onset tasks' clinical_event does not)."""
    import datetime as dt

    cfg = _query_config(task, task.horizons[0], (False, False))
    extra = {c for p in cfg.plain_predicates.values() for c in p.other_cols}
    birth = pl.DataFrame(
        {
            "subject_id": [1],
            "timestamp": [dt.datetime(2000, 1, 1)],
            "code": [meds.birth_code],
            "numeric_value": pl.Series([None], dtype=pl.Float32),
            **{c: pl.Series([None], dtype=pl.Utf8) for c in sorted(extra)},
        }
    )
    preds = _predicates_from_frame(cfg, birth)
    return bool((preds[cfg.trigger.predicate].fill_null(0) > 0).any())


def label_event_times(task: AcesTask, site_root: str | Path) -> pl.DataFrame:
    """(subject_id, time) of every event where the task's label predicate holds, as ACES computes
    it (the outcome of an onset task); empty for a task without a label window."""
    cfg = _query_config(task, task.horizons[0], (False, False))
    label = cfg.label_window and cfg.windows[cfg.label_window].label
    parts = [pl.DataFrame(schema={"subject_id": pl.Int64, "time": pl.Datetime("us")})]
    for shard in _shards(Path(site_root)) if label else []:
        preds = _predicates_from_frame(cfg, _meds_frame(shard))
        parts.append(
            preds.filter((pl.col(label) > 0) & pl.col("timestamp").is_not_null()).select(
                pl.col("subject_id").cast(pl.Int64), pl.col("timestamp").cast(pl.Datetime("us")).alias("time")
            )
        )
    return pl.concat(parts)


def unmatched_predicates(task: AcesTask, site_root: str | Path) -> list[str]:
    """The task's predicates that hold at no row of the site, each with why when the cause is
    known (`name (code: null with a value range: ACES issue #192)`), sorted by name."""
    cfg = _query_config(task, task.horizons[0], (False, False))
    out = []
    for name, n in sorted(predicate_rows(task, site_root).items()):
        if n:
            continue
        plain = cfg.plain_predicates.get(name)
        if plain is not None and plain.code is None:
            out.append(f"{name} (code: null with a value range matches nothing in es-aces 0.7: ACES issue #192)")
        else:
            out.append(name)
    return out


__all__ = [
    "OWN_WINDOWS",
    "PREDICTION_TIME_CODE",
    "TASK_DIR",
    "AcesTask",
    "TaskMetadata",
    "aces_labels",
    "aces_config",
    "aces_labels_shared",
    "label_event_times",
    "load_task",
    "predicate_rows",
    "task_from_text",
    "trigger_matches_birth",
    "unmatched_predicates",
]
