"""A site's side of the federation, without Flower: its data, its policy, its local work.

The ClientApp (client/client_app.py) only decodes messages and calls this. Everything that
leaves the site is produced here, and only as aggregates: capabilities (modalities and subject
counts), code statistics suppressed below the site's minimum subject count, trained weights of
the groups the site holds, and held-out metrics on at least the site's minimum of subjects. The
capabilities, the code statistics and the evaluation's figures leave through the site's release
gate (client/release_gate.py), which holds back what would differ from an earlier release by
fewer than the minimum of subjects.

The site's policy (client/policy.py, node config `policy`) is enforced here whatever the server
asks: its minimum subject count raises the config's minimums; DP is applied when the policy
makes it mandatory or the server asks for it, with the noise at least the policy's, assembled by
healthfm_core.privacy.training.make_private_training: a round whose projected epsilon (the
durable ledger in `state-dir`, healthfm_core/privacy/ledger.py) would pass the cap is refused
(TrainRefused) before any training, otherwise its spend is reserved in the ledger before
training; under DP only healthfm_core.privacy.release's allowlisted metrics leave (no timings,
no actual counts), without DP no dp.* figure; `release` drops the groups the policy keeps local
from a reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from client.legacy_samples import LegacySamples
from client.policy import SitePolicy, load_policy
from client.release_fields import (
    HELD_OUT_FIELD,
    ROWS_FIELD,
    capabilities_candidates,
    code_stats_candidates,
    held_keys,
    held_out_count,
    released_capabilities,
    released_code_stats,
    released_subject_counts,
    rows_count,
    task_candidates,
)
from client.release_gate import ReleaseGate
from client.threads import apply_threads, auto_threads, parse_threads, setup_threads
from healthfm_core.data.sequences.code_stats import DEFAULT_MIN_CODE_SUBJECTS, SiteCodeStats, site_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences, collate, make_loader
from healthfm_core.data.sites.site import Site
from healthfm_core.data.sites.site_cache import cached_sequences, cached_site
from healthfm_core.eval.site_eval import SiteTaskResults, evaluate_site_tasks, task_labels_at_site
from healthfm_core.eval.subject_sample import SubjectSample, draw_sample
from healthfm_core.model.healthfm import HealthFM, init_model
from healthfm_core.privacy.contributions import SiteContributions, site_contributions
from healthfm_core.privacy.ledger import KeyBinding, LedgerError, PrivacyLedger
from healthfm_core.privacy.training import DPRequest, PrivacyRefused, make_private_training
from healthfm_core.protocol import (
    MODALITY_GROUP,
    TRAIN_LOSSES,
    EvalConfig,
    EvalReply,
    FederationSetup,
    PrivacySpend,
    RoundConfig,
    SiteCapabilities,
    TaskReason,
    TrainRecords,
    TrainReply,
    groups_for_modalities,
    site_seed,
)
from healthfm_core.protocol.transport import encode_update
from healthfm_core.terms.groups import group_state_dict, is_encoder, parameter_group
from healthfm_core.terms.report_floor import DEFAULT_MIN_POSITIVES, DEFAULT_MIN_SUBJECTS
from healthfm_core.terms.site_layout import SPLITS
from healthfm_core.terms.task_spec import task_keys
from healthfm_core.train.device import check_device_setting, resolve_device
from healthfm_core.train.local_run import LocalRun
from healthfm_core.train.trainer import train_local

log = logging.getLogger("healthfm.client")

_ROUNDING_STREAM = 0x1B8  # int8 stochastic rounding's stream, beside the round's training seed


class SiteConfig(BaseModel):
    """A site's own settings (Flower node config, kebab-case keys): where its data is and its
    policy, which holds whatever the server asks."""

    model_config = ConfigDict(extra="forbid")

    site_root: Path
    site_name: str | None = None  # default: the site root's directory name
    min_code_subjects: int = Field(
        default=DEFAULT_MIN_CODE_SUBJECTS, ge=1
    )  # codes seen in fewer subjects are never named
    min_report_subjects: int = Field(default=DEFAULT_MIN_SUBJECTS, ge=1)  # no metric on fewer subjects leaves the site
    # no metric leaves whose held_out split has fewer positive (or negative) rows
    min_report_positives: int = Field(default=DEFAULT_MIN_POSITIVES, ge=1)
    # The torch device local training and evaluation run on (healthfm_core/train/device.py): auto
    # (a GPU when this process sees one), cpu, cuda or cuda:N. A site's own setting: the server
    # does not choose a site's hardware. On CUDA training uses bf16 autocast where the GPU has it.
    device: str = "auto"
    policy: Path | None = None  # the site admin's policy file (client/policy.py); None: no policy
    state_dir: Path | None = None  # durable site state (the privacy ledger); required for DP
    # The site key's budget record and fingerprint (healthfm_core/privacy/budget_record.py), set by
    # `join --auth-key`: the ledger then belongs to the key, not to the state directory. None
    # (simulations, no key): bound to the state directory alone.
    privacy_record: Path | None = None
    privacy_key: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    eval_dir: Path | None = None  # the site's predictions (meds-evaluation format); default state_dir/evaluation
    # torch threads (client/threads.py): N, "auto" (the free cores; `join`'s default), or None:
    # the policy's `threads`, else torch's default (simulation).
    threads: int | Literal["auto"] | None = None
    # FedProx's proximal term in the site's local loss (TrainConfig.proximal_mu): run config or
    # node config key `proximal-mu`; 0 (default) trains exactly as without it.
    proximal_mu: float = Field(default=0.0, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device_setting(v, "node config device")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        # Node config values arrive as TOML scalars: an int, or a string ("auto", "4").
        return None if v is None else parse_threads(v)

    # A run's shared cache of the opened site and its sequences (healthfm_core.data.sites.site_cache):
    # the simulation sets a temporary directory per run so every actor reads one preparation.
    sequence_cache: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """From a node config; keys Flower adds (partition-id, num-partitions) are ignored."""
        fields = {name.replace("_", "-"): name for name in cls.model_fields}
        data = {fields[k]: v for k, v in node_config.items() if k in fields}
        if "site_root" not in data:
            raise ValueError(
                f"node config has no 'site-root' (keys: {sorted(node_config)}); start the SuperNode with "
                "--node-config \"site-root='/path/to/site'\""
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"invalid node config: {err}") from None

    @property
    def name(self) -> str:
        return self.site_name or Path(self.site_root).resolve().name

    @model_validator(mode="after")
    def _record_with_key(self) -> SiteConfig:
        if (self.privacy_record is None) != (self.privacy_key is None):
            raise ValueError("privacy-record and privacy-key are set together (by `join --auth-key`) or not at all")
        return self

    @property
    def key_binding(self) -> KeyBinding | None:
        """The site key's budget record, when `join` passed one."""
        if self.privacy_record is None or self.privacy_key is None:
            return None
        return KeyBinding(key_sha256=self.privacy_key, record=self.privacy_record)


class TrainRefused(Exception):
    """The site's policy refuses this train request: nothing was trained, nothing leaves but
    the reason and the site's current privacy spend (`reply`, a refused TrainReply)."""

    def __init__(self, reason: str, dp: PrivacySpend | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = TrainReply.refused(reason, dp)


class SiteRuntime:
    """One open site: data loaded once, a model per setup, local training and evaluation."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.name = config.name
        # Resolved once, at start: `cuda` on a machine without a GPU fails here, before any round.
        self.device = resolve_device(config.device, "node config device")
        self.site: Site = cached_site(config.site_root, config.sequence_cache)
        # The site's train subjects bound the policy's DP delta (at most 1/n), checked at load.
        n_train = int(np.sum(np.asarray(self.site.subject_splits()["split"].to_pylist()) == "train"))
        self.policy: SitePolicy | None = (
            load_policy(config.policy, train_subjects=n_train) if config.policy is not None else None
        )
        floor = self.policy.min_subjects if self.policy is not None else 1
        # The policy's minimum only ever raises the config's (the stricter holds).
        self.min_code_subjects = max(config.min_code_subjects, floor)
        self.min_report_subjects = max(config.min_report_subjects, floor)
        self.min_report_positives = max(
            config.min_report_positives, self.policy.min_positives if self.policy is not None else 1
        )
        # Under a policy a modality on fewer subjects than its minimum is neither reported nor trained.
        self.subject_counts = {m: (n if n >= floor else 0) for m, n in self.site.subject_counts.items()}
        self.groups = groups_for_modalities([m for m in self.site.modalities if self.subject_counts.get(m, 0) > 0])
        # Bound to the site's key under a DP policy (only a DP round writes the ledger); a ledger
        # that is not the key's is refused here and at every round.
        dp_policy = self.policy is not None and self.policy.dp is not None
        self.ledger: PrivacyLedger | None = (
            PrivacyLedger(config.state_dir, config.key_binding if dp_policy else None)
            if config.state_dir is not None
            else None
        )
        if self.ledger is not None and (started := self.ledger.data.new_budget) is not None:
            log.warning(
                "site %s: the privacy ledger %s is a NEW BUDGET started %s (join --new-privacy-budget), "
                "replacing ledger %s; reported to the server",
                self.name,
                self.ledger.path,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started.started_at)),
                started.replaces or "(none known)",
            )
        self._threads_measured: int | None = None  # what auto measured (None: a fixed count or none)
        self._threads_setup: str | None = None  # the setup whose recorded count is applied
        self.threads = self._apply_threads()
        self._sequences: dict[str, SiteSequences] = {}
        self._models: dict[str, tuple[HealthFM, dict[str, torch.Tensor]]] = {}
        self._labels: dict[tuple[str, int, int | str, int, int], dict[str, pa.Table | TaskReason]] = {}
        self._eval_dir: Path | None = None
        self._legacy: LegacySamples | None = None  # opened at the first evaluation
        self._gates: dict[str, ReleaseGate] = {}  # per kind, opened at its first release
        self._contributions: SiteContributions | None = None
        self._splits: dict[str, np.ndarray] | None = None
        log.info("site %s opened: modalities %s, groups %s", self.name, self.site.modalities, self.groups)
        if config.eval_dir is None and config.state_dir is None:
            log.info("site %s: no eval-dir or state-dir: predictions are scored in memory, not kept", self.name)

    def _apply_threads(self) -> int | None:
        """torch threads for this process: node config N > policy N > auto; None: untouched."""
        setting = self.config.threads
        if isinstance(setting, int):
            n, why = setting, "node config"
        elif self.policy is not None and self.policy.threads is not None:
            n, why = self.policy.threads, "policy"
        elif setting == "auto":
            n, why = auto_threads(), "auto: free cores"
            self._threads_measured = n
        else:
            return None
        apply_threads(n)
        log.info("site %s: %d torch thread(s) (%s)", self.name, n, why)
        return n

    def threads_for(self, setup_sha256: str) -> int | None:
        """Under auto with a state dir: the threads this setup trains with at this site, recorded
        at its first run here (client/threads.py, setup_threads), so that a resumed or relaunched
        run of the setup reproduces it. Applied once per setup; the current count otherwise."""
        if self._threads_measured is None or self.config.state_dir is None or self._threads_setup == setup_sha256:
            return self.threads
        n, why = setup_threads(Path(self.config.state_dir), setup_sha256, self._threads_measured)
        if n != self.threads:
            apply_threads(n)
            log.info("site %s: %d torch thread(s) (%s)", self.name, n, why)
        self.threads, self._threads_setup = n, setup_sha256
        return n

    # ------------------------------------------------------------------ round 0

    def capabilities(self) -> SiteCapabilities:
        """Modalities, subjects per modality and rows, through the release gate (a count whose
        change since the last release is too few subjects goes out as it was released)."""
        summary = self.site.summary
        caps = SiteCapabilities(
            site=self.name,
            modalities=self.site.modalities,
            subjects=self.subject_counts,
            rows=summary.n_events + summary.n_wearable_epochs,
        )
        candidates = capabilities_candidates(caps, self.site.modality_subjects, self.contributions())
        decision = self.gate("capabilities").release(candidates)
        self._log_held("capabilities", decision.held)
        return released_capabilities(caps, decision)

    def code_stats(self) -> SiteCodeStats:
        """The suppressed code statistics, through the release gate: a code, channel or total
        whose contributions changed by fewer than min_code_subjects subjects in a cell of its
        releases goes out as it was released last (client/release_gate.py)."""
        stats = site_code_stats(self.site, min_subjects=self.min_code_subjects)
        if 0 < stats.n_wearable_subjects < self.min_code_subjects:
            # Wearable moments over too few subjects are a statistic on too few subjects: withheld.
            stats = stats.model_copy(update={"n_wearable_subjects": 0, "wearables": {}})
        decision = self.gate("code_stats").release(code_stats_candidates(stats, self.contributions()))
        self._log_held("code statistics", decision.held)
        return released_code_stats(stats, decision)

    def released_subject_counts(self) -> dict[str, int]:
        """Subjects per modality as this site's capabilities released them last (released now
        when the record holds none: a site that trains before any setup, as tests do)."""
        counts = released_subject_counts(self.gate("capabilities").released())
        if not counts:
            counts = self.capabilities().subjects
        return counts

    def contributions(self) -> SiteContributions:
        """Every subject's fingerprints of what the site releases (one pass over its data, once)."""
        if self._contributions is None:
            t0 = time.perf_counter()
            self._contributions = site_contributions(self.site)
            log.info("site %s: release fingerprints in %.1f s", self.name, time.perf_counter() - t0)
        return self._contributions

    def gate(self, kind: str) -> ReleaseGate:
        """The release gate of one kind of message (client/release_gate.py): capabilities and
        code_stats at min_code_subjects, evaluation (and the head's figures) at min_report_subjects."""
        if kind not in self._gates:
            minimum = self.min_report_subjects if kind == "evaluation" else self.min_code_subjects
            self._gates[kind] = ReleaseGate(self.config.state_dir, kind, minimum)
        return self._gates[kind]

    def _log_held(self, what: str, held: Iterable[str]) -> None:
        if held := sorted(held):
            log.info(
                "site %s: %s: %d field(s) as released before (fewer than the minimum of subjects changed): %s%s",
                self.name,
                what,
                len(held),
                ", ".join(held[:5]),
                " ..." if len(held) > 5 else "",
            )

    def check_setup(self, setup: FederationSetup) -> None:
        """Refuse a setup this site cannot train under (its policy, not the server's word), or
        whose model lacks a modality of the site's data (its batches would not fit the model)."""
        carried = [m for m in self.site.modalities if m != "genomics" or setup.vocabulary.n_prs_traits > 0]
        if missing := [m for m in carried if m not in setup.modalities]:
            raise ValueError(
                f"site {self.name}: the setup's model holds modalities {setup.modalities}, not this "
                f"site's {missing} (a setup agreed without this site, e.g. a resumed run)"
            )
        if setup.vocabulary.min_subjects < self.min_code_subjects:
            log.warning(
                "site %s: federation vocabulary minimum %d subjects is below the site's %d (the site's own "
                "statistics were suppressed at %d before they left)",
                self.name,
                setup.vocabulary.min_subjects,
                self.min_code_subjects,
                self.min_code_subjects,
            )

    # ------------------------------------------------------------------ data

    def split_ids(self) -> dict[str, np.ndarray]:
        if self._splits is None:
            table = self.site.subject_splits()
            ids = table["subject_id"].to_numpy()
            split = np.asarray(table["split"].to_pylist())
            self._splits = {s: np.sort(ids[split == s]) for s in SPLITS}
        return self._splits

    def sequences(self, setup: FederationSetup) -> SiteSequences:
        key = setup.sha256
        if key not in self._sequences:
            # One setup at a time, tokenised as the setup says (every site alike); prepared once
            # per run when a sequence cache is set.
            self._sequences = {
                key: cached_sequences(self.site, setup.vocabulary, key, self.config.sequence_cache, setup.tokens)
            }
        return self._sequences[key]

    # ------------------------------------------------------------------ model

    def model(self, setup: FederationSetup, arrays: Mapping[str, np.ndarray]) -> HealthFM:
        """The seeded initial model with the received groups loaded. Groups the site does not
        receive keep their initial values; a key of a group the site does not hold is refused."""
        key = setup.sha256
        if key not in self._models:
            model = init_model(setup).to(self.device)
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._models = {key: (model, init)}
        model, init = self._models[key]
        own = set(self.groups)
        state = model.state_dict()
        for name, value in arrays.items():
            if name not in state:
                raise ValueError(f"received unknown parameter {name!r}")
            group = parameter_group(name)
            if group not in own:
                raise ValueError(f"received parameter {name!r} of group {group!r}: this site holds only {sorted(own)}")
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"received {name!r} with shape {tuple(value.shape)}, expected {tuple(state[name].shape)}"
                )
        with torch.no_grad():
            model.load_state_dict(init)  # back to the initialisation: no state carried across rounds
            for name, value in arrays.items():
                state[name].copy_(torch.from_numpy(np.asarray(value)).to(state[name].dtype))
        return model

    # ------------------------------------------------------------------ training

    def dp_request(self, setup: FederationSetup, cfg: RoundConfig) -> DPRequest:
        """What the server asks of this round, in privacy terms."""
        return DPRequest(
            asked=cfg.dp,
            noise_multiplier=cfg.dp_noise_multiplier,
            target_epsilon=cfg.dp_target_epsilon,
            max_grad_norm=cfg.dp_max_grad_norm,
            batch_size=cfg.batch_size,
            steps=cfg.local_steps,
            planned_steps=cfg.rounds * cfg.local_steps,
            round=cfg.round,
            run=setup.sha256[:16],
        )

    def privacy_spend(self) -> PrivacySpend | None:
        """The site's cumulative spend (epsilon, delta), when it has a DP policy and a ledger."""
        dp = self.policy.dp if self.policy is not None else None
        if dp is None or self.ledger is None:
            return None
        try:
            epsilon, started = self.ledger.epsilon(dp.delta), self.new_budget()
        except LedgerError as err:  # no figure to trust; the refusal's reason says why
            log.error("site %s: %s", self.name, err)
            return None
        return PrivacySpend(epsilon=epsilon, delta=dp.delta, epsilon_cap=dp.epsilon_cap, **started)

    def new_budget(self) -> dict[str, float]:
        """PrivacySpend's new_budget_at and replaced_epsilon, when the ledger was started anew
        (`join --new-privacy-budget`): every DP reply says so, for the server's audit log."""
        started = self.ledger.data.new_budget if self.ledger is not None else None
        if started is None:
            return {}
        out = {"new_budget_at": started.started_at}
        if started.replaced_epsilon is not None:
            out["replaced_epsilon"] = started.replaced_epsilon
        return out

    def refuse(self, cfg: RoundConfig, reason: str) -> TrainRefused:
        log.warning("site %s round %d: train request refused: %s", self.name, cfg.round, reason)
        return TrainRefused(reason, self.privacy_spend())

    def train(
        self, setup: FederationSetup, arrays: Mapping[str, np.ndarray], cfg: RoundConfig, *, masked: bool = False
    ) -> TrainReply:
        """One round of local training. Raises TrainRefused (nothing trained) when the site's
        policy refuses the request: DP impossible, too few subjects, the epsilon cap, or a reply
        that would leave in the clear (`masked` False: a plain round's, whatever the config's
        secure_aggregation says) under require_secure_aggregation."""
        t0 = time.perf_counter()
        if self.policy is not None and self.policy.require_secure_aggregation and not masked:
            said = (
                "this run does not ask for it" if not cfg.secure_aggregation else "this round's message is a plain one"
            )
            raise self.refuse(
                cfg,
                f"the site policy requires secure aggregation (require_secure_aggregation) and {said}: "
                "its update would leave in the clear",
            )
        self.threads_for(setup.sha256)
        received = sorted({parameter_group(k) for k in arrays})
        seed = site_seed(cfg.seed, cfg.round, self.name)
        run = LocalRun.of(cfg)  # the federation's settings as every local run maps them
        dataset = run.dataset(self.sequences(setup), self.split_ids()["train"], seed)
        if len(dataset) == 0:
            raise ValueError(f"site {self.name}: no train-split subject has a timed observation")
        if self.policy is not None and len(dataset) < self.policy.min_subjects:
            raise self.refuse(cfg, f"{len(dataset)} train subjects < the policy's minimum {self.policy.min_subjects}")
        model = self.model(setup, arrays)  # received arrays checked before any privacy budget is reserved
        try:  # under DP the round's spend is reserved in the ledger before any training
            private = make_private_training(
                dataset,
                collate,
                self.dp_request(setup, cfg),
                self.policy.dp if self.policy is not None else None,
                self.ledger,
            )
        except PrivacyRefused as err:
            raise self.refuse(cfg, err.reason) from None
        loader: Iterable[Any]
        if private is not None:
            loader, local_step = private.loader, private.local_step
        else:
            loader, local_step = make_loader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=seed), None
        train_cfg = run.train_config(
            cfg.local_steps, seed, log_every=cfg.local_steps, proximal_mu=self.config.proximal_mu
        )
        # Under DP the server may ask that only the modality encoders train (RoundConfig.dp_train):
        # the others are sent back as received, and only the encoders' gradients are noised.
        trainable = is_encoder if private is not None and cfg.dp_train == "encoders" else None
        result = train_local(
            model,
            loader,
            train_cfg,
            groups=received,
            weights_fn=cfg.weights,
            local_step=local_step,
            trainable=trainable,
        )
        losses: dict[str, float] = {}
        grad_norm = None
        spend = None  # without DP the update is not private: it carries no epsilon
        if private is not None:
            # Under DP every received group is noised and sent, and the counts are the expected
            # ones (the Poisson draws are private); losses and gradient norms are withheld: the
            # guarantee does not cover them.
            epsilon = private.commit()
            dp = private.settings
            trained = received
            expected = dp.expected_batch_size * cfg.local_steps
            # A modality group's share: its subject count over the largest, both as the site's
            # capabilities released them (a count not released counts 0: a group of few subjects).
            counts = self.released_subject_counts()
            largest = max([1, *counts.values()])
            num_examples = max(1, round(expected))
            group_examples = {}
            for g in trained:
                share = 1.0 if g == "shared" else counts.get(_modality_of(g), 0) / largest
                group_examples[g] = max(1, round(expected * min(1.0, share)))
            spend = PrivacySpend(
                epsilon=epsilon,
                delta=dp.delta,
                noise_multiplier=dp.noise_multiplier,
                epsilon_cap=self.policy.dp.epsilon_cap if self.policy is not None and self.policy.dp else None,
                **self.new_budget(),
            )
        else:
            # A group none of this round's samples carried did not train: it is not sent back.
            trained = [g for g in received if result.examples_per_group.get(g, 0) > 0]
            num_examples = int(result.examples)
            group_examples = {g: int(result.examples_per_group[g]) for g in trained}
            # Losses on fewer samples than the policy's minimum (samples are distinct subjects within
            # a pass) would describe too few subjects: withheld.
            floor = self.policy.min_subjects if self.policy is not None else 1
            if min(result.examples, len(dataset)) >= floor:
                for loss in TRAIN_LOSSES:
                    values = [h[loss] for h in result.history if loss in h]
                    # An objective with no data here (e.g. alignment at a site without wearables) is 0
                    # at every step: leave it out rather than pull the federation's average towards 0.
                    if values and (loss == "total" or any(v != 0.0 for v in values)):
                        losses[loss] = float(np.mean(values))
                if result.history and "grad_norm" in result.history[-1]:
                    grad_norm = float(result.history[-1]["grad_norm"])
            else:
                log.info(
                    "site %s round %d: losses withheld (%d samples < minimum %d subjects)",
                    self.name,
                    cfg.round,
                    min(result.examples, len(dataset)),
                    floor,
                )
        out = {name: value.numpy() for name, value in group_state_dict(result.group_state, trained).items()}
        last = result.history[-1] if result.history else {}
        rate_min, rate_max = (float(last[key]) if key in last else None for key in ("rate_min", "rate_max"))
        loop_seconds, elapsed = float(result.seconds), time.perf_counter() - t0
        # Under DP no timing leaves: it grows with the secret Poisson batch sizes (TrainReply refuses it).
        train_seconds, client_seconds = (None, None) if private is not None else (loop_seconds, elapsed)
        reply = TrainReply(
            arrays=out,
            num_examples=num_examples,
            group_examples=group_examples,
            losses=losses,
            grad_norm=grad_norm,
            dp=spend,
            rate_min=rate_min,
            rate_max=rate_max,
            train_seconds=train_seconds,
            client_seconds=client_seconds,
        )
        log.info(  # the times stay in this log (a DP or secure reply carries none)
            "site %s round %d: %d steps, %d samples, loss %.4f, groups %s%s; %.2f s (training loop %.2f s)",
            self.name,
            cfg.round,
            cfg.local_steps,
            result.examples,
            losses.get("total", float("nan")),
            trained,
            f", DP epsilon {spend.epsilon:.4g}" if spend is not None else "",
            elapsed,
            loop_seconds,
        )
        return reply

    def release(self, reply: TrainReply) -> TrainReply:
        """What may leave the site of a training reply: the groups the policy keeps local are
        dropped with their counts (called at the last moment, right before the reply)."""
        if self.policy is None or reply.status != "ok":
            return reply
        kept = sorted({parameter_group(k) for k in reply.arrays if not self.policy.allows(parameter_group(k))})
        if not kept:
            return reply
        log.info("site %s: groups %s stay at the site (policy)", self.name, kept)
        arrays = {k: v for k, v in reply.arrays.items() if self.policy.allows(parameter_group(k))}
        if not arrays:
            raise ValueError(
                f"site {self.name}: the policy's groups_allowed {self.policy.groups_allowed} lets none "
                f"of the trained groups {reply.groups} leave"
            )
        counts = {g: n for g, n in reply.group_examples.items() if self.policy.allows(g)}
        return TrainReply.model_validate({**reply.model_dump(), "arrays": arrays, "group_examples": counts})

    def encode(
        self,
        reply: TrainReply,
        received: Mapping[str, np.ndarray],
        cfg: RoundConfig,
        residual: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[TrainRecords, dict[str, float] | None, dict[str, np.ndarray]]:
        """A released reply's records as they leave the site, its arrays in the round's transport
        (healthfm_core/protocol/transport.py); the int8 scales (the reply's SCALES_RECORD; None unless
        int8); and the int8 residual to keep for the next round (error feedback; empty
        otherwise). Called after `release`, on what leaves: post-processing of any DP output, so
        it costs no privacy. `residual` never leaves the site."""
        records = reply.to_records()
        if records.arrays is None:
            return records, None, dict(residual or {})  # refused: nothing sent, nothing left out
        feedback = cfg.transport == "int8" and cfg.error_feedback
        # Its own random stream: the site's training draws stay what they are under any transport.
        rng = np.random.default_rng([site_seed(cfg.seed, cfg.round, self.name), _ROUNDING_STREAM])
        encoded = encode_update(
            records.arrays,
            received,
            cfg.transport,
            rounding=cfg.int8_rounding,
            rng=rng,
            residual=(residual or {}) if feedback else None,
        )
        records = records._replace(arrays=encoded.arrays)
        if not feedback:
            return records, encoded.scales, {}
        # Keys not sent this round keep what they still owe (a group a later round trains again).
        kept = {k: v for k, v in (residual or {}).items() if k not in encoded.arrays}
        return records, encoded.scales, {**kept, **encoded.residual}

    # ------------------------------------------------------------------ evaluation

    def labels(self, cfg: EvalConfig) -> dict[str, pa.Table | TaskReason]:
        """Each asked task key's labels, extracted here (they never leave the site), or the reason
        there are none; with a subject budget, the sample's only (eval_sample); kept while the
        same tasks and budget are asked."""
        key = (
            json.dumps([t.model_dump() for t in cfg.tasks], sort_keys=True),
            cfg.seed,
            cfg.n_per_subject,
            cfg.held_out_rows_per_subject,
            cfg.max_subjects,
        )
        if key not in self._labels:
            subjects = self.eval_sample(cfg).subjects() if cfg.max_subjects else None
            self._labels = {
                key: task_labels_at_site(
                    self.site,
                    cfg.tasks,
                    n_per_subject=cfg.n_per_subject,
                    seed=cfg.seed,
                    subjects=subjects,
                    held_out_rows_per_subject=cfg.held_out_rows_per_subject,
                )  # fmt: skip
            }
        return self._labels[key]

    def eval_sample(self, cfg: EvalConfig) -> SubjectSample:
        """The subjects an evaluation labels and scores: per split, at most cfg.max_subjects, a
        keyed-hash sample with the run's seed as the key (the same every round)."""
        return draw_sample(self.split_ids(), cfg.max_subjects, cfg.seed)

    def eval_dir(self) -> Path | None:
        """Where this site writes its predictions (meds-evaluation format): `eval-dir`, else
        state-dir/evaluation, else nowhere: with neither, predictions are scored in memory and
        not kept (a temporary directory would outlive the process with subject-level rows)."""
        if self._eval_dir is None:
            if self.config.eval_dir is not None:
                self._eval_dir = Path(self.config.eval_dir)
            elif self.config.state_dir is not None:
                self._eval_dir = Path(self.config.state_dir) / "evaluation"
        return self._eval_dir

    def evaluate(self, setup: FederationSetup, arrays: Mapping[str, np.ndarray], cfg: EvalConfig) -> EvalReply:
        """The server's tasks on the site's own splits (healthfm_core.eval.site_eval): labels here,
        a frozen probe fitted on train (C from tuning), held_out predictions written in the
        meds-evaluation format under eval_dir() and scored by meds-evaluation; with
        cfg.max_subjects, on a fixed subject sample drawn here (the ids stay here). A task key whose
        split has fewer subjects than the site's minimum, a single class, or no labels here gets
        only its reason (counted in `withheld`). Between labelling and scoring, the release gate
        (client/release_gate.py) withholds a task key whose rows differ from what the site
        released before by fewer than the minimum of subjects in a cell (near_earlier_sample);
        every key is withheld when a split's sample differs from one a site answered before the
        gate by 1 to minimum - 1 subjects (client/legacy_samples.py)."""
        t0 = time.perf_counter()
        sample = self.eval_sample(cfg)
        near = TaskReason(kind="near_earlier_sample", minimum=self.min_report_subjects)
        if self._legacy is None:
            self._legacy = LegacySamples(self.config.state_dir)
        if (differ := self._legacy.closest(sample.chosen)) is not None and differ[1] < self.min_report_subjects:
            log.warning(
                "site %s: evaluation refused: its %s subjects differ from an evaluation answered before the release "
                "gate by %d, below the minimum %d (min_report_subjects): the two replies' difference would describe them",
                self.name,
                *differ,
                self.min_report_subjects,
            )
            keys = task_keys(cfg.tasks)
            return EvalReply(
                reasons=dict.fromkeys(keys, near),
                withheld=len(keys),
                eval_seconds=time.perf_counter() - t0,
                max_subjects=cfg.max_subjects,
                min_subjects=self.min_report_subjects,
                min_positives=self.min_report_positives,
            )
        labels = self.labels(cfg)
        kept = {k: t if isinstance(t, TaskReason) else sample.keep(t) for k, t in labels.items()}
        site, gate, minimum = self.contributions(), self.gate("evaluation"), self.min_report_subjects
        extra = {HELD_OUT_FIELD: held_out_count(self.split_ids(), minimum)}
        decision = gate.release(task_candidates(kept, self._split_lookup(), site, minimum, extra=extra))
        if held := held_keys(decision):
            log.warning(
                "site %s: %s withheld: their rows differ from what the site released before by fewer than the "
                "minimum %d subjects (min_report_subjects) in a cell of the release gate",
                self.name,
                sorted(held),
                minimum,
            )
        self.threads_for(setup.sha256)
        gated = {k: near if k in held else t for k, t in labels.items()}
        result = self.evaluate_tasks(setup, self.model(setup, arrays), cfg, labels=gated)
        embedded = [t for k, t in kept.items() if k in result.metrics and not isinstance(t, TaskReason)]
        num_examples = gate.release(rows_count(embedded, site, minimum)).values[ROWS_FIELD]
        available = decision.values[HELD_OUT_FIELD]
        tasks = {
            k: m.model_copy(update={"available_subjects": _available(available, m.subjects)})
            for k, m in result.metrics.items()
        }
        return EvalReply(
            tasks=tasks,
            reasons=result.reasons,
            histograms=result.histograms,
            histograms_withheld=result.histograms_withheld,
            num_examples=int(num_examples or 0),
            withheld=len(result.reasons),
            eval_seconds=time.perf_counter() - t0,
            max_subjects=cfg.max_subjects,
            min_subjects=self.min_report_subjects,
            min_positives=self.min_report_positives,
        )

    def evaluate_tasks(
        self,
        setup: FederationSetup,
        model: torch.nn.Module,
        cfg: EvalConfig,
        *,
        out_dir: Path | None = None,
        labels: Mapping[str, pa.Table | TaskReason] | None = None,
        sampled: bool = True,
        reuse_patches: bool = True,
        shared_passes: bool = True,
        progress: bool = False,
    ) -> SiteTaskResults:
        """evaluate_site_tasks on this site with `cfg`'s settings: the one place a runtime's data,
        splits, minimum and eval directory meet a request. `labels` default to self.labels(cfg);
        `sampled` False evaluates without a subject sample, `reuse_patches` False encodes every
        patch where asked and `shared_passes` False runs one forward pass per row (all three: the
        straightforward paths tests and benchmarks compare against); `out_dir` defaults to
        eval_dir() (None: scored in memory, nothing written); `progress`: bars for the embedding
        and the fits."""
        return evaluate_site_tasks(
            self.name,
            self.site,
            self.sequences(setup),
            model,
            cfg,
            self._split_lookup(),
            self.min_report_subjects,
            out_dir if out_dir is not None else self.eval_dir(),
            labels=labels if labels is not None else self.labels(cfg),
            reuse_patches=reuse_patches,
            sample=self.eval_sample(cfg) if sampled else None,
            shared_passes=shared_passes,
            min_positives=self.min_report_positives,
            progress=progress,
        )

    def _split_lookup(self):
        ids = self.split_ids()
        all_ids = np.concatenate([ids[s] for s in SPLITS])
        names = np.concatenate([np.full(len(ids[s]), s, dtype=object) for s in SPLITS])
        order = np.argsort(all_ids)
        all_ids, names = all_ids[order], names[order]

        def lookup(subjects: np.ndarray) -> np.ndarray:
            pos = np.clip(np.searchsorted(all_ids, subjects), 0, max(len(all_ids) - 1, 0))
            found = all_ids[pos] == subjects if len(all_ids) else np.zeros(len(subjects), dtype=bool)
            return np.where(found, names[pos], "none")

        return lookup


def _available(released: int | None, scored: int | None) -> int | None:
    """The held-out subjects a sample was drawn from, as released (held: the last released
    count, raised to the subjects scored, themselves released, when a refresh left it behind)."""
    if released is None:
        return None
    return max(int(released), scored or 0)


def _modality_of(group: str) -> str:
    return {g: m for m, g in MODALITY_GROUP.items()}.get(group, group)


# One runtime per site root and process: a simulation's worker process serves several sites,
# a deployed site's warm ClientApp (client/deploy/warm_clientapp.py) every message of a run; data is
# loaded once, not per message. Keyed by the policy file's content too: an edited policy takes
# effect at the next message (the runtime is rebuilt; the ledger is on disk).
_RUNTIMES: dict[tuple[str, str, str], SiteRuntime] = {}
_LOCK = threading.Lock()


def policy_digest(config: SiteConfig) -> str:
    """sha256 of the policy file's bytes ("" without a policy; "unreadable" when it cannot be
    read: the runtime's own load then names the problem)."""
    if config.policy is None:
        return ""
    try:
        return hashlib.sha256(Path(config.policy).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def get_runtime(config: SiteConfig) -> SiteRuntime:
    site_key = str(Path(config.site_root).resolve())
    key = (site_key, config.model_dump_json(), policy_digest(config))
    with _LOCK:
        if key not in _RUNTIMES:
            # A stale runtime of this site (its policy changed) is dropped, not kept beside the new one.
            for old in [k for k in _RUNTIMES if k[0] == site_key and k[1] == key[1]]:
                del _RUNTIMES[old]
            _RUNTIMES[key] = SiteRuntime(config)
        return _RUNTIMES[key]


def drop_runtimes() -> None:
    """Forget every runtime of this process (their data, sequences and models)."""
    with _LOCK:
        _RUNTIMES.clear()
