"""train: a site's reply (TrainReply) and its wire form, and the round's train metrics.

The arrays' own encoding on the uplink (RoundConfig.transport) is protocol/transport.py's: the
site encodes a TrainReply's arrays last, the server decodes them before TrainReply.from_records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from healthfm_core.protocol.privacy_spend import DP_FIELDS, PrivacySpend
from healthfm_core.protocol.wire import STATUS_REFUSED, Count, FiniteFloat, PeerReply, validate_peer
from healthfm_core.terms.groups import GROUPS, parameter_group
from healthfm_core.terms.objective_weights import LOSS_NAMES

# Metric keys of the wire form (MetricRecord), private to this module: everything else reads the
# typed fields of TrainReply.
_NUM_EXAMPLES = "num-examples"  # also Flower FedAvg's weighted_by_key
_GROUP_PREFIX = "num-examples."
_LOSS_PREFIX = "loss."
_TRAIN_SCALARS = {
    "grad-norm": "grad_norm",
    "rate-min": "rate_min",
    "rate-max": "rate_max",
    "train-seconds": "train_seconds",
    "client-seconds": "client_seconds",
}
# The loss names a site may report: every objective and their weighted total.
TRAIN_LOSSES = (*LOSS_NAMES, "total")


class TrainRecords(NamedTuple):
    """A TrainReply as plain structures (the ClientApp wraps them into Flower records)."""

    arrays: dict[str, np.ndarray] | None  # ArrayRecord ARRAYS_RECORD; None: no ArrayRecord (refused)
    metrics: dict[str, int | float]  # MetricRecord METRICS_RECORD
    status: dict[str, str] | None  # ConfigRecord STATUS_RECORD; None: no status record (trained)


class TrainReply(PeerReply):
    """A site's answer to a train message: the groups it trained with their example counts, or a
    refusal by its policy (a reason, no arrays).

    Validated wherever it is built (the site) and parsed (the server, `from_records`): every
    group of `arrays` has its count in `group_examples` and no count lacks arrays; counts are
    positive integers; losses are known names with finite values; floating-point arrays are
    finite. The mapping key -> group is `parameter_group` unless the validation context gives
    another `group_of` (tests with synthetic keys).
    """

    status: Literal["ok", "refused"] = "ok"
    reason: str = ""  # refused only: the policy's reason
    arrays: dict[str, np.ndarray] = Field(default_factory=dict)  # state_dict key -> trained value
    num_examples: int = Field(default=0, ge=0)  # samples of this round (FedAvg's weight)
    group_examples: dict[str, Count] = Field(default_factory=dict)  # group -> samples carrying it
    losses: dict[str, FiniteFloat] = Field(default_factory=dict)  # TRAIN_LOSSES name -> mean
    grad_norm: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    rate_min: float | None = Field(default=None, allow_inf_nan=False)  # decay rates' range (last step)
    rate_max: float | None = Field(default=None, allow_inf_nan=False)
    train_seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    client_seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    dp: PrivacySpend | None = None

    @classmethod
    def refused(cls, reason: str, dp: PrivacySpend | None = None) -> TrainReply:
        return cls(status=STATUS_REFUSED, reason=reason, dp=dp)

    @property
    def groups(self) -> list[str]:
        return sorted(self.group_examples)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> TrainReply:
        if self.status == STATUS_REFUSED:
            if not self.reason:
                raise ValueError("a refused train reply needs a reason")
            trained = {
                "arrays": self.arrays,
                "num_examples": self.num_examples,
                "group_examples": self.group_examples,
                "losses": self.losses,
            }
            carried = [name for name, value in trained.items() if value]
            if carried:
                raise ValueError(f"a refused train reply carries no training results, got {carried}")
            return self
        if self.reason:
            raise ValueError(f"reason {self.reason!r} given on a reply that is not refused")
        if self.dp is not None and self.dp.noise_multiplier is None:
            # A figure of epsilon beside a non-private update would claim a guarantee it lacks.
            raise ValueError("an update trained without DP carries no privacy spend (dp.noise-multiplier missing)")
        if self.dp is not None:
            # The DP guarantee covers the weights (and the public expected counts), nothing else:
            # losses, gradient norms and timings (which grow with the secret Poisson batch sizes)
            # stay at the site.
            leaked = [
                name for name in ("losses", "grad_norm", "train_seconds", "client_seconds") if getattr(self, name)
            ]
            if leaked:
                raise ValueError(
                    f"a DP update carries no {', '.join(leaked)}: only weights, expected counts, the "
                    "decay-rate range and the privacy spend leave a DP site"
                )
        if not self.arrays:
            raise ValueError("a train reply holds at least one trained group's arrays (none given)")
        if self.num_examples < 1:
            raise ValueError(f"field {_NUM_EXAMPLES}: value {self.num_examples}: must be >= 1")
        unknown = sorted(set(self.losses) - set(TRAIN_LOSSES))
        if unknown:
            raise ValueError(f"unknown loss {_LOSS_PREFIX}{unknown[0]} (known: {', '.join(TRAIN_LOSSES)})")
        group_of = (info.context or {}).get("group_of", parameter_group)
        groups: dict[str, str] = {}
        for key, value in self.arrays.items():
            try:
                group = group_of(key)
            except KeyError:
                raise ValueError(f"array {key!r}: belongs to no parameter group") from None
            if group not in GROUPS:
                raise ValueError(f"array {key!r}: group {group!r} is not one of {list(GROUPS)}")
            if value.dtype.kind not in "fiub":
                raise ValueError(f"array {key!r}: dtype {value.dtype} is not numeric")
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(f"array {key!r}: NaN or Inf values")
            groups.setdefault(group, key)
        for group, key in sorted(groups.items()):
            if group not in self.group_examples:
                raise ValueError(
                    f"field {_GROUP_PREFIX}{group}: missing (the reply holds {group!r} arrays, e.g. {key!r})"
                )
        for group in sorted(self.group_examples):
            if group not in groups:
                raise ValueError(
                    f"field {_GROUP_PREFIX}{group}: value {self.group_examples[group]}: a count for "
                    "a group the reply holds no arrays of"
                )
        return self

    # ---------------------------------------------------------------- wire form

    def to_records(self) -> TrainRecords:
        metrics: dict[str, int | float] = {}
        if self.status == "ok":
            metrics[_NUM_EXAMPLES] = self.num_examples
            metrics.update({_GROUP_PREFIX + g: n for g, n in sorted(self.group_examples.items())})
            metrics.update({_LOSS_PREFIX + name: v for name, v in self.losses.items()})
            for key, name in _TRAIN_SCALARS.items():
                if (value := getattr(self, name)) is not None:
                    metrics[key] = value
        if self.dp is not None:
            metrics.update(self.dp.to_metrics())
        if self.status == STATUS_REFUSED:
            return TrainRecords(None, metrics, {"status": STATUS_REFUSED, "reason": self.reason})
        return TrainRecords(dict(self.arrays), metrics, None)

    @classmethod
    def from_records(
        cls,
        arrays: Mapping[str, np.ndarray] | None,
        metrics: Mapping[str, Any],
        status: Mapping[str, Any] | None = None,
        *,
        group_of: Callable[[str], str] = parameter_group,
    ) -> TrainReply:
        """Parse a peer's reply; raise ValueError naming the field and value that does not parse."""
        data: dict[str, Any] = {}
        if status is not None:
            extra = sorted(set(status) - {"status", "reason"})
            if extra:
                raise ValueError(f"train reply: unknown status field {extra[0]!r}")
            if status.get("status") != STATUS_REFUSED:
                raise ValueError(
                    f"train reply: field status: value {status.get('status')!r}: expected "
                    f"{STATUS_REFUSED!r} (a reply that trained carries no status record)"
                )
            data.update(status=STATUS_REFUSED, reason=status.get("reason"))
            if arrays:
                raise ValueError(f"train reply: refused but carries {len(arrays)} arrays")
        elif arrays is None:
            raise ValueError("train reply: no arrays and no refusal status")
        else:
            data["arrays"] = dict(arrays)
        groups: dict[str, Any] = {}
        losses: dict[str, Any] = {}
        dp: dict[str, Any] = {}
        for key, value in metrics.items():
            if key == _NUM_EXAMPLES:
                data["num_examples"] = value
            elif key.startswith(_GROUP_PREFIX):
                groups[key[len(_GROUP_PREFIX) :]] = value
            elif key.startswith(_LOSS_PREFIX):
                losses[key[len(_LOSS_PREFIX) :]] = value
            elif key in DP_FIELDS:
                dp[DP_FIELDS[key]] = value
            elif key in _TRAIN_SCALARS:
                data[_TRAIN_SCALARS[key]] = value
            else:
                raise ValueError(f"train reply: unknown metric {key!r} (value {value!r})")
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"train reply: field {_GROUP_PREFIX}{unknown[0]}: unknown group")
        if data.get("status") != STATUS_REFUSED and _NUM_EXAMPLES not in metrics:
            raise ValueError(f"train reply: field {_NUM_EXAMPLES}: missing")
        if groups:
            data["group_examples"] = groups
        if losses:
            data["losses"] = losses
        if dp:
            data["dp"] = dp
        return validate_peer(cls, data, what="train reply", wire=_train_wire_name, context={"group_of": group_of})


def _train_wire_name(loc: tuple[Any, ...]) -> str:
    """The wire key of a TrainReply field location (for error messages)."""
    head, rest = (str(loc[0]), loc[1:]) if loc else ("", ())
    if head == "group_examples" and rest:
        return _GROUP_PREFIX + str(rest[0])
    if head == "losses" and rest:
        return _LOSS_PREFIX + str(rest[0])
    if head == "dp" and rest:
        return next((k for k, v in DP_FIELDS.items() if v == rest[0]), f"dp.{rest[0]}")
    if head == "arrays" and rest:
        return f"array {rest[0]!r}"
    if head == "num_examples":
        return _NUM_EXAMPLES
    return next((k for k, v in _TRAIN_SCALARS.items() if v == head), head)


def mean_losses(replies: Iterable[TrainReply]) -> dict[str, float]:
    """Per loss, the mean over the replies reporting it, weighted by their num_examples (a site
    that reports no alignment loss does not pull the federation's towards 0)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for reply in replies:
        for name, value in reply.losses.items():
            sums[name] = sums.get(name, 0.0) + reply.num_examples * value
            weights[name] = weights.get(name, 0.0) + reply.num_examples
    return {name: sums[name] / weights[name] for name in sorted(sums)}


def round_metrics(num_examples: int, losses: Mapping[str, float]) -> dict[str, int | float]:
    """A round's aggregated train metrics in the wire form (the MetricRecord Flower's start()
    loop logs): the examples averaged and the mean losses."""
    return {_NUM_EXAMPLES: num_examples, **{_LOSS_PREFIX + name: v for name, v in losses.items()}}
