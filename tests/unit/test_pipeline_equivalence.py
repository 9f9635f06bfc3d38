"""The vectorised pipeline against plain references, on generated biobank and hospital sites.

Wearable patches (wear_patches.py, streamed chunk by chunk with a fast path for regular 30-s
grids) against a per-row Python loop that states the rules, and streamed file by file
(wear_stream.py: several files, subjects across files, small row groups, irregular grids, rows
out of order) against the same table read whole; samples' EHR tokens (sliced from
tokens pooled once per site) against `pool_token_rows` over the sample's rows, which is how
each sample was built before; whole batches (`SiteSequences.batch`, what make_loader uses)
against `collate` of the samples one by one. Arrays must be equal bit for bit. Pieces are made small so that
subjects run across piece seams.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from healthfm_core.data.files.layout import EPOCH_US, WEARABLES_SCHEMA, WEARABLES_SUBDIRECTORY
from healthfm_core.data.sequences import wear_patches
from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import (
    US_PER_DAY,
    LabelledDataset,
    PretrainingDataset,
    SiteSequences,
    collate,
    collate_labelled,
    make_loader,
    pool_token_rows,
)
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sequences.wear_patches import (
    NO_TIME,
    UnsortedWearables,
    build_patches,
    patches_of_parts,
    sorted_by_subject_time,
)
from healthfm_core.data.sequences.wear_stream import WearableFilePart, wearable_key_table
from healthfm_core.data.sites.site import open_site
from healthfm_core.terms.site_layout import WEARABLE_CHANNELS
from healthfm_core.terms.token_settings import TokenSettings
from healthfm_core.terms.vocabulary import Normalizer, Vocabulary
from simulations.synthetic import generate_federation
from simulations.synthetic.scenario import load_scenario

SITES = ("biobank", "city_hospital")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Vocabulary]]:
    config = load_scenario("default")
    config = config.model_copy(update={"sites": [s for s in config.sites if s.name in SITES]})
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario=config, seed=7, n_subjects=24, progress=False)
    out = {}
    for s in fed.sites:
        site = open_site(s.root)
        out[s.name] = (s.root, build_vocabulary([site_code_stats(site, min_subjects=2)], min_subjects=2))
    return out


# ------------------------------------------------------------------------------- wearables


def reference_patches(table: pa.Table, subject_ids: np.ndarray, E: int, normalisers: list) -> dict[str, np.ndarray]:
    """The patch rules row by row: sort by (subject, time) stably, anchor each subject's grid at
    its first epoch, patch k = offset // (E * 30 s), slot = remainder // 30 s; last row wins."""
    sid = table["subject_id"].to_numpy()
    t = table["time"].to_numpy()
    order = sorted(range(len(sid)), key=lambda i: (sid[i], t[i]))
    chans = []
    for c, norm in enumerate(normalisers):
        x = table.column(2 + c).to_numpy(zero_copy_only=False)
        ok = np.isfinite(x)
        v = norm.apply(np.where(ok, x, 0.0)).astype(np.float32)
        v[~ok] = 0.0
        chans.append((v, ok))
    patch_of: dict[tuple[int, int], int] = {}
    p_sub: list[int] = []
    p_k: list[int] = []
    p_first: list[int] = []
    first: dict[int, int] = {}
    last_end = {}
    cells: list[tuple[int, int, int]] = []  # (patch, slot, row)
    for i in order:
        s, ti = int(sid[i]), int(t[i])
        a = first.setdefault(s, ti)
        last_end[s] = ti + EPOCH_US
        k, rem = divmod(ti - a, E * EPOCH_US)
        if (s, k) not in patch_of:
            patch_of[(s, k)] = len(p_sub)
            p_sub.append(s)
            p_k.append(k)
            p_first.append(ti + EPOCH_US)
        cells.append((patch_of[(s, k)], rem // EPOCH_US, i))
    P, C = len(p_sub), len(normalisers)
    epochs = np.zeros((P, E, C), np.float32)
    mask = np.zeros((P, E, C), bool)
    for p, slot, i in cells:
        for c, (v, ok) in enumerate(chans):
            epochs[p, slot, c] = v[i]
            mask[p, slot, c] = ok[i]
    idx = np.searchsorted(subject_ids, np.array(p_sub, np.int64))
    first_us = np.full(len(subject_ids), NO_TIME, np.int64)
    last_end_us = np.full(len(subject_ids), np.iinfo(np.int64).min, np.int64)
    for s, a in first.items():
        j = int(np.searchsorted(subject_ids, s))
        first_us[j], last_end_us[j] = a, last_end[s]
    return {
        "offsets": np.searchsorted(idx, np.arange(len(subject_ids) + 1)).astype(np.int64),
        "start_us": np.array([first[s] + k * E * EPOCH_US for s, k in zip(p_sub, p_k)], np.int64),
        "first_end_us": np.array(p_first, np.int64),
        "epochs": epochs,
        "mask": mask,
        "first_us": first_us,
        "last_end_us": last_end_us,
    }


def wear_table(site_root: Path) -> pa.Table:
    w = open_site(site_root).read_wearables()
    return pa.table(
        [w["subject_id"], w["time"].cast(pa.int64()), *(w[c] for c in WEARABLE_CHANNELS)],
        names=["subject_id", "time", *WEARABLE_CHANNELS],
    )


def variants(table: pa.Table, rng: np.random.Generator) -> dict[str, pa.Table]:
    """The generated grid as is, and broken in the ways real exports break it."""
    n = table.num_rows
    t = table["time"].to_numpy()
    hr = table["hr_bpm"].to_numpy(zero_copy_only=False).copy()
    some = rng.random(n) < 0.8
    hr[some] = (60 + 40 * rng.random(int(some.sum()))).astype(np.float32)
    hr[rng.random(n) < 0.2] = np.nan
    with_hr = table.set_column(3, "hr_bpm", pa.array(hr, pa.float32(), from_pandas=True))
    gaps = with_hr.filter(pa.array(rng.random(n) > 0.01))  # dropped epochs: off the fast path
    jitter = t.copy()
    pick = rng.random(n) < 0.001
    jitter[pick] += rng.integers(1, EPOCH_US, int(pick.sum()))  # starts off the 30-s grid
    dup = rng.choice(n, 50, replace=False)
    duplicated = pa.concat_tables(
        [with_hr.set_column(1, "time", pa.array(jitter)), with_hr.take(pa.array(dup))]
    )  # the same epoch twice: the later row wins
    return {
        "grid": table,
        "grid_hr": with_hr,
        "gaps": gaps,
        "jitter_dup_unsorted": duplicated,
        "shuffled": with_hr.take(pa.array(rng.permutation(n))),
    }


@pytest.mark.parametrize("E", [120, 7, 50])
def test_patches_match_the_row_by_row_rules(sites, monkeypatch: pytest.MonkeyPatch, E: int) -> None:
    root, vocab = sites["biobank"]
    table = wear_table(root)
    assert table.num_rows > 10_000
    subject_ids = np.unique(table["subject_id"].to_numpy())
    normalisers = [vocab.wearables[c] for c in WEARABLE_CHANNELS]
    rng = np.random.default_rng(E)
    monkeypatch.setattr(wear_patches, "_CHUNK_ROWS", 4099)  # many pieces, subjects across seams
    for name, variant in variants(table, rng).items():
        got = build_patches(variant, subject_ids, E, normalisers)
        want = reference_patches(variant, subject_ids, E, normalisers)
        for f in fields(got):
            a, b = getattr(got, f.name), want[f.name]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, f.name)
            assert a.tobytes() == b.tobytes(), (name, f.name)
        assert got.mask.any() and got.epochs.any()


def test_sortedness_is_checked_across_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wear_patches, "_CHUNK_ROWS", 3)
    ok = pa.table({"subject_id": [1, 1, 1, 2, 2, 3], "time": [0, 5, 5, 1, 2, 0]})
    assert sorted_by_subject_time(ok)
    for sid, time in [([1, 1, 2, 1, 2, 3], [0, 1, 2, 3, 4, 5]), ([1, 1, 1, 1, 2, 3], [0, 1, 5, 4, 0, 0])]:
        assert not sorted_by_subject_time(pa.table({"subject_id": sid, "time": time}))


def test_hand_made_patches_on_a_grid_and_off_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subject 5: epochs 0..4 on the grid (patches of 2: [0,1] [2,3] [4]); subject 9: epochs 0, 3,
    and one 10 s after epoch 3 (same slot, later row wins)."""
    monkeypatch.setattr(wear_patches, "_CHUNK_ROWS", 2)
    e = EPOCH_US
    table = pa.table(
        {
            "subject_id": pa.array([5, 5, 5, 5, 5, 9, 9, 9], pa.int64()),
            "time": pa.array([0, e, 2 * e, 3 * e, 4 * e, 100 * e, 103 * e, 103 * e + 10**7], pa.int64()),
            "enmo_mg": pa.array([1, 2, 3, 4, 5, 6, 7, 8], pa.float32()),
        }
    )
    got = build_patches(table, np.array([5, 9], np.int64), 2, [Normalizer(center=0.0, scale=1.0, clip=100.0)])
    assert got.offsets.tolist() == [0, 3, 5]
    assert got.start_us.tolist() == [0, 2 * e, 4 * e, 100 * e, 102 * e]
    assert got.first_end_us.tolist() == [e, 3 * e, 5 * e, 101 * e, 104 * e]
    assert got.epochs[..., 0].tolist() == [[1, 2], [3, 4], [5, 0], [6, 0], [0, 8]]
    assert got.mask[..., 0].tolist() == [[True, True], [True, True], [True, False], [True, False], [False, True]]
    assert got.first_us.tolist() == [0, 100 * e] and got.last_end_us.tolist() == [5 * e, 104 * e + 10**7]


def write_files(
    table: pa.Table, directory: Path, cuts: list[int], row_group_rows: int, statistics: bool = True
) -> list[Path]:
    """The table's rows in order, cut into files at `cuts`, as WEARABLES_SCHEMA parquet."""
    directory.mkdir(parents=True)
    bounds = [0, *cuts, table.num_rows]
    paths = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = table.slice(a, b - a)
        part = pa.table(
            [part["subject_id"], part["time"].cast(pa.timestamp("us")), *(part[c] for c in WEARABLE_CHANNELS)],
            schema=WEARABLES_SCHEMA,
        )
        paths.append(directory / f"{i:02d}.parquet")
        pq.write_table(part, paths[-1], row_group_size=row_group_rows, write_statistics=statistics)
    return paths


def assert_same_patches(got, want, label) -> None:
    for f in fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape, (label, f.name)
        assert a.tobytes() == b.tobytes(), (label, f.name)


@pytest.mark.parametrize("E", [120, 7])
def test_patches_streamed_file_by_file_match_the_whole_table(
    sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, E: int
) -> None:
    """Several files (cuts inside subjects), row groups smaller than pieces and pieces smaller
    than files: the same patches as the table they hold, read whole; rows out of order across
    or within files are reported (the caller then sorts, as read_wearables does)."""
    root, vocab = sites["biobank"]
    table = wear_table(root)
    subject_ids = np.unique(table["subject_id"].to_numpy())
    normalisers = [vocab.wearables[c] for c in WEARABLE_CHANNELS]
    rng = np.random.default_rng(E + 1)
    monkeypatch.setattr(wear_patches, "_CHUNK_ROWS", 5003)
    for name, variant in variants(table, rng).items():
        n = variant.num_rows
        cuts = sorted(int(c) for c in rng.choice(np.arange(1, n), 4, replace=False))
        files = write_files(variant, tmp_path / f"{E}_{name}", cuts, row_group_rows=3001)
        parts = [WearableFilePart(p) for p in files]
        if not sorted_by_subject_time(variant):
            with pytest.raises(UnsortedWearables):
                patches_of_parts(parts, E, normalisers)
            continue
        unplaced = patches_of_parts(parts, E, normalisers)
        assert unplaced.n_rows == n
        assert_same_patches(unplaced.placed(subject_ids), build_patches(variant, subject_ids, E, normalisers), name)
    # A subject filter reads the same rows as read_wearables(subject_ids).
    some = subject_ids[::3]
    files = write_files(table, tmp_path / f"{E}_filtered", [table.num_rows // 2], row_group_rows=4000)
    wanted = pa.array(some, pa.int64())
    got = patches_of_parts([WearableFilePart(p, wanted) for p in files], E, normalisers).placed(subject_ids)
    kept = table.filter(pc.is_in(table["subject_id"], value_set=wanted))
    assert_same_patches(got, build_patches(kept, subject_ids, E, normalisers), "filtered")


def sequences_equal(a: SiteSequences, b: SiteSequences) -> None:
    for name in (
        "subject_ids",
        "patch_offsets",
        "patch_start_us",
        "patch_first_end_us",
        "patch_epochs_arr",
        "patch_mask",
        "t0_us",
        "last_time_us",
        "ev_offsets",
        "ev_codes",
    ):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert a.n_epochs == b.n_epochs and a.n_events == b.n_events


@pytest.mark.parametrize("files", ["in_order", "renamed", "renamed_without_statistics"])
def test_from_site_streams_what_the_whole_table_gives(sites, tmp_path: Path, files: str) -> None:
    """from_site (file by file) against SiteSequences over read_wearables' table, with every
    subject and with some. Files named out of subject order (0, 1, 10, ..., 2 from a sharded
    export) are read in subject order from their parquet statistics; without statistics they are
    read in path order, and the rows, out of order, fall back to the sorted table."""
    root, vocab = sites["biobank"]
    site_root = tmp_path / "biobank"
    shutil.copytree(root, site_root)
    wear_dir = site_root / WEARABLES_SUBDIRECTORY
    table = wear_table(root)
    for p in wear_dir.rglob("*.parquet"):
        p.unlink()
    cuts = [table.num_rows // 3, 2 * table.num_rows // 3]
    written = write_files(table, wear_dir / "split", cuts, 2500, statistics=files != "renamed_without_statistics")
    if files != "in_order":  # path order no longer follows the subjects
        written[0].rename(wear_dir / "split" / "99.parquet")
        written[0] = wear_dir / "split" / "99.parquet"
    site = open_site(site_root)
    assert len(site.wearable_files) == 3
    normalisers = [vocab.wearables[c] for c in WEARABLE_CHANNELS]
    by_path = sorted(written, key=lambda p: p.as_posix())
    if files == "renamed":
        assert site.wearable_files == written  # subject order, not path order
        with pytest.raises(UnsortedWearables):
            patches_of_parts([WearableFilePart(p) for p in by_path], 50, normalisers)
    else:
        assert site.wearable_files == by_path
    if files == "renamed_without_statistics":
        with pytest.raises(UnsortedWearables):
            patches_of_parts([WearableFilePart(p) for p in site.wearable_files], 50, normalisers)
    else:  # streamed file by file, no sort
        patches_of_parts([WearableFilePart(p) for p in site.wearable_files], 50, normalisers)
    for subject_ids in (None, site.subject_ids[1::2]):
        streamed = SiteSequences.from_site(site, vocab, patch_epochs=50, subject_ids=subject_ids)
        events = site.read_events(subject_ids=subject_ids, columns=["subject_id", "time", "code", "numeric_value"])
        whole = SiteSequences(events, site.read_wearables(subject_ids), vocab, patch_epochs=50)
        assert streamed.n_epochs > 0
        sequences_equal(streamed, whole)


def test_wearable_key_table_rejects_null_times() -> None:
    table = WEARABLES_SCHEMA.empty_table().cast(pa.schema([f.with_nullable(True) for f in WEARABLES_SCHEMA]))
    table = pa.concat_tables(
        [
            table,
            pa.table(
                {
                    "subject_id": pa.array([1], pa.int64()),
                    "time": pa.array([None], pa.timestamp("us")),
                    "enmo_mg": pa.array([1.0], pa.float32()),
                    "hr_bpm": pa.array([None], pa.float32()),
                },
                schema=table.schema,
            ),
        ]
    )
    with pytest.raises(ValueError, match="time"):
        wearable_key_table(table)


# ------------------------------------------------------------------------------- EHR tokens


def reference_tokens(seqs: SiteSequences, index: int, pt: int, max_events: int, max_codes: int):
    """A sample's tokens by pooling its rows (static token, then the last buckets) at once."""
    t0 = int(seqs.t0_us[index])
    t0 = pt if t0 == NO_TIME else t0
    s0, s1 = int(seqs.st_offsets[index]), int(seqs.st_offsets[index + 1])
    n_static = 1 if s1 > s0 and max_events >= 1 else 0
    a, b = int(seqs.ev_offsets[index]), int(seqs.ev_offsets[index + 1])
    visible = a + int(np.searchsorted(seqs.ev_time_us[a:b], pt, side="right"))
    n_timed = max_events - n_static
    keep = sorted({int(seqs.ev_bucket[r]) for r in range(a, visible)})[-n_timed:] if n_timed > 0 else []
    rows = [r for r in range(a, visible) if int(seqs.ev_bucket[r]) in set(keep)]
    st = list(range(s0, s1)) if n_static else []
    token = np.array([0] * len(st) + [keep.index(int(seqs.ev_bucket[r])) + n_static for r in rows], np.int64)
    codes, values, has, tok_us = pool_token_rows(
        token,
        np.concatenate([seqs.st_codes[st], seqs.ev_codes[rows]]).astype(np.int64),
        np.concatenate([seqs.st_values[st], seqs.ev_values[rows]]).astype(np.float32),
        np.concatenate([seqs.st_has_value[st], seqs.ev_has_value[rows]]).astype(bool),
        np.concatenate([np.full(len(st), t0, np.int64), seqs.ev_time_us[rows]]).astype(np.int64),
        seqs.code_priority,
        max_codes,
    )
    return codes, values, has, ((tok_us - t0) / US_PER_DAY).astype(np.float32)


@pytest.mark.parametrize("site_name", SITES)
@pytest.mark.parametrize("window", [1.0, 0.0, 0.25])
def test_sample_tokens_match_pooling_the_rows(sites, site_name: str, window: float) -> None:
    root, vocab = sites[site_name]
    seqs = SiteSequences.from_site(open_site(root), vocab, tokens=TokenSettings(token_window_days=window))
    rng = np.random.default_rng(int(window * 100))
    n_checked = n_cut = 0
    for i in range(seqs.n_subjects):
        ts = seqs.event_times_us(i)
        pts = [int(seqs.last_time_us[i]), int(rng.integers(3 * 10**15, 4 * 10**15))]
        if len(ts):
            mid = int(ts[len(ts) // 2])
            pts += [int(ts[0]), mid, mid - 1, mid + 5 * 3_600_000_000]
        # Times inside a bucket (later rows of it not yet visible): the last token is cut.
        a, b = int(seqs.ev_offsets[i]), int(seqs.ev_offsets[i + 1])
        inside = np.flatnonzero((seqs.ev_bucket[a + 1 : b] == seqs.ev_bucket[a : b - 1]) & (np.diff(ts) > 0))
        pts += [int(ts[r]) for r in inside[:3]]
        for pt in pts:
            for max_events, max_codes in [(512, 32), (6, 2), (1, 1), (2, 4)]:
                s = seqs.sample(i, pt, max_events, 8, max_codes_per_token=max_codes)
                codes, values, has, times = reference_tokens(seqs, i, pt, max_events, max_codes)
                for got, want in [(s.codes, codes), (s.values, values), (s.has_value, has), (s.times, times)]:
                    assert got.dtype == want.dtype and got.shape == want.shape
                    assert got.tobytes() == want.tobytes(), (site_name, i, pt, max_events, max_codes)
                n_checked += 1
            v = a + int(np.searchsorted(ts, pt, side="right"))
            n_cut += int(a < v < b and seqs.ev_bucket[v] == seqs.ev_bucket[v - 1])
    assert n_checked > 100
    if site_name == "city_hospital" and window > 0:  # lab panels: many timestamps a day
        assert n_cut > 0
    # Batches still collate from these samples.
    batch = collate([PretrainingDataset(seqs)[j] for j in range(4)])
    assert batch.codes.shape[0] == 4


def assert_same_batch(got: Batch, want: Batch, label) -> None:
    for f in fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape, (label, f.name, a.shape, b.shape)
        assert a.numpy().tobytes() == b.numpy().tobytes(), (label, f.name)


def prediction_times(seqs: SiteSequences, i: int, rng: np.random.Generator) -> list[int]:
    """Last observation, before anything, event times, inside buckets and patches."""
    ts = seqs.event_times_us(i)
    pts = [int(seqs.last_time_us[i]), int(seqs.t0_us[i]) - 1, int(rng.integers(3 * 10**15, 4 * 10**15))]
    if len(ts):
        pts += [int(ts[0]), int(ts[len(ts) // 2]), int(ts[len(ts) // 2]) - 1, int(ts[-1]) + 3_600_000_000]
    p0, p1 = int(seqs.patch_offsets[i]), int(seqs.patch_offsets[i + 1])
    if p1 > p0:  # mid-patch: the last patch straddles the prediction time
        start = seqs.patch_start_us[int(rng.integers(p0, p1))]
        pts += [int(start) + int(rng.integers(1, seqs.patch_epochs)) * EPOCH_US + 7, int(seqs.patch_first_end_us[p0])]
    return pts


@pytest.mark.parametrize("site_name", SITES)
@pytest.mark.parametrize("window", [1.0, 0.0])
def test_batches_are_the_collated_samples(sites, site_name: str, window: float) -> None:
    root, vocab = sites[site_name]
    seqs = SiteSequences.from_site(
        open_site(root), vocab, patch_epochs=7, tokens=TokenSettings(token_window_days=window)
    )
    rng = np.random.default_rng(11)
    rows = [(i, pt) for i in range(seqs.n_subjects) for pt in prediction_times(seqs, i, rng)]
    for max_events, max_patches, max_codes in [(512, 64, None), (6, 3, 2), (1, 1, 1), (0, 0, 3), (3, 500, 32)]:
        order = rng.permutation(len(rows))
        for chunk in np.array_split(order, max(1, len(order) // 17)):
            idx = [rows[j][0] for j in chunk]
            pts = [rows[j][1] for j in chunk]
            want = collate([seqs.sample(i, p, max_events, max_patches, None, max_codes) for i, p in zip(idx, pts)])
            got = seqs.batch(idx, pts, max_events, max_patches, max_codes)
            assert_same_batch(got, want, (site_name, window, max_events, max_patches, max_codes))
    # The cases worth checking came up: buckets cut by the prediction time, patches in batches.
    n_cut = 0
    for i, pt in rows:
        a, b = int(seqs.ev_offsets[i]), int(seqs.ev_offsets[i + 1])
        v = a + int(np.searchsorted(seqs.event_times_us(i), pt, side="right"))
        n_cut += int(a < v < b and seqs.ev_bucket[v] == seqs.ev_bucket[v - 1])
    if site_name == "city_hospital" and window > 0:
        assert n_cut > 0
    if site_name == "biobank":
        assert np.diff(seqs.patch_offsets).max() > 3


@pytest.mark.parametrize("site_name", SITES)
def test_make_loader_yields_what_per_sample_collation_gives(sites, site_name: str) -> None:
    """Same index order (the generator's draws are the DataLoader's), same batches, for every
    dataset with a `batch` method, across epochs of random prediction times."""
    root, vocab = sites[site_name]
    site = open_site(root)
    seqs = SiteSequences.from_site(site, vocab, patch_epochs=50)
    datasets: dict[str, tuple[PretrainingDataset | LabelledDataset, Callable[..., Any]]] = {
        "last": (PretrainingDataset(seqs, max_events=20, max_patches=4), collate),
        "random": (PretrainingDataset(seqs, time_mode="random", seed=5, max_events=9, max_patches=2), collate),
    }
    labels = pa.table(
        {
            "subject_id": pa.array(seqs.subject_ids[::2], pa.int64()),
            "prediction_time": pa.array(seqs.last_time_us[::2] - 86_400_000_000, pa.timestamp("us")),
            "boolean_value": pa.array(np.arange(len(seqs.subject_ids[::2])) % 2 == 0),
        }
    )
    datasets["labelled"] = (LabelledDataset(seqs, labels, max_events=16, max_patches=3), collate_labelled)
    for name, (ds, collate_fn) in datasets.items():
        for epoch, (shuffle, drop_last, batch_size) in enumerate(
            [(True, False, 5), (False, False, 4), (True, True, 3)]
        ):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
            generator = torch.Generator().manual_seed(epoch)
            reference = DataLoader(
                ds,
                batch_size=batch_size,
                shuffle=shuffle,
                generator=generator,
                drop_last=drop_last,
                collate_fn=collate_fn,
            )
            loader = make_loader(ds, batch_size=batch_size, shuffle=shuffle, seed=epoch, drop_last=drop_last)
            got, want = list(loader), list(reference)
            assert len(got) == len(want) == len(loader) > 1, name
            for k, (g, w) in enumerate(zip(got, want)):
                if name == "labelled":
                    assert g[1].dtype == w[1].dtype and torch.equal(g[1], w[1])
                    g, w = g[0], w[0]
                assert_same_batch(g, w, (name, epoch, k))


@pytest.mark.parametrize("transform", ["identity", "log1p"])
def test_normalizer_out_is_apply_bit_for_bit(transform: Literal["identity", "log1p"]) -> None:
    """Patches are normalised in place (`out`, a strided channel view): the same float32 bits
    as `apply(x).astype(float32)`, for float32 and float64 input."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.lognormal(3, 2, 5000), [-1.0, -0.0, 0.0, 1e-30, 1e30, np.nan, np.inf]])
    norm = Normalizer(transform=transform, center=2.7, scale=0.61, clip=4.0)
    for xs in (x.astype(np.float32), x):
        out = np.full((len(xs), 2), 7.0, np.float32)
        norm.apply(xs, out=out[:, 1])
        assert out[:, 1].tobytes() == norm.apply(xs).astype(np.float32).tobytes()
        assert (out[:, 0] == 7.0).all()
