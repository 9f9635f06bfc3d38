"""Run one representation over every evaluation task: the loop a pretraining job, a federated
simulation or a notebook shares.

The expensive part of a frozen-probe evaluation is the forward pass, so it runs once per
(site, subject, prediction_time) row and method, never once per task:

1. `build_eval_set` collects, per site, the union of the rows of all tasks: the visit
   prediction times of the new-onset tasks (every disease and horizon labels the same times;
   a row a task excludes, e.g. prevalent or censored, holds NaN in that task's column) and the
   wear-period midpoints of the wearable regression tasks, with each row's split.
2. `method_features` turns every row into features once (a model's embedding, or count
   features), optionally with only some modalities left in the batch (the test-time ablation),
   and records which modalities each row actually has at its prediction time. A time-causal
   model embeds a subject's rows in shared passes (row_embeddings.py: one pass at the latest of
   the rows it can serve, one query token per row).
3. `evaluate_method` fits the probes of `healthfm_core.eval.probes` on the train rows of each
   task (C / alpha from the tuning rows) and scores the held_out rows; `oracle_rows` scores the
   synthetic generator's true risk on the same held_out rows (the ceiling).

Nothing here tunes on held_out: it is only ever scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from healthfm_core.data.labels.aces_tasks import AcesTask, aces_labels, aces_labels_shared
from healthfm_core.data.labels.task_spec import AcesOnsetTask
from healthfm_core.data.labels.tasks import (
    OnsetTask,
    Task,
    WearableTask,
    cap_rows_per_subject,
    onset_labels_from_events,
    rows_per_subject,
    visit_prediction_times,
    wear_period_end_times,
    wearable_regression_labels,
)
from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.prediction_times import PredictionTimesDataset
from healthfm_core.data.sequences.tokens import SiteSequences, make_loader, to_us
from healthfm_core.data.sites.site import Site
from healthfm_core.eval.metrics import PairedDifference, paired_difference
from healthfm_core.eval.probes import (
    binary_row,
    compute_count_features,
    cross_fit_logistic,
    fit_logistic_probe,
    fit_ridge_probe,
    oracle_row,
    regression_row,
)
from healthfm_core.eval.report import RegressionRow, ResultRow
from healthfm_core.eval.row_embeddings import embed_rows, restrict_modalities
from healthfm_core.model.healthfm import genomics_features
from healthfm_core.terms.site_layout import MODALITIES, SPLITS

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- poolings


# "genomics": the genomics encoder's conditioning vector (zeros where the row has no genomics or
# it was removed): the static PRS path beside the query state. Issue 31's diagnosis found the
# query state carries almost no PRS at the evidence job's budget (R^2 ~ 0.03-0.12: the FiLM path
# starts at identity and the pretraining losses barely move it) while the encoder's output carries
# it (R^2 ~ 0.5-0.9); HealthFM.embed is therefore [query, genomics] (model/healthfm.py).
POOLINGS = ("query", "mean", "genomics")


class PooledEmbedder(torch.nn.Module):
    """A frozen model whose `embed` concatenates several poolings of its final token states:
    "query" is the query token's final state at prediction_time (model.embed without its genomics
    columns: [query, genomics] is exactly model.embed);
    "mean" averages the states of the history tokens it may attend to; "genomics" is the
    genomics encoder's conditioning (not a token state: static per subject; no columns for a
    model without genomics). One forward pass gives every pooling, so comparing them costs no
    extra compute."""

    def __init__(self, model: torch.nn.Module, poolings: Sequence[str] = ("query",)) -> None:
        super().__init__()
        if not poolings or any(p not in POOLINGS for p in poolings):
            raise ValueError(f"poolings must be a non-empty subset of {POOLINGS}, got {list(poolings)}")
        self.model, self.poolings = model, tuple(poolings)

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.embed_at(batch, batch.prediction_time.float()[:, None])[:, 0]

    def embed_at(self, batch: Batch, query_time: torch.Tensor) -> torch.Tensor:
        """[B, Q, d_pooled] at query_time [B, Q]: "mean" averages the history tokens read by each
        query time (all of them at prediction_time: the pipeline keeps nothing later)."""
        out = self.model(batch, query_time=query_time)
        parts = []
        for pooling in self.poolings:
            if pooling == "query":
                parts.append(out.queries)
            elif pooling == "genomics":
                parts.append(genomics_features(out, getattr(self.model, "genomics_encoder", None), query_time.shape[1]))
            else:
                seen = out.key_valid[:, None, :] & (out.times[:, None, :] <= query_time.float()[:, :, None])
                w = seen.to(out.states.dtype)  # [B, Q, L]
                parts.append(torch.bmm(w, out.states) / w.sum(2, keepdim=True).clamp_min(1.0))
        return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------- the evaluation rows


@dataclass
class SiteRows:
    """One site's evaluation rows: the union over tasks."""

    name: str
    seqs: SiteSequences
    subject_id: np.ndarray  # [n] int64
    prediction_time_us: np.ndarray  # [n] int64 µs since 1970
    split: np.ndarray  # [n] str: train / tuning / held_out
    labels: dict[str, np.ndarray]  # task -> [n] float64 (bool as 0/1), NaN = not a row of the task

    def __len__(self) -> int:
        return len(self.subject_id)


@dataclass
class EvalSet:
    """Every site's rows, concatenated in site order (features are computed in the same order)."""

    sites: list[SiteRows]
    tasks: dict[str, Task]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sites)

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([getattr(s, name) for s in self.sites])

    @property
    def site(self) -> np.ndarray:
        return np.concatenate([np.full(len(s), s.name, dtype=object) for s in self.sites])

    def labels(self, task: str) -> np.ndarray:
        return np.concatenate([s.labels[task] for s in self.sites])

    def subject_keys(self) -> np.ndarray:
        """[n] "site/subject_id" of each row: the unit a bootstrap or a fold assignment keeps whole."""
        return np.concatenate([np.char.add(f"{s.name}/", s.subject_id.astype(str)) for s in self.sites])


def _rows_of(labels: pa.Table, rows: pa.Table) -> np.ndarray:
    """Position in `rows` of each (subject_id, prediction_time) of `labels` (all must be there)."""
    keyed = labels.select(["subject_id", "prediction_time"]).append_column("_i", pa.array(np.arange(labels.num_rows)))
    joined = keyed.join(rows, keys=["subject_id", "prediction_time"], join_type="left outer")
    if joined["_row"].null_count:
        raise ValueError(f"{joined['_row'].null_count} label rows are not among the evaluation rows")
    out = np.empty(labels.num_rows, dtype=np.int64)
    out[joined["_i"].to_numpy()] = joined["_row"].to_numpy()
    return out


def _splits_of(site: Site, subject_ids: np.ndarray, name: str) -> np.ndarray:
    table = site.subject_splits()
    sid = table["subject_id"].to_numpy()
    split = np.asarray(table["split"].to_pylist(), dtype=object)
    order = np.argsort(sid)
    pos = np.clip(np.searchsorted(sid[order], subject_ids), 0, max(len(sid) - 1, 0))
    found = len(sid) > 0 and sid[order][pos] == subject_ids
    if not np.all(found):
        missing = np.unique(subject_ids[~np.asarray(found)])
        raise ValueError(
            f"site {name}: subject_id {missing[:5].tolist()} has no row in metadata/subject_splits.parquet"
        )
    return split[order][pos]


OnsetTimes = Literal["visits", "wear_period_ends"]


def build_site_rows(
    name: str,
    site: Site,
    seqs: SiteSequences,
    tasks: Mapping[str, Task],
    n_per_subject: int | str | None = 4,
    seed: int = 0,
    onset_times: OnsetTimes = "visits",
) -> SiteRows:
    """The union of the evaluation rows of `tasks` at one site, with per-task labels. ACES tasks
    give ACES's rows, capped per subject exactly as a site's evaluation caps them
    (`cap_rows_per_subject`: train and tuning at `n_per_subject` a subject, held_out whole),
    or, with `onset_times="wear_period_ends"`, ACES's rows at the end of
    every wear period (`wear_period_end_times`: only subjects with wearables, the modality
    ablation's rows). Event-table onset tasks are asked at `visit_prediction_times`."""
    cap = rows_per_subject(n_per_subject)
    onset = {k: t for k, t in tasks.items() if isinstance(t, OnsetTask)}
    wear = {k: t for k, t in tasks.items() if isinstance(t, WearableTask)}
    tables: list[pa.Table] = []
    per_task: dict[str, pa.Table] = {}
    if onset:
        if onset_times not in ("visits", "wear_period_ends"):
            raise ValueError(f"onset_times must be 'visits' or 'wear_period_ends', got {onset_times!r}")
        # One ACES run per task file: every horizon at once; event-table tasks need times.
        by_aces: dict[str, tuple[AcesTask, dict[int, str]]] = {}
        event_table = {k: t for k, t in onset.items() if not isinstance(t, AcesOnsetTask)}
        for key, task in onset.items():
            if isinstance(task, AcesOnsetTask):
                by_aces.setdefault(task.aces.model_dump_json(), (task.aces, {}))[1][int(task.horizon_days)] = key
        times: pa.Table | None = None
        if onset_times == "wear_period_ends":
            times = wear_period_end_times(site.read_wearables())
        if event_table:
            events = site.read_events(columns=["subject_id", "time", "code"])
            if times is None:  # ACES tasks make their own rows (below)
                times = visit_prediction_times(events, n_per_subject=cap, seed=seed)
            for key, task in event_table.items():
                per_task[key] = onset_labels_from_events(events, task.outcome_code_prefix, task.horizon_days, times)
        if times is not None:
            tables.append(times)  # the rows asked at these times, labelled or not (as always)
        for aces, keys in by_aces.values():
            if onset_times == "visits":
                # As the sites evaluate: ACES's rows, at most n_per_subject of a subject's per key
                # in train and tuning, every held_out row.
                found = aces_labels(aces, site.root, list(keys))
                held = site.held_out_subjects()
                found = {h: cap_rows_per_subject(t, cap, seed, every_row_of=held) for h, t in found.items()}
            else:  # the ablation asks at wear-period ends: the MEDS events have none there
                (every,) = aces_labels_shared([aces], site.root, prediction_times=times, times_as_events=True)
                found = {h: t for h, t in every.items() if h in keys}
            for h, table in found.items():
                per_task[keys[h]] = table
                if onset_times == "visits":
                    tables.append(table.select(["subject_id", "prediction_time"]))
    if wear:
        wearables = site.read_wearables()
        for key, wear_task in wear.items():
            lab = wearable_regression_labels(wearables, target=wear_task.target)
            per_task[key] = lab
            tables.append(lab.select(["subject_id", "prediction_time"]))
    if not tables:
        raise ValueError("no tasks to build evaluation rows for")
    if sum(t.num_rows for t in tables) == 0:
        return SiteRows(
            name=name,
            seqs=seqs,
            subject_id=np.zeros(0, np.int64),
            prediction_time_us=np.zeros(0, np.int64),
            split=np.zeros(0, dtype=object),
            labels={k: np.zeros(0) for k in per_task},
        )
    rows = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    rows = rows.group_by(["subject_id", "prediction_time"]).aggregate([])  # distinct rows
    rows = rows.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
    rows = rows.append_column("_row", pa.array(np.arange(rows.num_rows)))
    n = rows.num_rows
    labels: dict[str, np.ndarray] = {}
    for key, lab in per_task.items():
        y = np.full(n, np.nan)
        value = lab.column(2).to_numpy(zero_copy_only=False).astype(np.float64)
        y[_rows_of(lab, rows)] = value
        labels[key] = y
    sid = rows["subject_id"].to_numpy()
    return SiteRows(
        name=name,
        seqs=seqs,
        subject_id=sid,
        prediction_time_us=to_us(rows["prediction_time"], "prediction_time"),
        split=_splits_of(site, sid, name),
        labels=labels,
    )


def build_eval_set(
    sites: Mapping[str, tuple[Site, SiteSequences]],
    tasks: Mapping[str, Task],
    n_per_subject: int | str | None = 4,
    seed: int = 0,
    onset_times: OnsetTimes = "visits",
) -> EvalSet:
    parts = [
        build_site_rows(name, site, seqs, tasks, n_per_subject, seed, onset_times)
        for name, (site, seqs) in sites.items()
    ]
    data = EvalSet(sites=parts, tasks=dict(tasks))
    for key in tasks:
        y = data.labels(key)
        have = np.isfinite(y)
        log.info(
            "task %s: %d rows%s",
            key,
            int(have.sum()),
            f", {int(np.nansum(y))} positive" if isinstance(tasks[key], OnsetTask) else "",
        )
    return data


# ---------------------------------------------------------------- features


@dataclass
class MethodFeatures:
    x: np.ndarray  # [n, d]
    present: (
        np.ndarray
    )  # [n, 3] bool: the row has ehr / wearables / genomics at prediction_time (before any restriction)
    rows: np.ndarray  # [n] positions in the EvalSet


def _tap_presence(batches: Iterable[Batch], sink: list[np.ndarray], keep: Iterable[str] | None) -> Iterator[Batch]:
    for batch in batches:
        has = batch.has_modality()
        sink.append(torch.stack([has[m] for m in MODALITIES], dim=1).numpy())
        yield batch if keep is None else restrict_modalities(batch, keep)


def method_features(
    data: EvalSet,
    model: torch.nn.Module | None,
    vocab_size: int | None = None,
    rows: np.ndarray | None = None,
    keep: Iterable[str] | None = None,
    max_events: int = 512,
    max_patches: int = 64,
    batch_size: int = 128,
    progress: bool = False,
) -> MethodFeatures:
    """Features of the EvalSet's rows (all, or the positions `rows`): `model.embed` when a model
    is given, count features over `vocab_size` codes otherwise; `keep` removes every other
    modality from the batches first."""
    if model is None and vocab_size is None:
        raise ValueError("method_features needs a model or a vocab_size (count features)")
    keep = None if keep is None else tuple(keep)
    all_rows = np.arange(len(data)) if rows is None else np.asarray(rows, dtype=np.int64)
    xs: list[np.ndarray] = []
    present: list[np.ndarray] = []
    offset = 0
    for part in data.sites:
        mine = all_rows[(all_rows >= offset) & (all_rows < offset + len(part))] - offset
        offset += len(part)
        if len(mine) == 0:
            continue
        if model is not None:  # a time-causal model embeds a subject's rows in shared passes
            emb = embed_rows(
                model,
                part.seqs,
                part.subject_id[mine],
                part.prediction_time_us[mine],
                max_events,
                max_patches,
                batch_size=batch_size,
                keep=keep,
                progress=progress,
            )
            xs.append(emb.x)
            present.append(emb.present)
            continue
        assert vocab_size is not None  # one of the two is given: checked on entry
        ds = PredictionTimesDataset(
            part.seqs, part.subject_id[mine], part.prediction_time_us[mine], max_events, max_patches
        )
        batches = _tap_presence(make_loader(ds, batch_size=batch_size, shuffle=False), present, keep)
        xs.append(compute_count_features(batches, vocab_size, progress=progress).x)
    if not xs:
        raise ValueError("no evaluation rows to compute features for")
    return MethodFeatures(np.concatenate(xs), np.concatenate(present), all_rows)


# ---------------------------------------------------------------- probes per task


def task_display(task: Task) -> tuple[str, int | None]:
    """(task name without the horizon, horizon in days) as the results table shows them."""
    if isinstance(task, OnsetTask):
        suffix = f"_{int(task.horizon_days)}d"
        base = task.name[: -len(suffix)] if task.name.endswith(suffix) else task.name
        return base, int(task.horizon_days)
    return task.name, None


@dataclass
class MethodResult:
    rows: list[ResultRow] = field(default_factory=list)
    regression_rows: list[RegressionRow] = field(default_factory=list)
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # task -> held_out (y, p)
    scored_rows: dict[str, np.ndarray] = field(default_factory=dict)  # task -> EvalSet positions of those rows
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it was not evaluated


def _split_rows(split: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    have = np.isfinite(y)
    return {s: np.flatnonzero(have & (split == s)) for s in SPLITS}


def evaluate_method(
    method: str,
    data: EvalSet,
    features: MethodFeatures,
    tasks: Iterable[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_train_positives: int = 2,
    score_split: str = "held_out",
) -> MethodResult:
    """Probe `features` on each task's rows among features.rows: fit on train, C / alpha from
    tuning, scores on held_out. A task without enough train positives, or without held_out
    rows, is skipped with the reason. score_split="tuning" scores the tuning rows instead: the
    split to compare design choices (pooling, steps) on, so held_out is never tuned on."""
    return evaluate_method_splits(
        method, data, features, (score_split,), tasks, {score_split: n_boot}, seed, min_train_positives
    )[score_split]


def evaluate_method_splits(
    method: str,
    data: EvalSet,
    features: MethodFeatures,
    score_splits: Sequence[str] = ("held_out", "tuning"),
    tasks: Iterable[str] | None = None,
    n_boot: Mapping[str, int] | None = None,
    seed: int = 0,
    min_train_positives: int = 2,
) -> dict[str, MethodResult]:
    """evaluate_method for several score splits with one probe fit per task (the fit is the
    expensive part): {split: results}. n_boot per split (default 1000)."""
    if bad := [s for s in score_splits if s not in ("held_out", "tuning")]:
        raise ValueError(f"score splits must be 'held_out' or 'tuning', got {bad}")
    out = {s: MethodResult() for s in score_splits}
    split_all = data.column("split")
    subject = data.subject_keys()
    for key in data.tasks if tasks is None else tasks:
        task = data.tasks[key]
        y_all = data.labels(key)[features.rows]
        by = _split_rows(split_all[features.rows], y_all)
        name, horizon = task_display(task)
        regression = not isinstance(task, OnsetTask)
        if (why := _why_skip(y_all, by, regression, min_train_positives)) is not None:
            for res in out.values():
                res.skipped[key] = why
            continue
        (x_tr, y_tr), (x_tu, y_tu) = [(features.x[by[s]], y_all[by[s]]) for s in ("train", "tuning")]
        # The probe's scores: predictions (regression) or probabilities (binary).
        if regression:
            score = fit_ridge_probe(x_tr, y_tr, x_tu, y_tu).predict
        else:
            score = fit_logistic_probe(x_tr, y_tr.astype(bool), x_tu, y_tu.astype(bool)).predict_proba
        for split, res in out.items():
            x, y = features.x[by[split]].astype(np.float64), y_all[by[split]]
            boot = (n_boot or {}).get(split, 1000)
            if regression:
                pred = score(x)
                res.regression_rows.append(regression_row(method, name, y, pred, boot, seed))
                res.predictions[key] = (y, pred)
            else:
                p = score(x)
                res.rows.append(
                    binary_row(method, name, horizon, y.astype(bool), p, boot, seed, subject[features.rows[by[split]]])
                )
                res.predictions[key] = (y.astype(bool), p)
            res.scored_rows[key] = features.rows[by[split]]
    return out


def subsample_train(data: EvalSet, rows: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The positions `rows` with their train-split rows cut to those of a random `fraction` of the
    train subjects (tuning and held_out rows stay): a probe with fewer labels, on the same test.
    Nested: at one seed, the subjects kept at a fraction are among those kept at a larger one."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rows = np.asarray(rows, dtype=np.int64)
    split, subject = data.column("split")[rows], data.subject_keys()[rows]
    train_subjects = np.unique(subject[split == "train"])
    order = np.random.default_rng(seed).permutation(len(train_subjects))
    kept = train_subjects[order[: max(1, int(round(fraction * len(train_subjects))))]]
    return rows[(split != "train") | np.isin(subject, kept)]


def evaluate_cross_fitted(
    method: str,
    data: EvalSet,
    features: MethodFeatures,
    tasks: Iterable[str] | None = None,
    n_folds: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    min_positives: int = 10,
) -> MethodResult:
    """Onset tasks on a cohort too small for one train / tuning / held_out split (e.g. the rows
    with wearables): out-of-fold probabilities from `probes.cross_fit_logistic` over all of the
    cohort's rows, folds by subject, scored on every row (AUROC with a subject bootstrap).
    A task with fewer than min_positives positives, or too few per fold, is skipped."""
    out = MethodResult()
    subject = data.subject_keys()[features.rows]
    for key in data.tasks if tasks is None else tasks:
        task = data.tasks[key]
        if not isinstance(task, OnsetTask):
            continue
        y_all = data.labels(key)[features.rows]
        have = np.isfinite(y_all)
        y = y_all[have].astype(bool)
        if int(y.sum()) < min_positives:
            out.skipped[key] = f"{int(y.sum())} positives among {int(have.sum())} rows (< {min_positives})"
            continue
        try:
            p = cross_fit_logistic(features.x[have], y, subject[have], n_folds=n_folds, seed=seed)
        except ValueError as e:
            out.skipped[key] = str(e)
            continue
        name, horizon = task_display(task)
        out.rows.append(binary_row(method, name, horizon, y, p, n_boot, seed, subject[have]))
        out.predictions[key] = (y, p)
        out.scored_rows[key] = features.rows[have]
    return out


def _why_skip(y: np.ndarray, by: dict[str, np.ndarray], regression: bool, min_train_positives: int) -> str | None:
    counts = {s: len(by[s]) for s in SPLITS}
    if min(counts.values()) == 0:
        return f"rows per split {counts}"
    if regression:
        return None if counts["train"] >= 2 else f"only {counts['train']} train rows"
    y_train = y[by["train"]]
    n_pos = int(y_train.sum())
    if n_pos < min_train_positives or n_pos == len(y_train):
        return f"{n_pos} positives among {len(y_train)} train rows"
    return None


# ---------------------------------------------------------------- the oracle


def oracle_rows(
    data: EvalSet,
    truth_risk: Callable[[str, str, np.ndarray, np.ndarray, float], np.ndarray],
    code_to_disease: Mapping[str, str],
    tasks: Iterable[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> MethodResult:
    """The true risk as the score on each onset task's held_out rows.

    truth_risk(site, disease, subject_ids, prediction_times (datetime64[us]), horizon_days)
    gives the generator's risk (e.g. functools.partial(synthetic.oracle_risk, truth_dir));
    code_to_disease maps an outcome code prefix to the generator's disease name.
    """
    out = MethodResult()
    subject = data.subject_keys()
    for key in data.tasks if tasks is None else tasks:
        task = data.tasks[key]
        if not isinstance(task, OnsetTask):
            continue
        if task.outcome_code_prefix not in code_to_disease:
            out.skipped[key] = f"no true risk for {task.outcome_code_prefix}"
            continue
        disease = code_to_disease[task.outcome_code_prefix]
        ys, risks, positions = [], [], []
        offset = 0
        for part in data.sites:
            held = np.flatnonzero(np.isfinite(part.labels[key]) & (part.split == "held_out"))
            offset += len(part)
            if len(held) == 0:
                continue
            ys.append(part.labels[key][held].astype(bool))
            pt = part.prediction_time_us[held].astype("datetime64[us]")
            risks.append(truth_risk(part.name, disease, part.subject_id[held], pt, task.horizon_days))
            positions.append(held + offset - len(part))
        if not ys:
            out.skipped[key] = "no held_out rows"
            continue
        y, risk, pos = np.concatenate(ys), np.concatenate(risks), np.concatenate(positions)
        name, horizon = task_display(task)
        row = oracle_row(name, horizon, y, risk, n_boot=n_boot, seed=seed, groups=subject[pos])
        out.rows.append(row)
        known = np.isfinite(risk)
        out.predictions[key] = (y[known], risk[known])
        out.scored_rows[key] = pos[known]
    return out


# ---------------------------------------------------------------- summaries


def mean_auroc(rows: Sequence[ResultRow]) -> dict[str, float]:
    """Mean AUROC per method over the (task, horizon) pairs every method in `rows` has (so the
    means compare like with like)."""
    by_method: dict[str, dict[tuple[str, int | None], float]] = {}
    for r in rows:
        if np.isfinite(r.auroc):
            by_method.setdefault(r.method, {})[(r.task, r.horizon)] = r.auroc
    if not by_method:
        return {}
    common = set.intersection(*(set(v) for v in by_method.values()))
    return {m: float(np.mean([v[k] for k in common])) if common else float("nan") for m, v in by_method.items()}


def wins(rows: Sequence[ResultRow], method: str, other: str) -> tuple[int, int]:
    """(pairs where `method`'s AUROC is above `other`'s, pairs both have)."""
    a = {(r.task, r.horizon): r.auroc for r in rows if r.method == method and np.isfinite(r.auroc)}
    b = {(r.task, r.horizon): r.auroc for r in rows if r.method == other and np.isfinite(r.auroc)}
    common = set(a) & set(b)
    return sum(a[k] > b[k] for k in common), len(common)


def paired_items(
    data: EvalSet, a: MethodResult, b: MethodResult, tasks: Iterable[str]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per task both methods scored: (y, p_a, p_b, subject key) on the rows both scored, what
    metrics.paired_difference / paired_resamples take."""
    subject = data.subject_keys()
    items = []
    for key in tasks:
        if key not in a.scored_rows or key not in b.scored_rows:
            continue
        ra, rb = a.scored_rows[key], b.scored_rows[key]
        common, ia, ib = np.intersect1d(ra, rb, assume_unique=True, return_indices=True)
        ya, pa_ = a.predictions[key]
        if len(common) == 0:
            continue
        items.append((ya[ia], pa_[ia], b.predictions[key][1][ib], subject[common]))
    return items


def paired_auroc_difference(
    data: EvalSet,
    a: MethodResult,
    b: MethodResult,
    tasks: Iterable[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> PairedDifference | None:
    """Mean over `tasks` of AUROC(a) - AUROC(b) on the rows both scored, with a bootstrap that
    resamples subjects once for all tasks (metrics.paired_difference). None if no task has
    both methods' scores."""
    items = paired_items(data, a, b, tasks)
    return paired_difference(items, n_boot=n_boot, seed=seed) if items else None


__all__ = [
    "EvalSet",
    "MethodFeatures",
    "MethodResult",
    "POOLINGS",
    "PooledEmbedder",
    "SiteRows",
    "build_eval_set",
    "build_site_rows",
    "evaluate_cross_fitted",
    "evaluate_method",
    "evaluate_method_splits",
    "mean_auroc",
    "method_features",
    "oracle_rows",
    "paired_auroc_difference",
    "paired_items",
    "restrict_modalities",
    "subsample_train",
    "task_display",
    "wins",
]
