"""The federation's Flower ServerApp (Message API, flwr 1.41): round 0, rounds, evaluation, resume.

Round 0 (every run, resumed or not):
  1. capabilities query: each site's modalities and subject counts -> the groups it trains
     (FederationServer.node_groups);
  2. vocabulary agreement (fresh runs): each site's SiteCodeStats (aggregates, already suppressed
     below the site's minimum) -> build_vocabulary -> FederationSetup (vocabulary, model config,
     init seed); a resumed run takes the setup from its checkpoint instead;
  3. the setup goes to every site (query.setup); sites acknowledge its sha256.
Rounds r = 1..R: the strategy sends each site only its groups and a RoundConfig (local steps,
learning rate, the curriculum's objective weights at (r-1)/R); replies are sorted by site name
(node ids change across runs; a fixed order keeps the floating-point sums, and so a resumed run,
bit for bit equal) and averaged per key; the state is checkpointed, then the round is logged.
Federated evaluation every `evaluate_every` rounds and after the last: each site probes its own
splits and reports held-out metrics with their intervals, and per binary task a histogram of its
held-out scores (small cells merged); the server takes n-weighted means and pools the histograms
into a federation-wide AUROC per task (healthfm_core/eval/federation_auroc.py).

Outputs under out_dir: rounds.jsonl (one JSON object per event: setup, round, evaluate, resume),
server.log (the run's INFO log, in simulation and deployment), outcome.json (how the run ended,
server/outcome.py), audit.jsonl, checkpoints/step-NNNNNNNN, vocabulary.json, evaluation.json,
summary.md, evaluation_auroc.png (server/runlog.py).

A site that comes back: a SuperNode restarted mid-run has lost the setup (it lives in the node's
Context.state); asked to train or evaluate, it answers "setup-needed" (SETUP_NEEDED_RECORD). The
server sends it query.setup again and retries that site once within the same round (or
evaluation). Every site of the run that did not train in a round is in that round's event with a
status and reason ("absent" when it was not even addressed), and so in the audit log.

Differential privacy: `privacy` (PrivacyRequest) asks every site for DP-SGD at a target epsilon
over the run's planned rounds x local steps (or at a noise multiplier), with a clipping norm; it
travels in each RoundConfig (dp, dp_target_epsilon, dp_noise_multiplier, dp_max_grad_norm). The
site's own policy still decides (client/site_runtime.py: the larger noise of the policy's and the
server's wins, a site without a DP budget or over its cap refuses the round); each site's reported
cumulative epsilon is logged per round (rounds.jsonl `sites.<site>.dp`, `epsilon`) and summarised.

Simulation passes a FederationConfig (server/config.py) to make_server_app(); a deployed run
(`flwr run`) builds one from the run config (FederationConfig.from_run_config). The run's record
on disk (rounds.jsonl, summary.md) is written by server/runlog.py.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from healthfm_core.data.code_stats import SiteCodeStats
from healthfm_core.data.task_spec import task_keys
from healthfm_core.data.vocab import build_vocabulary
from healthfm_core.eval.federation_auroc import FederationAUROC, binary_keys, federation_aurocs
from healthfm_core.eval.outcomes import outcome_lines, scored_of_available
from healthfm_core.federation import (
    CAPABILITIES,
    CODE_STATS,
    METRICS_RECORD,
    SETUP,
    SETUP_NEEDED_RECORD,
    EvalReply,
    FederationSetup,
    RoundConfig,
    SiteCapabilities,
    TrainReply,
    aggregate_site_metrics,
    federation_modalities,
)
from healthfm_core.files import atomic_write_text
from healthfm_core.model.groups import parameter_group
from healthfm_core.model.objectives import curriculum_weights
from server.audit import AUDIT_FILE, AuditLog
from server.checkpoint import (
    ServerState,
    latest_server_checkpoint,
    load_server_checkpoint,
    save_server_checkpoint,
)

# PrivacyRequest, ServerOptimizerConfig and read_events are re-exported: importers written
# before server/config.py and server/runlog.py were split off keep working.
from server.config import (
    FederationConfig,
    PrivacyRequest,
    ServerOptimizerConfig,
    resume_conflicts,
)
from server.exchange import ExchangeTimes, send_and_receive, slowest_first
from server.limits import default_max_reply_bytes, describe_limits
from server.outcome import sites_lost, started, write_outcome
from server.registry import SiteRegistry, admit, name_mismatch, read_registry
from server.run_claim import Holder, adopt_for_serverapp, release
from server.runlog import EventLog, message_bytes, message_size, read_events, write_summary
from server.strategy import GroupAdam, ModalityAwareFedAvg, RoundOutcome, origin, pack_record

log = logging.getLogger("healthfm.server")
_STEP_DIR = re.compile(r"step-(\d+)")
# Before each round after round 0, how long the server waits for min_nodes sites (a SuperNode
# restarting reconnects within this) before going on with those connected; never longer than timeout_s.
REJOIN_WAIT_S = 60.0


def make_strategy(cfg: FederationConfig, max_reply_bytes: int | None) -> ModalityAwareFedAvg:
    """The run's strategy: its configuration only (every site sampled, each round's inputs passed
    to it by FederationServer). It never waits for sites itself (Flower's sample_nodes would wait
    for min_available_nodes without a limit, so one site down would stall the run for good):
    FederationServer waits up to timeout_s for min_nodes before each round, then goes on."""
    opt = cfg.server_optimizer
    return ModalityAwareFedAvg(
        min_sites_per_group=cfg.min_sites_per_group,
        norm_outlier_factor=cfg.norm_outlier_factor,
        max_update_norm=cfg.max_update_norm,
        norm_step_factor=cfg.norm_step_factor,
        norm_history_factor=cfg.norm_history_factor,
        norm_history_rounds=cfg.norm_history_rounds,
        max_reply_bytes=max_reply_bytes,
        server_optimizer=GroupAdam(**opt.model_dump()) if opt else None,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )


# ---------------------------------------------------------------------------- the run


class FederationServer:
    """Runs one federation on a Grid: round 0, the rounds, evaluation, checkpoints, logs."""

    def __init__(self, grid: Grid, cfg: FederationConfig, run_id: int | None = None) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.events = EventLog(self.out_dir / "rounds.jsonl")
        self.audit = AuditLog(self.out_dir / AUDIT_FILE)  # the security record (server/audit.py)
        # Made by _run once the model's arrays are known (the reply size limit follows from them).
        self.strategy: ModalityAwareFedAvg
        self.sites: dict[int, SiteCapabilities] = {}  # node id -> capabilities
        self.node_groups: dict[int, list[str]] = {}  # node id -> groups it trains (this run's sites)
        self.setup: FederationSetup | None = None  # the run's setup, once agreed (re-sent to a restarted site)
        self.rounds_done = 0
        # Deployed runs: only the coordinator's registered nodes take part (server/registry.py).
        self.registry: SiteRegistry | None = read_registry(cfg.registry) if cfg.registry else None
        self.errors: dict[int, str] = {}  # node id -> the last error a site replied (its reason)
        self.refused_nodes: set[int] = set()  # connected nodes the registry does not know
        # node id -> seconds from last round's push to its reply: this round's push order (slowest_first).
        self.reply_lags: dict[int, float] = {}

    # ------------------------------------------------------------------ messaging

    def _site(self, node_id: int) -> str:
        caps = self.sites.get(node_id)
        if caps is None and self.registry is not None:
            return self.registry.by_node().get(node_id, f"node-{node_id}")
        return caps.site if caps else f"node-{node_id}"

    def _ask(self, message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        """Send one message per node, return the non-error replies by node (errors logged)."""
        messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
        replies = send_and_receive(self.grid, messages, self.cfg.timeout_s)
        out: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s: site %s replied with an error: %s", message_type, self._site(node), reply.error.reason)
                self.errors[node] = reply.error.reason or "no reason given"
                continue
            out[node] = reply
        for node in contents:
            if node not in out:
                log.warning("%s: no usable reply from site %s", message_type, self._site(node))
        return out

    def _wait_for_nodes(self, before: str = "round 0") -> list[int]:
        """Wait for min_nodes connected sites: up to timeout_s before round 0, which fails without
        them; up to REJOIN_WAIT_S before a later round, which then goes on with the sites there are
        (a site down for good must not stop the run; one restarting is given a minute)."""
        limit = self.cfg.timeout_s if before == "round 0" else min(self.cfg.timeout_s, REJOIN_WAIT_S)
        deadline = time.monotonic() + limit
        said = 0.0
        while len(nodes := self._admitted(self.grid.get_node_ids())) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                if before == "round 0":
                    raise TimeoutError(
                        f"only {len(nodes)} of {self.cfg.min_nodes} sites connected within {self.cfg.timeout_s} s"
                    )
                log.warning(
                    "%s: only %d of %d sites connected after %g s; going on without the others",
                    before,
                    len(nodes),
                    self.cfg.min_nodes,
                    limit,
                )
                break
            if time.monotonic() - said > 30:
                log.info("%s: waiting for sites: %d connected, %d required", before, len(nodes), self.cfg.min_nodes)
                said = time.monotonic()
            time.sleep(1.0)
        return nodes

    def _admitted(self, nodes: Iterable[int]) -> list[int]:
        if self.registry is None:
            return sorted(nodes)
        admitted, refused = admit(nodes, self.registry)
        for node in sorted(set(refused) - self.refused_nodes):
            log.warning(
                "node %d is connected but not in the coordinator's registry %s: refused (it is sent "
                "nothing and nothing of it is averaged)",
                node,
                self.cfg.registry,
            )
        self.refused_nodes.update(refused)
        return admitted

    def _refused_reasons(self, nodes: Iterable[int]) -> str:
        """The sites' own reasons (error replies), for a run that cannot go on."""
        reasons = [f"{self._site(n)}: {self.errors[n]}" for n in sorted(nodes) if n in self.errors]
        return f" ({'; '.join(reasons)})" if reasons else ""

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
            if self.registry is not None and (why := name_mismatch(node, caps.site, self.registry)):
                log.warning("capabilities of node %d refused: %s", node, why)
                continue
            if caps.site in seen:
                raise RuntimeError(
                    f"two sites call themselves {caps.site!r} (nodes {seen[caps.site]} and {node}): "
                    "site names must be unique (node config site-name)"
                )
            seen[caps.site] = node
            self.sites[node] = caps
        if not self.sites:
            raise RuntimeError(f"no site answered the capabilities query{self._refused_reasons(nodes)}")
        self.node_groups = {node: caps.groups for node, caps in self.sites.items()}
        for node, caps in sorted(self.sites.items(), key=lambda kv: kv[1].site):
            log.info(
                "site %-12s node %d: modalities %s, subjects %s -> groups %s",
                caps.site,
                node,
                caps.modalities,
                caps.subjects,
                caps.groups,
            )

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
        log.info(
            "vocabulary agreed from %d sites: %d codes, %d PRS traits, %d numeric normalisers",
            len(stats),
            len(vocab.codes),
            vocab.n_prs_traits,
            len(vocab.numeric),
        )
        modalities = federation_modalities([caps.modalities for caps in self.sites.values()], vocab)
        log.info("model modalities: %s (the union of the sites')", modalities)
        return FederationSetup(
            vocabulary=vocab,
            model=self.cfg.model,
            model_seed=self.cfg.seed,
            modalities=modalities,
            **self.cfg.tokens.model_dump(),  # every site tokenises as the run config says
        )

    def deliver_setup(self, setup: FederationSetup, nodes: Iterable[int]) -> set[int]:
        """Send the setup (query.setup) to these nodes; the nodes that acknowledged its sha256."""
        record = ConfigRecord({"json": setup.to_json(), "sha256": setup.sha256})
        replies = self._ask(SETUP, {n: RecordDict({"setup": record}) for n in nodes})
        accepted = set()
        for node, reply in replies.items():
            ack = reply.content.config_records.get("setup")
            if ack is not None and ack.get("sha256") == setup.sha256:
                accepted.add(node)
        return accepted

    def send_setup(self, setup: FederationSetup) -> None:
        self.setup = setup
        accepted = self.deliver_setup(setup, list(self.sites))
        for node in list(self.sites):
            if node not in accepted:
                log.warning("site %s did not accept the setup; it takes no part in this run", self._site(node))
                self.node_groups.pop(node, None)
        # A site is sent only groups the model has (e.g. no genomics when no PRS trait was agreed).
        self.node_groups = {node: [g for g in groups if g in setup.groups] for node, groups in self.node_groups.items()}
        if not self.node_groups:
            raise RuntimeError("no site accepted the setup")

    @staticmethod
    def setup_needed(replies: Iterable[Message], sent: Sequence[Message]) -> set[int]:
        """The nodes whose reply says they lack the run's setup (their SuperNode restarted)."""
        return {
            origin(r, sent) for r in replies if not r.has_error() and SETUP_NEEDED_RECORD in r.content.config_records
        }

    def resend_setup(self, nodes: set[int], what: str) -> set[int]:
        """Send the setup again to nodes that lost it; those that took it (and may be retried)."""
        assert self.setup is not None
        names = ", ".join(sorted(self._site(n) for n in nodes))
        log.warning("%s: site(s) %s no longer hold the setup (SuperNode restarted?): sending it again", what, names)
        accepted = self.deliver_setup(self.setup, sorted(nodes))
        for node in sorted(nodes - accepted):
            log.warning("%s: site %s did not accept the setup sent again", what, self._site(node))
        return accepted

    # ------------------------------------------------------------------ resume

    def _check_resumable(self, saved: Mapping[str, Any]) -> None:
        changed = resume_conflicts(self.cfg, saved)
        if changed:
            now = self.cfg.model_dump(mode="json")
            raise ValueError(
                f"cannot resume: the run config differs from the checkpoint's in {changed} "
                f"(e.g. {changed[0]}: {saved.get(changed[0])!r} -> {now.get(changed[0])!r})"
            )

    def initial_state(self) -> tuple[ServerState | None, Path | None]:
        latest = latest_server_checkpoint(self.ckpt_dir)
        if self.cfg.resume:
            chosen = Path(self.cfg.resume_from) if self.cfg.resume_from else latest
            if chosen is None:
                raise FileNotFoundError(f"resume requested but {self.ckpt_dir} holds no checkpoint")
            state = load_server_checkpoint(chosen)  # refuses a corrupted or edited checkpoint
            self._check_resumable(state.run_config)
            if self.cfg.resume_from:
                self._set_aside_after(state.round)
            return state, chosen
        if self.cfg.resume_from:
            raise ValueError(f"run config resume-from {self.cfg.resume_from!r} is set but resume is not")
        if latest is not None:
            raise FileExistsError(
                f"{self.out_dir} already holds a run (checkpoint {latest.name}); resume it (resume=true) "
                "or choose another output directory"
            )
        return None, None

    def _set_aside_after(self, rnd: int) -> None:
        """Resuming from an earlier checkpoint (resume-from): later ones under checkpoints/ belong to
        the abandoned continuation; they move to checkpoints-abandoned/ so that "the latest
        checkpoint" is this run's again (and nothing is deleted)."""
        if not self.ckpt_dir.is_dir():
            return
        for path in sorted(self.ckpt_dir.iterdir()):
            m = _STEP_DIR.fullmatch(path.name)
            if m and int(m.group(1)) > rnd:
                dest = self.out_dir / "checkpoints-abandoned" / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                path.rename(dest)
                log.warning("resuming from round %d: later checkpoint %s moved to %s", rnd, path, dest)

    # ------------------------------------------------------------------ the run

    def run(self) -> Path | None:
        """Run (or resume) the federation; returns the last checkpoint written. outcome.json says
        how it ended (the exception's reason when it fails, the sites lost when it completes).

        The out-dir is this run's alone (server/run_claim.py): its claim is taken before anything
        is written there (OutDirInUse if another live run holds it: then nothing is) and given
        back at the end."""
        claim, stale = adopt_for_serverapp(self.out_dir, self.run_id)
        try:
            return self._run_claimed(stale)
        finally:
            release(self.out_dir, claim)

    def _run_claimed(self, stale: Holder | None) -> Path | None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.out_dir / "server.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        logger = logging.getLogger("healthfm")
        # In deployment the flwr-serverapp process leaves the root logger at WARNING: without a
        # level of its own, "healthfm" dropped every INFO line and server.log stayed empty.
        level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        outcome = self.outcome = started(self.run_id, self.cfg.rounds, 0)
        write_outcome(self.out_dir, outcome)
        if stale is not None:
            log.warning("out-dir %s was claimed by %s, which is gone: taken over", self.out_dir, stale.describe())
        try:
            log.info(
                "run %s: out_dir %s, %d rounds%s",
                self.run_id if self.run_id is not None else "-",
                self.out_dir,
                self.cfg.rounds,
                ", resume" if self.cfg.resume else "",
            )
            last = self._run()
        except (SystemExit, KeyboardInterrupt) as err:  # a signal: Flower turns SIGINT/SIGTERM into an exit
            log.error("run interrupted after round %d (%s)", self.rounds_done, type(err).__name__)
            write_outcome(
                self.out_dir,
                outcome.model_copy(
                    update=dict(
                        status="interrupted",
                        reason="its ServerApp was stopped by a signal: `flwr stop`, or its SuperExec or SuperLink stopped",
                        rounds_done=self.rounds_done,
                        finished_at=time.time(),
                    )
                ),
            )
            raise
        except BaseException as err:
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:1000]
            log.error("run failed: %s", reason)
            write_outcome(
                self.out_dir,
                outcome.model_copy(
                    update=dict(status="failed", reason=reason, rounds_done=self.rounds_done, finished_at=time.time())
                ),
            )
            raise
        else:
            events_path = self.out_dir / "rounds.jsonl"
            lost = sites_lost(read_events(events_path)) if events_path.is_file() else {}
            for site, why in sorted(lost.items()):
                log.error("site %s was lost: %s", site, why)
            write_outcome(
                self.out_dir,
                outcome.model_copy(
                    update=dict(
                        status="completed", sites_lost=lost, rounds_done=self.rounds_done, finished_at=time.time()
                    )
                ),
            )
            return last
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
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
            random.setstate(state.python_random)
            if state.torch_random is not None:
                torch.set_rng_state(state.torch_random)
            log.info("resuming after round %d from %s", start, ckpt_path)
        # From the global arrays as a site holding every group receives them (one packed part).
        max_reply_bytes = cfg.max_reply_bytes or default_max_reply_bytes(pack_record(arrays), cfg.reply_size_margin)
        self.strategy = make_strategy(cfg, max_reply_bytes)
        if state is not None:
            self.strategy.load_state_dict(state.strategy)
        setup.vocabulary.save(self.out_dir / "vocabulary.json")
        self.send_setup(setup)
        round0 = time.perf_counter() - t0
        self.rounds_done = start
        event = "resume" if state is not None else "setup"
        start_event: dict[str, Any] = dict(
            run_id=self.run_id,
            round=start,
            seconds=round0,
            setup_sha256=setup.sha256,
            vocab_size=setup.vocabulary.vocab_size,
            checkpoint=str(ckpt_path) if ckpt_path else None,
            sites={
                caps.site: {
                    "node_id": node,
                    "modalities": caps.modalities,
                    "subjects": caps.subjects,
                    "groups": self.node_groups.get(node, []),
                }
                for node, caps in self.sites.items()
            },
            refused={self._site(n): reason for n, reason in sorted(self.errors.items())},  # sites' own refusals
        )
        self.events.write(event, **start_event)
        self.audit.write_run(
            {"event": event, **start_event},
            {
                "max_reply_bytes": max_reply_bytes,
                "timeout_s": cfg.timeout_s,
                "max_abs_value": self.strategy.max_abs_value,
                # bounded influence (server/strategy.py): counts and update norms a reply may carry
                "max_examples": cfg.local_steps * cfg.batch_size,
                "norm_step_factor": cfg.norm_step_factor,
                "norm_history_factor": cfg.norm_history_factor,
                "norm_history_rounds": cfg.norm_history_rounds,
                "norm_outlier_factor": cfg.norm_outlier_factor,
                "max_update_norm": cfg.max_update_norm,
            },
        )
        log.info(describe_limits(max_reply_bytes, cfg.timeout_s))
        log.info("round 0 done in %.1f s: %d sites, setup %s", round0, len(self.node_groups), setup.sha256[:12])
        log.info("privacy: %s", cfg.privacy.describe())

        last = ckpt_path
        end = cfg.rounds if cfg.stop_after_round is None else min(cfg.rounds, cfg.stop_after_round)
        if start >= end:
            log.info("nothing to do: %d of %d rounds already done", start, cfg.rounds)
        for rnd in range(start + 1, end + 1):
            arrays, last = self.train_round(rnd, setup, arrays)
            self.rounds_done = rnd
            write_outcome(self.out_dir, self.outcome.model_copy(update=dict(rounds_done=rnd)))  # still running
            due = rnd == cfg.rounds or (cfg.evaluate_every and rnd % cfg.evaluate_every == 0)
            if due and cfg.eval_tasks:  # an empty task list asks for no federated evaluation
                self.evaluate(rnd, setup, arrays)
            elif due:
                log.info("evaluation after round %d: skipped (eval_tasks is empty)", rnd)
        write_summary(self.out_dir)
        return last

    def train_round(
        self, rnd: int, setup: FederationSetup, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], Path]:
        cfg = self.cfg
        t_start = time.perf_counter()
        round_cfg = RoundConfig(
            round=rnd,
            rounds=cfg.rounds,
            local_steps=cfg.local_steps,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            max_events=cfg.max_events,
            max_patches=cfg.max_patches,
            seed=cfg.seed,
            transport=cfg.transport,
            int8_rounding=cfg.int8_rounding,
            error_feedback=cfg.error_feedback,
            setup_sha256=setup.sha256,
            weights=curriculum_weights(rnd - 1, cfg.rounds, cfg.model),
            **cfg.privacy.round_fields(),
        )
        self._wait_for_nodes(f"round {rnd}")
        messages = slowest_first(
            self.strategy.train_messages(rnd, arrays, ConfigRecord(round_cfg.to_flat()), self.grid, self.node_groups),
            self.reply_lags,
        )
        sites: dict[str, dict[str, Any]] = {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            groups = set(self.strategy.groups_for_node(node, self.node_groups))  # as train_messages sent
            size, objects = message_size(msg)
            sites[self._site(node)] = {
                "node_id": node,
                "groups_sent": sorted(groups),
                "keys_sent": sum(parameter_group(k) in groups for k in arrays),
                "bytes_sent": size,
                "objects_sent": objects,
                "status": "no reply",
            }
        t_sent = time.perf_counter()
        exchange = ExchangeTimes()
        replies = send_and_receive(self.grid, messages, cfg.timeout_s, exchange)
        self.reply_lags = {}
        for msg in messages:  # when each site's reply came, from the push's start
            arrived = exchange.arrivals.get(msg.metadata.message_id)
            if arrived is not None:
                lag = self.reply_lags[msg.metadata.dst_node_id] = arrived - exchange.push_start
                sites[self._site(msg.metadata.dst_node_id)]["reply_after_seconds"] = lag
        if need := self.setup_needed(replies, messages):
            messages, replies = self._retry_train(rnd, need, messages, replies, sites)
        t_replied = time.perf_counter()
        # origin: the SuperLink answers for a dead SuperNode from its own node id.
        replies.sort(key=lambda m: self._site(origin(m, messages)))
        for reply in replies:
            node = origin(reply, messages)
            entry = sites.setdefault(self._site(node), {"node_id": node})
            size, objects = message_size(reply)
            entry["bytes_received"] = entry.get("bytes_received", 0) + size
            entry["objects_received"] = entry.get("objects_received", 0) + objects
        t_agg = time.perf_counter()
        # round_cfg: what the server asked of every site; the counts and norms it allows follow from it.
        outcome = self.strategy.aggregate(
            rnd, replies, current_arrays=arrays, node_groups=self.node_groups, sent=messages, round_config=round_cfg
        )
        self._record_outcome(sites, outcome, replies, messages)
        self._record_absent(sites)
        if outcome.arrays is not None:
            arrays = outcome.arrays
        rejected = [{"site": self._site(r.node_id), "node_id": r.node_id, "reason": r.reason} for r in outcome.rejected]
        t_ckpt = time.perf_counter()
        path = save_server_checkpoint(
            self.ckpt_dir,
            ServerState(
                round=rnd,
                arrays=arrays,
                strategy=self.strategy.state_dict(),
                setup=setup,
                run_config=cfg.model_dump(mode="json"),
                python_random=random.getstate(),
                torch_random=torch.get_rng_state(),
            ),
            keep=cfg.keep_checkpoints,
        )
        t_end = time.perf_counter()
        train_max = max((e.get("train_seconds", 0.0) for e in sites.values()), default=0.0)
        timed = any("train_seconds" in e for e in sites.values())
        timings = {
            "round_seconds": t_end - t_start,
            "configure_seconds": t_sent - t_start,
            "wait_seconds": t_replied - t_sent,
            "push_seconds": exchange.push_end - exchange.push_start,
            "sent_at": exchange.push_start,  # wall clock: beside the sites' own log lines
            "aggregate_seconds": t_ckpt - t_agg,
            "checkpoint_seconds": t_end - t_ckpt,
            "local_train_seconds_max": train_max,
            "local_train_seconds_sum": sum(e.get("train_seconds", 0.0) for e in sites.values()),
            "other_seconds": (t_end - t_start) - train_max,
        }
        contributors = {g: sorted(self._site(n) for n in nodes) for g, nodes in outcome.contributors.items()}
        epsilon = self.check_privacy(rnd, sites)
        losses = outcome.losses
        self.events.write(
            "round",
            round=rnd,
            rounds=cfg.rounds,
            weights=round_cfg.weights.model_dump(),
            sites=sites,
            privacy=cfg.privacy.model_dump(),
            epsilon=epsilon,
            rejected=rejected,
            contributors=contributors,
            losses=losses,
            absent={
                n: f"{e['status']}: {e.get('reason', '')}" for n, e in sorted(sites.items()) if e["status"] != "ok"
            },
            updated=outcome.arrays is not None,
            bytes_sent=sum(e.get("bytes_sent", 0) for e in sites.values()),
            bytes_received=sum(e.get("bytes_received", 0) for e in sites.values()),
            timings=timings,
            checkpoint=str(path),
        )
        self.audit.write_round({"round": rnd, "sites": sites, "rejected": rejected, "contributors": contributors})
        ok = sum(e.get("status") == "ok" for e in sites.values())
        loss = losses.get("total")
        log.info(
            "round %d/%d: %d/%d sites ok, loss %s, %.1f s (local training %s, other %s: configure %.2f s, "
            "push %.2f s, last reply after %.2f s, aggregate %.2f s, checkpoint %.2f s)",
            rnd,
            cfg.rounds,
            ok,
            len(sites),
            f"{loss:.4f}" if loss is not None else "n/a",
            timings["round_seconds"],
            # Under DP sites send no timings (they would reveal their secret batch sizes).
            f"{train_max:.1f} s" if timed else "not reported",
            f"{timings['other_seconds']:.1f} s" if timed else "n/a",
            timings["configure_seconds"],
            timings["push_seconds"],
            timings["wait_seconds"],
            timings["aggregate_seconds"],
            timings["checkpoint_seconds"],
        )
        for name, e in sorted(sites.items()):
            log.info(
                "  %-12s %-9s groups %s, sent %s B, received %s B%s%s",
                name,
                e.get("status"),
                ",".join(e.get("groups_sent", [])),
                e.get("bytes_sent", 0),
                e.get("bytes_received", 0),
                f", reply after {e['reply_after_seconds']:.2f} s (training {e.get('train_seconds') or 0:.2f} s)"
                if "reply_after_seconds" in e
                else "",
                f" ({e['reason']})" if "reason" in e else "",
            )
        return arrays, path

    def _retry_train(
        self,
        rnd: int,
        need: set[int],
        messages: list[Message],
        replies: list[Message],
        sites: dict[str, dict[str, Any]],
    ) -> tuple[list[Message], list[Message]]:
        """Sites that lost the setup get it again and one more train message this round; the
        messages and replies the strategy then aggregates (a second "setup-needed": left out)."""
        kept = [m for m in messages if m.metadata.dst_node_id not in need]
        replies = [r for r in replies if origin(r, messages) not in need]
        for node in need:
            sites[self._site(node)].update(
                status="no setup", reason="lost the run's setup (SuperNode restarted?); it was not accepted again"
            )
        accepted = self.resend_setup(need, f"round {rnd}")
        # The same content again (the same arrays and RoundConfig), in a new message.
        retry = [
            Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
            for m in messages
            if m.metadata.dst_node_id in accepted
        ]
        if not retry:
            return kept, replies
        for msg in retry:
            entry = sites[self._site(msg.metadata.dst_node_id)]
            entry.update(status="no reply", setup_resent=True, bytes_sent=entry["bytes_sent"] + message_bytes(msg))
            entry.pop("reason", None)
        retry_replies = send_and_receive(self.grid, retry, self.cfg.timeout_s)
        again = self.setup_needed(retry_replies, retry)
        for node in again:
            sites[self._site(node)].update(status="no setup", reason="asked for the setup again after receiving it")
        return (
            [*kept, *(m for m in retry if m.metadata.dst_node_id not in again)],
            [*replies, *(r for r in retry_replies if origin(r, retry) not in again)],
        )

    def _record_absent(self, sites: dict[str, dict[str, Any]]) -> None:
        """Every site of the run appears in the round: one not addressed is "absent", with why;
        one addressed that never answered says how long it was waited for."""
        for node, caps in self.sites.items():
            if caps.site in sites:
                continue
            if node not in self.node_groups:
                why = "did not accept the run's setup in round 0"
            elif node not in set(self.grid.get_node_ids()):
                why = "not connected to the SuperLink"
            else:
                why = "not sampled"
            sites[caps.site] = {"node_id": node, "status": "absent", "reason": why}
        for entry in sites.values():
            if entry.get("status") == "no reply" and "reason" not in entry:
                entry["reason"] = f"no reply within timeout-s {self.cfg.timeout_s:g} s"

    def _record_outcome(
        self, sites: dict[str, dict[str, Any]], outcome: RoundOutcome, replies: list[Message], sent: list[Message]
    ) -> None:
        """Each site's entry of the round event, from the strategy's parsed replies and verdicts."""
        for node, reply in outcome.replies.items():
            entry = sites.setdefault(self._site(node), {"node_id": node})
            entry.update(site_entry(reply))
        for node in outcome.accepted:
            sites[self._site(node)]["status"] = "ok"
        errors = {origin(m, sent): m.error.reason for m in replies if m.has_error()}
        for r in outcome.rejected:
            entry = sites.setdefault(self._site(r.node_id), {"node_id": r.node_id})
            if r.kind in ("duplicate", "unsolicited") and entry.get("status") not in (None, "no reply"):
                continue  # the node's own reply decided its status
            if r.kind == "error":
                entry.update(status="error", reason=errors.get(r.node_id, r.reason))
            elif r.kind == "refused":
                entry.update(status="refused", reason=outcome.replies[r.node_id].reason)
            else:
                entry.update(status="rejected", reason=r.reason)

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
            if dp.get("new_budget_at") is not None:  # in the audit log too (server/audit.py)
                log.warning(
                    "round %d: site %s reports a NEW PRIVACY BUDGET started by its admin at %s (the given-up "
                    "ledger had spent epsilon %s); its epsilon counts from then",
                    rnd,
                    name,
                    time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(dp["new_budget_at"])),
                    dp.get("replaced_epsilon", "unknown"),
                )
            if req.requested and dp.get("delta", 0.0) > req.delta:
                log.warning(
                    "round %d: site %s accounts at delta %g, larger than the %g asked (its policy's)",
                    rnd,
                    name,
                    dp["delta"],
                    req.delta,
                )
        if epsilon:
            log.info(
                "round %d: cumulative epsilon per site: %s", rnd, ", ".join(f"{s} {v:.3f}" for s, v in epsilon.items())
            )
        return epsilon

    def evaluate(self, rnd: int, setup: FederationSetup, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        eval_cfg = cfg.eval_config(rnd, setup.sha256)
        if cfg.eval_max_subjects:
            log.info(
                "evaluation after round %d: each site scores a fixed subject sample, at most %d subjects per task "
                "and split (eval_max_subjects; 0 scores every subject)",
                rnd,
                cfg.eval_max_subjects,
            )
        connected = set(self._wait_for_nodes(f"evaluation after round {rnd}"))
        # One packed part per message, packed once per distinct group set (strategy.records_for_nodes).
        records = self.strategy.records_for_nodes(
            arrays, {node: groups for node, groups in sorted(self.node_groups.items()) if node in connected}
        )
        contents = {
            node: RecordDict({"arrays": record, "config": ConfigRecord(eval_cfg.to_flat())})
            for node, record in records.items()
        }
        replies = self._ask(MessageType.EVALUATE, contents)
        need = {n for n, r in replies.items() if SETUP_NEEDED_RECORD in r.content.config_records}
        if need:  # restarted sites: the setup again, then one more evaluate message each
            for node in need:
                replies.pop(node)
            accepted = self.resend_setup(need, f"evaluation after round {rnd}")
            replies.update(self._ask(MessageType.EVALUATE, {n: contents[n] for n in sorted(accepted)}))
            for node in [n for n, r in replies.items() if SETUP_NEEDED_RECORD in r.content.config_records]:
                replies.pop(node)
        per_site: dict[str, EvalReply] = {}
        for node, reply in sorted(replies.items(), key=lambda kv: self._site(kv[0])):
            try:
                metrics = reply.content.metric_records.get(METRICS_RECORD)
                if metrics is None:
                    raise ValueError(f"no MetricRecord {METRICS_RECORD!r}")
                per_site[self._site(node)] = EvalReply.from_records(
                    dict(metrics), expected=task_keys(eval_cfg.tasks), score_bins=eval_cfg.score_bins
                )
            except ValueError as err:
                log.warning("evaluate: the reply of site %s is left out: %s", self._site(node), err)
        aggregated = aggregate_site_metrics(per_site)
        seconds = time.perf_counter() - t0
        flat = {site: reply.to_records() for site, reply in per_site.items()}
        absent = {
            caps.site: (
                "did not accept the run's setup in round 0"
                if node not in self.node_groups
                else "not connected to the SuperLink"
                if node not in contents
                else "lost the setup and did not take it again"
                if node in need and node not in replies
                else "no usable evaluation reply (see server.log)"
            )
            for node, caps in sorted(self.sites.items())
            if caps.site not in per_site
        }
        asked_sites = sorted(self._site(n) for n in self.node_groups)
        binary = binary_keys(eval_cfg.tasks)
        asked = {
            "tasks": task_keys(eval_cfg.tasks),
            "binary_tasks": binary,
            "asked_sites": asked_sites,
            "max_subjects": cfg.eval_max_subjects,
            "score_bins": eval_cfg.score_bins,
            "score_scale": eval_cfg.score_scale,
        }
        # Per binary task, the sites' histograms pooled (healthfm_core/eval/federation_auroc.py).
        pooled = {key: f.model_dump() for key, f in federation_aurocs(binary, per_site, asked_sites, absent).items()}
        self.events.write(
            "evaluate",
            round=rnd,
            sites=flat,
            aggregated=aggregated,
            federation=pooled,
            seconds=seconds,
            absent=absent,
            **asked,
        )
        self.audit.write_evaluation(rnd, sorted(per_site), absent)
        atomic_write_text(
            self.out_dir / "evaluation.json",
            json.dumps(
                {"round": rnd, "sites": flat, "aggregated": aggregated, "federation": pooled, **asked}, indent=1
            ),
        )
        log.info("evaluation after round %d (%.1f s): %d sites reported", rnd, seconds, len(per_site))
        for line in outcome_lines(
            task_keys(eval_cfg.tasks), per_site, [self._site(n) for n in sorted(self.node_groups)], absent
        ):
            log.info("  %s", line)
        for key, f in pooled.items():
            log.info("  %-28s federation-wide AUROC: %s", key, FederationAUROC.model_validate(f).describe())
        scope = scored_of_available(per_site)
        for key, value in aggregated.items():
            if key.endswith(".auroc") or key.endswith(".r2"):
                task = key.rsplit(".", 1)[0]
                sampled = ""
                if task in scope:
                    n, subjects, avail_subjects = scope[task]
                    sampled = f"; a subject sample: rows of {subjects} of {avail_subjects} held-out subjects"
                n_task = aggregated.get(f"{task}.n", 0)
                log.info(
                    "  %-28s %s %.3f (n-weighted mean of sites, n=%d%s)",
                    task,
                    key.rsplit(".", 1)[1],
                    value,
                    n_task,
                    sampled,
                )
        return aggregated


def site_entry(reply: TrainReply) -> dict[str, Any]:
    """A site's part of a round event (rounds.jsonl) from its parsed train reply."""
    entry: dict[str, Any] = {}
    if reply.status == "ok":
        entry.update(
            groups_received=reply.groups,
            keys_received=len(reply.arrays),
            num_examples=dict(reply.group_examples),
            losses=dict(reply.losses),
        )
        for name in ("train_seconds", "client_seconds", "rate_min", "rate_max"):
            if (value := getattr(reply, name)) is not None:
                entry[name] = value
    if reply.dp is not None:
        entry["dp"] = reply.dp.model_dump(exclude_none=True)
    return entry


# ---------------------------------------------------------------------------- the ServerApp


def make_server_app(config: FederationConfig | None = None) -> ServerApp:
    """The ServerApp; without `config` it reads the run config (deployment, `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else FederationConfig.from_run_config(context.run_config)
        FederationServer(grid, cfg, run_id=context.run_id).run()

    return app


app = make_server_app()

__all__ = [
    "FederationConfig",
    "FederationServer",
    "PrivacyRequest",
    "ServerOptimizerConfig",
    "app",
    "make_server_app",
    "make_strategy",
    "read_events",
    "site_entry",
    "write_summary",
]
