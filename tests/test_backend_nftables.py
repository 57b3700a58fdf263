"""The nftables backend against the real daemon in a private namespace: its table, sets and hook chains,
kernel timeouts, overlapping networks, maxelem, adoption, reconcile, and nothing outside `inet web-ipt-d`.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.netns import NetNS

pytestmark = pytest.mark.backends("nftables")

TABLE = ("inet", "web-ipt-d")


def nft(d: Daemon | NetNS, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ns = d.ns if isinstance(d, Daemon) else d
    return ns.run(["nft", *args], check=check)


def nft_json(d: Daemon | NetNS, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(nft(d, "-j", *args).stdout)["nftables"])


def layout(d: Daemon) -> dict[str, dict[str, Any]]:
    """Our table without elements or handles: {'set': {name: body}, 'chain': {...}, 'rule': {chain: [expr]}}."""
    found: dict[str, dict[str, Any]] = {"set": {}, "chain": {}, "rule": {}}
    for item in nft_json(d, "-t", "list", "table", *TABLE):
        for kind in ("set", "chain"):
            if kind in item:
                body = {k: v for k, v in item[kind].items() if k != "handle"}
                found[kind][body["name"]] = body
        if "rule" in item:
            found["rule"].setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
    return found


def rules_text(d: Daemon, chain: str) -> list[str]:
    """The rules of one chain of our table as `nft list` prints them, one per line."""
    out = nft(d, "list", "chain", *TABLE, chain).stdout
    body = out.split("{", 2)[2].rsplit("}", 2)[0]
    return [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("type ")]


def elements(d: Daemon | NetNS, set_name: str) -> dict[str, dict[str, Any]]:
    """value -> {'timeout': s, 'expires': s} (empty for a permanent element)."""
    found = {}
    for item in nft_json(d, "list", "set", *TABLE, set_name):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict):
                found[str(elem["elem"]["val"])] = {k: v for k, v in elem["elem"].items() if k != "val"}
            else:
                found[str(elem)] = {}
    return found


def ruleset_without_ours(d: Daemon | NetNS) -> list[dict[str, Any]]:
    """The whole nft ruleset minus table inet web-ipt-d, without handles."""
    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if k != "handle"}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj
    kept = []
    for item in nft_json(d, "list", "ruleset"):
        kind = next(iter(item))
        body = item[kind]
        if kind == "metainfo":
            continue
        ours = body.get("family") == "inet" and (body.get("table") == "web-ipt-d" or
                                                 (kind == "table" and body.get("name") == "web-ipt-d"))
        if not ours:
            kept.append(clean(item))
    return kept


def legacy_rules(saved: str) -> list[str]:
    """iptables-legacy-save output without comments and packet counters."""
    return [re.sub(r" \[\d+:\d+\]$", "", line) for line in saved.splitlines() if not line.startswith("#")]


def restart(d: Daemon) -> None:
    assert d.stop() == 0, d.stderr()
    d.start()


def listed(d: Daemon, chain: str) -> dict[str, dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return {e["network"]: e for e in r.json["entries"]}


@pytest.mark.root
def test_table_sets_rules_and_hook_chains(daemon):
    d = daemon
    d.config["chains"]["f2b-web"].update(priority=-20, maxelem=5000)
    d.config["chains"]["f2b-ssh"]["hooks"] = ["INPUT", "OUTPUT"]
    d.start()
    got = layout(d)
    for chain in ("f2b-web", "f2b-ssh", "admin-list"):
        size = 5000 if chain == "f2b-web" else 1_048_576
        assert got["set"][f"{chain}-v4"] == {"family": "inet", "name": f"{chain}-v4", "table": "web-ipt-d",
                                            "type": "ipv4_addr", "size": size, "flags": ["timeout"]}
        assert got["set"][f"{chain}-v6"]["type"] == "ipv6_addr"
        assert got["set"][f"{chain}-v6"]["size"] == size
    assert set(got["set"]) == {f"{c}-v{f}" for c in ("f2b-web", "f2b-ssh", "admin-list") for f in (4, 6)}
    base = {name: (body["type"], body["hook"], body["prio"], body["policy"])
            for name, body in got["chain"].items() if "hook" in body}
    # One base chain per hook and priority, with the jumps of every chain there in config order (the harness
    # writes the config with its keys sorted).
    assert base == {
        "input.-20": ("filter", "input", -20, "accept"),
        "input.-10": ("filter", "input", -10, "accept"),
        "output.-10": ("filter", "output", -10, "accept"),
        "forward.-10": ("filter", "forward", -10, "accept"),
    }
    jumps = {"input.-20": ["f2b-web"], "input.-10": ["admin-list", "f2b-ssh"], "output.-10": ["f2b-ssh"],
             "forward.-10": ["admin-list"]}
    for name, targets in jumps.items():
        assert got["rule"][name] == [[{"jump": {"target": target}}] for target in targets]
    assert rules_text(d, "f2b-web") == ["ip saddr @f2b-web-v4 drop", "ip6 saddr @f2b-web-v6 drop"]
    assert rules_text(d, "f2b-ssh") == ["ip saddr @f2b-ssh-v4 reject with icmp port-unreachable",
                                        "ip6 saddr @f2b-ssh-v6 reject with icmpv6 port-unreachable"]
    assert got["rule"]["f2b-ssh"][0][1] == {"reject": {"type": "icmp", "expr": "port-unreachable"}}
    assert got["rule"]["f2b-ssh"][1][1] == {"reject": {"type": "icmpv6", "expr": "port-unreachable"}}

    # A network gets the set of its prefix length, and one rule that masks the source to look it up.
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.0/24").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::/48").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.7").status == 201
    assert rules_text(d, "f2b-web") == [
        "ip saddr & 255.255.255.0 == @f2b-web-v4-24 drop", "ip saddr @f2b-web-v4 drop",
        "ip6 saddr & ffff:ffff:ffff:: == @f2b-web-v6-48 drop", "ip6 saddr @f2b-web-v6 drop"]
    assert layout(d)["set"]["f2b-web-v4-24"]["size"] == 5000
    assert elements(d, "f2b-web-v4-24") == {"203.0.113.0": {}}
    assert elements(d, "f2b-web-v6-48") == {"2001:db8:ffff::": {}}
    assert d.kernel_entries("f2b-web") == {"203.0.113.0/24", "203.0.113.7/32"}
    assert d.kernel_entries("f2b-web", 6) == {"2001:db8:ffff::/48"}
    r = d.request("GET", "/chains")
    assert {c["name"]: (c["target"], tuple(c["hooks"])) for c in r.json["chains"]} == {
        "f2b-web": ("DROP", ("INPUT",)), "f2b-ssh": ("REJECT", ("INPUT", "OUTPUT")),
        "admin-list": ("DROP", ("INPUT", "FORWARD"))}


@pytest.mark.root
def test_kernel_timeouts_follow_every_put(running):
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.5?timeout=600").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::5?timeout=900").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.6").status == 201
    v4 = elements(d, "f2b-web-v4")
    assert v4["203.0.113.6"] == {}, "a permanent block has no timeout"
    assert v4["203.0.113.5"]["timeout"] == 600 and 590 <= v4["203.0.113.5"]["expires"] <= 600
    assert elements(d, "f2b-web-v6")["2001:db8:ffff::5"]["timeout"] == 900

    # A re-PUT replaces the kernel's timeout: longer, shorter, permanent, and back to a timeout.
    for query, timeout in (("?timeout=3600", 3600), ("?timeout=120", 120), ("", None), ("?timeout=300", 300)):
        r = d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.5{query}")
        assert r.status == 200, r
        got = elements(d, "f2b-web-v4")["203.0.113.5"]
        assert got.get("timeout") == timeout, (query, got)
        assert (r.json["expires_at"] is None) == (timeout is None)
    assert elements(d, "f2b-web-v4")["203.0.113.6"] == {}

    # Gone from the kernel behind the daemon's back (as if it had expired there): a new timeout puts
    # it back, and an unblock of another such entry still succeeds.
    nft(d, "delete", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.5, 203.0.113.6 }")
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.5?timeout=700").status == 200
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.5"}
    assert elements(d, "f2b-web-v4")["203.0.113.5"]["timeout"] == 700
    r = d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.6")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.5"}


@pytest.mark.root
def test_a_short_timeout_expires_in_the_kernel_and_the_api(running):
    d = running
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.9?timeout=1").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.10?timeout=600").status == 201
    assert d.kernel_entries("f2b-ssh") == {"203.0.113.9/32", "203.0.113.10/32"}
    deadline = time.monotonic() + 10
    while d.request("GET", "/chain/f2b-ssh/ipv4/203.0.113.9").status != 404 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.request("GET", "/chain/f2b-ssh/ipv4/203.0.113.9").status == 404
    assert d.kernel_entries("f2b-ssh") == {"203.0.113.10/32"}
    assert re.search(r"action=expire chain=f2b-ssh network=203\.0\.113\.9/32 .*result=deleted", d.log())


@pytest.mark.root
def test_overlapping_network_and_host_are_independent_entries(running):
    d = running
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.0/24?timeout=600").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.7").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.0/25").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv6/2001:db8:ffff::/48").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv6/2001:db8:ffff::/64").status == 201
    assert d.kernel_entries("admin-list") == {"203.0.113.0/24", "203.0.113.0/25", "203.0.113.7/32"}

    r = d.request("DELETE", "/chain/admin-list/ipv4/203.0.113.0/24")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert d.kernel_entries("admin-list") == {"203.0.113.0/25", "203.0.113.7/32"}
    assert d.request("DELETE", "/chain/admin-list/ipv4/203.0.113.0/25").status == 200
    assert d.kernel_entries("admin-list") == {"203.0.113.7/32"}, "the host inside stays blocked"
    assert d.request("DELETE", "/chain/admin-list/ipv4/203.0.113.7").status == 200
    assert d.kernel_entries("admin-list") == set()

    assert d.request("DELETE", "/chain/admin-list/ipv6/2001:db8:ffff::/48").status == 200
    assert d.kernel_entries("admin-list", 6) == {"2001:db8:ffff::/64"}
    assert set(listed(d, "admin-list")) == {"2001:db8:ffff::/64"}


@pytest.mark.root
def test_a_full_set_is_507_and_nothing_changes(daemon):
    d = daemon
    d.config["chains"]["f2b-web"]["maxelem"] = 3
    d.start()
    for i in range(3):
        assert d.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{i}").status == 201
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.3")
    assert r.status == 507, r
    assert d.kernel_entries("f2b-web") == {f"203.0.113.{i}/32" for i in range(3)}
    assert set(listed(d, "f2b-web")) == {f"203.0.113.{i}/32" for i in range(3)}
    # Each prefix length has a set of its own, and the other family too.
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.64/26").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::1").status == 201
    # A full set still takes a new timeout for an entry it holds, and an unblock.
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.0?timeout=600").status == 200
    assert elements(d, "f2b-web-v4")["203.0.113.0"]["timeout"] == 600
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.1").status == 200
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.3").status == 201

    # Full, and an entry of ours is gone from the kernel behind our back: unblocking it still works.
    nft(d, "delete", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.2 }")
    nft(d, "add", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.200 }")
    r = d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.2")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert d.kernel_entries("f2b-web") == {"203.0.113.0/32", "203.0.113.3/32", "203.0.113.200/32",
                                           "203.0.113.64/26"}


@pytest.mark.root
def test_reconcile_after_flush_restart_reload_and_a_deleted_table(running):
    d = running
    for rest in ("ipv4/203.0.113.1?timeout=600", "ipv4/203.0.113.32/27", "ipv6/2001:db8:ffff::9"):
        assert d.request("PUT", f"/chain/f2b-web/{rest}").status == 201
    want4, want6 = {"203.0.113.1/32", "203.0.113.32/27"}, {"2001:db8:ffff::9/128"}

    for name in ("f2b-web-v4", "f2b-web-v4-27", "f2b-web-v6"):
        nft(d, "flush", "set", *TABLE, name)
    assert d.kernel_entries("f2b-web") == set() and d.kernel_entries("f2b-web", 6) == set()
    restart(d)
    assert (d.kernel_entries("f2b-web"), d.kernel_entries("f2b-web", 6)) == (want4, want6)
    assert 590 <= elements(d, "f2b-web-v4")["203.0.113.1"]["timeout"] <= 600, "restored with what is left"
    assert elements(d, "f2b-web-v6")["2001:db8:ffff::9"] == {}

    nft(d, "flush", "set", *TABLE, "f2b-web-v4-27")
    nft(d, "flush", "chain", *TABLE, "f2b-web")
    d.reload()
    assert d.kernel_entries("f2b-web") == want4
    assert len(rules_text(d, "f2b-web")) == 3

    # `nft flush ruleset` (a reload of nftables.service does one) takes our table with it: the next
    # change may fail, and the reconcile after it brings every entry back.
    nft(d, "delete", "table", *TABLE)
    first = d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.77").status
    assert first in (201, 503)
    deadline = time.monotonic() + 10
    while d.kernel_entries("f2b-web") != want4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.77").status == (200 if first == 201 else 201)
    assert (d.kernel_entries("f2b-web"), d.kernel_entries("f2b-web", 6)) == (want4, want6)
    assert d.kernel_entries("f2b-ssh") == {"203.0.113.77/32"}
    assert "input.-10" in layout(d)["chain"]


@pytest.mark.root
def test_reboot_into_a_fresh_namespace_restores_from_the_state_dir(running, pki, user_hashes):
    d = running
    for rest in ("ipv4/203.0.113.1?timeout=600", "ipv4/203.0.113.32/27", "ipv6/2001:db8:ffff::/56"):
        assert d.request("PUT", f"/chain/admin-list/{rest}").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.2?timeout=1").status == 201
    assert d.stop() == 0
    time.sleep(1.5)  # the 1 s block expires while the machine is down
    with NetNS.create() as fresh:
        again = Daemon(fresh, d.workdir, pki, user_hashes, "nftables")
        again.config = d.config
        again.notify_path = d.workdir / "notify2.sock"
        try:
            assert nft(fresh, "list", "ruleset").stdout.strip() == ""
            again.start()
            assert again.kernel_entries("admin-list") == {"203.0.113.1/32", "203.0.113.32/27"}
            assert again.kernel_entries("admin-list", 6) == {"2001:db8:ffff::/56"}
            assert again.kernel_entries("f2b-ssh") == set()
            assert 590 <= elements(again, "admin-list-v4")["203.0.113.1"]["timeout"] <= 600
            assert set(listed(again, "admin-list")) == {"203.0.113.1/32", "203.0.113.32/27", "2001:db8:ffff::/56"}
            assert {n for n, b in layout(again)["chain"].items() if "hook" in b} == {"input.-10", "forward.-10"}
        finally:
            again.close()


@pytest.mark.root
def test_nothing_outside_our_table_is_touched(daemon):
    d = daemon
    d.ns.run(["nft", "-f", "/dev/stdin"], input="""
table inet mine {
    set friends { type ipv4_addr; flags interval; elements = { 203.0.113.0/24 }; }
    chain input { type filter hook input priority 0; policy accept; ip saddr @friends accept; tcp dport 25 drop; }
}
table ip filter {
    chain INPUT { type filter hook input priority 0; policy accept; udp dport 53 accept; }
}
table ip6 web-ipt-d { chain x { counter; }; }
""")
    d.ns.run(["iptables-legacy", "-w", "-A", "INPUT", "-p", "tcp", "--dport", "8443", "-j", "ACCEPT"])
    before = ruleset_without_ours(d)
    legacy_before = [d.ns.iptables_save(f) for f in (4, 6)]

    d.start()
    for rest in ("ipv4/203.0.113.1?timeout=600", "ipv6/2001:db8:ffff::1", "ipv4/203.0.113.0/28"):
        for chain in ("f2b-web", "f2b-ssh", "admin-list"):
            assert d.request("PUT", f"/chain/{chain}/{rest}").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.1").status == 200
    d.config["chains"]["f2b-web"]["priority"] = -5
    d.reload()
    restart(d)
    assert ruleset_without_ours(d) == before
    assert [legacy_rules(d.ns.iptables_save(f)) for f in (4, 6)] == [legacy_rules(t) for t in legacy_before]
    assert layout(d)["chain"]["input.-5"]["prio"] == -5
    assert rules_text(d, "input.-5") == ["jump f2b-web"]


@pytest.mark.root
def test_restart_and_changes_do_not_duplicate_chains_or_rules(running):
    d = running
    for rest in ("f2b-web/ipv4/203.0.113.1", "f2b-ssh/ipv6/2001:db8:ffff::2", "admin-list/ipv4/203.0.113.128/25",
                 "f2b-web/ipv6/2001:db8:ffff::/48?timeout=900"):
        assert d.request("PUT", f"/chain/{rest}").status == 201
    first = layout(d)
    assert len(first["rule"]["admin-list"]) == 3 and len(first["rule"]["f2b-web"]) == 3
    for i in range(5):
        assert d.request("PUT", f"/chain/admin-list/ipv4/203.0.113.{i}").status == 201
    assert layout(d) == first
    for _ in range(2):
        restart(d)
        assert layout(d) == first
    assert rules_text(d, "forward.-10") == ["jump admin-list"]
    assert rules_text(d, "input.-10") == ["jump admin-list", "jump f2b-ssh", "jump f2b-web"]


@pytest.mark.root
def test_hooks_and_priority_follow_a_reload_and_a_deleted_hook_comes_back(running):
    d = running
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.5").status == 201
    d.config["chains"]["admin-list"].update(hooks=["FORWARD", "OUTPUT"], priority=5)
    d.config["chains"]["f2b-mail"] = {"hooks": ["INPUT"], "target": "REJECT", "backend": "nftables"}
    d.reload()
    base = {n: (b["hook"], b["prio"]) for n, b in layout(d)["chain"].items() if "hook" in b}
    assert base == {"input.-10": ("input", -10), "forward.5": ("forward", 5), "output.5": ("output", 5)}
    assert rules_text(d, "input.-10") == ["jump f2b-mail", "jump f2b-ssh", "jump f2b-web"]
    assert d.kernel_entries("admin-list") == {"203.0.113.5/32"}
    r = d.request("PUT", "/chain/f2b-mail/ipv4/203.0.113.3", user="f2b")
    assert r.status == 201 and r.json["target"] == "REJECT", r
    assert d.kernel_entries("f2b-mail") == {"203.0.113.3/32"}

    # Removed behind our back: back with the next change to that chain, without a restart.
    nft(d, "delete", "chain", *TABLE, "input.-10")
    nft(d, "flush", "chain", *TABLE, "f2b-mail")
    assert d.request("PUT", "/chain/f2b-mail/ipv4/203.0.113.4").status == 201
    assert rules_text(d, "input.-10") == ["jump f2b-mail", "jump f2b-ssh", "jump f2b-web"]
    assert rules_text(d, "f2b-mail") == ["ip saddr @f2b-mail-v4 reject with icmp port-unreachable",
                                         "ip6 saddr @f2b-mail-v6 reject with icmpv6 port-unreachable"]


@pytest.mark.root
def test_elements_found_in_our_sets_are_adopted(running):
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.1").status == 201
    assert d.stop() == 0
    nft(d, "add", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.7, 203.0.113.8 }")
    nft(d, "add", "element", *TABLE, "f2b-ssh-v6", "{ 2001:db8:ffff::7 }")
    nft(d, "add", "set", *TABLE, "f2b-web-v4-26", "{ type ipv4_addr; flags timeout; }")
    nft(d, "add", "element", *TABLE, "f2b-web-v4-26", "{ 203.0.113.64, 203.0.113.65 }")  # .65: no /26
    nft(d, "add", "set", *TABLE, "other", "{ type ipv4_addr; }")
    nft(d, "add", "element", *TABLE, "other", "{ 203.0.113.99 }")
    d.start()
    web = listed(d, "f2b-web")
    assert set(web) == {"203.0.113.1/32", "203.0.113.7/32", "203.0.113.8/32", "203.0.113.64/26"}
    assert {web[n]["created_by"] for n in ("203.0.113.7/32", "203.0.113.8/32", "203.0.113.64/26")} == {"adopted"}
    assert web["203.0.113.1/32"]["created_by"] == "admin"
    ssh = listed(d, "f2b-ssh")
    assert set(ssh) == {"2001:db8:ffff::7/128"} and ssh["2001:db8:ffff::7/128"]["target"] == "REJECT"
    assert "ip saddr & 255.255.255.192 == @f2b-web-v4-26 drop" in rules_text(d, "f2b-web")
    # Left alone: an element that is no network of its set's length, and a set that is not ours.
    assert "203.0.113.65" in elements(d, "f2b-web-v4-26")
    assert elements(d, "other") == {"203.0.113.99": {}}

    r = d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.64/26")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert set(elements(d, "f2b-web-v4-26")) == {"203.0.113.65"}
    restart(d)
    assert set(listed(d, "f2b-web")) == {"203.0.113.1/32", "203.0.113.7/32", "203.0.113.8/32"}


def run_cli(*args: str, hide_nftables: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    """web-ipt-d's command line; with hide_nftables, as on a host without python3-nftables."""
    prelude = "import sys; sys.modules['nftables'] = None; " if hide_nftables else "import sys; "
    code = prelude + "from webiptd.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.root
def test_check_config_names_each_chains_backend_and_missing_nftables(daemon):
    d = daemon
    d.config["chains"]["f2b-web"]["backend"] = "iptables"
    d.config["chains"]["f2b-ssh"]["priority"] = 7
    d.write_config()
    result = run_cli("-check_config", "-config", str(d.config_path))
    assert result.returncode == 0, result
    assert "backends iptables, nftables," in result.stdout
    assert "chain f2b-web: backend iptables, target DROP, hooks INPUT\n" in result.stdout
    assert "chain f2b-ssh: backend nftables, target REJECT, hooks INPUT, priority 7\n" in result.stdout

    result = run_cli("-check_config", "-config", str(d.config_path), hide_nftables=True)
    assert result.returncode == 1, result
    assert re.search(r"chains (f2b-ssh, admin-list|admin-list, f2b-ssh) use the nftables backend", result.stderr)
    assert "python3-nftables" in result.stderr and "ln -sfn" in result.stderr
    assert "ok" not in result.stdout

    # The daemon does not start without it, and says why.
    code = "import sys; sys.modules['nftables'] = None; from webiptd.cli import main; sys.exit(main(sys.argv[1:]))"
    d.start(argv=[sys.executable, "-c", code, "-config", str(d.config_path)], wait=False)
    assert d.proc is not None and d.proc.wait(30) != 0
    assert "install python3-nftables" in d.stderr()


def test_venv_link_makes_the_binding_importable(tmp_path: Path):
    """The command of docs/setup.md, in a fresh venv of this Python: the distribution's binding imports and loads."""
    if subprocess.run(["/usr/bin/python3", "-c", "import nftables"], capture_output=True).returncode != 0:
        pytest.skip("the system's python3 has no nftables binding (python3-nftables)")
    from webiptd.firewall.host import VENV_LINK
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(["sh", "-c", VENV_LINK.replace("<venv>", str(venv))], check=True, timeout=60)
    result = subprocess.run([str(venv / "bin" / "python"), "-c", "import nftables; nftables.Nftables()"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_worker_marks_a_new_expiry_as_a_replacement():
    """What lets the backend delete and re-add an element (kernels before 6.10 keep the old timeout on a
    plain add, so this kernel's behaviour alone would not show a missing mark)."""
    from webiptd.commands import Entry
    from webiptd.firewall.worker import kernel_ops

    net = ipaddress.ip_network("203.0.113.1/32")
    old = Entry("f2b-web", net, "DROP", 0.0, 60.0, "admin")
    ops = kernel_ops(old, Entry("f2b-web", net, "DROP", 0.0, 600.0, "admin"), expires_in_kernel=True)
    assert [(type(op).__name__, getattr(op, "replaces", None)) for op in ops] == [("Add", True)]
    assert [getattr(op, "replaces", None) for op in kernel_ops(None, old, expires_in_kernel=True)] == [False]


@pytest.mark.root
def test_kernel_timeouts_count_from_the_clock_the_backend_was_given(ns: NetNS):
    """As the ipset backend does, the nftables backend takes its clock from whoever makes it."""
    from webiptd.config import Chain
    from webiptd.firewall.nftables import NftablesBackend
    from webiptd.firewall.ops import Add

    now = time.time()
    chain = Chain("clocked", ("INPUT",), "DROP", backend="nftables")
    backend = ns.call(lambda: NftablesBackend(clock=lambda: now - 3000))
    try:
        ns.call(lambda: backend.prepare([chain]))
        add = Add("clocked", ipaddress.ip_network("203.0.113.1/32"), "DROP", now)  # due now by the real clock
        ns.call(lambda: backend.apply([add], {chain.name: chain}))
        assert elements(ns, "clocked-v4")["203.0.113.1"]["timeout"] == 3000
    finally:
        ns.call(backend.close)
