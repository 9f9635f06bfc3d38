"""The site's Flower ClientApp (Message API, flwr 1.41): decodes messages, calls the site runtime.

Handlers (message types, see healthfm_core/protocol/ for the records they carry):
  query.capabilities  -> ConfigRecord CAPABILITIES_RECORD (modalities, subjects per modality)
  query.code_stats    -> ConfigRecord CODE_STATS_RECORD {JSON_FIELD: SiteCodeStats} (suppressed);
                         both, and evaluate's figures, through the site's release gate
                         (client/release_gate.py)
  query.setup         -> ConfigRecord SETUP_RECORD {SHA256_FIELD}; the setup is kept in the
                         node's Context.state for the run
  train / evaluate under a setup this node does not hold (its SuperNode restarted: Context.state
                      is gone) -> only ConfigRecord "setup-needed" {"wanted", "held"}; the server
                         sends query.setup again and retries (server/round.py)
  train               -> a TrainReply's records (TrainReply.to_records): ArrayRecord "arrays" (packed
                         as one part, healthfm_core/protocol/packing.py, as every message's arrays are; the
                         groups trained, less those the site's policy keeps local, in the round's
                         transport: fp32, fp16, or int8 with MetricRecord "scales") + MetricRecord
                         "metrics"; a request the policy refuses -> ConfigRecord "status" + the
                         MetricRecord, no arrays, no training. With int8 and error feedback the
                         rounding residual is kept in Context.state ("healthfm.int8-residual"),
                         never sent
  query.secagg_keys, query.secagg_shares, train.secagg_mask, query.secagg_unmask
                      -> a secure-aggregation round's stages (the site's floor: its policy's
                         secagg_min_holders, default 3, refuses a config below it at the keys
                         stage and an unmask request below it) (healthfm_core/protocol/secure_records.py; the
                         server's side is server/secure_round.py): each payload one ConfigRecord
                         (records.to_flat); the keys and shares messages one per key round
                         ("secagg", "secagg+1", ...: this round's and the rounds' after it), the
                         mask message the round's own SecAggConfig ("secagg.config"), which may
                         change only what the keys do not fix (SiteRound.finalise). Each round's
                         SiteRound (its keys, seeds and the shares it holds) lives in Context.state
                         ("healthfm.secagg", one entry per round) from the keys stage to its
                         unmask stage, never sent; a stage without it (out of order, or a
                         restarted SuperNode) is refused.
                         train.secagg_mask trains exactly as train, then masks the released
                         update (trained - received) with its per-group counts
  evaluate            -> an EvalReply's MetricRecord "metrics" (held-out metrics per task, small
                         ones withheld)

Where the site's data is: the node config key `site-root` (a deployed SuperNode:
`--node-config "site-root='/data/site' policy='/etc/site/policy.yaml' state-dir='/var/lib/site'"`;
the policy is the site admin's file, the state dir keeps the privacy ledger across restarts). Flower's simulation engine gives every virtual node
only `partition-id`; `make_client_app(node_configs=[...])` then supplies each partition's node
config. Anything raised here reaches the server as an error reply with the message, and the
round goes on without this site.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.memory import release_after_message
from client.site_runtime import SiteConfig, SiteRuntime, TrainRefused, get_runtime
from healthfm_core.protocol import (
    ARRAYS_RECORD,
    CAPABILITIES,
    CAPABILITIES_RECORD,
    CODE_STATS,
    CODE_STATS_RECORD,
    CONFIG_RECORD,
    JSON_FIELD,
    METRICS_RECORD,
    SCALES_RECORD,
    SETUP,
    SETUP_NEEDED_RECORD,
    SETUP_RECORD,
    SHA256_FIELD,
    STATUS_RECORD,
    STATUS_REFUSED,
    EvalConfig,
    EvalReply,
    FederationSetup,
    RoundConfig,
    TrainRecords,
    TrainReply,
)
from healthfm_core.protocol.packing import pack_arrays, unpack_record
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
from secure_aggregation.config import DEFAULT_MIN_HOLDERS, SecAggConfig
from secure_aggregation.errors import SecAggRefusal
from secure_aggregation.messages import KeyDirectory, ShareInbox, UnmaskRequest
from secure_aggregation.site import SiteRound, key_rounds

log = logging.getLogger("healthfm.client")

SETUP_STATE_KEY = "healthfm.setup"
# Error feedback of int8 transport: the rounding residual (ArrayRecord) and the setup it is for.
RESIDUAL_STATE_KEY = "healthfm.int8-residual"
RESIDUAL_SETUP_STATE_KEY = "healthfm.int8-residual-setup"
# A secure round's SiteRound between its stages (SiteRound.to_state: the site's secrets; never sent).
SECAGG_STATE_KEY = "healthfm.secagg"
# Parsed setups by sha256, per process (parsing a large vocabulary every round is wasteful).
_SETUPS: dict[str, FederationSetup] = {}


def node_config(context: Context, node_configs: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The node's config, overlaid in simulation by its partition's entry (every ClientApp of a site)."""
    merged = dict(context.node_config)
    if node_configs is not None:
        if "partition-id" not in merged:
            raise ValueError("simulation node configs given, but the node has no partition-id")
        pid = int(merged["partition-id"])
        if not 0 <= pid < len(node_configs):
            raise ValueError(f"partition-id {pid} has no node config ({len(node_configs)} given)")
        merged.update(node_configs[pid])
    return merged


def site_config(context: Context, node_configs: Sequence[Mapping[str, Any]] | None = None) -> SiteConfig:
    """The node's SiteConfig from its (overlaid) node config. The run config's `proximal-mu`
    (FedProx, the same for every site of a run) is taken unless the node config sets its own."""
    merged = node_config(context, node_configs)
    if "proximal-mu" in context.run_config and "proximal-mu" not in merged:
        merged["proximal-mu"] = context.run_config["proximal-mu"]
    return SiteConfig.from_node_config(merged)


def stored_setup(context: Context, sha256: str) -> FederationSetup:
    """The setup this node received for the run, checked against the hash the server names."""
    record = context.state.config_records.get(SETUP_STATE_KEY)
    if record is None:
        raise ValueError("no setup received in this run: the server must send query.setup before train/evaluate")
    if record[SHA256_FIELD] != sha256:
        raise ValueError(f"server names setup {sha256[:12]}..., this site holds {str(record[SHA256_FIELD])[:12]}...")
    if sha256 not in _SETUPS:
        _SETUPS[sha256] = FederationSetup.from_json(str(record[JSON_FIELD]))
    return _SETUPS[sha256]


def setup_needed(msg: Message, context: Context, sha256: str) -> Message | None:
    """The typed "setup needed" reply when this node does not hold setup `sha256`, else None."""
    record = context.state.config_records.get(SETUP_STATE_KEY)
    held = str(record[SHA256_FIELD]) if record is not None else ""
    if held == sha256:
        return None
    log.warning(
        "asked to work under setup %s... but holding %s: asking the server for it",
        sha256[:12],
        f"{held[:12]}..." if held else "none (restarted?)",
    )
    return Message(RecordDict({SETUP_NEEDED_RECORD: ConfigRecord({"wanted": sha256, "held": held})}), reply_to=msg)


def _only_record(records: Mapping[str, Any], what: str) -> Any:
    if len(records) != 1:
        raise ValueError(f"expected one {what}, got {len(records)} ({sorted(records)})")
    return next(iter(records.values()))


def message_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The arrays of a train or evaluate message (its one ArrayRecord, packed parts). float16 ones
    come from an fp16 downlink (healthfm_core/protocol/transport.py): upcast to float32 here, the
    values the server runs the round against, so that everything the site computes from what it
    received (its update, the int8 residual, the secure round's masked update) agrees with the
    server's to the bit."""
    records = msg.content.array_records
    record = _only_record(records, "ArrayRecord")
    arrays = unpack_record(record, where=f"{msg.metadata.message_type} message, record {next(iter(records))!r}")
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}


def train_reply_content(reply: TrainReply | TrainRecords, scales: Mapping[str, float] | None = None) -> RecordDict:
    """A TrainReply (its arrays as trained) or its encoded records and int8 scales
    (SiteRuntime.encode) as the records of a reply message."""
    arrays, metrics, status = reply.to_records() if isinstance(reply, TrainReply) else reply
    content = RecordDict({METRICS_RECORD: MetricRecord(dict(metrics))})
    if arrays is not None:
        # Packed (healthfm_core/protocol/packing.py): one Flower Array, not one per key.
        content[ARRAYS_RECORD] = ArrayRecord({label: Array(blob) for label, blob in pack_arrays(arrays).items()})
    if scales is not None:
        content[SCALES_RECORD] = MetricRecord({k: float(v) for k, v in scales.items()})
    if status is not None:
        content[STATUS_RECORD] = ConfigRecord(dict(status))
    return content


def stored_residual(context: Context, sha256: str) -> dict[str, np.ndarray]:
    """The int8 rounding residual this node kept under setup `sha256` (error feedback; empty if
    none, or if it was kept under another setup)."""
    held = context.state.config_records.get(RESIDUAL_SETUP_STATE_KEY)
    record = context.state.array_records.get(RESIDUAL_STATE_KEY)
    if record is None or held is None or held.get(SHA256_FIELD) != sha256:
        return {}
    return {k: v.numpy() for k, v in record.items()}


def keep_residual(context: Context, sha256: str, residual: Mapping[str, np.ndarray]) -> None:
    """Keep the residual in the node's per-run state (Context.state: never sent to the server,
    gone with the run)."""
    if not residual:
        for key in (RESIDUAL_STATE_KEY, RESIDUAL_SETUP_STATE_KEY):
            if key in context.state:
                del context.state[key]
        return
    context.state.array_records[RESIDUAL_STATE_KEY] = ArrayRecord(
        {k: Array(np.ascontiguousarray(v)) for k, v in residual.items()}
    )
    context.state.config_records[RESIDUAL_SETUP_STATE_KEY] = ConfigRecord({SHA256_FIELD: sha256})


def eval_reply_content(reply: EvalReply) -> RecordDict:
    """An EvalReply as the records of a reply message."""
    return RecordDict({METRICS_RECORD: MetricRecord(dict(reply.to_records()))})


def _action(message_type: str) -> str:
    """The action Flower's @app.query / @app.train registers for a message type "<category>.<action>"."""
    return message_type.partition(".")[2]


def stored_secure_round(context: Context, stage: str, round_: int) -> SiteRound:
    """This node's secure round `round_` (its keys kept by an earlier stage), or a refusal."""
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    raw = record.get(str(round_)) if record is not None else None
    if raw is None:
        raise SecAggRefusal(
            f"secure aggregation, {stage} stage of round {round_}: this site holds no keys for that round "
            "(a stage out of order, or its SuperNode restarted); refused"
        )
    return SiteRound.from_state(bytes(raw))  # type: ignore[arg-type]


def keep_secure_round(context: Context, round_: int, site: SiteRound | None, *, drop_earlier: bool = False) -> None:
    """Keep round `round_`'s state for its next stage (None: that round is over, its secrets
    dropped). `drop_earlier`: every round before it is dropped too (a mask stage: those rounds
    were left behind)."""
    record = context.state.config_records.get(SECAGG_STATE_KEY)
    held = {k: v for k, v in record.items() if not (drop_earlier and int(k) < round_)} if record is not None else {}
    held.pop(str(round_), None)
    if site is not None:
        held[str(round_)] = site.to_state()
    if held:
        context.state.config_records[SECAGG_STATE_KEY] = ConfigRecord(held)
    elif SECAGG_STATE_KEY in context.state:
        del context.state[SECAGG_STATE_KEY]


def secagg_reply(msg: Message, payload: Any) -> Message:
    return Message(RecordDict({SECAGG_RECORD: ConfigRecord(to_flat(payload))}), reply_to=msg)


def secagg_refusal(msg: Message, reason: str) -> Message:
    """The site refuses a secure round's stage (its floor, or a request that would expose a
    site): a "refused" status with the reason, as a refused train request; nothing else."""
    log.warning("secure aggregation: refused: %s", reason)
    return Message(
        RecordDict({STATUS_RECORD: ConfigRecord({"status": STATUS_REFUSED, "reason": reason})}), reply_to=msg
    )


def secagg_record(msg: Message) -> Mapping[str, Any]:
    records = msg.content.config_records
    if SECAGG_RECORD not in records:
        raise ValueError(f"{msg.metadata.message_type} message without its {SECAGG_RECORD!r} record")
    return records[SECAGG_RECORD]


def make_client_app(node_configs: Sequence[Mapping[str, Any]] | None = None) -> ClientApp:
    """The ClientApp; `node_configs[partition-id]` overlays each simulated node's config."""
    app = ClientApp()

    def runtime(context: Context) -> SiteRuntime:
        return get_runtime(site_config(context, node_configs))

    @app.query(_action(CAPABILITIES))
    def capabilities(msg: Message, context: Context) -> Message:
        caps = runtime(context).capabilities()
        return Message(RecordDict({CAPABILITIES_RECORD: ConfigRecord(caps.to_flat())}), reply_to=msg)

    @app.query(_action(CODE_STATS))
    def code_stats(msg: Message, context: Context) -> Message:
        stats = runtime(context).code_stats()
        record = ConfigRecord({JSON_FIELD: stats.model_dump_json()})
        return Message(RecordDict({CODE_STATS_RECORD: record}), reply_to=msg)

    @app.query(_action(SETUP))
    def setup(msg: Message, context: Context) -> Message:
        record = msg.content.config_records[SETUP_RECORD]
        parsed = FederationSetup.from_json(str(record[JSON_FIELD]))
        if parsed.sha256 != record[SHA256_FIELD]:
            raise ValueError(
                f"setup does not match its sha256 ({parsed.sha256[:12]}... != {str(record[SHA256_FIELD])[:12]}...)"
            )
        runtime(context).check_setup(parsed)
        state = ConfigRecord({JSON_FIELD: record[JSON_FIELD], SHA256_FIELD: parsed.sha256})
        context.state.config_records[SETUP_STATE_KEY] = state
        _SETUPS[parsed.sha256] = parsed
        return Message(RecordDict({SETUP_RECORD: ConfigRecord({SHA256_FIELD: parsed.sha256})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = RoundConfig.from_flat(_only_record(msg.content.config_records, "ConfigRecord"))
        arrays = message_arrays(msg)
        if (need := setup_needed(msg, context, cfg.setup_sha256)) is not None:
            return need
        site = runtime(context)
        try:
            # A plain reply leaves in the clear, whatever the config's secure_aggregation says.
            reply = site.train(stored_setup(context, cfg.setup_sha256), arrays, cfg, masked=False)
        except TrainRefused as refused:
            return Message(train_reply_content(refused.reply), reply_to=msg)
        reply = site.release(reply)  # the policy's local groups never leave: filtered last
        # Encoded last, on what leaves (fp16 / int8: healthfm_core/protocol/transport.py); the int8
        # residual stays in this node's state.
        records, scales, residual = site.encode(reply, arrays, cfg, stored_residual(context, cfg.setup_sha256))
        keep_residual(context, cfg.setup_sha256, residual)
        content = train_reply_content(records, scales)
        release_after_message()  # what training freed goes back to the system before the next message
        return Message(content, reply_to=msg)

    @app.query(_action(KEYS_MESSAGE))
    def secagg_keys(msg: Message, context: Context) -> Message:
        policy = runtime(context).policy
        floor = policy.secagg_min_holders if policy is not None else DEFAULT_MIN_HOLDERS
        records = key_round_records(msg.content.config_records, KEYS_MESSAGE)
        configs = [from_flat(SecAggConfig, record) for record in records]
        try:  # the site's own floor, whatever the server's config says (SiteRound checks it)
            rounds = key_rounds(configs, context.node_id, site_min_holders=floor)
        except SecAggRefusal as refused:
            return secagg_refusal(msg, f"round {configs[0].round}: {refused}")
        kept = [g for g in rounds[0].groups if policy is not None and not policy.allows(g)]
        if kept:  # the round lays them out for this site; masking without them would be refused later
            raise SecAggRefusal(f"the site policy keeps group(s) {kept} local: this site sits the secure round out")
        # A keys message starts the server's key rounds over: keys it made before are dropped.
        if SECAGG_STATE_KEY in context.state:
            del context.state[SECAGG_STATE_KEY]
        for site in rounds:
            keep_secure_round(context, site.config.round, site)
        content = RecordDict(
            {key_round_record(i): ConfigRecord(to_flat(site.advertise())) for i, site in enumerate(rounds)}
        )
        return Message(content, reply_to=msg)

    @app.query(_action(SHARES_MESSAGE))
    def secagg_shares(msg: Message, context: Context) -> Message:
        records = key_round_records(msg.content.config_records, SHARES_MESSAGE)
        directories = [from_flat(KeyDirectory, record) for record in records]
        content = RecordDict()
        for offset, directory in enumerate(directories):
            if directory.round != directories[0].round + offset:
                raise SecAggRefusal(f"{SHARES_MESSAGE}: key directories of rounds {[d.round for d in directories]}")
            site = stored_secure_round(context, "shares", directory.round)
            content[key_round_record(offset)] = ConfigRecord(to_flat(site.share_keys(directory)))
            keep_secure_round(context, directory.round, site)
        return Message(content, reply_to=msg)

    @app.train(_action(MASK_MESSAGE))
    def secagg_mask(msg: Message, context: Context) -> Message:
        records = msg.content.config_records
        if CONFIG_RECORD not in records:
            raise ValueError(f"{MASK_MESSAGE} message without its {CONFIG_RECORD!r} record")
        if SECAGG_CONFIG_RECORD not in records:
            raise ValueError(f"{MASK_MESSAGE} message without its {SECAGG_CONFIG_RECORD!r} record")
        cfg = RoundConfig.from_flat(records[CONFIG_RECORD])
        inbox = from_flat(ShareInbox, secagg_record(msg))
        final = from_flat(SecAggConfig, records[SECAGG_CONFIG_RECORD])
        arrays = message_arrays(msg)
        if (need := setup_needed(msg, context, cfg.setup_sha256)) is not None:
            return need
        if not cfg.secure_aggregation or final.round != cfg.round:
            raise SecAggRefusal(f"mask stage of round {cfg.round}: a secure config of round {final.round}")
        secure = stored_secure_round(context, "mask", cfg.round)
        secure.finalise(final)  # the round's own clip norms; nothing the keys were made for may change
        keep_secure_round(context, cfg.round, secure, drop_earlier=True)  # earlier rounds were left behind
        site = runtime(context)
        try:
            reply = site.train(stored_setup(context, cfg.setup_sha256), arrays, cfg, masked=True)
        except TrainRefused as refused:
            keep_secure_round(context, cfg.round, None)
            return Message(train_reply_content(refused.reply), reply_to=msg)
        reply = site.release(reply)  # the policy's local groups never leave, masked or not
        untrained = [g for g in secure.groups if g not in reply.group_examples]
        if untrained:
            # The round's layout has this site in those groups; leaving one out would leave its
            # peers' pairwise masks uncancelled, and a zero-count stand-in would count towards
            # min_holders without contributing. The site sits the round out (a dropout).
            keep_secure_round(context, cfg.round, None)
            why = f"no sample of group(s) {untrained} this round: the secure round's layout needs every group it holds"
            log.warning("site %s round %d: %s", site.name, cfg.round, why)
            return Message(train_reply_content(TrainReply.refused(why, reply.dp)), reply_to=msg)
        update = {k: np.asarray(v, np.float64) - np.asarray(arrays[k], np.float64) for k, v in reply.arrays.items()}
        masked = secure.mask(inbox, update, {g: int(n) for g, n in reply.group_examples.items()})
        keep_secure_round(context, cfg.round, secure)
        release_after_message()
        out = secagg_reply(msg, masked)
        if reply.dp is not None:  # the site's cumulative spend, as a plain reply reports it (no counts)
            out.content[METRICS_RECORD] = MetricRecord(dict(reply.dp.to_metrics()))
        return out

    @app.query(_action(UNMASK_MESSAGE))
    def secagg_unmask(msg: Message, context: Context) -> Message:
        request = from_flat(UnmaskRequest, secagg_record(msg))
        site = stored_secure_round(context, "unmask", request.round)
        try:
            shares = site.unmask(request)
        except SecAggRefusal as refused:
            keep_secure_round(context, request.round, None)  # no second chance to ask: its secrets are dropped
            return secagg_refusal(msg, f"round {site.config.round}: {refused}")
        for group, why in sorted(site.withheld.items()):
            log.warning(
                "round %d: group %r withheld by the server (carried forward): %s", site.config.round, group, why
            )
        keep_secure_round(context, request.round, None)  # answered once: its secrets are no longer needed
        return secagg_reply(msg, shares)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg = EvalConfig.from_flat(_only_record(msg.content.config_records, "ConfigRecord"))
        if (need := setup_needed(msg, context, cfg.setup_sha256)) is not None:
            return need
        arrays = message_arrays(msg)
        reply = runtime(context).evaluate(stored_setup(context, cfg.setup_sha256), arrays, cfg)
        release_after_message()
        return Message(eval_reply_content(reply), reply_to=msg)

    return app


# Deployment: `flwr run` / a SuperNode loads `client.client_app:app`; the site root comes from
# the node config.
app = make_client_app()
