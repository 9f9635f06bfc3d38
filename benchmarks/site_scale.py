"""Benchmark: each stage of a site's data path at real sizes, per MEDS row, against a raw read.

    .venv/bin/python benchmarks/site_scale.py                                  # hospital 2k/16k/64k, wearables 2k/16k
    .venv/bin/python benchmarks/site_scale.py --sizes 2000,16000 --wear-sizes 2000 --cache /data/site-scale
    .venv/bin/python benchmarks/site_scale.py --large                          # adds 256k subjects (manual run)

Sites (generated once under --cache, reused by later runs): the `hospital` scenario's
general_hospital (MIMIC-style export, ~660 MEDS rows per subject) at each of --sizes subjects,
and the `default` scenario's wearable_clinic (nearly every subject wears a device for six days,
17,280 thirty-second epochs) at each of --wear-sizes subjects. Stages, each in its own process
(so a stage's peak RSS is its own; `base` is the process with the imports and nothing done):

  raw       pyarrow.parquet.read_table of every data/ and wearables/ file (the floor any loader pays)
  check     healthfm_core.data.checks.site_check.check_site (what `client.py check` runs)
  stats     site_code_stats + build_vocabulary (saves the vocabulary the later stages use)
  load      SiteSequences.from_site of a site opened (checked) before the clock starts: the check
            is the check stage, as benchmarks/data_pipeline.py times a load
  round     load, then one round's batches: --local-steps batches of --batch-size from make_loader
            over the PretrainingDataset (the time printed is the batches' alone; RSS is load + round)
  labels    the ACES labels of --task (a shipped onset task) for every subject (task_labels_at_site)
  forward   the evaluation's forward passes (eval/row_embeddings.embed_rows, the tiny model) over
            the labelled rows of a sample of at most --eval-subjects subjects (sample_subjects; 0:
            every subject, a full evaluation), the rows landing in memory or (--forward-to disk) in
            a memory-mapped file (eval/embedding_file.py); its load and labels are not in the time,
            are in the RSS

Per stage: seconds, CPU seconds (every thread's: pyarrow reads on several), seconds per MEDS row
(per wearable epoch at the wearable site), the ratio to the raw read of the same size measured in
the same run by the wall clock and by CPU time (on a shared machine only the second stands), and
peak RSS (VmHWM of the stage's process; ru_maxrss would carry the parent's across exec). The
targets add the ratio by user CPU time: CPU time counts the kernel's too, mostly first touches of
the memory a stage keeps (a load keeps the site, a raw read one file's table at a time), which
on a virtual machine can cost more than the work (0.4 GB/s measured on the machine CI runs on). A stage whose RSS passes --max-rss-gb is killed and printed as such (a shared machine).
The targets of issue 28 are printed beside the numbers. OMP_NUM_THREADS=1 unless set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling data_pipeline ("benchmarks" is taken)

from data_pipeline import raw_read_times, user_seconds  # noqa: E402

from healthfm_core.data.checks.site_check import check_site  # noqa: E402
from healthfm_core.data.labels.task_spec import resolve_tasks  # noqa: E402
from healthfm_core.data.sequences.code_stats import site_code_stats  # noqa: E402
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, make_loader, to_us  # noqa: E402
from healthfm_core.data.sequences.vocab import build_vocabulary  # noqa: E402
from healthfm_core.data.sites.site import open_site  # noqa: E402
from healthfm_core.eval.embedding_file import embeddings_file  # noqa: E402
from healthfm_core.eval.row_embeddings import embed_rows, in_memory  # noqa: E402
from healthfm_core.eval.site_eval import task_labels_at_site  # noqa: E402
from healthfm_core.eval.subject_sample import sample_subjects  # noqa: E402
from healthfm_core.model.healthfm import init_model  # noqa: E402
from healthfm_core.protocol import FederationSetup  # noqa: E402
from healthfm_core.terms.model_config import load_model_config  # noqa: E402
from healthfm_core.terms.vocabulary import Vocabulary  # noqa: E402
from simulations.synthetic import load_scenario, synthetic_sites  # noqa: E402
from simulations.synthetic.generate import select_sites  # noqa: E402

STAGES = ["base", "raw", "check", "stats", "load", "round", "labels", "forward"]
SITES = {"hospital": ("hospital", "general_hospital"), "wearables": ("default", "wearable_clinic")}
MIN_SUBJECTS = 10
GIB = 2**30
# Issue 28's targets.
LOAD_PER_ROW_GROWTH = 1.3  # load s/row at the largest hospital size <= this x that at the smallest
LOAD_VS_RAW = 3.0  # load <= this x the raw read, every size
ROUND_RSS_64K = 2 * GIB  # load + one round at 64k subjects (~42 M rows)
BYTES_PER_ROW = 20.0  # RSS growth per MEDS row over a fixed base
WEAR_ROUND_RSS = 4 * GIB  # a 16k-wearer site: load + one round


# ---------------------------------------------------------------------------- stages (child side)


def _stage(name: str, root: Path, vocab_path: Path, args: argparse.Namespace) -> dict:
    """Run one stage in this process; its seconds and what it counted."""
    logging.basicConfig(level=logging.WARNING)
    out: dict = {}
    cpu = time.process_time()  # every thread's CPU time: a ratio a busy machine leaves standing
    if name == "base":
        t, cpu = time.perf_counter(), time.process_time()
    elif name == "raw":
        seconds, cpu, user, rows = raw_read_times(root)
        return {"seconds": seconds, "cpu": cpu, "user": user, "rows": rows}
    elif name == "check":
        t, cpu = time.perf_counter(), time.process_time()
        report = check_site(root)
        out["errors"] = report.n_errors
    elif name == "stats":
        t, cpu = time.perf_counter(), time.process_time()
        stats = site_code_stats(open_site(root), min_subjects=MIN_SUBJECTS)
        vocab = build_vocabulary([stats], min_subjects=MIN_SUBJECTS)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        vocab.save(vocab_path)
        return {"seconds": seconds, "cpu": cpu, "vocab": vocab.vocab_size}
    elif name in ("load", "round"):
        vocab = Vocabulary.load(vocab_path)
        site = open_site(root)  # its check is the check stage's, as benchmarks/data_pipeline.py times a load
        t, cpu, user = time.perf_counter(), time.process_time(), user_seconds()
        seqs = SiteSequences.from_site(site, vocab)
        out["load_seconds"], out["load_cpu"] = time.perf_counter() - t, time.process_time() - cpu
        out["user"] = user_seconds() - user
        out["events"], out["epochs"] = int(seqs.n_events), int(seqs.n_epochs)
        if name == "round":
            ds = PretrainingDataset(seqs, max_events=args.max_events, max_patches=args.max_patches)
            t, cpu = time.perf_counter(), time.process_time()
            tokens = 0
            for step, batch in enumerate(make_loader(ds, batch_size=args.batch_size, shuffle=True, seed=0)):
                tokens += int(batch.ehr_valid.sum())
                if step + 1 == args.local_steps:
                    break
            out["tokens"] = tokens
    elif name == "labels":
        site = open_site(root)
        specs = resolve_tasks([args.task])
        t, cpu = time.perf_counter(), time.process_time()
        labels = task_labels_at_site(site, specs)
        out["label_rows"] = sum(getattr(v, "num_rows", 0) for v in labels.values())
    elif name == "forward":
        site = open_site(root)
        vocab = Vocabulary.load(vocab_path)
        sample = sample_subjects(site.subject_splits()["subject_id"].to_numpy(), args.eval_subjects, key=0)
        labels = [
            v
            for v in task_labels_at_site(site, resolve_tasks([args.task]), subjects=sample).values()
            if getattr(v, "num_rows", 0)
        ]
        if not labels:
            return {"seconds": float("nan"), "note": "no labelled rows"}
        seqs = SiteSequences.from_site(site, vocab, subject_ids=sample)
        model = init_model(FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=0))
        table = labels[0]
        # --forward-to disk: the rows land in a memory-mapped file, as an evaluation with an eval directory has them.
        with tempfile.TemporaryDirectory() as tmp:
            with embeddings_file(tmp) if args.forward_to == "disk" else contextlib.nullcontext(in_memory) as rows_to:
                t, cpu = time.perf_counter(), time.process_time()
                emb = embed_rows(
                    model,
                    seqs,
                    table["subject_id"].to_numpy(),
                    to_us(table["prediction_time"]),
                    args.max_events,
                    args.max_patches,
                    batch_size=max(args.batch_size, 32),
                    rows_to=rows_to,
                )
                seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
                out["emb_mib"] = round(emb.x.nbytes / 2**20, 1)
                # Where the resident pages are as the passes end: a mapped file's count as RssFile
                # (page cache the kernel may write back and drop), held arrays as RssAnon.
                for key in ("RssAnon", "RssFile"):
                    out[key] = f"{_status_bytes('self', key) / 2**20:.0f} MiB"
        out["passes"], out["label_rows"], out["subjects"] = emb.passes, table.num_rows, len(sample)
        out["rows_to"], out["seconds"], out["cpu"] = args.forward_to, seconds, cpu
        return out
    else:
        raise SystemExit(f"unknown stage {name!r}; stages: {STAGES}")
    out["seconds"] = time.perf_counter() - t
    out.setdefault("cpu", time.process_time() - cpu)
    return out


# ---------------------------------------------------------------------------- the run (parent side)


@dataclass
class Result:
    seconds: float = float("nan")
    rss: int = 0  # bytes, ru_maxrss of the stage's process
    note: str = ""
    extra: dict = field(default_factory=dict)


def _status_bytes(pid: int | str, key: str) -> int:
    """A memory figure of /proc/<pid>/status in bytes (0 where there is none)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child's would start at the parent's peak."""
    return _status_bytes("self", "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_stage(name: str, root: Path, vocab_path: Path, args: argparse.Namespace) -> Result:
    """The stage in a child process, killed when its RSS passes --max-rss-gb or --timeout."""
    cmd = [sys.executable, __file__, "--child", name, "--child-site", str(root), "--child-vocab", str(vocab_path)]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in CHILD_ARGS]
    limit = int(args.max_rss_gb * GIB)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = ""
    while proc.poll() is None:
        if _status_bytes(proc.pid, "VmRSS") > limit:
            killed = f"killed: RSS passed {args.max_rss_gb:g} GB"
        elif time.monotonic() - start > args.timeout:
            killed = f"killed: ran past {args.timeout} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if killed:
        return Result(note=killed)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
        return Result(note=f"failed (exit {proc.returncode}): {tail[:160]}")
    blob = json.loads(lines[-1][len("RESULT ") :])
    return Result(seconds=blob.pop("seconds"), rss=blob.pop("rss"), note=blob.pop("note", ""), extra=blob)


def site_at(kind: str, n: int, args: argparse.Namespace):
    """The cached site (generated on first use): its manifest entry."""
    scenario, name = SITES[kind]
    config = select_sites(load_scenario(scenario), [name])
    out = args.cache / f"{kind}-{n}-seed{args.seed}"
    stamp = (out / "manifest.json").stat().st_mtime_ns if (out / "manifest.json").is_file() else None
    t = time.perf_counter()
    fed = synthetic_sites(out, config.model_dump(mode="json"), args.seed, n)
    if (out / "manifest.json").stat().st_mtime_ns != stamp:
        print(f"  generated {kind} site at {n:,} subjects in {time.perf_counter() - t:.0f} s", flush=True)
    return fed.sites[0]


def _vocab_path(kind: str, n: int, args: argparse.Namespace) -> Path:
    return args.cache / f"{kind}-{n}-seed{args.seed}" / "bench_vocabulary.json"


def _vocabulary(kind: str, n: int, args: argparse.Namespace) -> tuple[Path | None, str]:
    """The site's vocabulary from its stats stage; else (that stage killed) the one of the same
    kind of site at a smaller size, as a federation's vocabulary comes from other sites too."""
    own = _vocab_path(kind, n, args)
    if own.is_file():
        return own, ""
    smaller = sorted(
        int(p.parent.name.split("-")[1]) for p in args.cache.glob(f"{kind}-*-seed{args.seed}/bench_vocabulary.json")
    )
    smaller = [m for m in smaller if m < n]
    if not smaller:
        return None, ""
    return _vocab_path(kind, smaller[-1], args), f"vocabulary of the {smaller[-1]:,}-subject site"


def _fmt_rss(r: Result) -> str:
    return f"{r.rss / 2**20:>8,.0f}" if r.rss else f"{'-':>8}"


def measure(kind: str, n: int, args: argparse.Namespace) -> dict[str, Result]:
    site = site_at(kind, n, args)
    rows = site.n_events if kind == "hospital" else site.n_wearable_epochs
    unit = "MEDS row" if kind == "hospital" else "epoch"
    vocab_path = _vocab_path(kind, n, args)
    print(
        f"\n{kind} site {site.name}: {n:,} subjects, {site.n_events:,} MEDS rows, "
        f"{site.n_wearable_epochs:,} wearable epochs ({site.root})",
        flush=True,
    )
    print(
        f"  {'stage':<8}{'seconds':>9}{'cpu s':>8}{f'us/{unit}':>14}{'x raw':>7}{'x cpu':>7}{'RSS MiB':>9}{'-base':>8}  notes"
    )
    results: dict[str, Result] = {}
    for stage in [s for s in STAGES if s in args.stages]:
        vocab, note = _vocabulary(kind, n, args)
        if stage in ("load", "round", "forward") and vocab is None:
            results[stage] = Result(note="no vocabulary (run the stats stage)")
        else:
            results[stage] = run_stage(stage, site.root, vocab or vocab_path, args)
            if stage in ("load", "round", "forward") and note and not results[stage].note:
                results[stage].note = note
        r = results[stage]
        raw = results.get("raw", Result()).seconds
        raw_cpu = results.get("raw", Result()).extra.get("cpu", float("nan"))
        base = results.get("base", Result()).rss
        seconds = r.extra.get("load_seconds", r.seconds) if stage == "load" else r.seconds
        cpu = r.extra.get("load_cpu", float("nan")) if stage == "load" else r.extra.get("cpu", float("nan"))
        per = seconds / max(rows, 1) * 1e6
        compared = stage not in ("base", "raw")
        ratio = seconds / raw if raw and raw == raw and compared else float("nan")
        ratio_cpu = cpu / raw_cpu if raw_cpu and raw_cpu == raw_cpu and compared else float("nan")
        hidden = ("load_seconds", "load_cpu", "cpu") if stage == "load" else ("cpu",)
        shown = {k: v for k, v in r.extra.items() if k not in hidden}
        extras = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        notes = "; ".join(x for x in (r.note, extras) if x)
        print(
            f"  {stage:<8}{seconds:>9.2f}{cpu:>8.2f}{per:>14.3f}{ratio:>7.1f}{ratio_cpu:>7.1f}{_fmt_rss(r)}"
            f"{(r.rss - base) / 2**20 if r.rss and base else float('nan'):>8,.0f}  {notes}",
            flush=True,
        )
    results["_rows"] = Result(extra={"rows": rows})
    return results


def targets(hosp: dict[int, dict[str, Result]], wear: dict[int, dict[str, Result]]) -> None:
    """Issue 28's targets beside what was measured (a missing measurement: '-')."""
    print("\ntargets (issue 28)")

    def ok(flag: bool) -> str:
        return "met" if flag else "NOT met"

    sizes = sorted(n for n in hosp if "load" in hosp[n] and hosp[n]["load"].rss)
    per_row = {n: hosp[n]["load"].extra["load_seconds"] / hosp[n]["_rows"].extra["rows"] for n in sizes}
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        g = per_row[hi] / per_row[lo]
        print(
            f"  load s/row at {hi:,} / at {lo:,}: x{g:.2f} (target <= x{LOAD_PER_ROW_GROWTH}: {ok(g <= LOAD_PER_ROW_GROWTH)})"
        )
    for n in sizes:
        raw = hosp[n].get("raw", Result())
        if raw.seconds == raw.seconds:
            x = hosp[n]["load"].extra["load_seconds"] / raw.seconds
            x_cpu = hosp[n]["load"].extra.get("load_cpu", float("nan")) / raw.extra.get("cpu", float("nan"))
            raw_user = raw.extra.get("user", float("nan"))
            x_user = hosp[n]["load"].extra.get("user", float("nan")) / raw_user if raw_user > 0 else float("nan")
            print(
                f"  load / raw read at {n:,}: x{x:.1f} wall, x{x_cpu:.1f} CPU time, x{x_user:.1f} user CPU time "
                f"(target <= x{LOAD_VS_RAW:g}: {ok(x <= LOAD_VS_RAW)} by the wall clock, {ok(x_cpu <= LOAD_VS_RAW)} by "
                f"CPU time, {ok(x_user <= LOAD_VS_RAW)} by user CPU time)"
            )
    rounds = sorted(n for n in hosp if "round" in hosp[n] and hosp[n]["round"].rss)
    for n in rounds:
        if n >= 64_000:
            rss = hosp[n]["round"].rss
            print(
                f"  load + one round RSS at {n:,}: {rss / GIB:.2f} GiB "
                f"(target at 64k <= {ROUND_RSS_64K / GIB:g} GiB: {ok(rss <= ROUND_RSS_64K)})"
            )
    if len(rounds) >= 2:
        lo, hi = rounds[0], rounds[-1]
        d_rows = hosp[hi]["_rows"].extra["rows"] - hosp[lo]["_rows"].extra["rows"]
        slope = (hosp[hi]["round"].rss - hosp[lo]["round"].rss) / max(d_rows, 1)
        print(
            f"  load + round RSS growth {lo:,} -> {hi:,}: {slope:.0f} bytes per MEDS row "
            f"(target <= {BYTES_PER_ROW:g}: {ok(slope <= BYTES_PER_ROW)})"
        )
    for n, res in sorted(wear.items()):
        r = res.get("round", Result())
        if n >= 16_000:
            text = f"{r.rss / GIB:.2f} GiB" if r.rss else r.note or "-"
            print(
                f"  wearables at {n:,} subjects, load + one round: {text} "
                f"(target <= {WEAR_ROUND_RSS / GIB:g} GiB: {ok(bool(r.rss) and r.rss <= WEAR_ROUND_RSS)})"
            )


CHILD_ARGS = ["max_events", "max_patches", "batch_size", "local_steps", "task", "eval_subjects", "forward_to"]


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("runs/site-scale"), help="generated sites, reused across runs")
    p.add_argument("--sizes", type=_sizes, default=[2000, 16000, 64000], help="hospital subjects, comma-separated")
    p.add_argument("--wear-sizes", type=_sizes, default=[2000, 16000], help="wearable-site subjects ('' for none)")
    p.add_argument("--large", action="store_true", help="add 256,000 hospital subjects (a manual run)")
    p.add_argument("--stages", type=lambda s: s.split(","), default=STAGES, help=f"of {','.join(STAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--local-steps", type=int, default=10, help="one round (FederationConfig.local_steps, server/config.py)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-events", type=int, default=256)
    p.add_argument("--max-patches", type=int, default=32)
    p.add_argument("--task", default="onset_t2d_365d", help="the ACES task labelled")
    p.add_argument(
        "--eval-subjects", type=int, default=1000, help="the capped evaluation sample (forward; 0: every subject)"
    )
    p.add_argument(
        "--forward-to",
        choices=["memory", "disk"],
        default="memory",
        help="where forward's embeddings land: in memory, or a memory-mapped file in a temporary directory",
    )
    p.add_argument("--max-rss-gb", type=float, default=10.0, help="kill a stage whose RSS passes this")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per stage")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-site", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-vocab", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = _stage(args.child, args.child_site, args.child_vocab, args)
        out["rss"] = _peak_rss()
        print("RESULT " + json.dumps(out), flush=True)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the children inherit it
    logging.basicConfig(level=logging.WARNING)
    if unknown := [s for s in args.stages if s not in STAGES]:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {STAGES}")
    sizes = sorted(set(args.sizes + ([256_000] if args.large else [])))
    print(
        f"site_scale: hospital {sizes}, wearables {args.wear_sizes}, stages {','.join(args.stages)}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} cores, cache {args.cache}; "
        f"round = {args.local_steps} x {args.batch_size}; RSS limit {args.max_rss_gb:g} GB per stage",
        flush=True,
    )
    hosp = {n: measure("hospital", n, args) for n in sizes}
    wear = {n: measure("wearables", n, args) for n in args.wear_sizes}
    targets(hosp, wear)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
