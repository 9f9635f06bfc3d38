"""The coordinator's side of the federated task head: a Flower ServerApp (Message API, flwr 1.41)
that, after pretraining, trains a task's logistic head across the sites on the release's frozen
embeddings; labels and rows never leave a site.

For each label key, healthfm_core/eval/federated_head.run_federated_head drives the stages over
`FlowerSites` (messages: healthfm_core/protocol/head.py; the site's handlers: client/head_app.py):

  1. query.head_stats: each site's train count, positives, sums -> the pooled standardiser;
  2. query.head_setup: the standardiser -> each site's smoothness -> the step size of each C;
  3. for each C of the grid (strongest penalty first, warm-started), `rounds` rounds of
     train.head: the global head out, each site's head back, averaged with ModalityAwareFedAvg's
     rule (server/head_average.py);
  4. evaluate.head: each site's tuning log-loss -> the C with the lowest pooled loss is kept.

A site that refuses (its minimums, another release, no labels) or errs is left out of that stage
and logged; a reply that does not parse (wrong width, NaN, a count that changed) is rejected with
one log line naming the site and field, and the head goes on without it. Each head is written to
OUT/heads/<key>.json (+ .safetensors) in healthfm_core/eval/saved_head.py's format, so a site's
`client.py predict --head` applies it; OUT/heads.json summarises the sites, counts and tuning
losses per C, the DP asked, each site's refusal and its cumulative epsilon; OUT/head.log holds
the rounds; OUT/head_rounds.jsonl one line per train.head round (its sites, their epsilon).

DP (`HeadRunConfig.privacy`, the pretraining's PrivacyRequest): every train.head request asks
for DP-SGD per subject at the site (healthfm_core/privacy/head.py), spending from its durable
ledger under its policy's cap. A site refuses a round it cannot train under DP (no budget, the
cap reached): it takes no further part, and heads.json names it, the reason and its epsilon. A
reply without its epsilon while DP was asked is rejected (never averaged), and so is one with an
epsilon where DP was not asked (its site takes no further part: a DP claim does not lift the
step bound, server/head_bounds.py). A head averaged from 1-2 sites' updates is named under their
control (heads.json `under_holders_control`).

Run on Flower's simulation engine: `python -m simulations.federated_head_run` (or
`python -m simulations.task_head ... --over-flower`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.data.labels.task_spec import resolve_tasks
from healthfm_core.data.sequences.token_settings import one_line_error
from healthfm_core.eval.federated_head import FederatedHeadResult, SiteHead, run_federated_head
from healthfm_core.eval.probes import DEFAULT_C_GRID, Standardizer
from healthfm_core.eval.saved_head import save_head
from healthfm_core.files import atomic_write_text
from healthfm_core.privacy.head import planned_head_epsilon
from healthfm_core.protocol import EvalConfig
from healthfm_core.protocol.head import (
    HEAD_RECORD,
    MSG_SETUP,
    MSG_STATS,
    MSG_TRAIN,
    MSG_TUNE,
    HeadMessageError,
    HeadRefusal,
    HeadRoundRequest,
    HeadSmoothness,
    HeadStats,
    HeadTask,
    HeadTuneRequest,
    HeadTuning,
    HeadUpdate,
    SiteStats,
    StandardizerRequest,
    parse_reply,
)
from healthfm_core.release import CARD_JSON_FILE, ModelRelease, load_release
from healthfm_core.strict_files import read_json
from server.clipping import ROBUST_MIN_HOLDERS
from server.config import PrivacyRequest
from server.deploy.flower_patches import set_reply_pull_backoff
from server.deploy.registry import SiteRegistry, admit, name_mismatch, read_registry
from server.exchange import send_and_receive
from server.head_average import bound_heads, fedavg_heads, head_strategy
from server.head_bounds import declared_head_rows, dp_step_bound, smoothness_bound, stats_problem, step_bound
from server.runlog import HEAD_ROUNDS_FILE, EventLog

log = logging.getLogger("healthfm.server.head")

HEADS_DIR = "heads"
SUMMARY_FILE = "heads.json"
ROUNDS_FILE = HEAD_ROUNDS_FILE
LOG_FILE = "head.log"


class HeadRunConfig(BaseModel):
    """What the coordinator asks for: the release, the tasks and keys, the head's settings."""

    model_config = ConfigDict(extra="forbid")

    model: Path  # the release folder (the sites hold the same release)
    out_dir: Path
    tasks: list[str] = Field(default_factory=list)  # empty: the release's evaluation tasks
    keys: list[str] | None = None  # label keys to fit (None: every key of the tasks)
    c_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_C_GRID), min_length=1)
    rounds: int = Field(default=200, ge=1)  # FedAvg rounds per C
    local_steps: int = Field(default=5, ge=1)
    lr: float = Field(default=1.0, gt=0)
    min_sites: int = Field(default=1, ge=1)  # sites connected before the first stage
    timeout_s: float = Field(default=120.0, gt=0)  # per stage's replies, and for min_sites
    # The DP asked of every site's train.head rounds (the pretraining's PrivacyRequest: target
    # epsilon over the head's planned steps, or noise multiplier; clipping norm; delta). A
    # site's policy still rules (healthfm_core/privacy/head.py).
    privacy: PrivacyRequest = Field(default_factory=PrivacyRequest)
    dp_batch_size: int = Field(default=64, ge=1)  # expected subjects per DP step at each site
    # The most epsilon this head run may spend at a site (its rounds of every key, by its own
    # ledger): a site refuses a round past it. None: only the site's lifetime cap.
    dp_run_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # The most noise a site's DP round may add (a policy may add more than asked): the bound on a
    # DP update assumes it and a site that needs more refuses (server/head_bounds.py). None: the
    # noise asked, or for a target epsilon the largest any site's plan needs.
    dp_max_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    # Deployed (`coordinator head`): the release's setup hash the coordinator read, which the
    # ServerApp's release must still have (""/None: not checked); the coordinator's site registry
    # (server/deploy/registry.py: only its nodes take part, named by it); the Flower run id.
    setup_sha256: str | None = None
    registry: Path | None = None
    run_id: int | None = None
    # The release's weights' sha256 the coordinator read (""/None: not checked), and the federation's
    # public release key its signature is verified against (healthfm_core/release_signing.py);
    # without a key the release is loaded only with `trust_unsigned` (a local simulation's).
    weights_sha256: str | None = None
    release_key: Path | None = None
    trust_unsigned: bool = False

    def to_run_config(self) -> dict[str, str | int | float | bool]:
        """This config as a Flower run config (flat, kebab-case; lists comma-separated; "" or 0
        for an unset field); from_run_config reads it back. `run_id` is Flower's, never sent."""
        flat: dict[str, str | int | float | bool] = {}
        for name, value in self.model_dump(mode="json", exclude={"run_id", "privacy"}).items():
            key = name.replace("_", "-")
            if isinstance(value, list):
                flat[key] = ",".join(str(v) for v in value)
            else:
                flat[key] = "" if value is None else value
        for name, value in self.privacy.model_dump(mode="json").items():
            flat[f"privacy-{name.replace('_', '-')}"] = 0.0 if value is None else value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> HeadRunConfig:
        """The deployed head's config from Flower's run config (to_run_config's format);
        ValueError naming the field and value."""
        data: dict[str, Any] = {}
        privacy: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name.startswith("privacy_"):
                if value not in (0, ""):  # a run config holds no null: 0 leaves it unset
                    privacy[name[len("privacy_") :]] = value
            elif name in ("tasks", "keys", "c_grid"):
                items = [v.strip() for v in str(value).split(",") if v.strip()]
                data[name] = items if items or name == "tasks" else None
            elif value != "" or name not in (
                "setup_sha256",
                "registry",
                "dp_run_epsilon",
                "dp_max_noise_multiplier",
                "weights_sha256",
                "release_key",
            ):
                data[name] = value
        if data.get("c_grid") is None:
            data.pop("c_grid", None)
        try:
            return cls.model_validate({**data, "privacy": PrivacyRequest.model_validate(privacy)})
        except ValidationError as err:
            raise ValueError(one_line_error(err, "invalid head run config")) from None

    def planned_dp_steps(self) -> int:
        """Every train.head round's local steps over the C grid: the steps a target epsilon spans."""
        return self.rounds * len(self.c_grid) * self.local_steps

    def dp_fields(self) -> dict[str, Any]:
        """The HeadRoundRequest fields of the DP asked (none when DP is not asked)."""
        p = self.privacy
        if not p.requested:
            return {}
        return {
            "dp": True,
            "dp_noise_multiplier": p.noise_multiplier,
            "dp_target_epsilon": p.target_epsilon,
            "dp_max_grad_norm": p.max_grad_norm,
            "dp_batch_size": self.dp_batch_size,
            "dp_planned_steps": self.planned_dp_steps(),
            "dp_run": "" if self.run_id is None else str(self.run_id),
            "dp_run_epsilon": self.dp_run_epsilon,
            "dp_max_noise_multiplier": self.dp_max_noise_multiplier,  # None: set from the plan (FlowerSites.setup)
            "dp_delta": p.delta,  # the plan's (FlowerSites.dp_plan); not sent: a site accounts at its policy's
        }


class FlowerSites:
    """The sites of one head over Flower's Grid (the driver's HeadSites): each call sends one
    stage's message to the sites taking part and parses their replies."""

    def __init__(
        self,
        grid: Grid,
        task: HeadTask,
        width: int,
        timeout_s: float,
        dp: Mapping[str, Any] | None = None,
        rounds_log: Path | None = None,
        registry: SiteRegistry | None = None,
        declared_rows: Mapping[str, int] | None = None,
    ) -> None:
        self.grid, self.task, self.width, self.timeout_s = grid, task, width, timeout_s
        # Site -> the most rows it can hold by what it declared at the release's setup
        # (server/head_bounds.py; None: no release read, e.g. synthetic sites in tests).
        self.declared_rows = declared_rows
        # Deployed: the coordinator's registry (None: every connected node takes part, by its own name).
        self.registry = registry
        self.dp = dict(dp or {})  # HeadRoundRequest's DP fields (HeadRunConfig.dp_fields)
        self.rounds_log = rounds_log  # one JSON line per train.head round (each site's epsilon)
        self.refused: dict[str, dict[str, Any]] = {}  # site -> its refusal (stage, reason, epsilon)
        # site (or "node N") -> the stage and the error it answered (e.g. its app guard's refusal of
        # an unapproved bundle, a node config without the release), or "no reply".
        self.errors: dict[str, dict[str, str]] = {}
        self.epsilon: dict[str, dict[str, float]] = {}  # site -> its latest cumulative epsilon and delta
        self.names: dict[int, str] = {}  # node id -> site name, the sites taking part
        self.counts: dict[int, int] = {}  # node id -> train rows (as sent in its stats)
        self.tuning_counts: dict[int, int] = {}  # node id -> tuning rows (as sent in its stats)
        self.smoothness: dict[int, float] = {}  # node id -> its smoothness (as sent in its setup reply)
        # Site (or "node N") -> each reply rejected by a bound: stage, round, reason (heads.json).
        self.rejected: dict[str, list[dict[str, Any]]] = {}
        self.strategy = head_strategy()  # the update-norm history of the current C's rounds
        self.contributors: set[str] = set()  # the sites whose update was averaged in some round
        self.subjects: dict[int, int] = {}  # node id -> its train subjects (as sent in its stats)
        # Site -> its planned epsilon for this head under the DP asked (dp_plan), before any round.
        self.plan: dict[str, dict[str, float]] = {}
        self.penalty: float | None = None
        self.max_events = self.max_patches = 0
        self.round = 0
        # The standardisation, carried by every later request.
        self.mean: list[float] = []
        self.scale: list[float] = []

    def _ask(self, message_type: str, flat: Mapping[int, Mapping[str, Any]], kind: type[Any]) -> dict[int, Any]:
        """Each node's parsed reply; refusals, errors and replies that do not parse are logged and
        left out (a refusing or rejected node takes no further part in this head)."""
        messages = [
            Message(RecordDict({HEAD_RECORD: ConfigRecord(dict(f))}), dst_node_id=node, message_type=message_type)
            for node, f in flat.items()
        ]
        out: dict[int, Any] = {}
        answered: set[int] = set()
        # server/exchange.py's: deployed, Flower's HttpGrid pauses 3 s between pulls (3 s a round).
        for reply in send_and_receive(self.grid, messages, self.timeout_s):
            node = reply.metadata.src_node_id
            who = self._who(node)
            if node not in flat or node in answered:
                log.warning("head %s: %s: an unasked or repeated reply to %s ignored", self.task.key, who, message_type)
                continue
            answered.add(node)
            if reply.has_error():
                log.warning("head %s: %s: error on %s: %s", self.task.key, who, message_type, reply.error.reason)
                self.errors[who] = {"stage": message_type, "error": str(reply.error.reason)}
                self._drop(node)
                continue
            record = reply.content.config_records.get(HEAD_RECORD)
            try:
                if record is None:
                    raise HeadMessageError(f"no {HEAD_RECORD!r} record")
                parsed = parse_reply(record, kind, self.width)
            except HeadMessageError as err:
                log.warning("head %s: %s: %s reply rejected: %s", self.task.key, who, message_type, err)
                self._drop(node)
                continue
            if isinstance(parsed, HeadRefusal):
                log.info("head %s: %s takes no part: %s", self.task.key, who, parsed.refused)
                self.refused[who] = {"stage": message_type, **parsed.model_dump(exclude_none=True)}
                self._drop(node)
                continue
            out[node] = parsed
        for node in sorted(set(flat) - answered):
            log.warning("head %s: %s: no reply to %s", self.task.key, self._who(node), message_type)
            self.errors[self._who(node)] = {"stage": message_type, "error": "no reply"}
            self._drop(node)
        return out

    def _who(self, node: int) -> str:
        """The node's site: the name it took part under, else its registered one, else "node N"."""
        registered = self.registry.by_node() if self.registry is not None else {}
        return self.names.get(node) or registered.get(node) or f"node {node}"

    def _drop(self, node: int) -> None:
        self.names.pop(node, None)

    def _reject(self, who: str, stage: str, reason: str, *, drop: int | None = None) -> None:
        """A reply over a bound (server/head_bounds.py): logged, recorded; `drop`: the node takes
        no further part (its counts or standardisation cannot be trusted)."""
        log.warning("head %s: %s: %s reply rejected: %s", self.task.key, who, stage, reason)
        self.rejected.setdefault(who, []).append({"stage": stage, "round": self.round, "reason": reason})
        if drop is not None:
            self._drop(drop)

    def _name(self, node: int) -> str:
        return self.names[node]

    def _to_sites(self, flat: Mapping[str, Any]) -> dict[int, Mapping[str, Any]]:
        return {node: flat for node in sorted(self.names)}

    def stats(self) -> dict[str, SiteStats]:
        nodes = sorted(self.grid.get_node_ids())
        if self.registry is not None:  # a node the coordinator did not register gets nothing
            nodes, unknown = admit(nodes, self.registry)
            for node in unknown:
                log.warning("head %s: node %d is not in the coordinator's registry: left out", self.task.key, node)
        got = self._ask(MSG_STATS, {n: self.task.to_flat() for n in nodes}, HeadStats)
        settings = {(s.max_events, s.max_patches) for s in got.values()}
        if len(settings) > 1:  # a head is saved with one embedding setting: the most common one
            common = max(settings, key=lambda st: sum((s.max_events, s.max_patches) == st for s in got.values()))
            for node, s in list(got.items()):
                if (s.max_events, s.max_patches) != common:
                    log.warning("head %s: %s embedded with other settings %s, left out", self.task.key, s.site, (s.max_events, s.max_patches))  # fmt: skip
                    del got[node]
        seen: set[str] = set()
        for node, s in sorted(got.items()):
            mismatch = name_mismatch(node, s.site, self.registry) if self.registry is not None else None
            if mismatch:  # the registry binds a key to a name (server/deploy/registry.py)
                log.warning("head %s: %s: left out", self.task.key, mismatch)
                self.errors[self._who(node)] = {"stage": MSG_STATS, "error": mismatch}
                del got[node]
                continue
            if problem := stats_problem(s, self.declared_rows):
                self._reject(s.site, MSG_STATS, problem)
                del got[node]
                continue
            name = s.site if s.site not in seen else f"{s.site}@{node}"
            seen.add(name)
            self.names[node], self.counts[node], self.tuning_counts[node] = name, s.n, s.n_tuning
            self.subjects[node] = s.subjects
            self.max_events, self.max_patches = s.max_events, s.max_patches
        log.info("head %s: %d of %d site(s) take part: %s", self.task.key, len(got), len(nodes), sorted(seen))
        return {self.names[n]: s.stats() for n, s in sorted(got.items())}

    def setup(self, std: Standardizer) -> dict[str, float]:
        self.mean, self.scale = std.mean.tolist(), std.scale.tolist()
        request = StandardizerRequest(**self.task.model_dump(), mean=self.mean, scale=self.scale)
        got = self._ask(MSG_SETUP, self._to_sites(request.to_flat()), HeadSmoothness)
        n_total = sum(self.counts[n] for n in self.names)
        for node, r in sorted(got.items()):
            limit = smoothness_bound(self.width, n_total, self.counts[node])
            if node in self.names and not r.smoothness <= limit:
                reason = f"field smoothness: value {r.smoothness:.6g} > {limit:.6g}, the most rows of unit pooled variance allow (width {self.width} x {n_total} rows / its {self.counts[node]})"  # fmt: skip
                self._reject(self.names[node], MSG_SETUP, reason, drop=node)
        self.smoothness = {n: r.smoothness for n, r in got.items() if n in self.names}
        if self.dp:
            self.plan = self.dp_plan()
            if self.dp.get("dp_max_noise_multiplier") is None:  # the noise asked, or the most a site's plan needs
                planned = [p["noise_multiplier"] for p in self.plan.values()]
                self.dp["dp_max_noise_multiplier"] = max(planned, default=self.dp.get("dp_noise_multiplier") or 1.0)
        return {self._name(n): r.smoothness for n, r in sorted(got.items()) if n in self.names}

    def dp_plan(self) -> dict[str, dict[str, float]]:
        """Each taking part site's planned epsilon for this head under the DP asked (the
        accountant over the run's planned steps at its subjects' sampling rate), logged before
        the first round: a site's policy may add noise (spending less), and it refuses a round
        past the run's limit (dp_run_epsilon) or its cap."""
        out: dict[str, dict[str, float]] = {}
        steps, delta = int(self.dp["dp_planned_steps"]), float(self.dp["dp_delta"])
        for node in sorted(self.names):
            sigma, rate, epsilon = planned_head_epsilon(
                self.dp.get("dp_noise_multiplier"), self.dp.get("dp_target_epsilon"), delta,
                int(self.dp["dp_batch_size"]), self.subjects[node], steps,
            )  # fmt: skip
            out[self.names[node]] = {"epsilon": epsilon, "noise_multiplier": sigma, "sample_rate": rate, "steps": steps, "delta": delta}  # fmt: skip
        limit = self.dp.get("dp_run_epsilon")
        for site, p in out.items():
            over = f"; OVER the run's limit {limit:g}: the site will refuse the rounds past it" if limit is not None and p["epsilon"] > limit else ""  # fmt: skip
            log.info("head %s: DP plan: %s: epsilon %.3f over this head's %d steps (noise %.3g, rate %.3g, delta %g)%s", self.task.key, site, p["epsilon"], steps, p["noise_multiplier"], p["sample_rate"], delta, over)  # fmt: skip
        return out

    def train(self, w: np.ndarray, b: float, penalty: float, steps: int, lr: float) -> dict[str, SiteHead]:
        self.round += 1
        request = HeadRoundRequest(
            **self.task.model_dump(), mean=self.mean, scale=self.scale, round=self.round, weight=w.tolist(), bias=float(b),
            penalty=penalty, steps=steps, lr=lr, **{k: v for k, v in self.dp.items() if k != "dp_delta"},
        )  # fmt: skip
        got = self._ask(MSG_TRAIN, self._to_sites(request.to_flat()), HeadUpdate)
        if penalty != self.penalty:  # a new C: its own norm history (server/head_bounds.py)
            self.strategy, self.penalty = head_strategy(), penalty
        out: dict[str, SiteHead] = {}
        for node, r in sorted(got.items()):
            if r.n != self.counts[node]:  # its weight in the average is the count it declared
                log.warning("head %s: %s: train.head reply rejected: n %d, its stats said %d", self.task.key, self.names[node], r.n, self.counts[node])  # fmt: skip
                self._drop(node)
                continue
            if self.dp and r.epsilon is None:  # DP asked: an update without its spend is not averaged
                log.warning("head %s: %s: train.head reply rejected: DP was asked but it reports no epsilon", self.task.key, self.names[node])  # fmt: skip
                self._drop(node)
                continue
            name = self.names[node]
            if not self.dp and r.epsilon is not None:  # a DP claim is trusted only where DP was asked
                self._reject(name, MSG_TRAIN, f"claims DP (epsilon {r.epsilon:.4g}) in a head run that did not ask for DP: its update is bounded as one without DP or not at all", drop=node)  # fmt: skip
                continue
            if r.epsilon is not None and r.delta is not None:
                self.epsilon[name] = {"epsilon": r.epsilon, "delta": r.delta}
            moved = float(np.linalg.norm(np.append(np.asarray(r.weight) - w, r.bias - b)))
            limit, what = self._step_limit(node, steps, lr, penalty, float(np.linalg.norm(w)))
            if not moved <= limit:
                self._reject(name, MSG_TRAIN, f"update norm {moved:.4g} > {limit:.4g}, the most {steps} step(s) of size {lr:.4g} move a head on its rows ({what})")  # fmt: skip
                continue
            out[name] = (np.asarray(r.weight), r.bias, r.n)
            self.contributors.add(name)
        out, bad = bound_heads(self.strategy, out, w, b, self.round)
        for name, reason in sorted(bad.items()):
            self._reject(name, MSG_TRAIN, reason)
        self._log_round(out, bad)
        return out

    def _step_limit(self, node: int, steps: int, lr: float, penalty: float, weight_norm: float) -> tuple[float, str]:
        """The most a site's update may move the head this round (server/head_bounds.py), and
        what the bound assumed: its smoothness without DP; with DP asked, the most noise the run
        accepts, the clipping norm and the expected batch of its train subjects."""
        if not self.dp:
            smooth = self.smoothness[node]
            return step_bound(smooth, steps, lr, penalty, weight_norm), f"smoothness {smooth:.4g}"
        sigma, clip = float(self.dp["dp_max_noise_multiplier"]), float(self.dp["dp_max_grad_norm"])
        batch, subjects = int(self.dp["dp_batch_size"]), self.subjects[node]
        limit = dp_step_bound(self.width, steps, lr, penalty, weight_norm, noise_multiplier=sigma, max_grad_norm=clip, batch_size=batch, subjects=subjects)  # fmt: skip
        return limit, f"under DP: noise multiplier at most {sigma:.4g}, clipping {clip:.4g}, expected batch {min(batch, subjects)} of {subjects} subjects"  # fmt: skip

    def _log_round(self, heads: Mapping[str, SiteHead], rejected: Mapping[str, str]) -> None:
        """The round's sites, each one's cumulative epsilon (as the pretraining's rounds.jsonl) and
        the updates rejected by a bound."""
        spent = {s: self.epsilon[s] for s in heads if s in self.epsilon}
        few = sorted(heads) if 0 < len(heads) < ROBUST_MIN_HOLDERS else []
        if spent:
            log.info("head %s: round %d: cumulative epsilon per site: %s", self.task.key, self.round, ", ".join(f"{s} {v['epsilon']:.3f}" for s, v in spent.items()))  # fmt: skip
        if self.rounds_log is not None:  # the pretraining's event log: a line per round, fsynced
            EventLog(self.rounds_log).write(
                "head_round",
                key=self.task.key,
                round=self.round,
                sites=sorted(heads),
                epsilon=spent,
                rejected=dict(rejected),
                under_holders_control=few,  # averaged from 1-2 sites: no rule bounds it against them
            )

    def tune(self, w: np.ndarray, b: float) -> dict[str, tuple[float, int]]:
        request = HeadTuneRequest(
            **self.task.model_dump(), mean=self.mean, scale=self.scale, weight=w.tolist(), bias=float(b)
        )
        got = self._ask(MSG_TUNE, self._to_sites(request.to_flat()), HeadTuning)
        for node, r in sorted(got.items()):
            if node in self.names and r.n != self.tuning_counts[node]:  # its weight in the pooled loss
                self._reject(self.names[node], MSG_TUNE, f"n {r.n}, its stats said {self.tuning_counts[node]} tuning rows", drop=node)  # fmt: skip
        return {self.names[n]: (r.loss_sum, r.n) for n, r in sorted(got.items()) if n in self.names}


def under_holders_control(contributors: set[str]) -> list[str]:
    """The sites of a head fitted from fewer than ROBUST_MIN_HOLDERS sites' updates (the head is
    theirs: the median rules need three), else []."""
    return sorted(contributors) if 0 < len(contributors) < ROBUST_MIN_HOLDERS else []


def head_keys(cfg: HeadRunConfig, release_tasks: Sequence[Any]) -> list[str]:
    """The label keys to fit: the asked ones, else every key of the asked (or the release's) tasks."""
    if cfg.keys:
        return list(cfg.keys)
    specs = resolve_tasks(cfg.tasks) if cfg.tasks else list(release_tasks)
    return [k for spec in specs for k in spec.keys()]


def wait_for_sites(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """The connected nodes once at least `minimum` are (or when `timeout_s` passed)."""
    end = time.monotonic() + timeout_s
    while len(nodes := list(grid.get_node_ids())) < minimum and time.monotonic() < end:
        time.sleep(0.5)
    return nodes


def fit_head_on(sites: FlowerSites, cfg: HeadRunConfig) -> FederatedHeadResult:
    """One key's federated head over `sites` (ValueError: no head, e.g. no site takes part)."""
    return run_federated_head(sites, cfg.c_grid, cfg.rounds, cfg.local_steps, cfg.lr, average=fedavg_heads)


def fit_head(
    grid: Grid, task: HeadTask, width: int, cfg: HeadRunConfig, declared_rows: Mapping[str, int] | None = None
) -> tuple[FederatedHeadResult, FlowerSites]:
    """One key's federated head over the grid's sites (ValueError: no head, e.g. no site takes part)."""
    sites = head_sites(grid, task, width, cfg, declared_rows)
    return fit_head_on(sites, cfg), sites


def head_sites(
    grid: Grid, task: HeadTask, width: int, cfg: HeadRunConfig, declared_rows: Mapping[str, int] | None = None
) -> FlowerSites:
    """The sites of one key's head under `cfg` (its DP, its rounds log, its registry if any) and
    the rows each site declared at the release's setup (None: not bounded by a release)."""
    registry = read_registry(cfg.registry) if cfg.registry is not None else None
    rounds = Path(cfg.out_dir) / ROUNDS_FILE
    return FlowerSites(grid, task, width, cfg.timeout_s, cfg.dp_fields(), rounds, registry, declared_rows)


def release_declared_rows(release: ModelRelease) -> dict[str, int]:
    """Per site of the release's model card, the most rows it can hold (server/head_bounds.py);
    ValueError naming the file when the card does not parse."""
    path = release.path / CARD_JSON_FILE
    try:
        card = read_json(path)
        evaluation = release.meta.evaluation
        n_per_subject = evaluation.n_per_subject if evaluation is not None else EvalConfig.model_fields["n_per_subject"].default  # fmt: skip
        return declared_head_rows(card, n_per_subject)
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: {err}") from None


def privacy_summary(cfg: HeadRunConfig) -> dict[str, Any]:
    """The DP asked of the head's rounds, as heads.json and the task_head report show it."""
    return {
        **cfg.privacy.model_dump(),
        "requested": cfg.privacy.requested,
        "batch_size": cfg.dp_batch_size,
        "planned_steps": cfg.planned_dp_steps(),
        "run_epsilon_limit": cfg.dp_run_epsilon,
        "describe": cfg.privacy.describe(),
    }


def fit_heads(grid: Grid, cfg: HeadRunConfig) -> dict[str, Path]:
    """Every asked key's federated head, saved under OUT/heads; returns key -> head file."""
    release = load_release(
        cfg.model, trusted_keys=[cfg.release_key] if cfg.release_key else [], trust_unsigned=cfg.trust_unsigned
    )
    if cfg.setup_sha256 and release.setup.sha256 != cfg.setup_sha256:
        raise ValueError(
            f"the release {cfg.model} has setup {release.setup.sha256[:12]}..., the run config's setup-sha256 is "
            f"{cfg.setup_sha256[:12]}... (the folder changed since the head was launched)"
        )
    if cfg.weights_sha256 and release.weights_sha256 != cfg.weights_sha256:
        raise ValueError(
            f"the release {cfg.model} has weights {release.weights_sha256[:12]}..., the run config's weights-sha256 "
            f"is {cfg.weights_sha256[:12]}... (the folder changed since the head was launched)"
        )
    evaluation = release.meta.evaluation
    keys = head_keys(cfg, evaluation.tasks if evaluation is not None else [])
    declared = release_declared_rows(release)
    return fit_keys(
        grid, cfg, release.setup.sha256, release.setup.embedding_width, keys, release.weights_sha256, declared
    )


def fit_keys(
    grid: Grid,
    cfg: HeadRunConfig,
    sha: str,
    width: int,
    keys: Sequence[str],
    weights_sha256: str,
    declared_rows: Mapping[str, int] | None = None,
) -> dict[str, Path]:
    """The heads of `keys` for the release of setup `sha`, embedding `width` and weights
    `weights_sha256` (fit_heads), each site's counts within `declared_rows`
    (release_declared_rows; None: not bounded by a release)."""
    nodes = wait_for_sites(grid, cfg.min_sites, cfg.timeout_s)
    log.info("federated heads of release %s (setup %s...): keys %s, %d site(s) connected", cfg.model, sha[:12], keys, len(nodes))  # fmt: skip
    out: dict[str, Path] = {}
    log.info("head privacy: %s", cfg.privacy.describe())
    summary: dict[str, Any] = {"release": str(cfg.model), "setup_sha256": sha, "run_id": cfg.run_id, "heads": {}, "privacy": privacy_summary(cfg)}  # fmt: skip
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / ROUNDS_FILE).unlink(missing_ok=True)
    for key in keys:
        task = HeadTask(setup_sha256=sha, tasks=cfg.tasks, key=key)
        sites = head_sites(grid, task, width, cfg, declared_rows)
        try:
            result = fit_head_on(sites, cfg)
        except ValueError as err:
            log.warning("head %s: not fitted: %s", key, err)
            summary["heads"][key] = {"reason": str(err), "refused": sites.refused, "errors": sites.errors, "rejected": sites.rejected, "dp_plan": sites.plan, "epsilon": sites.epsilon}  # fmt: skip
            continue
        path = Path(cfg.out_dir) / HEADS_DIR / f"{key}.json"
        out[key] = save_head(path, key, result.probe, sha, sites.max_events, sites.max_patches, weights_sha256)
        summary["heads"][key] = {
            "head": str(path),
            "c": result.probe.c,
            "tuning_log_loss": result.probe.tuning_log_loss,
            "tuning_by_c": {str(c): v for c, v in result.tuning.items()},
            "train_rows": result.train_rows,
            "refused": sites.refused,  # site -> the stage it refused, why (and its epsilon under DP)
            "errors": sites.errors,  # site (or "node N") -> the stage it answered with an error, the error
            "rejected": sites.rejected,  # site -> each reply over a bound: stage, round, reason (server/head_bounds.py)
            "dp_plan": sites.plan,  # site -> its planned epsilon for this head (before any round)
            "epsilon": sites.epsilon,  # site -> its cumulative epsilon and delta after its last round
            # Fitted from 1-2 sites' updates: no rule bounds the head against them (as a pretraining
            # group of 1-2 holders); [] with 3 or more.
            "under_holders_control": under_holders_control(sites.contributors),
        }
        log.info("head %s: written to %s (C=%g, sites %s)", key, path, result.probe.c, sorted(result.train_rows))
        if few := under_holders_control(sites.contributors):
            log.warning("head %s: fitted from the updates of %d site(s) (%s): under their control, no rule bounds a head of fewer than %d sites against its own sites beyond the per-reply bounds", key, len(few), ", ".join(few), ROBUST_MIN_HOLDERS)  # fmt: skip
    atomic_write_text(Path(cfg.out_dir) / SUMMARY_FILE, json.dumps(summary, indent=1))
    return out


def _log_to_file(out_dir: Path) -> logging.Handler:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(out_dir) / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("healthfm")
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    return handler


# What the ServerApp runs: fit_heads (the release's keys); tests give synthetic sites' keys.
FitHeads = Callable[[Grid, HeadRunConfig], Mapping[str, Path]]


def make_head_server_app(config: HeadRunConfig | None = None, fit: FitHeads | None = None) -> ServerApp:
    """The head's ServerApp for `config` (None, deployed: from the run config `coordinator head`
    sends; `fit`: default fit_heads)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        set_reply_pull_backoff()  # as the pretraining's ServerApp: a round waits no 1-2 s backoff for its replies
        cfg = config if config is not None else HeadRunConfig.from_run_config(context.run_config)
        cfg = cfg.model_copy(update={"run_id": context.run_id})
        handler = _log_to_file(cfg.out_dir)
        try:
            (fit or fit_heads)(grid, cfg)
        except Exception as err:  # in head.log too: the coordinator points there
            log.error("the head's ServerApp stopped: %s: %s", type(err).__name__, err)
            raise
        finally:
            logging.getLogger("healthfm").removeHandler(handler)
            handler.close()

    return app


# Deployment (`coordinator head`): the SuperLink's SuperExec runs `server.head_app:app`, its
# HeadRunConfig from the run config.
app = make_head_server_app()

__all__ = [
    "ROUNDS_FILE",
    "app",
    "head_sites",
    "FitHeads",
    "FlowerSites",
    "HeadRunConfig",
    "fit_head",
    "fit_head_on",
    "fit_heads",
    "fit_keys",
    "privacy_summary",
    "head_keys",
    "release_declared_rows",
    "under_holders_control",
    "make_head_server_app",
    "wait_for_sites",
]
