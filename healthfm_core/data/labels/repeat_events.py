"""An onset task with repeated events counted as positives: the repeated-event pitfall's labels.

The shipped onset tasks (configs/tasks/*.yaml) exclude a prediction time whose subject had the
outcome at or before it (the input window's `outcome: (None, 0)`): a prevalent case is not a new
onset. `counting_repeats` removes that exclusion and nothing else, so the label becomes "the
outcome code occurs in (prediction time, + horizon]", a recurrence included: what a generative
model's next-code metrics count when new onsets are not told apart from repeats (arXiv
2507.00574). Those rows are easy (a diagnosis recurs at the next visits: the synthetic
generator codes a known diagnosis again at 60% of later visits), so the metric inflates; the
evidence job scores the same model on both definitions (simulations/evidence_zero_shot.py).
"""

from __future__ import annotations

import copy

from healthfm_core.data.labels.aces_tasks import AcesTask

EXCLUDED = "(None, 0)"  # an ACES `has` bound that excludes the rows where the predicate occurs


def counting_repeats(task: AcesTask) -> AcesTask:
    """The task without its exclusion of subjects whose outcome (the horizon window's label
    predicate) came before the prediction time: every other window's `has` bound `(None, 0)` on
    that predicate is removed. ValueError naming the task when it has no such exclusion."""
    window = task.metadata.horizon_window
    if window is None:
        raise ValueError(f"task {task.name!r} ({task.path}) has no horizon window: no onset to count repeats of")
    config = copy.deepcopy(task.config)
    windows = config.get("windows") or {}
    label = (windows.get(window) or {}).get("label")
    removed = []
    for name, spec in windows.items():
        has = (spec or {}).get("has") or {}
        if name != window and str(has.get(label, "")).replace(" ", "") == EXCLUDED.replace(" ", ""):
            del has[label]
            removed.append(name)
    if not removed:
        raise ValueError(
            f"task {task.name!r} ({task.path}): no window excludes prior {label!r} events: its labels count repeats already"
        )
    return task.model_copy(update={"name": f"{task.name}_repeats", "config": config})


__all__ = ["EXCLUDED", "counting_repeats"]
