"""The small interface every firewall backend implements, and the operations it applies.

The worker decides what to change; a backend only knows how. Set-based backends
(ipset, nftables) slot in beside the iptables one behind this same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from webiptd.config import Chain, Network


@dataclass(frozen=True)
class Add:
    chain: str
    network: Network
    target: str


@dataclass(frozen=True)
class Remove:
    chain: str
    network: Network
    target: str


Op = Add | Remove


class Backend(Protocol):
    name: str

    def prepare(self, chains: Iterable[Chain]) -> None:
        """Create missing chains and hook jumps. Idempotent; never flushes a chain."""

    def read(self, chains: Iterable[str]) -> Mapping[tuple[str, Network], str]:
        """Every block rule in the managed chains: (chain, network) -> target. Foreign rules are left out."""

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        """Apply all `ops` atomically per table, after re-checking the chains and jumps they touch."""

    def close(self) -> None:
        """Release what the backend holds."""
