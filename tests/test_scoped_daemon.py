"""Blocks scoped to a protocol and ports against the real daemon, on every backend alike: idempotency, the listing
and the audit, real packets (a peer blocked on one tcp port still reaches another; a udp block leaves tcp alone),
port lists of one address that share the kernel, expiry across a restart, reconcile after the kernel lost them,
kill -9 durability with owners and ports, and a reboot into an empty namespace.
"""

from __future__ import annotations

import ipaddress
import re
import time
from typing import Any, Iterator

import pytest

from tests.conftest import APP_PORT, PEER4, PEER6, PKI, PORT, SERVER4, SERVER6, Daemon, Listener
from tests.netns import NetNS, veth_pair
from tests.test_firewall import wipe_kernel
from tests.test_packets import attempt
from webiptd.firewall.backend import make_backend
from webiptd.firewall.ops import Key
from webiptd.scope import Scope

pytestmark = [pytest.mark.root, pytest.mark.backends]

OTHER_PORT = 9098  # a second service on the daemon's side: a block of APP_PORT only must leave it alone
A = "/chain/f2b-web/ipv4/203.0.113.50"
B = "/chain/f2b-web/ipv6/2001:db8:ffff::50"
net = ipaddress.ip_network


def kernel_atoms(d: Daemon, chain: str = "f2b-web") -> dict[Key, str]:
    """What the kernel holds for `chain`, read by a backend of the chain's kind made afresh in the daemon's namespace:
    its own rule and set parsing, not the daemon's memory."""
    def read() -> dict[Key, str]:
        backend = make_backend(d.backend)
        try:
            return dict(backend.read([chain]))
        finally:
            backend.close()
    return d.ns.call(read)


def scopes(d: Daemon, network: str, chain: str = "f2b-web") -> set[Scope | None]:
    return {k[2] for k in kernel_atoms(d, chain) if k[1] == net(network)}


def entries(d: Daemon, chain: str = "f2b-web") -> list[dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return r.json["entries"]


def tcp(*ports: int | tuple[int, int]) -> Scope:
    return Scope.of("tcp", [(p, p) if isinstance(p, int) else p for p in ports])


def test_a_scoped_block_is_idempotent_listed_and_audited(running: Daemon) -> None:
    d = running
    assert d.request("PUT", A + "?proto=tcp&port=ssh,80&timeout=600").status == 201
    r = d.request("PUT", A + "?proto=tcp&port=80,22&timeout=900")       # the same ports, written otherwise
    assert r.status == 200 and (r.json["proto"], r.json["port"]) == ("tcp", "22,80"), r
    assert d.request("PUT", A).status == 201                               # all traffic: another entry
    assert d.request("PUT", A + "?proto=udp").status == 201
    listed = [(e["network"], e["proto"], e["port"]) for e in entries(d)]
    assert listed == [("203.0.113.50/32", None, None), ("203.0.113.50/32", "tcp", "22,80"),
                      ("203.0.113.50/32", "udp", None)]
    assert scopes(d, "203.0.113.50/32") == {None, tcp(22, 80), Scope("udp")}
    assert re.search(r"action=block chain=f2b-web network=203\.0\.113\.50/32 owner=admin timeout=900 result=exists "
                     r"scope=tcp/22,80", d.log())
    r = d.request("GET", A + "?proto=tcp&port=22,80")
    assert r.status == 200 and r.json["claims"][0]["owner"] == "admin"
    assert d.request("GET", A + "?proto=tcp&port=22").status == 404
    # Each goes on its own.
    r = d.request("DELETE", A + "?proto=tcp&port=22,80")
    assert r.json["deleted"] is True, r
    assert scopes(d, "203.0.113.50/32") == {None, Scope("udp")}
    assert re.search(r"action=unblock .* result=deleted scope=tcp/22,80", d.log())


def test_port_lists_of_one_address_come_and_go_independently(running: Daemon) -> None:
    d = running
    assert d.request("PUT", A + "?proto=tcp&port=22&owner=sshd", user="f2b").status == 201
    assert d.request("PUT", A + "?proto=tcp&port=22,8000:8100&owner=web", user="f2b").status == 201
    assert scopes(d, "203.0.113.50/32") == {tcp(22, (8000, 8100))}
    r = d.request("DELETE", A + "?proto=tcp&port=22,8000:8100&owner=web", user="f2b")
    assert r.json["deleted"] is True
    assert scopes(d, "203.0.113.50/32") == {tcp(22)}
    r = d.request("DELETE", A + "?proto=tcp&port=22&owner=sshd", user="f2b")
    assert r.json["deleted"] is True
    assert scopes(d, "203.0.113.50/32") == set()


@pytest.fixture
def net_pair(daemon: Daemon, peer: NetNS) -> Iterator[tuple[Daemon, NetNS]]:
    veth_pair(daemon.ns, peer)
    daemon.config["listen"] = [f"127.0.0.1:{PORT}", f"[::1]:{PORT}"]
    daemon.start()
    listeners = [Listener(daemon.ns, host, port) for host in (SERVER4, SERVER6) for port in (APP_PORT, OTHER_PORT)]
    try:
        yield daemon, peer
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.parametrize("server, rest", [(SERVER4, f"ipv4/{PEER4}"), (SERVER6, f"ipv6/{PEER6}")])
def test_packets_a_port_block_stops_that_port_only_and_a_udp_block_no_tcp(net_pair: tuple[Daemon, NetNS],
                                                                          server: str, rest: str) -> None:
    d, peer = net_pair
    path = f"/chain/f2b-web/{rest}"
    assert attempt(peer, server, APP_PORT) == "ok" and attempt(peer, server, OTHER_PORT) == "ok"
    assert d.request("PUT", path + f"?proto=udp&port={APP_PORT}").status == 201
    assert attempt(peer, server, APP_PORT) == "ok"                           # udp: tcp passes
    assert d.request("PUT", path + f"?proto=tcp&port={APP_PORT}").status == 201
    assert attempt(peer, server, APP_PORT) == "timeout"
    assert attempt(peer, server, OTHER_PORT) == "ok"                         # another port passes
    assert d.request("PUT", path + "?proto=tcp").status == 201               # every tcp port
    assert attempt(peer, server, OTHER_PORT) == "timeout"
    assert d.request("DELETE", path + "?proto=tcp").json["deleted"] is True
    assert attempt(peer, server, OTHER_PORT) == "ok" and attempt(peer, server, APP_PORT) == "timeout"
    assert d.request("DELETE", path + f"?proto=tcp&port={APP_PORT}").json["deleted"] is True
    assert attempt(peer, server, APP_PORT) == "ok"


def test_a_scoped_claim_expires_while_the_daemon_is_down_and_the_union_shrinks(running: Daemon) -> None:
    d = running
    t0 = time.monotonic()
    assert d.request("PUT", A + "?proto=tcp&port=80&timeout=2").status == 201
    assert d.request("PUT", A + "?proto=tcp&port=22&owner=sshd", user="f2b").status == 201
    assert d.request("PUT", B + "?proto=udp&port=53&timeout=2").status == 201
    assert scopes(d, "203.0.113.50/32") == {tcp(22, 80)}
    d.stop()
    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))
    d.start()
    assert [(e["network"], e["proto"], e["port"]) for e in entries(d)] == [("203.0.113.50/32", "tcp", "22")]
    assert scopes(d, "203.0.113.50/32") == {tcp(22)}
    assert scopes(d, "2001:db8:ffff::50/128") == set()
    assert re.search(r"action=expire chain=f2b-web network=203\.0\.113\.50/32 .*result=deleted scope=tcp/80", d.log())


def test_scoped_blocks_with_two_owners_survive_kill9_and_a_wiped_kernel(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["kernel_check"] = 0.5
    d.start()
    assert d.request("PUT", A + "?proto=tcp&port=22&owner=sshd&timeout=3600", user="f2b").status == 201
    assert d.request("PUT", A + "?proto=tcp&port=22&owner=recidive", user="f2b").status == 200
    assert d.request("PUT", B + "?proto=tcp&port=443,8443").status == 201
    assert d.request("PUT", B + "?proto=sctp").status == 201
    want = {(net("203.0.113.50/32"), tcp(22)), (net("2001:db8:ffff::50/128"), tcp(443, 8443)),
            (net("2001:db8:ffff::50/128"), Scope("sctp"))}
    assert {(k[1], k[2]) for k in kernel_atoms(d)} == want
    d.kill9()
    d.start()
    claims = {(e["network"], e["port"]): sorted(c["owner"] for c in e["claims"]) for e in entries(d)}
    assert claims == {("203.0.113.50/32", "22"): ["f2b/recidive", "f2b/sshd"],
                      ("2001:db8:ffff::50/128", "443,8443"): ["admin"], ("2001:db8:ffff::50/128", None): ["admin"]}
    assert {(k[1], k[2]) for k in kernel_atoms(d)} == want
    # Another program takes them out of the kernel: the kernel check puts them back.
    wipe_kernel(d)
    deadline = time.monotonic() + 15
    while {(k[1], k[2]) for k in kernel_atoms(d)} != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {(k[1], k[2]) for k in kernel_atoms(d)} == want
    # One owner releases: the other's claim holds the block.
    r = d.request("DELETE", A + "?proto=tcp&port=22&owner=sshd", user="f2b")
    assert (r.json["deleted"], r.json["released"]) == (False, True), r
    assert (net("203.0.113.50/32"), tcp(22)) in {(k[1], k[2]) for k in kernel_atoms(d)}


def test_a_restart_tells_a_kernel_that_holds_exactly_the_store_by_a_digest(running: Daemon) -> None:
    """Each backend's read of what it holds (port lists as one atom, their union) and the store's atoms are the same
    rows: a restart with nothing changed needs no row-by-row comparison (Worker._reconcile)."""
    d = running
    c = A.replace(".50", ".52")
    for path in (A + "?timeout=600", B, A.replace(".50", ".51") + "?proto=udp", c + "?proto=tcp&port=22",
                 c + "?proto=tcp&port=80:90&owner=web", B + "?proto=tcp&port=443"):
        assert d.request("PUT", path).status == 201, path
    assert d.stop() == 0, d.stderr()
    if d.backend == "nftables":  # someone's commit: the seal no longer vouches for the kernel, which is read back
        d.ns.run(["nft", "add", "table", "inet", "someone-else"])
    d.start()
    line = [x for x in d.log().splitlines() if "reconciled" in x][-1]
    assert "0 re-added" in line and "0 adopted" in line and "the kernel held exactly the store's blocks" in line, line


def test_a_reboot_into_an_empty_namespace_restores_the_scoped_blocks(running: Daemon, pki: PKI,
                                                                    user_hashes: dict[str, str]) -> None:
    d = running
    assert d.request("PUT", A + "?proto=tcp&port=22,80:90").status == 201
    assert d.request("PUT", A + "?proto=udp&port=53&timeout=3600").status == 201
    before = {(k[1], k[2]) for k in kernel_atoms(d)}
    assert d.stop() == 0
    with NetNS.create() as fresh:
        again = Daemon(fresh, d.workdir, pki, user_hashes, d.backend)
        again.config = d.config
        again.notify_path = d.workdir / "notify2.sock"
        try:
            assert kernel_atoms(again) == {}
            again.start()
            assert {(k[1], k[2]) for k in kernel_atoms(again)} == before
            assert [(e["proto"], e["port"]) for e in entries(again)] == [("tcp", "22,80:90"), ("udp", "53")]
        finally:
            again.close()
