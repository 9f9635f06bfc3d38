"""A curious coordinator's differencing attack on the federated evaluation, replayed on a real
synthetic site (client/release_gate.py).

The keyed subject sample is nested: a budget of K + 1 keeps the K subjects of a budget of K. So
a coordinator that asks for K and then for K + 1 subjects would learn, from the held-out
positives alone, whether the one subject between them had the outcome. The site's release gate
withholds every task key whose rows differ from what it released before by 1 to minimum - 1
subjects (near_earlier_sample), whatever the coordinator's config says, and remembers what it
answered across restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from client.release_gate import RELEASED_DIR, ReleaseGateError
from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.files.layout import SPLITS
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
    """Every task key that has rows of the subjects between the two samples is withheld (here:
    every task: each subject has rows of both)."""
    return not reply.tasks and {r.kind for r in reply.reasons.values()} == {"near_earlier_sample"}


def test_budgets_one_subject_apart_are_refused_and_the_attack_would_have_worked(
    site_root: Path, tmp_path: Path
) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    held_out = len(rt.split_ids()["held_out"])
    task = TASKS[1]  # the task of more positive subjects: its positives are shown at a smaller K
    labels = rt.labels(_config(setup, 0))[task]
    assert isinstance(labels, pa.Table), labels

    def positives_of(subject: int) -> int:
        rows = labels.filter(pc.equal(labels["subject_id"], subject))
        return int(pc.sum(rows["boolean_value"].cast("int64")).as_py() or 0)

    def classes_of(subjects: np.ndarray) -> tuple[int, int]:
        rows = labels.filter(pa.array(np.isin(labels["subject_id"].to_numpy(), subjects)))
        y = rows["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
        ids = rows["subject_id"].to_numpy()
        return len(np.unique(ids[y])), len(np.unique(ids[~y]))

    # The attacker's K: the budget whose next subject in the keyed order had the outcome, with
    # enough subjects of each class that the positives are shown (not a small cell).
    order = [rt.eval_sample(_config(setup, n)).chosen["held_out"] for n in range(1, held_out - MINIMUM + 1)]
    k, extra = next(
        (n, int(new[0]))
        for n, (old, nxt) in enumerate(zip(order, order[1:]), start=1)
        if min(classes_of(old)) >= MINIMUM and positives_of(int((new := np.setdiff1d(nxt, old))[0]))
    )
    first = _evaluate(rt, setup, k)
    assert first.tasks and not _refused(first)
    # What the attack would have read: the two evaluations' held-out positives differ by the
    # outcome of the one subject between them (computed here without the check, as sites answered).
    unchecked = rt.evaluate_tasks(setup, rt.model(setup, _arrays(rt, setup)), _config(setup, k + 1))
    before, after = first.tasks[task].positives, unchecked.metrics[task].positives
    assert before is not None and after is not None
    moved = after - before
    assert moved == positives_of(extra) > 0

    gained = _gained(rt, setup, k + 1, _row_subjects(rt, setup, k))
    second = _evaluate(rt, setup, k + 1)
    assert task not in second.tasks and second.reasons[task].kind == "near_earlier_sample"
    for key in TASKS:  # a key without rows of the one subject is answered as it was
        assert (key in second.tasks) is not any(gained[(key, s)] for s in SPLITS), (key, gained)
    assert all(r.minimum == MINIMUM for r in second.reasons.values())
    assert "differ from what the site released before" in second.reasons[task].describe()
    assert not _refused(_evaluate(rt, setup, 0))  # every subject: at least MINIMUM more than the first


def _row_subjects(rt: SiteRuntime, setup: FederationSetup, max_subjects: int) -> dict[tuple[str, str], set[int]]:
    """Per (task key, split), the subjects with labelled rows in the budget's sample."""
    cfg = _config(setup, max_subjects)
    out = {}
    for key, table in rt.labels(cfg).items():
        assert isinstance(table, pa.Table), table
        ids = rt.eval_sample(cfg).keep(table)["subject_id"].to_numpy()
        split = rt._split_lookup()(ids)
        out.update({(key, s): set(ids[split == s].tolist()) for s in SPLITS})
    return out


def test_the_same_sample_again_and_one_far_enough_apart_are_answered(site_root: Path, tmp_path: Path) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    held_out = len(rt.split_ids()["held_out"])
    k = held_out - 4 * MINIMUM
    first = _evaluate(rt, setup, k)
    assert not _refused(first)
    again = _evaluate(rt, setup, k)  # every round of a run asks for the same sample
    assert again.tasks.keys() == first.tasks.keys() and not again.reasons.keys() - first.reasons.keys()
    # Far enough: a budget whose every task key gains, in every split, no subject with rows or
    # at least MINIMUM (the samples are nested: the new subjects are one cell of the diagram).
    before = _row_subjects(rt, setup, k)
    far = next(
        k + d
        for d in range(MINIMUM, 4 * MINIMUM)
        if all(n == 0 or n >= MINIMUM for n in _gained(rt, setup, k + d, before).values())
    )
    assert set(_evaluate(rt, setup, far).tasks) == set(TASKS)
    # One subject more per split than the last: the keys where one of them has rows are withheld.
    _withheld_where_moved(rt, setup, far + 1, _row_subjects(rt, setup, far))


def _gained(
    rt: SiteRuntime, setup: FederationSetup, budget: int, since: dict[tuple[str, str], set[int]]
) -> dict[tuple[str, str], int]:
    """Per (task key, split): the subjects with rows in the budget's sample and not in `since`."""
    now = _row_subjects(rt, setup, budget)
    return {field: len(now[field] - since[field]) for field in now}


def _withheld_where_moved(
    rt: SiteRuntime, setup: FederationSetup, budget: int, last: dict[tuple[str, str], set[int]]
) -> None:
    """Evaluate at `budget`, a few subjects from the `last` sample answered: exactly the task
    keys where one of them has rows are withheld, without a count."""
    moved = _gained(rt, setup, budget, last)
    assert 0 < max(moved.values()) < MINIMUM, moved
    reply = _evaluate(rt, setup, budget)
    for key in TASKS:
        changed = any(moved[(key, s)] for s in SPLITS)
        assert (key in reply.tasks) is not changed, (key, moved)
        if changed:
            assert reply.reasons[key].kind == "near_earlier_sample" and not reply.reasons[key].splits


def test_the_site_remembers_across_restarts_and_a_damaged_record_fails_closed(site_root: Path, tmp_path: Path) -> None:
    rt = _runtime(site_root, tmp_path)
    setup = _setup(rt)
    assert not _refused(_evaluate(rt, setup, 0))
    restarted = _runtime(site_root, tmp_path)
    held_out = len(restarted.split_ids()["held_out"])
    assert _refused(_evaluate(restarted, setup, held_out - 1))  # every subject but one, after a restart
    record = tmp_path / RELEASED_DIR / "evaluation.parquet"
    record.write_bytes(record.read_bytes()[:-100])  # truncated
    with pytest.raises(ReleaseGateError, match=f"{record}: not a readable parquet file"):
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
    _withheld_where_moved(rt, setup, k + 1, _row_subjects(rt, setup, k))
