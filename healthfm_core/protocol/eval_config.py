"""evaluate: the evaluation's config the server sends each site (ConfigRecord CONFIG_RECORD),
with the grid of the score histograms it asks for."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, StrictBool, ValidationError, ValidationInfo, field_validator

from healthfm_core.data.labels.task_spec import TaskSpec, resolve_tasks, task_keys
from healthfm_core.data.labels.tasks import HELD_OUT_ROWS_PER_SUBJECT
from healthfm_core.protocol.wire import StrictMessage, flat_fields, unflat_fields
from healthfm_core.strict_files import StrictFileError, strict_json

# The score histograms' grid (the binning itself: healthfm_core/eval/score_histogram.py).
ScoreScale = Literal["logit", "probability"]
SCORE_SCALES: tuple[ScoreScale, ...] = ("logit", "probability")
DEFAULT_SCORE_BINS = 50  # on the logit: binning costs <= 0.03 AUROC at 500 positives a site (docs/coordinator.md)
MAX_SCORE_BINS = 1000


class EvalConfig(StrictMessage):
    """The evaluate message's config: which tasks (their definitions: `TaskSpec`, the ACES text
    itself, so a site needs none of the server's files), how to build samples, the probe's
    bootstrap. Built in Python, `tasks` may also hold names (resolved by
    healthfm_core.data.labels.task_spec.resolve_tasks, here); from a peer (`from_flat`) only definitions."""

    round: int = Field(ge=0)
    tasks: list[TaskSpec] = Field(max_length=64)
    setup_sha256: str
    batch_size: int = Field(default=64, gt=0)
    max_events: int = Field(default=256, gt=0)
    max_patches: int = Field(default=32, gt=0)
    n_boot: int = Field(default=100, ge=10)
    # At most this many of a subject's ACES rows per task key in the train and tuning splits (what
    # probes are fitted and tuned on), or "all"; held_out is scored on every labelled row (MEDS-DEV's way).
    n_per_subject: Annotated[int, Field(ge=1, le=64)] | Literal["all"] = 4
    # ... and at most this many of a held-out subject's rows per task key (drawn the same way): a
    # cap honest data does not reach (healthfm_core/data/labels/tasks.py), that bounds the rows
    # an evaluate reply may claim, times its subjects (server/eval_counts.py).
    held_out_rows_per_subject: int = Field(default=HELD_OUT_ROWS_PER_SUBJECT, ge=1, le=1_000_000)
    seed: int = 0  # also the key of the subject sample's hash (healthfm_core/eval/subject_sample.py)
    # Per task and split, score (and fit the probe on) every row of at most this many subjects, a
    # fixed keyed-hash sample (0: every subject): the federation's eval_max_subjects.
    max_subjects: int = Field(default=0, ge=0)
    # Also fit and score MEDS-Tab (healthfm_core/eval/meds_tab.py) on each binary task's rows: the
    # federation's eval_meds_tab (it costs a site more than the probe).
    meds_tab: StrictBool = True
    # Per binary task, each site also releases its held-out scores' histogram per class on this
    # grid, small cells merged (healthfm_core/eval/score_histogram.py): the federation-wide
    # AUROC's input (healthfm_core/eval/pooled_auroc.py). 0: no histograms.
    score_bins: int = Field(default=DEFAULT_SCORE_BINS, ge=0, le=MAX_SCORE_BINS)
    score_scale: ScoreScale = "logit"

    if TYPE_CHECKING:  # what a Python caller may pass: task names as well (``_names`` resolves them)

        def __init__(self, *, tasks: Sequence[TaskSpec | str], **data: Any) -> None: ...

    @field_validator("tasks", mode="before")
    @classmethod
    def _names(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, list) and any(isinstance(t, str) for t in v):
            if (info.context or {}).get("peer"):
                raise ValueError("a task must be a definition (name, kind, aces_yaml, horizons_days), not a name")
            specs = [t for t in v if not isinstance(t, str)]
            return specs + resolve_tasks([t for t in v if isinstance(t, str)])
        return v

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        keys = task_keys(v)
        if len(set(keys)) != len(keys):
            raise ValueError(f"repeated task key among {keys}")
        return v

    def to_flat(self) -> dict[str, Any]:
        out = flat_fields(self, exclude={"tasks"})
        out["tasks"] = json.dumps([t.model_dump() for t in self.tasks])  # a ConfigRecord holds strings, not objects
        return out

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> EvalConfig:
        data = unflat_fields(record, list(cls.model_fields))
        tasks = data.get("tasks")
        if not isinstance(tasks, str):
            raise ValueError(f"evaluate config: field tasks: value {str(tasks)[:80]!r}: expected a JSON list of tasks")
        try:
            data["tasks"] = strict_json(tasks, "evaluate config: field tasks")
        except StrictFileError as err:
            raise ValueError(f"evaluate config: field tasks: not JSON: {err}") from None
        try:
            return cls.model_validate(data, context={"peer": True})
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            raise ValueError(
                f"evaluate config: field {loc}: value {repr(first.get('input'))[:80]}: {first.get('msg')}"
            ) from None
