"""What a firewall backend is (the small interface the worker drives) and how one is made by name.

The worker decides what to change; a backend only knows how.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from webiptd.config import Chain
from webiptd.firewall.ops import Items, Key, Op
from webiptd.scope import Scope


class Backend(Protocol):
    name: str

    def expires_in_kernel(self, chain: str) -> bool:
        """True when the kernel removes `chain`'s entries at their expiry itself (set timeouts)."""

    def shares_target(self, chain: str) -> bool:
        """True when `chain`'s target applies to all its entries at once (one match rule per set)."""

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        """Create missing chains, sets and hook jumps. Idempotent; never flushes an entry. `retired`: chains that
        have entries but left the config: their hook jumps go (their rules and sets stay, and expire as usual)."""

    def read(self, chains: Iterable[str]) -> Iterable[tuple[Key, str]]:
        """Every atom in the managed chains: (chain, network, scope), target pairs, each atom once. Foreign rules are
        left out. What the kernel holds with ports for one (chain, network, proto) comes back as one atom, the union
        of its ports. It may be an iterator that streams the kernel's listing (a million atoms are never held at
        once): consume it once, promptly, in the thread that called read(). Whatever reads the kernel (a socket, a
        command) is opened by the call itself, in the caller's network namespace."""

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        """Apply all `ops` atomically (or undo them and raise), after re-checking what they touch."""

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        """Add `items`, new blocks of one load that the kernel does not hold (as far as the store knows), all with
        the same target, expiry and scope (never one with port lists): apply() of their Adds, atomically too, in
        less time an item. An item the kernel holds already takes the new expiry, as an Add's does. `replaces`:
        the items are blocks the kernel holds, given a new expiry (a backend whose kernel expires them: the
        Adds' `replaces`); a failure then takes nothing out of the kernel."""

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        """A cheap look, every few seconds: None while the kernel plausibly holds every atom (`counts`: how
        many atoms each chain has; each is at least one rule or element), else what is gone, in a few words; the
        worker then reconciles."""

    def seal(self) -> str | None:
        """Between batches (a quiet moment, a stop): a token by which sealed() can tell, at the next start, that the
        kernel still holds exactly what it held now (nobody has changed it since), so that the start need not read
        it back. None when the backend cannot tell that (only nftables can: its ruleset generation)."""

    def sealed(self, token: str) -> bool:
        """True when the kernel is still as it was when seal() made `token`."""

    def close(self) -> None:
        """Release what the backend holds."""


def make_backend(name: str) -> Backend:
    """Import a backend only when a chain uses it, so hosts need only the libraries they use."""
    if name == "iptables":
        from webiptd.firewall.iptables import IptablesBackend
        return IptablesBackend()
    if name == "ipset":
        from webiptd.firewall.ipset import IpsetBackend
        return IpsetBackend()
    if name == "nftables":
        from webiptd.firewall.nftables import NftablesBackend
        return NftablesBackend()
    raise ValueError(f"unknown backend {name!r}")
