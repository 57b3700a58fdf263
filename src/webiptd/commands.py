"""The frozen values that flow from the HTTP edge to the firewall worker, and what comes back.

The edge parses and validates; the worker receives only commands that are already valid.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

from webiptd.config import Chain, Limits
from webiptd.net import Network, net_text
from webiptd.scope import Scope


def family_name(network: Network) -> str:
    return "ipv4" if network.version == 4 else "ipv6"


_ISO: dict[int, str] = {}  # the last few seconds' texts: an answer's times are mostly the current second's


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    second = math.floor(round(ts * 1e6) / 1e6)  # as fromtimestamp() rounds it to the microsecond
    text = _ISO.get(second)
    if text is None:
        if len(_ISO) >= 64:
            _ISO.clear()
        text = _ISO[second] = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).isoformat().replace(
            "+00:00", "Z")
    return text




class Claim(NamedTuple):
    """One owner's hold on a blocked network: the user, or `user/label`, with its own expiry. A claim from another
    host of the fleet has that host's `node`, and its owner is `node/user[/label]`; (node, owner) is a claim's
    identity, so a local `fw1/ops` (user fw1, label ops) is not node fw1's `fw1/ops`."""

    owner: str
    created_at: float
    expires_at: float | None  # None: permanent
    node: str = ""  # "": this host's

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "created_at": _iso(self.created_at), "expires_at": _iso(self.expires_at),
                "node": self.node or None}


def effective_expiry(claims: tuple[Claim, ...]) -> float | None:
    """The latest expiry of `claims`, None if any of them is permanent."""
    latest = 0.0
    for claim in claims:
        if claim.expires_at is None:
            return None
        latest = max(latest, claim.expires_at)
    return latest


@dataclass(frozen=True, slots=True)
class Entry:
    """One blocked network in one managed chain, for all its traffic or for the `scope` (a protocol, and maybe
    ports) only, as stored and as reported. (chain, network, scope) is its identity.

    `claims` is empty in the usual case of one claim, the first claimant's: (created_by, created_at, expires_at).
    Otherwise it holds every claim, sorted by owner, and expires_at is their effective expiry. `Entry.of` keeps
    that form, so that two entries with the same claims are equal.
    """

    chain: str
    network: Network
    target: str
    created_at: float
    expires_at: float | None
    created_by: str
    claims: tuple[Claim, ...] = ()
    scope: Scope | None = None

    @classmethod
    def of(cls, chain: str, network: Network, target: str, created_at: float, created_by: str,
           claims: tuple[Claim, ...] | list[Claim], scope: Scope | None = None) -> Entry:
        """The entry held by `claims` (at least one), in its one canonical form."""
        ordered = tuple(sorted(claims, key=lambda c: (c.owner, c.node)))  # (owner, node) is unique
        if len(ordered) == 1 and ordered[0] == (created_by, created_at, ordered[0].expires_at, ""):
            return cls(chain, network, target, created_at, ordered[0].expires_at, created_by, (), scope)
        return cls(chain, network, target, created_at, effective_expiry(ordered), created_by, ordered, scope)

    @property
    def key(self) -> tuple[str, Network, Scope | None]:
        return (self.chain, self.network, self.scope)

    @property
    def due(self) -> float | None:
        """When the first of its claims expires (the entry goes then, or only that claim); None: none does."""
        if not self.claims:
            return self.expires_at
        return min((c.expires_at for c in self.claims if c.expires_at is not None), default=None)

    @property
    def all_claims(self) -> tuple[Claim, ...]:
        return self.claims or (Claim(self.created_by, self.created_at, self.expires_at),)

    def claim(self, owner: str, node: str = "") -> Claim | None:
        return next((c for c in self.all_claims if c.owner == owner and c.node == node), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "family": family_name(self.network),
            "network": net_text(self.network),
            "proto": None if self.scope is None else self.scope.proto,
            "port": None if self.scope is None or not self.scope.ports else self.scope.port_text,
            "target": self.target,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "created_by": self.created_by,
            "claims": [c.to_json() for c in self.all_claims],
        }


@dataclass(frozen=True)
class Block:
    """Add or refresh the claim of `owner` (empty: the actor's own) on `network`."""

    chain: Chain
    network: Network
    expires_at: float | None  # None: permanent; the claim's own expiry
    actor: str
    client: str
    owner: str = ""
    scope: Scope | None = None

    @property
    def claimant(self) -> str:
        return self.owner or self.actor


@dataclass(frozen=True)
class BulkBlock:
    """Many blocks in one chain, applied in one group commit (a bulk POST of at most DETAIL items): the worker
    answers a Blocked per network and audits each. A larger load comes in batches of BulkLoad."""

    chain: Chain
    networks: tuple[Network, ...]
    expires_at: float | None
    actor: str
    client: str
    owner: str = ""
    scope: Scope | None = None


# One item of a large load as the edge parsed it: the network's store text (net_text), its address packed (4 or 16
# bytes, host bits clear) and its prefix length. A million of these cost a fraction of as many ipaddress networks.
Packed = tuple[str, bytes, int]


@dataclass(frozen=True)
class BulkLoad:
    """One batch of a large streamed load (past DETAIL items): the blocks of `items` (sorted by their text, as the
    store's key), answered with BulkBlocked counts and audited in one line. The networks nobody holds go to the
    store and the kernel as rows and packed addresses, without an Entry or an ipaddress object each; the rest as a
    Block each."""

    chain: Chain
    items: tuple[Packed, ...]
    expires_at: float | None
    actor: str
    client: str
    owner: str = ""
    scope: Scope | None = None


@dataclass(frozen=True)
class Unblock:
    """Release the claim of `owner` (empty: the actor's own); with `every_claim` (owner=*, for a user with
    override), release them all."""

    chain: Chain
    network: Network
    actor: str
    client: str
    owner: str = ""
    every_claim: bool = False
    scope: Scope | None = None

    @property
    def claimant(self) -> str:
        return "*" if self.every_claim else self.owner or self.actor


@dataclass(frozen=True)
class Lookup:
    chain: str
    network: Network
    scope: Scope | None = None


@dataclass(frozen=True)
class ListChain:
    chain: str


@dataclass(frozen=True)
class Reconfigure:
    """Sent on reload: make sure every configured chain and hook jump exists, then reconcile."""

    chains: tuple[Chain, ...]
    kernel_check: float = Limits.kernel_check


@dataclass(frozen=True)
class RemoteChange:
    """One event of the fleet's stream, validated: `node`'s `owner` (user[/label]; "*" with unblock: every claim)
    blocks or unblocks `network` in `chain`. Its claim here is owned by `node/owner`."""

    op: str  # "block" or "unblock"
    chain: str
    network: Network
    scope: Scope | None
    node: str
    owner: str
    created_at: float
    expires_at: float | None
    event_id: str

    @property
    def claim_owner(self) -> str:
        return f"{self.node}/{self.owner}"


@dataclass(frozen=True)
class FleetApply:
    """Apply a run of the stream's events, and move the cursor (the last id read, skipped events included) with
    them in one transaction."""

    changes: tuple[RemoteChange, ...]
    cursor: str
    ordinal: int  # the stream's entries-added count at the cursor, for the lag


@dataclass(frozen=True)
class FleetResync:
    """Replace every remote claim of the shared chains with the snapshot's (`claims`, op block each), and follow
    the stream from `cursor`. With `keep`, remote claims stay and only the snapshot's are added (Redis lost its
    data: what the hosts hold is then more than what Redis knows), and every live local claim of the shared
    chains is announced again."""

    claims: tuple[RemoteChange, ...]
    cursor: str
    ordinal: int
    keep: bool = False


@dataclass(frozen=True)
class FleetApplied:
    applied: int  # events that changed a claim
    skipped: int  # events refused here (a chain this host does not share), or that changed nothing


Command = Union[Block, BulkBlock, BulkLoad, Unblock, Lookup, ListChain, Reconfigure, FleetApply, FleetResync]


@dataclass(frozen=True)
class Blocked:
    created: bool
    entry: Entry


class BulkBlocked(NamedTuple):
    """What a BulkLoad did: networks newly blocked, and those this claimant already held or that
    someone else blocked (its claim added)."""

    created: int
    existing: int


@dataclass(frozen=True)
class Unblocked:
    """`deleted`: the kernel entry went (its last claim did). `released`: the caller's claim went.
    `entry`: the entry as it is now, or as it was just before it went; None when nothing was blocked."""

    deleted: bool
    entry: Entry | None
    released: bool = False


class FirewallUnavailable(Exception):
    """The firewall or the state store refused a change; the request gets a 503 and nothing changed."""


class FirewallFull(FirewallUnavailable):
    """A set backend's set is full (maxelem); the request gets a 507 and nothing changed."""
