"""A curious coordinator's differencing attack on the federated evaluation, replayed on a real
synthetic site (client/released_samples.py).

The keyed subject sample is nested: a budget of K + 1 keeps the K subjects of a budget of K. So
a coordinator that asks for K and then for K + 1 subjects would learn, from the held-out
positives alone, whether the one subject between them had the outcome. The site now refuses an
evaluation whose held-out subjects differ from one it answered by 1 to minimum - 1 subjects,
whatever the coordinator's config says, and remembers what it answered across restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from client.released_samples import RELEASED_SAMPLES_FILE, ReleasedSamplesError
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.model.config import load_model_config
from healthfm_core.model.groups import parameter_group
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, EvalReply, FederationSetup
from simulations.synthetic import generate_federation

TASKS: list[Any] = ["onset_hypertension_365d", "onset_t2d_365d"]
MINIMUM = 4  # the site's min_report_subjects here (small, so that a small site reports at all)


@pytest.fixture(scope="module")
def site_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fed = generate_federation(tmp_path_factory.mktemp("fed"), scenario="tiny", seed=0, n_subjects=600, progress=False)
    return next(s for s in fed.sites if s.name == "biobank").root


def _runtime(root: Path, state_dir: Path | None) -> SiteRuntime:
    config = SiteConfig(
        site_root=root, min_report_subjects=MINIMUM, min_report_positives=1, state_dir=state_dir, eval_dir=None
    )
    return SiteRuntime(config)


def _setup(rt: SiteRuntime) -> FederationSetup:
    return FederationSetup(
        vocabulary=build_vocabulary([rt.code_stats()], min_subjects=2), model=load_model_config("tiny"), model_seed=3
    )


def _arrays(rt: SiteRuntime, setup: FederationSetup) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in init_model(setup).state_dict().items() if parameter_group(k) in rt.groups}


def _config(setup: FederationSetup, max_subjects: int) -> EvalConfig:
    return EvalConfig(round=1, tasks=TASKS, setup_sha256=setup.sha256, n_boot=10, max_subjects=max_subjects)


def _evaluate(rt: SiteRuntime, setup: FederationSetup, max_subjects: int) -> EvalReply:
    return rt.evaluate(setup, _arrays(rt, setup), _config(setup, max_subjects))


def _refused(reply: EvalReply) -> bool:
    return not reply.tasks and {r.kind for r in reply.reasons.values()} == {"near_earlier_sample"}


def test_budgets_one_subject_apart_are_refused_and_the_attack_would_have_worked(
    site_root: Path, tmp_path: Path
) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    held_out = len(rt.split_ids()["held_out"])
    labels = rt.labels(_config(setup, 0))[TASKS[0]]
    assert isinstance(labels, pa.Table), labels

    def positives_of(subject: int) -> int:
        rows = labels.filter(pc.equal(labels["subject_id"], subject))
        return int(pc.sum(rows["boolean_value"].cast("int64")).as_py() or 0)

    # The attacker's K: the budget whose next subject in the keyed order had the outcome.
    order = [rt.eval_sample(_config(setup, n)).chosen["held_out"] for n in range(1, held_out - MINIMUM + 1)]
    k, extra = next(
        (n, int(new[0]))
        for n, (old, nxt) in enumerate(zip(order, order[1:]), start=1)
        if n > MINIMUM and positives_of(int((new := np.setdiff1d(nxt, old))[0]))
    )
    first = _evaluate(rt, setup, k)
    assert first.tasks and not _refused(first)
    # What the attack would have read: the two evaluations' held-out positives differ by the
    # outcome of the one subject between them (computed here without the check, as sites answered).
    unchecked = rt.evaluate_tasks(setup, rt.model(setup, _arrays(rt, setup)), _config(setup, k + 1))
    before, after = first.tasks[TASKS[0]].positives, unchecked.metrics[TASKS[0]].positives
    assert before is not None and after is not None
    moved = after - before
    assert moved == positives_of(extra) > 0

    second = _evaluate(rt, setup, k + 1)
    assert _refused(second) and second.withheld == len(TASKS)
    assert all(r.minimum == MINIMUM for r in second.reasons.values())
    assert "differ from an earlier evaluation's" in next(iter(second.reasons.values())).describe()
    assert not _refused(_evaluate(rt, setup, 0))  # every subject: at least MINIMUM more than the first


def test_the_same_sample_again_and_one_far_enough_apart_are_answered(site_root: Path, tmp_path: Path) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    held_out = len(rt.split_ids()["held_out"])
    k = held_out - 2 * MINIMUM
    assert not _refused(_evaluate(rt, setup, k))
    assert not _refused(_evaluate(rt, setup, k))  # every round of a run asks for the same sample
    assert not _refused(_evaluate(rt, setup, k + MINIMUM))  # MINIMUM subjects apart
    assert _refused(_evaluate(rt, setup, k + MINIMUM + 1))  # 1 from the last, MINIMUM + 1 from the first
    assert not _refused(_evaluate(rt, setup, 0))  # every subject: MINIMUM from the last answered


def test_the_site_remembers_across_restarts_and_a_damaged_record_fails_closed(site_root: Path, tmp_path: Path) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    assert not _refused(_evaluate(rt, setup, 0))
    restarted = _runtime(site_root, tmp_path)
    held_out = len(restarted.split_ids()["held_out"])
    assert _refused(_evaluate(restarted, setup, held_out - 1))  # every subject but one, after a restart
    damaged = '{"format": "healthfm-released-eval-samples", "version": 1, "samples": [], "samples": []}'
    (tmp_path / RELEASED_SAMPLES_FILE).write_text(damaged)
    with pytest.raises(ReleasedSamplesError, match=f"{RELEASED_SAMPLES_FILE}.*duplicated key"):
        _evaluate(_runtime(site_root, tmp_path), setup, 0)


def test_a_train_sample_one_subject_larger_is_refused_with_the_held_out_split_whole(
    site_root: Path, tmp_path: Path
) -> None:
    # A budget above the held-out split's size scores every held-out subject both times, but the
    # train sample grows by one: withheld tasks' split counts and num_examples would give that
    # subject's rows and outcome away.
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    splits = rt.split_ids()
    k = len(splits["held_out"]) + 2 * MINIMUM
    assert len(splits["train"]) > k + 1 and len(splits["tuning"]) <= k, {s: len(v) for s, v in splits.items()}
    assert not _refused(_evaluate(rt, setup, k))
    assert _refused(_evaluate(rt, setup, k + 1))
    assert not _refused(_evaluate(rt, setup, k + MINIMUM))
