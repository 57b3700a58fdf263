"""The frozen values that flow from the HTTP edge to the firewall worker, and what comes back.

The edge parses and validates; the worker receives only commands that are already valid.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from typing import Any, Union

from webiptd.config import Chain, Network, compact


def family_name(network: Network) -> str:
    return "ipv4" if network.version == 4 else "ipv6"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Entry:
    """One blocked network in one managed chain, as stored and as reported."""

    chain: str
    network: Network
    target: str
    created_at: float
    expires_at: float | None
    created_by: str

    @property
    def key(self) -> tuple[str, Network]:
        return (self.chain, self.network)

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "family": family_name(self.network),
            "network": str(self.network),
            "target": self.target,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "created_by": self.created_by,
        }


@dataclass(frozen=True)
class Block:
    chain: Chain
    network: Network
    expires_at: float | None  # None: permanent
    actor: str
    client: str


@dataclass(frozen=True)
class BulkBlock:
    """Many blocks in one chain, applied in one group commit (a threat feed, say)."""

    chain: Chain
    networks: tuple[Network, ...]
    expires_at: float | None
    actor: str
    client: str


@dataclass(frozen=True)
class Unblock:
    chain: Chain
    network: Network
    actor: str
    client: str


@dataclass(frozen=True)
class Lookup:
    chain: str
    network: Network


@dataclass(frozen=True)
class ListChain:
    chain: str


@dataclass(frozen=True)
class Reconfigure:
    """Sent on reload: make sure every configured chain and hook jump exists, then reconcile."""

    chains: tuple[Chain, ...]
    kernel_check: float = 5.0  # limits.kernel_check


Command = Union[Block, BulkBlock, Unblock, Lookup, ListChain, Reconfigure]


@dataclass(frozen=True)
class Blocked:
    created: bool
    entry: Entry


@dataclass(frozen=True)
class Unblocked:
    deleted: bool
    entry: Entry | None


class FirewallUnavailable(Exception):
    """The firewall or the state store refused a change; the request gets a 503 and nothing changed."""


class FirewallFull(FirewallUnavailable):
    """A set backend's set is full (maxelem); the request gets a 507 and nothing changed."""


def parse_item(text: str) -> Network:
    """One bulk item, "ADDRESS" or "ADDRESS/PREFIX", its family taken from the address."""
    address, _, prefix = text.partition("/")
    family = "ipv6" if ":" in address else "ipv4"
    return parse_network(family, address, prefix if "/" in text else None)


def parse_network(family: str, address: str, prefix: str | None) -> Network:
    """Parse path segments into a network. Raises ValueError with a sentence for the client."""
    if family not in ("ipv4", "ipv6"):
        raise ValueError(f"unknown address family {family!r}; use ipv4 or ipv6")
    version = 4 if family == "ipv4" else 6
    try:
        addr = ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not a valid {family} address") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError("scoped IPv6 addresses cannot be blocked")
        if addr.ipv4_mapped is not None:
            raise ValueError("IPv4-mapped IPv6 addresses are blocked through the ipv4 path")
    max_len: int = addr.max_prefixlen
    if prefix is None:
        length = max_len
    else:
        if not prefix.isascii() or not prefix.isdigit() or (len(prefix) > 1 and prefix[0] == "0"):
            raise ValueError(f"prefix {prefix!r} is not a whole number")
        length = int(prefix)
        if not 1 <= length <= max_len:
            raise ValueError(f"prefix length must be 1 to {max_len} for {family}")
    try:
        return compact(ipaddress.ip_network((addr, length), strict=True))
    except ValueError:
        proper = ipaddress.ip_network((addr, length), strict=False)
        raise ValueError(f"{address}/{length} has host bits set; did you mean {proper}?") from None
