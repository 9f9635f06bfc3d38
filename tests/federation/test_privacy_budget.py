"""A DP site's privacy budget belongs to its key, not to its state directory (issue 26, break 5).

Replays, on a real site runtime (tiny synthetic site, tiny model, real Opacus) and through
`client.py join` up to the point it refuses (no SuperLink needed): a site that spent rejoins with
another `--state-dir` and is refused DP with both paths and the spend named; `--new-privacy-budget`
starts a new ledger, the site trains, and every DP reply carries the new budget into the
server's audit record. The ledger's own cases are in tests/unit/test_privacy_ledger.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.client import EXIT_USAGE, main
from client.deploy.join import EXIT_NO_CONNECTION, free_port
from client.deploy.privacy_budget import check_privacy_budget, key_binding
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import init_model
from healthfm_core.privacy.budget_record import read_record, record_path
from healthfm_core.privacy.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from healthfm_core.protocol import FederationSetup, RoundConfig, TrainReply
from healthfm_core.terms.groups import parameter_group
from healthfm_core.terms.model_config import load_model_config
from server.audit import site_round_records
from server.round import SiteOutcome
from simulations.synthetic import generate_federation

SITE = "genomics"
POLICY = """
min_subjects: 3
dp:
  mandatory: true
  epsilon_cap: 50
  delta: 1e-5
  noise_multiplier: 1.1
"""


pytestmark = pytest.mark.slow  # real runtimes under Opacus and the join CLI (~1 min): CI's slow stage


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    return generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=30, progress=False)


@pytest.fixture(scope="module")
def setup(federation) -> FederationSetup:
    site = federation.site(SITE)
    config = SiteConfig.from_node_config({"site-root": str(site.root), "site-name": SITE, "min-code-subjects": 5})
    return FederationSetup(
        vocabulary=build_vocabulary([SiteRuntime(config).code_stats()], min_subjects=5),
        model=load_model_config("tiny"),
        model_seed=1,
    )


@pytest.fixture()
def site_key(tmp_path: Path) -> tuple[Path, str]:
    """A site's node-auth key as the coordinator hands it out: an OpenSSH EC private key file."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "keys" / "auth_key"
    path.parent.mkdir()
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode()


def node_config(federation, tmp_path: Path, state: Path, key: tuple[Path, str]) -> dict:
    """The node config `join` gives the ClientApp: the site's policy, state dir and key binding."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    binding = key_binding(*key)
    return {
        "site-root": str(federation.site(SITE).root),
        "site-name": SITE,
        "min-code-subjects": 5,
        "min-report-subjects": 2,
        "policy": str(policy),
        "state-dir": str(state),
        "privacy-record": str(binding.record),
        "privacy-key": binding.key_sha256,
    }


def train_dp(runtime: SiteRuntime, setup: FederationSetup, rnd: int) -> TrainReply:
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in runtime.groups}
    cfg = RoundConfig(
        round=rnd,
        rounds=3,
        local_steps=2,
        lr=1e-3,
        batch_size=4,
        max_events=32,
        max_patches=4,
        setup_sha256=setup.sha256,
        dp=True,
    )
    return runtime.train(setup, arrays, cfg)


def test_a_site_rejoining_with_another_state_dir_is_refused_dp_until_a_new_budget(
    federation, setup, site_key: tuple[Path, str], tmp_path: Path
) -> None:
    """The replayed break: a DP site rejoined with another --state-dir trained again from epsilon 0."""
    first, second = tmp_path / "state-a", tmp_path / "state-b"
    spent = train_dp(
        SiteRuntime(SiteConfig.from_node_config(node_config(federation, tmp_path, first, site_key))), setup, 1
    )
    assert spent.dp is not None and spent.dp.epsilon > 0 and spent.dp.new_budget_at is None
    record = record_path(site_key[0])
    assert record == site_key[0].with_name("auth_key.privacy.json") and read_record(record) is not None

    # Another state dir, the same key: refused, naming both paths and the spend.
    moved = SiteConfig.from_node_config(node_config(federation, tmp_path, second, site_key))
    with pytest.raises(LedgerError) as err:
        SiteRuntime(moved)
    message = str(err.value)
    for part in (str(second / LEDGER_FILE), str(record), str(first / LEDGER_FILE), "2 DP steps over 1 rounds"):
        assert part in message
    assert f"epsilon {spent.dp.epsilon:.4g}" in message
    assert not (second / LEDGER_FILE).exists()

    # `join --new-privacy-budget`: a new ledger, said loudly, then the site trains again.
    out = io.StringIO()
    check_privacy_budget(node_config(federation, tmp_path, second, site_key), *site_key, True, out)
    assert "NEW PRIVACY BUDGET" in out.getvalue()
    runtime = SiteRuntime(moved)
    reply = train_dp(runtime, setup, 2)
    assert reply.status == "ok" and reply.dp is not None
    assert reply.dp.new_budget_at is not None and reply.dp.replaced_epsilon == spent.dp.epsilon
    assert reply.dp.epsilon < spent.dp.epsilon * 1.01  # counted from zero again: one round's spend

    # As the server receives it, and as its audit log records it.
    records = reply.to_records()
    assert records.metrics["dp.new-budget-at"] == reply.dp.new_budget_at
    parsed = TrainReply.from_records(records.arrays, records.metrics, records.status)
    assert parsed.dp == reply.dp
    [audit] = site_round_records(
        {"round": 2, "sites": {SITE: SiteOutcome(node_id=1, status="ok").take_reply(parsed).to_event()}}
    )
    assert audit["new_privacy_budget"] == {
        "started_at": reply.dp.new_budget_at,
        "replaced_epsilon": spent.dp.epsilon,
    }
    # A refusal says it too (the site's spend travels with it).
    spend_now = runtime.privacy_spend()
    assert spend_now is not None and spend_now.new_budget_at == reply.dp.new_budget_at
    # The key's record now names the new ledger and keeps the one given up.
    saved = read_record(record)
    assert saved is not None and saved.current.ledger == str(second / LEDGER_FILE)
    assert [r.ledger for r in saved.replaced] == [str(first / LEDGER_FILE)]
    # The ledger given up is not this key's any more: going back to it is refused too.
    with pytest.raises(LedgerError, match="holds another ledger"):
        SiteRuntime(SiteConfig.from_node_config(node_config(federation, tmp_path, first, site_key)))
    # Without a DP policy the key's record plays no part: the site still joins and trains without DP.
    plain = node_config(federation, tmp_path, tmp_path / "state-c", site_key)
    plain.pop("policy")
    assert SiteRuntime(SiteConfig.from_node_config(plain)).ledger is not None


def test_join_refuses_before_connecting_and_the_flag_starts_a_new_budget(
    federation, setup, site_key, tmp_path, capfd
) -> None:
    """`client.py join` with a fresh --state-dir after the key spent: exit 2 with the paths and the
    spend, before any connection; with --new-privacy-budget it goes on (to the SuperLink, absent here)."""
    state = tmp_path / "join-state"
    spent = train_dp(
        SiteRuntime(SiteConfig.from_node_config(node_config(federation, tmp_path, tmp_path / "old", site_key))),
        setup,
        1,
    )
    assert spent.dp is not None
    policy = tmp_path / "policy.yaml"
    args = [
        "join",
        str(federation.site(SITE).root),
        "--superlink",
        f"127.0.0.1:{free_port()}",  # nothing listens there
        "--insecure",
        "--auth-key",
        str(site_key[0]),
        "--policy",
        str(policy),
        "--state-dir",
        str(state),
        "--site-name",
        SITE,
        "--connect-timeout",
        "5",
        "--no-progress",
    ]
    capfd.readouterr()
    assert main(args) == EXIT_USAGE
    err = capfd.readouterr().err
    ledger = state / "site-state" / LEDGER_FILE
    assert "not joining: DP training would be refused" in err
    for part in (str(ledger), str(record_path(site_key[0])), str(tmp_path / "old" / LEDGER_FILE), "2 DP steps"):
        assert part in err
    assert "cannot reach the SuperLink" not in err  # refused before any connection
    assert not ledger.exists()

    assert main([*args, "--new-privacy-budget"]) == EXIT_NO_CONNECTION
    captured = capfd.readouterr()
    assert "NEW PRIVACY BUDGET" in captured.out and "cannot reach the SuperLink" in captured.err
    started = PrivacyLedger(state / "site-state").data.new_budget
    assert started is not None and started.replaced_epsilon == spent.dp.epsilon
    # The next join needs no flag: the new ledger is the key's.
    assert main(args) == EXIT_NO_CONNECTION
    assert "privacy ledger" in capfd.readouterr().out
    assert np.isclose(PrivacyLedger(state / "site-state").epsilon(1e-5), 0.0)
