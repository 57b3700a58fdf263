"""The nftables backend on its own in a namespace: scoped atoms in sets of address . protocol (. port, or . port
range), their rules and kernel timeouts, a change of a port list in one transaction, read() and a full set; real
packets over a veth pair, for every protocol with ports; and allow chains, whose jumps come first in the one base
chain of their hook and priority.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
from typing import Any, Callable, Iterator, TypeVar

import pytest

from tests.conftest import PEER4, PEER6, SERVER4, SERVER6, Listener
from tests.netns import NetNS, veth_pair
from webiptd.config import Chain
from webiptd.firewall.nftables import MAX_FLAT_RANGE, NftablesBackend
from webiptd.firewall.ops import Add, CapacityExceeded, Op, Remove
from webiptd.scope import PROTOCOLS, Scope

T = TypeVar("T")

pytestmark = [pytest.mark.root]

TABLE = ("inet", "web-ipt-d")
NET = ipaddress.ip_network
TCP22_80_90 = Scope("tcp", ((22, 22), (80, 90)))


class Direct:
    """An NftablesBackend in `ns`; every call runs in a thread that joined the namespace."""

    def __init__(self, ns: NetNS, chains: list[Chain], clock: Callable[[], float] = time.time):
        self.ns = ns
        self.chains = {c.name: c for c in chains}
        self.backend = ns.call(lambda: NftablesBackend(clock=clock))
        self.call(lambda: self.backend.prepare(chains))

    def call(self, fn: Callable[[], T]) -> T:
        return self.ns.call(fn)

    def apply(self, ops: list[Op]) -> None:
        self.call(lambda: self.backend.apply(ops, self.chains))

    def read(self, *chains: str) -> dict[Any, str]:
        return dict(self.call(lambda: self.backend.read(list(chains or self.chains))))

    def nft(self, *args: str) -> str:
        return str(self.ns.run(["nft", *args]).stdout)

    def table_text(self) -> str:
        """`nft list table inet web-ipt-d` without the elements (their `expires` moves) and without tabs."""
        return "\n".join(line.strip() for line in self.nft("list", "table", *TABLE).splitlines()
                         if line.strip() and not line.strip().startswith(("elements", "198.", "2001:")))

    def elements(self, name: str) -> dict[str, dict[str, Any]]:
        """`<address> . <proto> . <ports>` as nft prints it -> {'timeout': s, 'expires': s} ({} for none)."""
        found = {}
        doc = json.loads(self.nft("-j", "list", "set", *TABLE, name))
        for item in doc["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                extra: dict[str, Any] = {}
                if isinstance(elem, dict) and "elem" in elem:
                    extra = {k: v for k, v in elem["elem"].items() if k != "val"}
                    elem = elem["elem"]["val"]
                parts = elem["concat"] if isinstance(elem, dict) and "concat" in elem else [elem]
                found[" . ".join(f"{p['range'][0]}-{p['range'][1]}" if isinstance(p, dict) else str(p)
                                 for p in parts)] = extra
        return found


def chains(**kw: Any) -> list[Chain]:
    return [Chain("web", ("INPUT",), "DROP", backend="nftables", **kw),
            Chain("ssh", ("INPUT",), "REJECT", backend="nftables", **kw),
            Chain("out", ("OUTPUT",), "DROP", backend="nftables", match="destination", **kw)]


@pytest.fixture
def direct(ns: NetNS) -> Iterator[Direct]:
    d = Direct(ns, chains(maxelem=65536))
    try:
        yield d
    finally:
        d.call(d.backend.close)


def in_window(value: int, high: int, slack: int = 5) -> bool:
    return high - slack <= value <= high


SPLIT = Scope("tcp", ((22, 22), (80, 81), (8000, 9000)))  # single ports in the hash set, a wide range in the other
SCOPED = [("203.0.113.7/32", SPLIT), ("203.0.113.0/24", Scope("udp", ((53, 53),))),
          ("203.0.113.8/32", Scope("sctp")), ("198.18.0.0/24", Scope("tcp")),
          ("2001:db8:ffff::7/128", Scope("dccp", ((1000, 2000),))), ("2001:db8:ffff::/48", Scope("udplite")),
          ("2001:db8:ffff::8/128", Scope("udp")), ("2001:db8:fffe::/48", Scope("tcp", ((22, 22),)))]
# The scoped sets SCOPED makes for a chain, in the order they are made: (suffix, type, elements).
SCOPED_SETS = [
    ("v4-24-proto", "ipv4_addr . inet_proto", "{ 198.18.0.0 . tcp }"),
    ("v4-24-port", "ipv4_addr . inet_proto . inet_service", "{ 203.0.113.0 . udp . 53 }"),
    ("v4-proto", "ipv4_addr . inet_proto", "{ 203.0.113.8 . sctp }"),
    ("v4-port", "ipv4_addr . inet_proto . inet_service",
     "{ 203.0.113.7 . tcp . 22,\n\t\t\t     203.0.113.7 . tcp . 80,\n\t\t\t     203.0.113.7 . tcp . 81 }"),
    ("v4-ports", "ipv4_addr . inet_proto . inet_service", "{ 203.0.113.7 . tcp . 8000-9000 }"),
    ("v6-48-proto", "ipv6_addr . inet_proto", "{ 2001:db8:ffff:: . udplite }"),
    ("v6-48-port", "ipv6_addr . inet_proto . inet_service", "{ 2001:db8:fffe:: . tcp . 22 }"),
    ("v6-proto", "ipv6_addr . inet_proto", "{ 2001:db8:ffff::8 . udp }"),
    ("v6-ports", "ipv6_addr . inet_proto . inet_service", "{ 2001:db8:ffff::7 . dccp . 1000-2000 }")]


def expected_sets(chain: str) -> str:
    """`nft list table` of the scoped sets SCOPED makes for `chain` (size 1000), in the order they are made."""
    out = []
    for name, key, elements in SCOPED_SETS:
        flags = "interval,timeout" if name.endswith("ports") else "timeout"
        out.append(f"\tset {chain}-{name} {{\n\t\ttype {key}\n\t\tsize 1000\n\t\tflags {flags}\n"
                   f"\t\telements = {elements}\n\t}}\n")
    return "\n".join(out)


def expected_rules(chain: str, addr: str, verdict4: str, verdict6: str) -> str:
    """The chain's rules, one per set, sorted by family, prefix length, then kind: all, proto, port, ports."""
    rules = []
    lookups = {"": "", "proto": " . meta l4proto", "port": " . meta l4proto . th dport",
               "ports": " . meta l4proto . th dport"}
    for ip, v, mask, length, verdict in (("ip", "v4", "255.255.255.0", 24, verdict4),
                                         ("ip6", "v6", "ffff:ffff:ffff::", 48, verdict6)):
        for prefix, kinds in ((length, ("proto", "port")), (None, ("", "proto", "port", "ports"))):
            for kind in kinds:
                name = "-".join(str(p) for p in (chain, v, prefix, kind) if p)
                if (v, prefix, kind) in (("v6", None, "port"),):
                    continue  # SCOPED has no single port of a v6 host
                masked = f" & {mask}" if prefix else ""
                eq = " ==" if prefix and not kind else ""
                rules.append(f"{ip} {addr}{masked}{lookups[kind]}{eq} @{name} {verdict}")
    return "".join(f"\t\t{rule}\n" for rule in rules)


def base_chain(hook: str, *jumps: str) -> str:
    return (f"\tchain {hook}.-10 {{\n\t\ttype filter hook {hook} priority filter - 10; policy accept;\n"
            + "".join(f"\t\t{jump}\n" for jump in jumps) + "\t}\n")


def test_exact_sets_and_rules_of_scoped_atoms(ns: NetNS) -> None:
    """Both families, DROP and REJECT, source and destination, hosts and networks, every kind of set, and an atom
    split over the hash set of single ports and the interval set of wide ranges."""
    d = Direct(ns, [Chain("web", ("INPUT",), "DROP", backend="nftables", maxelem=1000),
                    Chain("out", ("OUTPUT",), "REJECT", backend="nftables", match="destination", maxelem=1000)])
    try:
        d.apply([Add(chain, NET(net), "-", scope=scope) for chain in ("web", "out") for net, scope in SCOPED])
        plain = "".join(f"\tset {c}-{v} {{\n\t\ttype ip{v}_addr\n\t\tsize 1000\n\t\tflags timeout\n\t}}\n\n"
                        for c in ("web", "out") for v in ("v4", "v6"))
        assert d.nft("list", "table", *TABLE) == (
            "table inet web-ipt-d {\n" + plain + expected_sets("out") + "\n" + expected_sets("web") + "\n"
            "\tchain web {\n" + expected_rules("web", "saddr", "drop", "drop") + "\t}\n\n"
            "\tchain out {\n" + expected_rules("out", "daddr", "reject with icmp port-unreachable",
                                                "reject with icmpv6 port-unreachable") + "\t}\n\n"
            + base_chain("input", "jump web") + "\n" + base_chain("output", "jump out") + "}\n")
        assert d.read() == {(chain, NET(net), scope): target for chain, target in (("web", "DROP"), ("out", "REJECT"))
                            for net, scope in SCOPED}
    finally:
        d.call(d.backend.close)


def test_single_ports_and_narrow_ranges_are_hash_elements_wide_ranges_interval_ones(direct: Direct) -> None:
    d = direct
    net = NET("203.0.113.7/32")
    narrow, wide = (1000, 1000 + MAX_FLAT_RANGE - 1), (2000, 2000 + MAX_FLAT_RANGE)
    d.apply([Add("web", net, "DROP", scope=Scope("udp", (narrow, wide)))])
    assert set(d.elements("web-v4-port")) == {f"203.0.113.7 . udp . {p}" for p in range(narrow[0], narrow[1] + 1)}
    assert set(d.elements("web-v4-ports")) == {f"203.0.113.7 . udp . {wide[0]}-{wide[1]}"}
    assert d.nft("list", "set", *TABLE, "web-v4-port").count("flags timeout\n") == 1
    assert d.read() == {("web", net, Scope("udp", (narrow, wide))): "DROP"}
    d.apply([Remove("web", net, "DROP", scope=Scope("udp", (narrow, wide)))])
    assert d.elements("web-v4-port") == d.elements("web-v4-ports") == {} and d.read() == {}


def test_the_three_kinds_of_one_network_are_independent(direct: Direct) -> None:
    d = direct
    net = NET("203.0.113.7/32")
    d.apply([Add("web", net, "DROP"), Add("web", net, "DROP", scope=Scope("tcp")),
             Add("web", net, "DROP", scope=Scope("tcp", ((22, 22),))),
             Add("web", net, "DROP", scope=Scope("udp", ((22, 22),)))])
    tcp22, udp22 = Scope("tcp", ((22, 22),)), Scope("udp", ((22, 22),))
    assert d.read() == {("web", net, None): "DROP", ("web", net, Scope("tcp")): "DROP",
                        ("web", net, tcp22): "DROP", ("web", net, udp22): "DROP"}
    d.apply([Remove("web", net, "DROP", scope=Scope("tcp")), Remove("web", net, "DROP")])
    assert d.read() == {("web", net, tcp22): "DROP", ("web", net, udp22): "DROP"}
    # Removing what is not there is no error.
    d.apply([Remove("web", net, "DROP", scope=Scope("sctp")), Remove("web", net, "DROP", scope=Scope("tcp", ((1, 9),))),
             Remove("web", net, "DROP", scope=Scope("udp", ((22, 22),)))])
    assert d.read() == {("web", net, Scope("tcp", ((22, 22),))): "DROP"}


def test_kernel_timeouts_of_port_elements_follow_expires_at(direct: Direct) -> None:
    d = direct
    now = time.time()
    host, net = NET("203.0.113.7/32"), NET("203.0.113.0/24")
    atom = Scope("tcp", ((22, 22), (8000, 9000)))
    mine = {"web-v4-port": "203.0.113.7 . tcp . 22", "web-v4-ports": "203.0.113.7 . tcp . 8000-9000"}
    d.apply([Add("web", host, "DROP", now + 600, scope=atom),
             Add("web", net, "DROP", now + 900, scope=Scope("udp")),
             Add("web", NET("203.0.113.8/32"), "DROP", scope=Scope("tcp", ((443, 443),)))])
    assert d.elements("web-v4-port")["203.0.113.8 . tcp . 443"] == {}, "a permanent atom has no timeout"
    for name, element in mine.items():
        got = d.elements(name)[element]
        assert got["timeout"] == 600 and in_window(got["expires"], 600), got
    assert d.elements("web-v4-24-proto")["203.0.113.0 . udp"]["timeout"] == 900

    # The same atom again, as the worker sends a new expiry (replaces): each element, in both sets, takes it.
    for expires, timeout in ((now + 3600, 3600), (now + 120, 120), (None, None), (now + 300, 300)):
        d.apply([Add("web", host, "DROP", expires, scope=atom, replaces=True),
                 Add("web", net, "DROP", expires, scope=Scope("udp"), replaces=True)])
        for name, element in mine.items():
            assert d.elements(name)[element].get("timeout") == timeout, (expires, name)
        assert d.elements("web-v4-24-proto")["203.0.113.0 . udp"].get("timeout") == timeout
    assert d.elements("web-v4-port")["203.0.113.8 . tcp . 443"] == {}

    # Elements gone from the kernel behind our back (expired there): a new expiry puts the atom back whole,
    # and a Remove of an atom with an element gone still removes the rest.
    d.nft("delete", "element", *TABLE, "web-v4-ports", "{ 203.0.113.7 . tcp . 8000-9000 }")
    d.nft("delete", "element", *TABLE, "web-v4-port", "{ 203.0.113.8 . tcp . 443 }")
    d.apply([Add("web", host, "DROP", now + 700, scope=atom, replaces=True)])
    for name, element in mine.items():
        assert d.elements(name) == {element: d.elements(name)[element]}
        assert d.elements(name)[element]["timeout"] == 700
    d.nft("delete", "element", *TABLE, "web-v4-port", "{ 203.0.113.7 . tcp . 22 }")
    d.apply([Remove("web", host, "DROP", scope=atom),
             Remove("web", NET("203.0.113.8/32"), "DROP", scope=Scope("tcp", ((443, 443),)))])
    assert d.elements("web-v4-ports") == d.elements("web-v4-port") == {}


def test_a_new_port_list_replaces_the_old_in_one_transaction(direct: Direct) -> None:
    d = direct
    host, net6 = NET("203.0.113.7/32"), NET("2001:db8:ffff::/64")
    now = time.time()
    d.apply([Add("ssh", host, "REJECT", scope=Scope("tcp", ((2000, 3000),))),
             Add("ssh", net6, "REJECT", now + 600, scope=Scope("udp", ((1000, 2000), (3000, 3000))))])
    # Overlapping wide ranges: the old atom's go and the new atom's come in the same transaction.
    d.apply([Remove("ssh", host, "REJECT", scope=Scope("tcp", ((2000, 3000),))),
             Add("ssh", host, "REJECT", now + 60, scope=Scope("tcp", ((22, 22), (2500, 4000)))),
             Remove("ssh", net6, "REJECT", scope=Scope("udp", ((1000, 2000), (3000, 3000)))),
             Add("ssh", net6, "REJECT", now + 600, scope=Scope("udp", ((1000, 2000), (2500, 4000))))])
    assert set(d.elements("ssh-v4-ports")) == {"203.0.113.7 . tcp . 2500-4000"}
    assert set(d.elements("ssh-v4-port")) == {"203.0.113.7 . tcp . 22"}
    assert {e["timeout"] for n in ("ssh-v4-port", "ssh-v4-ports") for e in d.elements(n).values()} == {60}
    assert set(d.elements("ssh-v6-64-ports")) == {"2001:db8:ffff:: . udp . 1000-2000",
                                                  "2001:db8:ffff:: . udp . 2500-4000"}
    assert d.elements("ssh-v6-64-port") == {}
    assert d.read() == {("ssh", host, Scope("tcp", ((22, 22), (2500, 4000)))): "REJECT",
                        ("ssh", net6, Scope("udp", ((1000, 2000), (2500, 4000)))): "REJECT"}

    # The same after the old atom expired in the kernel (the fallback that does not trust the worker's view),
    # and with two changes of one list in a batch, whose middle atom never reaches the kernel.
    d.nft("flush", "set", *TABLE, "ssh-v4-ports")
    d.apply([Remove("ssh", host, "REJECT", scope=Scope("tcp", ((22, 22), (2500, 4000)))),
             Add("ssh", host, "REJECT", scope=Scope("tcp", ((2000, 3000),))),
             Remove("ssh", host, "REJECT", scope=Scope("tcp", ((2000, 3000),))),
             Add("ssh", host, "REJECT", now + 90, scope=Scope("tcp", ((1000, 3500),)))])
    assert d.elements("ssh-v4-port") == {}
    assert d.elements("ssh-v4-ports") == {"203.0.113.7 . tcp . 1000-3500": d.elements("ssh-v4-ports")[
        "203.0.113.7 . tcp . 1000-3500"]}
    assert d.elements("ssh-v4-ports")["203.0.113.7 . tcp . 1000-3500"]["timeout"] == 90
    d.nft("delete", "element", *TABLE, "ssh-v6-64-ports", "{ 2001:db8:ffff:: . udp . 1000-2000 }")
    d.apply([Remove("ssh", net6, "REJECT", scope=Scope("udp", ((1000, 2000), (2500, 4000)))),
             Add("ssh", net6, "REJECT", scope=Scope("udp", ((1500, 2600),)))])
    assert d.elements("ssh-v6-64-ports") == {"2001:db8:ffff:: . udp . 1500-2600": {}}


@pytest.mark.parametrize("kernel_lost_one", [False, True])
def test_a_new_port_list_moves_ports_across_both_sets(direct: Direct, kernel_lost_one: bool) -> None:
    """Remove(old) + Add(new), where ports move from the hash set to a wide range and a wide range shrinks to
    single ports; with kernel_lost_one, an element of the old atom is gone from the kernel first."""
    d = direct
    host, now = NET("203.0.113.7/32"), time.time()
    old = Scope("tcp", ((22, 22), (80, 80), (8000, 9000)))
    new = Scope("tcp", ((1, 100), (8000, 8010), (8500, 9500)))
    d.apply([Add("web", host, "DROP", now + 600, scope=old)])
    if kernel_lost_one:
        d.nft("delete", "element", *TABLE, "web-v4-port", "{ 203.0.113.7 . tcp . 80 }")
    d.apply([Remove("web", host, "DROP", scope=old), Add("web", host, "DROP", now + 300, scope=new)])
    assert set(d.elements("web-v4-port")) == {f"203.0.113.7 . tcp . {p}" for p in range(8000, 8011)}
    assert set(d.elements("web-v4-ports")) == {"203.0.113.7 . tcp . 1-100", "203.0.113.7 . tcp . 8500-9500"}
    assert {e["timeout"] for n in ("web-v4-port", "web-v4-ports") for e in d.elements(n).values()} == {300}
    assert d.read() == {("web", host, new): "DROP"}
    d.apply([Remove("web", host, "DROP", scope=new), Add("web", host, "DROP", scope=old)])
    assert d.read() == {("web", host, old): "DROP"}
    assert set(d.elements("web-v4-port")) == {"203.0.113.7 . tcp . 22", "203.0.113.7 . tcp . 80"}


def test_read_merges_the_port_elements_it_finds(direct: Direct) -> None:
    d = direct
    d.apply([Add("web", NET("203.0.113.9/32"), "DROP", scope=Scope("udp", ((1, 1), (1000, 2000))))])  # both sets
    d.nft("add", "element", *TABLE, "web-v4-ports", "{ 203.0.113.7 . tcp . 80-90 }")
    d.nft("add", "element", *TABLE, "web-v4-port",
          "{ 203.0.113.7 . tcp . 91, 203.0.113.7 . tcp . 22, 203.0.113.7 . udp . 22 }")
    d.nft("add", "element", *TABLE, "web-v4-port", "{ 203.0.113.7 . icmp . 0 }")  # no protocol of ours
    d.nft("add", "element", *TABLE, "web-v4-ports", "{ 203.0.113.7 . icmp . 0-9 }")
    assert d.read() == {("web", NET("203.0.113.7/32"), Scope("tcp", ((22, 22), (80, 91)))): "DROP",
                        ("web", NET("203.0.113.7/32"), Scope("udp", ((22, 22),))): "DROP",
                        ("web", NET("203.0.113.9/32"), Scope("udp", ((1, 1), (1000, 2000)))): "DROP"}
    # A set of our name but not our type or flags is not ours: its elements are no atoms.
    d.nft("add", "set", *TABLE, "web-v6-ports", "{ type ipv6_addr . inet_service; flags interval; }")
    d.nft("add", "element", *TABLE, "web-v6-ports", "{ 2001:db8::7 . 22 }")
    d.nft("add", "set", *TABLE, "web-v6-port", "{ type ipv6_addr . inet_proto . inet_service; flags interval; }")
    d.nft("add", "element", *TABLE, "web-v6-port", "{ 2001:db8::7 . tcp . 22 }")
    assert len(d.read()) == 3


def test_a_full_scoped_set_is_capacity_exceeded_and_nothing_changes(ns: NetNS) -> None:
    d = Direct(ns, [Chain("small", ("INPUT",), "DROP", backend="nftables", maxelem=3)])
    try:
        host, two = NET("203.0.113.7/32"), Scope("tcp", ((1000, 2000), (3000, 4000)))
        d.apply([Add("small", host, "DROP", scope=two)])
        with pytest.raises(CapacityExceeded):
            d.apply([Add("small", NET("203.0.113.8/32"), "DROP", scope=two)])
        with pytest.raises(CapacityExceeded):  # one atom of two ranges in place of one of four
            d.apply([Remove("small", host, "DROP", scope=two),
                     Add("small", host, "DROP", scope=Scope("tcp", ((1000, 2000), (3000, 4000), (5000, 6000),
                                                                    (7000, 8000))))])
        assert set(d.elements("small-v4-ports")) == {"203.0.113.7 . tcp . 1000-2000", "203.0.113.7 . tcp . 3000-4000"}
        # A change that fits a full set goes through: two overlapping ranges in place of two.
        d.apply([Add("small", NET("203.0.113.9/32"), "DROP", scope=Scope("udp", ((5000, 6000),)))])
        d.apply([Remove("small", host, "DROP", scope=two),
                 Add("small", host, "DROP", scope=Scope("tcp", ((1500, 2500), (3000, 3100))))])
        assert d.read() == {("small", host, Scope("tcp", ((1500, 2500), (3000, 3100)))): "DROP",
                            ("small", NET("203.0.113.9/32"), Scope("udp", ((5000, 6000),))): "DROP"}
        # Full, and a range element of ours gone behind our back: removing its atom still works.
        d.nft("delete", "element", *TABLE, "small-v4-ports", "{ 203.0.113.7 . tcp . 1500-2500 }")
        d.nft("add", "element", *TABLE, "small-v4-ports", "{ 203.0.113.200 . tcp . 1-200 }")
        d.apply([Remove("small", host, "DROP", scope=Scope("tcp", ((1500, 2500), (3000, 3100))))])
        assert set(d.elements("small-v4-ports")) == {"203.0.113.9 . udp . 5000-6000", "203.0.113.200 . tcp . 1-200"}

        # The hash set of single ports counts each port: three fit, a fourth does not.
        d.apply([Add("small", host, "DROP", scope=Scope("udp", ((53, 55),)))])
        with pytest.raises(CapacityExceeded):
            d.apply([Add("small", NET("203.0.113.8/32"), "DROP", scope=Scope("udp", ((53, 53),)))])
        with pytest.raises(CapacityExceeded):
            d.apply([Remove("small", host, "DROP", scope=Scope("udp", ((53, 55),))),
                     Add("small", host, "DROP", scope=Scope("udp", ((53, 56),)))])
        assert set(d.elements("small-v4-port")) == {f"203.0.113.7 . udp . {p}" for p in (53, 54, 55)}
    finally:
        d.call(d.backend.close)


def test_missing_counts_the_scoped_sets(direct: Direct) -> None:
    d = direct
    d.apply([Add("web", NET("203.0.113.0/24"), "DROP", scope=Scope("tcp", ((22, 22), (1000, 2000))))])
    chain = [d.chains["web"]]
    assert d.call(lambda: d.backend.missing(chain, {"web": 1})) is None
    d.nft("flush", "chain", *TABLE, "web")  # another program's transaction: the rules come back at once
    assert d.call(lambda: d.backend.missing(chain, {"web": 1})) is None
    assert "@web-v4-24-port drop" in d.nft("list", "chain", *TABLE, "web")
    for name in ("web-v4-24-port", "web-v4-24-ports"):
        d.nft("flush", "chain", *TABLE, "web")
        d.nft("delete", "set", *TABLE, name)
        gone = d.call(lambda: d.backend.missing(chain, {"web": 1}))
        assert gone is not None and name in gone


# -- real packets ----------------------------------------------------------------------------------------------


@pytest.fixture
def pair(ns: NetNS, peer: NetNS) -> Iterator[tuple[Direct, NetNS]]:
    """The backend in `ns` with a veth to `peer` (SERVER4/6 here, PEER4/6 there)."""
    veth_pair(ns, peer)
    d = Direct(ns, chains())
    try:
        yield d, peer
    finally:
        d.call(d.backend.close)


def tcp_attempt(peer: NetNS, host: str, port: int, timeout: float = 1.0) -> str:
    try:
        peer.connect(host, port, timeout=timeout).close()
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    return "ok"


def raw_reaches(ns: NetNS, peer: NetNS, proto: str, port: int, family: int = socket.AF_INET) -> bool:
    """Whether a packet of `proto` to `port` from the peer arrives: a raw socket in `ns` sees every packet of
    its protocol that the input hook let through, whether or not the kernel has the protocol (dccp is gone
    since Linux 6.16). The packet is the first four bytes of the header, source and destination port."""
    number = PROTOCOLS[proto]
    server = SERVER4 if family == socket.AF_INET else SERVER6
    rx = ns.socket(family, socket.SOCK_RAW, number)
    tx = peer.socket(family, socket.SOCK_RAW, number)
    try:
        rx.settimeout(0.5)
        payload = struct.pack("!HH", 40000, port) + bytes(28)
        tx.sendto(payload, (server, 0))
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                data = rx.recv(2048)
            except TimeoutError:
                return False
            # IPv4 raw sockets get the IP header too; IPv6 ones the payload only.
            body = data[(data[0] & 0x0F) * 4:] if family == socket.AF_INET else data
            if body[:4] == payload[:4]:
                return True
        return False
    finally:
        rx.close()
        tx.close()


def test_packets_tcp_ports_udp_and_a_whole_protocol(pair: tuple[Direct, NetNS]) -> None:
    d, peer = pair
    listeners = [Listener(d.ns, host, port) for host in (SERVER4, SERVER6) for port in (2222, 8080)]
    try:
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 9, timeout=10) == "refused"  # neighbours resolved
            assert tcp_attempt(peer, host, 2222) == tcp_attempt(peer, host, 8080) == "ok"
        d.apply([Add("web", NET(f"{PEER4}/32"), "DROP", scope=Scope("tcp", ((2222, 2222),))),
                 Add("web", NET("2001:db8::/64"), "DROP", scope=Scope("tcp", ((2000, 2300),)))])
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 2222) == "timeout"
            assert tcp_attempt(peer, host, 8080) == "ok"

        # A udp block does not touch tcp.
        d.apply([Remove("web", NET(f"{PEER4}/32"), "DROP", scope=Scope("tcp", ((2222, 2222),))),
                 Add("web", NET(f"{PEER4}/32"), "DROP", scope=Scope("udp", ((2222, 2222),)))])
        assert tcp_attempt(peer, SERVER4, 2222) == "ok"
        assert not raw_reaches(d.ns, peer, "udp", 2222) and raw_reaches(d.ns, peer, "udp", 2223)

        # A whole protocol (kind 2), REJECT: every tcp port, not udp.
        d.apply([Add("ssh", NET("198.51.100.0/24"), "REJECT", scope=Scope("tcp"))])
        assert tcp_attempt(peer, SERVER4, 8080) == tcp_attempt(peer, SERVER4, 2222) == "refused"
        assert raw_reaches(d.ns, peer, "udp", 2223)
        assert tcp_attempt(peer, SERVER6, 8080) == "ok"
        d.apply([Remove("ssh", NET("198.51.100.0/24"), "REJECT", scope=Scope("tcp"))])
        assert tcp_attempt(peer, SERVER4, 8080) == "ok"
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.parametrize("proto", sorted(PROTOCOLS))
def test_packets_th_dport_matches_every_protocol_with_ports(pair: tuple[Direct, NetNS], proto: str) -> None:
    d, peer = pair
    for family in (socket.AF_INET, socket.AF_INET6):
        assert raw_reaches(d.ns, peer, proto, 5000, family) or raw_reaches(d.ns, peer, proto, 5000, family)
    d.apply([Add("web", NET(f"{PEER4}/32"), "DROP", scope=Scope(proto, ((5000, 5000),))),
             Add("web", NET(f"{PEER6}/128"), "DROP", scope=Scope(proto, ((4990, 5010),)))])
    for family in (socket.AF_INET, socket.AF_INET6):
        assert not raw_reaches(d.ns, peer, proto, 5000, family), (proto, family)
        assert raw_reaches(d.ns, peer, proto, 5011, family), (proto, family)
    other = "udp" if proto != "udp" else "tcp"
    assert raw_reaches(d.ns, peer, other, 5000)


# -- allow chains: one base chain per hook and priority --------------------------------------------------------


def allow_chains(*names: str) -> list[Chain]:
    """Chains of the config, in its order, by name: `ok...` are allow chains (`okif` matches eth*), `out` hooks
    OUTPUT, the others are block chains at INPUT."""
    made = []
    for name in names:
        if name.startswith("ok"):
            made.append(Chain(name, ("INPUT",), "ACCEPT", backend="nftables",
                              interface="eth+" if name == "okif" else None))
        elif name == "out":
            made.append(Chain(name, ("OUTPUT",), "DROP", backend="nftables", match="destination"))
        else:
            made.append(Chain(name, ("INPUT",), "REJECT" if name == "ssh" else "DROP", backend="nftables"))
    return made


def base_chains(d: Direct) -> dict[str, list[str]]:
    """The base chains of our table -> their rules as nft prints them."""
    found = {}
    for item in json.loads(d.nft("-j", "list", "chains", "inet"))["nftables"]:
        chain = item.get("chain", {})
        if chain.get("table") == "web-ipt-d" and "hook" in chain:
            text = d.nft("list", "chain", *TABLE, chain["name"])
            found[chain["name"]] = [line.strip() for line in text.splitlines()[2:-2] if "type filter" not in line]
    return found


def test_allow_chains_jump_first_in_the_one_base_chain_of_their_hook(ns: NetNS) -> None:
    d = Direct(ns, allow_chains("web", "ok", "out", "ssh", "okif"))
    try:
        assert base_chains(d) == {"input.-10": ["jump ok", 'iifname "eth*" jump okif', "jump web", "jump ssh"],
                                  "output.-10": ["jump out"]}
        d.apply([Add("ok", NET("203.0.113.7/32"), "ACCEPT"), Add("ok", NET("203.0.113.0/24"), "ACCEPT",
                                                                 scope=Scope("tcp", ((8080, 8080),)))])
        assert d.nft("list", "chain", *TABLE, "ok").splitlines()[2:-2] == [
            "\t\tip saddr & 255.255.255.0 . meta l4proto . th dport @ok-v4-24-port accept",
            "\t\tip saddr @ok-v4 accept", "\t\tip6 saddr @ok-v6 accept"]
        assert d.read("ok") == {("ok", NET("203.0.113.7/32"), None): "ACCEPT",
                                ("ok", NET("203.0.113.0/24"), Scope("tcp", ((8080, 8080),))): "ACCEPT"}
        fresh = d.call(NftablesBackend)  # one that has not prepared: the verdicts come from the rules
        try:
            assert dict(d.call(lambda: fresh.read(["ok", "web"])))[("ok", NET("203.0.113.7/32"), None)] == "ACCEPT"
        finally:
            d.call(fresh.close)

        # Another program's transactions: a flushed base chain is re-made whole, in order, by the kernel check
        # and by the next batch, whichever comes first.
        every = list(d.chains.values())
        d.nft("flush", "chain", *TABLE, "input.-10")
        assert d.call(lambda: d.backend.missing(every, {"ok": 2})) is None
        assert base_chains(d)["input.-10"] == ["jump ok", 'iifname "eth*" jump okif', "jump web", "jump ssh"]
        d.nft("flush", "chain", *TABLE, "input.-10")
        d.nft("add", "rule", *TABLE, "input.-10", "jump web")
        d.nft("add", "rule", *TABLE, "input.-10", "jump ok")
        assert d.call(lambda: d.backend.missing(every, {})) is None  # no entries: still put back in order
        assert base_chains(d)["input.-10"] == ["jump ok", 'iifname "eth*" jump okif', "jump web", "jump ssh"]
        d.nft("flush", "chain", *TABLE, "input.-10")
        d.nft("add", "rule", *TABLE, "input.-10", "jump web")
        d.apply([Add("web", NET("203.0.113.9/32"), "DROP")])
        assert base_chains(d)["input.-10"] == ["jump ok", 'iifname "eth*" jump okif', "jump web", "jump ssh"]
        d.nft("delete", "chain", *TABLE, "input.-10")
        gone = d.call(lambda: d.backend.missing(every, {"web": 1}))
        assert gone is not None and "input.-10" in gone
    finally:
        d.call(d.backend.close)


def test_a_reload_remakes_the_base_chains_whole_and_keeps_the_allow_jumps_first(ns: NetNS) -> None:
    d = Direct(ns, allow_chains("web", "ok"))
    try:
        d.apply([Add("ok", NET("203.0.113.7/32"), "ACCEPT"), Add("web", NET("203.0.113.8/32"), "DROP")])
        # A new block chain before the allow chain in the config, a second allow chain, one at OUTPUT.
        d.call(lambda: d.backend.prepare(allow_chains("mail", "web", "ok", "out", "ok2")))
        assert base_chains(d) == {"input.-10": ["jump ok", "jump ok2", "jump mail", "jump web"],
                                  "output.-10": ["jump out"]}
        # A chain gone from the config loses its jump; a hook or priority no chain has any more, its base chain.
        web = Chain("web", ("INPUT",), "DROP", backend="nftables", priority=-20)
        d.call(lambda: d.backend.prepare([*allow_chains("ok"), web]))
        assert base_chains(d) == {"input.-10": ["jump ok"], "input.-20": ["jump web"]}
        assert d.read("ok", "web") == {("ok", NET("203.0.113.7/32"), None): "ACCEPT",
                                       ("web", NET("203.0.113.8/32"), None): "DROP"}
    finally:
        d.call(d.backend.close)


def test_an_upgrade_from_per_chain_base_chains_leaves_only_the_shared_ones(ns: NetNS) -> None:
    """The layout of earlier releases: a base chain `<chain>.<hook>` per chain and hook, each with its jump."""
    ns.run(["nft", "-f", "/dev/stdin"], input="""
table inet web-ipt-d {
    set web-v4 { type ipv4_addr; size 65536; flags timeout; elements = { 203.0.113.7 } }
    chain web { ip saddr @web-v4 drop; }
    chain ssh { }
    chain web.input { type filter hook input priority -10; policy accept; jump web; }
    chain ssh.input { type filter hook input priority -10; policy accept; jump ssh; }
    chain ssh.output { type filter hook output priority -10; policy accept; jump ssh; }
}
""")
    d = Direct(ns, allow_chains("web", "ssh", "ok"))
    try:
        assert base_chains(d) == {"input.-10": ["jump ok", "jump web", "jump ssh"]}
        assert d.read() == {("web", NET("203.0.113.7/32"), None): "DROP"}
        d.call(lambda: d.backend.prepare(allow_chains("web", "ssh", "ok")))  # and again: nothing twice
        assert base_chains(d) == {"input.-10": ["jump ok", "jump web", "jump ssh"]}
    finally:
        d.call(d.backend.close)


def test_packets_an_allow_chain_overrules_the_block_chains(ns: NetNS, peer: NetNS) -> None:
    veth_pair(ns, peer)
    d = Direct(ns, allow_chains("web", "ok"))
    listeners = [Listener(ns, host, port) for host in (SERVER4, SERVER6) for port in (2222, 8080)]
    try:
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 9, timeout=10) == "refused"  # neighbours resolved
        d.apply([Add("web", NET(f"{PEER4}/32"), "DROP"), Add("web", NET("2001:db8::/64"), "DROP")])
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 8080) == tcp_attempt(peer, host, 2222) == "timeout"

        d.apply([Add("ok", NET(f"{PEER4}/32"), "ACCEPT"), Add("ok", NET(f"{PEER6}/128"), "ACCEPT")])
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 8080) == tcp_attempt(peer, host, 2222) == "ok"

        # Allowed on tcp/8080 only: the block chain still drops the rest.
        d.apply([Remove("ok", NET(f"{PEER4}/32"), "ACCEPT"), Remove("ok", NET(f"{PEER6}/128"), "ACCEPT"),
                 Add("ok", NET(f"{PEER4}/32"), "ACCEPT", scope=Scope("tcp", ((8080, 8080),))),
                 Add("ok", NET("2001:db8::/64"), "ACCEPT", scope=Scope("tcp", ((8000, 8100),)))])
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 8080) == "ok"
            assert tcp_attempt(peer, host, 2222) == "timeout"

        # Out of the allow chain: dropped again.
        d.apply([Remove("ok", NET(f"{PEER4}/32"), "ACCEPT", scope=Scope("tcp", ((8080, 8080),))),
                 Remove("ok", NET("2001:db8::/64"), "ACCEPT", scope=Scope("tcp", ((8000, 8100),)))])
        for host in (SERVER4, SERVER6):
            assert tcp_attempt(peer, host, 8080) == "timeout"
    finally:
        for listener in listeners:
            listener.close()
        d.call(d.backend.close)
