"""`Pending`: the answer to one command submitted to the worker, which the submitting thread waits on."""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_PENDING, _RUNNING, _CANCELLED, _DONE = range(4)
_transitions = threading.Lock()  # makes "the worker takes it" and "the client gives up" exclusive


class Pending(Generic[T]):
    """The part of concurrent.futures.Future that is used here, with half its lock traffic: a Future waits
    on a Condition (a new lock per wait, an RLock around both sides); this waits on one lock that the
    worker releases. Measured in bench/README.md.
    """

    __slots__ = ("_done", "_state", "_value", "_error", "_callback")
    _value: T  # set by set_result, before _done is released

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._state = _PENDING
        self._error: BaseException | None = None
        self._callback: Callable[[Pending[T]], None] | None = None

    def result(self, timeout: float | None = None) -> T:
        """The worker's answer; raises what the worker set, or TimeoutError."""
        if not self._done.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise TimeoutError("no answer from the firewall worker in time")
        self._done.release()  # so that a second call returns at once too
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        """True once answered: result() returns (or raises) at once."""
        if self._done.acquire(blocking=False):
            self._done.release()
            return True
        return False

    def on_done(self, callback: Callable[[Pending[T]], None]) -> None:
        """Call `callback(self)` once answered: on the answering thread (the worker's), or here and now if it is
        already. It must be quick and must not raise."""
        with _transitions:
            if self._state != _DONE:
                self._callback = callback
                return
        self._wait_released()
        callback(self)

    def _wait_released(self) -> None:
        # _DONE is set just before the answer is stored and _done released: wait out that instant.
        self._done.acquire()
        self._done.release()

    def cancel(self) -> bool:
        """Withdraw the command if the worker has not taken it yet; True if it never will."""
        with _transitions:
            if self._state == _PENDING:
                self._state = _CANCELLED
            return self._state == _CANCELLED

    def set_running_or_notify_cancel(self) -> bool:
        """The worker takes the command: False if it was withdrawn (cancel() won)."""
        with _transitions:
            if self._state == _CANCELLED:
                return False
            self._state = _RUNNING
            return True

    def set_result(self, value: T) -> None:
        self._take_answer()
        self._value = value
        self._done.release()
        if self._callback is not None:
            self._callback(self)

    def set_exception(self, error: BaseException) -> None:
        self._take_answer()
        self._error = error
        self._done.release()
        if self._callback is not None:
            self._callback(self)

    def _take_answer(self) -> None:
        """Mark the command answered; a second answer is a bug, and raises before it changes the first."""
        with _transitions:
            if self._state == _DONE:
                raise RuntimeError("this command was answered already")
            self._state = _DONE
