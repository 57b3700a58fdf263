"""The firewall side, against the real daemon in a private namespace: chains and hook jumps,
adoption without flushing, foreign rules left alone, reconcile on restart and SIGHUP, concurrency.
Tests marked `backends` run on every backend; the others check iptables' own rule shapes.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import re
import subprocess
import threading
import time
from typing import Any, Callable, Iterable

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.root

MANAGED = ("f2b-web", "f2b-ssh", "admin-list")
HOOKS = {"f2b-web": ("INPUT",), "f2b-ssh": ("INPUT",), "admin-list": ("INPUT", "FORWARD")}
BLOCK_RULE_RE = re.compile(r"^-A (\S+) -s (\S+) -j (DROP|REJECT)(?: --reject-with (\S+))?$")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def ipt(d: Daemon, *args: str, family: int = 4, check: bool = True) -> subprocess.CompletedProcess[str]:
    """iptables-legacy (or ip6tables-legacy) inside the daemon's namespace, taking the xtables lock."""
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    return d.ns.run([tool, "-w", *args], check=check)


def both(d: Daemon, *args: str) -> None:
    for family in (4, 6):
        ipt(d, *args, family=family)


def saved_tables(d: Daemon, family: int) -> dict[str, list[str]]:
    """iptables-legacy-save per table, without comments and packet counters."""
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in d.ns.iptables_save(family).splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line and not line.startswith("#"):
            current.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return tables


def without_managed(tables: dict[str, list[str]], managed: Iterable[str] = MANAGED) -> dict[str, list[str]]:
    def ours(line: str) -> bool:
        return any(line.startswith((f":{c} ", f"-A {c} ")) or line.endswith(f" -j {c}") for c in managed)
    return {name: [line for line in lines if not ours(line)] for name, lines in tables.items()}


def blocks_in(d: Daemon, chain: str) -> collections.Counter[tuple[Net, str]]:
    """(network, target) of every block in `chain`, both families, counted: the rules of our shape
    for iptables; for a set backend, the set's elements, which all get the chain's target."""
    found: collections.Counter[tuple[Net, str]] = collections.Counter()
    settings = d.config["chains"].get(chain, {})
    if settings.get("backend", "iptables") != "iptables":
        for family in (4, 6):
            for net in d.kernel_entries(chain, family):
                found[(ipaddress.ip_network(net), settings.get("target", "DROP"))] += 1
        return found
    for family in (4, 6):
        for rule in d.chain_rules(chain, family):
            m = BLOCK_RULE_RE.match(rule)
            if m:
                found[(ipaddress.ip_network(m.group(2)), m.group(3))] += 1
    return found


def listed(d: Daemon, chain: str) -> dict[Net, dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return {ipaddress.ip_network(e["network"]): e for e in r.json["entries"]}


def path(chain: str, net: Net) -> str:
    family = "ipv4" if net.version == 4 else "ipv6"
    if net.prefixlen == net.max_prefixlen:
        return f"/chain/{chain}/{family}/{net.network_address}"
    return f"/chain/{chain}/{family}/{net.network_address}/{net.prefixlen}"


def flush_kernel(d: Daemon, chain: str) -> None:
    """Empty `chain` in the kernel behind the daemon's back, whatever its backend."""
    if d.backend == "iptables":
        both(d, "-F", chain)
    elif d.backend == "ipset":
        for family in (4, 6):
            d.ns.run(["ipset", "flush", f"{chain}-v{family}"])
    else:
        table = d.ns.run(["nft", "-j", "-t", "list", "table", "inet", "web-ipt-d"]).stdout
        for item in json.loads(table)["nftables"]:
            name = item.get("set", {}).get("name", "")
            if re.fullmatch(re.escape(chain) + r"-v[46](-\d+)?", name):
                d.ns.run(["nft", "flush", "set", "inet", "web-ipt-d", name])


def restart(d: Daemon) -> None:
    assert d.stop() == 0, d.stderr()
    d.start()


def assert_hooked(d: Daemon, chains: dict[str, tuple[str, ...]] = HOOKS) -> None:
    """Each managed chain exists in both filter tables, jumped to exactly once from each hook,
    and the jumps come before every other rule of the hook chain."""
    for family in (4, 6):
        filt = saved_tables(d, family)["filter"]
        for chain in chains:
            assert f":{chain} -" in filt, (family, chain, filt)
        for hook in ("INPUT", "FORWARD"):
            expected = {f"-A {hook} -j {c}" for c, hooks in chains.items() if hook in hooks}
            hook_rules = [line for line in filt if line.startswith(f"-A {hook} ")]
            assert set(hook_rules[:len(expected)]) == expected, (family, hook, hook_rules)
            for jump in expected:
                assert hook_rules.count(jump) == 1, (family, hook, hook_rules)


def run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


def test_chains_and_jumps_created_in_both_tables_and_admin_rule_kept(daemon):
    d = daemon
    both(d, "-A", "INPUT", "-p", "tcp", "--dport", "8443", "-j", "ACCEPT")
    both(d, "-A", "FORWARD", "-p", "udp", "--dport", "53", "-j", "ACCEPT")
    d.start()
    assert_hooked(d)
    for family in (4, 6):
        filt = saved_tables(d, family)["filter"]
        assert [line for line in filt if line.startswith("-A INPUT ")][-1] == \
            "-A INPUT -p tcp -m tcp --dport 8443 -j ACCEPT"
        assert [line for line in filt if line.startswith("-A FORWARD ")] == \
            ["-A FORWARD -j admin-list", "-A FORWARD -p udp -m udp --dport 53 -j ACCEPT"]
        for chain in MANAGED:
            assert d.chain_rules(chain, family) == []
    r = d.request("GET", "/chains")
    assert r.status == 200
    assert {c["name"]: (c["target"], tuple(c["hooks"])) for c in r.json["chains"]} == {
        "f2b-web": ("DROP", ("INPUT",)), "f2b-ssh": ("REJECT", ("INPUT",)),
        "admin-list": ("DROP", ("INPUT", "FORWARD"))}


def test_rules_of_our_shape_are_adopted_and_foreign_rules_left_alone(daemon):
    d = daemon
    both(d, "-N", "f2b-web")
    ipt(d, "-A", "f2b-web", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    ipt(d, "-A", "f2b-web", "-s", "203.0.113.7/32", "-j", "DROP")
    ipt(d, "-A", "f2b-web", "-s", "203.0.113.64/26", "-j", "DROP")
    ipt(d, "-A", "f2b-web", "-s", "203.0.113.8", "-i", "lo", "-j", "DROP")  # an interface match: not ours
    ipt(d, "-A", "f2b-web", "-s", "2001:db8:ffff:1::/64", "-j", "DROP", family=6)
    ipt(d, "-N", "f2b-ssh")
    ipt(d, "-A", "f2b-ssh", "-s", "203.0.113.9", "-j", "REJECT")
    ipt(d, "-A", "f2b-ssh", "-s", "203.0.113.10", "-j", "REJECT", "--reject-with", "icmp-host-unreachable")
    # Our shape, but in a chain web-ipt-d does not manage.
    ipt(d, "-N", "mine")
    ipt(d, "-A", "mine", "-s", "203.0.113.11", "-j", "DROP")
    before = {(c, f): d.chain_rules(c, f) for c in ("f2b-web", "f2b-ssh", "mine") for f in (4, 6)}

    d.start()
    for (chain, family), rules in before.items():
        assert d.chain_rules(chain, family) == rules, "a pre-existing rule was flushed, moved or duplicated"
    adopted = {
        "f2b-web": {ipaddress.ip_network("203.0.113.7/32"), ipaddress.ip_network("203.0.113.64/26"),
                    ipaddress.ip_network("2001:db8:ffff:1::/64")},
        "f2b-ssh": {ipaddress.ip_network("203.0.113.9/32")},
    }
    for chain, nets in adopted.items():
        entries = listed(d, chain)
        assert set(entries) == nets
        assert {e["created_by"] for e in entries.values()} == {"adopted"}
        assert {e["expires_at"] for e in entries.values()} == {None}
    assert listed(d, "f2b-ssh")[ipaddress.ip_network("203.0.113.9/32")]["target"] == "REJECT"
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.8").status == 404

    # Adopted means ours from now on: a PUT finds it, a DELETE removes just that rule.
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.7")
    assert r.status == 200 and r.json["created_by"] == "adopted", r
    r = d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.64/26")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert d.chain_rules("f2b-web") == [
        "-A f2b-web -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A f2b-web -s 203.0.113.7/32 -j DROP",
        "-A f2b-web -s 203.0.113.8/32 -i lo -j DROP",
    ]
    # Foreign rules are never removed, not even by unblocking an address they mention.
    r = d.request("DELETE", "/chain/f2b-ssh/ipv4/203.0.113.10")
    assert r.status == 200 and r.json["deleted"] is False, r
    assert "-A f2b-ssh -s 203.0.113.10/32 -j REJECT --reject-with icmp-host-unreachable" in d.chain_rules("f2b-ssh")

    restart(d)
    assert set(listed(d, "f2b-web")) == {ipaddress.ip_network("203.0.113.7/32"),
                                         ipaddress.ip_network("2001:db8:ffff:1::/64")}
    assert listed(d, "f2b-web")[ipaddress.ip_network("203.0.113.7/32")]["created_by"] == "adopted"
    assert d.chain_rules("mine") == before[("mine", 4)]
    assert len(d.chain_rules("f2b-web")) == 3


def test_other_chains_and_tables_untouched(daemon):
    d = daemon
    for family in (4, 6):
        ipt(d, "-N", "mine", family=family)
        ipt(d, "-A", "mine", "-p", "tcp", "--dport", "25", "-j", "REJECT", family=family)
        ipt(d, "-A", "INPUT", "-j", "mine", family=family)
        ipt(d, "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT", family=family)
        ipt(d, "-P", "FORWARD", "DROP", family=family)
        ipt(d, "-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "7", family=family)
        ipt(d, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "2222", "-j", "REDIRECT", "--to-ports", "22",
            family=family)
    ipt(d, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "-j", "NOTRACK")
    before = {f: saved_tables(d, f) for f in (4, 6)}

    d.start()
    for net in ("ipv4/203.0.113.1", "ipv6/2001:db8:ffff::1", "ipv4/203.0.113.0/28"):
        for chain in MANAGED:
            assert d.request("PUT", f"/chain/{chain}/{net}?timeout=600").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.1").status == 200
    restart(d)
    for family in (4, 6):
        after = saved_tables(d, family)
        assert set(after) == set(before[family]), "a table was loaded or dropped"
        assert without_managed(after) == before[family]
        # Everything that is left over is ours: chain headers, hook jumps and block rules.
        for line in set(after["filter"]) - set(before[family]["filter"]):
            assert line.split()[0] in {f":{c}" for c in MANAGED} or line.endswith(MANAGED) \
                or BLOCK_RULE_RE.match(line), line


def test_restart_does_not_duplicate_jumps_or_rules(running):
    d = running
    for path_ in ("/chain/f2b-web/ipv4/203.0.113.1", "/chain/f2b-ssh/ipv6/2001:db8:ffff::2",
                  "/chain/admin-list/ipv4/203.0.113.128/25", "/chain/f2b-web/ipv6/2001:db8:ffff::/48?timeout=900"):
        assert d.request("PUT", path_).status == 201
    first = {f: saved_tables(d, f)["filter"] for f in (4, 6)}
    for _ in range(2):
        restart(d)
        assert {f: saved_tables(d, f)["filter"] for f in (4, 6)} == first
    assert_hooked(d)
    assert d.chain_rules("f2b-ssh", 6) == ["-A f2b-ssh -s 2001:db8:ffff::2/128 -j REJECT --reject-with "
                                           "icmp6-port-unreachable"]


@pytest.mark.backends
def test_reconcile_after_chain_flushed_restart_and_reload(running):
    d = running
    nets = ["203.0.113.1/32", "203.0.113.32/27", "2001:db8:ffff::9/128"]
    for net in nets:
        assert d.request("PUT", path("f2b-web", ipaddress.ip_network(net))).status == 201
    expected = collections.Counter({(ipaddress.ip_network(n), "DROP"): 1 for n in nets})
    assert blocks_in(d, "f2b-web") == expected

    flush_kernel(d, "f2b-web")
    assert blocks_in(d, "f2b-web") == collections.Counter()
    restart(d)
    assert blocks_in(d, "f2b-web") == expected
    assert set(listed(d, "f2b-web")) == {ipaddress.ip_network(n) for n in nets}

    flush_kernel(d, "f2b-web")
    d.reload()
    assert blocks_in(d, "f2b-web") == expected

    # Flushed behind our back, then an unrelated change to the same chain: nothing is lost.
    flush_kernel(d, "f2b-web")
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.200").status == 201
    restart(d)
    assert blocks_in(d, "f2b-web") == expected + collections.Counter(
        {(ipaddress.ip_network("203.0.113.200/32"), "DROP"): 1})


def wipe_kernel(d: Daemon) -> None:
    """What a sysadmin's reload of another firewall does to ours, per backend."""
    if d.backend == "iptables":  # netfilter-persistent and the like: iptables-restore of a saved ruleset
        for tool in ("iptables-legacy-restore", "ip6tables-legacy-restore"):
            d.ns.run([tool], input="*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                                   ":OUTPUT ACCEPT [0:0]\nCOMMIT\n", text=True, check=True)
    elif d.backend == "ipset":
        flush_kernel(d, "f2b-web")
    else:  # a reload of nftables.service: /etc/nftables.conf starts with `flush ruleset`
        d.ns.run(["nft", "flush", "ruleset"], check=True)


@pytest.mark.backends
def test_blocks_taken_out_of_the_kernel_come_back_without_a_request(daemon):
    d = daemon
    d.config["limits"]["kernel_check"] = 0.5
    d.start()
    nets = ["203.0.113.1/32", "203.0.113.32/27", "2001:db8:ffff::9/128"]
    for net in nets:
        assert d.request("PUT", path("f2b-web", ipaddress.ip_network(net)) + "?timeout=3600").status == 201
    expected = collections.Counter({(ipaddress.ip_network(n), "DROP"): 1 for n in nets})
    assert blocks_in(d, "f2b-web") == expected

    wipe_kernel(d)
    deadline = time.monotonic() + 15
    while blocks_in(d, "f2b-web") != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert blocks_in(d, "f2b-web") == expected
    if d.backend != "nftables":
        assert_hooked(d)
    assert "lost blocks behind our back" in d.log()  # the operator is told
    # Nothing else changed: the API still lists exactly what was blocked, and the next change works.
    assert set(listed(d, "f2b-web")) == {ipaddress.ip_network(n) for n in nets}
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.1").json["deleted"] is True
    assert blocks_in(d, "f2b-web") == expected - collections.Counter(
        {(ipaddress.ip_network("203.0.113.1/32"), "DROP"): 1})


def test_deleted_jump_comes_back_on_restart_reload_and_next_change(running):
    d = running
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.5").status == 201
    for family in (4, 6):
        ipt(d, "-D", "INPUT", "-j", "f2b-web", family=family)
        ipt(d, "-D", "FORWARD", "-j", "admin-list", family=family)
    restart(d)
    assert_hooked(d)

    for family in (4, 6):
        ipt(d, "-D", "INPUT", "-j", "admin-list", family=family)
    d.reload()
    assert_hooked(d)

    # The jump is re-checked before a change to that chain, without a restart or reload.
    ipt(d, "-D", "INPUT", "-j", "f2b-ssh")
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.6").status == 201
    assert ipt(d, "-C", "INPUT", "-j", "f2b-ssh", check=False).returncode == 0


def test_chain_added_by_reload_is_created_and_hooked(running):
    d = running
    assert d.request("PUT", "/chain/f2b-mail/ipv4/203.0.113.3").status == 404
    d.config["chains"]["f2b-mail"] = {"hooks": ["INPUT", "FORWARD"], "target": "REJECT"}
    d.reload()
    assert_hooked(d, {**HOOKS, "f2b-mail": ("INPUT", "FORWARD")})
    r = d.request("PUT", "/chain/f2b-mail/ipv4/203.0.113.3", user="f2b")
    assert r.status == 201 and r.json["target"] == "REJECT", r
    assert d.chain_rules("f2b-mail") == ["-A f2b-mail -s 203.0.113.3/32 -j REJECT --reject-with icmp-port-unreachable"]
    assert "f2b-mail" in {c["name"] for c in d.request("GET", "/chains", user="f2b").json["chains"]}


def test_families_land_in_their_own_table_and_reject_target(running):
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::5").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.5").status == 201
    assert d.chain_rules("f2b-web", 6) == ["-A f2b-web -s 2001:db8:ffff::5/128 -j DROP"]
    assert d.chain_rules("f2b-web", 4) == ["-A f2b-web -s 203.0.113.5/32 -j DROP"]

    r4 = d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.0/24")
    r6 = d.request("PUT", "/chain/f2b-ssh/ipv6/2001:db8:ffff::/48")
    assert (r4.status, r4.json["target"], r6.status, r6.json["target"]) == (201, "REJECT", 201, "REJECT")
    assert d.chain_rules("f2b-ssh", 4) == ["-A f2b-ssh -s 203.0.113.0/24 -j REJECT --reject-with icmp-port-unreachable"]
    assert d.chain_rules("f2b-ssh", 6) == [
        "-A f2b-ssh -s 2001:db8:ffff::/48 -j REJECT --reject-with icmp6-port-unreachable"]

    assert d.request("DELETE", "/chain/f2b-web/ipv6/2001:db8:ffff::5").json["deleted"] is True
    assert d.chain_rules("f2b-web", 6) == []
    assert d.chain_rules("f2b-web", 4) == ["-A f2b-web -s 203.0.113.5/32 -j DROP"]


def distinct_networks(n: int) -> list[Net]:
    """n distinct never-contacted hosts: 203.0.113.0/24 first, then 2001:db8:ffff::/48."""
    v4 = [ipaddress.ip_network(f"203.0.113.{i}/32") for i in range(min(n, 200))]
    v6 = [ipaddress.ip_network(f"2001:db8:ffff::{i:x}/128") for i in range(1, n - len(v4) + 1)]
    return v4 + v6


@pytest.mark.backends
def test_concurrent_puts_and_deletes_lose_nothing(running):
    d = running
    nets = distinct_networks(400)
    shares = [nets[i::8] for i in range(8)]
    statuses: list[list[int]] = [[] for _ in range(8)]

    def client(method: str) -> Callable[[int], None]:
        def run(i: int) -> None:
            conn = d.connection()
            try:
                for net in shares[i]:
                    statuses[i].append(d.request(method, path("f2b-web", net), conn=conn).status)
            finally:
                conn.close()
        return run

    run_threads(8, client("PUT"))
    assert [s for ss in statuses for s in ss] == [201] * 400
    assert blocks_in(d, "f2b-web") == collections.Counter({(n, "DROP"): 1 for n in nets})
    assert set(listed(d, "f2b-web")) == set(nets)

    statuses = [[] for _ in range(8)]
    run_threads(8, client("DELETE"))
    assert [s for ss in statuses for s in ss] == [200] * 400
    assert blocks_in(d, "f2b-web") == collections.Counter()
    if d.backend == "iptables":  # not even a rule of another shape
        assert d.chain_rules("f2b-web", 4) == [] and d.chain_rules("f2b-web", 6) == []
    assert listed(d, "f2b-web") == {}


@pytest.mark.backends
def test_same_address_put_concurrently_is_created_once(running):
    d = running
    n = 12
    conns = [d.connection() for _ in range(n)]
    for conn in conns:
        assert d.request("GET", "/version", conn=conn).status == 200  # connected and authenticated already
    barrier = threading.Barrier(n)
    statuses: list[int] = []

    def put(i: int) -> None:
        barrier.wait()
        statuses.append(d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.77", conn=conns[i]).status)

    try:
        run_threads(n, put)
    finally:
        for conn in conns:
            conn.close()
    assert sorted(statuses) == [200] * (n - 1) + [201]
    assert blocks_in(d, "f2b-ssh") == collections.Counter({(ipaddress.ip_network("203.0.113.77/32"), "REJECT"): 1})
    assert set(listed(d, "f2b-ssh")) == {ipaddress.ip_network("203.0.113.77/32")}


@pytest.mark.backends("iptables", "ipset")  # both write the legacy filter table, under the xtables lock
def test_external_iptables_writer_and_daemon_lose_nothing(running):
    d = running
    ipt(d, "-N", "outside")
    count, outside_count = 200, 400
    # A separate iptables process per rule, as fail2ban or an admin script would run it.
    script = (f"for i in $(seq 0 {outside_count - 1}); do iptables-legacy -w -A outside -s 203.0.113.$((i % 256)) "
              "-p tcp --dport $((1000 + i)) -j RETURN || exit 1; done")
    writer = d.ns.popen(["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    nets = [ipaddress.ip_network(f"203.0.113.{i}/32") for i in range(count)]
    shares = [nets[i::8] for i in range(8)]
    statuses: list[int] = []

    def client(i: int) -> None:
        conn = d.connection()
        try:
            for net in shares[i]:
                statuses.append(d.request("PUT", path("f2b-ssh", net), conn=conn).status)
        finally:
            conn.close()

    try:
        run_threads(8, client)
        # The daemon keeps changing the table while the writer is still at it.
        while writer.poll() is None:
            for net in nets[:20]:
                d.request("DELETE", path("f2b-ssh", net))
                d.request("PUT", path("f2b-ssh", net))
        assert writer.wait(60) == 0, writer.stderr.read() if writer.stderr else ""
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert statuses == [201] * count
    outside = d.chain_rules("outside")
    assert len(outside) == outside_count and len(set(outside)) == outside_count, "the external writer lost rules"
    assert blocks_in(d, "f2b-ssh") == collections.Counter({(n, "REJECT"): 1 for n in nets})
    assert set(listed(d, "f2b-ssh")) == set(nets)


# -- match and interface ---------------------------------------------------------------------------------------


def forms(d: Daemon, chain: str) -> dict[str, list[str]]:
    """What the kernel holds of `chain` and its hooks: for iptables and ipset, per family, the jumps to it and its
    rules as iptables-legacy-save writes them; for nftables, its rules and, per base chain (shared by our chains at
    one hook and priority: `forward.-10`), the jumps to it."""
    if d.backend != "nftables":
        return {f"ipv{family}": [r for r in d.rules(family) if r.endswith(f" -j {chain}")
                                 or r.startswith(f"-A {chain} ")] for family in (4, 6)}
    found = {}
    table = json.loads(d.ns.run(["nft", "-j", "-t", "list", "table", "inet", "web-ipt-d"]).stdout)["nftables"]
    for item in sorted((item["chain"] for item in table if "chain" in item), key=lambda c: c["name"]):
        name = item["name"]
        if name == chain or "hook" in item:
            out = d.ns.run(["nft", "list", "chain", "inet", "web-ipt-d", name]).stdout
            lines = [line.strip() for line in out.splitlines()[2:-2]
                     if line.strip() and not line.strip().startswith("type ")]
            if name != chain:
                lines = [line for line in lines if line.endswith(f"jump {chain}")]
            if lines:
                found[name] = lines
    return found


def expected_forms(backend: str, match: str, interface: str | None) -> dict[str, list[str]]:
    """forms() of `egress` (hooked at FORWARD and OUTPUT, DROP) holding 203.0.113.5, 198.18.0.0/15 and
    2001:db8:ffff::/48, for a match and an interface."""
    flag, field, direction = {"source": ("-s", "saddr", "src"), "destination": ("-d", "daddr", "dst")}[match]
    if backend == "nftables":
        nft_interface = "" if interface is None else interface.replace("+", "*")
        return {"egress": [f"ip {field} & 255.254.0.0 == @egress-v4-15 drop", f"ip {field} @egress-v4 drop",
                           f"ip6 {field} & ffff:ffff:ffff:: == @egress-v6-48 drop", f"ip6 {field} @egress-v6 drop"],
                "forward.-10": [(f'iifname "{nft_interface}" ' if interface else "") + "jump egress"],
                "output.-10": [(f'oifname "{nft_interface}" ' if interface else "") + "jump egress"]}
    jumps = [f"-A FORWARD{f' -i {interface}' if interface else ''} -j egress",
             f"-A OUTPUT{f' -o {interface}' if interface else ''} -j egress"]
    if backend == "ipset":
        return {f"ipv{family}": jumps + [f"-A egress -m set --match-set egress-v{family} {direction} -j DROP"]
                for family in (4, 6)}
    return {"ipv4": jumps + [f"-A egress {flag} 203.0.113.5/32 -j DROP", f"-A egress {flag} 198.18.0.0/15 -j DROP"],
            "ipv6": jumps + [f"-A egress {flag} 2001:db8:ffff::/48 -j DROP"]}


@pytest.mark.backends
def test_match_and_interface_reach_the_kernel_and_follow_reloads_and_restarts(daemon):
    d = daemon
    egress = {"hooks": ["FORWARD", "OUTPUT"], "target": "DROP", "backend": d.backend, "match": "destination",
              "interface": "wan0"}
    d.config["chains"]["egress"] = egress
    d.start()
    assert "matches interface wan0, which this host does not have" in d.log()
    nets = [ipaddress.ip_network(n) for n in ("203.0.113.5/32", "198.18.0.0/15", "2001:db8:ffff::/48")]
    for net in nets:
        assert d.request("PUT", path("egress", net)).status == 201
    assert forms(d, "egress") == expected_forms(d.backend, "destination", "wan0")
    # Each change is made again in the kernel, and what was blocked stays blocked, by the chain's new match.
    for match, interface in (("source", "wan+"), ("destination", None), ("destination", "wan0")):
        egress.update(match=match, interface=interface)
        d.reload()
        assert forms(d, "egress") == expected_forms(d.backend, match, interface), (match, interface)
        restart(d)
        assert forms(d, "egress") == expected_forms(d.backend, match, interface), (match, interface)
        entries = listed(d, "egress")
        assert set(entries) == set(nets) and {e["created_by"] for e in entries.values()} == {"admin"}
    r = d.request("DELETE", path("egress", nets[0]))
    assert r.status == 200 and r.json["deleted"] is True
    assert set(listed(d, "egress")) == set(nets[1:])
    log = d.log()
    assert "did not make" not in log and "found in managed chains but not in the state store" not in log
    assert " ERROR " not in log and "Traceback" not in log + d.stderr()


def test_rules_of_both_shapes_are_ours_and_a_jump_with_another_interface_is_replaced(daemon):
    d = daemon
    d.config["chains"]["egress"] = {"hooks": ["OUTPUT", "FORWARD"], "target": "DROP", "match": "destination",
                                    "interface": "wan0"}
    both(d, "-N", "egress")
    ipt(d, "-A", "egress", "-d", "203.0.113.7", "-j", "DROP")
    ipt(d, "-A", "egress", "-s", "203.0.113.8", "-j", "DROP")  # the other shape: what match: source made
    ipt(d, "-A", "egress", "-d", "203.0.113.9", "-p", "tcp", "--dport", "22", "-j", "DROP")  # not ours (multiport is)
    ipt(d, "-A", "egress", "-d", "203.0.113.10", "-s", "203.0.113.11", "-j", "DROP")  # not ours either
    ipt(d, "-A", "egress", "-s", "2001:db8:ffff::8", "-j", "REJECT", family=6)
    ipt(d, "-A", "OUTPUT", "-o", "wan1", "-j", "egress")  # our shape, another interface: replaced
    ipt(d, "-A", "OUTPUT", "-p", "udp", "-j", "egress")  # someone's own jump: left alone
    ipt(d, "-A", "FORWARD", "!", "-i", "wan0", "-j", "egress")  # likewise
    d.start()
    assert d.chain_rules("egress") == [
        "-A egress -d 203.0.113.7/32 -j DROP",
        "-A egress -d 203.0.113.9/32 -p tcp -m tcp --dport 22 -j DROP",
        "-A egress -s 203.0.113.11/32 -d 203.0.113.10/32 -j DROP",
        "-A egress -d 203.0.113.8/32 -j DROP"]
    assert d.chain_rules("egress", 6) == ["-A egress -d 2001:db8:ffff::8/128 -j REJECT --reject-with "
                                          "icmp6-port-unreachable"]
    assert [r for r in d.rules() if r.endswith("-j egress")] == [
        "-A FORWARD -i wan0 -j egress", "-A FORWARD ! -i wan0 -j egress",
        "-A OUTPUT -o wan0 -j egress", "-A OUTPUT -p udp -j egress"]
    assert [r for r in d.rules(6) if r.endswith("-j egress")] == ["-A FORWARD -i wan0 -j egress",
                                                                  "-A OUTPUT -o wan0 -j egress"]
    entries = listed(d, "egress")
    assert {str(n): (e["target"], e["created_by"]) for n, e in entries.items()} == {
        "203.0.113.7/32": ("DROP", "adopted"), "203.0.113.8/32": ("DROP", "adopted"),
        "2001:db8:ffff::8/128": ("REJECT", "adopted")}
    assert d.request("GET", "/chain/egress/ipv4/203.0.113.9").status == 404
    # A block and an unblock of the chain's shape; a restart finds what is there, and adds nothing.
    assert d.request("PUT", "/chain/egress/ipv4/203.0.113.20").status == 201
    assert d.chain_rules("egress")[-1] == "-A egress -d 203.0.113.20/32 -j DROP"
    r = d.request("DELETE", "/chain/egress/ipv4/203.0.113.20")
    assert r.json["deleted"] is True, r
    assert "-A egress -d 203.0.113.20/32 -j DROP" not in d.chain_rules("egress")
    before = {f: saved_tables(d, f)["filter"] for f in (4, 6)}
    restart(d)
    assert {f: saved_tables(d, f)["filter"] for f in (4, 6)} == before
    assert set(listed(d, "egress")) == set(entries)
