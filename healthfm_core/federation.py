"""What the server and the sites agree on: message kinds, per-round configs, the setup.

client/ and server/ never import each other (DESIGN.md), so the schema of every message they
exchange lives here, as pydantic models with a flat form for Flower's ConfigRecord (this module
does not import flwr: records are plain mappings here).

Exchange (one run):
  query.capabilities  server -> site: nothing;  site -> server: SiteCapabilities (no rows)
  query.code_stats    server -> site: nothing;  site -> server: SiteCodeStats JSON (suppressed
                      below the site's own minimum subject count, aggregate only)
  query.setup         server -> site: FederationSetup JSON (vocabulary, model config, init seed, the
                      modalities the model holds: the union of the sites');
                      the site keeps it for the run and acknowledges its sha256
  train               server -> site: its groups' arrays + RoundConfig; site -> server: the groups
                      it trained + MetricRecord (num-examples, num-examples.<group>, loss.<name>;
                      with DP dp.epsilon / dp.delta, the site's cumulative spend), or - when the
                      site's policy refuses the request - no arrays, a ConfigRecord "status"
                      {status: "refused", reason} and the MetricRecord (dp.* only)
  evaluate            server -> site: its groups' arrays + EvalConfig; site -> server: held-out
                      metrics per task, those on fewer subjects than the site's minimum withheld
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from healthfm_core.data.layout import MODALITIES
from healthfm_core.data.vocab import Vocabulary
from healthfm_core.model.config import ModelConfig
from healthfm_core.model.groups import GROUPS
from healthfm_core.model.healthfm import HealthFM, model_modalities
from healthfm_core.model.objectives import ObjectiveWeights

CAPABILITIES = "query.capabilities"
CODE_STATS = "query.code_stats"
SETUP = "query.setup"

MODALITY_GROUP = {"ehr": "ehr", "wearables": "wearables", "genomics": "genomics"}
LOSS_PREFIX = "loss."
# A train reply's status (ConfigRecord STATUS_RECORD): a refused request carries no arrays.
STATUS_RECORD = "status"
STATUS_REFUSED = "refused"
DP_EPSILON = "dp.epsilon"  # cumulative epsilon of the site (every round of every run)
DP_DELTA = "dp.delta"
DP_NOISE = "dp.noise-multiplier"
WEIGHT_PREFIX = "weight."


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
        return out

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> SiteCapabilities:
        subjects = {k[len("subjects."):]: v for k, v in record.items() if k.startswith("subjects.")}
        return cls(site=record.get("site", ""), modalities=list(record.get("modalities", [])), subjects=subjects)


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
    """

    vocabulary: Vocabulary
    model: ModelConfig
    model_seed: int = 0
    modalities: list[str]

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
            raise ValueError(f"FederationSetup.modalities={self.modalities} must be distinct and in the order "
                             f"{list(MODALITIES)} (expected {list(resolved)})")
        return self

    @property
    def groups(self) -> list[str]:
        """The parameter groups the model holds: shared plus one per modality."""
        return groups_for_modalities(self.modalities)

    def to_json(self) -> str:
        return self.model_dump_json()

    @property
    def sha256(self) -> str:
        # Canonical form: sorted keys, so the hash does not depend on field order; modalities
        # left out when they are the default, so setups written before the field existed (server
        # checkpoints) keep their hash.
        data = json.loads(self.to_json())
        if self.modalities == list(model_modalities(self.vocabulary.n_prs_traits)):
            data.pop("modalities")
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

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
    fp16_transport: bool = False
    setup_sha256: str
    weights: ObjectiveWeights = ObjectiveWeights()
    # Differential privacy asked by the server; a site's policy may still demand it, raise the
    # noise or refuse the round (the site decides).
    dp: bool = False
    dp_noise_multiplier: float | None = Field(default=None, gt=0)
    dp_target_epsilon: float | None = Field(default=None, gt=0)  # over this run's planned steps
    dp_max_grad_norm: float | None = Field(default=None, gt=0)

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


class EvalConfig(_Strict):
    """The evaluate message's config: which tasks, how to build samples, the probe's bootstrap."""

    round: int = Field(ge=0)
    tasks: list[str]
    setup_sha256: str
    batch_size: int = Field(default=64, gt=0)
    max_events: int = Field(default=256, gt=0)
    max_patches: int = Field(default=32, gt=0)
    n_boot: int = Field(default=100, ge=10)
    seed: int = 0

    def to_flat(self) -> dict[str, Any]:
        return _flat(self)

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> EvalConfig:
        return cls.model_validate(_unflat(record, list(cls.model_fields)))


# Per-task metric names in an evaluate reply: "<task>.<metric>"; "<task>.n" is the held-out sample
# count used to weight the server's average.
EVAL_METRICS = ("auroc", "auprc", "ece", "r2")


def aggregate_site_metrics(per_site: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """n-weighted mean over sites of each "<task>.<metric>" (weight "<task>.n"); "<task>.n" sums.

    An n-weighted mean of per-site AUROCs is not the AUROC of the pooled data (that needs the
    scores, which never leave a site); it is what a federation can compute from site summaries.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metrics in per_site.values():
        for key, value in metrics.items():
            task, _, name = key.rpartition(".")
            if not task or name not in EVAL_METRICS or not np.isfinite(value):
                continue
            n = float(metrics.get(f"{task}.n", 0.0))
            if n <= 0:
                continue
            sums[key] = sums.get(key, 0.0) + n * float(value)
            weights[key] = weights.get(key, 0.0) + n
        for key, value in metrics.items():
            if key.endswith(".n"):
                counts[key] = counts.get(key, 0.0) + float(value)
    out = {k: sums[k] / weights[k] for k in sorted(sums)}
    out.update({k: counts[k] for k in sorted(counts)})
    return out


__all__ = [
    "CAPABILITIES",
    "CODE_STATS",
    "EVAL_METRICS",
    "EvalConfig",
    "FederationSetup",
    "DP_DELTA",
    "DP_EPSILON",
    "DP_NOISE",
    "LOSS_PREFIX",
    "RoundConfig",
    "SETUP",
    "STATUS_RECORD",
    "STATUS_REFUSED",
    "SiteCapabilities",
    "aggregate_site_metrics",
    "federation_modalities",
    "groups_for_modalities",
    "site_seed",
]
