"""History tokens on a hospital-like export: coverage of history, batch shape and CPU step time.

    python benchmarks/history_tokens.py SITE_ROOT [--model small] [--max-events 256] [--steps 4]

Run from the repository root with PYTHONPATH=. . SITE_ROOT is a MEDS site (e.g. one of `python -m simulations.synthetic OUT --scenario
hospital`). Prints the history coverage at `--max-events` tokens per event, per timestamp and
per day, then times `--steps` pretraining steps (batch `--batch-size`, the federation default)
of the model on the pipeline's batches: set OMP_NUM_THREADS=1 for comparable numbers. The parquet
files are read directly (no site check), so the script runs on exports `check` would refuse.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from healthfm_core.data.checks.coverage import history_coverage_days
from healthfm_core.data.sequences.code_stats import events_code_stats
from healthfm_core.data.sequences.tokens import PretrainingDataset, SiteSequences, collate
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights


def read_events(site_root: Path) -> pa.Table:
    files = sorted(glob.glob(str(site_root / "data" / "**" / "*.parquet"), recursive=True))
    table = pq.ParquetDataset(files).read(columns=["subject_id", "time", "code", "numeric_value"])
    return table.cast(
        pa.schema(
            [
                ("subject_id", pa.int64()),
                ("time", table.schema.field("time").type),
                ("code", pa.string()),
                ("numeric_value", pa.float32()),
            ]
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site_root", type=Path)
    parser.add_argument("--model", default="small")
    parser.add_argument("--max-events", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--time-mode", choices=["random", "last"], default="random")
    parser.add_argument("--token-window-days", type=float, default=None, help="default: the pipeline's")
    args = parser.parse_args()
    torch.manual_seed(0)
    events = read_events(args.site_root)
    vocab = build_vocabulary([events_code_stats(events)], min_subjects=10)
    for kw in ({"per_event": True}, {"token_window_days": 0.0}, {}):
        cov = history_coverage_days(events.select(["subject_id", "time", "code"]), args.max_events, **kw)
        print("coverage", json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in cov.items()}))
    kwargs = {} if args.token_window_days is None else {"token_window_days": args.token_window_days}
    t = time.process_time()
    seqs = SiteSequences(events, None, vocab, **kwargs)
    print(f"load {time.process_time() - t:.2f} s CPU, {seqs.n_subjects} subjects, vocabulary {vocab.vocab_size}")
    data = PretrainingDataset(seqs, time_mode=args.time_mode, max_events=args.max_events)
    model = HealthFM(load_model_config(args.model), vocab.vocab_size, max(1, vocab.n_prs_traits)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    collate_s, step_s = [], []
    for step in range(args.steps + 1):  # step 0 warms up
        idx = torch.randint(len(data), (args.batch_size,), generator=generator).tolist()
        t = time.process_time()
        batch = collate([data[i] for i in idx])
        if batch.prs.shape[1] == 0:  # an EHR-only site: the model still wants one PRS column
            batch = replace(batch, prs=torch.zeros(len(idx), 1), prs_valid=torch.zeros(len(idx), 1, dtype=torch.bool))
        t_collate = time.process_time() - t
        t = time.process_time()
        losses = model.pretraining_losses(batch, ObjectiveWeights(), generator)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        t_step = time.process_time() - t
        if step:
            collate_s.append(t_collate)
            step_s.append(t_step)
        print(
            f"step {step}: codes {tuple(batch.codes.shape)}, tokens {int(batch.ehr_valid.sum())}, "
            f"collate {t_collate:.3f} s, forward+backward+step {t_step:.2f} s CPU"
        )
    print(
        f"mean over {args.steps} steps: collate {sum(collate_s) / len(collate_s):.3f} s, "
        f"step {sum(step_s) / len(step_s):.2f} s CPU (OMP_NUM_THREADS={torch.get_num_threads()})"
    )


if __name__ == "__main__":
    main()
