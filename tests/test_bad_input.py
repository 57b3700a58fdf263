"""Bad input over real HTTPS: every case gets a 4xx JSON error, never a 500 or a traceback,
and never changes the firewall (the iptables and ip6tables rulesets are compared before and after).
"""

from __future__ import annotations

import base64
from typing import Iterator

import pytest

from tests.conftest import PASSWORDS, Daemon, Reply, assert_json_error, raw_exchange
from tests.test_api import shared  # noqa: F401  (shared is a fixture)

pytestmark = pytest.mark.root

KEPT = "/chain/f2b-web/ipv4/203.0.113.77"  # blocked before anything bad is sent; must stay blocked
KEPT6 = "/chain/f2b-web/ipv6/2001:db8:ffff::77"


def auth(user: str = "admin") -> bytes:
    return b"Authorization: Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()) + b"\r\n"


def send(d: Daemon, method: str | bytes, target: str | bytes, headers: bytes = b"", version: bytes = b"HTTP/1.1",
         user: str | None = "admin", body: bytes = b"") -> Reply:
    """One request written byte for byte (http.client would refuse or re-encode most of these)."""
    m = method.encode() if isinstance(method, str) else method
    t = target.encode() if isinstance(target, str) else target
    head = m + b" " + t + b" " + version + b"\r\nHost: 127.0.0.1\r\n" + (auth(user) if user else b"")
    return raw_exchange(d, head + headers + b"Connection: close\r\n\r\n" + body, method=m.decode("latin-1"))


def snapshot(d: Daemon) -> list[str]:
    """Every chain name and rule of the filter tables, both families, without packet counters."""
    out = d.ns.run(["sh", "-c", "iptables-legacy-save -t filter; ip6tables-legacy-save -t filter"]).stdout
    return [line.split(" ")[0] if line.startswith(":") else line
            for line in out.splitlines() if line.startswith((":", "-A "))]


@pytest.fixture(scope="module")
def prepared(shared: Daemon) -> Daemon:  # noqa: F811
    for path in (KEPT, KEPT6):
        assert shared.request("PUT", path).status == 201
    return shared


@pytest.fixture
def d(prepared: Daemon) -> Iterator[Daemon]:
    """The shared daemon; the test fails if the firewall changed while it ran."""
    before = snapshot(prepared)
    assert "-A f2b-web -s 203.0.113.77/32 -j DROP" in before
    yield prepared
    assert snapshot(prepared) == before


def bad(r: Reply, status: int | tuple[int, ...] = 400) -> Reply:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status in statuses, r
    assert_json_error(r, r.status)
    return r


# -- addresses, prefixes, families ------------------------------------------------------------------

BAD_ADDRESSES = [
    "ipv4/999.1.1.1", "ipv4/256.0.0.1", "ipv4/01.2.3.4", "ipv4/203.0.113.077", "ipv4/1.2.3", "ipv4/1.2.3.4.5",
    "ipv4/0x7f.0.0.1", "ipv4/2130706433", "ipv4/203.0.113.5.", "ipv4/-1.2.3.4", "ipv4/a.b.c.d",
    "ipv4/2001:db8:ffff::1",  # v6 in the ipv4 path
    "ipv6/203.0.113.5",  # v4 in the ipv6 path
    "ipv6/::ffff:203.0.113.5", "ipv6/::ffff:cb00:7105",  # IPv4-mapped, dotted and hex
    "ipv6/fe80::1%25eth0", "ipv6/fe80::1%eth0",  # scoped
    "ipv6/2001:db8:ffff::1::2", "ipv6/2001:db8:ffff:::1", "ipv6/gggg::1", "ipv6/2001:db8:ffff:0:0:0:0:0:1",
    "ipv6/[2001:db8:ffff::1]",
    "ipv5/203.0.113.5", "IPV4/203.0.113.5", "inet/203.0.113.5", "4/203.0.113.5", "ipv6 /2001:db8:ffff::1",
    "ipv4/203.0.113.0/0", "ipv4/0.0.0.0/0", "ipv4/203.0.113.5/33", "ipv4/203.0.113.0/024", "ipv4/203.0.113.0/abc",
    "ipv4/203.0.113.0/-1", "ipv4/203.0.113.0/+24", "ipv4/203.0.113.0/24.0", "ipv4/203.0.113.0/255.255.255.0",
    "ipv4/203.0.113.0/99999999999999999999", "ipv6/2001:db8:ffff::/129", "ipv6/2001:db8:ffff::/0",
    "ipv6/2001:db8:ffff::/048", "ipv4//24", "ipv4/203.0.113.5/",
]


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("tail", BAD_ADDRESSES)
def test_invalid_address_prefix_or_family(d: Daemon, method: str, tail: str) -> None:
    bad(send(d, method, "/chain/f2b-web/" + tail.replace(" ", "%20")))


@pytest.mark.parametrize("tail, proper", [
    ("ipv4/203.0.113.7/24", "203.0.113.0/24"),
    ("ipv4/203.0.113.77/31", "203.0.113.76/31"),
    ("ipv6/2001:db8:ffff::1/48", "2001:db8:ffff::/48"),
])
def test_host_bits_set_is_400_naming_the_network(d: Daemon, tail: str, proper: str) -> None:
    for method in ("PUT", "DELETE", "GET"):
        r = bad(d.request(method, "/chain/f2b-web/" + tail))
        assert proper in r.json["message"], r


# -- chain names -------------------------------------------------------------------------------------

BAD_CHAINS = ["a" * 29, "f2b-web" + "x" * 22, "f2b.web", "f2b:web", "f2b%20web", "f2b%2Fweb", "f2b-w%C3%A9b",
              "f2b-web%0A", "f2b-web%00", "f2b;web", "$(id)", "f2b*", "f2b-web%09", "..", "."]


@pytest.mark.parametrize("chain", BAD_CHAINS)
def test_bad_chain_name(d: Daemon, chain: str) -> None:
    for method, tail in (("GET", ""), ("PUT", "/ipv4/203.0.113.78"), ("DELETE", "/ipv4/203.0.113.77"),
                         ("GET", "/ipv4/203.0.113.77")):
        bad(send(d, method, f"/chain/{chain}{tail}"))


def test_longest_chain_name_is_valid_but_unknown(d: Daemon) -> None:
    bad(d.request("PUT", "/chain/" + "a" * 28 + "/ipv4/203.0.113.78"), 404)
    bad(d.request("GET", "/chain/" + "a" * 28), 404)


# -- query strings -----------------------------------------------------------------------------------

BAD_PUT_QUERIES = [
    "foo=1", "timeout=60&foo=1", "foo=1&timeout=60", "timeout=60&timeout=60", "timeout=60&timeout=120",
    "timeout=60&expire=60", "expire=60&expire=60", "timeout=abc", "timeout=-5", "timeout=-2", "timeout=1.5",
    "timeout=1e3", "timeout=0x10", "timeout=+60", "timeout=", "timeout", "TIMEOUT=60", "timeout=%36%30",
    "timeout=999999999999", "timeout=9999999999999999999999", "timeout=315360001", "timeout=60&", "&timeout=60",
    "&", "=", "timeout==60", "timeout=60;foo=1", "time%6Fut=60", "timeout=60?", "timeout=%00",
]


@pytest.mark.parametrize("query", BAD_PUT_QUERIES)
def test_bad_put_query(d: Daemon, query: str) -> None:
    bad(send(d, "PUT", "/chain/f2b-web/ipv4/203.0.113.79?" + query))
    # Re-blocking with a bad query does not touch the existing block either.
    bad(send(d, "PUT", KEPT + "?" + query))


@pytest.mark.parametrize("method, path", [
    ("GET", KEPT + "?timeout=60"), ("DELETE", KEPT + "?timeout=60"), ("DELETE", KEPT + "?foo=bar"),
    ("GET", KEPT + "?x=1"), ("GET", "/chain/f2b-web?x=1"), ("GET", "/chain/f2b-web?timeout=60"),
    ("GET", "/chains?x=1"), ("GET", "/version?verbose=1"), ("HEAD", "/chains?x=1"), ("DELETE", KEPT + "?expire=1"),
])
def test_unknown_query_keys_on_other_routes(d: Daemon, method: str, path: str) -> None:
    r = send(d, method, path)
    assert r.status == 400, r
    if method != "HEAD":
        bad(r)


def test_huge_but_valid_timeout_is_accepted_and_one_more_second_is_not(shared: Daemon) -> None:  # noqa: F811
    path = "/chain/admin-list/ipv4/203.0.113.80"
    assert shared.request("PUT", path + "?timeout=315360001").status == 400
    assert shared.request("GET", path).status == 404
    r = shared.request("PUT", path + "?timeout=315360000")
    assert r.status == 201 and r.json["expires_at"] is not None, r
    assert shared.request("DELETE", path).json["deleted"] is True


# -- percent-encoding and raw bytes ------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/chain/f2b-web/ipv4/203.0.113.0%2F24",  # an encoded slash is not a separator
    "/chain/f2b-web/ipv4/203.0.113.0%2f24",
    "/chain/f2b-web/ipv4/203.0.113.0%252F24",  # double encoding is decoded once only
    "/chain/f2b-web/ipv4/203.0.113.77%00",
    "/chain/f2b-web%00/ipv4/203.0.113.77",
    "/chain/f2b-web/ipv4/203.0.113.77%zz",
    "/chain/f2b-web/ipv4/203.0.113.77%",
    "/chain/f2b-web/ipv4/203.0.113.77%2",
    "/chain/f2b-web/ipv4/203.0.113.77%ff",  # not UTF-8
    "/chain/f2b-web/ipv4/203.0.113.77%c3%28",
    "/chain/f2b-web/ipv4/203.0.113.77%e2%80%8b",  # valid UTF-8, a zero-width space
    "/chain/f2b-web/ipv4/%e2%80%8b203.0.113.77",
    "/chain/f2b-web/ipv4/%EF%BC%92%EF%BC%90%EF%BC%93.0.113.77",  # fullwidth digits
    "/chain/f2b-web/ipv4/203.0.113.0/%EF%BC%92%EF%BC%94",
    "/chain/f2b-web/ipv4/203.0.113.77%0A",
    "/chain/f2b-web/ipv4/203.0.113.77%0d%0aX-Injected:%201",
    "/chain/f2b-web/ipv4/%2e%2e/%2e%2e/chains",
    "/chain/f2b-web/ipv4/203.0.113.77%3Ftimeout=1",  # an encoded '?' is not a query
    "/chain/f2b-web/ipv4/203.0.113.77%23x",
    "/chain/f2b-web/ipv6/2001:db8:ffff::77%25",
    "/chain%2Ff2b-web/ipv4/203.0.113.77",
])
@pytest.mark.parametrize("method", ["PUT", "DELETE", "GET"])
def test_percent_encoding_tricks(d: Daemon, method: str, target: str) -> None:
    bad(send(d, method, target))


def test_encoded_colon_in_ipv6_works(shared: Daemon) -> None:  # noqa: F811
    d = shared
    path = "/chain/f2b-web/ipv6/2001%3Adb8%3Affff%3A%3A90"
    r = d.request("PUT", path + "?timeout=600")
    assert r.status == 201, r
    assert r.json["network"] == "2001:db8:ffff::90/128"
    assert "-A f2b-web -s 2001:db8:ffff::90/128 -j DROP" in d.chain_rules("f2b-web", 6)
    assert d.request("GET", "/chain/f2b-web/ipv6/2001:db8:ffff::90").status == 200
    r = d.request("DELETE", "/chain/f2b-web/ipv6/2001%3adb8%3affff%3a%3a90/128")
    assert r.status == 200 and r.json["deleted"] is True, r
    assert "-A f2b-web -s 2001:db8:ffff::90/128 -j DROP" not in d.chain_rules("f2b-web", 6)


@pytest.mark.parametrize("target", [
    b"/chain/f2b-web/ipv4/203.0.113.77\xc3\xa9",
    b"/chain/f2b-w\xffeb/ipv4/203.0.113.77",
    b"/chain/f2b-web/ipv4/203.0.113.\xd9\xa7\xd9\xa7",  # Arabic-Indic digits, raw UTF-8
    b"/chain/f2b-web/ipv4/203.0.113.77\x01",
    b"/chain/f2b-web/ipv4/203.0.113.77\x7f",
    b"/chain/f2b-web/ipv4/203.0.113.77\x00",
    b"/chain/f2b-web/ipv4/203.0.113.77\x0b",
    b"/chain/f2b-web/ipv4/203.0.113.77\x0c",
    b"/chain/f2b-web/ipv4/203.0.113.77\xa0",  # whitespace to str.split() once decoded as latin-1
    b"/chain/f2b-web/ipv4/203.0.113.77\x85",
    b"/chain/f2b-web/ipv4/203.0.113.77\x1c",
    b"/chain/f2b-web/ipv4/203.0.113.77\r",
    b"/chain/f2b-web/ipv4/203.0.113.77\t",
])
@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_raw_bytes_in_the_request_line(d: Daemon, method: str, target: bytes) -> None:
    bad(send(d, method, target))


# -- malformed targets -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, target", [
    ("GET", "http://127.0.0.1/health"), ("GET", "https://127.0.0.1:8820/chains"),
    ("PUT", "https://127.0.0.1:8820/chain/f2b-web/ipv4/203.0.113.81"), ("GET", "*"), ("GET", "health"),
    ("GET", "//health"), ("GET", "//chains"), ("PUT", "//chain/f2b-web/ipv4/203.0.113.81"),
    ("DELETE", "//chain/f2b-web/ipv4/203.0.113.77"), ("GET", "/chain//f2b-web"),
    ("PUT", "/chain/f2b-web//ipv4/203.0.113.81"), ("PUT", "/chain/f2b-web/ipv4//203.0.113.81"),
    ("GET", "/chains/"), ("GET", "/health/"), ("DELETE", KEPT + "/"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.81#frag"), ("DELETE", KEPT + "#x"), ("GET", "/health#"),
    ("PUT", "/chain/f2b-web/ipv4/../ipv4/203.0.113.81"), ("DELETE", "/chain/f2b-web/ipv4/./203.0.113.77"),
    ("GET", "/chain/admin-list/../f2b-web"), ("GET", "/./health"), ("GET", "/../chains"),
    ("PUT", "/chain/./f2b-web/ipv4/203.0.113.81"), ("GET", "/chain/f2b-web/.."),
    ("GET", "/health\\..\\chains"), ("PUT", "/chain\\f2b-web\\ipv4\\203.0.113.81"),
])
def test_malformed_targets(d: Daemon, method: str, target: str) -> None:
    bad(send(d, method, target))


# -- methods and the request line ------------------------------------------------------------------

@pytest.mark.parametrize("method, status", [
    ("POST", 405), ("PATCH", 405), ("OPTIONS", 405), ("TRACE", 405), ("FOO", 405), ("CONNECT", 405),
    ("get", 400), ("Put", 400), ("DeLETE", 400), ("G3T", 400), ("GET-", 400), ("PUTPUTPUTPUTPUTPU", 400),
])
def test_unsupported_methods(d: Daemon, method: str, status: int) -> None:
    for target in (KEPT, "/chains", "/health"):
        r = bad(send(d, method, target), status)
        if status == 405:
            assert "Allow" in r.headers


@pytest.mark.parametrize("line, status", [
    (b"GET /chains HTTP/1.x", 400), (b"GET /chains HTTP/1", 400), (b"GET /chains FOO/1.1", 400),
    (b"GET /chains HTTP/2.0", (400,)), (b"PRI * HTTP/2.0", (400,)),
    (b"GET /chains HTTP/1.1 extra", 400), (b"GET /chains", 400), (b"DELETE " + KEPT.encode(), 400),
    (b"GET  /chains  HTTP/1.1 x", 400), (b"GET\t/chains HTTP/1.1", 400), (b"GET /chains\tHTTP/1.1", 400),
    (b"GET /chains HTTP/1.1 ", 400), (b" GET /chains HTTP/1.1", 400), (b"GET\xa0/chains HTTP/1.1", 400), (b"GET", 400),
    (b"PUT /chain/f2b-web/ipv4/203.0.113.82 HTTP/1.1\x00", 400),
])
def test_malformed_request_lines(d: Daemon, line: bytes, status: int | tuple[int, ...]) -> None:
    r = raw_exchange(d, line + b"\r\nHost: 127.0.0.1\r\n" + auth() + b"Connection: close\r\n\r\n")
    bad(r, status)


# -- sizes -------------------------------------------------------------------------------------------

def test_oversized_request_line_is_414(d: Daemon) -> None:
    for target in ("/chain/f2b-web/ipv4/203.0.113.83?timeout=" + "1" * 9000, "/" + "a" * 8200,
                   KEPT + "/" + "x" * 20000):
        bad(send(d, "PUT", target), 414)
        bad(send(d, "DELETE", target), 414)


def test_oversized_headers_are_431(d: Daemon) -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(17))
    bad(send(d, "PUT", "/chain/f2b-web/ipv4/203.0.113.84", headers=filler), 431)
    bad(send(d, "DELETE", KEPT, headers=filler), 431)
    # One huge header alone.
    bad(send(d, "DELETE", KEPT, headers=b"Cookie: " + b"c" * 17000 + b"\r\n"), 431)
    # Too many headers, each small.
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(150))
    bad(send(d, "DELETE", KEPT, headers=many), 431)


def test_large_but_acceptable_headers_still_work(shared: Daemon) -> None:  # noqa: F811
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(12))
    r = send(shared, "GET", KEPT, headers=filler)
    assert r.status == 200 and r.json["network"] == "203.0.113.77/32", r


def test_bodies(d: Daemon) -> None:
    # Over 64 KiB is refused from the Content-Length alone, before anything is read or done.
    bad(send(d, "PUT", "/chain/f2b-web/ipv4/203.0.113.85", headers=b"Content-Length: 65537\r\n"), 413)
    bad(send(d, "DELETE", KEPT, headers=b"Content-Length: 100000000\r\n"), 413)
    bad(send(d, "DELETE", KEPT, headers=b"Content-Length: " + b"9" * 5000 + b"\r\n"), 413)
    # Chunked, or any Transfer-Encoding, is refused.
    chunked = b"Transfer-Encoding: chunked\r\n"
    bad(send(d, "PUT", "/chain/f2b-web/ipv4/203.0.113.85", headers=chunked, body=b"5\r\nhello\r\n0\r\n\r\n"))
    bad(send(d, "DELETE", KEPT, headers=chunked, body=b"0\r\n\r\n"))
    bad(send(d, "DELETE", KEPT, headers=b"Transfer-Encoding: identity\r\n"))
    bad(send(d, "DELETE", KEPT, headers=b"Content-Length: 4\r\n" + chunked, body=b"0\r\n\r\n"))
    # Malformed Content-Length.
    for value in (b"abc", b"-1", b"+4", b"4.0", b"0x10", b"4, 4", b"", b"\xb2", b"\xd9\xa4", b"1 2"):
        bad(send(d, "DELETE", KEPT, headers=b"Content-Length: " + value + b"\r\n", body=b"abcd"))
    bad(send(d, "DELETE", KEPT, headers=b"Content-Length: 4\r\nContent-Length: 4\r\n", body=b"abcd"))


def test_ignored_bodies_keep_the_connection_in_step(shared: Daemon) -> None:  # noqa: F811
    d = shared
    conn = d.connection()
    try:
        for size in (1, 1000, 65536):
            r = d.request("GET", KEPT, body=b"b" * size, conn=conn)
            assert r.status == 200 and r.json["network"] == "203.0.113.77/32", (size, r)
    finally:
        conn.close()


# -- afterwards --------------------------------------------------------------------------------------

def test_daemon_survived_everything(prepared: Daemon) -> None:
    d = prepared
    assert d.proc is not None and d.proc.poll() is None
    assert d.request("GET", "/health", user=None).json == {"status": "ok"}
    assert d.request("GET", KEPT).status == 200
    assert d.request("GET", KEPT6).status == 200
    # Only the two blocks made on purpose and their hooks: no stray rule anywhere.
    ours = [x for x in d.rules(4) + d.rules(6) if "203.0.113" in x or "2001:db8:ffff" in x]
    assert sorted(ours) == ["-A f2b-web -s 2001:db8:ffff::77/128 -j DROP", "-A f2b-web -s 203.0.113.77/32 -j DROP"]
    text = d.log() + d.stderr()
    assert "Traceback" not in text
    assert "internal_error" not in text
    assert not [line for line in text.splitlines() if line.endswith('" 500')]
