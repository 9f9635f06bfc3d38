"""One site's share of a figure pooled across sites, capped: no site sets a federation's number.

A figure pooled over sites weighs each site by counts the site claims (an n-weighted mean of the
sites' metrics weighs each by its held-out rows; the pooled AUROC by its positives and its
negatives). The server bounds each claim (server/eval_counts.py), but a bound a site's own
declarations set is loose; so in every pooled figure site i weighs

    w_i = min(c_i, SHARE_CAP_FACTOR x median_{j != i} c_j)

c_i its claimed count (rows; in the pooled AUROC each class's rows, capped separately). A site
whose count is at most SHARE_CAP_FACTOR (2) times the median of the other sites' keeps its
weight: a federation of similar sites gets exactly the uncapped figure. Whatever count one site
claims, it weighs at most 2 m (m the others' median), so among k sites its share of the weights
is at most

    F / (F + floor((k + 1) / 2))   (the others' counts add up to at least floor((k + 1) / 2) m)
    F / (F + k - 1)                (the others all count m: sites of equal size)

with F = SHARE_CAP_FACTOR: k = 2: 2/3; k = 3: 1/2; k = 4: 1/2 (2/5 with equal others); k = 5:
2/5 (1/3). An n-weighted mean of values in [0, 1] is then (1 - s) a + s v (a the other sites'
mean at their weights in it, v the site's value, s its share): between (1 - s) a and
(1 - s) a + s; the pooled AUROC (1 - q) t + q x (t the others' pooled AUROC at their weights in
it, x in [0, 1], q = 1 - (1 - s_pos)(1 - s_neg) the share of the positive-negative pairs that
involve the site, s its share of each class), q at most 3/4 among three sites. The bound is a
share, not a tolerance: the robust summary beside every pooled figure is the median over sites
(each site once, whatever it claims), and the per-site table is beside it too. One site alone
is not capped (no others: the figure is that site's). Half the sites or more claiming together
are not bounded by this rule.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SHARE_CAP_FACTOR = 2.0
SHARE_CAP_RULE = (
    f"a site weighs at most {SHARE_CAP_FACTOR:g} x the median of the other sites' rows "
    "(each class's rows in the pooled AUROC)"
)


def capped_weights(counts: Mapping[str, float], factor: float = SHARE_CAP_FACTOR) -> dict[str, float]:
    """Each site's weight in a pooled figure: its claimed count, at most `factor` x the median of
    the other sites' (the module docstring). One site: its count."""
    if len(counts) < 2:
        return {site: float(c) for site, c in counts.items()}
    out: dict[str, float] = {}
    for site, c in counts.items():
        others = [float(v) for s, v in counts.items() if s != site]
        out[site] = min(float(c), factor * float(np.median(others)))
    return out


def worst_share(sites: int, factor: float = SHARE_CAP_FACTOR) -> float:
    """The largest share of a pooled figure's weights one of `sites` sites can take, whatever it
    claims (the module docstring; 1 for a site alone)."""
    if sites < 2:
        return 1.0
    return factor / (factor + (sites + 1) // 2)


__all__ = ["SHARE_CAP_FACTOR", "SHARE_CAP_RULE", "capped_weights", "worst_share"]
