"""The attack replay (issue 32): every message the server received in a secure round, plus the
server's own state, handed to an independent attacker. Its best estimate of each site's update is
no closer to the truth than a random guess, while the aggregate it is entitled to is right; the
same estimator recovers a site's update once given the secrets the protocol never releases, so
the test has the power to see a leak.

The attacker is secure_aggregation/replay.py's (the one a privacy officer runs on a recorded
round): it removes every mask it can rebuild from what the server received and reads the rest.

The test, at fixed seeds: per (site, group), Fisher's z of the estimate's correlation with the
site's true (clipped) update; under "no better than random" z sqrt(P - 3) ~ N(0, 1) (P values),
so each |z| sqrt(P - 3) < 4.5 and their squares sum below chi2's 0.999 quantile.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.secure_aggregation_fixtures import MIXES, SIX, clipped, group_of, make_config, play

from secure_aggregation.config import SecAggConfig
from secure_aggregation.keys import private_bytes
from secure_aggregation.layout import group_vector
from secure_aggregation.replay import attack, fisher_z, looks_random
from secure_aggregation.simulate import SimulatedRound
from secure_aggregation.transcript import SecureTranscript

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
    view = SecureTranscript.of(server, transcript)
    estimates = attack(view)
    assert set(estimates) == {(n, g) for n in config.sample if n not in before for g in mixes[n]}
    zs = {key: fisher_z(estimate.values, truths[key]) for key, estimate in estimates.items()}
    assert looks_random(zs), zs

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
    recovered = attack(view, leaked_seeds, {node: private_bytes(site._mask)})
    for group in mixes[node]:
        assert recovered[(node, group)].self_mask_removed
        assert fisher_z(recovered[(node, group)].values, truths[(node, group)]) > 20
    assert not looks_random({key: fisher_z(recovered[key].values, truths[key]) for key in recovered})


def test_with_one_holder_the_groups_segment_stays_masked() -> None:
    # Genomics at site 3 alone: its sum would be site 3's update; the server never gets its seed.
    config = make_config(MIXES, threshold=3)
    (result, server, transcript, _), truths, _ = _run(config, [], [], seed=12)
    assert "genomics" in result.withheld and "genomics" not in result.means
    estimate = attack(SecureTranscript.of(server, transcript))[(3, "genomics")]
    assert not estimate.self_mask_removed
    assert abs(fisher_z(estimate.values, truths[(3, "genomics")])) < 4.5
