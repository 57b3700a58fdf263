"""GET /chain/<chain> read from the store: pages with a stable cursor while others write, the whole chain streamed
(chunked), the text form and its re-import, HEAD, and the errors of the paging query."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.root


def hosts(n: int, start: int = 0) -> list[str]:
    return [f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(start, start + n)]


def load(d: Daemon, chain: str, items: list[str], query: str = "") -> None:
    r = d.request("POST", f"/chain/{chain}{query}", body="\n".join(items).encode(),
                  headers={"Content-Type": "text/plain"}, conn=d.connection(timeout=120))
    assert r.status == 200 and r.json["failed"] == 0, r


def pages(d: Daemon, chain: str, limit: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    after = ""
    while True:
        r = d.request("GET", f"/chain/{chain}?limit={limit}{after}")
        assert r.status == 200, r
        assert len(r.json["entries"]) <= limit
        entries += r.json["entries"]
        if r.json["next"] is None:
            return entries
        after = f"&after={r.json['next']}"


def test_paging_walks_a_chain_once_each_while_another_client_writes(running: Daemon) -> None:
    d = running
    stable = hosts(3000)
    load(d, "f2b-web", stable)
    stop = threading.Event()
    writes = [0]

    def churn() -> None:  # adds and deletes entries in another range meanwhile
        conn = d.connection()
        i = 0
        while not stop.is_set():
            net = f"203.0.113.{i % 250 + 1}"
            method = "PUT" if (i // 250) % 2 == 0 else "DELETE"
            assert d.request(method, f"/chain/f2b-web/ipv4/{net}", conn=conn).status in (200, 201)
            i += 1
            writes[0] = i
        conn.close()

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        seen = pages(d, "f2b-web", 137)
    finally:
        stop.set()
        thread.join(30)
    assert writes[0] > 10
    networks = [e["network"] for e in seen]
    assert len(networks) == len(set(networks)), "an entry came twice"
    assert {n for n in networks if n.startswith("198.")} == {f"{h}/32" for h in stable}
    assert networks == sorted(networks)  # the store's key order: the network's text


def test_stream_equals_pages_and_text_reimports_to_the_same_set(running: Daemon) -> None:
    d = running
    load(d, "f2b-web", hosts(2500), "?timeout=3600")
    load(d, "f2b-web", ["203.0.113.7", "2001:db8::/48"])
    load(d, "f2b-web", ["203.0.113.7"], "?proto=tcp&port=22,80")
    load(d, "f2b-web", ["203.0.113.8"], "?proto=udp")
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.7?owner=ops").status == 200  # two claims
    # The whole chain, chunked, without a Content-Length, equals the pages.
    conn = d.connection()
    conn.request("GET", "/chain/f2b-web", headers={"Authorization": basic_admin()})
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None
    import json
    whole = json.loads(resp.read())
    conn.close()
    assert whole["chain"] == "f2b-web"
    assert whole["entries"] == pages(d, "f2b-web", 1000)
    assert len(whole["entries"]) == 2504
    two = [e for e in whole["entries"] if e["network"] == "203.0.113.7/32" and e["proto"] is None][0]
    assert {c["owner"] for c in two["claims"]} == {"admin", "admin/ops"} and all("node" in c for c in two["claims"])
    # Each entry is exactly what a lookup shows.
    assert two == d.request("GET", "/chain/f2b-web/ipv4/203.0.113.7").json
    # The text form, one entry a line, scoped ones with their scope.
    text = d.request("GET", "/chain/f2b-web", headers={"Accept": "text/plain"})
    assert text.headers["Content-Type"].startswith("text/plain")
    lines = text.raw.decode().splitlines()
    assert len(lines) == 2504
    assert "203.0.113.7/32 proto=tcp port=22,80" in lines and "203.0.113.8/32 proto=udp" in lines
    # HEAD: the head only.
    head = d.request("HEAD", "/chain/f2b-web")
    assert head.status == 200 and head.raw == b""
    # After a cursor without a limit: the rest of the chain, streamed too.
    first = d.request("GET", "/chain/f2b-web?limit=1000").json
    rest = d.request("GET", f"/chain/f2b-web?after={first['next']}").json
    assert first["entries"] + rest["entries"] == whole["entries"] and "next" not in rest
    # Re-imported into another chain, the all-traffic lines come back; a scoped line only with its scope.
    r = d.request("POST", "/chain/admin-list", body=text.raw, headers={"Content-Type": "text/plain"})
    assert r.status == 200 and (r.json["created"], r.json["failed"]) == (2502, 2), r
    # The scoped lines (picked as with grep) go in with their scope in the query; lines without one would take it.
    for query, field in (("?proto=tcp&port=22,80", "proto=tcp port=22,80"), ("?proto=udp", "proto=udp")):
        picked = "".join(f"{line}\n" for line in lines if line.endswith(field)).encode()
        r = d.request("POST", f"/chain/admin-list{query}", body=picked, headers={"Content-Type": "text/plain"})
        assert r.status == 200 and r.json["created"] == 1, r
    again = d.request("GET", "/chain/admin-list", headers={"Accept": "text/plain"}).raw.decode().splitlines()
    assert sorted(again) == sorted(lines)


def test_expired_claims_and_entries_are_left_out(running: Daemon) -> None:
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.20?timeout=1").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.21?timeout=1").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.21?owner=long").status == 200
    time.sleep(1.5)
    listed = d.request("GET", "/chain/f2b-web?limit=10").json["entries"]
    assert [e["network"] for e in listed] == ["203.0.113.21/32"]
    assert [c["owner"] for c in listed[0]["claims"]] == ["admin/long"]


@pytest.mark.parametrize("query", ["?limit=0", "?limit=10001", "?limit=x", "?after=abc", "?limit=5&after=%%%",
                                   "?limit=5&after=abc", "?limit=5&after=W10", "?limit=5&limit=6"])
def test_bad_paging_is_400(running: Daemon, query: str) -> None:
    r = running.request("GET", f"/chain/f2b-web{query}")
    assert r.status == 400 and r.json["error"] in ("bad_query", "bad_request"), r


def basic_admin() -> str:
    from tests.harness import PASSWORDS, basic
    return basic("admin", PASSWORDS["admin"])
