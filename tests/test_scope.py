"""Ports and protocols without a kernel: fail2ban's port format, the canonical scope that makes an entry's identity,
how the blocks with port lists of one address share one kernel atom, the query parameters at the HTTP edge (every bad
one a 400 that submits nothing), and the worker's ops and listing for scoped blocks (RecordingBackend)."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from tests.test_parsing import CLIENT, NOW, Client, RecordingWorker, make_config
from tests.test_worker_logic import T0, WEB, Harness, entry
from webiptd.commands import Block, Blocked, BulkBlock, Entry, ListChain, Lookup, Unblock
from webiptd.config import from_mapping
from webiptd.firewall.ops import Add, Remove
from webiptd.firewall.worker import group_atom
from webiptd.scope import Scope, parse_scope, stored_scope

net = ipaddress.ip_network
TCP22 = Scope("tcp", ((22, 22),))


@pytest.fixture
def call(tmp_path: Path) -> Client:
    return Client(tmp_path)


# -- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("proto, port, expected", [
    (None, None, None),
    ("all", None, None),
    ("tcp", None, Scope("tcp")),
    ("TCP", None, Scope("tcp")),
    ("udp", "53", Scope("udp", ((53, 53),))),
    ("tcp", "22,80", Scope("tcp", ((22, 22), (80, 80)))),
    ("tcp", "80,22", Scope("tcp", ((22, 22), (80, 80)))),        # order does not make another entry
    ("tcp", "22,23,24", Scope("tcp", ((22, 24),))),             # touching ports are one range
    ("tcp", "8000:8100,8050:8200", Scope("tcp", ((8000, 8200),))),
    ("tcp", "ssh", TCP22),                                      # /etc/services
    ("tcp", "http,https", Scope("tcp", ((80, 80), (443, 443)))),
    ("tcp", "ssh:http", Scope("tcp", ((22, 80),))),
    ("tcp", "0:65535", Scope("tcp")),                           # fail2ban's default port: every port
    ("sctp", "1:65535", Scope("sctp", ((1, 65535),))),
    ("dccp", "5004", Scope("dccp", ((5004, 5004),))),
    ("udplite", " 9 ", Scope("udplite", ((9, 9),))),
])
def test_parse_scope(proto: str | None, port: str | None, expected: Scope | None) -> None:
    assert parse_scope(proto, port) == expected


@pytest.mark.parametrize("proto, port, fragment", [
    (None, "22", "port needs proto"),
    ("all", "22", "proto=all covers every port"),
    ("icmp", None, "unknown protocol"),
    ("", None, "unknown protocol"),
    ("tcp", "", "empty item"),
    ("tcp", "22,", "empty item"),
    ("tcp", "65536", "out of range"),
    ("tcp", "99999", "out of range"),
    ("tcp", "00022", "neither a port number nor a service name"),
    ("tcp", "80:22", "ends before it starts"),
    ("tcp", "22:", "neither a port number"),
    ("tcp", "no-such-service", "unknown service"),
    ("udp", "ssh", "unknown service 'ssh' for udp"),            # Debian lists ssh for tcp only
    ("tcp", "-1", "neither a port number"),
    ("tcp", ",".join(["22"] * 101), "at most 100 items"),
])
def test_parse_scope_rejects_with_a_sentence(proto: str | None, port: str | None, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_scope(proto, port)


@pytest.mark.parametrize("scope", [Scope("tcp"), TCP22, Scope("udp", ((53, 53), (5353, 6000))),
                                   Scope("sctp", ((0, 0), (65535, 65535)))])
def test_the_stored_form_round_trips(scope: Scope) -> None:
    assert stored_scope(scope.proto, scope.port_text) == scope
    assert stored_scope("", "") is None


@pytest.mark.parametrize("proto, ports", [("tcp", "22,22"), ("tcp", "80,22"), ("tcp", "22:23,24"), ("", "22"),
                                          ("icmp", ""), ("tcp", "x")])
def test_a_stored_scope_not_in_its_canonical_form_is_refused(proto: str, ports: str) -> None:
    with pytest.raises(ValueError):
        stored_scope(proto, ports)


def test_texts_and_counts() -> None:
    scope = Scope("tcp", ((22, 22), (80, 90)))
    assert (str(scope), scope.port_text, scope.port_count) == ("tcp/22,80:90", "22,80:90", 12)
    assert (str(Scope("udp")), Scope("udp").port_count) == ("udp", 65536)


# -- one kernel atom for the port lists of one address -------------------------------------------


def test_the_atom_of_a_group_is_the_union_until_the_latest_expiry() -> None:
    a = entry(WEB, "203.0.113.1/32", expires_at=T0 + 60, scope=TCP22)
    b = entry(WEB, "203.0.113.1/32", expires_at=T0 + 600, scope=Scope("tcp", ((22, 22), (80, 80))))
    atom = group_atom([a, b])
    assert atom is not None
    assert (atom.scope, atom.expires_at, atom.target) == (Scope("tcp", ((22, 22), (80, 80))), T0 + 600, "DROP")
    permanent = entry(WEB, "203.0.113.1/32", scope=Scope("tcp", ((443, 443),)))
    atom = group_atom([a, permanent])
    assert atom is not None and atom.expires_at is None and atom.scope == Scope("tcp", ((22, 22), (443, 443)))
    assert group_atom([]) is None


# -- the HTTP edge ---------------------------------------------------------------------------------------


def scoped_answer(cmd: Any) -> Any:
    if isinstance(cmd, Block):
        return Blocked(True, Entry(cmd.chain.name, cmd.network, cmd.chain.target, NOW, cmd.expires_at, cmd.actor,
                                   (), cmd.scope))
    return RecordingWorker.default_answer(cmd)


def test_put_with_proto_and_port_submits_a_scoped_block(tmp_path: Path) -> None:
    call = Client(tmp_path, RecordingWorker(scoped_answer))
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=ssh%2Chttp&timeout=600&owner=sshd")
    assert r.status == 201, r
    cmd = call.worker.commands[0]
    assert isinstance(cmd, Block)
    assert (cmd.scope, cmd.owner, cmd.expires_at) == (Scope("tcp", ((22, 22), (80, 80))), "admin/sshd", NOW + 600)
    assert (r.body["proto"], r.body["port"]) == ("tcp", "22,80")


def test_delete_and_get_name_the_scoped_entry(call: Client) -> None:
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?proto=udp&port=53:54&owner=x").status == 200
    assert call("GET", "/chain/f2b-web/ipv4/203.0.113.9?port=22&proto=tcp").status == 404
    unblock, lookup = call.worker.commands
    assert isinstance(unblock, Unblock) and unblock.scope == Scope("udp", ((53, 54),))
    assert isinstance(lookup, Lookup) and lookup.scope == TCP22
    r = call("GET", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22")
    assert "not blocked for tcp/22" in r.body["message"]


def test_a_bulk_post_scopes_every_item(tmp_path: Path) -> None:
    seen: list[Any] = []

    def answer(cmd: Any) -> Any:
        seen.append(cmd)
        return [Blocked(True, Entry(cmd.chain.name, n, "DROP", NOW, None, cmd.owner, (), cmd.scope))
                for n in cmd.networks]

    call = Client(tmp_path, RecordingWorker(answer))
    r = call.app.handle("POST", "/chain/f2b-web?proto=tcp&port=25", "Basic " +
                        base64.b64encode(b"f2b:f2b-pw").decode(), CLIENT, body=b'["203.0.113.9", "203.0.113.10"]')
    assert r.status == 200, r
    assert isinstance(seen[0], BulkBlock) and seen[0].scope == Scope("tcp", ((25, 25),))
    assert {res["entry"]["port"] for res in r.body["results"]} == {"25"}


@pytest.mark.parametrize("method, target, fragment", [
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?port=22", "port needs proto"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=all&port=22", "proto=all"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=icmp", "unknown protocol"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=70000", "out of range"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=90:80", "ends before"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&proto=udp", "at most once"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22&port=80", "at most once"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=nosuchservice", "unknown service"),
    ("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?port=22", "port needs proto"),
    ("GET", "/chain/f2b-web/ipv4/203.0.113.9?proto=bogus", "unknown protocol"),
    ("GET", "/chain/f2b-web?proto=tcp", "a listing shows every entry"),
    ("POST", "/chain/f2b-web?port=22", "port needs proto"),
])
def test_bad_scopes_are_400_and_submit_nothing(call: Client, method: str, target: str, fragment: str) -> None:
    r = call(method, target)
    assert r.status == 400, r
    assert r.body["error"] == "bad_query" and fragment in r.body["message"], r.body
    assert call.worker.commands == []


@pytest.mark.parametrize("target", [
    "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22%2",      # broken percent-encoding
    "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22%20",     # only ',' and ':' may be encoded
    "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=" + "1" * 513,
    "/chain/f2b-web/ipv4/203.0.113.9?proto=tcp&port=22;80",
])
def test_malformed_scope_values_are_400_before_auth(call: Client, target: str) -> None:
    r = call("PUT", target, user=None)
    assert r.status == 400 and call.worker.commands == []


def ipset_client(tmp_path: Path) -> Client:
    call = Client(tmp_path, RecordingWorker(scoped_answer))
    raw = make_config(tmp_path)
    mapping: dict[str, Any] = {
        "listen": "127.0.0.1:8820", "plain_http": True, "state_dir": str(tmp_path), "log": {"file": None},
        "users": {name: {"password_hash": u.password_hash, "chains": list(u.chains), "override": u.override}
                  for name, u in raw.users.items()},
        "chains": {"f2b-set": {"hooks": ["INPUT"], "target": "DROP", "backend": "ipset"}},
    }
    config = from_mapping(mapping, tmp_path / "config.yaml")
    call.config = config
    call.runtime.generation = type(call.runtime.generation)(config, call.runtime.generation.authenticator)
    return call


@pytest.mark.parametrize("query, fragment", [
    ("proto=dccp&port=5004", "matches ports of tcp, udp, sctp, udplite only"),
    ("proto=tcp&port=1:2000", "at most 1024 ports"),
])
def test_what_ipset_cannot_hold_is_400(tmp_path: Path, query: str, fragment: str) -> None:
    call = ipset_client(tmp_path)
    r = call("PUT", f"/chain/f2b-set/ipv4/203.0.113.9?{query}")
    assert r.status == 400 and fragment in r.body["message"], r.body
    assert call.worker.commands == []
    for ok in ("proto=dccp", "proto=tcp&port=1:1024", "proto=udplite&port=9"):
        assert call("PUT", f"/chain/f2b-set/ipv4/203.0.113.9?{ok}").status == 201, ok


# -- the worker ------------------------------------------------------------------------------------------


def block(h: Harness, w: Any, address: str, scope: Scope | None, expires_at: float | None = None,
          owner: str = "") -> Blocked:
    return h.run(w, Block(WEB, net(address), expires_at, "admin", "127.0.0.1", owner, scope))


def unblock(h: Harness, w: Any, address: str, scope: Scope | None, owner: str = "") -> Any:
    return h.run(w, Unblock(WEB, net(address), "admin", "127.0.0.1", owner, False, scope))


def test_a_scoped_block_is_its_own_entry_beside_the_unscoped_one(h: Harness) -> None:
    w = h.worker()
    a = "203.0.113.1/32"
    assert block(h, w, a, None).created
    assert block(h, w, a, TCP22).created
    assert block(h, w, a, Scope("tcp")).created
    assert not block(h, w, a, TCP22).created                      # the same scope: the same entry
    listed = h.run(w, ListChain("f2b-web"))
    assert [e.scope for e in listed] == [None, Scope("tcp"), TCP22]
    assert set(h.backend.kernel) == {("f2b-web", net(a), None), ("f2b-web", net(a), Scope("tcp")),
                                     ("f2b-web", net(a), TCP22)}
    assert h.run(w, Lookup("f2b-web", net(a), Scope("udp"))) is None
    assert unblock(h, w, a, None).deleted
    assert set(h.backend.kernel) == {("f2b-web", net(a), Scope("tcp")), ("f2b-web", net(a), TCP22)}
    assert h.backend.anomalies == []


def test_port_lists_of_one_address_share_one_atom_that_follows_their_union(h: Harness) -> None:
    w = h.worker()
    a = "203.0.113.1/32"
    web = Scope("tcp", ((22, 22), (80, 80)))
    block(h, w, a, TCP22, owner="sshd")
    assert h.backend.applies[-1] == [Add("f2b-web", net(a), "DROP", None, TCP22)]
    block(h, w, a, web, owner="web")
    assert h.backend.applies[-1] == [Remove("f2b-web", net(a), "DROP", TCP22),
                                     Add("f2b-web", net(a), "DROP", None, web)]
    # The web block goes: 22 stays for sshd's.
    unblock(h, w, a, web, owner="web")
    assert h.backend.applies[-1] == [Remove("f2b-web", net(a), "DROP", web),
                                     Add("f2b-web", net(a), "DROP", None, TCP22)]
    unblock(h, w, a, TCP22, owner="sshd")
    assert h.backend.applies[-1] == [Remove("f2b-web", net(a), "DROP", TCP22)]
    assert h.backend.kernel == {} and h.backend.anomalies == []


def test_the_atom_keeps_the_latest_expiry_and_the_earlier_block_expires_on_time(h: Harness) -> None:
    h.backend.kernel_timeouts = True
    w = h.worker()
    a = "203.0.113.1/32"
    block(h, w, a, TCP22, expires_at=T0 + 600)
    block(h, w, a, Scope("tcp", ((80, 80),)), expires_at=T0 + 60)
    both = Scope("tcp", ((22, 22), (80, 80)))
    assert h.backend.applies[-1] == [Remove("f2b-web", net(a), "DROP", TCP22),
                                     Add("f2b-web", net(a), "DROP", T0 + 600, both)]
    h.clock.now = T0 + 61
    h.run(w, ListChain("f2b-web"))  # wakes the worker; the due expiry joins the batch
    assert h.backend.applies[-1] == [Remove("f2b-web", net(a), "DROP", both),
                                     Add("f2b-web", net(a), "DROP", T0 + 600, TCP22)]
    assert [e.scope for e in h.run(w, ListChain("f2b-web"))] == [TCP22]


def test_reconcile_puts_back_the_union_and_adopts_what_no_block_accounts_for(h: Harness) -> None:
    a, b = net("203.0.113.1/32"), net("203.0.113.2/32")
    h.store.write([entry(WEB, str(a), scope=TCP22), entry(WEB, str(a), scope=Scope("tcp", ((80, 80),)),
                                                                created_by="web")], [])
    # The kernel holds a's port 22 only (80 was lost), and b on udp/53, which the store does not know.
    h.backend.kernel = {("f2b-web", a, TCP22): "DROP", ("f2b-web", b, Scope("udp", ((53, 53),))): "DROP"}
    w = h.worker()
    both = Scope("tcp", ((22, 22), (80, 80)))
    assert h.backend.applies == [[Remove("f2b-web", a, "DROP", TCP22), Add("f2b-web", a, "DROP", None, both)]]
    adopted = h.run(w, Lookup("f2b-web", b, Scope("udp", ((53, 53),))))
    assert adopted is not None and adopted.created_by == "adopted"
    # A restart with everything in place changes nothing.
    h.backend.calls.clear()
    w.stop()
    h.worker()
    assert h.backend.applies == []


def test_scoped_blocks_survive_the_store(h: Harness) -> None:
    w = h.worker()
    block(h, w, "203.0.113.1/32", TCP22, expires_at=T0 + 600, owner="sshd")
    block(h, w, "203.0.113.1/32", Scope("udp"))
    w.stop()
    loaded = h.store.load()
    assert sorted((str(e.scope), e.all_claims[0].owner) for e in loaded.entries) == [("tcp/22", "sshd"),
                                                                                     ("udp", "admin")]
