"""Connection admission: a slot for each connection before TLS, a deadline for each whole phase, and
slots taken back from connections that are not doing work when every slot is taken.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable

from webiptd.config import Limits
from webiptd.net import Address, client_key
from webiptd.log import Reason, Summarized

logger = logging.getLogger(__name__)

# A connection's phases. Only BUSY, a request read whole and being answered, is doing work for somebody:
# a slot in any other phase may be taken back when the pool is full.
HANDSHAKE = "handshake"
HEAD = "head"
BODY = "body"
BUSY = "busy"
IDLE = "idle"

OVER_LIMIT = Reason(
    "closed a connection from {source}: over the per-client limit (limits.max_connections_per_client)",
    "closed {n} connections from {source} over the per-client limit")
FULL = Reason(
    "closed a connection from {source}: every connection slot is busy with a request (limits.max_connections)",
    "closed {n} connections from {source} while every slot was busy")
EVICTED = Reason(
    "took a connection slot back from {source}: the pool was full and it had no request in progress",
    "took {n} connection slots back from {source} with no request in progress, for newer connections")
TIMED_OUT = {
    HANDSHAKE: Reason("closed a connection from {source}: no TLS handshake within limits.handshake_timeout",
                      "closed {n} connections from {source} that did not finish the TLS handshake in time"),
    HEAD: Reason("closed a connection from {source}: no complete request head within limits.header_timeout",
                 "closed {n} connections from {source} that did not send a request head in time"),
    BODY: Reason("closed a connection from {source}: the request body did not arrive within limits.request_timeout",
                 "closed {n} connections from {source} whose request body did not arrive in time"),
}


class Slot:
    """One admitted connection. `control` is a duplicate of its TCP descriptor, owned by admission, so a
    shutdown from another thread reaches the socket whatever wraps it, and never a reused descriptor."""

    __slots__ = ("control", "source", "trusted", "reserved", "phase", "deadline", "ended")

    def __init__(self, control: socket.socket, source: str, trusted: bool, reserved: bool):
        self.control = control
        self.source = source
        self.trusted = trusted
        self.reserved = reserved  # in the trusted clients' own slots, not the general pool
        self.phase = HANDSHAKE
        self.deadline: float | None = None
        self.ended: str | None = None  # why admission shut it, if it did


def is_trusted(address: Address, trusted: tuple[Any, ...]) -> bool:
    return any(address in network for network in trusted)


class Admission:
    """Decides, before TLS and before a thread is spent, whether a new connection gets a slot.

    - Trusted clients (limits.trusted_clients) have limits.trusted_connections slots of their own; when
      those are taken they use the general pool like anybody, without the per-client cap.
    - Anybody else has at most limits.max_connections_per_client slots (an IPv4 address, or an IPv6 /64).
      At that cap a new connection takes back the source's own oldest idle keep-alive slot, or is closed.
    - When a pool is full, a new connection takes back the slot that has been longest without a request
      in progress: in the TLS handshake, reading a request, or idle between requests. When every slot is
      busy answering a request, the new connection is closed.
    - `expire()` shuts every connection whose phase has outlived its deadline.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, events: Summarized | None = None):
        self._clock = clock
        self.events = events or Summarized(logger, clock=clock)
        self._cond = threading.Condition()
        # Per pool (reserved or general): every slot, and the ones not BUSY in the order they stopped being.
        self._slots: dict[bool, dict[Slot, None]] = {True: {}, False: {}}
        self._waiting: dict[bool, dict[Slot, None]] = {True: {}, False: {}}
        self._per_source: dict[str, dict[Slot, None]] = {}  # untrusted sources only
        self.refused = 0
        self.evicted = 0
        self.expired = 0

    def admit(self, sock: socket.socket, address: Address, limits: Limits) -> Slot | None:
        """A slot for `sock` from `address`, or None when it must be closed at once."""
        trusted = is_trusted(address, limits.trusted_clients)
        source = client_key(address)
        with self._cond:
            if trusted:
                reserved = self._make_room(True, limits.trusted_connections)
                if not reserved and not self._make_room(False, limits.max_connections):
                    self._refuse(FULL, source)
                    return None
            else:
                reserved = False
                own = self._per_source.get(source)
                if own is not None and len(own) >= limits.max_connections_per_client:
                    idle = next((s for s in own if s.phase == IDLE), None)  # own is oldest first
                    if idle is None:
                        self._refuse(OVER_LIMIT, source)
                        return None
                    self._end(idle, "evicted")
                elif not self._make_room(False, limits.max_connections):
                    self._refuse(FULL, source)
                    return None
            slot = Slot(sock.dup(), source, trusted, reserved)
            slot.deadline = self._clock() + limits.handshake_timeout
            self._slots[reserved][slot] = None
            self._waiting[reserved][slot] = None
            if not trusted:
                self._per_source.setdefault(source, {})[slot] = None
            return slot

    def _make_room(self, reserved: bool, size: int) -> bool:
        """True when the pool has a free slot now, taking back its longest-waiting one if it must."""
        if len(self._slots[reserved]) < size:
            return True
        if size == 0 or not self._waiting[reserved]:
            return False
        victim = next(iter(self._waiting[reserved]))
        self._end(victim, "evicted")
        self.events.event(EVICTED, victim.source)
        return True

    def _refuse(self, reason: Reason, source: str) -> None:
        self.refused += 1
        self.events.event(reason, source)

    def _end(self, slot: Slot, why: str) -> None:
        """Shut the connection (its thread wakes and releases it) and free its slot now. Holds the lock."""
        slot.ended = why
        if why == "evicted":
            self.evicted += 1
        else:
            self.expired += 1
        self._forget(slot)
        try:
            slot.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer already went

    def _forget(self, slot: Slot) -> None:
        self._slots[slot.reserved].pop(slot, None)
        self._waiting[slot.reserved].pop(slot, None)
        own = self._per_source.get(slot.source)
        if own is not None:
            own.pop(slot, None)
            if not own:
                del self._per_source[slot.source]

    def enter(self, slot: Slot, phase: str, timeout: float | None) -> bool:
        """Move `slot` to `phase`, due to end within `timeout` seconds (None: no deadline).
        False when admission already shut it: the caller stops, having done nothing for its request."""
        with self._cond:
            if slot.ended is not None:
                return False
            slot.phase = phase
            slot.deadline = None if timeout is None else self._clock() + timeout
            waiting = self._waiting[slot.reserved]
            if phase == BUSY:
                waiting.pop(slot, None)
            elif slot not in waiting:
                waiting[slot] = None  # it waits from now: the back of the line
            return True

    def release(self, slot: Slot) -> None:
        """The connection's thread is done with it; call before closing the socket."""
        with self._cond:
            if slot.ended is None:
                self._forget(slot)
            slot.ended = slot.ended or "released"
            slot.control.close()
            self._cond.notify_all()

    def expire(self) -> None:
        """Shut every connection past its phase's deadline, and write the warnings that are due."""
        now = self._clock()
        late = []
        with self._cond:
            for pool in self._slots.values():
                for slot in pool:
                    if slot.deadline is not None and slot.deadline <= now:
                        late.append(slot)
            for slot in late:
                phase = slot.phase
                self._end(slot, "expired")
                reason = TIMED_OUT.get(phase)
                if reason is not None:  # an idle keep-alive connection that times out is ordinary
                    self.events.event(reason, slot.source)
        self.events.flush()

    def close_waiting(self, everything: bool = False) -> None:
        """At shutdown: close every connection without a request in progress (or every one)."""
        with self._cond:
            for pool in (self._slots if everything else self._waiting).values():
                for slot in list(pool):
                    self._end(slot, "stopping")

    def wait_empty(self, timeout: float) -> bool:
        """True once no connection holds a slot, or a thread is still between shutdown and release."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._slots[True] and not self._slots[False], timeout)

    def __len__(self) -> int:
        return len(self._slots[True]) + len(self._slots[False])

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"reserved": len(self._slots[True]), "general": len(self._slots[False]),
                    "sources": len(self._per_source), "refused": self.refused, "evicted": self.evicted,
                    "expired": self.expired}
