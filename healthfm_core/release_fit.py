"""Whether a site's data fits a model release: its modalities, its codes, its PRS traits.

A site's codes outside the release's vocabulary are read as the unknown code (as in the
federation, where rare codes never entered the vocabulary): a few are normal, but a site whose
rows are mostly unknown codes (another coding system, another export) would get embeddings of
almost nothing. `release_fit` counts them; `require_fit` refuses a site with a modality the model
lacks or more than `max_unknown_share` of its EHR rows in unknown codes, naming the top codes and
their share of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from healthfm_core.data.files.layout import PRS_PREFIX
from healthfm_core.data.sites.site import Site
from healthfm_core.protocol import FederationSetup

DEFAULT_MAX_UNKNOWN_SHARE = 0.5
TOP_UNKNOWN = 5


class SiteDoesNotFit(ValueError):
    """The site's data does not fit the release (the message says what and how much)."""


@dataclass
class ReleaseFit:
    rows: int  # the site's EHR rows (PRS rows excluded)
    unknown_rows: int  # of them, rows whose code is not in the vocabulary
    top_unknown: list[tuple[str, int]]  # the most frequent unknown codes and their rows
    missing_modalities: list[str]  # the site has them, the model does not
    unknown_traits: list[str]  # the site's PRS traits the vocabulary lacks (their rows are ignored)

    @property
    def unknown_share(self) -> float:
        return self.unknown_rows / self.rows if self.rows else 0.0

    def describe_unknown(self) -> str:
        top = ", ".join(f"{code} ({n / max(self.rows, 1):.1%})" for code, n in self.top_unknown)
        return (
            f"{self.unknown_rows} of {self.rows} EHR rows ({self.unknown_share:.1%}) have codes outside the "
            f"release's vocabulary" + (f"; most frequent: {top}" if top else "")
        )


def release_fit(site: Site, setup: FederationSetup) -> ReleaseFit:
    """Count the site's rows the release cannot read (one pass over the site's codes)."""
    counts: dict[str, int] = {}
    for shard in site.iter_event_shards(columns=["code"]):
        vc = pc.value_counts(shard["code"].cast(pa.string()))
        for code, n in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
            counts[code] = counts.get(code, 0) + int(n)
    known = set(setup.vocabulary.codes)
    traits = set(setup.vocabulary.prs_traits)
    ehr = {c: n for c, n in counts.items() if c is not None and not c.startswith(PRS_PREFIX)}
    unknown = {c: n for c, n in ehr.items() if c not in known}
    order = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
    site_traits = sorted(c.removeprefix(PRS_PREFIX) for c in counts if c is not None and c.startswith(PRS_PREFIX))
    carried = [m for m in site.modalities if m != "genomics" or setup.vocabulary.n_prs_traits > 0]
    return ReleaseFit(
        rows=int(np.sum(list(ehr.values()), dtype=np.int64)) if ehr else 0,
        unknown_rows=int(sum(unknown.values())),
        top_unknown=order[:TOP_UNKNOWN],
        missing_modalities=[m for m in carried if m not in setup.modalities],
        unknown_traits=[t for t in site_traits if t not in traits],
    )


def require_fit(
    site: Site, setup: FederationSetup, max_unknown_share: float = DEFAULT_MAX_UNKNOWN_SHARE, where: str = "site"
) -> ReleaseFit:
    """release_fit, refused (SiteDoesNotFit) when the site has a modality the model lacks or too
    many rows in unknown codes."""
    fit = release_fit(site, setup)
    if fit.missing_modalities:
        raise SiteDoesNotFit(
            f"{where}: has {fit.missing_modalities}, which the release's model (modalities {setup.modalities}) "
            "was not trained with"
        )
    if fit.rows and fit.unknown_share > max_unknown_share:
        raise SiteDoesNotFit(
            f"{where}: {fit.describe_unknown()}: above the allowed {max_unknown_share:.0%} (another coding "
            "system or export than the federation's?)"
        )
    return fit


__all__ = ["DEFAULT_MAX_UNKNOWN_SHARE", "ReleaseFit", "SiteDoesNotFit", "release_fit", "require_fit"]
