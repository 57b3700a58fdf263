"""What the worker asks a backend to do: add or remove one entry of a chain, and how a batch of that is undone.

It imports no backend, so every backend can import it without an import going in a circle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, TypeVar

from webiptd.net import Network

logger = logging.getLogger(__name__)

K = TypeVar("K")


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
    """The op that takes `op` back. An entry put back has no expiry: the worker's own expiry keeps its time."""
    return Remove(op.chain, op.network, op.target) if isinstance(op, Add) else Add(op.chain, op.network, op.target)


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
