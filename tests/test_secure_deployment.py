"""A deployed secure round (issue 32): real SuperLink (TLS, node authentication, nginx), the three
tiny sites joined through `client.py join` (each a real SuperNode and ClientApp process), `coordinator
launch -c secure-aggregation=true`. Each site's SiteRound lives in its SuperNode's Context.state
across the four stages. Three holders of shared and ehr are unmasked; wearables and genomics (two
holders each, min_holders 3) are withheld: carried forward and recorded. Slow (real processes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from deploy_fixtures import (  # noqa: F401 - fixtures are used by name
    SITES,
    TINY_RUN,
    Process,
    federation,
    joined,
    round_events,
    run_coordinator,
    sites,
    superlink,
)

from healthfm_core.model.groups import parameter_group
from server.audit import AUDIT_FILE, read_audit_log
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint


@pytest.mark.slow
def test_a_deployed_secure_round_unmasks_only_groups_with_enough_holders(
    joined: dict[str, Process],  # noqa: F811 - the fixture
    federation,  # noqa: ANN001, F811 - the fixture
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    result = run_coordinator(
        "launch",
        str(federation.root),
        "--out-dir",
        str(out),
        "--rounds",
        "1",
        *TINY_RUN,
        "-c",
        "local-steps=4",  # the hospital's few wearable subjects are all but surely sampled
        "-c",
        "secure-aggregation=true",
        "-c",
        "eval-tasks=",
        "--wait",
        "--timeout",
        "900",
        timeout=1200,
    )
    assert result.returncode == 0, (result.stdout, result.stderr, {n: p.output()[-2000:] for n, p in joined.items()})
    _, rounds = round_events(out)
    event = rounds[1]
    info = event["secure_aggregation"]
    assert "error" not in info, info
    assert info["unmasked"] == {"shared": sorted(SITES), "ehr": sorted(SITES)}
    assert sorted(info["withheld"]) == ["genomics", "wearables"]
    assert all(e["status"] == "ok" for e in event["sites"].values()), event["sites"]
    assert all("num_examples" not in e for e in event["sites"].values())  # counts stay masked
    [record] = [r for r in read_audit_log(out / AUDIT_FILE) if r["record"] == "secure-aggregation"]
    assert record["withheld"] == info["withheld"]
    path = latest_server_checkpoint(out / "checkpoints")
    assert path is not None
    state = load_server_checkpoint(path)
    initial = {k: v.numpy() for k, v in state.setup.init_model().state_dict().items()}
    for key, value in state.arrays.items():
        group = parameter_group(key)
        if group in ("wearables", "genomics"):
            assert np.array_equal(value, initial[key]), key  # carried forward
    moved = [k for k in initial if parameter_group(k) == "shared" and not np.array_equal(state.arrays[k], initial[k])]
    assert moved  # the unmasked average was applied
