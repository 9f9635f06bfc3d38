"""A site's evaluation of the tasks the server defined: labels at the site, predictions in the
meds-evaluation format at the site, scored by meds-evaluation; only aggregates come out.

For each TaskSpec (healthfm_core.data.labels.task_spec):
- labels are extracted here: ACES tasks with ACES (healthfm_core.data.labels.aces_tasks) as written:
  the trigger, windows, gaps and exclusions decide rows, labels and prediction times (ACES's
  index timestamps); each MEDS shard is read once for all ACES tasks (aces_labels_shared); then
  in the train and tuning splits at most `n_per_subject` of a subject's rows per task key are
  kept, drawn by a seeded hash (`cap_rows_per_subject`: a cost knob on what probes are fitted
  and tuned on, never a filter on which times exist; "all" keeps every row); the held_out split
  keeps every labelled row, as MEDS-DEV scores;
  `site` tasks from the site's own SITE_ROOT/tasks/<name>/ (checked by site_labels); the built-in
  wearable regressions from the site's wearables; every kind capped as ACES's rows are (train
  and tuning at most `n_per_subject` a subject, held_out every row), so a reply's held-out rows
  are at most the site's timed rows it declared at setup (server/eval_counts.py);
- with a subject budget (EvalConfig.max_subjects), only a fixed keyed-hash sample of at most that
  many subjects per split (healthfm_core/eval/subject_sample.py) is labelled and evaluated;
- every labelled (subject, prediction_time) is embedded once by the frozen model: with a PRED_DIR
  into a memory-mapped file there, removed when the evaluation ends (eval/embedding_file.py), so
  a full evaluation's memory does not grow with its rows; without one, in memory;
- per task key: a linear probe fitted on the train split (C from tuning), the held_out
  predictions written to PRED_DIR/<site>/<key>.parquet (meds_evaluation.schema.PredictionSchema;
  without a PRED_DIR the same table, kept in memory only; a `meds-dev:` task's also as MEDS-DEV's
  pipeline writes them, with results.json and a packed result.json: eval/meds_dev_result.py)
  and scored with meds-evaluation
  (AUROC, AUPRC, calibration error over samples), with the held-out positives (small-cell
  suppressed) and a 95% subject-bootstrap interval of the AUROC on the same rows, and (with
  EvalConfig.score_bins) the held-out scores' per-class histogram on the server's grid, merged
  to the site's minimum (site_histogram.py), for the federation-wide AUROC; wearable
  regressions report R^2;
- per binary task key, unless switched off (`meds_tab`): MEDS-Tab, the field's tabular baseline
  (healthfm_core/eval/meds_tab.py), on exactly the same rows and splits: the labelled rows of
  every binary key tabularised once from the events of their subjects (features kept by their
  counts among the train split's subjects), XGBoost fitted on train with early stopping on
  tuning, held_out predictions written beside the probe's (PRED_DIR/<site>/<key>.meds_tab.parquet),
  scored by meds-evaluation with the same subject-bootstrap interval;
- a key without a number gets a TaskReason: the kind and, per split, rows / subjects / positives
  against the site's minimum subjects per split.

`task_split_counts` gives the same per-split counts for any labels (what `check --tasks` prints).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import yaml
from tqdm.auto import tqdm

from healthfm_core.data.checks.report_floor import class_subjects
from healthfm_core.data.files.layout import HELD_OUT_SPLIT, SPLITS, WEARABLES_SCHEMA
from healthfm_core.data.labels.aces_tasks import aces_labels_shared
from healthfm_core.data.labels.site_labels import SiteLabelError, read_site_labels, site_tasks
from healthfm_core.data.labels.task_spec import TaskSpec, horizon_key
from healthfm_core.data.labels.tasks import (
    HELD_OUT_ROWS_PER_SUBJECT,
    LABEL_SCHEMA_BOOL,
    TASKS,
    WearableTask,
    cap_rows_per_subject,
    rows_per_subject,
    wearable_regression_labels,
)
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import Site
from healthfm_core.eval.embedding_file import embeddings_file
from healthfm_core.eval.meds_dev_result import meds_dev_result_dir, write_meds_dev_result
from healthfm_core.eval.meds_eval import prediction_path, predictions_table, score_predictions, write_predictions
from healthfm_core.eval.meds_tab import EVENT_COLUMNS, describe_codes, fit_xgboost, tabularize
from healthfm_core.eval.metrics import auroc, bootstrap_ci, r2_score
from healthfm_core.eval.patch_reuse import PatchReuse, reused_patch_encodings
from healthfm_core.eval.probes import LogisticProbe, RidgeProbe, fit_logistic_probe, fit_ridge_probe
from healthfm_core.eval.row_embeddings import embed_rows, in_memory
from healthfm_core.eval.site_histogram import release_histogram
from healthfm_core.eval.subject_sample import SubjectSample
from healthfm_core.protocol import (
    SMALL_CELL,
    ScoreHistogram,
    ScoreScale,
    SplitCount,
    TaskMetrics,
    TaskReason,
    WithheldKind,
)

if TYPE_CHECKING:  # scipy loads with MEDS-Tab's features, when a site evaluates
    import scipy.sparse as sp

log = logging.getLogger(__name__)

SplitOf = Callable[[np.ndarray], np.ndarray]  # subject ids -> split names ("none": no split)


@dataclass
class SiteTaskResults:
    metrics: dict[str, TaskMetrics] = field(default_factory=dict)
    reasons: dict[str, TaskReason] = field(default_factory=dict)
    predictions: dict[str, Path] = field(default_factory=dict)  # key -> its held_out predictions file, if written
    meds_tab_predictions: dict[str, Path] = field(default_factory=dict)  # key -> MEDS-Tab's, if written
    meds_dev_results: dict[str, Path] = field(default_factory=dict)  # meds-dev: key -> its MEDS-DEV folder, if written
    # Per binary task with a metric: its held-out scores' histogram (score_bins > 0), or why withheld.
    histograms: dict[str, ScoreHistogram] = field(default_factory=dict)
    histograms_withheld: dict[str, WithheldKind] = field(default_factory=dict)
    probes: dict[str, LogisticProbe | RidgeProbe] = field(default_factory=dict)  # key -> its fitted probe (kept here)
    num_examples: int = 0  # samples embedded
    num_passes: int = 0  # forward passes that embedded them (eval/row_embeddings.py)
    # Seconds spent in the model's forward passes (embedding the rows), fitting probes and scoring: what a
    # site's evaluation costs beyond its labels (logged; benchmarks/eval_cost.py prints them).
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("forward", "probes", "scoring", "meds_tab"), 0.0)
    )


def task_labels_at_site(
    site: Site,
    specs: Sequence[TaskSpec],
    n_per_subject: int | str | None = 4,
    seed: int = 0,
    subjects: np.ndarray | None = None,
    held_out_rows_per_subject: int = HELD_OUT_ROWS_PER_SUBJECT,
) -> dict[str, pa.Table | TaskReason]:
    """Per task key, its labels (subject_id, prediction_time, boolean_value or float_value) or the
    reason there are none (the task did not parse, the site has no labels for it). ACES tasks'
    train and tuning rows (of every kind) capped at `n_per_subject` a subject ("all" or None: every
    row), held_out rows all kept up to `held_out_rows_per_subject` a subject (a cap honest data
    does not reach: EvalConfig.held_out_rows_per_subject). `subjects`:
    only these subjects' labels (the same rows as theirs among all), their wearable epochs only
    read; None: every subject."""
    out: dict[str, pa.Table | TaskReason] = {}
    cap = rows_per_subject(n_per_subject)
    held_out = site.held_out_subjects()
    held_cap = held_out_rows_per_subject
    aces = _aces_labels(site, specs, cap, seed, subjects, held_cap)
    own = set(site_tasks(site.root))
    for spec in specs:
        if spec.kind == "aces":
            out.update(aces[spec.name])
        elif spec.kind == "site":
            if spec.name not in own:
                out[spec.name] = TaskReason(kind="no_labels")
                continue
            try:
                table = read_site_labels(site.root, spec.name)
            except (SiteLabelError, OSError, ValueError, pa.ArrowException) as err:  # this task's files, not the site
                log.error("task %s: the site's labels are refused (invalid_labels): %s", spec.name, err)
                out[spec.name] = TaskReason(kind="invalid_labels")
                continue
            if "boolean_value" not in table.column_names or table["boolean_value"].null_count == table.num_rows:
                log.warning(
                    "task %s: the site's labels have no boolean_value (only binary site tasks are evaluated)", spec.name
                )
                out[spec.name] = TaskReason(kind="invalid_labels")
                continue
            table = table.filter(pc.is_valid(table["boolean_value"]))
            if subjects is not None:
                table = table.filter(pa.array(np.isin(table["subject_id"].to_numpy(), subjects)))
            table = table.select(["subject_id", "prediction_time", "boolean_value"]).cast(LABEL_SCHEMA_BOOL)
            # Capped as ACES's rows are (held_out every row).
            out[spec.name] = cap_rows_per_subject(table, cap, seed, every_row_of=held_out, every_row_cap=held_cap)
        else:
            if not site.wearable_files:
                out[spec.name] = TaskReason(kind="no_labels")
                continue
            wear_task = TASKS[spec.name]
            if not isinstance(wear_task, WearableTask):
                raise ValueError(f"task {spec.name!r} is not a wearable task")
            if wear_task.target == "resting_hr" and not _may_hold_heart_rate(site.wearable_files):
                # No heart rate, no resting-HR label: the labels of no epochs, without reading them all.
                out[spec.name] = wearable_regression_labels(WEARABLES_SCHEMA.empty_table(), target=wear_task.target)
                continue
            # A subject's labels come from its own epochs: reading only the sample's is exact.
            labels = wearable_regression_labels(site.read_wearables(subjects), target=wear_task.target)
            out[spec.name] = cap_rows_per_subject(labels, cap, seed, every_row_of=held_out, every_row_cap=held_cap)
    return out


def _aces_labels(
    site: Site,
    specs: Sequence[TaskSpec],
    n_per_subject: int | None,
    seed: int,
    subjects: np.ndarray | None = None,
    held_cap: int = HELD_OUT_ROWS_PER_SUBJECT,
) -> dict[str, dict[str, pa.Table | TaskReason]]:
    """Per ACES task name, its keys' labels (or the invalid_task reason): the site's shards are
    read once for all of them (aces_labels_shared), ACES's train and tuning rows capped per
    subject, every held_out row kept."""
    out: dict[str, dict[str, pa.Table | TaskReason]] = {}
    tasks = []
    for spec in specs:
        if spec.kind != "aces":
            continue
        try:
            tasks.append((spec, spec.aces()))
        except ValueError as err:
            log.warning("task %s: %s", spec.name, err)
            out[spec.name] = {k: TaskReason(kind="invalid_task") for k in spec.keys()}
    if tasks:
        # A subject's rows and its draws among them depend on its own events only: labelling the
        # sample's subjects alone gives the same rows as labelling all and keeping theirs.
        labels = aces_labels_shared([t for _, t in tasks], site.root, subjects=subjects)
        held_out = site.held_out_subjects()
        for (spec, _), by_horizon in zip(tasks, labels, strict=True):
            out[spec.name] = {
                horizon_key(spec.name, h): cap_rows_per_subject(
                    table, n_per_subject, seed, every_row_of=held_out, every_row_cap=held_cap
                )
                for h, table in by_horizon.items()
            }
    return out


def _meds_dev_keys(specs: Sequence[TaskSpec]) -> dict[str, tuple[str, str]]:
    """Task key -> (MEDS-DEV task, dataset) of each `meds-dev:` task (its metadata.meds_dev)."""
    out = {}
    for spec in specs:
        if spec.kind != "aces" or not spec.aces_yaml:
            continue
        try:
            meta = (yaml.safe_load(spec.aces_yaml) or {}).get("metadata") or {}
        except yaml.YAMLError:
            continue  # the task itself is refused elsewhere (invalid_task)
        origin = meta.get("meds_dev") if isinstance(meta, dict) else None
        if isinstance(origin, dict) and isinstance(origin.get("task"), str):
            for key in spec.keys():
                out[key] = (origin["task"], str(origin.get("dataset", "")))
    return out


def _may_hold_heart_rate(files: Sequence[Path]) -> bool:
    """False only when every row group's statistics say hr_bpm is null throughout (a device
    without PPG, e.g. a research accelerometer); True when any file might hold a value or has
    no such statistics (then the epochs are read, as always)."""
    for path in files:
        meta = pq.ParquetFile(path).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        if "hr_bpm" not in names:
            return True  # read_wearables names the problem
        col = names.index("hr_bpm")
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(col).statistics
            if stats is None or not stats.has_null_count or stats.null_count < group.num_rows:
                return True
    return False


def task_split_counts(labels: pa.Table, split_of: SplitOf) -> dict[str, SplitCount]:
    """Rows, distinct subjects and positives (boolean labels) of each split, with the subjects
    of a positive and of a negative row (kept at the site: they decide what is suppressed)."""
    subjects = labels["subject_id"].to_numpy()
    split = split_of(subjects)
    binary = "boolean_value" in labels.column_names
    positive = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(bool) if binary else None
    out = {}
    for s in SPLITS:
        mine = split == s
        classes = class_subjects(positive[mine], subjects[mine]) if positive is not None else (0, 0)
        out[s] = SplitCount(
            rows=int(mine.sum()),
            subjects=len(np.unique(subjects[mine])),
            positives=int(positive[mine].sum()) if positive is not None else 0,
            positive_subjects=classes[0] if binary else None,
            negative_subjects=classes[1] if binary else None,
        )
    return out


def held_out_class_subjects(labels: pa.Table, split_of: SplitOf) -> tuple[int, int]:
    """(subjects with a positive row, subjects with a negative row) of a binary task's held_out
    split: held_out scores every labelled row, so its rows may be many a subject."""
    subjects = labels["subject_id"].to_numpy()
    held = split_of(subjects) == HELD_OUT_SPLIT
    if "boolean_value" not in labels.column_names:
        return 0, 0
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    return class_subjects(y[held], subjects[held])


def withheld_reason(
    counts: Mapping[str, SplitCount],
    minimum: int,
    binary: bool,
    min_positives: int = 1,
    *,
    held_out_classes: tuple[int, int],
) -> TaskReason | None:
    """Why these per-split counts give no reportable metric (None: they do); the counts in the
    reason are small-cell suppressed, since the reason leaves the site. `minimum`: subjects per
    split (min_report_subjects); `min_positives`: subjects with a positive row and subjects with a
    negative row in held_out (min_report_positives), `held_out_classes` (held_out_class_subjects):
    one subject's many positive rows are one positive."""
    shown = {s: c.suppressed(minimum) for s, c in counts.items()}
    if sum(c.rows for c in counts.values()) == 0:
        return TaskReason(kind="no_rows", minimum=minimum, splits=shown)
    if any(c.subjects < minimum for c in counts.values()):
        return TaskReason(kind="too_few_subjects", minimum=minimum, splits=shown)
    if binary and any(counts[s].positives in (0, counts[s].rows) for s in ("train", "held_out")):
        return TaskReason(kind="one_class", minimum=minimum, splits=shown)
    if binary and min(held_out_classes) < min_positives:
        return TaskReason(kind="too_few_positives", minimum=minimum, min_positives=min_positives, splits=shown)
    return None


def _pair_keys(table: pa.Table) -> list[tuple[int, int]]:
    pt = pc.cast(table["prediction_time"], pa.int64()).to_numpy()
    return list(zip(table["subject_id"].to_numpy().tolist(), pt.tolist()))


def evaluate_site_tasks(
    site_name: str,
    site: Site,
    seqs: SiteSequences,
    model: torch.nn.Module,
    specs: Sequence[TaskSpec],
    split_of: SplitOf,
    min_subjects: int,
    pred_dir: str | Path | None,
    batch_size: int = 64,
    max_events: int = 256,
    max_patches: int = 32,
    n_per_subject: int | str | None = 4,
    seed: int = 0,
    labels: Mapping[str, pa.Table | TaskReason] | None = None,
    held_out_rows_per_subject: int = HELD_OUT_ROWS_PER_SUBJECT,
    reuse_patches: bool = True,
    sample: SubjectSample | None = None,
    shared_passes: bool = True,
    n_boot: int = 100,
    min_positives: int = 1,
    meds_tab: bool = True,
    score_bins: int = 0,
    score_scale: ScoreScale = "logit",
    progress: bool = False,
) -> SiteTaskResults:
    """Every task key of `specs` at this site: a metric or a reason (see the module docstring).
    `progress`: bars for the embedding and the per-task fits (`client.py probe` at a terminal).
    `labels` (from task_labels_at_site) may be passed to reuse them across calls; `pred_dir` None
    scores the predictions in memory and writes nothing (and holds the embeddings in memory; with
    a `pred_dir` they are a memory-mapped file there while the evaluation runs); `reuse_patches`
    False encodes every wearable patch where a sample asks for it (the same numbers, slower: the
    baseline of benchmarks/eval_cost.py); `shared_passes` False runs one forward pass per row instead
    of one per group of a subject's rows (eval/row_embeddings.py; the same numbers to float rounding).
    With a `sample` (draw_sample) that has a budget, only its
    subjects' rows are embedded, fitted on and scored, and the minimum-subject and class checks
    apply to them; the metrics say how many held-out subjects the sample was drawn from.
    `n_boot`: resamples of the AUROC's subject-bootstrap interval (the EvalConfig's); `meds_tab`:
    also MEDS-Tab on each binary key's rows (the EvalConfig's).
    `min_positives`: a binary task whose held_out split has fewer positive or negative rows is
    withheld (too_few_positives; the site's min_report_positives).
    `score_bins`, `score_scale`: the grid of each binary task's released score histogram (0: none)."""
    subjects = None if sample is None or not sample.max_subjects else sample.subjects()
    if labels is None:
        labels = task_labels_at_site(
            site, specs, n_per_subject=n_per_subject, seed=seed, subjects=subjects,
            held_out_rows_per_subject=held_out_rows_per_subject,
        )  # fmt: skip
    out = SiteTaskResults()
    usable: dict[str, pa.Table] = {}
    for key, table in labels.items():
        if isinstance(table, TaskReason):
            out.reasons[key] = table.model_copy(update={"minimum": min_subjects})
            continue
        if sample is not None:
            table = sample.keep(table)
        binary = "boolean_value" in table.column_names
        counts = task_split_counts(table, split_of)
        classes = held_out_class_subjects(table, split_of)
        if (
            reason := withheld_reason(counts, min_subjects, binary, min_positives, held_out_classes=classes)
        ) is not None:
            out.reasons[key] = reason
        else:
            usable[key] = table
    for key, reason in out.reasons.items():
        log.info("site %s: %s withheld (%s)", site_name, key, reason.describe())
    if not usable:
        return out
    # Every task's rows embedded once: tasks share most (subject, prediction_time) pairs.
    union = pa.concat_tables(
        [t.select(["subject_id", "prediction_time"]).cast(LABEL_SCHEMA_BOOL.remove(2)) for t in usable.values()]
    )
    union = union.group_by(["subject_id", "prediction_time"]).aggregate([])
    union = union.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    index = {k: i for i, k in enumerate(_pair_keys(union))}
    # With a directory, the rows land in a memory-mapped file beside the predictions, removed at
    # the end (eval/embedding_file.py): the embeddings of a full evaluation hold no memory.
    site_dir = None if pred_dir is None else Path(pred_dir) / site_name
    with contextlib.nullcontext(in_memory) if site_dir is None else embeddings_file(site_dir) as rows_to:
        # embed_rows runs the model in eval mode without gradients, as patch reuse needs.
        start = time.perf_counter()
        with reused_patch_encodings(model) if reuse_patches else contextlib.nullcontext(PatchReuse()) as reuse:
            embedded = embed_rows(
                model,
                seqs,
                union["subject_id"].to_numpy(),
                pc.cast(union["prediction_time"], pa.int64()).to_numpy(),
                max_events,
                max_patches,
                batch_size=batch_size,
                shared=shared_passes,
                progress=progress,
                rows_to=rows_to,
            )
        x_all = embedded.x
        out.seconds["forward"] = time.perf_counter() - start
        log.info(
            "site %s: %d rows embedded in %d passes (%.1f s)",
            site_name,
            len(x_all),
            embedded.passes,
            out.seconds["forward"],
        )
        if reuse.asked:
            log.info("site %s: %d wearable patches encoded for %d asked", site_name, reuse.encoded, reuse.asked)
        out.num_examples, out.num_passes = int(len(x_all)), embedded.passes
        binary_keys = {k: t for k, t in usable.items() if "boolean_value" in t.column_names}
        meds_dev = _meds_dev_keys(specs)
        tab = _meds_tab_features(site_name, site, binary_keys, split_of, out) if meds_tab and binary_keys else None
        for key, table in tqdm(usable.items(), desc="task fits", total=len(usable), disable=not progress, leave=False):
            idx = np.array([index[k] for k in _pair_keys(table)], dtype=np.int64)
            split = split_of(table["subject_id"].to_numpy())
            x = {s: x_all[idx[split == s]] for s in SPLITS}
            held = np.flatnonzero(split == HELD_OUT_SPLIT)
            # Scored: the held-out subjects with rows, of the held-out subjects the site has.
            scope = {
                "subjects": len(np.unique(table["subject_id"].to_numpy()[held])),
                "available_subjects": None if sample is None else sample.available[HELD_OUT_SPLIT],
            }
            if "boolean_value" in table.column_names:
                y_all = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
                y = {s: y_all[split == s] for s in SPLITS}
                start = time.perf_counter()
                probe = out.probes[key] = fit_logistic_probe(x["train"], y["train"], x["tuning"], y["tuning"])
                held_rows, p_held = table.take(pa.array(held)), probe.predict_proba(x["held_out"])
                probe_seconds = time.perf_counter() - start
                out.seconds["probes"] += probe_seconds
                start = time.perf_counter()
                if pred_dir is None:
                    scored: Path | pa.Table = predictions_table(held_rows, p_held)
                else:
                    scored = out.predictions[key] = write_predictions(
                        prediction_path(pred_dir, site_name, key), held_rows, p_held
                    )
                    if key in meds_dev:
                        task, dataset = meds_dev[key]
                        out.meds_dev_results[key] = write_meds_dev_result(
                            meds_dev_result_dir(pred_dir, site_name, task), scored, dataset, task
                        )
                scores = score_predictions(scored, seed=seed)["samples_equally_weighted"]
                # The interval on the same rows as the point estimate, whole subjects resampled.
                low, high = bootstrap_ci(
                    auroc, y["held_out"], p_held, n_boot=n_boot, seed=seed, groups=held_rows["subject_id"].to_numpy()
                )
                out.seconds["scoring"] += time.perf_counter() - start
                positives = int(y["held_out"].sum())
                # Suppressed when fewer than the minimum of subjects have a positive row (or a
                # negative one: n minus positives would give them away), whatever their rows.
                classes = class_subjects(y["held_out"], held_rows["subject_id"].to_numpy())
                baseline: tuple[float | None, ...] = (None, None, None, None)
                if tab is not None:
                    start = time.perf_counter()
                    baseline = _meds_tab_metrics(
                        key, table, split, tab, site_name, pred_dir, out, n_boot=n_boot, seed=seed
                    )
                    log.info(
                        "site %s: %s: probe %.2f s, MEDS-Tab %.2f s (fit, predict, score)",
                        site_name,
                        key,
                        probe_seconds,
                        time.perf_counter() - start,
                    )
                out.metrics[key] = TaskMetrics(
                    n=len(held),
                    auroc=float(scores["roc_auc_score"]),
                    auprc=float(scores["average_precision_score"]),
                    ece=float(scores["calibration_error"]),
                    positives=SMALL_CELL if any(0 < c < min_subjects for c in classes) else positives,
                    auroc_low=low,
                    auroc_high=high,
                    meds_tab_auroc=baseline[0],
                    meds_tab_auprc=baseline[1],
                    meds_tab_auroc_low=baseline[2],
                    meds_tab_auroc_high=baseline[3],
                    **scope,
                )
                if score_bins:  # merged to the stricter of the site's minimums, as the positives above
                    released = release_histogram(
                        y["held_out"],
                        p_held,
                        held_rows["subject_id"].to_numpy(),
                        score_bins,
                        score_scale,
                        max(min_subjects, min_positives),
                    )
                    if isinstance(released, ScoreHistogram):
                        out.histograms[key] = released
                    else:
                        out.histograms_withheld[key] = released
            else:
                y_all = table["float_value"].to_numpy(zero_copy_only=False).astype(np.float64)
                y = {s: y_all[split == s] for s in SPLITS}
                start = time.perf_counter()
                ridge = out.probes[key] = fit_ridge_probe(x["train"], y["train"], x["tuning"], y["tuning"])
                out.seconds["probes"] += time.perf_counter() - start
                out.metrics[key] = TaskMetrics(
                    n=len(held), r2=float(r2_score(y["held_out"], ridge.predict(x["held_out"]))), **scope
                )
    log.info(
        "site %s: probes %.1f s, scoring %.1f s for %d task keys",
        site_name,
        out.seconds["probes"],
        out.seconds["scoring"],
        len(usable),
    )
    return out


@dataclass(frozen=True)
class _MedsTabRows:
    """MEDS-Tab's features of the binary keys' labelled rows, one row per distinct pair."""

    x: sp.csr_matrix  # [pairs, features]
    index: dict[tuple[int, int], int]  # (subject_id, prediction_time us) -> row of x


def _meds_tab_features(
    site_name: str, site: Site, binary: Mapping[str, pa.Table], split_of: SplitOf, out: SiteTaskResults
) -> _MedsTabRows | None:
    """Tabularise every distinct labelled (subject, prediction_time) of the binary keys once, from
    the events of their subjects only; None (logged) when no code reaches meds-tab's minimum count."""
    start = time.perf_counter()
    pairs = pa.concat_tables(
        [t.select(["subject_id", "prediction_time"]).cast(LABEL_SCHEMA_BOOL.remove(2)) for t in binary.values()]
    )
    pairs = pairs.group_by(["subject_id", "prediction_time"]).aggregate([])
    subject = pairs["subject_id"].to_numpy()
    when = pc.cast(pairs["prediction_time"], pa.int64()).to_numpy()
    events = site.read_events(np.unique(subject), columns=list(EVENT_COLUMNS))
    train = np.unique(subject[split_of(subject) == "train"])
    features = describe_codes(events.filter(pa.array(np.isin(events["subject_id"].to_numpy(), train))))
    if features.n_features == 0:
        log.warning("site %s: MEDS-Tab left out: no code reaches its minimum count in the train split", site_name)
        return None
    x = tabularize(events, subject, when, features)
    seconds = time.perf_counter() - start
    out.seconds["meds_tab"] += seconds
    log.info(
        "site %s: MEDS-Tab tabularised %d rows of %d subjects (%d events) into %d features, %d stored (%.1f s)",
        site_name,
        len(subject),
        len(np.unique(subject)),
        events.num_rows,
        features.n_features,
        x.nnz,
        seconds,
    )
    return _MedsTabRows(x=x, index={k: i for i, k in enumerate(zip(subject.tolist(), when.tolist()))})


def _meds_tab_metrics(
    key: str,
    table: pa.Table,
    split: np.ndarray,
    tab: _MedsTabRows,
    site_name: str,
    pred_dir: str | Path | None,
    out: SiteTaskResults,
    n_boot: int,
    seed: int,
) -> tuple[float, float, float, float]:
    """MEDS-Tab on one binary key: fitted on its train rows (early stopping on tuning), its
    held_out rows predicted, written beside the probe's and scored like them."""
    start = time.perf_counter()
    rows = np.array([tab.index[k] for k in _pair_keys(table)], dtype=np.int64)
    y_all = table["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    x = tab.x
    part = {s: (x[rows[split == s]], y_all[split == s]) for s in ("train", "tuning", HELD_OUT_SPLIT)}
    model = fit_xgboost(*part["train"], *part["tuning"], seed=seed)
    held = np.flatnonzero(split == HELD_OUT_SPLIT)
    held_rows, p_held = table.take(pa.array(held)), model.predict_proba(part[HELD_OUT_SPLIT][0])
    if pred_dir is None:
        scored: Path | pa.Table = predictions_table(held_rows, p_held)
    else:
        scored = out.meds_tab_predictions[key] = write_predictions(
            prediction_path(pred_dir, site_name, f"{key}.meds_tab"), held_rows, p_held
        )
    scores = score_predictions(scored, seed=seed)["samples_equally_weighted"]
    low, high = bootstrap_ci(
        auroc, y_all[held], p_held, n_boot=n_boot, seed=seed, groups=held_rows["subject_id"].to_numpy()
    )
    out.seconds["meds_tab"] += time.perf_counter() - start
    return float(scores["roc_auc_score"]), float(scores["average_precision_score"]), low, high


__all__ = ["SiteTaskResults", "evaluate_site_tasks", "task_labels_at_site", "task_split_counts", "withheld_reason"]
