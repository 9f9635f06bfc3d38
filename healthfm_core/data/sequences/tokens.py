"""From a site's parquet files to `Batch` tensors.

`SiteSequences` loads a site once into columnar numpy arrays (CSR-like offsets per subject:
timed EHR events, static rows, wearable patches (wear_patches.py); a dense PRS matrix) and pools
every bucket's codes once. Building one sample is then a few slices and two binary searches (and
pooling the one bucket a prediction time cuts); no Python loop runs over rows.

Rules (the model relies on them):

- One EHR token per subject and time bucket, pooling the bucket's codes and values: a bucket is
  a day (`token_window_days`=1, the default) on the subject's own clock, i.e. [k, k+1) days
  after its first timed EHR row, or one exact timestamp (`token_window_days`=0). A dense export
  (lab panels of ~11 rows per timestamp, many timestamps a day) therefore spends one token per
  day of record, not one per row: `max_events` caps TOKENS, so the visible history spans at
  least `max_events` days with data (history_coverage_days in coverage.py measures it).
- Within a token each code appears once: the latest visible row of that code (ties: the row
  with a value, then the larger value). A token keeps at most `max_codes_per_token` codes: the
  rarest in the federation's vocabulary first (fewest events; UNK last; ties by code id), so
  the choice depends neither on row order nor on the site. Slots hold codes in that order.
  Both settings come from the federation's `TokenSettings` (token_settings.py), so every site
  tokenises alike. `per_event=True` is the layout before pooling, for comparison only: one
  token per row (static rows included), one code each.
- A token's time is the time of its latest visible row: it is only ever read after everything
  in it happened. At a prediction_time inside a bucket, the token holds the rows up to then.
- Times are days from the subject's first timed observation: the earlier of its first timed
  MEDS event and its first wearable epoch. Differences are taken in int64 microseconds before
  the conversion to days, so shifting a whole site's dates (MIMIC-style, into the 2100s)
  changes nothing in a batch.
- Static rows (null time) that are not PRS form one token at time 0, always visible, placed
  before the timed tokens; it counts against `max_events`.
- `PRS//<trait>` rows fill `Batch.prs` in the vocabulary's trait order (static: always visible).
- `MEDS_BIRTH` also sets `Batch.birth_time` (the model's age input), so age is known even when
  the birth row itself is older than the most recent `max_events` tokens.
- A sample (subject, prediction_time) keeps the timed events with time <= prediction_time and
  the wearable epochs whose end (time + 30 s) <= prediction_time; only the most recent
  `max_events` tokens and `max_patches` patches are kept.
- Wearable epochs are grouped into patches of `patch_epochs` consecutive 30-s slots on a grid
  anchored at the subject's first epoch (patch time = patch start). A patch is kept when at
  least one of its epochs is visible; its not-yet-visible epochs are masked out. Null heart rate
  and absent epochs are masked; channels are normalised with the vocabulary's normalisers.
- Codes outside the vocabulary become UNK_CODE and carry no value; values of codes without an
  agreed normaliser are dropped (has_value False).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from healthfm_core.data.files.layout import EPOCH_US, WEARABLE_CHANNELS, SiteLike, disjoint_subject_order, run_values
from healthfm_core.data.files.read_ahead import read_ahead
from healthfm_core.data.sequences.batch import N_SPECIAL_CODES, PAD_CODE, Batch
from healthfm_core.data.sequences.batch_gather import (
    PooledEntries,
    TokenSlices,
    gather_patches,
    gather_tokens,
    ranges,
    segment_searchsorted,
)
from healthfm_core.data.sequences.code_slots import CHUNK_ROWS, code_slots, sorted_slot_chunks
from healthfm_core.data.sequences.event_rows import (
    US_PER_DAY,
    EventRows,
    RowSink,
    RowTimes,
    SubjectRuns,
    kept_times,
    search_times,
    shard_rows,
    subject_slices,
    to_us,
    us_arrow,
)
from healthfm_core.data.sequences.token_settings import (
    DEFAULT_MAX_CODES_PER_TOKEN,
    DEFAULT_TOKEN_WINDOW_DAYS,
    DEFAULT_TOKENS,
    TokenSettings,
)
from healthfm_core.data.sequences.vocab import Normalizer, Vocabulary
from healthfm_core.data.sequences.wear_patches import NO_TIME, UnplacedPatches, patches_of_table
from healthfm_core.data.sequences.wear_stream import site_patch_plan

log = logging.getLogger(__name__)

DEFAULT_PATCH_EPOCHS = 120  # one hour of 30-s epochs
_NO_TIME = NO_TIME  # int64 max: no time (static rows, subjects without one)


def _bucket_starts(
    subject: np.ndarray | SubjectRuns, time_us: np.ndarray | RowTimes, window_days: float, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """Whether each timed row (rows sorted by subject, then time) starts a token: the subject
    changes or the row leaves its bucket. A bucket is one exact timestamp (window 0) or [k, k+1)
    windows after the subject's first row, so shifting every date leaves the buckets unchanged.
    One byte a row: the windows' keys are computed a chunk of rows at a time."""
    n = len(time_us)
    runs = subject if isinstance(subject, SubjectRuns) else SubjectRuns.of(subject)
    starts = runs.starts[:-1]  # subject starts (before bucket starts are added)
    new = np.zeros(n, dtype=bool)
    if n == 0:
        return new
    new[starts] = True
    if window_days <= 0:
        new[1:] |= time_us[1:] != time_us[:-1]
        return new
    width = max(1, int(round(window_days * US_PER_DAY)))
    for a in range(0, n, max(1, chunk_rows)):
        lo, b = max(a - 1, 0), min(n, a + max(1, chunk_rows))  # lo: the pair (a - 1, a) too
        s0 = int(np.searchsorted(starts, lo, side="right")) - 1
        own = starts[s0 : int(np.searchsorted(starts, b, side="left"))]
        # Each row's subject's first time, repeated over the chunk's rows of that subject.
        first = np.repeat(time_us[own], np.diff(np.r_[np.maximum(own, lo), b]))
        key = time_us[lo:b] - first
        key //= width
        new[lo + 1 : b] |= key[1:] != key[:-1]
    return new


def token_buckets(subject: np.ndarray | SubjectRuns, time_us: np.ndarray | RowTimes, window_days: float) -> np.ndarray:
    """Token ordinal of each timed row (rows sorted by subject, then time): consecutive integers,
    a new one where `_bucket_starts` says a token starts."""
    bucket = np.cumsum(_bucket_starts(subject, time_us, window_days), dtype=np.int64)
    bucket -= 1
    return bucket


def bucket_offsets(
    subject: np.ndarray | SubjectRuns, time_us: np.ndarray | RowTimes, window_days: float, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """CSR offsets [n_buckets + 1] of the tokens `token_buckets` numbers: the rows of bucket k are
    offsets[k]:offsets[k + 1]. What a site keeps instead of a per-row ordinal (8 bytes a row)."""
    starts = _bucket_starts(subject, time_us, window_days, chunk_rows)
    return np.r_[np.flatnonzero(starts), len(time_us)].astype(np.int64)


def pool_token_rows(
    token: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: np.ndarray,
    priority: np.ndarray,
    max_codes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows with token indices 0..n-1 (non-decreasing, every index present) -> per token
    (codes [n, K], values [n, K], has_value [n, K], time_us [n]) with K <= max_codes.

    One slot per distinct code: its latest row (then the row with a value, then the larger
    value); at most max_codes slots, by `priority[code]` ascending (then code id); the token's
    time is its latest row's. Deterministic and independent of the rows' order."""
    if len(token) == 0:
        return _no_tokens()
    n_tok = int(token[-1]) + 1
    tok_time = np.maximum.reduceat(time_us, np.searchsorted(token, np.arange(n_tok)))
    kept, tk, slot = code_slots(token, codes, values, has_value, time_us, priority)
    ok = slot < max_codes
    kept, tk, slot = kept[ok], tk[ok], slot[ok]
    k = int(slot.max()) + 1
    out_codes = np.full((n_tok, k), PAD_CODE, dtype=np.int64)
    out_values = np.zeros((n_tok, k), dtype=np.float32)
    out_has = np.zeros((n_tok, k), dtype=bool)
    out_codes[tk, slot] = codes[kept]
    out_values[tk, slot] = values[kept]
    out_has[tk, slot] = has_value[kept]
    return out_codes, out_values, out_has, tok_time


def _no_tokens() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.full((0, 1), PAD_CODE, np.int64),
        np.zeros((0, 1), np.float32),
        np.zeros((0, 1), bool),
        np.zeros(0, np.int64),
    )


def _pooled_entries(
    offsets: np.ndarray,
    codes: np.ndarray,
    values: np.ndarray,
    has_value: np.ndarray,
    time_us: np.ndarray | RowTimes,
    priority: np.ndarray,
) -> PooledEntries:
    """Every group's tokens pooled once, uncapped (rows grouped as CSR `offsets`, sorted by time
    within a group), chunk by chunk into an index array of the rows' length whose pages past the
    last entry are never written, so never resident."""
    n, n_groups = len(codes), len(offsets) - 1
    out_rows = np.empty(n, np.uint32 if n <= np.iinfo(np.uint32).max else np.int64)
    counts = np.zeros(n_groups, np.int64)
    end = 0
    for a, g0, g1, kept, kept_per_token in sorted_slot_chunks(offsets, codes, values, has_value, time_us, priority):
        stop = end + len(kept)
        placed = out_rows[end:stop]
        placed[:] = kept
        np.add(placed, a, out=placed)  # in place: no int64 copy of the chunk
        counts[g0:g1] = kept_per_token
        end = stop
    pooled = np.zeros(n_groups + 1, np.int64)
    np.cumsum(counts, out=pooled[1:])
    return PooledEntries(pooled, out_rows[:end])


@dataclass
class Sample:
    """One (subject, prediction_time) sample, unpadded numpy arrays."""

    subject_id: int
    prediction_time: float  # days from the subject's first timed observation
    codes: np.ndarray  # [n, K] int64, n EHR tokens of up to K codes (PAD_CODE in empty slots)
    values: np.ndarray  # [n, K] float32
    has_value: np.ndarray  # [n, K] bool
    times: np.ndarray  # [n] float32, each token's time
    wear_epochs: np.ndarray  # [p, E, C] float32
    wear_epoch_mask: np.ndarray  # [p, E, C] bool
    wear_times: np.ndarray  # [p] float32
    prs: np.ndarray  # [T] float32
    prs_valid: np.ndarray  # [T] bool
    birth_time: float = float("nan")  # days, same clock as times (NaN: no MEDS_BIRTH row)
    label: float | None = None


@dataclass
class SampleWindows:
    """Per sample (SiteSequences.windows): the EHR window as bucket ordinals [b_first, b_end) after
    the static token (n_static: 0 or 1), `cut` when the prediction time falls inside the last
    visible bucket (its partial token is one more), `visible` the first event row after the
    prediction time, `timed` whether any timed token is kept; the patches [p_start, p_vis)."""

    n_static: np.ndarray
    visible: np.ndarray
    timed: np.ndarray
    b_first: np.ndarray
    b_end: np.ndarray
    cut: np.ndarray
    p_start: np.ndarray
    p_vis: np.ndarray


class SiteSequences:
    """A site's data as columnar arrays per subject, ready to be sliced into samples."""

    def __init__(
        self,
        events: pa.Table | EventRows,
        wearables: pa.Table | UnplacedPatches | None,
        vocab: Vocabulary,
        patch_epochs: int = DEFAULT_PATCH_EPOCHS,
        token_window_days: float = DEFAULT_TOKEN_WINDOW_DAYS,
        max_codes_per_token: int = DEFAULT_MAX_CODES_PER_TOKEN,
        per_event: bool = False,
    ) -> None:
        if patch_epochs < 1:
            raise ValueError(f"patch_epochs must be >= 1, got {patch_epochs}")
        self.tokens = TokenSettings.parse(
            {"token_window_days": token_window_days, "max_codes_per_token": max_codes_per_token}, "SiteSequences"
        )
        self.per_event = bool(per_event)
        if isinstance(events, EventRows):  # from_site: read and encoded shard by shard
            rows = events
        else:
            for col in ("subject_id", "time", "code"):
                if col not in events.column_names:
                    raise ValueError(f"events table has no column {col!r} (columns: {events.column_names})")
            rows = shard_rows(events, vocab)
        self.vocab = vocab
        self.patch_epochs = patch_epochs
        # Patches first (keyed by the wearables' own subjects); placed on the site's below.
        patches = self._wear_patches(wearables)

        wr_subj = patches.subject_ids if patches is not None else np.zeros(0, np.int64)
        # Timed and static rows are grouped by subject: their distinct ids cost O(n), no sort.
        self.subject_ids = np.unique(
            np.concatenate([rows.t_subject.ids, run_values(rows.s_subject), rows.prs_subject, wr_subj])
        ).astype(np.int64)
        n_subj = len(self.subject_ids)
        n_prs_timed = int(np.sum(rows.prs_timed))
        if n_prs_timed:
            log.warning("%d PRS rows carry a time; they are used as static", n_prs_timed)

        # ---- Timed events, sorted by (subject, time) (EventRows keeps them so), CSR offsets.
        self.ev_offsets = rows.t_subject.offsets_in(self.subject_ids)
        self.ev_time_us = kept_times(rows.t_time_us, rows.t_subject)
        self.ev_codes = rows.t_codes
        self.ev_values = rows.t_values
        self.ev_has_value = rows.t_has_value
        self.token_window_days = self.tokens.token_window_days
        self.max_codes_per_token = self.tokens.max_codes_per_token
        # Bucket k's rows: _bucket_rows[k]:_bucket_rows[k + 1] (per_event: one row each).
        self._bucket_rows = (
            np.arange(len(rows.t_time_us) + 1, dtype=np.int64)
            if self.per_event
            else bucket_offsets(rows.t_subject, self.ev_time_us, self.token_window_days)
        )
        # Cap priority: rarer codes (fewer events federation-wide) first, UNK and specials last.
        self.code_priority = np.full(vocab.vocab_size, np.iinfo(np.int64).max, dtype=np.int64)
        self.code_priority[N_SPECIAL_CODES:] = np.asarray(vocab.code_events, dtype=np.int64)

        # Static (non-PRS) rows, grouped by subject.
        self.st_offsets = SubjectRuns.of(rows.s_subject).offsets_in(self.subject_ids)
        self.st_codes = rows.s_codes
        self.st_values = rows.s_values
        self.st_has_value = rows.s_has_value
        self._pool_tokens(n_subj)

        # PRS matrix in the vocabulary's trait order (rows in reading order: a later one wins).
        n_traits = len(vocab.prs_traits)
        self.prs = np.zeros((n_subj, n_traits), dtype=np.float32)
        self.prs_valid = np.zeros((n_subj, n_traits), dtype=bool)
        if n_traits and len(rows.prs_subject):
            p_sub, p_raw, t_idx = np.searchsorted(self.subject_ids, rows.prs_subject), rows.prs_raw, rows.prs_trait
            ok = (t_idx >= 0) & np.isfinite(p_raw)
            center = np.array([vocab.prs[t].center if t in vocab.prs else 0.0 for t in vocab.prs_traits])
            scale = np.array([vocab.prs[t].scale if t in vocab.prs else 1.0 for t in vocab.prs_traits])
            clip = np.array([vocab.prs[t].clip if t in vocab.prs else np.inf for t in vocab.prs_traits])
            ti = t_idx[ok]
            self.prs[p_sub[ok], ti] = np.clip((p_raw[ok] - center[ti]) / scale[ti], -clip[ti], clip[ti])
            self.prs_valid[p_sub[ok], ti] = True

        # ---- Wearables: patches on a per-subject grid anchored at the first epoch.
        self._load_wearables(patches, n_subj)

        # ---- Per-subject reference time t0 and last observation.
        first_ev = np.full(n_subj, _NO_TIME, dtype=np.int64)
        last_ev = np.full(n_subj, np.iinfo(np.int64).min, dtype=np.int64)
        n_ev = np.diff(self.ev_offsets)
        has_ev = n_ev > 0
        first_ev[has_ev] = self.ev_time_us[self.ev_offsets[:-1][has_ev]]
        last_ev[has_ev] = self.ev_time_us[self.ev_offsets[1:][has_ev] - 1]
        self.t0_us = np.minimum(first_ev, self._wear_first_us)
        # MEDS_BIRTH: the first birth row of each subject (age = time - birth, shift-invariant).
        self.birth_us = np.full(n_subj, _NO_TIME, dtype=np.int64)
        if len(rows.birth_subject):
            b_sub, b_time = np.searchsorted(self.subject_ids, rows.birth_subject), rows.birth_time_us
            order = np.lexsort((b_time, b_sub))
            b_sub, b_time = b_sub[order], b_time[order]
            first = np.ones(len(b_sub), dtype=bool)
            first[1:] = b_sub[1:] != b_sub[:-1]
            self.birth_us[b_sub[first]] = b_time[first]
        self.last_time_us = np.maximum(last_ev, self._wear_last_end_us)
        self.n_events = int(rows.n_rows)
        self.n_epochs = patches.n_rows if patches is not None else 0

    def _pool_tokens(self, n_subj: int) -> None:
        """Pool every bucket and every subject's static token once, uncapped (a bucket pools
        the same whatever the sample, unless the prediction time cuts it: see `_tokens`)."""
        self._bucket_pool = _pooled_entries(
            self._bucket_rows,
            self.ev_codes,
            self.ev_values,
            self.ev_has_value,
            self.ev_time_us,
            self.code_priority,
        )
        self._static_pool = _pooled_entries(
            self.st_offsets,
            self.st_codes,
            self.st_values,
            self.st_has_value,
            np.zeros(len(self.st_codes), np.int64),  # one time for all: the subject's t0
            self.code_priority,
        )

    def _tokens(
        self, index: int, visible: int, n_static: int, n_timed: int, t0: int, max_codes: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`pool_token_rows` of the sample's rows (static token, then the last n_timed buckets
        up to row `visible`) from the pooled buckets; only a bucket cut by the prediction time
        is pooled here."""
        a = int(self.ev_offsets[index])
        b_first = b_end = 0
        cut = np.zeros(0, np.int64)
        if visible > a and n_timed > 0:
            b_last = int(self.bucket_of(visible - 1))
            b_first = max(b_last - n_timed + 1, int(self.bucket_of(a)))
            b_end = b_last + 1
            if visible < self._bucket_rows[b_end]:  # the prediction time falls inside b_last
                b_end = b_last
                cut = np.arange(int(self._bucket_rows[b_last]), visible)
        st, bp = self._static_pool, self._bucket_pool
        e0, e1 = int(bp.offsets[b_first]), int(bp.offsets[b_end])
        counts = np.diff(bp.offsets[b_first : b_end + 1])
        n_static_codes = int(st.offsets[index + 1] - st.offsets[index]) if n_static else 0
        n_tok = n_static + (b_end - b_first) + (1 if len(cut) else 0)
        if n_tok == 0:
            return _no_tokens()
        if len(cut):
            c_codes, c_values, c_has, c_time = pool_token_rows(
                np.zeros(len(cut), np.int64),
                self.ev_codes[cut],
                self.ev_values[cut],
                self.ev_has_value[cut],
                self.ev_time_us[cut],
                self.code_priority,
                max_codes,
            )
        widest = max(n_static_codes, int(counts.max()) if len(counts) else 0, c_codes.shape[1] if len(cut) else 0)
        k = min(max_codes, widest)
        codes = np.full((n_tok, k), PAD_CODE, dtype=np.int64)
        values = np.zeros((n_tok, k), dtype=np.float32)
        has_value = np.zeros((n_tok, k), dtype=bool)
        if n_static:
            s0 = int(st.offsets[index])
            m = min(n_static_codes, k)
            codes[0, :m], values[0, :m], has_value[0, :m] = st.take(slice(s0, s0 + m), self._static_rows)
        if e1 > e0:
            row = np.repeat(np.arange(n_static, n_static + len(counts), dtype=np.int64), counts)
            slot = np.arange(e0, e1) - np.repeat(bp.offsets[b_first:b_end], counts)
            entries: slice | np.ndarray = slice(e0, e1)
            if k < counts.max():
                keep = slot < k
                row, slot, entries = row[keep], slot[keep], np.flatnonzero(keep) + e0
            codes[row, slot], values[row, slot], has_value[row, slot] = bp.take(entries, self._event_rows)
        parts = [np.full(n_static, t0, np.int64), self._bucket_time_us(np.arange(b_first, b_end))]
        if len(cut):
            m = c_codes.shape[1]
            codes[-1, :m], values[-1, :m], has_value[-1, :m] = c_codes[0], c_values[0], c_has[0]
            parts.append(c_time)
        return codes, values, has_value, np.concatenate(parts)

    def _wear_patches(self, wearables: pa.Table | UnplacedPatches | None) -> UnplacedPatches | None:
        """Patches of a wearables table (WEARABLES_SCHEMA columns), or the ones given (from_site
        streams them from the files, wear_stream.py); None when there are no epochs."""
        if isinstance(wearables, UnplacedPatches):
            if wearables.epochs.shape[1] != self.patch_epochs:
                raise ValueError(
                    f"wearables: patches of {wearables.epochs.shape[1]} epochs given, patch_epochs is {self.patch_epochs}"
                )
            return wearables if wearables.n_rows else None
        if wearables is None or not wearables.num_rows:
            return None
        for col in ("subject_id", "time", *WEARABLE_CHANNELS):
            if col not in wearables.column_names:
                raise ValueError(f"wearables table has no column {col!r} (columns: {wearables.column_names})")
        time = us_arrow(wearables["time"], "time")
        if time.null_count:
            raise ValueError("wearables column 'time' has null values")
        table = pa.table(
            [wearables["subject_id"].cast(pa.int64()), time, *(wearables[ch] for ch in WEARABLE_CHANNELS)],
            names=["subject_id", "time", *WEARABLE_CHANNELS],
        )
        return patches_of_table(table, self.patch_epochs, self._normalisers())

    def _normalisers(self) -> list[Normalizer]:
        return [self.vocab.wearables[ch] for ch in WEARABLE_CHANNELS]

    def _load_wearables(self, unplaced: UnplacedPatches | None, n_subj: int) -> None:
        E, C = self.patch_epochs, len(WEARABLE_CHANNELS)
        if unplaced is None:
            self._wear_first_us = np.full(n_subj, _NO_TIME, dtype=np.int64)
            self._wear_last_end_us = np.full(n_subj, np.iinfo(np.int64).min, dtype=np.int64)
            self.patch_offsets = np.zeros(n_subj + 1, dtype=np.int64)
            self.patch_start_us = np.zeros(0, np.int64)
            self.patch_first_end_us = np.zeros(0, np.int64)
            self.patch_epochs_arr = np.zeros((0, E, C), np.float32)
            self.patch_mask = np.zeros((0, E, C), bool)
            return
        patches = unplaced.placed(self.subject_ids)
        self._wear_first_us, self._wear_last_end_us = patches.first_us, patches.last_end_us
        self.patch_offsets = patches.offsets
        self.patch_start_us = patches.start_us
        self.patch_first_end_us = patches.first_end_us
        self.patch_epochs_arr = patches.epochs
        self.patch_mask = patches.mask

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_site(
        cls,
        site: SiteLike,
        vocab: Vocabulary,
        patch_epochs: int = DEFAULT_PATCH_EPOCHS,
        subject_ids: Sequence[int] | np.ndarray | None = None,
        tokens: TokenSettings = DEFAULT_TOKENS,
        per_event: bool = False,
    ) -> SiteSequences:
        """Read a site's events and wearables once (optionally only some subjects), tokenised
        as `tokens` says (a federation's: FederationSetup.tokens). The events are read one MEDS
        shard at a time and kept only as compact arrays (event_rows.py): the same tokens, bit for
        bit, as a load of `site.read_events()`, without ever holding the site's table."""
        normalisers = [vocab.wearables[ch] for ch in WEARABLE_CHANNELS]

        def build(patches: UnplacedPatches | None) -> SiteSequences:
            return cls(
                site_event_rows(site, vocab, subject_ids),
                patches,
                vocab,
                patch_epochs=patch_epochs,
                token_window_days=tokens.token_window_days,
                max_codes_per_token=tokens.max_codes_per_token,
                per_event=per_event,
            )

        if patch_epochs < 1:  # __init__ says what is wrong
            return build(None)
        # Streamed file by file (wear_stream.py): the wearables table is never held whole. Pass 1
        # places the patches now; pass 2 (reading and normalising the channels into them) runs in
        # a thread while the EHR rows are tokenised: both release the GIL most of the time.
        plan = site_patch_plan(site, patch_epochs, normalisers, subject_ids)
        if not plan.patches.n_rows:
            return build(None)
        with ThreadPoolExecutor(1, thread_name_prefix="wear-fill") as pool:
            filled = pool.submit(plan.fill)
            seqs = build(plan.patches)
            filled.result()
        return seqs

    # ------------------------------------------------------------------ queries

    @property
    def n_subjects(self) -> int:
        return len(self.subject_ids)

    def index_of(self, subject_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Row index of each subject id; ValueError naming the ids this site does not hold."""
        sid = np.asarray(subject_ids, dtype=np.int64)
        idx = np.searchsorted(self.subject_ids, sid)
        idx_c = np.minimum(idx, max(len(self.subject_ids) - 1, 0))
        bad = (len(self.subject_ids) == 0) | (self.subject_ids[idx_c] != sid) if len(sid) else np.zeros(0, bool)
        if np.any(bad):
            missing = np.unique(sid[bad])
            raise ValueError(
                f"subject_id {missing[:5].tolist()}{' ...' if len(missing) > 5 else ''} "
                f"not present in the site ({len(missing)} unknown subjects)"
            )
        return idx_c

    @property
    def _event_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The timed rows' codes, values and has_value, which the bucket pool's entries index."""
        return self.ev_codes, self.ev_values, self.ev_has_value

    @property
    def _static_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.st_codes, self.st_values, self.st_has_value

    def _bucket_time_us(self, bucket: np.ndarray) -> np.ndarray:
        """Each bucket's time: its latest row's (rows are time-sorted within a subject); read from
        the rows rather than stored (8 B a bucket)."""
        return self.ev_time_us[self._bucket_rows[bucket + 1] - 1]

    def bucket_of(self, row: Any) -> Any:
        """The bucket (token ordinal) of timed row(s) `row`: a binary search of the buckets' rows."""
        return np.searchsorted(self._bucket_rows, row, side="right") - 1

    @property
    def ev_bucket(self) -> np.ndarray:
        """Every timed row's bucket, built on each call (O(rows)): for tests and small sites; a
        site keeps only the buckets' rows (`bucket_of`)."""
        return np.repeat(np.arange(len(self._bucket_rows) - 1, dtype=np.int64), np.diff(self._bucket_rows))

    def event_times_us(self, index: int) -> np.ndarray:
        return self.ev_time_us[self.ev_offsets[index] : self.ev_offsets[index + 1]]

    def sample(
        self,
        index: int,
        prediction_time_us: int,
        max_events: int = 512,
        max_patches: int = 64,
        label: float | None = None,
        max_codes_per_token: int | None = None,
    ) -> Sample:
        """The sample of subject row `index` at `prediction_time_us` (int64 µs since 1970):
        the static token and the most recent visible tokens, `max_events` tokens in all.
        `max_codes_per_token` None: this site's setting."""
        if max_codes_per_token is None:
            max_codes_per_token = self.max_codes_per_token
        if max_codes_per_token < 1:
            raise ValueError(f"max_codes_per_token must be >= 1, got {max_codes_per_token}")
        pt = int(prediction_time_us)
        t0 = int(self.t0_us[index])
        if t0 == _NO_TIME:  # a subject with static rows only: its clock starts at the prediction
            t0 = pt
        s0, s1 = int(self.st_offsets[index]), int(self.st_offsets[index + 1])
        if self.per_event:  # one token per static row
            n_static = min(s1 - s0, max(max_events, 0))
            st = slice(s0, s0 + n_static)
            st_token = np.arange(n_static, dtype=np.int64)
        else:  # one pooled static token
            n_static = 1 if s1 > s0 and max_events >= 1 else 0
            st = slice(s0, s0 + (s1 - s0) * n_static)
            st_token = np.zeros(st.stop - st.start, np.int64)
        a, b = int(self.ev_offsets[index]), int(self.ev_offsets[index + 1])
        visible = a + int(np.searchsorted(self.ev_time_us[a:b], pt, side="right"))
        if self.per_event:  # the comparison layout: every row its own token, pooled per sample
            start = visible
            n_timed = max_events - n_static
            if visible > a and n_timed > 0:
                # Buckets are consecutive ordinals: the last n_timed of them start at this row.
                first = int(self.bucket_of(visible - 1)) - n_timed + 1
                start = int(self._bucket_rows[max(first, int(self.bucket_of(a)))])
            ev = slice(start, visible)
            bucket = self.bucket_of(np.arange(start, visible))
            token = np.concatenate([st_token, bucket - (bucket[0] if len(bucket) else 0) + n_static])
            codes, values, has_value, token_us = pool_token_rows(
                token,
                np.concatenate([self.st_codes[st], self.ev_codes[ev]]),
                np.concatenate([self.st_values[st], self.ev_values[ev]]),
                np.concatenate([self.st_has_value[st], self.ev_has_value[ev]]),
                np.concatenate([np.full(st.stop - st.start, t0, np.int64), self.ev_time_us[ev]]),
                self.code_priority,
                max_codes_per_token,
            )
        else:
            codes, values, has_value, token_us = self._tokens(
                index, visible, n_static, max_events - n_static, t0, max_codes_per_token
            )
        times = ((token_us - t0) / US_PER_DAY).astype(np.float32)

        # Wearable patches with at least one epoch ending at or before pt.
        pa_, pb = int(self.patch_offsets[index]), int(self.patch_offsets[index + 1])
        p_vis = pa_ + int(np.searchsorted(self.patch_first_end_us[pa_:pb], pt, side="right"))
        p_start = max(pa_, p_vis - max_patches)
        wear = self.patch_epochs_arr[p_start:p_vis]
        wmask = self.patch_mask[p_start:p_vis]
        w_start = self.patch_start_us[p_start:p_vis]
        if p_vis > p_start and w_start[-1] + self.patch_epochs * EPOCH_US > pt:
            # The last patch straddles pt: hide its epochs that end after pt.
            wear, wmask = wear.copy(), wmask.copy()
            slot_end = w_start[-1] + (np.arange(self.patch_epochs) + 1) * EPOCH_US
            late = slot_end > pt
            wear[-1, late] = 0.0
            wmask[-1, late] = False
        birth = int(self.birth_us[index])
        return Sample(
            subject_id=int(self.subject_ids[index]),
            prediction_time=(pt - t0) / US_PER_DAY,
            birth_time=float("nan") if birth == _NO_TIME else (birth - t0) / US_PER_DAY,
            codes=codes,
            values=values,
            has_value=has_value,
            times=times,
            wear_epochs=wear,
            wear_epoch_mask=wmask,
            wear_times=((w_start - t0) / US_PER_DAY).astype(np.float32),
            prs=self.prs[index],
            prs_valid=self.prs_valid[index],
            label=label,
        )

    def windows(self, idx: np.ndarray, pt: np.ndarray, max_events: int, max_patches: int) -> SampleWindows:
        """Which tokens and patches the samples of subject rows `idx` at `pt` (µs) keep: the one
        place the window rules are spelled (`batch` builds them; shared_passes.py compares them)."""
        B = len(idx)
        # EHR tokens: the static token, then the last buckets up to the visible row (`_tokens`).
        n_static = ((self.st_offsets[idx + 1] > self.st_offsets[idx]) & (max_events >= 1)).astype(np.int64)
        a, b = self.ev_offsets[idx], self.ev_offsets[idx + 1]
        visible = search_times(self.ev_time_us, a, b, pt)
        n_timed = max_events - n_static
        b_first = np.zeros(B, np.int64)
        b_end = np.zeros(B, np.int64)
        cut = np.zeros(B, bool)
        timed = (visible > a) & (n_timed > 0)
        h = np.flatnonzero(timed)
        if len(h):
            b_last = self.bucket_of(visible[h] - 1)
            b_first[h] = np.maximum(b_last - n_timed[h] + 1, self.bucket_of(a[h]))
            cut[h] = visible[h] < self._bucket_rows[b_last + 1]  # the prediction time falls inside b_last
            b_end[h] = b_last + 1 - cut[h]
        # Wearable patches with at least one epoch ending at or before pt.
        pa_, pb = self.patch_offsets[idx], self.patch_offsets[idx + 1]
        p_vis = segment_searchsorted(self.patch_first_end_us, pa_, pb, pt)
        p_start = np.maximum(pa_, p_vis - max_patches)
        return SampleWindows(n_static, visible, timed, b_first, b_end, cut, p_start, p_vis)

    def batch(
        self,
        index: np.ndarray | Sequence[int],
        prediction_time_us: np.ndarray | Sequence[int],
        max_events: int = 512,
        max_patches: int = 64,
        max_codes_per_token: int | None = None,
    ) -> Batch:
        """`collate([sample(i, pt, ...) for i, pt in zip(index, prediction_time_us)])`, bit for
        bit, built for the whole batch at once (batch_gather.py) instead of sample by sample."""
        if max_codes_per_token is None:
            max_codes_per_token = self.max_codes_per_token
        if max_codes_per_token < 1:
            raise ValueError(f"max_codes_per_token must be >= 1, got {max_codes_per_token}")
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        pt = np.asarray(prediction_time_us, dtype=np.int64).reshape(-1)
        if self.per_event or not len(idx):  # the comparison layout (or nothing): sample by sample
            return collate(
                [
                    self.sample(int(i), int(p), max_events, max_patches, None, max_codes_per_token)
                    for i, p in zip(idx, pt)
                ]
            )
        B = len(idx)
        t0 = self.t0_us[idx]
        t0 = np.where(t0 == _NO_TIME, pt, t0)  # static rows only: the clock starts at the prediction
        w = self.windows(idx, pt, max_events, max_patches)
        n_static, visible, b_first, b_end, cut = w.n_static, w.visible, w.b_first, w.b_end, w.cut
        n_tok = n_static + (b_end - b_first) + cut
        cut_pools = {}
        cut_width = np.zeros(B, np.int64)
        for i in np.flatnonzero(cut).tolist():
            rows = np.arange(int(self._bucket_rows[b_end[i]]), int(visible[i]))
            cut_pools[i] = pool_token_rows(
                np.zeros(len(rows), np.int64),
                self.ev_codes[rows],
                self.ev_values[rows],
                self.ev_has_value[rows],
                self.ev_time_us[rows],
                self.code_priority,
                max_codes_per_token,
            )
            cut_width[i] = cut_pools[i][0].shape[1]
        codes, values, has_value = gather_tokens(
            TokenSlices(n_static, b_first, b_end, n_tok),
            self._static_pool,
            self._static_rows,
            idx,
            self._bucket_pool,
            self._event_rows,
            max_codes_per_token,
            cut_width,
        )
        N = codes.shape[1]
        tok_us = np.repeat(t0[:, None], N, axis=1)  # the static token's time is t0
        owner, pos, bucket = ranges(b_first, b_end)
        tok_us[owner, n_static[owner] + pos] = self._bucket_time_us(bucket)
        for i, (c_codes, c_values, c_has, c_time) in cut_pools.items():
            m, last = c_codes.shape[1], int(n_tok[i]) - 1
            codes[i, last, :m], values[i, last, :m], has_value[i, last, :m] = c_codes[0], c_values[0], c_has[0]
            tok_us[i, last] = c_time[0]
        times = ((tok_us - t0[:, None]) / US_PER_DAY).astype(np.float32)
        valid = np.arange(N) < n_tok[:, None]
        # As collate pads: each row's last real time (0 without tokens).
        last_time = np.where(n_tok > 0, times[np.arange(B), np.maximum(n_tok - 1, 0)], 0.0)
        times = np.where(valid, times, last_time[:, None]).astype(np.float32)
        wear, wmask, wtimes, wvalid = gather_patches(
            w.p_start,
            w.p_vis,
            pt,
            t0,
            self.patch_start_us,
            self.patch_epochs_arr,
            self.patch_mask,
            self.patch_epochs,
            EPOCH_US,
        )
        # Per-sample scalars as `sample` computes them: Python ints divided, then float32.
        t0_list, pt_list, birth_list = t0.tolist(), pt.tolist(), self.birth_us[idx].tolist()
        T = self.prs.shape[1]
        return batch_from_arrays(
            self.subject_ids[idx],
            [(p - t) / US_PER_DAY for p, t in zip(pt_list, t0_list)],
            (codes, values, has_value, times, valid),
            (wear, wmask, wtimes, wvalid),
            self.prs[idx].astype(np.float32).reshape(B, T),
            self.prs_valid[idx].reshape(B, T),
            [float("nan") if bu == _NO_TIME else (bu - t) / US_PER_DAY for bu, t in zip(birth_list, t0_list)],
        )


def _one_shard(site: SiteLike, columns: list[str], path: Path) -> pa.Table:
    return next(iter(site.iter_event_shards(columns, [path], dictionary_code=True)))


def site_event_rows(
    site: SiteLike, vocab: Vocabulary, subject_ids: Sequence[int] | np.ndarray | None = None
) -> EventRows:
    """A site's events (optionally only some subjects) as EventRows, read shard by shard."""
    wanted = None if subject_ids is None else pa.array(np.asarray(list(subject_ids), dtype=np.int64))
    # Sized from the footers (a Site's files; any other SiteLike grows the sink as it goes), and
    # read in subject order where the footers say no subject sits in two files: no row moves.
    files: list[Path] = list(getattr(site, "data_files", []))
    sink = RowSink(sum(pq.read_metadata(path).num_rows for path in files))
    columns = ["subject_id", "time", "code", "numeric_value"]
    order = disjoint_subject_order(files) if len(files) > 1 else None
    n_shards = 0
    if files:  # the next shard read (parquet, off the GIL) while this one is encoded
        reads = [functools.partial(_one_shard, site, columns, path) for path in order or files]
        shards: Iterable[pa.Table] = read_ahead(reads, "shard-read")
    else:
        shards = site.iter_event_shards(columns, order, dictionary_code=True)
    for shard in shards:
        if wanted is not None:
            shard = shard.filter(pc.is_in(shard["subject_id"], value_set=wanted))
        for part in subject_slices(shard):
            sink.add(shard_rows(part, vocab, reading_order=True))
        n_shards += 1
        del shard
    if not n_shards:
        raise ValueError("the site has no MEDS data shard")
    return sink.rows()


# ---------------------------------------------------------------------------------- collation


def collate(samples: Sequence[Sample]) -> Batch:
    """Pad samples into one Batch (N, K, P at least 1 so that shapes are never empty)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    B = len(samples)
    N = max(1, max(len(s.times) for s in samples))
    K = max(1, max(s.codes.shape[1] if s.codes.ndim == 2 else 1 for s in samples))
    P = max(1, max(len(s.wear_times) for s in samples))
    E, C = samples[0].wear_epochs.shape[1:] if samples[0].wear_epochs.ndim == 3 else (0, 0)
    for s in samples:
        if s.wear_epochs.shape[1:] != (E, C):
            raise ValueError(f"samples have different patch shapes {s.wear_epochs.shape[1:]} vs {(E, C)}")
        if s.codes.ndim != 2 or s.codes.shape[0] != len(s.times):
            raise ValueError(
                f"sample of subject {s.subject_id}: codes {s.codes.shape} is not [tokens, codes] "
                f"for {len(s.times)} token times"
            )
    T = len(samples[0].prs)
    codes = np.full((B, N, K), PAD_CODE, dtype=np.int64)
    values = np.zeros((B, N, K), dtype=np.float32)
    has_value = np.zeros((B, N, K), dtype=bool)
    times = np.zeros((B, N), dtype=np.float32)
    valid = np.zeros((B, N), dtype=bool)
    wear = np.zeros((B, P, E, C), dtype=np.float32)
    wmask = np.zeros((B, P, E, C), dtype=bool)
    wtimes = np.zeros((B, P), dtype=np.float32)
    wvalid = np.zeros((B, P), dtype=bool)
    for i, s in enumerate(samples):
        n, k, p = s.codes.shape[0], s.codes.shape[1], len(s.wear_times)
        codes[i, :n, :k], values[i, :n, :k], has_value[i, :n, :k] = s.codes, s.values, s.has_value
        times[i, :n] = s.times
        valid[i, :n] = True
        if p:
            wear[i, :p], wmask[i, :p], wtimes[i, :p] = s.wear_epochs, s.wear_epoch_mask, s.wear_times
            wvalid[i, :p] = s.wear_epoch_mask.any(axis=(1, 2))
    # Pad times with each row's last real time so padded keys never look "in the future".
    last = np.where(valid.any(1), times[np.arange(B), np.maximum(valid.sum(1) - 1, 0)], 0.0)
    times = np.where(valid, times, last[:, None]).astype(np.float32)
    return batch_from_arrays(
        np.array([s.subject_id for s in samples], dtype=np.int64),
        [s.prediction_time for s in samples],
        (codes, values, has_value, times, valid),
        (wear, wmask, wtimes, wvalid),
        np.stack([s.prs for s in samples]).astype(np.float32).reshape(B, T),
        np.stack([s.prs_valid for s in samples]).reshape(B, T),
        [s.birth_time for s in samples],
    )


def batch_from_arrays(
    subject_id: np.ndarray,
    prediction_time: Sequence[float],
    ehr: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    wearables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    prs: np.ndarray,
    prs_valid: np.ndarray,
    birth_time: Sequence[float],
) -> Batch:
    """The Batch of padded numpy arrays (collate and SiteSequences.batch both end here): ehr is
    (codes, values, has_value, times, valid), wearables (epochs, epoch mask, times, valid)."""
    codes, values, has_value, times, valid = ehr
    wear, wmask, wtimes, wvalid = wearables
    return Batch(
        subject_id=torch.from_numpy(np.asarray(subject_id, dtype=np.int64)),
        prediction_time=torch.tensor(list(prediction_time), dtype=torch.float32),
        codes=torch.from_numpy(codes),
        values=torch.from_numpy(values),
        has_value=torch.from_numpy(has_value),
        times=torch.from_numpy(times),
        ehr_valid=torch.from_numpy(valid),
        wear_epochs=torch.from_numpy(wear),
        wear_epoch_mask=torch.from_numpy(wmask),
        wear_times=torch.from_numpy(wtimes),
        wear_valid=torch.from_numpy(wvalid),
        prs=torch.from_numpy(prs),
        prs_valid=torch.from_numpy(prs_valid),
        birth_time=torch.tensor(list(birth_time), dtype=torch.float32),
    )


def collate_labelled(samples: Sequence[Sample]) -> tuple[Batch, torch.Tensor]:
    """(Batch, labels [B] float32) for samples of a LabelledDataset."""
    if any(s.label is None for s in samples):
        raise ValueError("collate_labelled got a sample without a label")
    labels = [s.label for s in samples if s.label is not None]
    return collate(samples), torch.tensor(labels, dtype=torch.float32)


# ---------------------------------------------------------------------------------- datasets


class PretrainingDataset(Dataset):
    """One sample per subject: its history up to the last observation or a random event time.

    time_mode "last": prediction_time = the subject's last observation (last event, or end of
    its last wearable epoch). "random": a timed EHR event time drawn per (seed, epoch, subject),
    so `set_epoch` changes the draws. Subjects with no timed observation are skipped.
    """

    def __init__(
        self,
        seqs: SiteSequences,
        subject_ids: Sequence[int] | np.ndarray | None = None,
        time_mode: Literal["last", "random"] = "last",
        max_events: int = 512,
        max_patches: int = 64,
        seed: int = 0,
        max_codes_per_token: int | None = None,  # None: the sequences' setting
    ) -> None:
        if time_mode not in ("last", "random"):
            raise ValueError(f"time_mode must be 'last' or 'random', got {time_mode!r}")
        idx = np.arange(seqs.n_subjects) if subject_ids is None else seqs.index_of(subject_ids)
        self.index = idx[seqs.t0_us[idx] != _NO_TIME]
        self.seqs, self.time_mode, self.seed, self.epoch = seqs, time_mode, seed, 0
        self.max_events, self.max_patches, self.max_codes_per_token = max_events, max_patches, max_codes_per_token

    labelled = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def prediction_time_us(self, i: int) -> int:
        s = int(self.index[i])
        if self.time_mode == "random":
            times = self.seqs.event_times_us(s)
            if len(times):
                rng = np.random.default_rng([self.seed, self.epoch, s])
                return int(times[rng.integers(len(times))])
        return int(self.seqs.last_time_us[s])

    def __getitem__(self, i: int) -> Sample:
        return self.seqs.sample(
            int(self.index[i]),
            self.prediction_time_us(i),
            self.max_events,
            self.max_patches,
            max_codes_per_token=self.max_codes_per_token,
        )

    def batch(self, indices: Sequence[int]) -> Batch:
        """`collate([self[i] for i in indices])`, built at once (`SiteSequences.batch`)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.time_mode == "last":
            pt = self.seqs.last_time_us[self.index[rows]]
        else:
            pt = np.array([self.prediction_time_us(int(i)) for i in rows], dtype=np.int64)
        return self.seqs.batch(self.index[rows], pt, self.max_events, self.max_patches, self.max_codes_per_token)


class LabelledDataset(Dataset):
    """Samples at the (subject_id, prediction_time) rows of a MEDS LabelSchema table."""

    labelled = True

    def __init__(
        self,
        seqs: SiteSequences,
        labels: pa.Table,
        max_events: int = 512,
        max_patches: int = 64,
        max_codes_per_token: int | None = None,  # None: the sequences' setting
    ) -> None:
        for col in ("subject_id", "prediction_time"):
            if col not in labels.column_names:
                raise ValueError(f"labels table has no column {col!r} (columns: {labels.column_names})")
        value_col = next(
            (c for c in ("boolean_value", "float_value", "integer_value") if c in labels.column_names), None
        )
        if value_col is None:
            raise ValueError(
                f"labels table has no boolean_value, float_value or integer_value column "
                f"(columns: {labels.column_names})"
            )
        self.index = seqs.index_of(labels["subject_id"].to_numpy())
        self.pt_us = to_us(labels["prediction_time"], "prediction_time")
        if np.any(self.pt_us == _NO_TIME):
            raise ValueError("labels column 'prediction_time' has null values")
        lab = labels[value_col]
        if lab.null_count:
            raise ValueError(f"labels column {value_col!r} has {lab.null_count} null values")
        self.labels = lab.to_numpy(zero_copy_only=False).astype(np.float64)
        self.seqs, self.max_events, self.max_patches = seqs, max_events, max_patches
        self.max_codes_per_token = max_codes_per_token

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Sample:
        return self.seqs.sample(
            int(self.index[i]),
            int(self.pt_us[i]),
            self.max_events,
            self.max_patches,
            label=float(self.labels[i]),
            max_codes_per_token=self.max_codes_per_token,
        )

    def batch(self, indices: Sequence[int]) -> tuple[Batch, torch.Tensor]:
        """`collate_labelled([self[i] for i in indices])`, built at once (`SiteSequences.batch`)."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch = self.seqs.batch(
            self.index[rows], self.pt_us[rows], self.max_events, self.max_patches, self.max_codes_per_token
        )
        return batch, torch.tensor([float(v) for v in self.labels[rows].tolist()], dtype=torch.float32)


class _BatchView(Dataset):
    """A dataset with `batch(indices)` indexed by a list of indices (make_loader's BatchSampler)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> Batch | tuple[Batch, torch.Tensor]:
        return self.dataset.batch(indices)  # type: ignore[attr-defined]


def _as_built(batch: Any) -> Any:  # batch_size=None: each item is already a whole batch
    return batch


def make_loader(
    dataset: Dataset,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader yielding Batch (pretraining) or (Batch, labels) (labelled datasets). A dataset
    with a `batch(indices)` method builds each batch at once; the index order (sampler, generator
    and its draws) is the DataLoader's own either way."""
    generator = torch.Generator().manual_seed(seed)
    if callable(getattr(dataset, "batch", None)):
        sized = cast(Sized, dataset)  # a dataset with batch() has a length (the samplers need it)
        sampler = RandomSampler(sized, generator=generator) if shuffle else SequentialSampler(sized)
        return DataLoader(
            _BatchView(dataset),
            batch_size=None,
            sampler=BatchSampler(sampler, batch_size, drop_last),
            generator=generator,
            num_workers=num_workers,
            collate_fn=_as_built,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        collate_fn=collate_labelled if getattr(dataset, "labelled", False) else collate,
    )


__all__ = [
    "DEFAULT_MAX_CODES_PER_TOKEN",
    "DEFAULT_PATCH_EPOCHS",
    "DEFAULT_TOKEN_WINDOW_DAYS",
    "LabelledDataset",
    "PretrainingDataset",
    "Sample",
    "SiteSequences",
    "collate",
    "collate_labelled",
    "make_loader",
    "pool_token_rows",
    "to_us",
    "token_buckets",
]
