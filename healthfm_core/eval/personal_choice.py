"""Which adapted model a site keeps (personalisation, healthfm_core/train/adapt.py): chosen on
the site's tuning split, never on held_out.

Each candidate (a number of local steps after the federation's last round; 0 = the federated
model) is scored by its probes' mean tuning AUROC over the tasks every candidate could score
(probes fitted on train, C chosen on tuning: the same optimism for every candidate). The fewest
steps within AUROC_TIE of the best win: a tie keeps the model closest to the federation's.

Where the site's local-only model is known (the evidence job and the comparison report train
one), it is a candidate too, on the same tasks: the tie never keeps an adapted model below it,
and when every adapted model is below it the site keeps its local-only model. So the kept
model's mean tuning AUROC is never below the local-only model's: joining never leaves a site
worse off on the split it chooses on (held_out says whether that holds beyond it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict

from healthfm_core.eval.probes import AUROC_TIE


class PersonalChoice(BaseModel):
    """The steps kept, every candidate's mean tuning AUROC over `tasks`, and (where the site's
    local-only model was a candidate) its mean tuning AUROC and whether it was kept instead."""

    model_config = ConfigDict(frozen=True)
    steps: int
    tuning_auroc: dict[int, float]
    tasks: list[str]
    local_only_auroc: float | None = None
    local_only: bool = False  # True: every adapted model was below local-only on tuning; the site keeps its own

    @property
    def kept(self) -> str:
        """The kept model in words (the report's and the log's)."""
        return "its local-only model" if self.local_only else f"{self.steps} local steps"


def choose_steps(
    tuning: Mapping[int, Mapping[str, float]],
    tie: float = AUROC_TIE,
    local_only: Mapping[str, float] | None = None,
) -> PersonalChoice:
    """`tuning`: per candidate step count, its tuning AUROC per task (a NaN or missing task is one
    it could not score). `local_only`: the site's local-only model's tuning AUROC per task, where
    it is a candidate. The candidates are compared on the tasks all of them scored."""
    if not tuning:
        raise ValueError("no adaptation candidate to choose from")
    scored = [{k for k, v in per.items() if np.isfinite(v)} for per in tuning.values()]
    if local_only is not None:
        scored.append({k for k, v in local_only.items() if np.isfinite(v)})
    tasks = sorted(set.intersection(*scored))
    if not tasks:
        # Nothing to compare on: keep the federated model (or the fewest steps offered).
        return PersonalChoice(steps=min(tuning), tuning_auroc={k: float("nan") for k in tuning}, tasks=[])
    means = {k: float(np.mean([per[t] for t in tasks])) for k, per in tuning.items()}
    best = max(means.values())
    floor = best - tie
    local_mean = None if local_only is None else float(np.mean([local_only[t] for t in tasks]))
    if local_mean is not None:
        if best < local_mean:
            return PersonalChoice(
                steps=min(k for k, m in means.items() if m == best),
                tuning_auroc=means,
                tasks=tasks,
                local_only_auroc=local_mean,
                local_only=True,
            )
        floor = max(floor, local_mean)
    steps = min(k for k, m in means.items() if m >= floor)
    return PersonalChoice(steps=steps, tuning_auroc=means, tasks=tasks, local_only_auroc=local_mean)


__all__ = ["PersonalChoice", "choose_steps"]
