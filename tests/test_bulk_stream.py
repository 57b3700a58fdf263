"""POST /chain/<chain> streamed: text/plain and JSON parsed as the body arrives, applied in batches of 10,000,
checked before the body is read, a failure half-way, a body cut off, and the daemon's memory under a large load."""

from __future__ import annotations

import base64
import json
import re
import select
import time
from typing import Any

import pytest

from tests.conftest import PORT, Daemon

pytestmark = pytest.mark.root


def post(d: Daemon, chain: str, body: bytes, content_type: str = "text/plain", query: str = "",
         user: str = "admin") -> Any:
    return d.request("POST", f"/chain/{chain}{query}", user=user, body=body, headers={"Content-Type": content_type},
                     conn=d.connection(timeout=300) if len(body) > 100_000 else None)


def hosts(n: int, start: int = 0) -> list[str]:
    """n distinct IPv4 hosts in 198.18.0.0/15 (benchmarking space: never contacted)."""
    return [f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(start, start + n)]


def vmhwm(pid: int) -> int:
    """The process's peak resident set, in KiB (proc(5))."""
    text = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1))  # type: ignore[union-attr]


def test_text_plain_with_comments_blank_lines_crlf_and_bad_lines(running: Daemon) -> None:
    d = running
    body = (b"# FireHOL-style header\r\n"
            b"\r\n"
            b"203.0.113.1\r\n"
            b"  203.0.113.64/26   # a comment after the item\n"
            b"999.1.1.1\n"            # line 5: bad
            b"\t\n"
            b"127.0.0.1\n"            # line 7: never_block
            b"2001:db8:ffff::/48\n"
            b"203.0.113.9 proto=tcp port=22\n"   # line 9: a scope the query does not name
            b"203.0.113.1")           # line 10: a duplicate, without a final line end
    r = post(d, "f2b-web", body, "text/plain; charset=utf-8", "?timeout=600")
    assert r.status == 200, r
    j = r.json
    assert (j["created"], j["existing"], j["failed"]) == (3, 1, 3)
    assert [(f["line"], f["status"], f["error"]) for f in j["failures"]] == [
        (5, 400, "bad_address"), (7, 409, "never_block"), (9, 400, "bad_address")]
    assert [res["status"] for res in j["results"]] == [201, 201, 400, 409, 201, 400, 200]
    assert d.kernel_entries("f2b-web", 4) == {"203.0.113.1/32", "203.0.113.64/26"}
    assert d.kernel_entries("f2b-web", 6) == {"2001:db8:ffff::/48"}
    # The scoped line goes in with its scope named in the query.
    r = post(d, "f2b-web", b"203.0.113.9 proto=tcp port=22\n", query="?proto=tcp&port=22")
    assert r.status == 200 and r.json["created"] == 1, r


def test_json_streamed_in_small_pieces_keeps_per_item_results(running: Daemon) -> None:
    d = running
    items = ["203.0.113.5", 7, {"a": [1, 2]}, "203.0.113.6", None, "2001:db8:1::1"]
    raw = json.dumps(items).encode()
    conn = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=10), server_hostname="127.0.0.1")
    try:
        token = base64.b64encode(b"admin:admin-pw").decode()
        conn.sendall((f"POST /chain/f2b-web HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode())
        for i in range(0, len(raw), 5):  # the tokenizer sees strings and values cut at any byte
            conn.sendall(raw[i:i + 5])
            time.sleep(0.005)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            assert chunk, reply
            reply += chunk
    finally:
        conn.close()
    j = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert [res["status"] for res in j["results"]] == [201, 400, 400, 201, 400, 201]
    assert [f["index"] for f in j["failures"]] == [1, 2, 4]
    assert (j["created"], j["existing"], j["failed"]) == (3, 0, 3)


def test_more_than_ten_thousand_items_get_counts_and_the_first_100_failures(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 30_000
    d.config["chains"]["f2b-web"]["backend"] = "ipset"
    d.start()
    lines = hosts(25_000)
    for i in range(0, 25_000, 100):
        lines[i] = f"bad-{i}"  # 250 bad lines
    r = post(d, "f2b-web", "\n".join(lines).encode())
    assert r.status == 200, r
    j = r.json
    assert "results" not in j
    assert (j["created"], j["existing"], j["failed"]) == (24_750, 0, 250)
    assert len(j["failures"]) == 100 and j["failures"][0]["line"] == 1 and j["failures"][99]["line"] == 9901
    assert len(d.kernel_entries("f2b-web", 4)) == 24_750
    # one audit line a batch, not one an entry: the first 10,000 lines, then the rest (batches of up to 100,000)
    assert d.log().count("action=bulk_block chain=f2b-web") == 2
    # Over the item limit: 413, with what was applied before it (the first batch; the second was not full yet).
    r = post(d, "f2b-web", "\n".join(hosts(30_001, 100_000)).encode())
    assert r.status == 413 and r.json["error"] == "too_large", r
    assert r.json["applied_through"] == 10_000 and r.json["created"] == 10_000


def test_a_failure_half_way_keeps_the_batches_before(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 50_000
    d.config["chains"]["f2b-web"].update(backend="ipset", maxelem=25_000)
    d.start()
    r = post(d, "f2b-web", json.dumps(hosts(40_000)).encode(), "application/json")
    assert r.status == 507 and r.json["error"] == "firewall_full", r
    j = r.json
    # The first 10,000 items, then the other 30,000 in one batch, which does not fit.
    assert j["applied_through"] == 9_999 and j["created"] == 10_000, j  # JSON: the index of the last applied
    assert len(d.kernel_entries("f2b-web", 4)) == 10_000
    listed = d.request("GET", "/chain/f2b-web?limit=5000").json
    assert len(listed["entries"]) == 5_000 and listed["next"]


def test_unauthenticated_and_refused_posts_are_answered_without_reading_the_body(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 1_000_000  # a body of up to 64 MB may come
    d.start()
    for token, status in ((None, 401), ("admin:wrong", 401), ("reader:reader-pw", 403)):
        conn = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=10), server_hostname="127.0.0.1")
        try:
            auth = "" if token is None else f"Authorization: Basic {base64.b64encode(token.encode()).decode()}\r\n"
            conn.sendall((f"POST /chain/f2b-web HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: text/plain\r\n"
                          f"Content-Length: {15 << 20}\r\n\r\n203.0.113.1\n").encode())
            conn.settimeout(5)  # the rest of the 15 MB never comes: the answer must not wait for it
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = conn.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply
            assert b"Connection: close" in reply
        finally:
            conn.close()
    assert d.kernel_entries("f2b-web", 4) == set()


@pytest.mark.parametrize("content_type", ["application/xml", "text/plain; charset=latin-1", "multipart/form-data"])
def test_other_media_types_are_415(running: Daemon, content_type: str) -> None:
    r = post(running, "f2b-web", b"203.0.113.1\n", content_type)
    assert (r.status, r.json["error"]) == (415, "unsupported_media_type"), r
    assert running.kernel_entries("f2b-web", 4) == set()


def test_a_body_cut_off_mid_way_keeps_what_was_applied(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 100_000
    d.config["chains"]["f2b-web"]["backend"] = "ipset"
    d.start()
    body = "\n".join(hosts(25_000)).encode() + b"\n"
    conn = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=30), server_hostname="127.0.0.1")
    started = time.monotonic()
    try:
        token = base64.b64encode(b"admin:admin-pw").decode()
        conn.sendall((f"POST /chain/f2b-web HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: {len(body) + 1000}\r\n\r\n").encode())
        conn.sendall(body)  # 1,000 bytes short, then silence: the body deadline cuts it
        reply = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    except OSError:
        pass
    finally:
        conn.close()
    assert time.monotonic() - started < 20
    # The first batch stays (lines 1 to 10,000); the second, cut off, was not applied.
    deadline = time.monotonic() + 5
    while len(d.kernel_entries("f2b-web", 4)) != 10_000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(d.kernel_entries("f2b-web", 4)) == 10_000
    if reply:  # admission may have shut the socket before the answer
        assert b" 400 " in reply.split(b"\r\n", 1)[0] and b'"applied_through":10000' in reply, reply[:400]


def test_a_trickling_body_is_cut(running: Daemon) -> None:
    d = running
    conn = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=30), server_hostname="127.0.0.1")
    started = time.monotonic()
    cut = False
    try:
        token = base64.b64encode(b"admin:admin-pw").decode()
        conn.sendall((f"POST /chain/f2b-web HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                      f"Content-Type: text/plain\r\nContent-Length: 100000\r\n\r\n").encode())
        # A byte every 0.2 s: each read gets its byte in time, but the minimum rate is not kept.
        while time.monotonic() - started < 20 and not cut:
            try:
                conn.sendall(b"#")
                if select.select([conn], [], [], 0.2)[0]:
                    cut = True  # an answer, or the end of the connection
            except OSError:
                cut = True
    finally:
        conn.close()
    # request_timeout is 3 s in the tests: cut soon after, far before the 20 s the trickle would take
    assert cut and time.monotonic() - started < 10


def test_a_large_text_load_keeps_the_daemon_small(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["max_bulk_items"] = 200_000
    d.config["limits"]["worker_timeout"] = 30
    d.config["chains"]["f2b-web"]["backend"] = "ipset"
    d.start()
    before = vmhwm(d.pid)
    body = "\n".join(hosts(100_000)).encode()
    started = time.monotonic()
    r = post(d, "f2b-web", body)
    took = time.monotonic() - started
    assert r.status == 200 and r.json["created"] == 100_000, r
    body = "\n".join(hosts(200_000, 100_000)).encode()
    r = post(d, "f2b-web", body)
    assert r.status == 200 and r.json["created"] == 200_000, r
    after = vmhwm(d.pid)
    print(f"\n100k lines: {took:.2f} s ({100_000 / took:.0f} lines/s); VmHWM {before} kB before, {after} kB after "
          f"300k entries (ipset)")
    # Generous: a body held whole, with a list of its items, would be several hundred MB.
    assert after - before < 200_000
