"""Zero-shot onset forecasting: each onset task scored by the model's own probability that the
task's outcome codes appear within its horizon, with no task-specific training.

Which head. `future_codes` (model/objectives.py) is trained at a query token placed at an event
time t to predict the set of codes in (t, t + h] for each h of `future_horizons_days` (30 / 90 /
180 / 365 days by default): an onset task's own window at its prediction time, when the task's
horizon is one of the head's. Its query state is the one `HealthFM.embed` returns, so the score is
read from the same forward pass as the probes' features. `next_visit` predicts the codes of the
next visit with no time attached: rolling it forward to a horizon would need a model of when the
visits happen, which no head has, so it gives no probability within a horizon.

The score of a row is P(any of the task's codes in the window) = 1 - prod_c (1 - p_c) over the
vocabulary codes the task's outcome predicate matches (`outcome_code_ids`; independent codes,
noisy-OR; one code on the synthetic sites), reported as its logit (`ZeroShotScorer`: ranks without
float rounding near 0 or 1) or its probability (`probabilities`). The head is trained with a
balanced BCE (positives and negatives averaged apart), which shifts every logit of a horizon by
about log(negatives / positives): the probabilities rank rows as the head does but are not
calibrated; AUROC is what they are scored on here.

Nothing here reads a label: a site can score rows it has no labels for (client.py predict
--zero-shot). `zero_shot_rows` scores an EvalSet's held_out rows beside the probes (eval/runner.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from healthfm_core.data.labels.aces_tasks import AcesTask
from healthfm_core.data.labels.tasks import OnsetTask, Task
from healthfm_core.data.sequences.batch import N_SPECIAL_CODES, Batch
from healthfm_core.eval.probes import binary_row
from healthfm_core.eval.runner import EvalSet, MethodResult, method_features, task_display
from healthfm_core.model.healthfm import HealthFM

FUTURE_CODES_HEAD = "ehr_future_codes"
_OR = re.compile(r"^\s*or\((?P<args>.*)\)\s*$")
# ACES predicate fields that constrain something other than the code (a value, another column):
# the head predicts codes only, so a task that needs them has no zero-shot score.
_CODE_ONLY = {"code"}


class NoZeroShot(ValueError):
    """A task the model's head cannot score (no such horizon, no matching code, a predicate on
    values); the message says which and why."""


class NoOutcomeCode(NoZeroShot):
    """A task whose outcome codes are none of the model's vocabulary: the message names the task
    and the codes (or patterns) its outcome looks for."""


# ---------------------------------------------------------------- the task's codes


def _label_predicate(task: AcesTask) -> str:
    """The name of the predicate the task's horizon window labels with."""
    windows = task.config.get("windows") or {}
    name = task.metadata.horizon_window
    if name is None:
        raise NoZeroShot(f"task {task.name!r} has no horizons (its own windows): no window the head predicts")
    label = (windows.get(name) or {}).get("label")
    if not isinstance(label, str):
        raise NoZeroShot(f"task {task.name!r}: window {name!r} has no label predicate")
    return label


def _code_matchers(task: AcesTask, predicate: str, seen: frozenset[str] = frozenset()) -> list[re.Pattern[str]]:
    """Regexes whose search over a code string says the predicate holds for an event of that code:
    `code: X` (exactly X), `code: {regex: R}` (ACES searches R), `code: {any: [..]}`, and
    `expr: or(a, b, ..)` of those (`_describe` gives each back as the task file spells it)."""
    predicates = task.config.get("predicates") or {}
    if predicate in seen:
        raise NoZeroShot(f"task {task.name!r}: predicate {predicate!r} refers to itself")
    spec = predicates.get(predicate)
    if not isinstance(spec, Mapping):
        raise NoZeroShot(f"task {task.name!r}: no predicate {predicate!r}")
    if "expr" in spec:
        m = _OR.match(str(spec["expr"]))
        if m is None:
            raise NoZeroShot(
                f"task {task.name!r}: predicate {predicate!r} is {spec['expr']!r}: only or(...) of code predicates "
                "has a zero-shot score"
            )
        out: list[re.Pattern[str]] = []
        for arg in m["args"].split(","):
            out += _code_matchers(task, arg.strip(), seen | {predicate})
        return out
    if extra := sorted(set(spec) - _CODE_ONLY):
        raise NoZeroShot(
            f"task {task.name!r}: predicate {predicate!r} also constrains {extra}: the head predicts codes, not values"
        )
    code = spec.get("code")
    if isinstance(code, str):
        return [re.compile(f"^{re.escape(code)}$")]
    if isinstance(code, Mapping) and isinstance(code.get("regex"), str):
        return [re.compile(code["regex"])]
    if isinstance(code, Mapping) and isinstance(code.get("any"), list):
        return [re.compile(f"^{re.escape(str(c))}$") for c in code["any"]]
    raise NoZeroShot(f"task {task.name!r}: predicate {predicate!r} has code {code!r}: not a code, regex or any-list")


_EXACT = re.compile(r"^\^(?P<code>.*)\$$")


def _describe(matcher: re.Pattern[str]) -> str:
    """A matcher as the task file spells it: the code itself (`code: X`, `any`), else `regex R`."""
    m = _EXACT.match(matcher.pattern)
    if m is not None and re.escape(code := re.sub(r"\\(.)", r"\1", m["code"])) == m["code"]:
        return code
    return f"regex {matcher.pattern}"


def outcome_code_ids(task: Task, vocabulary_codes: Sequence[str]) -> list[int]:
    """The ids (vocabulary position + N_SPECIAL_CODES, as the head's outputs) of every vocabulary
    code the task's outcome matches: an ACES task's label predicate (`AcesOnsetTask.aces`), or an
    event-table task's `outcome_code_prefix`. NoZeroShot when none does."""
    aces = getattr(task, "aces", None)
    if isinstance(aces, AcesTask):
        matchers = _code_matchers(aces, _label_predicate(aces))
        ids = [N_SPECIAL_CODES + i for i, c in enumerate(vocabulary_codes) if any(m.search(c) for m in matchers)]
        wanted = ", ".join(_describe(m) for m in matchers)
    elif isinstance(task, OnsetTask):
        ids = [N_SPECIAL_CODES + i for i, c in enumerate(vocabulary_codes) if c.startswith(task.outcome_code_prefix)]
        wanted = f"codes starting {task.outcome_code_prefix}"
    else:
        raise NoZeroShot(f"task {task.name!r} is not an onset task")
    if not ids:
        raise NoOutcomeCode(
            f"task {task.name!r}: its outcome code ({wanted}) is not in the model's vocabulary "
            f"({len(vocabulary_codes)} codes): the head has no output for it"
        )
    return ids


def horizon_index(model: HealthFM, horizon_days: float) -> int:
    """The future_codes head's output for this horizon; NoZeroShot when the head has none."""
    horizons = [float(h) for h in model.cfg.pretraining.future_horizons_days]
    for i, h in enumerate(horizons):
        if math.isclose(h, float(horizon_days), abs_tol=1e-6):
            return i
    raise NoZeroShot(f"the future_codes head predicts windows of {horizons} days, not {float(horizon_days):g}")


@dataclass(frozen=True)
class ZeroShotColumn:
    """One score: the head's window `horizon` (index), over the code ids `codes`."""

    key: str
    horizon: int
    codes: tuple[int, ...]


def zero_shot_columns(
    model: HealthFM, tasks: Mapping[str, Task], vocabulary_codes: Sequence[str], strict_codes: bool = False
) -> tuple[list[ZeroShotColumn], dict[str, str]]:
    """(a column per task the head can score, {task key: why not} for the others);
    `strict_codes`: a task whose outcome codes are not in the vocabulary raises NoOutcomeCode
    (a site that asked for that task by name) instead of being skipped."""
    columns, skipped = [], {}
    for key, task in tasks.items():
        if not isinstance(task, OnsetTask):
            continue
        try:
            columns.append(
                ZeroShotColumn(
                    key, horizon_index(model, task.horizon_days), tuple(outcome_code_ids(task, vocabulary_codes))
                )
            )
        except NoZeroShot as err:
            if strict_codes and isinstance(err, NoOutcomeCode):
                raise
            skipped[key] = str(err)
    return columns, skipped


# ---------------------------------------------------------------- scoring rows


class ZeroShotScorer(torch.nn.Module):
    """A model whose `embed_at` gives, per query, the logit of P(any of a column's codes in its
    window) for each column: [B, Q, columns]. A QueryEmbedder, so embed_rows serves a subject's
    rows in shared passes exactly as it embeds them for the probes."""

    codes: Tensor  # buffers (register_buffer in __init__): [columns, width] code ids, which are used,
    used: Tensor
    horizons: Tensor  # [columns] the head's window of each column

    def __init__(self, model: HealthFM, columns: Sequence[ZeroShotColumn]) -> None:
        super().__init__()
        if not columns:
            raise NoZeroShot("no task to score")
        if FUTURE_CODES_HEAD not in model.heads:
            raise NoZeroShot(f"the model has no {FUTURE_CODES_HEAD} head")
        self.model = model
        width = max(len(c.codes) for c in columns)
        codes = torch.zeros(len(columns), width, dtype=torch.long)
        used = torch.zeros(len(columns), width, dtype=torch.bool)
        for i, c in enumerate(columns):
            codes[i, : len(c.codes)] = torch.tensor(c.codes)
            used[i, : len(c.codes)] = True
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("used", used, persistent=False)
        self.register_buffer("horizons", torch.tensor([c.horizon for c in columns]), persistent=False)

    def embed(self, batch: Batch) -> Tensor:
        return self.embed_at(batch, batch.prediction_time.float()[:, None])[:, 0]

    def embed_at(self, batch: Batch, query_time: Tensor) -> Tensor:
        out = self.model(batch, query_time=query_time)
        logits = self.model.heads[FUTURE_CODES_HEAD](out.queries.flatten(0, 1)).float()  # [B*Q, H, V]
        picked = logits[:, self.horizons[:, None], self.codes]  # [B*Q, columns, width]
        # log P(none) = sum_c log(1 - p_c) = -sum_c softplus(logit_c); the any-code logit is
        # log(1 - P(none)) - log P(none), which for one code is its own logit.
        log_none = -(torch.nn.functional.softplus(picked) * self.used).sum(-1)
        score = torch.log((-torch.expm1(log_none)).clamp_min(1e-30)) - log_none
        return score.unflatten(0, query_time.shape)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """The scorer's logits as probabilities (float64)."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def zero_shot_rows(
    method: str,
    data: EvalSet,
    model: HealthFM,
    vocabulary_codes: Sequence[str],
    tasks: Iterable[str] | None = None,
    split: str = "held_out",
    max_events: int = 64,
    max_patches: int = 24,
    batch_size: int = 128,
    n_boot: int = 200,
    seed: int = 0,
) -> MethodResult:
    """Every onset task's zero-shot score on the EvalSet's `split` rows (held_out: the rows the
    probes are scored on), one forward pass per group of a subject's rows for all tasks at once;
    AUROC with a subject-bootstrap interval per task, as runner.evaluate_method reports a probe."""
    keys = list(data.tasks if tasks is None else tasks)
    columns, skipped = zero_shot_columns(model, {k: data.tasks[k] for k in keys}, vocabulary_codes)
    out = MethodResult(skipped=dict(skipped))
    if not columns:
        return out
    scorer = ZeroShotScorer(model, columns)
    labels = {c.key: data.labels(c.key) for c in columns}
    split_all = data.column("split")
    wanted = np.zeros(len(data), bool)
    for y in labels.values():
        wanted |= np.isfinite(y) & (split_all == split)
    rows = np.flatnonzero(wanted)
    if len(rows) == 0:
        out.skipped.update({c.key: f"no {split} rows" for c in columns})
        return out
    # Every site's rows in shared passes, as the probes' features are computed.
    logits = np.full((len(data), len(columns)), np.nan)
    logits[rows] = method_features(
        data, scorer, rows=rows, max_events=max_events, max_patches=max_patches, batch_size=batch_size
    ).x
    subject = data.subject_keys()
    for j, c in enumerate(columns):
        pos = np.flatnonzero(np.isfinite(labels[c.key]) & (split_all == split))
        y = labels[c.key][pos].astype(bool)
        if y.all() or not y.any():
            out.skipped[c.key] = f"{int(y.sum())} positives among {len(y)} {split} rows"
            continue
        p = probabilities(logits[pos, j])
        name, horizon = task_display(data.tasks[c.key])
        out.rows.append(binary_row(method, name, horizon, y, p, n_boot, seed, subject[pos]))
        out.predictions[c.key] = (y, p)
        out.scored_rows[c.key] = pos
    return out


__all__ = [
    "FUTURE_CODES_HEAD",
    "NoOutcomeCode",
    "NoZeroShot",
    "ZeroShotColumn",
    "ZeroShotScorer",
    "horizon_index",
    "outcome_code_ids",
    "probabilities",
    "zero_shot_columns",
    "zero_shot_rows",
]
