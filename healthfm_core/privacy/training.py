"""A site's DP training, assembled in one place (as Opacus's `make_private`).

`make_private_training` takes what the round needs (the dataset and its collate, the server's
request, the site's DP budget and its ledger) and decides: no DP this round (None), a refusal
(PrivacyRefused, nothing reserved, nothing trained), or a PrivateTraining holding the Poisson
loader, the DP local step for `train_local`, the round's settings and the ledger reservation.
The round's projected spend is reserved in the ledger before it returns, so training can start
only once the spend is counted; `commit()` after training marks it trained and returns the
site's epsilon. A round that fails after the reservation stays counted (fail closed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from healthfm_core.privacy.engine import (
    DPLocalStep,
    DPSettings,
    PoissonBatches,
    noise_for_target,
    sample_rate_for,
)
from healthfm_core.privacy.ledger import (
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    Reservation,
)
from healthfm_core.terms.dp_policy import DPPolicy, delta_problem

log = logging.getLogger(__name__)


class PrivacyRefused(Exception):
    """DP is needed this round but cannot be done under the site's budget: nothing was reserved."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DPRequest(BaseModel):
    """What the server asks of this round, in privacy terms (from the round's config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    asked: bool  # the server asks for DP
    noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    target_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # over the run's planned steps
    max_grad_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    batch_size: int = Field(gt=0)  # expected samples per step
    steps: int = Field(gt=0)  # this round's local steps
    planned_steps: int = Field(gt=0)  # the run's rounds x local steps
    round: int = Field(ge=0)
    run: str  # which federation run (its setup sha256 prefix), for the ledger
    # (a run label prefix, an epsilon): the site refuses a round that would take the epsilon of
    # the ledger's rounds under that prefix past it (a head run's per-run limit). None: no limit.
    run_limit: tuple[str, float] | None = None


def dp_settings(request: DPRequest, budget: DPPolicy | None, n_samples: int) -> DPSettings | None:
    """This round's DP parameters, or None for training without DP. The site's budget decides:
    DP when it is mandatory or the server asks; noise the larger of the budget's and the
    server's (a target epsilon becomes the noise that spends it over the run's planned steps).
    Raises PrivacyRefused when DP is needed but cannot be done under the budget."""
    if not request.asked and (budget is None or not budget.mandatory):
        return None
    if budget is None:
        raise PrivacyRefused(
            "the server asks for DP but the site policy sets no privacy budget (dp: epsilon_cap, delta)"
        )
    if problem := delta_problem(budget.delta, n_samples):
        raise PrivacyRefused(f"the site policy's dp.delta is too large for this round: {problem}")
    rate = sample_rate_for(request.batch_size, n_samples)
    candidates = []
    for sigma, target in (
        (budget.noise_multiplier, budget.target_epsilon),
        (request.noise_multiplier, request.target_epsilon),
    ):
        if sigma is not None:
            candidates.append(sigma)
        elif target is not None:
            candidates.append(noise_for_target(target, budget.delta, rate, request.planned_steps))
    if not candidates:
        raise PrivacyRefused(
            "DP without a noise level: set dp.noise_multiplier or dp.target_epsilon in the site "
            "policy (or the server's dp-noise-multiplier)"
        )
    return DPSettings(
        noise_multiplier=max(candidates),
        max_grad_norm=request.max_grad_norm or budget.max_grad_norm,
        sample_rate=rate,
        n_samples=n_samples,
        delta=budget.delta,
    )


@dataclass
class PrivateTraining:
    """One round's DP training: pass `loader` and `local_step` to train_local, then `commit()`."""

    settings: DPSettings
    loader: PoissonBatches
    local_step: DPLocalStep
    reservation: Reservation
    ledger: PrivacyLedger

    def commit(self) -> float:
        """Mark the round trained in the ledger; returns the site's epsilon (every round counted)."""
        return self.ledger.commit(self.reservation, self.local_step.steps_taken)


def reserve_private_round(
    request: DPRequest, budget: DPPolicy | None, ledger: PrivacyLedger | None, n_samples: int
) -> tuple[DPSettings, Reservation] | None:
    """The round's DP settings under the site's budget, its `request.steps` steps reserved in the
    ledger; None when the round trains without DP. Raises PrivacyRefused (nothing reserved): DP
    needed but no budget, no ledger, an unreadable ledger, too large a delta, no noise level, or
    the cap. `n_samples`: the privacy units Poisson sampling draws from (subjects)."""
    settings = dp_settings(request, budget, n_samples)
    if settings is None:
        return None
    assert budget is not None  # dp_settings refuses DP without a budget
    if ledger is None:
        raise PrivacyRefused("DP needs a durable privacy ledger: the node config sets no state-dir")
    try:
        reservation = ledger.reserve(
            round=request.round,
            run=request.run,
            noise_multiplier=settings.noise_multiplier,
            sample_rate=settings.sample_rate,
            steps=request.steps,
            max_grad_norm=settings.max_grad_norm,
            delta=settings.delta,
            epsilon_cap=budget.epsilon_cap,
            run_limit=request.run_limit,
        )
    except (BudgetExceeded, LedgerError) as err:
        raise PrivacyRefused(str(err)) from None
    return settings, reservation


def make_private_training(
    dataset: Dataset, collate: Any, request: DPRequest, budget: DPPolicy | None, ledger: PrivacyLedger | None
) -> PrivateTraining | None:
    """The round's DP training under the site's budget, its spend reserved in the ledger; None
    when the round trains without DP. Raises PrivacyRefused (nothing reserved): DP needed but no
    budget, no ledger, an unreadable ledger, too large a delta, no noise level, or the cap."""
    reserved = reserve_private_round(request, budget, ledger, len(dataset))  # type: ignore[arg-type]
    if reserved is None:
        return None
    settings, reservation = reserved
    assert ledger is not None
    # Opacus only under DP: its import costs a process ~2 s and ~115 MB (healthfm_core.privacy.ledger).
    from opacus.accountants import RDPAccountant

    # A fresh accountant counts this round's steps only; the ledger already holds them.
    local_step = DPLocalStep(settings, RDPAccountant(), max_steps=request.steps)
    loader = PoissonBatches(dataset, collate, settings.sample_rate, steps=max(1, round(1 / settings.sample_rate)))
    return PrivateTraining(
        settings=settings, loader=loader, local_step=local_step, reservation=reservation, ledger=ledger
    )


__all__ = [
    "DPRequest",
    "PrivacyRefused",
    "PrivateTraining",
    "dp_settings",
    "make_private_training",
    "reserve_private_round",
]
