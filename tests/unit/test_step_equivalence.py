"""The vectorised training step (issue 41) gives the numbers the per-sample one gave.

tests/data/train_step_before.json was recorded by this file (`python tests/unit/test_step_equivalence.py
--record`) at commit bcbcb45, before the objectives, the forward and the trainer stopped
deciding shapes on the host: every loss, and per parameter the gradient's norm, sum and
projection on a fixed random direction, for a few batches (every modality, EHR only, a mix of
samples with and without each modality, widths of 0). The step must reproduce them to float
tolerance. The visit and anchor caps are set above what the batches hold: the random subset a
cap keeps is drawn differently now (top-k of per-position keys instead of a per-sample randperm,
the same uniform law), so only uncapped selections can be compared number for number.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.model.healthfm import HealthFM
from healthfm_core.terms.model_config import load_model_config
from healthfm_core.terms.objective_weights import ObjectiveWeights

RECORD = Path(__file__).parents[1] / "data" / "train_step_before.json"
VOCAB, TRAITS = 60, 4
CASES: dict[str, dict[str, Any]] = {
    "tiny-all": {"model": "tiny", "batch": {"batch_size": 8, "n_events": 24, "n_patches": 6, "seed": 3}},
    "tiny-ehr": {"model": "tiny", "batch": {"batch_size": 6, "n_events": 20, "modalities": ["ehr"], "seed": 4}},
    "tiny-mixed-empty": {
        "model": "tiny",
        "batch": {
            "batch_size": 4,
            "n_events": 16,
            "n_patches": 4,
            "modalities": [["ehr"], ["ehr", "genomics"], ["ehr"], ["genomics", "ehr"]],
            "absent": "empty",
            "seed": 5,
        },
    },
    "tiny-mixed": {
        "model": "tiny",
        "batch": {
            "batch_size": 6,
            "n_events": 24,
            "n_patches": 5,
            "modalities": [["ehr", "wearables"], ["ehr"], ["wearables"], ["ehr", "genomics"], [], ["ehr", "wearables"]],
            "seed": 6,
        },
    },
    "small-all": {"model": "small", "batch": {"batch_size": 8, "n_events": 32, "n_patches": 6, "seed": 7}},
}


def step_fingerprint(case: dict[str, Any]) -> dict[str, Any]:
    """One training step's losses and, per parameter, its gradient's (norm, sum, projection)."""
    cfg = load_model_config(case["model"])
    pretraining = cfg.pretraining.model_copy(update={"max_visits_per_sample": 64, "max_anchors_per_sample": 64})
    cfg = cfg.model_copy(update={"pretraining": pretraining})
    torch.manual_seed(0)
    model = HealthFM(cfg, VOCAB, TRAITS).train()
    batch = random_batch(vocab_size=VOCAB, n_prs_traits=TRAITS, **case["batch"])
    losses = model.pretraining_losses(batch, ObjectiveWeights(), generator=torch.Generator().manual_seed(11))
    losses["total"].backward()
    direction = torch.Generator().manual_seed(12)
    grads = {}
    for name, p in model.named_parameters():
        probe = torch.randn(p.shape, generator=direction)
        if p.grad is not None:
            g = p.grad.double()
            grads[name] = [float(g.norm()), float(g.sum()), float((g * probe.double()).sum())]
    return {"losses": {k: float(v.detach()) for k, v in losses.items()}, "grads": grads}


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_the_recorded_step(name: str, recorded: dict[str, Any], monkeypatch) -> None:
    monkeypatch.setenv("HEALTHFM_CT_ATTENTION", "reference")
    before, now = recorded[name], step_fingerprint(CASES[name])
    assert now["losses"] == pytest.approx(before["losses"], rel=1e-5, abs=1e-6)
    # The same parameters get a gradient (None stays None: AdamW skips them) ...
    assert sorted(now["grads"]) == sorted(before["grads"])
    # ... and the same gradient, to float rounding (relative to the largest gradient: a gradient
    # that was exactly 0 may come out as 1e-10 when sums run in another order).
    scale = max(values[0] for values in before["grads"].values())
    for param, values in before["grads"].items():
        assert now["grads"][param] == pytest.approx(values, rel=1e-4, abs=1e-6 * scale), param


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    os.environ["HEALTHFM_CT_ATTENTION"] = "reference"
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps({name: step_fingerprint(case) for name, case in CASES.items()}, indent=1) + "\n")
    print(f"wrote {RECORD}")
