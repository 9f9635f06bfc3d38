"""What the server and the sites agree on: message kinds, per-round configs, the setup.

client/ and server/ never import each other (docs/architecture.md), so the schema of every message they
exchange lives here, as pydantic models with a flat form for Flower's ConfigRecord (this module
does not import flwr: records are plain mappings here).

Exchange (one run):
  query.capabilities  server -> site: nothing;  site -> server: SiteCapabilities (no rows)
  query.code_stats    server -> site: nothing;  site -> server: SiteCodeStats JSON (suppressed
                      below the site's own minimum subject count, aggregate only)
  query.setup         server -> site: FederationSetup JSON (vocabulary, model config, init seed, the
                      modalities the model holds: the union of the sites'; the tokenisation:
                      token_window_days, max_codes_per_token);
                      the site keeps it for the run and acknowledges its sha256
  train               server -> site: its groups' arrays + RoundConfig; site -> server: a
                      TrainReply (the groups it trained, counts per group, losses, the site's
                      cumulative DP spend), or - when the site's policy refuses the request - a
                      refused TrainReply (reason, DP spend, no arrays)
  evaluate            server -> site: its groups' arrays + EvalConfig; site -> server: an EvalReply
                      (held-out metrics per task, those on fewer subjects than the site's minimum
                      withheld)

A reply's records (RecordDict keys ARRAYS_RECORD, METRICS_RECORD, STATUS_RECORD) are written by
TrainReply/EvalReply.to_records and read back by from_records; the metric keys of the wire form
are spelled in this module only. The arrays' own encoding on the uplink (RoundConfig.transport:
fp32, fp16, or int8 with the MetricRecord SCALES_RECORD of per-tensor scales) is
healthfm_core/transport.py's: the site encodes a TrainReply's arrays last, the server decodes them
before TrainReply.from_records. Below that, every message's arrays travel packed into a few
safetensors blobs (healthfm_core/packing.py), not one Flower Array per key.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Annotated, Any, Final, Literal, NamedTuple, TypeVar

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from healthfm_core.data.layout import MODALITIES, SPLITS
from healthfm_core.data.task_spec import TaskSpec, resolve_tasks, task_keys
from healthfm_core.data.token_settings import (
    DEFAULT_MAX_CODES_PER_TOKEN,
    DEFAULT_TOKEN_WINDOW_DAYS,
    MaxCodesPerToken,
    TokenSettings,
    TokenWindowDays,
)
from healthfm_core.data.vocab import Vocabulary
from healthfm_core.eval.score_histogram import DEFAULT_SCORE_BINS, WITHHELD_KINDS, ScoreScale, WithheldKind
from healthfm_core.model.config import ModelConfig
from healthfm_core.model.groups import GROUPS, parameter_group
from healthfm_core.model.healthfm import HealthFM, embedding_width, model_modalities
from healthfm_core.model.objectives import LOSS_NAMES, ObjectiveWeights
from healthfm_core.privacy.policy import EPSILON_CAP_MAX
from healthfm_core.strict_files import StrictFileError, strict_json, strict_model
from healthfm_core.transport import SCALES_RECORD, Rounding, Transport

# Round 0's message types (Flower's "query.<action>"; the ClientApp registers each <action>).
CAPABILITIES = "query.capabilities"
CODE_STATS = "query.code_stats"
SETUP = "query.setup"

# Round 0's records (RecordDict keys) and their fields: a capabilities reply holds one ConfigRecord
# CAPABILITIES_RECORD (SiteCapabilities.to_flat); a code-stats reply CODE_STATS_RECORD
# {JSON_FIELD: SiteCodeStats as JSON}; a setup message SETUP_RECORD {JSON_FIELD: the setup's JSON,
# SHA256_FIELD: its sha256}, and its reply SETUP_RECORD {SHA256_FIELD} (the acknowledgement).
CAPABILITIES_RECORD = "capabilities"
CODE_STATS_RECORD = "code-stats"
SETUP_RECORD = "setup"
JSON_FIELD = "json"
SHA256_FIELD = "sha256"
# A train or evaluate message's ConfigRecord (RoundConfig / EvalConfig flat; Flower FedAvg's name).
CONFIG_RECORD = "config"

MODALITY_GROUP = {"ehr": "ehr", "wearables": "wearables", "genomics": "genomics"}
WEIGHT_PREFIX = "weight."

# The records of a reply (RecordDict keys): ArrayRecord, MetricRecord, ConfigRecord (refusals only).
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
STATUS_RECORD = "status"
STATUS_REFUSED: Final = "refused"  # Final: typed as the literal TrainReply.status takes
# A site asked to train or evaluate under a setup it does not hold (its SuperNode restarted and
# lost the run's state) answers with only this ConfigRecord: {"wanted": sha256, "held": sha256 or ""};
# the server sends it query.setup again and retries it.
SETUP_NEEDED_RECORD = "setup-needed"

# Metric keys of the wire form (MetricRecord), private to this module: everything else reads the
# typed fields of TrainReply / EvalReply.
_NUM_EXAMPLES = "num-examples"  # also Flower FedAvg's weighted_by_key
_GROUP_PREFIX = "num-examples."
_LOSS_PREFIX = "loss."
_DP_FIELDS = {
    "dp.epsilon": "epsilon",
    "dp.delta": "delta",
    "dp.noise-multiplier": "noise_multiplier",
    "dp.new-budget-at": "new_budget_at",
    "dp.replaced-epsilon": "replaced_epsilon",
    "dp.epsilon-cap": "epsilon_cap",
}
_TRAIN_SCALARS = {
    "grad-norm": "grad_norm",
    "rate-min": "rate_min",
    "rate-max": "rate_max",
    "train-seconds": "train_seconds",
    "client-seconds": "client_seconds",
}
_EVAL_SCALARS = {
    "num-examples": "num_examples",
    "withheld": "withheld",
    "eval-seconds": "eval_seconds",
    "max-subjects": "max_subjects",
    "min-subjects": "min_subjects",
    "min-positives": "min_positives",
}
_EVAL_TASK_COUNT = "tasks"
# A binary task's score histogram: "<task>.histogram-bounds" (list), "-positives", "-negatives"
# (lists), "-minimum"; or "<task>.histogram-withheld.<kind>" = 1.
_HIST_PREFIX = "histogram-"
_HIST_FIELDS = ("bounds", "positives", "negatives", "minimum")
_HIST_WITHHELD = "histogram-withheld"
# The loss names a site may report: every objective and their weighted total.
TRAIN_LOSSES = (*LOSS_NAMES, "total")


def groups_for_modalities(modalities: Sequence[str]) -> list[str]:
    """The parameter groups a site with these modalities trains: shared plus one per modality."""
    unknown = [m for m in modalities if m not in MODALITY_GROUP]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; expected a subset of {sorted(MODALITY_GROUP)}")
    wanted = {"shared"} | {MODALITY_GROUP[m] for m in modalities}
    return [g for g in GROUPS if g in wanted]


def site_seed(seed: int, round: int, site: str) -> int:
    """Seed of one site's local work in one round: differs by round and site, never by process
    (a site's name, not its node id, which changes when a run is resumed)."""
    digest = zlib.crc32(site.encode("utf-8"))
    return int(np.random.SeedSequence([seed, round, digest]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _flat(model: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    return {k.replace("_", "-"): v for k, v in model.model_dump(exclude=exclude).items()}


def _unflat(record: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    out = {}
    for name in fields:
        key = name.replace("_", "-")
        if key in record:
            out[name] = record[key]
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteCapabilities(_Strict):
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


def federation_modalities(site_modalities: Iterable[Sequence[str]], vocabulary: Vocabulary) -> list[str]:
    """The modalities the federation's model holds: every modality some site has (the union of
    the sites' `SiteCapabilities.modalities`, in MODALITIES order), genomics only when the
    vocabulary agreed at least one PRS trait. A modality a site has but trains on too few
    subjects (its policy) still gets its module, so that site's batches always fit the model."""
    declared = {m for modalities in site_modalities for m in modalities}
    if vocabulary.n_prs_traits == 0:
        declared.discard("genomics")
    return [m for m in MODALITIES if m in declared]


class FederationSetup(_Strict):
    """Sent once per run to every site: everything needed to build the same model.

    `modalities`: those the model is built with (`federation_modalities` of the sites'
    capabilities); left out, EHR and wearables plus genomics when the vocabulary has PRS traits.
    `token_window_days`, `max_codes_per_token`: how every site turns its EHR rows into tokens
    (token_settings.py); the site builds its sequences with `tokens`.
    """

    vocabulary: Vocabulary
    model: ModelConfig
    model_seed: int = 0
    modalities: list[str]
    token_window_days: TokenWindowDays = DEFAULT_TOKEN_WINDOW_DAYS
    max_codes_per_token: MaxCodesPerToken = DEFAULT_MAX_CODES_PER_TOKEN

    @model_validator(mode="before")
    @classmethod
    def _default_modalities(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("modalities") is None and "vocabulary" in data:
            vocab = data["vocabulary"]
            n_traits = vocab.n_prs_traits if isinstance(vocab, Vocabulary) else len(vocab.get("prs_traits", []))
            data = {**data, "modalities": list(model_modalities(n_traits))}
        return data

    @model_validator(mode="after")
    def _modalities_fit(self) -> FederationSetup:
        try:
            resolved = model_modalities(self.vocabulary.n_prs_traits, self.modalities)
        except ValueError as err:
            raise ValueError(f"FederationSetup.modalities: {err}") from None
        if list(resolved) != self.modalities:
            raise ValueError(
                f"FederationSetup.modalities={self.modalities} must be distinct and in the order "
                f"{list(MODALITIES)} (expected {list(resolved)})"
            )
        return self

    @property
    def groups(self) -> list[str]:
        """The parameter groups the model holds: shared plus one per modality."""
        return groups_for_modalities(self.modalities)

    @property
    def tokens(self) -> TokenSettings:
        """The tokenisation every site of the run uses."""
        return TokenSettings(token_window_days=self.token_window_days, max_codes_per_token=self.max_codes_per_token)

    def to_json(self) -> str:
        # Token settings at their defaults are left out: the setup reads back the same, and its
        # JSON (so its hash) is what it was before those fields existed (server checkpoints).
        default = {k for k, f in TokenSettings.model_fields.items() if getattr(self, k) == f.default}
        return self.model_dump_json(exclude=default)

    @classmethod
    def from_json(cls, text: str) -> FederationSetup:
        """A setup as a peer sent it; a bad field raises a one-line ValueError naming it and its value."""
        try:
            return strict_model(cls, text, "federation setup")
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(x) for x in first.get("loc", ()))
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            where = f"field {loc}: value {repr(first.get('input'))[:80]}: " if loc else ""
            raise ValueError(f"federation setup: {where}{msg}") from None

    @property
    def sha256(self) -> str:
        # Canonical form: sorted keys, so the hash does not depend on field order; modalities
        # (and, in to_json, the token settings) left out when they are the default, so setups
        # written before those fields existed (server checkpoints) keep their hash.
        data = json.loads(self.to_json())
        if self.modalities == list(model_modalities(self.vocabulary.n_prs_traits)):
            data.pop("modalities")
        pretraining = data["model"]["pretraining"]
        if not pretraining.get("prs_reconstruct_shown", False):  # issue 31's option, off: as before it
            pretraining.pop("prs_reconstruct_shown", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def embedding_width(self) -> int:
        """Width of this setup's model's embedding (HealthFM.embed): what a task head reads."""
        return embedding_width(self.model, self.modalities)

    def init_model(self) -> HealthFM:
        """The model at its seeded initialisation (server and sites get the same weights), built
        without disturbing the caller's global torch RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.model_seed)
            return HealthFM(self.model, self.vocabulary.vocab_size, self.vocabulary.n_prs_traits, self.modalities)


class RoundConfig(_Strict):
    """The train message's config (ConfigRecord) of one round, to one site."""

    round: int = Field(ge=1)
    rounds: int = Field(ge=1)
    local_steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=16, gt=0)
    max_events: int = Field(default=256, gt=0)
    max_patches: int = Field(default=32, gt=0)
    seed: int = 0
    # How the site's reply carries its arrays (healthfm_core/transport.py); the server asks it.
    transport: Transport = "fp32"
    int8_rounding: Rounding = "stochastic"
    error_feedback: StrictBool = True  # int8: the site carries its rounding residual to its next round
    setup_sha256: str
    weights: ObjectiveWeights = ObjectiveWeights()
    # Differential privacy asked by the server; a site's policy may still demand it, raise the
    # noise or refuse the round (the site decides).
    dp: StrictBool = False
    dp_noise_multiplier: float | None = Field(default=None, gt=0)
    dp_target_epsilon: float | None = Field(default=None, gt=0)  # over this run's planned steps
    dp_max_grad_norm: float | None = Field(default=None, gt=0)
    # The round's update leaves the site only masked (secure aggregation, issue 32); a site whose
    # policy requires it refuses a round without it.
    secure_aggregation: StrictBool = False

    def to_flat(self) -> dict[str, Any]:
        # ConfigRecord holds no None: unset optional fields are left out.
        out = {k: v for k, v in _flat(self, exclude={"weights"}).items() if v is not None}
        out.update(self.weights.to_flat(WEIGHT_PREFIX))
        return out

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> RoundConfig:
        """From a received ConfigRecord; keys added by the strategy (server-round, groups) ignored."""
        data = _unflat(record, [f for f in cls.model_fields if f != "weights"])
        data["weights"] = ObjectiveWeights.from_flat(record, WEIGHT_PREFIX)
        return cls.model_validate(data)


MAX_SCORE_BINS = 1000


class EvalConfig(_Strict):
    """The evaluate message's config: which tasks (their definitions: `TaskSpec`, the ACES text
    itself, so a site needs none of the server's files), how to build samples, the probe's
    bootstrap. Built in Python, `tasks` may also hold names (resolved by
    healthfm_core.data.task_spec.resolve_tasks, here); from a peer (`from_flat`) only definitions."""

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
        out = _flat(self, exclude={"tasks"})
        out["tasks"] = json.dumps([t.model_dump() for t in self.tasks])  # a ConfigRecord holds strings, not objects
        return out

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> EvalConfig:
        data = _unflat(record, list(cls.model_fields))
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


# ------------------------------------------------------------------------------------- replies

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]


class _Reply(BaseModel):
    # strict: a peer's 2.0 is not a count, its "1.5" not a loss; arrays are numpy arrays.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True)


class PrivacySpend(_Reply):
    """A site's cumulative DP spend (its durable ledger: every round of every run at the site).
    `noise_multiplier` is set only when this round trained under DP. `new_budget_at` is set when
    the site's ledger was started anew by its admin (`join --new-privacy-budget`): its epsilon
    then counts from that time, and `replaced_epsilon` is what the given-up ledger had spent,
    where the site knows it; the server writes both into its audit log. `epsilon_cap` is the site
    policy's `dp.epsilon_cap` (finite, at most EPSILON_CAP_MAX), so the coordinator sees the spend
    against it; absent in replies from sites that predate it."""

    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    new_budget_at: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # unix time
    replaced_epsilon: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    epsilon_cap: float | None = Field(default=None, gt=0, le=EPSILON_CAP_MAX, allow_inf_nan=False)

    def to_metrics(self) -> dict[str, float]:
        """Its MetricRecord entries (`dp.*`), as a train reply carries them."""
        return {key: value for key, name in _DP_FIELDS.items() if (value := getattr(self, name)) is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> PrivacySpend:
        """From a peer's `dp.*` MetricRecord entries alone; ValueError naming an unknown key."""
        unknown = sorted(set(metrics) - set(_DP_FIELDS))
        if unknown:
            raise ValueError(f"privacy spend: unknown metric {unknown[0]!r}")
        return cls.model_validate({_DP_FIELDS[k]: v for k, v in metrics.items()})


class TrainRecords(NamedTuple):
    """A TrainReply as plain structures (the ClientApp wraps them into Flower records)."""

    arrays: dict[str, np.ndarray] | None  # ArrayRecord ARRAYS_RECORD; None: no ArrayRecord (refused)
    metrics: dict[str, int | float]  # MetricRecord METRICS_RECORD
    status: dict[str, str] | None  # ConfigRecord STATUS_RECORD; None: no status record (trained)


class TrainReply(_Reply):
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
            elif key in _DP_FIELDS:
                dp[_DP_FIELDS[key]] = value
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
        return _validate(cls, data, group_of=group_of, wire=_train_wire_name)


def _train_wire_name(loc: tuple[Any, ...]) -> str:
    """The wire key of a TrainReply field location (for error messages)."""
    head, rest = (str(loc[0]), loc[1:]) if loc else ("", ())
    if head == "group_examples" and rest:
        return _GROUP_PREFIX + str(rest[0])
    if head == "losses" and rest:
        return _LOSS_PREFIX + str(rest[0])
    if head == "dp" and rest:
        return next((k for k, v in _DP_FIELDS.items() if v == rest[0]), f"dp.{rest[0]}")
    if head == "arrays" and rest:
        return f"array {rest[0]!r}"
    if head == "num_examples":
        return _NUM_EXAMPLES
    return next((k for k, v in _TRAIN_SCALARS.items() if v == head), head)


_ReplyT = TypeVar("_ReplyT", bound=BaseModel)


def _validate(
    cls: type[_ReplyT],
    data: dict[str, Any],
    *,
    wire: Callable[[tuple[Any, ...]], str],
    group_of: Callable[[str], str] = parameter_group,
    context: Mapping[str, Any] | None = None,
) -> _ReplyT:
    """cls.model_validate(data), a failure as one ValueError naming the wire field and value."""
    try:
        return cls.model_validate(data, context={"group_of": group_of, **(context or {})})
    except ValidationError as err:
        first = err.errors()[0]
        what = "train reply" if cls is TrainReply else "evaluate reply"
        loc = tuple(first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a model-level check: its message names the field
            raise ValueError(f"{what}: {msg}") from None
        value = first.get("input")
        shown = f"array {value.dtype}{value.shape}" if isinstance(value, np.ndarray) else repr(value)[:80]
        raise ValueError(f"{what}: field {wire(loc)}: value {shown}: {msg}") from None


# Per-task metric names in an evaluate reply: "<task>.<metric>"; "<task>.n" is the held-out sample
# count used to weight the server's average.
EVAL_METRICS = ("auroc", "auprc", "ece", "r2")
# MEDS-Tab's point metrics, averaged over sites like the probe's (aggregate_site_metrics), under
# their wire names (as in a site's reply): "<task>.meds-tab-auroc", "<task>.meds-tab-auprc".
MEDS_TAB_METRICS = ("meds-tab-auroc", "meds-tab-auprc")
_TASK_N = "n"
# Whom an evaluation scored, held-out split: "<task>.subjects" (those with rows) of
# "<task>.subjects-available" (the split's subjects, of which a capped evaluation drew its sample).
# With a binary task, the held-out positives (SMALL_CELL below the site's minimum) and a 95%
# subject-bootstrap interval of the AUROC on the same rows as the point estimate.
_TASK_SCOPE = {
    "subjects": "subjects",
    "subjects-available": "available_subjects",
    "positives": "positives",
    "auroc-low": "auroc_low",
    "auroc-high": "auroc_high",
    # MEDS-Tab, the field's tabular baseline, on the same held-out rows (healthfm_core/eval/meds_tab.py).
    "meds-tab-auroc": "meds_tab_auroc",
    "meds-tab-auprc": "meds_tab_auprc",
    "meds-tab-auroc-low": "meds_tab_auroc_low",
    "meds-tab-auroc-high": "meds_tab_auroc_high",
}


class TaskMetrics(_Reply):
    """One task's held-out metrics at one site (n: held-out samples scored; subjects: their
    subjects; available_subjects: the held-out subjects the site has, of which a capped
    evaluation drew its sample; None from a site that does not say). NaN: undefined."""

    n: int = Field(ge=1)
    auroc: float | None = None  # each in [0, 1] (r2 at most 1), or NaN
    auprc: float | None = None
    ece: float | None = None
    r2: float | None = None
    subjects: int | None = Field(default=None, ge=1)
    available_subjects: int | None = Field(default=None, ge=1)
    positives: int | None = Field(default=None, ge=-1)  # -1: SMALL_CELL (1..minimum-1, not disclosed)
    auroc_low: float | None = None  # 95% subject-bootstrap interval of auroc (NaN: undefined)
    auroc_high: float | None = None
    # MEDS-Tab's AUROC, AUPRC and AUROC interval on the same held-out rows as the probe's (binary tasks).
    meds_tab_auroc: float | None = None
    meds_tab_auprc: float | None = None
    meds_tab_auroc_low: float | None = None
    meds_tab_auroc_high: float | None = None

    @field_validator(
        "auroc",
        "auprc",
        "ece",
        "r2",
        "auroc_low",
        "auroc_high",
        "meds_tab_auroc",
        "meds_tab_auprc",
        "meds_tab_auroc_low",
        "meds_tab_auroc_high",
    )
    @classmethod
    def _in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        low = -np.inf if info.field_name == "r2" else 0.0
        if v is not None and not np.isnan(v) and (np.isinf(v) or not low <= v <= 1.0):
            raise ValueError(f"must be NaN (undefined) or finite in [{low:g}, 1]")
        return v

    @model_validator(mode="after")
    def _some_metric(self) -> TaskMetrics:
        if all(getattr(self, m) is None for m in EVAL_METRICS):
            raise ValueError(f"no metric among {', '.join(EVAL_METRICS)}")
        if (
            self.subjects is not None
            and self.available_subjects is not None
            and self.subjects > self.available_subjects
        ):
            raise ValueError(f"subjects {self.subjects} is more than available_subjects {self.available_subjects}")
        if (self.auroc_low is None) != (self.auroc_high is None):
            raise ValueError("auroc_low and auroc_high go together")
        if self.auroc_low is not None and self.auroc_high is not None and self.auroc_low > self.auroc_high:
            raise ValueError(f"auroc_low {self.auroc_low} is above auroc_high {self.auroc_high}")
        low, high = self.meds_tab_auroc_low, self.meds_tab_auroc_high
        if (low is None) != (high is None):
            raise ValueError("meds_tab_auroc_low and meds_tab_auroc_high go together")
        if low is not None and high is not None and low > high:
            raise ValueError(f"meds_tab_auroc_low {low} is above meds_tab_auroc_high {high}")
        if self.meds_tab_auroc_low is not None and self.meds_tab_auroc is None:
            raise ValueError("meds_tab_auroc_low without meds_tab_auroc")
        if (self.meds_tab_auroc is not None or self.meds_tab_auprc is not None) and self.auroc is None:
            raise ValueError("MEDS-Tab's metrics come beside a binary task's auroc")
        if self.positives is not None and self.positives > self.n:
            raise ValueError(f"positives {self.positives} is more than n {self.n}")
        return self


# Why a (site, task) has no number: a few fixed kinds (no free text from a site's data).
REASON_KINDS = (
    "no_labels",  # the site has no labels for the task (no SITE_ROOT/tasks/<name>/, no wearables)
    "no_rows",  # labels extracted, none at the evaluation's prediction times
    "too_few_subjects",  # a split has fewer subjects than the site's minimum
    "one_class",  # the train or held_out split has a single class
    "invalid_task",  # the task definition did not parse at the site
    "invalid_labels",  # the site's own label files fail their checks
    "too_few_positives",  # held_out has fewer positives (or negatives) than the site's min_report_positives
)
# The site keys behind the privacy floor, named where a pair is withheld by them (reasons, summaries).
MIN_SUBJECTS_KEY = "min_report_subjects"
MIN_POSITIVES_KEY = "min_report_positives"
SMALL_CELL_RISK = "small cells re-identify patients"
SPLIT_COUNTS = ("rows", "subjects", "positives")
_WITHHELD = "withheld"
_MINIMUM = "minimum"
_MIN_POSITIVES = "min-positives"
TASK_KEY = r"^[A-Za-z][A-Za-z0-9_\-]{0,79}$"


SMALL_CELL = -1  # a count in 1..minimum-1: not disclosed (it would describe too few subjects)


class SplitCount(_Reply):
    """Rows, distinct subjects and positives of one split; SMALL_CELL where the true count is
    between 1 and the site's minimum (small-cell suppression, `suppress_small_cells`)."""

    rows: int = Field(ge=SMALL_CELL)
    subjects: int = Field(ge=SMALL_CELL)
    positives: int = Field(default=0, ge=SMALL_CELL)

    def suppressed(self, minimum: int) -> SplitCount:
        """This count as it may leave a site whose minimum is `minimum`: every count in
        1..minimum-1 becomes SMALL_CELL, and so do the positives when the negatives (rows minus
        positives) are such a count, since they would give the negatives away."""

        def cell(n: int) -> int:
            return SMALL_CELL if 0 < n < minimum else n

        negatives = self.rows - self.positives
        positives = SMALL_CELL if 0 < negatives < minimum else cell(self.positives)
        return SplitCount(rows=cell(self.rows), subjects=cell(self.subjects), positives=positives)


class TaskReason(_Reply):
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
        # minimum cannot even be built (the site suppresses them first).
        for split, count in self.splits.items():
            for name in ("rows", "subjects", "positives"):
                n = getattr(count, name)
                if 0 < n < self.minimum:
                    raise ValueError(
                        f"split {split}: {name} {n} is below the minimum {self.minimum}: "
                        f"a small cell that may not leave the site (SplitCount.suppressed)"
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
        }[self.kind]
        if self.kind == "too_few_positives":
            minimum = f" (minimum {self.min_positives} positive and negative rows in held_out, {MIN_POSITIVES_KEY}: "
            minimum += f"{SMALL_CELL_RISK})"
        elif self.minimum:
            minimum = f" (minimum {self.minimum} subjects per split"
            minimum += f", {MIN_SUBJECTS_KEY}: {SMALL_CELL_RISK})" if self.kind == "too_few_subjects" else ")"
        else:
            minimum = ""
        if not self.splits:
            return what + (minimum if self.kind == "too_few_positives" else "")

        def n(value: int) -> str:
            return f"<{self.minimum}" if value == SMALL_CELL else str(value)

        parts = [
            f"{s} {n(c.rows)} rows / {n(c.subjects)} subjects / {n(c.positives)} positives"
            for s, c in self.splits.items()
        ]
        return f"{what}{minimum}: " + ", ".join(parts)


class ScoreHistogram(_Reply):
    """One binary task's held-out probe scores at one site, counted per class on the server's
    grid (EvalConfig.score_bins) with small cells merged (healthfm_core/eval/score_histogram.py):
    cell i holds the base bins [bounds[i], bounds[i+1]); every count is 0 or at least `minimum`,
    the site's minimum it was merged to."""

    bounds: list[int] = Field(min_length=2, max_length=MAX_SCORE_BINS + 1)
    positives: list[int] = Field(max_length=MAX_SCORE_BINS)
    negatives: list[int] = Field(max_length=MAX_SCORE_BINS)
    minimum: int = Field(ge=1)

    @model_validator(mode="after")
    def _cells(self) -> ScoreHistogram:
        cells = len(self.bounds) - 1
        if len(self.positives) != cells or len(self.negatives) != cells:
            raise ValueError(
                f"{cells} cells in bounds but {len(self.positives)} positives and {len(self.negatives)} negatives"
            )
        if self.bounds[0] != 0 or any(b <= a for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError(f"bounds {self.bounds[:8]}...: must start at 0 and increase")
        for name in ("positives", "negatives"):
            counts = getattr(self, name)
            if any(n < 0 for n in counts):
                raise ValueError(f"{name}: a negative count")
            # Fails closed, like TaskReason: a cell on 1..minimum-1 rows may not leave a site.
            if small := [n for n in counts if 0 < n < self.minimum]:
                raise ValueError(f"{name}: count {small[0]} is below the minimum {self.minimum}: a small cell")
        return self


class EvalReply(_Reply):
    """A site's answer to an evaluate message: held-out metrics per task key, and for every task
    key without one the reason (`reasons`); `withheld` counts those. Per binary task with a
    metric, its score histogram (`histograms`) or why the site kept it (`histograms_withheld`:
    a class with fewer rows than the site's minimum)."""

    tasks: dict[str, TaskMetrics] = Field(default_factory=dict)
    reasons: dict[str, TaskReason] = Field(default_factory=dict)
    histograms: dict[str, ScoreHistogram] = Field(default_factory=dict)
    histograms_withheld: dict[str, WithheldKind] = Field(default_factory=dict)
    num_examples: int = Field(default=0, ge=0)  # samples embedded
    withheld: int = Field(default=0, ge=0)
    eval_seconds: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_subjects: int = Field(default=0, ge=0)  # the subject budget the site applied (0: every subject)
    # The privacy floor the site applied (its min_report_subjects / min_report_positives; 0: not said)
    min_subjects: int = Field(default=0, ge=0)
    min_positives: int = Field(default=0, ge=0)

    @field_validator("tasks", "reasons")
    @classmethod
    def _task_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > 1024:
            raise ValueError(f"{len(v)} tasks: at most 1024")
        bad = sorted(k for k in v if not re.match(TASK_KEY, k))
        if bad:
            raise ValueError(f"task key {bad[0]!r} is not a task name")
        return v

    @model_validator(mode="after")
    def _disjoint(self, info: ValidationInfo) -> EvalReply:
        if both := sorted(set(self.tasks) & set(self.reasons)):
            raise ValueError(f"task {both[0]!r} has both metrics and a reason")
        self._check_histograms(info)
        return self

    def _check_histograms(self, info: ValidationInfo) -> None:
        """Histograms are a peer's claims: each belongs to a binary task with a metric and adds
        up to its n and positives; with the asked grid in the context (`score_bins`), it covers
        exactly that grid."""
        score_bins = (info.context or {}).get("score_bins")
        for task in sorted(set(self.histograms) | set(self.histograms_withheld)):
            m = self.tasks.get(task)
            if m is None or m.auroc is None:
                raise ValueError(f"field {task}.{_HIST_PREFIX}*: a histogram for a task without an AUROC")
        if both := sorted(set(self.histograms) & set(self.histograms_withheld)):
            raise ValueError(f"field {both[0]}.{_HIST_WITHHELD}.*: the histogram is both sent and withheld")
        for task, h in sorted(self.histograms.items()):
            m = self.tasks[task]
            pos, neg = sum(h.positives), sum(h.negatives)
            if pos + neg != m.n:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}positives/negatives: {pos} + {neg} rows, but {task}.n is {m.n}"
                )
            if m.positives != pos:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}positives: {pos} in all, but {task}.positives is {m.positives}"
                )
            if score_bins is not None and h.bounds[-1] != score_bins:
                raise ValueError(
                    f"field {task}.{_HIST_PREFIX}bounds: value ...{h.bounds[-1]}: the grid asked has {score_bins} bins"
                )

    def to_records(self) -> dict[str, int | float | list[int]]:
        """The MetricRecord METRICS_RECORD of the reply (also the per-site form in rounds.jsonl)."""
        out: dict[str, int | float | list[int]] = {}
        for task, m in self.tasks.items():
            out.update({f"{task}.{name}": v for name in EVAL_METRICS if (v := getattr(m, name)) is not None})
            out[f"{task}.{_TASK_N}"] = m.n
            out.update(
                {f"{task}.{wire}": v for wire, name in _TASK_SCOPE.items() if (v := getattr(m, name)) is not None}
            )
        for task, r in self.reasons.items():
            out[f"{task}.{_WITHHELD}.{r.kind}"] = 1
            out[f"{task}.{_MINIMUM}"] = r.minimum
            if r.min_positives:
                out[f"{task}.{_MIN_POSITIVES}"] = r.min_positives
            for split, c in r.splits.items():
                out.update({f"{task}.{split}.{name}": getattr(c, name) for name in SPLIT_COUNTS})
        for task, h in self.histograms.items():
            out.update({f"{task}.{_HIST_PREFIX}{name}": getattr(h, name) for name in _HIST_FIELDS})
        for task, kind in self.histograms_withheld.items():
            out[f"{task}.{_HIST_WITHHELD}.{kind}"] = 1
        out.update({key: getattr(self, name) for key, name in _EVAL_SCALARS.items()})
        out[_EVAL_TASK_COUNT] = len(self.tasks)
        return out

    @classmethod
    def from_records(
        cls, metrics: Mapping[str, Any], expected: Collection[str] | None = None, score_bins: int | None = None
    ) -> EvalReply:
        """Parse a peer's metrics; raise ValueError naming the field and value that does not parse,
        or a task key outside `expected` (the keys asked), when given, or a score histogram off
        the grid of `score_bins` bins (the EvalConfig's), when given."""
        data: dict[str, Any] = {}
        tasks: dict[str, dict[str, Any]] = {}
        reasons: dict[str, dict[str, Any]] = {}
        histograms: dict[str, dict[str, Any]] = {}
        histograms_withheld: dict[str, Any] = {}
        count = None
        for key, value in metrics.items():
            task, _, rest = key.partition(".")  # task keys hold no dot
            parts = rest.split(".")
            if task and len(parts) == 1 and rest.startswith(_HIST_PREFIX) and rest[len(_HIST_PREFIX) :] in _HIST_FIELDS:
                histograms.setdefault(task, {})[rest[len(_HIST_PREFIX) :]] = value
            elif task and len(parts) == 2 and parts[0] == _HIST_WITHHELD:
                if value != 1 or parts[1] not in WITHHELD_KINDS or task in histograms_withheld:
                    raise ValueError(
                        f"evaluate reply: field {key}: value {value!r}: expected 1, once per task, with a kind "
                        f"among {', '.join(WITHHELD_KINDS)}"
                    )
                histograms_withheld[task] = parts[1]
            elif key in _EVAL_SCALARS:
                data[_EVAL_SCALARS[key]] = value
            elif key == _EVAL_TASK_COUNT:
                count = value
            elif task and len(parts) == 1 and (rest in EVAL_METRICS or rest == _TASK_N):
                tasks.setdefault(task, {})[rest] = value
            elif task and len(parts) == 1 and rest in _TASK_SCOPE:
                tasks.setdefault(task, {})[_TASK_SCOPE[rest]] = value
            elif task and len(parts) == 2 and parts[0] == _WITHHELD:
                if value != 1:
                    raise ValueError(f"evaluate reply: field {key}: value {value!r}: expected 1")
                if "kind" in reasons.get(task, {}):
                    raise ValueError(f"evaluate reply: field {key}: task {task!r} has a second reason")
                reasons.setdefault(task, {})["kind"] = parts[1]
            elif task and rest == _MINIMUM:
                reasons.setdefault(task, {})["minimum"] = value
            elif task and rest == _MIN_POSITIVES:
                reasons.setdefault(task, {})["min_positives"] = value
            elif task and len(parts) == 2 and parts[1] in SPLIT_COUNTS:
                reasons.setdefault(task, {}).setdefault("splits", {}).setdefault(parts[0], {})[parts[1]] = value
            else:
                raise ValueError(f"evaluate reply: unknown metric {key!r} (value {value!r})")
        for task, r in reasons.items():
            if "kind" not in r:
                raise ValueError(
                    f"evaluate reply: field {task}.{_WITHHELD}.*: missing (the reply holds counts "
                    f"for {task!r} but no reason)"
                )
        if expected is not None and (unknown := sorted((set(tasks) | set(reasons)) - set(expected))):
            raise ValueError(f"evaluate reply: unknown task {unknown[0]!r} (asked: {', '.join(expected)})")
        data["tasks"] = tasks
        data["reasons"] = reasons
        if histograms:
            data["histograms"] = histograms
        if histograms_withheld:
            data["histograms_withheld"] = histograms_withheld
        reply = _validate(cls, data, wire=_eval_wire_name, context={"score_bins": score_bins})
        if count is not None and count != len(reply.tasks):
            raise ValueError(
                f"evaluate reply: field {_EVAL_TASK_COUNT}: value {count!r}: the reply holds {len(reply.tasks)} tasks"
            )
        return reply


def _eval_wire_name(loc: tuple[Any, ...]) -> str:
    if len(loc) >= 2 and loc[0] in ("histograms", "histograms_withheld"):
        what = f"{_HIST_PREFIX}{loc[2]}" if loc[0] == "histograms" and len(loc) >= 3 else f"{_HIST_PREFIX}*"
        return f"{loc[1]}.{what}"
    if len(loc) >= 3 and loc[0] == "tasks":
        return f"{loc[1]}.{next((w for w, n in _TASK_SCOPE.items() if n == loc[2]), loc[2])}"
    if len(loc) >= 2 and loc[0] == "reasons":
        rest = [str(x) for x in loc[2:] if x != "splits"]
        if rest[:1] == ["kind"]:
            return f"{loc[1]}.{_WITHHELD}.*"
        return ".".join([str(loc[1]), *rest]) if rest else f"{loc[1]}.*"
    if len(loc) == 2 and loc[0] == "tasks":
        return f"{loc[1]}.*"
    head = str(loc[0]) if loc else ""
    return next((k for k, v in _EVAL_SCALARS.items() if v == head), head)


def aggregate_site_metrics(per_site: Mapping[str, EvalReply]) -> dict[str, float]:
    """n-weighted mean over sites of each "<task>.<metric>" (weight n); "<task>.n" sums.

    An n-weighted mean of per-site AUROCs is not the AUROC of the pooled data (that needs the
    scores, which never leave a site); it is what a federation can compute from site summaries.
    """
    out: dict[str, float] = {}
    for key, values in site_metric_values(per_site).items():
        task = key.partition(".")[0]  # task keys hold no dot
        weights = {site: per_site[site].tasks[task].n for site in values}
        out[key] = sum(weights[s] * v for s, v in values.items()) / sum(weights.values())
    counts: dict[str, float] = {}
    for reply in per_site.values():
        for task, m in reply.tasks.items():
            counts[f"{task}.{_TASK_N}"] = counts.get(f"{task}.{_TASK_N}", 0.0) + float(m.n)
    out.update({k: counts[k] for k in sorted(counts)})
    return out


def site_metric_values(per_site: Mapping[str, EvalReply]) -> dict[str, dict[str, float]]:
    """Each "<task>.<metric>" (aggregate_site_metrics's keys, without "<task>.n") by site: the
    finite values the sites reported."""
    out: dict[str, dict[str, float]] = {}
    for site, reply in sorted(per_site.items()):
        for task, m in reply.tasks.items():
            for name in EVAL_METRICS + MEDS_TAB_METRICS:
                value = getattr(m, _TASK_SCOPE.get(name, name))
                if value is not None and np.isfinite(value):
                    out.setdefault(f"{task}.{name}", {})[site] = float(value)
    return {k: out[k] for k in sorted(out)}


def median_site_metrics(per_site: Mapping[str, EvalReply]) -> dict[str, float]:
    """The robust summary beside the n-weighted mean: per "<task>.<metric>" the median over sites,
    unweighted. One site's claims (its n, its value) move it no further than to a neighbouring
    site's value: with k sites it stays between the honest sites' values while fewer than half lie."""
    return {key: float(np.median(list(values.values()))) for key, values in site_metric_values(per_site).items()}


def largest_row_share(per_site: Mapping[str, EvalReply]) -> dict[str, dict[str, Any]]:
    """Per task, the site with the most held-out rows and its share of the task's rows: the weight
    it has in the n-weighted mean (and in the pooled AUROC), named beside it."""
    rows: dict[str, dict[str, int]] = {}
    for site, reply in sorted(per_site.items()):
        for task, m in reply.tasks.items():
            rows.setdefault(task, {})[site] = m.n
    out: dict[str, dict[str, Any]] = {}
    for task, by_site in sorted(rows.items()):
        site = max(by_site, key=lambda s: (by_site[s], s))
        out[task] = {"site": site, "rows": by_site[site], "share": by_site[site] / sum(by_site.values())}
    return out


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


__all__ = [
    "ARRAYS_RECORD",
    "CAPABILITIES",
    "CAPABILITIES_RECORD",
    "CODE_STATS",
    "CODE_STATS_RECORD",
    "CONFIG_RECORD",
    "EVAL_METRICS",
    "JSON_FIELD",
    "SETUP_RECORD",
    "SHA256_FIELD",
    "MEDS_TAB_METRICS",
    "METRICS_RECORD",
    "SETUP",
    "SCALES_RECORD",
    "SETUP_NEEDED_RECORD",
    "STATUS_RECORD",
    "STATUS_REFUSED",
    "TRAIN_LOSSES",
    "EvalConfig",
    "EvalReply",
    "REASON_KINDS",
    "MIN_POSITIVES_KEY",
    "MIN_SUBJECTS_KEY",
    "SMALL_CELL_RISK",
    "MAX_SCORE_BINS",
    "ScoreHistogram",
    "SplitCount",
    "TaskReason",
    "FederationSetup",
    "PrivacySpend",
    "RoundConfig",
    "SiteCapabilities",
    "TaskMetrics",
    "TrainRecords",
    "TrainReply",
    "aggregate_site_metrics",
    "largest_row_share",
    "median_site_metrics",
    "site_metric_values",
    "federation_modalities",
    "groups_for_modalities",
    "mean_losses",
    "round_metrics",
    "site_seed",
]
