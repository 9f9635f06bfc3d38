"""The federation's Flower ServerApp (Message API, flwr 1.41): round 0, rounds, evaluation, resume.

Round 0 (every run, resumed or not):
  1. capabilities query: each site's modalities and subject counts -> the groups it trains
     (ModalityAwareFedAvg.node_groups);
  2. vocabulary agreement (fresh runs): each site's SiteCodeStats (aggregates, already suppressed
     below the site's minimum) -> build_vocabulary -> FederationSetup (vocabulary, model config,
     init seed); a resumed run takes the setup from its checkpoint instead;
  3. the setup goes to every site (query.setup); sites acknowledge its sha256.
Rounds r = 1..R: the strategy sends each site only its groups and a RoundConfig (local steps,
learning rate, the curriculum's objective weights at (r-1)/R); replies are sorted by site name
(node ids change across runs; a fixed order keeps the floating-point sums, and so a resumed run,
bit for bit equal) and averaged per key; the state is checkpointed, then the round is logged.
Federated evaluation every `evaluate_every` rounds and after the last: each site probes its own
splits and reports held-out metrics; the server takes n-weighted means.

Outputs under out_dir: rounds.jsonl (one JSON object per event: setup, round, evaluate, resume),
server.log, checkpoints/step-NNNNNNNN, vocabulary.json, evaluation.json, summary.md.

Differential privacy: `privacy` (PrivacyRequest) asks every site for DP-SGD at a target epsilon
over the run's planned rounds x local steps (or at a noise multiplier), with a clipping norm; it
travels in each RoundConfig (dp, dp_target_epsilon, dp_noise_multiplier, dp_max_grad_norm). The
site's own policy still decides (client/site_runtime.py: the larger noise of the policy's and the
server's wins, a site without a DP budget or over its cap refuses the round); each site's reported
cumulative epsilon is logged per round (rounds.jsonl `sites.<site>.dp`, `epsilon`) and summarised.

Simulation passes a FederationConfig to make_server_app(); a deployed run (`flwr run`) builds
one from the run config (FederationConfig.from_run_config).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from healthfm_core.data.tasks import TASKS
from healthfm_core.data.code_stats import SiteCodeStats
from healthfm_core.data.vocab import build_vocabulary
from healthfm_core.federation import (
    CAPABILITIES,
    CODE_STATS,
    DP_DELTA,
    DP_EPSILON,
    DP_NOISE,
    LOSS_PREFIX,
    SETUP,
    EvalConfig,
    FederationSetup,
    RoundConfig,
    SiteCapabilities,
    aggregate_site_metrics,
    federation_modalities,
)
from healthfm_core.files import atomic_write_text
from healthfm_core.model.config import ModelConfig, load_model_config
from healthfm_core.model.groups import parameter_group
from healthfm_core.model.objectives import curriculum_weights
from server.audit import AUDIT_FILE, AuditLog
from server.checkpoint import (
    ServerState,
    latest_server_checkpoint,
    load_server_checkpoint,
    save_server_checkpoint,
)
from server.limits import (
    DEFAULT_REPLY_SIZE_MARGIN,
    default_max_reply_bytes,
    describe_limits,
)
from server.strategy import COUNT_PREFIX, GroupAdam, ModalityAwareFedAvg

log = logging.getLogger("healthfm.server")

DEFAULT_EVAL_TASKS = [f"onset_{d}_{h}d" for d in ("t2d", "cad", "hypertension", "copd") for h in (30, 90, 180, 365)]
# Config keys a resumed run may change; any other difference from the checkpoint's is refused.
RESUMABLE_CHANGES = {"rounds", "resume", "stop_after_round", "out_dir", "timeout_s", "evaluate_every",
                     "eval_tasks", "eval_n_boot", "keep_checkpoints", "min_nodes", "max_reply_bytes",
                     "reply_size_margin"}


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

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyRequest:
        if self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError(f"privacy: set target_epsilon ({self.target_epsilon}) or noise_multiplier "
                             f"({self.noise_multiplier}), not both")
        return self

    @property
    def requested(self) -> bool:
        return self.target_epsilon is not None or self.noise_multiplier is not None

    def round_fields(self) -> dict[str, Any]:
        """The RoundConfig fields of this request."""
        if not self.requested:
            return {"dp": False}
        return {"dp": True, "dp_target_epsilon": self.target_epsilon, "dp_noise_multiplier": self.noise_multiplier,
                "dp_max_grad_norm": self.max_grad_norm}

    def describe(self) -> str:
        if not self.requested:
            return "no DP asked"
        level = (f"target epsilon {self.target_epsilon:g}" if self.target_epsilon is not None
                 else f"noise multiplier {self.noise_multiplier:g}")
        return f"DP asked: {level}, delta {self.delta:g}, clipping norm {self.max_grad_norm:g}"


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
    seed: int = 0
    fp16_transport: bool = False  # sites send float16, the server upcasts before averaging
    min_nodes: int = Field(default=1, ge=1)  # wait for this many sites before round 0
    min_sites_per_group: int = Field(default=1, ge=1)
    norm_outlier_factor: float = Field(default=10.0, gt=1)
    max_update_norm: float | None = Field(default=None, gt=0)
    server_optimizer: ServerOptimizerConfig | None = None
    vocab_min_subjects: int = Field(default=10, ge=1)
    evaluate_every: int = Field(default=0, ge=0)  # 0: only after the last round
    eval_tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_EVAL_TASKS))
    eval_n_boot: int = Field(default=100, ge=10)
    timeout_s: float = Field(default=3600.0, gt=0)  # the most any exchange (a round) waits for replies
    max_reply_bytes: int = Field(default=0, ge=0)  # 0: reply_size_margin x the model's bytes (server/limits.py)
    reply_size_margin: float = Field(default=DEFAULT_REPLY_SIZE_MARGIN, ge=1)
    resume: bool = False
    stop_after_round: int | None = Field(default=None, ge=1)  # stop early (resume later)
    keep_checkpoints: int = Field(default=2, ge=1)
    privacy: PrivacyRequest = Field(default_factory=PrivacyRequest)

    @field_validator("eval_tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
        return tasks

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
                opt[name[len("server_optimizer_"):]] = value
            elif name.startswith("privacy_"):
                # A run config holds no null: 0 or "" leaves a privacy field unset.
                if value not in (0, "", None):
                    privacy[name[len("privacy_"):]] = value
            elif name == "model":
                data["model"] = load_model_config(str(value))
            elif name == "eval_tasks":
                data["eval_tasks"] = [t.strip() for t in str(value).split(",") if t.strip()]
            elif name in ("stop_after_round", "max_update_norm") and value in (0, "", None):
                continue
            else:
                data[name] = value
        if opt.get("lr", 0):
            data["server_optimizer"] = opt
        if privacy:
            data["privacy"] = privacy
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"invalid run config: {err}") from None


# ---------------------------------------------------------------------------- small helpers


def message_bytes(message: Message) -> int:
    """Serialized size of a message: every object Flower transfers for it (content-addressed,
    so identical arrays count once), excluding transport framing."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())





class EventLog:
    """rounds.jsonl: one JSON object per line, flushed and fsynced as each event completes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=_json_default)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of a rounds.jsonl (a line cut short by a crash is skipped with a warning)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (cut short?); skipped", path, i)
    return out


def _to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# ---------------------------------------------------------------------------- the run


class FederationServer:
    """Runs one federation on a Grid: round 0, the rounds, evaluation, checkpoints, logs."""

    def __init__(self, grid: Grid, cfg: FederationConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.events = EventLog(self.out_dir / "rounds.jsonl")
        self.audit = AuditLog(self.out_dir / AUDIT_FILE)  # the security record (server/audit.py)
        opt = cfg.server_optimizer
        self.strategy = ModalityAwareFedAvg(
            min_sites_per_group=cfg.min_sites_per_group,
            norm_outlier_factor=cfg.norm_outlier_factor,
            max_update_norm=cfg.max_update_norm,
            server_optimizer=GroupAdam(**opt.model_dump()) if opt else None,
            fraction_train=1.0, fraction_evaluate=1.0,
            min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes,
        )
        self.sites: dict[int, SiteCapabilities] = {}  # node id -> capabilities

    # ------------------------------------------------------------------ messaging

    def _site(self, node_id: int) -> str:
        caps = self.sites.get(node_id)
        return caps.site if caps else f"node-{node_id}"

    def _ask(self, message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        """Send one message per node, return the non-error replies by node (errors logged)."""
        messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
        replies = self.grid.send_and_receive(messages, timeout=self.cfg.timeout_s)
        out: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s: site %s replied with an error: %s", message_type, self._site(node), reply.error.reason)
                continue
            out[node] = reply
        for node in contents:
            if node not in out:
                log.warning("%s: no usable reply from site %s", message_type, self._site(node))
        return out

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.cfg.timeout_s
        while len(nodes := sorted(self.grid.get_node_ids())) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of {self.cfg.min_nodes} sites connected within {self.cfg.timeout_s} s")
            log.info("waiting for sites: %d connected, %d required", len(nodes), self.cfg.min_nodes)
            time.sleep(1.0)
        return nodes

    # ------------------------------------------------------------------ round 0

    def query_capabilities(self, nodes: Iterable[int]) -> None:
        replies = self._ask(CAPABILITIES, {n: RecordDict() for n in nodes})
        seen: dict[str, int] = {}
        for node, reply in sorted(replies.items()):
            try:
                caps = SiteCapabilities.from_flat(reply.content.config_records["capabilities"])
            except (KeyError, ValueError) as err:
                log.warning("capabilities of node %d rejected: %s", node, err)
                continue
            if caps.site in seen:
                raise RuntimeError(f"two sites call themselves {caps.site!r} (nodes {seen[caps.site]} and {node}): "
                                   "site names must be unique (node config site-name)")
            seen[caps.site] = node
            self.sites[node] = caps
        if not self.sites:
            raise RuntimeError("no site answered the capabilities query")
        self.strategy.node_groups = {node: caps.groups for node, caps in self.sites.items()}
        for node, caps in sorted(self.sites.items(), key=lambda kv: kv[1].site):
            log.info("site %-12s node %d: modalities %s, subjects %s -> groups %s", caps.site, node,
                     caps.modalities, caps.subjects, caps.groups)

    def agree_vocabulary(self) -> FederationSetup:
        replies = self._ask(CODE_STATS, {n: RecordDict() for n in self.sites})
        stats: list[SiteCodeStats] = []
        for node, reply in sorted(replies.items(), key=lambda kv: self._site(kv[0])):
            try:
                stats.append(SiteCodeStats.model_validate_json(str(reply.content.config_records["code-stats"]["json"])))
            except (KeyError, ValueError) as err:
                log.warning("code statistics of site %s rejected: %s", self._site(node), err)
        if not stats:
            raise RuntimeError("no site sent usable code statistics: cannot agree on a vocabulary")
        vocab = build_vocabulary(stats, min_subjects=self.cfg.vocab_min_subjects)
        log.info("vocabulary agreed from %d sites: %d codes, %d PRS traits, %d numeric normalisers",
                 len(stats), len(vocab.codes), vocab.n_prs_traits, len(vocab.numeric))
        modalities = federation_modalities([caps.modalities for caps in self.sites.values()], vocab)
        log.info("model modalities: %s (the union of the sites')", modalities)
        return FederationSetup(vocabulary=vocab, model=self.cfg.model, model_seed=self.cfg.seed, modalities=modalities)

    def send_setup(self, setup: FederationSetup) -> None:
        record = ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})
        replies = self._ask(SETUP, {n: RecordDict({"setup": record}) for n in self.sites})
        for node in list(self.sites):
            reply = replies.get(node)
            ack = reply.content.config_records.get("setup", {}).get("sha256") if reply else None
            if ack != setup.sha256:
                log.warning("site %s did not accept the setup; it takes no part in this run", self._site(node))
                self.strategy.node_groups.pop(node, None)
        # A site is sent only groups the model has (e.g. no genomics when no PRS trait was agreed).
        self.strategy.node_groups = {node: [g for g in groups if g in setup.groups]
                                     for node, groups in self.strategy.node_groups.items()}
        if not self.strategy.node_groups:
            raise RuntimeError("no site accepted the setup")

    # ------------------------------------------------------------------ resume

    def _check_resumable(self, saved: Mapping[str, Any]) -> None:
        now = self.cfg.model_dump(mode="json")
        # A checkpoint written before a field existed ran with that field's default.
        saved = {**{k: v for k, v in _field_defaults().items() if k not in saved}, **saved}
        changed = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k))
        if changed:
            raise ValueError(
                f"cannot resume: the run config differs from the checkpoint's in {changed} "
                f"(e.g. {changed[0]}: {saved.get(changed[0])!r} -> {now.get(changed[0])!r})"
            )

    def initial_state(self) -> tuple[ServerState | None, Path | None]:
        latest = latest_server_checkpoint(self.ckpt_dir)
        if self.cfg.resume:
            if latest is None:
                raise FileNotFoundError(f"resume requested but {self.ckpt_dir} holds no checkpoint")
            state = load_server_checkpoint(latest)
            self._check_resumable(state.run_config)
            return state, latest
        if latest is not None:
            raise FileExistsError(
                f"{self.out_dir} already holds a run (checkpoint {latest.name}); resume it (resume=true) "
                "or choose another output directory"
            )
        return None, None

    # ------------------------------------------------------------------ the run

    def run(self) -> Path | None:
        """Run (or resume) the federation; returns the last checkpoint written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out_dir / "server.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("healthfm").addHandler(handler)
        try:
            return self._run()
        finally:
            logging.getLogger("healthfm").removeHandler(handler)
            handler.close()

    def _run(self) -> Path | None:
        cfg = self.cfg
        state, ckpt_path = self.initial_state()
        t0 = time.perf_counter()
        nodes = self._wait_for_nodes()
        self.query_capabilities(nodes)
        if state is None:
            setup = self.agree_vocabulary()
            arrays = {k: v.numpy() for k, v in setup.init_model().state_dict().items()}
            start = 0
        else:
            setup, arrays, start = state.setup, state.arrays, state.round
            self.strategy.load_state_dict(state.strategy)
            random.setstate(state.python_random)
            if state.torch_random is not None:
                torch.set_rng_state(state.torch_random)
            log.info("resuming after round %d from %s", start, ckpt_path)
        setup.vocabulary.save(self.out_dir / "vocabulary.json")
        self.send_setup(setup)
        round0 = time.perf_counter() - t0
        start_event = dict(
            event="resume" if state is not None else "setup", round=start, seconds=round0, setup_sha256=setup.sha256,
            vocab_size=setup.vocabulary.vocab_size, checkpoint=str(ckpt_path) if ckpt_path else None,
            sites={caps.site: {"node_id": node, "modalities": caps.modalities, "subjects": caps.subjects,
                               "groups": self.strategy.node_groups.get(node, [])}
                   for node, caps in self.sites.items()},
        )
        self.events.write(**start_event)
        self.strategy.max_reply_bytes = cfg.max_reply_bytes or default_max_reply_bytes(_to_record(arrays),
                                                                                       cfg.reply_size_margin)
        self.audit.write_run(start_event, {"max_reply_bytes": self.strategy.max_reply_bytes,
                                           "timeout_s": cfg.timeout_s, "max_abs_value": self.strategy.max_abs_value})
        log.info(describe_limits(self.strategy.max_reply_bytes, cfg.timeout_s))
        log.info("round 0 done in %.1f s: %d sites, setup %s", round0, len(self.strategy.node_groups), setup.sha256[:12])
        log.info("privacy: %s", cfg.privacy.describe())

        last = ckpt_path
        end = cfg.rounds if cfg.stop_after_round is None else min(cfg.rounds, cfg.stop_after_round)
        if start >= end:
            log.info("nothing to do: %d of %d rounds already done", start, cfg.rounds)
        for rnd in range(start + 1, end + 1):
            arrays, last = self.train_round(rnd, setup, arrays)
            if rnd == cfg.rounds or (cfg.evaluate_every and rnd % cfg.evaluate_every == 0):
                self.evaluate(rnd, setup, arrays)
        write_summary(self.out_dir)
        return last

    def train_round(self, rnd: int, setup: FederationSetup, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Path]:
        cfg = self.cfg
        t_start = time.perf_counter()
        round_cfg = RoundConfig(
            round=rnd, rounds=cfg.rounds, local_steps=cfg.local_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, max_events=cfg.max_events, max_patches=cfg.max_patches, seed=cfg.seed,
            fp16_transport=cfg.fp16_transport, setup_sha256=setup.sha256,
            weights=curriculum_weights(rnd - 1, cfg.rounds, cfg.model), **cfg.privacy.round_fields(),
        )
        messages = list(self.strategy.configure_train(rnd, _to_record(arrays), ConfigRecord(round_cfg.to_flat()), self.grid))
        sites: dict[str, dict[str, Any]] = {}
        node_of_site: dict[str, int] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            record = next(iter(msg.content.array_records.values()))
            sites[self._site(node)] = {
                "node_id": node, "groups_sent": sorted({parameter_group(k) for k in record}),
                "keys_sent": len(record), "bytes_sent": message_bytes(msg), "status": "no reply",
            }
            node_of_site[self._site(node)] = node
        t_sent = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=cfg.timeout_s))
        t_replied = time.perf_counter()
        # strategy.origin: the SuperLink answers for a dead SuperNode from its own node id.
        replies.sort(key=lambda m: self._site(self.strategy.origin(m)))
        for reply in replies:
            entry = sites.setdefault(self._site(self.strategy.origin(reply)), {"node_id": self.strategy.origin(reply)})
            entry["bytes_received"] = message_bytes(reply)
            if reply.has_error():
                entry.update(status="error", reason=reply.error.reason)
                continue
            refusal = self.strategy.refusal(reply.content)
            entry["status"] = "ok" if refusal is None else "refused"
            if refusal is not None:
                entry["reason"] = refusal
            for record in reply.content.array_records.values():
                entry["groups_received"] = sorted({parameter_group(k) for k in record if _known_key(k)})
                entry["keys_received"] = len(record)
            for metrics in reply.content.metric_records.values():
                entry["num_examples"] = {k[len(COUNT_PREFIX):]: v for k, v in metrics.items() if k.startswith(COUNT_PREFIX)}
                entry["losses"] = {k[len(LOSS_PREFIX):]: v for k, v in metrics.items() if k.startswith(LOSS_PREFIX)}
                for key in ("train-seconds", "client-seconds", "rate-min", "rate-max"):
                    if key in metrics:
                        entry[key.replace("-", "_")] = metrics[key]
                dp = site_privacy(metrics)
                if dp:
                    entry["dp"] = dp
        t_agg = time.perf_counter()
        new_arrays, aggregated = self.strategy.aggregate_train(rnd, replies)
        rejected = [{"site": self._site(r.node_id), "node_id": r.node_id, "reason": r.reason}
                    for r in self.strategy.rejected.get(rnd, [])]
        for r in rejected:
            entry = sites.setdefault(r["site"], {"node_id": r["node_id"]})
            if entry.get("status") == "ok":
                entry.update(status="rejected", reason=r["reason"])
        if new_arrays is not None:
            arrays = _to_arrays(new_arrays)
        t_ckpt = time.perf_counter()
        path = save_server_checkpoint(
            self.ckpt_dir,
            ServerState(round=rnd, arrays=arrays, strategy=self.strategy.state_dict(), setup=setup,
                        run_config=cfg.model_dump(mode="json"), python_random=random.getstate(),
                        torch_random=torch.get_rng_state()),
            keep=cfg.keep_checkpoints,
        )
        t_end = time.perf_counter()
        train_max = max((e.get("train_seconds", 0.0) for e in sites.values()), default=0.0)
        timings = {
            "round_seconds": t_end - t_start,
            "configure_seconds": t_sent - t_start,
            "wait_seconds": t_replied - t_sent,
            "aggregate_seconds": t_ckpt - t_agg,
            "checkpoint_seconds": t_end - t_ckpt,
            "local_train_seconds_max": train_max,
            "local_train_seconds_sum": sum(e.get("train_seconds", 0.0) for e in sites.values()),
            "other_seconds": (t_end - t_start) - train_max,
        }
        contributors = {g: sorted(self._site(n) for n in nodes) for g, nodes in self.strategy.contributors.get(rnd, {}).items()}
        epsilon = self.check_privacy(rnd, sites)
        self.events.write(
            "round", round=rnd, rounds=cfg.rounds, weights=round_cfg.weights.model_dump(), sites=sites,
            privacy=cfg.privacy.model_dump(), epsilon=epsilon,
            rejected=rejected, contributors=contributors, aggregated=dict(aggregated) if aggregated else {},
            updated=new_arrays is not None, bytes_sent=sum(e.get("bytes_sent", 0) for e in sites.values()),
            bytes_received=sum(e.get("bytes_received", 0) for e in sites.values()), timings=timings,
            checkpoint=str(path),
        )
        self.audit.write_round({"round": rnd, "sites": sites, "rejected": rejected, "contributors": contributors})
        ok = sum(e.get("status") == "ok" for e in sites.values())
        loss = dict(aggregated).get(LOSS_PREFIX + "total") if aggregated else None
        log.info("round %d/%d: %d/%d sites ok, loss %s, %.1f s (local training %.1f s, other %.1f s)",
                 rnd, cfg.rounds, ok, len(sites), f"{loss:.4f}" if loss is not None else "n/a",
                 timings["round_seconds"], train_max, timings["other_seconds"])
        for name, e in sorted(sites.items()):
            log.info("  %-12s %-9s groups %s, sent %s B, received %s B%s", name, e.get("status"),
                     ",".join(e.get("groups_sent", [])), e.get("bytes_sent", 0), e.get("bytes_received", 0),
                     f" ({e['reason']})" if "reason" in e else "")
        return arrays, path

    def check_privacy(self, rnd: int, sites: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
        """Each site's reported cumulative epsilon this round (sites that report one), with a
        warning where a site accounts at a larger delta than asked, or trained without DP when
        DP was asked (a site's reply without dp.* after training)."""
        req = self.cfg.privacy
        epsilon = {name: e["dp"]["epsilon"] for name, e in sorted(sites.items()) if "epsilon" in e.get("dp", {})}
        for name, e in sorted(sites.items()):
            dp = e.get("dp", {})
            if req.requested and e.get("status") == "ok" and "epsilon" not in dp:
                log.warning("round %d: DP was asked but site %s reported no epsilon", rnd, name)
            if req.requested and dp.get("delta", 0.0) > req.delta:
                log.warning("round %d: site %s accounts at delta %g, larger than the %g asked (its policy's)",
                            rnd, name, dp["delta"], req.delta)
        if epsilon:
            log.info("round %d: cumulative epsilon per site: %s", rnd,
                     ", ".join(f"{s} {v:.3f}" for s, v in epsilon.items()))
        return epsilon

    def evaluate(self, rnd: int, setup: FederationSetup, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        eval_cfg = EvalConfig(round=rnd, tasks=cfg.eval_tasks, setup_sha256=setup.sha256, batch_size=max(cfg.batch_size, 32),
                              max_events=cfg.max_events, max_patches=cfg.max_patches, n_boot=cfg.eval_n_boot, seed=cfg.seed)
        record = _to_record(arrays)
        contents = {
            node: RecordDict({"arrays": self.strategy.arrays_for_groups(record, groups),
                              "config": ConfigRecord(eval_cfg.to_flat())})
            for node, groups in sorted(self.strategy.node_groups.items())
        }
        replies = self._ask(MessageType.EVALUATE, contents)
        per_site: dict[str, dict[str, float]] = {}
        for node, reply in sorted(replies.items(), key=lambda kv: self._site(kv[0])):
            metrics = next(iter(reply.content.metric_records.values()), None)
            if metrics is None:
                log.warning("evaluate: site %s sent no metrics", self._site(node))
                continue
            per_site[self._site(node)] = {k: float(v) for k, v in metrics.items()}
        aggregated = aggregate_site_metrics(per_site)
        seconds = time.perf_counter() - t0
        self.events.write("evaluate", round=rnd, sites=per_site, aggregated=aggregated, seconds=seconds)
        atomic_write_text(self.out_dir / "evaluation.json",
                           json.dumps({"round": rnd, "sites": per_site, "aggregated": aggregated}, indent=1))
        log.info("evaluation after round %d (%.1f s): %d sites reported", rnd, seconds, len(per_site))
        for key, value in aggregated.items():
            if key.endswith(".auroc") or key.endswith(".r2"):
                task = key.rsplit(".", 1)[0]
                log.info("  %-28s %s %.3f (n=%d)", task, key.rsplit(".", 1)[1], value, aggregated.get(f"{task}.n", 0))
        return aggregated


def site_privacy(metrics: Mapping[str, Any]) -> dict[str, float]:
    """A site's DP report in a reply's metrics: cumulative epsilon, delta, noise (present ones)."""
    names = {DP_EPSILON: "epsilon", DP_DELTA: "delta", DP_NOISE: "noise_multiplier"}
    return {name: float(metrics[key]) for key, name in names.items() if key in metrics}


def _field_defaults() -> dict[str, Any]:
    """FederationConfig's optional fields at their defaults, as model_dump(mode="json") writes them."""
    out = {}
    for name, field in FederationConfig.model_fields.items():
        if not field.is_required():
            value = field.get_default(call_default_factory=True)
            out[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out


def _known_key(key: str) -> bool:
    try:
        parameter_group(key)
        return True
    except KeyError:
        return False


# ---------------------------------------------------------------------------- summary


def write_summary(out_dir: str | Path) -> Path:
    """out_dir/summary.md from rounds.jsonl: per-round losses and time split, bytes per site."""
    out_dir = Path(out_dir)
    events = read_events(out_dir / "rounds.jsonl")
    rounds = {e["round"]: e for e in events if e["event"] == "round"}  # a re-run round: the last one
    lines = [f"# Federated run: {out_dir}", ""]
    if not rounds:
        lines.append("No round completed.")
    else:
        loss_names = sorted({k for e in rounds.values() for k in e.get("aggregated", {}) if k.startswith(LOSS_PREFIX)})
        lines += ["## Rounds", "",
                  "| round | sites ok | " + " | ".join(n[len(LOSS_PREFIX):] for n in loss_names)
                  + " | round s | local training s (max) | other s |",
                  "|---" * (len(loss_names) + 5) + "|"]
        for r, e in sorted(rounds.items()):
            ok = sum(s.get("status") == "ok" for s in e["sites"].values())
            agg = e.get("aggregated", {})
            t = e["timings"]
            lines.append(f"| {r} | {ok}/{len(e['sites'])} | "
                         + " | ".join(f"{agg[n]:.4f}" if n in agg else "" for n in loss_names)
                         + f" | {t['round_seconds']:.1f} | {t['local_train_seconds_max']:.1f} | {t['other_seconds']:.1f} |")
        site_names = sorted({s for e in rounds.values() for s in e["sites"]})
        lines += ["", "## Bytes per site per round (sent to the site / received from it)", "",
                  "| round | " + " | ".join(site_names) + " | total |", "|---" * (len(site_names) + 2) + "|"]
        for r, e in sorted(rounds.items()):
            cells = []
            for s in site_names:
                x = e["sites"].get(s, {})
                cells.append(f"{x.get('bytes_sent', 0):,} / {x.get('bytes_received', 0):,}")
            lines.append(f"| {r} | " + " | ".join(cells) + f" | {e['bytes_sent']:,} / {e['bytes_received']:,} |")
        if any(e.get("epsilon") for e in rounds.values()):
            last = rounds[max(rounds)]
            req = PrivacyRequest.model_validate(last["privacy"]) if last.get("privacy") else PrivacyRequest()
            eps_sites = sorted({s for e in rounds.values() for s in e.get("epsilon", {})})
            lines += ["", "## Privacy: each site's cumulative epsilon (its own accountant, every run at the site)", "",
                      f"Server: {req.describe()}.", "",
                      "| round | " + " | ".join(eps_sites) + " |", "|---" * (len(eps_sites) + 1) + "|"]
            for r, e in sorted(rounds.items()):
                eps = e.get("epsilon", {})
                lines.append(f"| {r} | " + " | ".join(f"{eps[s]:.3f}" if s in eps else "-" for s in eps_sites) + " |")
        rejected = [(r, x) for r, e in sorted(rounds.items()) for x in e.get("rejected", [])]
        if rejected:
            lines += ["", "## Rejected replies", ""] + [f"- round {r}, site {x['site']}: {x['reason']}" for r, x in rejected]
    evaluations = [e for e in events if e["event"] == "evaluate"]
    if evaluations:
        ev = evaluations[-1]
        lines += ["", f"## Federated evaluation after round {ev['round']} (n-weighted mean over sites)", "",
                  "| task | metric | value | n | sites |", "|---|---|---|---|---|"]
        for key, value in ev["aggregated"].items():
            task, _, metric = key.rpartition(".")
            if metric in ("auroc", "r2"):
                n_sites = sum(key in m for m in ev["sites"].values())
                lines.append(f"| {task} | {metric} | {value:.3f} | {int(ev['aggregated'].get(task + '.n', 0))} | {n_sites} |")
    path = out_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------- the ServerApp


def make_server_app(config: FederationConfig | None = None) -> ServerApp:
    """The ServerApp; without `config` it reads the run config (deployment, `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else FederationConfig.from_run_config(context.run_config)
        FederationServer(grid, cfg).run()

    return app


app = make_server_app()
