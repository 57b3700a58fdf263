"""Pending on its own: the hand-off between a thread that submits a command and the worker that answers it."""

from __future__ import annotations

import threading
import time

import pytest

from webiptd.firewall.pending import Pending

WAIT = 10


def test_the_answer_reaches_a_thread_that_waits_for_it_and_every_later_call() -> None:
    pending: Pending[str] = Pending()
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(pending.result(WAIT)))
    waiter.start()
    assert pending.set_running_or_notify_cancel()
    pending.set_result("done")
    waiter.join(WAIT)
    assert got == ["done"]
    assert pending.result(0) == "done" and pending.result() == "done"


def test_none_is_an_answer() -> None:
    pending: Pending[None] = Pending()
    pending.set_result(None)
    assert pending.result(0) is None


def test_an_exception_is_raised_to_every_caller() -> None:
    pending: Pending[int] = Pending()
    error = ValueError("refused")
    pending.set_exception(error)
    for _ in range(2):
        with pytest.raises(ValueError) as raised:
            pending.result(0)
        assert raised.value is error


def test_no_answer_in_time_is_a_timeout_that_changes_nothing() -> None:
    pending: Pending[int] = Pending()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pending.result(0.05)
    assert time.monotonic() - start >= 0.04
    with pytest.raises(TimeoutError):
        pending.result(-1)  # a negative timeout is no wait at all, not "wait forever"
    pending.set_result(7)  # the answer may still come, and is then there
    assert pending.result(0) == 7


def test_a_command_withdrawn_before_the_worker_takes_it_is_never_run() -> None:
    pending: Pending[int] = Pending()
    assert pending.cancel()
    assert pending.cancel()  # still withdrawn
    assert not pending.set_running_or_notify_cancel()


def test_a_command_the_worker_took_cannot_be_withdrawn() -> None:
    pending: Pending[int] = Pending()
    assert pending.set_running_or_notify_cancel()
    assert not pending.cancel()
    pending.set_result(1)
    assert not pending.cancel()
    assert pending.result(0) == 1


def test_a_second_answer_is_a_bug_and_the_first_stays() -> None:
    pending: Pending[int] = Pending()
    pending.set_result(1)
    with pytest.raises(RuntimeError):
        pending.set_result(2)
    with pytest.raises(RuntimeError):
        pending.set_exception(ValueError("late"))
    assert pending.result(0) == 1
