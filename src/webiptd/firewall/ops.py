"""The operations the worker asks a backend to apply: add or remove one entry of a chain.

They sit below every backend module (backend.py imports the backends to make them, so the backends
take these from here and no import goes in a circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from webiptd.config import Network


@dataclass(frozen=True)
class Add:
    """Add an entry; on a backend with kernel timeouts, an existing entry takes the new expiry."""

    chain: str
    network: Network
    target: str
    expires_at: float | None = None
    # Set by the worker when the kernel holds the entry already and only its expiry changes, so a set
    # backend can replace the element rather than probe for it. Not part of equality: the same entry.
    replaces: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Remove:
    """Remove an entry; one that is already gone (expired in the kernel, say) is not an error."""

    chain: str
    network: Network
    target: str


Op = Add | Remove


class CapacityExceeded(Exception):
    """A set is full (its maxelem): the batch fails as a whole and its requests get 507."""


def inverse(op: Op) -> Op:
    return Remove(op.chain, op.network, op.target) if isinstance(op, Add) else Add(op.chain, op.network, op.target)
