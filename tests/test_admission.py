"""Connection admission without root: per-source cap, eviction order, phase deadlines, trusted slots, and the
warnings that summarise what clients caused. Real sockets (socketpairs), an injected clock."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
from typing import Any, Iterator

import pytest

from webiptd.admission import BODY, BUSY, HANDSHAKE, HEAD, IDLE, OVER_LIMIT, Admission, Slot
from webiptd.config import Limits
from webiptd.log import Reason, Summarized
from webiptd.net import peer_address

LIMITS = Limits(max_connections=4, max_connections_per_client=2, trusted_connections=2,
                handshake_timeout=5, header_timeout=10, idle_timeout=15, request_timeout=20)
A, B, C, D, E = (ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 6))
LOCAL = ipaddress.ip_address("127.0.0.1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Conn:
    """Our end of a socketpair, as the server holds it, and the client's end to watch for the close."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.slot: Slot | None = None

    def closed(self) -> bool:
        self.theirs.settimeout(0.2)
        try:
            return self.theirs.recv(1) == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def records() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger("test.admission")
    handler = Keep()
    log.addHandler(handler)
    log.propagate = False
    try:
        yield lines
    finally:
        log.removeHandler(handler)


@pytest.fixture
def adm(clock: Clock, records: list[str]) -> Admission:
    return Admission(clock=clock, events=Summarized(logging.getLogger("test.admission"), clock=clock))


@pytest.fixture
def conns() -> Iterator[list[Conn]]:
    made: list[Conn] = []
    yield made
    for c in made:
        c.close()


def connect(adm: Admission, conns: list[Conn], address: Any, limits: Limits = LIMITS) -> Conn:
    c = Conn()
    conns.append(c)
    c.slot = adm.admit(c.ours, address, limits)
    return c


def served(adm: Admission, c: Conn) -> None:
    """One request read and answered: the connection is idle between requests now."""
    assert c.slot is not None
    assert adm.enter(c.slot, HEAD, 10) and adm.enter(c.slot, BUSY, None) and adm.enter(c.slot, IDLE, 15)


# -- the per-source cap ----------------------------------------------------------------------------------

def test_a_source_over_its_cap_is_closed_when_none_of_its_connections_is_idle(adm: Admission,
                                                                               conns: list[Conn]) -> None:
    first, second = connect(adm, conns, A), connect(adm, conns, A)
    assert first.slot and second.slot
    third = connect(adm, conns, A)
    assert third.slot is None
    assert not first.closed() and not second.closed()
    assert connect(adm, conns, B).slot is not None, "another source is not affected"
    assert adm.refused == 1 and len(adm) == 3


def test_at_its_cap_a_source_takes_back_its_own_oldest_idle_connection(adm: Admission, conns: list[Conn]) -> None:
    first, second = connect(adm, conns, A), connect(adm, conns, A)
    served(adm, second)
    served(adm, first)  # idle since later, but connected first: the oldest of the source's connections
    third = connect(adm, conns, A)
    assert third.slot is not None
    assert first.closed() and not second.closed()
    assert first.slot is not None and first.slot.ended == "evicted"


def test_an_ipv6_slash_64_is_one_source(adm: Admission, conns: list[Conn]) -> None:
    net = "2001:db8:1:2:"
    assert connect(adm, conns, ipaddress.ip_address(net + ":1")).slot
    assert connect(adm, conns, ipaddress.ip_address(net + "ffff:ffff:ffff:ffff")).slot
    assert connect(adm, conns, ipaddress.ip_address(net + ":3")).slot is None
    assert connect(adm, conns, ipaddress.ip_address("2001:db8:1:3::1")).slot is not None


def test_an_ipv4_mapped_peer_counts_as_its_ipv4_address() -> None:
    assert peer_address("::ffff:198.51.100.1") == A
    assert peer_address("fe80::1%eth0") == ipaddress.ip_address("fe80::1")


# -- eviction when the pool is full --------------------------------------------------------------------

def test_a_full_pool_takes_back_the_longest_waiting_slot(adm: Admission, conns: list[Conn]) -> None:
    a, b, c, d = (connect(adm, conns, x) for x in (A, B, C, D))
    assert all(x.slot for x in (a, b, c, d))
    assert a.slot and b.slot
    adm.enter(a.slot, HEAD, 10)  # still its first request: it keeps its place in the line
    adm.enter(b.slot, BUSY, None)  # a request being answered is never taken back
    e = connect(adm, conns, E)
    assert e.slot is not None
    assert a.closed() and not b.closed() and not c.closed()
    assert adm.evicted == 1 and len(adm) == 4
    assert not adm.enter(a.slot, BUSY, None), "an evicted connection must not go on to act on its request"


def test_an_idle_connection_waits_from_the_end_of_its_last_request(adm: Admission, conns: list[Conn]) -> None:
    a, b, c, d = (connect(adm, conns, x) for x in (A, B, C, D))
    served(adm, a)  # a was first in, but has just finished a request: now at the back of the line
    connect(adm, conns, E)
    assert b.closed() and not a.closed()
    connect(adm, conns, E)
    assert c.closed() and not a.closed()
    connect(adm, conns, B)
    assert d.closed() and not a.closed()
    connect(adm, conns, C)
    assert a.closed()


def test_every_slot_busy_closes_the_newcomer(adm: Admission, conns: list[Conn]) -> None:
    held = [connect(adm, conns, x) for x in (A, B, C, D)]
    for c in held:
        assert c.slot and adm.enter(c.slot, HEAD, 10) and adm.enter(c.slot, BUSY, None)
    assert connect(adm, conns, E).slot is None
    assert not any(c.closed() for c in held)
    assert adm.refused == 1 and adm.evicted == 0


def test_release_frees_the_slot(adm: Admission, conns: list[Conn]) -> None:
    a = connect(adm, conns, A)
    assert a.slot is not None and len(adm) == 1
    adm.release(a.slot)
    assert len(adm) == 0 and adm.wait_empty(0.1)
    adm.release(a.slot)  # twice is harmless
    assert len(adm) == 0


# -- trusted clients --------------------------------------------------------------------------------------

def test_the_world_cannot_take_the_trusted_slots(adm: Admission, conns: list[Conn]) -> None:
    world = [connect(adm, conns, x) for x in (A, A, B, B, C, C, D, D)]  # the pool of 4 churns
    assert sum(c.slot is not None and c.slot.ended is None for c in world) == 4
    local = [connect(adm, conns, LOCAL) for _ in range(2)]
    assert all(c.slot is not None and c.slot.reserved for c in local)
    assert not any(c.closed() for c in local)
    assert sum(c.closed() for c in world) == 4, "only the world's own evictions"


def test_trusted_clients_have_no_per_client_cap_and_overflow_into_the_pool(adm: Admission,
                                                                           conns: list[Conn]) -> None:
    local = []
    for _ in range(6):
        c = connect(adm, conns, LOCAL)
        assert c.slot is not None and adm.enter(c.slot, BUSY, None)
        local.append(c)
    assert [c.slot.reserved for c in local if c.slot] == [True, True, False, False, False, False]
    assert connect(adm, conns, A).slot is None, "the pool is full of busy trusted connections"
    assert connect(adm, conns, LOCAL).slot is None


def test_a_full_trusted_reserve_takes_back_its_own_waiting_slot_first(adm: Admission, conns: list[Conn]) -> None:
    world = [connect(adm, conns, x) for x in (A, B, C, D)]
    first, second = connect(adm, conns, LOCAL), connect(adm, conns, LOCAL)
    third = connect(adm, conns, LOCAL)
    assert third.slot is not None and third.slot.reserved
    assert first.closed() and not second.closed()
    assert not any(c.closed() for c in world)


def test_no_trusted_clients_means_no_reserve(adm: Admission, conns: list[Conn]) -> None:
    limits = dataclasses.replace(LIMITS, trusted_clients=())
    assert connect(adm, conns, LOCAL, limits).slot is not None
    assert connect(adm, conns, LOCAL, limits).slot is not None
    assert connect(adm, conns, LOCAL, limits).slot is None, "loopback is capped like anybody"


# -- deadlines for whole phases ---------------------------------------------------------------------------

@pytest.mark.parametrize("phase, timeout", [(HANDSHAKE, 5), (HEAD, 10), (BODY, 20), (IDLE, 15)])
def test_each_phase_ends_at_its_deadline_however_the_bytes_trickle(adm: Admission, conns: list[Conn],
                                                                 clock: Clock, phase: str, timeout: float) -> None:
    c = connect(adm, conns, A)
    assert c.slot is not None
    if phase != HANDSHAKE:
        adm.enter(c.slot, phase, timeout)
    clock.now += timeout - 0.01  # whatever arrived meanwhile: the deadline is for the phase, not a recv()
    adm.expire()
    assert not c.closed()
    clock.now += 0.02
    adm.expire()
    assert c.closed() and c.slot.ended == "expired" and len(adm) == 0


def test_a_request_being_answered_has_no_admission_deadline(adm: Admission, conns: list[Conn],
                                                            clock: Clock) -> None:
    c = connect(adm, conns, A)
    assert c.slot is not None and adm.enter(c.slot, BUSY, None)
    clock.now += 10_000
    adm.expire()
    assert not c.closed()


def test_a_new_phase_gets_a_new_deadline(adm: Admission, conns: list[Conn], clock: Clock) -> None:
    c = connect(adm, conns, A)
    assert c.slot is not None
    clock.now += 4
    adm.enter(c.slot, HEAD, 10)  # the handshake ended in time; the head has its own 10 s
    clock.now += 9
    adm.expire()
    assert not c.closed()


def test_close_waiting_spares_busy_connections(adm: Admission, conns: list[Conn]) -> None:
    waiting, busy = connect(adm, conns, A), connect(adm, conns, B)
    assert busy.slot is not None and adm.enter(busy.slot, BUSY, None)
    adm.close_waiting()
    assert waiting.closed() and not busy.closed()
    assert not adm.wait_empty(0.05)
    adm.close_waiting(everything=True)
    assert busy.closed() and adm.wait_empty(0.05)


# -- warnings: bounded however long an attack lasts ------------------------------------------------------

def test_per_source_and_reason_one_line_a_minute_with_the_count(adm: Admission, conns: list[Conn],
                                                                clock: Clock, records: list[str]) -> None:
    for _ in range(2):
        held = connect(adm, conns, A)
        assert held.slot is not None and adm.enter(held.slot, BUSY, None)
    for _ in range(413):
        connect(adm, conns, A)
        clock.now += 0.1  # 41 s of attack
    adm.expire()
    assert records == ["closed a connection from 198.51.100.1: over the per-client limit "
                       "(limits.max_connections_per_client)"]
    clock.now += 20
    adm.expire()
    assert records[1:] == ["closed 412 connections from 198.51.100.1 over the per-client limit in the last 60 s"]
    clock.now += 60
    adm.expire()
    assert len(records) == 2, "a quiet minute writes nothing"
    clock.now += 60
    adm.expire()
    connect(adm, conns, A)
    assert len(records) == 3 and records[2].startswith("closed a connection"), "after a quiet minute: at once"


def test_many_sources_are_summed_up_beyond_the_named_ones(clock: Clock, records: list[str]) -> None:
    events = Summarized(logging.getLogger("test.admission"), max_sources=3, clock=clock)
    for i in range(1000):
        for _ in range(5):
            events.event(OVER_LIMIT, f"2001:db8:{i:x}::/64")
    assert len(records) == 3
    clock.now += 60
    events.flush()
    assert len(records) == 7
    assert records[-1] == ("closed 4985 connections from other sources over the per-client limit "
                           "in the last 60 s")
    assert sum("closed 4 connections from 2001:db8:" in r for r in records) == 3


def test_reasons_are_counted_apart(clock: Clock, records: list[str]) -> None:
    events = Summarized(logging.getLogger("test.admission"), clock=clock)
    one, two = Reason("one {source}", "{n} ones {source}"), Reason("two {source}", "{n} twos {source}")
    for reason in (one, two, one, two, two):
        events.event(reason, "x")
    clock.now += 61
    events.flush()
    assert records == ["one x", "two x", "1 ones x in the last 60 s", "2 twos x in the last 60 s"]
