"""healthfm_core/long_poll.py: a held call answers as soon as something arrives, empty after its
hold, at once when no slot is free; nothing that arrives between a look and a wait is missed."""

from __future__ import annotations

import threading
import time

import pytest

from healthfm_core.long_poll import Waker, held, notifying, unwrapped


class Mailbox:
    """A handler's state: what it answers with (empty: []), and how often it was asked."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.calls = 0
        self.asked = threading.Event()

    def pull(self) -> list[str]:
        self.calls += 1
        self.asked.set()
        taken, self.items = self.items, []
        return taken


def test_a_held_call_answers_with_what_arrives_while_it_waits() -> None:
    box, waker = Mailbox(), Waker()
    # Hold and recheck far longer than any test: only the notify can end the wait in time.
    pull = held(box.pull, bool, 120.0, waker, threading.Semaphore(1), recheck=120.0)

    def deliver() -> None:
        assert box.asked.wait(60)  # the held call looked once and found nothing
        box.items.append("train message")
        waker.notify()

    sender = threading.Thread(target=deliver)
    sender.start()
    start = time.monotonic()
    assert pull() == ["train message"]
    sender.join()
    assert box.calls == 2  # the empty look, then the one after the notify
    assert time.monotonic() - start < 60  # woken by the notify, not by the end of the hold (120 s)


def test_a_held_call_with_nothing_to_answer_answers_empty_after_its_hold_asking_again_meanwhile() -> None:
    box = Mailbox()
    pull = held(box.pull, bool, 0.5, Waker(), threading.Semaphore(1), recheck=0.05)
    assert pull() == []
    assert box.calls >= 2  # asked again at the recheck: what arrives without a notify is seen


def test_without_a_free_slot_a_call_answers_at_once() -> None:
    box = Mailbox()
    pull = held(box.pull, bool, 120.0, Waker(), threading.Semaphore(0))
    assert pull() == [] and box.calls == 1


def test_a_handler_that_raises_frees_its_slot() -> None:
    slots = threading.Semaphore(1)

    def broken() -> list[str]:
        raise ValueError("bad request")

    with pytest.raises(ValueError, match="bad request"):
        held(broken, bool, 120.0, Waker(), slots)()
    assert slots.acquire(blocking=False)  # released


def test_what_arrives_between_a_look_and_the_wait_is_not_missed() -> None:
    waker = Waker()
    seen = waker.generation  # a held call looked (empty) ...
    waker.notify()  # ... something arrived before it waited
    done = threading.Event()

    def wait_then_set() -> None:
        waker.wait(seen, 120.0)
        done.set()

    threading.Thread(target=wait_then_set).start()
    assert done.wait(60)  # the wait returns at once, not after 120 s


def test_the_notifiers_wake_also_when_the_handler_raises_and_unwrapped_finds_flowers_handler() -> None:
    waker = Waker()

    def store() -> None:
        raise OSError("disk full")

    before = waker.generation
    with pytest.raises(OSError):
        notifying(store, waker)()
    assert waker.generation == before + 1
    order: list[str] = []
    notifying(lambda: order.append(f"handler at {waker.generation}"), waker, first=True)()
    assert order == [f"handler at {before + 2}"]  # notified before it ran
    wrapped = held(notifying(store, waker), bool, 1.0, waker, threading.Semaphore(1))
    assert unwrapped(wrapped) is store and unwrapped(store) is store
