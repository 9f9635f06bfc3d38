"""Random, contract-respecting `Batch`es for tests and smoke runs (no site data needed).

Each sample gets a prediction_time, EHR tokens at visit times (several tokens may share a time;
each holds 1 to `codes_per_token` distinct codes, some with values; one token at time 0), a run of consecutive wearable patches that ends before prediction_time
with EHR events after it, and a PRS vector with some traits missing. Modalities can be chosen
for the whole batch or per sample.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Literal

import torch

from healthfm_core.data.sequences.batch import N_SPECIAL_CODES, PAD_CODE, Batch
from healthfm_core.model.healthfm import EPOCH_DAYS
from healthfm_core.terms.site_layout import MODALITIES, WEARABLE_CHANNELS


def _modalities_per_sample(
    modalities: Collection[str] | Sequence[Collection[str]], batch_size: int
) -> list[frozenset[str]]:
    names = [m for m in modalities if isinstance(m, str)]
    rows: list[frozenset[str]]
    if modalities and len(names) == len(modalities):  # one set of modality names for every sample
        rows = [frozenset(names)] * batch_size
    else:
        rows = [frozenset(m) for m in modalities]
        if len(rows) != batch_size:
            raise ValueError(f"modalities lists {len(rows)} samples for batch_size={batch_size}")
    for row in rows:
        unknown = row - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modality {sorted(unknown)}; known: {list(MODALITIES)}")
    return rows


def random_batch(
    batch_size: int = 4,
    n_events: int = 16,
    n_patches: int = 4,
    epochs_per_patch: int = 8,
    n_prs_traits: int = 4,
    vocab_size: int = 40,
    modalities: Collection[str] | Sequence[Collection[str]] = MODALITIES,
    seed: int = 0,
    absent: Literal["padded", "empty"] = "padded",
    codes_per_token: int = 3,
) -> Batch:
    """A random padded Batch with up to `n_events` EHR tokens of up to `codes_per_token` codes.
    `absent="empty"` gives a modality no sample has a width of 0 (N=0 or P=0) instead of
    all-invalid padding, the two shapes a collate function may produce."""
    if vocab_size <= N_SPECIAL_CODES:
        raise ValueError(f"vocab_size={vocab_size} must exceed N_SPECIAL_CODES={N_SPECIAL_CODES}")
    g = torch.Generator().manual_seed(seed)
    rows = _modalities_per_sample(modalities, batch_size)
    n_channels = len(WEARABLE_CHANNELS)
    patch_days = epochs_per_patch * EPOCH_DAYS

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    prediction_time = torch.zeros(batch_size)
    k = max(1, min(codes_per_token, vocab_size - N_SPECIAL_CODES))
    codes = torch.full((batch_size, n_events, k), PAD_CODE, dtype=torch.long)
    values = torch.zeros(batch_size, n_events, k)
    has_value = torch.zeros(batch_size, n_events, k, dtype=torch.bool)
    times = torch.zeros(batch_size, n_events)
    ehr_valid = torch.zeros(batch_size, n_events, dtype=torch.bool)
    wear_epochs = torch.zeros(batch_size, n_patches, epochs_per_patch, n_channels)
    wear_epoch_mask = torch.zeros(batch_size, n_patches, epochs_per_patch, n_channels, dtype=torch.bool)
    wear_times = torch.zeros(batch_size, n_patches)
    wear_valid = torch.zeros(batch_size, n_patches, dtype=torch.bool)
    prs = torch.zeros(batch_size, n_prs_traits)
    prs_valid = torch.zeros(batch_size, n_prs_traits, dtype=torch.bool)

    for b, row in enumerate(rows):
        pt = uniform(200.0, 1500.0)
        prediction_time[b] = pt
        wear_start = uniform(0.2 * pt, 0.6 * pt)
        if "ehr" in row and n_events:
            n = int(torch.randint(max(2, n_events // 2), n_events + 1, (1,), generator=g))
            visit_times = torch.sort(torch.rand(max(1, n // 3), generator=g) * pt).values
            visit_times[0] = 0.0  # static rows and the first event sit at time 0
            if "wearables" in row and len(visit_times) > 1:
                visit_times[-1] = min(pt, wear_start + n_patches * patch_days + uniform(1.0, 60.0))
            event_visit = torch.sort(torch.randint(0, len(visit_times), (n,), generator=g)).values
            times[b, :n] = visit_times[event_visit]
            n_codes = torch.randint(1, k + 1, (n,), generator=g)
            distinct = torch.rand(n, vocab_size - N_SPECIAL_CODES, generator=g).argsort(dim=1)[:, :k] + N_SPECIAL_CODES
            used = torch.arange(k)[None, :] < n_codes[:, None]
            codes[b, :n] = torch.where(used, distinct, PAD_CODE)
            has_value[b, :n] = (torch.rand(n, k, generator=g) < 0.3) & used
            values[b, :n] = torch.randn(n, k, generator=g) * has_value[b, :n]
            ehr_valid[b, :n] = True
        if "wearables" in row and n_patches:
            p = int(torch.randint(1, n_patches + 1, (1,), generator=g))
            wear_times[b, :p] = wear_start + patch_days * torch.arange(p)
            wear_epochs[b, :p] = torch.randn(p, epochs_per_patch, n_channels, generator=g)
            mask = torch.rand(p, epochs_per_patch, n_channels, generator=g) < 0.9
            mask[:, 0, :] = True  # every patch holds at least one epoch
            wear_epoch_mask[b, :p] = mask
            wear_epochs[b, :p] *= mask
            wear_valid[b, :p] = True
        if "genomics" in row and n_prs_traits:  # no trait in the vocabulary: nothing to carry
            valid = torch.rand(n_prs_traits, generator=g) < 0.8
            valid[int(torch.randint(0, n_prs_traits, (1,), generator=g))] = True
            prs_valid[b] = valid
            prs[b] = torch.randn(n_prs_traits, generator=g) * valid

    # Birth 20-80 years before the first event for samples with EHR (drawn last, so the draws
    # above are those of batches without ages); NaN (unknown) otherwise.
    birth_time = torch.full((batch_size,), float("nan"))
    for b, row in enumerate(rows):
        if "ehr" in row:
            birth_time[b] = -365.25 * uniform(20.0, 80.0)

    if absent == "empty":
        if not ehr_valid.any():
            codes, values, has_value, times, ehr_valid = (
                x[:, :0] for x in (codes, values, has_value, times, ehr_valid)
            )
        if not wear_valid.any():
            wear_epochs, wear_epoch_mask, wear_times, wear_valid = (
                x[:, :0] for x in (wear_epochs, wear_epoch_mask, wear_times, wear_valid)
            )
    return Batch(
        subject_id=torch.arange(batch_size, dtype=torch.long) + 1000,
        prediction_time=prediction_time,
        codes=codes,
        values=values,
        has_value=has_value,
        times=times,
        ehr_valid=ehr_valid,
        wear_epochs=wear_epochs,
        wear_epoch_mask=wear_epoch_mask,
        wear_times=wear_times,
        wear_valid=wear_valid,
        prs=prs,
        prs_valid=prs_valid,
        birth_time=birth_time,
    )


def date_shifted(batch: Batch, days: float) -> Batch:
    """The batch with every time, prediction time and birth moved by `days` (a site's date shift)."""
    return replace(
        batch,
        times=batch.times + days,
        wear_times=batch.wear_times + days,
        prediction_time=batch.prediction_time + days,
        birth_time=batch.birth_time + days,
    )
