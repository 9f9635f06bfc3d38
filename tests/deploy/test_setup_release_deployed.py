"""Issue 67, finding 1, deployed (real SuperLink behind nginx, three SuperNodes joined with
`client.py join`, fixtures in tests/helpers/deploy_fixtures.py): a coordinator launches, the
hospital's export gains one subject (written into its parquet files), the coordinator launches
again, the sites keeping their state dirs. What the coordinator received both times (the
vocabulary it agreed from the sites' setup statistics, vocabulary.json, and the sites'
capabilities in the run's setup event) is the same: the difference of the two launches says
nothing of the new subject. Before the release gate the second vocabulary counted the subject's
codes and moved the lab means by its values.

Slow: two launches over real processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from helpers.deploy_fixtures import Process, launch_args, run_coordinator
from helpers.site_export import put_back, take_out

from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sites.site import open_site
from server.deploy.provision import FederationPaths

pytestmark = pytest.mark.slow

REFRESHED = "hospital"


def launch(federation: FederationPaths, out: Path) -> tuple[bytes, dict]:
    """One `coordinator launch`: the vocabulary it agreed and its setup event."""
    result = run_coordinator(*launch_args(federation, out), timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    events = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    return (out / "vocabulary.json").read_bytes(), next(e for e in events if e["event"] == "setup")


def test_two_launches_around_one_added_subject_receive_the_same_setup(
    joined: dict[str, Process], federation: FederationPaths, sites: dict[str, Path], tmp_path: Path
) -> None:
    root = sites[REFRESHED]
    events = open_site(root).read_events(columns=["subject_id", "code"])
    subject = int(np.unique(events.filter(pc.starts_with(events["code"], "LAB//"))["subject_id"].to_numpy())[0])
    removed = take_out(root, [subject])
    try:
        exact_before = site_code_stats(open_site(root), min_subjects=5)
        first_vocabulary, first_setup = launch(federation, tmp_path / "first")
        put_back(removed)  # the refresh: the subject is in the export now
        removed = {}
        second_vocabulary, second_setup = launch(federation, tmp_path / "second")
    finally:
        put_back(removed)  # the module's export as it was, whatever happened
    exact_after = site_code_stats(open_site(root), min_subjects=5)
    assert exact_after.n_subjects == exact_before.n_subjects + 1 and exact_after.codes != exact_before.codes
    assert second_vocabulary == first_vocabulary
    assert second_setup["setup_sha256"] == first_setup["setup_sha256"]
    assert {s: e["subjects"] for s, e in second_setup["sites"].items()} == {
        s: e["subjects"] for s, e in first_setup["sites"].items()
    }
    print(f"{REFRESHED} gained subject {subject}: both launches agreed setup {first_setup['setup_sha256'][:12]}")
