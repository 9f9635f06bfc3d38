"""The server's side of a secure-aggregation round: one ServerRound per round, one method per stage.

The server relays (keys, ciphertexts it cannot read), decides who survived each stage, and at
the end reconstructs from the survivors' shares exactly the secrets that remove the masks of the
groups it may unmask: each surviving holder's self-mask seed of that group, and each dropped
site's mask key (to remove the pairwise masks survivors added for it). What it learns is
`SecureAggregate`: per unmasked group, the holders' weighted average update and their total count.

A stage with fewer sites than the threshold raises SecAggError: the round fails loudly and the
global arrays stay as they were; there is no partial or approximate answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

from healthfm_core.model.groups import GROUPS, parameter_group
from secure_aggregation.config import SecAggConfig
from secure_aggregation.errors import SecAggError
from secure_aggregation.field import decode_sums, error_bound
from secure_aggregation.keys import agree, private_from_bytes, public_bytes
from secure_aggregation.layout import split_group_vector
from secure_aggregation.masks import field_dtype, mask_label, mask_stream
from secure_aggregation.messages import (
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    ShareInbox,
    UnmaskRequest,
    UnmaskShares,
)
from secure_aggregation.site import seed_commitment


@dataclass(frozen=True)
class SecureAggregate:
    """What a secure round lets the server learn."""

    means: dict[str, np.ndarray]  # unmasked group -> weighted average update (float64, flat)
    weights: dict[str, int]  # unmasked group -> its holders' total count
    unmasked: dict[str, list[int]]  # group -> the sites averaged into it
    withheld: dict[str, str]  # group -> why it was not unmasked (carried forward)
    error_bounds: dict[str, float]  # unmasked group -> per-value bound against the plain average
    dropped_before_masking: list[int]  # shared keys, sent no masked vector (U2 \ U3)
    dropped_after_masking: list[int]  # sent a masked vector, no unmask shares (U3 \ U4)
    rejected: dict[int, str] = field(default_factory=dict)  # node -> why a message of it was left out

    def updates(
        self, reference: Mapping[str, np.ndarray], group_of: Callable[[str], str] = parameter_group
    ) -> dict[str, np.ndarray]:
        """The averaged update per state_dict key of the unmasked groups, in the reference's shapes."""
        out: dict[str, np.ndarray] = {}
        for group, mean in self.means.items():
            out.update(split_group_vector(mean, reference, group, group_of))
        return out


class ServerRound:
    """The server's state for one secure round (stages 1-4; see secure_aggregation/__init__.py)."""

    def __init__(self, config: SecAggConfig) -> None:
        self.config = config
        self.rejected: dict[int, str] = {}
        self.directory: KeyDirectory | None = None
        self.shared: list[int] = []  # U2
        self.masked: dict[int, MaskedInput] = {}  # U3
        self.request: UnmaskRequest | None = None
        self.withheld: dict[str, str] = {}

    def finalise(self, config: SecAggConfig) -> None:
        """The round's own config in place of the provisional one its keys were made with, rounds
        before (SiteRound.finalise: only MASK_TIME_FIELDS may differ)."""
        if self.masked:
            raise SecAggError(f"round {self.config.round}: finalise after masked inputs arrived")
        changed = self.config.key_time_difference(config)
        if changed:
            raise SecAggError(f"round {self.config.round}: its config differs in {', '.join(changed)} from its keys'")
        self.config = config

    def _accept(self, node: int, round_: int, allowed: Iterable[int], seen: Iterable[int], stage: str) -> bool:
        if round_ != self.config.round:
            self.rejected[node] = f"{stage}: round {round_}, expected {self.config.round}"
        elif node not in set(allowed):
            self.rejected[node] = f"{stage}: not expected at this stage"
        elif node in set(seen):
            self.rejected[node] = f"{stage}: a second message"
        else:
            return True
        return False

    def _enough(self, count: int, stage: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(
                f"round {self.config.round}: {count} site(s) {stage} < threshold {self.config.threshold}; "
                "the round fails and the global arrays stay unchanged"
            )

    # ------------------------------------------------------------------ stage 1
    def key_directory(self, replies: Iterable[PublicKeys]) -> KeyDirectory:
        keys: dict[int, PublicKeys] = {}
        for reply in replies:
            if not self._accept(reply.node_id, reply.round, self.config.sample, keys, "keys"):
                continue
            if sorted(reply.seed_commitments) != sorted(self.config.groups[reply.node_id]):
                self.rejected[reply.node_id] = "keys: commitments for groups other than the site holds"
                continue
            keys[reply.node_id] = reply
        self._enough(len(keys), "advertised keys")
        self.directory = KeyDirectory(round=self.config.round, keys=dict(sorted(keys.items())))
        return self.directory

    # ------------------------------------------------------------------ stage 2
    def route_shares(self, replies: Iterable[EncryptedShares]) -> dict[int, ShareInbox]:
        """Each site of U2 gets the ciphertexts the other sites of U2 addressed to it."""
        if self.directory is None:
            raise SecAggError("route_shares before key_directory")
        advertised = list(self.directory.keys)
        sent: dict[int, EncryptedShares] = {}
        for reply in replies:
            if not self._accept(reply.node_id, reply.round, advertised, sent, "shares"):
                continue
            if sorted(reply.ciphertexts) != sorted(n for n in advertised if n != reply.node_id):
                self.rejected[reply.node_id] = "shares: not one ciphertext per other advertised site"
                continue
            sent[reply.node_id] = reply
        self._enough(len(sent), "shared keys")
        self.shared = sorted(sent)
        return {
            dst: ShareInbox(
                round=self.config.round,
                ciphertexts={src: sent[src].ciphertexts[dst] for src in self.shared if src != dst},
            )
            for dst in self.shared
        }

    # ------------------------------------------------------------------ stage 3
    def unmask_request(self, replies: Iterable[MaskedInput]) -> UnmaskRequest:
        """Survivors (U3) and the groups to unmask: those with at least min_holders surviving
        holders. The others are withheld (carried forward), with the reason."""
        config = self.config
        for reply in replies:
            if not self._accept(reply.node_id, reply.round, self.shared, self.masked, "masked input"):
                continue
            expected = config.vector_length(reply.node_id) * np.dtype(field_dtype(config.field_bits)).itemsize
            if reply.groups != config.segments(reply.node_id) or len(reply.vector) != expected:
                self.rejected[reply.node_id] = "masked input: groups or length other than the round's"
                continue
            self.masked[reply.node_id] = reply
        self._enough(len(self.masked), "sent a masked vector")
        survivors = sorted(self.masked)
        groups = []
        for group in GROUPS:
            holders = [n for n in survivors if group in config.groups[n]]
            if not any(group in config.groups[n] for n in config.sample):
                continue
            if len(holders) >= config.min_holders:
                groups.append(group)
            else:
                self.withheld[group] = (
                    f"{len(holders)} surviving holder(s) < min_holders {config.min_holders}: "
                    "not unmasked, carried forward"
                )
        self.request = UnmaskRequest(
            round=config.round, survivors=survivors, groups=groups, withheld=dict(self.withheld)
        )
        return self.request

    # ------------------------------------------------------------------ stage 4
    def aggregate(self, replies: Iterable[UnmaskShares]) -> SecureAggregate:
        config, request, directory = self.config, self.request, self.directory
        if request is None or directory is None:
            raise SecAggError("aggregate before unmask_request")
        answers: dict[int, UnmaskShares] = {}
        for reply in replies:
            if self._accept(reply.node_id, reply.round, request.survivors, answers, "unmask shares"):
                answers[reply.node_id] = reply
        self._enough(len(answers), "sent unmask shares")
        survivors = request.survivors
        dropped = [n for n in self.shared if n not in self.masked]
        dtype = field_dtype(config.field_bits)

        sums: dict[str, np.ndarray] = {}
        for node in survivors:
            vector = np.frombuffer(self.masked[node].vector, dtype=np.dtype(dtype).newbyteorder("<"))
            start = 0
            for group in config.segments(node):
                length = config.segment_length(group)
                if group in request.groups:
                    segment = vector[start : start + length].astype(dtype)
                    sums[group] = segment if group not in sums else sums[group] + segment
                start += length

        for node in survivors:  # remove each survivor's self-masks of the unmasked groups
            for group in config.segments(node):
                if group not in request.groups:
                    continue
                shares = [a.seed_shares.get(node, {}).get(group) for a in answers.values()]
                seed = self._reconstruct([s for s in shares if s is not None], f"node {node}'s seed of {group!r}")
                if seed_commitment(config.round, node, group, seed) != directory.keys[node].seed_commitments[group]:
                    raise SecAggError(f"node {node}'s seed of {group!r}: the shares reconstruct a wrong seed")
                label = mask_label(config.round, "self", group)
                sums[group] = sums[group] - mask_stream(seed, label, sums[group].size, config.field_bits)

        for gone in dropped:  # remove the pairwise masks survivors added for each dropped site
            key_shares = [a.key_shares[gone] for a in answers.values() if gone in a.key_shares]
            raw = self._reconstruct(key_shares, f"dropped node {gone}'s mask key")
            private = private_from_bytes(raw)
            if public_bytes(private) != directory.keys[gone].mask_key:
                raise SecAggError(f"dropped node {gone}'s mask key: the shares reconstruct a wrong key")
            for node in survivors:
                secret = agree(private, directory.keys[node].mask_key)
                for group in set(config.groups[node]) & set(config.groups[gone]) & set(request.groups):
                    stream = mask_stream(
                        secret, mask_label(config.round, "pair", group), sums[group].size, config.field_bits
                    )
                    # The survivor added the stream when its id is the lower one: take it away.
                    sums[group] = sums[group] - stream if node < gone else sums[group] + stream

        means: dict[str, np.ndarray] = {}
        weights: dict[str, int] = {}
        bounds: dict[str, float] = {}
        unmasked: dict[str, list[int]] = {}
        for group in request.groups:
            holders = [n for n in survivors if group in config.groups[n]]
            means[group], weights[group] = decode_sums(sums[group], len(holders), config, group)
            bounds[group] = error_bound(config, group, len(holders), weights[group])
            unmasked[group] = holders
        return SecureAggregate(
            means=means,
            weights=weights,
            unmasked=unmasked,
            withheld=dict(self.withheld),
            error_bounds=bounds,
            dropped_before_masking=dropped,
            dropped_after_masking=[n for n in survivors if n not in answers],
            rejected=dict(self.rejected),
        )

    def _reconstruct(self, shares: list[bytes], what: str) -> bytes:
        if len(shares) < self.config.threshold:
            raise SecAggError(f"{what}: {len(shares)} share(s) < threshold {self.config.threshold}")
        try:
            return combine_shares(shares[: self.config.threshold])
        except ValueError as err:
            raise SecAggError(f"{what}: the shares do not combine") from err
