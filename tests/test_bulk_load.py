"""A large load's own path (issue 13): items parsed without an ipaddress object (net.packed_item), the networks nobody
holds written to the store as rows and handed to the backend as packed addresses (Worker._load, Backend.load), and
the same results as a Block each: with the recording backend, then each set backend's load() in a namespace, then
through the daemon on nftables (ipset's half-way failure is in test_bulk_stream.py)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.netns import NetNS
from tests.test_backend_ipset import set_members
from tests.test_backend_nftables import elements
from tests.test_bulk_stream import hosts, post
from tests.test_worker_logic import SSH, T0, WAIT, WEB, Harness, block, unblock
from webiptd.commands import BulkBlocked, BulkLoad, Claim, Entry, FirewallFull, FirewallUnavailable, Packed
from webiptd.config import Chain
from webiptd.firewall.ops import CapacityExceeded
from webiptd.net import net_text, packed_item, packed_of, parse_item

# -- net.packed_item: what parse_item gives, or None -------------------------------------------------------


def _random_items(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        version = rng.choice((4, 6))
        bits = 32 if version == 4 else 128
        length = rng.choice((bits, bits, rng.randint(0, bits)))
        value = rng.getrandbits(bits)
        if rng.random() < 0.8:
            value &= ~((1 << (bits - length)) - 1)  # mostly valid: host bits clear
        address = str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))
        if version == 6 and rng.random() < 0.2:
            address = address.upper()
        out.append(address if length == bits and rng.random() < 0.5 else f"{address}/{length}")
    return out


EDGES = ["0.0.0.0/1", "255.255.255.255", "203.0.113.0/24", "203.0.113.7/24", "01.2.3.4", "1.2.3.4/032",
         "1.2.3.4/", "1.2.3.4/33", "1.2.3.4/0", "::/1", "::1", "::ffff:1.2.3.4", "::1.2.3.4", "::ffff:0:0/96",
         "2001:DB8::1", "2001:db8::/32", "2001:db8::1/64", "2001:db8::1%eth0", "2001:db8::1/+64", "2001:0db8::1",
         "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "1::", "1:2:3:4:5:6:7:8:9", "2001:db8::/129", "", "/", "x"]


def test_packed_item_gives_parse_items_network_or_leaves_it_to_parse_item() -> None:
    rng = random.Random(13)
    taken = 0
    for text in EDGES + _random_items(rng, 20_000):
        fast = packed_item(text)
        try:
            network = parse_item(text)
        except ValueError:
            assert fast is None, text  # what parse_item refuses, the fast path never takes
            continue
        if fast is not None:
            taken += 1
            assert fast == packed_of(network), text
            assert fast[0] == net_text(network)
    assert taken > 10_000  # the common forms do take the fast path


# -- the worker, with the recording backend ------------------------------------------------------------


def load(chain: Chain, texts: list[str], expires_at: float | None = None, actor: str = "feed") -> BulkLoad:
    return BulkLoad(chain, tuple(packed_of(parse_item(t)) for t in texts), expires_at, actor, "198.51.100.9")


def stored(h: Harness) -> dict[str, Entry]:
    return {net_text(e.network): e for e in h.stored().entries if e.chain == WEB.name}


def test_a_load_makes_new_blocks_rows_and_the_rest_claims(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    w = h.worker()
    h.clock.now = T0
    h.run(w, block(WEB, "203.0.113.1/32", actor="alice"))  # held by another: the load claims it too
    h.run(w, block(WEB, "203.0.113.2/32", actor="feed"))  # held by the loader: exists
    h.run(w, block(WEB, "203.0.113.3/32"))
    h.run(w, unblock(WEB, "203.0.113.3/32"))  # a tombstone on the key: replaced by the new row
    h.clock.now = T0 + 10
    texts = ["203.0.113.1/32", "203.0.113.2/32", "203.0.113.3/32", "203.0.113.4/32", "2001:db8:ffff::/48",
             "203.0.113.4/32"]  # the last one twice
    with caplog.at_level(logging.INFO, logger="webiptd.audit"):
        caplog.clear()
        done = h.run(w, load(WEB, texts, T0 + 600))
    assert done == BulkBlocked(created=3, existing=3)
    entries = stored(h)
    assert entries["203.0.113.1/32"].claims == (Claim("alice", T0, None), Claim("feed", T0 + 10, T0 + 600))
    assert entries["203.0.113.2/32"] == Entry(WEB.name, parse_item("203.0.113.2"), "DROP", T0, T0 + 600, "feed")
    for text in ("203.0.113.3/32", "203.0.113.4/32", "2001:db8:ffff::/48"):
        assert entries[text] == Entry(WEB.name, parse_item(text), "DROP", T0 + 10, T0 + 600, "feed"), text
    assert h.stored().tombstones == []
    assert {net_text(k[1]) for k in h.backend.kernel if k[0] == WEB.name} == set(entries)
    assert w.count == 5 and w.entry_counts() == {WEB.name: 5}
    lines = [r.getMessage() for r in caplog.records if r.name == "webiptd.audit"]
    assert lines == ["user=feed client=198.51.100.9 action=bulk_block chain=f2b-web networks=6 first=203.0.113.1/32 "
                     "last=203.0.113.4/32 owner=feed timeout=590 created=3 existing=3 scope=all"]
    # The new blocks expire like any other, from the store's index.
    h.clock.now = T0 + 601
    h.run(w, block(WEB, "198.18.0.1/32", actor="feed"))  # the due expiries come in its batch
    assert set(stored(h)) == {"203.0.113.1/32", "198.18.0.1/32"}
    assert w.count == 2


def test_a_load_ends_its_batch_so_a_later_command_sees_its_rows(h: Harness) -> None:
    w = h.worker(start=False)
    first = w.submit(load(WEB, ["203.0.113.5/32", "203.0.113.6/32"]))
    then = w.submit(unblock(WEB, "203.0.113.5/32", actor="feed"))
    again = w.submit(load(WEB, ["203.0.113.6/32"]))
    w.start(timeout=WAIT)  # all three in the first batch the worker takes
    assert first.result(WAIT) == BulkBlocked(2, 0)
    assert then.result(WAIT).deleted
    assert again.result(WAIT) == BulkBlocked(0, 1)
    assert set(stored(h)) == {"203.0.113.6/32"} and w.count == 1


def test_a_load_the_kernel_refuses_changes_nothing(h: Harness) -> None:
    w = h.worker()
    h.run(w, block(WEB, "203.0.113.1/32", actor="alice"))
    before = h.stored()
    h.backend.fail_applies = 1
    with pytest.raises(FirewallUnavailable):
        h.run(w, load(WEB, ["203.0.113.1/32", "203.0.113.8/32", "203.0.113.9/32"], T0 + 600))
    assert h.stored() == before
    h.backend.capacity = 2
    with pytest.raises(FirewallFull):
        h.run(w, load(WEB, ["203.0.113.8/32", "203.0.113.9/32"]))
    assert h.stored() == before and w.count == 1 and w.entry_counts() == {WEB.name: 1}
    h.backend.capacity = None
    assert h.run(w, load(WEB, ["203.0.113.8/32", "203.0.113.9/32"])) == BulkBlocked(2, 0)
    assert w.count == 3


def test_loads_in_two_chains_do_not_meet(h: Harness) -> None:
    w = h.worker()
    assert h.run(w, load(WEB, ["203.0.113.1/32"])) == BulkBlocked(1, 0)
    assert h.run(w, load(SSH, ["203.0.113.1/32"])) == BulkBlocked(1, 0)
    assert h.backend.kernel == {("f2b-web", parse_item("203.0.113.1")): "DROP",
                                ("f2b-ssh", parse_item("203.0.113.1")): "REJECT"}


# -- each set backend's load(), in a namespace -------------------------------------------------------------


def packed(texts: list[str]) -> list[Packed]:
    return [packed_of(parse_item(t)) for t in texts]


@pytest.mark.root
@pytest.mark.backends("ipset")
def test_ipset_load_puts_both_families_in_and_a_full_set_leaves_nothing(ns: NetNS, workdir: Path) -> None:
    from webiptd.firewall.ipset import IpsetBackend

    chains = {c.name: c for c in (Chain("loaded", ("INPUT",), "DROP", backend="ipset", maxelem=65536),
                                  Chain("tiny", ("INPUT",), "DROP", backend="ipset", maxelem=4))}
    backend = ns.call(lambda: IpsetBackend(str(workdir / "xtables.lock")))
    try:
        ns.call(lambda: backend.prepare(chains.values()))
        ns.run(["ipset", "add", "loaded-v4", "203.0.113.1", "timeout", "50"])  # there already: takes the new one
        items = packed(["203.0.113.1", "203.0.113.0/25", "2001:db8:ffff::1", "2001:db8:ffff:1::/64"]
                       + [f"198.18.{i >> 8}.{i & 255}" for i in range(3000)])  # more than one message (SEND_MAX)
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 600, None, items, chains))
        v4, v6 = set_members(ns, "loaded-v4"), set_members(ns, "loaded-v6")
        assert len(v4) == 3002 and set(v6) == {"2001:db8:ffff::1/128", "2001:db8:ffff:1::/64"}
        assert all(590 <= t <= 600 for t in [*v4.values(), *v6.values()])
        # `ipset test`, one element a message (bench/fleet.py's watcher asks this way).
        from webiptd.firewall.ipset_netlink import IPSET_CMD_ADD, Element, IpsetNetlink

        def test() -> list[bool]:
            nl = IpsetNetlink()
            try:
                return nl.test([Element(IPSET_CMD_ADD, "loaded-v4", parse_item(t), True)
                                for t in ("203.0.113.1", "198.18.11.183", "198.18.11.184", "203.0.113.200")])
            finally:
                nl.close()
        assert ns.call(test) == [True, True, False, False]  # 198.18.11.183: item 2,999; .200 is outside the /25
        # A family that does not fit takes back what the other family's part did.
        full = packed(["203.0.113.10", "203.0.113.11", "2001:db8:ffff::10"] + [f"2001:db8:ffff::{i:x}"
                                                                                 for i in range(32, 40)])
        with pytest.raises(CapacityExceeded):
            ns.call(lambda: backend.load("tiny", "DROP", None, None, full, chains))
        assert set_members(ns, "tiny-v4") == {} and set_members(ns, "tiny-v6") == {}
    finally:
        ns.call(backend.close)


@pytest.mark.root
@pytest.mark.backends("nftables")
def test_nftables_load_makes_a_set_per_prefix_length_in_one_transaction(ns: NetNS) -> None:
    from webiptd.firewall.nftables import NftablesBackend

    chains = {c.name: c for c in (Chain("loaded", ("INPUT",), "DROP", backend="nftables"),
                                  Chain("tiny", ("INPUT",), "DROP", backend="nftables", maxelem=4),
                                  Chain("mid", ("INPUT",), "DROP", backend="nftables", maxelem=15_000))}
    backend = ns.call(lambda: NftablesBackend())
    try:
        ns.call(lambda: backend.prepare(chains.values()))
        items = packed(["203.0.113.1", "203.0.113.0/25", "2001:db8:ffff::1", "2001:db8:ffff:1::/64"]
                       + [f"198.18.{i >> 8}.{i & 255}" for i in range(3000)])
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 600, None, items, chains))
        hosts_v4 = elements(ns, "loaded-v4")
        assert len(hosts_v4) == 3001 and 590 <= hosts_v4["203.0.113.1"]["timeout"] <= 600
        assert set(elements(ns, "loaded-v4-25")) == {"203.0.113.0"}
        assert set(elements(ns, "loaded-v6")) == {"2001:db8:ffff::1"}
        assert set(elements(ns, "loaded-v6-64")) == {"2001:db8:ffff:1::"}
        full = packed(["203.0.113.10", "2001:db8:ffff::10"] + [f"203.0.113.{i}" for i in range(32, 40)])
        with pytest.raises(CapacityExceeded):
            ns.call(lambda: backend.load("tiny", "DROP", None, None, full, chains))
        assert elements(ns, "tiny-v4") == {} and not ns.run(["nft", "list", "set", "inet", "web-ipt-d", "tiny-v6"],
                                                             check=False).stdout.count("2001:db8")
        # A load of more than one transaction (LOAD_CHUNK) that does not fit: the transactions before are taken back.
        many = packed([f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(25_000)])
        with pytest.raises(CapacityExceeded):
            ns.call(lambda: backend.load("mid", "DROP", None, None, many, chains))
        assert elements(ns, "mid-v4") == {}
    finally:
        ns.call(backend.close)



@pytest.mark.root
@pytest.mark.backends("nftables")
def test_nftables_load_that_replaces_gives_held_elements_the_new_timeout_either_way(ns: NetNS) -> None:
    """A load that replaces: an add alone where the kernel takes an add's timeout (found out once, by reading an
    element back), else a delete and an add; the same timeouts in the end. A kernel that kept the old timeout
    (made here by reading back what the element had before) has the load's part done again with deletes."""
    from webiptd.firewall import nftables as nft_module
    from webiptd.firewall.nftables import NftablesBackend, element_expiration

    chains = {"loaded": Chain("loaded", ("INPUT",), "DROP", backend="nftables")}
    feed = [f"198.18.{i >> 8}.{i & 255}" for i in range(3000)]
    backend = ns.call(lambda: NftablesBackend())
    try:
        ns.call(lambda: backend.prepare(chains.values()))
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 600, None, packed(feed), chains))

        def timeouts() -> set[int]:
            return {e["timeout"] for e in elements(ns, "loaded-v4").values()}

        assert max(timeouts()) <= 600
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 6000, None, packed(feed), chains,
                                     replaces=True))
        assert backend.readd_sets_timeout in (True, False)  # this kernel's way (True from Linux 6.10)
        assert min(timeouts()) > 5_900 and len(elements(ns, "loaded-v4")) == 3000
        backend.readd_sets_timeout = False  # a delete and an add
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 60_000, None, packed(feed), chains,
                                     replaces=True))
        assert min(timeouts()) > 59_900
        # A kernel that keeps the old timeout: the element read back after the add shows the time it had before.
        backend.readd_sets_timeout = None
        real = backend._expiration
        reads: list[int | None] = []

        def kept(chain: str, item: tuple[str, bytes, int]) -> int | None:
            left = real(chain, item) if not reads else reads[0]
            reads.append(left)
            return left

        backend._expiration = kept  # type: ignore[method-assign]
        ns.call(lambda: backend.load("loaded", "DROP", time.time() + 900, None, packed(feed), chains, replaces=True))
        assert len(reads) == 2 and backend.readd_sets_timeout is False
        assert max(timeouts()) <= 900 and len(elements(ns, "loaded-v4")) == 3000
        assert ns.call(lambda: _gone(element_expiration, nft_module)) is None
    finally:
        ns.call(backend.close)


def _gone(element_expiration: Any, nft_module: Any) -> int | None:
    """element_expiration() of an element the set does not hold."""
    with nft_module.open_socket() as sock:
        sock.settimeout(5)
        return element_expiration(sock, 7, "loaded-v4", bytes([203, 0, 113, 250]))  # type: ignore[no-any-return]


# -- through the daemon ------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.backends("nftables")
def test_a_load_past_a_full_nftables_set_keeps_the_batches_before(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 50_000
    d.config["chains"]["f2b-web"].update(backend="nftables", maxelem=25_000)
    d.start()
    assert d.request("PUT", "/chain/f2b-web/ipv4/198.18.0.5?owner=alice").status == 201  # in the load too
    r = post(d, "f2b-web", "\n".join(hosts(40_000)).encode())
    assert r.status == 507 and r.json["error"] == "firewall_full", r
    j: dict[str, Any] = r.json
    # The first 10,000 lines went in (the item held by alice among them); the other 30,000, one batch, do not fit.
    assert (j["applied_through"], j["created"], j["existing"]) == (10_000, 9_999, 1), j
    assert len(d.kernel_entries("f2b-web", 4)) == 10_000
    held = d.request("GET", "/chain/f2b-web/ipv4/198.18.0.5").json
    assert sorted(c["owner"] for c in held["claims"]) == ["admin", "admin/alice"], held
    # The load goes on from where it stopped once there is room (a reload raises maxelem).
    d.config["chains"]["f2b-web"]["maxelem"] = 50_000
    d.reload()
    r = post(d, "f2b-web", "\n".join(hosts(30_000, 10_000)).encode())
    assert r.status == 200 and (r.json["created"], r.json["failed"]) == (30_000, 0), r
    assert len(d.kernel_entries("f2b-web", 4)) == 40_000


@pytest.mark.root
@pytest.mark.backends("ipset", "nftables")
def test_a_timed_feed_posted_again_takes_its_new_timeout_in_the_kernel(daemon: Daemon, backend: str) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 50_000
    d.config["chains"]["f2b-web"].update(backend=backend)
    d.start()
    feed = hosts(12_000)  # two batches of a load: past DETAIL items

    def timeouts() -> dict[str, int]:
        if backend == "ipset":
            return {net.removesuffix("/32"): t for net, t in set_members(d.ns, "f2b-web-v4").items()}
        return {net: int(e["timeout"]) for net, e in elements(d, "f2b-web-v4").items()}

    r = post(d, "f2b-web", "\n".join(feed).encode(), query="?timeout=600")
    assert r.status == 200 and (r.json["created"], r.json["existing"]) == (12_000, 0), r
    assert max(timeouts().values()) <= 600
    if backend == "nftables":  # an element the kernel dropped (as at its timeout) comes back with the new one
        d.ns.run(["nft", "delete", "element", "inet", "web-ipt-d", "f2b-web-v4", "{ 198.18.0.7 }"])
    r = post(d, "f2b-web", "\n".join(feed).encode(), query="?timeout=6000")
    assert r.status == 200 and (r.json["created"], r.json["existing"]) == (0, 12_000), r
    found = timeouts()
    assert set(found) == set(feed) and min(found.values()) > 5_000, sorted(found.items(), key=lambda x: x[1])[:3]
    entry = d.request("GET", "/chain/f2b-web/ipv4/198.18.0.7").json
    expires = datetime.datetime.fromisoformat(entry["expires_at"]).timestamp() - time.time()
    assert 5_900 < expires <= 6_000, entry


@pytest.mark.root
@pytest.mark.backends("ipset", "nftables")
def test_a_start_with_an_emptied_kernel_puts_a_load_back_whole(daemon: Daemon, backend: str) -> None:
    """As a boot: the store's blocks the kernel lacks go back as loads (many of one expiry), with their timeouts;
    the others (their own expiry) as before."""
    d = daemon
    d.config["limits"]["max_bulk_items"] = 50_000
    d.config["chains"]["f2b-web"].update(backend=backend)
    d.start()
    feed = hosts(3_000)
    assert post(d, "f2b-web", "\n".join(feed).encode(), query="?timeout=600").json["created"] == 3_000
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.20?timeout=900").status == 201
    assert d.stop() == 0
    if backend == "ipset":
        d.ns.run(["ipset", "flush", "f2b-web-v4"])
        d.ns.run(["ipset", "flush", "f2b-web-v6"])
    else:
        d.ns.run(["nft", "flush", "table", "inet", "web-ipt-d"])
    d.start()
    if backend == "ipset":
        found = {net.removesuffix("/32"): t for net, t in set_members(d.ns, "f2b-web-v4").items()}
    else:
        found = {net: int(e["timeout"]) for net, e in elements(d, "f2b-web-v4").items()}
    assert set(found) == set(feed) | {"203.0.113.20"}
    assert all(0 < t <= 600 for net, t in found.items() if net != "203.0.113.20"), found
    assert 600 < found["203.0.113.20"] <= 900


def test_a_load_into_a_shared_chain_announces_what_it_changed(h: Harness) -> None:
    from tests.test_fleet_logic import SHARED, fleet_worker, outbox

    w = fleet_worker(h, node="fw1")
    h.clock.now = T0
    h.run(w, block(SHARED, "203.0.113.1/32", actor="feed"))  # held already by the loader: nothing to announce
    assert h.run(w, load(SHARED, ["203.0.113.1/32", "203.0.113.2/32", "2001:db8:ffff::/48"], T0 + 600)) == \
        BulkBlocked(2, 1)
    events = outbox(h)[1:]
    assert [(e["op"], e["network"], e["owner"], e["node"], float(e["expires_at"])) for e in events] == [
        ("block", "203.0.113.1/32", "feed", "fw1", T0 + 600),  # its claim's new expiry
        ("block", "203.0.113.2/32", "feed", "fw1", T0 + 600),
        ("block", "2001:db8:ffff::/48", "feed", "fw1", T0 + 600)]
    assert w.outbox_committed == h.store.outbox_seq == 4


def test_packed_elements_are_the_bytes_of_an_element_each() -> None:
    from webiptd.firewall.ipset_netlink import IPSET_CMD_ADD, Element, IpsetNetlink, packed_elements

    nl = IpsetNetlink()  # no socket is opened to make the bytes
    for texts in (["203.0.113.1", "203.0.113.0/24", "0.0.0.0/1"], ["2001:db8::1", "2001:db8::/32", "8000::/1"]):
        items = packed(texts)
        for timeout in (None, 0, 600):
            assert packed_elements(items, timeout) == b"".join(
                nl._element_data(Element(IPSET_CMD_ADD, "s", parse_item(t), False, timeout), i)
                for i, t in enumerate(texts, 1))


def test_a_load_guessed_new_that_meets_the_stores_rows_is_looked_up_and_done_again(h: Harness) -> None:
    from tests.test_fleet_logic import SHARED, fleet_worker, outbox

    w = fleet_worker(h, node="fw1")
    h.clock.now = T0
    lookups: list[str] = []
    held_by = h.store.held_by
    h.store.held_by = lambda chain, *rest: lookups.append(chain) or held_by(chain, *rest)  # type: ignore
    assert h.run(w, load(SHARED, ["203.0.113.1/32"])) == BulkBlocked(1, 0)  # nothing held: the next is not looked up
    assert lookups == ["f2b-web"]
    h.run(w, block(SHARED, "203.0.113.2/32", actor="alice"))
    h.run(w, block(SHARED, "203.0.113.3/32", actor="alice"))
    h.run(w, unblock(SHARED, "203.0.113.3/32", actor="alice"))  # a tombstone
    events = len(outbox(h))
    done = h.run(w, load(SHARED, ["203.0.113.2/32", "203.0.113.3/32", "203.0.113.4/32"], T0 + 600))
    assert done == BulkBlocked(2, 1)
    assert lookups == ["f2b-web"] * 2  # the first try without a lookup, then the try again with one
    entries = stored(h)
    assert entries["203.0.113.2/32"].claims == (Claim("alice", T0, None), Claim("feed", T0, T0 + 600))
    assert entries["203.0.113.3/32"] == Entry(WEB.name, parse_item("203.0.113.3"), "DROP", T0, T0 + 600, "feed")
    assert set(entries) == {"203.0.113.1/32", "203.0.113.2/32", "203.0.113.3/32", "203.0.113.4/32"}
    assert h.stored().tombstones == []
    # The first try's events went with its rollback: one event a change, once.
    assert [(e["op"], e["network"]) for e in outbox(h)[events:]] == [
        ("block", "203.0.113.2/32"), ("block", "203.0.113.3/32"), ("block", "203.0.113.4/32")]
    assert w.outbox_committed == h.store.outbox_seq == events + 3
    assert w.count == 4


def test_a_feed_loaded_again_by_its_owner_changes_nothing_and_looks_up_only_what_it_changes(h: Harness) -> None:
    """A feed loaded again (a threat list refreshed, a million at a time): what its owner holds as the load leaves
    it is counted as existing from one query, with no entry made, no row written, no kernel change and no event;
    the rest of the batch goes the general way."""
    from tests.test_fleet_logic import SHARED, fleet_worker, outbox

    w = fleet_worker(h, node="fw1")
    h.clock.now = T0
    texts = ["203.0.113.1/32", "203.0.113.2/32", "203.0.113.3/32", "198.18.0.0/15", "2001:db8:ffff::/48"]
    assert h.run(w, load(SHARED, texts)) == BulkBlocked(5, 0)
    h.run(w, block(SHARED, "203.0.113.1/32", actor="alice"))  # another's claim too: the general way
    h.run(w, block(SHARED, "203.0.113.2/32", T0 + 600, actor="feed"))  # the feed's own, timed since: refreshed
    h.run(w, unblock(SHARED, "203.0.113.3/32", actor="feed"))  # a tombstone: made again
    looked_up: list[list[str]] = []
    held = h.store.held
    h.store.held = lambda chain, scope, texts, *rest: looked_up.append(sorted(texts)) or held(  # type: ignore
        chain, scope, texts, *rest)
    before, events, calls = stored(h), len(outbox(h)), len(h.backend.calls)
    h.clock.now = T0 + 10
    assert h.run(w, load(SHARED, texts + ["203.0.113.9/32"])) == BulkBlocked(2, 4)
    assert looked_up == [["203.0.113.1/32"]]  # the one with another's claim; the timed one is given its expiry
    after = stored(h)
    for text in ("198.18.0.0/15", "2001:db8:ffff::/48", "203.0.113.1/32"):
        assert after[text] == before[text], text
    assert after["203.0.113.2/32"] == Entry(WEB.name, parse_item("203.0.113.2"), "DROP", T0, None, "feed")
    assert after["203.0.113.3/32"].created_at == after["203.0.113.9/32"].created_at == T0 + 10
    assert [(e["op"], e["network"]) for e in outbox(h)[events:]] == [
        ("block", "203.0.113.2/32"), ("block", "203.0.113.3/32"), ("block", "203.0.113.9/32")]
    assert [op for call in h.backend.calls[calls:] if call[0] == "apply" for op in call[1]] != []
    assert {net_text(k[1]) for k in h.backend.kernel} == set(after) and w.count == 6
    # Loaded again once more: nothing is looked up in full, nothing changes anywhere.
    looked_up.clear()
    events, calls, before = len(outbox(h)), len(h.backend.calls), stored(h)
    assert h.run(w, load(SHARED, [t for t in texts + ["203.0.113.9/32"] if t != "203.0.113.1/32"])) == \
        BulkBlocked(0, 5)
    assert looked_up == [] and stored(h) == before and len(outbox(h)) == events
    assert [c for c in h.backend.calls[calls:] if c[0] == "apply" and c[1]] == []


@pytest.mark.parametrize("kernel_timeouts", [True, False], ids=["set-backend", "iptables"])
def test_a_timed_feed_loaded_again_takes_its_new_expiry_without_an_entry_an_item(h: Harness,
                                                                                 kernel_timeouts: bool) -> None:
    """A timed feed refreshed: the owner's one claim of each block takes the new expiry in one statement, and in the
    kernel (a load that replaces) when the kernel expires entries; the blocks then expire at the new time. A
    kernel that refuses it leaves the store's old expiry."""
    from tests.test_fleet_logic import SHARED, fleet_worker, outbox

    h.backend.kernel_timeouts = kernel_timeouts
    w = fleet_worker(h, node="fw1")
    h.clock.now = T0
    texts = ["203.0.113.1/32", "203.0.113.2/32", "198.18.0.0/15", "2001:db8:ffff::/48"]
    assert h.run(w, load(SHARED, texts, T0 + 600)) == BulkBlocked(4, 0)
    h.clock.now = T0 + 5
    h.run(w, load(SHARED, ["203.0.113.9/32"], T0 + 300))  # loaded at another time, with another expiry
    looked_up: list[list[str]] = []
    held = h.store.held
    h.store.held = lambda chain, scope, texts, *rest: looked_up.append(sorted(texts)) or held(  # type: ignore
        chain, scope, texts, *rest)
    events, calls = len(outbox(h)), len(h.backend.calls)
    h.clock.now = T0 + 100
    every = texts + ["203.0.113.9/32", "203.0.113.1/32"]  # one twice
    assert h.run(w, load(SHARED, every, T0 + 700)) == BulkBlocked(0, 6)
    assert looked_up == []
    entries = stored(h)
    assert set(entries) == set(every)
    for text in texts:
        assert entries[text] == Entry(WEB.name, parse_item(text), "DROP", T0, T0 + 700, "feed"), text
    assert entries["203.0.113.9/32"] == Entry(WEB.name, parse_item("203.0.113.9"), "DROP", T0 + 5, T0 + 700, "feed")
    # The fleet hears of each claim's new expiry, with its creation time.
    assert sorted((e["network"], float(e["created_at"]), float(e["expires_at"])) for e in outbox(h)[events:]) == \
        sorted([(t, T0, T0 + 700) for t in texts] + [("203.0.113.9/32", T0 + 5, T0 + 700)])
    loads = [c for c in h.backend.calls[calls:] if c[0] == "load"]
    assert loads == ([("load", WEB.name, 5, True)] if kernel_timeouts else [])
    assert h.backend.anomalies == []
    # A kernel that refuses the next refresh: the store keeps the expiry it had.
    h.backend.fail_applies = 1 if kernel_timeouts else 0
    if kernel_timeouts:
        with pytest.raises(FirewallUnavailable):
            h.run(w, load(SHARED, texts, T0 + 900))
        assert stored(h) == entries
    # They expire at the new time, not the old.
    h.clock.now = T0 + 650
    h.run(w, block(SHARED, "198.18.0.1/32", actor="ops"))  # the due expiries come in its batch
    assert set(stored(h)) == set(every) | {"198.18.0.1/32"}
    h.clock.now = T0 + 701
    h.run(w, block(SHARED, "198.18.0.2/32", actor="ops"))
    assert set(stored(h)) == {"198.18.0.1/32", "198.18.0.2/32"}
    assert w.count == 2


def test_a_load_with_a_protocol_or_ports_keeps_its_scope(h: Harness) -> None:
    from webiptd.scope import Scope

    w = h.worker()
    tcp, ssh = Scope("tcp"), Scope("tcp", ((22, 22),))
    texts = ["203.0.113.1/32", "2001:db8:ffff::/48"]
    items = tuple(packed_of(parse_item(t)) for t in texts)
    for scope, expected in ((tcp, BulkBlocked(2, 0)), (ssh, BulkBlocked(2, 0)), (tcp, BulkBlocked(0, 2))):
        assert h.run(w, BulkLoad(WEB, items, None, "feed", "198.51.100.9", scope=scope)) == expected
    assert h.backend.kernel == {(WEB.name, parse_item(t), s): "DROP" for t in texts for s in (tcp, ssh)}
    assert sorted((net_text(e.network), e.scope) for e in h.stored().entries) == sorted(
        (t, s) for t in texts for s in (tcp, ssh))
    assert w.count == 4
