"""What a scoped block covers: one transport protocol, and all its ports or a list of them, parsed from fail2ban's
port format (`22`, `http,https`, `8000:8100`); and how the port lists of several blocks of one address add up."""

from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from webiptd.config import Chain

# The protocols a scoped block names, with their numbers (/etc/protocols; IANA). All of them carry ports at the same
# place of their header, which is what iptables' multiport, ipset's hash:net,port and nft's `th dport` look at.
PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
MAX_PORT = 65535
# The ipset backend keeps a port list one element a port, in hash:net,port sets that know the ports of these only.
IPSET_PORT_PROTOCOLS = ("tcp", "udp", "sctp", "udplite")
IPSET_MAX_PORTS = 1024
MAX_PORT_ITEMS = 100  # items of one port list: a comma list longer than any jail's
_SERVICE_RE = re.compile(r"[A-Za-z][A-Za-z0-9._+-]{0,31}")
_NUMBER_RE = re.compile(r"0|[1-9][0-9]{0,4}")

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True, order=True)
class Scope:
    """A protocol, and the destination ports of it a block covers: sorted inclusive ranges, none overlapping or
    touching (22 and 23 are the range 22:23); () covers every port of the protocol.

    The form is canonical, so that two scopes cover the same ports exactly when they are equal: an entry's identity
    is (chain, network, scope).
    """

    proto: str
    ports: Ranges = ()

    @classmethod
    def of(cls, proto: str, ranges: Iterable[tuple[int, int]]) -> Scope:
        """The scope covering `ranges` (any order, overlapping or not) of `proto`; every port when there are none."""
        return cls(proto, merge(ranges))

    @property
    def port_text(self) -> str:
        """The ports in fail2ban's format, as the API shows them and the store keeps them: `22,80:90`; '' for all."""
        return ",".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in self.ports)

    @property
    def port_count(self) -> int:
        """How many ports it covers; every port of the protocol counts as 65536 (0 to 65535)."""
        return sum(hi - lo + 1 for lo, hi in self.ports) if self.ports else MAX_PORT + 1

    def __str__(self) -> str:
        return f"{self.proto}/{self.port_text}" if self.ports else self.proto


def merge(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted ranges, where overlapping and touching ones are joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return tuple(out)


def union(scopes: Iterable[Scope]) -> Ranges:
    """The ports that any of `scopes` (of one protocol, each with a port list) covers."""
    return merge(r for s in scopes for r in s.ports)


@functools.lru_cache(maxsize=512)
def _service(name: str, proto: str) -> int | None:
    try:
        return socket.getservbyname(name, proto)
    except OSError:
        return None


def _port(text: str, proto: str) -> int:
    if _NUMBER_RE.fullmatch(text):
        number = int(text)
        if number > MAX_PORT:
            raise ValueError(f"port {text} is out of range: ports are 0 to {MAX_PORT}")
        return number
    if not _SERVICE_RE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is neither a port number nor a service name")
    service = _service(text, proto)
    if service is None:
        raise ValueError(f"unknown service {text!r} for {proto} (see /etc/services)")
    return service


def parse_ports(text: str, proto: str) -> Ranges:
    """fail2ban's port list: numbers, service names (/etc/services, for `proto`) and ranges `a:b`, comma separated."""
    items = text.split(",")
    if len(items) > MAX_PORT_ITEMS:
        raise ValueError(f"a port list has at most {MAX_PORT_ITEMS} items")
    ranges = []
    for item in items:
        item = item.strip()
        if not item:
            raise ValueError("a port list has an empty item")
        lo_text, sep, hi_text = item.partition(":")
        lo = _port(lo_text, proto)
        hi = _port(hi_text, proto) if sep else lo
        if hi < lo:
            raise ValueError(f"the port range {item[:40]!r} ends before it starts")
        ranges.append((lo, hi))
    return merge(ranges)


def parse_scope(proto: str | None, port: str | None) -> Scope | None:
    """The scope that a request's `proto` and `port` name, None for all traffic; ValueError with a sentence.

    fail2ban's `port = 0:65535` (its default) covers every port, and is the same entry as the protocol alone.
    """
    if proto is None:
        if port is not None:
            raise ValueError("port needs proto: add proto=tcp (or udp, sctp, dccp, udplite)")
        return None
    proto = proto.strip().lower()
    if proto == "all":
        if port is not None:
            raise ValueError("proto=all covers every port; leave port out, or name a protocol")
        return None
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto[:20]!r}; use one of {', '.join(PROTOCOLS)} (or all)")
    if port is None:
        return Scope(proto)
    ranges = parse_ports(port, proto)
    if ranges == ((0, MAX_PORT),):
        return Scope(proto)
    return Scope(proto, ranges)


def stored_scope(proto: str, ports: str) -> Scope | None:
    """A scope as the state store keeps it (proto, port_text); '' and '' is all traffic. ValueError if unreadable."""
    if not proto:
        if ports:
            raise ValueError(f"ports {ports!r} without a protocol")
        return None
    if proto not in PROTOCOLS:
        raise ValueError(f"unknown protocol {proto!r}")
    if not ports:
        return Scope(proto)
    ranges = []
    for item in ports.split(","):
        lo, _, hi = item.partition(":")
        ranges.append((int(lo), int(hi or lo)))
    scope = Scope(proto, merge(ranges))
    if scope.port_text != ports or not all(0 <= lo <= hi <= MAX_PORT for lo, hi in scope.ports):
        raise ValueError(f"ports {ports!r} are not in their stored form")
    return scope


def scope_refusal(chain: Chain, scope: Scope | None) -> str | None:
    """Why the chain's backend cannot hold `scope`, in a sentence; None when it can. ipset stores a port list one
    element a port, and matches ports of tcp, udp, sctp and udplite only (ipset(8), hash:net,port)."""
    if chain.backend != "ipset" or scope is None or not scope.ports:
        return None
    if scope.proto not in IPSET_PORT_PROTOCOLS:
        return (f"chain {chain.name!r} uses the ipset backend, which matches ports of "
                f"{', '.join(IPSET_PORT_PROTOCOLS)} only; leave port out to block every {scope.proto} port")
    if scope.port_count > IPSET_MAX_PORTS:
        return (f"chain {chain.name!r} uses the ipset backend, which keeps each port as an element: a block covers at "
                f"most {IPSET_MAX_PORTS} ports there, and this one covers {scope.port_count}; leave port out to block "
                f"every {scope.proto} port")
    return None
