"""The batch contract between the data pipeline and the model.

One `Batch` holds B (subject, prediction_time) samples, padded. Times are float days from
each subject's first timed event (fp32 is fine at that scale; epoch seconds are not).
Static EHR rows (MEDS rows with null time that are not PRS) form one token at time 0. `birth_time` places
the subject's MEDS_BIRTH on that clock (NaN when the site has no birth row for the subject).

Nothing in a batch is later than the sample's prediction_time: the pipeline guarantees it,
the model relies on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from healthfm_core.data.sequences.codes import MASK_CODE as MASK_CODE  # re-exported: the batch's codes
from healthfm_core.data.sequences.codes import N_SPECIAL_CODES as N_SPECIAL_CODES
from healthfm_core.data.sequences.codes import PAD_CODE as PAD_CODE
from healthfm_core.data.sequences.codes import UNK_CODE as UNK_CODE
from healthfm_core.device_copy import to_device

# Modality ids carried by every token.
MODALITY_EHR = 0
MODALITY_WEARABLES = 1
MODALITY_GENOMICS = 2

EPOCH_DAYS = 30.0 / 86400.0  # one wearable epoch (30 s) in days


@dataclass
class Batch:
    # Per sample.
    subject_id: torch.Tensor  # [B] int64
    prediction_time: torch.Tensor  # [B] float32, days from the subject's first event
    # EHR tokens, padded to N: each pools the codes of one time bucket (a day or a timestamp,
    # see tokens.py), up to K codes per token, each code once with its value.
    codes: torch.Tensor  # [B, N, K] int64 vocabulary ids (PAD_CODE in empty slots and padding tokens)
    values: torch.Tensor  # [B, N, K] float32 normalised numeric value (0 where none)
    has_value: torch.Tensor  # [B, N, K] bool
    times: torch.Tensor  # [B, N] float32 days: the time of the token's latest row
    ehr_valid: torch.Tensor  # [B, N] bool, True = a real token
    # Wearables: P patches of E 30-second epochs with C channels (layout.WEARABLE_CHANNELS).
    wear_epochs: torch.Tensor  # [B, P, E, C] float32 normalised (0 where missing)
    wear_epoch_mask: torch.Tensor  # [B, P, E, C] bool, False = missing (no epoch, or null HR)
    wear_times: torch.Tensor  # [B, P] float32 days of the patch start
    wear_valid: torch.Tensor  # [B, P] bool, True = a patch with at least one epoch
    # Genomics: one standardised PRS per agreed trait.
    prs: torch.Tensor  # [B, T] float32 (0 where missing)
    prs_valid: torch.Tensor  # [B, T] bool
    # The subject's MEDS_BIRTH time, days on the same clock (NaN: no birth row). Age at a token
    # is its time minus this: unlike calendar time it survives shifting every date.
    birth_time: torch.Tensor  # [B] float32

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``. From host memory to a GPU each tensor goes through pinned
        memory without the host waiting: a plain copy from pageable memory waits for the device
        to finish what is queued, a host sync a tensor, 14 a training step (issue 41's GPU runs)."""
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def rows(self, index: slice | list[int] | torch.Tensor) -> Batch:
        """The samples at ``index`` (a slice, positions or a mask over the B samples), as a batch."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def code_valid(self) -> torch.Tensor:
        """[B, N, K] bool: a real code in a real token."""
        return (self.codes != PAD_CODE) & self.ehr_valid[..., None]

    @property
    def batch_size(self) -> int:
        return int(self.subject_id.shape[0])

    def has_modality(self) -> dict[str, torch.Tensor]:
        """Per-sample [B] bool: does the sample carry any token of each modality."""
        return {
            "ehr": self.ehr_valid.any(dim=1),
            "wearables": self.wear_valid.any(dim=1),
            "genomics": self.prs_valid.any(dim=1),
        }

    def wear_token_times(self) -> torch.Tensor:
        """[B, P] float32 days: when the model reads each patch, at its end (once every epoch in
        it happened), capped at prediction_time for a patch the prediction time cuts."""
        patch_end = self.wear_times.float() + self.wear_epochs.shape[2] * EPOCH_DAYS
        return torch.minimum(patch_end, self.prediction_time.float()[:, None])

    def has_modality_at(self, query_time: torch.Tensor) -> dict[str, torch.Tensor]:
        """[B, Q] bool per modality: any token of it read at or before each query time [B, Q]
        (a token's time: EHR `times`, wearables `wear_token_times`; genomics is static)."""
        q = query_time.float()[:, :, None]
        return {
            "ehr": (self.ehr_valid[:, None, :] & (self.times.float()[:, None, :] <= q)).any(dim=2),
            "wearables": (self.wear_valid[:, None, :] & (self.wear_token_times()[:, None, :] <= q)).any(dim=2),
            "genomics": self.prs_valid.any(dim=1)[:, None].expand(-1, query_time.shape[1]),
        }
