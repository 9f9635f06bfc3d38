"""The task head's replies bounded, as a pretraining round's are (server/influence.py): what a
site's stats, smoothness, head updates and tuning replies may claim, from what the site declared
and what the server asked. server/head_app.py (FlowerSites) applies them; each rejection is
named in the head's record (heads.json `rejected`, head_rounds.jsonl).

- Stats (query.head_stats): train rows n plus tuning rows n_tuning at most the rows the site can
  hold by what it declared at the release's setup: n_per_subject (the release's evaluation) x its
  subjects (the model card's, per modality, summed; a count shown as "<m" counts as m - 1). A
  site the card does not name declared nothing: rejected. Per feature, total^2 <= n x squares
  (Cauchy-Schwarz: sums no real rows can have are not pooled).
- Smoothness (query.head_setup): the mean squared norm of a site's rows under the pooled
  standardisation is at most width x N / n (the pooled rows have unit variance per feature, so
  all N rows' squared norms add up to at most width x N, and the site's n rows to no more).
- Updates (train.head): the count is the stats' n; every value finite and within the strategy's
  magnitude limit; a reply that claims DP (an epsilon) in a run that did not ask for DP is
  rejected and the site takes no further part (a DP claim does not lift the step bound); the
  update's norm ||(w', b') - (w, b)|| within
    - the step bound (without DP): `steps` gradient steps of size lr, each moving the head by at
      most lr x (G + 2 penalty ||w_t||), G = sqrt(s + 1), s the site's smoothness (its
      standardised rows' mean squared norm bounds the mean log-loss gradient's norm, the bias's
      is at most 1) and ||w_t|| <= ||w|| + t lr G: exact, no factor;
    - the DP step bound (DP asked): the same steps with G the most one DP-SGD step's gradient
      can be (healthfm_core/privacy/head.py: clipped per-subject gradients summed, Gaussian noise
      of std sigma C added, divided by the expected batch B = min(batch, S)): G = (C k + sigma C
      (sqrt(width + 1) + sqrt(2 L))) / B, sigma the most noise the run accepts
      (dp_max_noise_multiplier, sent with the request: a site whose policy needs more refuses),
      C the clipping norm asked, S the train subjects of its stats, k the Poisson batch's
      Bernstein bound mu + sqrt(2 mu L) + 2 L / 3 (at most S), L = ln(2 steps / DP_TAIL). An
      honest DP site's update is over it with probability at most DP_TAIL a round (its noise
      norm past sqrt(m) + sqrt(2L): exp(-L); its batch past k: exp(-L); a union over the steps);
    - the strategy's history and outlier bounds (ModalityAwareFedAvg.bound_updates, unchanged:
      10 x the median of the last 5 rounds' accepted norms, 10 x the median of the others' with
      two or more others), over the rounds of one C (a new C starts a new history: its first
      updates are larger than the last C's converged ones).
  A rejected update is left out of that round (as in pretraining); the site stays in the head.
- Tuning (evaluate.head): the count is the stats' n_tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from healthfm_core.protocol.head import HeadStats

# Float rounding between the site's arithmetic and the server's bound (relative).
_ROUNDING = 1e-6
# The most often an honest DP site's update may exceed the DP step bound, per round.
DP_TAIL = 1e-12


def card_count(value: Any) -> int:
    """A subject count as the model card shows it: the number, or "<m" (below the minimum) as m - 1."""
    if isinstance(value, bool):
        raise ValueError(f"subject count {value!r} is not a count")
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, str) and value.startswith("<") and value[1:].isdigit():
        return max(0, int(value[1:]) - 1)
    raise ValueError(f"subject count {value!r} is neither a count nor '<minimum'")


def declared_head_rows(card: Mapping[str, Any], n_per_subject: int | str) -> dict[str, int]:
    """Per site of the release's model card, the most rows it can hold: n_per_subject x its
    declared subjects (ValueError naming the site and the value the card does not parse). A
    release whose evaluation kept every row ("all") gives no such bound: refused (fails closed)."""
    if not isinstance(n_per_subject, int):
        raise ValueError(
            f"field evaluation.n_per_subject: value {n_per_subject!r}: a head's train and tuning rows have no "
            "per-subject bound, so a site's counts cannot be checked; release a run evaluated with a number"
        )
    out: dict[str, int] = {}
    for site, entry in dict(card.get("sites") or {}).items():
        try:
            subjects = sum(card_count(v) for v in dict(entry.get("subjects") or {}).values())
        except (ValueError, AttributeError) as err:
            raise ValueError(f"model card: site {site!r}: field subjects: {err}") from None
        out[str(site)] = n_per_subject * subjects
    return out


def stats_problem(stats: HeadStats, declared_rows: Mapping[str, int] | None) -> str | None:
    """Why a stats reply cannot be the site's rows (the module docstring), or None."""
    if declared_rows is not None:
        if stats.site not in declared_rows:
            return f"site {stats.site!r} declared no subject count at the release's setup (not in its model card)"
        limit = declared_rows[stats.site]
        if stats.n + stats.n_tuning > limit:
            return (
                f"field n + n-tuning: value {stats.n + stats.n_tuning:,} > {limit:,}, the rows it can hold "
                "(n_per_subject x the subjects it declared at the release's setup)"
            )
    total, squares = np.asarray(stats.total), np.asarray(stats.squares)
    over = total**2 > stats.n * squares * (1 + _ROUNDING) + 1e-12
    if over.any():
        j = int(np.argmax(over))
        return f"field total.{j}: value {total[j]:.6g}: its square exceeds n {stats.n} x squares.{j} {squares[j]:.6g} (no rows sum so)"  # fmt: skip
    return None


def smoothness_bound(width: int, n_total: int, n_site: int) -> float:
    """The largest mean squared norm a site's standardised train rows can have (module docstring)."""
    return width * n_total / n_site * (1 + _ROUNDING) + 1e-9


def step_bound(smoothness: float, steps: int, lr: float, penalty: float, weight_norm: float) -> float:
    """The most `steps` gradient steps of size `lr` move a head from weights of norm
    `weight_norm` on a site of `smoothness` (module docstring; without DP)."""
    return _steps_bound(math.sqrt(smoothness + 1.0), steps, lr, penalty, weight_norm)


def dp_step_bound(
    width: int,
    steps: int,
    lr: float,
    penalty: float,
    weight_norm: float,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    subjects: int,
) -> float:
    """The most `steps` DP-SGD steps move a head of `width` values (and a bias) at a site of
    `subjects` train subjects, but with probability DP_TAIL (module docstring)."""
    tail = math.log(2 * steps / DP_TAIL)
    expected = min(float(batch_size), float(subjects))
    batch = max(1, round(expected))  # what the DP optimizer divides by (engine.DPLocalStep)
    sampled = float(subjects) if batch_size >= subjects else min(subjects, expected + math.sqrt(2 * expected * tail) + 2 * tail / 3)  # fmt: skip
    noise = noise_multiplier * max_grad_norm * (math.sqrt(width + 1.0) + math.sqrt(2 * tail))
    return _steps_bound((max_grad_norm * sampled + noise) / batch, steps, lr, penalty, weight_norm)


def _steps_bound(gradient: float, steps: int, lr: float, penalty: float, weight_norm: float) -> float:
    """The most `steps` steps of size `lr` move a head from weights of norm `weight_norm` when
    each step's gradient has norm at most `gradient` (and the penalty's decay)."""
    growth = max(1.0, abs(1.0 - 2.0 * lr * penalty)) ** steps  # the decay's factor a step, when lr overshoots
    drift = growth * (weight_norm + steps * lr * gradient)
    return steps * lr * (gradient + 2.0 * penalty * drift) * (1 + _ROUNDING) + 1e-12


__all__ = [
    "DP_TAIL",
    "card_count",
    "declared_head_rows",
    "dp_step_bound",
    "smoothness_bound",
    "stats_problem",
    "step_bound",
]
