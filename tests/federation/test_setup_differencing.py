"""Issue 67, finding 1, in process: the setup statistics a site sends at every launch (its code
statistics and capabilities) are exact, so two launches around a data refresh that added one
subject gave that subject's codes, event counts and lab means away by difference. Replayed on a
real synthetic site on disk: the refresh writes the subject into the site's parquet files, and
every launch is a new SiteRuntime (a restart) on the same state dir, as a deployed site's is.

With the release gate (client/release_gate.py) a field whose contributions changed by fewer than
min_code_subjects subjects goes out as it was released before: the two launches send the same
bytes; a refresh of at least the minimum of subjects releases fresh numbers where that many
changed; a damaged record fails closed naming the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers.site_export import add_event, put_back, take_out

from client.release_gate import RELEASED_DIR, ReleaseGateError
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.code_stats import SiteCodeStats, site_code_stats
from healthfm_core.data.sites.site import open_site
from healthfm_core.protocol import SiteCapabilities
from simulations.synthetic import generate_federation

MINIMUM = 5  # the site's min_code_subjects here
LAB = "LAB//4548-4//%"  # HbA1c


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(
        tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=60, progress=False, sites=["genomics"]
    )
    return Path(fed.sites[0].root)


@pytest.fixture
def root(export: Path, tmp_path: Path) -> Path:
    """The site's export, this test's own copy (the test refreshes it)."""
    return Path(shutil.copytree(export, tmp_path / "genomics"))


def launch(root: Path, state: Path) -> tuple[SiteCapabilities, SiteCodeStats]:
    """What a site sends at a launch: a new runtime (a restarted site) on the same state dir."""
    rt = SiteRuntime(SiteConfig(site_root=root, site_name="genomics", min_code_subjects=MINIMUM, state_dir=state))
    return rt.capabilities(), rt.code_stats()


def exact(root: Path) -> SiteCodeStats:
    """The statistics as sites sent them before the gate: exact, suppressed below the minimum only."""
    return site_code_stats(open_site(root), min_subjects=MINIMUM)


def lab_subjects(root: Path) -> np.ndarray:
    events = open_site(root).read_events(columns=["subject_id", "code"])
    return np.unique(events.filter(pc.equal(events["code"], LAB))["subject_id"].to_numpy())


def recovered_sum(before: SiteCodeStats, after: SiteCodeStats, code: str) -> float:
    """The attack: a code's values' sum of the subjects between two releases, from counts and means."""
    a, b = after.codes[code].numeric, before.codes[code].numeric
    assert a is not None and b is not None
    return a.count * a.mean - b.count * b.mean


def test_two_launches_around_one_added_subject_send_the_same_statistics(root: Path, tmp_path: Path) -> None:
    subject = int(lab_subjects(root)[0])
    removed = take_out(root, [subject])
    before, first = exact(root), launch(root, tmp_path / "state")
    put_back(removed)  # the refresh writes the new subject into the export
    after = exact(root)
    # What the difference gave away before the gate: the subject's every code and its HbA1c.
    rows = pa.concat_tables([t for p, t in removed.items() if p.parent.name == "data"])
    theirs = set(rows["code"].to_pylist())
    moved = {c for c in after.codes if c not in before.codes or after.codes[c].n_subjects != before.codes[c].n_subjects}
    assert moved == {c for c in theirs if c in after.codes} and after.n_subjects == before.n_subjects + 1
    lab = rows.filter(pc.equal(rows["code"], LAB))["numeric_value"].to_numpy().astype(np.float64)
    assert recovered_sum(before, after, LAB) == pytest.approx(lab.sum(), abs=1e-6)

    second = launch(root, tmp_path / "state")
    assert second[0] == first[0]
    assert second[1].model_dump_json() == first[1].model_dump_json()


def test_a_refresh_of_the_minimum_of_subjects_releases_fresh_numbers_where_that_many_changed(
    root: Path, tmp_path: Path
) -> None:
    labbed = lab_subjects(root)
    one, many = int(labbed[0]), [int(s) for s in labbed[1 : MINIMUM + 1]]
    first_out, rest_out = take_out(root, [one]), take_out(root, many)
    caps1, first = launch(root, tmp_path / "state")
    put_back(first_out)
    assert launch(root, tmp_path / "state")[1] == first  # one subject: nothing moves
    put_back(rest_out)
    caps3, third = launch(root, tmp_path / "state")
    full = exact(root)
    # The totals, the lab every added subject has: fresh. A code fewer than the minimum of the
    # added subjects have (or more than none): as released at the first launch.
    assert (third.n_subjects, third.n_events) == (full.n_subjects, full.n_events)
    assert third.codes[LAB] == full.codes[LAB] != first.codes[LAB]
    added = pa.concat_tables([t for out in (first_out, rest_out) for p, t in out.items() if p.parent.name == "data"])
    assert set(third.codes) <= set(full.codes)
    for code, stats in full.codes.items():
        having = len(np.unique(added.filter(pc.equal(added["code"], code))["subject_id"].to_numpy()))
        expected = stats if having == 0 or having >= MINIMUM else first.codes.get(code)
        assert third.codes.get(code) == expected, (code, having)
    assert caps3.subjects["ehr"] == caps1.subjects["ehr"] + MINIMUM + 1 and caps3.rows > caps1.rows


def test_one_new_lab_value_of_one_subject_changes_nothing_released(root: Path, tmp_path: Path) -> None:
    first = launch(root, tmp_path / "state")
    before = exact(root)
    subject = int(lab_subjects(root)[0])
    when = pq.read_table(root / "data" / "0.parquet")["time"].drop_null()[0].as_py()
    add_event(root, subject, {"time": when, "code": LAB, "numeric_value": 9.7})
    assert recovered_sum(before, exact(root), LAB) == pytest.approx(9.7, abs=1e-5)  # what it gave away
    second = launch(root, tmp_path / "state")
    assert second[0] == first[0] and second[1].model_dump_json() == first[1].model_dump_json()


def test_a_damaged_record_fails_closed_naming_the_file(root: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    launch(root, state)
    record = state / RELEASED_DIR / "code_stats.parquet"
    intact = record.read_bytes()
    record.write_bytes(intact[: len(intact) // 2])  # truncated
    with pytest.raises(ReleaseGateError, match=f"{record}: not a readable parquet file"):
        launch(root, state)
    # Rewritten by hand with one fingerprint changed (a valid parquet file, its old metadata).
    table = pq.read_table(pa.BufferReader(intact))
    columns = [*table.columns[:2], pc.add(table["fingerprint"], pa.scalar(1, pa.uint64())), table["cell"]]
    pq.write_table(pa.Table.from_arrays(columns, schema=table.schema), record)
    with pytest.raises(ReleaseGateError, match=f"{record}: its content does not match its sha256"):
        launch(root, state)
    # Another kind's record in its place.
    shutil.copy(state / RELEASED_DIR / "capabilities.parquet", record)
    with pytest.raises(ReleaseGateError, match=f"{record}: a record of 'capabilities', not 'code_stats'"):
        launch(root, state)
    record.write_bytes(intact)
    launch(root, state)  # restored from a copy: released again
