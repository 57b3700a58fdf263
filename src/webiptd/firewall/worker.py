"""The one thread that changes the firewall. It takes submitted commands in batches, writes each batch to the
state store, applies it to the backend in one commit, and only then answers; it also expires blocks and
brings the kernel back in line with the store (reconcile).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence, overload

from webiptd import log
from webiptd.commands import (
    Block, Blocked, BulkBlock, BulkBlocked, BulkLoad, Claim, Command, Entry, FirewallFull, FirewallUnavailable,
    FleetApplied, FleetApply, FleetResync, ListChain, Lookup, Reconfigure, RemoteChange, Unblock, Unblocked,
)
from webiptd.config import ADOPTED, Chain, Limits
from webiptd.firewall.backend import Backend
from webiptd.firewall.ops import Add, CapacityExceeded, Items, Key, Op, Remove, adds
from webiptd.firewall.pending import Pending
from webiptd.metrics import Metrics
from webiptd.net import Network, net_text, packed_item, parse_stored, unpacked
from webiptd.scope import Scope, stored_scope, union
from webiptd.state import Counts, Fresh, Held, Refresh, Store, row_key, scope_columns

logger = logging.getLogger(__name__)

MAX_BATCH = 4096
MAX_QUEUE = 10_000
HEARTBEAT = 1.0  # the longest the worker sleeps, so the watchdog can tell it is alive
RETRY_DELAY = 1.0  # after a failed batch, due expiries wait this long before they are tried again
RECONCILE_CHUNK = 20_000  # ops in one backend apply of a reconcile, rows in one store write of it
LOAD_GROUP = 64  # atoms a reconcile re-adds with one target and expiry, from which they go as a load (Backend.load)

_Group = tuple[str, Network, str]  # (chain, network, proto): the blocks with port lists that make one kernel atom
_Item = tuple[object, Pending[Any] | None]  # a command, and the answer its client waits on (None: the worker's own)
_Answer = tuple[Pending[Any], object, object]  # the answer, the command, and what the command returned


AUDIT_LINE = "user=%s client=%s action=%s chain=%s network=%s owner=%s timeout=%s result=%s scope=%s"
BULK_AUDIT_LINE = ("user=%s client=%s action=bulk_block chain=%s networks=%d first=%s last=%s owner=%s timeout=%s "
                   "created=%d existing=%d scope=%s")


def _audit(user: str, client: str, action: str, chain: str, network: Network, owner: str, timeout: str,
           result: str, scope: Scope | None) -> None:
    """The one greppable key=value line per change; `owner` is the claim's ("*": every claim, by override);
    `scope` is `all` (all traffic), a protocol (`tcp`) or a protocol and its ports (`tcp/22,80`)."""
    log.audit(AUDIT_LINE, [(user, client, action, chain, network, owner, timeout, result,
                            "all" if scope is None else scope)])


def _has_ports(scope: Scope | None) -> bool:
    return scope is not None and bool(scope.ports)


def group_atom(entries: Iterable[Entry]) -> Entry | None:
    """What the kernel holds for the blocks with port lists of one (chain, network, proto): one atom with the union of
    their ports, until the latest of their expiries (permanent if one is), with the target of the newest of them;
    None for no blocks. Sharing it is what lets blocks with overlapping port lists come and go independently on the
    set backends, which cannot hold two overlapping elements (nftables) or would share one (ipset)."""
    entries = list(entries)
    if not entries:
        return None
    first = entries[0]
    assert first.scope is not None
    newest = max(entries, key=lambda e: e.created_at)
    expiries = [e.expires_at for e in entries]
    expiry = None if None in expiries else max(x for x in expiries if x is not None)
    scope = Scope(first.scope.proto, union(e.scope for e in entries if e.scope is not None))
    return Entry(first.chain, first.network, newest.target, 0.0, expiry, "", (), scope)


def _remote_claims(entry: Entry | None) -> int:
    return 0 if entry is None else sum(1 for c in entry.claims if c.node)


class _Index:
    """What the worker knows of its entries, without a Python object for any of them: the store answers for each
    key (it is the index, see state.py); the counts per chain, of entries and of kernel atoms, and of the claims of
    other hosts are kept here, for the kernel check and the metrics."""

    __slots__ = ("_store", "entries", "atoms", "remote")

    def __init__(self, store: Store, counts: Counts):
        self._store = store
        self.entries, self.atoms, self.remote = counts

    def get(self, key: Key) -> Entry | None:
        return self._store.get(*key)

    def group(self, chain: str, network: Network, proto: str) -> list[Entry]:
        """The blocks with port lists of `network` and `proto` in `chain`."""
        return self._store.group(chain, network, proto)

    def __len__(self) -> int:
        return sum(self.entries.values())

    def entry_counts(self) -> dict[str, int]:
        """How many entries each chain has; a copy, made by C code, which another thread cannot change half-way."""
        return dict(self.entries)

    def counts(self) -> dict[str, int]:
        """How many kernel atoms each chain has: one per block, but one per (network, proto) for the blocks with
        port lists (see group_atom)."""
        return dict(self.atoms)

    def update(self, changed: Mapping[Key, tuple[Entry | None, Entry | None]],
               atoms: Iterable[tuple[str, Entry | None, Entry | None]]) -> None:
        """Count a committed batch's changes and the kernel atoms they made and removed."""
        entries, counted = self.entries, self.atoms
        for key, (before, after) in changed.items():
            n = (after is not None) - (before is not None)
            if n:
                entries[key[0]] = entries.get(key[0], 0) + n
                if not entries[key[0]]:
                    del entries[key[0]]
            if (before is not None and before.claims) or (after is not None and after.claims):
                self.remote += _remote_claims(after) - _remote_claims(before)
        for chain, before, after in atoms:
            n = (after is not None) - (before is not None)
            if n:
                counted[chain] = counted.get(chain, 0) + n
                if not counted[chain]:
                    del counted[chain]


@dataclass(frozen=True)
class _Expire:
    key: Key


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass
class _Batch:
    """What one batch changes, keyed so that the last command on a key wins."""

    entries: _Index
    known: dict[Key, Entry | None] = field(default_factory=dict)  # committed entries looked up in advance (bulk)
    before: dict[Key, Entry | None] = field(default_factory=dict)
    after: dict[Key, Entry | None] = field(default_factory=dict)
    audits: list[tuple[Any, ...]] = field(default_factory=list)
    bulk_audits: list[tuple[Any, ...]] = field(default_factory=list)  # one line per batch of a large load
    expired: set[Key] = field(default_factory=set)  # the keys whose entries went at their expiry
    reconfigure: Reconfigure | None = None  # taken once the batch is committed
    outbox: list[str] = field(default_factory=list)  # the fleet's events of this batch's local changes (JSON)
    fleet: dict[str, str] = field(default_factory=dict)  # the follower's cursor, when the batch applies the stream
    fresh: list[Fresh] = field(default_factory=list)  # a load's new blocks, as rows (see Worker._load)
    refresh: list[Refresh] = field(default_factory=list)  # a load's blocks of the loader's, with a new expiry

    def committed(self, key: Key) -> Entry | None:
        return self.known[key] if key in self.known else self.entries.get(key)

    def get(self, key: Key) -> Entry | None:
        return self.after[key] if key in self.after else self.committed(key)

    def set(self, key: Key, entry: Entry | None) -> None:
        if key not in self.before:
            self.before[key] = self.committed(key)
        self.after[key] = entry

    def changes(self) -> dict[Key, tuple[Entry | None, Entry | None]]:
        """(before, after) of each key whose entry the batch changed."""
        return {k: (self.before[k], a) for k, a in self.after.items() if self.before[k] != a}


def kernel_ops(before: Entry | None, after: Entry | None, expires_in_kernel: bool = False) -> list[Op]:
    """The backend operations that turn the atom `before` into `after` for one key (for blocks with port lists,
    one (chain, network, proto): see group_atom).

    Only a backend whose kernel expires entries needs to hear of a new expiry; for
    iptables the worker's own expiry is the only clock.
    """
    if before is not None and after is not None and before.target == after.target and before.scope == after.scope:
        if expires_in_kernel and before.expires_at != after.expires_at:
            return [Add(after.chain, after.network, after.target, after.expires_at, after.scope, replaces=True)]
        return []
    ops: list[Op] = []
    if before is not None:
        ops.append(Remove(before.chain, before.network, before.target, before.scope))
    if after is not None:
        ops.append(Add(after.chain, after.network, after.target, after.expires_at, after.scope))
    return ops


def atom_changes(entries: _Index, changed: Mapping[Key, tuple[Entry | None, Entry | None]]
                 ) -> list[tuple[str, Entry | None, Entry | None]]:
    """(chain, atom before, atom after) for each kernel atom that `changed` (a batch's changes to the committed
    `entries`) touches: a block without a port list is its own atom; the blocks with port lists of one (chain,
    network, proto) share one."""
    out: list[tuple[str, Entry | None, Entry | None]] = []
    groups: dict[_Group, dict[Key, Entry | None]] = {}
    for key, (before, after) in changed.items():
        scope = key[2]
        if scope is None or not scope.ports:
            out.append((key[0], before, after))
        else:
            groups.setdefault((key[0], key[1], scope.proto), {})[key] = after
    for (chain, network, proto), afters in groups.items():
        committed = {e.key: e for e in entries.group(chain, network, proto)}
        now = {**committed, **afters}
        out.append((chain, group_atom(committed.values()),
                    group_atom(e for e in now.values() if e is not None)))
    return out


def _parts(items: list[_Item]) -> Iterator[list[_Item]]:
    """A batch's items in the parts that are processed (and committed) one after the other: a load (BulkLoad) ends
    its part, so that no command after it can touch the rows it adds without a key in the batch (Worker._load)."""
    part: list[_Item] = []
    for item in items:
        part.append(item)
        if isinstance(item[0], BulkLoad):
            yield part
            part = []
    if part:
        yield part


def _listing_order(entry: Entry) -> tuple[Any, ...]:
    """Family, network, then all traffic before a protocol, and a protocol's every port before its port lists."""
    scope = entry.scope
    return (entry.network.version, entry.network, scope is not None,
            ("", ()) if scope is None else (scope.proto, scope.ports))


class Worker:
    def __init__(self, backend: Backend, store: Store, chains: Iterable[Chain],
                 clock: Callable[[], float] = time.time, kernel_check: float = Limits.kernel_check,
                 metrics: Metrics | None = None, node: str | None = None):
        self._backend = backend
        # The fleet: this host's node name, None without a fleet. Local changes of shared chains go to the outbox;
        # `outbox_committed` is the last outbox row whose change the kernel took (the publisher publishes up to it),
        # `published` the last one the publisher got into Redis (the worker then deletes the rows).
        self._node = node
        self.outbox_committed = store.outbox_seq
        self.published = 0
        self._trimmed = 0
        self.on_outbox: Callable[[], None] = lambda: None
        bits = secrets.token_hex(10)  # 80 random bits, 74 used: the variant's 2 bits are fixed
        self._id_prefix = f"{bits[:8]}-{bits[8:12]}-8{bits[12:15]}-{'89ab'[int(bits[15], 16) & 3]}{bits[16:19]}-"
        self._events = 0
        # _announce's texts of the last times and names it wrote: a batch's local blocks share their created_at
        # (and, with one timeout, their expires_at), and a host's changes come from few chains and owners.
        self._times: dict[float, str] = {}
        self._plain: dict[tuple[str, str], bool] = {}
        self._fleet_state = store.fleet_state()
        self.metrics = metrics or Metrics()
        self._store = store
        self._chains: dict[str, Chain] = {c.name: c for c in chains}
        self._clock = clock
        # SimpleQueue (in C) rather than Queue (a Condition per put and get): see Pending.
        # MAX_QUEUE is checked by submit.
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._entries = _Index(store, Counts({}, {}, 0))  # counted by the first reconcile
        self._purge: list[Entry] = []  # tombstones whose kernel removal is done
        self._retry_at = 0.0  # expiries are not tried before this (clock time) after a failed batch
        # The chains whose last load found nothing of it in the store: their next load is written without a lookup
        # (Fresh.unseen), a fifth of a load's time, and looked up only if the store then holds some of it.
        self._unheld: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="firewall-worker", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._resync = False
        # The seal (see _seal): `_sealed`, the store holds one that says what the kernel holds now; `_seal_due`, the
        # kernel changed since the last seal (or start), so a quiet moment makes a new one.
        self._sealed = False
        self._seal_due = False
        self._seal_failed = False  # logged once a run
        self._kernel_check = kernel_check  # seconds between looks at whether the kernel still has our blocks
        self._next_check = time.monotonic() + kernel_check
        self.heartbeat = time.monotonic()

    # -- used by other threads --------------------------------------------------------

    def start(self, timeout: float = 300.0) -> None:
        """Start the thread and wait for the first reconcile. Raises what the reconcile raised."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the firewall worker did not finish reconciling in time")
        if self._start_error is not None:
            raise self._start_error

    @overload
    def submit(self, command: Block) -> Pending[Blocked]: ...
    @overload
    def submit(self, command: BulkBlock) -> Pending[list[Blocked]]: ...
    @overload
    def submit(self, command: BulkLoad) -> Pending[BulkBlocked]: ...
    @overload
    def submit(self, command: Unblock) -> Pending[Unblocked]: ...
    @overload
    def submit(self, command: Lookup) -> Pending[Entry | None]: ...
    @overload
    def submit(self, command: ListChain) -> Pending[list[Entry]]: ...
    @overload
    def submit(self, command: Reconfigure) -> Pending[None]: ...
    @overload
    def submit(self, command: FleetApply) -> Pending[FleetApplied]: ...
    @overload
    def submit(self, command: FleetResync) -> Pending[FleetApplied]: ...

    def submit(self, command: Command) -> Pending[Any]:
        """Queue `command`; its Pending answers with what the command's type says, or raises FirewallUnavailable."""
        fut: Pending[Any] = Pending()
        if self._queue.qsize() >= MAX_QUEUE:
            fut.set_exception(FirewallUnavailable("the firewall worker queue is full"))
        else:
            self._queue.put((command, fut))
        return fut

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put((_Stop(), None))
            self._thread.join(timeout)

    @property
    def count(self) -> int:
        return len(self._entries)

    def entry_counts(self) -> dict[str, int]:
        """Entries per chain, for a scrape from another thread: a snapshot, at a cost that does not grow with them."""
        return self._entries.entry_counts()

    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def remote_claims(self) -> int:
        return self._entries.remote

    def fleet_state(self) -> dict[str, str]:
        """The follower's cursor as committed: a copy, for other threads."""
        return dict(self._fleet_state)

    # -- the worker thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            self._reconcile(self._store.take_seal())
        except BaseException as exc:  # reported to start(), which fails the daemon's start-up
            logger.exception("reconcile at start failed")
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        while True:
            self.heartbeat = time.monotonic()
            if self.heartbeat >= self._next_check:
                self._next_check = self.heartbeat + self._kernel_check
                self._check_kernel()
            if self._resync:
                try:
                    self._reconcile()
                    self._resync = False
                except Exception:
                    logger.exception("reconcile after a failed batch failed; trying again with the next batch")
            items = self._next_batch()
            stop = any(isinstance(cmd, _Stop) for cmd, _ in items)
            items = [(cmd, fut) for cmd, fut in items if not isinstance(cmd, _Stop)]
            items += [(_Expire(key), None) for key in self._due()]
            for part in _parts(items):
                self._process(part)
            if not items and self.published > self._trimmed:
                self._trim_outbox()
            if (stop and not self._sealed) or (not items and self._seal_due):
                # Quiet for a moment (_next_batch waited) after a change, or stopping unsealed: seal the kernel.
                try:
                    if self._purge:
                        self._safe_write([], [], self._take_purges())
                except Exception:
                    pass  # logged; the purges wait for the next batch, and the seal with them
                else:
                    self._seal()
            if stop:
                logger.info("firewall worker stopped")
                return

    def _check_kernel(self) -> None:
        """Reconcile when another program took our blocks out of the kernel: `nft flush ruleset` (a reload
        of nftables.service), an `iptables-restore` of another ruleset, `ipset flush`. Without this, the
        blocks stayed out until the next change, restart or reload."""
        if self._resync:
            return
        try:
            missing = self._backend.missing(self._chains.values(), self._entries.counts())
            if missing is not None:
                # A set backend's kernel may have let an entry go a moment before the worker's own expiry
                # of it ran: finish the due expiries, then look again.
                due = self._due()
                if due:
                    self._process([(_Expire(key), None) for key in due])
                missing = self._backend.missing(self._chains.values(), self._entries.counts())
        except Exception:
            logger.exception("checking the firewall for missing blocks failed")
            return
        if missing is not None:
            logger.warning("the firewall lost blocks behind our back (%s); putting them back", missing)
            self.metrics.kernel_repairs.inc()
            self._resync = True

    def _next_batch(self) -> list[_Item]:
        try:  # under load something is queued: then no query for how long to wait
            items = [self._queue.get_nowait()]
        except queue.Empty:
            wait = HEARTBEAT
            due = self._store.next_due()
            if due is not None:
                now = self._clock()
                wait = min(wait, max(0.0, due - now, self._retry_at - now))
            try:
                items = [self._queue.get(timeout=wait)]
            except queue.Empty:
                return []
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _due(self) -> list[Key]:
        """The keys with a claim due now (the store's index of expiries), unless a failed batch asks to wait."""
        now = self._clock()
        if now < self._retry_at:
            return []
        due = self._store.next_due()
        if due is None or due > now:
            return []
        return self._store.due(now, MAX_BATCH)

    def _trim_outbox(self) -> None:
        """Delete the outbox rows the publisher got into Redis (a write of its own when the worker is idle)."""
        published = self.published
        try:
            self._store.write([], [], [], fleet={"published": str(published)}, published=published)
            self._fleet_state["published"] = str(published)
        except Exception:
            logger.exception("could not delete published events from the outbox")
            return
        self._trimmed = published

    def _take_purges(self) -> list[Entry]:
        purges, self._purge = self._purge, []
        return purges

    def _safe_write(self, puts: list[Entry], removes: list[Entry], purges: list[Entry], outbox: Sequence[str] = (),
                    fleet: Mapping[str, str] | None = None, published: int | None = None,
                    stale: Collection[tuple[str, str, str, str]] | None = None, fresh: Sequence[Fresh] = (),
                    unseal: bool = False, refresh: Sequence[Refresh] = ()) -> None:
        try:
            self._store.write(puts, removes, purges, outbox, fleet, published, stale, fresh, unseal, refresh)
        except Held:
            self._purge.extend(purges)
            raise
        except Exception:
            logger.exception("could not write the state store")
            self._purge.extend(purges)
            raise

    # -- a batch, in phases ----------------------------------------------------------

    def _process(self, items: list[_Item], again: bool = False) -> None:
        """Execute the commands against one batch, commit what it changed (store, then kernel), audit it,
        take a new configuration, and answer. `again`: the same items, once more (see Held)."""
        batch = _Batch(self._entries)
        if not again:
            self.metrics.batch_size.observe(len(items))
        answers = self._execute_all(batch, items)
        changes = batch.changes()
        if changes or batch.outbox or batch.fleet or batch.fresh or batch.refresh:
            started = time.perf_counter()
            try:
                self._commit(changes, batch)
            except Held:
                # A load guessed new holds some of the store's rows: nothing was written; again, looked up.
                self._unheld.difference_update(f.chain for f in batch.fresh)
                self._process(items, again=True)
                return
            except Exception as exc:
                self.metrics.batch_failures.inc()
                self._refused(items, answers, len(changes) + sum(len(f.items) for f in batch.fresh), exc)
                return
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self._count_changes(changes, batch.expired)
            for fresh in batch.fresh:
                self.metrics.blocks_added.labels(fresh.chain).inc(len(fresh.items))
        # Every acknowledged write is audited, also one that changed nothing (a block then an unblock
        # in one batch, an unblock of an absent network).
        with log.batch():
            log.audit(AUDIT_LINE, [(*args[:8], "all" if args[8] is None else args[8]) for args in batch.audits])
            if batch.bulk_audits:
                log.audit(BULK_AUDIT_LINE, batch.bulk_audits)
        reconfigure_error = None if batch.reconfigure is None else self._reconfigure(batch.reconfigure)
        for fut, cmd, result in answers:
            if isinstance(result, Exception):
                fut.set_exception(result)
            elif reconfigure_error is not None and isinstance(cmd, Reconfigure):
                fut.set_exception(reconfigure_error)
            else:
                fut.set_result(result)

    def _count_changes(self, changes: Mapping[Key, tuple[Entry | None, Entry | None]], expired: set[Key]) -> None:
        metrics = self.metrics
        added: dict[str, int] = {}
        removed: dict[tuple[bool, str], int] = {}
        for key, (before, after) in changes.items():  # counted first: a label lookup costs more than a count
            if before is None and after is not None:
                added[key[0]] = added.get(key[0], 0) + 1
            elif after is None and before is not None:
                gone = (key in expired, key[0])
                removed[gone] = removed.get(gone, 0) + 1
        for chain, n in added.items():
            metrics.blocks_added.labels(chain).inc(n)
        for (at_expiry, chain), n in removed.items():
            (metrics.blocks_expired if at_expiry else metrics.blocks_removed).labels(chain).inc(n)

    def _execute_all(self, batch: _Batch, items: list[_Item]) -> list[_Answer]:
        # The committed entries of the batch's blocks and unblocks from one query per (chain, scope), not one each:
        # SQLite's every step lets go of the GIL, so each lookup was a hand-off under load (bench/README.md).
        if len(items) > 1:
            wanted: dict[tuple[str, Scope | None], list[Network]] = {}
            for cmd, _ in items:
                if isinstance(cmd, (Block, Unblock)):
                    wanted.setdefault((cmd.chain.name, cmd.scope), []).append(cmd.network)
            for (name, scope), networks in wanted.items():
                if len(networks) > 1:
                    self._look_up(batch, name, scope, networks)
        answers: list[_Answer] = []
        for cmd, fut in items:
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue  # the client gave up before we started; do nothing for it
            try:
                result = self._execute(batch, cmd)
            except Exception:
                logger.exception("command failed: %r", cmd)
                # The client gets a fixed sentence; the exception's text is for the log only.
                result = FirewallUnavailable("the firewall worker failed on this request")
            if fut is not None:
                answers.append((fut, cmd, result))
        return answers

    def _execute(self, batch: _Batch, cmd: object) -> object:
        """One command against the batch; what it returns is what Worker.submit's overloads say."""
        match cmd:
            case Block():
                return self._block(batch, cmd)
            case BulkBlock():
                self._prefetch(batch, cmd)
                return [self._block(batch, Block(cmd.chain, network, cmd.expires_at, cmd.actor, cmd.client,
                                                 cmd.owner, cmd.scope))
                        for network in cmd.networks]
            case BulkLoad():
                return self._load(batch, cmd)
            case Unblock():
                return self._unblock(batch, cmd)
            case _Expire():
                self._expire(batch, cmd.key)
                return None
            case Lookup():
                return batch.get((cmd.chain, cmd.network, cmd.scope))
            case ListChain():
                return self._list(batch, cmd.chain)
            case Reconfigure():
                batch.reconfigure = cmd
                return None
            case FleetApply():
                return self._fleet_apply(batch, cmd)
            case FleetResync():
                return self._fleet_resync(batch, cmd)
        raise TypeError(f"unknown command {cmd!r}")

    def _block(self, batch: _Batch, cmd: Block) -> Blocked:
        """Add the claimant's claim, or refresh it: its new expiry replaces its old one, and no one else's."""
        now = self._clock()
        key: Key = (cmd.chain.name, cmd.network, cmd.scope)
        old = batch.get(key)
        owner = cmd.claimant
        if old is None:
            new = Entry(cmd.chain.name, cmd.network, cmd.chain.target, now, cmd.expires_at, owner, (), cmd.scope)
            result = "created"
            claim = Claim(owner, now, cmd.expires_at)
        else:
            mine = old.claim(owner)
            others = [c for c in old.all_claims if c.node or c.owner != owner]
            claim = Claim(owner, now if mine is None else mine.created_at, cmd.expires_at)
            new = Entry.of(old.chain, old.network, old.target, old.created_at, old.created_by, others + [claim],
                           old.scope)
            result = "claimed" if mine is None else "exists"
        if new != old and self._shares(cmd.chain.name):
            self._announce(batch, "block", key, owner, claim)
        batch.set(key, new)
        timeout = "permanent" if cmd.expires_at is None else str(max(0, round(cmd.expires_at - now)))
        batch.audits.append((cmd.actor, cmd.client, "block", cmd.chain.name, cmd.network, owner, timeout, result,
                             cmd.scope))
        return Blocked(created=old is None, entry=new)

    def _prefetch(self, batch: _Batch, cmd: BulkBlock) -> None:
        """Look the bulk's networks up in the store in a few queries, rather than one each."""
        self._look_up(batch, cmd.chain.name, cmd.scope, cmd.networks)

    def _look_up(self, batch: _Batch, name: str, scope: Scope | None, networks: Iterable[Network]) -> None:
        """Put the committed entries of `networks` in (name, scope) in `batch.known`, from a few queries."""
        fresh = [n for n in networks if (name, n, scope) not in batch.after and (name, n, scope) not in batch.known]
        found = self._store.get_many(name, scope, fresh)
        batch.known.update(((name, n, scope), found.get(n)) for n in fresh)

    def _load(self, batch: _Batch, cmd: BulkLoad) -> BulkBlocked:
        """One batch of a large load, audited in one line. A network nobody holds (most of a load) becomes a row of
        `batch.fresh`, which _commit writes to the store and hands the backend as it is: no Entry, no ipaddress
        object, no key in the batch's dicts. A network that is held, or that this batch touched already, is a Block
        like any other. _parts makes a load the last command of its batch, so no later one can touch its rows."""
        name, scope, owner = cmd.chain.name, cmd.scope, cmd.owner or cmd.actor
        now = self._clock()
        created = 0
        touched = {net_text(k[1]) for k in batch.after if k[0] == name and k[2] == scope}
        unseen = name in self._unheld and not touched and not _has_ports(scope)
        # Held already by the owner alone (its one claim, a row without claims rows), as a feed loaded again is, a
        # million at a time: with the same expiry, counted as existing; with another, given it in one statement (and
        # in the kernel, as a load). No Entry made for either.
        same: set[str] = set()
        timed: dict[str, tuple[float, float | None]] = {}
        found: dict[str, Entry] = {}
        if not unseen:
            same, timed, others = self._store.held_by(name, scope, owner, cmd.expires_at, [i[0] for i in cmd.items])
            if touched or _has_ports(scope):  # the batch's own changes, and port lists' groups: the general way
                moved = {t for t in (*same, *timed) if _has_ports(scope) or t in touched}
                others += moved
                same = same - moved
                timed = {t: times for t, times in timed.items() if t not in moved}
            if others:
                found = self._store.held(name, scope, others)
        batch.known.update(((name, e.network, scope), e) for e in found.values())
        if not found and not same and not timed and not touched:
            self._unheld.add(name)
        else:
            self._unheld.discard(name)
        # Twice in the batch: the second changes nothing, and counts as existing.
        unique = {item[0]: item for item in cmd.items if item[0] not in same and item[0] not in timed}
        if timed:
            refreshed = list({item[0]: item for item in cmd.items if item[0] in timed}.values())
            batch.refresh.append(Refresh(name, scope, cmd.chain.target, cmd.expires_at, refreshed,
                                         [timed[item[0]][1] for item in refreshed]))
            if self._shares(name):
                for text, packed, length in refreshed:
                    self._announce(batch, "block", (name, unpacked(packed, length), scope), owner,
                                   Claim(owner, timed[text][0], cmd.expires_at))
        fresh: list[tuple[str, bytes, int]] = []
        if found or touched or _has_ports(scope):
            audits = len(batch.audits)
            for text, item in unique.items():
                if text in found or text in touched or _has_ports(scope):
                    created += self._block(batch, Block(cmd.chain, unpacked(item[1], item[2]), cmd.expires_at,
                                                        cmd.actor, cmd.client, cmd.owner, scope)).created
                else:
                    fresh.append(item)
            del batch.audits[audits:]
        else:  # most of a load: nothing in it is held yet
            fresh = list(unique.values())
        if fresh:
            batch.fresh.append(Fresh(name, scope, cmd.chain.target, now, cmd.expires_at, owner, fresh, unseen))
            created += len(fresh)
            if self._shares(name):
                claim = Claim(owner, now, cmd.expires_at)
                for _, packed, length in fresh:
                    self._announce(batch, "block", (name, unpacked(packed, length), scope), owner, claim)
        if cmd.items:
            timeout = "permanent" if cmd.expires_at is None else str(max(0, round(cmd.expires_at - now)))
            batch.bulk_audits.append((cmd.actor, cmd.client, name, len(cmd.items), cmd.items[0][0],
                                      cmd.items[-1][0], owner, timeout, created, len(cmd.items) - created,
                                      "all" if scope is None else scope))
        return BulkBlocked(created, len(cmd.items) - created)

    def _unblock(self, batch: _Batch, cmd: Unblock) -> Unblocked:
        """Release the claimant's claim (every claim with override), and the adopted one, which is nobody's;
        the entry goes with its last claim."""
        key: Key = (cmd.chain.name, cmd.network, cmd.scope)
        old = batch.get(key)
        owner = cmd.claimant
        answer: Unblocked
        kept = [] if old is None or cmd.every_claim else [
            c for c in old.all_claims if c.node or c.owner not in (owner, ADOPTED)]
        if self._shares(cmd.chain.name) and (cmd.every_claim or (old is not None and len(kept) < len(old.all_claims)
                                                                 and old.claim(owner) is not None)):
            # An override goes to every host, also when this one has nothing: another may.
            self._announce(batch, "unblock", key, owner, None)
        if old is None:
            answer, result = Unblocked(deleted=False, entry=None, released=False), "absent"
        elif not kept:
            batch.set(key, None)
            answer, result = Unblocked(deleted=True, entry=old, released=True), "deleted"
        elif len(kept) == len(old.all_claims):
            answer, result = Unblocked(deleted=False, entry=old, released=False), "not_held"
        else:
            new = Entry.of(old.chain, old.network, old.target, old.created_at, old.created_by, kept, old.scope)
            batch.set(key, new)
            answer, result = Unblocked(deleted=False, entry=new, released=True), "released"
        batch.audits.append((cmd.actor, cmd.client, "unblock", cmd.chain.name, cmd.network, owner, "-", result,
                             cmd.scope))
        return answer

    def _shares(self, chain: str) -> bool:
        config = self._chains.get(chain)
        return self._node is not None and config is not None and config.shared

    def _announce(self, batch: _Batch, op: str, key: Key, owner: str, claim: Claim | None) -> None:
        """Put the fleet's event of a local change in the batch's outbox rows: JSON, written by a format string when
        the names in it need no escaping (the config's and the API's never do; the rest is an address, a protocol
        and ports, hex and floats' repr), else by json.dumps; the same row either way. 4.8 -> 2.2 µs an event
        against building lists of its names and texts (bench/README.md, fleet)."""
        chain, network, scope = key
        node = self._node or ""
        plain = self._plain.get((chain, owner))
        if plain is None:
            if len(self._plain) >= 1024:
                self._plain.clear()
            plain = self._plain[chain, owner] = _JSON_PLAIN.match(chain + owner + node) is not None
        if not plain:
            self._announce_escaped(batch, op, key, owner, claim)
            return
        text = (f'{{"op":"{op}","chain":"{chain}","network":"{net_text(network)}","owner":"{owner}","node":"{node}",'
                f'"id":"{self._event_id()}"')
        if scope is not None:
            text += f',"proto":"{scope.proto}","port":"{scope.port_text}"' if scope.ports else \
                f',"proto":"{scope.proto}"'
        if claim is not None:
            text += f',"created_at":"{self._time_text(claim.created_at)}"'
            if claim.expires_at is not None:
                text += f',"expires_at":"{self._time_text(claim.expires_at)}"'
        batch.outbox.append(text + "}")

    def _time_text(self, value: float) -> str:
        """repr(value), kept for the next events (0.6 µs a repr; a batch's blocks share their times). The times are
        the clock's, positive floats: equal values have the same repr."""
        text = self._times.get(value)
        if text is None:
            if len(self._times) >= 64:
                self._times.clear()
            text = self._times[value] = repr(value)
        return text

    def _announce_escaped(self, batch: _Batch, op: str, key: Key, owner: str, claim: Claim | None) -> None:
        """_announce's row by json.dumps, for names JSON must escape."""
        chain, network, scope = key
        event = {"op": op, "chain": chain, "network": net_text(network), "owner": owner, "node": self._node or "",
                 "id": self._event_id()}
        if scope is not None:
            event["proto"] = scope.proto
            if scope.ports:
                event["port"] = scope.port_text
        if claim is not None:
            event["created_at"] = repr(claim.created_at)
            if claim.expires_at is not None:
                event["expires_at"] = repr(claim.expires_at)
        batch.outbox.append(json.dumps(event, separators=(",", ":")))

    def _event_id(self) -> str:
        """A fleet event's id: a UUID (RFC 9562 version 8, its own layout) of 74 random bits drawn when the worker
        starts and a count of this worker's events, unique as a random one is, at a tenth of uuid4's cost."""
        self._events += 1
        return f"{self._id_prefix}{self._events:012x}"

    def _fleet_apply(self, batch: _Batch, cmd: FleetApply) -> FleetApplied:
        """Apply the stream's events (validated by the follower) as claims of their nodes, in order; a chain this
        host does not share (a reload since the follower looked) skips its events."""
        applied = skipped = 0
        now = self._clock()
        keys: dict[tuple[str, Scope | None], list[Network]] = {}
        for change in cmd.changes:  # a run of the stream is looked up in a few queries, as a bulk load is
            keys.setdefault((change.chain, change.scope), []).append(change.network)
        for (name, scope), networks in keys.items():
            self._look_up(batch, name, scope, networks)
        for change in cmd.changes:
            if self._shares(change.chain) and self._remote(batch, change, now):
                applied += 1
            else:
                skipped += 1
        batch.fleet.update(cursor=cmd.cursor, ordinal=str(cmd.ordinal))
        return FleetApplied(applied, skipped)

    def _remote(self, batch: _Batch, change: RemoteChange, now: float) -> bool:
        """One remote event against the batch; whether it changed a claim."""
        config = self._chains[change.chain]
        key: Key = (change.chain, change.network, change.scope)
        old = batch.get(key)
        owner = change.claim_owner
        new: Entry | None
        if change.op == "block":
            if change.expires_at is not None and change.expires_at <= now:
                return False  # expired on its way here
            claim = Claim(owner, change.created_at, change.expires_at, change.node)
            if old is None:
                new = Entry.of(change.chain, change.network, config.target, change.created_at, owner, [claim],
                               change.scope)
                result = "created"
            else:
                mine = old.claim(owner, change.node)
                others = [c for c in old.all_claims if (c.owner, c.node) != (owner, change.node)]
                new = Entry.of(old.chain, old.network, old.target, old.created_at, old.created_by, others + [claim],
                               old.scope)
                result = "claimed" if mine is None else "exists"
            timeout = "permanent" if change.expires_at is None else str(max(0, round(change.expires_at - now)))
        else:
            if old is None:
                return False
            every = change.owner == "*"
            kept = [] if every else [c for c in old.all_claims if (c.owner, c.node) != (owner, change.node)]
            if len(kept) == len(old.all_claims):
                return False
            new = None if not kept else Entry.of(old.chain, old.network, old.target, old.created_at,
                                                 old.created_by, kept, old.scope)
            result, timeout = "deleted" if new is None else "released", "-"
            if every:
                owner = "*"
        if new == old:
            return False
        batch.set(key, new)
        batch.audits.append((f"fleet:{change.node}", "redis", change.op, change.chain, change.network, owner,
                             timeout, result, change.scope))
        return True

    def _fleet_resync(self, batch: _Batch, cmd: FleetResync) -> FleetApplied:
        """Make the remote claims of the shared chains the snapshot's (with `keep`, add the snapshot's to them and
        announce every local claim again), and follow from the snapshot's id."""
        now = self._clock()
        wanted: dict[Key, dict[tuple[str, str], Claim]] = {}
        for change in cmd.claims:
            if not self._shares(change.chain) or (change.expires_at is not None and change.expires_at <= now):
                continue
            owner = change.claim_owner
            wanted.setdefault((change.chain, change.network, change.scope), {})[(owner, change.node)] = Claim(
                owner, change.created_at, change.expires_at, change.node)
        changed = 0
        for name in [n for n in self._chains if self._shares(n)]:
            for entry in self._view(batch, name):
                claims = wanted.pop(entry.key, {})
                if cmd.keep:
                    mine = {(c.owner, c.node): c for c in entry.all_claims}
                    for claim in entry.all_claims:
                        if not claim.node and claim.owner != ADOPTED:
                            self._announce(batch, "block", entry.key, claim.owner, claim)
                    merged = list({**mine, **claims}.values())
                else:
                    merged = [c for c in entry.all_claims if not c.node] + list(claims.values())
                new = None if not merged else Entry.of(entry.chain, entry.network, entry.target, entry.created_at,
                                                       entry.created_by, merged, entry.scope)
                if new != entry:
                    batch.set(entry.key, new)
                    changed += 1
        for (chain, network, scope), claims in wanted.items():
            first = min(claims.values(), key=lambda c: c.created_at)
            batch.set((chain, network, scope), Entry.of(chain, network, self._chains[chain].target, first.created_at,
                                                        first.owner, list(claims.values()), scope))
            changed += 1
        batch.fleet.update(cursor=cmd.cursor, ordinal=str(cmd.ordinal), last_resync=repr(now))
        logger.info("fleet: resynced from the snapshot (%d claims of other hosts): %d blocks changed%s",
                    len(cmd.claims), changed, ", and this host's claims announced again" if cmd.keep else "")
        return FleetApplied(changed, len(cmd.claims))

    def _expire(self, batch: _Batch, key: Key) -> None:
        """Drop the claims that are due; the entry goes with its last one."""
        old = batch.get(key)
        if old is None:
            return
        now = self._clock()
        kept = [c for c in old.all_claims if c.expires_at is None or c.expires_at > now]
        gone = [c for c in old.all_claims if c not in kept]
        if not gone:
            return
        if kept:
            batch.set(key, Entry.of(old.chain, old.network, old.target, old.created_at, old.created_by, kept,
                                    old.scope))
        else:
            batch.set(key, None)
            batch.expired.add(key)
        for i, claim in enumerate(gone, 1):
            batch.audits.append(("-", "-", "expire", old.chain, old.network, claim.owner, "-",
                                 "deleted" if not kept and i == len(gone) else "released", old.scope))

    def _view(self, batch: _Batch, chain: str) -> Iterator[Entry]:
        """The entries of `chain` as the batch sees them, in no set order: the batch's own first, then the store's,
        read as they are used (a resync walks every shared entry: no list of a million of them)."""
        touched = {k: e for k, e in batch.after.items() if k[0] == chain}
        yield from (e for e in touched.values() if e is not None)
        for entry in self._store.entries(chain):
            if entry.key not in touched:
                yield entry

    def _list(self, batch: _Batch, chain: str) -> list[Entry]:
        view: dict[Key, Entry | None] = {e.key: e for e in self._store.entries(chain)}
        view.update((k, e) for k, e in batch.after.items() if k[0] == chain)
        return sorted((e for e in view.values() if e is not None), key=_listing_order)

    def _refused(self, items: list[_Item], answers: list[_Answer], changes: int, exc: Exception) -> None:
        """The store or the kernel refused the batch, and nothing changed. Called in the except clause."""
        if isinstance(exc, CapacityExceeded) and len(answers) > 1:
            # Group commit must not fail a request that fits because another one in its batch
            # does not: with the last free places of a set, try each request on its own.
            logger.warning("a batch of %d changes does not fit (%s); trying its requests one by one", changes, exc)
            for item in items:
                self._process([item])
            return
        failure: FirewallUnavailable
        if isinstance(exc, CapacityExceeded):  # an operating condition, not a bug: no traceback
            logger.error("a batch of %d changes does not fit: %s; nothing was changed", changes, exc)
            failure = FirewallFull("a set is full (maxelem); nothing was changed")
        else:
            logger.exception("applying a batch of %d changes failed; nothing was changed", changes)
            failure = FirewallUnavailable("the firewall refused the change")
        # If undoing left the kernel and the store apart, the next reconcile brings them together.
        self._resync = True
        for fut, _, _ in answers:
            fut.set_exception(failure)
        # The due expiries are still due in the store: they are tried again after RETRY_DELAY.
        self._retry_at = self._clock() + RETRY_DELAY

    def _reconfigure(self, cmd: Reconfigure) -> Exception | None:
        """Take the reload's chains and kernel_check, and reconcile; what failed goes to the reload."""
        try:
            self._chains = {c.name: c for c in cmd.chains}
            self._kernel_check = cmd.kernel_check
            self._next_check = min(self._next_check, time.monotonic() + cmd.kernel_check)
            self._reconcile()
        except Exception as exc:
            logger.exception("reconcile after reload failed")
            return exc
        return None

    def _commit(self, changed: Mapping[Key, tuple[Entry | None, Entry | None]], batch: _Batch) -> None:
        """Store first (with the batch's outbox rows and cursor), then kernel; on a kernel failure put the store
        back as it was."""
        puts = [after for _, after in changed.values() if after is not None]
        removes = [before for before, after in changed.values() if after is None and before is not None]
        outbox_before = self._store.outbox_seq
        published = self.published
        if published > self._trimmed:  # the publisher's progress, kept so that a redis that lost it shows
            batch.fleet["published"] = str(published)
        # The atoms from the store as it is before the batch: read before it is written.
        atoms = atom_changes(self._entries, changed)
        ops = [op for chain, before, after in atoms
               for op in kernel_ops(before, after, self._backend.expires_in_kernel(chain))]
        # The puts whose claims rows must go: one claim, its creator's, has none (state.py, version 5).
        stale = {row_key(after) for before, after in changed.values()
                 if after is not None and not after.claims and before is not None and before.claims}
        # A batch that changes the kernel takes the seal out of the store in its own transaction, before the kernel
        # changes: a crash between the two must not find a seal of the kernel as it was (see _seal).
        refresh = [r for r in batch.refresh if self._backend.expires_in_kernel(r.chain)]
        changes_kernel = bool(ops or batch.fresh or refresh)
        unseal = self._sealed and changes_kernel
        self._safe_write(puts, removes, self._take_purges(), batch.outbox, batch.fleet,
                         published if published > self._trimmed else None, stale, batch.fresh, unseal, batch.refresh)
        self._trimmed = max(self._trimmed, published)
        if changes_kernel:
            self._sealed = False
            self._seal_due = True
        loaded: list[Fresh] = []
        try:
            for fresh in batch.fresh:  # each is atomic in its backend
                self._backend.load(fresh.chain, fresh.target, fresh.expires_at, fresh.scope, fresh.items,
                                   self._chains)
                loaded.append(fresh)
            for r in refresh:  # the kernel's timeouts; nothing to take back on a failure (see Backend.load)
                self._backend.load(r.chain, r.target, r.expires_at, r.scope, r.items, self._chains, replaces=True)
            if ops:
                self._backend.apply(ops, self._chains)
        except Exception:
            self._unload(loaded)
            try:
                self._store.restore([(k, before) for k, (before, _) in changed.items()], outbox_before,
                                    {k: self._fleet_state.get(k) for k in batch.fleet}, batch.fresh, batch.refresh)
            except Exception:
                # The store now says more than the kernel has; the next start re-adds it.
                logger.exception("could not restore the state store after a failed firewall change")
            raise
        self._entries.update(changed, atoms)
        for fresh in batch.fresh:  # every one a new block, its own kernel atom (no port lists: see _load)
            n = len(fresh.items)
            self._entries.entries[fresh.chain] = self._entries.entries.get(fresh.chain, 0) + n
            self._entries.atoms[fresh.chain] = self._entries.atoms.get(fresh.chain, 0) + n
        self._purge.extend(removes)
        self._fleet_state.update(batch.fleet)
        if batch.outbox:
            self.outbox_committed = self._store.outbox_seq
            self.on_outbox()

    def _unload(self, loaded: list[Fresh]) -> None:
        """Take a failed batch's loads back out of the kernel; what this leaves behind, the reconcile that follows
        every failed batch settles."""
        try:
            for fresh in loaded:
                self._backend.apply([Remove(fresh.chain, unpacked(packed, length), fresh.target, fresh.scope)
                                     for _, packed, length in fresh.items], self._chains)
        except Exception:
            logger.exception("could not take a failed batch's new blocks back out of the firewall")

    def _seal(self) -> None:
        """With the kernel as the store says, at a quiet moment after a change and at a stop: the backend's seal of
        it (nftables: a commit of its own, whose ruleset generation then tells that nobody committed since), kept
        in the store with the chains' config for the next start, which then need not read the kernel back (see
        _reconcile). Kernel first, then store: a crash between the two finds no seal. Every batch that changes the
        kernel after it takes the seal out of the store in its own transaction, before its kernel change (_commit),
        so that a crash at any moment finds either no seal, or one of exactly what the kernel holds. Never when the
        worker knows the kernel to differ (a failed batch, or blocks found gone, wait for a reconcile)."""
        self._seal_due = False
        if self._resync or self._purge:
            return
        try:
            token = self._backend.seal()
            if token is not None:
                self._store.set_seal(f"{self._chains_fingerprint()} {token}")
                self._sealed = True
        except Exception as exc:
            if not self._seal_failed:
                logger.exception("could not seal the kernel's state for the next start; it reads the kernel back")
            else:
                logger.debug("could not seal the kernel's state: %s", exc)
            self._seal_failed = True

    def _chains_fingerprint(self) -> str:
        text = repr(sorted((c.name, c.backend, c.target, c.hooks, c.maxelem, c.priority, c.match, c.interface)
                           for c in self._chains.values()))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _unsealed(self, seal: str | None) -> bool:
        """True when `seal` (the last clean stop's) says the kernel holds what the store held then: the same chains,
        and the backend finds its kernel unchanged since. Asked before prepare(), whose changes are this run's."""
        if seal is None:
            return False
        fingerprint, _, token = seal.partition(" ")
        try:
            return fingerprint == self._chains_fingerprint() and self._backend.sealed(token)
        except Exception:
            logger.exception("could not check the kernel's seal; reading the kernel back")
            return False

    def _sealed_view(self, names: list[str]) -> Iterator[tuple[Key, str]]:
        """What the kernel holds, as a sealed kernel is known to: the atoms of every row of the store, the blocks that
        expired while the daemon was down (tombstones now) included, as at the seal. A (chain, network, protocol)
        with port lists is one atom, the union of all their ports."""
        store = self._store
        marks = ",".join("?" * len(names))
        for chain, net, proto, target in _rows(store, (
                f"SELECT chain, network, proto, target FROM blocks WHERE chain IN ({marks}) AND ports = ''"), names):
            yield (chain, parse_stored(net), stored_scope(proto, "") if proto else None), target
        grouped: Iterator[tuple[Any, ...]] = _rows(store, (
            f"SELECT chain, network, proto, ports, target FROM blocks WHERE chain IN ({marks}) AND ports <> '' "
            "ORDER BY chain, network, proto"), names)
        for (chain, net, proto), group in itertools.groupby(grouped, key=lambda r: r[:3]):
            rows = list(group)
            scopes = [stored_scope(proto, r[3]) for r in rows]
            yield (chain, parse_stored(net), Scope.of(proto, union(s for s in scopes if s is not None))), rows[0][4]

    def _reconcile(self, seal: str | None = None) -> None:
        """Make the kernel match the store: re-add missing, drop expired, finish removals, adopt strays.

        With a seal from the last clean stop that the backend still finds good (nftables: nobody committed since), the
        kernel is known to hold what the store held then, and it is not read back: a million elements of a set take
        the kernel time that grows with the square of their number to list (bench/README.md). The same comparison
        then runs against the store's view of it (_sealed_view).

        Rules of our shape found in a managed chain but not in the store are adopted
        as permanent blocks by `adopted`; they are never flushed.

        A chain that left the config (retired) is unhooked; its entries stay in the store, listed again and put back
        when it returns, and expire on time meanwhile, but the kernel is neither read nor changed for it: after a
        restart nothing says which backend it had. Its tombstones wait for its return.

        Nothing is held per entry: the store and a temporary table of what the kernel holds are compared by SQLite,
        and the ops go to the kernel in chunks of RECONCILE_CHUNK.
        """
        self.metrics.reconciles.inc()
        store = self._store
        if self._sealed:  # a reconcile while running changes the kernel: the seal goes first (see _seal)
            store.take_seal()
            self._sealed = False
        self._seal_due = True
        configured = self._chains
        sealed = self._unsealed(seal)
        self._backend.prepare(configured.values(), sorted(store.chain_names() - set(configured)))
        now = self._clock()
        expired = self._expire_stored(now)
        retargeted = 0
        for chain in configured.values():
            if self._backend.shares_target(chain.name):
                # The chain's one match rule decides for every entry: say so in the store and the API.
                retargeted += store.retarget(chain.name, chain.target)
        names = sorted(configured)
        store.execute("DROP TABLE IF EXISTS temp.kernel")
        store.execute("CREATE TEMP TABLE kernel (chain TEXT NOT NULL, network TEXT NOT NULL, proto TEXT NOT NULL, "
                      "ports TEXT NOT NULL, target TEXT NOT NULL)")
        restored = adopted = 0
        try:
            if sealed and not store.has_tombstones(names):
                # The kernel holds what the store held at the seal, and no block has gone since: nothing to do.
                same = True
            else:
                read = self._sealed_view(names) if sealed else self._backend.read(names)
                pairs = read.items() if isinstance(read, Mapping) else read
                kernel = _Digest()
                # Appended in one transaction, then indexed in one sort: inserting a million in the kernel's (hash)
                # order into a keyed table, a transaction each, took most of a restart's reconcile.
                store.execute("BEGIN")
                try:
                    store.executemany("INSERT INTO temp.kernel VALUES (?, ?, ?, ?, ?)",
                                      kernel.through((chain, net_text(network), *scope_columns(scope), target)
                                                     for (chain, network, scope), target in pairs))
                    store.execute("COMMIT")
                except BaseException:
                    store.execute("ROLLBACK")
                    raise
                del read, pairs
                # The usual restart finds the kernel holding exactly the live blocks' atoms: told by a digest of
                # each side, without the index and the joins of _settle (most of a restart's reconcile of a million).
                same = not sealed and kernel.value() == _Digest().of(self._live_atoms(names))
            if not same:
                restored, adopted = self._settle(names, configured, now)
            # Tombstones go only once the kernel no longer has their rules.
            removals = store.purge_tombstones(names)
        finally:
            store.execute("DROP TABLE IF EXISTS temp.kernel")
        if adopted:
            logger.warning("adopted %d rules found in managed chains but not in the state store", adopted)
        if retargeted:
            logger.info("%d blocks took their chain's new target", retargeted)
        self._entries = _Index(store, store.counts())
        logger.info("reconciled %d blocks: %d re-added, %d expired, %d adopted, %d removals finished%s",
                    len(self._entries), restored, expired, adopted, removals,
                    "; the kernel as sealed before, not read back" if sealed else
                    "; the kernel held exactly the store's blocks" if same else "")

    def _settle(self, names: list[str], configured: Mapping[str, Chain], now: float) -> tuple[int, int]:
        """Give the kernel (temp.kernel, what it holds) the store's atoms, and adopt what no block accounts for:
        (how many re-added, how many adopted)."""
        self._store.execute("CREATE INDEX temp.kernel_key ON kernel (chain, network, proto, ports)")
        restored = taken = 0
        chunk: list[Op] = []
        missing: dict[tuple[str, str, float | None], list[tuple[str, bytes, int]]] = {}
        for op in self._kernel_diff(names):
            if isinstance(op, _Missing):
                missing.setdefault(op[:3], []).append(op.item)
            else:
                chunk.append(op)
            taken += 1
            if taken >= RECONCILE_CHUNK:
                restored += self._restore_atoms(chunk, missing, configured)
                chunk, missing, taken = [], {}, 0
        if taken:
            restored += self._restore_atoms(chunk, missing, configured)
        return restored, self._adopt(now)

    def _restore_atoms(self, ops: list[Op], missing: Mapping[tuple[str, str, float | None], Items],
                       configured: Mapping[str, Chain]) -> int:
        """A reconcile's part: the whole networks the kernel lacks, many of one target and expiry (a boot's million
        restored: a load's, as a rule) as a load each, without a Network, Op or Element an atom (Backend.load); the
        rest as ops. How many atoms it added."""
        ops = list(ops)
        restored = 0
        for (chain, target, expires_at), items in missing.items():
            if len(items) >= LOAD_GROUP:
                self._backend.load(chain, target, expires_at, None, items, configured)
                restored += len(items)
            else:
                ops += adds(chain, target, expires_at, None, items)
        if ops:
            self._backend.apply(ops, configured)
        return restored + sum(isinstance(op, Add) for op in ops)

    def _live_atoms(self, names: list[str]) -> Iterator[tuple[Any, ...]]:
        """The kernel atoms of the live blocks of `names`, as rows of temp.kernel: what the kernel should hold."""
        store = self._store
        marks = ",".join("?" * len(names))
        yield from _rows(store, f"SELECT chain, network, proto, ports, target FROM blocks WHERE chain IN ({marks}) "
                                "AND removing=0 AND ports=''", names)
        for chain, net, proto in store.execute(f"SELECT DISTINCT chain, network, proto FROM blocks WHERE chain IN "
                                               f"({marks}) AND removing=0 AND ports<>''", names).fetchall():
            atom = group_atom(store.group(chain, parse_stored(net), proto))
            assert atom is not None
            yield (chain, net, *scope_columns(atom.scope), atom.target)

    def _expire_stored(self, now: float) -> int:
        """Drop the claims that ran out while the daemon was down (or since the last reconcile), from the store, in
        chunks; an entry whose last claim went becomes a tombstone (the kernel diff removes it). How many went."""
        store = self._store
        gone = 0
        while keys := store.due(now, RECONCILE_CHUNK):
            puts: list[Entry] = []
            removes: list[Entry] = []
            for key in keys:
                e = store.get(*key)
                if e is None:
                    continue
                kept = [c for c in e.all_claims if c.expires_at is None or c.expires_at > now]
                dropped = [c for c in e.all_claims if c not in kept]
                for i, c in enumerate(dropped, 1):
                    _audit("-", "-", "expire", e.chain, e.network, c.owner, "-",
                           "deleted" if not kept and i == len(dropped) else "released", e.scope)
                if kept:
                    puts.append(Entry.of(e.chain, e.network, e.target, e.created_at, e.created_by, kept, e.scope))
                else:
                    removes.append(e)
            store.write(puts, removes, [])
            gone += len(removes)
        return gone

    def _kernel_diff(self, names: list[str]) -> Iterator[Op | _Missing]:
        """The ops that give the kernel (temp.kernel, what it holds) the atoms of the live entries of the chains
        `names` and none of their tombstones'; a whole network the kernel lacks as a _Missing (no Network made).
        Read from the store as the ops are taken; temp.kernel is only read (what no block accounts for is adopted
        after, by _adopt)."""
        store = self._store
        if not names:
            return
        marks = ",".join("?" * len(names))
        # Blocks without port lists: an atom each, missing or with another target.
        for chain, net, proto, target, expires_at, present in _rows(store, (
                "SELECT b.chain, b.network, b.proto, b.target, b.expires_at, k.target FROM blocks b LEFT JOIN "
                "temp.kernel k ON k.chain = b.chain AND k.network = b.network AND k.proto = b.proto AND "
                f"k.ports = b.ports WHERE b.chain IN ({marks}) AND b.removing=0 AND b.ports='' AND "
                "(k.target IS NULL OR k.target <> b.target)"), names):
            if present is None and not proto:
                item = packed_item(net)
                if item is not None:
                    yield _Missing(chain, target, expires_at, item)
                    continue
            network = parse_stored(net)
            scope = stored_scope(proto, "") if proto else None
            if present is not None:
                yield Remove(chain, network, present, scope)
            yield Add(chain, network, target, expires_at, scope)
        # Blocks with port lists: one atom per (chain, network, proto), the union of their ports.
        groups = store.execute(f"SELECT DISTINCT chain, network, proto FROM blocks WHERE chain IN ({marks}) AND "
                               "removing=0 AND ports<>''", names).fetchall()
        for chain, net, proto in groups:
            network = parse_stored(net)
            atom = group_atom(store.group(chain, network, proto))
            assert atom is not None
            present = store.execute("SELECT ports, target FROM temp.kernel WHERE chain=? AND network=? AND proto=? "
                                    "AND ports<>''", (chain, net, proto)).fetchone()
            if present is not None:
                scope = stored_scope(proto, present[0])
                if present[1] == atom.target and scope == atom.scope:
                    continue
                yield Remove(chain, network, present[1], scope)
            yield Add(chain, network, atom.target, atom.expires_at, atom.scope)
        # Tombstones (and what expired): their atoms leave the kernel. A kernel atom with port lists goes when its
        # (network, proto) has no live block left, whatever its ports. Read from the (few) tombstones.
        for chain, net, proto, ports, target in _rows(store, (
                "SELECT DISTINCT k.chain, k.network, k.proto, k.ports, k.target FROM blocks b JOIN temp.kernel k ON "
                "k.chain = b.chain AND k.network = b.network AND k.proto = b.proto AND " + _SAME_ATOM.format("b")
                + f" WHERE b.removing = 1 AND b.chain IN ({marks}) AND NOT EXISTS (SELECT 1 FROM blocks l WHERE "
                "l.chain = k.chain AND l.network = k.network AND l.proto = k.proto AND l.removing = 0 AND "
                + _SAME_ATOM.format("l") + ")"), names):
            yield Remove(chain, parse_stored(net), target, stored_scope(proto, ports) if proto else None)

    def _adopt(self, now: float) -> int:
        """Make what no block (live or tombstone) accounts for in temp.kernel permanent blocks of nobody's
        (ADOPTED), in chunks; how many."""
        store = self._store
        adopted = 0
        last = 0
        while part := store.execute(
                "SELECT k.rowid, k.chain, k.network, k.proto, k.ports, k.target FROM temp.kernel k WHERE k.rowid > ? "
                "AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.chain = k.chain AND b.network = k.network AND "
                "b.proto = k.proto AND " + _SAME_ATOM.format("b") + ") ORDER BY k.rowid LIMIT ?",
                (last, RECONCILE_CHUNK)).fetchall():
            entries = [Entry(chain, parse_stored(net), target, now, None, ADOPTED, (),
                             stored_scope(proto, ports) if proto else None)
                       for _, chain, net, proto, ports, target in part]
            store.write(entries, [])
            last = part[-1][0]
            adopted += len(entries)
        return adopted


class _Missing(NamedTuple):
    """A whole network the kernel lacks (no protocol or ports): its block's chain, target and expiry, and the network
    as a load's item (net_text, packed address, prefix length)."""

    chain: str
    target: str
    expires_at: float | None
    item: tuple[str, bytes, int]


class _Digest:
    """An order-free digest of rows: their count and the sum of their hashes (Python's, random each process, so not
    to be foreseen from outside it). Two different sets of rows share one by chance about once in 2**64."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0

    def through(self, rows: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for row in rows:
            self.count += 1
            self.total += hash(row)
            yield row

    def of(self, rows: Iterable[tuple[Any, ...]]) -> tuple[int, int]:
        for _ in self.through(rows):
            pass
        return self.value()

    def value(self) -> tuple[int, int]:
        return self.count, self.total & 0xFFFF_FFFF_FFFF_FFFF


# Text that JSON takes between quotes as it is: printable ASCII but the quote and the backslash.
_JSON_PLAIN = re.compile(r'[ !#-\[\]-~]*\Z')


# A block `{0}` and a kernel atom k of one (chain, network, proto) that are the same atom: the same ports, or both
# with port lists (the kernel holds their union).
_SAME_ATOM = "({0}.ports = k.ports OR ({0}.ports <> '' AND k.ports <> ''))"


def _rows(store: Store, sql: str, args: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """The rows of a query in parts, so that the ops made of them can go to the kernel before the next part."""
    cursor = store.execute(sql, args)
    while part := cursor.fetchmany(1000):
        yield from part
