"""The ipset backend against the real daemon: its sets and match rules, kernel timeouts, maxelem (507),
reconcile after a flush, restart or reboot, the move from the iptables backend, and real packets.
Then the backend on its own in a namespace: the netlink batches (IPv6, adds and deletes mixed, a full set,
a failure in the middle, a lost set) and the `ipset restore` path for big batches.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from tests.conftest import Daemon, Reply, assert_json_error
from tests.netns import NetNS, veth_pair
from tests.test_api import parse_time
from webiptd.config import Chain
from webiptd.firewall import ipset as ipset_backend
from webiptd.firewall.ops import Add, CapacityExceeded, Op, Remove
from webiptd.firewall.ipset import IpsetBackend
from webiptd.firewall.ipset_netlink import SEND_MAX, IpsetError

T = TypeVar("T")

pytestmark = [pytest.mark.root, pytest.mark.backends("ipset")]

CHAINS = {"f2b-web": "DROP", "f2b-ssh": "REJECT", "admin-list": "DROP"}
REJECT_WITH = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}
CAP = 2_147_483  # ipset's longest timeout


def members(d: Daemon, chain: str, family: int = 4) -> dict[str, int]:
    """{network: kernel timeout in seconds} for a chain's set, from `ipset list`; 0 is none,
    -1 a set without timeout support."""
    return set_members(d.ns, f"{chain}-v{family}")


def set_members(ns: NetNS, name: str) -> dict[str, int]:
    out = ns.run(["ipset", "list", name]).stdout
    found: dict[str, int] = {}
    for line in out.partition("Members:\n")[2].splitlines():
        words = line.split()
        if words:
            timeout = int(words[words.index("timeout") + 1]) if "timeout" in words else -1
            found[str(ipaddress.ip_network(words[0]))] = timeout
    return found


def header(d: Daemon, chain: str, family: int = 4) -> dict[str, str]:
    """The set's type and its `Header:` options (family, maxelem, timeout, ...), from `ipset list -t`."""
    out = d.ns.run(["ipset", "list", "-t", f"{chain}-v{family}"]).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    words = fields["Header"].split()
    return {"type": fields["Type"], **dict(zip(words[::2], words[1::2]))}


def match_rule(chain: str, family: int, target: str) -> str:
    reject = f" --reject-with {REJECT_WITH[family]}" if target == "REJECT" else ""
    return f"-A {chain} -m set --match-set {chain}-v{family} src -j {target}{reject}"


def listed(d: Daemon, chain: str) -> dict[str, dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return {e["network"]: e for e in r.json["entries"]}


def post(d: Daemon, chain: str, items: list[str], query: str = "") -> Reply:
    return d.request("POST", f"/chain/{chain}{query}", body=json.dumps(items).encode(),
                     headers={"Content-Type": "application/json"})


def wait_until(predicate: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(step)
    return True


def assert_no_errors(d: Daemon) -> None:
    text = d.log() + d.stderr()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]


def test_one_set_per_family_and_one_match_rule_per_chain(running: Daemon) -> None:
    d = running
    for i in range(1, 6):
        assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{i}").status == 201
        assert d.request("PUT", f"/chain/f2b-ssh/ipv6/2001:db8:ffff::{i}").status == 201

    def check() -> None:
        for chain, target in CHAINS.items():
            for family in (4, 6):
                h = header(d, chain, family)
                assert h["type"] == "hash:net" and h["family"] == ("inet" if family == 4 else "inet6"), h
                assert h["maxelem"] == "1048576" and h["timeout"] == "0", h  # timeout support, no default
                # However many entries: one rule in the chain, matching the set.
                assert d.chain_rules(chain, family) == [match_rule(chain, family, target)]
        for family in (4, 6):
            hooks = [r for r in d.rules(family) if r.startswith(("-A INPUT", "-A FORWARD"))]
            assert sorted(hooks[:3]) == ["-A INPUT -j admin-list", "-A INPUT -j f2b-ssh", "-A INPUT -j f2b-web"]
            assert "-A FORWARD -j admin-list" in hooks
        assert set(members(d, "f2b-web")) == {f"203.0.113.{i}/32" for i in range(1, 6)}
        assert set(members(d, "f2b-ssh", 6)) == {f"2001:db8:ffff::{i}/128" for i in range(1, 6)}
        assert members(d, "f2b-web", 6) == {} and members(d, "f2b-ssh", 4) == {}

    check()
    assert d.stop() == 0
    d.start()
    check()  # a restart adds no second rule and loses no entry
    assert d.kernel_entries("f2b-web") == {f"203.0.113.{i}/32" for i in range(1, 6)}
    assert_no_errors(d)


def test_kernel_timeouts_follow_the_api(running: Daemon) -> None:
    d = running
    path = "/chain/f2b-web/ipv4/203.0.113.10"
    assert d.request("PUT", path + "?timeout=600").status == 201
    assert 595 <= members(d, "f2b-web")["203.0.113.10/32"] <= 600
    # A re-PUT replaces the kernel's timeout: longer, then permanent, then timed again.
    assert d.request("PUT", path + "?timeout=7200").status == 200
    assert 7195 <= members(d, "f2b-web")["203.0.113.10/32"] <= 7200
    r = d.request("PUT", path + "?timeout=-1")
    assert r.status == 200 and r.json["expires_at"] is None, r
    assert members(d, "f2b-web")["203.0.113.10/32"] == 0
    assert d.request("PUT", path + "?timeout=300").status == 200
    assert 295 <= members(d, "f2b-web")["203.0.113.10/32"] <= 300
    # A new permanent block has no timeout.
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::10").status == 201
    assert members(d, "f2b-web", 6) == {"2001:db8:ffff::10/128": 0}
    # Just under ipset's cap the kernel keeps the time; above it the entry has none (ipset would clamp
    # it and unblock early), and the worker expires it, at the time the API reports.
    assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.11?timeout={CAP - 100}").status == 201
    assert CAP - 105 <= members(d, "f2b-web")["203.0.113.11/32"] <= CAP - 100
    before = time.time()
    r = d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.12?timeout={CAP + 1000}")
    assert r.status == 201, r
    assert before + CAP + 998 <= parse_time(r.json["expires_at"]) <= time.time() + CAP + 1002
    assert members(d, "f2b-web")["203.0.113.12/32"] == 0
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.12").json["expires_at"] == r.json["expires_at"]
    # A bulk load takes its timeout into the kernel too.
    items = [f"203.0.113.{i}" for i in range(100, 140)]
    r = post(d, "admin-list", items, "?timeout=900")
    assert r.status == 200 and r.json["created"] == 40, r
    timeouts = members(d, "admin-list")
    assert set(timeouts) == {f"{i}/32" for i in items}
    assert all(890 <= t <= 900 for t in timeouts.values()), timeouts
    assert_no_errors(d)


def test_kernel_expiry_then_the_workers_own_is_no_error(running: Daemon) -> None:
    d = running
    t0 = time.monotonic()
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.30?timeout=2").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::30?timeout=2").status == 201
    assert 1 <= members(d, "f2b-web")["203.0.113.30/32"] <= 2
    # The kernel gets there first for this one (as it may for any): the worker's removal finds nothing.
    d.ns.run(["ipset", "del", "f2b-web-v6", "2001:db8:ffff::30"])
    assert wait_until(lambda: members(d, "f2b-web") == {} and listed(d, "f2b-web") == {}, t0 + 4 - time.monotonic())
    assert members(d, "f2b-web", 6) == {}
    log = d.log()
    for network in ("203.0.113.30/32", "2001:db8:ffff::30/128"):
        assert re.search(rf"action=expire chain=f2b-web network={re.escape(network)} .*result=deleted", log), log
    assert_no_errors(d)
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::30").status == 201  # and all is well


def assert_bulk_refused(r: Reply, status: int) -> None:
    """A bulk POST of one batch that the worker refused: the error, and nothing applied (docs/api.md, Bulk)."""
    assert r.status == status, r
    assert (r.json["error"], r.json["created"], r.json["existing"], r.json["applied_through"]) == (
        "firewall_full", 0, 0, -1), r.json


def test_full_set_is_507_and_nothing_changes(daemon: Daemon) -> None:
    d = daemon
    d.config["chains"]["f2b-web"]["maxelem"] = 4
    d.start()
    assert header(d, "f2b-web")["maxelem"] == "4"
    for i in range(4):
        assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{40 + i}?timeout=600").status == 201
    assert_json_error(d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.44"), 507)
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.44").status == 404
    four = {f"203.0.113.{40 + i}/32" for i in range(4)}
    assert set(listed(d, "f2b-web")) == four and set(members(d, "f2b-web")) == four
    # A bulk load that does not fit fails whole.
    r = post(d, "f2b-web", [f"198.51.100.{i}" for i in range(40)])
    assert_bulk_refused(r, 507)
    assert set(listed(d, "f2b-web")) == four and set(members(d, "f2b-web")) == four
    # Refreshing an entry adds nothing, so it still works; the IPv6 set has room of its own.
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.40?timeout=900").status == 200
    assert 890 <= members(d, "f2b-web")["203.0.113.40/32"] <= 900
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::40").status == 201
    # Concurrent blocks into the last free places: each is either acknowledged and in the kernel,
    # or 507 and nowhere; none is dropped silently.
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.41").status == 200
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.42").status == 200
    replies: dict[str, int] = {}

    def block(i: int) -> None:
        replies[f"203.0.113.{50 + i}/32"] = d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{50 + i}").status

    threads = [threading.Thread(target=block, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert set(replies.values()) <= {201, 507} and 507 in replies.values(), replies
    acked = {n for n, status in replies.items() if status == 201}
    assert 1 <= len(acked) <= 2, replies
    expected = {"203.0.113.40/32", "203.0.113.43/32"} | acked
    assert set(listed(d, "f2b-web")) - {"2001:db8:ffff::40/128"} == expected
    assert set(members(d, "f2b-web")) == expected
    # Raising maxelem (a reload) rebuilds the set with its entries and their timeouts; it then has room.
    d.config["chains"]["f2b-web"]["maxelem"] = 8
    d.reload()
    assert header(d, "f2b-web")["maxelem"] == "8" and header(d, "f2b-web", 6)["maxelem"] == "8"
    assert set(members(d, "f2b-web")) == expected
    assert 880 <= members(d, "f2b-web")["203.0.113.40/32"] <= 900
    assert d.chain_rules("f2b-web") == [match_rule("f2b-web", 4, "DROP")]
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.44").status == 201
    # Lowering it below what the set holds keeps the set as it is (with a warning).
    d.config["chains"]["f2b-web"]["maxelem"] = 2
    d.reload()
    assert header(d, "f2b-web")["maxelem"] == "8"
    assert set(members(d, "f2b-web")) == expected | {"203.0.113.44/32"}
    assert "Traceback" not in d.log() + d.stderr()  # a full set is an error, not a crash
    assert d.proc is not None and d.proc.poll() is None


def test_reconcile_after_a_flush_a_lost_rule_and_a_restart(running: Daemon) -> None:
    d = running
    bulk = [f"203.0.113.{i}" for i in range(60, 100)]  # enough for the bulk (ipset restore) path
    assert post(d, "f2b-web", bulk, "?timeout=900").json["created"] == 40
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff:60::/64").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.61?timeout=600").status == 201
    want_web = {f"{a}/32" for a in bulk}
    # A flush behind the daemon's back; a reload reconciles.
    d.ns.run(["ipset", "flush"])
    assert members(d, "f2b-web") == {}
    d.reload()
    assert set(members(d, "f2b-web")) == want_web
    assert all(880 <= t <= 900 for t in members(d, "f2b-web").values())
    assert members(d, "f2b-web", 6) == {"2001:db8:ffff:60::/64": 0}
    assert 590 <= members(d, "f2b-ssh")["203.0.113.61/32"] <= 600
    # Down: the sets flushed, one chain emptied of its rule and its sets destroyed; the start puts all back.
    assert d.stop() == 0
    d.ns.run(["ipset", "flush"])
    for family, tool in ((4, "iptables-legacy"), (6, "ip6tables-legacy")):
        d.ns.run([tool, "-F", "f2b-ssh"])
        d.ns.run(["ipset", "destroy", f"f2b-ssh-v{family}"])
    d.start()
    assert set(members(d, "f2b-web")) == want_web and members(d, "f2b-web", 6) == {"2001:db8:ffff:60::/64": 0}
    assert 580 <= members(d, "f2b-ssh")["203.0.113.61/32"] <= 600
    for family in (4, 6):
        assert d.chain_rules("f2b-ssh", family) == [match_rule("f2b-ssh", family, "REJECT")]
    assert set(listed(d, "f2b-web")) == want_web | {"2001:db8:ffff:60::/64"}
    assert re.search(r"reconciled 42 blocks: 42 re-added", d.log()), d.log()[-2000:]
    assert_no_errors(d)


def test_a_new_target_replaces_the_match_rule_and_keeps_the_entries(running: Daemon) -> None:
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.90?timeout=600").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::90").status == 201
    d.config["chains"]["f2b-web"]["target"] = "REJECT"
    d.reload()
    for family in (4, 6):
        assert d.chain_rules("f2b-web", family) == [match_rule("f2b-web", family, "REJECT")]
    assert 590 <= members(d, "f2b-web")["203.0.113.90/32"] <= 600
    assert members(d, "f2b-web", 6) == {"2001:db8:ffff::90/128": 0}
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.91")
    assert r.status == 201 and r.json["target"] == "REJECT", r
    # The entries from before the reload say what the kernel does with them now, in the API and the store.
    assert {n: e["target"] for n, e in listed(d, "f2b-web").items()} == {
        "203.0.113.90/32": "REJECT", "203.0.113.91/32": "REJECT", "2001:db8:ffff::90/128": "REJECT"}
    assert d.stop() == 0
    d.start()
    assert set(members(d, "f2b-web")) == {"203.0.113.90/32", "203.0.113.91/32"}
    assert d.chain_rules("f2b-web") == [match_rule("f2b-web", 4, "REJECT")]
    assert {e["target"] for e in listed(d, "f2b-web").values()} == {"REJECT"}
    assert_no_errors(d)


def test_simulated_reboot_restores_the_sets(daemon: Daemon, user_hashes: dict[str, str]) -> None:
    d = daemon
    d.config["chains"]["admin-list"]["maxelem"] = 1000
    d.start()
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.70?timeout=3600").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::70").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.128/25").status == 201
    before = {c: listed(d, c) for c in CHAINS}
    assert d.stop() == 0
    with NetNS.create() as fresh:
        rebooted = Daemon(fresh, d.workdir, d.pki, user_hashes, "ipset")
        rebooted.config = d.config
        rebooted.notify_path = d.workdir / "notify-reboot.sock"
        try:
            rebooted.start()
            assert 3590 <= members(rebooted, "f2b-web")["203.0.113.70/32"] <= 3600
            assert members(rebooted, "f2b-web", 6) == {"2001:db8:ffff::70/128": 0}
            assert members(rebooted, "admin-list") == {"203.0.113.128/25": 0}
            assert header(rebooted, "admin-list")["maxelem"] == "1000"
            for chain, target in CHAINS.items():
                for family in (4, 6):
                    assert rebooted.chain_rules(chain, family) == [match_rule(chain, family, target)]
            assert {c: listed(rebooted, c) for c in CHAINS} == before
        finally:
            rebooted.close()


def test_moving_a_chain_from_the_iptables_backend(daemon: Daemon) -> None:
    d = daemon
    for chain in d.config["chains"].values():
        chain["backend"] = "iptables"
    d.start()
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.80?timeout=3").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.81", user="f2b").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff:80::/64").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.82").status == 201
    # A rule of the same shape that someone else added; and a foreign one, which stays where it is.
    d.ns.run(["iptables-legacy", "-A", "f2b-web", "-s", "203.0.113.83", "-j", "DROP"])
    d.ns.run(["iptables-legacy", "-A", "f2b-web", "-p", "tcp", "--dport", "25", "-j", "DROP"])
    before = listed(d, "f2b-web")
    assert d.stop() == 0
    for chain in d.config["chains"].values():
        chain["backend"] = "ipset"
    d.start()
    assert d.chain_rules("f2b-web") == ["-A f2b-web -p tcp -m tcp --dport 25 -j DROP",
                                        match_rule("f2b-web", 4, "DROP")]
    assert d.chain_rules("f2b-web", 6) == [match_rule("f2b-web", 6, "DROP")]
    assert d.chain_rules("f2b-ssh") == [match_rule("f2b-ssh", 4, "REJECT")]
    # Every entry moved into the sets, without a kernel timeout; the API keeps what it knew.
    assert members(d, "f2b-web") == {"203.0.113.80/32": 0, "203.0.113.81/32": 0, "203.0.113.83/32": 0}
    assert members(d, "f2b-web", 6) == {"2001:db8:ffff:80::/64": 0}
    assert members(d, "f2b-ssh") == {"203.0.113.82/32": 0}
    after = listed(d, "f2b-web")
    assert {n: after[n] for n in before} == before
    assert after["203.0.113.83/32"]["created_by"] == "adopted"
    # An unblock unblocks (no per-address rule is left behind it); the timed entry expires on the worker's clock.
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.81", user="f2b").json["deleted"] is True  # its claim
    assert "203.0.113.81/32" not in members(d, "f2b-web")
    assert wait_until(lambda: "203.0.113.80/32" not in members(d, "f2b-web"), 4)
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.80").status == 404
    assert not any(" -s " in rule for rule in d.rules(4) + d.rules(6))
    assert_no_errors(d)


def test_a_destination_chain_moves_from_the_iptables_backend_with_its_match(daemon: Daemon) -> None:
    d = daemon
    d.config["chains"]["egress"] = {"hooks": ["OUTPUT"], "target": "REJECT", "match": "destination",
                                    "backend": "iptables"}
    d.start()
    assert d.request("PUT", "/chain/egress/ipv4/203.0.113.80").status == 201
    assert d.request("PUT", "/chain/egress/ipv6/2001:db8:ffff:80::/64").status == 201
    assert d.chain_rules("egress") == ["-A egress -d 203.0.113.80/32 -j REJECT --reject-with icmp-port-unreachable"]
    assert d.stop() == 0
    d.config["chains"]["egress"]["backend"] = "ipset"
    d.start()
    for family in (4, 6):
        assert d.chain_rules("egress", family) == [
            f"-A egress -m set --match-set egress-v{family} dst -j REJECT --reject-with {REJECT_WITH[family]}"]
    assert members(d, "egress") == {"203.0.113.80/32": 0}
    assert members(d, "egress", 6) == {"2001:db8:ffff:80::/64": 0}
    assert set(listed(d, "egress")) == {"203.0.113.80/32", "2001:db8:ffff:80::/64"}
    assert_no_errors(d)


def test_a_foreign_set_of_our_name_stops_the_start_and_is_left_alone(daemon: Daemon) -> None:
    d = daemon
    d.ns.run(["ipset", "create", "f2b-web-v4", "hash:ip"])
    d.ns.run(["ipset", "add", "f2b-web-v4", "203.0.113.120"])
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(30) != 0
    assert "ipset f2b-web-v4 exists as hash:ip" in d.log()
    assert header(d, "f2b-web")["type"] == "hash:ip" and set(members(d, "f2b-web")) == {"203.0.113.120/32"}


def test_ipset_and_iptables_chains_side_by_side(daemon: Daemon) -> None:
    d = daemon
    d.config["chains"]["f2b-ssh"]["backend"] = "iptables"
    d.start()
    for chain in ("f2b-web", "f2b-ssh"):
        assert d.request("PUT", f"/chain/{chain}/ipv4/203.0.113.110?timeout=600").status == 201
        assert d.request("PUT", f"/chain/{chain}/ipv6/2001:db8:ffff::110").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv6/2001:db8:ffff::110").status == 200
    assert d.stop() == 0
    d.start()
    assert d.chain_rules("f2b-web") == [match_rule("f2b-web", 4, "DROP")]
    assert d.chain_rules("f2b-ssh") == [
        "-A f2b-ssh -s 203.0.113.110/32 -j REJECT --reject-with icmp-port-unreachable"]
    assert d.kernel_entries("f2b-ssh", 6) == {"2001:db8:ffff::110/128"}
    assert set(members(d, "f2b-web")) == {"203.0.113.110/32"} and members(d, "f2b-web", 6) == {}
    assert "f2b-ssh" not in d.ns.run(["ipset", "list", "-n"]).stdout  # an iptables chain has no set
    assert_no_errors(d)


def test_a_peer_is_dropped_while_in_the_set(daemon: Daemon) -> None:
    peer = NetNS.create()
    try:
        veth_pair(daemon.ns, peer)
        daemon.start()
        server = daemon.ns.socket()
        server.bind(("198.51.100.1", 9099))
        server.listen(8)

        def reaches() -> bool:
            try:
                peer.connect("198.51.100.1", 9099, timeout=0.5).close()
                return True
            except TimeoutError:
                return False

        assert reaches()
        assert daemon.request("PUT", "/chain/f2b-web/ipv4/198.51.100.2?timeout=600").status == 201
        assert not reaches()
        assert daemon.request("DELETE", "/chain/f2b-web/ipv4/198.51.100.2").status == 200
        assert reaches()
        # The kernel's timeout alone unblocks too (the worker's clock is far away at 600 s).
        assert daemon.request("PUT", "/chain/admin-list/ipv4/198.51.100.0/30?timeout=600").status == 201
        assert not reaches()
        daemon.ns.run(["ipset", "-exist", "add", "admin-list-v4", "198.51.100.0/30", "timeout", "1"])
        assert wait_until(reaches, 4, step=0.2)
        server.close()
    finally:
        peer.close()


def test_an_entry_the_daemon_did_not_know_takes_the_new_timeout(running: Daemon) -> None:
    d = running
    # Someone else put it in the set: the worker sees a new block, the kernel an entry it has.
    d.ns.run(["ipset", "add", "f2b-web-v4", "203.0.113.7", "timeout", "50"])
    d.ns.run(["ipset", "add", "f2b-web-v6", "2001:db8:ffff:7::/64", "timeout", "50"])
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.7?timeout=900").status == 201
    assert 895 <= members(d, "f2b-web")["203.0.113.7/32"] <= 900
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff:7::/64").status == 201
    assert members(d, "f2b-web", 6) == {"2001:db8:ffff:7::/64": 0}
    assert_no_errors(d)


def test_a_bulk_load_that_overflows_one_family_leaves_neither_behind(daemon: Daemon) -> None:
    d = daemon
    d.config["chains"]["f2b-web"]["maxelem"] = 4
    d.start()
    for i in range(2):
        assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{i}?timeout=600").status == 201
    items = [f"2001:db8:ffff::{i}" for i in range(1, 4)] + [f"203.0.113.{i}" for i in range(10, 13)]
    assert_bulk_refused(post(d, "f2b-web", items), 507)
    assert set(members(d, "f2b-web")) == {"203.0.113.0/32", "203.0.113.1/32"}
    assert all(590 <= t <= 600 for t in members(d, "f2b-web").values())
    assert members(d, "f2b-web", 6) == {}
    assert set(listed(d, "f2b-web")) == {"203.0.113.0/32", "203.0.113.1/32"}
    assert d.proc is not None and d.proc.poll() is None


# -- the backend on its own, in a namespace ----------------------------------------------------------

NET = ipaddress.ip_network


class Direct:
    """An IpsetBackend in `ns`; every call runs in a thread that joined the namespace."""

    def __init__(self, ns: NetNS, lock_path: Path, chains: list[Chain]):
        self.ns = ns
        self.chains = {c.name: c for c in chains}
        self.backend = ns.call(lambda: IpsetBackend(str(lock_path)))
        self.call(lambda: self.backend.prepare(chains))

    def call(self, fn: Callable[[], T]) -> T:
        return self.ns.call(fn)

    def apply(self, ops: list[Op]) -> None:
        self.call(lambda: self.backend.apply(ops, self.chains))

    def members(self, name: str) -> dict[str, int]:
        return set_members(self.ns, name)

    def add(self, name: str, entry: str, timeout: int = 0) -> None:
        self.ns.run(["ipset", "add", name, entry, "timeout", str(timeout)])


@pytest.fixture
def direct(ns: NetNS, workdir: Path) -> Iterator[Direct]:
    chains = [Chain("f2b-direct", ("INPUT",), "DROP", backend="ipset", maxelem=65536),
              Chain("small", ("INPUT",), "REJECT", backend="ipset", maxelem=4)]
    d = Direct(ns, workdir / "xtables.lock", chains)  # a private lock file: never the host's
    try:
        yield d
    finally:
        d.call(d.backend.close)


def in_window(value: int, high: int, slack: int = 5) -> bool:
    return high - slack <= value <= high


def test_ipv6_entries_of_every_prefix_length(direct: Direct) -> None:
    now = time.time()
    direct.apply([Add("f2b-direct", NET("2001:db8:ffff::1/128"), "DROP", now + 600),
                  Add("f2b-direct", NET("2001:db8:ffff:1::/64"), "DROP"),
                  Add("f2b-direct", NET("2001:db8:ffff::/48"), "DROP", now + 60),
                  Add("f2b-direct", NET("203.0.113.0/24"), "DROP")])
    v6 = direct.members("f2b-direct-v6")
    assert set(v6) == {"2001:db8:ffff::1/128", "2001:db8:ffff:1::/64", "2001:db8:ffff::/48"}, v6
    assert in_window(v6["2001:db8:ffff::1/128"], 600) and v6["2001:db8:ffff:1::/64"] == 0
    assert in_window(v6["2001:db8:ffff::/48"], 60)
    assert direct.members("f2b-direct-v4") == {"203.0.113.0/24": 0}
    # A Remove of an absent entry is no error; the others go.
    direct.apply([Remove("f2b-direct", NET("2001:db8:ffff:1::/64"), "DROP"),
                  Remove("f2b-direct", NET("2001:db8:ffff::1/128"), "DROP"),
                  Remove("f2b-direct", NET("2001:db8:ffff:2::/64"), "DROP")])
    assert set(direct.members("f2b-direct-v6")) == {"2001:db8:ffff::/48"}
    found = direct.call(lambda: dict(direct.backend.read(["f2b-direct"])))
    assert found == {("f2b-direct", NET("2001:db8:ffff::/48"), None): "DROP",
                     ("f2b-direct", NET("203.0.113.0/24"), None): "DROP"}


def test_a_batch_mixing_adds_and_deletes(direct: Direct) -> None:
    direct.add("f2b-direct-v4", "203.0.113.1", 100)
    direct.add("f2b-direct-v4", "203.0.113.2", 100)
    direct.add("f2b-direct-v6", "2001:db8:ffff::3")
    now = time.time()
    direct.apply([Add("f2b-direct", NET("203.0.113.10/32"), "DROP", now + 600),
                  Remove("f2b-direct", NET("203.0.113.1/32"), "DROP"),
                  Add("f2b-direct", NET("203.0.113.2/32"), "DROP", now + 900),  # present: a refresh
                  Remove("f2b-direct", NET("203.0.113.99/32"), "DROP"),  # absent: nothing to do
                  Add("f2b-direct", NET("2001:db8:ffff::10/128"), "DROP"),
                  Remove("f2b-direct", NET("2001:db8:ffff::3/128"), "DROP"),
                  Add("f2b-direct", NET("203.0.113.64/26"), "DROP", now + 300)])
    v4 = direct.members("f2b-direct-v4")
    assert set(v4) == {"203.0.113.10/32", "203.0.113.2/32", "203.0.113.64/26"}, v4
    assert in_window(v4["203.0.113.10/32"], 600) and in_window(v4["203.0.113.2/32"], 900)
    assert in_window(v4["203.0.113.64/26"], 300)
    assert direct.members("f2b-direct-v6") == {"2001:db8:ffff::10/128": 0}
    # The same entry twice in one batch: added, removed, added again, in that order.
    network = NET("203.0.113.20/32")
    direct.apply([Add("f2b-direct", network, "DROP"), Remove("f2b-direct", network, "DROP"),
                  Add("f2b-direct", network, "DROP", now + 100), Remove("f2b-direct", NET("203.0.113.10/32"), "DROP")])
    v4 = direct.members("f2b-direct-v4")
    assert set(v4) == {"203.0.113.20/32", "203.0.113.2/32", "203.0.113.64/26"} and in_window(v4[str(network)], 100)


def test_a_full_set_fails_the_batch_and_leaves_nothing_behind(direct: Direct) -> None:
    direct.add("small-v4", "203.0.113.1", 500)
    direct.add("small-v4", "203.0.113.2", 500)
    direct.add("small-v6", "2001:db8:ffff::1")
    before4, before6 = set(direct.members("small-v4")), direct.members("small-v6")
    now = time.time()
    ops: list[Op] = [Add("small", NET("2001:db8:ffff::2/128"), "REJECT", now + 600),
                     Remove("small", NET("203.0.113.1/32"), "REJECT"),
                     Remove("small", NET("2001:db8:ffff::1/128"), "REJECT")]
    ops += [Add("small", NET(f"203.0.113.{i}/32"), "REJECT", now + 600) for i in range(10, 14)]  # one too many
    ops += [Add("small", NET("203.0.113.2/32"), "REJECT", now + 900)]
    with pytest.raises(CapacityExceeded, match="small-v4"):
        direct.apply(ops)
    # As it was: the removed entries are back (without their kernel timeout: the worker keeps the time),
    # and the refresh never happened.
    after4 = direct.members("small-v4")
    assert set(after4) == set(before4) and after4["203.0.113.1/32"] == 0 and in_window(after4["203.0.113.2/32"], 500)
    assert direct.members("small-v6") == before6 == {"2001:db8:ffff::1/128": 0}
    # A batch that fits still goes through, up to the last place.
    direct.apply(ops[:1] + ops[3:5])
    assert len(direct.members("small-v4")) == 4 and len(direct.members("small-v6")) == 2


def test_a_failure_in_the_middle_of_a_batch_is_undone_exactly(direct: Direct) -> None:
    direct.add("f2b-direct-v4", "203.0.113.1", 500)
    direct.add("f2b-direct-v4", "203.0.113.2", 500)
    direct.add("f2b-direct-v6", "2001:db8:ffff::1", 500)
    now = time.time()
    first = [Add("f2b-direct", NET(ipaddress.ip_address("198.18.0.0") + i), "DROP", now + 600)
             for i in range(SEND_MAX + 50)]  # more than one send
    # A chain that left the config, and whose sets are gone: not ours to make again, so its add fails.
    failing = Add("gone", NET("203.0.113.50/32"), "DROP", now + 600)
    then = [Add("f2b-direct", NET(ipaddress.ip_address("198.18.16.0") + i), "DROP") for i in range(SEND_MAX)]
    ops: list[Op] = [*first, Remove("f2b-direct", NET("203.0.113.1/32"), "DROP"),
                     Add("f2b-direct", NET("203.0.113.2/32"), "DROP", now + 900),
                     Remove("f2b-direct", NET("2001:db8:ffff::1/128"), "DROP"),
                     failing, *then, Add("f2b-direct", NET("2001:db8:ffff::2/128"), "DROP")]
    with pytest.raises(IpsetError) as raised:
        direct.apply(ops)
    assert "gone-v4" in str(raised.value) and "203.0.113.50/32" in str(raised.value), raised.value
    assert "ENOENT" in str(raised.value)
    # Every change before and after the failure is undone. The removed entries are back, without a kernel
    # timeout (their old one is not known; the worker's expiry keeps their time); the refresh never happened.
    v4 = direct.members("f2b-direct-v4")
    assert set(v4) == {"203.0.113.1/32", "203.0.113.2/32"} and v4["203.0.113.1/32"] == 0, v4
    assert in_window(v4["203.0.113.2/32"], 500)
    assert direct.members("f2b-direct-v6") == {"2001:db8:ffff::1/128": 0}


def test_a_lost_set_and_match_rule_are_made_again_once(direct: Direct) -> None:
    direct.apply([Add("f2b-direct", NET("203.0.113.1/32"), "DROP")])
    rule = "-A f2b-direct -m set --match-set f2b-direct-v4 src -j DROP"
    assert rule in direct.ns.run(["iptables-legacy", "-w", "-S", "f2b-direct"]).stdout
    # Behind the backend's back: the rule goes, then the set (a set in use by a rule cannot be destroyed).
    direct.ns.run(["iptables-legacy", "-w", "-F", "f2b-direct"])
    direct.ns.run(["ipset", "destroy", "f2b-direct-v4"])
    now = time.time()
    direct.apply([Add("f2b-direct", NET("203.0.113.2/32"), "DROP", now + 600),
                  Add("f2b-direct", NET("2001:db8:ffff::2/128"), "DROP")])
    v4 = direct.members("f2b-direct-v4")
    assert set(v4) == {"203.0.113.2/32"} and in_window(v4["203.0.113.2/32"], 600)
    assert direct.members("f2b-direct-v6") == {"2001:db8:ffff::2/128": 0}
    assert rule in direct.ns.run(["iptables-legacy", "-w", "-S", "f2b-direct"]).stdout
    # A chain not in the config has no set made for it: the batch fails and is undone.
    with pytest.raises(IpsetError, match="gone-v6"):
        direct.apply([Add("f2b-direct", NET("203.0.113.3/32"), "DROP"),
                      Add("gone", NET("2001:db8:ffff::4/128"), "DROP")])
    assert set(direct.members("f2b-direct-v4")) == {"203.0.113.2/32"}


def test_big_batches_go_through_ipset_restore_with_the_same_result(direct: Direct) -> None:
    now = time.time()
    base = ipaddress.ip_address("198.18.0.0")
    adds: list[Op] = [Add("f2b-direct", NET(base + i), "DROP", now + 600) for i in range(ipset_backend.BULK_MIN)]
    direct.apply(adds)
    v4 = direct.members("f2b-direct-v4")
    assert len(v4) == ipset_backend.BULK_MIN and all(in_window(t, 600) for t in v4.values())
    # Half removed, the other half refreshed, and some new ones: one restore again.
    half = ipset_backend.BULK_MIN // 2
    mixed: list[Op] = [Remove("f2b-direct", NET(base + i), "DROP") for i in range(half)]
    mixed += [Add("f2b-direct", NET(base + i), "DROP") for i in range(half, 2 * half)]
    mixed += [Add("f2b-direct", NET("2001:db8:ffff::1/128"), "DROP", now + 300)]
    direct.apply(mixed)
    v4 = direct.members("f2b-direct-v4")
    assert set(v4) == {f"{base + i}/32" for i in range(half, 2 * half)} and set(v4.values()) == {0}
    v6 = direct.members("f2b-direct-v6")
    assert set(v6) == {"2001:db8:ffff::1/128"} and in_window(v6["2001:db8:ffff::1/128"], 300)


def test_a_big_batch_that_does_not_fit_fails_whole(direct: Direct) -> None:
    direct.add("small-v4", "203.0.113.1", 500)
    base = ipaddress.ip_address("198.18.0.0")
    ops: list[Op] = [Remove("small", NET("203.0.113.1/32"), "REJECT")]
    ops += [Add("small", NET(base + i), "REJECT") for i in range(ipset_backend.BULK_MIN)]
    with pytest.raises(CapacityExceeded):
        direct.apply(ops)
    assert direct.members("small-v4") == {"203.0.113.1/32": 0}
