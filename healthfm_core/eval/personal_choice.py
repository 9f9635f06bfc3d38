"""Which adapted model a site keeps (personalisation, healthfm_core/train/adapt.py): chosen on
the site's tuning split, never on held_out.

Each candidate (a number of local steps after the federation's last round; 0 = the federated
model) is scored by its probes' mean tuning AUROC over the tasks every candidate could score
(probes fitted on train, C chosen on tuning: the same optimism for every candidate). The fewest
steps within AUROC_TIE of the best win: a tie keeps the model closest to the federation's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

from healthfm_core.eval.probes import AUROC_TIE


class PersonalChoice(BaseModel):
    """The steps kept, and every candidate's mean tuning AUROC over `tasks`."""

    model_config = ConfigDict(frozen=True)
    steps: int
    tuning_auroc: dict[int, float]
    tasks: list[str]


def choose_steps(tuning: Mapping[int, Mapping[str, float]], tie: float = AUROC_TIE) -> PersonalChoice:
    """`tuning`: per candidate step count, its tuning AUROC per task (a NaN or missing task is one
    it could not score). The candidates are compared on the tasks all of them scored."""
    if not tuning:
        raise ValueError("no adaptation candidate to choose from")
    common = set.intersection(*({k for k, v in per.items() if np.isfinite(v)} for per in tuning.values()))
    tasks = sorted(common)
    if not tasks:
        # Nothing to compare on: keep the federated model (or the fewest steps offered).
        return PersonalChoice(steps=min(tuning), tuning_auroc={k: float("nan") for k in tuning}, tasks=[])
    means = {k: float(np.mean([per[t] for t in tasks])) for k, per in tuning.items()}
    best = max(means.values())
    steps = min(k for k, m in means.items() if m >= best - tie)
    return PersonalChoice(steps=steps, tuning_auroc=means, tasks=tasks)


__all__ = ["PersonalChoice", "choose_steps"]
