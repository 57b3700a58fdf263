"""Forwarded traffic, as on a Docker host: a peer reaches a TCP service in a third namespace (the "container")
through a port the daemon's namespace publishes with DNAT, under Docker's own rules, written with iptables-nft
(Debian 12's Docker) or iptables-legacy. A chain hooked at FORWARD blocks the peer and an unblock lets it through;
a chain hooked at INPUT never sees it. A chain with `match: destination` stops the container's egress to a network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.conftest import Daemon, Listener
from tests.netns import NetNS, veth_pair
from tests.test_packets import attempt, resolve_neighbours
from webiptd.config import Chain
from webiptd.firewall import host


PUBLISHED, SERVICE = 8080, 80  # docker run -p 8080:80
# peer <-> router (the daemon's namespace) <-> container, each link a /28 of TEST-NET-2 and a /64 of 2001:db8::/32.
ROUTER_UP = {4: "198.51.100.1", 6: "2001:db8::1"}
PEER = {4: "198.51.100.2", 6: "2001:db8::2"}
ROUTER_BRIDGE = {4: "198.51.100.17", 6: "2001:db8:1::1"}
CONTAINER = {4: "198.51.100.18", 6: "2001:db8:1::2"}
CONTAINER_NET = {4: "198.51.100.16/28", 6: "2001:db8:1::/64"}
PREFIX = {4: 28, 6: 64}
TOOLS = {("nft", 4): "iptables-nft", ("nft", 6): "ip6tables-nft",
         ("legacy", 4): "iptables-legacy", ("legacy", 6): "ip6tables-legacy"}


def docker_rules(family: int, bridge: str) -> str:
    """What dockerd writes for one container on a bridge with `-p 8080:80` (Docker 24 and 25, without the
    userland proxy's part), in iptables-restore form: DNAT in nat PREROUTING, FORWARD's policy DROP, and the
    published port accepted in DOCKER. Its outbound traffic is masqueraded."""
    to = f"[{CONTAINER[6]}]" if family == 6 else CONTAINER[4]
    return f"""*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s {CONTAINER_NET[family]} ! -o {bridge} -j MASQUERADE
-A DOCKER -i {bridge} -j RETURN
-A DOCKER ! -i {bridge} -p tcp -m tcp --dport {PUBLISHED} -j DNAT --to-destination {to}:{SERVICE}
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o {bridge} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o {bridge} -j DOCKER
-A FORWARD -i {bridge} ! -o {bridge} -j ACCEPT
-A DOCKER -d {CONTAINER[family]}/{128 if family == 6 else 32} ! -i {bridge} -o {bridge} -p tcp -m tcp \
--dport {SERVICE} -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
"""


@dataclass
class Site:
    router: Daemon
    peer: NetNS
    container: NetNS
    bridge: str  # the router's end of the link to the container: Docker's docker0


@pytest.fixture
def container() -> Iterator[NetNS]:
    with NetNS.create() as c:
        yield c


def build(daemon: Daemon, peer: NetNS, container: NetNS, docker: str) -> Site:
    """The three namespaces linked, the router forwarding, Docker's rules for both families written with the
    `docker` variant of iptables (nft or legacy), before the daemon starts, as on a host where Docker came first."""
    daemon.ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])

    def addresses(of: dict[int, str]) -> list[str]:
        return [f"{of[f]}/{PREFIX[f]}" for f in (4, 6)]

    veth_pair(daemon.ns, peer, addresses(ROUTER_UP), addresses(PEER))
    bridge, _ = veth_pair(daemon.ns, container, addresses(ROUTER_BRIDGE), addresses(CONTAINER))
    for family, flag in ((4, "-4"), (6, "-6")):
        container.run(["ip", flag, "route", "add", "default", "via", ROUTER_BRIDGE[family]])
        daemon.ns.run([f"{TOOLS[(docker, family)]}-restore"], input=docker_rules(family, bridge))
        resolve_neighbours(daemon.ns, PEER[family], CONTAINER[family])  # (else a first forwarded SYN takes 2 s)
    return Site(daemon, peer, container, bridge)


def reached(service: Listener, count: int, within: float = 5.0) -> bool:
    """Whether the service has accepted `count` connections, once its thread has caught up."""
    deadline = time.monotonic() + within
    while service.accepted < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return service.accepted == count


def rest(family: int, address: str) -> str:
    return f"ipv{family}/{address}"


def change(d: Daemon, method: str, chain: str, path: str) -> None:
    r = d.request(method, f"/chain/{chain}/{path}")
    assert r.status == (201 if method == "PUT" else 200), r


def chains(backend: str) -> dict[str, dict[str, object]]:
    """f2b-web as fail2ban's usual chain (INPUT), one for containers' clients (FORWARD), one for egress."""
    found: dict[str, dict[str, object]] = {
        "f2b-web": {"hooks": ["INPUT"], "target": "DROP"},
        "containers": {"hooks": ["FORWARD"], "target": "DROP"},
        "egress": {"hooks": ["FORWARD", "OUTPUT"], "target": "REJECT", "match": "destination"},
    }
    for body in found.values():
        body["backend"] = backend
    return found


@pytest.mark.root
@pytest.mark.backends
@pytest.mark.parametrize("docker, family", [("nft", 4), ("nft", 6), ("legacy", 4)])
def test_a_forward_chain_blocks_a_client_of_a_published_port(daemon, peer, container, docker, family):
    site = build(daemon, peer, container, docker)
    d = site.router
    d.config["chains"] = chains(d.backend)
    d.start()
    service = Listener(site.container, CONTAINER[family], SERVICE)
    try:
        published = ROUTER_UP[family]
        assert attempt(site.peer, published, PUBLISHED) == "ok"
        assert reached(service, 1), "the peer reached the container through DNAT"
        # A chain hooked at INPUT never sees a published port's traffic: after DNAT it is forwarded, not local.
        change(d, "PUT", "f2b-web", rest(family, PEER[family]))
        assert attempt(site.peer, published, PUBLISHED) == "ok"
        change(d, "DELETE", "f2b-web", rest(family, PEER[family]))
        # A chain hooked at FORWARD does, in front of Docker's own rules.
        change(d, "PUT", "containers", rest(family, PEER[family]))
        assert attempt(site.peer, published, PUBLISHED) == "timeout"
        change(d, "DELETE", "containers", rest(family, PEER[family]))
        assert attempt(site.peer, published, PUBLISHED) == "ok"
        assert reached(service, 3)
    finally:
        service.close()


@pytest.mark.root
@pytest.mark.backends
def test_destination_blocks_a_containers_egress_and_the_hosts(daemon, peer, container):
    """egress: hooked at FORWARD and OUTPUT, `match: destination`, REJECT: the container and the host itself are
    refused at once when they connect to a blocked network, here the peer's (a command-and-control server)."""
    site = build(daemon, peer, container, "nft")
    d = site.router
    d.config["chains"] = chains(d.backend)
    d.start()
    servers = [Listener(ns, address[family], SERVICE)
               for ns, address in ((site.peer, PEER), (site.container, CONTAINER)) for family in (4, 6)]
    try:
        for family in (4, 6):
            for ns in (site.container, d.ns):
                assert attempt(ns, PEER[family], SERVICE) == "ok", (family, ns)
            change(d, "PUT", "egress", rest(family, f"{PEER[family]}"))
            for ns in (site.container, d.ns):
                assert attempt(ns, PEER[family], SERVICE, timeout=5) == "refused", (family, ns)
            # Every packet to it is blocked, answers too: the peer's own connections to the container fail.
            assert attempt(site.peer, ROUTER_UP[family], PUBLISHED) == "timeout"
            change(d, "DELETE", "egress", rest(family, f"{PEER[family]}"))
            for ns in (site.container, d.ns):
                assert attempt(ns, PEER[family], SERVICE) == "ok", (family, ns)
    finally:
        for server in servers:
            server.close()


@pytest.mark.root
@pytest.mark.backends("iptables", "ipset")
@pytest.mark.parametrize("docker, hooked", [("legacy", True), ("nft", False)])
def test_docker_user_as_a_hook_works_only_where_docker_writes_the_legacy_tables(daemon, peer, container, docker,
                                                                                 hooked):
    """hooks: [DOCKER-USER] puts the jump in Docker's own chain, when Docker uses iptables-legacy; with iptables-nft
    (Debian 12), DOCKER-USER is in the nft tables, where the legacy backends do not look: nothing is blocked."""
    site = build(daemon, peer, container, docker)
    d = site.router
    d.config["chains"] = {"containers": {"hooks": ["DOCKER-USER"], "target": "DROP", "backend": d.backend}}
    d.start()
    service = Listener(site.container, CONTAINER[4], SERVICE)
    try:
        change(d, "PUT", "containers", rest(4, PEER[4]))
        assert attempt(site.peer, ROUTER_UP[4], PUBLISHED) == ("timeout" if hooked else "ok")
        if hooked:
            assert d.ns.run(["iptables-legacy", "-S", "DOCKER-USER"]).stdout.splitlines()[1:] == [
                "-A DOCKER-USER -j containers", "-A DOCKER-USER -j RETURN"]
        else:
            assert "hook chain DOCKER-USER does not exist (ipv4)" in d.log()
        change(d, "DELETE", "containers", rest(4, PEER[4]))
        assert attempt(site.peer, ROUTER_UP[4], PUBLISHED) == "ok"
    finally:
        service.close()


@pytest.mark.root
def test_a_docker_user_chain_made_after_the_start_is_hooked_by_the_kernel_check(daemon):
    """Docker started after the daemon (at boot, say): DOCKER-USER does not exist yet, then it does."""
    d = daemon
    d.config["chains"] = {"containers": {"hooks": ["DOCKER-USER"], "target": "DROP"}}
    d.config["limits"]["kernel_check"] = 0.5
    d.start()
    assert "hook chain DOCKER-USER does not exist (ipv4)" in d.log()
    d.ns.run(["iptables-legacy", "-w", "-N", "DOCKER-USER"])
    d.ns.run(["iptables-legacy", "-w", "-A", "DOCKER-USER", "-j", "RETURN"])
    deadline = time.monotonic() + 10
    while "-A DOCKER-USER -j containers" not in d.rules() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [r for r in d.rules() if r.startswith("-A DOCKER-USER")] == [
        "-A DOCKER-USER -j containers", "-A DOCKER-USER -j RETURN"]


def test_the_host_notes_a_user_chain_hook_on_an_iptables_nft_host_and_a_missing_interface(monkeypatch):
    monkeypatch.setattr(host, "iptables_is_nft_variant", lambda: True)
    monkeypatch.setattr(host, "_interfaces", lambda: ["lo", "eth0", "br-1a2b3c4d5e6f"])
    chains = [Chain("containers", ("DOCKER-USER",), "DROP"), Chain("web", ("INPUT",), "DROP", interface="eth0"),
              Chain("bridges", ("FORWARD",), "DROP", backend="ipset", interface="br-+"),
              Chain("gone", ("FORWARD",), "DROP", backend="nftables", interface="wg+"),
              Chain("typo", ("OUTPUT",), "DROP", interface="eth1")]
    warnings = host.host_warnings(chains)
    assert [w for w in warnings if "DOCKER-USER" in w] == [
        "hook chains DOCKER-USER are looked for in the legacy tables, but this host's `iptables` is the nft variant: "
        "a chain that other tools make with it (Docker's DOCKER-USER) is not there, so nothing is hooked to it. "
        "Hook FORWARD instead (docs/docker.md)"]
    assert [w.split(",")[0] for w in warnings if "interface" in w] == [
        "chain gone matches interface wg+", "chain typo matches interface eth1"]
    monkeypatch.setattr(host, "iptables_is_nft_variant", lambda: False)
    assert not any("DOCKER-USER" in w for w in host.host_warnings(chains))
