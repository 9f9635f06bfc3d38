"""The token settings (token_window_days, max_codes_per_token): from the run configs into the
FederationSetup, from the setup into a site's sequences; bad values refused with the key named;
the per-row layout kept for comparison."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from helpers.hydra_configs import compose_cfg
from helpers.site_tables import EVENT_SCHEMA

from client.client import EXIT_USAGE, main
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.code_stats import events_code_stats, site_code_stats
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, to_us
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.protocol import FederationSetup
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.token_settings import DEFAULT_TOKENS, TokenSettings
from server.config import FederationConfig
from simulations.pretrain import token_settings
from simulations.run import federation_config
from simulations.synthetic import generate_federation

T0 = datetime(2150, 1, 1)


@pytest.fixture(scope="module")
def hospital_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hospital")
    return Path(generate_federation(out, "hospital", seed=0, n_subjects=12, progress=False).sites[0].root)


def _setup(root: Path, **tokens: Any) -> FederationSetup:
    vocab = build_vocabulary([site_code_stats(open_site(root), min_subjects=1)], min_subjects=1)
    return FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), modalities=["ehr"], **tokens)


def test_the_setup_carries_the_token_settings_to_the_site(hospital_root: Path) -> None:
    per_day = _setup(hospital_root)
    per_stamp = _setup(hospital_root, token_window_days=0, max_codes_per_token=3)
    assert per_day.tokens == DEFAULT_TOKENS and "token_window_days" not in per_day.to_json()
    # As the site receives it: the JSON the server sends, parsed back.
    received = FederationSetup.from_json(per_stamp.to_json())
    assert received == per_stamp and received.tokens == TokenSettings(token_window_days=0, max_codes_per_token=3)
    assert received.sha256 != per_day.sha256  # a different tokenisation is a different setup

    site = SiteRuntime(SiteConfig(site_root=hospital_root))
    events = site.site.read_events(columns=["subject_id", "time", "code"])
    timed = events.filter(pc.is_valid(events["time"]))
    stamps = {(s, t) for s, t in zip(timed["subject_id"].to_numpy(), to_us(timed["time"]))}
    seqs = site.sequences(received)
    # One token per (subject, exact timestamp) at the site, and at most 3 codes in each.
    assert seqs.token_window_days == 0 and int(seqs.ev_bucket[-1]) + 1 == len(stamps)
    dense = int(np.argmax(np.diff(seqs.ev_offsets)))
    sample = PretrainingDataset(seqs, [int(seqs.subject_ids[dense])], max_events=10_000)[0]
    n_static = int(seqs.st_offsets[dense + 1] > seqs.st_offsets[dense])
    assert len(sample.times) == n_static + len({t for s, t in stamps if s == seqs.subject_ids[dense]})
    assert sample.codes.shape[1] == 3
    # The default setup at the same site: one token per day, far fewer than per timestamp.
    day = site.sequences(per_day)
    assert day.token_window_days == 1.0 and int(day.ev_bucket[-1]) + 1 < len(stamps)


def test_bad_token_settings_are_refused_with_the_key_named(hospital_root: Path, tmp_path: Path) -> None:
    good = json.loads(_setup(hospital_root).to_json())
    for key, value in (("token_window_days", -1.0), ("max_codes_per_token", 0), ("max_codes_per_token", 2.5)):
        with pytest.raises(ValueError, match=rf"field {key}: value {value!r}") as err:
            FederationSetup.from_json(json.dumps({**good, key: value}))
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="token_window_days"):  # finite
        FederationSetup(**{**good, "token_window_days": float("inf")})

    with pytest.raises(ValueError, match=r"invalid run config: field token_window_days: value -0.5: ") as err:
        FederationConfig.from_run_config({"out-dir": str(tmp_path), "model": "tiny", "token-window-days": -0.5})
    assert "\n" not in str(err.value)
    run = FederationConfig.from_run_config(
        {"out-dir": str(tmp_path), "model": "tiny", "token-window-days": 0.0, "max-codes-per-token": 8}
    )
    assert run.tokens == TokenSettings(token_window_days=0, max_codes_per_token=8)

    hcfg = compose_cfg("run", ["model=tiny", f"out_dir={tmp_path}", "federation.max_codes_per_token=0"])
    with pytest.raises(ValueError, match=r"invalid federation config: field max_codes_per_token: value 0: ") as err:
        federation_config(hcfg, n_sites=1)
    assert "\n" not in str(err.value)
    pcfg = compose_cfg("pretrain", ["model=tiny", f"out_dir={tmp_path}", "data.token_window_days=nan"])
    with pytest.raises(ValueError, match=r"pretrain config data: field token_window_days: value nan: "):
        token_settings(pcfg)
    with pytest.raises(ValueError, match=r"SiteSequences: field token_window_days: value -2.0"):
        SiteSequences(
            open_site(hospital_root).read_events(), None, _setup(hospital_root).vocabulary, token_window_days=-2.0
        )
    assert main(["check", str(hospital_root), "--no-progress", "--token-window-days", "-1"]) == EXIT_USAGE


def test_run_configs_name_the_token_settings(tmp_path: Path) -> None:
    hcfg = compose_cfg(
        "run",
        ["model=tiny", f"out_dir={tmp_path}", "federation.token_window_days=0", "federation.max_codes_per_token=4"],
    )
    assert federation_config(hcfg, n_sites=1).tokens == TokenSettings(token_window_days=0, max_codes_per_token=4)
    # Every job's defaults are the one definition's.
    assert federation_config(compose_cfg("run", [f"out_dir={tmp_path}"]), 1).tokens == DEFAULT_TOKENS
    assert token_settings(compose_cfg("pretrain", [f"out_dir={tmp_path}"])) == DEFAULT_TOKENS
    demo = compose_cfg("demo", [f"out_dir={tmp_path}"])
    assert (demo.federation.token_window_days, demo.federation.max_codes_per_token) == (
        DEFAULT_TOKENS.token_window_days,
        DEFAULT_TOKENS.max_codes_per_token,
    )


def test_per_event_layout_is_one_token_per_row() -> None:
    rows: list[tuple[int, datetime | None, str, float | None]] = [
        (1, T0 + timedelta(hours=h), f"LAB//{k}", float(k)) for h in (1, 5, 30) for k in range(4)
    ]
    rows += [(1, None, "GENDER//F", None), (1, None, "RACE//X", None)]
    ev = pa.table({n: list(c) for n, c in zip(EVENT_SCHEMA.names, zip(*rows))}, schema=EVENT_SCHEMA)
    vocab = build_vocabulary([events_code_stats(ev)], min_subjects=1)
    pt = int(to_us(pa.array([T0 + timedelta(days=3)]))[0])
    row = SiteSequences(ev, None, vocab, per_event=True).sample(0, pt)
    assert row.codes.shape == (2 + 12, 1)  # each static row and each timed row its own token
    assert row.times.tolist() == pytest.approx([0.0, 0.0] + [h / 24 for h in (0, 0, 0, 0, 4, 4, 4, 4, 29, 29, 29, 29)])
    capped = SiteSequences(ev, None, vocab, per_event=True).sample(0, pt, max_events=5)
    assert capped.codes.shape == (5, 1) and capped.times[2:].tolist() == pytest.approx([29 / 24] * 3)
    day = SiteSequences(ev, None, vocab).sample(0, pt)
    assert len(day.times) == 1 + 2  # the pooled layout: one static token, two days
