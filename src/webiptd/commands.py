"""The frozen values that flow from the HTTP edge to the firewall worker, and what comes back.

The edge parses and validates; the worker receives only commands that are already valid.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Union

from webiptd.config import Chain, Limits
from webiptd.net import Network


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
    kernel_check: float = Limits.kernel_check


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
