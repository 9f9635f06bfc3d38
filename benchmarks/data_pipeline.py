"""Benchmark: events per second from a site's parquet files to padded `Batch`es, and peak memory.

    .venv/bin/python benchmarks/data_pipeline.py                       # generate one default site
    .venv/bin/python benchmarks/data_pipeline.py --site runs/demo/sites/biobank
    .venv/bin/python benchmarks/data_pipeline.py --n-subjects 500 --site-name wearable_clinic

Without --site, one site of the `default` synthetic scenario (biobank: EHR, wearables for a third
of the subjects, PRS) is generated into a temporary directory (or --out) with
simulations.synthetic. Stages timed:

  stats    site_code_stats + build_vocabulary (what a federation does once)
  load     SiteSequences.from_site: parquet -> columnar arrays, ids, normalisation, patches
           (the wearables' channel pass runs in a thread while the EHR rows are tokenised)
  batches  every pretraining sample (whole history, most recent max_events / max_patches)
           in Batches from make_loader (each built at once by SiteSequences.batch)

Times are medians of --repeats runs (raw read and pipeline interleaved); each run's ratio is
printed too. events/s = MEDS rows / (load + batches); rows/s also counts wearable epochs. Baseline, measured
in the same run: `pyarrow.parquet.read_table` of the same files (every column, nothing else
done), the floor any loader pays; load and load + batches are printed as multiples of it. Also
printed: the same read keeping every table (a loader holds its data; fresh memory is not free).
Peak memory: the
process's ru_maxrss (includes torch and Python), Arrow's memory pool peak, and the tracemalloc
peak (numpy and Python allocations) of a second, traced run of load + batches.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from healthfm_core.data.sequences.code_stats import site_code_stats  # noqa: E402
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, make_loader  # noqa: E402
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.data.sites.site import open_site  # noqa: E402
from simulations.synthetic import generate_federation  # noqa: E402
from simulations.synthetic.scenario import load_scenario  # noqa: E402

log = logging.getLogger("benchmarks.data_pipeline")


def generate_site(out: Path, n_subjects: int, site_name: str, seed: int) -> Path:
    """One site of the default scenario (the others are not generated)."""
    config = load_scenario("default")
    chosen = [s for s in config.sites if s.name == site_name]
    if not chosen:
        raise SystemExit(f"scenario 'default' has no site {site_name!r}; sites: {[s.name for s in config.sites]}")
    config = config.model_copy(update={"sites": chosen})
    t = time.perf_counter()
    fed = generate_federation(out, scenario=config, seed=seed, n_subjects=n_subjects, progress=False)
    print(f"generated {site_name} ({n_subjects} subjects) in {time.perf_counter() - t:.1f} s")
    return fed.sites[0].root


def run_pipeline(site_root: Path, vocab, batch_size: int, max_events: int, max_patches: int, patch_epochs: int):
    site = open_site(site_root)
    t0 = time.perf_counter()
    seqs = SiteSequences.from_site(site, vocab, patch_epochs=patch_epochs)
    t1 = time.perf_counter()
    ds = PretrainingDataset(seqs, max_events=max_events, max_patches=max_patches)
    n_batches = n_tokens = n_patches = 0
    for batch in make_loader(ds, batch_size=batch_size, shuffle=True, seed=0):
        n_batches += 1
        n_tokens += int(batch.ehr_valid.sum())
        n_patches += int(batch.wear_valid.sum())
    t2 = time.perf_counter()
    return seqs, t1 - t0, t2 - t1, n_batches, n_tokens, n_patches


def raw_read_seconds(site_root: Path) -> tuple[float, int]:
    """The baseline: pq.read_table of every parquet file of the site's data/ and wearables/."""
    seconds, _, _, rows = raw_read_times(site_root)
    return seconds, rows


def user_seconds() -> float:
    """This process's user CPU seconds, every thread's (getrusage: microseconds, where os.times
    counts 10 ms clock ticks, too coarse for a small site's read)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def raw_read_times(site_root: Path) -> tuple[float, float, float, int]:
    """The baseline's wall seconds, CPU seconds and user CPU seconds (every thread's) and rows;
    the site is opened (checked) before any clock starts."""
    site = open_site(site_root)
    t, cpu, user = time.perf_counter(), time.process_time(), user_seconds()
    rows = sum(pq.read_table(path).num_rows for path in [*site.data_files, *site.wearable_files])
    return time.perf_counter() - t, time.process_time() - cpu, user_seconds() - user, rows


def raw_read_held_seconds(site_root: Path) -> float:
    """The same read, every table kept until the last is read (as a loader holds its data):
    fresh memory for all of it instead of one file's worth reused."""
    site = open_site(site_root)
    t = time.perf_counter()
    tables = [pq.read_table(path) for path in [*site.data_files, *site.wearable_files]]
    seconds = time.perf_counter() - t
    del tables
    gc.collect()
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site", type=Path, help="an existing site root (else one is generated)")
    p.add_argument("--out", type=Path, help="where to generate the site (default: a temp dir)")
    p.add_argument("--site-name", default="biobank", help="site of the default scenario to generate")
    p.add_argument("--n-subjects", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-events", type=int, default=512)
    p.add_argument("--max-patches", type=int, default=64)
    p.add_argument("--patch-epochs", type=int, default=120)
    p.add_argument("--min-subjects", type=int, default=10)
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the traced second run")
    p.add_argument("--repeats", type=int, default=3, help="raw reads and pipeline runs, interleaved; medians")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    tmp = None
    if args.site is None:
        out = args.out
        if out is None:
            tmp = tempfile.TemporaryDirectory(prefix="healthfm_bench_")
            out = Path(tmp.name)
        site_root = generate_site(out, args.n_subjects, args.site_name, args.seed)
    else:
        site_root = args.site
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    t = time.perf_counter()
    site = open_site(site_root)
    t_open = time.perf_counter() - t
    t = time.perf_counter()
    vocab = build_vocabulary([site_code_stats(site, min_subjects=args.min_subjects)], min_subjects=args.min_subjects)
    t_stats = time.perf_counter() - t

    pool = pa.default_memory_pool()
    raws, helds, loads, batches = [], [], [], []
    for _ in range(max(1, args.repeats)):  # interleaved: a busy spell hits both sides alike
        t_raw, raw_rows = raw_read_seconds(site_root)
        raws.append(t_raw)
        helds.append(raw_read_held_seconds(site_root))
        seqs, t_load, t_batches, n_batches, n_tokens, n_patches = run_pipeline(
            site_root, vocab, args.batch_size, args.max_events, args.max_patches, args.patch_epochs
        )
        loads.append(t_load)
        batches.append(t_batches)
        n_events, n_epochs = seqs.n_events, seqs.n_epochs
        n_samples = len(PretrainingDataset(seqs))
        del seqs
        gc.collect()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arrow_peak = pool.max_memory()
    ratios = [(a + b) / max(r, 1e-9) for a, b, r in zip(loads, batches, raws)]
    t_raw, t_raw_held = statistics.median(raws), statistics.median(helds)
    t_load, t_batches = statistics.median(loads), statistics.median(batches)

    traced_peak = None
    if not args.no_tracemalloc:
        tracemalloc.start()
        run_pipeline(site_root, vocab, args.batch_size, args.max_events, args.max_patches, args.patch_epochs)
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    total = t_load + t_batches
    mib = 1 / 2**20
    print(f"site {site_root}")
    print(
        f"  subjects {site.summary.n_subjects}, MEDS rows {n_events:,}, wearable epochs {n_epochs:,}, "
        f"vocabulary {vocab.vocab_size} ids, PRS traits {vocab.prs_traits}"
    )
    print(f"  open_site (validation)       {t_open:7.2f} s")
    print(f"  stats + vocabulary           {t_stats:7.2f} s")
    print(f"  load (parquet -> arrays)     {t_load:7.2f} s")
    print(
        f"  {n_samples} samples -> {n_batches} batches of {args.batch_size} "
        f"({n_tokens:,} EHR tokens, {n_patches:,} patches)  {t_batches:7.2f} s "
        f"({n_samples / max(t_batches, 1e-9):,.0f} samples/s)"
    )
    print(
        f"  events/s parquet -> batches  {n_events / total:,.0f} MEDS rows/s; "
        f"{(n_events + n_epochs) / total:,.0f} rows/s counting wearable epochs"
    )
    print(
        f"  baseline pq.read_table of the same files ({raw_rows:,} rows) {t_raw:7.2f} s: load is "
        f"x{t_load / max(t_raw, 1e-9):.1f} the raw read, parquet -> batches x{total / max(t_raw, 1e-9):.1f}"
    )
    print(f"  per repeat, parquet -> batches / raw read: {', '.join(f'x{r:.1f}' for r in ratios)}")
    print(
        f"  the same read holding every table {t_raw_held:7.2f} s: parquet -> batches "
        f"x{total / max(t_raw_held, 1e-9):.1f} of it"
    )
    print(
        f"  peak memory: ru_maxrss {rss1 / 1024:,.0f} MiB (before loading {rss0 / 1024:,.0f} MiB); "
        f"arrow pool peak {arrow_peak * mib:,.0f} MiB"
        + (f"; tracemalloc peak {traced_peak * mib:,.0f} MiB" if traced_peak is not None else "")
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
