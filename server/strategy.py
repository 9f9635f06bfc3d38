"""ModalityAwareFedAvg: federated averaging over sites that hold different modalities."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from healthfm_core.federation import STATUS_RECORD, STATUS_REFUSED
from healthfm_core.model.groups import GROUPS, parameter_group
from server.limits import array_record_bytes

log = logging.getLogger(__name__)

COUNT_PREFIX = "num-examples."


@dataclass
class RejectedReply:
    """Why one reply was left out of a round (kept for the audit log)."""

    node_id: int
    reason: str


@dataclass
class GroupAdam:
    """FedAdam-style server optimiser state, per key (so per group)."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def step(self, key: str, previous: np.ndarray, averaged: np.ndarray) -> np.ndarray:
        delta = averaged - previous
        m = self.beta1 * self.m.get(key, np.zeros_like(delta)) + (1 - self.beta1) * delta
        v = self.beta2 * self.v.get(key, np.zeros_like(delta)) + (1 - self.beta2) * delta * delta
        self.m[key], self.v[key] = m, v
        return (previous + self.lr * m / (np.sqrt(v) + self.tau)).astype(previous.dtype)


class ModalityAwareFedAvg(FedAvg):
    """FedAvg where each parameter is averaged only over the sites that trained it.

    Every state_dict key belongs to one group (``shared``, ``ehr``, ``wearables``,
    ``genomics``; see ``healthfm_core.model.groups.parameter_group``). A site receives and
    returns only the groups it has data for, and reports ``num-examples.<group>``. For
    each key k of group g, with R_k the accepted replies holding k:

        w_k <- sum_{r in R_k} n_{r,g} w_{r,k} / sum_{r in R_k} n_{r,g}

    A key no accepted reply holds, or whose group has fewer than ``min_sites_per_group``
    contributing sites, keeps its previous value. With every site holding every group
    (and ``num-examples.<g>`` equal to ``num-examples``) this is FedAvg exactly.
    Replies with NaN/Inf, wrong shapes or dtypes, unknown keys, partial groups, missing
    counts, an ArrayRecord over ``max_reply_bytes``, values beyond ``max_abs_value``, or
    update norms far above the round's median are rejected and logged; the round goes on
    with the rest. ``rejected[round]`` keeps each rejection and its reason (the audit log). Optionally a FedAdam-style server step is applied to the
    averaged pseudo-gradient.
    """

    def __init__(
        self,
        *,
        min_sites_per_group: int = 1,
        norm_outlier_factor: float = 10.0,
        max_update_norm: float | None = None,
        max_reply_bytes: int | None = None,
        max_abs_value: float | None = 1e6,
        server_optimizer: GroupAdam | None = None,
        group_of: Callable[[str], str] = parameter_group,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.min_sites_per_group = min_sites_per_group
        self.norm_outlier_factor = norm_outlier_factor
        self.max_update_norm = max_update_norm
        # Checked before any array is decoded (server/limits.py; None: no limit).
        self.max_reply_bytes = max_reply_bytes
        # No trained weight is anywhere near this; values near float32's max would overflow the
        # weighted sum to Inf even though each reply is finite.
        self.max_abs_value = max_abs_value
        self.server_optimizer = server_optimizer
        self.group_of = group_of
        # node_id -> groups the node may train (set from the capabilities query). None: all.
        self.node_groups: dict[int, list[str]] | None = None
        self.current_arrays: ArrayRecord | None = None
        self.rejected: dict[int, list[RejectedReply]] = {}
        self.contributors: dict[int, dict[str, list[int]]] = {}
        self.sent: list[Message] = []  # the last round's train messages (see origin())

    # --------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resumed run needs besides the global arrays: the server optimiser's moments,
        as ``m.<key>`` / ``v.<key>`` arrays (empty without a server optimiser)."""
        if self.server_optimizer is None:
            return {}
        out = {f"m.{k}": v for k, v in self.server_optimizer.m.items()}
        out.update({f"v.{k}": v for k, v in self.server_optimizer.v.items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Inverse of state_dict; state from a run without a server optimiser cannot be loaded
        into one with it (or the other way round) unless it is empty."""
        if self.server_optimizer is None:
            if state:
                raise ValueError(f"strategy has no server optimiser but the state holds {len(state)} arrays")
            return
        m, v = {}, {}
        for name, value in state.items():
            kind, _, key = name.partition(".")
            if kind not in ("m", "v") or not key:
                raise ValueError(f"unexpected strategy state entry {name!r} (expected m.<key> or v.<key>)")
            (m if kind == "m" else v)[key] = np.asarray(value)
        if set(m) != set(v):
            raise ValueError(f"server optimiser state: m and v cover different keys ({sorted(set(m) ^ set(v))[:3]})")
        self.server_optimizer.m, self.server_optimizer.v = m, v

    # ------------------------------------------------------------------ sending
    def groups_for_node(self, node_id: int) -> list[str]:
        if self.node_groups is None:
            return list(GROUPS)
        return list(self.node_groups.get(node_id, []))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled site only the groups it holds, and remember the global arrays."""
        self.current_arrays = arrays
        if self.fraction_train == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * self.fraction_train)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, self.min_train_nodes))
        messages = []
        for node_id in node_ids:
            groups = self.groups_for_node(node_id)
            if not groups:
                log.warning("round %d: node %d holds no trainable group; not sampled", server_round, node_id)
                continue
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config["groups"] = groups
            record = RecordDict(
                {
                    self.arrayrecord_key: self.arrays_for_groups(arrays, groups),
                    self.configrecord_key: node_config,
                }
            )
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node_id))
        log.info("round %d: training on %d nodes", server_round, len(messages))
        self.sent = messages
        return messages

    def origin(self, reply: Message) -> int:
        """The node a train reply answers for. Error replies the SuperLink generates itself (node
        unavailable: a dead SuperNode; message expired) come from the SuperLink's node id; they are
        matched to the addressee through reply_to_message_id (the Grid sets the id of every message
        it pushes)."""
        node = reply.metadata.src_node_id
        if any(m.metadata.dst_node_id == node for m in self.sent):
            return node
        for sent in self.sent:
            if sent.metadata.message_id and sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return node

    def arrays_for_groups(self, arrays: ArrayRecord, groups: list[str]) -> ArrayRecord:
        wanted = set(groups)
        return ArrayRecord({k: v for k, v in arrays.items() if self.group_of(k) in wanted})

    # ---------------------------------------------------------------- receiving
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.current_arrays is None:
            raise RuntimeError("aggregate_train called before configure_train: no global arrays to update")
        replies = list(replies)
        previous = {k: v.numpy() for k, v in self.current_arrays.items()}
        accepted: list[tuple[int, dict[str, np.ndarray], dict[str, float], RecordDict]] = []
        rejected: list[RejectedReply] = []
        for msg in replies:
            node_id = self.origin(msg)
            if msg.has_error():
                rejected.append(RejectedReply(node_id, f"error reply: {msg.error.reason}"))
                continue
            refusal = self.refusal(msg.content)
            if refusal is not None:
                # The site's own policy said no (e.g. its epsilon cap): it contributes nothing.
                rejected.append(RejectedReply(node_id, f"refused by the site: {refusal}"))
                continue
            try:
                arrays, counts = self.validate_reply(msg.content, previous, node_id)
            except Exception as err:  # noqa: BLE001 - a peer's reply: nothing in it may stop the round
                if not isinstance(err, ValueError):
                    log.exception("round %d: unexpected error validating node %d's reply", server_round, node_id)
                    err = ValueError(f"invalid reply ({type(err).__name__}: {err})")
                rejected.append(RejectedReply(node_id, str(err)))
                continue
            accepted.append((node_id, arrays, counts, msg.content))
        accepted, outliers = self.drop_norm_outliers(accepted, previous)
        rejected.extend(outliers)
        for r in rejected:
            log.warning("round %d: rejected reply from node %d: %s", server_round, r.node_id, r.reason)
        self.rejected[server_round] = rejected
        if not accepted:
            log.warning("round %d: no acceptable reply; global arrays unchanged", server_round)
            return None, None

        new_arrays, contributors = self.average(accepted, previous)
        self.contributors[server_round] = contributors
        metrics = self.train_metrics_aggr_fn([content for *_, content in accepted], self.weighted_by_key)
        return new_arrays, metrics

    @staticmethod
    def refusal(content: RecordDict) -> str | None:
        """The reason of a reply whose site refused the request (status "refused"), else None."""
        status = content.config_records.get(STATUS_RECORD)
        if status is None or status.get("status") != STATUS_REFUSED:
            return None
        return str(status.get("reason", "no reason given"))

    def validate_reply(
        self, content: RecordDict, previous: dict[str, np.ndarray], node_id: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Decode one reply; raise ValueError naming the first problem found."""
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise ValueError(
                f"expected one ArrayRecord and one MetricRecord, got {len(content.array_records)} and "
                f"{len(content.metric_records)}"
            )
        record = next(iter(content.array_records.values()))
        metrics = next(iter(content.metric_records.values()))
        size = array_record_bytes(record)
        if self.max_reply_bytes is not None and size > self.max_reply_bytes:
            raise ValueError(f"reply of {size:,} B exceeds the limit of {self.max_reply_bytes:,} B")
        allowed = set(self.groups_for_node(node_id))
        arrays: dict[str, np.ndarray] = {}
        for key, item in record.items():
            if key not in previous:
                raise ValueError(f"unknown key {key!r}")
            group = self.group_of(key)
            if group not in allowed:
                raise ValueError(f"key {key!r} of group {group!r} was not sent to this node")
            expected = previous[key]
            if tuple(item.shape) != expected.shape:
                raise ValueError(f"key {key!r}: shape {tuple(item.shape)} != {expected.shape}")
            if item.dtype != str(expected.dtype) and not (
                item.dtype == "float16" and np.issubdtype(expected.dtype, np.floating)
            ):
                raise ValueError(f"key {key!r}: dtype {item.dtype} != {expected.dtype}")
            try:
                value = item.numpy()
            except Exception as err:  # a peer's bytes: anything can be wrong with them
                raise ValueError(f"key {key!r}: undecodable array ({err})") from None
            if value.shape != expected.shape or (value.dtype != expected.dtype and value.dtype != np.float16):
                raise ValueError(f"key {key!r}: payload {value.dtype}{value.shape} does not match its header")
            # fp16 transport: upcast before any arithmetic.
            value = value.astype(expected.dtype, copy=False)
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise ValueError(f"key {key!r}: NaN or Inf values")
            if self.max_abs_value is not None and value.size and float(np.max(np.abs(value))) > self.max_abs_value:
                raise ValueError(f"key {key!r}: |value| up to {float(np.max(np.abs(value))):.3g} > limit "
                                 f"{self.max_abs_value:.3g}")
            arrays[key] = value
        if not arrays:
            raise ValueError("empty ArrayRecord")
        groups = {self.group_of(k) for k in arrays}
        for group in groups:
            missing = [k for k in previous if self.group_of(k) == group and k not in arrays]
            if missing:
                raise ValueError(f"partial group {group!r}: missing {len(missing)} keys, e.g. {missing[0]!r}")
        counts: dict[str, float] = {}
        for group in groups:
            name = COUNT_PREFIX + group
            n = metrics.get(name)
            if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
                raise ValueError(f"metric {name!r} missing or not a positive number: {n!r}")
            counts[group] = float(n)
        return arrays, counts

    def drop_norm_outliers(
        self,
        accepted: list[tuple[int, dict[str, np.ndarray], dict[str, float], RecordDict]],
        previous: dict[str, np.ndarray],
    ) -> tuple[list, list[RejectedReply]]:
        """Reject replies whose update norm (per group) is absurd against the round's others."""
        norms: dict[str, dict[int, float]] = {}
        for node_id, arrays, counts, _ in accepted:
            for group in counts:
                sq = sum(
                    float(np.sum((arrays[k].astype(np.float64) - previous[k]) ** 2))
                    for k in arrays
                    if self.group_of(k) == group
                )
                norms.setdefault(group, {})[node_id] = sq**0.5
        bad: dict[int, str] = {}
        for group, by_node in norms.items():
            for node_id, norm in by_node.items():
                if self.max_update_norm is not None and norm > self.max_update_norm:
                    bad.setdefault(node_id, f"group {group!r} update norm {norm:.3g} > limit {self.max_update_norm:.3g}")
                others = [n for other, n in by_node.items() if other != node_id]
                if len(others) >= 2:
                    median = float(np.median(others))
                    if median > 0 and norm > self.norm_outlier_factor * median:
                        bad.setdefault(
                            node_id,
                            f"group {group!r} update norm {norm:.3g} > {self.norm_outlier_factor:g} x "
                            f"median of the others ({median:.3g})",
                        )
        kept = [a for a in accepted if a[0] not in bad]
        return kept, [RejectedReply(node_id, reason) for node_id, reason in bad.items()]

    def average(
        self,
        accepted: list[tuple[int, dict[str, np.ndarray], dict[str, float], RecordDict]],
        previous: dict[str, np.ndarray],
    ) -> tuple[ArrayRecord, dict[str, list[int]]]:
        contributors: dict[str, list[int]] = {g: [] for g in GROUPS}
        for node_id, _, counts, _ in accepted:
            for group in counts:
                contributors.setdefault(group, []).append(node_id)
        updated_groups = {g for g, nodes in contributors.items() if len(nodes) >= self.min_sites_per_group}
        for group, nodes in contributors.items():
            if nodes and group not in updated_groups:
                log.info(
                    "group %r: %d contributing sites < minimum %d; kept unchanged",
                    group, len(nodes), self.min_sites_per_group,
                )
        out: dict[str, Array] = {}
        for key, old in previous.items():
            group = self.group_of(key)
            holders = [(arrays[key], counts[group]) for _, arrays, counts, _ in accepted if key in arrays]
            if group not in updated_groups or not holders:
                out[key] = Array(old)
                continue
            total = sum(n for _, n in holders)
            # Same arithmetic, in the same order, as flwr's aggregate_arrayrecords, so that with
            # every group everywhere the result is FedAvg's to the last bit.
            value = None
            for array, n in holders:
                term = array * (n / total)
                value = term if value is None else value + term
            value = np.asarray(value)
            if self.server_optimizer is not None:
                value = self.server_optimizer.step(key, old, value)
            out[key] = Array(value)
        return ArrayRecord(out), {g: nodes for g, nodes in contributors.items() if g in updated_groups}

