"""The small interface every firewall backend implements, and the router.

The worker decides what to change; a backend only knows how. Each chain names its
backend in the config (iptables, ipset or nftables); `ByChain` sends each chain's
operations to that backend, so the worker sees one backend.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Protocol

from webiptd.config import Chain, Network

# The operations are in ops.py, below the backends (which import them from there, not from here:
# this module imports the backends); they are named here too for the worker.
from webiptd.firewall.ops import Add, CapacityExceeded, Op, Remove, inverse

__all__ = ["Add", "Backend", "ByChain", "CapacityExceeded", "Op", "Remove", "inverse", "make_backend"]

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def expires_in_kernel(self, chain: str) -> bool:
        """True when the kernel removes `chain`'s entries at their expiry itself (set timeouts)."""

    def shares_target(self, chain: str) -> bool:
        """True when `chain`'s target applies to all its entries at once (one match rule per set)."""

    def prepare(self, chains: Iterable[Chain]) -> None:
        """Create missing chains, sets and hook jumps. Idempotent; never flushes an entry."""

    def read(self, chains: Iterable[str]) -> Mapping[tuple[str, Network], str]:
        """Every entry in the managed chains: (chain, network) -> target. Foreign rules are left out."""

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        """Apply all `ops` atomically (or undo them and raise), after re-checking what they touch."""

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        """A cheap look, every few seconds: None while the kernel plausibly holds every entry (`counts`: how
        many each chain has), else what is gone, in a few words; the worker then reconciles."""

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


class ByChain:
    """Routes each chain's operations to the backend its config names.

    A chain that has left the config keeps the backend it last had, so its entries
    can still expire and be unblocked; one never seen in any config is iptables'.
    """

    name = "by-chain"

    def __init__(self, chains: Iterable[Chain], factory: Callable[[str], Backend] = make_backend):
        self._factory = factory
        self._backends: dict[str, Backend] = {}
        self._route: dict[str, str] = {}
        self.configure(chains)

    def configure(self, chains: Iterable[Chain]) -> None:
        for chain in chains:
            self._route[chain.name] = chain.backend
            self._backend(chain.backend)

    def backend_of(self, chain: str) -> str:
        return self._route.get(chain, "iptables")

    def _backend(self, name: str) -> Backend:
        if name not in self._backends:
            self._backends[name] = self._factory(name)
        return self._backends[name]

    def expires_in_kernel(self, chain: str) -> bool:
        return self._backend(self.backend_of(chain)).expires_in_kernel(chain)

    def shares_target(self, chain: str) -> bool:
        return self._backend(self.backend_of(chain)).shares_target(chain)

    def prepare(self, chains: Iterable[Chain]) -> None:
        chains = list(chains)
        self.configure(chains)
        for name, backend in self._backends.items():
            backend.prepare([c for c in chains if c.backend == name])

    def read(self, chains: Iterable[str]) -> dict[tuple[str, Network], str]:
        by_backend: dict[str, list[str]] = {}
        for chain in chains:
            by_backend.setdefault(self.backend_of(chain), []).append(chain)
        found: dict[tuple[str, Network], str] = {}
        for name, names in by_backend.items():
            found.update(self._backend(name).read(names))
        return found

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        by_backend: dict[str, list[Op]] = {}
        for op in ops:
            by_backend.setdefault(self.backend_of(op.chain), []).append(op)
        done: list[tuple[Backend, list[Op]]] = []
        try:
            for name, backend_ops in by_backend.items():
                backend = self._backend(name)
                backend.apply(backend_ops, chains)
                done.append((backend, backend_ops))
        except Exception:
            # Each backend is atomic on its own; undo the ones that did their part.
            for backend, backend_ops in done:
                try:
                    backend.apply([inverse(op) for op in reversed(backend_ops)], chains)
                except Exception:
                    logger.exception("could not undo the %s part of a failed batch", backend.name)
            raise

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        chains = list(chains)
        for name, backend in self._backends.items():
            mine = [c for c in chains if c.backend == name]
            if mine:
                found = backend.missing(mine, {c.name: counts.get(c.name, 0) for c in mine})
                if found is not None:
                    return found
        return None

    def close(self) -> None:
        for backend in self._backends.values():
            try:
                backend.close()
            except Exception:
                logger.exception("closing the %s backend failed", backend.name)
