"""The durable record of every block: SQLite in WAL mode at `state_dir/state.db`, written before the kernel
is changed, and used by the firewall worker thread only. The file carries its schema version; an older one is upgraded
at open, and a newer one is refused."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence

from webiptd.commands import Claim, Entry
from webiptd.net import Network, parse_stored, net_text
from webiptd.scope import Scope, stored_scope

logger = logging.getLogger(__name__)

# The table of every release before store versions existed (version 0), to the byte: SQLite keeps the text up to the
# `;` in sqlite_master. Later versions change it only by migration.
BLOCKS_V0 = """
CREATE TABLE IF NOT EXISTS blocks (
    chain      TEXT NOT NULL,
    network    TEXT NOT NULL,
    target     TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    created_by TEXT NOT NULL,
    removing   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chain, network)
) WITHOUT ROWID;
"""


def _to_v1(db: sqlite3.Connection) -> None:
    """Version 1 is version 0 with a version: a store from before versions has the table already, a new one gets it."""
    db.execute(BLOCKS_V0)


CLAIMS_V2 = """
CREATE TABLE claims (
    chain      TEXT NOT NULL,
    network    TEXT NOT NULL,
    owner      TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    PRIMARY KEY (chain, network, owner)
) WITHOUT ROWID;
"""


def _to_v2(db: sqlite3.Connection) -> None:
    """Version 2 adds the claims: each block of version 1 (a tombstone too) becomes one claim owned by its
    created_by, with its times. blocks.expires_at stays, as the effective expiry of the block's claims."""
    db.execute(CLAIMS_V2)
    db.execute("INSERT INTO claims (chain, network, owner, created_at, expires_at) "
               "SELECT chain, network, created_by, created_at, expires_at FROM blocks")


BLOCKS_V3 = """
CREATE TABLE blocks_v3 (
    chain      TEXT NOT NULL,
    network    TEXT NOT NULL,
    proto      TEXT NOT NULL DEFAULT '',
    ports      TEXT NOT NULL DEFAULT '',
    target     TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    created_by TEXT NOT NULL,
    removing   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chain, network, proto, ports)
) WITHOUT ROWID;
"""

CLAIMS_V3 = """
CREATE TABLE claims_v3 (
    chain      TEXT NOT NULL,
    network    TEXT NOT NULL,
    proto      TEXT NOT NULL DEFAULT '',
    ports      TEXT NOT NULL DEFAULT '',
    owner      TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    PRIMARY KEY (chain, network, proto, ports, owner)
) WITHOUT ROWID;
"""


def _to_v3(db: sqlite3.Connection) -> None:
    """Version 3 scopes a block to a protocol and ports: (chain, network, proto, ports) is its key, '' and '' for
    all traffic, which every block of version 2 is. SQLite cannot change a primary key, so both tables are made
    anew and filled (sqlite.org/lang_altertable.html, "other kinds of table schema changes")."""
    db.execute(BLOCKS_V3)
    db.execute("INSERT INTO blocks_v3 (chain, network, target, created_at, expires_at, created_by, removing) "
               "SELECT chain, network, target, created_at, expires_at, created_by, removing FROM blocks")
    db.execute("DROP TABLE blocks")
    db.execute("ALTER TABLE blocks_v3 RENAME TO blocks")
    db.execute(CLAIMS_V3)
    db.execute("INSERT INTO claims_v3 (chain, network, owner, created_at, expires_at) "
               "SELECT chain, network, owner, created_at, expires_at FROM claims")
    db.execute("DROP TABLE claims")
    db.execute("ALTER TABLE claims_v3 RENAME TO claims")


CLAIMS_V4 = """
CREATE TABLE claims_v4 (
    chain      TEXT NOT NULL,
    network    TEXT NOT NULL,
    proto      TEXT NOT NULL DEFAULT '',
    ports      TEXT NOT NULL DEFAULT '',
    node       TEXT NOT NULL DEFAULT '',
    owner      TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    PRIMARY KEY (chain, network, proto, ports, node, owner)
) WITHOUT ROWID;
"""

# What a host of the fleet has to publish: each row one event, as JSON, written in the transaction of the change it
# reports. AUTOINCREMENT: a seq is never used twice, also after the table was empty, because the fleet remembers
# the last seq each host published. Version 6 numbers the rows itself (_to_v6).
OUTBOX_V4 = """
CREATE TABLE outbox (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL
);
"""

# The follower's place in the stream (cursor, ordinal) and when it last resynced; written with what it applied.
FLEET_V4 = """
CREATE TABLE fleet (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


def _to_v4(db: sqlite3.Connection) -> None:
    """Version 4 is the fleet's: a claim has the node it came from ('' for this host's own, which every claim of
    version 3 is), part of its key; and the outbox and the follower's cursor."""
    db.execute(CLAIMS_V4)
    db.execute("INSERT INTO claims_v4 (chain, network, proto, ports, owner, created_at, expires_at) "
               "SELECT chain, network, proto, ports, owner, created_at, expires_at FROM claims")
    db.execute("DROP TABLE claims")
    db.execute("ALTER TABLE claims_v4 RENAME TO claims")
    db.execute(OUTBOX_V4)
    db.execute(FLEET_V4)


def _to_v5(db: sqlite3.Connection) -> None:
    """Version 5 makes the store the worker's index, so that no Python object per entry is kept: `due` is when a
    live block's first claim expires (NULL when none does, and for a tombstone), indexed, so the next expiry is a
    lookup. A block with one claim, its creator's, may have no claims row: the block's columns are that claim
    (blocks of version 1 had none either, and every reader takes that form). A tombstone has no claims."""
    db.execute("ALTER TABLE blocks ADD COLUMN due REAL")
    db.execute(
        "UPDATE blocks SET due = CASE WHEN EXISTS (SELECT 1 FROM claims c WHERE c.chain = blocks.chain AND "
        "c.network = blocks.network AND c.proto = blocks.proto AND c.ports = blocks.ports) THEN (SELECT "
        "min(c.expires_at) FROM claims c WHERE c.chain = blocks.chain AND c.network = blocks.network AND "
        "c.proto = blocks.proto AND c.ports = blocks.ports) ELSE expires_at END WHERE removing = 0")
    db.execute(BLOCKS_DUE_V5)
    db.execute("DELETE FROM claims WHERE (chain, network, proto, ports) IN "
               "(SELECT chain, network, proto, ports FROM blocks WHERE removing = 1)")


BLOCKS_DUE_V5 = "CREATE INDEX blocks_due ON blocks (due) WHERE due IS NOT NULL"


def _to_v6(db: sqlite3.Connection) -> None:
    """Version 6 numbers the outbox rows itself (Store.write) instead of by AUTOINCREMENT, whose sqlite_sequence row
    was one more page in every transaction with an event (bench/README.md, fleet). A seq is still never used twice
    for an event that reached Redis: the rows up to the publisher's marker are deleted in the transaction that
    stores it (the fleet key `published`), so the last seq is that or the last row's (Store.__init__); a seq after
    both was only ever given to a change that was taken back, never published."""
    db.execute("CREATE TABLE outbox_v6 (seq INTEGER PRIMARY KEY, event TEXT NOT NULL)")
    db.execute("INSERT INTO outbox_v6 (seq, event) SELECT seq, event FROM outbox")
    db.execute("DROP TABLE outbox")
    db.execute("ALTER TABLE outbox_v6 RENAME TO outbox")
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'outbox'")



_ROWS = 500  # rows of blocks one INSERT writes: 4,500 of SQLite's 32,766 variables


@functools.lru_cache(maxsize=16)
def _rows_statement(rows: int, upsert: bool) -> str:
    """An INSERT of `rows` blocks (each: chain, network, proto, ports, target, created_at, expires_at, created_by,
    due): a row already there (a tombstone too) takes the new values (`upsert`), or is left as it is."""
    return ("INSERT INTO blocks (chain, network, proto, ports, target, created_at, expires_at, created_by, removing, "
            "due) VALUES " + ",".join(["(?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"] * rows) +
            (" ON CONFLICT (chain, network, proto, ports) DO UPDATE SET target=excluded.target, "
             "created_at=excluded.created_at, expires_at=excluded.expires_at, created_by=excluded.created_by, "
             "removing=0, due=excluded.due" if upsert else " ON CONFLICT (chain, network, proto, ports) DO NOTHING"))


def _fresh_statement(upsert: bool) -> str:
    """An INSERT of a load's new blocks in one chain and scope: the columns but the network are the same in every
    row, and the networks are one JSON array of texts (json_each: SQLite's JSON functions, built in since 3.38;
    Debian 12 has 3.40). One statement, so one step: SQLite's B-tree work for a whole batch runs with the GIL let
    go once, not once a few hundred rows. Under a load, the thread parsing the next batch holds the GIL, and every
    hand-back costs the worker up to the switch interval (5 ms): 200 statements of 500 rows took a batch of
    100,000 2.1 s against 0.6 s alone (bench/README.md). `WHERE true` tells SQLite's parser the ON CONFLICT is
    the upsert's (sqlite.org/lang_upsert.html, "parsing ambiguity")."""
    return ("INSERT INTO blocks (chain, network, proto, ports, target, created_at, expires_at, created_by, removing, "
            "due) SELECT ?, value, ?, ?, ?, ?, ?, ?, 0, ? FROM json_each(?) WHERE true " +
            ("ON CONFLICT (chain, network, proto, ports) DO UPDATE SET target=excluded.target, "
             "created_at=excluded.created_at, expires_at=excluded.expires_at, created_by=excluded.created_by, "
             "removing=0, due=excluded.due" if upsert else "ON CONFLICT (chain, network, proto, ports) DO NOTHING"))


_FRESH = {upsert: _fresh_statement(upsert) for upsert in (False, True)}


def scope_columns(scope: Scope | None) -> tuple[str, str]:
    return ("", "") if scope is None else (scope.proto, scope.port_text)


def row_key(e: Entry) -> tuple[str, str, str, str]:
    return (e.chain, net_text(e.network), *scope_columns(e.scope))


# MIGRATIONS[n] takes a store from version n to n + 1, inside the one transaction of the upgrade; it runs statements
# one by one (executescript would commit half-way). A new, empty store is version 0 and takes every step too, so every
# migration runs on each first start, and a new store and an upgraded one cannot differ.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_to_v1, _to_v2, _to_v3, _to_v4, _to_v5, _to_v6)
SEAL_KEY = "kernel_seal"
# The version this code reads and writes, in the file's header (PRAGMA user_version).
VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used: newer than this code, not a database, or its upgrade failed. Names the file."""


def stored_version(path: Path) -> int | None:
    """The schema version of the store at `path`, None when there is no file; read without writing anything.

    Even opened read-only, SQLite makes the -wal and -shm files of a store in WAL mode; `immutable` reads the main
    file alone, which holds everything when there is no WAL to replay. A WAL with frames in it (after a crash) is
    read read-only instead: that leaves the file and the WAL as they are, and at most rebuilds the -shm index.
    """
    if not path.exists():
        return None
    try:
        replay = os.stat(f"{path}-wal").st_size > 0
    except FileNotFoundError:
        replay = False
    uri = path.absolute().as_uri() + ("?mode=ro" if replay else "?immutable=1")
    db = sqlite3.connect(uri, uri=True)
    try:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    return version


def _unknown_version(path: Path, version: int) -> StoreError:
    if version > VERSION:
        return StoreError(f"{path}: the state store is version {version}, newer than this web-ipt-d, which knows up "
                          f"to version {VERSION}; it is left unchanged: run the release that wrote it, or a newer one")
    return StoreError(f"{path}: the state store has version {version}, which no web-ipt-d writes; "
                      "it is left unchanged")


_ENTRY_COLUMNS = ("b.target, b.created_at, b.expires_at, b.created_by, c.owner, c.created_at, c.expires_at, c.node "
                  "FROM blocks b LEFT JOIN claims c ON c.chain = b.chain AND c.network = b.network AND "
                  "c.proto = b.proto AND c.ports = b.ports ")
_ENTRY = "SELECT " + _ENTRY_COLUMNS
_ENTRY_NET = "SELECT b.network, " + _ENTRY_COLUMNS
_ENTRY_SCOPE = "SELECT b.ports, " + _ENTRY_COLUMNS
_IN_CHUNK = 500  # networks in one IN (...)


@functools.lru_cache(maxsize=4096)
def _scope(proto: str, ports: str) -> Scope | None:
    return stored_scope(proto, ports)


def _entry(chain: str, network: Network, scope: Scope | None, rows: list[Any]) -> Entry:
    """An entry from its rows of _ENTRY's columns: one per claim, or one with NULL claim columns (no claims row:
    its creator's claim is the block's columns)."""
    target, created_at, expires_at, created_by = rows[0][:4]
    if rows[0][4] is None:
        return Entry(chain, network, target, created_at, expires_at, created_by, (), scope)
    return Entry.of(chain, network, target, created_at, created_by, [Claim(*r[4:8]) for r in rows], scope)


class Fresh(NamedTuple):
    """New blocks of one load in one chain and scope, all with the same times and claimant: `items` are
    (net_text, packed address, prefix length), none of them held (live) in the store. Written as rows without
    claims rows (one claim, its creator's: see _to_v5); a tombstone on the same key is replaced."""

    chain: str
    scope: Scope | None
    target: str
    created_at: float
    expires_at: float | None
    owner: str
    items: list[tuple[str, bytes, int]]
    # Not looked up: the store was not asked whether it holds any of them (Worker._load's guess). Then they are
    # written only if it holds none, not even a tombstone; else write() raises Held and writes nothing.
    unseen: bool = False


class Refresh(NamedTuple):
    """Blocks of one load in one chain and scope held as rows without claims rows by the loader alone (its one
    claim), loaded again with another expiry (a timed feed refreshed): `items` (as Fresh's) take `expires_at`, and
    the due with it; `old` is each one's expiry before, for restore()."""

    chain: str
    scope: Scope | None
    target: str
    expires_at: float | None
    items: list[tuple[str, bytes, int]]
    old: list[float | None]


class Held(Exception):
    """A load's rows written without a lookup (Fresh.unseen) met a row of the store: nothing was written."""


class Counts(NamedTuple):
    entries: dict[str, int]
    atoms: dict[str, int]
    remote: int


class Loaded(NamedTuple):
    entries: list[Entry]
    tombstones: list[Entry]


class Store:
    """The desired state. An unblock first leaves a tombstone, so a crash between the store and the kernel
    never brings a removed block back, nor loses an acknowledged one."""

    def __init__(self, state_dir: Path):
        """Open the store, made if missing, upgraded to VERSION if older; StoreError if it cannot be used."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / "state.db"
        try:
            # Before any connection that may write: a newer store is refused untouched.
            found = stored_version(self.path)
            if found is not None and not 0 <= found <= VERSION:
                raise _unknown_version(self.path, found)
            # The worker thread owns this connection; it is created on the main thread only to fail early.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the state store: {exc}") from exc
        try:
            os.chmod(self.path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL fsyncs the WAL on every commit: an acknowledged block survives power loss, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            # The store is the worker's index: every request looks its key up. 8 MiB hold the inner pages of the
            # B-trees at a million rows (about 1 % of the file) and the hot leaves; the rest comes from the OS's
            # page cache. The temporary table of a reconcile has its own cache of the same size, freed after.
            self._db.execute("PRAGMA cache_size=-8192")
            self._upgrade(new=found is None)
            # The last outbox row's seq: the last row's, or the last one published and deleted (see _to_v6).
            self.outbox_seq: int = self._db.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM outbox), 0), "
                "coalesce((SELECT CAST(value AS INTEGER) FROM fleet WHERE key = 'published'), 0))").fetchone()[0]
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: cannot open the state store: {exc}") from exc
            raise

    def _upgrade(self, new: bool) -> None:
        """Take the store to VERSION in one transaction: every step or none, and every row kept."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            found: int = db.execute("PRAGMA user_version").fetchone()[0]
            if not 0 <= found <= VERSION:  # written since stored_version() looked, by another process
                raise _unknown_version(self.path, found)
            for version in range(found, VERSION):
                try:
                    MIGRATIONS[version](db)
                except Exception as exc:
                    raise StoreError(f"{self.path}: upgrading the state store from version {found} to {VERSION} "
                                     f"failed in the step from {version} to {version + 1}, and it is left as it "
                                     f"was: {exc.__class__.__name__}: {exc}") from exc
            if found < VERSION:  # only then: setting it is a write, even to the same number
                db.execute(f"PRAGMA user_version={VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it by itself after some errors (SQLITE_FULL, SQLITE_IOERR)
                db.execute("ROLLBACK")
            raise
        if new:
            logger.info("made the state store %s, version %d", self.path, VERSION)
        elif found < VERSION:
            (rows,), = db.execute("SELECT count(*) FROM blocks")
            logger.info("upgraded the state store %s from version %d to %d, keeping its %d blocks", self.path,
                        found, VERSION, rows)

    def load(self) -> Loaded:
        """Every block with its claims. Both tables are in key order, so one join with a LEFT JOIN
        walks them side by side; a block without claims (not written by this code) is its created_by's."""
        entries: list[Entry] = []
        tombstones: list[Entry] = []
        # Each row's strings are new objects; 100k copies of the same chain, target and user cost ~15 MB.
        same: dict[str, str] = {}
        scopes: dict[tuple[str, str], Scope | None] = {}
        rows = self._db.execute(
            "SELECT b.chain, b.network, b.proto, b.ports, b.removing, b.target, b.created_at, b.expires_at, "
            "b.created_by, c.owner, c.created_at, c.expires_at, c.node FROM blocks b LEFT JOIN claims c "
            "ON c.chain = b.chain AND c.network = b.network AND c.proto = b.proto AND c.ports = b.ports "
            "ORDER BY b.chain, b.network, b.proto, b.ports")
        for (chain, net, proto, ports, removing), group in itertools.groupby(rows, key=lambda r: r[:5]):
            claims: list[Claim] = []
            for row in group:
                target, created_at, expires_at, created_by = row[5:9]
                if row[9] is not None:
                    claims.append(Claim(same.setdefault(row[9], row[9]), row[10], row[11],
                                        same.setdefault(row[12], row[12])))
            try:
                network = parse_stored(net)
                if (proto, ports) not in scopes:
                    scopes[(proto, ports)] = stored_scope(proto, ports)
            except ValueError:
                logger.error("ignoring unreadable row in %s: chain=%s network=%r proto=%r ports=%r", self.path,
                             chain, net, proto, ports)
                continue
            scope = scopes[(proto, ports)]
            chain, target, created_by = (same.setdefault(x, x) for x in (chain, target, created_by))
            if claims:
                entry = Entry.of(chain, network, target, created_at, created_by, claims, scope)
            else:
                entry = Entry(chain, network, target, created_at, expires_at, created_by, (), scope)
            (tombstones if removing else entries).append(entry)
        return Loaded(entries, tombstones)

    @staticmethod
    def _put_claims(db: sqlite3.Connection, entries: Iterable[Entry],
                    keys: list[tuple[str, str, str, str]] | None = None,
                    stale: Collection[tuple[str, str, str, str]] | None = None) -> None:
        """Make each entry's claims the stored ones; `keys`: their row_key()s, when the caller has them.

        An entry with only its creator's claim has no claims row (the block's columns say it all): for those, the
        rows are deleted only if their key is in `stale` (None: for each, when the caller cannot tell)."""
        entries = list(entries)
        keys = [row_key(e) for e in entries] if keys is None else keys
        db.executemany("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=?",
                       [key for key, e in zip(keys, entries) if e.claims or stale is None or key in stale])
        db.executemany("INSERT INTO claims (chain, network, proto, ports, owner, created_at, expires_at, node) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(*key, *c) for key, e in zip(keys, entries) if e.claims for c in e.claims])

    def write(self, puts: Iterable[Entry], removes: Iterable[Entry], purges: Iterable[Entry] = (),
              outbox: Iterable[str] = (), fleet: Mapping[str, str] | None = None,
              published: int | None = None, stale: Collection[tuple[str, str, str, str]] | None = None,
              fresh: Iterable[Fresh] = (), unseal: bool = False, refresh: Iterable[Refresh] = ()) -> None:
        """In one durable transaction: upsert `puts`, tombstone `removes`, delete `purges`' tombstones; add the
        `outbox` events (JSON), set the `fleet` keys, and drop the outbox rows up to `published`. `stale`: the row
        keys of `puts` that had claims rows before (None: any may have). `fresh`: a load's new blocks; `refresh`:
        its blocks of the loader's with a new expiry. `unseal`: delete the kernel's seal (set_seal)."""
        db = self._db
        outbox_seq = self.outbox_seq
        db.execute("BEGIN IMMEDIATE")
        try:
            outbox = list(outbox)
            for i in range(0, len(outbox), _ROWS):
                # Many rows a statement, as the blocks' below, each with its seq (the rowid).
                events = outbox[i:i + _ROWS]
                first = self.outbox_seq + 1
                db.execute("INSERT INTO outbox (seq, event) VALUES " + ",".join(["(?, ?)"] * len(events)),
                           [x for seq, event in enumerate(events, first) for x in (seq, event)])
                self.outbox_seq = first + len(events) - 1
            if fleet:
                db.executemany("INSERT OR REPLACE INTO fleet (key, value) VALUES (?, ?)", list(fleet.items()))
            if published is not None:
                db.execute("DELETE FROM outbox WHERE seq <= ?", (published,))
            if unseal:
                db.execute("DELETE FROM fleet WHERE key = ?", (SEAL_KEY,))
            puts = list(puts)
            keys = [row_key(e) for e in puts]  # str(network) costs: once an entry
            # Many rows a statement: executemany's every row is a step of its own, and each step lets go of the GIL
            # (a hand-off to another thread under load, bench/README.md).
            for i in range(0, len(puts), _ROWS):
                part = puts[i:i + _ROWS]
                db.execute(_rows_statement(len(part), upsert=True),
                           [x for key, e in zip(keys[i:i + _ROWS], part)
                            for x in (*key, e.target, e.created_at, e.expires_at, e.created_by, e.due)])
            self._put_claims(db, puts, keys, stale)
            for f in fresh:
                # In key order, each page of the table is read and changed once (a load's items come sorted).
                texts = sorted([item[0] for item in f.items])
                columns = (*scope_columns(f.scope), f.target, f.created_at, f.expires_at, f.owner, f.expires_at)
                before = db.total_changes
                db.execute(_FRESH[not f.unseen], (f.chain, *columns, json.dumps(texts)))
                if f.unseen and db.total_changes - before != len(f.items):
                    raise Held(f"a row of chain {f.chain} is in the store already")
            for r in refresh:  # one statement, as the fresh rows'
                db.execute("UPDATE blocks SET expires_at = ?, due = ? WHERE chain = ? AND proto = ? AND ports = ? AND "
                           "removing = 0 AND network IN (SELECT value FROM json_each(?))",
                           (r.expires_at, r.expires_at, r.chain, *scope_columns(r.scope),
                            json.dumps([item[0] for item in r.items])))
            # A tombstone needs no claims (it only has to leave the kernel), and a block made again on its key
            # must not find them.
            removed = [row_key(e) for e in removes]
            db.executemany("UPDATE blocks SET removing=1, due=NULL WHERE chain=? AND network=? AND proto=? AND "
                           "ports=?", removed)
            db.executemany("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=?", removed)
            db.executemany("DELETE FROM blocks WHERE chain=? AND network=? AND proto=? AND ports=? AND removing=1",
                           [row_key(e) for e in purges])
            db.executemany("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=? AND NOT EXISTS "
                           "(SELECT 1 FROM blocks b WHERE b.chain=? AND b.network=? AND b.proto=? AND b.ports=?)",
                           [row_key(e) * 2 for e in purges])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it by itself after some errors (SQLITE_FULL, SQLITE_IOERR)
                db.execute("ROLLBACK")
            self.outbox_seq = outbox_seq
            raise

    def restore(self, before: Iterable[tuple[tuple[str, Network, Scope | None], Entry | None]],
                outbox_after: int = 0, fleet: Mapping[str, str | None] | None = None,
                fresh: Iterable[Fresh] = (), refresh: Iterable[Refresh] = ()) -> None:
        """Put rows back as they were before a batch whose kernel change failed: the outbox rows after
        `outbox_after` go (their changes never were), the `fleet` keys take their old values (None: none), the
        rows of `fresh` go (a tombstone they replaced only had to leave the kernel, which the reconcile after
        a failed batch makes sure of), and those of `refresh` take their old expiry."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM outbox WHERE seq > ?", (outbox_after,))
            self.outbox_seq = outbox_after
            for name, value in (fleet or {}).items():
                if value is None:
                    db.execute("DELETE FROM fleet WHERE key = ?", (name,))
                else:
                    db.execute("INSERT OR REPLACE INTO fleet (key, value) VALUES (?, ?)", (name, value))
            for f in fresh:  # one statement, as write() (_fresh_statement)
                db.execute("DELETE FROM blocks WHERE chain=? AND proto=? AND ports=? AND network IN "
                           "(SELECT value FROM json_each(?))",
                           (f.chain, *scope_columns(f.scope), json.dumps([item[0] for item in f.items])))
            for r in refresh:
                proto, ports = scope_columns(r.scope)
                db.executemany("UPDATE blocks SET expires_at = ?, due = ? WHERE chain = ? AND network = ? AND "
                               "proto = ? AND ports = ?",
                               [(old, old, r.chain, item[0], proto, ports) for item, old in zip(r.items, r.old)])
            for (chain, network, scope), entry in before:
                if entry is None:
                    key = (chain, net_text(network), *scope_columns(scope))
                    db.execute("DELETE FROM blocks WHERE chain=? AND network=? AND proto=? AND ports=?", key)
                    db.execute("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=?", key)
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO blocks (chain, network, proto, ports, target, created_at, expires_at,"
                        " created_by, removing, due) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                        (*row_key(entry), entry.target, entry.created_at, entry.expires_at, entry.created_by,
                         entry.due),
                    )
                    self._put_claims(db, [entry])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it by itself after some errors (SQLITE_FULL, SQLITE_IOERR)
                db.execute("ROLLBACK")
            raise

    # -- the worker's index -------------------------------------------------------------------------------

    def get(self, chain: str, network: Network, scope: Scope | None) -> Entry | None:
        """The live entry of a key, or None."""
        rows = self._db.execute(_ENTRY + "WHERE b.chain=? AND b.network=? AND b.proto=? AND b.ports=? AND "
                                "b.removing=0", (chain, net_text(network), *scope_columns(scope))).fetchall()
        return _entry(chain, network, scope, rows) if rows else None

    def get_many(self, chain: str, scope: Scope | None, networks: Iterable[Network]) -> dict[Network, Entry]:
        """The live entries of `networks` in (chain, scope): one query per few hundred networks."""
        by_text = {net_text(n): n for n in networks}
        return {e.network: e for e in self.held(chain, scope, list(by_text), by_text).values()}

    def held(self, chain: str, scope: Scope | None, texts: Sequence[str],
             networks: Mapping[str, Network] | None = None) -> dict[str, Entry]:
        """The live entries of the networks of `texts` (net_text) in (chain, scope), by text: one query per few
        hundred; `networks`: the Network of each text, when the caller has them."""
        found: dict[str, Entry] = {}
        proto, ports = scope_columns(scope)
        texts = sorted(texts)  # each query's keys close together in the table: its pages read once (timsort: at
        # once when they are in order already, as a load's are)
        for i in range(0, len(texts), _IN_CHUNK):
            part = texts[i:i + _IN_CHUNK]
            rows = self._db.execute(
                _ENTRY_NET + f"WHERE b.chain=? AND b.proto=? AND b.ports=? AND b.removing=0 AND b.network IN "
                f"({','.join('?' * len(part))}) ORDER BY b.network", (chain, proto, ports, *part)).fetchall()
            for text, group in itertools.groupby(rows, key=lambda r: r[0]):
                network = parse_stored(text) if networks is None else networks[text]
                found[text] = _entry(chain, network, scope, [r[1:] for r in group])
        return found

    def held_by(self, chain: str, scope: Scope | None, owner: str, expires_at: float | None, texts: Sequence[str]
                ) -> tuple[set[str], dict[str, tuple[float, float | None]], list[str]]:
        """Of the networks of `texts` (net_text) in (chain, scope), the live blocks whose one claim is `owner`'s
        (rows without claims rows): those with expiry `expires_at`, which a load of them by that owner leaves as
        they are (a feed loaded again), and those with another, as {text: (created_at, expires_at)} (a timed feed
        loaded again); and every other live one. The texts go in as one JSON array and come back as a few, one
        row a kind, and one for each (created_at, expires_at) of the second kind, which are few (a load's rows have
        the same): each row fetched lets go of the GIL and takes it back from the thread parsing the load, and
        the times come as SQLite's doubles, exact (its JSON writes 15 digits)."""
        same: set[str] = set()
        timed: dict[str, tuple[float, float | None]] = {}
        others: list[str] = []
        for kind, created_at, old, found in self._db.execute(
                "SELECT kind, created_at, expires_at, json_group_array(network) FROM (SELECT b.network, "
                "CASE WHEN b.created_by <> ? OR EXISTS (SELECT 1 FROM claims c WHERE c.chain = b.chain AND "
                "c.network = b.network AND c.proto = b.proto AND c.ports = b.ports) THEN 2 WHEN b.expires_at IS ? "
                "THEN 0 ELSE 1 END AS kind, b.created_at, b.expires_at FROM blocks b WHERE b.chain = ? AND "
                "b.proto = ? AND b.ports = ? AND b.removing = 0 AND b.network IN (SELECT value FROM json_each(?))) "
                "GROUP BY kind, CASE kind WHEN 1 THEN created_at END, CASE kind WHEN 1 THEN expires_at END",
                (owner, expires_at, chain, *scope_columns(scope), json.dumps(texts))):
            if kind == 0:
                same = set(json.loads(found))
            elif kind == 1:
                times = (created_at, old)
                timed.update((text, times) for text in json.loads(found))
            else:
                others = json.loads(found)
        return same, timed, others

    def group(self, chain: str, network: Network, proto: str) -> list[Entry]:
        """The live blocks with port lists of (chain, network, proto), by ports."""
        rows = self._db.execute(
            _ENTRY_SCOPE + "WHERE b.chain=? AND b.network=? AND b.proto=? AND b.ports<>'' AND b.removing=0 "
            "ORDER BY b.ports", (chain, net_text(network), proto)).fetchall()
        return [_entry(chain, network, _scope(proto, ports), [r[1:] for r in group])
                for ports, group in itertools.groupby(rows, key=lambda r: r[0])]

    def entries(self, chain: str, where: str = "", args: tuple[Any, ...] = ()) -> Iterator[Entry]:
        """The live entries of `chain` in key order, read as they are used (`where`: more conditions on b)."""
        rows = self._db.execute(
            "SELECT b.network, b.proto, b.ports, b.target, b.created_at, b.expires_at, b.created_by, c.owner, "
            "c.created_at, c.expires_at, c.node FROM blocks b LEFT JOIN claims c ON c.chain = b.chain AND "
            "c.network = b.network AND c.proto = b.proto AND c.ports = b.ports WHERE b.chain=? AND b.removing=0 "
            + where + " ORDER BY b.network, b.proto, b.ports", (chain, *args))
        for (net, proto, ports), group in itertools.groupby(rows, key=lambda r: r[:3]):
            try:
                network, scope = parse_stored(net), _scope(proto, ports)
            except ValueError:
                logger.error("ignoring unreadable row in %s: chain=%s network=%r proto=%r ports=%r", self.path,
                             chain, net, proto, ports)
                continue
            yield _entry(chain, network, scope, [r[3:] for r in group])

    def due(self, now: float, limit: int) -> list[tuple[str, Network, Scope | None]]:
        """The keys of the live entries with a claim due by `now`, the earliest first."""
        keys: list[tuple[str, Network, Scope | None]] = []
        unreadable: list[tuple[str, str, str, str]] = []
        for chain, net, proto, ports in self._db.execute(
                "SELECT chain, network, proto, ports FROM blocks WHERE due <= ? ORDER BY due LIMIT ?", (now, limit)):
            try:
                keys.append((chain, parse_stored(net), _scope(proto, ports)))
            except ValueError:
                unreadable.append((chain, net, proto, ports))
        if unreadable:  # skipped by every reader (and logged by a listing); not due again, or the worker spins
            self._db.executemany("UPDATE blocks SET due=NULL WHERE chain=? AND network=? AND proto=? AND ports=?",
                                 unreadable)
        return keys

    def next_due(self) -> float | None:
        """When the next claim of a live entry expires; None: none does."""
        row = self._db.execute("SELECT due FROM blocks WHERE due IS NOT NULL ORDER BY due LIMIT 1").fetchone()
        return None if row is None else row[0]

    def counts(self) -> Counts:
        """Live entries and kernel atoms per chain (the blocks with port lists of one (network, proto) are one
        atom), and the claims of other hosts: read once at a reconcile, then kept up to date by the worker."""
        db = self._db
        entries = dict(db.execute("SELECT chain, count(*) FROM blocks WHERE removing=0 GROUP BY chain"))
        atoms = dict(db.execute("SELECT chain, count(*) FROM blocks WHERE removing=0 AND ports='' GROUP BY chain"))
        for chain, n in db.execute("SELECT chain, count(*) FROM (SELECT DISTINCT chain, network, proto FROM blocks "
                                   "WHERE removing=0 AND ports<>'') GROUP BY chain"):
            atoms[chain] = atoms.get(chain, 0) + n
        (remote,), = db.execute(
            "SELECT count(*) FROM claims c JOIN blocks b ON c.chain = b.chain AND c.network = b.network AND "
            "c.proto = b.proto AND c.ports = b.ports WHERE c.node<>'' AND b.removing=0")
        return Counts(entries, atoms, remote)

    def chain_names(self) -> set[str]:
        """Every chain with a row, live or tombstone."""
        return {chain for chain, in self._db.execute("SELECT DISTINCT chain FROM blocks")}

    def retarget(self, chain: str, target: str) -> int:
        """Give every live entry of `chain` the `target` (a set backend's chain has one, for all); how many changed."""
        with self._transaction():
            return self._db.execute("UPDATE blocks SET target=? WHERE chain=? AND removing=0 AND target<>?",
                                    (target, chain, target)).rowcount

    def has_tombstones(self, chains: Iterable[str]) -> bool:
        chains = list(chains)
        marks = ",".join("?" * len(chains))
        return bool(chains) and self._db.execute(
            f"SELECT 1 FROM blocks WHERE removing=1 AND chain IN ({marks}) LIMIT 1", chains).fetchone() is not None

    def purge_tombstones(self, chains: Iterable[str]) -> int:
        """Delete the tombstones of `chains` (their kernel entries are gone); how many there were."""
        chains = list(chains)
        if not chains:
            return 0
        marks = ",".join("?" * len(chains))
        with self._transaction():
            return self._db.execute(f"DELETE FROM blocks WHERE removing=1 AND chain IN ({marks})", chains).rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def execute(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        """A statement of the worker's reconcile (its temporary table of what the kernel holds)."""
        return self._db.execute(sql, tuple(args))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)

    def fleet_state(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM fleet WHERE key <> ?", (SEAL_KEY,)))

    # The kernel's seal (Backend.seal): a row of the key-value table `fleet` (named for its first keys, the fleet's).
    def set_seal(self, token: str) -> None:
        """Keep `token` for the next start: what the kernel holds, while no batch changed it since (Worker._seal)."""
        self._db.execute("INSERT OR REPLACE INTO fleet (key, value) VALUES (?, ?)", (SEAL_KEY, token))

    def take_seal(self) -> str | None:
        """The seal the last run left, gone from the store before it is used: this run changes the kernel, and a
        crash of it must not find the seal at the start after."""
        row = self._db.execute("SELECT value FROM fleet WHERE key = ?", (SEAL_KEY,)).fetchone()
        if row is None:
            return None
        self._db.execute("DELETE FROM fleet WHERE key = ?", (SEAL_KEY,))
        return str(row[0])

    def close(self) -> None:
        self._db.close()


class OutboxRun(NamedTuple):
    """What OutboxReader.run read: `events` rows as a JSON array `text`, the last one `last` (None if none); `star`,
    the first override unblock's seq when it ends the run; `read`, the rows read (the run's and those from `star`)."""
    text: str
    events: int
    last: int | None
    star: int | None
    read: int


# OutboxReader.run's one pass over a run of rows: their [seq, event] pairs as a JSON array (the events are JSON as
# Worker._announce wrote them; '[]' for none), their count, the last seq, and the first override unblock's seq. Its
# text has "owner":"*" in it only there: inside a JSON string every quote is escaped.
_RUN = ("SELECT coalesce('[' || group_concat('[' || seq || ',' || event || ']', ',') || ']', '[]'), count(*), "
        "max(seq), min(CASE WHEN instr(event, '\"owner\":\"*\"') > 0 THEN seq END) FROM "
        "(SELECT seq, event FROM outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?)")


class OutboxReader:
    """A read-only connection to the store for the fleet's publisher thread: WAL lets it read while the worker
    writes, and it never takes the write lock."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)

    def run(self, after: int, upto: int, limit: int) -> OutboxRun:
        """The rows after seq `after` up to `upto`, at most `limit`, up to the first override unblock (owner `*`) among
        them. The rows come as one JSON array of [seq, event] pairs, made by SQLite rather than fetched a row at a
        time: each row fetched lets go of the GIL and takes it back, while the worker and the requests wait on it
        (bench/README.md, fleet); the publisher hands the text to Redis unparsed. The rows are the worker's JSON,
        joined as text, not parsed again (json() and json_extract() a row cost a round of 100 events 170 µs
        against 92). An aggregate's order is SQLite's to choose: whoever reads the text sorts the pairs by seq (the
        publisher's script does)."""
        text, events, last, star = self._db.execute(_RUN, (after, upto, limit)).fetchone()
        if star is None:
            return OutboxRun(text, events, last, None, events)
        before = self._db.execute(_RUN, (after, star - 1, limit)).fetchone() if star > after + 1 else ("[]", 0, None)
        return OutboxRun(before[0], before[1], before[2], star, events)

    def event(self, seq: int) -> str:
        """Row `seq`'s event (JSON)."""
        text: str = self._db.execute("SELECT event FROM outbox WHERE seq = ?", (seq,)).fetchone()[0]
        return text

    def close(self) -> None:
        self._db.close()


# A listing's place: the last key it gave (network as stored text, proto, ports), as the blocks table orders them.
ListingKey = tuple[str, str, str]


class Reader:
    """Pages of a chain's live entries for the HTTP threads, read through a read-only connection of the request's own
    (SQLite's connections are not shared between threads); WAL lets it read while the worker writes, and it never
    takes the write lock. Each page is one read transaction, and the next starts after the last key of the one
    before (keyset paging), so that entries added or removed meanwhile never make another one appear twice or not
    at all."""

    def __init__(self, path: Path):
        self.path = path

    def connect(self) -> sqlite3.Connection:
        """A connection for one request; the caller closes it."""
        db = sqlite3.connect(self.path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None)
        db.execute("PRAGMA cache_size=-512")
        return db

    def page(self, db: sqlite3.Connection, chain: str, after: ListingKey | None, limit: int,
             now: float) -> tuple[list[Entry], ListingKey | None]:
        """Up to `limit` entries of `chain` after the key `after`, in key order, as the worker reports them (claims
        expired by `now` left out, and an entry whose every claim did; tombstones too), and the key to go on from,
        None at the chain's end."""
        entries: list[Entry] = []
        key = after or ("", "", "")  # '' sorts before every network's text
        scopes: dict[tuple[str, str], Scope | None] = {}
        while True:
            want = limit - len(entries)
            rows = db.execute(
                "SELECT b.network, b.proto, b.ports, b.target, b.created_at, b.expires_at, b.created_by, c.owner, "
                "c.created_at, c.expires_at, c.node FROM (SELECT network, proto, ports, target, created_at, expires_at,"
                " created_by FROM blocks WHERE chain = ? AND (network, proto, ports) > (?, ?, ?) AND removing = 0 "
                "ORDER BY network, proto, ports LIMIT ?) b LEFT JOIN claims c ON c.chain = ? AND c.network = b.network"
                " AND c.proto = b.proto AND c.ports = b.ports ORDER BY b.network, b.proto, b.ports",
                (chain, *key, want + 1, chain)).fetchall()
            groups = itertools.groupby(rows, key=lambda r: r[:3])
            seen = 0
            more = False
            for (net, proto, ports), group in groups:
                if seen == want:  # the one more asked for: the chain goes on
                    more = True
                    break
                seen += 1
                key = (net, proto, ports)
                block = list(group)
                target, created_at, expires_at, created_by = block[0][3:7]
                try:
                    network = parse_stored(net)
                    if (proto, ports) not in scopes:
                        scopes[(proto, ports)] = stored_scope(proto, ports)
                except ValueError:
                    logger.debug("left an unreadable row of chain %s out of a listing: %r %r %r", chain, net, proto,
                                 ports)
                    continue
                scope = scopes[(proto, ports)]
                if block[0][7] is None:  # a block without claims (not written by this code) is its created_by's
                    if expires_at is None or expires_at > now:
                        entries.append(Entry(chain, network, target, created_at, expires_at, created_by, (), scope))
                    continue
                claims = [Claim(*row[7:]) for row in block if row[9] is None or row[9] > now]
                if claims:
                    entries.append(Entry.of(chain, network, target, created_at, created_by, claims, scope))
            if not more:
                return entries, None
            if len(entries) == limit:
                return entries, key
            # Some entries of the round had expired: fill the page from where it stopped.
