"""The iptables backend on its own in a namespace, with blocks scoped to a protocol and its ports: the rules it writes
(`-p PROTO`, `-m multiport --dports`), long port lists cut into several rules, a change of ports in one commit,
what read() takes for ours and what it leaves alone, the kernel check, and real packets over a veth pair.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import iptc
import pytest

from tests.conftest import PEER4, PEER6, SERVER4, SERVER6, Listener
from tests.netns import NetNS, veth_pair
from tests.test_packets import attempt, resolve_neighbours
from webiptd.config import Chain
from webiptd.firewall.iptables import IptablesBackend, multiport_parts
from webiptd.firewall.ops import Add, Key, Op, Remove
from webiptd.scope import PROTOCOLS, Scope

T = TypeVar("T")

pytestmark = [pytest.mark.root]

NET = ipaddress.ip_network
SRC, DST = "f2b-scope", "egress"  # a source chain that drops, a destination chain that rejects
CHAINS = [Chain(SRC, ("INPUT",), "DROP"), Chain(DST, ("OUTPUT",), "REJECT", match="destination")]
REJECT_WITH = {4: " --reject-with icmp-port-unreachable", 6: " --reject-with icmp6-port-unreachable"}
HOST = {4: "203.0.113.7/32", 6: "2001:db8:ffff::7/128"}


class Direct:
    """An IptablesBackend in `ns`; every call runs in a thread that joined the namespace."""

    def __init__(self, ns: NetNS, lock_path: Path, chains: list[Chain]):
        self.ns = ns
        self.lock_path = lock_path
        self.chains = {c.name: c for c in chains}
        self.backend = ns.call(lambda: IptablesBackend(str(lock_path)))
        self.call(lambda: self.backend.prepare(chains))

    def call(self, fn: Callable[[], T]) -> T:
        return self.ns.call(fn)

    def apply(self, ops: list[Op]) -> None:
        self.call(lambda: self.backend.apply(ops, self.chains))

    def read(self) -> dict[Key, str]:
        return dict(self.call(lambda: self.backend.read(list(self.chains))))

    def missing(self, counts: dict[str, int]) -> str | None:
        return self.call(lambda: self.backend.missing(list(self.chains.values()), counts))

    def rules(self, chain: str, family: int = 4) -> list[str]:
        return [line for line in self.ns.iptables_save(family).splitlines() if line.startswith(f"-A {chain} ")]

    def ipt(self, *args: str, family: int = 4) -> None:
        """iptables-legacy by hand, as an admin or fail2ban would, under our private lock."""
        tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        self.ns.run([tool, "-w", *args], env={**os.environ, "XTABLES_LOCKFILE": str(self.lock_path)})


@pytest.fixture
def direct(ns: NetNS, workdir: Path) -> Iterator[Direct]:
    d = Direct(ns, workdir / "xtables.lock", CHAINS)  # a private lock file: never the host's
    try:
        yield d
    finally:
        d.call(d.backend.close)


def line(chain: str, family: int, rest: str, target: str) -> str:
    flag = "-d" if chain == DST else "-s"
    return f"-A {chain} {flag} {HOST[family]}{rest} -j {target}{REJECT_WITH[family] if target == 'REJECT' else ''}"


def test_multiport_parts_keep_the_order_and_count_a_range_as_two() -> None:
    assert multiport_parts(()) == [()]
    singles = tuple((p, p) for p in range(1000, 1030, 2))  # 15 places: one rule
    assert multiport_parts(singles) == [singles]
    assert multiport_parts(singles + ((2000, 2001),)) == [singles, ((2000, 2001),)]
    ranges = tuple((p, p + 1) for p in range(0, 80, 10))  # 8 ranges, 16 places: 7 ranges fit, 14 places
    assert multiport_parts(ranges) == [ranges[:7], ranges[7:]]
    # A single port fills the place a range leaves.
    assert multiport_parts(ranges[:7] + ((100, 100), (200, 201))) == [ranges[:7] + ((100, 100),), ((200, 201),)]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("chain, target", [(SRC, "DROP"), (DST, "REJECT"), (SRC, "REJECT"), (DST, "DROP")])
def test_the_three_kernel_forms(direct: Direct, family: int, chain: str, target: str) -> None:
    net = NET(HOST[family])
    atoms = [None, Scope("tcp"), Scope("udp", ((22, 22), (80, 90))), Scope("tcp", ((443, 443),))]
    direct.apply([Add(chain, net, target, scope=s) for s in atoms])
    assert direct.rules(chain, family) == [
        line(chain, family, "", target),
        line(chain, family, " -p tcp", target),
        line(chain, family, " -p udp -m multiport --dports 22,80:90", target),
        line(chain, family, " -p tcp -m multiport --dports 443", target)]
    assert direct.read() == {(chain, net, s): target for s in atoms}
    other = 6 if family == 4 else 4
    assert direct.rules(chain, other) == []
    direct.apply([Remove(chain, net, target, s) for s in atoms[1:]])
    assert direct.rules(chain, family) == [line(chain, family, "", target)]
    assert direct.read() == {(chain, net, None): target}


@pytest.mark.parametrize("family", [4, 6])
def test_every_protocol_takes_ports(direct: Direct, family: int) -> None:
    # dccp and udplite have no name in python-iptables: the backend writes their numbers, iptables names them.
    net = NET(HOST[family])
    atoms = [Scope(p, ((22, 22), (80, 90))) for p in PROTOCOLS] + [Scope(p) for p in PROTOCOLS]
    direct.apply([Add(SRC, net, "DROP", scope=s) for s in atoms])
    assert direct.rules(SRC, family) == (
        [line(SRC, family, f" -p {p} -m multiport --dports 22,80:90", "DROP") for p in PROTOCOLS]
        + [line(SRC, family, f" -p {p}", "DROP") for p in PROTOCOLS])
    assert direct.read() == {(SRC, net, s): "DROP" for s in atoms}
    direct.apply([Remove(SRC, net, "DROP", s) for s in atoms])
    assert direct.rules(SRC, family) == []


def test_twenty_places_of_ports_are_two_rules_and_one_atom(direct: Direct) -> None:
    net = NET(HOST[4])
    singles = [(p, p) for p in range(1000, 1028, 2)]  # 14 places
    ranges = [(2000, 2009), (3000, 3009), (4000, 4009)]  # 6 places: the first does not fit beside the 14
    scope = Scope.of("tcp", singles + ranges)
    direct.apply([Add(SRC, net, "DROP", scope=scope)])
    assert direct.rules(SRC) == [
        line(SRC, 4, " -p tcp -m multiport --dports " + ",".join(str(p) for p, _ in singles), "DROP"),
        line(SRC, 4, " -p tcp -m multiport --dports 2000:2009,3000:3009,4000:4009", "DROP")]
    assert direct.read() == {(SRC, net, scope): "DROP"}
    assert direct.missing({SRC: 1}) is None  # one atom, two rules
    direct.apply([Remove(SRC, net, "DROP", scope)])
    assert direct.rules(SRC) == []


def test_a_change_of_ports_is_one_commit(direct: Direct) -> None:
    net4, net6 = NET(HOST[4]), NET(HOST[6])
    old, new = Scope("tcp", ((22, 22),)), Scope("tcp", ((22, 22), (80, 80)))
    direct.apply([Add(SRC, net4, "DROP", scope=old), Add(SRC, net6, "DROP", scope=old)])
    direct.apply([Remove(SRC, net4, "DROP", old), Add(SRC, net4, "DROP", scope=new),
                  Remove(SRC, net6, "DROP", old), Add(SRC, net6, "DROP", scope=new)])
    for family in (4, 6):
        assert direct.rules(SRC, family) == [line(SRC, family, " -p tcp -m multiport --dports 22,80", "DROP")]
    assert direct.read() == {(SRC, net4, new): "DROP", (SRC, net6, new): "DROP"}
    # A batch that fails part way (a chain that does not exist) changes nothing, in either family.
    newer = Scope.of("tcp", new.ports + ((443, 443),))
    before = {f: direct.rules(SRC, f) for f in (4, 6)}
    with pytest.raises(iptc.IPTCError):
        direct.apply([Remove(SRC, net6, "DROP", new), Add(SRC, net6, "DROP", scope=newer),
                      Remove(SRC, net4, "DROP", new), Add(SRC, net4, "DROP", scope=newer),
                      Add("no-such-chain", net4, "DROP", scope=newer)])
    assert {f: direct.rules(SRC, f) for f in (4, 6)} == before
    assert direct.read() == {(SRC, net4, new): "DROP", (SRC, net6, new): "DROP"}


def test_rules_made_after_a_read_carry_their_own_ports(direct: Direct) -> None:
    # python-iptables' multiport module points at the last rule read; the backend's reused rule must not
    # inherit its ports (it did, without the reset: --dports 22 written for 80:90,100).
    net = NET(HOST[4])
    long = Scope("tcp", tuple((p, p) for p in range(1, 30, 2)))
    direct.apply([Add(SRC, net, "DROP", scope=long), Add(SRC, net, "DROP", scope=Scope("udp", ((22, 22),)))])
    for ports in (((80, 90), (100, 100)), ((443, 443),)):
        direct.read()
        direct.apply([Add(SRC, net, "DROP", scope=Scope("sctp", ports))])
        assert direct.rules(SRC)[-1] == line(SRC, 4, " -p sctp -m multiport --dports "
                                             + Scope("sctp", ports).port_text, "DROP")
        direct.read()
        direct.apply([Remove(SRC, net, "DROP", Scope("sctp", ports))])
        assert len(direct.rules(SRC)) == 2
    direct.read()
    direct.apply([Remove(SRC, net, "DROP", long)])
    assert direct.rules(SRC) == [line(SRC, 4, " -p udp -m multiport --dports 22", "DROP")]


def test_rules_written_by_hand(direct: Direct) -> None:
    ours = [
        ("-s", "203.0.113.1", "-p", "tcp", "-m", "multiport", "--dports", "ssh", "-j", "DROP"),
        ("-s", "203.0.113.1", "-p", "tcp", "-m", "multiport", "--dports", "90:100,80:89", "-j", "DROP"),
        ("-s", "203.0.113.2", "-p", "udp", "-j", "DROP"),
        ("-s", "203.0.113.3", "-p", "dccp", "-m", "multiport", "--dports", "5000", "-j", "DROP"),
        ("-s", "203.0.113.4", "-p", "132", "-j", "REJECT"),
        # ACCEPT is a target of ours (an allow chain's), whatever the chain's target today: a chain's old rules
        # keep theirs after a reload changes it, as DROP and REJECT do.
        ("-s", "203.0.113.5", "-p", "tcp", "-m", "multiport", "--dports", "22", "-j", "ACCEPT"),
    ]
    foreign = [
        ("-s", "203.0.113.10", "-p", "tcp", "-m", "multiport", "--sports", "22", "-j", "DROP"),
        ("-s", "203.0.113.11", "-p", "tcp", "-m", "multiport", "--ports", "22", "-j", "DROP"),
        ("-s", "203.0.113.12", "-p", "tcp", "-m", "multiport", "!", "--dports", "22", "-j", "DROP"),
        ("!", "-s", "203.0.113.13", "-p", "tcp", "-m", "multiport", "--dports", "22", "-j", "DROP"),
        ("-s", "203.0.113.14", "-i", "eth0", "-p", "tcp", "-m", "multiport", "--dports", "22", "-j", "DROP"),
        ("-s", "203.0.113.15", "-p", "tcp", "--dport", "22", "-j", "DROP"),  # a plain --dport is not ours
        ("-s", "203.0.113.16", "-p", "tcp", "-m", "tcp", "-m", "multiport", "--dports", "22", "-j", "DROP"),
        ("-s", "203.0.113.17", "!", "-p", "tcp", "-j", "DROP"),
        ("-s", "203.0.113.18", "-p", "icmp", "-j", "DROP"),
        ("-s", "203.0.113.19", "-p", "udp", "-f", "-j", "DROP"),
        ("-s", "203.0.113.20", "-p", "udp", "-j", "REJECT", "--reject-with", "icmp-host-unreachable"),
        ("-s", "203.0.113.21", "-d", "203.0.113.22", "-p", "udp", "-j", "DROP"),
        ("-s", "203.0.113.23", "-p", "tcp", "-m", "multiport", "--dports", "22", "-j", "RETURN"),
    ]
    for args in ours + foreign:
        direct.ipt("-A", SRC, *args)
    direct.ipt("-A", SRC, "-s", "2001:db8:ffff::1", "-p", "udplite", "-m", "multiport", "--dports", "1:2", "-j",
               "DROP", family=6)
    merged = Scope("tcp", ((22, 22), (80, 100)))
    assert direct.read() == {
        (SRC, NET("203.0.113.1/32"), merged): "DROP",
        (SRC, NET("203.0.113.2/32"), Scope("udp")): "DROP",
        (SRC, NET("203.0.113.3/32"), Scope("dccp", ((5000, 5000),))): "DROP",
        (SRC, NET("203.0.113.4/32"), Scope("sctp")): "REJECT",
        (SRC, NET("203.0.113.5/32"), Scope("tcp", ((22, 22),))): "ACCEPT",
        (SRC, NET("2001:db8:ffff::1/128"), Scope("udplite", ((1, 2),))): "DROP",
    }
    # Adopted, then removed as the worker would: the atom read() merged goes whole, though cut otherwise than ours.
    before = direct.rules(SRC)
    direct.apply([Remove(SRC, NET("203.0.113.1/32"), "DROP", merged)])
    assert direct.rules(SRC) == before[2:]
    assert (SRC, NET("203.0.113.1/32"), merged) not in direct.read()
    # Removing an atom never takes a foreign rule that mentions its address and ports.
    for args in foreign:
        network = NET(args[args.index("-s") + 1] + "/32")
        direct.apply([Remove(SRC, network, "DROP", Scope("tcp", ((22, 22),))), Remove(SRC, network, "DROP"),
                      Remove(SRC, network, "DROP", Scope("udp"))])
    assert direct.rules(SRC) == before[2:]


def test_missing_sees_scoped_rules_flushed(direct: Direct) -> None:
    net = NET(HOST[4])
    atoms = [Scope("tcp", ((22, 22),)), Scope("udp"), None]
    direct.apply([Add(SRC, net, "DROP", scope=s) for s in atoms])
    assert direct.missing({SRC: 3}) is None
    direct.ipt("-D", SRC, "-s", HOST[4], "-p", "tcp", "-m", "multiport", "--dports", "22", "-j", "DROP")
    assert direct.missing({SRC: 3}) == f"chain {SRC} has 2 rules for 3 blocks"
    direct.ipt("-F", SRC)
    assert direct.missing({SRC: 3}) == f"chain {SRC} has 0 rules for 3 blocks"
    # Removing atoms already gone is no error; adding them back is whole again.
    direct.apply([Remove(SRC, net, "DROP", s) for s in atoms])
    direct.apply([Add(SRC, net, "DROP", scope=s) for s in atoms])
    assert direct.missing({SRC: 3}) is None
    assert len(direct.rules(SRC)) == 3


def test_a_new_match_remakes_scoped_rules(direct: Direct) -> None:
    net = NET(HOST[4])
    scope = Scope("tcp", tuple((p, p) for p in range(1, 40, 2)))  # 20 ports: two rules
    direct.apply([Add(SRC, net, "DROP", scope=scope), Add(SRC, net, "DROP", scope=Scope("udp"))])
    turned = Chain(SRC, ("INPUT",), "DROP", match="destination")
    direct.chains[SRC] = turned
    direct.call(lambda: direct.backend.prepare([turned]))
    head = f"-A {SRC} -d {HOST[4]} -p tcp -m multiport --dports "
    assert direct.rules(SRC) == [head + ",".join(str(p) for p in range(1, 30, 2)) + " -j DROP",
                                 head + ",".join(str(p) for p in range(31, 40, 2)) + " -j DROP",
                                 f"-A {SRC} -d {HOST[4]} -p udp -j DROP"]
    assert direct.read() == {(SRC, net, scope): "DROP", (SRC, net, Scope("udp")): "DROP"}
    direct.apply([Remove(SRC, net, "DROP", scope)])
    assert direct.rules(SRC) == [f"-A {SRC} -d {HOST[4]} -p udp -j DROP"]


# -- allow chains and the order of the jumps ------------------------------------------------------------------

ALLOW, ALLOW2, BLOCK2 = "allow-in", "allow-two", "f2b-more"


def prepare(d: Direct, chains: list[Chain]) -> None:
    d.chains = {c.name: c for c in chains}
    d.call(lambda: d.backend.prepare(chains))


@pytest.mark.parametrize("family", [4, 6])
def test_an_allow_chain_holds_accept_rules_of_every_shape(direct: Direct, family: int) -> None:
    prepare(direct, CHAINS + [Chain(ALLOW, ("INPUT",), "ACCEPT")])
    net = NET(HOST[family])
    atoms = [None, Scope("udp"), Scope("tcp", ((22, 22), (80, 90)))]
    direct.apply([Add(ALLOW, net, "ACCEPT", scope=s) for s in atoms])
    head = f"-A {ALLOW} -s {HOST[family]}"
    assert direct.rules(ALLOW, family) == [f"{head} -j ACCEPT", f"{head} -p udp -j ACCEPT",
                                           f"{head} -p tcp -m multiport --dports 22,80:90 -j ACCEPT"]
    assert direct.read() == {(ALLOW, net, s): "ACCEPT" for s in atoms}
    assert direct.missing({ALLOW: 3}) is None
    direct.apply([Remove(ALLOW, net, "ACCEPT", s) for s in atoms])
    assert direct.rules(ALLOW, family) == []


def test_allow_jumps_come_before_block_jumps_and_admin_rules_stay(direct: Direct) -> None:
    # The fixture made SRC (DROP, INPUT) and DST (REJECT, OUTPUT). The admin's rules around ours stay where they are.
    direct.ipt("-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    direct.ipt("-I", "INPUT", "1", "-s", "203.0.113.99", "-j", "DROP")
    chains = [Chain(SRC, ("INPUT",), "DROP"), Chain(BLOCK2, ("INPUT",), "REJECT"), Chain(ALLOW, ("INPUT",), "ACCEPT"),
              CHAINS[1]]
    prepare(direct, chains)
    # The first allow chain goes to the top, a block chain right below the ones before it.
    assert direct.rules("INPUT") == [f"-A INPUT -j {ALLOW}", "-A INPUT -s 203.0.113.99/32 -j DROP",
                                           f"-A INPUT -j {SRC}", f"-A INPUT -j {BLOCK2}",
                                           "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]
    assert direct.rules("INPUT", 6) == [f"-A INPUT -j {ALLOW}", f"-A INPUT -j {SRC}", f"-A INPUT -j {BLOCK2}"]
    # A new allow chain goes right below the allow chains before it, above the block chains.
    direct.ipt("-I", "INPUT", "2", "-s", "203.0.113.98", "-j", "DROP")  # between our allow and block jumps
    chains.append(Chain(ALLOW2, ("INPUT",), "ACCEPT"))
    prepare(direct, chains)
    assert direct.rules("INPUT") == [f"-A INPUT -j {ALLOW}", f"-A INPUT -j {ALLOW2}",
                                           "-A INPUT -s 203.0.113.98/32 -j DROP", "-A INPUT -s 203.0.113.99/32 -j DROP",
                                           f"-A INPUT -j {SRC}", f"-A INPUT -j {BLOCK2}",
                                           "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]
    assert direct.missing({}) is None


def test_a_jump_moved_out_of_order_is_seen_and_put_back(direct: Direct) -> None:
    chains = [CHAINS[0], Chain(ALLOW, ("INPUT",), "ACCEPT")]
    prepare(direct, chains)
    assert direct.rules("INPUT") == [f"-A INPUT -j {ALLOW}", f"-A INPUT -j {SRC}"]
    direct.ipt("-D", "INPUT", "-j", ALLOW)
    direct.ipt("-A", "INPUT", "-s", "203.0.113.97", "-j", "DROP")
    direct.ipt("-A", "INPUT", "-j", ALLOW)
    assert direct.missing({}) == f"the jump from INPUT to {SRC} (ipv4) is out of order: the jump to {ALLOW} is below it"
    prepare(direct, chains)
    # Swapped in the places they held: the admin's rule stays between them.
    assert direct.rules("INPUT") == [f"-A INPUT -j {ALLOW}", "-A INPUT -s 203.0.113.97/32 -j DROP",
                                           f"-A INPUT -j {SRC}"]
    assert direct.rules("INPUT", 6) == [f"-A INPUT -j {ALLOW}", f"-A INPUT -j {SRC}"]
    assert direct.missing({}) is None
    # A block chain's jump moved above the allow chain's: the next change to that chain puts it back too.
    direct.ipt("-D", "INPUT", "-j", SRC, family=6)
    direct.ipt("-I", "INPUT", "1", "-j", SRC, family=6)
    assert direct.missing({}) is not None
    direct.apply([Add(SRC, NET(HOST[6]), "DROP")])
    assert direct.rules("INPUT", 6) == [f"-A INPUT -j {ALLOW}", f"-A INPUT -j {SRC}"]


def test_a_hook_the_config_no_longer_has_loses_our_jump_only(direct: Direct) -> None:
    both = Chain(SRC, ("INPUT", "FORWARD"), "DROP")
    prepare(direct, [both, CHAINS[1]])
    assert direct.rules("FORWARD") == [f"-A FORWARD -j {SRC}"]
    # A jump with a match is the admin's and stays; plain jumps (at most -i or -o) from built-in chains that are not
    # among the chain's hooks go.
    direct.ipt("-A", "FORWARD", "-p", "tcp", "-j", SRC)
    direct.ipt("-A", "OUTPUT", "-o", "lo", "-j", SRC)
    prepare(direct, [Chain(SRC, ("INPUT",), "DROP"), CHAINS[1]])
    for family in (4, 6):
        assert direct.rules("FORWARD", family) == ([f"-A FORWARD -p tcp -j {SRC}"] if family == 4 else [])
        assert direct.rules("INPUT", family) == [f"-A INPUT -j {SRC}"]
        assert direct.rules("OUTPUT", family) == [f"-A OUTPUT -j {DST}"]  # `-o lo -j SRC` is of our shape
    # A user chain it was hooked from goes the same way; a chain with no hooks keeps the admin's plain jumps.
    direct.ipt("-N", "my-hook")
    prepare(direct, [Chain(SRC, ("INPUT", "my-hook"), "DROP"), CHAINS[1]])
    assert direct.rules("my-hook") == [f"-A my-hook -j {SRC}"]
    prepare(direct, [Chain(SRC, (), "DROP"), CHAINS[1]])
    assert direct.rules("my-hook") == [] and direct.rules("INPUT") == []
    direct.ipt("-A", "INPUT", "-j", SRC)
    prepare(direct, [Chain(SRC, (), "DROP"), CHAINS[1]])
    assert direct.rules("INPUT") == [f"-A INPUT -j {SRC}"]


# -- real packets ---------------------------------------------------------------------------------------------

BLOCKED_PORT, OPEN_PORT = 2222, 8080


class UdpEcho:
    """A UDP service in `ns` that sends every datagram back, from a thread of its own."""

    def __init__(self, ns: NetNS, host: str, port: int):
        self.sock = ns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._echo, daemon=True)
        self._thread.start()

    def _echo(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def echoes(peer: NetNS, host: str, port: int) -> bool:
    sock = peer.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(1.0)
        sock.sendto(b"ping", (host, port))
        return sock.recvfrom(512)[0] == b"ping"
    except (TimeoutError, ConnectionRefusedError):
        return False
    finally:
        sock.close()


@pytest.fixture
def linked(direct: Direct, peer: NetNS) -> Iterator[tuple[Direct, NetNS]]:
    """The backend's namespace linked to a peer, with TCP listeners on both ports and a UDP echo on the blocked
    one, on both families."""
    veth_pair(direct.ns, peer)
    services: list[Listener | UdpEcho] = []
    try:
        for host in (SERVER4, SERVER6):
            services += [Listener(direct.ns, host, BLOCKED_PORT), Listener(direct.ns, host, OPEN_PORT),
                         UdpEcho(direct.ns, host, BLOCKED_PORT)]
        resolve_neighbours(peer, SERVER4, SERVER6)
        yield direct, peer
    finally:
        for service in services:
            service.close()


@pytest.mark.parametrize("server, client", [(SERVER4, PEER4), (SERVER6, PEER6)])
def test_packets_of_a_port_block(linked: tuple[Direct, NetNS], server: str, client: str) -> None:
    d, peer = linked
    net = NET(client)
    assert attempt(peer, server, BLOCKED_PORT) == "ok" and attempt(peer, server, OPEN_PORT) == "ok"
    assert echoes(peer, server, BLOCKED_PORT)
    # Ports in the atom: the one listed is dropped, the other reached, and UDP to the same port untouched.
    tcp = Scope("tcp", ((22, 22), (BLOCKED_PORT, BLOCKED_PORT), (9000, 9100)))
    d.apply([Add(SRC, net, "DROP", scope=tcp)])
    assert attempt(peer, server, BLOCKED_PORT) == "timeout"
    assert attempt(peer, server, OPEN_PORT) == "ok"
    assert echoes(peer, server, BLOCKED_PORT)
    # A UDP block, of every UDP port, leaves TCP as it was.
    d.apply([Remove(SRC, net, "DROP", tcp), Add(SRC, net, "DROP", scope=Scope("udp"))])
    assert not echoes(peer, server, BLOCKED_PORT)
    assert attempt(peer, server, BLOCKED_PORT) == "ok" and attempt(peer, server, OPEN_PORT) == "ok"
    # The whole of TCP, with REJECT: refused on either port; then nothing.
    d.apply([Remove(SRC, net, "DROP", Scope("udp")), Add(SRC, net, "REJECT", scope=Scope("tcp"))])
    assert attempt(peer, server, BLOCKED_PORT, timeout=5) == "refused"
    assert attempt(peer, server, OPEN_PORT, timeout=5) == "refused"
    assert echoes(peer, server, BLOCKED_PORT)
    d.apply([Remove(SRC, net, "REJECT", Scope("tcp"))])
    assert attempt(peer, server, BLOCKED_PORT) == "ok" and echoes(peer, server, BLOCKED_PORT)
