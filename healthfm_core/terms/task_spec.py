"""A task as the server sends it to the sites (`TaskSpec`), its evaluation keys, and the names and
caps the evaluate message shares with the site's label code.

A `TaskSpec` is one of
- `aces`: the text of an ACES task file (configs/tasks/*.yaml, healthfm_core.data.labels.aces_tasks) and
  its horizons; evaluated at each site under one key per horizon, `<name>_<h>d`; a task without
  horizons (a MEDS-DEV task, any plain ACES file) has no horizons_days and one key, `<name>`;
- `site`: a task whose labels each site supplies itself (SITE_ROOT/tasks/<name>/, MEDS
  LabelSchema, healthfm_core.data.labels.site_labels); key `<name>`;
- `wearable`: one of the built-in wearable regression tasks (WEARABLE_TASKS; their labels:
  healthfm_core.data.labels.tasks); key `<name>`.

A TaskSpec is data: the site never needs the server's files (the ACES text travels in the message),
and it is a peer's input there (names restricted to a safe alphabet, sizes bounded; the ACES text
is parsed and checked by ACES at the site before use: healthfm_core.data.labels.task_spec.aces_task).
What a user writes is turned into specs by the caller that reads it, never here
(healthfm_core.data.labels.task_spec.resolve_tasks).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TASK_NAME = r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$"  # also a file name and a metric-key prefix: no dots, no slashes
MAX_ACES_BYTES = 64 * 1024
# The key of the one label table of a task without horizons (its own windows decide everything).
OWN_WINDOWS = 0
# The built-in wearable regression tasks: name -> what its label measures (data/labels/tasks.py).
WearableTarget = Literal["resting_hr", "mean_enmo"]
WEARABLE_TASKS: dict[str, WearableTarget] = {"wearable_resting_hr": "resting_hr", "wearable_mean_enmo": "mean_enmo"}

# At most this many of a held-out subject's rows per task key are scored (EvalConfig's
# held_out_rows_per_subject), drawn as n_per_subject's rows are. Far above any subject we know:
# at most 466 rows of one task key on the generated sites (the hospital scenario at full size,
# 1,500 subjects a site, whose onset tasks ask at every clinical event), at most 8 timed events a
# subject on the MEDS sample datasets (tests/unit/test_held_out_cap.py), so an honest site scores
# every labelled row as MEDS-DEV does; it bounds the rows an evaluate reply may claim
# (server/eval_counts.py).
HELD_OUT_ROWS_PER_SUBJECT = 1024

Horizon = Annotated[int, Field(ge=1, le=36500)]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=TASK_NAME)
    kind: Literal["aces", "site", "wearable"] = "aces"
    aces_yaml: str | None = Field(default=None, max_length=MAX_ACES_BYTES)
    horizons_days: list[Horizon] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.kind == "aces":
            if not self.aces_yaml:
                raise ValueError(f"task {self.name!r}: an ACES task needs aces_yaml")
            if len(set(self.horizons_days)) != len(self.horizons_days):
                raise ValueError(
                    f"task {self.name!r}: field horizons_days: value {self.horizons_days}: repeated horizon"
                )
        elif self.aces_yaml is not None or self.horizons_days:
            raise ValueError(f"task {self.name!r}: a {self.kind} task carries no aces_yaml or horizons_days")
        if self.kind == "wearable" and self.name not in WEARABLE_TASKS:
            raise ValueError(f"task {self.name!r}: not a wearable task (known: {sorted(WEARABLE_TASKS)})")
        return self

    def keys(self) -> list[str]:
        """The evaluation keys of the task: one per horizon for ACES tasks with horizons."""
        if self.kind == "aces" and self.horizons_days:
            return [horizon_key(self.name, h) for h in self.horizons_days]
        return [self.name]


def horizon_key(name: str, horizon_days: int) -> str:
    """`<name>_<h>d`; the task's bare name for OWN_WINDOWS (a task without horizons)."""
    return name if int(horizon_days) == OWN_WINDOWS else f"{name}_{int(horizon_days)}d"


def task_keys(specs: Iterable[TaskSpec]) -> list[str]:
    return [k for s in specs for k in s.keys()]


__all__ = [
    "HELD_OUT_ROWS_PER_SUBJECT",
    "MAX_ACES_BYTES",
    "OWN_WINDOWS",
    "TASK_NAME",
    "WEARABLE_TASKS",
    "Horizon",
    "TaskSpec",
    "WearableTarget",
    "horizon_key",
    "task_keys",
]
