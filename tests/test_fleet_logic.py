"""The fleet's logic without Redis: the config section, the events' parser, and what the worker does with local
changes of shared chains (the outbox) and with remote events (claims of their nodes), against the recording
backend of test_worker_logic. Redis itself, three daemons and their kernels: tests/test_fleet.py.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.test_worker_logic import SSH, T0, WAIT, Harness, block, net, unblock
from webiptd import config as config_mod
from webiptd.commands import Claim, FirewallUnavailable, FleetApply, FleetResync, ListChain, RemoteChange
from webiptd.config import Chain, ConfigError
from webiptd.fleet import Malformed, parse_event, refusal, snapshot_field
from webiptd.scope import parse_scope
from webiptd.state import OutboxReader

SHARED = Chain("f2b-web", ("INPUT",), "DROP", shared=True)


def fleet_worker(h: Harness, node: str = "a") -> Any:
    from webiptd.firewall.worker import Worker
    w = Worker(h.backend, h.store, (SHARED, SSH), clock=h.clock, node=node)
    h.workers.append(w)
    w.start(timeout=WAIT)
    return w


def outbox(h: Harness) -> list[dict[str, Any]]:
    db = sqlite3.connect(h.store.path)
    try:
        return [json.loads(e) for (e,) in db.execute("SELECT event FROM outbox ORDER BY seq")]
    finally:
        db.close()


def remote(op: str, network: str, node: str = "b", owner: str = "ops", expires_at: float | None = None,
           chain: str = "f2b-web", created_at: float = T0) -> RemoteChange:
    return RemoteChange(op, chain, net(network), None, node, owner, created_at, expires_at, f"id-{node}-{network}")


# -- the worker: the outbox --------------------------------------------------------------------------------------


def test_a_local_change_of_a_shared_chain_is_in_the_outbox_in_its_transaction(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.7/32", T0 + 600, actor="f2b", owner="f2b/sshd"))
    h.run(w, block(SSH, "203.0.113.8/32"))  # not shared: no event
    h.run(w, block(SHARED, "203.0.113.7/32", T0 + 600, actor="f2b", owner="f2b/sshd"))  # the same: no event
    h.run(w, unblock(SHARED, "203.0.113.7/32", actor="f2b", owner="f2b/sshd"))
    events = outbox(h)
    assert [(e["op"], e["network"], e["owner"], e["node"]) for e in events] == [
        ("block", "203.0.113.7/32", "f2b/sshd", "a"), ("unblock", "203.0.113.7/32", "f2b/sshd", "a")]
    assert float(events[0]["expires_at"]) == T0 + 600 and float(events[0]["created_at"]) == T0
    assert "expires_at" not in events[1] and len({e["id"] for e in events}) == 2
    assert w.outbox_committed == h.store.outbox_seq == 2


def test_an_unblock_that_released_nothing_publishes_nothing_but_an_override_always_does(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, unblock(SHARED, "203.0.113.9/32"))
    assert outbox(h) == []
    h.run(w, unblock(SHARED, "203.0.113.9/32", every_claim=True))  # another host may hold it
    assert [(e["op"], e["owner"]) for e in outbox(h)] == [("unblock", "*")]


def test_a_scoped_block_carries_its_protocol_and_ports(h: Harness) -> None:
    w = fleet_worker(h)
    cmd = dataclasses.replace(block(SHARED, "203.0.113.7/32"), scope=parse_scope("tcp", "80,22"))
    h.run(w, cmd)
    assert [(e["proto"], e["port"]) for e in outbox(h)] == [("tcp", "22,80")]


def test_an_outbox_row_is_json_dumps_text_byte_for_byte(h: Harness) -> None:
    """The worker writes a row by a format string (not json.dumps, for its cost): the same text, field for field and
    in order; text that needs escaping goes through json.dumps. Ids are UUIDs, each its own."""
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.7/32", T0 + 600.25, actor="f2b", owner="f2b/sshd:x"))
    h.run(w, dataclasses.replace(block(SHARED, "2001:db8::7/128"), scope=parse_scope("tcp", "80:90,22")))
    h.run(w, dataclasses.replace(block(SHARED, "203.0.113.8/32"), scope=parse_scope("udp", None)))
    h.run(w, unblock(SHARED, "203.0.113.7/32", actor="f2b", owner="f2b/sshd:x"))
    db = sqlite3.connect(h.store.path)
    try:
        rows = [e for (e,) in db.execute("SELECT event FROM outbox ORDER BY seq")]
    finally:
        db.close()
    assert len(rows) == 4
    for row in rows:
        assert row == json.dumps(json.loads(row), separators=(",", ":")), row
    events = [json.loads(row) for row in rows]
    assert list(events[0]) == ["op", "chain", "network", "owner", "node", "id", "created_at", "expires_at"]
    assert events[0]["expires_at"] == repr(T0 + 600.25) and events[0]["created_at"] == repr(T0)
    assert list(events[1])[6:8] == ["proto", "port"] and (events[1]["proto"], events[1]["port"]) == ("tcp", "22,80:90")
    assert events[2]["proto"] == "udp" and "port" not in events[2]
    assert "created_at" not in events[3]
    ids = [uuid.UUID(e["id"]) for e in events]
    assert len(set(ids)) == 4 and all(i.version == 8 and i.variant == uuid.RFC_4122 for i in ids)
    assert all(str(i) == e["id"] for i, e in zip(ids, events))
    # Text that JSON must escape (never from the config or the API, which allow none) is still right.
    batch = types.SimpleNamespace(outbox=[])
    w._announce(batch, "block", ("f2b-web", net("203.0.113.9/32"), None), 'we"ird\\é', None)
    assert json.loads(batch.outbox[0])["owner"] == 'we"ird\\é'


def test_no_fleet_no_outbox(h: Harness) -> None:
    w = h.worker((SHARED, SSH))
    h.run(w, block(SHARED, "203.0.113.7/32"))
    assert outbox(h) == []


def test_a_batch_the_kernel_refuses_leaves_no_event_and_no_cursor(h: Harness) -> None:
    w = fleet_worker(h)
    h.backend.fail_applies = 1
    with pytest.raises(FirewallUnavailable):
        h.run(w, block(SHARED, "203.0.113.7/32"))
    assert outbox(h) == [] and w.outbox_committed == 0
    h.backend.fail_applies = 1
    with pytest.raises(FirewallUnavailable):
        h.run(w, FleetApply((remote("block", "203.0.113.8/32"),), "5-0", 5))
    assert h.store.fleet_state().get("cursor") != "5-0" and w.fleet_state().get("cursor") != "5-0"


def test_published_rows_are_deleted_by_the_worker(h: Harness) -> None:
    w = fleet_worker(h)
    for i in range(3):
        h.run(w, block(SHARED, f"203.0.113.{i + 1}/32"))
    w.published = 2
    h.run(w, block(SHARED, "203.0.113.9/32"))
    assert [e["network"] for e in outbox(h)] == ["203.0.113.3/32", "203.0.113.9/32"]
    assert h.store.fleet_state()["published"] == "2"


def test_the_publishers_reader_gives_the_rows_after_its_marker_in_order_with_their_seqs(h: Harness) -> None:
    """OutboxReader.run: the rows after `after` up to `upto` (at most `limit`), each with its seq; a run ends
    before an override unblock (owner *), which is named alone when it is first. The seq of a batch the kernel
    refused (its row taken back, never published) goes to the next event."""
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.1/32"))
    h.backend.fail_applies = 1
    with pytest.raises(FirewallUnavailable):
        h.run(w, block(SHARED, "203.0.113.2/32"))  # its row is taken back, and seq 2 with it
    for i in range(3, 6):
        h.run(w, block(SHARED, f"203.0.113.{i}/32"))  # seqs 2, 3, 4
    h.run(w, unblock(SHARED, "203.0.113.3/32", every_claim=True))  # seq 5
    h.run(w, block(SHARED, "203.0.113.7/32"))
    reader = OutboxReader(h.store.path)
    try:
        def read(after: int, upto: int, limit: int) -> tuple[list[tuple[int, str]], int, int | None, int | None, int]:
            run = reader.run(after, upto, limit)
            pairs = sorted((seq, e["network"]) for seq, e in json.loads(run.text))
            assert run.events == len(pairs) and run.last == (pairs[-1][0] if pairs else None)
            return pairs, run.events, run.last, run.star, run.read
        assert read(0, 4, 500) == ([(1, "203.0.113.1/32"), (2, "203.0.113.3/32"), (3, "203.0.113.4/32"),
                                    (4, "203.0.113.5/32")], 4, 4, None, 4)
        assert read(1, 3, 500)[0] == [(2, "203.0.113.3/32"), (3, "203.0.113.4/32")]
        assert read(1, 4, 2)[0] == [(2, "203.0.113.3/32"), (3, "203.0.113.4/32")]
        assert read(4, 4, 500) == ([], 0, None, None, 0)
        assert read(2, w.outbox_committed, 500) == ([(3, "203.0.113.4/32"), (4, "203.0.113.5/32")], 2, 4, 5, 4)
        assert read(4, w.outbox_committed, 500) == ([], 0, None, 5, 2)
        assert json.loads(reader.event(5))["owner"] == "*"
        assert read(5, w.outbox_committed, 500) == ([(6, "203.0.113.7/32")], 1, 6, None, 1)
        assert json.loads(reader.run(0, 1, 1).text)[0][1] == outbox(h)[0]  # the row's event, field for field
    finally:
        reader.close()


# -- the worker: remote events ------------------------------------------------------------------------------------


def test_a_remote_block_is_a_claim_of_its_node_and_moves_the_cursor_with_it(h: Harness) -> None:
    w = fleet_worker(h)
    result = h.run(w, FleetApply((remote("block", "203.0.113.7/32", expires_at=T0 + 60),), "7-0", 7))
    assert (result.applied, result.skipped) == (1, 0)
    [e] = h.run(w, ListChain("f2b-web"))
    assert e.all_claims == (Claim("b/ops", T0, T0 + 60, "b"),) and e.created_by == "b/ops"
    assert ("f2b-web", net("203.0.113.7/32"), None) in h.backend.kernel
    assert h.store.fleet_state()["cursor"] == "7-0" and w.remote_claims == 1
    assert outbox(h) == []  # a remote event is not published again
    assert h.stored().entries == [e]


def test_a_local_owner_cannot_release_a_remote_claim_of_the_same_name(h: Harness) -> None:
    """Local user `b` with label `ops` owns `b/ops`, like node b's user ops: two claims, each released alone."""
    w = fleet_worker(h)
    h.run(w, FleetApply((remote("block", "203.0.113.7/32"),), "1-0", 1))
    h.run(w, block(SHARED, "203.0.113.7/32", actor="b", owner="b/ops"))
    [e] = h.run(w, ListChain("f2b-web"))
    assert sorted((c.owner, c.node) for c in e.all_claims) == [("b/ops", ""), ("b/ops", "b")]
    h.run(w, unblock(SHARED, "203.0.113.7/32", actor="b", owner="b/ops"))
    [e] = h.run(w, ListChain("f2b-web"))
    assert [(c.owner, c.node) for c in e.all_claims] == [("b/ops", "b")]
    h.run(w, FleetApply((remote("unblock", "203.0.113.7/32"),), "2-0", 2))
    assert h.run(w, ListChain("f2b-web")) == [] and w.remote_claims == 0


def test_an_unblock_event_removes_exactly_its_claim_and_star_every_claim(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.7/32"))
    h.run(w, FleetApply((remote("block", "203.0.113.7/32"), remote("block", "203.0.113.7/32", node="c")), "2-0", 2))
    h.run(w, FleetApply((remote("unblock", "203.0.113.7/32", node="c"),), "3-0", 3))
    [e] = h.run(w, ListChain("f2b-web"))
    assert sorted((c.owner, c.node) for c in e.all_claims) == [("admin", ""), ("b/ops", "b")]
    h.run(w, FleetApply((remote("unblock", "203.0.113.7/32", node="c", owner="*"),), "4-0", 4))
    assert h.run(w, ListChain("f2b-web")) == []
    assert ("f2b-web", net("203.0.113.7/32"), None) not in h.backend.kernel


def test_remote_events_for_a_chain_not_shared_here_or_already_expired_are_skipped(h: Harness) -> None:
    w = fleet_worker(h)
    result = h.run(w, FleetApply((remote("block", "203.0.113.7/32", chain="f2b-ssh"),
                                  remote("block", "203.0.113.8/32", expires_at=T0 - 1)), "9-0", 9))
    assert (result.applied, result.skipped) == (0, 2)
    assert h.run(w, ListChain("f2b-ssh")) == [] and h.run(w, ListChain("f2b-web")) == []
    assert h.store.fleet_state()["cursor"] == "9-0"


def test_a_remote_claim_expires_at_its_absolute_time(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, FleetApply((remote("block", "203.0.113.7/32", expires_at=T0 + 30),), "1-0", 1))
    h.clock.now = T0 + 31
    h.run(w, block(SSH, "203.0.113.99/32"))  # a batch after the expiry is due
    h.run(w, ListChain("f2b-web"))
    assert h.run(w, ListChain("f2b-web")) == []


def test_resync_replaces_the_remote_claims_and_keeps_the_local_ones(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.1/32"))
    h.run(w, FleetApply((remote("block", "203.0.113.1/32"), remote("block", "203.0.113.2/32")), "2-0", 2))
    snapshot = (remote("block", "203.0.113.3/32", node="c"), remote("block", "203.0.113.4/32", expires_at=T0 - 5))
    h.run(w, FleetResync(snapshot, "10-0", 10))
    listed = {str(e.network): sorted((c.owner, c.node) for c in e.all_claims) for e in h.run(w, ListChain("f2b-web"))}
    assert listed == {"203.0.113.1/32": [("admin", "")], "203.0.113.3/32": [("c/ops", "c")]}
    state = h.store.fleet_state()
    assert state["cursor"] == "10-0" and float(state["last_resync"]) == T0
    assert outbox(h)[-1]["network"] == "203.0.113.1/32"  # nothing announced again in a plain resync
    assert len(outbox(h)) == 1


def test_resync_after_redis_lost_its_data_keeps_remote_claims_and_announces_the_local_ones(h: Harness) -> None:
    w = fleet_worker(h)
    h.run(w, block(SHARED, "203.0.113.1/32", T0 + 600))
    h.run(w, FleetApply((remote("block", "203.0.113.2/32"),), "2-0", 2))
    h.run(w, FleetResync((), "0-0", 0, keep=True))
    listed = {str(e.network) for e in h.run(w, ListChain("f2b-web"))}
    assert listed == {"203.0.113.1/32", "203.0.113.2/32"}
    announced = outbox(h)[1:]
    assert [(e["op"], e["network"], e["owner"], float(e["expires_at"])) for e in announced] == [
        ("block", "203.0.113.1/32", "admin", T0 + 600)]


def test_a_resync_sees_the_changes_of_its_own_batch_before_it(h: Harness) -> None:
    """The resync walks the store's entries as it goes (no list of them all): a block earlier in the same batch, not
    in the store yet, and an unblock of a stored one must be seen as that batch has them."""
    from webiptd.firewall.worker import Worker

    first = fleet_worker(h)
    h.run(first, block(SHARED, "203.0.113.5/32"))
    first.stop(timeout=WAIT)
    w = Worker(h.backend, h.store, (SHARED, SSH), clock=h.clock, node="a")
    h.workers.append(w)
    new = w.submit(block(SHARED, "203.0.113.6/32"))
    gone = w.submit(unblock(SHARED, "203.0.113.5/32"))
    snapshot = (remote("block", "203.0.113.6/32", node="c"), remote("block", "203.0.113.7/32", node="c"))
    resync = w.submit(FleetResync(snapshot, "10-0", 10))
    w.start(timeout=WAIT)  # the three in the worker's first batch
    assert new.result(WAIT).created and gone.result(WAIT).deleted and resync.result(WAIT).applied == 2
    listed = {str(e.network): sorted((c.owner, c.node) for c in e.all_claims) for e in h.run(w, ListChain("f2b-web"))}
    assert listed == {"203.0.113.6/32": [("admin", ""), ("c/ops", "c")], "203.0.113.7/32": [("c/ops", "c")]}


# -- the events' parser -------------------------------------------------------------------------------------------


def test_an_outside_producers_event_is_node_redis_with_the_stream_time() -> None:
    change = parse_event("1700000000000-3", {"op": "block", "chain": "f2b-web", "network": "203.0.113.7/32",
                                             "timeout": "600", "owner": "ops"})
    assert (change.node, change.claim_owner, change.created_at, change.expires_at, change.event_id) == (
        "redis", "redis/ops", T0, T0 + 600, "1700000000000-3")


@pytest.mark.parametrize("fields, why", [
    ({"op": "ban"}, "op"),
    ({"chain": "a b"}, "chain"),
    ({"network": "203.0.113.7/24"}, "host bits"),
    ({"owner": "*"}, "unblock only"),
    ({"owner": "a/b/c"}, "owner"),
    ({"node": "-x"}, "node"),
    ({"timeout": "60", "expires_at": "1"}, "not both"),
    ({"timeout": "-2"}, "timeout"),
    ({"expires_at": "nan"}, "expires_at"),
    ({"port": "22"}, "proto"),
    ({"colour": "red"}, "unknown field"),
    ({"network": "1" * 300}, "longer"),
])
def test_a_malformed_event_says_why(fields: dict[str, str], why: str) -> None:
    event = {"op": "block", "chain": "f2b-web", "network": "203.0.113.7/32", "owner": "ops", **fields}
    with pytest.raises(Malformed, match=why):
        parse_event("1-0", event)


def test_refusals_follow_this_hosts_config(tmp_path: Path) -> None:
    cfg = config_mod.from_mapping(minimal(tmp_path, never_block=["203.0.113.0/28"]), tmp_path / "c.yaml")
    ok = parse_event("1-0", {"op": "block", "chain": "f2b-web", "network": "203.0.113.77/32", "owner": "o"})
    assert refusal(cfg, ok) is None
    assert "never_block" in (refusal(cfg, dataclasses.replace(ok, network=net("203.0.113.5/32"))) or "")
    assert "not shared" in (refusal(cfg, dataclasses.replace(ok, chain="other")) or "")
    assert snapshot_field("a", "o", "c", "n", "", "") == '["a","o","c","n","",""]'


# -- the config ---------------------------------------------------------------------------------------------------


def minimal(tmp_path: Path, **top: Any) -> dict[str, Any]:
    return {"plain_http": True, "listen": "127.0.0.1:8820", "state_dir": str(tmp_path), "log": {"file": None},
            "chains": {"f2b-web": {"backend": "ipset", "shared": True}, "other": {}},
            "fleet": {"redis": "redis://fw1:s3cret-pw@10.0.0.5:6379/0", "node": "fw1"}, **top}


def problems(tmp_path: Path, **changes: Any) -> list[str]:
    raw = minimal(tmp_path)
    raw["fleet"] = {**raw["fleet"], **changes}
    try:
        config_mod.from_mapping(raw, tmp_path / "c.yaml")
    except ConfigError as exc:
        return exc.problems
    return []


def test_the_fleet_section_loads_with_its_defaults(tmp_path: Path) -> None:
    cfg = config_mod.from_mapping(minimal(tmp_path), tmp_path / "c.yaml")
    assert cfg.fleet is not None
    assert (cfg.fleet.node, cfg.fleet.key_prefix, cfg.fleet.retention) == ("fw1", "web-ipt-d:", 604800)
    assert cfg.fleet.redis_display == "redis://10.0.0.5:6379/0"
    assert "s3cret" not in repr(cfg.fleet) and cfg.chains["f2b-web"].shared and not cfg.chains["other"].shared


@pytest.mark.parametrize("changes, key", [
    ({"redis": "http://x"}, "fleet.redis"),
    ({"redis": "redis://u:s3cret-pw@h:99999/0"}, "fleet.redis"),
    ({"redis": "redis://u:s3cret-pw@h:6379/zero"}, "fleet.redis"),
    ({"redis": "redis://a:1,b:2/0"}, "fleet.redis"),
    ({"redis": "sentinel://u:s3cret-pw@a:26379,b:26379"}, "fleet.redis"),
    ({"redis": None}, "fleet.redis"),
    ({"node": "redis"}, "fleet.node"),
    ({"node": "a b"}, "fleet.node"),
    ({"key_prefix": "web*"}, "fleet.key_prefix"),
    ({"retention": 10}, "fleet.retention"),
    ({"redis_ca": "/nonexistent/ca.pem"}, "fleet.redis_ca"),
    ({"unknown": 1}, "fleet.unknown"),
])
def test_every_fleet_key_is_checked_at_load_and_the_url_is_never_shown(tmp_path: Path, changes: dict[str, Any],
                                                                      key: str) -> None:
    found = problems(tmp_path, **changes)
    assert found and all(p.startswith(key) for p in found), found
    assert not any("s3cret" in p for p in found), found


def test_good_urls_of_every_kind_load(tmp_path: Path) -> None:
    for url in ("rediss://h:6380/1", "unix:///run/redis/redis.sock?db=2", "sentinel://u:p@a:26379,b/mymaster/0",
                "redis://[2001:db8::5]:6379/0"):
        assert problems(tmp_path, redis=url) == [], url


def test_shared_needs_a_fleet_section(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    del raw["fleet"]
    with pytest.raises(ConfigError, match="chains.f2b-web.shared: needs the fleet section"):
        config_mod.from_mapping(raw, tmp_path / "c.yaml")


def test_check_config_shows_the_fleet_without_its_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from webiptd.cli import check_config
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(tmp_path)))
    check_config(path)
    out = capsys.readouterr()
    assert "  chain f2b-web: backend ipset, target DROP, hooks INPUT, shared\n" in out.out
    assert ("  fleet: node fw1, redis redis://10.0.0.5:6379/0, key prefix 'web-ipt-d:', retention 604800 s\n"
            in out.out)
    assert "s3cret" not in out.out + out.err
