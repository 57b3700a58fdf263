"""Real packets: a peer namespace on a veth pair reaches a TCP listener in the daemon's namespace
before a block, cannot during it (DROP times out, REJECT is refused), and can again after the unblock.
A chain with `match: destination` stops the daemon's namespace connecting out; one with an `interface`
blocks on that link only. Every test runs on every backend; forwarded traffic is in test_forward.py.
"""

from __future__ import annotations

import errno
from typing import Iterator

import pytest

from tests.conftest import APP_PORT, PEER4, PEER6, PORT, SERVER4, SERVER6, Daemon, Listener
from tests.netns import NetNS, veth_pair

pytestmark = [pytest.mark.root, pytest.mark.backends]

DROP_WAIT = 1.0  # how long a connect to a dropping host is given before it counts as blocked
CLOSED_PORT = 9  # a port nobody listens on


def attempt(peer: NetNS, host: str, port: int, timeout: float = DROP_WAIT) -> str:
    """'ok', 'timeout' or 'refused' for one TCP connect from the peer namespace."""
    try:
        sock = peer.connect(host, port, timeout=timeout)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "unreachable"
        raise
    sock.close()
    return "ok"


def resolve_neighbours(ns: NetNS, *addresses: str) -> None:
    """Connect from `ns` to a closed port of each address until refused. A link made a moment ago may lose the
    first packets to an address not resolved yet (IPv6 neighbour discovery: a 1 s connect, measured), which a
    test would count as blocked."""
    for address in addresses:
        assert attempt(ns, address, CLOSED_PORT, timeout=10) == "refused", address


@pytest.fixture
def net(daemon: Daemon, peer: NetNS) -> Iterator[tuple[Daemon, NetNS]]:
    """The daemon, started after its namespace is linked to the peer, with listeners on both sides'
    addresses (the API also listens on the veth addresses) and a plain TCP service on APP_PORT."""
    veth_pair(daemon.ns, peer)
    daemon.config["listen"] = [f"127.0.0.1:{PORT}", f"[::1]:{PORT}", f"{SERVER4}:{PORT}", f"[{SERVER6}]:{PORT}"]
    daemon.start()
    listeners = [Listener(daemon.ns, SERVER4, APP_PORT), Listener(daemon.ns, SERVER6, APP_PORT)]
    try:
        yield daemon, peer
    finally:
        for listener in listeners:
            listener.close()


def block(d: Daemon, chain: str, rest: str) -> None:
    r = d.request("PUT", f"/chain/{chain}/{rest}")
    assert r.status == 201, r


def unblock(d: Daemon, chain: str, rest: str) -> None:
    r = d.request("DELETE", f"/chain/{chain}/{rest}")
    assert r.status == 200 and r.json["deleted"] is True, r


@pytest.mark.parametrize("server, rest", [(SERVER4, f"ipv4/{PEER4}"), (SERVER6, f"ipv6/{PEER6}")])
def test_drop_blocks_the_peer_until_unblocked(net, server, rest):
    d, peer = net
    assert attempt(peer, server, APP_PORT) == "ok"
    block(d, "f2b-web", rest)
    assert attempt(peer, server, APP_PORT) == "timeout"
    unblock(d, "f2b-web", rest)
    assert attempt(peer, server, APP_PORT) == "ok"


@pytest.mark.parametrize("server, rest", [(SERVER4, f"ipv4/{PEER4}"), (SERVER6, f"ipv6/{PEER6}")])
def test_reject_refuses_the_peer_quickly(net, server, rest):
    d, peer = net
    assert attempt(peer, server, APP_PORT) == "ok"
    block(d, "f2b-ssh", rest)
    # A generous timeout: REJECT must answer, so running into it would be a failure.
    assert attempt(peer, server, APP_PORT, timeout=5) == "refused"
    unblock(d, "f2b-ssh", rest)
    assert attempt(peer, server, APP_PORT) == "ok"


def test_cidr_block_covers_the_peer(net):
    d, peer = net
    block(d, "admin-list", "ipv4/198.51.100.4/30")  # a neighbour of the peer, not the peer
    assert attempt(peer, SERVER4, APP_PORT) == "ok"
    block(d, "admin-list", "ipv4/198.51.100.0/25")
    assert attempt(peer, SERVER4, APP_PORT) == "timeout"
    assert attempt(peer, SERVER6, APP_PORT) == "ok"  # an IPv4 block leaves IPv6 alone
    block(d, "admin-list", "ipv6/2001:db8::/64")
    assert attempt(peer, SERVER6, APP_PORT) == "timeout"
    unblock(d, "admin-list", "ipv4/198.51.100.0/25")
    unblock(d, "admin-list", "ipv6/2001:db8::/64")
    assert attempt(peer, SERVER4, APP_PORT) == "ok"
    assert attempt(peer, SERVER6, APP_PORT) == "ok"


def test_a_network_and_a_host_inside_it_are_unblocked_independently(net):
    d, peer = net
    block(d, "admin-list", "ipv4/198.51.100.0/25")
    block(d, "admin-list", f"ipv4/{PEER4}")
    assert attempt(peer, SERVER4, APP_PORT) == "timeout"
    unblock(d, "admin-list", "ipv4/198.51.100.0/25")
    assert attempt(peer, SERVER4, APP_PORT) == "timeout", "the host's own block is still there"
    block(d, "admin-list", "ipv4/198.51.100.0/25")
    unblock(d, "admin-list", f"ipv4/{PEER4}")
    assert attempt(peer, SERVER4, APP_PORT) == "timeout", "the network's block is still there"
    unblock(d, "admin-list", "ipv4/198.51.100.0/25")
    assert attempt(peer, SERVER4, APP_PORT) == "ok"


def test_blocked_peer_loses_the_api_but_loopback_keeps_it(net):
    d, peer = net
    ctx = d.context(check_hostname=False)  # the test certificate names localhost, not the veth address

    def peer_health() -> int:
        conn = peer.https_connection(SERVER4, PORT, ctx, timeout=DROP_WAIT)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        finally:
            conn.close()

    assert peer_health() == 200
    block(d, "f2b-web", f"ipv4/{PEER4}")
    with pytest.raises(TimeoutError):
        peer_health()
    assert d.request("GET", "/version").status == 200
    assert d.request("GET", "/version", conn=d.connection("::1")).status == 200
    unblock(d, "f2b-web", f"ipv4/{PEER4}")
    assert peer_health() == 200


@pytest.fixture
def egress(daemon: Daemon, peer: NetNS) -> Iterator[tuple[Daemon, NetNS]]:
    """The daemon with a chain `egress` hooked at OUTPUT with `match: destination`, and a TCP service in the peer."""
    veth_pair(daemon.ns, peer)
    daemon.config["chains"]["egress"] = {"hooks": ["OUTPUT"], "target": "DROP", "match": "destination",
                                         "backend": daemon.backend}
    daemon.start()
    resolve_neighbours(daemon.ns, PEER4, PEER6)
    listeners = [Listener(peer, PEER4, APP_PORT), Listener(peer, PEER6, APP_PORT)]
    try:
        yield daemon, peer
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.parametrize("family", [4, 6])
def test_destination_blocks_connections_out_to_the_network(egress, family):
    d, peer = egress
    address, network = (PEER4, "ipv4/198.51.100.0/30") if family == 4 else (PEER6, "ipv6/2001:db8::/126")
    assert attempt(d.ns, address, APP_PORT) == "ok"
    block(d, "egress", network)
    assert attempt(d.ns, address, APP_PORT) == "timeout"
    unblock(d, "egress", network)
    assert attempt(d.ns, address, APP_PORT) == "ok"


# A second link between the daemon's namespace and the peer, in /28s of TEST-NET-2 and their own /64s.
FIRST = (("198.51.100.1/28", "2001:db8::1/64"), ("198.51.100.2/28", "2001:db8::2/64"))
SECOND = (("198.51.100.17/28", "2001:db8:1::1/64"), ("198.51.100.18/28", "2001:db8:1::2/64"))


def interface_of(name: str, wildcard: bool) -> str:
    """The config's `interface` for the veth `name`: itself, or a wildcard that matches it and not the other
    veth (veth_pair numbers its pairs, and `wiptN` is never the beginning of `wiptN+1`)."""
    return name[:-1] + "+" if wildcard else name


@pytest.mark.parametrize("wildcard", [False, True], ids=["exact", "wildcard"])
def test_an_interface_limits_a_chain_to_one_link_and_follows_a_reload(daemon, peer, wildcard):
    """Two links to one peer. `on-link` (INPUT) and `out-link` (OUTPUT, by destination) name the first: a block
    applies to packets on it and not on the second; a reload that names the second moves it there.
    REJECT, so that a blocked connect is refused at once."""
    first, _ = veth_pair(daemon.ns, peer, *FIRST)
    second, _ = veth_pair(daemon.ns, peer, *SECOND)
    daemon.config["chains"]["on-link"] = {"hooks": ["INPUT"], "target": "REJECT", "backend": daemon.backend,
                                          "interface": interface_of(first, wildcard)}
    daemon.config["chains"]["out-link"] = {"hooks": ["OUTPUT"], "target": "REJECT", "backend": daemon.backend,
                                           "match": "destination", "interface": interface_of(first, wildcard)}
    daemon.start()
    resolve_neighbours(daemon.ns, "198.51.100.2", "198.51.100.18", "2001:db8::2", "2001:db8:1::2")
    servers = [Listener(ns, address.split("/")[0], APP_PORT) for ns, end in ((daemon.ns, 0), (peer, 1))
               for link in (FIRST, SECOND) for address in link[end]]
    # The peer's addresses on both links: 198.51.100.2 and .18, 2001:db8::2 and 2001:db8:1::2.
    peer_networks = ("ipv4/198.51.100.0/27", "ipv6/2001:db8::/47")

    def reach(into: bool) -> dict[str, str]:
        """Over the first and the second link, in each family: the peer to the daemon (`into`), or back."""
        found = {}
        for link, (ends) in (("first", FIRST), ("second", SECOND)):
            for family, address in zip((4, 6), (a.split("/")[0] for a in ends[0 if into else 1])):
                found[f"{link}-v{family}"] = attempt(peer if into else daemon.ns, address, APP_PORT, timeout=5)
        return found

    def blocked(*links: str) -> dict[str, str]:
        return {f"{link}-v{family}": "refused" if link in links else "ok"
                for link in ("first", "second") for family in (4, 6)}

    try:
        for chain, into in (("on-link", True), ("out-link", False)):
            assert reach(into) == blocked(), chain
            for network in peer_networks:
                block(daemon, chain, network)
            assert reach(into) == blocked("first"), chain
            daemon.config["chains"][chain]["interface"] = interface_of(second, wildcard)
            daemon.reload()
            assert reach(into) == blocked("second"), chain
            for network in peer_networks:
                unblock(daemon, chain, network)
            assert reach(into) == blocked(), chain
    finally:
        for server in servers:
            server.close()
