"""The store's schema version: a new store gets the code's, an older one is upgraded in one transaction with every row
kept, a newer one is refused and left byte for byte as it was; then the real daemon on a store of the release before
versions (tests/fixtures/state-v0.db), and refusing a newer one. Version 1 (tests/fixtures/state-v1.db) is upgraded to
2 the same way: every block becomes one claim owned by its created_by. Version 2 (tests/fixtures/state-v2.db, with
claims of two owners) is upgraded to 3: every block and claim is kept, for all traffic (no protocol, no ports).
Version 3 (tests/fixtures/state-v3.db, with blocks scoped to tcp ports) is upgraded to 4: every claim is this host's
(node ''), and the fleet's outbox and cursor are new and empty.
"""

from __future__ import annotations

import ipaddress
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import PKI, Daemon, base_config, module_daemon
from webiptd import state
from webiptd.commands import Entry
from webiptd.daemon import EXIT_STORE
from webiptd.net import parse_stored
from webiptd.state import VERSION, Store, StoreError, stored_version

FIXTURE = Path(__file__).with_name("fixtures") / "state-v0.db"
FIXTURE_V1 = FIXTURE.with_name("state-v1.db")  # the same rows, as the release with store version 1 kept them
FIXTURE_V2 = FIXTURE.with_name("state-v2.db")  # the same rows as version 2 keeps them, three with a second claim
FIXTURE_V3 = FIXTURE.with_name("state-v3.db")  # v2's rows as version 3 keeps them, and three scoped blocks
FIXTURE_V4 = FIXTURE.with_name("state-v4.db")  # v3's rows as version 4 keeps them, one a tombstone with two claims
# The chains the fixture was made with (tests/fixtures/README.md): one on each backend.
FIXTURE_CHAINS: dict[str, dict[str, Any]] = {
    "f2b-web": {"backend": "iptables", "target": "DROP", "hooks": ["INPUT"]},
    "f2b-ssh": {"backend": "ipset", "target": "REJECT", "hooks": ["INPUT"]},
    "admin-list": {"backend": "nftables", "target": "DROP", "hooks": ["INPUT", "FORWARD"]},
}
Row = tuple[Any, ...]  # chain, network, target, created_at, expires_at, created_by, removing


def rows(path: Path) -> list[Row]:
    """Every row of the store at `path`, in key order, read without writing anything (after the store is closed)."""
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        return db.execute("SELECT chain, network, target, created_at, expires_at, created_by, removing FROM blocks "
                          "ORDER BY chain, network").fetchall()
    finally:
        db.close()


def claim_rows(path: Path) -> list[Row]:
    """Every claim of the store at `path`, in key order: chain, network, owner, created_at, expires_at."""
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        return db.execute("SELECT chain, network, owner, created_at, expires_at FROM claims "
                          "ORDER BY chain, network, owner").fetchall()
    finally:
        db.close()


def one(path: Path, sql: str) -> Any:
    """The one value `sql` reads from the store at `path`."""
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def one_claim_each(blocks: list[Row]) -> list[Row]:
    """The claims an upgrade to version 2 makes of `blocks`: one each, owned by its created_by, with its times."""
    return [(r[0], r[1], r[5], r[3], r[4]) for r in blocks]


def schema(path: Path) -> list[Row]:
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
    finally:
        db.close()


def files(directory: Path) -> dict[str, bytes]:
    """Each file in `directory` and its bytes: what "left unchanged" compares."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def v0_store(directory: Path, fixture: Path = FIXTURE) -> Path:
    """A copy of the fixture as `directory`/state.db."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "state.db"
    shutil.copyfile(fixture, path)
    return path


def set_version(path: Path, version: int) -> None:
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute(f"PRAGMA user_version={version}")
    db.close()


def live(row: Row, now: float) -> bool:
    return row[4] is None or row[4] > now


# -- the fixture itself ------------------------------------------------------------------------------


def test_the_fixture_is_a_store_of_the_release_before_versions_with_every_kind_of_row() -> None:
    assert stored_version(FIXTURE) == 0
    assert not FIXTURE.with_name(FIXTURE.name + "-wal").exists()
    found = rows(FIXTURE)
    now = time.time()
    assert {r[0] for r in found} == set(FIXTURE_CHAINS)
    for chain, config in FIXTURE_CHAINS.items():
        mine = [r for r in found if r[0] == chain]
        nets = {r[1]: ipaddress.ip_network(r[1]) for r in mine}
        assert {r[2] for r in mine} == {config["target"]}, chain
        assert {n.version for n in nets.values()} == {4, 6}, chain
        assert any(n.prefixlen < n.max_prefixlen for n in nets.values()), f"{chain}: no network, only hosts"
        assert any(r[4] is None for r in mine), f"{chain}: no permanent row"
        assert any(r[4] is not None and r[4] <= now for r in mine), f"{chain}: no expired row"
        assert any(r[4] is not None and r[4] > now for r in mine), (
            f"{chain}: its timed rows have all expired; remake the fixture (tests/fixtures/README.md)")
        assert {r[6] for r in mine} == {0}
    assert [r[1] for r in found if r[5] == "adopted"] == ["203.0.113.99/32"]


def test_the_v1_fixture_holds_the_same_rows_with_version_1() -> None:
    assert stored_version(FIXTURE_V1) == 1
    assert not FIXTURE_V1.with_name(FIXTURE_V1.name + "-wal").exists()
    assert rows(FIXTURE_V1) == rows(FIXTURE)


def test_the_v2_fixture_holds_the_same_rows_and_three_second_claims() -> None:
    assert stored_version(FIXTURE_V2) == 2
    assert rows(FIXTURE_V2) == rows(FIXTURE)
    claims = claim_rows(FIXTURE_V2)
    assert len(claims) == 24 and sum(c[2] == "f2b/sshd" for c in claims) == 3


# -- the store's version, without the daemon ---------------------------------------------------------


def test_a_new_store_gets_the_codes_version_and_the_same_schema_as_an_upgraded_one(tmp_path: Path) -> None:
    assert VERSION == 6
    Store(tmp_path / "new").close()
    assert stored_version(tmp_path / "new" / "state.db") == VERSION
    Store(v0_store(tmp_path / "old").parent).close()
    Store(v0_store(tmp_path / "v1", FIXTURE_V1).parent).close()
    Store(v0_store(tmp_path / "v2", FIXTURE_V2).parent).close()
    Store(v0_store(tmp_path / "v3", FIXTURE_V3).parent).close()
    Store(v0_store(tmp_path / "v4", FIXTURE_V4).parent).close()
    for old in ("old", "v1", "v2", "v3", "v4"):
        assert schema(tmp_path / "new" / "state.db") == schema(tmp_path / old / "state.db"), old


def test_a_store_of_the_release_before_versions_is_upgraded_keeping_every_row(tmp_path: Path) -> None:
    path = v0_store(tmp_path / "state")
    with sqlite3.connect(path, isolation_level=None) as db:  # and a tombstone: an unblock the kernel has not seen
        db.execute("INSERT INTO blocks VALUES ('f2b-web', '203.0.113.77/32', 'DROP', 1700000000.5, NULL, 'f2b', 1)")
    db.close()
    before = rows(path)
    assert stored_version(path) == 0 and len(before) == 22

    store = Store(path.parent)
    loaded = store.load()
    store.close()
    assert stored_version(path) == VERSION
    assert rows(path) == before
    # Version 5: a tombstone keeps no claims.
    assert claim_rows(path) == one_claim_each([r for r in before if not r[6]])
    assert len(loaded.entries) == 21 and [str(e.network) for e in loaded.tombstones] == ["203.0.113.77/32"]
    # Each is its created_by's one claim, with its times.
    assert all(e.all_claims == ((e.created_by, e.created_at, e.expires_at, ""),) for e in loaded.entries)
    # Upgraded once: the next open finds the current version and changes nothing.
    same = files(path.parent)
    Store(path.parent).close()
    assert files(path.parent) == same


@pytest.mark.parametrize("fixture", [FIXTURE, FIXTURE_V1], ids=["v0", "v1"])
def test_every_row_becomes_one_claim_owned_by_its_created_by(tmp_path: Path, fixture: Path) -> None:
    path = v0_store(tmp_path / "state", fixture)
    before = rows(path)
    store = Store(path.parent)
    loaded = store.load()
    store.close()
    assert stored_version(path) == VERSION
    assert rows(path) == before
    assert claim_rows(path) == one_claim_each(before)
    stored = {(r[0], r[1]): r for r in before}
    for e in loaded.entries:
        r = stored[(e.chain, str(e.network))]
        assert e.to_json()["claims"] == [{"owner": r[5], "created_at": e.to_json()["created_at"],
                                          "expires_at": e.to_json()["expires_at"], "node": None}]
    assert {e.all_claims[0].owner for e in loaded.entries} == {r[5] for r in before}


def scope_columns(path: Path) -> set[tuple[str, str]]:
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        return set(db.execute("SELECT proto, ports FROM blocks UNION SELECT proto, ports FROM claims").fetchall())
    finally:
        db.close()


def test_a_version_2_store_keeps_every_block_and_claim_for_all_traffic(tmp_path: Path) -> None:
    path = v0_store(tmp_path / "state", FIXTURE_V2)
    before, claims_before = rows(path), claim_rows(path)
    store = Store(path.parent)
    loaded = store.load()
    store.close()
    assert stored_version(path) == VERSION
    assert rows(path) == before and claim_rows(path) == claims_before
    assert scope_columns(path) == {("", "")}
    assert len(loaded.entries) == 21 and all(e.scope is None for e in loaded.entries)
    two = {(e.chain, str(e.network)): {c.owner for c in e.all_claims} for e in loaded.entries if len(e.all_claims) > 1}
    assert len(two) == 3 and all("f2b/sshd" in owners for owners in two.values())


def test_the_v3_fixture_holds_v2s_rows_and_three_scoped_blocks_of_three_owners() -> None:
    assert stored_version(FIXTURE_V3) == 3
    assert len(rows(FIXTURE_V3)) == 24 and len(claim_rows(FIXTURE_V3)) == 33


def test_a_version_3_store_keeps_every_claim_as_this_hosts_and_gets_an_empty_outbox(tmp_path: Path) -> None:
    path = v0_store(tmp_path / "state", FIXTURE_V3)
    blocks_before, claims_before = rows(path), claim_rows(path)
    store = Store(path.parent)
    loaded = store.load()
    assert store.outbox_seq == 0 and store.fleet_state() == {}
    store.close()
    assert stored_version(path) == VERSION
    assert rows(path) == blocks_before and claim_rows(path) == claims_before
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        assert db.execute("SELECT DISTINCT node FROM claims").fetchall() == [("",)]
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
    finally:
        db.close()
    scoped = [e for e in loaded.entries if e.scope is not None]
    assert len(loaded.entries) == 24 and len(scoped) == 3
    assert all(str(e.scope) == "tcp/22,80:90" and len(e.all_claims) == 3 for e in scoped)
    assert all(not c.node for e in loaded.entries for c in e.all_claims)


def test_a_version_4_store_gets_each_blocks_next_expiry_and_its_tombstones_lose_their_claims(tmp_path: Path) -> None:
    assert stored_version(FIXTURE_V4) == 4
    path = v0_store(tmp_path / "state", FIXTURE_V4)
    blocks_before, claims_before = rows(path), claim_rows(path)
    tomb = "SELECT count(*) FROM claims c JOIN blocks b USING (chain, network, proto, ports) WHERE b.removing = 1"
    assert [r[6] for r in blocks_before].count(1) == 1 and one(path, tomb) == 2
    store = Store(path.parent)
    loaded = store.load()
    assert list(store.entries("f2b-ssh")) == [e for e in loaded.entries if e.chain == "f2b-ssh"]
    store.close()
    assert stored_version(path) == VERSION
    assert rows(path) == blocks_before
    assert one(path, tomb) == 0 and len(claim_rows(path)) == len(claims_before) - 2
    assert len(loaded.entries) == 23 and len(loaded.tombstones) == 1
    db = sqlite3.connect(path.absolute().as_uri() + "?immutable=1", uri=True)
    try:
        due = {(chain, net, proto, ports): d for chain, net, proto, ports, d in
               db.execute("SELECT chain, network, proto, ports, due FROM blocks WHERE removing = 0")}
        assert db.execute("SELECT due FROM blocks WHERE removing = 1").fetchall() == [(None,)]
    finally:
        db.close()
    # The next expiry of each: the first of its claims' (a second claim expires before the first claimant's).
    assert due == {state.row_key(e): e.due for e in loaded.entries}
    assert sum(d is not None for d in due.values()) >= 5
    assert any(e.due is not None and e.due != e.expires_at for e in loaded.entries)


def v5_store(directory: Path, published: int, rows: int, undone: int) -> Path:
    """A store as version 5 left it (its migrations, then its writes): events 1..`published` published and
    deleted (the marker in the fleet key), `rows` more in the outbox, then `undone` taken back after a refused
    kernel change (AUTOINCREMENT had counted them)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "state.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        for step in state.MIGRATIONS[:5]:
            step(db)
        db.execute("PRAGMA user_version=5")
        db.execute("COMMIT")
        for n in range(1, published + rows + undone + 1):
            db.execute("INSERT INTO outbox (event) VALUES (?)", (f'{{"n":{n}}}',))
        db.execute("DELETE FROM outbox WHERE seq <= ?", (published,))
        db.execute("INSERT INTO fleet (key, value) VALUES ('published', ?)", (str(published),))
        db.execute("DELETE FROM outbox WHERE seq > ?", (published + rows,))
    finally:
        db.close()
    return path


@pytest.mark.parametrize("published, rows, undone", [(7, 0, 0), (7, 3, 0), (0, 3, 2), (7, 0, 2), (0, 0, 0)])
def test_a_version_5_store_keeps_its_outbox_and_counts_on_from_its_last_event(
        tmp_path: Path, published: int, rows: int, undone: int) -> None:
    """Version 6 numbers the outbox rows itself: an upgraded store keeps each row and its seq, and the next event
    gets the seq after the last row's, or after the last published one's when the outbox is empty (their seqs went
    to Redis: never again); the seqs of events taken back, never published, may be given again."""
    path = v5_store(tmp_path / "state", published, rows, undone)
    before = outbox_rows(path)
    assert [seq for seq, _ in before] == list(range(published + 1, published + rows + 1))
    store = Store(path.parent)
    assert store.outbox_seq == published + rows
    store.write([], [], outbox=['{"n":"next"}', '{"n":"after"}'])
    assert store.outbox_seq == published + rows + 2
    store.close()
    store = Store(path.parent)  # the count again from the store alone
    assert store.outbox_seq == published + rows + 2
    store.close()
    assert stored_version(path) == VERSION
    last = published + rows
    assert outbox_rows(path) == before + [(last + 1, '{"n":"next"}'), (last + 2, '{"n":"after"}')]
    Store(tmp_path / "new").close()
    assert schema(path) == schema(tmp_path / "new" / "state.db")


def outbox_rows(path: Path) -> list[Row]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT seq, event FROM outbox ORDER BY seq").fetchall()
    finally:
        db.close()


def failing_step(db: sqlite3.Connection) -> None:
    """A step that changes the rows and the version and then fails: none of it may stay."""
    db.execute("DELETE FROM blocks WHERE created_by = 'adopted'")
    db.execute("UPDATE blocks SET target = 'REJECT'")
    db.execute("PRAGMA user_version=42")
    raise RuntimeError("this step fails on purpose")


@pytest.mark.parametrize("steps", [(failing_step,), (state.MIGRATIONS[0], failing_step),
                                   (*state.MIGRATIONS, failing_step)],
                         ids=["the only step fails", "the second of two steps fails", "the last step fails"])
def test_a_failed_upgrade_leaves_the_store_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     steps: tuple[Any, ...]) -> None:
    path = v0_store(tmp_path / "state")
    before = files(path.parent)
    monkeypatch.setattr(state, "MIGRATIONS", steps)
    monkeypatch.setattr(state, "VERSION", len(steps))
    with pytest.raises(StoreError) as info:
        Store(path.parent)
    message = str(info.value)
    assert str(path) in message and f"from version 0 to {len(steps)}" in message
    assert files(path.parent) == before  # the same bytes, and no -wal or -shm left behind
    monkeypatch.undo()
    Store(path.parent).close()  # the real upgrade still works on it
    assert stored_version(path) == VERSION


@pytest.mark.parametrize("version", [VERSION + 1, 99, -1])
def test_a_store_of_a_version_this_code_does_not_know_is_refused_untouched(tmp_path: Path, version: int) -> None:
    path = v0_store(tmp_path / "state")
    set_version(path, version)
    before = files(path.parent)
    assert list(before) == ["state.db"]
    with pytest.raises(StoreError) as info:
        Store(path.parent)
    message = str(info.value)
    assert str(path) in message and f"version {version}" in message and "left unchanged" in message
    if version > VERSION:
        assert f"up to version {VERSION}" in message
    assert files(path.parent) == before


def test_a_newer_version_only_in_the_wal_of_a_crashed_store_is_refused(tmp_path: Path) -> None:
    """A newer release killed before its WAL was checkpointed: the version is in the WAL, not yet in the file."""
    path = v0_store(tmp_path / "live")
    crashed = tmp_path / "crashed"
    crashed.mkdir(mode=0o700)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute(f"PRAGMA user_version={VERSION + 1}")
    writer.execute("INSERT INTO blocks VALUES ('f2b-web', '203.0.113.78/32', 'DROP', 1700000000.5, NULL, 'f2b', 0)")
    for name in ("state.db", "state.db-wal", "state.db-shm"):  # copied while the writer is open: as kill -9 leaves it
        shutil.copyfile(path.parent / name, crashed / name)
    writer.close()
    before = files(crashed)
    assert before["state.db-wal"] and stored_version(crashed / "state.db") == VERSION + 1
    with pytest.raises(StoreError, match=f"version {VERSION + 1}"):
        Store(crashed)
    after = files(crashed)
    # The file and its WAL are as they were; SQLite may rebuild the -shm index, which holds no data.
    assert {n: after[n] for n in ("state.db", "state.db-wal")} == {n: before[n] for n in ("state.db", "state.db-wal")}
    assert set(after) == set(before)


def test_a_file_that_is_not_a_store_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database, but a file of the same name\n" * 100)
    with pytest.raises(StoreError, match="state.db: cannot open the state store"):
        Store(tmp_path)


# -- the real daemon -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory: pytest.TempPathFactory, pki: PKI, user_hashes: dict[str, str]) -> Iterator[Daemon]:
    """The daemon started on a copy of the fixture, in a namespace of its own: a reboot into the new release."""
    state_dir = tmp_path_factory.mktemp("upgrade") / "state"
    v0_store(state_dir)

    def configure(config: dict[str, Any]) -> None:
        config["state_dir"] = str(state_dir)
        config["chains"] = {name: dict(chain) for name, chain in FIXTURE_CHAINS.items()}

    with module_daemon(pki, user_hashes, configure=configure) as d:
        yield d


def listed(d: Daemon, chain: str) -> dict[str, dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return {e["network"]: e for e in r.json["entries"]}


@pytest.mark.root
@pytest.mark.parametrize("chain", FIXTURE_CHAINS, ids=[f"{c}-{v['backend']}" for c, v in FIXTURE_CHAINS.items()])
def test_the_daemon_lists_every_row_of_an_upgraded_store_as_stored_and_has_it_in_the_kernel(upgraded: Daemon,
                                                                                           chain: str) -> None:
    d = upgraded
    now = time.time()
    stored = [r for r in rows(FIXTURE) if r[0] == chain]
    expected = {str(parse_stored(r[1])): Entry(chain, parse_stored(r[1]), *r[2:6]).to_json()
                for r in stored if live(r, now)}
    gone = [r[1] for r in stored if not live(r, now)]
    assert expected and gone
    assert listed(d, chain) == expected  # created_at, expires_at and created_by included
    for network, e in listed(d, chain).items():  # each with its one claim, owned by its created_by
        assert e["claims"] == [{"owner": e["created_by"], "created_at": e["created_at"],
                                "expires_at": e["expires_at"], "node": None}], network
    for network in gone:
        n = ipaddress.ip_network(network)
        family = f"ipv{n.version}"
        suffix = "" if n.prefixlen == n.max_prefixlen else f"/{n.prefixlen}"
        assert d.request("GET", f"/chain/{chain}/{family}/{n.network_address}{suffix}").status == 404, network
    for family in (4, 6):
        assert d.kernel_entries(chain, family) == {
            n for n in expected if ipaddress.ip_network(n).version == family}, (chain, family)


@pytest.mark.root
def test_the_daemon_upgraded_the_store_in_place_and_dropped_only_the_expired_rows(upgraded: Daemon) -> None:
    path = Path(upgraded.config["state_dir"]) / "state.db"
    db = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)  # the daemon holds it open
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)
        now = time.time()
        assert db.execute("SELECT chain, network, target, created_at, expires_at, created_by, removing FROM blocks "
                          "ORDER BY chain, network").fetchall() == [r for r in rows(FIXTURE) if live(r, now)]
        assert db.execute("SELECT chain, network, owner, created_at, expires_at FROM claims "
                          "ORDER BY chain, network, owner").fetchall() == one_claim_each(
            [r for r in rows(FIXTURE) if live(r, now)])
        assert set(db.execute("SELECT proto, ports FROM blocks UNION SELECT proto, ports FROM claims")) == {("", "")}
    finally:
        db.close()


@pytest.mark.root
def test_the_daemon_refuses_a_newer_store_with_one_line_and_leaves_it_and_the_firewall_alone(
        ns: Any, workdir: Path, pki: PKI, user_hashes: dict[str, str]) -> None:
    config = base_config(workdir, pki, user_hashes)
    path = v0_store(Path(config["state_dir"]))
    set_version(path, VERSION + 1)
    before = files(path.parent)
    d = Daemon(ns, workdir, pki, config=config)
    try:
        d.start(wait=False)
        assert d.proc is not None
        assert d.proc.wait(30) == EXIT_STORE
        assert not any("READY=1" in m for m in d.drain_notify())
    finally:
        d.close()
    err = d.stderr()
    assert "Traceback" not in err, err
    refusals = [line for line in err.splitlines() if str(path) in line]
    assert len(refusals) == 1 and "CRITICAL" in refusals[0], err
    assert f"version {VERSION + 1}" in refusals[0] and f"up to version {VERSION}" in refusals[0], err
    assert files(path.parent) == before
    for family in (4, 6):  # refused before the firewall was touched: not even our chains were made
        assert "f2b-web" not in ns.iptables_save(family)
