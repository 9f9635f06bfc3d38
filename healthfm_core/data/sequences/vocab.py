"""The federation's shared vocabulary and numeric normalisation, from merged site statistics.

`build_vocabulary` merges the sites' `SiteCodeStats` (healthfm_core.data.sequences.code_stats; aggregates
only, already suppressed at each site) and agrees on code ids and normalisation. The resulting
`Vocabulary` (JSON) maps codes to ids and carries the per-code normalisation, the PRS trait
order and the wearable channel normalisation that tokens.py applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from healthfm_core.data.files.layout import PRS_PREFIX, WEARABLE_CHANNELS
from healthfm_core.data.sequences.code_stats import (
    DEFAULT_MIN_CODE_SUBJECTS,
    NumericStats,
    SiteCodeStats,
    merge_site_stats,
)
from healthfm_core.data.sequences.codes import N_SPECIAL_CODES, UNK_CODE
from healthfm_core.files import atomic_write_text
from healthfm_core.strict_files import strict_model


class Normalizer(BaseModel):
    """x -> clip((f(x) - center) / scale, -clip, clip) with f identity or log1p(max(x, 0))."""

    model_config = ConfigDict(extra="forbid")

    transform: Literal["identity", "log1p"] = "identity"
    center: float = 0.0
    scale: float = Field(default=1.0, gt=0.0)
    clip: float = Field(default=5.0, gt=0.0)

    @field_validator("center", "scale", "clip")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"non-finite normaliser parameter {v}")
        return v

    def apply(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Vectorised; float32 in gives float32 out (wearable channels are large). `out` (float32,
        x's shape, may be a strided view): the result is written there, bit for bit what
        `apply(x).astype(np.float32)` gives, without temporaries for float32 input."""
        x = np.asarray(x)
        if out is not None:
            if out.dtype != np.float32 or out.shape != x.shape:
                raise ValueError(
                    f"Normalizer.apply: out must be float32 of shape {x.shape}, got {out.dtype} {out.shape}"
                )
            if x.dtype != np.float32:
                out[...] = self.apply(x)
                return out
            # The same float32 operations as below, each written in place.
            if self.transform == "log1p":
                np.log1p(np.maximum(x, 0.0, out=out), out=out)
                x = out
            np.subtract(x, np.float32(self.center), out=out)
            np.multiply(out, np.float32(1.0 / self.scale), out=out)
            return np.clip(out, -self.clip, self.clip, out=out)
        if x.dtype != np.float32:
            x = x.astype(np.float64)
        if self.transform == "log1p":
            x = np.log1p(np.maximum(x, 0.0))
        out = (x - x.dtype.type(self.center)) * x.dtype.type(1.0 / self.scale)
        return np.clip(out, -self.clip, self.clip, out=out)


def normalizer_from_stats(
    stats: NumericStats,
    method: Literal["robust", "standard"] = "robust",
    transform: Literal["identity", "log1p"] = "identity",
    clip: float = 5.0,
) -> Normalizer:
    """Robust: median and IQR/1.349 from the sketch (std, then 1, when the IQR is 0)."""
    std = math.sqrt(stats.variance)
    f = (lambda v: math.log1p(max(v, 0.0))) if transform == "log1p" else (lambda v: v)
    if method == "robust" and stats.sketch.count > 0:
        q25, q50, q75 = (f(v) for v in stats.sketch.quantiles([0.25, 0.5, 0.75]))
        center, scale = q50, (q75 - q25) / 1.349
    else:
        center, scale = (f(stats.mean), 0.0) if transform == "log1p" else (stats.mean, std)
    if not scale > 1e-8:
        scale = std if transform == "identity" and std > 1e-8 else 1.0
    return Normalizer(transform=transform, center=center, scale=scale, clip=clip)


# Defaults for a federation without any wearable statistics (values from typical adult data).
DEFAULT_WEARABLE_NORMALIZERS: dict[str, Normalizer] = {
    "enmo_mg": Normalizer(transform="log1p", center=math.log1p(20.0), scale=1.0),
    "hr_bpm": Normalizer(center=72.0, scale=12.0),
}


class Vocabulary(BaseModel):
    """Agreed code ids and normalisation. Code i of `codes` has id N_SPECIAL_CODES + i."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    min_subjects: int = Field(ge=1)
    n_sites: int = Field(ge=0)
    codes: list[str]
    code_subjects: list[int]  # distinct subjects per code (federation total), aligned with codes
    code_events: list[int]
    numeric: dict[str, Normalizer] = Field(default_factory=dict)  # code -> normaliser
    prs_traits: list[str] = Field(default_factory=list)  # order of Batch.prs columns
    prs: dict[str, Normalizer] = Field(default_factory=dict)  # trait -> normaliser
    wearables: dict[str, Normalizer] = Field(default_factory=lambda: dict(DEFAULT_WEARABLE_NORMALIZERS))

    _index: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Vocabulary:
        if len(set(self.codes)) != len(self.codes):
            raise ValueError("vocabulary codes are not unique")
        if len(self.code_subjects) != len(self.codes) or len(self.code_events) != len(self.codes):
            raise ValueError("code_subjects / code_events must align with codes")
        for code in self.numeric:
            if code not in set(self.codes):
                raise ValueError(f"normaliser for code {code!r} that is not in the vocabulary")
        if set(self.prs) - set(self.prs_traits):
            raise ValueError(f"PRS normalisers for unknown traits {sorted(set(self.prs) - set(self.prs_traits))}")
        for ch in WEARABLE_CHANNELS:
            if ch not in self.wearables:
                raise ValueError(f"vocabulary has no normaliser for wearable channel {ch!r}")
        self._index = {c: N_SPECIAL_CODES + i for i, c in enumerate(self.codes)}
        return self

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL_CODES + len(self.codes)

    @property
    def n_prs_traits(self) -> int:
        return len(self.prs_traits)

    def code_id(self, code: str) -> int:
        return self._index.get(code, UNK_CODE)

    def encode(self, codes: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Vectorised code -> id (UNK_CODE for codes outside the vocabulary), int64."""
        if isinstance(codes, pa.ChunkedArray):
            codes = codes.combine_chunks()
        if len(codes) == 0:
            return np.zeros(0, dtype=np.int64)
        enc = pc.dictionary_encode(codes)
        pos = pc.index_in(enc.dictionary, value_set=pa.array(self.codes, type=pa.string()))
        dict_ids = pc.fill_null(pc.add(pos, N_SPECIAL_CODES), UNK_CODE).to_numpy().astype(np.int64)
        idx = enc.indices.to_numpy(zero_copy_only=False)
        return dict_ids[idx]

    def numeric_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-id arrays (has_normaliser, is_log1p, center, scale, clip) for vectorised use."""
        n = self.vocab_size
        has = np.zeros(n, dtype=bool)
        log1p = np.zeros(n, dtype=bool)
        center = np.zeros(n)
        scale = np.ones(n)
        clip = np.full(n, np.inf)
        for code, norm in self.numeric.items():
            i = self._index[code]
            has[i], log1p[i] = True, norm.transform == "log1p"
            center[i], scale[i], clip[i] = norm.center, norm.scale, norm.clip
        return has, log1p, center, scale, clip

    def normalise_values(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised float32 values with 0 where none, has_value) for code ids and raw values.

        A value counts only when it is finite and its code has an agreed normaliser (unknown
        codes and codes whose values were suppressed carry no value).
        """
        has, log1p, center, scale, clip = self.numeric_tables()
        v = np.asarray(values)
        if not np.issubdtype(v.dtype, np.floating):
            v = v.astype(np.float64)
        ok = has[ids]
        ok &= np.isfinite(v)
        # Only the rows with a value are computed (most rows of a site have none), in float64
        # (a float32 value widens exactly).
        rows = np.flatnonzero(ok)
        code, x = ids[rows], v[rows].astype(np.float64)  # x: a copy, worked in place below
        # The same float64 operations as np.clip((where(log1p, log1p(max(v, 0)), v) - center) /
        # scale, -clip, clip), bit for bit, without a temporary per step: log1p only where asked.
        logged = np.flatnonzero(log1p[code])
        if len(logged):
            x[logged] = np.log1p(np.maximum(x[logged], 0.0))
        x -= center[code]
        x /= scale[code]
        limit = clip[code]
        np.maximum(x, np.negative(limit), out=x)
        np.minimum(x, limit, out=x)
        out = np.zeros(len(ok), dtype=np.float32)
        out[rows] = x
        return out, ok

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            return strict_model(cls, path.read_text(), path)
        except ValueError as e:
            raise ValueError(f"{path}: not a valid vocabulary: {e}") from e


def build_vocabulary(
    stats_list: Sequence[SiteCodeStats],
    min_subjects: int = DEFAULT_MIN_CODE_SUBJECTS,
    method: Literal["robust", "standard"] = "robust",
    clip: float = 5.0,
) -> Vocabulary:
    """Merge the sites' statistics and agree on ids and normalisation.

    A code enters the vocabulary when the federation-wide number of subjects reaches
    `min_subjects` (sites have already suppressed their own rare codes). Ids follow the sorted
    code strings, so every party that merges the same statistics gets the same vocabulary.
    """
    if not stats_list:
        raise ValueError("build_vocabulary needs the statistics of at least one site")
    merged = merge_site_stats(stats_list)
    kept = {c: s for c, s in merged.codes.items() if s.n_subjects >= min_subjects}
    token_codes = sorted(c for c in kept if not c.startswith(PRS_PREFIX))
    numeric = {
        c: normalizer_from_stats(code_numeric, method=method, clip=clip)
        for c in token_codes
        if (code_numeric := kept[c].numeric) is not None
    }
    traits = sorted(c[len(PRS_PREFIX) :] for c in kept if c.startswith(PRS_PREFIX))
    # PRS are z-scores already; re-standardise with the federation's moments (sites may differ).
    prs = {
        t: normalizer_from_stats(prs_numeric, method="standard", clip=clip)
        for t in traits
        if (prs_numeric := kept[PRS_PREFIX + t].numeric) is not None
    }
    wear = dict(DEFAULT_WEARABLE_NORMALIZERS)
    if merged.n_wearable_subjects >= min_subjects:
        for ch, st in merged.wearables.items():
            wear[ch] = normalizer_from_stats(
                st, method=method, transform="log1p" if ch == "enmo_mg" else "identity", clip=clip
            )
    return Vocabulary(
        min_subjects=min_subjects,
        n_sites=len(stats_list),
        codes=token_codes,
        code_subjects=[kept[c].n_subjects for c in token_codes],
        code_events=[kept[c].n_events for c in token_codes],
        numeric=numeric,
        prs_traits=traits,
        prs=prs,
        wearables=wear,
    )
