"""The ipset backend's scoped entries, the backend on its own in a namespace: the port set (hash:net,port) and the
protocol sets with their match rules, kernel timeouts, a change of a port union in one apply, undo on failure, a full
port set, the `ipset restore` path, the kernel check, and real packets over a veth pair.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import PEER4, PEER6, SERVER4, SERVER6, Listener
from tests.netns import NetNS, veth_pair
from tests.test_backend_ipset import Direct, in_window
from webiptd.config import Chain
from webiptd.firewall import ipset as ipset_backend
from webiptd.firewall.ipset_netlink import SEND_MAX, IpsetError
from webiptd.firewall.ops import Add, CapacityExceeded, Key, Op, Remove
from webiptd.scope import Scope

pytestmark = [pytest.mark.root]

NET = ipaddress.ip_network
REJECT_WITH = {4: "icmp-port-unreachable", 6: "icmp6-port-unreachable"}
TCP22 = Scope("tcp", ((22, 22),))


def port_members(ns: NetNS, name: str) -> dict[str, int]:
    """{"NET,PROTO:PORT": kernel timeout} of a set, from `ipset list` (networks in CIDR form)."""
    out = ns.run(["ipset", "list", name]).stdout
    found: dict[str, int] = {}
    for line in out.partition("Members:\n")[2].splitlines():
        words = line.split()
        if words:
            network, _, rest = words[0].rpartition(",")
            key = f"{ipaddress.ip_network(network)},{rest}" if network else str(ipaddress.ip_network(rest))
            found[key] = int(words[words.index("timeout") + 1]) if "timeout" in words else -1
    return found


def set_type(ns: NetNS, name: str) -> tuple[str, str]:
    """(type, header) of a set, from `ipset list -t`."""
    out = ns.run(["ipset", "list", "-t", name]).stdout
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    return fields["Type"], fields["Header"]


def chain_rules(ns: NetNS, chain: str, family: int = 4) -> list[str]:
    return [r for r in ns.iptables_save(family).splitlines() if r.startswith(f"-A {chain} ")]


def set_names(ns: NetNS) -> set[str]:
    return set(ns.run(["ipset", "list", "-n"]).stdout.split())


CHAINS = [Chain("f2b-sc", ("INPUT",), "DROP", backend="ipset", maxelem=65536),
          Chain("rej-sc", ("INPUT",), "REJECT", backend="ipset", maxelem=65536),
          Chain("out-sc", ("OUTPUT",), "REJECT", backend="ipset", maxelem=65536, match="destination"),
          Chain("small", ("INPUT",), "DROP", backend="ipset", maxelem=4)]


@pytest.fixture
def direct(ns: NetNS, workdir: Path) -> Iterator[Direct]:
    d = Direct(ns, workdir / "xtables.lock", CHAINS)  # a private lock file: never the host's
    try:
        yield d
    finally:
        d.call(d.backend.close)


def read(d: Direct, *chains: str) -> dict[Key, str]:
    return dict(d.call(lambda: d.backend.read(list(chains) or list(d.chains))))


def missing(d: Direct, counts: dict[str, int]) -> str | None:
    return d.call(lambda: d.backend.missing(list(d.chains.values()), counts))


# -- the kernel forms ---------------------------------------------------------------------------------

def test_sets_and_match_rules_of_each_kind_for_both_families(direct: Direct) -> None:
    ns = direct.ns
    # Before any scoped block: one set and one rule per chain and family, as ever.
    assert chain_rules(ns, "f2b-sc") == ["-A f2b-sc -m set --match-set f2b-sc-v4 src -j DROP"]
    assert not any(n.endswith(("-p4", "-t4", "-p6")) for n in set_names(ns))
    now = time.time()
    ops: list[Op] = []
    for chain, target in (("f2b-sc", "DROP"), ("rej-sc", "REJECT"), ("out-sc", "REJECT")):
        ops += [Add(chain, NET("203.0.113.1/32"), target, now + 600, Scope("tcp", ((22, 22), (80, 82)))),
                Add(chain, NET("2001:db8:ffff::/64"), target, None, Scope("udp", ((53, 53),))),
                Add(chain, NET("203.0.113.2/32"), target, None, Scope("tcp")),
                Add(chain, NET("2001:db8:ffff::2/128"), target, None, Scope("udplite")),
                Add(chain, NET("203.0.113.3/32"), target, None, Scope("dccp")),
                Add(chain, NET("203.0.113.4/32"), target, None, Scope("sctp", ((9, 9),)))]
    direct.apply(ops)
    for chain, target, addr in (("f2b-sc", "DROP", "src"), ("rej-sc", "REJECT", "src"), ("out-sc", "REJECT", "dst")):
        for family in (4, 6):
            reject = f" --reject-with {REJECT_WITH[family]}" if target == "REJECT" else ""
            expected = [f"-A {chain} -m set --match-set {chain}-v{family} {addr} -j {target}{reject}",
                        f"-A {chain} -m set --match-set {chain}-p{family} {addr},dst -j {target}{reject}"]
            protos = [("tcp", "t"), ("dccp", "d")] if family == 4 else [("udplite", "l")]
            expected += [f"-A {chain} -p {p} -m set --match-set {chain}-{letter}{family} {addr} -j {target}{reject}"
                         for p, letter in protos]
            assert chain_rules(ns, chain, family) == expected
            kind, header = set_type(ns, f"{chain}-p{family}")
            assert kind == "hash:net,port" and "maxelem 65536 timeout 0" in header, header
            assert f"family {'inet' if family == 4 else 'inet6'}" in header
            for _, letter in protos:
                kind, header = set_type(ns, f"{chain}-{letter}{family}")
                assert kind == "hash:net" and "maxelem 65536 timeout 0" in header
        v4 = port_members(ns, f"{chain}-p4")
        assert set(v4) == {"203.0.113.1/32,tcp:22", "203.0.113.1/32,tcp:80", "203.0.113.1/32,tcp:81",
                           "203.0.113.1/32,tcp:82", "203.0.113.4/32,sctp:9"}
        assert port_members(ns, f"{chain}-p6") == {"2001:db8:ffff::/64,udp:53": 0}
        assert set(port_members(ns, f"{chain}-t4")) == {"203.0.113.2/32"}
        assert set(port_members(ns, f"{chain}-l6")) == {"2001:db8:ffff::2/128"}
        assert f"{chain}-u4" not in set_names(ns)  # made when first needed only
    # read() gives back each atom, the ports of one (network, protocol) as one scope.
    assert read(direct, "f2b-sc") == {
        ("f2b-sc", NET("203.0.113.1/32"), Scope("tcp", ((22, 22), (80, 82)))): "DROP",
        ("f2b-sc", NET("2001:db8:ffff::/64"), Scope("udp", ((53, 53),))): "DROP",
        ("f2b-sc", NET("203.0.113.2/32"), Scope("tcp")): "DROP",
        ("f2b-sc", NET("2001:db8:ffff::2/128"), Scope("udplite")): "DROP",
        ("f2b-sc", NET("203.0.113.3/32"), Scope("dccp")): "DROP",
        ("f2b-sc", NET("203.0.113.4/32"), Scope("sctp", ((9, 9),))): "DROP"}
    assert missing(direct, {"f2b-sc": 6, "rej-sc": 6, "out-sc": 6}) is None
    # A prepare again (a restart) changes nothing: no second rule, no set made or lost.
    def state() -> tuple[list[str], list[str], set[str]]:
        return ([r for r in ns.iptables_save(4).splitlines() if r.startswith("-A ")],
                [r for r in ns.iptables_save(6).splitlines() if r.startswith("-A ")], set_names(ns))

    before = state()
    direct.call(lambda: direct.backend.prepare(CHAINS))
    assert state() == before
    # dccp ports cannot be matched by ipset: refused before anything changes.
    with pytest.raises(ValueError, match="dccp"):
        direct.apply([Add("f2b-sc", NET("203.0.113.9/32"), "DROP", None, Scope("tcp", ((1, 1),))),
                      Add("f2b-sc", NET("203.0.113.9/32"), "DROP", None, Scope("dccp", ((1, 1),)))])
    assert "203.0.113.9/32,tcp:1" not in port_members(ns, "f2b-sc-p4")


def test_a_new_target_replaces_every_match_rule(direct: Direct) -> None:
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", None, TCP22),
                  Add("f2b-sc", NET("203.0.113.1/32"), "DROP", None, Scope("udp"))])
    changed = Chain("f2b-sc", ("INPUT",), "REJECT", backend="ipset", maxelem=65536)
    direct.call(lambda: direct.backend.prepare([changed]))
    r = " --reject-with icmp-port-unreachable"
    assert chain_rules(direct.ns, "f2b-sc") == [
        f"-A f2b-sc -m set --match-set f2b-sc-v4 src -j REJECT{r}",
        f"-A f2b-sc -m set --match-set f2b-sc-p4 src,dst -j REJECT{r}",
        f"-A f2b-sc -p udp -m set --match-set f2b-sc-u4 src -j REJECT{r}"]
    assert set(read(direct, "f2b-sc").values()) == {"REJECT"}


# -- timeouts, changes, undo ----------------------------------------------------------------------------

def test_port_elements_take_the_atoms_timeout_and_an_add_again_refreshes_it(direct: Direct) -> None:
    now = time.time()
    scope = Scope("tcp", ((22, 22), (80, 81)))
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", now + 600, scope),
                  Add("f2b-sc", NET("2001:db8:ffff::1/128"), "DROP", None, Scope("udp", ((53, 53),)))])
    p4 = port_members(direct.ns, "f2b-sc-p4")
    assert set(p4) == {"203.0.113.1/32,tcp:22", "203.0.113.1/32,tcp:80", "203.0.113.1/32,tcp:81"}
    assert all(in_window(t, 600) for t in p4.values()), p4
    assert port_members(direct.ns, "f2b-sc-p6") == {"2001:db8:ffff::1/128,udp:53": 0}
    # The same atom again (as the worker sends it, replaces or not): every element takes the new time.
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", now + 3600, scope, replaces=True)])
    assert all(in_window(t, 3600) for t in port_members(direct.ns, "f2b-sc-p4").values())
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", None, scope)])
    assert set(port_members(direct.ns, "f2b-sc-p4").values()) == {0}
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", now + 300, scope)])
    assert all(in_window(t, 300) for t in port_members(direct.ns, "f2b-sc-p4").values())
    # A protocol entry, as an entry of all traffic.
    direct.apply([Add("f2b-sc", NET("203.0.113.5/32"), "DROP", now + 900, Scope("tcp"))])
    assert in_window(port_members(direct.ns, "f2b-sc-t4")["203.0.113.5/32"], 900)
    direct.apply([Add("f2b-sc", NET("203.0.113.5/32"), "DROP", now + 90, Scope("tcp"), replaces=True)])
    assert in_window(port_members(direct.ns, "f2b-sc-t4")["203.0.113.5/32"], 90)
    # Removes: of an atom, and of one partly or wholly gone, are no error.
    direct.ns.run(["ipset", "del", "f2b-sc-p4", "203.0.113.1,tcp:80"])
    direct.apply([Remove("f2b-sc", NET("203.0.113.1/32"), "DROP", scope),
                  Remove("f2b-sc", NET("203.0.113.7/32"), "DROP", TCP22),
                  Remove("f2b-sc", NET("203.0.113.5/32"), "DROP", Scope("tcp")),
                  Remove("f2b-sc", NET("203.0.113.5/32"), "DROP", Scope("udp"))])  # its set does not exist
    assert port_members(direct.ns, "f2b-sc-p4") == {} and port_members(direct.ns, "f2b-sc-t4") == {}


def test_a_changed_union_is_one_apply_and_read_merges(direct: Direct) -> None:
    now = time.time()
    host = NET("203.0.113.1/32")
    old, new = Scope("tcp", ((22, 22), (80, 81))), Scope("tcp", ((22, 22), (443, 443)))
    direct.apply([Add("f2b-sc", host, "DROP", now + 600, old),
                  Add("f2b-sc", host, "DROP", now + 600, Scope("udp", ((53, 53),)))])  # another protocol: apart
    direct.apply([Remove("f2b-sc", host, "DROP", old), Add("f2b-sc", host, "DROP", now + 900, new)])
    p4 = port_members(direct.ns, "f2b-sc-p4")
    assert set(p4) == {"203.0.113.1/32,tcp:22", "203.0.113.1/32,tcp:443", "203.0.113.1/32,udp:53"}, p4
    assert in_window(p4["203.0.113.1/32,tcp:22"], 900) and in_window(p4["203.0.113.1/32,udp:53"], 600)
    assert read(direct, "f2b-sc") == {("f2b-sc", host, new): "DROP",
                                      ("f2b-sc", host, Scope("udp", ((53, 53),))): "DROP"}
    # Elements of one atom added apart (one port at a time, by hand) read back as one scope.
    for port in (25, 26, 27, 30):
        direct.ns.run(["ipset", "add", "f2b-sc-p4", f"203.0.113.2,tcp:{port}", "timeout", "0"])
    assert read(direct, "f2b-sc")[("f2b-sc", NET("203.0.113.2/32"), Scope("tcp", ((25, 27), (30, 30))))] == "DROP"


def test_a_failure_in_the_middle_undoes_the_changed_union(direct: Direct) -> None:
    now = time.time()
    host = NET("203.0.113.1/32")
    old, new = Scope("tcp", ((22, 22), (80, 81))), Scope("tcp", ((22, 22), (443, 444)))
    direct.apply([Add("f2b-sc", host, "DROP", now + 600, old),
                  Add("f2b-sc", NET("203.0.113.9/32"), "DROP", now + 600, TCP22)])
    before = port_members(direct.ns, "f2b-sc-p4")
    first = [Add("f2b-sc", NET(ipaddress.ip_address("198.18.0.0") + i), "DROP", now + 600, TCP22)
             for i in range(SEND_MAX + 10)]  # more than one send
    failing = Add("gone", NET("203.0.113.50/32"), "DROP", now + 600, TCP22)  # a chain without sets
    ops: list[Op] = [*first, Remove("f2b-sc", host, "DROP", old), Add("f2b-sc", host, "DROP", now + 900, new),
                     Remove("f2b-sc", NET("203.0.113.9/32"), "DROP", TCP22),
                     Add("f2b-sc", NET("203.0.113.10/32"), "DROP", None, Scope("udp")),
                     failing, Add("f2b-sc", NET("203.0.113.11/32"), "DROP", None, Scope("sctp", ((5, 6),)))]
    with pytest.raises(IpsetError, match="gone-p4"):
        direct.apply(ops)
    after = port_members(direct.ns, "f2b-sc-p4")
    # As before: the old union's ports are there (those the batch refreshed or took out without a kernel timeout:
    # the worker keeps their time), the new ports are gone, and so is everything else the batch added.
    assert set(after) == set(before), after
    assert after["203.0.113.1/32,tcp:22"] == 0 and after["203.0.113.1/32,tcp:80"] == 0
    assert after["203.0.113.9/32,tcp:22"] == 0
    assert "f2b-sc-u4" not in set_names(direct.ns) or port_members(direct.ns, "f2b-sc-u4") == {}


def test_a_full_port_set_is_capacity_exceeded_and_leaves_nothing_behind(direct: Direct) -> None:
    now = time.time()
    direct.apply([Add("small", NET("203.0.113.1/32"), "DROP", now + 500, TCP22),
                  Add("small", NET("203.0.113.2/32"), "DROP", now + 500, TCP22)])
    before = port_members(direct.ns, "small-p4")
    # Four ports into three places (one freed): the kernel adds three of the range, then is full.
    with pytest.raises(CapacityExceeded, match="small-p4"):
        direct.apply([Remove("small", NET("203.0.113.1/32"), "DROP", TCP22),
                      Add("small", NET("203.0.113.3/32"), "DROP", now + 600, Scope("tcp", ((1, 4),))),
                      Add("small", NET("203.0.113.2/32"), "DROP", now + 900, TCP22)])
    after = port_members(direct.ns, "small-p4")
    assert set(after) == set(before) and after["203.0.113.1/32,tcp:22"] == 0, after
    assert in_window(after["203.0.113.2/32,tcp:22"], 500)
    # What fits still goes in, up to the last place; a refresh of a full set still works.
    direct.apply([Add("small", NET("203.0.113.3/32"), "DROP", now + 600, Scope("tcp", ((1, 2),)))])
    direct.apply([Add("small", NET("203.0.113.3/32"), "DROP", now + 60, Scope("tcp", ((1, 2),)), replaces=True)])
    assert in_window(port_members(direct.ns, "small-p4")["203.0.113.3/32,tcp:1"], 60)


def test_big_batches_of_scoped_atoms_go_through_ipset_restore_with_the_same_result(direct: Direct) -> None:
    now = time.time()
    base = ipaddress.ip_address("198.18.0.0")
    adds: list[Op] = [Add("f2b-sc", NET(base + i), "DROP", now + 600, TCP22) for i in range(ipset_backend.BULK_MIN)]
    adds += [Add("f2b-sc", NET("203.0.113.1/32"), "DROP", now + 300, Scope("udp", ((80, 90),))),
             Add("f2b-sc", NET("203.0.113.2/32"), "DROP", None, Scope("tcp"))]
    direct.apply(adds)  # the port and protocol sets do not exist yet: netlink makes them
    p4 = port_members(direct.ns, "f2b-sc-p4")
    assert len(p4) == ipset_backend.BULK_MIN + 11 and all(in_window(t, 600) for k, t in p4.items() if "tcp" in k)
    half = ipset_backend.BULK_MIN // 2
    mixed: list[Op] = [Remove("f2b-sc", NET(base + i), "DROP", TCP22) for i in range(half)]
    mixed += [Add("f2b-sc", NET(base + i), "DROP", None, TCP22) for i in range(half, 2 * half)]
    mixed += [Remove("f2b-sc", NET("203.0.113.1/32"), "DROP", Scope("udp", ((80, 90),))),
              Add("f2b-sc", NET("203.0.113.1/32"), "DROP", now + 900, Scope("udp", ((85, 95),))),
              Add("f2b-sc", NET("2001:db8:ffff::1/128"), "DROP", now + 300, Scope("sctp", ((7, 8),))),
              Remove("f2b-sc", NET("203.0.113.2/32"), "DROP", Scope("tcp"))]
    direct.apply(mixed)  # every set exists now: one restore
    p4 = port_members(direct.ns, "f2b-sc-p4")
    want = {f"{base + i}/32,tcp:22" for i in range(half, 2 * half)} | {
        f"203.0.113.1/32,udp:{p}" for p in range(85, 96)}
    assert set(p4) == want and all(in_window(p4[f"203.0.113.1/32,udp:{p}"], 900) for p in range(85, 96))
    assert {t for k, t in p4.items() if "tcp" in k} == {0}
    p6 = port_members(direct.ns, "f2b-sc-p6")
    assert set(p6) == {"2001:db8:ffff::1/128,sctp:7", "2001:db8:ffff::1/128,sctp:8"}
    assert port_members(direct.ns, "f2b-sc-t4") == {}
    found = read(direct, "f2b-sc")
    assert found[("f2b-sc", NET("203.0.113.1/32"), Scope("udp", ((85, 95),)))] == "DROP" and len(found) == half + 2


def test_a_big_batch_that_overflows_the_port_set_fails_whole(direct: Direct) -> None:
    direct.apply([Add("small", NET("203.0.113.1/32"), "DROP", None, TCP22)])
    base = ipaddress.ip_address("198.18.0.0")
    ops: list[Op] = [Remove("small", NET("203.0.113.1/32"), "DROP", TCP22)]
    ops += [Add("small", NET(base + i), "DROP", None, TCP22) for i in range(ipset_backend.BULK_MIN)]
    with pytest.raises(CapacityExceeded):
        direct.apply(ops)
    assert port_members(direct.ns, "small-p4") == {"203.0.113.1/32,tcp:22": 0}


def test_the_kernel_check_sees_a_flushed_port_set_and_a_lost_rule(direct: Direct) -> None:
    direct.apply([Add("f2b-sc", NET("203.0.113.1/32"), "DROP", None, Scope("tcp", ((80, 82),))),
                  Add("f2b-sc", NET("203.0.113.2/32"), "DROP", None, TCP22),
                  Add("f2b-sc", NET("203.0.113.3/32"), "DROP", None, Scope("udp"))])
    counts = {"f2b-sc": 3}
    assert missing(direct, counts) is None
    direct.ns.run(["ipset", "flush", "f2b-sc-p4"])
    found = missing(direct, counts)
    assert found is not None and "f2b-sc" in found, found
    direct.apply([Add("f2b-sc", NET("203.0.113.2/32"), "DROP", None, TCP22),
                  Add("f2b-sc", NET("203.0.113.1/32"), "DROP", None, Scope("tcp", ((80, 82),)))])
    assert missing(direct, counts) is None
    # The protocol set's rule goes: the check says so, and a prepare puts it back.
    direct.ns.run(["iptables-legacy", "-w", "-D", "f2b-sc", "-p", "udp", "-m", "set", "--match-set", "f2b-sc-u4",
                   "src", "-j", "DROP"])
    found = missing(direct, counts)
    assert found is not None and "f2b-sc-u4" in found, found
    direct.call(lambda: direct.backend.prepare(CHAINS))
    assert missing(direct, counts) is None
    assert "-A f2b-sc -p udp -m set --match-set f2b-sc-u4 src -j DROP" in chain_rules(direct.ns, "f2b-sc")


# -- real packets ------------------------------------------------------------------------------------

def reaches(peer: NetNS, host: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> bool:
    """Whether a connect (tcp) or a datagram with an echo (udp) from the peer gets through."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if proto == "tcp":
        try:
            peer.connect(host, port, timeout=timeout).close()
            return True
        except (TimeoutError, ConnectionRefusedError):
            return False
    sock = peer.socket(family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        sock.sendto(b"ping", (host, port))
        try:
            return sock.recv(16) == b"ping"
        except (TimeoutError, ConnectionRefusedError):
            return False
    finally:
        sock.close()


class Echo:
    """A UDP echo in `ns`, from a thread of its own."""

    def __init__(self, ns: NetNS, host: str, port: int):
        self.sock = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, address = self.sock.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, address)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def linked(ns: NetNS, peer: NetNS, workdir: Path) -> Iterator[tuple[Direct, NetNS]]:
    veth_pair(ns, peer)
    d = Direct(ns, workdir / "xtables.lock", CHAINS[:1])
    servers: list[Listener | Echo] = []
    try:
        for host in (SERVER4, SERVER6):
            servers += [Listener(ns, host, 2222), Listener(ns, host, 8080), Echo(ns, host, 2222)]
        for host in (SERVER4, SERVER6):  # the first packets of a new link may go to neighbour discovery
            deadline = time.monotonic() + 10
            while not reaches(peer, host, 8080) and time.monotonic() < deadline:
                time.sleep(0.2)
        yield d, peer
    finally:
        for server in servers:
            server.close()
        d.call(d.backend.close)


@pytest.mark.parametrize("server, peer_net", [(SERVER4, f"{PEER4}/32"), (SERVER6, f"{PEER6}/128")])
def test_packets_a_port_block_a_udp_block_and_a_protocol_block(linked: tuple[Direct, NetNS], server: str,
                                                              peer_net: str) -> None:
    d, peer = linked
    network = NET(peer_net)
    assert reaches(peer, server, 2222) and reaches(peer, server, 8080) and reaches(peer, server, 2222, "udp")
    # tcp/2222: that port is stopped, not 8080, and not udp/2222.
    d.apply([Add("f2b-sc", network, "DROP", None, Scope("tcp", ((2222, 2222),)))])
    assert not reaches(peer, server, 2222)
    assert reaches(peer, server, 8080) and reaches(peer, server, 2222, "udp")
    d.apply([Remove("f2b-sc", network, "DROP", Scope("tcp", ((2222, 2222),)))])
    assert reaches(peer, server, 2222)
    # udp/2222: tcp is untouched.
    d.apply([Add("f2b-sc", network, "DROP", None, Scope("udp", ((2222, 2222),)))])
    assert not reaches(peer, server, 2222, "udp")
    assert reaches(peer, server, 2222) and reaches(peer, server, 8080)
    d.apply([Remove("f2b-sc", network, "DROP", Scope("udp", ((2222, 2222),)))])
    assert reaches(peer, server, 2222, "udp")
    # All of tcp: every tcp port, and not udp.
    d.apply([Add("f2b-sc", network, "DROP", None, Scope("tcp"))])
    assert not reaches(peer, server, 2222) and not reaches(peer, server, 8080)
    assert reaches(peer, server, 2222, "udp")
    d.apply([Remove("f2b-sc", network, "DROP", Scope("tcp"))])
    assert reaches(peer, server, 2222) and reaches(peer, server, 8080)
