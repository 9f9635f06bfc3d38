"""The privacy ledger fails closed, and DP randomness comes from the operating system.

Replays of the attacks on the ledger (a `{}` file, a deleted file, an older copy put back,
another site's ledger, a typed field turned into a string), concurrent spending by two
processes on one state directory, a failed round that stays counted, the step guard, and the
secret generators. No model, no data: the ledger and the DP engine alone.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import Dataset

from healthfm_core.privacy.budget_record import KeyBinding, read_record, record_path
from healthfm_core.privacy.engine import (
    DPLocalStep,
    DPSettings,
    PoissonBatches,
    secret_generator,
)
from healthfm_core.privacy.ledger import (
    LEDGER_FILE,
    MARK_FILE,
    MECHANISM,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    history_problem,
)
from healthfm_core.privacy.training import (
    DPRequest,
    PrivacyRefused,
    dp_settings,
    make_private_training,
)
from healthfm_core.protocol import PrivacySpend, TrainReply
from healthfm_core.terms.dp_policy import DPPolicy

DELTA = 1e-5
SPEND: dict[str, Any] = {"noise_multiplier": 1.0, "sample_rate": 0.1, "max_grad_norm": 1.0, "delta": DELTA}


def spend(ledger: PrivacyLedger, rnd: int, steps: int = 3, cap: float = 100.0) -> float:
    reservation = ledger.reserve(round=rnd, run="r", steps=steps, epsilon_cap=cap, **SPEND)
    return ledger.commit(reservation, steps)


def reference_epsilon(steps: int) -> float:
    acc = RDPAccountant()
    acc.history = [(1.0, 0.1, steps)]
    return float(acc.get_epsilon(DELTA))


def test_the_ledgers_mechanism_is_the_accountants() -> None:
    # The ledger names its mechanism without importing Opacus; it must be the one it accounts with.
    assert MECHANISM == RDPAccountant.mechanism()


# ------------------------------------------------------------------------ strict file


def test_an_empty_object_is_not_an_empty_ledger(tmp_path: Path) -> None:
    """The replayed attack: the site spent, `{}` overwrote the ledger; it used to read as 0 spend."""
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    (tmp_path / LEDGER_FILE).write_text("{}")
    with pytest.raises(LedgerError) as err:
        ledger.reserve(round=2, run="r", steps=3, epsilon_cap=100.0, **SPEND)  # the runtime already open
    message = str(err.value)
    for field in ("version", "mechanism", "ledger_id", "history", "rounds"):
        assert f"{tmp_path / LEDGER_FILE}: field {field}: value (missing): Field required" in message
    with pytest.raises(LedgerError, match="field version: value \\(missing\\)"):
        PrivacyLedger(tmp_path)  # a restarted runtime
    with pytest.raises(LedgerError):
        ledger.epsilon(DELTA)
    assert (tmp_path / LEDGER_FILE).read_text() == "{}"  # never replaced by a fresh ledger
    # Even on a site that never spent, `{}` is refused, not taken as a fresh ledger.
    other = tmp_path / "other"
    other.mkdir()
    (other / LEDGER_FILE).write_text("{}")
    with pytest.raises(LedgerError, match="field rounds"):
        PrivacyLedger(other)


def test_a_field_of_the_wrong_type_is_named_with_its_value(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    data["rounds"][0]["steps"] = "3"  # strict: a string is never read as a number
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=r"privacy_ledger.json: field rounds.0.steps: value '3'"):
        PrivacyLedger(tmp_path)
    data["rounds"][0]["steps"] = 3
    data["history"][0][2] = 5  # the history holds more than the rounds log
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="5 steps but the rounds log 3"):
        PrivacyLedger(tmp_path)
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(LedgerError, match=LEDGER_FILE):
        PrivacyLedger(tmp_path)


# ------------------------------------------------------------------------ the site remembers


def test_a_deleted_ledger_is_detected(tmp_path: Path) -> None:
    """The replayed attack: the ledger file removed after the site spent; it used to count as 0."""
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    spend(ledger, 2)
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(
        LedgerError,
        match=r"privacy ledger is missing, but .*privacy_ledger.mark.json records that "
        r"this site already spent 6 DP steps over 2 rounds",
    ):
        PrivacyLedger(tmp_path)
    with pytest.raises(LedgerError, match="missing"):
        ledger.reserve(round=3, run="r", steps=3, epsilon_cap=100.0, **SPEND)
    assert not (tmp_path / LEDGER_FILE).exists()


def test_an_older_copy_or_another_sites_ledger_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    shutil.copy(tmp_path / LEDGER_FILE, tmp_path / "backup.json")
    spend(ledger, 2)
    shutil.copy(tmp_path / "backup.json", tmp_path / LEDGER_FILE)  # rolled back to round 1
    with pytest.raises(LedgerError, match="holds 3 steps over 1 rounds, but .* records 6 steps over 2 rounds"):
        PrivacyLedger(tmp_path)

    other = tmp_path / "other"
    spend(PrivacyLedger(other), 1, steps=9)
    shutil.copy(other / LEDGER_FILE, tmp_path / LEDGER_FILE)  # more steps, but not this site's ledger
    with pytest.raises(LedgerError, match="field ledger_id: value .* is not the ledger this site wrote"):
        PrivacyLedger(tmp_path)


def test_a_ledger_without_its_mark_loses_nothing_and_gets_it_back(tmp_path: Path) -> None:
    """Ledger first, mark second: a crash between them (or a deleted mark) leaves the full ledger."""
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    (tmp_path / MARK_FILE).unlink()
    assert PrivacyLedger(tmp_path).steps == 3
    spend(ledger, 2)
    assert json.loads((tmp_path / MARK_FILE).read_text())["steps"] == 6


# ------------------------------------------------------------------------ reserve, then train


def test_the_cap_is_checked_and_counted_before_training_and_a_failed_round_stays_counted(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    cap = reference_epsilon(10)
    reservation = ledger.reserve(round=1, run="r", steps=6, epsilon_cap=cap, **SPEND)
    assert ledger.steps == 6 and ledger.epsilon(DELTA) == pytest.approx(reference_epsilon(6), rel=1e-12)
    # The round "crashes" before commit: a restarted runtime still counts its steps.
    restarted = PrivacyLedger(tmp_path)
    assert restarted.data.rounds[0].status == "reserved" and restarted.steps == 6
    before = {f: (tmp_path / f).read_bytes() for f in (LEDGER_FILE, MARK_FILE)}
    with pytest.raises(BudgetExceeded, match=r"would be .* > the policy's cap .* \(spent "):
        restarted.reserve(round=2, run="r", steps=5, epsilon_cap=cap, **SPEND)  # 11 steps > the cap's 10
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # a refusal writes nothing
    restarted.reserve(round=2, run="r", steps=4, epsilon_cap=cap, **SPEND)  # exactly the cap
    assert restarted.steps == 10
    # A late commit of the crashed round still works, and cannot claim more steps than it reserved.
    with pytest.raises(LedgerError, match="took 7 steps, 6 reserved"):
        ledger.commit(reservation, 7)
    assert ledger.commit(reservation, 6) == pytest.approx(cap, rel=1e-12)
    with pytest.raises(LedgerError, match="already 'trained'"):
        ledger.commit(reservation, 6)


def _spend_until_refused(state_dir: str, worker: int, cap: float, queue: multiprocessing.Queue) -> None:
    ledger = PrivacyLedger(state_dir)
    spent, reported = 0, []
    for rnd in range(1, 100):
        try:
            reservation = ledger.reserve(round=rnd, run=f"worker-{worker}", steps=2, epsilon_cap=cap, **SPEND)
        except BudgetExceeded:
            break
        reported.append(ledger.commit(reservation, 2))
        spent += 2
    queue.put((worker, spent, reported))


def test_two_processes_spending_one_budget_record_every_step_and_never_pass_the_cap(tmp_path: Path) -> None:
    """The replayed race: two runtimes on one state directory used to keep 20 of 22 steps."""
    cap = reference_epsilon(24) + 1e-9  # room for 24 steps, 12 rounds of 2
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_spend_until_refused, args=(str(tmp_path), w, cap, queue)) for w in (1, 2)]
    for p in workers:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in workers)
    for p in workers:
        p.join(timeout=60)
        assert p.exitcode == 0
    ledger = PrivacyLedger(tmp_path)
    spent = sum(s for _, s, _ in results)
    assert spent == ledger.steps == 24  # every step recorded, the whole budget and not one step more
    assert all(s > 0 for _, s, _ in results), "both processes spent"
    assert ledger.epsilon(DELTA) <= cap
    assert max(max(r) for *_, r in results) == pytest.approx(ledger.epsilon(DELTA), rel=1e-12)
    assert all(e <= cap for *_, r in results for e in r)
    assert [r.status for r in ledger.data.rounds] == ["trained"] * 12
    assert {r.run for r in ledger.data.rounds} == {"worker-1", "worker-2"}


# ------------------------------------------------------------------------ the DP engine


def test_a_step_beyond_the_reservation_changes_no_weight(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    step = DPLocalStep(
        DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, n_samples=4, delta=DELTA),
        RDPAccountant(),
        max_steps=1,
    )
    opt = step.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    assert opt.secure_mode and opt.fresh_noise  # production path: Opacus's secure noise, a fresh generator per step
    for expected_steps in (1, 2):
        opt.zero_grad()
        loss = model(torch.ones(1, 3)).sum()
        opt.accumulate(list(torch.autograd.grad(loss, opt.params)))
        before = [p.detach().clone() for p in model.parameters()]
        if expected_steps == 1:
            opt.step()
            assert step.steps_taken == 1
        else:
            with pytest.raises(RuntimeError, match="DP step 2 exceeds the 1 steps reserved"):
                opt.step()
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step.steps_taken == 1


def test_noise_and_samples_come_from_the_os_not_from_any_seed(tmp_path: Path) -> None:
    gens = [secret_generator() for _ in range(2)]
    draws = [torch.randn(8, generator=g) for g in gens]
    assert not torch.equal(draws[0], draws[1])
    # The default generator's seed (the trainer seeds it from the server's seed) decides nothing.
    noises, batches = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        with torch.no_grad():
            model.weight.zero_()
            model.bias.zero_()
        step = DPLocalStep(
            DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, n_samples=4, delta=DELTA),
            RDPAccountant(),
        )
        opt = step.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1.0))
        opt.step()  # an empty batch: the update is the noise alone
        noises.append(model.weight.detach().clone())
        torch.manual_seed(0)
        batches.append(
            [b for b in PoissonBatches(cast("Dataset[int]", list(range(64))), list, sample_rate=0.5, steps=3)]
        )
    assert not torch.equal(noises[0], noises[1])
    assert batches[0] != batches[1]


def test_under_dp_no_loss_or_timing_leaves_and_without_dp_no_epsilon() -> None:
    arrays = {"backbone.final_norm.weight": np.ones(3, dtype=np.float32)}
    dp_round = PrivacySpend(epsilon=1.5, delta=DELTA, noise_multiplier=1.1)
    ok = TrainReply(
        arrays=arrays, num_examples=8, group_examples={"shared": 8}, rate_min=0.1, rate_max=2.0, dp=dp_round
    )
    assert ok.dp == dp_round
    for leak in ({"train_seconds": 3.2}, {"client_seconds": 3.5}, {"losses": {"total": 1.0}}, {"grad_norm": 0.3}):
        with pytest.raises(ValueError, match="a DP update carries no"):
            TrainReply(arrays=arrays, num_examples=8, group_examples={"shared": 8}, dp=dp_round, **leak)
    with pytest.raises(ValueError, match="without DP carries no privacy spend"):
        TrainReply(
            arrays=arrays,
            num_examples=8,
            group_examples={"shared": 8},
            train_seconds=1.0,
            dp=PrivacySpend(epsilon=0.0, delta=DELTA),
        )
    # A refusal may say how much the site has spent (why it refuses).
    assert TrainReply.refused("cap", dp=PrivacySpend(epsilon=8.0, delta=DELTA)).dp is not None


# ------------------------------------------------------------------------ make_private_training


def request(**kw: Any) -> DPRequest:
    base: dict[str, Any] = {"asked": True, "batch_size": 2, "steps": 2, "planned_steps": 4, "round": 1, "run": "r"}
    base.update(kw)
    return DPRequest(**base)


def test_make_private_training_refuses_before_reserving(tmp_path: Path) -> None:
    data = cast("Dataset[int]", list(range(20)))  # a list serves as a map-style dataset
    budget = DPPolicy(epsilon_cap=50.0, delta=DELTA, noise_multiplier=1.0)
    assert make_private_training(data, list, request(asked=False), budget, PrivacyLedger(tmp_path)) is None
    with pytest.raises(PrivacyRefused, match="no privacy budget"):
        make_private_training(data, list, request(), None, PrivacyLedger(tmp_path))
    with pytest.raises(PrivacyRefused, match="no state-dir"):
        make_private_training(data, list, request(), budget, None)
    wide = DPPolicy(epsilon_cap=50.0, delta=0.1, noise_multiplier=1.0)  # 0.1 > 1/20
    with pytest.raises(PrivacyRefused, match=r"dp.delta .*delta 0.1 is above 1/n = 1/20"):
        dp_settings(request(), wide, n_samples=20)
    with pytest.raises(PrivacyRefused, match="cap 0.5"):
        make_private_training(
            data, list, request(), budget.model_copy(update={"epsilon_cap": 0.5}), PrivacyLedger(tmp_path)
        )
    assert not (tmp_path / LEDGER_FILE).exists()

    private = make_private_training(data, list, request(), budget, PrivacyLedger(tmp_path))
    assert private is not None and private.settings.sample_rate == 0.1 and private.local_step.max_steps == 2
    assert PrivacyLedger(tmp_path).data.rounds[0].status == "reserved"  # counted before any training
    assert len(private.loader) == 10
    assert private.commit() == pytest.approx(PrivacyLedger(tmp_path).epsilon(DELTA))  # 0 steps taken: still counted
    assert PrivacyLedger(tmp_path).data.rounds[0].steps_taken == 0 and PrivacyLedger(tmp_path).steps == 2


# ------------------------------------------------------------------------ the budget belongs to the key (issue 26, break 5)


def binding(tmp_path: Path) -> KeyBinding:
    """A key's budget record beside its (notional) key file: the ledger then belongs to the key."""
    return KeyBinding(key_sha256="ab" * 32, record=record_path(tmp_path / "auth_key"))


def test_a_state_dir_without_the_keys_ledger_is_refused(tmp_path: Path) -> None:
    """The replayed break: a DP site rejoined with another --state-dir and trained again from epsilon 0."""
    key = binding(tmp_path)
    first, second = tmp_path / "state-a", tmp_path / "state-b"
    ledger = PrivacyLedger(first, key)
    spend(ledger, 1)
    epsilon = spend(ledger, 2)
    record = read_record(key.record)
    assert record is not None and record.current.ledger_id == ledger.data.ledger_id
    assert (record.current.steps, record.current.rounds, record.current.epsilon) == (6, 2, epsilon)
    # Without the key's record the new directory would read as a fresh ledger, epsilon 0.
    assert PrivacyLedger(second).epsilon(DELTA) == 0.0
    with pytest.raises(LedgerError) as err:
        PrivacyLedger(second, key)
    message = str(err.value)
    for part in (str(second / LEDGER_FILE), str(key.record), str(first / LEDGER_FILE), "6 DP steps over 2 rounds"):
        assert part in message
    assert f"epsilon {epsilon:.4g}" in message and "--new-privacy-budget" in message
    assert not (second / LEDGER_FILE).exists()  # nothing written over the refusal

    # Another site's (or another run's) ledger in the directory: refused as well.
    spend(PrivacyLedger(tmp_path / "other"), 1, steps=9)
    second.mkdir()
    shutil.copy(tmp_path / "other" / LEDGER_FILE, second / LEDGER_FILE)
    with pytest.raises(LedgerError, match=r"holds another ledger .* spent 6 DP steps over 2 rounds"):
        PrivacyLedger(second, key)

    # An older copy of the key's ledger, its mark lost with it: the record still knows.
    shutil.copy(first / LEDGER_FILE, tmp_path / "backup.json")
    spend(ledger, 3)
    shutil.copy(tmp_path / "backup.json", first / LEDGER_FILE)
    (first / MARK_FILE).unlink()
    with pytest.raises(LedgerError, match=r"holds 6 steps over 2 rounds, but the budget record .* 9 DP steps"):
        PrivacyLedger(first, key)


def test_a_new_budget_is_explicit_and_the_record_keeps_what_was_given_up(tmp_path: Path) -> None:
    key = binding(tmp_path)
    first, second = tmp_path / "state-a", tmp_path / "state-b"
    old = PrivacyLedger(first, key)
    spent, old_id = spend(old, 1), old.data.ledger_id
    assert PrivacyLedger(first, key, verify=False).start_new_budget() is None  # an accepted ledger is never replaced
    assert PrivacyLedger(first, key).steps == 3

    started = PrivacyLedger(second, key, verify=False).start_new_budget()
    assert started is not None
    assert (started.replaces, started.replaced_steps, started.replaced_epsilon) == (old_id, 3, spent)
    new = PrivacyLedger(second, key)
    assert new.steps == 0 and new.data.new_budget == started and new.data.ledger_id != old_id
    spend(new, 1)
    assert new.data.new_budget == started  # kept through every write
    record = read_record(key.record)
    assert record is not None and record.current.ledger_id == new.data.ledger_id
    assert [(r.ledger_id, r.steps, r.epsilon) for r in record.replaced] == [(old_id, 3, spent)]
    # The given-up ledger is not the key's any more.
    with pytest.raises(LedgerError, match="holds another ledger"):
        PrivacyLedger(first, key)


def test_a_damaged_ledger_replaced_by_a_new_budget_is_kept_beside_it(tmp_path: Path) -> None:
    key = binding(tmp_path)
    spend(PrivacyLedger(tmp_path / "state", key), 1)
    (tmp_path / "state" / LEDGER_FILE).write_text("{}")
    started = PrivacyLedger(tmp_path / "state", key, verify=False).start_new_budget()
    assert started is not None and started.replaced_steps == 3
    assert PrivacyLedger(tmp_path / "state", key).steps == 0
    [kept] = (tmp_path / "state").glob(f"{LEDGER_FILE}.replaced-*")
    assert kept.read_text() == "{}"


def test_the_record_written_last_may_lag_its_ledger_but_never_lead_it(tmp_path: Path) -> None:
    """Ledger, mark, record: a crash before the record's write leaves it behind (accepted, caught up)."""
    key = binding(tmp_path)
    ledger = PrivacyLedger(tmp_path / "state", key)
    spend(ledger, 1)
    behind = key.record.read_bytes()
    spend(ledger, 2)
    key.record.write_bytes(behind)  # as if the process died before rewriting the record
    assert PrivacyLedger(tmp_path / "state", key).steps == 6
    assert PrivacyLedger(tmp_path / "state", key).sync_record().steps == 6
    record = read_record(key.record)
    assert record is not None and record.current.steps == 6


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a read-only file system: Linux /proc")
def test_a_record_that_cannot_be_written_refuses_dp_before_anything_is_counted(tmp_path: Path) -> None:
    # /proc takes no new file, even from root: a key beside which nothing can be written.
    key = KeyBinding(key_sha256="ab" * 32, record=Path("/proc/self/auth_key.privacy.json"))
    ledger = PrivacyLedger(tmp_path / "state", key)
    with pytest.raises(LedgerError, match=r"/proc/self/auth_key.privacy.json: cannot write the key's privacy budget"):
        ledger.reserve(round=1, run="r", steps=3, epsilon_cap=100.0, **SPEND)
    assert not (tmp_path / "state" / LEDGER_FILE).exists()  # refused before the reservation
    with pytest.raises(LedgerError, match="cannot write"):
        ledger.sync_record()  # what `join` calls: it stops before the SuperNode starts
    # A record where no file can be (its folder is a file) cannot be read either: refused at once.
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(LedgerError, match=r"not-a-dir/auth_key.privacy.json: cannot read"):
        PrivacyLedger(
            tmp_path / "state",
            KeyBinding(key_sha256="ab" * 32, record=record_path(tmp_path / "not-a-dir" / "auth_key")),
        )


def test_a_record_of_another_key_is_refused(tmp_path: Path) -> None:
    key = binding(tmp_path)
    spend(PrivacyLedger(tmp_path / "state", key), 1)
    other = KeyBinding(key_sha256="cd" * 32, record=key.record)
    with pytest.raises(LedgerError, match=r"field key_sha256: value 'abab.*' is not this site's key"):
        PrivacyLedger(tmp_path / "state", other)


# ------------------------------------------------------------------------ history against rounds


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # the 10x-noise reference epsilon
def test_an_edited_history_is_refused_naming_the_file_and_the_round(tmp_path: Path) -> None:
    """The replayed break: `history` edited to 10x the noise (rounds log unchanged) was accepted and
    reported a fraction of the spend; the site then trained past its cap."""
    ledger = PrivacyLedger(tmp_path)
    spend(ledger, 1)
    spent = spend(ledger, 2)
    original = json.loads((tmp_path / LEDGER_FILE).read_text())
    edited = json.loads(json.dumps(original))
    edited["history"] = [[n * 10, q, s] for n, q, s in original["history"]]
    (tmp_path / LEDGER_FILE).write_text(json.dumps(edited))
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in edited["history"]]
    assert acc.get_epsilon(DELTA) < spent / 10  # what the edited ledger used to report
    with pytest.raises(LedgerError) as err:
        PrivacyLedger(tmp_path)
    assert str(tmp_path / LEDGER_FILE) in str(err.value) and "round 1 " in str(err.value)
    with pytest.raises(LedgerError, match="field history"):
        ledger.reserve(round=3, run="r", steps=3, epsilon_cap=100.0, **SPEND)  # the runtime already open

    # Rounds and history edited alike: the recorded epsilon no longer follows from the history.
    for entry in edited["rounds"]:
        entry["noise_multiplier"] *= 10
    (tmp_path / LEDGER_FILE).write_text(json.dumps(edited))
    with pytest.raises(LedgerError, match=r"privacy_ledger.json: round 1 .*field epsilon_after: value "):
        PrivacyLedger(tmp_path)

    # One round's epsilon_after edited: that round is named.
    edited = json.loads(json.dumps(original))
    edited["rounds"][1]["epsilon_after"] = 0.5
    (tmp_path / LEDGER_FILE).write_text(json.dumps(edited))
    with pytest.raises(LedgerError, match=r"round 2 \(reservation .*\): field epsilon_after: value 0.5, but"):
        PrivacyLedger(tmp_path)
    (tmp_path / LEDGER_FILE).write_text(json.dumps(original))
    assert PrivacyLedger(tmp_path).epsilon(DELTA) == spent  # the untouched ledger reads as before


def test_rounds_at_several_noise_levels_and_deltas_agree_with_their_history(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    for rnd, (noise, rate, steps, delta) in enumerate(
        [(1.0, 0.1, 3, 1e-5), (1.0, 0.1, 2, 1e-6), (1.3, 0.05, 4, 1e-5), (1.0, 0.1, 1, 1e-5), (0.9, 0.2, 7, 1e-6)]
    ):
        reservation = ledger.reserve(
            round=rnd,
            run="r",
            noise_multiplier=noise,
            sample_rate=rate,
            steps=steps,
            max_grad_norm=1.0,
            delta=delta,
            epsilon_cap=100.0,
        )
        ledger.commit(reservation, steps)
    assert history_problem(PrivacyLedger(tmp_path).data) is None


# ------------------------------------------------------------------------ files that are not text


@pytest.mark.parametrize("name", [LEDGER_FILE, MARK_FILE])
def test_a_ledger_or_mark_that_is_not_utf8_is_a_ledger_error_naming_the_file(tmp_path: Path, name: str) -> None:
    spend(PrivacyLedger(tmp_path), 1)
    (tmp_path / name).write_bytes(b'{"version": 2, "ledger_id": "\xff\xfe"}')
    with pytest.raises(LedgerError, match=rf"{tmp_path / name}: the .* is not UTF-8 text"):
        PrivacyLedger(tmp_path)


def test_a_record_that_is_not_utf8_or_not_a_record_is_a_ledger_error_naming_it(tmp_path: Path) -> None:
    key = binding(tmp_path)
    spend(PrivacyLedger(tmp_path / "state", key), 1)
    key.record.write_bytes(b"\xff\xfe")
    with pytest.raises(LedgerError, match=rf"{key.record}: the key's privacy budget record is not UTF-8"):
        PrivacyLedger(tmp_path / "state", key)
    key.record.write_text("{}")
    with pytest.raises(LedgerError, match=rf"{key.record}: field version: value \(missing\)"):
        PrivacyLedger(tmp_path / "state", key)
