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
  magnitude limit; the update's norm ||(w', b') - (w, b)|| within
    - the step bound (without DP): `steps` gradient steps of size lr, each moving the head by at
      most lr x (sqrt(s + 1) + 2 penalty ||w_t||), s the site's smoothness (its standardised rows'
      mean squared norm bounds the mean log-loss gradient's norm, the bias's is at most 1) and
      ||w_t|| <= ||w|| + t lr sqrt(s + 1): exact, no factor. A DP round's noise is the site's (its
      policy may raise it): no step bound there;
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
    gradient = math.sqrt(smoothness + 1.0)
    growth = max(1.0, abs(1.0 - 2.0 * lr * penalty)) ** steps  # the decay's factor a step, when lr overshoots
    drift = growth * (weight_norm + steps * lr * gradient)
    return steps * lr * (gradient + 2.0 * penalty * drift) * (1 + _ROUNDING) + 1e-12


__all__ = ["card_count", "declared_head_rows", "smoothness_bound", "stats_problem", "step_bound"]
