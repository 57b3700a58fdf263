"""The durable record of every block: SQLite in WAL mode at `state_dir/state.db`, written before the kernel
is changed, and used by the firewall worker thread only. The file carries its schema version; an older one is upgraded
at open, and a newer one is refused."""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

from webiptd.commands import Claim, Entry
from webiptd.net import Network, parse_stored
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
# the last seq each host published.
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


def _scope_columns(scope: Scope | None) -> tuple[str, str]:
    return ("", "") if scope is None else (scope.proto, scope.port_text)


def _row_key(e: Entry) -> tuple[str, str, str, str]:
    return (e.chain, str(e.network), *_scope_columns(e.scope))


# MIGRATIONS[n] takes a store from version n to n + 1, inside the one transaction of the upgrade; it runs statements
# one by one (executescript would commit half-way). A new, empty store is version 0 and takes every step too, so every
# migration runs on each first start, and a new store and an upgraded one cannot differ.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_to_v1, _to_v2, _to_v3, _to_v4)
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
            # The page cache (2 MiB by default) fills up when the start-up loads every row, and stays. Writes touch
            # a few pages of a shallow B-tree; 256 KiB holds its inner pages at 100k rows (bench/README.md: RSS
            # -1.9 MiB).
            self._db.execute("PRAGMA cache_size=-256")
            self._upgrade(new=found is None)
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()
            self.outbox_seq: int = 0 if row is None else row[0]  # the last outbox row's seq
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
                    keys: list[tuple[str, str, str, str]] | None = None) -> None:
        """Make each entry's claims the stored ones; `keys`: their _row_key()s, when the caller has them."""
        entries = list(entries)
        keys = [_row_key(e) for e in entries] if keys is None else keys
        db.executemany("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=?", keys)
        db.executemany("INSERT INTO claims (chain, network, proto, ports, owner, created_at, expires_at, node) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       [(*key, *c) for key, e in zip(keys, entries) for c in e.all_claims])

    def write(self, puts: Iterable[Entry], removes: Iterable[Entry], purges: Iterable[Entry] = (),
              outbox: Iterable[str] = (), fleet: Mapping[str, str] | None = None,
              published: int | None = None) -> None:
        """In one durable transaction: upsert `puts`, tombstone `removes`, delete `purges`' tombstones; add the
        `outbox` events (JSON), set the `fleet` keys, and drop the outbox rows up to `published`."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            outbox = list(outbox)
            if outbox:
                db.executemany("INSERT INTO outbox (event) VALUES (?)", [(e,) for e in outbox])
                self.outbox_seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name='outbox'").fetchone()[0]
            if fleet:
                db.executemany("INSERT OR REPLACE INTO fleet (key, value) VALUES (?, ?)", list(fleet.items()))
            if published is not None:
                db.execute("DELETE FROM outbox WHERE seq <= ?", (published,))
            puts = list(puts)
            keys = [_row_key(e) for e in puts]  # str(network) costs: once an entry
            db.executemany(
                "INSERT INTO blocks (chain, network, proto, ports, target, created_at, expires_at, created_by, "
                "removing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (chain, network, proto, ports) DO UPDATE "
                "SET target=excluded.target, created_at=excluded.created_at, expires_at=excluded.expires_at, "
                "created_by=excluded.created_by, removing=0",
                [(*key, e.target, e.created_at, e.expires_at, e.created_by) for key, e in zip(keys, puts)],
            )
            self._put_claims(db, puts, keys)
            db.executemany("UPDATE blocks SET removing=1 WHERE chain=? AND network=? AND proto=? AND ports=?",
                           [_row_key(e) for e in removes])
            db.executemany("DELETE FROM blocks WHERE chain=? AND network=? AND proto=? AND ports=? AND removing=1",
                           [_row_key(e) for e in purges])
            db.executemany("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=? AND NOT EXISTS "
                           "(SELECT 1 FROM blocks b WHERE b.chain=? AND b.network=? AND b.proto=? AND b.ports=?)",
                           [_row_key(e) * 2 for e in purges])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it by itself after some errors (SQLITE_FULL, SQLITE_IOERR)
                db.execute("ROLLBACK")
            raise

    def restore(self, before: Iterable[tuple[tuple[str, Network, Scope | None], Entry | None]],
                outbox_after: int = 0, fleet: Mapping[str, str | None] | None = None) -> None:
        """Put rows back as they were before a batch whose kernel change failed: the outbox rows after
        `outbox_after` go (their changes never were), and the `fleet` keys take their old values (None: none)."""
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
            for (chain, network, scope), entry in before:
                if entry is None:
                    key = (chain, str(network), *_scope_columns(scope))
                    db.execute("DELETE FROM blocks WHERE chain=? AND network=? AND proto=? AND ports=?", key)
                    db.execute("DELETE FROM claims WHERE chain=? AND network=? AND proto=? AND ports=?", key)
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO blocks (chain, network, proto, ports, target, created_at, expires_at,"
                        " created_by, removing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                        (*_row_key(entry), entry.target, entry.created_at, entry.expires_at, entry.created_by),
                    )
                    self._put_claims(db, [entry])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite ends it by itself after some errors (SQLITE_FULL, SQLITE_IOERR)
                db.execute("ROLLBACK")
            raise

    def fleet_state(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM fleet"))

    def close(self) -> None:
        self._db.close()


class OutboxReader:
    """A read-only connection to the store for the fleet's publisher thread: WAL lets it read while the worker
    writes, and it never takes the write lock."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)

    def rows(self, after: int, upto: int, limit: int) -> list[tuple[int, str]]:
        return self._db.execute("SELECT seq, event FROM outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                                (after, upto, limit)).fetchall()

    def close(self) -> None:
        self._db.close()
