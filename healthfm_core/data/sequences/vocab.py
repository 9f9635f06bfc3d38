"""Agreeing the federation's shared vocabulary and numeric normalisation from merged site statistics.

`build_vocabulary` merges the sites' `SiteCodeStats` (healthfm_core.data.sequences.code_stats; aggregates
only, already suppressed at each site) and agrees on code ids and normalisation: the resulting
`Vocabulary` (healthfm_core/terms/vocabulary.py) maps codes to ids and carries the normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from healthfm_core.data.files.layout import PRS_PREFIX
from healthfm_core.data.sequences.code_stats import (
    DEFAULT_MIN_CODE_SUBJECTS,
    NumericStats,
    SiteCodeStats,
    merge_site_stats,
)
from healthfm_core.terms.vocabulary import DEFAULT_WEARABLE_NORMALIZERS, Normalizer, Vocabulary


def normalizer_from_stats(
    stats: NumericStats,
    method: Literal["robust", "standard"] = "robust",
    transform: Literal["identity", "log1p"] = "identity",
    clip: float = 5.0,
) -> Normalizer:
    """Robust: median and IQR/1.349 from the sketch (std, then 1, when the IQR is 0)."""
    std = math.sqrt(stats.variance)
    f = (lambda v: math.log1p(max(v, 0.0))) if transform == "log1p" else (lambda v: v)
    if method == "robust" and stats.sketch.count > 0:
        q25, q50, q75 = (f(v) for v in stats.sketch.quantiles([0.25, 0.5, 0.75]))
        center, scale = q50, (q75 - q25) / 1.349
    else:
        center, scale = (f(stats.mean), 0.0) if transform == "log1p" else (stats.mean, std)
    if not scale > 1e-8:
        scale = std if transform == "identity" and std > 1e-8 else 1.0
    return Normalizer(transform=transform, center=center, scale=scale, clip=clip)


def build_vocabulary(
    stats_list: Sequence[SiteCodeStats],
    min_subjects: int = DEFAULT_MIN_CODE_SUBJECTS,
    method: Literal["robust", "standard"] = "robust",
    clip: float = 5.0,
) -> Vocabulary:
    """Merge the sites' statistics and agree on ids and normalisation.

    A code enters the vocabulary when the federation-wide number of subjects reaches
    `min_subjects` (sites have already suppressed their own rare codes). Ids follow the sorted
    code strings, so every party that merges the same statistics gets the same vocabulary.
    """
    if not stats_list:
        raise ValueError("build_vocabulary needs the statistics of at least one site")
    merged = merge_site_stats(stats_list)
    kept = {c: s for c, s in merged.codes.items() if s.n_subjects >= min_subjects}
    token_codes = sorted(c for c in kept if not c.startswith(PRS_PREFIX))
    numeric = {
        c: normalizer_from_stats(code_numeric, method=method, clip=clip)
        for c in token_codes
        if (code_numeric := kept[c].numeric) is not None
    }
    traits = sorted(c[len(PRS_PREFIX) :] for c in kept if c.startswith(PRS_PREFIX))
    # PRS are z-scores already; re-standardise with the federation's moments (sites may differ).
    prs = {
        t: normalizer_from_stats(prs_numeric, method="standard", clip=clip)
        for t in traits
        if (prs_numeric := kept[PRS_PREFIX + t].numeric) is not None
    }
    wear = dict(DEFAULT_WEARABLE_NORMALIZERS)
    if merged.n_wearable_subjects >= min_subjects:
        for ch, st in merged.wearables.items():
            wear[ch] = normalizer_from_stats(
                st, method=method, transform="log1p" if ch == "enmo_mg" else "identity", clip=clip
            )
    return Vocabulary(
        min_subjects=min_subjects,
        n_sites=len(stats_list),
        codes=token_codes,
        code_subjects=[kept[c].n_subjects for c in token_codes],
        code_events=[kept[c].n_events for c in token_codes],
        numeric=numeric,
        prs_traits=traits,
        prs=prs,
        wearables=wear,
    )
