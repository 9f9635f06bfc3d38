"""Mergeable per-site code statistics: what a site shares so the federation can agree on a vocabulary.

1. each site computes `site_code_stats(site, min_subjects=k)`: per code, the number of distinct
   subjects and of events, and for numeric values the moments (count, mean, M2) plus a small
   mergeable quantile sketch; codes seen in fewer than k subjects are dropped *at the site* (their
   name is never revealed), and so are numeric summaries backed by fewer than k subjects;
2. the coordinator merges the `SiteCodeStats` of all sites (`merge_site_stats`): counts add,
   moments merge exactly (Chan et al.), sketches add bucket by bucket; healthfm_core.data.sequences.vocab
   turns the result into the `Vocabulary`.

The quantile sketch is DDSketch-like: a value x != 0 falls in bucket ceil(log_gamma |x|) with
gamma = (1 + a) / (1 - a), so every quantile read from it is within relative error a of a value
of the data, and two sketches merge exactly by adding counts (no shared range has to be agreed
beforehand, which fixed-bin histograms would need). Minimum and maximum are deliberately not
shared: they are single subjects' values.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from healthfm_core.data.files.layout import PRS_PREFIX, WEARABLE_CHANNELS, SiteLike
from healthfm_core.data.files.parquet_guard import read_parquet

log = logging.getLogger(__name__)

SKETCH_ALPHA = 0.01
# The fewest subjects a code is named for: a site's own floor (its min_code_subjects) and the
# federation's vocabulary threshold (the run config's vocab-min-subjects), by default.
DEFAULT_MIN_CODE_SUBJECTS = 10
_KEY_LIMIT = 4000  # |log_gamma|x|| bound: covers 1e-35..1e35 at a = 0.01; values beyond are clamped
_MIN_ABS = 1e-12  # |x| below this counts as zero


# --------------------------------------------------------------------------------------------
# Aggregate statistics (what a site may share)
# --------------------------------------------------------------------------------------------


class QuantileSketch(BaseModel):
    """Mergeable log-bucket histogram (DDSketch-like), relative accuracy `alpha`."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(default=SKETCH_ALPHA, gt=0.0, lt=0.5)
    zero_count: int = Field(default=0, ge=0)
    positive: dict[int, int] = Field(default_factory=dict)  # bucket key -> count
    negative: dict[int, int] = Field(default_factory=dict)  # bucket key of |x| -> count

    @field_validator("positive", "negative")
    @classmethod
    def _counts_positive(cls, v: dict[int, int]) -> dict[int, int]:
        for key, count in v.items():
            if count <= 0:
                raise ValueError(f"sketch bucket {key} has non-positive count {count}")
            if abs(key) > _KEY_LIMIT + 1:
                raise ValueError(f"sketch bucket key {key} out of range")
        return v

    @property
    def gamma(self) -> float:
        return (1.0 + self.alpha) / (1.0 - self.alpha)

    @property
    def count(self) -> int:
        return self.zero_count + sum(self.positive.values()) + sum(self.negative.values())

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        if not math.isclose(self.alpha, other.alpha):
            raise ValueError(f"cannot merge sketches with alpha {self.alpha} and {other.alpha}")
        pos = dict(self.positive)
        for k, c in other.positive.items():
            pos[k] = pos.get(k, 0) + c
        neg = dict(self.negative)
        for k, c in other.negative.items():
            neg[k] = neg.get(k, 0) + c
        return QuantileSketch(
            alpha=self.alpha,
            zero_count=self.zero_count + other.zero_count,
            positive=dict(sorted(pos.items())),
            negative=dict(sorted(neg.items())),
        )

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Approximate quantiles (lower rank, relative error <= alpha)."""
        n = self.count
        if n == 0:
            return [math.nan for _ in qs]
        g = self.gamma
        # Buckets in increasing value order: large negatives first, then zero, then positives.
        keys: list[tuple[float, int]] = []
        for k in sorted(self.negative, reverse=True):
            keys.append((-2.0 * g**k / (g + 1.0), self.negative[k]))
        if self.zero_count:
            keys.append((0.0, self.zero_count))
        for k in sorted(self.positive):
            keys.append((2.0 * g**k / (g + 1.0), self.positive[k]))
        values = np.array([v for v, _ in keys])
        cum = np.cumsum([c for _, c in keys])
        out = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile {q} outside [0, 1]")
            rank = q * (n - 1)
            out.append(float(values[int(np.searchsorted(cum, rank, side="right"))]))
        return out


class NumericStats(BaseModel):
    """Moments (count, mean, sum of squared deviations M2) plus a quantile sketch."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(ge=0)
    mean: float
    m2: float = Field(ge=0.0)
    n_subjects: int = Field(default=0, ge=0)  # distinct subjects with a value
    sketch: QuantileSketch = Field(default_factory=QuantileSketch)

    @field_validator("mean", "m2")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"non-finite moment {v}")
        return v

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    def merge(self, other: NumericStats) -> NumericStats:
        """Chan et al.'s exact pairwise merge of (count, mean, M2)."""
        n = self.count + other.count
        if n == 0:
            return self.model_copy()
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return NumericStats(
            count=n,
            mean=mean,
            m2=max(m2, 0.0),
            n_subjects=self.n_subjects + other.n_subjects,
            sketch=self.sketch.merge(other.sketch),
        )


class CodeStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_subjects: int = Field(ge=0)
    n_events: int = Field(ge=0)
    numeric: NumericStats | None = None

    def merge(self, other: CodeStats) -> CodeStats:
        if self.numeric is None:
            numeric = other.numeric
        elif other.numeric is None:
            numeric = self.numeric
        else:
            numeric = self.numeric.merge(other.numeric)
        return CodeStats(
            n_subjects=self.n_subjects + other.n_subjects,
            n_events=self.n_events + other.n_events,
            numeric=numeric,
        )


class SiteCodeStats(BaseModel):
    """Everything a site shares to agree on the vocabulary: aggregates only.

    Subjects are assumed disjoint across sites (and across shards of one site, as docs/architecture.md
    requires), so distinct-subject counts add.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    min_subjects: int = Field(ge=1)
    n_subjects: int = Field(ge=0)
    n_events: int = Field(ge=0)
    codes: dict[str, CodeStats] = Field(default_factory=dict)
    n_wearable_subjects: int = Field(default=0, ge=0)
    wearables: dict[str, NumericStats] = Field(default_factory=dict)  # WEARABLE_CHANNELS keys

    @field_validator("wearables")
    @classmethod
    def _known_channels(cls, v: dict[str, NumericStats]) -> dict[str, NumericStats]:
        for name in v:
            if name not in WEARABLE_CHANNELS:
                raise ValueError(f"unknown wearable channel {name!r}; expected {WEARABLE_CHANNELS}")
        return v

    @property
    def prs_traits(self) -> list[str]:
        """PRS traits present at this site (those that survived suppression)."""
        return sorted(c[len(PRS_PREFIX) :] for c in self.codes if c.startswith(PRS_PREFIX))

    def merge(self, other: SiteCodeStats) -> SiteCodeStats:
        """Unsuppressed sum of two statistics (used across shards and across sites)."""
        codes = dict(self.codes)
        for code, st in other.codes.items():
            codes[code] = codes[code].merge(st) if code in codes else st
        wear = dict(self.wearables)
        for ch, wst in other.wearables.items():
            wear[ch] = wear[ch].merge(wst) if ch in wear else wst
        return SiteCodeStats(
            min_subjects=min(self.min_subjects, other.min_subjects),
            n_subjects=self.n_subjects + other.n_subjects,
            n_events=self.n_events + other.n_events,
            codes=dict(sorted(codes.items())),
            n_wearable_subjects=self.n_wearable_subjects + other.n_wearable_subjects,
            wearables=dict(sorted(wear.items())),
        )

    def suppressed(self, min_subjects: int) -> SiteCodeStats:
        """Drop codes (and numeric summaries, wearables) backed by fewer than min_subjects."""
        codes: dict[str, CodeStats] = {}
        for code, st in self.codes.items():
            if st.n_subjects < min_subjects:
                continue
            numeric = st.numeric
            if numeric is not None and numeric.n_subjects < min_subjects:
                numeric = None
            codes[code] = CodeStats(n_subjects=st.n_subjects, n_events=st.n_events, numeric=numeric)
        wear_ok = self.n_wearable_subjects >= min_subjects
        wear = {ch: st for ch, st in self.wearables.items() if wear_ok and st.n_subjects >= min_subjects}
        return SiteCodeStats(
            min_subjects=max(min_subjects, self.min_subjects),
            n_subjects=self.n_subjects,
            n_events=self.n_events,
            codes=codes,
            n_wearable_subjects=self.n_wearable_subjects if wear_ok else 0,
            wearables=wear,
        )


# --------------------------------------------------------------------------------------------
# Computing the statistics (vectorised, one shard at a time)
# --------------------------------------------------------------------------------------------


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(ids, return_inverse=True) in O(n) when ids are already grouped in sorted runs
    (site data is sorted by subject), falling back to the sort otherwise."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return ids.copy(), np.zeros(0, dtype=np.int64)
    step = np.diff(ids)
    if np.all(step >= 0):
        starts = np.concatenate([[0], np.flatnonzero(step) + 1])
        # np.repeat over run lengths: much faster than a cumsum over a bool mask.
        inverse = np.repeat(np.arange(len(starts), dtype=np.int64), np.diff(np.append(starts, len(ids))))
        return ids[starts], inverse
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, inv.astype(np.int64)


def _sketch_keys(x: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(sign in {-1, 0, 1}, bucket key) per value."""
    gamma = (1.0 + alpha) / (1.0 - alpha)
    ax = np.abs(x)
    sign = np.where(ax < _MIN_ABS, 0, np.sign(x)).astype(np.int64)
    with np.errstate(divide="ignore"):
        key = np.ceil(np.log(np.maximum(ax, _MIN_ABS)) / math.log(gamma))
    key = np.clip(key, -_KEY_LIMIT, _KEY_LIMIT).astype(np.int64)
    key[sign == 0] = 0
    return sign, key


def grouped_numeric_stats(
    group: np.ndarray,
    values: np.ndarray,
    n_groups: int,
    subject_index: np.ndarray | None = None,
    alpha: float = SKETCH_ALPHA,
) -> list[NumericStats | None]:
    """NumericStats per group index over finite `values` (vectorised; one Python step per group
    and per occupied sketch bucket, never per row).

    `subject_index` (a dense subject index aligned with values) gives the distinct-subject count
    per group; without it n_subjects is left 0.
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    group = np.asarray(group, dtype=np.int64)
    if not ok.all():
        group, values = group[ok], values[ok]
    count = np.bincount(group, minlength=n_groups)
    total = np.bincount(group, weights=values, minlength=n_groups)
    mean = np.divide(total, count, out=np.zeros(n_groups), where=count > 0)
    m2 = np.bincount(group, weights=(values - mean[group]) ** 2, minlength=n_groups)
    n_subj = np.zeros(n_groups, dtype=np.int64)
    if subject_index is not None and len(values):
        subj = np.asarray(subject_index, dtype=np.int64)[ok]
        if n_groups == 1:
            n_subj[0] = np.count_nonzero(np.bincount(subj))
        else:
            pairs = np.unique(subj * n_groups + group)
            n_subj = np.bincount(pairs % n_groups, minlength=n_groups)
    sign, key = _sketch_keys(values, alpha)
    # One bin per (group, sign, key); counted with bincount when the occupied key range is small
    # (the usual case: O(n)), with a sort otherwise.
    kmin = int(key.min()) if len(key) else 0
    n_keys = (int(key.max()) - kmin + 1) if len(key) else 1
    combined = (group * 3 + (sign + 1)) * n_keys + (key - kmin)
    if n_groups * 3 * n_keys <= 1 << 22:
        counts = np.bincount(combined, minlength=n_groups * 3 * n_keys)
        uniq = np.flatnonzero(counts)
        ucount = counts[uniq]
    else:
        uniq, ucount = np.unique(combined, return_counts=True)
    ukey = uniq % n_keys + kmin
    rest = uniq // n_keys
    usign = rest % 3 - 1
    ugroup = rest // 3
    sketches: list[dict[str, Any]] = [
        {"alpha": alpha, "zero_count": 0, "positive": {}, "negative": {}} for _ in range(n_groups)
    ]
    for g, sg, k, c in zip(ugroup.tolist(), usign.tolist(), ukey.tolist(), ucount.tolist()):
        if sg == 0:
            sketches[g]["zero_count"] += c
        else:
            sketches[g]["positive" if sg > 0 else "negative"][k] = c
    out: list[NumericStats | None] = []
    for g in range(n_groups):
        if count[g] == 0:
            out.append(None)
            continue
        out.append(
            NumericStats(
                count=int(count[g]),
                mean=float(mean[g]),
                m2=float(m2[g]),
                n_subjects=int(n_subj[g]),
                sketch=QuantileSketch(**sketches[g]),
            )
        )
    return out


def events_code_stats(events: pa.Table, alpha: float = SKETCH_ALPHA) -> SiteCodeStats:
    """Unsuppressed statistics of one MEDS table (subject_id, code, numeric_value).

    Never share the result as is: `site_code_stats` suppresses it before it leaves the site.
    """
    for col in ("subject_id", "code"):
        if col not in events.column_names:
            raise ValueError(f"events table has no column {col!r} (columns: {events.column_names})")
    if events.num_rows == 0:
        return SiteCodeStats(min_subjects=1, n_subjects=0, n_events=0)
    code_dict = pc.dictionary_encode(events["code"].combine_chunks())
    names = code_dict.dictionary.to_pylist()
    code_idx = code_dict.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    uniq_subj, subj_idx = unique_inverse(events["subject_id"].to_numpy())
    n_codes = len(names)
    upair = np.unique(subj_idx * n_codes + code_idx)
    n_subjects = np.bincount(upair % n_codes, minlength=n_codes)
    n_events = np.bincount(code_idx, minlength=n_codes)
    numeric: list[NumericStats | None] = [None] * n_codes
    if "numeric_value" in events.column_names:
        vals = events["numeric_value"].to_numpy(zero_copy_only=False).astype(np.float64)  # null -> nan
        numeric = grouped_numeric_stats(code_idx, vals, n_codes, subject_index=subj_idx, alpha=alpha)
    codes = {
        names[i]: CodeStats(n_subjects=int(n_subjects[i]), n_events=int(n_events[i]), numeric=numeric[i])
        for i in np.argsort(names, kind="stable")
    }
    return SiteCodeStats(min_subjects=1, n_subjects=len(uniq_subj), n_events=events.num_rows, codes=codes)


def wearable_stats(wearables: pa.Table, alpha: float = SKETCH_ALPHA) -> SiteCodeStats:
    """Unsuppressed channel statistics of a wearables table (subject_id, enmo_mg, hr_bpm)."""
    if wearables.num_rows == 0:
        return SiteCodeStats(min_subjects=1, n_subjects=0, n_events=0)
    uniq, subj_idx = unique_inverse(wearables["subject_id"].to_numpy())
    out: dict[str, NumericStats] = {}
    for ch in WEARABLE_CHANNELS:
        if ch not in wearables.column_names:
            raise ValueError(f"wearables table has no column {ch!r}")
        vals = wearables[ch].to_numpy(zero_copy_only=False).astype(np.float64)
        st = grouped_numeric_stats(np.zeros(len(vals), dtype=np.int64), vals, 1, subject_index=subj_idx, alpha=alpha)[0]
        if st is not None:
            out[ch] = st
    return SiteCodeStats(min_subjects=1, n_subjects=0, n_events=0, n_wearable_subjects=len(uniq), wearables=out)


def _merge_all(stats: Iterable[SiteCodeStats]) -> SiteCodeStats:
    total = SiteCodeStats(min_subjects=1, n_subjects=0, n_events=0)
    for st in stats:
        total = total.merge(st)
    return total


def site_code_stats(
    site: SiteLike, min_subjects: int = DEFAULT_MIN_CODE_SUBJECTS, alpha: float = SKETCH_ALPHA
) -> SiteCodeStats:
    """Aggregate statistics of a site, already suppressed below `min_subjects` subjects.

    Reads one MEDS shard / one wearables file at a time (bounded memory); subjects live in one
    shard only (docs/architecture.md), so per-shard subject counts add exactly.
    """
    if min_subjects < 1:
        raise ValueError(f"min_subjects must be >= 1, got {min_subjects}")
    parts = (
        events_code_stats(shard, alpha)
        for shard in site.iter_event_shards(columns=["subject_id", "code", "numeric_value"])
    )
    total = _merge_all(parts)
    wear_files = list(getattr(site, "wearable_files", []))
    if wear_files:
        # Subjects may in principle span wearable files: count them once over the files' distinct
        # ids (file by file, so memory is one file's ids, not every epoch's), the channels file by file.
        ids = [pc.unique(read_parquet(f, columns=["subject_id"])["subject_id"]).to_numpy() for f in wear_files]
        n_wear = len(np.unique(np.concatenate(ids))) if ids else 0
        wear = _merge_all(
            wearable_stats(read_parquet(f, columns=["subject_id", *WEARABLE_CHANNELS]), alpha) for f in wear_files
        )
        for ch in wear.wearables:  # per-file counts add unless a subject spans files
            wear.wearables[ch].n_subjects = min(wear.wearables[ch].n_subjects, n_wear)
        total = total.model_copy(update={"wearables": wear.wearables, "n_wearable_subjects": n_wear})
    out = total.suppressed(min_subjects)
    log.info(
        "site stats: %d subjects, %d events, %d codes shared (%d suppressed below %d subjects)",
        out.n_subjects,
        out.n_events,
        len(out.codes),
        len(total.codes) - len(out.codes),
        min_subjects,
    )
    return out


def merge_site_stats(stats_list: Sequence[SiteCodeStats]) -> SiteCodeStats:
    """Sum of site statistics, independent of the order of the list (bit for bit).

    Floating-point merges depend on order, so sites are merged in the order of a hash of their
    canonical JSON rather than the order they arrived in.
    """
    keyed = sorted(stats_list, key=lambda s: hashlib.sha256(s.model_dump_json().encode()).hexdigest())
    return _merge_all(keyed)
