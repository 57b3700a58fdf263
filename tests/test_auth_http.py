"""HTTP Basic authentication and authorisation over real HTTPS: the 401/403 matrix, throttling (429),
secrets kept out of the logs, and the verification cache dropped on reload.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Iterator

import pytest

from tests.conftest import (FAST_HASH, PASSWORDS, Daemon, Reply, assert_json_error, module_daemon,
                            raw_exchange)

pytestmark = pytest.mark.root

REALM_PREFIX = 'Basic realm="web-ipt-d"'
COLON_PASSWORD = "pa:ss:wörd"  # a colon and non-ASCII: RFC 7617 splits at the first colon, UTF-8


def token(user: bytes | str, password: bytes | str = b"") -> str:
    raw = (user.encode() if isinstance(user, str) else user) + (
        password.encode() if isinstance(password, str) else password)
    return base64.b64encode(raw).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + token(f"{user}:{password}")


def assert_401(r: Reply) -> None:
    assert_json_error(r, 401)
    assert r.headers["WWW-Authenticate"].startswith(REALM_PREFIX), r.headers


@pytest.fixture(scope="module")
def matrix(pki: Any, user_hashes: dict[str, str]) -> Iterator[Daemon]:
    """A daemon that never throttles, with two extra users, so the matrix can fail logins at will."""

    def configure(config: dict[str, Any]) -> None:
        config["limits"]["auth_failures"] = 100_000
        config["users"]["colon"] = {"password_hash": FAST_HASH.hash(COLON_PASSWORD), "chains": ["f2b-web"]}
        config["users"]["local4"] = {"password_hash": user_hashes["admin"], "chains": ["*"],
                                     "allow_from": ["127.0.0.1/32"]}

    with module_daemon(pki, user_hashes, configure=configure) as d:
        yield d


# -- 401 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/chains"), ("GET", "/version"), ("GET", "/chain/f2b-web"),
    ("GET", "/chain/f2b-web/ipv4/203.0.113.1"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.1"),
    ("DELETE", "/chain/f2b-web/ipv4/203.0.113.1"), ("HEAD", "/chains"),
])
def test_no_header_is_401_with_challenge(matrix: Daemon, method: str, path: str) -> None:
    r = matrix.request(method, path, user=None)
    assert r.status == 401, r
    assert r.headers["WWW-Authenticate"].startswith(REALM_PREFIX)
    if method != "HEAD":
        assert_401(r)
    assert "203.0.113.1" not in matrix.ns.iptables_save(4)


MALFORMED = {
    "not base64": "Basic !!!not-base64!!!",
    "bad padding": "Basic " + token("admin:admin-pw").rstrip("="),
    "no colon": "Basic " + token("adminadmin-pw"),
    "empty user": "Basic " + token(":admin-pw"),
    "wrong scheme": "Bearer " + token("admin:admin-pw"),
    "digest": 'Digest username="admin", realm="web-ipt-d", nonce="x", uri="/chains", response="0"',
    "basic alone": "Basic",
    "basic and space": "Basic ",
    "scheme-less token": token("admin:admin-pw"),
    "space inside token": "Basic " + token("admin:admin-pw")[:6] + " " + token("admin:admin-pw")[6:],
    "non-UTF-8 password": "Basic " + token(b"admin:", b"\xff\xfeadmin-pw"),
    "non-UTF-8 user": "Basic " + token(b"\xc3(:", b"admin-pw"),
    "control character": "Basic " + token("admin:admin-pw\x00"),
    "huge": "Basic " + token("admin:" + "x" * 6000),
    "empty": "",
}


@pytest.mark.parametrize("header", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_401_never_500(matrix: Daemon, header: str) -> None:
    for method, path in (("GET", "/chains"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.2")):
        assert_401(matrix.request(method, path, user=None, headers={"Authorization": header}))
    assert "203.0.113.2" not in matrix.ns.iptables_save(4)


@pytest.mark.parametrize("raw_header", [
    b"Authorization: Basic \xc3\xa9\xff\r\n",  # raw non-ASCII bytes in the header value
    b"Authorization: Basic " + token("admin:admin-pw").encode() + b"\r\n"  # twice, even though both are valid
    b"Authorization: Basic " + token("admin:admin-pw").encode() + b"\r\n",
    b"Authorization: Basic " + token("f2b:f2b-pw").encode() + b"\r\n"
    b"Authorization: Basic " + token("admin:admin-pw").encode() + b"\r\n",
    b"Authorization:\r\n",
    b"Authorization: Basic\t" + token("admin:admin-pw").encode() + b"\r\n",
])
def test_raw_malformed_headers_are_401(matrix: Daemon, raw_header: bytes) -> None:
    request = b"GET /chains HTTP/1.1\r\nHost: 127.0.0.1\r\n" + raw_header + b"Connection: close\r\n\r\n"
    assert_401(raw_exchange(matrix, request))


def test_unknown_user_and_wrong_password_are_401(matrix: Daemon) -> None:
    d = matrix
    for user, password in (("nobody", "admin-pw"), ("admin", "wrong"), ("admin", ""), ("admin", "admin-pw "),
                           ("Admin", "admin-pw"), ("f2b", "admin-pw"), ("colon", "pa"), ("colon", "ss:wörd")):
        assert_401(d.request("GET", "/chains", user=user, password=password))
        assert_401(d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.3", user=user, password=password))
    assert "203.0.113.3" not in d.ns.iptables_save(4)


def test_good_credentials_variants(matrix: Daemon) -> None:
    d = matrix
    # RFC 7617: the scheme is case-insensitive, and the password is everything after the first colon.
    r = d.request("GET", "/chains", user=None, headers={"Authorization": "basic " + token("admin:admin-pw")})
    assert r.status == 200, r
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.4", user="colon", password=COLON_PASSWORD)
    assert r.status == 201 and r.json["created_by"] == "colon", r
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.4", user="colon",
                     password=COLON_PASSWORD).json["deleted"] is True


# -- 403 ----------------------------------------------------------------------------------------------

def test_forbidden_chain_is_403(matrix: Daemon) -> None:
    d = matrix
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.5").status == 201
    for method, path in (("GET", "/chain/admin-list"), ("GET", "/chain/admin-list/ipv4/203.0.113.5"),
                         ("PUT", "/chain/admin-list/ipv4/203.0.113.6"),
                         ("DELETE", "/chain/admin-list/ipv4/203.0.113.5")):
        assert_json_error(d.request(method, path, user="f2b"), 403)
        assert_json_error(d.request(method, path, user="colon", password=COLON_PASSWORD), 403)
    assert_json_error(d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.6", user="colon", password=COLON_PASSWORD),
                      403)
    rules = d.rules(4)
    assert "-A admin-list -s 203.0.113.5/32 -j DROP" in rules  # the DELETE did not happen
    assert not any("203.0.113.6" in rule for rule in rules)
    # The same user may use its own chains.
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.6", user="f2b").status == 201


def test_read_only_user_may_read_but_not_write(matrix: Daemon) -> None:
    d = matrix
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.7").status == 201
    before = d.rules(4) + d.rules(6)
    for method, path in (("PUT", "/chain/f2b-web/ipv4/203.0.113.8"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.7"),
                         ("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::8?timeout=60"),
                         ("DELETE", "/chain/f2b-web/ipv4/203.0.113.7"),
                         ("DELETE", "/chain/f2b-web/ipv4/203.0.113.9")):
        assert_json_error(d.request(method, path, user="reader"), 403)
    assert d.rules(4) + d.rules(6) == before
    for path in ("/chains", "/version", "/chain/f2b-web", "/chain/admin-list", "/chain/f2b-web/ipv4/203.0.113.7"):
        r = d.request("GET", path, user="reader")
        assert r.status == 200, (path, r)
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.7", user="reader").json["created_by"] == "admin"


def test_allow_from(matrix: Daemon) -> None:
    d = matrix
    # faraway may only come from 203.0.113.0/24; we come from 127.0.0.1 or ::1.
    for host in ("127.0.0.1", "::1"):
        with_conn = d.connection(host=host)
        try:
            for method, path in (("GET", "/chains"), ("GET", "/version"), ("GET", "/chain/f2b-web"),
                                 ("PUT", "/chain/f2b-web/ipv4/203.0.113.10"),
                                 ("DELETE", "/chain/f2b-web/ipv4/203.0.113.10")):
                assert_json_error(d.request(method, path, user="faraway", conn=with_conn), 403)
            # Credentials are checked first: a wrong password is still a 401, not a hint about allow_from.
            assert_401(d.request("GET", "/chains", user="faraway", password="nope", conn=with_conn))
            # local4 may come only from 127.0.0.1/32.
            r = d.request("GET", "/chains", user="local4", password=PASSWORDS["admin"], conn=with_conn)
            assert r.status == (200 if host == "127.0.0.1" else 403), (host, r)
        finally:
            with_conn.close()
    assert "203.0.113.10" not in d.ns.iptables_save(4)


# -- throttling ---------------------------------------------------------------------------------------

def fail(d: Daemon, n: int, host: str = "127.0.0.1") -> None:
    conn = d.connection(host=host)
    try:
        for _ in range(n):
            assert_401(d.request("GET", "/chains", user="admin", password="wrong", conn=conn))
    finally:
        conn.close()


def assert_429(r: Reply, window: int) -> int:
    assert_json_error(r, 429)
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= window, retry
    return retry


def test_throttle_after_failures_then_expires(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"].update(auth_failures=5, auth_window=2)
    d.start()
    fail(d, 5)
    # Now even the right password is refused, and so is any other route that needs auth.
    retry = assert_429(d.request("GET", "/chains"), 2)
    assert_429(d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.11", user="f2b"), 2)
    assert_429(d.request("GET", "/chains", user=None), 2)
    assert "203.0.113.11" not in d.ns.iptables_save(4)
    # /health needs no auth and is never throttled.
    assert d.request("GET", "/health", user=None).status == 200
    # Another client address is not throttled.
    assert d.request("GET", "/chains", conn=d.connection(host="::1")).status == 200
    assert any("throttl" in line and "client=127.0.0.1" in line for line in d.log().splitlines())
    time.sleep(retry + 0.3)
    r = d.request("GET", "/chains")
    assert r.status == 200, r


def test_success_does_not_reset_the_count_or_the_throttle(daemon: Daemon) -> None:
    d = daemon
    d.start()  # auth_failures 5 in a 30 s window
    fail(d, 4)
    assert d.request("GET", "/chains").status == 200
    fail(d, 1)
    assert_429(d.request("GET", "/chains"), 30)
    assert_429(d.request("GET", "/chains", user="f2b"), 30)
    # Failures over ::1 count for ::1 only.
    fail(d, 4, host="::1")
    assert d.request("GET", "/chains", conn=d.connection(host="::1")).status == 200


def test_what_counts_as_a_failure(daemon: Daemon) -> None:
    d = daemon
    d.start()  # auth_failures 5
    # Asking without credentials (curl's first try, a browser) is not a failed login.
    for _ in range(8):
        assert_401(d.request("GET", "/chains", user=None))
    assert d.request("GET", "/chains").status == 200
    # Unknown users and malformed headers are.
    for header in (basic("nobody", "x"), basic("mallory", "y"), "Basic !!", "Bearer abc", basic("admin", "z")):
        assert_401(d.request("GET", "/chains", user=None, headers={"Authorization": header}))
    assert_429(d.request("GET", "/chains"), 30)


# -- secrets and the cache --------------------------------------------------------------------------

def test_secrets_never_reach_the_logs(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["auth_failures"] = 1000
    d.config["log"]["level"] = "DEBUG"
    d.start()
    wrong = "Sup3r-S3cret-wr0ng"
    unknown = "m4llory-passw0rd"
    headers_sent = [basic("admin", PASSWORDS["admin"]), basic("f2b", PASSWORDS["f2b"]), basic("admin", wrong),
                    basic("mallory", unknown), "Basic " + token(wrong), "Basic " + wrong + "!!"]
    for header in headers_sent:
        for method, path in (("GET", "/chains"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.12?timeout=60"),
                             ("DELETE", "/chain/f2b-web/ipv4/203.0.113.12"), ("GET", "/chain/admin-list"),
                             ("POST", "/chains"), ("GET", "/chain/f2b-web/ipv4/999.0.0.1")):
            r = d.request(method, path, user=None, headers={"Authorization": header})
            assert r.status < 500, r
    # Something was logged, so the absence below means something.
    text = d.log() + d.stderr()
    assert "action=block" in text and "action=unblock" in text and "client=127.0.0.1" in text
    secrets = [PASSWORDS["admin"], PASSWORDS["f2b"], wrong, unknown]
    secrets += [h.split(" ", 1)[1] for h in headers_sent]
    secrets += [token(f"admin:{PASSWORDS['admin']}")[:16]]
    for secret in secrets:
        assert secret not in text, secret


def test_reload_drops_cached_credentials(daemon: Daemon) -> None:
    d = daemon
    d.start()
    for _ in range(2):  # the second request is answered from the cache
        assert d.request("GET", "/chains").status == 200
        assert d.request("GET", "/chains", user="reader").status == 200
    d.config["users"]["admin"]["password_hash"] = FAST_HASH.hash("new-admin-pw")
    del d.config["users"]["reader"]
    d.reload()
    assert_401(d.request("GET", "/chains"))
    assert_401(d.request("GET", "/chains", user="reader"))
    assert d.request("GET", "/chains", password="new-admin-pw").status == 200
    assert d.request("GET", "/chains", user="f2b").status == 200


def test_dual_stack_listener_sees_ipv4_clients_as_ipv4(daemon: Daemon) -> None:
    """The default listen is [::]:8820; an IPv4 client arrives as ::ffff:a.b.c.d and must count as a.b.c.d."""
    d = daemon
    d.config["listen"] = ["[::]:8820"]
    d.config["users"]["local4"] = {"password_hash": FAST_HASH.hash("local4-pw"), "chains": ["*"],
                                   "allow_from": ["127.0.0.1/32"]}
    d.start()
    v4, v6 = d.connection(host="127.0.0.1"), d.connection(host="::1")
    try:
        assert d.request("GET", "/chains", user="local4", password="local4-pw", conn=v4).status == 200
        assert_json_error(d.request("GET", "/chains", user="local4", password="local4-pw", conn=v6), 403)
        assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.13", user="f2b", conn=v4).status == 201
        audit = [line for line in d.log().splitlines() if "action=block" in line and "203.0.113.13" in line]
        assert len(audit) == 1 and "client=127.0.0.1 " in audit[0], audit
        # The throttle counts the IPv4 address too, so ::1 is a different client.
        fail(d, 5, host="127.0.0.1")
        assert_429(d.request("GET", "/chains", conn=d.connection(host="127.0.0.1")), 30)
        assert d.request("GET", "/chains", conn=v6).status == 200
    finally:
        v4.close()
        v6.close()
