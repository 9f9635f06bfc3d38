"""DP-SGD for the federated task head (healthfm_core/eval/federated_head.py) at a site: one
round's local steps of the logistic head under differential privacy, subject-level.

The same machinery as the pretraining's DP rounds (training.py, engine.py):

- the round's settings come from the site's DP budget and the server's request
  (`training.dp_settings`: DP when the server asks; the larger noise, at most the most the server
  accepts; the policy's delta, checked against 1/n subjects; a site whose policy makes DP
  mandatory refuses a head run that did not ask for DP), and its `steps` are reserved in the
  site's durable ledger (`training.reserve_private_round`, ledger.py) before any step: the
  head's rounds and the pretraining's spend from one ledger per site and one epsilon cap;
- each step is Opacus's DPOptimizer (engine.StreamingDPOptimizer, wrapped by
  engine.DPLocalStep with its accountant hook that stops a step beyond the reserved ones):
  Gaussian noise of std noise_multiplier x max_grad_norm drawn in secure mode from a fresh
  OS-seeded generator, the sum divided by the expected batch;
- the batch is Poisson-sampled with a fresh `engine.secret_generator()` per step.

The privacy unit is the subject. A task's rows are (subject, prediction time), several per
subject, so the site samples SUBJECTS (each with probability sample_rate = expected batch /
train subjects), and a sampled subject's gradient is the gradient of the mean log-loss over
all its train rows, clipped to max_grad_norm as one unit. One subject's presence therefore
changes at most one clipped term of one step's sum: the accountant's (noise, rate, steps) is a
subject-level guarantee. The objective this minimises is the mean over subjects of each
subject's mean row log-loss, plus the penalty ||w||^2 (applied as SGD weight decay after the
noise: it does not read the data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from healthfm_core.privacy.engine import DPLocalStep, DPSettings, noise_for_target, sample_rate_for, secret_generator
from healthfm_core.privacy.ledger import PrivacyLedger, Reservation
from healthfm_core.privacy.policy import DPPolicy
from healthfm_core.privacy.training import DPRequest, PrivacyRefused, dp_settings, reserve_private_round


@dataclass
class PrivateHeadRound:
    """One round of the head under DP: `steps` DP-SGD steps reserved in the ledger."""

    settings: DPSettings
    reservation: Reservation
    ledger: PrivacyLedger

    def commit(self, steps_taken: int) -> float:
        """Mark the round trained; returns the site's cumulative epsilon (every round counted)."""
        return self.ledger.commit(self.reservation, steps_taken)


def subject_index(subjects: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row's subject as 0..S-1, and S."""
    _, index = np.unique(np.asarray(subjects), return_inverse=True)
    return index.astype(np.int64), int(index.max()) + 1 if len(index) else 0


def reserve_head_round(
    request: DPRequest,
    budget: DPPolicy | None,
    ledger: PrivacyLedger | None,
    n_subjects: int,
    max_noise_multiplier: float | None = None,
) -> PrivateHeadRound | None:
    """The head round's DP settings, its steps reserved in the site's ledger; None: no DP this
    round (not asked). Raises PrivacyRefused (nothing reserved): DP not asked of a site whose
    policy makes it mandatory (the server trusts a DP update only in a run that asked for DP,
    server/head_bounds.py: the site takes no part rather than train unasked), or its policy's
    noise above `max_noise_multiplier`, the most the server accepts (its bound on a DP update
    assumes it), or reserve_private_round's reasons."""
    if not request.asked:
        if budget is not None and budget.mandatory:
            raise PrivacyRefused(
                "the site policy makes DP mandatory and this head run did not ask for DP: the server accepts "
                "DP updates only in a run that asks for them (coordinator head --dp-noise-multiplier or "
                "--dp-target-epsilon)"
            )
        return None
    if n_subjects <= 0:
        raise PrivacyRefused("no train subjects to sample under DP")
    settings = dp_settings(request, budget, n_subjects)
    if settings is not None and max_noise_multiplier is not None and settings.noise_multiplier > max_noise_multiplier * (1 + 1e-9):  # fmt: skip
        raise PrivacyRefused(
            f"the site's noise multiplier {settings.noise_multiplier:.4g} is above the most this head run accepts, "
            f"{max_noise_multiplier:.4g} (coordinator head --dp-max-noise-multiplier)"
        )
    reserved = reserve_private_round(request, budget, ledger, n_subjects)
    if reserved is None:
        return None
    assert ledger is not None
    return PrivateHeadRound(settings=reserved[0], reservation=reserved[1], ledger=ledger)


def planned_head_epsilon(
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float,
    batch_size: int,
    subjects: int,
    steps: int,
) -> tuple[float, float, float]:
    """A head run's plan at a site of `subjects` train subjects: the noise multiplier asked (or the
    one reaching `target_epsilon` over `steps`), the sampling rate, and the epsilon of the run's
    `steps` DP steps at `delta` by Opacus's RDP accountant (the run's own spend; a site's policy
    may add noise, never remove it, so the run spends at most this)."""
    from opacus.accountants import RDPAccountant

    rate = sample_rate_for(batch_size, subjects)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("a DP plan needs a noise multiplier or a target epsilon")
        noise_multiplier = noise_for_target(target_epsilon, delta, rate, steps)
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), rate, int(steps))]
    return float(noise_multiplier), rate, float(acc.get_epsilon(delta))


def private_local_steps(
    xs: np.ndarray,
    y: np.ndarray,
    subject: np.ndarray,
    w: np.ndarray,
    b: float,
    penalty: float,
    steps: int,
    lr: float,
    settings: DPSettings,
) -> tuple[np.ndarray, float, int]:
    """`steps` DP-SGD steps (module docstring) from (w, b) on standardised rows `xs`, labels `y`,
    `subject` each row's subject as 0..S-1; returns the head and the DP steps taken."""
    from opacus.accountants import RDPAccountant

    n_subjects = int(subject.max()) + 1
    x = torch.as_tensor(np.asarray(xs, np.float64))
    yt = torch.as_tensor(np.asarray(y, np.float64))
    sid = torch.as_tensor(subject)
    rows_of = torch.bincount(sid, minlength=n_subjects).to(torch.float64)
    weight = torch.nn.Parameter(torch.as_tensor(np.asarray(w, np.float64)).clone())
    bias = torch.nn.Parameter(torch.tensor([float(b)], dtype=torch.float64))
    sgd = torch.optim.SGD(
        [{"params": [weight], "weight_decay": 2.0 * penalty}, {"params": [bias], "weight_decay": 0.0}], lr=lr
    )
    local = DPLocalStep(settings, RDPAccountant(), max_steps=steps)
    opt = local.wrap_optimizer(sgd)
    clip = settings.max_grad_norm
    for _ in range(steps):
        chosen = torch.rand(n_subjects, generator=secret_generator(), dtype=torch.float64) < settings.sample_rate
        rows = chosen[sid]
        with torch.no_grad():
            xr, s = x[rows], sid[rows]
            r = torch.sigmoid(xr @ weight + bias) - yt[rows]  # d(log-loss)/dz per row
            scale = r / rows_of[s]  # each subject's mean over its rows
            gw = torch.zeros(n_subjects, x.shape[1], dtype=torch.float64).index_add_(0, s, xr * scale[:, None])
            gb = torch.zeros(n_subjects, dtype=torch.float64).index_add_(0, s, scale)
            norm = torch.sqrt((gw**2).sum(dim=1) + gb**2)
            factor = torch.clamp(clip / (norm + 1e-6), max=1.0) * chosen  # Opacus's clip factor, per subject
            weight.summed_grad = (gw * factor[:, None]).sum(dim=0)  # type: ignore[attr-defined]
            bias.summed_grad = (gb * factor).sum().reshape(1)  # type: ignore[attr-defined]
        opt.step()  # noise, / expected batch, accountant step, then SGD with the penalty's decay
        opt.zero_grad()
    return weight.detach().numpy().copy(), float(bias.detach()[0]), local.steps_taken


__all__ = ["PrivateHeadRound", "planned_head_epsilon", "private_local_steps", "reserve_head_round", "subject_index"]
