"""query.capabilities: what a site says of itself in round 0 (aggregate counts only), and the
parameter groups its modalities give it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from healthfm_core.model.groups import GROUPS
from healthfm_core.protocol.wire import StrictMessage

MODALITY_GROUP = {"ehr": "ehr", "wearables": "wearables", "genomics": "genomics"}
# The protocol's maxima on what a site declares of itself: more subjects than any health system
# holds (the largest hold ~10^8 records), and per subject more timed rows than 30 years of
# 30-second wearable epochs (~3.2 x 10^7) with a lifetime of EHR events. A declaration beyond
# them is refused at setup (the counts it would bound have no meaning).
MAX_SITE_SUBJECTS = 10**8
MAX_TIMED_ROWS_PER_SUBJECT = 2**25


def groups_for_modalities(modalities: Sequence[str]) -> list[str]:
    """The parameter groups a site with these modalities trains: shared plus one per modality."""
    unknown = [m for m in modalities if m not in MODALITY_GROUP]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {sorted(MODALITY_GROUP)}")
    wanted = {"shared"} | {MODALITY_GROUP[m] for m in modalities}
    return [g for g in GROUPS if g in wanted]


class SiteCapabilities(StrictMessage):
    """A site's answer to the capabilities query: aggregate counts only."""

    site: str = Field(min_length=1)
    modalities: list[str]
    subjects: dict[str, Annotated[int, Field(ge=0, le=MAX_SITE_SUBJECTS)]] = Field(default_factory=dict)  # per modality
    # Timed event rows plus wearable epochs: the most prediction times any task can have here, so
    # a bound on an evaluate reply's held-out rows (server/eval_counts.py); at most
    # MAX_TIMED_ROWS_PER_SUBJECT a declared subject.
    rows: int = Field(default=0, ge=0)

    @field_validator("modalities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        groups_for_modalities(v)
        return v

    @model_validator(mode="after")
    def _declared_counts(self) -> SiteCapabilities:
        if unknown := sorted(set(self.subjects) - set(MODALITY_GROUP)):
            raise ValueError(f"subjects of unknown modality {unknown[0]!r}; expected among {sorted(MODALITY_GROUP)}")
        limit = MAX_TIMED_ROWS_PER_SUBJECT * sum(self.subjects.values())
        if self.rows > limit:
            raise ValueError(
                f"rows {self.rows:,} > {limit:,}: at most {MAX_TIMED_ROWS_PER_SUBJECT:,} timed rows a subject "
                "(MAX_TIMED_ROWS_PER_SUBJECT) of the subjects it declares"
            )
        return self

    @property
    def groups(self) -> list[str]:
        return groups_for_modalities([m for m in self.modalities if self.subjects.get(m, 1) > 0])

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "modalities": list(self.modalities)}
        out.update({f"subjects.{m}": int(n) for m, n in self.subjects.items()})
        out["rows"] = int(self.rows)
        return out

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> SiteCapabilities:
        subjects = {k[len("subjects.") :]: v for k, v in record.items() if k.startswith("subjects.")}
        return cls(
            site=record.get("site", ""),
            modalities=list(record.get("modalities", [])),
            subjects=subjects,
            rows=record.get("rows", 0),
        )
