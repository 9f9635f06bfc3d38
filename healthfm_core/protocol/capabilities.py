"""query.capabilities: what a site says of itself in round 0 (aggregate counts only), and the
parameter groups its modalities give it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, field_validator

from healthfm_core.model.groups import GROUPS
from healthfm_core.protocol.wire import StrictMessage

MODALITY_GROUP = {"ehr": "ehr", "wearables": "wearables", "genomics": "genomics"}


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
    subjects: dict[str, int] = Field(default_factory=dict)  # per modality
    # Timed event rows plus wearable epochs: the most prediction times any task can have here, so
    # the bound on an evaluate reply's held-out rows, scored every one (server/eval_counts.py).
    rows: int = Field(default=0, ge=0)

    @field_validator("modalities")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        groups_for_modalities(v)
        return v

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
