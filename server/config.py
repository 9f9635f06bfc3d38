"""The federation's run configuration as the server reads it: FederationConfig (one run), the
DP it asks of the sites (PrivacyRequest), the optional server optimiser, and which fields a
resumed run may change.

Simulation builds a FederationConfig directly; a deployed run (`flwr run`) builds one from
Flower's flat run config (FederationConfig.from_run_config).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sequences.code_stats import DEFAULT_MIN_CODE_SUBJECTS
from healthfm_core.first_error import first_error
from healthfm_core.protocol import DEFAULT_SCORE_BINS, MAX_SCORE_BINS, EvalConfig, ScoreScale
from healthfm_core.protocol.secure_records import MAX_KEY_ROUNDS
from healthfm_core.protocol.transport import Downlink, Rounding, Transport
from healthfm_core.terms.model_config import ModelConfig, load_model_config
from healthfm_core.terms.task_spec import TaskSpec
from healthfm_core.terms.token_settings import (
    DEFAULT_MAX_CODES_PER_TOKEN,
    DEFAULT_TOKEN_WINDOW_DAYS,
    MaxCodesPerToken,
    TokenSettings,
    TokenWindowDays,
)
from secure_aggregation.config import DEFAULT_MIN_HOLDERS, MAX_HOLDERS
from server.clipping import DEFAULT_NORM_CLIP_FACTOR
from server.influence import DEFAULT_NORM_HISTORY_FACTOR, DEFAULT_NORM_HISTORY_ROUNDS, DEFAULT_NORM_STEP_FACTOR
from server.limits import DEFAULT_REPLY_SIZE_MARGIN

# The federated evaluation's subject budget (eval_max_subjects), from the cost model, not the
# metrics. Default scenario, wearable clinic, default eval_tasks (the costliest site), `tiny`,
# measured with `python benchmarks/eval_cost.py SITES --max-subjects 85` (2 cores, 2026-11-23): a
# round of 30 steps x batch 16 took 4.7 s (median of 3); the full evaluation embedded 13,359 rows
# of 1,995 subjects in 9,356 shared passes in 22.3 s (11 ms per subject, linear in subjects:
# mostly encoding each distinct wearable patch once); every subject's labels took 4.7 s, once per
# run. A budget c samples c subjects in each of the 3 splits, 3c in all:
#   later evaluations  3c x 11 ms <= 4.7 s  =>  c <= 142
#   the first one also labels the sample (ACES reads every shard whatever c is): at c = 85,
#   measured 1.5 s of labels + 2.7 s = 4.2 s against the 4.7 s round
# At c = 85 the clinic scores 7 of the 9 tasks (every subject: 8; onset_t2d_90d has one class
# among 85 held-out subjects) and a site with rarer outcomes loses more, so the default scores
# every subject (a coordinator asking for metrics expects all of them); a budget is for watching
# training every few rounds (docs/coordinator.md).
DEFAULT_EVAL_MAX_SUBJECTS = 0
# The federated evaluation's default tasks, defined here only (the simulations' configs and the
# deployed ServerApp's run config take FederationConfig's default): each onset at 365 and 90 days,
# then the wearable regression (the order the sites receive them in).
DEFAULT_EVAL_TASKS = (
    *(f"onset_{d}_365d" for d in ("t2d", "cad", "hypertension", "copd")),
    *(f"onset_{d}_90d" for d in ("t2d", "cad", "hypertension", "copd")),
    "wearable_resting_hr",
)
# Config keys a resumed run may change; any other difference from the checkpoint's is refused.
RESUMABLE_CHANGES = {
    "rounds",
    "resume",
    "resume_from",
    "stop_after_round",
    "out_dir",
    "timeout_s",
    "evaluate_every",
    "eval_tasks",
    "eval_n_boot",
    "eval_meds_tab",
    "eval_max_subjects",
    "eval_score_bins",
    "eval_score_scale",
    "eval_n_per_subject",
    "keep_checkpoints",
    "min_nodes",
    "max_reply_bytes",
    "reply_size_margin",
    "registry",
    # A coordinator may tighten (or loosen) the influence bounds of a run it resumes (e.g. after
    # seeing a site's rejected replies); the norm history itself is checkpointed.
    "norm_outlier_factor",
    "max_update_norm",
    "norm_step_factor",
    "norm_history_factor",
    "norm_history_rounds",
    "norm_clip_factor",
    # What the server writes down, not what the run computes.
    "record_transcript",
}


class ServerOptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = Field(default=0.01, gt=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


class PrivacyRequest(BaseModel):
    """The DP the server asks of every site (null target and noise: no DP asked).

    A site's policy still rules: it adds DP when its policy makes it mandatory, takes the larger
    of its own and the server's noise, and refuses a round over its epsilon cap or when it has no
    DP budget at all. `delta` is what the server asks; the delta a site accounts at is its
    policy's (RoundConfig carries no delta), reported back as dp.delta and checked here."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    target_epsilon: float | None = Field(default=None, gt=0)  # over the run's rounds x local steps
    noise_multiplier: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    # What DP trains at every site (issue 68): "all" of its groups, or "encoders": only the modality
    # encoders (RoundConfig.dp_train), the parameters that must move; the rest stay the global model's.
    train: Literal["all", "encoders"] = "all"

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyRequest:
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(
                f"privacy: set target_epsilon ({self.target_epsilon}) or noise_multiplier "
                f"({self.noise_multiplier}), not both"
            )
        return self

    @property
    def requested(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    def round_fields(self) -> dict[str, Any]:
        """The RoundConfig fields of this request."""
        if not self.requested:
            return {"dp": False}
        return {
            "dp": True,
            "dp_target_epsilon": self.target_epsilon,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_max_grad_norm": self.max_grad_norm,
            "dp_train": self.train,
        }

    def describe(self) -> str:
        if not self.requested:
            return "no DP asked"
        level = (
            f"target epsilon {self.target_epsilon:g}"
            if self.target_epsilon is not None
            else f"noise multiplier {self.noise_multiplier:g}"
        )
        trained = "" if self.train == "all" else ", only the modality encoders trained"
        return f"DP asked: {level}, delta {self.delta:g}, clipping norm {self.max_grad_norm:g}{trained}"


class FederationConfig(BaseModel):
    """One federated run, as the server sees it."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    model: ModelConfig
    rounds: int = Field(default=3, ge=1)
    local_steps: int = Field(default=10, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=16, gt=0)
    max_events: int = Field(default=256, gt=0)
    max_patches: int = Field(default=32, gt=0)
    # How every site turns EHR rows into tokens (sent in the FederationSetup): a token per
    # `token_window_days` of record (0: per timestamp), at most `max_codes_per_token` codes.
    token_window_days: TokenWindowDays = DEFAULT_TOKEN_WINDOW_DAYS
    max_codes_per_token: MaxCodesPerToken = DEFAULT_MAX_CODES_PER_TOKEN
    seed: int = 0
    # How sites send their arrays (healthfm_core/protocol/transport.py): fp32, fp16 (the server upcasts),
    # int8 (per-tensor scaled updates; the strategy de-quantises before averaging).
    transport: Transport = "fp32"
    int8_rounding: Rounding = "stochastic"
    error_feedback: StrictBool = True  # int8: each site carries its rounding residual to its next round
    # How train messages carry the global arrays (healthfm_core/protocol/transport.py): fp32, or fp16
    # (half the bytes; the server keeps the float32 master and runs each round against the fp16 values).
    downlink: Downlink = "fp32"
    min_nodes: int = Field(default=1, ge=1)  # wait for this many sites before round 0
    min_sites_per_group: int = Field(default=1, ge=1)
    # Bounded influence (ModalityAwareFedAvg's docstring, server/influence.py): a reply's counts are
    # at most local_steps x batch_size; each group's update norm at most the smallest of
    # norm_step_factor x lr x local_steps x (sqrt(values) + weight_decay x |w|) (an AdamW step moves a
    # value by at most 7.27 lr; honest norms measured <= 0.78 lr x steps x sqrt(values)),
    # norm_history_factor x the median of the group's accepted norms over its last
    # norm_history_rounds rounds (honest: <= 1.27 x), and max_update_norm (none by default); and
    # norm_outlier_factor x the others' median where >= 2 others hold the group. Below 1 a factor
    # would reject honest sites (a first Adam step alone moves each value by about lr).
    norm_outlier_factor: float = Field(default=10.0, gt=1, allow_inf_nan=False)
    max_update_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    norm_step_factor: float = Field(default=DEFAULT_NORM_STEP_FACTOR, gt=1, allow_inf_nan=False)
    norm_history_factor: float = Field(default=DEFAULT_NORM_HISTORY_FACTOR, gt=1, allow_inf_nan=False)
    norm_history_rounds: int = Field(default=DEFAULT_NORM_HISTORY_ROUNDS, ge=1, le=1000)
    # Influence over rounds (server/clipping.py): in a group with 3+ holders an update over
    # norm_clip_factor x the median of the other holders' norms is scaled down to it (honest:
    # measured 0.62-1.62 x, above 1.5 in 2 of 48, a DP site's; a site pushing one way every round
    # then adds up to about this factor x a coherent honest site). None (0 in a run config): off,
    # every round FedAvg of what passed the bounds above. At least 1: below, the median honest
    # site is clipped.
    norm_clip_factor: float | None = Field(default=DEFAULT_NORM_CLIP_FACTOR, ge=1, allow_inf_nan=False)
    server_optimizer: ServerOptimizerConfig | None = None
    vocab_min_subjects: int = Field(default=DEFAULT_MIN_CODE_SUBJECTS, ge=1)
    evaluate_every: int = Field(default=0, ge=0)  # 0: only after the last round
    # Task files (configs/tasks/<name>.yaml by name, or a path), `site:<name>` for labels the sites
    # supply, or the synthetic tasks' names (onset_t2d_365d: t2d.yaml at 365 days; wearable_*).
    # Empty: no federated evaluation (a job that probes the model itself skips its cost).
    eval_tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_TASKS))
    eval_n_boot: int = Field(default=100, ge=10)
    # Each site also fits MEDS-Tab (XGBoost on tabularised windows) beside the probe, on the same rows.
    eval_meds_tab: StrictBool = True
    # The federated evaluation's subject budget: each site scores, per task and split, every row of
    # at most this many subjects (a fixed keyed-hash sample, the same every round; the probe is
    # fitted on the train split's sample). 0: every subject (e.g. a final evaluation).
    eval_max_subjects: int = Field(default=DEFAULT_EVAL_MAX_SUBJECTS, ge=0, strict=True)
    # Each site's released histogram of its held-out scores per binary task: this many bins on
    # this scale (healthfm_core/eval/score_histogram.py), pooled into a federation-wide AUROC
    # per task (healthfm_core/eval/federation_auroc.py). 0: no histograms, no pooled AUROC.
    eval_score_bins: int = Field(default=DEFAULT_SCORE_BINS, ge=0, le=MAX_SCORE_BINS)
    eval_score_scale: ScoreScale = "logit"
    # Per task key, at most this many of a subject's ACES rows in train and tuning (what the probe is
    # fitted and tuned on), or "all"; held_out is scored on every labelled row (EvalConfig.n_per_subject).
    eval_n_per_subject: Annotated[int, Field(ge=1, le=64)] | Literal["all"] = 4
    timeout_s: float = Field(default=3600.0, gt=0)  # the most any exchange (a round) waits for replies
    max_reply_bytes: int = Field(default=0, ge=0)  # 0: reply_size_margin x the model's bytes (server/limits.py)
    reply_size_margin: float = Field(default=DEFAULT_REPLY_SIZE_MARGIN, ge=1)
    resume: StrictBool = False
    resume_from: str = ""  # with resume: this checkpoint directory ("" = the latest under out_dir)
    stop_after_round: int | None = Field(default=None, ge=1)  # stop early (resume later)
    keep_checkpoints: int = Field(default=2, ge=1)
    privacy: PrivacyRequest = Field(default_factory=PrivacyRequest)
    # The coordinator's site registry (server/deploy/registry.py): only its node ids take part, each under
    # its registered name. None (simulation): every node the grid has.
    registry: Path | None = None
    # Secure aggregation (SecAgg+, secure_aggregation/; server/secure_round.py): the server learns
    # only per-group sums, never one site's update. `secure-aggregation` in the run config. A group
    # with fewer surviving holders than secagg_min_holders (at least min_sites_per_group) is not
    # unmasked that round: carried forward. The Shamir threshold is the smallest majority of the
    # sampled sites at least secagg_threshold_fraction of them (more dropouts fail the round). Each
    # site clips a group's update to the step bound (norm_step_factor; max_update_norm where set)
    # before masking. The field: 16 bits (2 bytes a value) or 32 (finer quantisation, twice the bytes).
    secure_aggregation: StrictBool = False
    # Each site's own floor may refuse it (client/policy.py).
    secagg_min_holders: int = Field(default=DEFAULT_MIN_HOLDERS, ge=1, le=MAX_HOLDERS)
    secagg_threshold_fraction: float = Field(default=0.5, ge=0.5, le=1.0, allow_inf_nan=False)
    secagg_field_bits: Literal[16, 32] = 16
    # The rounds one keys-and-shares exchange makes keys for: this round and the next
    # secagg_key_rounds - 1 (each its own keys), so a steady run's secure round has two exchanges
    # (mask, unmask) instead of four; a change of sample or a site missing a stage starts afresh
    # (server/secure_round.py, KeyRounds). 1: every round exchanges its own keys.
    secagg_key_rounds: int = Field(default=8, ge=1, le=MAX_KEY_ROUNDS)
    # Every message the ServerApp receives in a round, and the state it keeps, written under
    # out_dir/transcript/round-<n>/ (server/transcript.py) for the attack replay
    # (`python -m secure_aggregation.replay`). `record-transcript` in the run config; off by default:
    # a plain round's transcript holds every site's update in the clear.
    record_transcript: bool = Field(default=False, strict=True)

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        try:  # every entry names a task file (or site:<name>); its ACES text is checked
            resolve_tasks(tasks)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        return tasks

    @property
    def tokens(self) -> TokenSettings:
        """The tokenisation the run's setup carries to every site."""
        return TokenSettings(token_window_days=self.token_window_days, max_codes_per_token=self.max_codes_per_token)

    def eval_task_specs(self) -> list[TaskSpec]:
        """The evaluation's tasks as the sites receive them (definitions, not names)."""
        return resolve_tasks(self.eval_tasks)

    def eval_config(self, rnd: int, setup_sha256: str) -> EvalConfig:
        """The evaluate message's config after round `rnd` (a release records the last one, so a
        site's own probe reproduces the run's evaluation)."""
        return EvalConfig(
            round=rnd,
            tasks=self.eval_task_specs(),
            setup_sha256=setup_sha256,
            batch_size=max(self.batch_size, 32),
            max_events=self.max_events,
            max_patches=self.max_patches,
            n_boot=self.eval_n_boot,
            meds_tab=self.eval_meds_tab,
            seed=self.seed,
            max_subjects=self.eval_max_subjects,
            score_bins=self.eval_score_bins,
            score_scale=self.eval_score_scale,
            n_per_subject=self.eval_n_per_subject,
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """From Flower's flat run config (pyproject [tool.flwr.app.config], `--run-config`):
        kebab-case keys; `model` a config name or YAML path; `eval-tasks` comma-separated;
        `server-optimizer-lr` > 0 turns the FedAdam-style server step on."""
        data: dict[str, Any] = {}
        opt: dict[str, Any] = {}
        privacy: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name.startswith("server_optimizer_"):
                opt[name[len("server_optimizer_") :]] = value
            elif name.startswith("privacy_"):
                # A run config holds no null: 0 or "" leaves a privacy field unset.
                if value not in (0, "", None):
                    privacy[name[len("privacy_") :]] = value
            elif name == "model":
                data["model"] = load_model_config(str(value))
            elif name == "eval_tasks":
                data["eval_tasks"] = [t.strip() for t in str(value).split(",") if t.strip()]
            elif name in ("stop_after_round", "max_update_norm", "registry") and value in (0, "", None):
                continue
            elif name == "norm_clip_factor" and value in (0, "", None):
                data[name] = None  # off: a run config holds no null
            else:
                data[name] = value
        if opt.get("lr", 0):
            data["server_optimizer"] = opt
        if privacy:
            data["privacy"] = privacy
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(first_error(err, "invalid run config")) from None


def _field_defaults() -> dict[str, Any]:
    """FederationConfig's optional fields at their defaults, as model_dump(mode="json") writes them."""
    out = {}
    for name, field in FederationConfig.model_fields.items():
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out


# Keys a checkpoint's saved run config may hold that FederationConfig no longer has, each implied
# by a field it still has: fp16_transport always equalled transport == "fp16".
REMOVED_FIELDS = frozenset({"fp16_transport"})


def saved_run_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved run config as FederationConfig reads it now (REMOVED_FIELDS dropped)."""
    return {k: v for k, v in saved.items() if k not in REMOVED_FIELDS}


def resume_conflicts(config: FederationConfig, saved: Mapping[str, Any]) -> list[str]:
    """The fields a resumed run changes that it may not (RESUMABLE_CHANGES may change), against
    the run config saved in the checkpoint."""
    now = config.model_dump(mode="json")
    # A checkpoint written before a field existed ran with that field's default.
    saved = saved_run_config(saved)
    saved = {**{k: v for k, v in _field_defaults().items() if k not in saved}, **saved}
    return sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k))


__all__ = [
    "DEFAULT_EVAL_MAX_SUBJECTS",
    "DEFAULT_EVAL_TASKS",
    "RESUMABLE_CHANGES",
    "FederationConfig",
    "PrivacyRequest",
    "ServerOptimizerConfig",
    "resume_conflicts",
    "saved_run_config",
]
