"""The strong tabular baseline: hand-made features of the same input window a model sees.

Per sample, over the EHR tokens of its batch (the pipeline's most recent `max_events` events
before prediction_time, the same window the model gets): for every code of the vocabulary its
log count (probes.count_features), its most recent numeric value (0 when it never had one, with
an indicator), and log(1 + days since it last occurred) (a sentinel of 100 years when it never
did); the subject's age at prediction_time (with an indicator when unknown) and the PRS vector
(with its mask). A linear probe on these (the runner's L2 logistic regression) is the classic
clinical risk model a foundation model must beat: it sees the last value of every lab, how
recent it is and how often it recurs, but no trajectory.

`TabularFeaturizer` exposes them as `embed`, so every evaluation path of the runner
(runner.method_features, compare.evaluate_per_site) treats it like a model.
"""

from __future__ import annotations

import math

import torch

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.eval.probes import count_features

NEVER_DAYS = 100 * 365.25  # "time since last" of a code the window never holds
DAYS_PER_YEAR = 365.25


def tabular_features(batch: Batch, vocab_size: int) -> torch.Tensor:
    """[B, 4 * vocab_size + 2 + 2 * T] float64: counts, last values, has-value flags, log days
    since last, age (years) and its missing flag, PRS values and mask."""
    codes = batch.codes.long()
    if codes.numel() and int(codes.max()) >= vocab_size:
        raise ValueError(f"code id {int(codes.max())} is outside the vocabulary of size {vocab_size}")
    b, n, k = codes.shape
    valid = batch.code_valid  # [B, N, K]
    onehot = torch.nn.functional.one_hot(codes, vocab_size).to(torch.bool) & valid[..., None]  # [B, N, K, V]
    present = onehot.any(dim=2)  # [B, N, V]: token holds the code
    with_value = (onehot & batch.has_value[..., None]).any(dim=2)  # [B, N, V]
    value = (onehot.to(torch.float64) * (batch.values.double() * batch.has_value.double())[..., None]).sum(2)
    times = batch.times.double()[..., None].expand(b, n, vocab_size)
    neg_inf = torch.tensor(-math.inf, dtype=torch.float64)
    last_time = torch.where(present, times, neg_inf).amax(dim=1)  # [B, V]
    since = batch.prediction_time.double()[:, None] - last_time
    log_since = torch.log1p(torch.where(torch.isfinite(since), since.clamp_min(0.0), NEVER_DAYS))
    # The value at the latest token that gave the code a value.
    vt = torch.where(with_value, times, neg_inf)
    last_idx = vt.argmax(dim=1, keepdim=True)  # [B, 1, V]
    last_value = value.gather(1, last_idx)[:, 0]
    has_last = torch.isfinite(vt.amax(dim=1))
    last_value = torch.where(has_last, last_value, torch.zeros_like(last_value))
    age = (batch.prediction_time.double() - batch.birth_time.double()) / DAYS_PER_YEAR
    age_known = torch.isfinite(age)
    return torch.cat(
        [
            count_features(batch, vocab_size),
            last_value,
            has_last.double(),
            log_since,
            torch.where(age_known, age, torch.zeros_like(age))[:, None],
            (~age_known).double()[:, None],
            batch.prs.double() * batch.prs_valid.double(),
            batch.prs_valid.double(),
        ],
        dim=1,
    )


class TabularFeaturizer(torch.nn.Module):
    """tabular_features as an embedder (model.embed), for the runner's feature paths."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        # No weights: an empty parameter only tells the runner which device batches go to.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def embed(self, batch: Batch) -> torch.Tensor:
        return tabular_features(batch, self.vocab_size)


__all__ = ["NEVER_DAYS", "TabularFeaturizer", "tabular_features"]
