"""A deployed secure round (issue 32): real SuperLink (TLS, node authentication, nginx), four sites
of tests/federation/test_secure_round.py's modality mixes (all three; EHR + wearables twice; EHR + genomics)
joined through `client.py join` (each a real SuperNode and ClientApp process). Each site's
SiteRound lives in its SuperNode's Context.state across the four stages.

The reference is a plain deployed run (`coordinator launch` without secure aggregation) on the same
SuperNodes with the same seeds: training on CPU with one thread is deterministic, so every site
trains the same update in both runs, and the plain run's ModalityAwareFedAvg (server/strategy.py,
not the secure path) must equal the secure run's global arrays within the quantisation bound the
secure round records per group. shared, ehr (four holders) and wearables (three) are unmasked;
genomics (two holders, min_holders 3) is withheld: carried forward, recorded in rounds.jsonl and
the audit log. Both runs record their transcripts (record-transcript): the attack replay
(secure_aggregation/replay.py) on every message the secure run's ServerApp received estimates no
site's update closer than random, the truth being the plain run's recorded replies. Slow (real
processes, two runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.deploy_fixtures import (
    Process,
    launch_args,
    round_events,
    run_coordinator,
)
from helpers.secure_round_runs import (
    SITE_NAMES,
    assert_within_bounds,
    final_arrays,
    four_site_roots,
)

from healthfm_core.terms.groups import parameter_group
from secure_aggregation.layout import group_vector
from secure_aggregation.replay import attack, fisher_z, looks_random, true_updates
from secure_aggregation.transcript import read_secure_round
from server.audit import AUDIT_FILE, read_audit_log
from server.transcript import read_plain_round


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four sites of helpers/secure_round_runs.py (deploy_fixtures joins them: this overrides its `sites`)."""
    return four_site_roots(tmp_path_factory)


def launch(federation, out: Path, joined: dict[str, Process], *config: str) -> None:  # noqa: ANN001, F811
    result = run_coordinator(
        *launch_args(federation, out, "-c", "min-nodes=4", "-c", "eval-tasks=", *config), timeout=1200
    )
    assert result.returncode == 0, (result.stdout, result.stderr, {n: p.output()[-2000:] for n, p in joined.items()})


@pytest.mark.slow
def test_a_deployed_secure_round_of_four_modality_mixes_equals_the_plain_one_within_its_bound(
    joined: dict[str, Process],
    federation,  # noqa: ANN001, F811 - the fixture
    tmp_path: Path,
) -> None:
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    launch(federation, plain_out, joined, "-c", "record-transcript=true")
    launch(federation, secure_out, joined, "-c", "secure-aggregation=true", "-c", "record-transcript=true")

    _, plain_rounds = round_events(plain_out)
    assert all(e["status"] == "ok" for e in plain_rounds[1]["sites"].values()), plain_rounds[1]["sites"]
    _, rounds = round_events(secure_out)
    event = rounds[1]
    info = event["secure_aggregation"]
    assert "error" not in info, info
    assert info["unmasked"] == {
        "shared": sorted(SITE_NAMES),
        "ehr": sorted(SITE_NAMES),
        "wearables": ["biobank", "clinic", "hospital"],
    }
    assert list(info["withheld"]) == ["genomics"] and "< min_holders 3" in info["withheld"]["genomics"]
    assert "genomics" not in event["contributors"]
    assert all(e["status"] == "ok" for e in event["sites"].values()), event["sites"]
    assert all("num_examples" not in e for e in event["sites"].values())  # counts stay masked
    [record] = [r for r in read_audit_log(secure_out / AUDIT_FILE) if r["record"] == "secure-aggregation"]
    assert record["withheld"] == info["withheld"]

    # Unmasked groups: the plain run's average within each group's recorded bound (and moved well
    # past it); genomics carried forward, where the plain run averaged its two holders.
    assert_within_bounds(secure_out, plain_out, ["shared", "ehr", "wearables"])
    secure, initial = final_arrays(secure_out)
    plain, _ = final_arrays(plain_out)
    genomics = [k for k in initial if parameter_group(k) == "genomics"]
    assert all(np.array_equal(secure[k], initial[k]) for k in genomics)
    assert any(not np.array_equal(plain[k], initial[k]) for k in genomics)

    # The attack replay on what the deployed ServerApp received (record-transcript: every reply the
    # SuperLink relayed, and the server's own config, key directory and unmask request). The truth:
    # each site's reply in the plain run of the same seeds (the plain coordinator's view), less the
    # initial arrays, clipped as the site clipped it before masking.
    header, recorded = read_secure_round(secure_out / "transcript" / "round-1")
    plain_header, plain_replies = read_plain_round(plain_out / "transcript" / "round-1")
    assert recorded.config is not None and recorded.request is not None
    by_site = {plain_header.sites[n]: reply for n, reply in plain_replies.items()}
    trained = {n: by_site[site].arrays for n, site in header.sites.items()}
    truths = true_updates(trained, initial, recorded.config)
    estimates = attack(recorded)
    assert set(estimates) == set(truths) and len(truths) == 13  # 4 + 4 + 3 + 2 (site, group) updates
    zs = {key: fisher_z(estimates[key].values, truths[key]) for key in truths}
    assert looks_random(zs), zs
    # genomics (two holders) was never unmasked: not asked for, no share of a seed of it received.
    assert "genomics" in recorded.request.withheld and "genomics" not in recorded.request.groups
    assert not any("genomics" in by_group for r in recorded.received.unmask for by_group in r.seed_shares.values())
    assert not any(e.self_mask_removed for (_, group), e in estimates.items() if group == "genomics")
    # Control: the truths are the sites' real updates: per unmasked group their count-weighted
    # average is the update the secure round applied, within its bound.
    for group in ("shared", "ehr", "wearables"):
        holders = recorded.config.holders(group)
        counts = {n: by_site[header.sites[n]].group_examples[group] for n in holders}
        average = sum(counts[n] * truths[(n, group)] for n in holders) / sum(counts.values())
        applied = group_vector({k: secure[k].astype(np.float64) - initial[k] for k in initial}, group)
        assert float(np.corrcoef(average, applied)[0, 1]) > 0.999, group
        assert float(np.abs(average - applied).max()) <= info["error_bounds"][group] + 1e-6, group
