"""One training round, top to bottom: the one owner of a round's messages, replies and outcome.

`run_round`:
  1. waits (briefly) for the run's sites, builds one train message per site holding a group (only
     its groups' arrays in the run's downlink, packed once per group set, and the round's
     RoundConfig), slowest site first;
  2. exchanges them (server/exchange.py);
  3. a site that lost the run's setup (its SuperNode restarted) gets it again and one more train
     message this round (the roster's resend_setup); a second "setup-needed" leaves it out;
  4. parses and checks every reply (server/replies.py), bounds the update norms, clips them to
     the other holders' median and averages (the strategy, server/strategy.py), in one pass:
     `aggregate_replies`; all against the arrays as the sites received them;
  5. returns a `RoundRecord`: the new global arrays (with an fp16 downlink, step 4's result moved
     onto the float32 master: healthfm_core/protocol/transport.py), the strategy's verdicts
     (`RoundOutcome`), one typed `SiteOutcome` per site of the run ("absent" with why where it was
     not addressed), and the round's times. The ServerApp checkpoints it and writes it to
     rounds.jsonl and the audit log; `while_out`, while this round's sites train, is where it
     does that for the round before (server/server_app.py), off the round's path.

Replies are sorted by site name before they are averaged: node ids change across runs, and a
fixed order keeps the floating-point sums, and so a resumed run, bit for bit equal.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from healthfm_core.model.objective_weights import curriculum_weights
from healthfm_core.protocol import ARRAYS_RECORD, CONFIG_RECORD, FederationSetup, RoundConfig, TrainReply, mean_losses
from healthfm_core.protocol.transport import Downlinked, downlink_arrays, onto_master
from secure_aggregation.transcript import SecureTranscript
from server.config import FederationConfig
from server.exchange import ExchangeTimes, head_start_seconds, send_and_receive, slowest_first
from server.influence import update_norms
from server.live_round import AGGREGATING, TRAINING
from server.replies import EarlyReads, RejectedReply, groups_for_node, judge_replies, origin, setup_needed
from server.roster import Roster
from server.runlog import message_bytes, message_size
from server.strategy import ModalityAwareFedAvg

log = logging.getLogger("healthfm.server.round")

# A site's part in a round: trained and averaged, or why not ("absent": not even addressed).
SiteStatus = Literal["ok", "no reply", "no setup", "error", "refused", "rejected", "absent"]


@dataclass(frozen=True)
class RoundOutcome:
    """What one round of aggregation decided."""

    round: int
    arrays: dict[str, np.ndarray] | None  # the new global arrays; None: no acceptable reply (unchanged)
    contributors: dict[str, list[int]]  # group -> nodes averaged into it (groups that were updated)
    rejected: list[RejectedReply]  # every reply left out, with its reason
    replies: dict[int, TrainReply]  # every reply that parsed (accepted, refused or rejected later), by node
    accepted: list[int]  # nodes whose reply was averaged
    # group -> the update norm bound this round applied to it (groups some reply trained)
    norm_bounds: dict[str, float] = field(default_factory=dict)
    # node -> group -> {norm, clipped_to, median}: updates scaled down to the clip (server/clipping.py)
    clipped: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    @property
    def losses(self) -> dict[str, float]:
        """The accepted replies' losses, each weighted by num_examples over the sites reporting it
        (none under secure aggregation: no reply is parsed in the clear)."""
        return mean_losses(self.replies[n] for n in self.accepted if n in self.replies)


@dataclass
class SiteOutcome:
    """One site's part of a round (rounds.jsonl `sites.<site>`, the audit log's site-round record).
    Fields left None are not written."""

    node_id: int
    status: SiteStatus = "no reply"
    reason: str | None = None
    groups_sent: list[str] | None = None
    keys_sent: int | None = None
    bytes_sent: int | None = None
    objects_sent: int | None = None
    setup_resent: bool | None = None
    reply_after_seconds: float | None = None  # from the push's start
    bytes_received: int | None = None
    objects_received: int | None = None
    # from its parsed reply (take_reply)
    groups_received: list[str] | None = None
    keys_received: int | None = None
    num_examples: dict[str, int] | None = None
    losses: dict[str, float] | None = None
    train_seconds: float | None = None
    client_seconds: float | None = None
    rate_min: float | None = None
    rate_max: float | None = None
    dp: dict[str, Any] | None = None
    # group -> {norm, clipped_to, median}: its update scaled down to the clip (server/clipping.py)
    clipped: dict[str, dict[str, float]] | None = None

    def take_reply(self, reply: TrainReply) -> SiteOutcome:
        """What its parsed train reply says (a DP site sends no timings: they would reveal its
        secret batch sizes)."""
        if reply.status == "ok":
            self.groups_received = list(reply.groups)
            self.keys_received = len(reply.arrays)
            self.num_examples = dict(reply.group_examples)
            self.losses = dict(reply.losses)
            self.train_seconds, self.client_seconds = reply.train_seconds, reply.client_seconds
            self.rate_min, self.rate_max = reply.rate_min, reply.rate_max
        if reply.dp is not None:
            self.dp = reply.dp.model_dump(exclude_none=True)
        return self

    def to_event(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RoundRecord:
    """One round as it happened (see the module docstring)."""

    config: RoundConfig
    arrays: dict[str, np.ndarray]  # the global arrays after the round (unchanged without an update)
    outcome: RoundOutcome
    sites: dict[str, SiteOutcome]  # every site of the run, by name
    rejected: list[dict[str, Any]]  # {site, node_id, reason} per reply left out
    contributors: dict[str, list[str]]  # group -> the sites averaged into it
    reply_lags: dict[int, float]  # node -> seconds from the push to its reply (next round's push order)
    started: float  # time.perf_counter() at the round's start
    configure_seconds: float
    wait_seconds: float
    aggregate_seconds: float
    exchange: ExchangeTimes
    # Under secure aggregation (server/secure_round.py): what the round unmasked, withheld and why,
    # its error bounds, dropouts, and the error that failed it (rounds.jsonl `secure_aggregation`).
    secure: dict[str, Any] | None = None
    # Under secure aggregation: every message the server received and the state it kept (written
    # by server/transcript.py when the run config sets record-transcript).
    transcript: SecureTranscript | None = None

    def sites_event(self) -> dict[str, dict[str, Any]]:
        return {name: entry.to_event() for name, entry in self.sites.items()}


def round_config(cfg: FederationConfig, rnd: int, setup: FederationSetup) -> RoundConfig:
    """What the server asks of every site in round `rnd`: the run's local training settings and
    the curriculum's objective weights at (rnd - 1) / rounds."""
    return RoundConfig(
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
        secure_aggregation=cfg.secure_aggregation,
        **cfg.privacy.round_fields(),
    )


def train_messages(
    strategy: ModalityAwareFedAvg,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    config: ConfigRecord,
    node_ids: Sequence[int],
    node_groups: Mapping[int, Sequence[str]] | None = None,
) -> list[Message]:
    """One train message per node of `node_ids` (the connected ones) holding a group, with only
    its groups' arrays (one packed part per message, packed once per distinct group set:
    records_for_nodes)."""
    # In a random order (as Flower's sample_nodes takes all of them): it draws on the checkpointed
    # Python random state, so a resumed run pushes in the uninterrupted run's order.
    node_ids = random.sample(list(node_ids), len(node_ids))
    sampled: dict[int, list[str]] = {}
    for node_id in node_ids:
        groups = groups_for_node(node_id, node_groups)
        if not groups:
            log.warning("round %d: node %d holds no trainable group; not sampled", server_round, node_id)
            continue
        sampled[node_id] = groups
    records = strategy.records_for_nodes(dict(arrays), sampled)
    messages = []
    for node_id, groups in sampled.items():
        node_config = ConfigRecord(dict(config))
        node_config["server-round"] = server_round
        node_config["groups"] = groups
        content = RecordDict({ARRAYS_RECORD: records[node_id], CONFIG_RECORD: node_config})
        messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
    log.info("round %d: training on %d nodes", server_round, len(messages))
    return messages


def aggregate_replies(
    strategy: ModalityAwareFedAvg,
    server_round: int,
    replies: Iterable[Message],
    *,
    current_arrays: Mapping[str, np.ndarray],
    node_groups: Mapping[int, Sequence[str]] | None,
    sent: Sequence[Message],
    round_config: RoundConfig | None = None,
    read: EarlyReads | None = None,
) -> RoundOutcome:
    """Parse, check, bound, clip and average one round's replies. Never raises for anything in a reply.
    `round_config`: what the server asked of every site this round (the counts and step bounds
    follow from it); None only for callers that configured no round (tests with synthetic arrays).
    `read`: replies already read as they arrived (not read again)."""
    previous = dict(current_arrays)
    judged = judge_replies(
        server_round, replies, previous, node_groups, sent, round_config, strategy.reply_limits, read
    )
    # Each reply's update norms, once for the bounds and the clip.
    norms = update_norms(judged.accepted, previous, strategy.group_of)
    accepted, outliers, bounds = strategy.bound_updates(judged.accepted, previous, server_round, round_config, norms)
    rejected = [*judged.rejected, *(RejectedReply(node, why, "outlier") for node, why in outliers.items())]
    for r in rejected:
        log.warning("round %d: rejected reply from node %d: %s", server_round, r.node_id, r.reason)
    if not accepted:
        log.warning("round %d: no acceptable reply; global arrays unchanged", server_round)
        return RoundOutcome(server_round, None, {}, rejected, judged.parsed, [], bounds)
    accepted, clipped = strategy.clip_updates(accepted, previous, server_round, norms)
    new_arrays, contributors = strategy.average(accepted, previous)
    return RoundOutcome(
        server_round, new_arrays, contributors, rejected, judged.parsed, [a[0] for a in accepted], bounds, clipped
    )


def start_round(
    cfg: FederationConfig,
    rnd: int,
    setup: FederationSetup,
    arrays: Mapping[str, np.ndarray],
    strategy: ModalityAwareFedAvg,
    roster: Roster,
) -> tuple[RoundConfig, list[Message], Downlinked]:
    """The round's RoundConfig and train messages, once the run's sites are there (or waited for),
    and the global `arrays` in the run's downlink: as the messages carry them and as the sites read
    them (the round is judged against the latter; healthfm_core/protocol/transport.py)."""
    config = round_config(cfg, rnd, setup)
    roster.live.begin_round(rnd)
    nodes = roster.wait_for_nodes(f"round {rnd}")  # the round's one look at who is connected
    sent = downlink_arrays(arrays, cfg.downlink)
    config_record = ConfigRecord(config.to_flat())
    return config, train_messages(strategy, rnd, sent.wire, config_record, nodes, roster.node_groups), sent


def sent_outcomes(
    strategy: ModalityAwareFedAvg, arrays: Mapping[str, np.ndarray], roster: Roster, messages: Iterable[Message]
) -> dict[str, SiteOutcome]:
    """Each addressed site's outcome as its train message left: groups, keys and bytes sent."""
    sites: dict[str, SiteOutcome] = {}
    for msg in messages:
        node = msg.metadata.dst_node_id
        groups = set(groups_for_node(node, roster.node_groups))  # as train_messages sent
        size, objects = message_size(msg)
        sites[roster.site(node)] = SiteOutcome(
            node_id=node,
            groups_sent=sorted(groups),
            keys_sent=sum(strategy.group_of(k) in groups for k in arrays),
            bytes_sent=size,
            objects_sent=objects,
        )
    return sites


def run_round(
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
) -> RoundRecord:
    """Round `rnd` from the global `arrays` (the module docstring); `reply_lags`: last round's;
    `while_out()` runs while the sites train (the exchange's `on_idle`: at the first reply), not on
    a round that sends no message."""
    t_start = time.perf_counter()
    # The round runs against what the sites read (sent.received); its result moves onto the master
    # `arrays` at the end.
    config, messages, sent = start_round(cfg, rnd, setup, arrays, strategy, roster)
    messages = slowest_first(messages, reply_lags)
    t_sent = time.perf_counter()
    exchange = ExchangeTimes()
    # While the replies are out: the bytes sent, then each reply's size and reading as it arrives,
    # so that after the slowest site's reply only that one is taken (server/replies.py EarlyReads).
    sites: dict[str, SiteOutcome] = {}
    read = EarlyReads(rnd, sent.received, roster.node_groups, messages, config, strategy.reply_limits)

    def pushed() -> None:
        sites.update(sent_outcomes(strategy, arrays, roster, messages))
        roster.live.sent(TRAINING, {name: entry.groups_sent or [] for name, entry in sites.items()})

    def replied(reply: Message) -> None:
        read(reply)
        roster.live.replied(roster.site(origin(reply, messages)), reply.error.reason if reply.has_error() else "")

    replies = send_and_receive(
        grid,
        messages,
        cfg.timeout_s,
        exchange,
        on_pushed=pushed,
        on_idle=while_out,
        on_reply=replied,
        head_start=head_start_seconds(messages, reply_lags),
    )
    lags: dict[int, float] = {}
    for msg in messages:  # when each site's reply came, from the push's start
        arrived = exchange.arrivals.get(msg.metadata.message_id)
        if arrived is not None:
            lag = lags[msg.metadata.dst_node_id] = arrived - exchange.push_start
            sites[roster.site(msg.metadata.dst_node_id)].reply_after_seconds = lag
    if need := setup_needed(replies, messages):
        messages, replies = _retry(grid, cfg.timeout_s, roster, rnd, need, messages, replies, sites)
    t_replied = time.perf_counter()
    roster.live.phase(AGGREGATING)
    # origin: the SuperLink answers for a dead SuperNode from its own node id.
    replies.sort(key=lambda m: roster.site(origin(m, messages)))
    for reply in replies:
        node = origin(reply, messages)
        entry = sites.setdefault(roster.site(node), SiteOutcome(node_id=node))
        size, objects = read.size(reply)
        entry.bytes_received = (entry.bytes_received or 0) + size
        entry.objects_received = (entry.objects_received or 0) + objects
    # config: what the server asked of every site; the counts and norms it allows follow from it.
    outcome = aggregate_replies(
        strategy,
        rnd,
        replies,
        current_arrays=sent.received,
        node_groups=roster.node_groups,
        sent=messages,
        round_config=config,
        read=read,
    )
    _record_verdicts(roster, sites, outcome, replies, messages)
    record_absent(grid, cfg.timeout_s, roster, sites)
    return RoundRecord(
        config=config,
        arrays=onto_master(outcome.arrays, arrays, sent.received) if outcome.arrays is not None else arrays,
        outcome=outcome,
        sites=sites,
        rejected=[{"site": roster.site(r.node_id), "node_id": r.node_id, "reason": r.reason} for r in outcome.rejected],
        contributors={g: sorted(roster.site(n) for n in nodes) for g, nodes in outcome.contributors.items()},
        reply_lags=lags,
        started=t_start,
        configure_seconds=t_sent - t_start,
        wait_seconds=t_replied - t_sent,
        aggregate_seconds=time.perf_counter() - t_replied,
        exchange=exchange,
    )


def _retry(
    grid: Grid,
    timeout_s: float,
    roster: Roster,
    rnd: int,
    need: set[int],
    messages: list[Message],
    replies: list[Message],
    sites: dict[str, SiteOutcome],
) -> tuple[list[Message], list[Message]]:
    """Sites that lost the setup get it again and one more train message this round; the
    messages and replies then aggregated (a second "setup-needed": left out)."""
    kept = [m for m in messages if m.metadata.dst_node_id not in need]
    replies = [r for r in replies if origin(r, messages) not in need]
    for node in need:
        entry = sites[roster.site(node)]
        entry.status = "no setup"
        entry.reason = "lost the run's setup (SuperNode restarted?); it was not accepted again"
    accepted = roster.resend_setup(need, f"round {rnd}")
    # The same content again (the same arrays and RoundConfig), in a new message.
    retry = [
        Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=MessageType.TRAIN)
        for m in messages
        if m.metadata.dst_node_id in accepted
    ]
    if not retry:
        return kept, replies
    for msg in retry:
        entry = sites[roster.site(msg.metadata.dst_node_id)]
        entry.status, entry.setup_resent, entry.reason = "no reply", True, None
        entry.bytes_sent = (entry.bytes_sent or 0) + message_bytes(msg)
    retry_replies = send_and_receive(grid, retry, timeout_s)
    again = setup_needed(retry_replies, retry)
    for node in again:
        entry = sites[roster.site(node)]
        entry.status, entry.reason = "no setup", "asked for the setup again after receiving it"
    return (
        [*kept, *(m for m in retry if m.metadata.dst_node_id not in again)],
        [*replies, *(r for r in retry_replies if origin(r, retry) not in again)],
    )


def _record_verdicts(
    roster: Roster,
    sites: dict[str, SiteOutcome],
    outcome: RoundOutcome,
    replies: list[Message],
    sent: list[Message],
) -> None:
    """Each site's outcome from the parsed replies and the verdicts on them."""
    for node, reply in outcome.replies.items():
        sites.setdefault(roster.site(node), SiteOutcome(node_id=node)).take_reply(reply)
    for node in outcome.accepted:
        sites[roster.site(node)].status = "ok"
    for node, groups in outcome.clipped.items():
        sites[roster.site(node)].clipped = groups
    errors = {origin(m, sent): m.error.reason for m in replies if m.has_error()}
    for r in outcome.rejected:
        entry = sites.get(roster.site(r.node_id))
        if entry is None:
            entry = sites[roster.site(r.node_id)] = SiteOutcome(node_id=r.node_id)
        elif r.kind in ("duplicate", "unsolicited") and entry.status != "no reply":
            continue  # the node's own reply decided its status
        if r.kind == "error":
            entry.status, entry.reason = "error", errors.get(r.node_id, r.reason)
        elif r.kind == "refused":
            entry.status, entry.reason = "refused", outcome.replies[r.node_id].reason
        else:
            entry.status, entry.reason = "rejected", r.reason


def record_absent(grid: Grid, timeout_s: float, roster: Roster, sites: dict[str, SiteOutcome]) -> None:
    """Every site of the run appears in the round: one not addressed is "absent", with why;
    one addressed that never answered says how long it was waited for."""
    for node, caps in roster.sites.items():
        if caps.site in sites:
            continue
        if node not in roster.node_groups:
            why = "did not accept the run's setup in round 0"
        elif node not in set(grid.get_node_ids()):
            why = "not connected to the SuperLink"
        else:
            why = "not sampled"
        sites[caps.site] = SiteOutcome(node_id=node, status="absent", reason=why)
    for entry in sites.values():
        if entry.status == "no reply" and entry.reason is None:
            entry.reason = f"no reply within timeout-s {timeout_s:g} s"
