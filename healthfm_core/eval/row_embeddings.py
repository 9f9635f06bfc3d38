"""Embeddings of a site's evaluation rows, one forward pass per group of rows a pass can serve.

An evaluation row is a (subject, prediction_time); a subject has several. A time-causal model
(`QueryEmbedder`: HealthFM, the pooling wrapper) embeds all the rows of one group, those
`healthfm_core/data/sequences/shared_passes.py` finds its pass answers exactly, in the pass of the group's
latest row, with one query token per row. Any other model (the tabular baseline), or
`shared=False`, gets one pass per row, as a loader of the rows would give. Either way the rows
come back in the order asked, with the modalities each row has at its own prediction time.

Measured (benchmarks/eval_cost.py, column `shared`): the synthetic EHR sites' ~7,300 rows of
~2,000 subjects are ~2,000 passes; the wearable clinic's 13,400 rows are 9,400 (its sliding
`max_patches` window and wear-period rows that cut a patch keep most rows apart). At the
hospital scenario's dense exports (`--scenario hospital`) a visit's prediction time usually falls
inside a day with later rows (that day's labs), which cuts the day's token: 211 rows -> 143
passes, every cut row its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.data.sequences.shared_passes import MAX_QUERIES, shared_passes
from healthfm_core.data.sequences.tokens import US_PER_DAY, SiteSequences
from healthfm_core.data.sequences.wear_patches import NO_TIME
from healthfm_core.model.capabilities import Embedder, QueryEmbedder
from healthfm_core.terms.site_layout import MODALITIES

# Where embed_rows lands its rows: (rows, width, the narrowest float dtype that holds the model's
# output exactly) -> an [rows, width] array. The default keeps them in memory (float64, as always);
# eval/embedding_file.py streams them to a memory-mapped file instead.
RowArray = Callable[[int, int, type[np.floating]], np.ndarray]


def in_memory(n: int, d: int, exact: type[np.floating]) -> np.ndarray:
    """The rows in memory, float64 whatever the model's precision (today's RowEmbeddings.x)."""
    return np.zeros((n, d), np.float64)


@dataclass
class RowEmbeddings:
    """One row per asked (subject, prediction_time), in the order asked."""

    x: np.ndarray  # [n, d] float64 in memory (default), or where `rows_to` put them
    present: np.ndarray  # [n, len(MODALITIES)] bool: the row has a token of that modality
    passes: int  # forward passes run


def restrict_modalities(batch: Batch, keep: Iterable[str]) -> Batch:
    """The batch with every modality outside `keep` removed (as if the subject had none): the
    test-time ablation. Removing EHR also removes static rows (they are EHR tokens) and the age
    (MEDS_BIRTH is an EHR row)."""
    keep = set(keep)
    if unknown := keep - set(MODALITIES):
        raise ValueError(f"unknown modalities {sorted(unknown)}; expected a subset of {MODALITIES}")
    changes: dict[str, torch.Tensor] = {}
    if "ehr" not in keep:
        changes["ehr_valid"] = torch.zeros_like(batch.ehr_valid)
        changes["has_value"] = torch.zeros_like(batch.has_value)
        changes["birth_time"] = torch.full_like(batch.birth_time, float("nan"))  # age comes from the EHR
    if "wearables" not in keep:
        changes["wear_valid"] = torch.zeros_like(batch.wear_valid)
        changes["wear_epoch_mask"] = torch.zeros_like(batch.wear_epoch_mask)
    if "genomics" not in keep:
        changes["prs_valid"] = torch.zeros_like(batch.prs_valid)
    return replace(batch, **changes) if changes else batch


def _query_days(seqs: SiteSequences, index: np.ndarray, pt_us: np.ndarray) -> np.ndarray:
    """Each row's prediction time in days on its subject's clock, as SiteSequences.batch puts it
    in Batch.prediction_time (the same float64 division, then float32)."""
    t0 = seqs.t0_us[index]
    t0 = np.where(t0 == NO_TIME, pt_us, t0)
    return ((pt_us - t0) / US_PER_DAY).astype(np.float32)


def embed_rows(
    model: torch.nn.Module,
    seqs: SiteSequences,
    subject_ids: np.ndarray,
    prediction_time_us: np.ndarray,
    max_events: int,
    max_patches: int,
    batch_size: int = 64,
    keep: Iterable[str] | None = None,
    shared: bool = True,
    max_queries: int = MAX_QUERIES,
    progress: bool = False,
    rows_to: RowArray = in_memory,
) -> RowEmbeddings:
    """The model's embedding of every row (`keep`: the modalities left in each pass, the
    test-time ablation; presence is recorded before it); at most `max_queries` rows per pass. The model runs in eval mode under
    torch.inference_mode and gets its training mode back afterwards. `rows_to` gives the array
    the rows land in, batch by batch (called once, at the first pass: the width is the model's)."""
    if not isinstance(model, Embedder):
        raise TypeError(f"embed_rows: model {type(model).__name__} has no embed method")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = seqs.index_of(subject_ids)
    pt_us = np.asarray(prediction_time_us, dtype=np.int64).reshape(-1)
    n = len(index)
    if n == 0:
        raise ValueError("embed_rows: no rows to embed")
    by_query = shared and isinstance(model, QueryEmbedder)
    lead = shared_passes(seqs, index, pt_us, max_events, max_patches, max_queries) if by_query else np.arange(n)
    # Passes in the order of their lead row; each pass's rows by time (the lead is the latest).
    leads, pass_of = np.unique(lead, return_inverse=True)
    order = np.lexsort((pt_us, pass_of))
    counts = np.bincount(pass_of, minlength=len(leads))
    slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)  # position within its pass
    rows_of = np.full((len(leads), int(counts.max())), -1, np.int64)
    rows_of[pass_of[order], slot] = order
    query_days = _query_days(seqs, index, pt_us)

    device = next(model.parameters()).device
    x: np.ndarray | None = None
    present = np.zeros((n, len(MODALITIES)), bool)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(leads), batch_size), desc="embeddings", disable=not progress, leave=False):
                chunk = np.arange(start, min(start + batch_size, len(leads)))
                rows = rows_of[chunk, : int(counts[chunk].max())]  # [b, Q], -1 padding
                batch = seqs.batch(index[leads[chunk]], pt_us[leads[chunk]], max_events, max_patches)
                # Padding slots ask again at the pass's own time and are dropped.
                qt = np.where(rows >= 0, query_days[np.maximum(rows, 0)], query_days[leads[chunk]][:, None])
                query_time = torch.from_numpy(qt)
                own = torch.from_numpy(rows == leads[chunk][:, None])
                has = batch.has_modality()
                at = batch.has_modality_at(query_time)
                # A lead's presence is its sample's own; a joined row's, the tokens read by its time.
                got = torch.stack([torch.where(own, has[m][:, None], at[m]) for m in MODALITIES], dim=2).numpy()
                fed: Batch = batch if keep is None else restrict_modalities(batch, keep)
                fed = fed.to(device)
                if by_query:
                    assert isinstance(model, QueryEmbedder)
                    out = model.embed_at(fed, query_time.to(device))
                else:
                    out = model.embed(fed)[:, None]
                if x is None:
                    x = rows_to(n, out.shape[-1], np.float64 if out.dtype == torch.float64 else np.float32)
                emb = out.detach().to("cpu", torch.float64).numpy()
                real = rows >= 0
                x[rows[real]] = emb[real]
                present[rows[real]] = got[real]
    finally:
        model.train(was_training)
    assert x is not None  # n > 0 rows, so at least one pass ran
    return RowEmbeddings(x=x, present=present, passes=len(leads))


__all__ = ["RowArray", "RowEmbeddings", "embed_rows", "in_memory", "restrict_modalities"]
