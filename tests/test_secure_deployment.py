"""A deployed secure round (issue 32): real SuperLink (TLS, node authentication, nginx), four sites
of tests/test_secure_round.py's modality mixes (all three; EHR + wearables twice; EHR + genomics)
joined through `client.py join` (each a real SuperNode and ClientApp process). Each site's
SiteRound lives in its SuperNode's Context.state across the four stages.

The reference is a plain deployed run (`coordinator launch` without secure aggregation) on the same
SuperNodes with the same seeds: training on CPU with one thread is deterministic, so every site
trains the same update in both runs, and the plain run's ModalityAwareFedAvg (server/strategy.py,
not the secure path) must equal the secure run's global arrays within the quantisation bound the
secure round records per group. shared, ehr (four holders) and wearables (three) are unmasked;
genomics (two holders, min_holders 3) is withheld: carried forward, recorded in rounds.jsonl and
the audit log. Slow (real processes, two runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures are used by name
    TINY_RUN,
    Process,
    federation,
    joined,
    round_events,
    run_coordinator,
    superlink,
)
from test_secure_round import assert_within_bounds, final_arrays, four_site_scenario

from healthfm_core.data.synthetic import generate_federation
from healthfm_core.model.groups import parameter_group
from server.audit import AUDIT_FILE, read_audit_log

SITE_NAMES = ("biobank", "hospital", "genomics", "clinic")  # what deploy_fixtures provisions and joins


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    manifest = generate_federation(
        tmp_path_factory.mktemp("data"), four_site_scenario(), seed=0, n_subjects=30, progress=False
    )
    roots = {s.name: Path(s.root) for s in manifest.sites}
    assert set(roots) == set(SITE_NAMES)
    return roots


def launch(federation, out: Path, joined: dict[str, Process], *config: str) -> None:  # noqa: ANN001, F811
    result = run_coordinator(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "1",
        *TINY_RUN,
        "-c",
        "min-nodes=4",
        "-c",
        "eval-tasks=",
        *config,
        "--wait",
        "--timeout",
        "900",
        timeout=1200,
    )
    assert result.returncode == 0, (result.stdout, result.stderr, {n: p.output()[-2000:] for n, p in joined.items()})


@pytest.mark.slow
def test_a_deployed_secure_round_of_four_modality_mixes_equals_the_plain_one_within_its_bound(
    joined: dict[str, Process],  # noqa: F811 - the fixture
    federation,  # noqa: ANN001, F811 - the fixture
    tmp_path: Path,
) -> None:
    plain_out, secure_out = tmp_path / "plain", tmp_path / "secure"
    launch(federation, plain_out, joined)
    launch(federation, secure_out, joined, "-c", "secure-aggregation=true")

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
