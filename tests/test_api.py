"""Every API route and status code over real HTTPS against the real daemon in a private namespace,
with the resulting blocks read back from the kernel; the tests of what reaches the firewall run on every backend.
"""

from __future__ import annotations

import datetime
import fcntl
import re
import threading
import time
from contextlib import closing
from typing import Any, Iterator

import pytest

from tests.conftest import BACKENDS, Daemon, Reply, assert_json_error, module_daemon
# Unused here, but test_bad_input.py still imports it from this module.
from webiptd import __version__

pytestmark = pytest.mark.root

ENTRY_FIELDS = {"chain", "family", "network", "target", "created_at", "expires_at", "created_by", "claims"}


def with_override(config: dict[str, Any]) -> None:
    """admin may remove every claim at once (DELETE ?owner=*)."""
    config["users"]["admin"]["override"] = True


# -- helpers, some shared with test_bad_input.py, test_http_wire.py and test_backend_ipset.py --------

@pytest.fixture(scope="module")
def shared(pki: Any, user_hashes: dict[str, str]) -> Iterator[Daemon]:
    """One daemon for a whole module (tests use distinct addresses), with the default config."""
    with module_daemon(pki, user_hashes, configure=with_override) as d:
        yield d


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """Module-scoped in this module, so that all the tests of one backend share one daemon."""
    return str(request.param)


@pytest.fixture(scope="module")
def on_backend(request: pytest.FixtureRequest, backend: str, pki: Any,
               user_hashes: dict[str, str]) -> Iterator[Daemon]:
    """`shared`, or for another backend a daemon like it with every chain on that backend.

    Tests marked `backends` take this one and run once per backend."""
    if backend == "iptables":
        yield request.getfixturevalue("shared")
        return
    with module_daemon(pki, user_hashes, backend, configure=with_override) as d:
        yield d


def in_kernel(d: Daemon, chain: str, network: str) -> int:
    """How often the kernel blocks `network` in `chain`: its rules with iptables, 0 or 1 in a set."""
    version = 6 if ":" in network else 4
    if d.backend == "iptables":
        return sum(rule.split()[2:4] == ["-s", network] for rule in d.chain_rules(chain, version))
    return int(network in d.kernel_entries(chain, version))


def parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- block, re-block, expiry field ------------------------------------------------------------------

@pytest.mark.backends
def test_put_creates_then_reblock_replaces_expiry(on_backend: Daemon) -> None:
    d = on_backend
    path = "/chain/f2b-web/ipv4/203.0.113.10"
    before = time.time()
    r = d.request("PUT", path + "?timeout=600")
    assert r.status == 201, r
    assert r.headers["Content-Type"] == "application/json"
    assert set(r.json) >= ENTRY_FIELDS
    assert r.json["chain"] == "f2b-web" and r.json["family"] == "ipv4"
    assert r.json["network"] == "203.0.113.10/32" and r.json["target"] == "DROP"
    assert r.json["created_by"] == "admin"
    first_expiry = parse_time(r.json["expires_at"])
    assert before + 600 - 2 <= first_expiry <= time.time() + 600 + 2
    created = r.json["created_at"]
    assert before - 2 <= parse_time(created) <= time.time() + 2

    r = d.request("PUT", path + "?timeout=7200", user="f2b")
    assert r.status == 200, r
    assert r.json["network"] == "203.0.113.10/32"
    second_expiry = parse_time(r.json["expires_at"])
    assert second_expiry > first_expiry + 6000
    # Re-blocking is not a new block: who and when it was first blocked stays.
    assert r.json["created_at"] == created and r.json["created_by"] == "admin"
    assert d.request("GET", path).json["expires_at"] == r.json["expires_at"]
    # One rule (or set entry), not two.
    assert in_kernel(d, "f2b-web", "203.0.113.10/32") == 1

    r = d.request("PUT", path + "?timeout=-1")
    assert r.status == 200 and r.json["expires_at"] is None, r
    assert d.request("GET", path).json["expires_at"] is None


def test_expire_is_an_alias_for_timeout(shared: Daemon) -> None:
    before = time.time()
    r = shared.request("PUT", "/chain/f2b-web/ipv4/203.0.113.11?expire=300")
    assert r.status == 201, r
    assert before + 298 <= parse_time(r.json["expires_at"]) <= time.time() + 302


@pytest.mark.backends
@pytest.mark.parametrize("query, last", [("?timeout=-1", 12), ("?timeout=0", 13), ("", 14), ("?expire=0", 15)])
def test_permanent_blocks(on_backend: Daemon, query: str, last: int) -> None:
    r = on_backend.request("PUT", f"/chain/f2b-web/ipv4/203.0.113.{last}{query}")
    assert r.status == 201, r
    assert r.json["expires_at"] is None
    assert in_kernel(on_backend, "f2b-web", f"203.0.113.{last}/32") == 1


# -- unblock and lookup ------------------------------------------------------------------------------

@pytest.mark.backends
def test_delete_reports_whether_it_was_blocked(on_backend: Daemon) -> None:
    d = on_backend
    path = "/chain/f2b-web/ipv4/203.0.113.20"
    assert d.request("PUT", path, user="f2b").status == 201
    r = d.request("DELETE", path, user="f2b")
    assert r.status == 200, r
    assert r.headers["Content-Type"] == "application/json"
    assert r.json["deleted"] is True and r.json["released"] is True
    assert r.json["entry"]["network"] == "203.0.113.20/32"
    assert in_kernel(d, "f2b-web", "203.0.113.20/32") == 0
    # A fail2ban `curl -f` unban of something not blocked must not fail.
    for _ in range(2):
        r = d.request("DELETE", path, user="f2b")
        assert r.status == 200, r
        assert r.json["deleted"] is False
    r = d.request("DELETE", "/chain/f2b-ssh/ipv6/2001:db8:ffff::dead", user="f2b")
    assert r.status == 200 and r.json["deleted"] is False, r


@pytest.mark.backends
def test_get_entry_200_then_404(on_backend: Daemon) -> None:
    d = on_backend
    path = "/chain/f2b-ssh/ipv4/203.0.113.21"
    r = d.request("GET", path)
    assert_json_error(r, 404)
    assert d.request("PUT", path + "?timeout=900").status == 201
    r = d.request("GET", path, user="reader")
    assert r.status == 200, r
    assert set(r.json) >= ENTRY_FIELDS
    assert r.json["network"] == "203.0.113.21/32" and r.json["target"] == "REJECT"
    # The lookup is per chain.
    assert_json_error(d.request("GET", "/chain/f2b-web/ipv4/203.0.113.21"), 404)
    assert d.request("DELETE", path).json["deleted"] is True
    assert_json_error(d.request("GET", path), 404)


@pytest.mark.backends
def test_list_chain_shows_both_families(on_backend: Daemon) -> None:
    d = on_backend
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.30").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv6/2001:db8:ffff::30?timeout=600").status == 201
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.128/25").status == 201
    r = d.request("GET", "/chain/admin-list", user="reader")
    assert r.status == 200, r
    assert r.json["chain"] == "admin-list"
    entries = {e["network"]: e for e in r.json["entries"]}
    assert set(entries) == {"203.0.113.30/32", "203.0.113.128/25", "2001:db8:ffff::30/128"}
    for e in entries.values():
        assert set(e) >= ENTRY_FIELDS and e["chain"] == "admin-list"
    assert entries["2001:db8:ffff::30/128"]["family"] == "ipv6"
    assert entries["203.0.113.30/32"]["family"] == "ipv4"
    assert entries["203.0.113.30/32"]["expires_at"] is None
    assert entries["2001:db8:ffff::30/128"]["expires_at"] is not None
    assert d.kernel_entries("admin-list", 4) >= {"203.0.113.30/32", "203.0.113.128/25"}
    assert "2001:db8:ffff::30/128" in d.kernel_entries("admin-list", 6)
    # An empty managed chain lists as empty, not 404.
    r = d.request("GET", "/chain/f2b-ssh", user="f2b")
    assert r.status == 200 and r.json["chain"] == "f2b-ssh" and isinstance(r.json["entries"], list), r


def test_chains_lists_only_what_the_user_may_see(shared: Daemon) -> None:
    d = shared
    names = {u: sorted(c["name"] for c in d.request("GET", "/chains", user=u).json["chains"])
             for u in ("admin", "f2b", "reader")}
    assert names["admin"] == ["admin-list", "f2b-ssh", "f2b-web"]
    assert names["reader"] == ["admin-list", "f2b-ssh", "f2b-web"]
    assert names["f2b"] == ["f2b-ssh", "f2b-web"]
    r = d.request("GET", "/chains")
    by_name = {c["name"]: c for c in r.json["chains"]}
    assert by_name["f2b-ssh"]["target"] == "REJECT"
    assert by_name["admin-list"]["target"] == "DROP"
    assert by_name["admin-list"]["hooks"] == ["INPUT", "FORWARD"]
    assert {(c["match"], c["interface"]) for c in r.json["chains"]} == {("source", None)}
    assert_json_error(d.request("GET", "/chains", user=None), 401)


# -- health and version ---------------------------------------------------------------------------

def test_health_needs_no_auth_and_reveals_nothing(shared: Daemon) -> None:
    d = shared
    for user, password in ((None, None), ("admin", None), ("admin", "wrong"), ("nobody", "x")):
        r = d.request("GET", "/health", user=user, password=password)
        assert r.status == 200, r
        assert r.headers["Content-Type"] == "application/json"
        assert r.json == {"status": "ok"}
    server = r.headers.get("Server", "")
    assert __version__ not in server and "python" not in server.lower(), server
    assert "WWW-Authenticate" not in r.headers


def test_version_requires_auth(shared: Daemon) -> None:
    d = shared
    assert_json_error(d.request("GET", "/version", user=None), 401)
    r = d.request("GET", "/version", user="f2b")
    assert r.status == 200, r
    assert r.json == {"version": __version__}


# -- HEAD, 405, 404 ---------------------------------------------------------------------------------

def test_head_on_get_routes(shared: Daemon) -> None:
    d = shared
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.40").status == 201
    with closing(d.connection()) as conn:
        for path, status in (("/health", 200), ("/version", 200), ("/chains", 200), ("/chain/f2b-web", 200),
                             ("/chain/f2b-web/ipv4/203.0.113.40", 200), ("/chain/f2b-web/ipv4/203.0.113.41", 404)):
            get = d.request("GET", path, conn=conn)
            head = d.request("HEAD", path, conn=conn)
            assert (get.status, head.status) == (status, status), (path, get, head)
            assert head.raw == b""
            assert head.headers["Content-Type"] == "application/json"
            if path == "/chain/f2b-web":  # a listing is streamed: chunked, no length known in advance
                assert head.headers["Transfer-Encoding"] == get.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in head.headers
            else:
                assert head.headers["Content-Length"] == str(len(get.raw)), path
        # HEAD authenticates like GET.
        assert d.request("HEAD", "/chains", user=None, conn=conn).status == 401
        # And the connection is still in step after the bodiless replies.
        assert d.request("GET", "/health", conn=conn).json == {"status": "ok"}


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/health", {"GET", "HEAD"}),
    ("DELETE", "/version", {"GET", "HEAD"}),
    ("POST", "/chains", {"GET", "HEAD"}),
    ("PUT", "/chain/f2b-web", {"GET", "HEAD", "POST"}),
    ("DELETE", "/chain/f2b-web", {"GET", "HEAD", "POST"}),
    ("POST", "/chain/f2b-web/ipv4/203.0.113.42", {"GET", "HEAD", "PUT", "DELETE"}),
    ("PATCH", "/chain/f2b-web/ipv6/2001:db8:ffff::42/64", {"GET", "HEAD", "PUT", "DELETE"}),
    ("OPTIONS", "/chain/f2b-web/ipv4/203.0.113.42", {"GET", "HEAD", "PUT", "DELETE"}),
])
def test_405_with_allow(shared: Daemon, method: str, path: str, allow: set[str]) -> None:
    r = shared.request(method, path)
    assert_json_error(r, 405)
    assert {m.strip() for m in r.headers["Allow"].split(",")} == allow
    assert not any("203.0.113.42" in rule or "2001:db8:ffff::/64" in rule
                   for rule in shared.rules(4) + shared.rules(6))


@pytest.mark.parametrize("path", [
    "/chain/no-such-chain", "/chain/no-such-chain/ipv4/203.0.113.43", "/chain/F2B-WEB/ipv4/203.0.113.43",
    "/chain/INPUT/ipv4/203.0.113.43", "/chain/f2b-web2",
])
def test_404_unknown_chain(shared: Daemon, path: str) -> None:
    d = shared
    for method in ("GET", "PUT", "DELETE") if path.count("/") > 2 else ("GET",):
        assert_json_error(d.request(method, path), 404)
    # Nothing was created for it, in either table: no rule, no chain.
    name = path.split("/")[2]
    for family in (4, 6):
        save = d.ns.iptables_save(family)
        assert "203.0.113.43" not in save
        assert name == "INPUT" or f":{name} " not in save


@pytest.mark.parametrize("path", [
    "/nothing", "/chain", "/chains/f2b-web", "/health/x", "/version/1", "/chain/f2b-web/ipv4",
    "/chain/f2b-web/ipv4/203.0.113.44/32/extra", "/api/chain/f2b-web",
])
def test_404_unknown_path(shared: Daemon, path: str) -> None:
    assert_json_error(shared.request("GET", path), 404)


# -- networks: CIDR, IPv6, normalisation, REJECT ----------------------------------------------------

@pytest.mark.backends
@pytest.mark.parametrize("family, addr, prefix, network, version", [
    ("ipv4", "203.0.113.0", "24", "203.0.113.0/24", 4),
    ("ipv4", "203.0.113.50", "32", "203.0.113.50/32", 4),
    ("ipv6", "2001:db8:ffff::", "48", "2001:db8:ffff::/48", 6),
    ("ipv6", "2001:db8:ffff:1::", "64", "2001:db8:ffff:1::/64", 6),
    # RFC 9637 documentation space: a /32 that is blocked in the namespace and never contacted.
    ("ipv6", "3fff::", "32", "3fff::/32", 6),
    ("ipv6", "2001:db8:ffff::51", None, "2001:db8:ffff::51/128", 6),
    ("ipv6", "2001:DB8:FFFF:0:0:0:0:52", "128", "2001:db8:ffff::52/128", 6),
    ("ipv6", "2001:0db8:ffff:0000::53", None, "2001:db8:ffff::53/128", 6),
])
def test_cidr_blocks_and_normalisation(on_backend: Daemon, family: str, addr: str, prefix: str | None,
                                       network: str, version: int) -> None:
    d = on_backend
    path = f"/chain/admin-list/{family}/{addr}" + (f"/{prefix}" if prefix else "")
    r = d.request("PUT", path)
    assert r.status == 201, r
    assert r.json["network"] == network and r.json["family"] == family
    assert network in d.kernel_entries("admin-list", version)
    assert network not in d.kernel_entries("admin-list", 10 - version)
    assert in_kernel(d, "admin-list", network) == 1
    # The same network spelled the canonical way is the same entry.
    canonical = "/chain/admin-list/{}/{}".format(family, network)
    assert d.request("GET", canonical).json["network"] == network
    assert d.request("PUT", canonical).status == 200
    r = d.request("DELETE", path)
    assert r.status == 200 and r.json["deleted"] is True, r
    assert network not in d.kernel_entries("admin-list", version)


@pytest.mark.backends
def test_reject_chain_uses_the_right_table(on_backend: Daemon) -> None:
    d = on_backend
    r = d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.60", user="f2b")
    assert r.status == 201 and r.json["target"] == "REJECT", r
    r = d.request("PUT", "/chain/f2b-ssh/ipv6/2001:db8:ffff::60", user="f2b")
    assert r.status == 201 and r.json["target"] == "REJECT", r
    assert "203.0.113.60/32" in d.kernel_entries("f2b-ssh", 4)
    assert "2001:db8:ffff::60/128" in d.kernel_entries("f2b-ssh", 6)
    assert not any("2001:db8:ffff::60" in e for e in d.kernel_entries("f2b-ssh", 4))
    assert not any("203.0.113.60" in e for e in d.kernel_entries("f2b-ssh", 6))
    if d.backend != "iptables":
        return  # the rule text below is the iptables backend's; the others' own tests check theirs
    v4, v6 = d.chain_rules("f2b-ssh", 4), d.chain_rules("f2b-ssh", 6)
    assert "-A f2b-ssh -s 203.0.113.60/32 -j REJECT --reject-with icmp-port-unreachable" in v4
    assert "-A f2b-ssh -s 2001:db8:ffff::60/128 -j REJECT --reject-with icmp6-port-unreachable" in v6
    assert not any("2001:db8:ffff::60" in rule for rule in v4)
    assert not any("203.0.113.60" in rule for rule in v6)
    # Each managed chain is hooked at position 1 of INPUT in both tables.
    for family in (4, 6):
        input_rules = [x for x in d.rules(family) if x.startswith("-A INPUT ")]
        assert "-A INPUT -j f2b-ssh" in input_rules
    assert "-A FORWARD -j admin-list" in [x for x in d.rules(4) if x.startswith("-A FORWARD ")]


# -- never_block -------------------------------------------------------------------------------------

@pytest.mark.backends
@pytest.mark.parametrize("path", [
    "/chain/f2b-web/ipv4/127.0.0.1",
    "/chain/f2b-web/ipv4/127.1.2.3",
    "/chain/f2b-web/ipv4/127.0.0.0/8",
    "/chain/f2b-web/ipv4/127.0.0.0/16",
    "/chain/f2b-web/ipv4/198.51.100.250",
    "/chain/f2b-web/ipv4/198.51.100.0/24",  # contains 198.51.100.250
    "/chain/f2b-web/ipv4/198.0.0.0/8",
    "/chain/f2b-web/ipv4/0.0.0.0/1",  # contains 127.0.0.0/8
    "/chain/f2b-web/ipv4/128.0.0.0/1",  # contains 198.51.100.250
    "/chain/f2b-web/ipv6/::1",
    "/chain/f2b-web/ipv6/::/8",  # contains ::1
    "/chain/f2b-web/ipv6/0:0:0:0:0:0:0:1/128",
])
def test_never_block_is_409(on_backend: Daemon, path: str) -> None:
    d = on_backend

    def blocked() -> list[set[str]]:
        return [d.kernel_entries("f2b-web", 4), d.kernel_entries("f2b-web", 6)]

    before = blocked()
    for query in ("", "?timeout=60"):
        assert_json_error(d.request("PUT", path + query, user="f2b"), 409)
    assert blocked() == before
    # Only blocking is refused: looking it up or unblocking it is harmless.
    assert d.request("GET", path).status == 404
    r = d.request("DELETE", path)
    assert r.status == 200 and r.json["deleted"] is False, r


# -- the connection ----------------------------------------------------------------------------------

def test_keep_alive_many_requests_over_one_connection(shared: Daemon) -> None:
    d = shared
    with closing(d.connection()) as conn:
        conn.connect()
        first_sock = conn.sock
        for i in range(10):
            path = f"/chain/f2b-web/ipv4/203.0.113.{100 + i}"
            for method, status in (("PUT", 201), ("GET", 200), ("DELETE", 200), ("GET", 404)):
                r = d.request(method, path, conn=conn, user="f2b")
                assert r.status == status, (method, path, r)
                assert r.headers.get("Connection", "").lower() != "close"
        # Errors that the API answers do not end the connection either.
        assert d.request("GET", "/chain/admin-list", conn=conn, user="f2b").status == 403
        assert d.request("GET", "/chains", conn=conn, user=None).status == 401
        assert d.request("GET", "/chain/f2b-web/ipv4/999.1.1.1", conn=conn).status == 400
        assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.99", conn=conn, body=b"ignored").status == 201
        assert d.request("GET", "/health", conn=conn).json == {"status": "ok"}
        assert conn.sock is first_sock, "the client had to reconnect"


def test_every_response_is_json(shared: Daemon) -> None:
    d = shared
    cases = [
        ("GET", "/health", None, 200), ("GET", "/chains", "admin", 200), ("GET", "/chains", None, 401),
        ("GET", "/chain/admin-list", "f2b", 403), ("GET", "/chain/nope", "admin", 404),
        ("POST", "/chains", "admin", 405), ("PUT", "/chain/f2b-web/ipv4/1.2.3.400", "admin", 400),
        ("PUT", "/chain/f2b-web/ipv4/127.0.0.1", "admin", 409),
    ]
    for method, path, user, status in cases:
        r = d.request(method, path, user=user)
        assert r.status == status, (method, path, r)
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Content-Length"] == str(len(r.raw))
        if status >= 400:
            assert_json_error(r, status)


# -- audit --------------------------------------------------------------------------------------------

@pytest.mark.backends
def test_audit_lines_for_block_and_unblock(on_backend: Daemon) -> None:
    d = on_backend
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.70?timeout=600", user="f2b").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.70", user="f2b").status == 200
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.70", user="f2b").status == 200
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.70", user="f2b").status == 200
    assert d.request("PUT", "/chain/admin-list/ipv6/2001:db8:ffff:70::/64", user="admin").status == 201

    def fields(line: str) -> dict[str, str]:
        return dict(re.findall(r"(\w+)=(\S+)", line))

    for text in (d.log(), d.stderr()):
        audits = [fields(line) for line in text.splitlines() if "action=" in line and "203.0.113.70" in line]
        want = [("block", "600", "created"), ("block", "permanent", "exists"),
                ("unblock", "-", "deleted"), ("unblock", "-", "absent")]
        got = [(a["action"], a["timeout"], a["result"]) for a in audits]
        assert got[0][0] == "block" and got[0][2] == "created" and abs(int(got[0][1]) - 600) <= 1, got
        assert got[1:] == want[1:], got
        for a in audits:
            assert a["user"] == "f2b" and a["client"] == "127.0.0.1"
            assert a["chain"] == "f2b-web" and a["network"] == "203.0.113.70/32"
        v6 = [fields(line) for line in text.splitlines() if "network=2001:db8:ffff:70::/64" in line]
        assert len(v6) == 1 and v6[0]["user"] == "admin" and v6[0]["chain"] == "admin-list", v6
        assert v6[0]["timeout"] == "permanent" and v6[0]["result"] == "created"


def test_nothing_crashed(shared: Daemon) -> None:
    assert shared.request("GET", "/health", user=None).status == 200
    assert "Traceback" not in shared.log() and "Traceback" not in shared.stderr()
    assert shared.proc is not None and shared.proc.poll() is None


@pytest.mark.backends(*(name for name in BACKENDS if name != "iptables"))  # iptables': the test above
def test_nothing_crashed_on_the_other_backends(on_backend: Daemon) -> None:
    test_nothing_crashed(on_backend)


# -- 503 ----------------------------------------------------------------------------------------------

def test_busy_firewall_is_503(daemon: Daemon) -> None:
    """Hold the daemon's xtables lock (a private lock file, never the host's) so the worker stalls."""
    d = daemon
    lock_path = d.workdir / "xtables.lock"
    d.config["limits"]["worker_timeout"] = 1
    d.start(XTABLES_LOCKFILE=str(lock_path))
    running_path, queued_path = "/chain/f2b-web/ipv4/203.0.113.90", "/chain/f2b-web/ipv4/203.0.113.91"
    replies: dict[str, Reply] = {}
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            first = threading.Thread(target=lambda: replies.update(running=d.request("PUT", running_path)))
            first.start()
            time.sleep(0.5)  # the worker has taken the first block and now waits for the lock
            replies["queued"] = d.request("PUT", queued_path)
            first.join(10)
            # Other routes that do not need the worker still answer.
            assert d.request("GET", "/chains").status == 200
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    for name in ("running", "queued"):
        assert_json_error(replies[name], 503)
    # The queued block was withdrawn and never applied; the running one went through once the lock was free.
    assert d.request("GET", running_path).status == 200
    assert d.request("GET", queued_path).status == 404
    rules = d.chain_rules("f2b-web")
    assert "-A f2b-web -s 203.0.113.90/32 -j DROP" in rules
    assert not any("203.0.113.91" in rule for rule in rules)
    # And the worker is healthy again.
    assert d.request("PUT", queued_path).status == 201


# -- claims ------------------------------------------------------------------------------------------

def claim_owners(r: Reply) -> list[str]:
    return [c["owner"] for c in r.json["claims"]]


@pytest.mark.backends
def test_two_owners_one_delete_keeps_the_block_the_second_removes_it(on_backend: Daemon) -> None:
    d = on_backend
    path = "/chain/f2b-web/ipv4/203.0.113.90"
    r = d.request("PUT", path + "?owner=sshd&timeout=600", user="f2b")
    assert r.status == 201, r
    assert r.json["created_by"] == "f2b/sshd" and claim_owners(r) == ["f2b/sshd"]
    assert r.json["claims"][0] == {"owner": "f2b/sshd", "created_at": r.json["created_at"],
                                   "expires_at": r.json["expires_at"], "node": None}
    r = d.request("PUT", path + "?owner=nginx", user="f2b")
    assert r.status == 200, r
    assert claim_owners(r) == ["f2b/nginx", "f2b/sshd"] and r.json["expires_at"] is None  # one is permanent
    assert r.json["created_by"] == "f2b/sshd"

    r = d.request("DELETE", path + "?owner=nginx", user="f2b")
    assert r.status == 200, r
    assert (r.json["deleted"], r.json["released"]) == (False, True)
    assert [c["owner"] for c in r.json["entry"]["claims"]] == ["f2b/sshd"]
    assert r.json["entry"]["expires_at"] is not None  # the effective expiry is the one claim left's
    assert in_kernel(d, "f2b-web", "203.0.113.90/32") == 1
    if d.backend != "iptables":  # the set's kernel timeout follows the effective expiry: ~600 s, not permanent
        assert "203.0.113.90/32" in d.kernel_entries("f2b-web", 4)
    # The same owner again, a claim not held, and the user's own unlabelled claim: none changes anything.
    for query, user in (("?owner=nginx", "f2b"), ("", "f2b"), ("?owner=sshd", "admin")):
        r = d.request("DELETE", path + query, user=user)
        assert r.status == 200 and (r.json["deleted"], r.json["released"]) == (False, False), (query, user, r)
        assert [c["owner"] for c in r.json["entry"]["claims"]] == ["f2b/sshd"]
    assert in_kernel(d, "f2b-web", "203.0.113.90/32") == 1

    r = d.request("DELETE", path + "?owner=sshd", user="f2b")
    assert r.status == 200 and (r.json["deleted"], r.json["released"]) == (True, True), r
    assert in_kernel(d, "f2b-web", "203.0.113.90/32") == 0
    assert_json_error(d.request("GET", path), 404)


@pytest.mark.backends
def test_override_removes_every_claim_and_nobody_else_may(on_backend: Daemon) -> None:
    d = on_backend
    path = "/chain/f2b-ssh/ipv6/2001:db8:ffff::91"
    assert d.request("PUT", path + "?owner=sshd", user="f2b").status == 201
    assert d.request("PUT", path + "?timeout=600").status == 200
    r = d.request("DELETE", path + "?owner=*", user="f2b")
    assert_json_error(r, 403)
    assert in_kernel(d, "f2b-ssh", "2001:db8:ffff::91/128") == 1
    assert len(d.request("GET", path).json["claims"]) == 2
    r = d.request("DELETE", path + "?owner=*")
    assert r.status == 200 and (r.json["deleted"], r.json["released"]) == (True, True), r
    assert len(r.json["entry"]["claims"]) == 2
    assert in_kernel(d, "f2b-ssh", "2001:db8:ffff::91/128") == 0


def test_bad_owner_parameters_change_nothing(shared: Daemon) -> None:
    d = shared
    path = "/chain/f2b-web/ipv4/203.0.113.92"
    assert d.request("PUT", path + "?owner=sshd", user="f2b").status == 201
    before = d.request("GET", path).json
    for method, query, status in [
        ("PUT", "?owner=" + "x" * 65, 400), ("PUT", "?owner=a/b", 400), ("PUT", "?owner=", 400),
        ("PUT", "?owner=*", 400), ("PUT", "?owner=a&owner=b", 400), ("DELETE", "?owner=sshd&timeout=5", 400),
        ("DELETE", "?owner=a%2Fb", 400), ("GET", "?owner=sshd", 400), ("DELETE", "?owner=*", 403),
    ]:
        r = d.request(method, path + query, user="f2b")
        assert_json_error(r, status)
    assert d.request("GET", path).json == before
    assert in_kernel(d, "f2b-web", "203.0.113.92/32") == 1
    assert d.request("DELETE", path + "?owner=sshd", user="f2b").json["deleted"] is True


def test_the_audit_names_the_owner(shared: Daemon) -> None:
    d = shared
    path = "/chain/f2b-web/ipv4/203.0.113.93"
    assert d.request("PUT", path + "?owner=sshd", user="f2b").status == 201
    assert d.request("PUT", path + "?owner=nginx", user="f2b").status == 200
    assert d.request("DELETE", path + "?owner=sshd", user="f2b").status == 200
    assert d.request("DELETE", path + "?owner=*").status == 200
    lines = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in d.log().splitlines()
             if "action=" in line and "network=203.0.113.93/32" in line]
    assert [(a["user"], a["action"], a["owner"], a["result"]) for a in lines] == [
        ("f2b", "block", "f2b/sshd", "created"), ("f2b", "block", "f2b/nginx", "claimed"),
        ("f2b", "unblock", "f2b/sshd", "released"), ("admin", "unblock", "*", "deleted")]
