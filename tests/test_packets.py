"""Real packets: a peer namespace on a veth pair reaches a TCP listener in the daemon's namespace
before a block, cannot during it (DROP times out, REJECT is refused), and can again after the unblock.
Every test runs on every backend.
"""

from __future__ import annotations

import errno
from typing import Iterator

import pytest

from tests.conftest import APP_PORT, PEER4, PEER6, PORT, SERVER4, SERVER6, Daemon, Listener
from tests.netns import NetNS, veth_pair

pytestmark = [pytest.mark.root, pytest.mark.backends]

DROP_WAIT = 1.0  # how long a connect to a dropping host is given before it counts as blocked


def attempt(peer: NetNS, host: str, port: int, timeout: float = DROP_WAIT) -> str:
    """'ok', 'timeout' or 'refused' for one TCP connect from the peer namespace."""
    try:
        sock = peer.connect(host, port, timeout=timeout)
    except TimeoutError:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        if exc.errno == errno.EHOSTUNREACH:
            return "unreachable"
        raise
    sock.close()
    return "ok"


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
