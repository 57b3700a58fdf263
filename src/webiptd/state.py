"""The durable record of every block: SQLite in WAL mode at `state_dir/state.db`, written before the kernel
is changed, and used by the firewall worker thread only."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Iterable, NamedTuple

from webiptd.commands import Entry
from webiptd.net import Network, parse_stored

logger = logging.getLogger(__name__)

SCHEMA = """
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


class Loaded(NamedTuple):
    entries: list[Entry]
    tombstones: list[Entry]


class Store:
    """The desired state. An unblock first leaves a tombstone, so a crash between the store and the kernel
    never brings a removed block back, nor loses an acknowledged one."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / "state.db"
        # The worker thread owns this connection; it is created on the main thread only to fail early.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL fsyncs the WAL on every commit: an acknowledged block survives power loss, not only a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        # The page cache (2 MiB by default) fills up when the start-up loads every row, and stays. Writes touch a
        # few pages of a shallow B-tree; 256 KiB holds its inner pages at 100k rows (bench/README.md: RSS -1.9 MiB).
        self._db.execute("PRAGMA cache_size=-256")
        self._db.executescript(SCHEMA)

    def load(self) -> Loaded:
        entries: list[Entry] = []
        tombstones: list[Entry] = []
        # Each row's strings are new objects; 100k copies of the same chain, target and user cost ~15 MB.
        same: dict[str, str] = {}
        for chain, net, target, created_at, expires_at, created_by, removing in self._db.execute(
            "SELECT chain, network, target, created_at, expires_at, created_by, removing FROM blocks"
        ):
            try:
                network = parse_stored(net)
            except ValueError:
                logger.error("ignoring unreadable row in %s: chain=%s network=%r", self.path, chain, net)
                continue
            entry = Entry(same.setdefault(chain, chain), network, same.setdefault(target, target), created_at,
                          expires_at, same.setdefault(created_by, created_by))
            (tombstones if removing else entries).append(entry)
        return Loaded(entries, tombstones)

    def write(self, puts: Iterable[Entry], removes: Iterable[Entry], purges: Iterable[Entry] = ()) -> None:
        """In one durable transaction: upsert `puts`, tombstone `removes`, delete `purges`' tombstones."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO blocks (chain, network, target, created_at, expires_at, created_by, removing) "
                "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (chain, network) DO UPDATE SET "
                "target=excluded.target, created_at=excluded.created_at, expires_at=excluded.expires_at, "
                "created_by=excluded.created_by, removing=0",
                [(e.chain, str(e.network), e.target, e.created_at, e.expires_at, e.created_by) for e in puts],
            )
            db.executemany("UPDATE blocks SET removing=1 WHERE chain=? AND network=?",
                           [(e.chain, str(e.network)) for e in removes])
            db.executemany("DELETE FROM blocks WHERE chain=? AND network=? AND removing=1",
                           [(e.chain, str(e.network)) for e in purges])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def restore(self, before: Iterable[tuple[tuple[str, Network], Entry | None]]) -> None:
        """Put rows back as they were before a batch whose kernel change failed."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (chain, network), entry in before:
                if entry is None:
                    db.execute("DELETE FROM blocks WHERE chain=? AND network=?", (chain, str(network)))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO blocks (chain, network, target, created_at, expires_at, created_by,"
                        " removing) VALUES (?, ?, ?, ?, ?, ?, 0)",
                        (entry.chain, str(entry.network), entry.target, entry.created_at, entry.expires_at,
                         entry.created_by),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()
