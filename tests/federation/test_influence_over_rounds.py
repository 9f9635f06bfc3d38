"""Influence over rounds (issue 40, break 5): an attack replay through the real strategy
(server/round.py aggregate_replies, real Flower messages) over 20 rounds.

The attack: a site that every round sends an update at 90% of the tightest bound it must pass
(step, history and outlier bounds, computed as the server does with the honest sites' norms of the
round), always in one direction, count 160. Before: 0 of 20 replies rejected; its cumulative push
along its direction was 9.3x the median coherent honest site's in `shared` and `ehr` (4 holders).
Now its update is clipped to 1.5x the median of the other holders' norms (server/clipping.py):
1.6x.

Honest sites move coherently: each round along a fixed direction per site and group (the
federation's common direction plus the site's own), with some noise, at norms of 0.85-1.15 of the
measured honest step (tests/federation/test_influence.py HONEST_STEP). Each site's push in a round is
measured from the outside: an honest site is never clipped (asserted), so its term of the average
is (n_h / N) D_h; the attacker's is what is left of the global's change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers.influence_rounds import (
    ATTACKER,
    HONEST_COUNTS,
    HONEST_STEP,
    NODE_GROUPS,
    aggregate,
    initial_arrays,
    reply,
    round_config,
)

from server.audit import site_round_records
from server.clipping import DEFAULT_NORM_CLIP_FACTOR, few_holders
from server.config import RESUMABLE_CHANGES, FederationConfig
from server.influence import NormBounds, norm_limits
from server.round import RoundOutcome
from server.server_app import make_strategy
from server.strategy import ModalityAwareFedAvg

ROUNDS = 20
ATTACK_COUNT = 160
NORM_SCALE = {1: 1.15, 2: 1.0, 3: 0.85}  # the honest sites' norms, of HONEST_STEP x sqrt(values)
GROUPS = ["shared", "ehr", "wearables", "genomics"]


def group_of(key: str) -> str:
    return key.split(".")[0]


def strategy(**kw) -> ModalityAwareFedAvg:
    return ModalityAwareFedAvg(group_of=group_of, **kw)


def keys_of(arrays: dict[str, np.ndarray], group: str) -> list[str]:
    return sorted(k for k in arrays if group_of(k) == group)


def flat(arrays: dict[str, np.ndarray], group: str) -> np.ndarray:
    return np.concatenate([arrays[k].astype(np.float64).ravel() for k in keys_of(arrays, group)])


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def directions(seed: int) -> dict[tuple[int, str], np.ndarray]:
    """Each site's fixed direction per group: honest sites the common direction plus their own,
    the attacker one of its own."""
    rng = np.random.default_rng(seed)
    sizes = {g: flat(initial_arrays(), g).size for g in GROUPS}
    common = {g: unit(rng.standard_normal(n)) for g, n in sizes.items()}
    out = {}
    for node, groups in NODE_GROUPS.items():
        for g in groups:
            own = unit(rng.standard_normal(sizes[g]))
            out[node, g] = own if node == ATTACKER else unit(0.8 * common[g] + 0.6 * own)
    return out


def moved(previous: dict[str, np.ndarray], group: str, delta: np.ndarray) -> dict[str, np.ndarray]:
    """The group's arrays moved by the flat `delta` (float32, as a site sends them)."""
    out, at = {}, 0
    for k in keys_of(previous, group):
        size = previous[k].size
        out[k] = (previous[k] + delta[at : at + size].reshape(previous[k].shape)).astype(np.float32)
        at += size
    return out


def honest_update(previous: dict[str, np.ndarray], node: int, group: str, rnd: int, drift: np.ndarray) -> np.ndarray:
    """A coherent honest update: the site's direction with some noise, at its norm (+-5%)."""
    rng = np.random.default_rng(1000 * rnd + 10 * node + GROUPS.index(group))
    size = drift.size
    direction = unit(drift + 0.3 * unit(rng.standard_normal(size)))
    norm = NORM_SCALE[node] * HONEST_STEP * math.sqrt(size) * (1 + 0.05 * rng.standard_normal())
    return norm * direction


def tightest_bound(
    s: ModalityAwareFedAvg, previous: dict[str, np.ndarray], group: str, rnd: int, honest_norms: list[float]
) -> float:
    """The smallest bound the attacker's update must pass (server/influence.py), as the server
    computes it this round: step, history, and the outlier rule over the other holders' norms."""
    values = [previous[k] for k in keys_of(previous, group)]
    settings = NormBounds(s.norm_step_factor, s.norm_history_factor, s.norm_outlier_factor, s.max_update_norm)
    limits = list(norm_limits(values, round_config(rnd), settings, s.norm_history.reference(group, rnd)).values())
    if len(honest_norms) >= 2:
        limits.append(s.norm_outlier_factor * float(np.median(honest_norms)))
    return min(limits)


def replay(
    s: ModalityAwareFedAvg, attack: str, seed: int = 0
) -> tuple[dict[tuple[int, str], float], list[RoundOutcome]]:
    """20 rounds of the three honest sites and the attacker through `s`. Returns each site's
    cumulative push per group (the norm of the sum of its terms of the average) and the rounds'
    outcomes. `attack`: "tightest" (90% of the tightest bound) or "clip" (99% of the clip, never
    clipped: an attacker who knows the rule)."""
    drift = directions(seed)
    arrays = initial_arrays()
    pushes = {key: np.zeros(d.size) for key, d in drift.items()}
    outcomes = []
    for rnd in range(1, ROUNDS + 1):
        updates = {
            (node, g): honest_update(arrays, node, g, rnd, drift[node, g])
            for node in HONEST_COUNTS
            for g in NODE_GROUPS[node]
        }
        for g in NODE_GROUPS[ATTACKER]:
            honest_norms = [float(np.linalg.norm(updates[n, g])) for n in HONEST_COUNTS if g in NODE_GROUPS[n]]
            if attack == "tightest":
                norm = 0.9 * tightest_bound(s, arrays, g, rnd, honest_norms)
            elif len(honest_norms) >= 2:
                norm = 0.99 * DEFAULT_NORM_CLIP_FACTOR * float(np.median(honest_norms))
            else:  # no clip for this group: the tightest bound
                norm = 0.9 * tightest_bound(s, arrays, g, rnd, honest_norms)
            updates[ATTACKER, g] = norm * drift[ATTACKER, g]
        counts = {**HONEST_COUNTS, ATTACKER: ATTACK_COUNT}
        replies = [
            reply(
                node,
                {k: v for g in groups for k, v in moved(arrays, g, updates[node, g]).items()},
                dict.fromkeys(groups, counts[node]),
            )
            for node, groups in NODE_GROUPS.items()
        ]
        outcome = aggregate(s, rnd, replies, arrays)
        assert outcome.rejected == [], f"round {rnd}: {outcome.rejected}"
        assert set(outcome.clipped) <= {ATTACKER}, f"round {rnd}: an honest site clipped: {outcome.clipped}"
        assert outcome.arrays is not None
        for g in GROUPS:
            holders = [n for n, groups in NODE_GROUPS.items() if g in groups]
            total = sum(counts[n] for n in holders)
            # As the honest sites sent them (float32), their terms of the average.
            sent = {n: flat(moved(arrays, g, updates[n, g]), g) - flat(arrays, g) for n in holders}
            honest = {n: counts[n] / total * sent[n] for n in holders if n != ATTACKER}
            for n, term in honest.items():
                pushes[n, g] += term
            pushes[ATTACKER, g] += (
                flat(outcome.arrays, g) - flat(arrays, g) - sum(honest.values(), np.zeros(sent[ATTACKER].size))
            )
        outcomes.append(outcome)
        arrays = outcome.arrays
    return {key: float(np.linalg.norm(p)) for key, p in pushes.items()}, outcomes


def ratios(pushes: dict[tuple[int, str], float], group: str) -> list[float]:
    """The attacker's cumulative push over each honest holder's, in node order."""
    return [pushes[ATTACKER, group] / pushes[n, group] for n in HONEST_COUNTS if group in NODE_GROUPS[n]]


@pytest.mark.parametrize("attack", ["tightest", "clip"])
def test_a_site_pushing_one_way_every_round_moves_a_group_of_3_holders_at_most_2x_an_honest_site(
    attack: str,
) -> None:
    """Before: 0 of 20 replies rejected, and the attacker's cumulative push in `shared` and `ehr`
    was 8.2-12.8x each honest site's (9.3x the median one's). Now 1.6x the median honest site's,
    whatever norm it sends; against each honest site about c x (the attacker's count / its count)
    x (the median norm / its norm) over its coherence: 1.4-2.1x (2.1x against the smallest, 0.85
    of the median norm and 144 samples to the attacker's 160)."""
    pushes, outcomes = replay(strategy(), attack)
    for g in ("shared", "ehr"):
        assert float(np.median(ratios(pushes, g))) <= 2.0, (g, ratios(pushes, g))
        assert max(ratios(pushes, g)) <= 2.2, (g, ratios(pushes, g))
        assert min(ratios(pushes, g)) >= 0.5  # it still trains: clipped, not dropped
    if attack == "tightest":  # clipped every round, and said so
        assert all(set(o.clipped.get(ATTACKER, {})) == {"shared", "ehr"} for o in outcomes)


def test_without_the_clip_the_same_attack_adds_up_to_9x() -> None:
    """The replay measures what it claims: with norm-clip-factor off (today's rule) the push is
    what issue 40 found."""
    pushes, outcomes = replay(strategy(norm_clip_factor=None), "tightest")
    for g in ("shared", "ehr"):
        assert min(ratios(pushes, g)) > 7.0, (g, ratios(pushes, g))
    assert all(o.clipped == {} for o in outcomes)


def test_groups_of_one_or_two_holders_are_named_every_round() -> None:
    """No rule bounds a group against its own 1-2 holders (genomics: node 1 and the attacker,
    wearables: the attacker alone); every round says so."""
    pushes, outcomes = replay(strategy(), "tightest")
    for o in outcomes:
        assert few_holders(o.contributors) == {"genomics": [1, ATTACKER], "wearables": [ATTACKER]}
    assert pushes[ATTACKER, "genomics"] > 2 * pushes[1, "genomics"]  # why they are named


def test_honest_coherent_rounds_are_fedavg_bit_for_bit_with_the_clip_on() -> None:
    """The rule changes no honest round of the replay: the same 20 rounds (the attacker sending an
    honest-sized update) with and without the clip give the same arrays, to the last bit."""
    runs = []
    for factor in (DEFAULT_NORM_CLIP_FACTOR, None):
        s, arrays = strategy(norm_clip_factor=factor), initial_arrays()
        drift = directions(1)
        for rnd in range(1, 21):
            replies = []
            for node, groups in NODE_GROUPS.items():
                scale_node = node if node in NORM_SCALE else 2
                sent = {
                    k: v
                    for g in groups
                    for k, v in moved(arrays, g, honest_update(arrays, scale_node, g, rnd, drift[node, g])).items()
                }
                replies.append(reply(node, sent, dict.fromkeys(groups, ATTACK_COUNT)))
            outcome = aggregate(s, rnd, replies, arrays)
            assert outcome.rejected == [] and outcome.clipped == {} and outcome.arrays is not None
            arrays = outcome.arrays
        runs.append(arrays)
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)


def test_the_clip_is_a_run_config_key_a_resume_may_change_and_0_turns_it_off() -> None:
    base = {"out-dir": "/tmp/x", "model": "tiny"}
    assert FederationConfig.from_run_config(base).norm_clip_factor == DEFAULT_NORM_CLIP_FACTOR == 1.5
    assert FederationConfig.from_run_config({**base, "norm-clip-factor": 0}).norm_clip_factor is None
    assert FederationConfig.from_run_config({**base, "norm-clip-factor": 2}).norm_clip_factor == 2
    with pytest.raises(ValueError, match="norm_clip_factor"):
        FederationConfig.from_run_config({**base, "norm-clip-factor": 0.5})  # would clip the median site
    assert "norm_clip_factor" in RESUMABLE_CHANGES
    assert make_strategy(FederationConfig.from_run_config(base), None).norm_clip_factor == 1.5


def test_a_clipped_update_is_in_the_sites_audit_record() -> None:
    """rounds.jsonl `sites.<site>.clipped` (the round's SiteOutcome) reaches the audit log."""
    pushes, outcomes = replay(strategy(), "tightest")
    clip = outcomes[0].clipped[ATTACKER]
    event = {
        "round": 1,
        "sites": {"attacker": {"node_id": ATTACKER, "status": "ok", "clipped": clip}, "honest": {"status": "ok"}},
        "contributors": {"shared": ["attacker", "honest"]},
    }
    by_site = {r["site"]: r for r in site_round_records(event)}
    assert by_site["attacker"]["clipped"]["shared"]["clipped_to"] < by_site["attacker"]["clipped"]["shared"]["norm"]
    assert "clipped" not in by_site["honest"]
