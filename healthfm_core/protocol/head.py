"""The federated task head's messages (server/head_app.py <-> client/head_app.py): pydantic
models with a flat form for one Flower ConfigRecord (HEAD_RECORD), as the rest of healthfm_core/protocol/
does for the pretraining's messages. This module does not import flwr.

Stages (message types), each request naming the release (`setup_sha256`), the tasks whose rows
the site embeds and the label key the head is for:

  query.head_stats  -> HeadStats: the site's train rows' count, positives, feature sums and sums
                       of squares, its tuning rows' count, and the embedding settings it used
                       (no row, no label); with DP asked, its planned epsilon for the run
  query.head_setup  StandardizerRequest (the pooled mean and scale)
                    -> HeadSmoothness: the mean squared norm of its standardised train rows
  train.head        HeadRoundRequest (the global head, penalty, steps, step size)
                    -> HeadUpdate: its head after its local steps, and its train rows
  evaluate.head     HeadTuneRequest (a head) -> HeadTuning: its tuning log-loss sum and count

Every request after the stats carries the standardisation, so that a site answers from whichever
of its processes gets the message (Flower's simulation runs a node's messages on any Ray actor; a
SuperNode may restart): the site keeps no state between stages that it cannot rebuild.

Any stage may be answered by a HeadRefusal (a reason, no number): the site's minimums (subjects
per split, positives; healthfm_core/eval/site_eval.withheld_reason) are not met, the release is
not the site's, or it has no rows for the key.

Replies are untrusted: `parse_reply` checks the record's keys, types (strict: a peer's 2.0 is not
a count), every vector's width against the head's, finiteness, counts (positives <= n, n >= 1)
and non-negative sums of squares, and raises HeadMessageError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

HEAD_RECORD = "head"  # the one ConfigRecord of every head message, request or reply
REFUSED_KEY = "refused"  # a HeadRefusal's reason

MSG_STATS = "query.head_stats"
MSG_SETUP = "query.head_setup"
MSG_TRAIN = "train.head"
MSG_TUNE = "evaluate.head"

MAX_WIDTH = 65536  # no release embeds wider; bounds what a peer can make the other side allocate

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


@dataclass(frozen=True)
class SiteStats:
    """What a site sends for the standardisation: aggregates of its train rows, no row."""

    n: int
    positives: int
    total: np.ndarray  # [d] float64: the sum of each feature
    squares: np.ndarray  # [d] float64: the sum of each feature's squares


class HeadMessageError(ValueError):
    """A head message that does not parse (the message names the field)."""


class _Head(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    # The fields holding one number per embedding dimension (checked against the head's width).
    _vectors: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _widths(self, info: ValidationInfo) -> Any:
        width = (info.context or {}).get("width")
        for name in self._vectors:
            got = len(getattr(self, name))
            if got > MAX_WIDTH or (width is not None and got != width):
                raise ValueError(f"field {name}: {got} values, expected {width if width is not None else '<= max'}")
        return self

    def to_flat(self) -> dict[str, Any]:
        # Fields left at their default (the optional DP fields) are not sent: a ConfigRecord holds
        # no None, and a request or reply without DP is the same record as before DP existed.
        return {k.replace("_", "-"): v for k, v in self.model_dump(exclude_defaults=True).items()}

    @classmethod
    def from_flat(cls: type[_M], record: Mapping[str, Any], width: int | None = None) -> _M:
        data = {k.replace("-", "_"): v for k, v in record.items()}
        try:
            return cls.model_validate(data, context={"width": width})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or "<record>"
            raise HeadMessageError(f"{cls.__name__}: field {where}: {first.get('msg')}") from None


_M = TypeVar("_M", bound=_Head)


class HeadTask(_Head):
    """Which head a request is for: the release, the tasks the site embeds rows of, the key."""

    setup_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tasks: list[str]  # empty: the release's own evaluation tasks
    key: str = Field(min_length=1)


class StandardizerRequest(HeadTask):
    _vectors: ClassVar[tuple[str, ...]] = ("mean", "scale")
    mean: list[Finite]
    scale: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]]


class HeadRoundRequest(StandardizerRequest):
    _vectors = ("mean", "scale", "weight")
    round: int = Field(ge=1)
    weight: list[Finite]
    bias: Finite
    penalty: NonNegative
    steps: int = Field(ge=1)
    lr: float = Field(gt=0, allow_inf_nan=False)
    # DP asked by the server (healthfm_core/privacy/head.py); absent: not asked (a site whose
    # policy makes DP mandatory trains under DP all the same).
    dp: bool = False
    dp_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dp_target_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # over dp_planned_steps
    dp_max_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dp_batch_size: int = Field(default=64, ge=1)  # expected subjects per DP step
    dp_planned_steps: int | None = Field(default=None, ge=1)  # the head run's rounds x C grid x steps
    # The head run (its id; "": this key's head alone) and its per-run epsilon limit: the site
    # refuses a round that would take the run's own spend in its ledger past it.
    dp_run: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    dp_run_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # The most noise the server accepts of a site's round: its bound on a DP update's step
    # (server/head_bounds.py) assumes it, so a site whose policy needs more refuses the round.
    dp_max_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _dp_fields(self) -> HeadRoundRequest:
        if self.dp and self.dp_noise_multiplier is None and self.dp_target_epsilon is None:
            raise ValueError("field dp: DP asked without dp-noise-multiplier or dp-target-epsilon")
        if self.dp and self.dp_max_noise_multiplier is None:
            raise ValueError("field dp-max-noise-multiplier: missing beside dp (the noise the server's bound assumes)")
        if self.dp_target_epsilon is not None and self.dp_planned_steps is None:
            raise ValueError("field dp-planned-steps: missing beside dp-target-epsilon")
        return self


class HeadTuneRequest(StandardizerRequest):
    _vectors = ("mean", "scale", "weight")
    weight: list[Finite]
    bias: Finite


class HeadRefusal(_Head):
    """A site that takes no part in this head (or this stage), and why; no number but, when its
    DP budget refused a round, its cumulative epsilon (and delta) so far."""

    refused: str = Field(min_length=1, max_length=2000)
    epsilon: NonNegative | None = None
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None


class HeadStats(_Head):
    _vectors = ("total", "squares")
    site: str = Field(min_length=1, max_length=200)
    n: int = Field(ge=1)
    positives: int = Field(ge=0)
    total: list[Finite]
    squares: list[NonNegative]
    max_events: int = Field(gt=0)  # the embedding settings of its rows (the saved head's)
    max_patches: int = Field(gt=0)
    n_tuning: int = Field(ge=0)  # its tuning rows: every evaluate.head reply's count
    subjects: int = Field(ge=1)  # its train rows' subjects (the DP plan's sampling rate)

    @model_validator(mode="after")
    def _counts(self) -> HeadStats:
        if self.positives > self.n:
            raise ValueError(f"field positives: {self.positives} > n {self.n}")
        if self.subjects > self.n:
            raise ValueError(f"field subjects: {self.subjects} > n {self.n}")
        return self

    @classmethod
    def of(
        cls, site: str, stats: SiteStats, max_events: int, max_patches: int, n_tuning: int, subjects: int
    ) -> HeadStats:
        return cls(
            site=site,
            n_tuning=n_tuning,
            subjects=subjects,
            n=stats.n,
            positives=stats.positives,
            total=stats.total.tolist(),
            squares=stats.squares.tolist(),
            max_events=max_events,
            max_patches=max_patches,
        )

    def stats(self) -> SiteStats:
        return SiteStats(self.n, self.positives, np.asarray(self.total), np.asarray(self.squares))


class HeadSmoothness(_Head):
    smoothness: NonNegative


class HeadUpdate(_Head):
    _vectors = ("weight",)
    weight: list[Finite]
    bias: Finite
    n: int = Field(ge=1)
    # Under DP: the site's cumulative epsilon from its durable ledger (this round counted), at
    # its policy's delta. Absent: trained without DP.
    epsilon: NonNegative | None = None
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _epsilon_with_delta(self) -> HeadUpdate:
        if (self.epsilon is None) != (self.delta is None):
            raise ValueError("fields epsilon and delta: one without the other")
        return self


class HeadTuning(_Head):
    loss_sum: NonNegative
    n: int = Field(ge=0)


def parse_reply(record: Mapping[str, Any], model: type[_M], width: int | None) -> _M | HeadRefusal:
    """A site's reply record as `model` or as its refusal; HeadMessageError when neither."""
    if REFUSED_KEY in record:
        return HeadRefusal.from_flat(record)
    return model.from_flat(record, width)


__all__ = [
    "HEAD_RECORD",
    "MAX_WIDTH",
    "MSG_SETUP",
    "MSG_STATS",
    "MSG_TRAIN",
    "MSG_TUNE",
    "HeadMessageError",
    "HeadRefusal",
    "HeadRoundRequest",
    "HeadSmoothness",
    "HeadStats",
    "HeadTask",
    "HeadTuneRequest",
    "HeadTuning",
    "HeadUpdate",
    "StandardizerRequest",
    "parse_reply",
]
