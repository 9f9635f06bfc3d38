"""Using a model release at a site, on the site's own data (`client.py embed | probe | predict`).

Each goes through the site runtime (client/site_runtime.py) and the evaluation's own code, so a
site's numbers at home are the federation's numbers on the same rows:

- `embed_rows_at_site`: the release's embedding of (subject_id, prediction_time) rows, by the
  evaluation's path (healthfm_core/eval/row_embeddings.py: shared passes, reused wearable
  patches), the rows either a task's labels (site_eval.task_labels_at_site, as the evaluation
  draws them) or a file of prediction times;
- `probe_at_site`: SiteRuntime.evaluate_tasks with the release's model and evaluation settings:
  the linear probe fitted on train (C from tuning), held-out predictions in the meds-evaluation
  format, metrics with subject-bootstrap intervals; each fitted head saved
  (healthfm_core/eval/saved_head.py), a report (markdown + JSON) and reliability plots;
- `predict_at_site`: a saved head's predictions for new rows.

Before any of them, `healthfm_core/release_fit.require_fit` refuses a site whose modalities or
codes do not fit the release. Nothing here leaves the site.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.checks.report_floor import DEFAULT_MIN_POSITIVES
from healthfm_core.data.files.layout import MODALITIES
from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.labels.tasks import LABEL_SCHEMA_BOOL
from healthfm_core.eval.outcomes import outcome_table
from healthfm_core.eval.patch_reuse import reused_patch_encodings
from healthfm_core.eval.plots import reliability_diagram
from healthfm_core.eval.row_embeddings import embed_rows
from healthfm_core.eval.saved_head import load_head, save_head
from healthfm_core.files import atomic_path, atomic_write_text
from healthfm_core.protocol import EvalConfig, EvalReply, TaskReason
from healthfm_core.release import ModelRelease
from healthfm_core.release_fit import ReleaseFit, require_fit

log = logging.getLogger("healthfm.client")

ROW_SCHEMA = LABEL_SCHEMA_BOOL.remove(2)  # subject_id int64, prediction_time timestamp[us]
# The --prediction-times file, as read_prediction_times reads it (the CLI's help and the docs say it).
PREDICTION_TIMES_SCHEMA = (
    "a parquet file with one row per (subject, time) to score: column subject_id (integers, the site's own "
    "MEDS subject ids, cast to int64) and column prediction_time (a timestamp, cast to timestamp[us]; a date "
    "is its midnight, a time zone's value is read as UTC, ISO text is parsed); no nulls; other columns are "
    "ignored; a subject may have several rows, a subject id the site does not have is refused. The model "
    "sees the subject's data up to and including prediction_time"
)


class UseError(ValueError):
    """Bad input to embed / probe / predict (the message names the file, field or value)."""


class NoRows(UseError):
    """The site has no rows to use (no labels for the tasks, no rows asked)."""


def open_site_runtime(
    site_root: Path,
    release: ModelRelease,
    min_subjects: int,
    policy: Path | None,
    max_unknown_share: float,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> tuple[SiteRuntime, ReleaseFit]:
    """The site's runtime (data checked and opened, its policy applied: the stricter minimums
    hold), refused when the site does not fit the release."""
    runtime = SiteRuntime(
        SiteConfig(
            site_root=site_root, min_report_subjects=min_subjects, min_report_positives=min_positives, policy=policy
        )
    )
    fit = require_fit(runtime.site, release.setup, max_unknown_share, where=f"site {site_root}")
    if fit.unknown_rows:
        log.warning("site %s: %s (read as the unknown code)", site_root, fit.describe_unknown())
    if fit.unknown_traits:
        log.warning(
            "site %s: PRS traits %s are not in the release's vocabulary (ignored)", site_root, fit.unknown_traits
        )
    return runtime, fit


def eval_config(release: ModelRelease, tasks: Sequence[str] | None, max_subjects: int | None = None) -> EvalConfig:
    """The run's evaluation settings from the release; `tasks` (names, ACES files, site:NAME)
    replace its tasks; `max_subjects` its subject budget (0: every subject)."""
    base = release.meta.evaluation
    update: dict[str, object] = {}
    try:
        specs = resolve_tasks(tasks) if tasks else []
    except (ValueError, FileNotFoundError) as err:  # an unknown name: UnknownTask, both
        raise UseError(f"--tasks: {err}") from None
    if specs:
        update["tasks"] = specs
    if base is None:
        if not specs:
            raise UseError(f"{release.path}: the release's run evaluated no task: name the tasks (--tasks)")
        base = EvalConfig(round=release.meta.round, tasks=specs, setup_sha256=release.setup.sha256)
    if max_subjects is not None:
        update["max_subjects"] = max_subjects
    return base.model_copy(update=update)


def read_prediction_times(path: str | Path) -> pa.Table:
    """subject_id, prediction_time of a parquet file (other columns ignored), cast to MEDS's types."""
    path = Path(path)
    if not path.is_file():
        raise UseError(f"{path}: no such prediction-times file")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UseError(f"{path}: not a parquet file ({err})") from None
    for name in ROW_SCHEMA.names:
        if name not in table.column_names:
            raise UseError(f"{path}: no column {name!r} (columns: {table.column_names})")
        if table[name].null_count:
            raise UseError(f"{path}: column {name!r} has {table[name].null_count} null value(s)")
    try:
        return table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise UseError(f"{path}: columns subject_id (int64) and prediction_time (timestamp) expected: {err}") from None


def task_rows(runtime: SiteRuntime, cfg: EvalConfig) -> pa.Table:
    """Every (subject_id, prediction_time) some asked task labels at this site, as the evaluation
    draws them (its subject sample, its rows per subject), sorted."""
    tables = [t for t in runtime.labels(cfg).values() if not isinstance(t, TaskReason)]
    if not tables:
        raise NoRows(f"site {runtime.site.root}: no labels for any of {[t.name for t in cfg.tasks]}")
    union = pa.concat_tables([t.select(ROW_SCHEMA.names).cast(ROW_SCHEMA) for t in tables])
    union = union.group_by(ROW_SCHEMA.names).aggregate([])
    return union.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])


@dataclass
class Embedded:
    rows: pa.Table  # subject_id, prediction_time
    x: np.ndarray  # [n, d] float64
    present: np.ndarray  # [n, len(MODALITIES)] bool


def embed_rows_at_site(
    runtime: SiteRuntime,
    release: ModelRelease,
    rows: pa.Table,
    max_events: int,
    max_patches: int,
    batch_size: int = 64,
    progress: bool = False,
) -> Embedded:
    """The release's embedding of each row, by the evaluation's path (see the module docstring)."""
    if rows.num_rows == 0:
        raise NoRows("no rows to embed")
    seqs = runtime.sequences(release.setup)
    subject_ids = rows["subject_id"].to_numpy()
    try:
        seqs.index_of(subject_ids)
    except ValueError as err:
        raise UseError(f"site {runtime.site.root}: {err}") from None
    with reused_patch_encodings(release.model):
        out = embed_rows(
            release.model,
            seqs,
            subject_ids,
            pc.cast(rows["prediction_time"], pa.int64()).to_numpy(),
            max_events,
            max_patches,
            batch_size=batch_size,
            progress=progress,
        )
    return Embedded(rows=rows, x=out.x, present=out.present)


def splits_of(runtime: SiteRuntime, subject_ids: np.ndarray) -> np.ndarray:
    """Each subject's split at this site ("none" for a subject in no split)."""
    out = np.full(len(subject_ids), "none", dtype=object)
    for split, ids in runtime.split_ids().items():
        out[np.isin(subject_ids, ids)] = split
    return out


def embeddings_table(embedded: Embedded, split_of: np.ndarray) -> pa.Table:
    """One row per (subject_id, prediction_time): its split, the modalities it has at that time,
    and the embedding (a fixed-size list of float32, the model's own precision)."""
    d = embedded.x.shape[1]
    flat = pa.array(embedded.x.astype(np.float32).reshape(-1), pa.float32())
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "subject_id": embedded.rows["subject_id"],
        "prediction_time": embedded.rows["prediction_time"],
        "split": pa.array(split_of, pa.string()),
    }
    for i, m in enumerate(MODALITIES):
        cols[f"has_{m}"] = pa.array(embedded.present[:, i])
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, d)
    return pa.table(cols)


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def withheld_advice(
    reasons: Mapping[str, TaskReason], min_subjects: int, min_positives: int, release: Path
) -> list[str]:
    """Why each withheld task has no head here and how to get one (a small site withholds them
    all): the site's minimums, and the head trained across the sites, which it can apply."""
    if not reasons:
        return []
    small = [k for k, r in reasons.items() if r.kind in ("too_few_subjects", "too_few_positives", "one_class")]
    lines = [f"- {key}: no head here: {reason.describe()}" for key, reason in reasons.items()]
    if small:
        lines += [
            "",
            f"A probe's head needs, at this site, at least {min_subjects} subjects in each of train, tuning and "
            f"held_out and {min_positives} positive and {min_positives} negative held-out rows "
            "(min_report_subjects, min_report_positives; your policy may raise them). To get a head for "
            f"{', '.join(small)}:",
            "  1. the head trained across the sites (labels stay at each site): the coordinator runs "
            f"`python -m server.coordinator head FED --model {release} --tasks TASK --out heads/` with the sites "
            "that have enough rows (docs/coordinator.md, 'Train a task head across the sites'), then sends you "
            "heads/<key>.json and .safetensors;",
            f"  2. apply it here: `python client/client.py predict SITE_ROOT --model {release} --release-key "
            "release_signing.pem --head heads/<key>.json --prediction-times rows.parquet --out predictions.parquet`;",
            "  3. or probe on more of your own data (more subjects or labelled rows per split).",
        ]
    return lines


@dataclass
class ProbeResult:
    reply: EvalReply
    heads: dict[str, Path]
    predictions: dict[str, Path]
    report: Path


def probe_at_site(
    runtime: SiteRuntime,
    release: ModelRelease,
    cfg: EvalConfig,
    out_dir: Path,
    site_name: str,
    progress: bool = False,
) -> ProbeResult:
    """The evaluation's probes on this site (SiteRuntime.evaluate_tasks with the release's model),
    each head saved, a report and reliability plots under out_dir; `progress`: bars for the
    embedding and the fits."""
    result = runtime.evaluate_tasks(
        release.setup, release.model, cfg, out_dir=out_dir / "predictions", progress=progress
    )
    heads = {
        key: save_head(
            out_dir / "heads" / f"{key}.json",
            key,
            probe,
            release.setup.sha256,
            cfg.max_events,
            cfg.max_patches,
            release.weights_sha256,
        )
        for key, probe in result.probes.items()
    }
    reply = EvalReply(
        tasks=result.metrics, reasons=result.reasons, num_examples=result.num_examples, withheld=len(result.reasons)
    )
    keys = [k for spec in cfg.tasks for k in spec.keys()]
    for key, path in result.predictions.items():
        table = pq.read_table(path)
        y = table["boolean_value"].to_numpy(zero_copy_only=False).astype(float)
        p = table["predicted_boolean_probability"].to_numpy(zero_copy_only=False).astype(float)
        reliability_diagram({"linear probe": (y, p)}, out_dir / "plots" / f"{key}_reliability.png", title=key)
    report = {
        "site": site_name,
        "release": str(release.path),
        "setup_sha256": release.setup.sha256,
        "round": release.meta.round,
        "evaluation": cfg.model_dump(mode="json", exclude={"tasks"}),
        "tasks": keys,
        "metrics": {k: m.model_dump(exclude_none=True) for k, m in result.metrics.items()},
        "reasons": {k: r.describe() for k, r in result.reasons.items()},
        "heads": {k: str(p) for k, p in heads.items()},
        "predictions": {k: str(p) for k, p in result.predictions.items()},
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1))
    md = [
        f"# Linear probes of release {release.path} at site {site_name}",
        "",
        f"Frozen embeddings (setup `{release.setup.sha256[:16]}`, round {release.meta.round}); a logistic probe "
        "per task fitted on the train split, C chosen on tuning, scored on held-out (95% subject-bootstrap "
        "interval of the AUROC). Predictions: predictions/; heads: heads/; reliability plots: plots/.",
        "",
        outcome_table(keys, {site_name: reply}),
        "",
    ]
    advice = withheld_advice(result.reasons, runtime.min_report_subjects, runtime.min_report_positives, release.path)
    if advice:
        md += ["## Tasks without a head here", "", *advice, ""]
    path = atomic_write_text(out_dir / "report.md", "\n".join(md))
    return ProbeResult(reply=reply, heads=heads, predictions=dict(result.predictions), report=path)


def predictions_for_rows(rows: pa.Table, values: np.ndarray, kind: str) -> pa.Table:
    """New rows' predictions: probabilities (and the 0.5 decision) in meds-evaluation's column
    names for a logistic head, predicted values for a ridge head."""
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "subject_id": rows["subject_id"],
        "prediction_time": rows["prediction_time"],
    }
    if kind == "logistic":
        cols["predicted_boolean_probability"] = pa.array(values.astype(np.float32), pa.float32())
        cols["predicted_boolean_value"] = pa.array(values >= 0.5, pa.bool_())
    else:
        cols["predicted_numeric_value"] = pa.array(values.astype(np.float32), pa.float32())
    return pa.table(cols)


def predict_at_site(
    runtime: SiteRuntime,
    release: ModelRelease,
    head_path: Path,
    rows: pa.Table,
    batch_size: int = 64,
    progress: bool = False,
) -> pa.Table:
    """A saved head's predictions for rows, embedded as the head's probe was."""
    head = load_head(head_path, release.setup.sha256, release.weights_sha256)
    embedded = embed_rows_at_site(
        runtime, release, rows, head.meta.max_events, head.meta.max_patches, batch_size, progress
    )
    return predictions_for_rows(rows, head.predict(embedded.x), head.meta.kind)


__all__ = [
    "Embedded",
    "PREDICTION_TIMES_SCHEMA",
    "NoRows",
    "ProbeResult",
    "UseError",
    "embed_rows_at_site",
    "embeddings_table",
    "eval_config",
    "open_site_runtime",
    "predict_at_site",
    "predictions_for_rows",
    "probe_at_site",
    "withheld_advice",
    "read_prediction_times",
    "splits_of",
    "task_rows",
    "write_parquet",
]
