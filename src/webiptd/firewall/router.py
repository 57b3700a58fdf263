"""`ByChain`, the one backend the worker sees: it sends each chain's operations to the backend its config names."""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable, Mapping

from webiptd.config import Chain
from webiptd.firewall.backend import Backend, make_backend
from webiptd.firewall.ops import Items, Key, Op, apply_in_parts
from webiptd.scope import Scope

logger = logging.getLogger(__name__)


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

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        chains = list(chains)
        retired = list(retired)
        self.configure(chains)
        for name, backend in self._backends.items():
            backend.prepare([c for c in chains if c.backend == name], retired)

    def read(self, chains: Iterable[str]) -> Iterable[tuple[Key, str]]:
        """Each backend's atoms in turn, as they come: never all of them at once. Every backend's read() is called
        here (each opens what reads its kernel, in the caller's namespace); they are consumed after."""
        by_backend: dict[str, list[str]] = {}
        for chain in chains:
            by_backend.setdefault(self.backend_of(chain), []).append(chain)
        return itertools.chain.from_iterable([self._backend(name).read(names) for name, names in by_backend.items()])

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        by_backend: dict[str, list[Op]] = {}
        for op in ops:
            by_backend.setdefault(self.backend_of(op.chain), []).append(op)
        # Each backend is atomic on its own; a failure undoes the ones that did their part.
        apply_in_parts(by_backend, lambda name, part: self._backend(name).apply(part, chains))

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        self._backend(self.backend_of(chain)).load(chain, target, expires_at, scope, items, chains, replaces)

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        chains = list(chains)
        for name, backend in self._backends.items():
            mine = [c for c in chains if c.backend == name]
            if mine:
                found = backend.missing(mine, {c.name: counts.get(c.name, 0) for c in mine})
                if found is not None:
                    return found
        return None

    def seal(self) -> str | None:
        """Every backend's seal, when each one in use can seal (none but nftables can)."""
        used = sorted(set(self._route.values()))
        tokens = []
        for name in used:
            token = self._backend(name).seal()
            if token is None:
                return None
            tokens.append(f"{name}={token}")
        return " ".join(tokens) or None

    def sealed(self, token: str) -> bool:
        parts = dict(part.partition("=")[::2] for part in token.split(" "))
        return sorted(parts) == sorted(set(self._route.values())) and all(
            self._backend(name).sealed(part) for name, part in parts.items())

    def close(self) -> None:
        for backend in self._backends.values():
            try:
                backend.close()
            except Exception:
                logger.exception("closing the %s backend failed", backend.name)
