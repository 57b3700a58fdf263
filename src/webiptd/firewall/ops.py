"""What the worker asks a backend to do: add or remove one entry of a chain, and how a batch of that is undone.

It imports no backend, so every backend can import it without an import going in a circle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, TypeVar

from webiptd.net import Network, unpacked
from webiptd.scope import Scope

logger = logging.getLogger(__name__)

K = TypeVar("K")

# What the kernel holds one object (a rule, a set element, or a few of them) for: (chain, network, scope).
# scope None: all traffic from (or to) the network. Scope(proto): every port of one protocol. Scope(proto, ports):
# those ports; the kernel holds at most one such atom per (chain, network, proto), the union of the ports of every
# block of that network and protocol (the worker computes it), so a backend never has to share an element between
# two blocks: a change of the union is a Remove of the old atom and an Add of the new one, in one apply().
Key = tuple[str, Network, Scope | None]


@dataclass(frozen=True)
class Add:
    """Add an entry; on a backend with kernel timeouts, an existing entry takes the new expiry."""

    chain: str
    network: Network
    target: str
    expires_at: float | None = None
    scope: Scope | None = None
    # Set by the worker when the kernel holds the entry already and only its expiry changes, so a set
    # backend can replace the element rather than probe for it. Not part of equality: the same entry.
    replaces: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Remove:
    """Remove an entry; one that is already gone (expired in the kernel, say) is not an error."""

    chain: str
    network: Network
    target: str
    scope: Scope | None = None


Op = Add | Remove


# New blocks of a load as the worker hands them to Backend.load(): (net_text, packed address, prefix length) each.
Items = Sequence[tuple[str, bytes, int]]


def adds(chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
         replaces: bool = False) -> list[Op]:
    """A load as Adds: what a backend without a faster way does with it."""
    return [Add(chain, unpacked(packed, length), target, expires_at, scope, replaces=replaces)
            for _, packed, length in items]


def key_of(op: Op) -> Key:
    return (op.chain, op.network, op.scope)


class CapacityExceeded(Exception):
    """A set is full (its maxelem): the batch fails as a whole and its requests get 507."""


def inverse(op: Op) -> Op:
    """The op that takes `op` back. An entry put back has no expiry: the worker's own expiry keeps its time."""
    if isinstance(op, Add):
        return Remove(op.chain, op.network, op.target, op.scope)
    return Add(op.chain, op.network, op.target, scope=op.scope)


def undo(ops: Sequence[Op]) -> list[Op]:
    """The ops that take `ops` back, newest first."""
    return [inverse(op) for op in reversed(ops)]


def apply_in_parts(parts: Mapping[K, list[Op]], apply: Callable[[K, list[Op]], None],
                   label: Callable[[K], str] = str) -> None:
    """Apply each part (each atomic on its own: a table, a backend) so that the whole is too.

    When a part fails, the parts already applied are undone, in the order they were applied, and the
    failure is raised. An undo that fails is logged: the worker reconciles after every failed batch.
    """
    done: list[tuple[K, list[Op]]] = []
    try:
        for key, ops in parts.items():
            apply(key, ops)
            done.append((key, ops))
    except Exception:
        for key, ops in done:
            try:
                apply(key, undo(ops))
            except Exception:
                logger.exception("could not undo the %s part of a failed batch", label(key))
        raise
