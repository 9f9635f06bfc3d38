"""Which evaluation rows of one subject one forward pass can serve: time-causal attention lets a
pass at the subject's latest prediction time answer its earlier ones.

Why: evaluation embeds every (subject, prediction_time) row, and a subject has several (each
visit, each wear period): 6-7 per subject at the synthetic sites, so the forward passes were 6-7
times the subjects. The backbone is time-causal and no token reads a query token
(healthfm.HealthFM.forward), so in a pass over the sample at time T, a query token at t <= T
reads exactly the tokens of that pass whose time is <= t, and their states depend only on
tokens at or before t. The pass's query at t therefore gives row t's embedding exactly when the
pass's tokens up to t are the tokens of row t's own sample (tokens.py's rules):

- the same EHR window: the most recent `max_events` tokens start at the same bucket at t and at
  T (nothing older was pushed out by the events in between);
- row t does not cut a bucket: its last visible bucket holds all of that bucket's rows. A cut
  bucket is a partial token at t but the whole bucket, at a later time, in the pass at T;
- the same wearable window (`max_patches`), and row t's last visible patch ends at or before t
  (a patch straddling t is truncated and placed at t in its own sample, whole and later at T);
- the subject has a clock (t0: a timed event or an epoch) and t >= t0, so the static token
  (time 0) is before the query in both.

Rows that satisfy these join the pass of the latest row with the same windows; every other row
is its own pass. The wearable and genomics encoders see each patch and each subject alone, so
nothing else differs. Checked against one pass per row, embedding for embedding, in
tests/unit/test_shared_passes.py; the per-event comparison layout (`per_event`) always gets one pass
per row.
"""

from __future__ import annotations

import numpy as np

from healthfm_core.data.files.layout import EPOCH_US
from healthfm_core.data.sequences.tokens import SiteSequences
from healthfm_core.data.sequences.wear_patches import NO_TIME

# Rows one pass serves at most: each is a query token in the pass's sequence.
MAX_QUERIES = 32


def shared_passes(
    seqs: SiteSequences,
    index: np.ndarray,
    prediction_time_us: np.ndarray,
    max_events: int,
    max_patches: int,
    max_queries: int = MAX_QUERIES,
) -> np.ndarray:
    """For each row (subject row `index[i]` of `seqs`, at `prediction_time_us[i]`), the position
    of the row whose forward pass serves it: itself when it leads a pass, else a row of the same
    subject at a later or equal time whose pass gives its embedding exactly (module docstring);
    at most `max_queries` rows per pass."""
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    pt = np.asarray(prediction_time_us, dtype=np.int64).reshape(-1)
    if len(idx) != len(pt):
        raise ValueError(f"{len(idx)} subject rows but {len(pt)} prediction times")
    lead = np.arange(len(idx), dtype=np.int64)
    if seqs.per_event or not len(idx):
        return lead

    # The windows of each row's own sample, as SiteSequences.batch keeps them.
    w = seqs.windows(idx, pt, max_events, max_patches)
    b_first = np.where(w.timed, w.b_first, -1)
    # A row without visible events has no EHR window of its own: it may join an untruncated pass.
    a, b = seqs.ev_offsets[idx], seqs.ev_offsets[idx + 1]
    no_ev = np.flatnonzero(~w.timed & (b > a))
    b_first[no_ev] = seqs.bucket_of(a[no_ev])
    cut, p_start, p_vis = w.cut, w.p_start, w.p_vis
    # Its last visible patch straddles the prediction time (its late epochs hidden).
    straddle = np.zeros(len(idx), bool)
    has = np.flatnonzero(p_vis > p_start)
    straddle[has] = seqs.patch_start_us[p_vis[has] - 1] + seqs.patch_epochs * EPOCH_US > pt[has]

    t0 = seqs.t0_us[idx]
    shareable = (t0 != NO_TIME) & (pt >= t0)
    complete = shareable & ~cut & ~straddle

    # Group by (subject, EHR window start, wearable window start); the latest row leads.
    order = np.lexsort((pt, p_start, b_first, idx))
    key = np.stack([idx, b_first, p_start], axis=1)[order]
    new_group = np.ones(len(order), bool)
    new_group[1:] = np.any(key[1:] != key[:-1], axis=1)
    group = np.cumsum(new_group) - 1
    last_of_group = np.flatnonzero(np.append(new_group[1:], True))
    group_lead = order[last_of_group]  # the latest row of each group
    candidate = group_lead[group]
    # A complete row joins; an incomplete one only when its sample is the lead's (same time).
    joins = shareable[order] & shareable[candidate] & (complete[order] | (pt[order] == pt[candidate]))
    # Chunks of at most max_queries rows, in time order, each led by its latest row (a subject
    # with hundreds of prediction times would otherwise put them all in one sequence). A chunk's
    # latest row sees the group lead's tokens up to its time, so it can host the rows before it.
    member, member_group = order[joins], group[joins]
    first = np.ones(len(member), bool)
    first[1:] = member_group[1:] != member_group[:-1]
    rank = np.arange(len(member)) - np.maximum.accumulate(np.where(first, np.arange(len(member)), 0))
    new_chunk = first | (rank % max_queries == 0)
    last_of_chunk = np.append(new_chunk[1:], True)
    lead[member] = member[last_of_chunk][np.cumsum(new_chunk) - 1]
    return lead


__all__ = ["shared_passes"]
