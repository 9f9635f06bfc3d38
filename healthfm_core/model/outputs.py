"""What HealthFM.forward takes besides the batch (reconstruction masks) and what it returns.

Its own module so the pretraining objectives can read a forward pass without importing the
model that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ReconstructionMasks:
    """What masked reconstruction hides: EHR code slots [B,N,K], wearable patches [B,P], PRS traits [B,T]."""

    ehr: Tensor | None = None
    wear: Tensor | None = None
    prs: Tensor | None = None


@dataclass
class ModelOutput:
    """Sequence layout: [EHR tokens (n_ehr) | wearable patches (n_wear) | query tokens (one at
    prediction_time, or one per query_time given to forward)].

    A modality absent from the whole batch has width 0. Masks are the effective ones (after the
    prediction_time cut and modality dropout).
    """

    states: Tensor  # [B, L, d] final (normed) token states
    times: Tensor  # [B, L] token times in days
    key_valid: Tensor  # [B, L] tokens other tokens may attend to (query excluded)
    n_ehr: int
    n_wear: int
    ehr_valid: Tensor  # [B, n_ehr]
    wear_valid: Tensor  # [B, n_wear]
    epoch_valid: Tensor  # [B, n_wear, E, C]
    present: dict[str, Tensor]  # modality -> [B] bool, after dropout
    ehr_tokens: Tensor | None  # [B, n_ehr, d] encoder outputs as fed (masked code slots = MASK code)
    wear_tokens: Tensor | None  # [B, n_wear, d] encoder outputs before patch masking
    genomics_cond: Tensor | None  # [B, d_hidden]
    embedding: Tensor  # [B, d] the (last) query state at its time (prediction_time unless forward got query_time)
    queries: Tensor  # [B, Q, d] every query token's state, in query_time order as given

    @property
    def ehr_states(self) -> Tensor:
        return self.states[:, : self.n_ehr]

    @property
    def wear_states(self) -> Tensor:
        return self.states[:, self.n_ehr : self.n_ehr + self.n_wear]
