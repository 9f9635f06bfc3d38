"""Loading a site shard by shard (SiteSequences.from_site, event_rows.py) against loading its
events at once (SiteSequences over `Site.read_events`'s whole table), and the site-wide pooling
(code_slots.sorted_code_slots) against the pooling rule as written (code_slots.code_slots).

The multi-shard sites are a generated hospital's events cut into shards named out of subject
order; variants put one subject's rows in two shards (interleaved times, static rows in both)
and shuffle one shard's rows. The check refuses the last two (MEDS keeps a subject in one shard,
sorted), so they are read through a Site opened on the clean copy whose file list then names the
rewritten shards: the reader is the real one, the data what an unchecked export could hold.
`per_event=True` keeps one token per row, so there even the order of rows with equal times must
be the reading order read_events gives.
"""

from __future__ import annotations

import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from healthfm_core.data.files.layout import DATA_SUBDIRECTORY, disjoint_subject_order, parquet_files
from healthfm_core.data.sequences import event_rows
from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.code_slots import code_slots, sorted_code_slots
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.event_rows import (
    SECOND_US,
    RowSink,
    RowTimes,
    SubjectRuns,
    shard_rows,
    subject_slices,
)
from healthfm_core.data.sequences.tokens import (
    US_PER_DAY,
    PretrainingDataset,
    SiteSequences,
    bucket_offsets,
    make_loader,
)
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.terms.vocabulary import Vocabulary
from simulations.synthetic import generate_federation
from simulations.synthetic.scenario import load_scenario


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Vocabulary]:
    config = load_scenario("default")
    config = config.model_copy(update={"sites": [s for s in config.sites if s.name == "city_hospital"]})
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario=config, seed=3, n_subjects=30, progress=False)
    root = fed.sites[0].root
    return root, build_vocabulary([site_code_stats(open_site(root), min_subjects=2)], min_subjects=2)


# ------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("chunk_rows", [1, 5, 64, 1 << 20])
def test_sorted_code_slots_is_the_rule(chunk_rows: int) -> None:
    """Rows sorted by (token, time) with many ties: same time, same code, with and without a
    value, equal values. Every kept row, token and slot equals the lexsort rule's."""
    rng = np.random.default_rng(chunk_rows)
    n = 3000
    token = np.sort(rng.integers(0, 400, n))
    time_us = rng.integers(0, 4, n)
    order = np.lexsort((time_us, token))
    token, time_us = token[order], time_us[order]
    codes = rng.integers(0, 12, n)
    has_value = rng.random(n) < 0.6
    values = np.where(has_value, rng.integers(-2, 3, n), 0).astype(np.float32)
    priority = rng.integers(0, 5, 12)  # ties in priority: the code id decides
    priority[0] = np.iinfo(np.int64).max
    want = code_slots(token, codes, values, has_value, time_us, priority)
    offsets = np.searchsorted(token, np.arange(token[-1] + 2))  # CSR, empty tokens included
    got = sorted_code_slots(offsets, codes, values, has_value, time_us, priority, chunk_rows=chunk_rows)
    for w, g, name in zip(want, got, ("kept", "token", "slot")):
        assert w.dtype == g.dtype and np.array_equal(w, g), name
    assert len(want[0]) < n  # the data did have duplicate codes to pool


@pytest.mark.parametrize("offsets", [[0, 2, 1, 2], [1, 2], [0, 1]])
def test_sorted_code_slots_refuses_offsets_that_are_not_csr(offsets: list[int]) -> None:
    a = np.array([1, 0])
    with pytest.raises(ValueError, match="offsets must rise"):
        sorted_code_slots(np.array(offsets), a, a.astype(np.float32), a > 0, a, np.zeros(2, np.int64))


# ------------------------------------------------------------------------------- shards


def write_shards(table: pa.Table, data_dir: Path, variant: str, rng: np.random.Generator) -> None:
    """The table's rows as 4 shards by subject, file names out of subject order."""
    sid = table["subject_id"].to_numpy()
    subjects = np.unique(sid)
    group = np.searchsorted(subjects, sid) * 4 // len(subjects)  # shard of each row
    if variant == "split_subject":
        # One subject's rows alternate between its shard and the next one (times interleave,
        # static rows land in both); another's later half moves to the first shard.
        s = subjects[len(subjects) // 4 - 1]
        rows = np.flatnonzero(sid == s)
        group[rows[1::2]] += 1
        s2 = subjects[-2]
        rows2 = np.flatnonzero(sid == s2)
        group[rows2[len(rows2) // 2 :]] = 0
    for f in data_dir.rglob("*.parquet"):
        f.unlink()
    names = ["10", "2", "0", "1"]  # path order 0, 1, 10, 2: shard 2, 3, 0, 1
    for g, name in enumerate(names):
        idx = np.flatnonzero(group == g)
        if variant == "unsorted" and g == 1:
            idx = rng.permutation(idx)
        shard = table.take(pa.array(idx))
        if variant == "microseconds" and g == 0:  # read third: after two shards of whole seconds
            us = pc.add(shard["time"].cast(pa.int64()), 1).cast(shard["time"].type)
            shard = shard.set_column(shard.schema.get_field_index("time"), "time", us)
        pq.write_table(shard, data_dir / f"{name}.parquet")


def state(seqs: SiteSequences) -> dict[str, np.ndarray]:
    out = {}
    for name, value in vars(seqs).items():
        if isinstance(value, np.ndarray):
            out[name] = value
        elif is_dataclass(value):
            arrays = {f.name: getattr(value, f.name) for f in fields(value)}  # a pool's source: the rows'
            out.update({f"{name}.{k}": v for k, v in arrays.items() if isinstance(v, np.ndarray)})
    return out


def assert_same_sequences(got: SiteSequences, want: SiteSequences) -> None:
    a, b = state(got), state(want)
    assert sorted(a) == sorted(b)
    for name in b:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert (got.n_events, got.n_epochs) == (want.n_events, want.n_epochs)


def assert_same_batches(got: SiteSequences, want: SiteSequences) -> None:
    for time_mode in ("last", "random"):
        loaders = [
            make_loader(PretrainingDataset(s, time_mode=time_mode, max_events=12, seed=1), batch_size=7, seed=2)
            for s in (got, want)
        ]
        n = 0
        for x, y in zip(*loaders, strict=True):
            for f in fields(Batch):
                u, v = getattr(x, f.name), getattr(y, f.name)
                assert u.dtype == v.dtype and u.shape == v.shape, f.name
                assert u.numpy().tobytes() == v.numpy().tobytes(), (time_mode, f.name)
            n += 1
        assert n > 1


@pytest.mark.parametrize("slice_rows", [None, 37])
@pytest.mark.parametrize("variant", ["shards", "split_subject", "unsorted", "microseconds"])
def test_loading_by_shard_equals_loading_at_once(
    hospital, tmp_path: Path, variant: str, slice_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """slice_rows 37: each shard encoded in slices of whole subjects (subject_slices), most a
    subject each, some subjects longer than a slice."""
    if slice_rows is not None:
        monkeypatch.setattr(event_rows, "SLICE_ROWS", slice_rows)
    src, vocab = hospital
    root = tmp_path / "site"
    shutil.copytree(src, root)
    site = open_site(root)  # the clean copy passes the check
    table = pa.concat_tables(pq.read_table(f) for f in parquet_files(src, DATA_SUBDIRECTORY))
    write_shards(table, root / DATA_SUBDIRECTORY, variant, np.random.default_rng(0))
    site.data_files = parquet_files(root, DATA_SUBDIRECTORY)
    assert [p.name for p in site.data_files] == ["0.parquet", "1.parquet", "10.parquet", "2.parquet"]
    for subject_ids in (None, site.subject_ids[::3]):
        for per_event in (False, True):
            streamed = SiteSequences.from_site(site, vocab, subject_ids=subject_ids, per_event=per_event)
            events = site.read_events(subject_ids=subject_ids, columns=["subject_id", "time", "code", "numeric_value"])
            at_once = SiteSequences(events, None, vocab, per_event=per_event)
            assert streamed.n_events == events.num_rows > 0
            # Times of whole seconds are kept as RowTimes; one shard with microseconds: int64.
            assert isinstance(streamed.ev_time_us, np.ndarray) == (variant == "microseconds")
            assert_same_sequences(streamed, at_once)
            if not per_event:
                assert_same_batches(streamed, at_once)
    if variant == "microseconds":
        return  # its times are not the generated site's
    # And against the site as generated (its own shards): the same batches, whatever the sharding
    # (the rows kept per row may differ in the order of rows with equal times, the tokens not).
    original = SiteSequences.from_site(open_site(src), vocab)
    assert_same_batches(SiteSequences.from_site(site, vocab), original)


def test_subject_slices_cut_a_shard_between_subjects() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, 60)
    sizes[7] = 200  # a subject longer than a slice: a slice of its own
    subject = np.repeat(np.arange(100, 160), sizes)
    table = pa.table({"subject_id": subject, "x": np.arange(len(subject))})
    slices = list(subject_slices(table, rows=50))
    assert pa.concat_tables(slices).equals(table)  # every row once, in order
    firsts = [s["subject_id"][0].as_py() for s in slices]
    lasts = [s["subject_id"][-1].as_py() for s in slices]
    assert all(a < b for a, b in zip(lasts[:-1], firsts[1:]))  # no subject in two slices
    assert len(slices) > 10 and max(s.num_rows for s in slices) == 200
    assert all(s.num_rows < 50 + 30 for s in slices if s.num_rows != 200)
    # Not grouped by subject (ascending): one slice, sorted as a whole by shard_rows.
    shuffled = table.take(pa.array(rng.permutation(len(subject))))
    assert [s.num_rows for s in subject_slices(shuffled, rows=50)] == [len(subject)]


@pytest.mark.parametrize("chunk_rows", [1, 2, 7, 1 << 20])
@pytest.mark.parametrize("window_days", [0.0, 1.0, 0.25])
def test_bucket_offsets_chunk_by_chunk_are_the_rule(chunk_rows: int, window_days: float) -> None:
    """Buckets found a chunk of rows at a time (subjects straddling chunks) are the rule's: a new
    token where the subject changes or (time - subject's first time) // window changes."""
    rng = np.random.default_rng(chunk_rows)
    subject = np.sort(rng.integers(0, 9, 400))
    time_us = rng.integers(0, 5 * US_PER_DAY, 400)
    time_us = time_us[np.lexsort((time_us, subject))]
    new = np.r_[True, subject[1:] != subject[:-1]]
    starts = np.flatnonzero(new)
    first = np.repeat(time_us[starts], np.diff(np.r_[starts, len(subject)]))
    key = (time_us - first) // int(window_days * US_PER_DAY) if window_days else time_us
    new[1:] |= key[1:] != key[:-1]
    want = np.r_[np.flatnonzero(new), len(subject)]
    assert np.array_equal(bucket_offsets(subject, time_us, window_days, chunk_rows=chunk_rows), want)


def test_subject_runs_keep_every_row_subject_and_join_a_subject_split_between_parts() -> None:
    """Runs against the per-row column they replace: the same subject per row, CSR offsets as a
    count per subject, and a subject that ends one part and starts the next is one run."""
    rng = np.random.default_rng(3)
    subject = np.repeat(np.array([4, 9, 10, 31, 77]), rng.integers(1, 6, 5))
    runs = SubjectRuns.of(subject)
    assert np.array_equal(runs.per_row(), subject) and len(runs) == len(subject)
    assert runs.ids.tolist() == [4, 9, 10, 31, 77]
    universe = np.array([1, 4, 9, 10, 20, 31, 77])
    want = np.r_[0, np.cumsum([np.sum(subject == u) for u in universe])]
    assert np.array_equal(runs.offsets_in(universe), want)
    cut = int(runs.starts[2]) + 1  # inside subject 10's rows
    joined = SubjectRuns.join([SubjectRuns.of(subject[:cut]), SubjectRuns.of(subject[cut:])])
    assert np.array_equal(joined.ids, runs.ids) and np.array_equal(joined.starts, runs.starts)
    empty = SubjectRuns.of(np.zeros(0, np.int64))
    assert len(empty) == 0 and len(SubjectRuns.join([empty, runs, empty])) == len(subject)


def test_row_times_read_back_the_microseconds_they_keep() -> None:
    """RowTimes against the int64 array it replaces, for every kind of index the loader uses,
    with segments that start before 1970 and cross slice bounds; times it cannot keep exactly
    (a microsecond, a subject spanning 137 years) are refused."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 9, 12)
    starts = np.r_[0, np.cumsum(lengths)]
    first = rng.integers(-2 * 10**9, 4 * 10**9, 12) * SECOND_US  # seconds from 1906 to 2096
    time_us = np.concatenate([f + np.sort(rng.integers(0, 10**8, n)) * SECOND_US for f, n in zip(first, lengths)])
    kept = RowTimes.of(time_us, starts)
    assert kept is not None and kept.offset.dtype == np.uint32
    n = len(time_us)
    for a, b in [(0, n), (3, 17), (starts[4], starts[6]), (5, 5), (n - 1, n), (-7, None), (None, 2)]:
        assert np.array_equal(kept[a:b], time_us[a:b]) and kept[a:b].dtype == np.int64, (a, b)
    assert np.array_equal(kept[1::3], time_us[1::3])
    for i in (0, 7, n - 1, -1):
        assert kept[i] == time_us[i]
    picks = rng.integers(0, n, 40)
    assert np.array_equal(kept[picks], time_us[picks]) and np.array_equal(np.asarray(kept), time_us)
    assert kept[[]].shape == (0,) and len(kept) == n
    assert RowTimes.of(time_us + np.r_[np.zeros(n - 1, np.int64), 1], starts) is None  # a microsecond
    span = time_us.copy()
    span[starts[1] - 1] = span[0] + 137 * 365 * 86_400 * SECOND_US  # subject 0 spans 137 years
    assert RowTimes.of(span, starts) is None


def test_disjoint_subject_order_reads_footers(hospital, tmp_path: Path) -> None:
    """Shards named out of subject order are put in it; two files sharing a subject give None."""
    src, _ = hospital
    table = pa.concat_tables(pq.read_table(f) for f in parquet_files(src, DATA_SUBDIRECTORY))
    for variant in ("shards", "split_subject"):
        data = tmp_path / variant
        data.mkdir()
        write_shards(table, data, variant, np.random.default_rng(0))
        order = disjoint_subject_order(sorted(data.glob("*.parquet")))
        if variant == "shards":
            assert order is not None and [p.stem for p in order] == ["10", "2", "0", "1"]
        else:
            assert order is None


@pytest.mark.parametrize("capacity", [0, 10**6])
def test_row_sink_places_parts_out_of_subject_order(hospital, capacity: int) -> None:
    """Parts added out of subject order (no footers: a SiteLike without data_files) and a sink
    that must grow give the rows the parts in subject order give."""
    src, vocab = hospital
    table = pa.concat_tables(pq.read_table(f) for f in parquet_files(src, DATA_SUBDIRECTORY))
    sid = table["subject_id"].to_numpy()
    cuts = np.searchsorted(sid, np.unique(sid)[[10, 20]])
    pieces = [table.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, table.num_rows])]
    rows = []
    for parts in (pieces, pieces[::-1]):
        sink = RowSink(capacity)
        for piece in parts:
            sink.add(shard_rows(piece, vocab, reading_order=True))
        rows.append(sink.rows())
    for f in fields(rows[0]):
        want, got = getattr(rows[0], f.name), getattr(rows[1], f.name)
        if f.name in ("prs_subject", "prs_trait", "prs_raw", "prs_timed", "birth_subject", "birth_time_us"):
            continue  # kept in reading order, as they always were (SiteSequences orders them)
        if f.name == "t_subject":  # runs: one per subject, whichever part it came in
            assert np.array_equal(want.ids, got.ids) and np.array_equal(want.starts, got.starts)
            assert np.array_equal(want.ids, np.unique(want.ids))
            continue
        assert np.array_equal(want, got), f.name


def test_shards_of_many_row_groups_load_as_their_table(hospital, tmp_path: Path) -> None:
    """A shard read with its codes dictionary-encoded holds one dictionary per row group (each its
    own codes, in its own order): the rows are those of the table read as strings."""
    src, vocab = hospital
    root = tmp_path / "site"
    shutil.copytree(src, root)
    site = open_site(root)
    for path in parquet_files(root, DATA_SUBDIRECTORY):
        pq.write_table(pq.read_table(path), path, row_group_size=97)
    assert pq.ParquetFile(site.data_files[0]).metadata.num_row_groups > 2
    shard = next(site.iter_event_shards(["subject_id", "time", "code", "numeric_value"], dictionary_code=True))
    assert shard["code"].num_chunks > 2 and pa.types.is_dictionary(shard["code"].type)
    events = site.read_events(columns=["subject_id", "time", "code", "numeric_value"])
    assert_same_sequences(SiteSequences.from_site(site, vocab), SiteSequences(events, None, vocab))
