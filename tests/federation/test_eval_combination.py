"""Issue 67, finding 7 (the four evaluations), in process: evaluations whose held-out subjects
differ pairwise by at least the minimum were all answered, yet A - B - C + D singles out one
subject: with A = W+U+V+s, B = W+U, C = W+V and D = W (data refreshes of a real synthetic site
on disk, the same state dir), the held-out rows and positives of the four combine to subject s's.
The release gate (client/release_gate.py) keeps every cell of the released versions at 0 or at
least the minimum of subjects, so C, whose cells would leave s alone, is withheld
(near_earlier_sample, no count), and A, B and D combine to nothing smaller than the minimum.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers.site_export import put_back, take_out

from client.legacy_samples import RELEASED_SAMPLES_FILE, LegacySamplesError
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.model.config import load_model_config
from healthfm_core.model.groups import parameter_group
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, EvalReply, FederationSetup
from simulations.synthetic import generate_federation

TASK = "onset_hypertension_365d"
MINIMUM = 3  # the site's min_report_subjects here (small: the site is small)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(
        tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=400, progress=False, sites=["genomics"]
    )
    return Path(fed.sites[0].root)


def runtime(root: Path, state: Path) -> SiteRuntime:
    config = SiteConfig(
        site_root=root, site_name="genomics", min_report_subjects=MINIMUM, min_report_positives=1, state_dir=state
    )
    return SiteRuntime(config)


def test_four_evaluations_pairwise_far_apart_do_not_single_out_a_subject(export: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(export, tmp_path / "genomics"))
    state = tmp_path / "state"
    setup = FederationSetup(
        vocabulary=build_vocabulary([site_code_stats(open_site(root), min_subjects=2)], min_subjects=2),
        model=load_model_config("tiny"),
        model_seed=3,
    )
    cfg = EvalConfig(round=1, tasks=[TASK], setup_sha256=setup.sha256, n_boot=10, meds_tab=False)
    first = runtime(root, state)
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in first.groups}
    labels = first.labels(cfg)[TASK]
    assert isinstance(labels, pa.Table)
    held = labels.filter(pa.array(first._split_lookup()(labels["subject_id"].to_numpy()) == "held_out"))
    ids = held["subject_id"].to_numpy()
    positive = held["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    s = int(ids[positive][0])  # a held-out subject with the outcome
    others = [int(x) for x in np.unique(ids) if x != s]
    u, v = others[:MINIMUM], others[MINIMUM : 2 * MINIMUM]
    assert len(others) >= 4 * MINIMUM

    def evaluate(without: list[int], gated: bool = True) -> EvalReply:
        removed = take_out(root, without)
        try:
            rt = first if not without else runtime(root, state)
            if gated:
                return rt.evaluate(setup, arrays, cfg)
            result = rt.evaluate_tasks(setup, rt.model(setup, arrays), cfg)  # as sites answered before the gate
            return EvalReply(tasks=result.metrics, reasons=result.reasons)
        finally:
            put_back(removed)

    a, b = evaluate([]), evaluate([*v, s])
    c_unchecked, c = evaluate([*u, s], gated=False), evaluate([*u, s])
    d = evaluate([*u, *v, s])
    # What the four give away without the gate: subject s's held-out rows and positives.
    combined = [r.tasks[TASK] for r in (a, b, c_unchecked, d)]
    n = combined[0].n - combined[1].n - combined[2].n + combined[3].n
    assert n == int((ids == s).sum()) > 0
    shown = [m.positives for m in combined]
    assert all(p is not None and p >= 0 for p in shown), shown
    assert shown[0] - shown[1] - shown[2] + shown[3] == int(positive[ids == s].sum()) > 0  # type: ignore[operator]
    # With the gate: A, B and D answered; C withheld without a count.
    assert all(TASK in r.tasks for r in (a, b, d))
    assert TASK not in c.tasks and c.reasons[TASK].kind == "near_earlier_sample" and not c.reasons[TASK].splits
    assert c.num_examples == 0  # nothing embedded: no task answered


def test_evaluations_answered_before_the_gate_stay_covered(export: Path, tmp_path: Path) -> None:
    """A state dir from before the release gate holds released_eval_samples.json: read, never
    written; an evaluation whose sample differs from one of its samples by 1 to minimum - 1
    subjects in a split is refused whole, as it was; a damaged one fails closed naming it."""
    state = tmp_path / "state"
    state.mkdir()
    rt = runtime(export, state)
    splits = {s: ids.tolist() for s, ids in rt.split_ids().items()}
    earlier = {**splits, "held_out": splits["held_out"][1:]}  # one held-out subject fewer
    legacy = state / RELEASED_SAMPLES_FILE
    text = json.dumps({"format": "healthfm-released-eval-samples", "version": 1, "samples": [earlier]})
    legacy.write_text(text)
    cfg = EvalConfig(round=1, tasks=[TASK], setup_sha256="0" * 64, n_boot=10, meds_tab=False)
    reply = runtime(export, state).evaluate(None, {}, cfg)  # type: ignore[arg-type] # refused before any model
    assert not reply.tasks and reply.reasons[TASK].kind == "near_earlier_sample"
    assert legacy.read_text() == text  # never written
    legacy.write_text(text[:-2])
    with pytest.raises(LegacySamplesError, match=f"{legacy}: unreadable"):
        runtime(export, state).evaluate(None, {}, cfg)  # type: ignore[arg-type]
