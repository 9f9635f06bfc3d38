"""Why a (site, task) has no number in an evaluate reply, with the counts that may leave a site
(small cells suppressed)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from healthfm_core.data.checks.report_floor import MIN_POSITIVES_KEY, MIN_SUBJECTS_KEY, SMALL_CELL_RISK
from healthfm_core.data.files.layout import SPLITS
from healthfm_core.protocol.wire import PeerReply

# Why a (site, task) has no number: a few fixed kinds (no free text from a site's data).
REASON_KINDS = (
    "no_labels",  # the site has no labels for the task (no SITE_ROOT/tasks/<name>/, no wearables)
    "no_rows",  # labels extracted, none at the evaluation's prediction times
    "too_few_subjects",  # a split has fewer subjects than the site's minimum
    "one_class",  # the train or held_out split has a single class
    "invalid_task",  # the task definition did not parse at the site
    "invalid_labels",  # the site's own label files fail their checks
    "too_few_positives",  # held_out has fewer positives (or negatives) than the site's min_report_positives
    # the task's rows differ from what the site released before by 1 to minimum - 1 subjects in a
    # cell of its releases: the replies' difference would describe those few (client/release_gate.py)
    "near_earlier_sample",
)
SPLIT_COUNTS = ("rows", "subjects", "positives")


SMALL_CELL = -1  # a count in 1..minimum-1: not disclosed (it would describe too few subjects)


class SplitCount(PeerReply):
    """Rows, distinct subjects and positives of one split; SMALL_CELL where the count comes
    from 1 to minimum - 1 distinct subjects (small-cell suppression, `suppressed`). The subjects
    with a positive row and with a negative row are the site's own, to suppress the counts they
    stand behind: never sent (None in a count read from a reply)."""

    rows: int = Field(ge=SMALL_CELL)
    subjects: int = Field(ge=SMALL_CELL)
    positives: int = Field(default=0, ge=SMALL_CELL)
    positive_subjects: int | None = Field(default=None, ge=0, exclude=True)
    negative_subjects: int | None = Field(default=None, ge=0, exclude=True)

    def suppressed(self, minimum: int) -> SplitCount:
        """This count as it may leave a site whose minimum is `minimum`: every count that 1 to
        minimum - 1 distinct subjects stand behind becomes SMALL_CELL. The rows and positives of
        a split of too few subjects; the positives when too few subjects have a positive row, or
        a negative row (rows minus positives would give the negatives away). Without the class
        subjects (a count read back) the rows stand in for them: a subject is at least one row."""

        def small(n: int) -> bool:
            return 0 < n < minimum

        def cell(n: int, behind: int) -> int:
            return SMALL_CELL if n > 0 and small(behind) else n

        if small(self.subjects):
            return SplitCount(
                rows=cell(self.rows, self.subjects),
                subjects=SMALL_CELL,
                positives=cell(self.positives, self.subjects),
            )
        positive = self.positive_subjects if self.positive_subjects is not None else self.positives
        negative = self.negative_subjects if self.negative_subjects is not None else self.rows - self.positives
        positives = SMALL_CELL if small(positive) or small(negative) else self.positives
        return SplitCount(rows=cell(self.rows, self.rows), subjects=self.subjects, positives=positives)

    def small_cell(self, minimum: int) -> str | None:
        """Which count would disclose fewer than `minimum` subjects (None: none)."""
        for name in ("rows", "subjects", "positives"):
            if 0 < getattr(self, name) < minimum:
                return f"{name} {getattr(self, name)} is below the minimum {minimum}"
        if self.subjects == SMALL_CELL and (self.rows > 0 or self.positives > 0):
            return f"rows {self.rows} / positives {self.positives} counted from fewer than {minimum} subjects"
        if self.positives >= 0 and self.rows > 0 and 0 < self.rows - self.positives < minimum:
            return f"rows {self.rows} less positives {self.positives}: negatives below the minimum {minimum}"
        for name, behind in (("positive", self.positive_subjects), ("negative", self.negative_subjects)):
            if behind is not None and 0 < behind < minimum and self.positives > 0:
                return f"positives {self.positives} with {behind} subjects of a {name} row, fewer than {minimum}"
        return None


class TaskReason(PeerReply):
    """Why a task has no metric at a site: the kind, the site's minimum subjects per split, and
    the rows, subjects and positives of each split (those the site computed)."""

    kind: Literal[REASON_KINDS]  # type: ignore[valid-type]
    minimum: int = Field(default=0, ge=0)
    min_positives: int = Field(default=0, ge=0)  # the site's min_report_positives (0: not said)
    splits: dict[str, SplitCount] = Field(default_factory=dict)

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: dict[str, SplitCount]) -> dict[str, SplitCount]:
        if unknown := sorted(set(v) - set(SPLITS)):
            raise ValueError(f"unknown split {unknown[0]!r} (known: {', '.join(SPLITS)})")
        return v

    @model_validator(mode="after")
    def _no_small_cell(self) -> TaskReason:
        # Fails closed: a reason that would disclose a count on fewer subjects than the site's
        # minimum cannot even be built (the site suppresses them first), nor read from a reply.
        for split, count in self.splits.items():
            if self.minimum and (problem := count.small_cell(self.minimum)):
                raise ValueError(
                    f"split {split}: {problem}: a small cell that may not leave the site (SplitCount.suppressed)"
                )
        return self

    def describe(self) -> str:
        """One line for a report: the kind and, per split, what fell short."""
        what = {
            "no_labels": "no labels at this site",
            "no_rows": "no rows",
            "too_few_subjects": "too few subjects",
            "one_class": "a single class",
            "invalid_task": "the task definition did not parse at the site",
            "invalid_labels": "the site's label files failed their checks",
            "too_few_positives": "too few positives or negatives in held_out",
            "near_earlier_sample": "its rows differ from what the site released before by fewer than the minimum",
        }[self.kind]
        if self.kind == "near_earlier_sample":
            minimum = (
                f" ({self.minimum} subjects, {MIN_SUBJECTS_KEY}: the difference of the releases would describe them)"
            )
        elif self.kind == "too_few_positives":
            minimum = f" (minimum {self.min_positives} held-out subjects with a positive row and as many with a "
            minimum += f"negative row, {MIN_POSITIVES_KEY}: {SMALL_CELL_RISK})"
        elif self.minimum:
            minimum = f" (minimum {self.minimum} subjects per split"
            minimum += f", {MIN_SUBJECTS_KEY}: {SMALL_CELL_RISK})" if self.kind == "too_few_subjects" else ")"
        else:
            minimum = ""
        if not self.splits:
            return what + (minimum if self.kind in ("too_few_positives", "near_earlier_sample") else "")

        def n(value: int) -> str:
            return f"<{self.minimum}" if value == SMALL_CELL else str(value)

        parts = [
            f"{s} {n(c.rows)} rows / {n(c.subjects)} subjects / {n(c.positives)} positives"
            for s, c in self.splits.items()
        ]
        return f"{what}{minimum}: " + ", ".join(parts)
