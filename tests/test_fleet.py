"""The fleet (issue #8): three real daemons in three namespaces, each with its own kernel, sharing bans through a
private redis-server in a fourth (tests/fleet_net.py). One test per row of the issue's table, plus /fleet itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
import redis

from tests.fleet_net import (CHAIN, EVENTS, NOBODY4, PREFIX, STATE, Fleet, bulk, host_range, kernel_timeouts,
                             log_lines_since, node_password, path, wait_until)
from tests.harness import PKI
from tests.test_client import web_ipt
from webiptd.fleet import FILTER_COUNT, PUBLISH_SCRIPT, FleetNode, _Lean, snapshot_field

pytestmark = pytest.mark.root

NODES = ("a", "b", "c")
MIXED = ("ipset", "nftables", "ipset")  # each node its own kernel, and not all the same backend


@pytest.fixture
def make_fleet(pki: PKI, user_hashes: dict[str, str]) -> Iterator[Callable[..., Fleet]]:
    """Fleet(...) with the session's PKI and users; every fleet made is closed after the test. The nodes' and
    Redis' log tails go to stdout, which pytest shows when the test fails."""
    made: list[Fleet] = []

    def make(*args: Any, **kw: Any) -> Fleet:
        f = Fleet(pki, user_hashes, *args, **kw)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            for name, d in f.nodes.items():
                print(f"--- node {name} log (tail)\n" + "\n".join(d.log().splitlines()[-40:]))
                print(f"--- node {name} stderr (tail)\n" + d.stderr()[-2000:])
            print("--- redis log (tail)\n" + f.redis.log()[-1500:])
            f.close()


def started(f: Fleet, *names: str) -> Fleet:
    """Start Redis and the nodes, and wait until every node follows the stream (connected, nothing to catch up)."""
    f.start(*names)
    for n in names or f.nodes:
        wait_until(lambda n=n: f.caught_up(n), 15, f"node {n} connected and caught up")
    return f


def stream_id(text: str) -> tuple[int, int]:
    ms, seq = text.split("-")
    return int(ms), int(seq)


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def claims(f: Fleet, name: str, chain: str = CHAIN) -> dict[str, set[tuple[str, str | None]]]:
    """Node `name`'s claims on `chain` seen fleet-wide: by entry, {(node/owner, expires_at)}; a local claim is
    named after `name`, so every node's view of the same claims compares equal."""
    out = {}
    for key, e in f.listing(name, chain).items():
        out[key] = {(c["owner"] if c.get("node") else f"{name}/{c['owner']}", c["expires_at"]) for c in e["claims"]}
    return out


def everywhere(f: Fleet, networks: set[str], names: tuple[str, ...] = NODES) -> Callable[[], bool]:
    return lambda: all(networks <= f.entries(n) for n in names)


def nowhere(f: Fleet, networks: set[str], names: tuple[str, ...] = NODES) -> Callable[[], bool]:
    return lambda: all(not networks & f.entries(n) for n in names)


def no_acl_denials(f: Fleet) -> None:
    """Every key and command the nodes used is within the Redis user docs/fleet.md gives them (tests/fleet_net.py
    NODE_ACL): Redis logs each denial in ACL LOG."""
    denials = f.redis.client().acl_log(count=20)
    assert denials == [], denials


def alive(f: Fleet) -> None:
    for name, d in f.nodes.items():
        assert d.proc is not None and d.proc.poll() is None, f"node {name} exited: {d.stderr()[-2000:]}"


# -- the table ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backends", [("ipset",) * 3, ("nftables",) * 3], ids=["ipset", "nftables"])
def test_propagation(make_fleet: Callable[..., Fleet], backends: tuple[str, ...]) -> None:
    """A PUT on A is in B's and C's kernels; a DELETE by the same owner removes it everywhere. A chain that is
    not shared stays local."""
    f = started(make_fleet(backends))
    a = f["a"]
    assert a.request("PUT", path("203.0.113.9", "f2b-ssh")).status == 201  # not shared
    t0 = time.monotonic()
    assert a.request("PUT", path("203.0.113.7") + "?owner=sshd", user="f2b").status == 201
    r = a.request("PUT", path("2001:db8:ffff::/48") + "?proto=tcp&port=22,80&timeout=600")
    assert r.status == 201, r
    # tcp/22,80 is in a set of its own on either backend (hence kernel_text), one element a port
    scoped = "2001:db8:ffff:: . tcp . 22" if backends[0] == "nftables" else "2001:db8:ffff::/48,tcp:22"
    wait_until(lambda: all("203.0.113.7/32" in f.entries(n) and scoped in f.kernel_text(n) for n in NODES), 10,
               "A's two blocks in every kernel")
    print(f"propagation of two PUTs to B and C: {time.monotonic() - t0:.3f} s")
    for n in ("b", "c"):
        listing = f.listing(n)
        assert set(listing) == {"203.0.113.7/32", "2001:db8:ffff::/48 tcp 22,80"}, listing
        assert [(c["owner"], c["node"]) for c in listing["203.0.113.7/32"]["claims"]] == [("a/f2b/sshd", "a")]
        assert listing["2001:db8:ffff::/48 tcp 22,80"]["expires_at"] == \
            f.listing("a")["2001:db8:ffff::/48 tcp 22,80"]["expires_at"]
        assert f.entries(n, "f2b-ssh") == set()
    assert all(e.get("chain") == CHAIN for _, e in f.stream()), "an event of a chain that is not shared"

    r = a.request("DELETE", path("203.0.113.7") + "?owner=sshd", user="f2b")
    assert (r.status, r.json["deleted"]) == (200, True), r
    assert a.request("DELETE", path("2001:db8:ffff::/48") + "?proto=tcp&port=22,80").json["deleted"] is True
    wait_until(lambda: all("203.0.113.7/32" not in f.entries(n) and scoped not in f.kernel_text(n) for n in NODES),
               10, "A's two blocks gone from every kernel")
    for n in NODES:
        assert f.listing(n) == {}
    assert f.entries("a", "f2b-ssh") == {"203.0.113.9/32"}
    no_acl_denials(f)


def test_catch_up(make_fleet: Callable[..., Fleet]) -> None:
    """B is stopped while A bans 10k addresses; B starts and has all of them before its /fleet lag reaches 0,
    by following from its cursor (no resync)."""
    f = started(make_fleet(MIXED))
    assert f["a"].request("PUT", path("203.0.113.1")).status == 201
    wait_until(lambda: "203.0.113.1/32" in f.entries("b") and f.caught_up("b"), 10, "B past A's first event")
    resynced = f.status("b")["last_resync"]
    assert f.stop("b") == 0
    items = host_range(10_000, "198.18.0.1")
    r = bulk(f["a"], items, "?timeout=3600")
    assert r.status == 200 and r.json["created"] == 10_000, r
    wait_until(lambda: f.published("a"), 30, "A published its 10k events")
    assert f.redis.client().xlen(EVENTS) == 10_001

    t0 = time.monotonic()
    f.restart("b")
    wait_until(lambda: f.caught_up("b"), 60, "B caught up", every=0.02)
    caught_up_s = time.monotonic() - t0
    have = f.entries("b")
    print(f"B: restart to lag 0 over 10k events: {caught_up_s:.2f} s")
    assert set(items) <= have, f"lag 0 with {len(set(items) - have)} of 10k not in B's kernel"
    assert f.status("b")["last_resync"] == resynced, "B resynced instead of following from its cursor"
    wait_until(lambda: set(items) <= f.entries("c"), 30, "C has the 10k too")


def test_catch_up_after_joining_an_empty_stream(make_fleet: Callable[..., Fleet]) -> None:
    """A node that joined before the first event (its cursor 0-0) catches up from it after a restart: no event
    was ever trimmed, so there is nothing to resync for."""
    f = started(make_fleet(("ipset", "nftables"), names=("a", "b")))
    resynced = f.status("b")["last_resync"]
    assert f.stop("b") == 0
    items = host_range(100, "198.18.3.1")
    assert bulk(f["a"], items).json["created"] == 100
    wait_until(lambda: f.published("a"), 10, "A published")
    f.restart("b")
    wait_until(lambda: f.caught_up("b") and set(items) <= f.entries("b"), 20, "B caught up")
    assert f.status("b")["last_resync"] == resynced, "B resynced instead of following from its cursor"


def test_resync(make_fleet: Callable[..., Fleet]) -> None:
    """The stream is trimmed past B's cursor while B is down; B resyncs from the snapshot and ends identical:
    what was unblocked meanwhile goes, what was blocked comes, with the same claims and expiries."""
    f = started(make_fleet(MIXED))
    a, c = f["a"], f["c"]
    assert a.request("PUT", path("203.0.113.1")).status == 201
    assert a.request("PUT", path("203.0.113.2") + "?timeout=3600&owner=sshd", user="f2b").status == 201
    wait_until(lambda: {"203.0.113.1/32", "203.0.113.2/32"} <= f.entries("b"), 10, "B has A's first two")
    before = f.status("b")
    assert f.stop("b") == 0

    assert a.request("DELETE", path("203.0.113.1")).json["deleted"] is True
    for i in range(3, 6):
        assert a.request("PUT", path(f"203.0.113.{i}") + "?timeout=3600").status == 201
    assert c.request("PUT", path("203.0.113.6")).status == 201
    assert c.request("PUT", path("203.0.113.2") + "?timeout=1800").status == 200  # a second claim, C's
    for n in ("a", "c"):
        wait_until(lambda n=n: f.published(n), 10, f"node {n} published")
    # A and C hold each other's events before the trim: B's resync is what is tested, not theirs (a connected node
    # whose unread events are trimmed resyncs too: test_a_node_that_falls_behind_a_trim_while_connected_resyncs).
    want = {"203.0.113.2/32", "203.0.113.3/32", "203.0.113.4/32", "203.0.113.5/32", "203.0.113.6/32"}
    for n in ("a", "c"):
        wait_until(lambda n=n: f.entries(n) == want and f.caught_up(n), 10, f"node {n} has every ban")
    rc = f.redis.client()
    last = rc.xinfo_stream(EVENTS)["last-generated-id"]
    rc.xtrim(EVENTS, maxlen=0, approximate=False)
    # (Redis 7.0 moves max-deleted-entry-id on XDEL only, not on XTRIM: an emptied stream is the case to see)
    assert rc.xlen(EVENTS) == 0 and rc.xinfo_stream(EVENTS)["last-generated-id"] == last
    assert stream_id(before["last_applied_id"]) < stream_id(last)

    f.restart("b")
    wait_until(lambda: f.status("b")["last_resync"] != before["last_resync"] and f.caught_up("b"), 20,
               "B resynced and caught up")
    for n in NODES:
        assert f.entries(n) == want, n
    assert claims(f, "b") == claims(f, "a") == claims(f, "c")
    assert f.status("b")["remote_claims"] == 6
    # and B follows the stream again from where the snapshot was taken
    assert a.request("PUT", path("203.0.113.7")).status == 201
    wait_until(lambda: "203.0.113.7/32" in f.entries("b"), 10, "B follows after its resync")
    no_acl_denials(f)


def test_a_node_that_falls_behind_a_trim_while_connected_resyncs(make_fleet: Callable[..., Fleet]) -> None:
    """B is frozen (SIGSTOP: still connected, reading nothing) while A bans and the stream is trimmed past B's
    cursor; thawed, B's XREAD finds nothing to read, and it must notice the gap itself and resync."""
    f = started(make_fleet(MIXED))
    a, b = f["a"], f["b"]
    resynced = f.status("b")["last_resync"]
    os.kill(b.pid, signal.SIGSTOP)
    try:
        for i in range(20, 25):
            assert a.request("PUT", path(f"203.0.113.{i}")).status == 201
        wait_until(lambda: f.published("a"), 10, "A published")
        rc = f.redis.client()
        rc.xtrim(EVENTS, maxlen=0, approximate=False)
        assert rc.xlen(EVENTS) == 0
    finally:
        os.kill(b.pid, signal.SIGCONT)
    want = {f"203.0.113.{i}/32" for i in range(20, 25)}
    wait_until(lambda: want <= f.entries("b"), 15, "B has A's bans from the snapshot")
    assert f.status("b")["last_resync"] != resynced
    wait_until(lambda: f.caught_up("b"), 10, "B caught up")


def test_redis_down(make_fleet: Callable[..., Fleet]) -> None:
    """Redis (with AOF) is stopped, A takes 100 PUTs, all acknowledged without waiting for it; Redis is started
    again and B gets all 100, each published once."""
    f = started(make_fleet(MIXED, appendonly=True))
    a = f["a"]
    assert f.redis.stop() == 0
    items = host_range(100, "198.18.1.1")
    slowest = 0.0
    conn = a.connection()
    try:
        for item in items:
            t0 = time.monotonic()
            r = a.request("PUT", path(item) + "?timeout=3600", conn=conn)
            slowest = max(slowest, time.monotonic() - t0)
            assert r.status == 201, (item, r)
    finally:
        conn.close()
    print(f"slowest of 100 PUTs with Redis down: {slowest * 1000:.1f} ms")
    assert slowest < 1.0, "a PUT waited for Redis"
    assert set(items) <= f.entries("a")
    wait_until(lambda: not f.status("a")["connected"], 10, "A notices Redis is gone")
    assert f.status("a")["outbox"] == 100

    f.redis.start()
    wait_until(lambda: set(items) <= f.entries("b") and set(items) <= f.entries("c"), 30, "B and C got all 100")
    wait_until(lambda: f.published("a"), 10, "A's outbox empty")
    from_a = [e for _, e in f.stream() if e.get("node") == "a"]
    assert sorted(e["network"] for e in from_a) == sorted(items)


def test_one_publish_leaves_each_key_as_its_last_event_and_the_outbox_empty(make_fleet: Callable[..., Fleet]) -> None:
    """While Redis is down, A blocks and unblocks x, and blocks, unblocks and blocks y again. Published together (one
    MULTI, the snapshot's changes in one HSET and one HDEL), the stream has the five events in order, the snapshot
    holds y and not x, and once the publisher is idle A's store keeps no published row."""
    f = started(make_fleet(("ipset",), names=("a",), appendonly=True))
    a = f["a"]
    assert f.redis.stop() == 0
    x, y = "203.0.113.90/32", "203.0.113.91/32"
    steps = [("PUT", x, 201), ("DELETE", x, 200), ("PUT", y, 201), ("DELETE", y, 200), ("PUT", y, 201)]
    for method, network, status in steps:
        r = a.request(method, path(network))
        assert r.status == status, (method, network, r)
    assert f.status("a")["outbox"] == 5
    f.redis.start()
    wait_until(lambda: f.published("a"), 15, "A published its five events")
    events = [(e["op"], e["network"]) for _, e in f.stream() if e.get("node") == "a"]
    assert events == [("block" if m == "PUT" else "unblock", n) for m, n, _ in steps]
    snapshot = {tuple(json.loads(k)): json.loads(v) for k, v in f.redis.client().hgetall(STATE).items()}
    assert [k[3] for k in snapshot] == [y], snapshot
    assert next(iter(snapshot.values()))["expires_at"] is None
    store = sqlite3.connect((a.workdir / "state" / "state.db").absolute().as_uri() + "?mode=ro", uri=True)
    try:
        def trimmed() -> bool:
            (rows,) = store.execute("SELECT count(*) FROM outbox").fetchone()
            published = store.execute("SELECT value FROM fleet WHERE key='published'").fetchone()
            return rows == 0 and published == ("5",)
        wait_until(trimmed, 10, "A's worker deleted the published rows")
    finally:
        store.close()


def outbox_row(op: str, network: str, owner: str = "admin", scope: tuple[str, str] = ("", ""),
               times: tuple[float | None, float | None] = (None, None)) -> dict[str, str | None]:
    """An outbox row's event as Worker._announce writes it (its keys in that order)."""
    event: dict[str, str | None] = {"op": op, "chain": CHAIN, "network": network, "owner": owner, "node": "a",
                                    "id": str(uuid.uuid4())}
    if scope[0]:
        event["proto"] = scope[0]
    if scope[1]:
        event["port"] = scope[1]
    if times[0] is not None:
        event["created_at"] = repr(times[0])
    if times[1] is not None:
        event["expires_at"] = repr(times[1])
    return event


def test_the_publish_script_writes_what_python_would(make_fleet: Callable[..., Fleet]) -> None:
    """PUBLISH_SCRIPT, run by redis-server for node a's ACL user on a run of outbox rows out of seq order (as
    SQLite's aggregate may give them): each stream entry has its row's fields in the row's order (a null left out);
    each snapshot field is snapshot_field()'s text byte for byte and its value json.dumps's, a key's last event
    winning, also for text the config never lets through (non-ASCII, a quote, a backslash, control characters:
    Python's ensure_ascii escapes, not cjson's); the marker is the run's last seq. A key outside the user's
    `~prefix*` is refused for a script too, before it writes anything."""
    f = make_fleet(("ipset",), names=("a",))
    f.redis.start()
    t = 1754000000.123456
    odd = 'ü "q" \\ \x00\x01\n\x7f/😀'
    events = [
        outbox_row("block", "203.0.113.7/32", "f2b/sshd", times=(t, t + 600.5)),  # a label owner
        outbox_row("block", "2001:db8:ffff::/48", "admin", ("tcp", "22,80:90"), (t, None)),
        outbox_row("block", "203.0.113.8/32", times=(t, t + 1)),
        outbox_row("unblock", "203.0.113.8/32"),  # the run's last word on .8: no field
        outbox_row("unblock", "203.0.113.5/32"),  # in the snapshot before the run
        outbox_row("unblock", "203.0.113.9/32", "f2b/sshd"),
        outbox_row("block", "203.0.113.9/32", "f2b/sshd", ("udp", ""), (t + 2, t + 3)),
        {**outbox_row("block", "198.51.100.0/24", odd, ("sctp", "7"), (t, None)), "expires_at": None},
    ]
    rows = list(enumerate(events, start=10))
    admin = f.redis.client()
    five = snapshot_field("a", "admin", CHAIN, "203.0.113.5/32", "", "")
    admin.hset(STATE, five, json.dumps({"created_at": t, "expires_at": None}))
    r = f.redis.client_as("a", node_password("a"))
    try:
        script = r.register_script(PUBLISH_SCRIPT)
        text = json.dumps([[seq, e] for seq, e in (rows[3:] + rows[:3])], separators=(",", ":"))
        last = script(keys=(EVENTS, STATE, PREFIX + "published"), args=(0, "a", rows[-1][0], text))
        stream = r.xrange(EVENTS)
        assert last == stream[-1][0]
        assert [list(fields.items()) for _, fields in stream] == [
            [(k.encode(), v.encode()) for k, v in e.items() if v is not None] for _, e in rows]
        expected: dict[bytes, bytes | None] = {five.encode(): None}
        for _, e in rows:
            field = snapshot_field(str(e["node"]), str(e["owner"]), CHAIN, str(e["network"]), e.get("proto") or "",
                                   e.get("port") or "")
            value = json.dumps({"created_at": float(e["created_at"] or 0), "expires_at": None if e.get(
                "expires_at") is None else float(e["expires_at"] or 0)}) if e["op"] == "block" else None
            expected[field.encode()] = None if value is None else value.encode()
        assert r.hgetall(STATE) == {k: v for k, v in expected.items() if v is not None}
        assert len(r.hgetall(STATE)) == 4
        assert r.hget(PREFIX + "published", "a") == str(rows[-1][0]).encode()

        with pytest.raises(redis.ResponseError, match="(?i)noperm|permission|access"):
            script(keys=("other:events", "other:state", "other:published"), args=(0, "a", 99, text))
        assert admin.exists("other:events", "other:state", "other:published") == 0
    finally:
        r.close()


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_a_followers_read_leaves_out_only_its_own_events_and_the_rest_as_xread_gives_it(
        make_fleet: Callable[..., Fleet], protocol: int) -> None:
    """FleetNode._read against redis-server, as node a's ACL user. Filtering (FOLLOW_SCRIPT), Redis leaves out
    exactly the entries whose last `node` field is a's, as the follower itself would skip them after XREAD (a field
    given twice, a value that only looks like it, an outside producer's entry without one), and gives the others as
    XREAD does; it passes at most FILTER_COUNT at a time and says so. With nothing new, a blocking read waits (an
    XREAD sent with the script) until an entry comes, its own or another host's, or BLOCK_MS. The script is loaded
    again after SCRIPT FLUSH, a connection Redis dropped fails one call and then connects again, and a user refused
    EVALSHA reads with XREAD from then on, blocking or not. In RESP2 and RESP3 (redis-py 8's default; XREAD's
    reply is a map there) alike."""
    f = make_fleet(("ipset",), names=("a",))
    f.redis.start()
    admin = f.redis.client()
    fields = [
        {"node": "a", "op": "block"},
        {"node": "b", "op": "block"},
        {"op": "block", "owner": "ops"},  # an outside producer's
        [("node", "a"), ("op", "block"), ("node", "b")],  # given twice: the last one counts
        [("node", "b"), ("op", "block"), ("node", "a")],
        {"owner": "a", "node": "c"},
        {"node": "a ", "op": "block"},
        {"node": "A"},
    ]
    ids = []
    for entry in fields:
        pairs = list(entry.items()) if isinstance(entry, dict) else entry
        ids.append(admin.execute_command("XADD", EVENTS, "*", *(x for pair in pairs for x in pair)))
    node = object.__new__(FleetNode)
    node.events, node._filter = EVENTS, True  # all _read looks at
    node.settings = SimpleNamespace(node="a", redis="redis://a:secret@127.0.0.1:6379/0")  # type: ignore[assignment]
    r = f.redis.client_as("a", node_password("a"), protocol=protocol)
    lean = _Lean(r)
    try:
        plain = node._read(lean, "0-0", block=True, filtering=False)
        assert (plain.last, plain.passed, plain.left_out, plain.full) == (ids[-1], 8, 0, False)
        assert [i.decode() for i, _ in plain.entries] == ids
        others = [(i, e) for i, e in plain.entries if e.get(b"node") != b"a"]  # as _check_events skips its own
        assert len(others) == 6
        filtered = node._read(lean, "0-0", block=True, filtering=True)
        assert (filtered.last, filtered.passed, filtered.left_out, filtered.full) == (ids[-1], 8, 2, False)
        assert filtered.entries == others
        later = node._read(lean, ids[2], block=False, filtering=True)
        assert (later.passed, later.left_out, later.entries) == (5, 1, others[2:])
        idle = node._read(lean, ids[-1], block=False, filtering=True)
        assert (idle.last, idle.passed, idle.entries) == (ids[-1], 0, [])

        late: list[str] = []

        def later_event(node_name: str) -> threading.Timer:
            timer = threading.Timer(0.3, lambda: late.append(admin.execute_command("XADD", EVENTS, "*", "node",
                                                                                   node_name)))
            timer.start()
            return timer

        timer = later_event("b")
        started = time.monotonic()
        waited = node._read(lean, ids[-1], block=True, filtering=True)  # XREAD waits, and then the script reads
        assert time.monotonic() - started >= 0.25
        timer.join()
        assert (waited.last, waited.passed, waited.left_out, waited.entries) == (
            late[0], 1, 0, [(late[0].encode(), {b"node": b"b"})])
        timer = later_event("a")
        waited = node._read(lean, late[0], block=True, filtering=True)
        timer.join()
        own = late[1]
        assert (waited.last, waited.passed, waited.left_out, waited.entries) == (own, 1, 1, [])
        nothing = node._read(lean, own, block=True, filtering=True)  # BLOCK_MS, and then nothing
        assert (nothing.last, nothing.passed, nothing.entries) == (own, 0, [])

        pipe = admin.pipeline(transaction=False)
        for _ in range(FILTER_COUNT + 5):
            pipe.xadd(EVENTS, {"node": "a", "op": "block"})
        added = pipe.execute()
        admin.script_flush()
        full = node._read(lean, own, block=True, filtering=True)
        assert (full.last, full.passed, full.left_out, full.entries, full.full) == (
            added[FILTER_COUNT - 1], FILTER_COUNT, FILTER_COUNT, [], True)
        rest = node._read(lean, full.last, block=True, filtering=True)
        assert (rest.last, rest.passed, rest.left_out, rest.full) == (added[-1], 5, 5, False)

        admin.client_kill_filter(_type="normal", user="a")
        with pytest.raises(redis.ConnectionError):
            node._read(lean, "0-0", block=False, filtering=True)
        again = node._read(lean, "0-0", block=False, filtering=True)
        assert (again.passed, again.entries) == (FILTER_COUNT, others + [(late[0].encode(), {b"node": b"b"})])
        no_acl_denials(f)

        admin.execute_command("ACL", "SETUSER", "a", "-evalsha")  # a user from before the scripts
        for block in (False, True):
            node._filter = True
            refused = node._read(lean, "0-0", block=block, filtering=True)
            assert (refused.passed, refused.left_out, len(refused.entries), node._filter) == (1015, 0, 1015, False)
        assert [d["object"] for d in admin.acl_log()] == ["evalsha"]
        assert admin.acl_log()[0]["count"] == 2
    finally:
        lean.close()
        r.close()


def test_redis_lost_its_data(make_fleet: Callable[..., Fleet]) -> None:
    """Redis restarts empty (no persistence): no node wipes anything, each announces its own live claims again,
    so the snapshot fills up, and new events flow as before."""
    f = started(make_fleet(MIXED))
    assert f["a"].request("PUT", path("203.0.113.80")).status == 201
    assert f["b"].request("PUT", path("203.0.113.81") + "?timeout=600").status == 201
    both = {"203.0.113.80/32", "203.0.113.81/32"}
    wait_until(everywhere(f, both), 10, "both bans everywhere")
    f.redis.kill9()
    f.redis.start()  # empty: save "" and no AOF
    wait_until(lambda: f.redis.client().hlen(STATE) == 2, 20, "A and B announced their claims again")
    assert {json.loads(k)[0] for k in f.redis.client().hkeys(STATE)} == {"a", "b"}
    for n in NODES:
        wait_until(lambda n=n: f.caught_up(n), 10, f"node {n} follows the new stream")
        assert f.entries(n) == both, n
    assert f["c"].request("PUT", path("203.0.113.82")).status == 201
    wait_until(everywhere(f, both | {"203.0.113.82/32"}), 10, "a new ban flows after the loss")


def test_crash(make_fleet: Callable[..., Fleet]) -> None:
    """A is killed with -9 while its publisher drains 2000 queued events into Redis; after its restart every
    event is in the stream exactly once, and B has them all."""
    f = started(make_fleet(MIXED, appendonly=True))
    a = f["a"]
    assert f.redis.stop() == 0
    items = host_range(2000, "198.18.2.1")
    r = bulk(a, items, "?timeout=3600")
    assert r.status == 200 and r.json["created"] == 2000, r
    wait_until(lambda: f.status("a")["outbox"] == 2000, 10, "2000 events in A's outbox")

    f.redis.start()
    rc = f.redis.client()
    wait_until(lambda: rc.xlen(EVENTS), 20, "A publishes", every=0.001)
    a.kill9()
    published_at_kill = rc.xlen(EVENTS)
    print(f"events in the stream when A was killed: {published_at_kill} of 2000")
    f.restart("a")
    wait_until(lambda: f.published("a"), 20, "A's outbox empty after the restart")
    stream = f.stream()
    from_a = [e for _, e in stream if e.get("node") == "a"]
    ids = [e["id"] for e in from_a]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events published twice"
    assert sorted(e["network"] for e in from_a) == sorted(items)
    wait_until(lambda: set(items) <= f.entries("b"), 30, "B has all 2000")
    wait_until(lambda: f.caught_up("b"), 10, "B caught up")
    assert f.status("b")["remote_claims"] == 2000
    no_acl_denials(f)


def test_owners(make_fleet: Callable[..., Fleet]) -> None:
    """A bans, B bans the same network, A unbans: it stays on A, B and C until B unbans too. An override on C
    lifts every claim everywhere."""
    def configure(name: str, config: dict[str, Any]) -> None:
        config["users"]["admin"]["override"] = True

    f = started(make_fleet(MIXED, configure=configure))
    a, b = f["a"], f["b"]
    net = "203.0.113.20/32"
    assert a.request("PUT", path(net)).status == 201
    wait_until(lambda: net in f.entries("b"), 10, "A's ban on B")
    r = b.request("PUT", path(net))
    assert r.status == 200, r  # blocked already, by A's claim; B adds its own
    wait_until(lambda: claims(f, "c").get(net) == {("a/admin", None), ("b/admin", None)}
               and claims(f, "a").get(net) == claims(f, "c")[net], 10, "both claims on A and C")

    r = a.request("DELETE", path(net))
    assert (r.json["released"], r.json["deleted"]) == (True, False), r
    wait_until(lambda: all(claims(f, n).get(net) == {("b/admin", None)} for n in NODES), 10,
               "A's claim gone everywhere, B's held")
    assert all(net in f.entries(n) for n in NODES)

    r = b.request("DELETE", path(net))
    assert (r.json["released"], r.json["deleted"]) == (True, True), r
    wait_until(nowhere(f, {net}), 10, "gone from every kernel once B unbans")
    assert all(f.listing(n) == {} for n in NODES)

    # an override (owner=*) on C lifts every host's claims, everywhere, and the snapshot keeps none of them
    other = "203.0.113.21/32"
    assert a.request("PUT", path(other) + "?owner=sshd", user="f2b").status == 201
    assert b.request("PUT", path(other) + "?timeout=600").status in (200, 201)  # A's may be there already
    wait_until(lambda: len(f.listing("c").get(other, {}).get("claims", [])) == 2, 10, "both claims on C")
    r = f["c"].request("DELETE", path(other) + "?owner=*")
    assert (r.status, r.json["deleted"]) == (200, True), r
    wait_until(nowhere(f, {other}), 10, "the override's unban in every kernel")
    assert all(f.listing(n) == {} for n in NODES)
    wait_until(lambda: f.redis.client().hlen(STATE) == 0, 5, "no claim left in the snapshot")


def test_refusal(make_fleet: Callable[..., Fleet]) -> None:
    """C has the network in never_block: C never applies it, A and B do; C says so in its log once, not once
    an event, and never retries."""
    def configure(name: str, config: dict[str, Any]) -> None:
        if name == "c":
            config["never_block"].append("203.0.113.64/26")

    f = started(make_fleet(MIXED, configure=configure))
    a, c = f["a"], f["c"]
    offset = len(c.log())
    refused = {f"203.0.113.{i}/32" for i in range(65, 115)}
    r = bulk(a, sorted(refused))
    assert r.status == 200 and r.json["created"] == 50, r
    assert a.request("PUT", path("203.0.113.5")).status == 201  # after them in the stream
    wait_until(everywhere(f, refused | {"203.0.113.5/32"}, ("a", "b")), 10, "A and B apply all 51")
    wait_until(lambda: "203.0.113.5/32" in f.entries("c") and f.caught_up("c"), 10, "C took the event after")
    assert f.entries("c") == {"203.0.113.5/32"}
    assert f.metric("c", "webiptd_fleet_events_skipped_total", 'reason="refused"') == 50
    time.sleep(2)  # nothing is retried
    assert f.entries("c") == {"203.0.113.5/32"}
    assert f.metric("c", "webiptd_fleet_events_skipped_total", 'reason="refused"') == 50
    said = [line for line in log_lines_since(c, offset)
            if " DEBUG " not in line and re.search(r"refus|never_block", line, re.I)]
    assert 1 <= len(said) <= 2, said
    alive(f)


MALFORMED: list[dict[str, str | bytes]] = [
    {"op": "ban", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops"},
    {"chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops"},
    {"op": "block", "network": "203.0.113.30/32", "owner": "ops"},
    {"op": "block", "chain": CHAIN, "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32"},
    {"op": "block", "chain": CHAIN, "network": "999.1.1.1", "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/24", "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "", "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "colour": "red"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "timeout": "60",
     "expires_at": "4102444800"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "*"},
    {"op": "unblock", "chain": CHAIN, "network": "203.0.113.7/32"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "timeout": "soon"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "timeout": "-5"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "bad owner!"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "proto": "icmpx"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "port": "22"},
    {"op": "block", "chain": CHAIN, "network": b"203.0.113.30/32\xff\xfe", "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "1" * 5000, "owner": "ops"},
    {"op": "block", "chain": CHAIN, "network": "203.0.113.30/32", "owner": "ops", "expires_at": "tomorrow"},
]


def test_producer(make_fleet: Callable[..., Fleet]) -> None:
    """An event added by redis-cli with valid fields is applied everywhere (owner redis/ops); 200 malformed
    ones change nothing, kill nothing, hold nothing up, and keep the logs short."""
    f = started(make_fleet(MIXED))
    out = f.redis.cli("XADD", EVENTS, "*", "op", "block", "chain", CHAIN, "network", "203.0.113.7/32",
                      "timeout", "600", "owner", "ops")
    assert re.fullmatch(r"\d+-\d+\n", out.stdout), out
    t0 = time.time()
    wait_until(everywhere(f, {"203.0.113.7/32"}), 10, "redis-cli's ban in every kernel")
    for n in NODES:
        entry = f.listing(n)["203.0.113.7/32"]
        assert [(c["owner"], c["node"]) for c in entry["claims"]] == [("redis/ops", "redis")], entry
        assert abs(epoch(entry["expires_at"]) - (t0 + 600)) < 5, entry

    offsets = {n: len(d.log()) for n, d in f.nodes.items()}
    rc = f.redis.client()
    pipe = rc.pipeline(transaction=False)
    for i in range(200):
        pipe.xadd(EVENTS, MALFORMED[i % len(MALFORMED)])  # type: ignore[arg-type]
    pipe.execute()
    f.redis.cli("XADD", EVENTS, "*", "op", "block", "chain", CHAIN, "network", "203.0.113.8/32", "owner", "ops")
    wait_until(everywhere(f, {"203.0.113.8/32"}), 10, "the valid event after the 200 malformed ones")
    for n in NODES:
        wait_until(lambda n=n: f.caught_up(n), 10, f"node {n} past the malformed events")
        assert f.entries(n) == {"203.0.113.7/32", "203.0.113.8/32"}, n
        assert f.metric(n, "webiptd_fleet_events_skipped_total", 'reason="malformed"') == 200, n
        lines = [line for line in log_lines_since(f.nodes[n], offsets[n]) if " DEBUG " not in line]
        assert len(lines) <= 10, (n, len(lines), lines[:12])
    alive(f)
    assert rc.hlen(STATE) == 2  # the two valid bans were folded into the snapshot, nothing else
    no_acl_denials(f)


def test_timed(make_fleet: Callable[..., Fleet]) -> None:
    """A timed ban from B expires in every node's kernel at the same absolute time (± 1 s): the one B gave it."""
    f = started(make_fleet(MIXED))
    net = "203.0.113.40/32"
    before = time.time()
    assert f["b"].request("PUT", path(net) + "?timeout=5").status == 201
    after = time.time()
    wait_until(everywhere(f, {net}), 4, "B's timed ban in every kernel")
    listed = {n: f.listing(n)[net]["expires_at"] for n in NODES}
    assert len(set(listed.values())) == 1, listed  # the same absolute time on every node
    assert int(before + 5) <= epoch(listed["b"]) <= after + 5, (before, listed)
    for n in NODES:  # the kernel's own timeout (whole seconds on ipset) ends at the same time too
        now, left = time.time(), kernel_timeouts(f[n]).get(net)
        assert left is not None and before + 5 - 1.5 <= now + left <= after + 5 + 1, (n, now, left, before)
    gone: dict[str, tuple[float, float]] = {}  # node: (last seen, first missed)
    seen = dict.fromkeys(NODES, time.time())
    deadline = time.monotonic() + 15
    while len(gone) < len(NODES) and time.monotonic() < deadline:
        for n in NODES:
            if n in gone:
                continue
            now = time.time()
            if net in f.entries(n):
                seen[n] = now
            else:
                gone[n] = (seen[n], now)
        time.sleep(0.05)
    print("timed: last seen, first missed, after the PUT + 5 s:",
          {n: (round(s - after - 5, 2), round(m - before - 5, 2)) for n, (s, m) in gone.items()})
    assert set(gone) == set(NODES), f"still in the kernels of {set(NODES) - set(gone)} 15 s on"
    for n, (last_seen, first_missed) in gone.items():
        assert first_missed >= before + 5 - 1 and last_seen <= after + 5 + 1, (n, before, after, last_seen,
                                                                                first_missed)


# -- /fleet and the edges -----------------------------------------------------------------------------------


FLEET_KEYS = {"node", "connected", "redis", "last_applied_id", "lag_events", "lag_seconds", "outbox",
              "last_published_id", "last_resync", "remote_claims", "shared_chains"}


def test_fleet_status_shape_and_secrets(make_fleet: Callable[..., Fleet], tmp_path: Path) -> None:
    """GET /fleet: for any authenticated user, 401 without credentials; no Redis password there or in any log."""
    f = started(make_fleet(MIXED))
    assert f["b"].request("PUT", path("203.0.113.50") + "?timeout=600").status == 201
    wait_until(lambda: f.status("a")["remote_claims"] == 1 and f.caught_up("a"), 10, "A holds B's claim")
    r = f["a"].request("GET", "/fleet", user=None)
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), r
    assert f["a"].request("GET", "/fleet", user="admin", password="wrong").status == 401
    r = f["a"].request("GET", "/fleet", user="reader")
    assert r.status == 200, r
    s = r.json
    assert FLEET_KEYS <= set(s) <= FLEET_KEYS | {"last_error"}, s
    assert s["last_error"] is None
    assert (s["node"], s["connected"], s["lag_events"], s["outbox"], s["remote_claims"]) == ("a", True, 0, 0, 1)
    assert s["shared_chains"] == [CHAIN]
    assert re.fullmatch(r"\d+-\d+", s["last_applied_id"]), s
    assert isinstance(s["lag_seconds"], (int, float)) and s["lag_seconds"] >= 0
    assert s["last_resync"] is not None and epoch(s["last_resync"]) > 0  # a new node resyncs
    assert s["redis"] == "redis://198.51.100.10:6379/0", s
    assert re.fullmatch(r"\d+-\d+", f.status("b")["last_published_id"] or ""), f.status("b")
    for n, d in f.nodes.items():
        for text in (d.log(), d.stderr(), f.status(n)["redis"]):
            assert node_password(n) not in text, f"node {n}'s Redis password leaked"
    # web-ipt fleet: the same, as a table; a remote claim is marked in a listing
    out = web_ipt(f["a"], tmp_path, "fleet")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["KEY", "VALUE"], out.stdout
    rows = dict(line.split(None, 1) for line in lines[1:])
    assert (rows["node"].strip(), rows["connected"].strip(), rows["remote_claims"].strip()) == ("a", "true", "1")
    out = web_ipt(f["a"], tmp_path, "list", CHAIN)
    assert out.returncode == 0 and "b/admin (fleet)" in out.stdout, out.stdout


def test_without_a_fleet_section_fleet_is_404(make_fleet: Callable[..., Fleet]) -> None:
    """No `fleet` key: GET /fleet is 404 not_configured, and nothing of the fleet runs."""
    f = make_fleet(("ipset",), names=("p",), fleet=False)
    f.start()
    r = f["p"].request("GET", "/fleet")
    assert (r.status, r.json["error"]) == (404, "not_configured"), r
    assert f["p"].request("PUT", path("203.0.113.60")).status == 201
    assert "webiptd.fleet" not in f["p"].log()


def test_unreachable_redis_at_start(make_fleet: Callable[..., Fleet]) -> None:
    """A node whose Redis does not answer at all (no host at that address) still reaches READY at once, serves
    PUTs into its kernel and outbox, and stops promptly."""
    def configure(name: str, config: dict[str, Any]) -> None:
        config["fleet"]["redis"] = f"redis://a:{node_password('a')}@{NOBODY4}:6379/0"

    f = make_fleet(("nftables",), names=("a",), configure=configure)
    t0 = time.monotonic()
    f.start()
    print(f"READY with Redis unreachable: {time.monotonic() - t0:.2f} s")
    assert time.monotonic() - t0 < 10
    a = f["a"]
    t0 = time.monotonic()
    assert a.request("PUT", path("203.0.113.61") + "?timeout=600").status == 201
    assert time.monotonic() - t0 < 1.0
    assert f.entries("a") == {"203.0.113.61/32"}
    s = f.status("a")
    assert (s["connected"], s["outbox"]) == (False, 1), s
    # the first connect is still trying (ARP gets no answer): its error comes once it gives up
    error = wait_until(lambda: f.status("a")["last_error"], 15, "A's /fleet says why it is not connected")
    assert error in ("connection", "timeout") and "198.51.100.99" in f.status("a")["redis"], error
    t0 = time.monotonic()
    assert f.stop("a", timeout=15) == 0
    assert time.monotonic() - t0 < 10
    assert node_password("a") not in a.log() + a.stderr()
