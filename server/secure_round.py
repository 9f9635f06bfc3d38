"""One training round under secure aggregation (run config `secure-aggregation`; issue 32): the
server learns, per parameter group, only the sum over the sites holding it of their weighted
updates and counts, never one site's update.

`run_secure_round` is run_round's counterpart (server/round.py), the same Grid, four exchanges
instead of one, two in a round whose keys an earlier round made (secure_aggregation/__init__.py
has the protocol, healthfm_core/protocol/secure_records.py the message types):
  1. KEYS_MESSAGE   SecAggConfig (who takes part, which groups each holds, threshold, clipping,
                    field) per key round: this round and up to secagg-key-rounds - 1 after it
                    (KeyRounds) -> each site's PublicKeys per key round; a KeyDirectory per round;
  2. SHARES_MESSAGE KeyDirectory per key round -> each site's EncryptedShares per key round; the
                    server routes them (a ShareInbox per site and round);
  3. MASK_MESSAGE   the plain train message's records (arrays, RoundConfig) + the site's ShareInbox
                    + the round's own SecAggConfig (its clip norms) -> the site trains exactly as
                    for a plain round, clips, quantises and masks its update with its per-group
                    counts -> MaskedInput;
  4. UNMASK_MESSAGE UnmaskRequest (survivors, groups to unmask, groups withheld and why) -> each
                    survivor's UnmaskShares; ServerRound.aggregate removes the masks.
The new global arrays: each unmasked group's weighted average update added to the round's arrays
(ModalityAwareFedAvg's average, within the quantisation bound recorded per group; the server
optimiser, where set, steps on it as on a plain average); a withheld group keeps its values
(carried forward). A site that stops answering after stage 2 is a dropout, recovered while at least
the threshold remain; fewer, or any sum that does not decode within its bounds, fail the round:
the global arrays stay unchanged, the error is in server.log (ERROR), rounds.jsonl and the audit
log. Never a wrong or partial average.

What the server can no longer check per reply (server/replies.py, server/influence.py): values,
norms, counts. The site clips each group to the round's clip norm (the influence step bound) and
refuses non-finite values before masking (secure_aggregation/field.py); the server checks every
unmasked sum (within the field's bound, finite, the total count within the holders' bound) and each
average's norm against the clip norm (docs/coordinator.md).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from pydantic import BaseModel

from healthfm_core.protocol import METRICS_RECORD, STATUS_RECORD, FederationSetup, PrivacySpend, RoundConfig
from healthfm_core.protocol.secure_records import (
    KEYS_MESSAGE,
    MASK_MESSAGE,
    SECAGG_CONFIG_RECORD,
    SECAGG_RECORD,
    SHARES_MESSAGE,
    UNMASK_MESSAGE,
    from_flat,
    key_round_record,
    key_round_records,
    to_flat,
)
from secure_aggregation.config import SecAggConfig
from secure_aggregation.errors import SecAggError
from secure_aggregation.layout import group_vector
from secure_aggregation.messages import (
    EncryptedShares,
    MaskedInput,
    PublicKeys,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
)
from secure_aggregation.server import SecureAggregate, ServerRound
from secure_aggregation.transcript import SecureTranscript
from server.config import FederationConfig
from server.exchange import ExchangeTimes, head_start_seconds, send_and_receive, slowest_first
from server.influence import ADAM_STEP_RATIO, max_examples, step_bound
from server.live_round import AGGREGATING, SECURE_STAGE
from server.replies import RejectedReply, groups_for_node, origin, setup_needed
from server.roster import Roster
from server.round import (
    RoundOutcome,
    RoundRecord,
    SiteOutcome,
    SiteStatus,
    record_absent,
    sent_outcomes,
    start_round,
)
from server.runlog import message_size
from server.strategy import ModalityAwareFedAvg

log = logging.getLogger("healthfm.server.secure_round")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def secagg_config(
    cfg: FederationConfig,
    config: RoundConfig,
    arrays: Mapping[str, np.ndarray],
    node_groups: Mapping[int, Sequence[str]],
    strategy: ModalityAwareFedAvg,
) -> SecAggConfig:
    """The round's SecAggConfig. Per group: the clip norm is the influence step bound (what the
    server bounds a plain reply's update norm by; max_update_norm where smaller), the value range
    what AdamW moves one value by at most in the round (ADAM_STEP_RATIO x lr x steps, plus the
    decay of the group's largest weight), never above the clip norm. Raises SecAggError when the
    sample cannot run a secure round (fewer than two sites)."""
    sample = sorted(node_groups)
    held = {g for groups in node_groups.values() for g in groups}
    sizes = {g: int(group_vector(arrays, g, strategy.group_of).size) for g in held}
    clip, value_range = {}, {}
    for group in held:
        weights = group_vector(arrays, group, strategy.group_of)
        bound = step_bound(config, sizes[group], float(np.linalg.norm(weights)), cfg.norm_step_factor)
        if cfg.max_update_norm is not None:
            bound = min(bound, cfg.max_update_norm)
        largest = float(np.abs(weights).max()) if weights.size else 0.0
        per_value = config.lr * config.local_steps * (ADAM_STEP_RATIO + config.weight_decay * largest)
        clip[group], value_range[group] = bound, min(bound, per_value)
    n = len(sample)
    threshold = min(n, max(n // 2 + 1, math.ceil(cfg.secagg_threshold_fraction * n)))
    try:
        return SecAggConfig(
            round=config.round,
            sample=sample,
            groups={node: list(groups) for node, groups in node_groups.items()},
            group_sizes=sizes,
            threshold=threshold,
            min_holders=max(cfg.secagg_min_holders, cfg.min_sites_per_group),
            clip_norm=clip,
            value_range=value_range,
            weight_max=max_examples(config),
            field_bits=cfg.secagg_field_bits,
        )
    except ValueError as err:  # pydantic's: e.g. one site sampled
        raise SecAggError(f"round {config.round}: no secure round possible with sample {sample}: {err}") from None


class _Stages:
    """The exchanges of one secure round and what each site did in them."""

    def __init__(
        self, cfg: FederationConfig, grid: Grid, roster: Roster, sites: dict[str, SiteOutcome], max_bytes: int | None
    ) -> None:
        self.cfg, self.grid, self.roster, self.sites, self.max_bytes = cfg, grid, roster, sites, max_bytes
        self.rejected: list[RejectedReply] = []
        self.exchange = ExchangeTimes()  # the training exchange's (stage 3), as a plain round's
        # Each stage's messages out to its last reply (or a dead site's "Node Unavailable", or timeout-s).
        self.seconds: dict[str, float] = {}

    def fail(self, node: int, status: SiteStatus, reason: str) -> None:
        entry = self.sites.setdefault(self.roster.site(node), SiteOutcome(node_id=node))
        entry.status, entry.reason = status, reason
        if status == "rejected":
            self.rejected.append(RejectedReply(node, reason))

    def exchange_stage(
        self,
        messages: list[Message],
        reply_type: type[M],
        stage: str,
        times: ExchangeTimes | None = None,
        key_rounds: int = 1,
        head_start: float = 0.0,
        on_idle: Callable[[], None] | None = None,
    ) -> dict[int, list[M]]:
        """Send one stage's messages, parse the replies (each a peer's: checked, its node id the
        sender's), `key_rounds` messages a reply (one per key round: key_round_record(i)); a site
        whose reply is missing, an error, refused or does not parse is out of the round from here
        on (a dropout, with why). `head_start`, `on_idle`: server/exchange.py's."""
        for msg in messages:
            entry = self.sites.setdefault(self.roster.site(msg.metadata.dst_node_id), SiteOutcome(node_id=0))
            entry.bytes_sent = (entry.bytes_sent or 0) + message_size(msg)[0]
        times = times if times is not None else ExchangeTimes()
        live = self.roster.live
        live.sent(
            SECURE_STAGE.format(stage=stage),
            {
                self.roster.site(m.metadata.dst_node_id): self.roster.node_groups.get(m.metadata.dst_node_id, [])
                for m in messages
            },
        )
        replies = send_and_receive(
            self.grid,
            messages,
            self.cfg.timeout_s,
            times,
            head_start=head_start,
            on_idle=on_idle,
            on_reply=lambda reply: live.replied(
                self.roster.site(origin(reply, messages)), reply.error.reason if reply.has_error() else ""
            ),
        )
        self.seconds[stage] = time.time() - times.push_start
        parsed: dict[int, list[M]] = {}
        answered = set()
        for need in setup_needed(replies, messages):
            # Its SuperNode restarted: its secure-aggregation state is gone with the setup; it is
            # sent the setup again (next round) and is a dropout of this one.
            self.fail(need, "no setup", f"{stage}: lost the run's setup (SuperNode restarted?); a dropout this round")
            self.roster.resend_setup({need}, f"secure round, {stage}")
        for reply in replies:
            node = origin(reply, messages)
            answered.add(node)
            entry = self.sites.setdefault(self.roster.site(node), SiteOutcome(node_id=node))
            size, objects = message_size(reply)
            entry.bytes_received = (entry.bytes_received or 0) + size
            entry.objects_received = (entry.objects_received or 0) + objects
            if reply.has_error():
                self.fail(node, "error", f"{stage}: {reply.error.reason}")
                continue
            if entry.status == "no setup":
                continue
            records = reply.content.config_records
            if STATUS_RECORD in records:
                self.fail(node, "refused", f"{stage}: {records[STATUS_RECORD].get('reason', '')!s}")
                continue
            if node in parsed:
                self.rejected.append(RejectedReply(node, f"{stage}: a second reply", "duplicate"))
                continue
            try:
                if set(reply.content.array_records):
                    raise ValueError(f"records {sorted(reply.content)[:20]}: a secure stage's reply carries no arrays")
                payload_records = key_round_records(records, stage)  # the one schema check of these names
                if len(payload_records) != key_rounds:
                    raise ValueError(f"{len(payload_records)} key round(s) in the reply, expected {key_rounds}")
                metrics = reply.content.metric_records
                if set(metrics) - {METRICS_RECORD}:
                    raise ValueError(f"metric records {sorted(metrics)}, expected at most {METRICS_RECORD!r}")
                if METRICS_RECORD in metrics:  # a DP site's cumulative spend (its counts stay masked)
                    entry.dp = PrivacySpend.from_metrics(metrics[METRICS_RECORD]).model_dump(exclude_none=True)
                payloads = [from_flat(reply_type, record, self.max_bytes) for record in payload_records]
                for message in payloads:
                    claimed = getattr(message, "node_id", node)
                    if claimed != node:
                        raise ValueError(f"field node_id: value {claimed}, the reply came from node {node}")
            except ValueError as err:
                self.fail(node, "rejected", f"{stage}: {' '.join(str(err).split())[:500]}")
                continue
            parsed[node] = payloads
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                self.fail(node, "no reply", f"{stage}: no reply within timeout-s {self.cfg.timeout_s:g} s")
        return parsed


def _secagg_message(node: int, payloads: Sequence[BaseModel], message_type: str) -> Message:
    """One message of a stage: payload i (round r + i's, in the keys and shares stages) under
    key_round_record(i)."""
    content = RecordDict({key_round_record(i): ConfigRecord(to_flat(p)) for i, p in enumerate(payloads)})
    return Message(content=content, message_type=message_type, dst_node_id=node)


def _first(replies: Mapping[int, list[M]]) -> dict[int, M]:
    return {node: payloads[0] for node, payloads in replies.items()}


@dataclass
class KeyRound:
    """A round whose keys and shares are exchanged (in round `exchanged_in`): the server's state
    after the shares stage, each site's inbox, and the replies its transcript records."""

    server: ServerRound
    inboxes: dict[int, ShareInbox]
    keys: list[PublicKeys]
    shares: list[EncryptedShares]
    exchanged_in: int
    # Sampled sites that did not share keys (U2) in that exchange: their status and why (a site
    # that refused there is alive, and is not asked again in the rounds its keys were made for).
    left_out: dict[int, tuple[SiteStatus, str]] = field(default_factory=dict)


@dataclass
class KeyRounds:
    """The run's rounds ahead whose keys and shares are already exchanged (run config
    `secagg-key-rounds`). Each round keeps its own keys, seeds and threshold; a round whose
    sample, groups, threshold or min_holders differ from what its keys were made for, and every
    round after one in which a site did not take part to the end, has its keys made afresh (a
    keys message makes the sites drop the keys they held)."""

    ahead: dict[int, KeyRound] = field(default_factory=dict)

    def take(self, config: SecAggConfig) -> KeyRound | None:
        """The round's keys, if made ahead for this config's key-time fields (the server's round
        state takes the config: its clip norms); else None, and every round ahead is dropped."""
        held = self.ahead.pop(config.round, None)
        if held is None or held.server.config.key_time_difference(config):
            self.ahead.clear()
            return None
        held.server.finalise(config)
        return held


def _exchange_keys(cfg: FederationConfig, config: SecAggConfig, stages: _Stages, key_rounds: KeyRounds) -> KeyRound:
    """The keys and shares stages for this round and up to `secagg-key-rounds` - 1 rounds after it
    (the run's last round at most), one exchange each; the rounds ahead go to `key_rounds`. A round
    ahead is kept only while its directory and its sites that shared (U2) are this round's: a site
    that left something out for one round ahead drops that round and the rounds after it."""
    count = max(1, min(cfg.secagg_key_rounds, cfg.rounds - config.round + 1))
    configs = [config] + [config.model_copy(update={"round": config.round + i}) for i in range(1, count)]
    servers = [ServerRound(c) for c in configs]
    keys = stages.exchange_stage(
        [_secagg_message(n, configs, KEYS_MESSAGE) for n in config.sample], PublicKeys, "keys", key_rounds=count
    )
    directories = _while_made(
        [functools.partial(s.key_directory, [r[i] for r in keys.values()]) for i, s in enumerate(servers)]
    )
    count = _agreeing(directories, lambda d: sorted(d.keys))
    shares = stages.exchange_stage(
        [_secagg_message(n, directories[:count], SHARES_MESSAGE) for n in directories[0].keys],
        EncryptedShares,
        "shares",
        key_rounds=count,
    )
    inboxes = _while_made(
        [functools.partial(s.route_shares, [r[i] for r in shares.values()]) for i, s in enumerate(servers[:count])]
    )
    count = _agreeing([s.shared for s in servers[: len(inboxes)]], lambda shared: shared)
    left_out: dict[int, tuple[SiteStatus, str]] = {}
    for node in config.sample:
        entry = stages.sites.get(stages.roster.site(node))
        if node not in servers[0].shared and entry is not None:
            left_out[node] = (entry.status, entry.reason or "")
    made = [
        KeyRound(
            servers[i],
            inboxes[i],
            [reply[i] for reply in keys.values()],
            [reply[i] for reply in shares.values()],
            config.round,
            left_out,
        )
        for i in range(count)
    ]
    key_rounds.ahead = {k.server.config.round: k for k in made[1:]}
    return made[0]


def _while_made(steps: Sequence[Callable[[], T]]) -> list[T]:
    """Each key round's step while it succeeds: this round's failure (SecAggError) fails the round,
    a round ahead's drops it and the rounds after it."""
    made: list[T] = []
    for i, step in enumerate(steps):
        try:
            made.append(step())
        except SecAggError:
            if i == 0:
                raise
            break
    return made


def _agreeing(items: Sequence[Any], view: Callable[[Any], Any]) -> int:
    """How many of `items`, from the first on, look (`view`) as the first does."""
    first = view(items[0])
    return next((i for i, item in enumerate(items) if view(item) != first), len(items))


def secure_arrays(
    result: SecureAggregate, arrays: Mapping[str, np.ndarray], config: SecAggConfig, strategy: ModalityAwareFedAvg
) -> dict[str, np.ndarray]:
    """The new global arrays from the unmasked averages; a withheld group keeps its values. Each
    average is checked first: an average of clipped updates is no longer than the clip norm (plus
    the quantisation error); anything else is a wrong sum (SecAggError), never applied."""
    for group, mean in result.means.items():
        slack = result.error_bounds[group] * math.sqrt(mean.size)
        if not float(np.linalg.norm(mean)) <= config.clip_norm[group] + slack:
            raise SecAggError(
                f"group {group!r}: the unmasked average's norm {np.linalg.norm(mean):.4g} exceeds the clip norm "
                f"{config.clip_norm[group]:.4g}: a sum no honest sites send"
            )
    updates = result.updates(arrays, strategy.group_of)
    # A key's sites' average: its global value plus their unmasked mean update (added in float64).
    averaged = {
        key: (arrays[key].astype(np.float64) + update).astype(arrays[key].dtype) for key, update in updates.items()
    }
    return strategy.apply_update(arrays, averaged)


def run_secure_round(
    cfg: FederationConfig,
    rnd: int,
    setup: FederationSetup,
    arrays: dict[str, np.ndarray],
    *,
    grid: Grid,
    strategy: ModalityAwareFedAvg,
    roster: Roster,
    reply_lags: Mapping[int, float],
    while_out: Callable[[], None] | None = None,
    key_rounds: KeyRounds | None = None,
) -> RoundRecord:
    """Round `rnd` under secure aggregation (the module docstring); run_round's signature and record
    (`while_out` runs while its sites train: the masking stage's `on_idle`), and
    the run's `key_rounds` (rounds ahead whose keys are exchanged; None: a round of its own)."""
    key_rounds = key_rounds if key_rounds is not None else KeyRounds()
    t_start = time.perf_counter()
    # The training stage's messages carry the run's downlink. The sites mask their updates from what
    # they received, and secure_arrays adds the unmasked average to the master `arrays` itself.
    config, messages, _ = start_round(cfg, rnd, setup, arrays, strategy, roster)
    trains = {m.metadata.dst_node_id: m for m in messages}
    node_groups = {node: groups_for_node(node, roster.node_groups) for node in trains}  # as train_messages sent
    sites = sent_outcomes(strategy, arrays, roster, trains.values())
    for entry in sites.values():
        entry.bytes_sent = 0  # counted per stage below (the train records go in stage 3's message)
    stages = _Stages(cfg, grid, roster, sites, strategy.max_reply_bytes)
    masked: dict[int, MaskedInput] = {}
    masks: list[Message] = []
    survivors: list[int] = []
    secure: dict[str, Any] = {}
    result: SecureAggregate | None = None
    new_arrays: dict[str, np.ndarray] | None = None
    recorded = SecureTranscript()  # what the server received, stage by stage (server/transcript.py)
    t_sent = t_replied = time.perf_counter()
    try:
        sa_config = secagg_config(cfg, config, arrays, node_groups, strategy)
        secure.update(threshold=sa_config.threshold, min_holders=sa_config.min_holders, field_bits=sa_config.field_bits)
        recorded.config = sa_config
        held = key_rounds.take(sa_config)
        if held is None:
            held = _exchange_keys(cfg, sa_config, stages, key_rounds)
        secure["keys_exchanged_in_round"] = held.exchanged_in
        for node, (status, reason) in held.left_out.items():
            if held.exchanged_in != rnd:  # as it was left out of the exchange its keys come from
                stages.fail(node, status, f"{reason} (the keys exchange of round {held.exchanged_in})")
        server, inboxes = held.server, held.inboxes
        recorded.received.keys, recorded.received.shares = held.keys, held.shares
        recorded.directory = server.directory
        for node, inbox in inboxes.items():
            content = trains[node].content
            content[SECAGG_RECORD] = ConfigRecord(to_flat(inbox))
            content[SECAGG_CONFIG_RECORD] = ConfigRecord(to_flat(sa_config))
            masks.append(Message(content=content, message_type=MASK_MESSAGE, dst_node_id=node))
        masks = slowest_first(masks, reply_lags)
        t_sent = time.perf_counter()
        masked = _first(
            stages.exchange_stage(
                masks,
                MaskedInput,
                "mask",
                stages.exchange,
                head_start=head_start_seconds(masks, reply_lags),
                on_idle=while_out,
            )
        )
        t_replied = time.perf_counter()
        recorded.received.masked = list(masked.values())
        request: UnmaskRequest = server.unmask_request(masked.values())
        recorded.request = request
        survivors = request.survivors
        for group, why in request.withheld.items():
            log.warning("round %d: group %r withheld (carried forward): %s", rnd, group, why)
        unmask = _first(
            stages.exchange_stage(
                [_secagg_message(n, [request], UNMASK_MESSAGE) for n in request.survivors], UnmaskShares, "unmask"
            )
        )
        recorded.received.unmask = list(unmask.values())
        roster.live.phase(AGGREGATING)
        result = server.aggregate(unmask.values())
        new_arrays = secure_arrays(result, arrays, sa_config, strategy)
    except SecAggError as err:
        key_rounds.ahead.clear()
        log.error("round %d: secure aggregation failed, global arrays unchanged: %s", rnd, err)
        secure["error"] = str(err)
        result = None
        for entry in sites.values():  # a site still waiting on a later stage: the failure is why
            if entry.status == "no reply" and entry.reason is None:
                entry.reason = f"the secure round failed: {err}"
    secure["stage_seconds"] = dict(stages.seconds)
    lags = {  # from the training stage's push to each masked reply: next round's push order
        m.metadata.dst_node_id: arrived - stages.exchange.push_start
        for m in masks
        if (arrived := stages.exchange.arrivals.get(m.metadata.message_id)) is not None
    }
    for node, lag in lags.items():
        sites[roster.site(node)].reply_after_seconds = lag
    contributors: dict[str, list[int]] = {}
    if result is not None:
        contributors = result.unmasked
        secure.update(
            unmasked={g: sorted(roster.site(n) for n in nodes) for g, nodes in result.unmasked.items()},
            withheld=dict(result.withheld),
            error_bounds=dict(result.error_bounds),
            dropped_before_masking=sorted(roster.site(n) for n in result.dropped_before_masking),
            dropped_after_masking=sorted(roster.site(n) for n in result.dropped_after_masking),
        )
        for node in survivors:
            entry = sites[roster.site(node)]
            entry.status, entry.reason = "ok", None
            entry.groups_received = sorted(g for g in node_groups[node] if node in result.unmasked.get(g, []))
        for node in result.dropped_after_masking:
            sites[roster.site(node)].reason = "sent its masked update, then dropped out (recovered)"
        for node, why in result.rejected.items():
            stages.fail(node, "rejected", why)
    if any(entry.status not in ("ok", "refused") for entry in sites.values()):
        # A site that did not answer, failed or was rejected (dead, restarted, tampered with): the
        # next round makes its keys afresh with the sample it has then, rather than carry a dropout
        # through the rounds ahead. A site that refused (its policy, no sample of a group) is alive
        # and keeps the keys of the rounds ahead.
        key_rounds.ahead.clear()
    rejected = stages.rejected
    outcome = RoundOutcome(rnd, new_arrays, contributors, rejected, {}, survivors if result is not None else [])
    record_absent(grid, cfg.timeout_s, roster, sites)
    return RoundRecord(
        config=config,
        arrays=new_arrays if new_arrays is not None else arrays,
        outcome=outcome,
        sites=sites,
        rejected=[{"site": roster.site(r.node_id), "node_id": r.node_id, "reason": r.reason} for r in rejected],
        contributors={g: sorted(roster.site(n) for n in nodes) for g, nodes in contributors.items()},
        reply_lags=lags,
        started=t_start,
        configure_seconds=t_sent - t_start,
        wait_seconds=t_replied - t_sent,
        aggregate_seconds=time.perf_counter() - t_replied,
        exchange=stages.exchange,
        secure=secure,
        transcript=recorded,
    )
