"""SecAgg+ under modality-aware weights (secure_aggregation/): the unmasked averages equal
ModalityAwareFedAvg's within the stated quantisation bound, dropouts before and after masking are
recovered, too few survivors fail loudly, a group with too few holders is never unmasked, and a
site refuses what it must not mask or reveal."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from helpers.secure_aggregation_fixtures import (
    MIXES,
    SIX,
    clipped,
    global_arrays,
    group_of,
    make_config,
    plain_average,
    play,
    seeded_bytes,
    site_updates,
)

from secure_aggregation.config import SecAggConfig
from secure_aggregation.errors import SecAggError, SecAggRefusal
from secure_aggregation.messages import ShareInbox, UnmaskRequest
from secure_aggregation.server import SecureAggregate, ServerRound
from secure_aggregation.simulate import run_secure_round
from secure_aggregation.site import SiteRound, key_rounds
from server.secure_round import secure_arrays
from server.strategy import ModalityAwareFedAvg


def _assert_matches_plain(
    result: SecureAggregate,
    reference: dict[str, np.ndarray],
    updates: dict[int, dict[str, np.ndarray]],
    counts: dict[int, dict[str, int]],
    config: SecAggConfig,
    nodes: list[int],
) -> None:
    """Every key equals ModalityAwareFedAvg's average within the group's bound (plus float32
    rounding of both results: a few ulps of the value); withheld groups keep their values. The
    secure arrays are the server's own (server/secure_round.py secure_arrays: the averages checked,
    then applied as a plain round's are, ModalityAwareFedAvg.apply_update)."""
    plain = plain_average(reference, {n: clipped(updates[n], config) for n in nodes}, counts, nodes, config.min_holders)
    secure = secure_arrays(result, reference, config, ModalityAwareFedAvg(group_of=group_of))
    for key, value in plain.items():
        group = group_of(key)
        ulps = 4 * float(np.spacing(np.float32(np.abs(value).max())))
        if group in result.withheld:
            np.testing.assert_array_equal(secure[key], reference[key])
            np.testing.assert_array_equal(value, reference[key])  # plain keeps it too (too few sites)
            continue
        error = float(np.abs(secure[key].astype(np.float64) - value.astype(np.float64)).max())
        assert error <= result.error_bounds[group] + ulps, (key, error, result.error_bounds[group])


def test_the_secure_average_is_modality_aware_fedavg_within_the_quantisation_bound() -> None:
    """Per value, |secure - plain| < Delta_g n_g W / W_g (secure_aggregation/field.py derives it):
    Delta_g = 2 c_g / L_g the quantisation step, L_g = floor((2^16 - 1) / (2 x holders)), n_g the
    holders averaged, W the round's largest count, W_g their total count. Each site's stochastic
    rounding of (w/W) x is off by less than Delta_g; the server multiplies the sum by W / W_g."""
    np.random.seed(0)  # Flower's quantiser rounds with numpy's global generator
    config = make_config(MIXES, threshold=3)
    reference = global_arrays()
    updates, counts = site_updates(MIXES)
    result, *_ = run_secure_round(config, updates, counts, group_of=group_of, randbytes=seeded_bytes(0))
    assert result.unmasked == {"shared": [1, 2, 3, 4], "ehr": [1, 2, 3, 4]}
    assert set(result.withheld) == {"wearables", "genomics"}
    assert result.withheld["genomics"].startswith("1 surviving holder(s) < min_holders 3")
    assert result.withheld["wearables"].startswith("2 surviving holder(s) < min_holders 3")
    for group in ("shared", "ehr"):
        assert result.weights[group] == sum(counts[n][group] for n in MIXES)
        # Delta = 2 c / L with L = (2^16 - 1) // (2 x 4 holders), scaled by n W / sum w.
        delta = 2 * config.value_range[group] / ((2**16 - 1) // 8)
        assert result.error_bounds[group] == pytest.approx(delta * 4 * config.weight_max / result.weights[group])
    _assert_matches_plain(result, reference, updates, counts, config, [1, 2, 3, 4])


def test_a_site_clips_before_masking_and_the_average_is_that_of_the_clipped_updates() -> None:
    np.random.seed(1)
    config = make_config(MIXES, threshold=3)
    reference = global_arrays()
    updates, counts = site_updates(MIXES, scale=0.2)  # norms ~ 10 > clip 5, values beyond c = 0.05
    result, *_ = run_secure_round(config, updates, counts, group_of=group_of, randbytes=seeded_bytes(1))
    _assert_matches_plain(result, reference, updates, counts, config, [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("before", "after"),
    [([3], []), ([], [4]), ([3], [4])],
    ids=["dropped-before-masking", "dropped-after-masking", "both"],
)
def test_dropouts_before_and_after_masking_are_recovered(before: list[int], after: list[int]) -> None:
    config = make_config(SIX, threshold=4)
    reference = global_arrays()
    (result, *_), updates, counts = play(config, 2, before, after)
    survivors = [n for n in SIX if n not in before]  # a site gone after masking is in the sum
    assert result.dropped_before_masking == before and result.dropped_after_masking == after
    assert result.unmasked["shared"] == survivors
    # wearables: 4 holders (1, 3, 4, 6), 3 of them when site 3 is gone: unmasked either way.
    assert result.unmasked["wearables"] == [n for n in survivors if "wearables" in SIX[n]]
    assert set(result.withheld) == {"genomics"}
    _assert_matches_plain(result, reference, updates, counts, config, survivors)


def test_too_few_sites_masking_fails_the_round_loudly() -> None:
    config = make_config(SIX, threshold=4)
    updates, counts = site_updates(SIX)
    with pytest.raises(SecAggError, match="3 site\\(s\\) sent a masked vector < threshold 4"):
        run_secure_round(config, updates, counts, drop_before_masking=[1, 2, 3], group_of=group_of)


def test_too_few_sites_unmasking_fails_the_round_loudly() -> None:
    config = make_config(SIX, threshold=4)
    updates, counts = site_updates(SIX)
    with pytest.raises(SecAggError, match="3 site\\(s\\) sent unmask shares < threshold 4"):
        run_secure_round(config, updates, counts, drop_before_masking=[1], drop_after_masking=[2, 3], group_of=group_of)


def test_a_single_holders_group_is_never_unmasked_and_sites_refuse_to_open_it() -> None:
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    result, server, transcript, sites_of_round = run_secure_round(config, updates, counts, group_of=group_of)
    assert "genomics" not in result.means and "genomics" in result.withheld
    assert server.request is not None and "genomics" not in server.request.groups
    # No site sent a share of site 3's genomics seed: the server holds fewer than t of them (it
    # holds none), so the segment stays masked by a seed it cannot rebuild.
    assert not any("genomics" in shares for reply in transcript.unmask for shares in reply.seed_shares.values())
    # The sites are told which groups were withheld and why.
    assert all(site.withheld == result.withheld for site in sites_of_round.values())

    # A server that asks anyway is refused by every site, whatever it claims.
    sites, honest, inboxes = _keys_shared(config)
    honest.unmask_request([sites[n].mask(inboxes[n], updates[n], counts[n], group_of) for n in sites])
    forged = UnmaskRequest(round=config.round, survivors=[1, 2, 3, 4], groups=["shared", "genomics"])
    for site in sites.values():
        with pytest.raises(SecAggRefusal, match="group 'genomics' has 1 surviving holder"):
            site.unmask(forged)


def test_min_holders_is_counted_over_survivors() -> None:
    # wearables at 1, 2 and 3: unmasked with all three, withheld when 3 is gone before masking.
    mixes = {1: ["shared", "wearables"], 2: ["shared", "wearables"], 3: ["shared", "wearables"], 4: ["shared"]}
    config = make_config(mixes, threshold=3)
    updates, counts = site_updates(mixes)
    full, *_ = run_secure_round(config, updates, counts, group_of=group_of)
    assert full.unmasked["wearables"] == [1, 2, 3]
    partial, *_ = run_secure_round(config, updates, counts, drop_before_masking=[3], group_of=group_of)
    assert "wearables" in partial.withheld and partial.unmasked["shared"] == [1, 2, 4]


def _keys_shared(config: SecAggConfig) -> tuple[dict[int, SiteRound], ServerRound, dict[int, ShareInbox]]:
    """Every site through stages 1 and 2 (keys, shares): ready to mask."""
    sites = {n: SiteRound(config, n) for n in config.sample}
    server = ServerRound(config)
    directory = server.key_directory([s.advertise() for s in sites.values()])
    return sites, server, server.route_shares([s.share_keys(directory) for s in sites.values()])


def _masking_site(config: SecAggConfig) -> tuple[SiteRound, ShareInbox]:
    sites, _, inboxes = _keys_shared(config)
    return sites[1], inboxes[1]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda u, c: u["backbone.norm.b"].__setitem__(3, np.nan), "non-finite"),
        (lambda u, c: c.__setitem__("shared", 10_000), "count 10000 is not an integer in \\[1, 320\\]"),
        (lambda u, c: c.__setitem__("shared", 0), "count 0"),
        (lambda u, c: u.pop("ehr_encoder.embed.w"), "update holds groups"),
        (lambda u, c: u.__setitem__("mystery.w", u["backbone.norm.b"]), "update: .*mystery"),
    ],
    ids=["nan", "count-too-large", "count-zero", "missing-group", "unknown-key"],
)
def test_a_site_refuses_to_mask_what_the_server_could_not_check(
    spoil: Callable[[dict[str, np.ndarray], dict[str, int]], object], message: str
) -> None:
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    site, inbox = _masking_site(config)
    update, count = dict(updates[1]), dict(counts[1])
    update = {k: v.copy() for k, v in update.items()}
    spoil(update, count)
    with pytest.raises(SecAggRefusal, match=message):
        site.mask(inbox, update, count, group_of)
    # Refused, it sent nothing: it cannot take part in unmasking as if it had.
    with pytest.raises(SecAggRefusal, match="unmask: expected once, after mask"):
        site.unmask(UnmaskRequest(round=config.round, survivors=[1, 2, 3, 4], groups=["shared"]))


def test_the_config_refuses_a_threshold_of_half_the_sample_or_less() -> None:
    with pytest.raises(ValueError, match="threshold 2: expected in \\(2, 4\\]"):
        make_config(MIXES, threshold=2)


def test_a_masked_vector_is_two_bytes_a_value() -> None:
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    _, _, transcript, _ = run_secure_round(config, updates, counts, group_of=group_of)
    for masked in transcript.masked:
        values = sum(config.group_sizes[g] for g in masked.groups)
        assert len(masked.vector) == 2 * (values + config.weight_digits * len(masked.groups))


def test_garbage_in_the_sum_fails_the_round_instead_of_averaging_it() -> None:
    # A site (or a relay) that sends integers outside the round's range: half the field is
    # headroom, so the unmasked sum leaves its bound and the round fails, naming the group.
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    sites, server, inboxes = _keys_shared(config)
    masked = [sites[n].mask(inboxes[n], updates[n], counts[n], group_of) for n in sites]
    noise = np.random.default_rng(5).integers(0, 2**16, len(masked[0].vector) // 2, dtype=np.uint16)
    tampered = (np.frombuffer(masked[0].vector, dtype=np.uint16) + noise).tobytes()
    masked[0] = masked[0].model_copy(update={"vector": tampered})
    request = server.unmask_request(masked)
    with pytest.raises(SecAggError, match="group 'shared': unmasked sum outside its bound"):
        server.aggregate([s.unmask(request) for s in sites.values()])


def test_a_wrong_share_is_caught_by_the_seed_commitment() -> None:
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    sites, server, inboxes = _keys_shared(config)
    request = server.unmask_request([sites[n].mask(inboxes[n], updates[n], counts[n], group_of) for n in sites])
    replies = [s.unmask(request) for s in sites.values()]
    share = bytearray(replies[0].seed_shares[2]["shared"])
    share[-1] ^= 1
    bad = {**replies[0].seed_shares, 2: {**replies[0].seed_shares[2], "shared": bytes(share)}}
    replies[0] = replies[0].model_copy(update={"seed_shares": bad})
    with pytest.raises(SecAggError, match="node 2's seed of 'shared'"):
        server.aggregate(replies)


def test_the_server_leaves_out_messages_of_other_rounds_duplicates_and_strangers() -> None:
    config = make_config(MIXES, threshold=3)
    sites = {n: SiteRound(config, n) for n in config.sample}
    keys = [s.advertise() for s in sites.values()]
    server = ServerRound(config)
    stranger = keys[0].model_copy(update={"node_id": 99})
    stale = keys[1].model_copy(update={"round": config.round - 1})
    directory = server.key_directory([*keys, keys[2], stranger, stale])
    assert sorted(directory.keys) == [1, 2, 3, 4]  # each site's first, valid message
    assert server.rejected == {
        2: "keys: round 6, expected 7",
        3: "keys: a second message",
        99: "keys: not expected at this stage",
    }


def test_a_site_saved_and_restored_between_every_stage_takes_part_as_if_it_had_stayed() -> None:
    # A cold ClientApp keeps its round in Context.state between messages (SiteRound.to_state).
    np.random.seed(3)
    config = make_config(MIXES, threshold=3)
    reference = global_arrays()
    updates, counts = site_updates(MIXES)
    sites = {n: SiteRound(config, n) for n in config.sample}

    def reload() -> None:
        for node in sites:
            sites[node] = SiteRound.from_state(sites[node].to_state())

    server = ServerRound(config)
    reload()
    directory = server.key_directory([s.advertise() for s in sites.values()])
    reload()
    inboxes = server.route_shares([s.share_keys(directory) for s in sites.values()])
    reload()
    request = server.unmask_request([sites[n].mask(inboxes[n], updates[n], counts[n], group_of) for n in sites])
    reload()
    result = server.aggregate([s.unmask(request) for s in sites.values()])
    reload()
    assert all(s.withheld == result.withheld for s in sites.values())
    _assert_matches_plain(result, reference, updates, counts, config, [1, 2, 3, 4])
    with pytest.raises(SecAggRefusal, match="unmask: expected once"):
        sites[1].unmask(request)  # a restored site still answers once


def test_a_site_shares_its_keys_once_a_round() -> None:
    # A repeated key directory (the same or another) would have the site share its seeds again.
    config = make_config(MIXES, threshold=3)
    sites = {n: SiteRound(config, n) for n in config.sample}
    directory = ServerRound(config).key_directory([s.advertise() for s in sites.values()])
    sites[1].share_keys(directory)
    with pytest.raises(SecAggRefusal, match="share_keys: expected once a round"):
        sites[1].share_keys(directory)
    restored = SiteRound.from_state(sites[1].to_state())  # as the ClientApp keeps it between messages
    with pytest.raises(SecAggRefusal, match="share_keys: expected once a round"):
        restored.share_keys(directory)


def _key_rounds_played(configs: list[SecAggConfig]) -> tuple[dict[int, list[SiteRound]], list[ServerRound], list]:
    """Every site's and the server's keys and shares of `configs`' rounds, exchanged at once (as a
    keys and a shares message of several key rounds do)."""
    sites = {n: key_rounds(configs, n, seeded_bytes(n), configs[0].min_holders) for n in configs[0].sample}
    servers = [ServerRound(c) for c in configs]
    directories = [s.key_directory([sites[n][i].advertise() for n in sites]) for i, s in enumerate(servers)]
    inboxes = [s.route_shares([sites[n][i].share_keys(directories[i]) for n in sites]) for i, s in enumerate(servers)]
    return sites, servers, inboxes


def test_a_round_whose_keys_were_made_ahead_masks_with_its_own_config_and_equals_fedavg() -> None:
    """Round r + 1's keys and shares made in round r, under a provisional config (round r's clip
    norms); its mask stage brings its own (other clip norms, value ranges and largest count), both
    sides take it, and the average is ModalityAwareFedAvg's within its bound. Each key round has
    its own keys."""
    np.random.seed(3)
    first = make_config(MIXES, threshold=3)
    configs = [first, first.model_copy(update={"round": first.round + 1})]
    sites, servers, inboxes = _key_rounds_played(configs)
    assert len({sites[1][i].advertise().enc_key for i in range(2)}) == 2
    final = configs[1].model_copy(
        update={
            "clip_norm": {g: 0.5 * v for g, v in first.clip_norm.items()},
            "value_range": {g: 2 * v for g, v in first.value_range.items()},
            "weight_max": 2 * first.weight_max,
        }
    )
    servers[1].finalise(final)
    for node in sites:
        sites[node][1].finalise(final)
    updates, counts = site_updates(MIXES, scale=0.2)
    masked = [sites[n][1].mask(inboxes[1][n], updates[n], counts[n], group_of) for n in MIXES]
    request = servers[1].unmask_request(masked)
    result = servers[1].aggregate([sites[n][1].unmask(request) for n in request.survivors])
    assert result.unmasked == {"shared": [1, 2, 3, 4], "ehr": [1, 2, 3, 4]}
    _assert_matches_plain(result, global_arrays(), updates, counts, final, [1, 2, 3, 4])


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_holders", 1), ("threshold", 4), ("sample", [1, 2, 3]), ("groups", {**MIXES, 4: ["shared"]})],
)
def test_a_mask_stage_config_that_changes_what_the_keys_were_made_for_is_refused(field: str, value: object) -> None:
    """Only the clip norms, value ranges and largest count may change between the keys stage and
    the mask stage: a coordinator lowering min_holders or the threshold, or changing who takes part,
    after the keys were shared, is refused by every site (and by the server's own round state)."""
    first = make_config(MIXES, threshold=3)
    configs = [first, first.model_copy(update={"round": first.round + 1})]
    sites, servers, _ = _key_rounds_played(configs)
    changed = configs[1].model_copy(update={field: value})
    with pytest.raises(SecAggRefusal, match=f"changes {field} from the config this site made its keys for"):
        sites[1][1].finalise(changed)
    with pytest.raises(SecAggError, match=f"differs in {field}"):
        servers[1].finalise(changed)


def test_key_rounds_are_consecutive_rounds_of_one_sample_threshold_and_floor() -> None:
    first = make_config(MIXES, threshold=3)
    ahead = first.model_copy(update={"round": first.round + 1})
    assert [s.config.round for s in key_rounds([first, ahead], 1)] == [first.round, first.round + 1]
    for bad in (
        first.model_copy(update={"round": first.round + 2}),  # a gap
        ahead.model_copy(update={"threshold": 4}),
        ahead.model_copy(update={"min_holders": 4}),
    ):
        with pytest.raises(SecAggRefusal, match="key round 1"):
            key_rounds([first, bad], 1)
    with pytest.raises(SecAggRefusal, match="below this site's floor 4"):
        key_rounds([first, ahead], 1, site_min_holders=4)  # the site's floor holds for every key round
