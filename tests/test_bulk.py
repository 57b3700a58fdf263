"""POST /chain/<chain>: a JSON list of addresses blocked in one group commit, with a result per item.

A bad item never aborts the good ones; a bad request as a whole changes nothing.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.root


def post(d: Daemon, chain: str, items: object, query: str = "", user: str = "admin",
         raw: bytes | None = None) -> object:
    body = raw if raw is not None else json.dumps(items).encode()
    return d.request("POST", f"/chain/{chain}{query}", user=user, body=body,
                     headers={"Content-Type": "application/json"})


@pytest.mark.backends
def test_mixed_list_reports_each_item_and_applies_the_good_ones(running: Daemon) -> None:
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.1").status == 201
    items = ["203.0.113.1", "203.0.113.2", "203.0.113.64/26", "2001:db8:ffff::/48", "2001:db8:ffff:1::7",
             "203.0.113.7/24", "999.1.1.1", "127.0.0.1", "198.51.100.0/24", 42, "203.0.113.2", "::ffff:1.2.3.4"]
    r = post(d, "f2b-web", items, "?timeout=600")
    assert r.status == 200, r
    body = r.json
    assert body["chain"] == "f2b-web"
    statuses = [res["status"] for res in body["results"]]
    assert statuses == [200, 201, 201, 201, 201, 400, 400, 409, 409, 400, 200, 400]
    assert (body["created"], body["existing"], body["failed"]) == (4, 2, 6)
    assert body["results"][5]["error"] == "bad_address" and "203.0.113.0/24" in body["results"][5]["message"]
    assert body["results"][7]["error"] == "never_block"
    assert body["results"][9]["item"] is None
    created = body["results"][1]["entry"]
    assert created["network"] == "203.0.113.2/32" and created["expires_at"] is not None
    assert created["created_by"] == "admin"
    assert d.kernel_entries("f2b-web", 4) == {"203.0.113.1/32", "203.0.113.2/32", "203.0.113.64/26"}
    assert d.kernel_entries("f2b-web", 6) == {"2001:db8:ffff::/48", "2001:db8:ffff:1::7/128"}
    listed = {e["network"] for e in d.request("GET", "/chain/f2b-web").json["entries"]}
    assert listed == {"203.0.113.1/32", "203.0.113.2/32", "203.0.113.64/26", "2001:db8:ffff::/48",
                      "2001:db8:ffff:1::7/128"}
    # one audit line for the PUT and one per item the worker applied (six, one a duplicate)
    assert d.log().count("action=block chain=f2b-web") == 7


def test_a_thousand_items_in_one_request(running: Daemon) -> None:
    d = running
    items = [f"203.0.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    r = post(d, "f2b-ssh", items)
    assert r.status == 200 and r.json["created"] == 1000, r
    assert len(d.chain_rules("f2b-ssh")) == 1000
    assert all(rule.endswith("-j REJECT --reject-with icmp-port-unreachable") for rule in d.chain_rules("f2b-ssh"))


@pytest.mark.parametrize("raw, status, code", [
    (b"", 400, "bad_body"),
    (b"not json", 400, "bad_body"),
    (b'{"items": ["203.0.113.9"]}', 400, "bad_body"),
    (b"[]", 400, "bad_body"),
    (b'"203.0.113.9"', 400, "bad_body"),
    (b'["203.0.113.9"\xff]', 400, "bad_body"),
    (b"[" * 1100 + b"]" * 1100, 400, "bad_body"),  # deeper than the JSON decoder recurses
    (b'[{"a":' * 1000 + b"1" + b"}]" * 1000, 400, "bad_body"),
])
def test_bad_bodies_change_nothing(running: Daemon, raw: bytes, status: int, code: str) -> None:
    d = running
    before = d.rules(4) + d.rules(6)
    r = post(d, "f2b-web", None, raw=raw)
    assert (r.status, r.json["error"]) == (status, code), r
    assert d.rules(4) + d.rules(6) == before


def test_limits_and_permissions(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 3
    d.start()
    before = d.rules(4) + d.rules(6)
    r = post(d, "f2b-web", ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.4"])
    assert (r.status, r.json["error"]) == (413, "too_large")
    # The body limit follows the item limit: far more bytes than 3 items need is refused before parsing.
    r = post(d, "f2b-web", None, raw=b"[" + b'"203.0.113.1",' * 1000 + b'"203.0.113.2"]')
    assert r.status == 413
    assert post(d, "f2b-web", ["203.0.113.1"], user="reader").status == 403
    assert post(d, "admin-list", ["203.0.113.1"], user="f2b").status == 403
    assert post(d, "no-such-chain", ["203.0.113.1"]).status == 404
    for query in ("?timeout=abc", "?foo=1", "?timeout=-7"):
        assert post(d, "f2b-web", ["203.0.113.1"], query).status == 400
    assert d.rules(4) + d.rules(6) == before
    r = post(d, "f2b-web", ["203.0.113.1", "203.0.113.2", "203.0.113.3"], "?timeout=-1")
    assert r.status == 200 and r.json["created"] == 3
    assert all(res["entry"]["expires_at"] is None for res in r.json["results"])


def test_expect_100_continue_is_answered_before_the_body(running: Daemon) -> None:
    # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits for the interim answer.
    import base64
    d = running
    body = json.dumps([f"203.0.113.{i}" for i in range(1, 101)]).encode()
    raw = d.ns.connect("127.0.0.1", 8820, timeout=5)
    conn = d.context().wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        token = base64.b64encode(b"admin:admin-pw").decode()
        conn.sendall((f"POST /chain/f2b-web HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                      f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode())
        conn.settimeout(2)  # without the interim answer this times out
        interim = conn.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        conn.sendall(body)
        conn.settimeout(10)
        reply = b""
        while b'"failed"' not in reply:
            chunk = conn.recv(65536)
            assert chunk, reply
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 ") and b'"created":100' in reply
    finally:
        conn.close()
