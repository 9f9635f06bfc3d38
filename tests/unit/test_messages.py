"""The reply schema (healthfm_core.protocol): TrainReply and EvalReply round-trip through their
wire form, and a peer's records that do not parse are refused with the field and value named."""

from __future__ import annotations

import numpy as np
import pytest

from healthfm_core.protocol import (
    EvalReply,
    PrivacySpend,
    TaskMetrics,
    TrainReply,
    aggregate_site_metrics,
    mean_losses,
)


def group_of(key: str) -> str:
    return key.split(".")[0]


def trained(**fields) -> TrainReply:
    data = {
        "arrays": {"shared.w": np.ones(3, np.float32), "ehr.w": np.zeros(2, np.float16)},
        "num_examples": 12,
        "group_examples": {"shared": 12, "ehr": 7},
        "losses": {"total": 1.5, "align": 0.25},
        "train_seconds": 0.5,
        **fields,
    }
    if data.get("dp") is not None:  # a DP update carries no losses or timings
        data = {k: v for k, v in data.items() if k not in ("losses", "train_seconds")}
    return TrainReply.model_validate(data, context={"group_of": group_of})


def test_train_reply_round_trips_through_its_records() -> None:
    for reply in (trained(), trained(dp={"epsilon": 1.25, "delta": 1e-5, "noise_multiplier": 1.1})):
        arrays, metrics, status = reply.to_records()
        assert status is None and all(isinstance(v, (int, float)) for v in metrics.values())
        back = TrainReply.from_records(arrays, metrics, status, group_of=group_of)
        assert back.model_dump(exclude={"arrays"}) == reply.model_dump(exclude={"arrays"})
        assert {k: v.tobytes() for k, v in back.arrays.items()} == {k: v.tobytes() for k, v in reply.arrays.items()}
    refused = TrainReply.refused("epsilon cap 3", PrivacySpend(epsilon=2.9, delta=1e-5))
    arrays, metrics, status = refused.to_records()
    assert arrays is None and status is not None
    assert TrainReply.from_records(arrays, metrics, status) == refused


MARK = 4321  # a value no other field of trained() holds: finds a field's wire key without naming it


def _wire_key(field: str) -> str:
    value = {
        "num_examples": MARK,
        "losses": {"total": float(MARK)},
        "train_seconds": float(MARK),
        "dp": {"epsilon": float(MARK), "delta": 1e-5, "noise_multiplier": 1.1},
    }[field]
    [key] = [k for k, v in trained(**{field: value}).to_records().metrics.items() if v == MARK]
    return key


@pytest.mark.parametrize(
    "change, field, value",
    [
        ("delete", "num_examples", None),
        ("set", "num_examples", 2.5),
        ("set", "num_examples", True),
        ("set", "num_examples", [12]),
        ("set", "losses", float("nan")),
        ("set", "losses", float("inf")),
        ("set", "train_seconds", -1.0),
        ("set", "dp", -2.0),
    ],
)
def test_a_field_that_does_not_parse_is_named_with_its_value(change: str, field: str, value: object) -> None:
    key = _wire_key(field)
    arrays, metrics, _ = trained().to_records()
    if change == "delete":
        del metrics[key]
    else:
        metrics[key] = value  # type: ignore[assignment]  # deliberately wrong values: the parse must name them
    with pytest.raises(ValueError) as info:
        TrainReply.from_records(arrays, metrics, group_of=group_of)
    message = str(info.value)
    assert message.startswith(f"train reply: field {key}: ")
    assert ("missing" if change == "delete" else f"value {value!r}") in message


def test_counts_and_arrays_must_agree() -> None:
    arrays, metrics, _ = trained().to_records()
    assert arrays is not None
    with pytest.raises(ValueError, match="ehr"):  # ehr arrays without an ehr count
        TrainReply.from_records(
            arrays,
            trained(arrays={"shared.w": np.ones(3, np.float32)}, group_examples={"shared": 12}).to_records().metrics,
            group_of=group_of,
        )
    with pytest.raises(ValueError, match="holds no arrays"):  # a count without arrays
        TrainReply.from_records({"shared.w": arrays["shared.w"]}, metrics, group_of=group_of)
    with pytest.raises(ValueError, match="unknown metric 'x-foo'"):
        TrainReply.from_records(arrays, {**metrics, "x-foo": 1.0}, group_of=group_of)
    with pytest.raises(ValueError, match="NaN or Inf"):
        TrainReply.from_records({**arrays, "ehr.w": np.array([np.nan, 0], np.float16)}, metrics, group_of=group_of)
    with pytest.raises(ValueError, match="refused but carries"):
        TrainReply.from_records(arrays, {}, {"status": "refused", "reason": "cap"})
    with pytest.raises(ValueError, match="belongs to no parameter group"):  # the real key -> group map
        TrainReply.from_records(arrays, metrics)


def test_eval_reply_round_trips_and_refuses_what_does_not_parse() -> None:
    reply = EvalReply(
        tasks={
            "onset_t2d_30d": TaskMetrics(n=40, auroc=0.7, auprc=0.2, ece=0.05),
            "wearable_resting_hr": TaskMetrics(n=30, r2=-0.1),
        },
        num_examples=90,
        withheld=1,
        eval_seconds=2.0,
    )
    assert EvalReply.from_records(reply.to_records()) == reply
    metrics = reply.to_records()
    for bad, named in ((1.5, "onset_t2d_30d.auroc"), (float("inf"), "onset_t2d_30d.auroc")):
        with pytest.raises(ValueError, match=named):
            EvalReply.from_records({**metrics, "onset_t2d_30d.auroc": bad})
    with pytest.raises(ValueError, match="wearable_resting_hr.r2"):
        EvalReply.from_records({**metrics, "wearable_resting_hr.r2": float("-inf")})
    with pytest.raises(ValueError, match="unknown task"):  # a key the server did not ask
        EvalReply.from_records(
            {**metrics, "onset_nothing_30d.auroc": 0.5, "onset_nothing_30d.n": 3},
            expected=["onset_t2d_30d", "wearable_resting_hr"],
        )
    with pytest.raises(ValueError, match="not a task name"):
        EvalReply.from_records({**metrics, "a/b.auroc": 0.5, "a/b.n": 3})
    with pytest.raises(ValueError, match="tasks"):
        EvalReply.from_records({**metrics, "tasks": 5})


def test_site_metrics_and_losses_are_weighted_by_their_counts() -> None:
    a = EvalReply(tasks={"onset_t2d_30d": TaskMetrics(n=10, auroc=0.6, auprc=0.1, ece=0.1)})
    b = EvalReply(tasks={"onset_t2d_30d": TaskMetrics(n=30, auroc=float("nan"), auprc=0.3, ece=0.2)})
    out = aggregate_site_metrics({"a": a, "b": b})
    assert out["onset_t2d_30d.auroc"] == pytest.approx(0.6)  # NaN (undefined) is skipped
    # b's 30 rows weigh 2 x a's 10 (the share cap: healthfm_core/protocol/site_share.py)
    assert out["onset_t2d_30d.auprc"] == pytest.approx((10 * 0.1 + 20 * 0.3) / 30)
    assert out["onset_t2d_30d.n"] == 40
    one, two = trained(), trained(num_examples=36, losses={"total": 0.5})
    assert mean_losses([one, two]) == pytest.approx({"total": (12 * 1.5 + 36 * 0.5) / 48, "align": 0.25})


@pytest.mark.parametrize("cap", [float("nan"), float("inf"), -1.0, 0.0, 100.5])
def test_a_dp_reply_whose_epsilon_cap_is_not_a_policy_cap_is_refused(cap: float) -> None:
    """The cap the dashboard draws is a peer's figure: finite, > 0 and at most the policy maximum."""
    dp = {"epsilon": 1.25, "delta": 1e-5, "noise_multiplier": 1.1, "epsilon_cap": 8.0}
    arrays, metrics, _ = trained(dp=dp).to_records()
    assert metrics["dp.epsilon-cap"] == 8.0
    assert TrainReply.from_records(arrays, metrics, group_of=group_of).dp == PrivacySpend(**dp)
    with pytest.raises(ValueError) as info:
        TrainReply.from_records(arrays, {**metrics, "dp.epsilon-cap": cap}, group_of=group_of)
    assert f"field dp.epsilon-cap: value {cap!r}" in str(info.value)
    refused = TrainReply.refused("epsilon cap 8", PrivacySpend(epsilon=2.9, delta=1e-5))
    assert "dp.epsilon-cap" not in refused.to_records().metrics  # optional: older sites send none
