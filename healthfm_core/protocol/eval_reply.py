"""evaluate: a site's reply (EvalReply: metrics per task, reasons, score histograms) and its wire
form, and the summaries over sites the server records (n-weighted mean, median, largest share)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from healthfm_core.protocol.eval_config import MAX_SCORE_BINS
from healthfm_core.protocol.site_share import capped_weights
from healthfm_core.protocol.task_reason import SPLIT_COUNTS, TaskReason
from healthfm_core.protocol.wire import PeerReply, validate_peer

# Metric keys of the wire form (MetricRecord), private to this module: everything else reads the
# typed fields of EvalReply.
_EVAL_SCALARS = {
    "num-examples": "num_examples",
    "withheld": "withheld",
    "eval-seconds": "eval_seconds",
    "max-subjects": "max_subjects",
    "min-subjects": "min_subjects",
    "min-positives": "min_positives",
}
_EVAL_TASK_COUNT = "tasks"
# A binary task's score histogram: "<task>.histogram-bounds" (list), "-positives", "-negatives"
# (lists), "-minimum"; or "<task>.histogram-withheld.<kind>" = 1.
_HIST_PREFIX = "histogram-"
_HIST_FIELDS = ("bounds", "positives", "negatives", "minimum")
_HIST_WITHHELD = "histogram-withheld"

# Why a binary task's histogram stays at the site: a class with fewer rows than its minimum.
WithheldKind = Literal["positives_below_minimum", "negatives_below_minimum"]
WITHHELD_KINDS: tuple[WithheldKind, ...] = ("positives_below_minimum", "negatives_below_minimum")

# Per-task metric names in an evaluate reply: "<task>.<metric>"; "<task>.n" is the held-out sample
# count used to weight the server's average.
EVAL_METRICS = ("auroc", "auprc", "ece", "r2")
# MEDS-Tab's point metrics, averaged over sites like the probe's (aggregate_site_metrics), under
# their wire names (as in a site's reply): "<task>.meds-tab-auroc", "<task>.meds-tab-auprc".
MEDS_TAB_METRICS = ("meds-tab-auroc", "meds-tab-auprc")
_TASK_N = "n"
# Whom an evaluation scored, held-out split: "<task>.subjects" (those with rows) of
# "<task>.subjects-available" (the split's subjects, of which a capped evaluation drew its sample).
# With a binary task, the held-out positives (SMALL_CELL below the site's minimum) and a 95%
# subject-bootstrap interval of the AUROC on the same rows as the point estimate.
_TASK_SCOPE = {
    "subjects": "subjects",
    "subjects-available": "available_subjects",
    "positives": "positives",
    "auroc-low": "auroc_low",
    "auroc-high": "auroc_high",
    # MEDS-Tab, the field's tabular baseline, on the same held-out rows (healthfm_core/eval/meds_tab.py).
    "meds-tab-auroc": "meds_tab_auroc",
    "meds-tab-auprc": "meds_tab_auprc",
    "meds-tab-auroc-low": "meds_tab_auroc_low",
    "meds-tab-auroc-high": "meds_tab_auroc_high",
}


class TaskMetrics(PeerReply):
    """One task's held-out metrics at one site (n: held-out samples scored; subjects: their
    subjects; available_subjects: the held-out subjects the site has, of which a capped
    evaluation drew its sample; None from a site that does not say). NaN: undefined."""

    n: int = Field(ge=1)
    auroc: float | None = None  # each in [0, 1] (r2 at most 1), or NaN
    auprc: float | None = None
    ece: float | None = None
    r2: float | None = None
    subjects: int | None = Field(default=None, ge=1)
    available_subjects: int | None = Field(default=None, ge=1)
    positives: int | None = Field(default=None, ge=-1)  # -1: SMALL_CELL (1..minimum-1, not disclosed)
    auroc_low: float | None = None  # 95% subject-bootstrap interval of auroc (NaN: undefined)
    auroc_high: float | None = None
    # MEDS-Tab's AUROC, AUPRC and AUROC interval on the same held-out rows as the probe's (binary tasks).
    meds_tab_auroc: float | None = None
    meds_tab_auprc: float | None = None
    meds_tab_auroc_low: float | None = None
    meds_tab_auroc_high: float | None = None

    @field_validator(
        "auroc",
        "auprc",
        "ece",
        "r2",
        "auroc_low",
        "auroc_high",
        "meds_tab_auroc",
        "meds_tab_auprc",
        "meds_tab_auroc_low",
        "meds_tab_auroc_high",
    )
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        low = -np.inf if info.field_name == "r2" else 0.0
        if v is not None and not np.isnan(v) and (np.isinf(v) or not low <= v <= 1.0):
            raise ValueError(f"must be NaN (undefined) or finite in [{low:g}, 1]")
        return v

    @model_validator(mode="after")
    def _some_metric(self) -> TaskMetrics:
        if all(getattr(self, m) is None for m in EVAL_METRICS):
            raise ValueError(f"no metric among {', '.join(EVAL_METRICS)}")
        if (
            self.subjects is not None
            and self.available_subjects is not None
            and self.subjects > self.available_subjects
        ):
            raise ValueError(f"subjects {self.subjects} is more than available_subjects {self.available_subjects}")
        if (self.auroc_low is None) != (self.auroc_high is None):
            raise ValueError("auroc_low and auroc_high go together")
        if self.auroc_low is not None and self.auroc_high is not None and self.auroc_low > self.auroc_high:
            raise ValueError(f"auroc_low {self.auroc_low} is above auroc_high {self.auroc_high}")
        low, high = self.meds_tab_auroc_low, self.meds_tab_auroc_high
        if (low is None) != (high is None):
            raise ValueError("meds_tab_auroc_low and meds_tab_auroc_high go together")
        if low is not None and high is not None and low > high:
            raise ValueError(f"meds_tab_auroc_low {low} is above meds_tab_auroc_high {high}")
        if self.meds_tab_auroc_low is not None and self.meds_tab_auroc is None:
            raise ValueError("meds_tab_auroc_low without meds_tab_auroc")
        if (self.meds_tab_auroc is not None or self.meds_tab_auprc is not None) and self.auroc is None:
            raise ValueError("MEDS-Tab's metrics come beside a binary task's auroc")
        if self.positives is not None and self.positives > self.n:
            raise ValueError(f"positives {self.positives} is more than n {self.n}")
        return self


_WITHHELD = "withheld"
_MINIMUM = "minimum"
_MIN_POSITIVES = "min-positives"
TASK_KEY = r"^[A-Za-z][A-Za-z0-9_\-]{0,79}$"


class ScoreHistogram(PeerReply):
    """One binary task's held-out probe scores at one site, counted per class on the server's
    grid (EvalConfig.score_bins) with small cells merged (healthfm_core/eval/score_histogram.py):
    cell i holds the base bins [bounds[i], bounds[i+1]); every count is 0 or at least `minimum`,
    the site's minimum it was merged to."""

    bounds: list[int] = Field(min_length=2, max_length=MAX_SCORE_BINS + 1)
    positives: list[int] = Field(max_length=MAX_SCORE_BINS)
    negatives: list[int] = Field(max_length=MAX_SCORE_BINS)
    minimum: int = Field(ge=1)

    @model_validator(mode="after")
    def _cells(self) -> ScoreHistogram:
        cells = len(self.bounds) - 1
        if len(self.positives) != cells or len(self.negatives) != cells:
            raise ValueError(
                f"{cells} cells in bounds but {len(self.positives)} positives and {len(self.negatives)} negatives"
            )
        if self.bounds[0] != 0 or any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"bounds {self.bounds[:8]}...: must start at 0 and increase")
        for name in ("positives", "negatives"):
            counts = getattr(self, name)
            if any(n < 0 for n in counts):
                raise ValueError(f"{name}: a negative count")
            # Fails closed, like TaskReason: a cell on 1..minimum-1 rows may not leave a site.
            if small := [n for n in counts if 0 < n < self.minimum]:
                raise ValueError(f"{name}: count {small[0]} is below the minimum {self.minimum}: a small cell")
        return self


class EvalReply(PeerReply):
    """A site's answer to an evaluate message: held-out metrics per task key, and for every task
    key without one the reason (`reasons`); `withheld` counts those. Per binary task with a
    metric, its score histogram (`histograms`) or why the site kept it (`histograms_withheld`:
    a class with fewer rows than the site's minimum)."""

    tasks: dict[str, TaskMetrics] = Field(default_factory=dict)
    reasons: dict[str, TaskReason] = Field(default_factory=dict)
    histograms: dict[str, ScoreHistogram] = Field(default_factory=dict)
    histograms_withheld: dict[str, WithheldKind] = Field(default_factory=dict)
    num_examples: int = Field(default=0, ge=0)  # samples embedded
    withheld: int = Field(default=0, ge=0)
    eval_seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_subjects: int = Field(default=0, ge=0)  # the subject budget the site applied (0: every subject)
    # The privacy floor the site applied (its min_report_subjects / min_report_positives; 0: not said)
    min_subjects: int = Field(default=0, ge=0)
    min_positives: int = Field(default=0, ge=0)

    @field_validator("tasks", "reasons")
    @classmethod
    def _task_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 1024:
            raise ValueError(f"{len(v)} tasks: at most 1024")
        bad = sorted(k for k in v if not re.match(TASK_KEY, k))
        if bad:
            raise ValueError(f"task key {bad[0]!r} is not a task name")
        return v

    @model_validator(mode="after")
    def _disjoint(self, info: ValidationInfo) -> EvalReply:
        if both := sorted(set(self.tasks) & set(self.reasons)):
            raise ValueError(f"task {both[0]!r} has both metrics and a reason")
        self._check_floor()
        self._check_histograms(info)
        return self

    def _check_floor(self) -> None:
        """Fails closed, like TaskReason: a metric's counts from fewer distinct subjects than the
        site's minimum (min_subjects, when said) may not leave a site, nor be read from one."""
        floor = self.min_subjects
        for task, m in sorted(self.tasks.items()) if floor else ():
            if m.subjects is not None and m.subjects < floor:
                raise ValueError(f"field {task}.subjects: value {m.subjects}: below the site's minimum {floor}")
            if m.positives is not None and m.positives >= 0:
                for what, n in (("positives", m.positives), ("n less positives", m.n - m.positives)):
                    if 0 < n < floor:
                        raise ValueError(
                            f"field {task}.positives: {what} {n} is below the site's minimum {floor}: a small cell"
                        )

    def _check_histograms(self, info: ValidationInfo) -> None:
        """Histograms are a peer's claims: each belongs to a binary task with a metric and adds
        up to its n and positives; with the asked grid in the context (`score_bins`), it covers
        exactly that grid."""
        score_bins = (info.context or {}).get("score_bins")
        for task in sorted(set(self.histograms) | set(self.histograms_withheld)):
            m = self.tasks.get(task)
            if m is None or m.auroc is None:
                raise ValueError(f"field {task}.{_HIST_PREFIX}*: a histogram for a task without an AUROC")
        if both := sorted(set(self.histograms) & set(self.histograms_withheld)):
            raise ValueError(f"field {both[0]}.{_HIST_WITHHELD}.*: the histogram is both sent and withheld")
        for task, h in sorted(self.histograms.items()):
            m = self.tasks[task]
            pos, neg = sum(h.positives), sum(h.negatives)
            if pos + neg != m.n:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}positives/negatives: {pos} + {neg} rows, but {task}.n is {m.n}"
                )
            if m.positives != pos:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}positives: {pos} in all, but {task}.positives is {m.positives}"
                )
            if score_bins is not None and h.bounds[-1] != score_bins:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}bounds: value ...{h.bounds[-1]}: the grid asked has {score_bins} bins"
                )

    def to_records(self) -> dict[str, int | float | list[int]]:
        """The MetricRecord METRICS_RECORD of the reply (also the per-site form in rounds.jsonl)."""
        out: dict[str, int | float | list[int]] = {}
        for task, m in self.tasks.items():
            out.update({f"{task}.{name}": v for name in EVAL_METRICS if (v := getattr(m, name)) is not None})
            out[f"{task}.{_TASK_N}"] = m.n
            out.update(
                {f"{task}.{wire}": v for wire, name in _TASK_SCOPE.items() if (v := getattr(m, name)) is not None}
            )
        for task, r in self.reasons.items():
            out[f"{task}.{_WITHHELD}.{r.kind}"] = 1
            out[f"{task}.{_MINIMUM}"] = r.minimum
            if r.min_positives:
                out[f"{task}.{_MIN_POSITIVES}"] = r.min_positives
            for split, c in r.splits.items():
                out.update({f"{task}.{split}.{name}": getattr(c, name) for name in SPLIT_COUNTS})
        for task, h in self.histograms.items():
            out.update({f"{task}.{_HIST_PREFIX}{name}": getattr(h, name) for name in _HIST_FIELDS})
        for task, kind in self.histograms_withheld.items():
            out[f"{task}.{_HIST_WITHHELD}.{kind}"] = 1
        out.update({key: getattr(self, name) for key, name in _EVAL_SCALARS.items()})
        out[_EVAL_TASK_COUNT] = len(self.tasks)
        return out

    @classmethod
    def from_records(
        cls, metrics: Mapping[str, Any], expected: Collection[str] | None = None, score_bins: int | None = None
    ) -> EvalReply:
        """Parse a peer's metrics; raise ValueError naming the field and value that does not parse,
        or a task key outside `expected` (the keys asked), when given, or a score histogram off
        the grid of `score_bins` bins (the EvalConfig's), when given."""
        data: dict[str, Any] = {}
        tasks: dict[str, dict[str, Any]] = {}
        reasons: dict[str, dict[str, Any]] = {}
        histograms: dict[str, dict[str, Any]] = {}
        histograms_withheld: dict[str, Any] = {}
        count = None
        for key, value in metrics.items():
            task, _, rest = key.partition(".")  # task keys hold no dot
            parts = rest.split(".")
            if task and len(parts) == 1 and rest.startswith(_HIST_PREFIX) and rest[len(_HIST_PREFIX) :] in _HIST_FIELDS:
                histograms.setdefault(task, {})[rest[len(_HIST_PREFIX) :]] = value
            elif task and len(parts) == 2 and parts[0] == _HIST_WITHHELD:
                if value != 1 or parts[1] not in WITHHELD_KINDS or task in histograms_withheld:
                    raise ValueError(
                        f"evaluate reply: field {key}: value {value!r}: expected 1, once per task, with a kind "
                        f"among {', '.join(WITHHELD_KINDS)}"
                    )
                histograms_withheld[task] = parts[1]
            elif key in _EVAL_SCALARS:
                data[_EVAL_SCALARS[key]] = value
            elif key == _EVAL_TASK_COUNT:
                count = value
            elif task and len(parts) == 1 and (rest in EVAL_METRICS or rest == _TASK_N):
                tasks.setdefault(task, {})[rest] = value
            elif task and len(parts) == 1 and rest in _TASK_SCOPE:
                tasks.setdefault(task, {})[_TASK_SCOPE[rest]] = value
            elif task and len(parts) == 2 and parts[0] == _WITHHELD:
                if value != 1:
                    raise ValueError(f"evaluate reply: field {key}: value {value!r}: expected 1")
                if "kind" in reasons.get(task, {}):
                    raise ValueError(f"evaluate reply: field {key}: task {task!r} has a second reason")
                reasons.setdefault(task, {})["kind"] = parts[1]
            elif task and rest == _MINIMUM:
                reasons.setdefault(task, {})["minimum"] = value
            elif task and rest == _MIN_POSITIVES:
                reasons.setdefault(task, {})["min_positives"] = value
            elif task and len(parts) == 2 and parts[1] in SPLIT_COUNTS:
                reasons.setdefault(task, {}).setdefault("splits", {}).setdefault(parts[0], {})[parts[1]] = value
            else:
                raise ValueError(f"evaluate reply: unknown metric {key!r} (value {value!r})")
        for task, r in reasons.items():
            if "kind" not in r:
                raise ValueError(
                    f"evaluate reply: field {task}.{_WITHHELD}.*: missing (the reply holds counts "
                    f"for {task!r} but no reason)"
                )
        if expected is not None and (unknown := sorted((set(tasks) | set(reasons)) - set(expected))):
            raise ValueError(f"evaluate reply: unknown task {unknown[0]!r} (asked: {', '.join(expected)})")
        data["tasks"] = tasks
        data["reasons"] = reasons
        if histograms:
            data["histograms"] = histograms
        if histograms_withheld:
            data["histograms_withheld"] = histograms_withheld
        reply = validate_peer(
            cls, data, what="evaluate reply", wire=_eval_wire_name, context={"score_bins": score_bins}
        )
        if count is not None and count != len(reply.tasks):
            raise ValueError(
                f"evaluate reply: field {_EVAL_TASK_COUNT}: value {count!r}: the reply holds {len(reply.tasks)} tasks"
            )
        return reply


def _eval_wire_name(loc: tuple[Any, ...]) -> str:
    if len(loc) >= 2 and loc[0] in ("histograms", "histograms_withheld"):
        what = f"{_HIST_PREFIX}{loc[2]}" if loc[0] == "histograms" and len(loc) >= 3 else f"{_HIST_PREFIX}*"
        return f"{loc[1]}.{what}"
    if len(loc) >= 3 and loc[0] == "tasks":
        return f"{loc[1]}.{next((w for w, n in _TASK_SCOPE.items() if n == loc[2]), loc[2])}"
    if len(loc) >= 2 and loc[0] == "reasons":
        rest = [str(x) for x in loc[2:] if x != "splits"]
        if rest[:1] == ["kind"]:
            return f"{loc[1]}.{_WITHHELD}.*"
        return ".".join([str(loc[1]), *rest]) if rest else f"{loc[1]}.*"
    if len(loc) == 2 and loc[0] == "tasks":
        return f"{loc[1]}.*"
    head = str(loc[0]) if loc else ""
    return next((k for k, v in _EVAL_SCALARS.items() if v == head), head)


def task_weights(per_site: Mapping[str, EvalReply]) -> dict[str, dict[str, float]]:
    """Per task, each site's weight in its n-weighted means: its held-out rows n, capped at
    SHARE_CAP_FACTOR x the median of the other sites' n among the sites that scored the task
    (healthfm_core/protocol/site_share.py)."""
    rows: dict[str, dict[str, int]] = {}
    for site, reply in sorted(per_site.items()):
        for task, m in reply.tasks.items():
            rows.setdefault(task, {})[site] = m.n
    return {task: capped_weights(by_site) for task, by_site in sorted(rows.items())}


def aggregate_site_metrics(per_site: Mapping[str, EvalReply]) -> dict[str, float]:
    """n-weighted mean over sites of each "<task>.<metric>", each site's weight its n capped
    (task_weights: no site weighs more than SHARE_CAP_FACTOR x the others' median); "<task>.n"
    sums the rows the sites claim.

    An n-weighted mean of per-site AUROCs is not the AUROC of the pooled data (that needs the
    scores, which never leave a site); it is what a federation can compute from site summaries.
    """
    out: dict[str, float] = {}
    weights = task_weights(per_site)
    for key, values in site_metric_values(per_site).items():
        task = key.partition(".")[0]  # task keys hold no dot
        w = {site: weights[task][site] for site in values}
        out[key] = sum(w[s] * v for s, v in values.items()) / sum(w.values())
    counts: dict[str, float] = {}
    for reply in per_site.values():
        for task, m in reply.tasks.items():
            counts[f"{task}.{_TASK_N}"] = counts.get(f"{task}.{_TASK_N}", 0.0) + float(m.n)
    out.update({k: counts[k] for k in sorted(counts)})
    return out


def site_metric_values(per_site: Mapping[str, EvalReply]) -> dict[str, dict[str, float]]:
    """Each "<task>.<metric>" (aggregate_site_metrics's keys, without "<task>.n") by site: the
    finite values the sites reported."""
    out: dict[str, dict[str, float]] = {}
    for site, reply in sorted(per_site.items()):
        for task, m in reply.tasks.items():
            for name in EVAL_METRICS + MEDS_TAB_METRICS:
                value = getattr(m, _TASK_SCOPE.get(name, name))
                if value is not None and np.isfinite(value):
                    out.setdefault(f"{task}.{name}", {})[site] = float(value)
    return {k: out[k] for k in sorted(out)}


def median_site_metrics(per_site: Mapping[str, EvalReply]) -> dict[str, float]:
    """The robust summary beside the n-weighted mean: per "<task>.<metric>" the median over sites,
    unweighted. One site's claims (its n, its value) move it no further than to a neighbouring
    site's value: with k sites it stays between the honest sites' values while fewer than half lie."""
    return {key: float(np.median(list(values.values()))) for key, values in site_metric_values(per_site).items()}


def largest_row_share(per_site: Mapping[str, EvalReply]) -> dict[str, dict[str, Any]]:
    """Per task, the site with the largest weight in the n-weighted means (task_weights) and its
    share of the weights, with the rows it claims and the sites whose weight the cap lowered
    (site -> its weight): named beside every mean."""
    rows = {
        task: {s: r.tasks[task].n for s, r in per_site.items() if task in r.tasks} for task in task_weights(per_site)
    }
    out: dict[str, dict[str, Any]] = {}
    for task, weights in task_weights(per_site).items():
        site = max(weights, key=lambda s: (weights[s], rows[task][s], s))
        out[task] = {
            "site": site,
            "rows": rows[task][site],
            "weight": weights[site],
            "share": weights[site] / sum(weights.values()),
            "capped": {s: w for s, w in sorted(weights.items()) if w < rows[task][s]},
        }
    return out
