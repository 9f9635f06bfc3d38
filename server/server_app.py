"""The federation's Flower ServerApp (Message API, flwr 1.41): round 0, rounds, evaluation, resume.

Round 0 (every run, resumed or not) is the roster's (server/roster.py): the sites' capabilities,
the vocabulary agreed from their code statistics (fresh runs; a resumed run takes the setup from
its checkpoint), the setup delivered to every site.
Rounds r = 1..R are server/round.py's (run_round: messages, exchange, the one retry, checks and
average in one pass); here each round's record is checkpointed, then logged, while the next
round's sites train (at its first reply: off the round's path; at once after the last round,
before an evaluation and when the run fails).
Federated evaluation every `evaluate_every` rounds and after the last is server/evaluation.py's.
Here: the run's claim on its out-dir, resume, the order of things, checkpoints, the run's records.

Outputs under out_dir: rounds.jsonl (one JSON object per event: setup, round, evaluate, resume),
server.log (the run's INFO log, in simulation and deployment), outcome.json (how the run ended,
server/outcome.py), audit.jsonl, checkpoints/step-NNNNNNNN, vocabulary.json, evaluation.json,
summary.md, evaluation_auroc.png (server/runlog.py); with record-transcript, transcript/round-<n>/
(server/transcript.py).

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

import functools
import logging
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import FederationSetup
from server.audit import AUDIT_FILE, AuditLog, read_audit_lines, round_records
from server.checkpoint import (
    ServerState,
    latest_server_checkpoint,
    load_server_checkpoint,
    save_server_checkpoint,
)
from server.clipping import ROBUST_MIN_HOLDERS, few_holders
from server.config import FederationConfig, resume_conflicts
from server.deploy.flower_patches import set_reply_pull_backoff
from server.evaluation import evaluate
from server.limits import default_max_reply_bytes, describe_limits
from server.live_round import LiveRound
from server.outcome import sites_lost, started, untrained_groups, write_outcome
from server.roster import Roster
from server.round import RoundRecord, SiteOutcome, run_round
from server.run_claim import Holder, adopt_for_serverapp, release
from server.runlog import EventLog, json_values, read_events, write_summary
from server.secure_round import KeyRounds, run_secure_round
from server.strategy import GroupAdam, ModalityAwareFedAvg, pack_record
from server.transcript import write_round_transcript

log = logging.getLogger("healthfm.server")
_STEP_DIR = re.compile(r"step-(\d+)")


class RoundStates(NamedTuple):
    """What a round's checkpoint keeps besides its record, taken as the round ended."""

    python_random: Any  # random.getstate()
    torch_random: torch.Tensor
    strategy: dict[str, np.ndarray]


def make_strategy(cfg: FederationConfig, max_reply_bytes: int | None) -> ModalityAwareFedAvg:
    """The run's strategy: its configuration only (each round's inputs are passed to it by
    server/round.py, which waits up to timeout_s for min_nodes before each round, then goes on)."""
    opt = cfg.server_optimizer
    return ModalityAwareFedAvg(
        min_sites_per_group=cfg.min_sites_per_group,
        norm_outlier_factor=cfg.norm_outlier_factor,
        max_update_norm=cfg.max_update_norm,
        norm_step_factor=cfg.norm_step_factor,
        norm_history_factor=cfg.norm_history_factor,
        norm_history_rounds=cfg.norm_history_rounds,
        norm_clip_factor=cfg.norm_clip_factor,
        max_reply_bytes=max_reply_bytes,
        server_optimizer=GroupAdam(**opt.model_dump()) if opt else None,
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
        self.roster = Roster(grid, cfg)  # the run's sites, round 0 and the setup (server/roster.py)
        # What the run does now, for the coordinator's dashboard (live.json, server/live_round.py).
        self.live = self.roster.live = LiveRound(self.out_dir, run_id, cfg.rounds)
        self.rounds_done = 0
        self.model_groups: list[str] = []  # the setup's parameter groups, once agreed
        # node id -> seconds from last round's push to its reply: this round's push order (slowest_first).
        self.reply_lags: dict[int, float] = {}

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

    def _recover_round_event(self, state: ServerState, ckpt_path: Path) -> None:
        """The checkpoint's round missing from rounds.jsonl (the server died after writing the
        checkpoint, before its log line): write the event the checkpoint carries, marked
        `recovered`, and the audit records of it that the audit log lacks."""
        if state.round_event is None or state.round == 0:
            return
        logged = read_events(self.events.path) if self.events.path.is_file() else []
        if any(e.get("event") == "round" and e.get("round") == state.round for e in logged):
            return
        self.events.write("round", **state.round_event, checkpoint=str(ckpt_path), recovered=True)
        audited = {
            (r.get("round"), r.get("record"), r.get("site"))
            for r in read_audit_lines(self.audit.path)
            if r.get("record") in ("site-round", "secure-aggregation")
        }
        for record in round_records(state.round_event):
            if (record["round"], record["record"], record.get("site")) not in audited:
                self.audit.write(record)
        log.warning(
            "round %d is in checkpoint %s but was not in %s (the server stopped between the two): "
            "its event is written from the checkpoint",
            state.round,
            ckpt_path,
            self.events.path,
        )

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
            events = read_events(events_path) if events_path.is_file() else []
            lost = sites_lost(events)
            for site, why in sorted(lost.items()):
                log.error("site %s was lost: %s", site, why)
            untrained = untrained_groups(events, self.model_groups)
            for group, why in sorted(untrained.items()):
                log.error("group %s was never trained (its weights are the initialisation): %s", group, why)
            write_outcome(
                self.out_dir,
                outcome.model_copy(
                    update=dict(
                        status="completed",
                        sites_lost=lost,
                        untrained_groups=untrained,
                        rounds_done=self.rounds_done,
                        finished_at=time.time(),
                    )
                ),
            )
            return last
        finally:
            self.live.ended()
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()

    def _run(self) -> Path | None:
        cfg, roster = self.cfg, self.roster
        state, ckpt_path = self.initial_state()
        if state is not None and ckpt_path is not None:
            self._recover_round_event(state, ckpt_path)
        t0 = time.perf_counter()
        nodes = self.roster.wait_for_nodes()
        self.roster.query_capabilities(nodes)
        if state is None:
            setup = self.roster.agree_vocabulary()
            arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
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
        self.model_groups = setup.groups  # the groups the outcome says were never trained, if any
        self.roster.send_setup(setup)
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
                    "groups": roster.node_groups.get(node, []),
                }
                for node, caps in roster.sites.items()
            },
            refused={roster.site(n): reason for n, reason in sorted(roster.errors.items())},  # sites' own refusals
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
                "norm_clip_factor": cfg.norm_clip_factor,
                # secure aggregation (server/secure_round.py): no site's update is seen in the clear
                "secure_aggregation": cfg.secure_aggregation,
                "secagg_min_holders": cfg.secagg_min_holders,
                "secagg_threshold_fraction": cfg.secagg_threshold_fraction,
                "secagg_field_bits": cfg.secagg_field_bits,
            },
        )
        log.info(describe_limits(max_reply_bytes, cfg.timeout_s))
        log.info("round 0 done in %.1f s: %d sites, setup %s", round0, len(roster.node_groups), setup.sha256[:12])
        log.info("privacy: %s", cfg.privacy.describe())

        last = ckpt_path
        end = cfg.rounds if cfg.stop_after_round is None else min(cfg.rounds, cfg.stop_after_round)
        if start >= end:
            log.info("nothing to do: %d of %d rounds already done", start, cfg.rounds)
        # Secure aggregation: its own round (server/secure_round.py), the same inputs and record.
        # The run's rounds ahead whose keys are exchanged (secagg-key-rounds): from this process on.
        play_round = (
            functools.partial(run_secure_round, key_rounds=KeyRounds()) if cfg.secure_aggregation else run_round
        )
        # A round's checkpoint and logs are written while the next round's sites train (`while_out`:
        # at its first reply), not between the two rounds: they are off the round's path.
        # At once before an evaluation (its event follows the round's), after the last round, and
        # when anything fails. `unwritten`: the round aggregated whose checkpoint is not written
        # yet, with the random and strategy states as the round left them (the next round's
        # sampling draws on the random state before that checkpoint is written); `next_start`:
        # when the round after it started (its time runs to there).
        unwritten: tuple[RoundRecord, RoundStates] | None = None
        next_start: float | None = None

        def settle() -> None:
            nonlocal last, unwritten, next_start
            if unwritten is None:
                return
            (record, states), unwritten = unwritten, None
            if cfg.record_transcript:  # before the checkpoint: a round checkpointed has its transcript
                write_round_transcript(self.out_dir, record)
            last = self._finish_round(record, setup, states, next_start)
            self.rounds_done = record.config.round
            write_outcome(self.out_dir, self.outcome.model_copy(update=dict(rounds_done=self.rounds_done)))

        try:
            for rnd in range(start + 1, end + 1):
                next_start = time.perf_counter() if unwritten is not None else None
                record = play_round(
                    cfg,
                    rnd,
                    setup,
                    arrays,
                    grid=self.grid,
                    strategy=self.strategy,
                    roster=roster,
                    reply_lags=self.reply_lags,
                    while_out=settle,
                )
                settle()  # a round that sent nothing did not
                self.live.aggregated(
                    rnd,
                    json_values(record.sites_event()),
                    contributors=record.contributors,
                    under_holders_control=few_holders(record.contributors),
                    losses=json_values(record.outcome.losses),
                    updated=record.outcome.arrays is not None,
                )
                arrays, self.reply_lags = record.arrays, record.reply_lags
                states = RoundStates(random.getstate(), torch.get_rng_state(), self.strategy.state_dict())
                unwritten, next_start = (record, states), None
                due = rnd == cfg.rounds or (cfg.evaluate_every and rnd % cfg.evaluate_every == 0)
                if (due and cfg.eval_tasks) or rnd == end:
                    settle()
                if due and cfg.eval_tasks:  # an empty task list asks for no federated evaluation
                    evaluate(
                        cfg,
                        rnd,
                        setup,
                        arrays,
                        roster=roster,
                        strategy=self.strategy,
                        events=self.events,
                        audit=self.audit,
                    )
                elif due:
                    log.info("evaluation after round %d: skipped (eval_tasks is empty)", rnd)
        finally:
            next_start = None  # a round that failed did not start the one after
            settle()  # a round aggregated is never lost to a later round's failure
        write_summary(self.out_dir)
        return last

    def _finish_round(
        self, record: RoundRecord, setup: FederationSetup, states: RoundStates, until: float | None = None
    ) -> Path:
        """Checkpoint the round with its event, then write the event to rounds.jsonl, the audit log
        and server.log. The event travels in the checkpoint so that a server killed between the
        two writes loses no round from the record: resume writes it then (_recover_round_event).
        `states`: as the round left them. `until`: the next round's start when that round has
        started (the round's time runs to it); otherwise the round's time runs to its checkpoint."""
        cfg, rnd, sites = self.cfg, record.config.round, record.sites
        t_ckpt = time.perf_counter()
        end = until if until is not None else t_ckpt
        train_max = max((e.train_seconds or 0.0 for e in sites.values()), default=0.0)
        timed = any(e.train_seconds is not None for e in sites.values())
        exchange = record.exchange
        timings: dict[str, Any] = {
            "round_seconds": end - record.started,
            "configure_seconds": record.configure_seconds,
            "wait_seconds": record.wait_seconds,
            "push_seconds": exchange.push_end - exchange.push_start,
            # Of it, the slowest site's message alone (server/exchange.py push_first_alone).
            "first_alone_seconds": exchange.alone_seconds,
            "first_delivered": exchange.first_delivered,
            "sent_at": exchange.push_start,  # wall clock: beside the sites' own log lines
            "aggregate_seconds": record.aggregate_seconds,
            "checkpoint_seconds": None,  # known once it is written (below)
            # False: written while the next round's sites trained, off the round's path
            "checkpoint_on_path": until is None,
            "local_train_seconds_max": train_max,
            "local_train_seconds_sum": sum(e.train_seconds or 0.0 for e in sites.values()),
            "other_seconds": (end - record.started) - train_max,
        }
        epsilon = self.check_privacy(rnd, sites)
        losses = record.outcome.losses
        event_sites = record.sites_event()
        event = json_values(
            dict(
                time=time.time(),
                round=rnd,
                rounds=cfg.rounds,
                weights=record.config.weights.model_dump(),
                sites=event_sites,
                privacy=cfg.privacy.model_dump(),
                epsilon=epsilon,
                rejected=record.rejected,
                contributors=record.contributors,
                # Groups of 1-2 holders: no aggregation rule bounds them against those holders.
                under_holders_control=few_holders(record.contributors),
                losses=losses,
                absent={n: f"{e.status}: {e.reason or ''}" for n, e in sorted(sites.items()) if e.status != "ok"},
                updated=record.outcome.arrays is not None,
                bytes_sent=sum(e.bytes_sent or 0 for e in sites.values()),
                bytes_received=sum(e.bytes_received or 0 for e in sites.values()),
                timings=timings,
            )
        )
        if record.secure is not None:
            event["secure_aggregation"] = json_values(record.secure)
        path = save_server_checkpoint(
            self.ckpt_dir,
            ServerState(
                round=rnd,
                arrays=record.arrays,
                strategy=states.strategy,
                setup=setup,
                run_config=cfg.model_dump(mode="json"),
                python_random=states.python_random,
                torch_random=states.torch_random,
                round_event=event,
            ),
            keep=cfg.keep_checkpoints,
        )
        t_end = time.perf_counter()
        end = until if until is not None else t_end
        timings.update(
            round_seconds=end - record.started,
            checkpoint_seconds=t_end - t_ckpt,
            other_seconds=(end - record.started) - train_max,
        )
        event["timings"] = timings
        self.events.write("round", **event, checkpoint=str(path))
        self.audit.write_round(event)
        ok = sum(e.status == "ok" for e in sites.values())
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
        for group, holders in event["under_holders_control"].items():
            log.warning(
                "round %d: group %r was averaged from %d site(s) (%s): under their control; no aggregation "
                "rule bounds a group of fewer than %d holders beyond the per-reply bounds",
                rnd,
                group,
                len(holders),
                ", ".join(holders),
                ROBUST_MIN_HOLDERS,
            )
        for name, e in sorted(sites.items()):
            log.info(
                "  %-12s %-9s groups %s, sent %s B, received %s B%s%s",
                name,
                e.status,
                ",".join(e.groups_sent or []),
                e.bytes_sent or 0,
                e.bytes_received or 0,
                f", reply after {e.reply_after_seconds:.2f} s (training {e.train_seconds or 0:.2f} s)"
                if e.reply_after_seconds is not None
                else "",
                f" ({e.reason})" if e.reason is not None else "",
            )
        return path

    def check_privacy(self, rnd: int, sites: Mapping[str, SiteOutcome]) -> dict[str, float]:
        """Each site's reported cumulative epsilon this round (sites that report one), with a
        warning where a site accounts at a larger delta than asked, or trained without DP when
        DP was asked (a site's reply without dp.* after training)."""
        req = self.cfg.privacy
        epsilon = {name: e.dp["epsilon"] for name, e in sorted(sites.items()) if e.dp and "epsilon" in e.dp}
        for name, e in sorted(sites.items()):
            dp = e.dp or {}
            if req.requested and e.status == "ok" and "epsilon" not in dp:
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


# ---------------------------------------------------------------------------- the ServerApp


def make_server_app(config: FederationConfig | None = None) -> ServerApp:
    """The ServerApp; without `config` it reads the run config (deployment, `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        set_reply_pull_backoff()  # once, as the ServerApp starts (server/deploy/flower_patches.py)
        cfg = config if config is not None else FederationConfig.from_run_config(context.run_config)
        FederationServer(grid, cfg, run_id=context.run_id).run()

    return app


app = make_server_app()

__all__ = ["FederationServer", "app", "make_server_app", "make_strategy"]
