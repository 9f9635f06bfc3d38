"""The site's side of a secure-aggregation round: one SiteRound per round, one method per stage.

The state (private keys, self-mask seeds, the shares other sites sent) never leaves the site; each
method takes the server's message, checks it, and returns the site's reply. The site enforces the
protocol's guarantees itself rather than trusting the server: it answers an unmask request only
if the survivors are at least the threshold and every group asked for has at least `min_holders`
surviving holders, and it never reveals both a site's seed and its key. `min_holders` is the
stricter of the round's (the server's word) and the site's own floor (`site_min_holders`, its
policy's secagg_min_holders): a round whose config lets the server open a group over fewer
holders than the floor is refused at its first stage, before any key or update is made.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from pydantic import BaseModel, ConfigDict, Field

from healthfm_core.strict_files import strict_model
from healthfm_core.terms.groups import parameter_group
from secure_aggregation.config import DEFAULT_MIN_HOLDERS, SecAggConfig
from secure_aggregation.errors import SecAggRefusal
from secure_aggregation.field import clip_update, encode_segment
from secure_aggregation.keys import KEY_BYTES, agree, fernet_key, private_bytes, private_from_bytes, public_bytes
from secure_aggregation.layout import group_vector
from secure_aggregation.masks import field_dtype, mask_label, mask_stream
from secure_aggregation.messages import (
    EncryptedShares,
    KeyDirectory,
    MaskedInput,
    PublicKeys,
    ShareInbox,
    SharePlaintext,
    UnmaskRequest,
    UnmaskShares,
)

SEED_BYTES = 32


def seed_commitment(round_: int, node: int, group: str, seed: bytes) -> bytes:
    """sha256 over the seed and what it is for: the server checks a reconstruction against it."""
    return hashlib.sha256(f"healthfm-secagg/{round_}/{node}/{group}/".encode() + seed).digest()


class SiteState(BaseModel):
    """A SiteRound between two messages, for a ClientApp that does not live through the round
    (Flower's Context.state, which stays on the site's SuperNode). It holds the site's private keys
    and seeds: it must never be sent anywhere."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    config: SecAggConfig
    node_id: int
    site_min_holders: int = Field(default=DEFAULT_MIN_HOLDERS, ge=1)
    enc_key: bytes
    mask_key: bytes
    seeds: dict[str, bytes]
    directory: KeyDirectory | None = None
    received: dict[int, SharePlaintext] = Field(default_factory=dict)
    own: SharePlaintext | None = None
    masked: bool = False
    answered: bool = False
    withheld: dict[str, str] = Field(default_factory=dict)


def key_rounds(
    configs: Sequence[SecAggConfig],
    node_id: int,
    randbytes: Callable[[int], bytes] = os.urandom,
    site_min_holders: int = DEFAULT_MIN_HOLDERS,
) -> list[SiteRound]:
    """One SiteRound per config of a keys message: rounds r, r + 1, ... in sequence, each config
    the first's but for the round and MASK_TIME_FIELDS (a round ahead's clip norms are provisional:
    its mask message brings its own, `SiteRound.finalise`). Every round has its own keys and
    seeds, so what the server learns in one round (a dropped site's mask key, a survivor's seed)
    opens nothing of another."""
    if not configs:
        raise SecAggRefusal("a keys message without a round")
    first = configs[0]
    for offset, config in enumerate(configs):
        changed = [name for name in first.key_time_difference(config) if name != "round"]
        if config.round != first.round + offset or changed:
            raise SecAggRefusal(
                f"key round {offset}: round {config.round}, differs in {changed or 'nothing'}; expected round "
                f"{first.round + offset} with round {first.round}'s sample, groups, threshold and min_holders"
            )
    return [SiteRound(config, node_id, randbytes, site_min_holders) for config in configs]


class SiteRound:
    """One site's secure-aggregation round (stages 1-4; see secure_aggregation/__init__.py)."""

    def __init__(
        self,
        config: SecAggConfig,
        node_id: int,
        randbytes: Callable[[int], bytes] = os.urandom,
        site_min_holders: int = DEFAULT_MIN_HOLDERS,
    ) -> None:
        """`randbytes`: the source of the keys and seeds (the OS's; tests pass a seeded one).
        `site_min_holders`: the site's own floor (its policy's secagg_min_holders); a config whose
        min_holders is below it is refused here (SecAggRefusal), whatever the server asks."""
        if node_id not in config.sample:
            raise SecAggRefusal(f"node {node_id} is not in the round's sample")
        if config.min_holders < site_min_holders:
            raise SecAggRefusal(
                f"the round's min_holders {config.min_holders} is below this site's floor {site_min_holders} "
                "(its policy's secagg_min_holders): the server could open a group over fewer holders; "
                "this site takes no part in the round"
            )
        self.config = config
        self.node_id = node_id
        self.site_min_holders = site_min_holders
        self.groups = config.segments(node_id)
        self._enc = private_from_bytes(randbytes(KEY_BYTES))
        self._mask = private_from_bytes(randbytes(KEY_BYTES))
        # One self-mask seed per group: the server may unmask one group of a site (enough holders)
        # and not another (too few); one seed for both would open the withheld group too.
        self._seeds = {g: randbytes(SEED_BYTES) for g in self.groups}
        self._directory: KeyDirectory | None = None
        self._received: dict[int, SharePlaintext] = {}  # sender -> its shares for us (U2 \ self)
        self._own: SharePlaintext | None = None
        self._masked = False
        self._answered = False
        self.withheld: dict[str, str] = {}  # what the unmask request said was withheld, and why (to log)

    def to_state(self) -> bytes:
        """The round's state as bytes, secrets included (see SiteState)."""
        return (
            SiteState(
                config=self.config,
                node_id=self.node_id,
                site_min_holders=self.site_min_holders,
                enc_key=private_bytes(self._enc),
                mask_key=private_bytes(self._mask),
                seeds=self._seeds,
                directory=self._directory,
                received=self._received,
                own=self._own,
                masked=self._masked,
                answered=self._answered,
                withheld=self.withheld,
            )
            .model_dump_json()
            .encode()
        )

    @classmethod
    def from_state(cls, raw: bytes) -> SiteRound:
        """The SiteRound `to_state` saved, at the stage it had reached."""
        state = SiteState.model_validate_json(raw)
        keys = iter([state.enc_key, state.mask_key, *(state.seeds[g] for g in state.config.segments(state.node_id))])
        site = cls(state.config, state.node_id, lambda _: next(keys), state.site_min_holders)
        site._directory, site._received, site._own = state.directory, dict(state.received), state.own
        site._masked, site._answered, site.withheld = state.masked, state.answered, dict(state.withheld)
        return site

    # ------------------------------------------------------------------ stage 1
    def advertise(self) -> PublicKeys:
        return PublicKeys(
            node_id=self.node_id,
            round=self.config.round,
            enc_key=public_bytes(self._enc),
            mask_key=public_bytes(self._mask),
            seed_commitments={
                g: seed_commitment(self.config.round, self.node_id, g, s) for g, s in self._seeds.items()
            },
        )

    # ------------------------------------------------------------------ stage 2
    def share_keys(self, directory: KeyDirectory) -> EncryptedShares:
        """t-of-n Shamir shares of each self-mask seed and of the mask key, one ciphertext per
        other site of the directory (encrypted with the pairwise `enc` agreement)."""
        config = self.config
        if self._directory is not None:
            # One directory a round: a second would have the site share the same seeds again,
            # fresh Shamir shares under keys the server may have swapped since the first.
            raise SecAggRefusal(f"share_keys: expected once a round; a second key directory of round {directory.round}")
        if directory.round != config.round:
            raise SecAggRefusal(f"key directory of round {directory.round}, this is round {config.round}")
        if directory.keys.get(self.node_id) != self.advertise():
            raise SecAggRefusal("the key directory does not hold this site's keys as it advertised them")
        for node, keys in directory.keys.items():
            if node not in config.sample or keys.node_id != node or keys.round != config.round:
                raise SecAggRefusal(f"key directory: entry {node} is not a sampled site's keys of this round")
            if sorted(keys.seed_commitments) != sorted(config.groups[node]):
                raise SecAggRefusal(f"key directory: node {node} commits to groups other than it holds")
        if len(directory.keys) < config.threshold:
            raise SecAggRefusal(f"{len(directory.keys)} sites advertised keys < threshold {config.threshold}")
        self._directory = directory
        recipients = sorted(directory.keys)
        seed_shares = {g: create_shares(seed, config.threshold, len(recipients)) for g, seed in self._seeds.items()}
        key_shares = create_shares(private_bytes(self._mask), config.threshold, len(recipients))
        ciphertexts: dict[int, bytes] = {}
        for index, dst in enumerate(recipients):
            plain = SharePlaintext(
                src=self.node_id,
                dst=dst,
                round=config.round,
                seed_shares={g: shares[index] for g, shares in seed_shares.items()},
                key_share=key_shares[index],
            )
            if dst == self.node_id:
                self._own = plain  # our own share stays here
                continue
            key = fernet_key(agree(self._enc, directory.keys[dst].enc_key))
            ciphertexts[dst] = encrypt(key, plain.model_dump_json().encode())
        return EncryptedShares(node_id=self.node_id, round=config.round, ciphertexts=ciphertexts)

    # ------------------------------------------------------------------ stage 3
    def finalise(self, config: SecAggConfig) -> None:
        """The round's own config, sent with its mask message, in place of the one the keys were
        made for (a round whose keys were exchanged ahead: its clip norms were not known then).
        Only MASK_TIME_FIELDS may change; anything else (the sample, the groups, the threshold,
        min_holders) is what the site agreed to when it made and shared its keys."""
        if self._masked:
            raise SecAggRefusal("finalise: the round is already masked")
        changed = self.config.key_time_difference(config)
        if changed:
            raise SecAggRefusal(
                f"round {self.config.round}: the mask message's config changes {', '.join(changed)} "
                "from the config this site made its keys for"
            )
        self.config = config

    def mask(
        self,
        inbox: ShareInbox,
        update: Mapping[str, np.ndarray],
        counts: Mapping[str, int],
        group_of: Callable[[str], str] = parameter_group,
    ) -> MaskedInput:
        """The site's update (trained - received, its groups' keys) and its count per group, checked,
        clipped, quantised and masked. The masks pair this site with every other site of U2 (the
        inbox's senders) that holds the same group, so each group's masks cancel in its sum."""
        config, directory = self.config, self._directory
        if directory is None or self._own is None or self._masked:
            raise SecAggRefusal("mask: expected once, after share_keys")
        if inbox.round != config.round:
            raise SecAggRefusal(f"share inbox of round {inbox.round}, this is round {config.round}")
        received: dict[int, SharePlaintext] = {}
        for src, token in inbox.ciphertexts.items():
            if src == self.node_id or src not in directory.keys:
                raise SecAggRefusal(f"share inbox: sender {src} is not another site of the key directory")
            key = fernet_key(agree(self._enc, directory.keys[src].enc_key))
            try:
                plain = strict_model(SharePlaintext, decrypt(key, token), f"share inbox: the shares from {src}")
            except (InvalidToken, ValueError) as err:  # ValueError: pydantic's, or a duplicated key
                raise SecAggRefusal(f"share inbox: the ciphertext from {src} does not decrypt to shares") from err
            expected_groups = sorted(config.groups[src])
            if (plain.src, plain.dst, plain.round) != (src, self.node_id, config.round) or sorted(
                plain.seed_shares
            ) != expected_groups:
                raise SecAggRefusal(f"share inbox: the shares from {src} are not addressed to this site this round")
            received[src] = plain
        if len(received) + 1 < config.threshold:
            raise SecAggRefusal(f"{len(received) + 1} sites shared keys < threshold {config.threshold}")
        try:
            held = {group_of(k) for k in update}
        except KeyError as err:
            raise SecAggRefusal(f"update: {err.args[0]}") from None
        if held != set(self.groups) or set(counts) != set(self.groups):
            raise SecAggRefusal(
                f"update holds groups {sorted(held)}, counts {sorted(counts)}; the round expects {self.groups}"
            )
        dtype = field_dtype(config.field_bits)
        # One agreement per peer, its streams told apart by group (masks.py's labels).
        secrets = {peer: agree(self._mask, directory.keys[peer].mask_key) for peer in sorted(received)}
        segments = []
        for group in self.groups:
            values = clip_update(
                group_vector(update, group, group_of), config.clip_norm[group], config.value_range[group]
            )
            segment = encode_segment(values, counts[group], config, group)
            segment = segment + mask_stream(
                self._seeds[group], mask_label(config.round, "self", group), segment.size, config.field_bits
            )
            for peer, secret in secrets.items():
                if group not in config.groups[peer]:
                    continue
                pairwise = mask_stream(
                    secret,
                    mask_label(config.round, "pair", group),
                    segment.size,
                    config.field_bits,
                )
                # The lower node id adds, the higher subtracts: the pair's masks cancel in the sum.
                segment = segment + pairwise if self.node_id < peer else segment - pairwise
            segments.append(segment.astype(dtype, copy=False))
        vector = np.concatenate(segments).astype(np.dtype(dtype).newbyteorder("<"), copy=False)
        # Only now: a site that refused its own update above sent nothing and is a dropout.
        self._received = received
        self._masked = True
        return MaskedInput(node_id=self.node_id, round=config.round, groups=self.groups, vector=vector.tobytes())

    # ------------------------------------------------------------------ stage 4
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Shares of the survivors' seeds of the groups to unmask, and of the dropped sites' keys
        (U2 minus the survivors), after checking that the request exposes no site."""
        config = self.config
        if not self._masked or self._own is None or self._answered:
            raise SecAggRefusal("unmask: expected once, after mask")
        if request.round != config.round:
            raise SecAggRefusal(f"unmask request of round {request.round}, this is round {config.round}")
        shared = set(self._received) | {self.node_id}  # U2 as this site saw it
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors) or not survivors <= shared or self.node_id not in survivors:
            raise SecAggRefusal(f"unmask request: survivors {request.survivors} are not sites that shared keys with us")
        if len(survivors) < config.threshold:
            raise SecAggRefusal(f"unmask request: {len(survivors)} survivors < threshold {config.threshold}")
        if set(request.groups) & set(request.withheld):
            raise SecAggRefusal("unmask request: a group both to unmask and withheld")
        floor = max(config.min_holders, self.site_min_holders)
        for group in request.groups:
            holding = [n for n in survivors if group in config.groups[n]]
            if len(holding) < floor:
                # One or two holders' sum is their own update(s): refuse to open it whatever the server says.
                raise SecAggRefusal(
                    f"unmask request: group {group!r} has {len(holding)} surviving holder(s) < min_holders {floor} "
                    f"(the round's {config.min_holders}, this site's floor {self.site_min_holders}): refused"
                )
        self._answered = True
        self.withheld = dict(request.withheld)
        plains = {**self._received, self.node_id: self._own}
        seed_shares = {
            node: {g: plains[node].seed_shares[g] for g in request.groups if g in config.groups[node]}
            for node in sorted(survivors)
        }
        key_shares = {node: plains[node].key_share for node in sorted(shared - survivors)}
        return UnmaskShares(
            node_id=self.node_id,
            round=config.round,
            seed_shares={n: s for n, s in seed_shares.items() if s},
            key_shares=key_shares,
        )
