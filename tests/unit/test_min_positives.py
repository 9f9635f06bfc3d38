"""The privacy floor of positives (issue 27): min_report_positives (site runtime) and the policy's
min_positives, the stricter holding; a binary task whose held_out split has fewer positive or
negative rows is withheld as too_few_positives naming the key; every reply says the minimums the
site applied, and the server's lines show them beside each metric."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.data.sequences.code_stats import site_code_stats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.data.sites.site import open_site
from healthfm_core.eval.outcomes import outcome
from healthfm_core.eval.site_eval import held_out_class_subjects, withheld_reason
from healthfm_core.model.config import load_model_config
from healthfm_core.model.healthfm import init_model
from healthfm_core.protocol import EvalConfig, EvalReply, FederationSetup, SplitCount, TaskMetrics, TaskReason
from simulations.synthetic import generate_federation


def _counts(held_positives: int, held_rows: int = 40) -> dict[str, SplitCount]:
    return {
        "train": SplitCount(rows=300, subjects=100, positives=60),
        "tuning": SplitCount(rows=40, subjects=30, positives=8),
        "held_out": SplitCount(rows=held_rows, subjects=30, positives=held_positives),
    }


def _reason(held_positives: int, minimum: int = 20, binary: bool = True, **kw: int) -> TaskReason | None:
    """withheld_reason of _counts with one held-out row a subject (its classes: the rows')."""
    classes = (held_positives, 40 - held_positives)
    return withheld_reason(_counts(held_positives), minimum, binary, held_out_classes=classes, **kw)


def test_too_few_positives_or_negatives_in_held_out_withholds_naming_the_key() -> None:
    assert _reason(3) is None  # default 1: today's rule
    assert _reason(5, min_positives=5) is None
    few = _reason(4, min_positives=5)
    assert few is not None and (few.kind, few.minimum, few.min_positives) == ("too_few_positives", 20, 5)
    assert few.splits["held_out"].positives == -1  # 4 < 20: a small cell, not disclosed
    assert (
        "(minimum 5 held-out subjects with a positive row and as many with a negative row, min_report_positives: "
        "small cells re-identify patients)" in few.describe()
    )
    # Negatives count as much as positives (36 positives of 40 rows: 4 negatives).
    assert _reason(36, min_positives=5).kind == "too_few_positives"  # type: ignore[union-attr]
    # Checked after the subjects and the classes: those reasons stay what they were.
    assert _reason(0, min_positives=5).kind == "one_class"  # type: ignore[union-attr]
    assert _reason(3, minimum=31, min_positives=5).kind == "too_few_subjects"  # type: ignore[union-attr]
    subjects = TaskReason(kind="too_few_subjects", minimum=31, splits={"held_out": SplitCount(rows=0, subjects=0)})
    assert (
        "(minimum 31 subjects per split, min_report_subjects: small cells re-identify patients)" in subjects.describe()
    )
    assert _reason(3, binary=False, min_positives=5) is None  # a regression has no classes


def test_the_positives_floor_counts_subjects_not_rows() -> None:
    # held_out scores every labelled row: 12 positive rows may be 2 patients. The floor is about
    # patients (an AUROC that rests on one or two of them), so 12 rows of 2 subjects are too few.
    counts = _counts(12)
    assert withheld_reason(counts, 20, True, 5, held_out_classes=(12, 28)) is None  # 12 subjects
    few = withheld_reason(counts, 20, True, 5, held_out_classes=(2, 28))  # the same rows, 2 subjects
    assert few is not None and few.kind == "too_few_positives"
    table = pa.table(
        {
            "subject_id": pa.array([1] * 6 + [2] * 6 + list(range(3, 31)), pa.int64()),
            "boolean_value": [True] * 12 + [False] * 28,
        }
    )
    assert held_out_class_subjects(table, lambda sids: np.full(len(sids), "held_out")) == (2, 28)


def test_reply_carries_the_minimums_and_the_reason_round_trips() -> None:
    shown = {s: c.suppressed(20) for s, c in _counts(25).items()}
    reason = TaskReason(kind="too_few_positives", minimum=20, min_positives=10, splits=shown)
    metric = TaskMetrics(n=60, auroc=0.7, auprc=0.3, ece=0.1, positives=25)  # 25 and 35 rows: no small cell
    reply = EvalReply(tasks={"a": metric}, reasons={"b": reason}, withheld=1, min_subjects=20, min_positives=10)
    back = EvalReply.from_records(reply.to_records(), expected=["a", "b"])
    assert back == reply and back.reasons["b"].min_positives == 10
    assert (
        "too few positives or negatives in held_out (minimum 10 held-out subjects with a positive row and as many with a "
        "negative row, min_report_positives" in back.reasons["b"].describe()
    )
    result, detail = outcome(back, "a")
    assert result.startswith("AUROC 0.700") and detail.endswith(", min_report_subjects 20, min_report_positives 10")
    # A reply from a site that does not say its minimums parses as before, and shows none.
    old = EvalReply.from_records({k: v for k, v in reply.to_records().items() if not k.startswith("min-")})
    assert (old.min_subjects, old.min_positives) == (0, 0) and "min_report" not in outcome(old, "a")[1]
    with pytest.raises(ValueError, match="min-positives"):
        EvalReply.from_records({**reply.to_records(), "min-positives": -1})


@pytest.fixture(scope="module")
def hospital_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hospital")
    return Path(generate_federation(out, "hospital", seed=0, n_subjects=60, progress=False).sites[0].root)


def test_the_stricter_of_runtime_and_policy_holds_and_the_reply_says_so(hospital_root: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("min_subjects: 2\nmin_positives: 7\n")
    low = SiteRuntime(SiteConfig(site_root=hospital_root, min_report_subjects=2, min_report_positives=3, policy=policy))
    high = SiteRuntime(
        SiteConfig(site_root=hospital_root, min_report_subjects=2, min_report_positives=9, policy=policy)
    )
    assert (low.min_report_positives, high.min_report_positives) == (7, 9)
    # A site task whose held_out split has both classes: reported at its smaller class's count,
    # withheld one above, and the reply says the minimums the site applied.
    site = open_site(hospital_root)
    sid = np.unique(site.read_events(columns=["subject_id", "time"])["subject_id"].to_numpy())
    (hospital_root / "tasks" / "readmit").mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "subject_id": pa.array(sid, pa.int64()),
                "prediction_time": pa.array([datetime(2150, 1, 1)] * len(sid), pa.timestamp("us")),
                "boolean_value": pa.array(sid % 2 == 0),
            }
        ),
        hospital_root / "tasks" / "readmit" / "0.parquet",
    )
    vocab = build_vocabulary([site_code_stats(site, min_subjects=5)], min_subjects=5)
    setup = FederationSetup(vocabulary=vocab, model=load_model_config("tiny"), model_seed=0, modalities=["ehr"])
    arrays = {k: v.numpy() for k, v in init_model(setup).state_dict().items()}
    cfg = EvalConfig(round=1, tasks=["site:readmit"], setup_sha256=setup.sha256, n_boot=10)
    held = low.split_ids()["held_out"]
    floor = int(min((held % 2 == 0).sum(), (held % 2 == 1).sum()))
    assert floor >= 2
    reports, withholds = (
        SiteRuntime(SiteConfig(site_root=hospital_root, min_report_subjects=2, min_report_positives=n))
        for n in (floor, floor + 1)
    )
    ok = reports.evaluate(setup, arrays, cfg)
    assert "readmit" in ok.tasks and (ok.min_subjects, ok.min_positives) == (2, floor), ok.reasons
    cut = withholds.evaluate(setup, arrays, cfg)
    assert not cut.tasks and cut.reasons["readmit"].kind == "too_few_positives"
    assert cut.reasons["readmit"].min_positives == floor + 1 == cut.min_positives
