"""The attack replay (issue 32): every message the server received in a secure round, plus the
server's own state, handed to an independent attacker. Its best estimate of each site's update is
no closer to the truth than a random guess, while the aggregate it is entitled to is right; the
same estimator recovers a site's update once given the secrets the protocol never releases, so
the test has the power to see a leak.

The attacker: split each masked vector into its groups' segments; remove every mask it can rebuild
from the shares it received (self-masks of seeds with >= t shares; pairwise masks of mask keys with
>= t shares, against every public key in the directory); read what is left as quantised values
(q Delta - c). The ciphertexts it relays it cannot open (Fernet under keys it never sees).

The test, at fixed seeds: per (site, group), Fisher's z of the estimate's correlation with the
site's true (clipped) update; under "no better than random" z sqrt(P - 3) ~ N(0, 1) (P values),
so each |z| sqrt(P - 3) < 4.5 and their squares sum below chi2's 0.999 quantile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from scipy import stats

from secure_aggregation.config import SecAggConfig
from secure_aggregation.keys import agree, private_bytes, private_from_bytes
from secure_aggregation.layout import group_vector
from secure_aggregation.masks import field_dtype, mask_label, mask_stream
from secure_aggregation.server import ServerRound
from secure_aggregation.simulate import SimulatedRound, Transcript
from tests.secure_aggregation_fixtures import MIXES, SIX, clipped, group_of, make_config, play


def attack(
    transcript: Transcript,
    server: ServerRound,
    leaked_seeds: Mapping[tuple[int, str], bytes] | None = None,
    leaked_keys: Mapping[int, bytes] | None = None,
) -> dict[tuple[int, str], np.ndarray]:
    """The attacker's best estimate of each (site, group) update from the server's view alone
    (`leaked_*`: secrets the protocol never releases, for the positive control only)."""
    config = server.config
    assert server.directory is not None
    dtype = field_dtype(config.field_bits)
    seeds: dict[tuple[int, str], list[bytes]] = {}
    keys: dict[int, list[bytes]] = {}
    for reply in transcript.unmask:
        for node, by_group in reply.seed_shares.items():
            for group, share in by_group.items():
                seeds.setdefault((node, group), []).append(share)
        for node, share in reply.key_shares.items():
            keys.setdefault(node, []).append(share)
    known_seeds = {k: combine_shares(v[: config.threshold]) for k, v in seeds.items() if len(v) >= config.threshold}
    known_keys = {n: combine_shares(v[: config.threshold]) for n, v in keys.items() if len(v) >= config.threshold}
    known_seeds.update(leaked_seeds or {})
    known_keys.update(leaked_keys or {})
    estimates = {}
    for masked in transcript.masked:
        node = masked.node_id
        vector = np.frombuffer(masked.vector, dtype=dtype)
        start = 0
        for group in masked.groups:
            segment = vector[start : start + config.segment_length(group)].astype(dtype)
            start += config.segment_length(group)
            if (node, group) in known_seeds:
                segment = segment - mask_stream(
                    known_seeds[(node, group)], mask_label(config.round, "self", group), segment.size, config.field_bits
                )
            for other, other_keys in server.directory.keys.items():
                if other == node or group not in config.groups[other]:
                    continue
                # The pair's secret from either end's private key and the other's public key.
                if node in known_keys:
                    secret = agree(private_from_bytes(known_keys[node]), other_keys.mask_key)
                elif other in known_keys:
                    secret = agree(private_from_bytes(known_keys[other]), server.directory.keys[node].mask_key)
                else:
                    continue
                stream = mask_stream(secret, mask_label(config.round, "pair", group), segment.size, config.field_bits)
                segment = segment - stream if node < other else segment + stream
            values = segment[: config.group_sizes[group]].astype(np.float64)
            estimates[(node, group)] = values * config.step(group) - config.value_range[group]
    return estimates


def _z(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Fisher's z of the correlation, scaled to N(0, 1) under independence."""
    r = float(np.corrcoef(estimate, truth)[0, 1])
    return math.atanh(max(min(r, 0.999999), -0.999999)) * math.sqrt(truth.size - 3)


_Truths = dict[tuple[int, str], np.ndarray]


def _run(
    config: SecAggConfig, before: list[int], after: list[int], seed: int
) -> tuple[SimulatedRound, _Truths, dict[int, dict[str, int]]]:
    played, updates, counts = play(config, seed, before, after)
    truths = {
        (n, g): group_vector(clipped(updates[n], config), g, group_of) for n in config.sample for g in config.groups[n]
    }
    return played, truths, counts


@pytest.mark.parametrize(
    ("mixes", "threshold", "before", "after"),
    [(MIXES, 3, [], []), (SIX, 4, [2], [4])],
    ids=["four-sites", "six-sites-with-dropouts-before-and-after-masking"],
)
def test_the_servers_view_does_not_reveal_any_sites_update(
    mixes: dict[int, list[str]], threshold: int, before: list[int], after: list[int]
) -> None:
    config = make_config(mixes, threshold=threshold)
    (result, server, transcript, sites), truths, counts = _run(config, before, after, seed=11)
    estimates = attack(transcript, server)
    assert set(estimates) == {(n, g) for n in config.sample if n not in before for g in mixes[n]}
    zs = {key: _z(estimate, truths[key]) for key, estimate in estimates.items()}
    assert all(abs(z) < 4.5 for z in zs.values()), zs
    assert sum(z * z for z in zs.values()) < stats.chi2.ppf(0.999, df=len(zs)), zs

    # The aggregate the server is entitled to is right (its estimator, applied to the sum, works).
    for group, holders in result.unmasked.items():
        total = sum(counts[n][group] for n in holders)
        plain = sum(counts[n][group] * truths[(n, group)] for n in holders) / total
        assert float(np.corrcoef(result.means[group], plain)[0, 1]) > 0.999
        assert float(np.abs(result.means[group] - plain).max()) <= result.error_bounds[group]

    # Positive control: given a site's self-mask seeds and mask key (never released together), the
    # same estimator recovers that site's update; the test above would have seen a leak.
    node = next(n for n in config.sample if n not in before)
    site = sites[node]
    leaked_seeds = {(node, g): seed for g, seed in site._seeds.items()}
    recovered = attack(transcript, server, leaked_seeds, {node: private_bytes(site._mask)})
    for group in mixes[node]:
        assert _z(recovered[(node, group)], truths[(node, group)]) > 20


def test_with_one_holder_the_groups_segment_stays_masked() -> None:
    # Genomics at site 3 alone: its sum would be site 3's update; the server never gets its seed.
    config = make_config(MIXES, threshold=3)
    (result, server, transcript, _), truths, _ = _run(config, [], [], seed=12)
    assert "genomics" in result.withheld and "genomics" not in result.means
    estimate = attack(transcript, server)[(3, "genomics")]
    assert abs(_z(estimate, truths[(3, "genomics")])) < 4.5
