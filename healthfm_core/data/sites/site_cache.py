"""A run's on-disk cache of its sites: each site opened (checked) and its sequences prepared
once per run, however many processes serve it.

Why a disk cache, and not one actor per site or Ray's object store: Flower's simulation engine
hands each message to whichever actor is free and cannot pin a site to an actor, so with A
actors every actor ends up opening and preparing every site (A x sites full reads of the site's
parquet, 15-25 s each on the default scenario, in rounds 1-2). Fewer actors cut the parallelism;
the object store would need the driver to prepare every site (it does not hold the agreed
vocabulary before round 0 ends, and would then hold all sites' arrays in one process) and would
tie the site code to Ray. A directory of .npy files works for any process on the machine, costs
one write, and is memory-mapped on read: the pages live once in the OS page cache, shared by all
actors, instead of once per actor.

Layout, under a directory the run creates and removes (simulations/run.py: a temporary
directory; node config `sequence-cache`):

    CACHE/<site key>/site.pkl            the opened Site (open_site's check ran once)
    CACHE/<site key>/seq-<setup key>/    one .npy per array attribute of SiteSequences, rest.pkl
    CACHE/loads.jsonl                    one line per build: what `sequence_loads` counts

The site key is the site root's resolved path, hashed; the setup key the federation setup's
sha256 (the vocabulary is in it). A builder holds an exclusive flock on the entry, so concurrent
processes build once and the others wait and read; an entry is complete when renamed into place.
The pickles are read only from the run's own private directory (mode 0700), never from a peer.
A cache directory that does not exist here (a Ray cluster of several machines) means no cache:
the site is opened and prepared in memory, as without one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sites.site import Site, open_site
from healthfm_core.strict_files import strict_json
from healthfm_core.terms.token_settings import DEFAULT_TOKENS, TokenSettings
from healthfm_core.terms.vocabulary import Vocabulary

log = logging.getLogger(__name__)

# glibc's malloc_trim (None elsewhere: macOS, musl): gives freed heap pages back to the OS.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):
    _LIBC = None

LOADS_FILE = "loads.jsonl"
SITE_FILE = "site.pkl"
REST_FILE = "rest.pkl"


def site_key(root: str | Path) -> str:
    resolved = str(Path(root).resolve())
    return f"{Path(resolved).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}"


def cached_site(root: str | Path, cache_dir: str | Path | None) -> Site:
    """open_site(root), run once per cache directory (None or absent here: every time)."""
    usable = _usable(cache_dir)
    if usable is None:
        return _open(root)
    entry = usable / site_key(root)
    path = entry / SITE_FILE
    with _locked(entry):
        if path.is_file():
            with open(path, "rb") as f:
                site: Site = pickle.load(f)
            return site
        t0 = time.perf_counter()
        site = _open(root)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(site, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
        _record(usable, "site", root, time.perf_counter() - t0)
        return site


def cached_sequences(
    site: Site, vocab: Vocabulary, setup_key: str, cache_dir: str | Path | None, tokens: TokenSettings = DEFAULT_TOKENS
) -> SiteSequences:
    """SiteSequences.from_site(site, vocab, tokens=tokens), built once per cache directory and setup and then
    memory-mapped (read-only arrays) by every process that asks (None or absent: built here)."""
    usable = _usable(cache_dir)
    if usable is None:
        return _build(site, vocab, tokens, None)
    entry = usable / site_key(site.root)
    final = entry / f"seq-{setup_key[:16]}"
    with _locked(entry):
        if not final.is_dir():
            tmp = entry / f".seq-{setup_key[:16]}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            t0 = time.perf_counter()
            seqs = _build(site, vocab, tokens, usable)
            _save(seqs, tmp)
            tmp.rename(final)
            _record(usable, "sequences", site.root, time.perf_counter() - t0)
            return seqs
    return _load(final)


def sequence_loads(cache_dir: str | Path) -> dict[str, Counter[str]]:
    """What was built in a cache directory: per site name, {"site": n, "sequences": n}."""
    path = Path(cache_dir) / LOADS_FILE
    out: dict[str, Counter[str]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = strict_json(line, path)
            out.setdefault(row["site"], Counter())[row["what"]] += 1
    return out


def log_sequence_loads(cache_dir: str | Path) -> dict[str, Counter[str]]:
    """Log, per site, how many times it was opened and prepared in the run (1 and 1 per setup)."""
    loads = sequence_loads(cache_dir)
    for name, counts in sorted(loads.items()):
        log.info(
            "site %s: opened %d time(s), sequences prepared %d time(s) in this run",
            name,
            counts["site"],
            counts["sequences"],
        )
    return loads


def _open(root: str | Path) -> Site:
    site = open_site(root)
    _give_back_memory()
    return site


def _build(site: Site, vocab: Vocabulary, tokens: TokenSettings, cache_dir: Path | None) -> SiteSequences:
    t0 = time.perf_counter()
    seqs = SiteSequences.from_site(site, vocab, tokens=tokens)
    _give_back_memory()
    log.info(
        "site %s: sequences built in %.1f s (pid %d, %s)",
        site.root.name,
        time.perf_counter() - t0,
        os.getpid(),
        f"cached in {cache_dir}" if cache_dir is not None else "not cached",
    )
    return seqs


def _save(seqs: SiteSequences, into: Path) -> None:
    """Plain numeric arrays as .npy (memory-mappable); everything else, and empty arrays, pickled."""
    rest = {}
    for name, value in vars(seqs).items():
        if isinstance(value, np.ndarray) and value.size and not value.dtype.hasobject:
            np.save(into / f"{name}.npy", np.ascontiguousarray(value), allow_pickle=False)
        else:
            rest[name] = value
    with open(into / REST_FILE, "wb") as f:
        pickle.dump(rest, f, protocol=pickle.HIGHEST_PROTOCOL)


def _load(entry: Path) -> SiteSequences:
    seqs = SiteSequences.__new__(SiteSequences)  # the attributes saved by _save, not rebuilt
    with open(entry / REST_FILE, "rb") as f:
        state = pickle.load(f)
    for path in entry.glob("*.npy"):
        state[path.stem] = np.load(path, mmap_mode="r", allow_pickle=False)
    seqs.__dict__.update(state)
    return seqs


def _give_back_memory() -> None:
    """Reading a site's parquet leaves far more freed memory in Arrow's pool and the C heap than
    the arrays kept (biobank of 100 subjects: +140 MB for 13 MB of arrays); a long-lived site
    process (a simulation's actor) would carry it to the end. Returned to the OS here."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _usable(cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        return None
    path = Path(cache_dir)
    if not path.is_dir():
        log.info("sequence cache %s does not exist on this machine: sites are prepared in memory", path)
        return None
    return path


@contextmanager
def _locked(entry: Path) -> Iterator[None]:
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record(cache_dir: Path, what: str, root: str | Path, seconds: float) -> None:
    row = {"site": Path(root).resolve().name, "what": what, "pid": os.getpid(), "seconds": round(seconds, 3)}
    with open(cache_dir / LOADS_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row) + "\n")


__all__ = ["cached_sequences", "cached_site", "log_sequence_loads", "sequence_loads", "site_key"]
