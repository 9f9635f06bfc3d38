"""The run's on-disk cache of sites (healthfm_core.data.sites.site_cache): a site is opened and its
sequences prepared once per cache directory, whatever the number of processes asking, and the
cached sequences give the very samples a fresh preparation gives."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.data.sites.site_cache import (
    LOADS_FILE,
    cached_sequences,
    cached_site,
    sequence_loads,
    site_key,
)
from simulations.synthetic import generate_federation


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=20, progress=False)
    return Path(fed.site("biobank").root)


@pytest.fixture(scope="module")
def vocab(site_root: Path):
    return build_vocabulary([site_code_stats(open_site(site_root), min_subjects=2)], min_subjects=2)


def _samples(seqs: SiteSequences) -> list:
    return [seqs.sample(i, int(seqs.last_time_us[i]), max_events=32, max_patches=4) for i in range(seqs.n_subjects)]


def test_cached_sequences_equal_fresh_ones_and_are_read_only_maps(tmp_path: Path, site_root: Path, vocab) -> None:
    site = cached_site(site_root, tmp_path)
    again = cached_site(site_root, tmp_path)
    assert again.subject_counts == site.subject_counts == open_site(site_root).subject_counts
    first = cached_sequences(site, vocab, "a" * 64, tmp_path)  # built (and kept in memory)
    mapped = cached_sequences(again, vocab, "a" * 64, tmp_path)  # read back, memory-mapped
    fresh = SiteSequences.from_site(open_site(site_root), vocab)
    assert isinstance(mapped.ev_codes, np.memmap) and not mapped.ev_codes.flags.writeable
    for a, b, c in zip(_samples(fresh), _samples(first), _samples(mapped)):
        for field in ("codes", "values", "has_value", "times", "wear_epochs", "wear_epoch_mask", "prs", "prs_valid"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            np.testing.assert_array_equal(getattr(a, field), getattr(c, field))
        assert a.subject_id == c.subject_id and a.prediction_time == c.prediction_time
    assert sequence_loads(tmp_path) == {site_root.name: {"site": 1, "sequences": 1}}
    # Another setup (another vocabulary) is prepared again, once.
    cached_sequences(site, vocab, "b" * 64, tmp_path)
    cached_sequences(site, vocab, "b" * 64, tmp_path)
    assert sequence_loads(tmp_path)[site_root.name]["sequences"] == 2
    assert sorted(p.name for p in (tmp_path / site_key(site_root)).glob("seq-*")) == [
        "seq-aaaaaaaaaaaaaaaa",
        "seq-bbbbbbbbbbbbbbbb",
    ]


def test_without_a_cache_directory_nothing_is_written(tmp_path: Path, site_root: Path, vocab) -> None:
    missing = tmp_path / "not-here"  # e.g. another machine of a Ray cluster
    seqs = cached_sequences(cached_site(site_root, missing), vocab, "c" * 64, missing)
    assert seqs.n_subjects > 0 and not missing.exists()
    seqs = cached_sequences(cached_site(site_root, None), vocab, "c" * 64, None)
    assert not isinstance(seqs.ev_codes, np.memmap)


def _prepare(args: tuple[str, str, object]) -> int:
    root, cache, vocab = args
    return cached_sequences(cached_site(root, cache), vocab, "d" * 64, cache).n_subjects  # type: ignore[arg-type]


def test_concurrent_processes_prepare_a_site_once(tmp_path: Path, site_root: Path, vocab) -> None:
    with multiprocessing.get_context("fork").Pool(3) as pool:
        counts = pool.map(_prepare, [(str(site_root), str(tmp_path), vocab)] * 6)
    assert len(set(counts)) == 1 and counts[0] > 0
    rows = [json.loads(line) for line in (tmp_path / LOADS_FILE).read_text().splitlines()]
    assert sorted(r["what"] for r in rows) == ["sequences", "site"]
