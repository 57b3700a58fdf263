"""Pure tests of the firewall worker and the SQLite store, against a recording in-memory backend.

The backend here only records the exact ordered operations it is asked for (as sshuttle's tests do);
real iptables is covered by the namespace tests.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import pytest

from webiptd.commands import (
    Block, Blocked, BulkBlock, Claim, Entry, FirewallFull, FirewallUnavailable, ListChain, Lookup, Reconfigure, Unblock,
    Unblocked,
)
from webiptd.config import Chain, Limits
from webiptd.firewall.ops import Add, CapacityExceeded, Items, Key, Op, Remove, adds, apply_in_parts, key_of, undo
from webiptd.firewall.router import ByChain
from webiptd.firewall.worker import Worker, kernel_ops
from webiptd.scope import Scope
from webiptd.state import Loaded, Store

net = ipaddress.ip_network
WEB = Chain("f2b-web", ("INPUT",), "DROP")
SSH = Chain("f2b-ssh", ("INPUT",), "REJECT")
T0 = 1_700_000_000.0
WAIT = 10  # seconds a test waits for a future; the worker answers in milliseconds


def _key(key: tuple[Any, ...]) -> Key:
    """(chain, network) is short for (chain, network, None): a block of all traffic."""
    return (key[0], key[1], None) if len(key) == 2 else (key[0], key[1], key[2])


class Kernel(dict[Key, str]):
    """The recording backend's atoms, (chain, network, scope) -> target; a key may be given as (chain, network)."""

    def __init__(self, items: Mapping[Any, str] | None = None):
        super().__init__({_key(k): t for k, t in (items or {}).items()})

    def __setitem__(self, key: Any, value: str) -> None:
        super().__setitem__(_key(key), value)

    def __getitem__(self, key: Any) -> str:
        return super().__getitem__(_key(key))

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(_key(key))

    def __contains__(self, key: Any) -> bool:
        return super().__contains__(_key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(_key(key), default)

    def pop(self, key: Any, *default: Any) -> Any:
        return super().pop(_key(key), *default)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and dict(self) == {_key(k): t for k, t in other.items()}

    __hash__ = None  # type: ignore[assignment]


class RecordingBackend:
    """An in-memory firewall: `kernel` maps (chain, network, scope) to target; every call is recorded in order."""

    name = "recording"

    def __init__(self, kernel: Mapping[Any, str] | None = None):
        self._kernel = Kernel(kernel)
        self.calls: list[tuple[Any, ...]] = []
        self.fail_applies = 0          # how many of the next apply() calls raise
        self.anomalies: list[str] = []  # an Add of a rule already there, a Remove of one that is not
        self.closed = False
        self.kernel_timeouts = False   # True acts like a set backend whose kernel expires entries
        self.capacity: int | None = None  # like a set's maxelem: an apply that would go past it changes nothing

    @property
    def kernel(self) -> Kernel:
        return self._kernel

    @kernel.setter
    def kernel(self, atoms: Mapping[Any, str]) -> None:
        self._kernel = Kernel(atoms)

    def expires_in_kernel(self, chain: str) -> bool:
        return self.kernel_timeouts

    def shares_target(self, chain: str) -> bool:
        return self.kernel_timeouts  # a set backend: one match rule per chain

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        self.calls.append(("prepare", tuple(c.name for c in chains)))
        self.retired = list(retired)

    def read(self, chains: Iterable[str]) -> dict[Key, str]:
        names = tuple(chains)
        self.calls.append(("read", names))
        return {k: t for k, t in self.kernel.items() if k[0] in names}

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        ops = list(ops)
        self.calls.append(("apply", ops))
        if self.capacity is not None:
            after = set(self.kernel)
            for op in ops:
                (after.add if isinstance(op, Add) else after.discard)(key_of(op))
            if len(after) > self.capacity:
                raise CapacityExceeded("simulated: the set is full")
        if self.fail_applies:
            self.fail_applies -= 1
            raise OSError("simulated: iptc commit failed")
        for op in ops:
            key = key_of(op)
            if isinstance(op, Add):
                if (key in self.kernel) != op.replaces:  # a new timeout replaces an entry that is there
                    self.anomalies.append(f"{'duplicate' if key in self.kernel else 'missing'} {op}")
                self.kernel[key] = op.target
            else:
                if self.kernel.get(key) != op.target:
                    self.anomalies.append(f"missing {op}")
                self.kernel.pop(key, None)

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        self.calls.append(("load", chain, len(items), replaces))
        self.apply(adds(chain, target, expires_at, scope, items, replaces), chains)

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        self.calls.append(("missing",))
        for chain in chains:
            held = sum(1 for c, _, _ in self.kernel if c == chain.name)
            if held < counts.get(chain.name, 0):
                return f"{chain.name}: {held} of {counts[chain.name]}"
        return None

    def seal(self) -> str | None:
        return None  # as ipset and iptables: nothing tells that nobody changed the kernel since

    def sealed(self, token: str) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    @property
    def applies(self) -> list[list[Op]]:
        return [call[1] for call in self.calls if call[0] == "apply"]


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Harness:
    """A store in tmp_path, a recording backend and a clock; makes workers and stops them afterwards."""

    def __init__(self, tmp_path: Path):
        self.state_dir = tmp_path / "state"
        self.store = Store(self.state_dir)
        self.backend = RecordingBackend()
        self.clock = Clock()
        self.workers: list[Worker] = []

    def worker(self, chains: Iterable[Chain] = (WEB, SSH), start: bool = True) -> Worker:
        w = Worker(self.backend, self.store, chains, clock=self.clock)
        self.workers.append(w)
        if start:
            w.start(timeout=WAIT)
        return w

    def run(self, worker: Worker, cmd: Any) -> Any:
        return worker.submit(cmd).result(WAIT)

    def stored(self) -> Loaded:
        """What a fresh process would load from the same file."""
        other = Store(self.state_dir)
        try:
            loaded = other.load()
        finally:
            other.close()
        return Loaded(sorted(loaded.entries, key=_order), sorted(loaded.tombstones, key=_order))

    def close(self) -> None:
        for w in self.workers:
            w.stop(timeout=WAIT)
        self.store.close()


def _order(e: Entry) -> tuple[Any, ...]:
    return (e.chain, e.network.version, e.network)


def block(chain: Chain, network: str, expires_at: float | None = None, actor: str = "admin", owner: str = "") -> Block:
    return Block(chain, net(network), expires_at, actor, "198.51.100.7", owner)


def unblock(chain: Chain, network: str, actor: str = "admin", owner: str = "", every_claim: bool = False) -> Unblock:
    return Unblock(chain, net(network), actor, "198.51.100.7", owner, every_claim)


def entry(chain: Chain, network: str, expires_at: float | None = None, created_at: float = T0,
          created_by: str = "admin", target: str | None = None, scope: Scope | None = None) -> Entry:
    return Entry(chain.name, net(network), target or chain.target, created_at, expires_at, created_by, (), scope)


# -- kernel_ops ------------------------------------------------------------------------------


def test_kernel_ops() -> None:
    a = entry(WEB, "203.0.113.1/32")
    assert kernel_ops(None, a) == [Add("f2b-web", net("203.0.113.1/32"), "DROP")]
    assert kernel_ops(a, None) == [Remove("f2b-web", net("203.0.113.1/32"), "DROP")]
    assert kernel_ops(None, None) == []
    # Only the expiry or the author changed: nothing for the kernel to do.
    assert kernel_ops(a, entry(WEB, "203.0.113.1/32", expires_at=T0 + 5, created_by="x")) == []
    rejected = entry(WEB, "203.0.113.1/32", target="REJECT")
    assert kernel_ops(a, rejected) == [Remove("f2b-web", net("203.0.113.1/32"), "DROP"),
                                       Add("f2b-web", net("203.0.113.1/32"), "REJECT")]


# -- undo and the router ---------------------------------------------------------------------


def test_undo_is_the_inverse_newest_first_and_puts_entries_back_without_expiry() -> None:
    ops: list[Op] = [Add("f2b-web", net("203.0.113.1/32"), "DROP", T0 + 60),
                     Remove("f2b-web", net("203.0.113.2/32"), "REJECT")]
    assert undo(ops) == [Add("f2b-web", net("203.0.113.2/32"), "REJECT"),
                         Remove("f2b-web", net("203.0.113.1/32"), "DROP")]
    assert undo(ops)[0].expires_at is None  # type: ignore[union-attr]
    assert undo([]) == []


def test_apply_in_parts_undoes_every_part_applied_before_the_one_that_failed() -> None:
    a1, a2, b1, c1 = (Add("f2b-web", net(f"203.0.113.{i}/32"), "DROP") for i in range(1, 5))
    r1 = Remove("f2b-web", net("203.0.113.9/32"), "DROP")
    calls: list[tuple[str, list[Op]]] = []

    def apply(key: str, ops: list[Op]) -> None:
        calls.append((key, ops))
        if key == "c" or (key == "a" and len(calls) > 3):  # part c fails, and so does undoing part a
            raise OSError(f"simulated: part {key}")

    with pytest.raises(OSError, match="part c"):
        apply_in_parts({"a": [a1, r1, a2], "b": [b1], "c": [c1]}, apply)
    # Undone in the order applied, each part newest first; one undo failing does not stop the next.
    assert calls == [("a", [a1, r1, a2]), ("b", [b1]), ("c", [c1]),
                     ("a", [Remove("f2b-web", a2.network, "DROP"), Add("f2b-web", r1.network, "DROP"),
                            Remove("f2b-web", a1.network, "DROP")]),
                     ("b", [Remove("f2b-web", b1.network, "DROP")])]


def test_by_chain_routes_each_chain_and_undoes_the_backends_done_when_one_fails() -> None:
    routed = {"iptables": RecordingBackend(), "ipset": RecordingBackend()}
    chains = [Chain("f2b-web", ("INPUT",), "DROP"), Chain("f2b-set", ("INPUT",), "DROP", backend="ipset")]
    router = ByChain(chains, factory=routed.__getitem__)
    web1, web2, web3 = (net(f"203.0.113.{i}/32") for i in range(1, 4))
    router.apply([Add("f2b-web", web1, "DROP"), Add("f2b-set", web1, "DROP"), Add("f2b-web", web2, "DROP")], {})
    assert routed["iptables"].applies == [[Add("f2b-web", web1, "DROP"), Add("f2b-web", web2, "DROP")]]
    assert routed["ipset"].applies == [[Add("f2b-set", web1, "DROP")]]
    # A chain no config named goes to iptables.
    router.apply([Add("gone", web1, "DROP")], {})
    assert routed["iptables"].applies[-1] == [Add("gone", web1, "DROP")]

    routed["ipset"].fail_applies = 1
    with pytest.raises(OSError):
        router.apply([Remove("f2b-web", web1, "DROP"), Add("f2b-set", web2, "DROP"), Add("f2b-web", web3, "DROP")], {})
    assert routed["iptables"].applies[-2:] == [
        [Remove("f2b-web", web1, "DROP"), Add("f2b-web", web3, "DROP")],
        [Remove("f2b-web", web3, "DROP"), Add("f2b-web", web1, "DROP")],
    ]
    assert routed["ipset"].applies[-1] == [Add("f2b-set", web2, "DROP")]
    assert routed["iptables"].kernel == {("f2b-web", web1): "DROP", ("f2b-web", web2): "DROP", ("gone", web1): "DROP"}
    assert routed["ipset"].kernel == {("f2b-set", web1): "DROP"}
    assert routed["iptables"].anomalies == routed["ipset"].anomalies == []


def test_kernel_check_has_one_default_the_configs() -> None:
    default = Limits().kernel_check
    assert inspect.signature(Worker).parameters["kernel_check"].default == default
    assert Reconfigure(()).kernel_check == default


# -- start-up, group commit and no-op batches ---------------------------------------------------


def test_start_prepares_every_chain_then_reads_them(h: Harness) -> None:
    h.worker()
    assert h.backend.calls == [("prepare", ("f2b-web", "f2b-ssh")), ("read", ("f2b-ssh", "f2b-web"))]


def test_commands_queued_before_the_worker_runs_are_one_apply(h: Harness) -> None:
    w = h.worker(start=False)
    nets = [f"203.0.113.{i}/32" for i in range(1, 41)] + ["2001:db8:ffff::/48"]
    futures = [w.submit(block(WEB, n)) for n in nets] + [w.submit(block(SSH, "203.0.113.1/32", T0 + 60))]
    w.start(timeout=WAIT)
    results = [f.result(WAIT) for f in futures]
    assert all(isinstance(r, Blocked) and r.created for r in results)
    assert h.backend.applies == [
        [Add("f2b-web", net(n), "DROP") for n in nets] + [Add("f2b-ssh", net("203.0.113.1/32"), "REJECT", T0 + 60)]
    ]
    assert len(h.stored().entries) == 42
    assert w.count == 42


def test_block_then_unblock_in_one_batch_touches_no_kernel(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker(start=False)
    put = w.submit(block(WEB, "203.0.113.9/32"))
    delete = w.submit(unblock(WEB, "203.0.113.9/32", actor="f2b", every_claim=True))
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        w.start(timeout=WAIT)
        assert put.result(WAIT) == Blocked(True, entry(WEB, "203.0.113.9/32"))
        assert delete.result(WAIT) == Unblocked(True, entry(WEB, "203.0.113.9/32"), released=True)
    assert h.backend.applies == []
    assert h.stored() == Loaded([], [])
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is None
    # Both acknowledged requests are in the audit trail, though the kernel never changed.
    audits = [r.getMessage() for r in caplog.records if r.name == "webiptd.audit"]
    assert any("user=admin" in a and "action=block" in a and "result=created" in a for a in audits), audits
    assert any("user=f2b" in a and "action=unblock" in a and "result=deleted" in a for a in audits), audits


def test_unblock_then_block_in_one_batch_touches_no_kernel(h: Harness) -> None:
    first = h.worker()
    h.run(first, block(WEB, "203.0.113.9/32", actor="f2b"))
    first.stop(timeout=WAIT)
    h.clock.now += 10
    w = h.worker(start=False)  # a restart: both commands wait in the queue for one batch
    f1 = w.submit(unblock(WEB, "203.0.113.9/32", every_claim=True))
    f2 = w.submit(block(WEB, "203.0.113.9/32", T0 + 600, actor="admin"))
    w.start(timeout=WAIT)
    assert f1.result(WAIT) == Unblocked(True, entry(WEB, "203.0.113.9/32", created_by="f2b"), released=True)
    # A new block, not the old one extended: new author, new creation time.
    fresh = entry(WEB, "203.0.113.9/32", expires_at=T0 + 600, created_at=T0 + 10)
    assert f2.result(WAIT) == Blocked(True, fresh)
    assert h.backend.applies == [[Add("f2b-web", net("203.0.113.9/32"), "DROP")]]  # only the first worker's
    assert h.backend.kernel == {("f2b-web", net("203.0.113.9/32")): "DROP"}
    assert h.stored() == Loaded([fresh], [])


def test_reblock_with_a_new_timeout_changes_only_the_store(h: Harness) -> None:
    w = h.worker()
    first = h.run(w, block(WEB, "203.0.113.9/32", actor="f2b"))
    assert first == Blocked(True, entry(WEB, "203.0.113.9/32", created_by="f2b"))
    h.clock.now += 5
    again = h.run(w, block(WEB, "203.0.113.9/32", T0 + 3600, actor="f2b"))
    # 200, not 201; the original author and creation time stay, the new expiry replaces the old.
    assert again == Blocked(False, entry(WEB, "203.0.113.9/32", expires_at=T0 + 3600, created_by="f2b"))
    assert h.run(w, block(WEB, "203.0.113.9/32", actor="f2b")).entry.expires_at is None  # back to permanent
    assert h.backend.applies == [[Add("f2b-web", net("203.0.113.9/32"), "DROP")]]
    assert h.stored().entries == [entry(WEB, "203.0.113.9/32", created_by="f2b")]


def test_the_same_network_in_two_chains_is_two_blocks(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32"))
    h.run(w, block(SSH, "203.0.113.9/32"))
    assert h.backend.applies == [[Add("f2b-web", net("203.0.113.9/32"), "DROP")],
                                 [Add("f2b-ssh", net("203.0.113.9/32"), "REJECT")]]
    assert h.run(w, unblock(SSH, "203.0.113.9/32")).deleted
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) == entry(WEB, "203.0.113.9/32")


def test_unblock_of_an_absent_network_touches_nothing(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        assert h.run(w, unblock(WEB, "203.0.113.9/32")) == Unblocked(False, None)
    assert h.backend.applies == []
    assert any("action=unblock" in r.getMessage() and "result=absent" in r.getMessage()
               for r in caplog.records if r.name == "webiptd.audit")


def test_unblock_removes_the_rule_and_leaves_no_tombstone(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "2001:db8:ffff::/48"))
    result = h.run(w, unblock(WEB, "2001:db8:ffff::/48"))
    assert result == Unblocked(True, entry(WEB, "2001:db8:ffff::/48"), released=True)
    assert h.backend.applies[-1] == [Remove("f2b-web", net("2001:db8:ffff::/48"), "DROP")]
    assert h.backend.kernel == {}
    w.stop(timeout=WAIT)
    assert h.stored() == Loaded([], [])


def test_list_and_lookup_see_the_current_state(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "2001:db8:ffff::/48"))
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    h.run(w, block(WEB, "203.0.113.0/25"))
    h.run(w, block(SSH, "203.0.113.200/32"))
    listed = h.run(w, ListChain("f2b-web"))
    # IPv4 first, then by network.
    assert [str(e.network) for e in listed] == ["203.0.113.0/25", "203.0.113.9/32", "2001:db8:ffff::/48"]
    assert h.run(w, ListChain("f2b-nope")) == []
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))).expires_at == T0 + 60
    assert h.run(w, Lookup("f2b-ssh", net("203.0.113.9/32"))) is None


# -- reconcile -----------------------------------------------------------------------------


def test_reconcile_makes_the_kernel_match_the_store(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    missing = entry(WEB, "203.0.113.1/32", created_by="f2b")                  # in the store, not the kernel
    present = entry(WEB, "203.0.113.2/32", expires_at=T0 + 600)               # in both
    expired_present = entry(WEB, "203.0.113.3/32", expires_at=T0 - 1)         # expired, still in the kernel
    expired_absent = entry(SSH, "203.0.113.4/32", expires_at=T0)              # expired, gone from the kernel
    wrong_target = entry(SSH, "2001:db8:ffff::/48")                            # kernel says DROP, store REJECT
    tomb_present = entry(WEB, "203.0.113.5/32")                                # an unblock the kernel missed
    tomb_absent = entry(SSH, "203.0.113.6/32")                                 # an unblock that finished
    h.store.write([missing, present, expired_present, expired_absent, wrong_target, tomb_present, tomb_absent], [])
    h.store.write([], [tomb_present, tomb_absent])
    key = lambda e: (e.chain, e.network)  # noqa: E731
    h.backend.kernel = {
        key(present): "DROP",
        key(expired_present): "DROP",
        key(wrong_target): "DROP",
        key(tomb_present): "DROP",
        ("f2b-web", net("203.0.113.77/32")): "DROP",          # strays: rules of our shape, not in the store
        ("f2b-ssh", net("2001:db8:ffff:1::/64")): "REJECT",
    }
    h.clock.now = T0
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        w = h.worker()

    assert h.backend.calls[:2] == [("prepare", ("f2b-web", "f2b-ssh")), ("read", ("f2b-ssh", "f2b-web"))]
    assert len(h.backend.applies) == 1
    ops = h.backend.applies[0]
    assert sorted(map(repr, ops)) == sorted(map(repr, [
        Remove("f2b-web", net("203.0.113.5/32"), "DROP"),
        Add("f2b-web", net("203.0.113.1/32"), "DROP"),
        Remove("f2b-web", net("203.0.113.3/32"), "DROP"),
        Remove("f2b-ssh", net("2001:db8:ffff::/48"), "DROP"),
        Add("f2b-ssh", net("2001:db8:ffff::/48"), "REJECT"),
    ]))
    assert ops.index(Remove("f2b-ssh", net("2001:db8:ffff::/48"), "DROP")) < \
        ops.index(Add("f2b-ssh", net("2001:db8:ffff::/48"), "REJECT"))

    adopted = [Entry("f2b-web", net("203.0.113.77/32"), "DROP", T0, None, "adopted"),
               Entry("f2b-ssh", net("2001:db8:ffff:1::/64"), "REJECT", T0, None, "adopted")]
    expected = sorted([missing, present, wrong_target, *adopted], key=_order)
    assert h.stored() == Loaded(expected, [])
    assert {(e.chain, e.network): e.target for e in expected} == h.backend.kernel
    assert w.count == len(expected)
    assert h.run(w, Lookup("f2b-web", net("203.0.113.77/32"))) == adopted[0]
    assert h.run(w, Lookup("f2b-web", net("203.0.113.3/32"))) is None
    expiries = [r.getMessage() for r in caplog.records if "action=expire" in r.getMessage()]
    assert len(expiries) == 2 and any("network=203.0.113.3/32" in m for m in expiries)


def test_a_reconcile_restores_many_whole_networks_of_one_expiry_as_loads(h: Harness) -> None:
    """A boot's restore: whole networks the kernel lacks, many of one target and expiry, go as a load each
    (Backend.load, no Op an atom); a few of their own expiry, scoped ones and changed targets as ops."""
    feed = [entry(WEB, f"198.18.{i >> 8}.{i & 255}/32", created_by="feed") for i in range(200)]
    timed = [entry(SSH, f"2001:db8:1::{i:x}/128", expires_at=T0 + 600) for i in range(100)]
    own = [entry(WEB, f"203.0.113.{i}/32", expires_at=T0 + 10 + i) for i in range(3)]
    scoped = entry(WEB, "203.0.113.99/32", scope=Scope("tcp"))
    h.store.write([*feed, *timed, *own, scoped], [])
    h.clock.now = T0
    w = h.worker()
    loads = [c for c in h.backend.calls if c[0] == "load"]
    assert sorted(loads) == [("load", SSH.name, 100, False), ("load", WEB.name, 200, False)]
    assert sorted(map(repr, h.backend.applies[-1])) == sorted(map(repr, [
        *(Add(e.chain, e.network, e.target, e.expires_at) for e in own),
        Add(WEB.name, net("203.0.113.99/32"), "DROP", None, Scope("tcp"))]))
    assert set(h.backend.kernel) == {(e.chain, e.network, None) for e in [*feed, *timed, *own]} | {
        (WEB.name, net("203.0.113.99/32"), Scope("tcp"))}
    assert w.count == 304 and h.backend.anomalies == []


def test_reconcile_of_a_consistent_state_changes_nothing(h: Harness) -> None:
    h.store.write([entry(WEB, "203.0.113.1/32"), entry(SSH, "2001:db8:ffff::/48", expires_at=T0 + 5)], [])
    h.backend.kernel = {("f2b-web", net("203.0.113.1/32")): "DROP", ("f2b-ssh", net("2001:db8:ffff::/48")): "REJECT"}
    before = h.stored()
    h.worker()
    assert h.backend.applies == []
    assert h.stored() == before


def test_a_chain_that_left_the_config_is_retired_not_forgotten(h: Harness) -> None:
    # A chain dropped from the config: unhooked (retired), its stored blocks kept and listed again when it returns,
    # and the kernel neither read nor changed for it meanwhile (nothing says which backend it had).
    old = Chain("old-chain", ("INPUT",), "DROP")
    h.store.write([entry(old, "203.0.113.1/32"), entry(old, "203.0.113.2/32", expires_at=T0 + 60)], [])
    h.backend.kernel = {("old-chain", net("203.0.113.1/32")): "DROP"}
    w = h.worker(chains=(WEB,))
    assert h.backend.calls[:2] == [("prepare", ("f2b-web",)), ("read", ("f2b-web",))]
    assert h.backend.retired == ["old-chain"]
    assert h.backend.applies == []
    assert len(h.stored().entries) == 2
    # It returns: its blocks are put back, the one the kernel lost too.
    h.run(w, Reconfigure((WEB, old)))
    assert h.backend.applies[-1] == [Add("old-chain", net("203.0.113.2/32"), "DROP", T0 + 60)]
    assert [str(e.network) for e in h.run(w, ListChain("old-chain"))] == ["203.0.113.1/32", "203.0.113.2/32"]


def test_reconfigure_prepares_new_chains_and_reconciles(h: Harness) -> None:
    w = h.worker(chains=(WEB,))
    h.run(w, block(WEB, "203.0.113.1/32"))
    h.backend.kernel[("f2b-ssh", net("203.0.113.99/32"))] = "REJECT"  # appeared behind our back
    assert h.run(w, Reconfigure((WEB, SSH))) is None
    assert ("prepare", ("f2b-web", "f2b-ssh")) in h.backend.calls
    assert h.run(w, Lookup("f2b-ssh", net("203.0.113.99/32"))).created_by == "adopted"


def test_a_failed_reconfigure_fails_only_the_reload(h: Harness) -> None:
    class FailingSecondPrepare(RecordingBackend):
        def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
            super().prepare(chains, retired)
            if sum(call[0] == "prepare" for call in self.calls) == 2:  # the reload's, after the start's
                raise OSError("simulated: the kernel refused the new chain")

    h.backend = FailingSecondPrepare()
    w = h.worker(chains=(WEB,), start=False)  # all three commands wait for one batch
    reload = w.submit(Reconfigure((WEB, SSH)))
    absent = w.submit(Lookup("f2b-web", net("203.0.113.9/32")))
    blocked = w.submit(block(WEB, "203.0.113.2/32"))
    w.start(timeout=WAIT)
    with pytest.raises(OSError):
        reload.result(WAIT)
    assert absent.result(WAIT) is None  # not found: the reload's error is the reload's alone
    assert blocked.result(WAIT) == Blocked(True, entry(WEB, "203.0.113.2/32"))


def test_a_failed_reconcile_fails_start(h: Harness) -> None:
    h.store.write([entry(WEB, "203.0.113.1/32")], [])
    h.backend.fail_applies = 1
    w = h.worker(start=False)
    with pytest.raises(OSError):
        w.start(timeout=WAIT)
    h.workers.remove(w)
    # The store still holds the block, so the next start re-adds it.
    assert h.stored().entries == [entry(WEB, "203.0.113.1/32")]


# -- failures --------------------------------------------------------------------------------


def test_a_failed_apply_leaves_the_store_as_it_was(h: Harness) -> None:
    a = entry(WEB, "203.0.113.1/32")
    b = entry(WEB, "203.0.113.2/32", expires_at=T0 + 600)
    h.store.write([a, b], [])
    h.backend.kernel = {("f2b-web", a.network): "DROP", ("f2b-web", b.network): "DROP"}
    before = h.stored()
    kernel_before = dict(h.backend.kernel)

    w = h.worker(start=False)
    futures = [
        w.submit(block(WEB, "203.0.113.3/32")),             # new
        w.submit(unblock(WEB, "203.0.113.1/32")),           # remove an existing one
        w.submit(block(WEB, "203.0.113.2/32", T0 + 9999)),  # change an existing expiry
        w.submit(block(SSH, "2001:db8:ffff::/48")),         # the other family
        w.submit(Lookup("f2b-web", a.network)),
    ]
    h.backend.fail_applies = 1
    w.start(timeout=WAIT)
    for fut in futures:
        with pytest.raises(FirewallUnavailable) as info:
            fut.result(WAIT)
        assert "simulated" not in str(info.value), "a client-facing message never echoes the exception"
    assert len(h.backend.applies) == 1  # the reconcile had nothing to do; the batch was tried once
    assert h.stored() == before
    assert h.backend.kernel == kernel_before

    # The worker's own view was not changed either, and it carries on once the firewall works again.
    assert h.run(w, Lookup("f2b-web", a.network)) == a
    assert h.run(w, Lookup("f2b-web", b.network)) == b
    assert h.run(w, Lookup("f2b-web", net("203.0.113.3/32"))) is None
    assert h.run(w, block(WEB, "203.0.113.3/32")).created is True
    assert h.run(w, unblock(WEB, "203.0.113.1/32")).deleted is True
    assert h.backend.kernel == {("f2b-web", b.network): "DROP", ("f2b-web", net("203.0.113.3/32")): "DROP"}


def test_a_failed_expiry_is_retried(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    h.clock.now = T0 + 61
    h.backend.fail_applies = 1
    with pytest.raises(FirewallUnavailable):
        h.run(w, ListChain("f2b-web"))  # shares the batch with the failing expiry
    h.clock.now = T0 + 120
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is None
    assert h.backend.kernel == {}
    assert h.backend.applies[-1] == [Remove("f2b-web", net("203.0.113.9/32"), "DROP")]


def test_a_cancelled_command_is_skipped(h: Harness) -> None:
    w = h.worker(start=False)
    gone = w.submit(block(WEB, "203.0.113.1/32"))
    assert gone.cancel()  # the client's request timed out before the worker took it
    kept = w.submit(block(WEB, "203.0.113.2/32"))
    w.start(timeout=WAIT)
    assert kept.result(WAIT).created
    assert h.backend.applies == [[Add("f2b-web", net("203.0.113.2/32"), "DROP")]]


# -- expiry ----------------------------------------------------------------------------------


def test_expiry_follows_the_injected_clock(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    h.run(w, block(WEB, "203.0.113.10/32"))
    h.clock.now = T0 + 59
    h.run(w, ListChain("f2b-web"))  # wakes the worker: nothing is due yet
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is not None
    h.clock.now = T0 + 60
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        h.run(w, ListChain("f2b-web"))  # the due expiry joins this batch at the latest
        assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is None
    assert h.backend.applies[-1] == [Remove("f2b-web", net("203.0.113.9/32"), "DROP")]
    assert h.backend.kernel == {("f2b-web", net("203.0.113.10/32")): "DROP"}
    assert any("action=expire" in r.getMessage() and "network=203.0.113.9/32" in r.getMessage()
               for r in caplog.records)
    w.stop(timeout=WAIT)
    assert h.stored() == Loaded([entry(WEB, "203.0.113.10/32")], [])


def test_a_new_timeout_replaces_the_old_expiry(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 600))   # extended
    h.clock.now = T0 + 61
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is not None
    h.run(w, block(WEB, "203.0.113.9/32"))             # made permanent
    h.clock.now = T0 + 601
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))) is not None
    assert len(h.backend.applies) == 1


def test_an_unblocked_then_reblocked_network_keeps_only_the_new_expiry(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    h.run(w, unblock(WEB, "203.0.113.9/32"))
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 600))
    h.clock.now = T0 + 61
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, Lookup("f2b-web", net("203.0.113.9/32"))).expires_at == T0 + 600


def test_expired_blocks_are_dropped_at_the_next_start(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.9/32", T0 + 60))
    w.stop(timeout=WAIT)
    h.clock.now = T0 + 3600   # the daemon was down past the expiry
    h.worker()
    assert h.backend.applies[-1] == [Remove("f2b-web", net("203.0.113.9/32"), "DROP")]
    assert h.stored() == Loaded([], [])


def test_stop_finishes_what_is_queued(h: Harness) -> None:
    w = h.worker()
    futures = [w.submit(block(WEB, f"203.0.113.{i}/32")) for i in range(1, 6)]
    w.stop(timeout=WAIT)
    assert not w.is_alive()
    assert all(f.result(0).created for f in futures)
    assert len(h.stored().entries) == 5


# -- the store -----------------------------------------------------------------------------


def test_store_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    entries = [entry(WEB, "203.0.113.9/32", created_at=T0 + 0.123456),
               entry(SSH, "2001:db8:ffff::/48", expires_at=T0 + 86400.5, created_by="f2b"),
               entry(WEB, "203.0.113.0/24", expires_at=T0 + 1)]
    store.write(entries, [])
    store.close()
    loaded = Store(tmp_path / "state").load()
    assert sorted(loaded.entries, key=_order) == sorted(entries, key=_order)
    assert loaded.tombstones == []


def test_store_upsert_replaces_and_revives(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a = entry(WEB, "203.0.113.9/32")
    store.write([a], [])
    store.write([], [a])
    assert store.load() == Loaded([], [a])
    a2 = entry(WEB, "203.0.113.9/32", expires_at=T0 + 5, created_by="x")
    store.write([a2], [])          # a block of a tombstoned key makes it live again
    assert store.load() == Loaded([a2], [])
    store.close()


def test_store_purge_removes_only_tombstones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a, b = entry(WEB, "203.0.113.1/32"), entry(WEB, "203.0.113.2/32")
    store.write([a, b], [])
    store.write([], [a])
    store.write([], [], [a, b])   # b is live: a purge must not delete it
    assert store.load() == Loaded([b], [])
    store.close()


def test_store_restore(tmp_path: Path) -> None:
    store = Store(tmp_path)
    a, b = entry(WEB, "203.0.113.1/32"), entry(WEB, "203.0.113.2/32", expires_at=T0 + 5)
    store.write([a, b], [])
    b_changed = entry(WEB, "203.0.113.2/32", expires_at=T0 + 500)
    c = entry(SSH, "203.0.113.3/32")
    store.write([b_changed, c], [a])
    store.restore([(a.key, a), (b.key, b), (("f2b-ssh", c.network, None), None)])
    loaded = store.load()
    assert sorted(loaded.entries, key=_order) == sorted([a, b], key=_order)
    assert loaded.tombstones == []
    store.close()


def test_store_write_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = entry(WEB, "203.0.113.1/32")
    bad = Entry("f2b-web", net("203.0.113.2/32"), None, T0, None, "x")  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.write([good, bad], [])
    assert store.load() == Loaded([], [])
    store.write([good], [])   # and the connection is usable afterwards
    assert store.load() == Loaded([good], [])
    store.close()


def test_store_skips_unreadable_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write([entry(WEB, "203.0.113.1/32")], [])
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("INSERT INTO blocks VALUES ('f2b-web', 'garbage', '', '', 'DROP', 0, 1.0, 'x', 0, 1.0)")
    assert store.load() == Loaded([entry(WEB, "203.0.113.1/32")], [])
    assert list(store.entries(WEB.name)) == [entry(WEB, "203.0.113.1/32")]
    # Due, but unreadable: skipped, and no longer due (the worker would wake up for it again and again).
    assert store.next_due() == 1.0
    assert store.due(time.time(), 10) == [] and store.next_due() is None
    store.close()


def test_store_is_durable_and_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "new-state"
    store = Store(state_dir)
    store.write([entry(WEB, "203.0.113.1/32")], [])
    assert stat.S_IMODE(os.stat(state_dir / "state.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    # SQLite gives the WAL the database file's mode.
    assert stat.S_IMODE(os.stat(state_dir / "state.db-wal").st_mode) == 0o600
    with sqlite3.connect(state_dir / "state.db") as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # persistent, in the file
    # synchronous is per connection: read it from the store's own one. 2 is FULL.
    assert store._db.execute("PRAGMA synchronous").fetchone() == (2,)
    store.close()


def test_store_can_be_used_from_the_worker_thread(tmp_path: Path) -> None:
    # The connection is made on the main thread and then used only by the worker thread.
    store = Store(tmp_path)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            store.write([entry(WEB, "203.0.113.1/32")], [])
            store.load()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=use)
    t.start()
    t.join(WAIT)
    assert errors == []
    store.close()


def test_a_command_that_fails_gets_a_fixed_message_and_spares_the_batch(h: Harness) -> None:
    w = h.worker(start=False)
    bad = w.submit(object())  # type: ignore[call-overload]  # nothing the HTTP edge can send; a bug stand-in
    good = w.submit(block(WEB, "203.0.113.1/32"))
    w.start(timeout=WAIT)
    with pytest.raises(FirewallUnavailable) as info:
        bad.result(WAIT)
    assert "object" not in str(info.value), "the exception text stays in the log"
    assert good.result(WAIT).created


def test_kernel_ops_tell_a_set_backend_of_a_new_expiry() -> None:
    a = Entry("f2b-web", net("203.0.113.1/32"), "DROP", T0, T0 + 60, "admin")
    longer = Entry("f2b-web", net("203.0.113.1/32"), "DROP", T0, T0 + 600, "admin")
    # iptables has no kernel timeouts: a new expiry changes nothing in the kernel.
    assert kernel_ops(a, longer) == []
    # A set backend replaces the entry's timeout.
    assert kernel_ops(a, longer, expires_in_kernel=True) == [Add("f2b-web", net("203.0.113.1/32"), "DROP", T0 + 600)]
    assert kernel_ops(a, a, expires_in_kernel=True) == []


def test_a_bulk_block_is_one_group_commit(h: Harness) -> None:
    w = h.worker()
    nets = ("203.0.113.1/32", "203.0.113.2/32", "203.0.113.1/32")
    fut = w.submit(BulkBlock(WEB, tuple(net(n) for n in nets), None, "admin", "198.51.100.9"))
    results = fut.result(WAIT)
    assert [r.created for r in results] == [True, True, False]
    assert h.backend.applies[-1] == [Add("f2b-web", net("203.0.113.1/32"), "DROP"),
                                     Add("f2b-web", net("203.0.113.2/32"), "DROP")]


def test_edge_networks_of_both_families_keep_every_field_through_the_worker(h: Harness) -> None:
    """The worker keeps its entries packed, not as objects: every field must come back exactly."""
    w = h.worker()
    edges = ["0.0.0.0/1", "128.0.0.0/1", "255.255.255.255/32", "203.0.113.0/24", "203.0.113.7/32",
             "::/1", "8000::/1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "2001:db8:ffff::/48",
             "2001:db8:ffff::7/128", "::ffff:0:0/96"]
    for i, n in enumerate(edges):
        h.clock.now = T0 + i + 0.25
        expires = None if i % 2 else T0 + 1000 + i + 0.5
        blocked = h.run(w, block(WEB, n, expires, actor=f"user{i}"))
        assert blocked.created and blocked.entry == entry(WEB, n, expires, T0 + i + 0.25, f"user{i}")
    listed = h.run(w, ListChain("f2b-web"))
    assert [str(e.network) for e in listed] == sorted(
        edges, key=lambda n: (net(n).version, net(n)))  # type: ignore[no-any-return]
    for i, n in enumerate(edges):
        found = h.run(w, Lookup("f2b-web", net(n)))
        assert found == entry(WEB, n, None if i % 2 else T0 + 1000 + i + 0.5, T0 + i + 0.25, f"user{i}")
    assert h.run(w, Lookup("f2b-web", net("203.0.113.6/32"))) is None
    assert h.run(w, Lookup("f2b-ssh", net("203.0.113.7/32"))) is None
    # The timed ones expire, and only they, each from the kernel too.
    h.clock.now = T0 + 2000
    # A batch, which also runs the expiries; user3 made that block.
    assert h.run(w, unblock(WEB, "203.0.113.0/24", actor="user3")).deleted is True
    left = {str(e.network) for e in h.run(w, ListChain("f2b-web"))}
    assert left == {n for i, n in enumerate(edges) if i % 2} - {"203.0.113.0/24"}
    assert {str(n) for (c, n, _) in h.backend.kernel if c == "f2b-web"} == left


def test_entries_taken_out_behind_the_workers_back_come_back_without_a_request(h: Harness) -> None:
    w = Worker(h.backend, h.store, (WEB, SSH), clock=h.clock, kernel_check=0.05)
    h.workers.append(w)
    w.start(timeout=WAIT)
    for n in ("203.0.113.1/32", "203.0.113.2/32", "2001:db8:ffff::/48"):
        assert h.run(w, block(WEB, n)).created
    del h.backend.kernel[("f2b-web", net("203.0.113.2/32"))]  # say `iptables -F` or `ipset flush`
    deadline = time.monotonic() + WAIT
    while ("f2b-web", net("203.0.113.2/32")) not in h.backend.kernel and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(h.backend.kernel) == {("f2b-web", net(n), None)
                                     for n in ("203.0.113.1/32", "203.0.113.2/32", "2001:db8:ffff::/48")}
    assert h.stored().entries == [entry(WEB, n) for n in ("203.0.113.1/32", "203.0.113.2/32", "2001:db8:ffff::/48")]
    # Put back by a reconcile (prepare, read, apply), not by a change anyone asked for.
    kinds = [c[0] for c in h.backend.calls]
    assert kinds.count("prepare") == 2 and kinds.count("read") == 2


def test_a_healthy_kernel_is_checked_but_never_reconciled(h: Harness) -> None:
    w = Worker(h.backend, h.store, (WEB, SSH), clock=h.clock, kernel_check=0.02)
    h.workers.append(w)
    w.start(timeout=WAIT)
    assert h.run(w, block(WEB, "203.0.113.1/32")).created
    deadline = time.monotonic() + WAIT
    while sum(c[0] == "missing" for c in h.backend.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)  # an idle worker wakes once a second (HEARTBEAT), so it looks about that often
    kinds = [c[0] for c in h.backend.calls]
    assert kinds.count("missing") >= 2 and kinds.count("prepare") == 1


def test_requests_that_fit_are_not_failed_by_one_in_their_batch_that_does_not(h: Harness) -> None:
    h.backend.capacity = 3
    w = h.worker(start=False)
    first = w.submit(block(WEB, "203.0.113.1/32"))
    w.start(timeout=WAIT)
    assert first.result(WAIT).created
    h.workers.remove(w)
    w.stop(timeout=WAIT)
    # Four requests in one batch for two free places: the first two in order get them, the others 507.
    w = h.worker(start=False)
    nets = [f"203.0.113.{i}/32" for i in range(10, 14)]
    futures = [w.submit(block(WEB, n)) for n in nets]
    w.start(timeout=WAIT)
    assert [f.result(WAIT).created for f in futures[:2]] == [True, True]
    for f in futures[2:]:
        with pytest.raises(FirewallFull):
            f.result(WAIT)
    assert set(h.backend.kernel) == {("f2b-web", net(n), None) for n in ["203.0.113.1/32"] + nets[:2]}
    assert h.stored().entries == [entry(WEB, n) for n in ["203.0.113.1/32"] + nets[:2]]
    # A bulk request is one request: it fits whole or fails whole.
    bulk = w.submit(BulkBlock(WEB, (net("203.0.113.20/32"), net("203.0.113.21/32")), None, "admin", "198.51.100.9"))
    with pytest.raises(FirewallFull):
        bulk.result(WAIT)
    assert len(h.backend.kernel) == 3


# -- claims ----------------------------------------------------------------------------------

ADDR = "203.0.113.9/32"


def claim(owner: str, expires_at: float | None = None, created_at: float = T0) -> Claim:
    return Claim(owner, created_at, expires_at)


def test_two_owners_then_one_delete_keeps_the_block_and_the_other_removes_it(h: Harness) -> None:
    w = h.worker()
    assert h.run(w, block(WEB, ADDR, actor="f2b", owner="f2b/sshd")).created
    h.clock.now = T0 + 1
    second = h.run(w, block(WEB, ADDR, T0 + 600, actor="f2b", owner="f2b/nginx"))
    assert second.created is False
    assert second.entry.all_claims == (claim("f2b/nginx", T0 + 600, T0 + 1), claim("f2b/sshd"))
    assert second.entry.expires_at is None and second.entry.created_by == "f2b/sshd"

    first_out = h.run(w, unblock(WEB, ADDR, actor="f2b", owner="f2b/sshd"))
    kept = Entry.of("f2b-web", net(ADDR), "DROP", T0, "f2b/sshd", [claim("f2b/nginx", T0 + 600, T0 + 1)])
    assert first_out == Unblocked(deleted=False, entry=kept, released=True)
    assert kept.expires_at == T0 + 600 and kept.claims  # the first claimant left: its claim is not implied
    assert h.backend.applies == [[Add("f2b-web", net(ADDR), "DROP")]]  # no Remove
    assert h.run(w, Lookup("f2b-web", net(ADDR))) == kept
    assert h.stored().entries == [kept]

    last_out = h.run(w, unblock(WEB, ADDR, actor="f2b", owner="f2b/nginx"))
    assert last_out == Unblocked(deleted=True, entry=kept, released=True)
    assert h.backend.applies[-1] == [Remove("f2b-web", net(ADDR), "DROP")]
    assert h.backend.kernel == {}
    w.stop(timeout=WAIT)
    assert h.stored() == Loaded([], [])


def test_a_delete_of_a_claim_not_held_changes_nothing(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    held = h.run(w, block(WEB, ADDR, actor="f2b", owner="f2b/sshd")).entry
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        # The same user without the label, another label, another user: none of them holds a claim.
        for cmd in (unblock(WEB, ADDR, actor="f2b"), unblock(WEB, ADDR, actor="f2b", owner="f2b/nginx"),
                    unblock(WEB, ADDR, actor="admin")):
            assert h.run(w, cmd) == Unblocked(deleted=False, entry=held, released=False)
    assert h.backend.applies == [[Add("f2b-web", net(ADDR), "DROP")]]
    assert h.stored().entries == [held]
    assert sum("result=not_held" in r.getMessage() for r in caplog.records) == 3


def test_override_removes_every_claim_at_once(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    h.run(w, block(WEB, ADDR, actor="f2b", owner="f2b/sshd"))
    before = h.run(w, block(WEB, ADDR, T0 + 60, actor="docker", owner="docker/c0ffee")).entry
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        assert h.run(w, unblock(WEB, ADDR, actor="admin", every_claim=True)) == Unblocked(True, before, True)
    assert h.backend.applies[-1] == [Remove("f2b-web", net(ADDR), "DROP")]
    assert any("user=admin" in r.getMessage() and "owner=* " in r.getMessage() and "result=deleted" in r.getMessage()
               for r in caplog.records)
    w.stop(timeout=WAIT)
    assert h.stored() == Loaded([], [])


def test_a_put_by_the_same_owner_refreshes_only_its_own_claim(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, ADDR, T0 + 60, actor="f2b", owner="f2b/sshd"))
    h.clock.now = T0 + 10
    h.run(w, block(WEB, ADDR, T0 + 100, actor="admin"))
    h.clock.now = T0 + 20
    again = h.run(w, block(WEB, ADDR, T0 + 500, actor="f2b", owner="f2b/sshd"))
    # Its created_at stays; the admin's claim is as it was.
    assert again.entry.all_claims == (claim("admin", T0 + 100, T0 + 10), claim("f2b/sshd", T0 + 500))
    assert again.entry.expires_at == T0 + 500 and again.created is False
    assert len(h.backend.applies) == 1


def test_the_effective_expiry_is_the_latest_claims_and_the_kernel_timeout_follows_it(h: Harness) -> None:
    h.backend.kernel_timeouts = True  # a set backend: the kernel hears of every new effective expiry
    w = h.worker()
    h.run(w, block(WEB, ADDR, T0 + 60, actor="a"))
    assert h.run(w, block(WEB, ADDR, T0 + 30, actor="b")).entry.expires_at == T0 + 60  # an earlier one: no change
    assert h.run(w, block(WEB, ADDR, T0 + 600, actor="c")).entry.expires_at == T0 + 600
    assert h.backend.applies == [[Add("f2b-web", net(ADDR), "DROP", T0 + 60)],
                                 [Add("f2b-web", net(ADDR), "DROP", T0 + 600, replaces=True)]]
    # The latest claim goes: the effective expiry falls back, and the kernel's timeout with it.
    assert h.run(w, unblock(WEB, ADDR, actor="c")).entry.expires_at == T0 + 60  # type: ignore[union-attr]
    assert h.backend.applies[-1] == [Add("f2b-web", net(ADDR), "DROP", T0 + 60, replaces=True)]
    # Each claim expires on its own; the block goes with the last.
    h.clock.now = T0 + 30
    h.run(w, ListChain("f2b-web"))
    found = h.run(w, Lookup("f2b-web", net(ADDR)))
    assert [c.owner for c in found.all_claims] == ["a"] and found.claims == ()  # a's alone: the usual form again
    assert len(h.backend.applies) == 3  # b's expiry changed nothing the kernel has
    h.clock.now = T0 + 60
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, Lookup("f2b-web", net(ADDR))) is None
    assert h.backend.applies[-1] == [Remove("f2b-web", net(ADDR), "DROP")]
    permanent = h.run(w, block(WEB, ADDR, None, actor="a"))
    assert h.run(w, block(WEB, ADDR, T0 + 90, actor="b")).entry.expires_at is None  # permanent wins
    assert permanent.entry.expires_at is None


def test_a_claim_that_expires_while_another_is_permanent_leaves_the_block(h: Harness,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    h.run(w, block(WEB, ADDR, None, actor="admin"))
    h.run(w, block(WEB, ADDR, T0 + 60, actor="f2b", owner="f2b/sshd"))
    h.clock.now = T0 + 61
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        h.run(w, ListChain("f2b-web"))
        found = h.run(w, Lookup("f2b-web", net(ADDR)))
    assert found == entry(WEB, ADDR, created_by="admin")
    assert h.backend.applies == [[Add("f2b-web", net(ADDR), "DROP")]]
    assert any("action=expire" in r.getMessage() and "owner=f2b/sshd" in r.getMessage()
               and "result=released" in r.getMessage() for r in caplog.records)
    w.stop(timeout=WAIT)
    assert h.stored().entries == [entry(WEB, ADDR, created_by="admin")]


def test_claims_survive_a_restart_and_expire_while_the_daemon_is_down(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, ADDR, T0 + 60, actor="f2b", owner="f2b/sshd"))
    h.run(w, block(WEB, ADDR, T0 + 600, actor="f2b", owner="f2b/nginx"))
    both = h.run(w, block(SSH, ADDR, None, actor="admin")).entry
    h.run(w, block(SSH, ADDR, T0 + 30, actor="f2b"))
    w.stop(timeout=WAIT)
    h.clock.now = T0 + 100  # the sshd claim and f2b's in f2b-ssh ran out meanwhile
    w = h.worker()
    web = h.run(w, Lookup("f2b-web", net(ADDR)))
    assert [c.owner for c in web.all_claims] == ["f2b/nginx"] and web.expires_at == T0 + 600
    assert h.run(w, Lookup("f2b-ssh", net(ADDR))) == both
    assert h.backend.applies == [[Add("f2b-web", net(ADDR), "DROP", T0 + 60)], [Add("f2b-ssh", net(ADDR), "REJECT")]]
    assert h.stored().entries == sorted([web, both], key=_order)
    h.clock.now = T0 + 600
    h.run(w, ListChain("f2b-web"))
    assert h.backend.applies[-1] == [Remove("f2b-web", net(ADDR), "DROP")]


def test_a_bulk_block_claims_for_its_owner(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, ADDR, actor="admin"))
    done = h.run(w, BulkBlock(WEB, (net(ADDR), net("203.0.113.10/32")), None, "feed", "198.51.100.9", "feed/spamhaus"))
    assert [b.created for b in done] == [False, True]
    assert [c.owner for c in done[0].entry.all_claims] == ["admin", "feed/spamhaus"]
    assert done[1].entry.created_by == "feed/spamhaus"


def test_the_store_round_trips_claims_and_restores_them(tmp_path: Path) -> None:
    store = Store(tmp_path)
    one = entry(WEB, "203.0.113.1/32", created_by="f2b/sshd")
    many = Entry.of("f2b-web", net("203.0.113.2/32"), "DROP", T0, "a",
                    [claim("a", T0 + 5), claim("b", None, T0 + 1), claim("c/x:y", T0 + 9, T0 + 2)])
    store.write([one, many], [])
    assert sorted(store.load().entries, key=_order) == [one, many]
    fewer = Entry.of("f2b-web", net("203.0.113.2/32"), "DROP", T0, "a", [claim("b", None, T0 + 1)])
    store.write([fewer], [])
    assert sorted(store.load().entries, key=_order) == [one, fewer]
    store.restore([(many.key, many), (one.key, None)])
    assert store.load() == Loaded([many], [])
    store.write([], [many])
    store.write([], [], [many])
    assert store.load() == Loaded([], [])
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM claims").fetchone() == (0,)
    store.close()


def test_an_adopted_claim_is_nobodys_and_goes_with_any_release(h: Harness) -> None:
    h.backend.kernel = {("f2b-web", net(ADDR)): "DROP", ("f2b-web", net("203.0.113.10/32")): "DROP"}
    w = h.worker()
    # Adopted alone: any writer's release removes it, as before claims.
    assert h.run(w, unblock(WEB, ADDR, actor="f2b", owner="f2b/sshd")).deleted is True
    # Adopted and a user's claim: another user's release takes only the adopted one.
    h.run(w, block(WEB, "203.0.113.10/32", actor="admin"))
    r = h.run(w, unblock(WEB, "203.0.113.10/32", actor="f2b"))
    assert (r.deleted, r.released) == (False, True) and [c.owner for c in r.entry.all_claims] == ["admin"]
    assert h.backend.kernel == {("f2b-web", net("203.0.113.10/32")): "DROP"}


# -- the seal (a start that need not read the kernel back) --------------------------------------------------------


class SealingBackend(RecordingBackend):
    """A backend that can seal, as nftables does: a token per seal, good while no apply came after it. Each apply
    notes whether the store then held a seal: it must not, since a crash during that apply would find the seal of a
    kernel the apply was changing."""

    def __init__(self, db_path: Path):
        super().__init__()
        self._db_path = db_path
        self.seals = 0
        self.good: str | None = None  # the token of the kernel as it is, None once an apply changed it
        self.sealed_at_apply: list[bool] = []

    def _stored_seal(self) -> str | None:
        with sqlite3.connect(self._db_path) as db:
            row = db.execute("SELECT value FROM fleet WHERE key = 'kernel_seal'").fetchone()
        return None if row is None else str(row[0])

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        self.sealed_at_apply.append(self._stored_seal() is not None)
        self.good = None
        super().apply(ops, chains)

    def seal(self) -> str | None:
        self.seals += 1
        self.good = f"token{self.seals}"
        return self.good

    def sealed(self, token: str) -> bool:
        return token == self.good


def _quiet(backend: SealingBackend, seals: int) -> None:
    """Wait for the worker's seal after a change: it comes once the worker had nothing to do for a moment."""
    deadline = time.monotonic() + WAIT
    while backend.seals < seals:
        assert time.monotonic() < deadline, "no seal after a quiet moment"
        time.sleep(0.05)
    time.sleep(0.1)  # the store's row is written after the backend's seal


def test_the_seal_is_kept_while_quiet_and_gone_before_any_change_reaches_the_kernel(tmp_path: Path) -> None:
    store = Store(tmp_path)
    backend = SealingBackend(tmp_path / "state.db")
    w = Worker(backend, store, [WEB], clock=Clock())
    w.start(timeout=WAIT)
    try:
        _quiet(backend, 1)  # after the start's reconcile
        assert backend._stored_seal() is not None
        for i in range(3):
            w.submit(block(WEB, f"203.0.113.{i}/32")).result(WAIT)
        assert backend.sealed_at_apply and not any(backend.sealed_at_apply)
        _quiet(backend, 2)
        assert str(backend._stored_seal()).endswith(" token2")
        # A lookup changes nothing: the seal stays.
        assert w.submit(Lookup(WEB.name, net("203.0.113.1/32"))).result(WAIT) is not None
        assert backend._stored_seal() is not None
        w.submit(unblock(WEB, "203.0.113.1/32")).result(WAIT)
        assert backend.sealed_at_apply == [False] * len(backend.sealed_at_apply)
    finally:
        w.stop(timeout=WAIT)
    assert backend._stored_seal() is not None  # a stop seals what the last change left
    store.close()
    # The next start finds it good and does not read the kernel back; the kernel holds what the store says.
    store = Store(tmp_path)
    calls = len(backend.calls)
    w = Worker(backend, store, [WEB], clock=Clock())
    w.start(timeout=WAIT)
    try:
        assert not [c for c in backend.calls[calls:] if c[0] == "read"]
        assert set(backend.kernel) == {("f2b-web", net(f"203.0.113.{i}/32"), None) for i in (0, 2)}
        # A change, then a "crash" (the store as the batch left it): no seal, so the next start reads the kernel.
        w.submit(block(WEB, "203.0.113.9/32")).result(WAIT)
        assert backend._stored_seal() is None
    finally:
        w.stop(timeout=WAIT)
    store.close()


def test_a_restart_that_finds_the_kernel_as_the_store_says_compares_digests_only(
        h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The usual restart: the kernel holds exactly the live blocks' atoms, port lists included (one atom, their
    union), and the reconcile tells so from a digest of each side; anything else takes the full comparison."""
    w = h.worker()
    for cmd in (block(WEB, "203.0.113.1/32"), block(SSH, "2001:db8::/48", expires_at=T0 + 600),
                Block(WEB, net("203.0.113.2/32"), None, "admin", "198.51.100.7", "", Scope("udp")),
                Block(WEB, net("203.0.113.3/32"), None, "admin", "198.51.100.7", "", Scope.of("tcp", [(22, 22)])),
                Block(WEB, net("203.0.113.3/32"), None, "ops", "198.51.100.7", "", Scope.of("tcp", [(80, 90)]))):
        h.run(w, cmd)
    h.run(w, unblock(WEB, "203.0.113.1/32"))
    h.run(w, block(WEB, "203.0.113.4/32"))
    w.stop(timeout=WAIT)
    kernel = dict(h.backend.kernel)
    assert len(kernel) == 4  # .3's two port lists are one atom

    def restart() -> str:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="webiptd.firewall.worker"):
            w = h.worker()
        w.stop(timeout=WAIT)
        return next(r.getMessage() for r in caplog.records if "reconciled" in r.getMessage())

    assert restart().endswith("; the kernel held exactly the store's blocks")
    assert h.backend.kernel == kernel
    # One atom missing and a stray: compared row by row, put right.
    del h.backend.kernel[("f2b-web", net("203.0.113.4/32"))]
    h.backend.kernel[("f2b-web", net("203.0.113.77/32"))] = "DROP"
    line = restart()
    assert "1 re-added" in line and "1 adopted" in line and "held exactly" not in line, line
    assert h.backend.kernel == {**kernel, ("f2b-web", net("203.0.113.77/32"), None): "DROP"}
    # The port lists' atom with a port short: the same.
    del h.backend.kernel[("f2b-web", net("203.0.113.3/32"), Scope.of("tcp", [(22, 22), (80, 90)]))]
    h.backend.kernel[("f2b-web", net("203.0.113.3/32"), Scope.of("tcp", [(80, 90)]))] = "DROP"
    line = restart()
    assert "held exactly" not in line and "1 re-added" in line, line
    assert restart().endswith("; the kernel held exactly the store's blocks")


def test_a_failed_write_at_a_quiet_moment_leaves_the_worker_running(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """After an unblock, a quiet moment writes the tombstone's purge (and seals); the store refusing that write must
    not end the worker: the purge waits for the next write, which takes it."""
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.1/32"))
    h.run(w, unblock(WEB, "203.0.113.1/32"))
    real = h.store.write
    calls: list[int] = []

    def refusing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    with caplog.at_level(logging.ERROR, logger="webiptd.firewall.worker"):
        monkeypatch.setattr(h.store, "write", refusing)
        deadline = time.monotonic() + WAIT
        while not calls:
            assert time.monotonic() < deadline, "no write at a quiet moment"
            time.sleep(0.05)
        monkeypatch.setattr(h.store, "write", real)
    assert any("could not write the state store" in r.getMessage() for r in caplog.records)
    assert h.run(w, Lookup(WEB.name, net("203.0.113.1/32"))) is None  # still answering
    h.run(w, block(WEB, "203.0.113.2/32"))  # the next write takes the purge along
    assert h.stored() == Loaded([entry(WEB, "203.0.113.2/32", created_at=T0)], [])
