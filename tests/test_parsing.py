"""Pure tests of the HTTP edge: request-target, query and address parsing, and App's routing and auth order.

App runs against RecordingWorker, a stand-in that only records the commands it is handed; the
firewall itself is covered by the namespace tests.
"""

from __future__ import annotations

import base64
import json
import ipaddress
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import pytest

from webiptd import __version__
from webiptd.auth import Authenticator, FailureThrottle
from webiptd.passwords import context as crypt_context
from webiptd.commands import (
    Block, Blocked, Entry, FirewallUnavailable, Lookup, Unblock, Unblocked,
)
from webiptd.config import Config, from_mapping
from webiptd.net import parse_segments, peer_address
from webiptd.http.app import MAX_TIMEOUT, ROUTES, App, Generation, Runtime, parse_owner, parse_timeout
from webiptd.http.responses import Response
from webiptd.http.wire import parse_target
from webiptd.state import Store

net = ipaddress.ip_network
ip = ipaddress.ip_address

# -- parse_target ----------------------------------------------------------------------------


@pytest.mark.parametrize("target, segments, query", [
    ("/health", ["health"], []),
    ("/chains", ["chains"], []),
    ("/chains?", ["chains"], []),
    ("/chain/f2b-web", ["chain", "f2b-web"], []),
    ("/chain/f2b-web/ipv4/203.0.113.9", ["chain", "f2b-web", "ipv4", "203.0.113.9"], []),
    ("/chain/f2b-web/ipv4/203.0.113.0/24", ["chain", "f2b-web", "ipv4", "203.0.113.0", "24"], []),
    ("/chain/f2b_web/ipv6/2001:db8:ffff::/48", ["chain", "f2b_web", "ipv6", "2001:db8:ffff::", "48"], []),
    ("/chain/x/ipv4/203.0.113.9?timeout=600", ["chain", "x", "ipv4", "203.0.113.9"], [("timeout", "600")]),
    ("/chain/x/ipv4/203.0.113.9?timeout=-1", ["chain", "x", "ipv4", "203.0.113.9"], [("timeout", "-1")]),
    ("/chain/x?expire=1&timeout=2", ["chain", "x"], [("expire", "1"), ("timeout", "2")]),
    # Percent-encoding of ordinary characters is decoded once.
    ("/chain/f2b%2Dweb", ["chain", "f2b-web"], []),
    ("/chain/x/ipv6/2001%3adb8%3A%3A1", ["chain", "x", "ipv6", "2001:db8::1"], []),
])
def test_parse_target_valid(target: str, segments: list[str], query: list[tuple[str, str]]) -> None:
    assert parse_target(target) == (segments, query)


@pytest.mark.parametrize("target", [
    # not ASCII, or not printable
    "/chain/f2b-wéb",
    "/chain/f2b-web\x00",
    "/chain/f2b web",
    "/chain/f2b-web\t",
    "/chain/f2b-web\x7f",
    "/chain/f2b-web\n",
    # not an absolute path
    "chain/f2b-web",
    "",
    "*",
    "http://localhost/chains",
    "//chains",
    # fragments
    "/chains#x",
    "/chain/f2b-web#",
    # empty segments
    "/",
    "/chains/",
    "/chain//ipv4/203.0.113.9",
    "/chain/f2b-web/",
    # dot segments
    "/chain/.",
    "/chain/..",
    "/chain/f2b-web/../../etc",
    "/chain/%2e%2e",
    "/chain/%2E",
    # bad percent-encoding
    "/chain/f2b%",
    "/chain/f2b%2",
    "/chain/f2b%zz",
    "/chain/%%41",
    # encoded slash, backslash, control characters, percent itself
    "/chain/f2b-web%2Fipv4",
    "/chain/f2b-web%2fipv4",
    "/chain/f2b%5Cweb",
    "/chain/f2b-web%0A",
    "/chain/f2b-web%00",
    "/chain/f2b-web%0d%0aX-Injected:%201",
    "/chain/f2b-web%7F",
    "/chain/f2b-web%20",
    # double encoding
    "/chain/f2b%252Fweb",
    "/chain/%2525",
    "/chain/f2b%25web",
    # not UTF-8 after decoding, or UTF-8 outside the segment alphabet
    "/chain/%ff",
    "/chain/f2b%c3",
    "/chain/%c3%a9",
    "/chain/%c0%af",  # an overlong '/'
    # characters outside the segment alphabet
    "/chain/f2b!web",
    "/chain/f2b;web",
    "/chain/f2b'web",
    "/chain/f2b@web",
    # malformed queries
    "/chains?timeout",
    "/chains?=5",
    "/chains?timeout=",
    "/chains?timeout=abc",
    "/chains?timeout=1e5",
    "/chains?timeout=+5",
    "/chains?timeout=5&",
    "/chains?&timeout=5",
    "/chains?timeout=5;expire=6",
    "/chains?timeout=%35",
    "/chains?Timeout=5",
    "/chains?timeout=1234567890123",
    "/chains?timeout=5=6",
    "/chains?timeout=5?x=1",
    "/chains?t%69meout=5",
])
def test_parse_target_rejects(target: str) -> None:
    with pytest.raises(ValueError):
        parse_target(target)


def test_parse_target_rejections_never_echo_much() -> None:
    with pytest.raises(ValueError) as info:
        parse_target("/chains?" + "x" * 500 + "=1")
    assert len(str(info.value)) < 120


# -- parse_timeout ---------------------------------------------------------------------------


@pytest.mark.parametrize("pairs, expected", [
    ([], None),
    ([("timeout", "600")], 600),
    ([("expire", "600")], 600),                 # the rfw alias
    ([("timeout", "1")], 1),
    ([("timeout", str(MAX_TIMEOUT))], MAX_TIMEOUT),
    ([("timeout", "-1")], None),                # fail2ban's bantime -1: permanent
    ([("timeout", "0")], None),
    ([("expire", "0")], None),
    ([("timeout", "007")], 7),
])
def test_parse_timeout_valid(pairs: list[tuple[str, str]], expected: int | None) -> None:
    assert parse_timeout(pairs) == expected


@pytest.mark.parametrize("pairs", [
    [("timeout", "-2")],
    [("timeout", "-600")],
    [("timeout", str(MAX_TIMEOUT + 1))],
    [("timeout", "999999999999")],
    [("timeout", "5"), ("timeout", "5")],      # duplicate keys, even when equal
    [("timeout", "5"), ("expire", "5")],       # a key and its alias
    [("foo", "1")],
    [("timeout", "5"), ("bar", "1")],
    [("ttl", "5")],
])
def test_parse_timeout_rejects(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        parse_timeout(pairs)


# -- parse_segments ---------------------------------------------------------------------------


@pytest.mark.parametrize("family, address, prefix, expected", [
    ("ipv4", "203.0.113.9", None, "203.0.113.9/32"),
    ("ipv4", "203.0.113.0", "24", "203.0.113.0/24"),
    ("ipv4", "203.0.113.9", "32", "203.0.113.9/32"),
    ("ipv4", "128.0.0.0", "1", "128.0.0.0/1"),
    ("ipv6", "2001:db8:ffff::1", None, "2001:db8:ffff::1/128"),
    ("ipv6", "2001:db8:ffff::", "48", "2001:db8:ffff::/48"),
    ("ipv6", "2001:DB8:FFFF::", "48", "2001:db8:ffff::/48"),
    ("ipv6", "2001:db8:ffff:0:0:0:0:1", "128", "2001:db8:ffff::1/128"),
    ("ipv6", "8000::", "1", "8000::/1"),
])
def test_parse_network_valid(family: str, address: str, prefix: str | None, expected: str) -> None:
    assert parse_segments(family, address, prefix) == net(expected)


@pytest.mark.parametrize("family, address, prefix, fragment", [
    ("ipv5", "203.0.113.9", None, "family"),
    ("IPv4", "203.0.113.9", None, "family"),
    ("inet", "203.0.113.9", None, "family"),
    ("ipv4", "2001:db8::1", None, "not a valid ipv4"),            # wrong family for the path
    ("ipv6", "203.0.113.9", None, "not a valid ipv6"),
    ("ipv4", "203.0.113", None, "not a valid"),
    ("ipv4", "203.0.113.256", None, "not a valid"),
    ("ipv4", "203.000.113.9", None, "not a valid"),              # leading zeros are ambiguous (octal?)
    ("ipv4", "0x7f.0.0.1", None, "not a valid"),
    ("ipv4", "203.0.113.9/24", None, "not a valid"),
    ("ipv6", "2001:db8::1::2", None, "not a valid"),
    ("ipv6", "fe80::1%eth0", None, "scoped"),
    ("ipv6", "::ffff:203.0.113.9", None, "IPv4-mapped"),
    ("ipv6", "::ffff:cb00:7109", None, "IPv4-mapped"),
    ("ipv6", "::ffff:203.0.113.0", "120", "IPv4-mapped"),
    ("ipv4", "0.0.0.0", "0", "1 to 32"),                          # prefix 0 would block everyone
    ("ipv6", "::", "0", "1 to 128"),
    ("ipv4", "203.0.113.0", "33", "1 to 32"),
    ("ipv6", "2001:db8::", "129", "1 to 128"),
    ("ipv4", "203.0.113.0", "024", "whole number"),               # a leading zero
    ("ipv4", "203.0.113.0", "00", "whole number"),
    ("ipv4", "203.0.113.0", "-24", "whole number"),
    ("ipv4", "203.0.113.0", "+24", "whole number"),
    ("ipv4", "203.0.113.0", "24.0", "whole number"),
    ("ipv4", "203.0.113.0", "", "whole number"),
    ("ipv4", "203.0.113.0", "٢٤", "whole number"),                # Arabic-Indic digits are isdigit()
    ("ipv4", "203.0.113.0", "255.255.255.0", "whole number"),     # netmasks are not prefixes
])
def test_parse_network_rejects(family: str, address: str, prefix: str | None, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_segments(family, address, prefix)
    assert fragment in str(info.value)


@pytest.mark.parametrize("address, prefix, suggestion", [
    ("10.0.0.1", "8", "10.0.0.0/8"),
    ("203.0.113.9", "24", "203.0.113.0/24"),
    ("2001:db8:ffff::1", "48", "2001:db8:ffff::/48"),
    ("2001:db8:ffff:1::", "48", "2001:db8:ffff::/48"),
])
def test_host_bits_are_refused_with_the_right_suggestion(address: str, prefix: str, suggestion: str) -> None:
    family = "ipv6" if ":" in address else "ipv4"
    with pytest.raises(ValueError) as info:
        parse_segments(family, address, prefix)
    assert "host bits" in str(info.value)
    assert f"did you mean {suggestion}?" in str(info.value)


def test_client_address_normalises_what_the_socket_reports() -> None:
    assert peer_address("198.51.100.7") == ip("198.51.100.7")
    assert peer_address("::ffff:198.51.100.7") == ip("198.51.100.7")
    assert peer_address("2001:db8::7") == ip("2001:db8::7")
    assert peer_address("fe80::1%eth0") == ip("fe80::1")


# -- App: routing and auth order, against a recording stand-in for the worker ----------------

FAST = crypt_context().using(bcrypt__rounds=4)
PASSWORDS = {"admin": "admin-pw", "f2b": "f2b-pw", "reader": "reader-pw", "faraway": "faraway-pw"}
HASHES = {name: FAST.hash(pw) for name, pw in PASSWORDS.items()}
NOW = 1_700_000_000.0
CLIENT = ip("198.51.100.7")


def make_config(tmp_path: Path, **limits: Any) -> Config:
    return from_mapping({
        "listen": "127.0.0.1:8820",
        "plain_http": True,
        "state_dir": str(tmp_path),
        "log": {"file": None},
        "users": {
            "admin": {"password_hash": HASHES["admin"], "chains": ["*"], "override": True},
            "f2b": {"password_hash": HASHES["f2b"], "chains": ["f2b-*"]},
            "reader": {"password_hash": HASHES["reader"], "chains": ["*"], "read_only": True},
            "faraway": {"password_hash": HASHES["faraway"], "chains": ["*"], "allow_from": ["203.0.113.0/24"]},
        },
        "chains": {
            "f2b-web": {"hooks": ["INPUT"], "target": "DROP"},
            "f2b-ssh": {"hooks": ["INPUT"], "target": "REJECT"},
            "admin-list": {"hooks": ["INPUT", "FORWARD"], "target": "DROP"},
        },
        "never_block": ["127.0.0.0/8", "::1/128", "198.51.100.250/32", "10.1.0.0/16"],
        "limits": {"worker_timeout": 2, "auth_failures": 3, "auth_window": 60, **limits},
    }, tmp_path / "config.yaml")


class RecordingWorker:
    """Stands in for the firewall worker in routing tests: records every submitted command.

    `answer(command)` gives the result; by default a plausible one. `pending=True` hands back a
    future nobody completes, as a stuck worker would.
    """

    def __init__(self, answer: Callable[[Any], Any] | None = None, pending: bool = False):
        self.commands: list[Any] = []
        self.futures: list[Future[Any]] = []
        self.answer = answer or self.default_answer
        self.pending = pending

    @staticmethod
    def default_answer(cmd: Any) -> Any:
        if isinstance(cmd, Block):
            return Blocked(True, Entry(cmd.chain.name, cmd.network, cmd.chain.target, NOW, cmd.expires_at, cmd.actor))
        if isinstance(cmd, Unblock):
            return Unblocked(False, None)
        if isinstance(cmd, Lookup):
            return None
        raise AssertionError(f"unexpected command {cmd!r}")

    def submit(self, cmd: Any) -> Future[Any]:
        self.commands.append(cmd)
        fut: Future[Any] = Future()
        self.futures.append(fut)
        if not self.pending:
            try:
                result = self.answer(cmd)
            except Exception as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)
        return fut


class Client:
    """Calls App.handle the way the HTTP handler does, with Basic credentials built in."""

    def __init__(self, tmp_path: Path, worker: RecordingWorker | None = None, **limits: Any):
        self.config = make_config(tmp_path, **limits)
        self.worker = worker or RecordingWorker()
        self.clock_now = NOW
        self.runtime = Runtime(Generation(self.config, Authenticator(self.config.users)), self.worker,  # type: ignore[arg-type]
                               FailureThrottle())
        self.app = App(self.runtime, clock=lambda: self.clock_now)

    def __call__(self, method: str, target: str, user: str | None = "admin", password: str | None = None,
                 client: Any = CLIENT, authorization: str | None = None) -> Response:
        if authorization is None and user is not None:
            pw = PASSWORDS.get(user, "") if password is None else password
            authorization = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        return self.app.handle(method, target, authorization, client)


@pytest.fixture
def call(tmp_path: Path) -> Client:
    return Client(tmp_path)


def test_route_table() -> None:
    assert {key: tuple(methods) for key, methods in ROUTES.items()} == {
        ("health", 1): ("GET", "HEAD"),
        ("openapi.json", 1): ("GET", "HEAD"),
        ("version", 1): ("GET", "HEAD"),
        ("chains", 1): ("GET", "HEAD"),
        ("metrics", 1): ("GET", "HEAD"),
        ("fleet", 1): ("GET", "HEAD"),
        ("chain", 2): ("GET", "HEAD", "POST"),
        ("chain", 4): ("GET", "HEAD", "PUT", "DELETE"),
        ("chain", 5): ("GET", "HEAD", "PUT", "DELETE"),
    }


def test_health_needs_no_auth_and_reveals_nothing(call: Client) -> None:
    for method in ("GET", "HEAD"):
        for kwargs in ({"user": None}, {"authorization": "Basic !!"}, {"user": "admin", "password": "wrong"}):
            r = call(method, "/health", **kwargs)  # type: ignore[arg-type]
            assert (r.status, dict(r.body), r.headers) == (200, {"status": "ok"}, ())
    assert call.worker.commands == []


def test_health_answers_even_while_a_client_is_throttled(call: Client) -> None:
    for _ in range(3):
        call("GET", "/version", password="wrong")
    assert call("GET", "/version").status == 429
    assert call("GET", "/health", user=None).status == 200


@pytest.mark.parametrize("target", [
    "/nope", "/chain", "/chain/f2b-web/ipv4", "/chain/f2b-web/ipv4/203.0.113.0/24/x", "/health/x",
    "/chains/f2b-web", "/version/1", "/Chains", "/HEALTH",
])
def test_unknown_routes_are_404_even_without_auth(call: Client, target: str) -> None:
    r = call("GET", target, user=None)
    assert r.status == 404 and r.body["error"] == "not_found"


@pytest.mark.parametrize("method, target, allow", [
    ("POST", "/health", "GET, HEAD"),
    ("PUT", "/chains", "GET, HEAD"),
    ("DELETE", "/version", "GET, HEAD"),
    ("PUT", "/chain/f2b-web", "GET, HEAD, POST"),
    ("DELETE", "/chain/f2b-web", "GET, HEAD, POST"),
    ("POST", "/chain/f2b-web/ipv4/203.0.113.9", "GET, HEAD, PUT, DELETE"),
    ("PATCH", "/chain/f2b-web/ipv4/203.0.113.0/24", "GET, HEAD, PUT, DELETE"),
    ("OPTIONS", "/chain/f2b-web/ipv4/203.0.113.9", "GET, HEAD, PUT, DELETE"),
    ("get", "/chains", "GET, HEAD"),
])
def test_methods_not_allowed_are_405_with_allow(call: Client, method: str, target: str, allow: str) -> None:
    for user in (None, "admin"):
        r = call(method, target, user=user)
        assert r.status == 405 and r.body["error"] == "method_not_allowed"
        assert r.headers == (("Allow", allow),)
    assert call.worker.commands == []


@pytest.mark.parametrize("target", ["/chain/..", "/chain/f2b%2Fweb", "/chains?x"])
def test_unparseable_targets_are_400_before_auth(call: Client, target: str) -> None:
    r = call("GET", target, user=None)
    assert r.status == 400 and r.body["error"] == "bad_request"


def test_root_is_not_found(call: Client) -> None:
    r = call("GET", "/", user=None)
    assert r.status == 404 and r.body["error"] == "not_found"


@pytest.mark.parametrize("target", [
    "/version", "/chains", "/chain/f2b-web", "/chain/f2b-web/ipv4/203.0.113.9",
    # A chain that does not exist, or a bad address, still needs credentials first: nothing about
    # the config leaks to an anonymous client.
    "/chain/no-such-chain", "/chain/no-such-chain/ipv4/203.0.113.9", "/chain/f2b-web/ipv4/nonsense",
])
def test_everything_but_health_needs_credentials(call: Client, target: str) -> None:
    for method in ("GET", "HEAD") + (("PUT", "DELETE") if target.count("/") >= 4 else ()):
        r = call(method, target, user=None)
        assert r.status == 401, (method, target, r)
        assert r.headers == (("WWW-Authenticate", 'Basic realm="web-ipt-d", charset="UTF-8"'),)
        assert r.body["error"] == "unauthorized"
    assert call.worker.commands == []


@pytest.mark.parametrize("kwargs", [
    {"user": "admin", "password": "wrong"},
    {"user": "admin", "password": ""},
    {"authorization": "Basic !!"},
    {"authorization": "Bearer abc"},
    {"authorization": ""},
])
def test_bad_credentials_are_401(call: Client, kwargs: dict[str, Any]) -> None:
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9", **kwargs)
    assert r.status == 401 and dict(r.headers)["WWW-Authenticate"].startswith("Basic ")
    assert call.worker.commands == []


def test_unknown_user_is_401(call: Client) -> None:
    r = call("GET", "/chains", user="mallory", password="pw")
    assert r.status == 401 and call.worker.commands == []


def test_version(call: Client) -> None:
    r = call("GET", "/version")
    assert (r.status, dict(r.body)) == (200, {"version": __version__})
    assert call("GET", "/version?x=1").status == 400


def test_chains_lists_only_what_the_user_may_use(call: Client) -> None:
    r = call("GET", "/chains")
    assert r.status == 200
    assert [c["name"] for c in r.body["chains"]] == ["f2b-web", "f2b-ssh", "admin-list"]
    assert r.body["chains"][2] == {"name": "admin-list", "target": "DROP", "hooks": ["INPUT", "FORWARD"],
                                   "backend": "iptables", "match": "source", "interface": None}
    r = call("GET", "/chains", user="f2b")
    assert [c["name"] for c in r.body["chains"]] == ["f2b-web", "f2b-ssh"]
    assert call("GET", "/chains?timeout=5").status == 400
    assert call.worker.commands == []


def test_put_submits_exactly_one_block(call: Client) -> None:
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9?timeout=600")
    assert r.status == 201
    assert call.worker.commands == [Block(call.config.chains["f2b-web"], net("203.0.113.9/32"), NOW + 600, "admin",
                                          "198.51.100.7")]
    # The very Chain value of the request's config snapshot travels with the command.
    assert call.worker.commands[0].chain is call.config.chains["f2b-web"]
    assert r.body == {"chain": "f2b-web", "family": "ipv4", "network": "203.0.113.9/32", "proto": None, "port": None,
                      "target": "DROP",
                      "created_at": "2023-11-14T22:13:20Z", "expires_at": "2023-11-14T22:23:20Z",
                      "created_by": "admin", "claims": [{"owner": "admin", "created_at": "2023-11-14T22:13:20Z",
                                                         "expires_at": "2023-11-14T22:23:20Z", "node": None}]}


@pytest.mark.parametrize("query, expires_at", [
    ("", None), ("?timeout=-1", None), ("?timeout=0", None), ("?expire=0", None),
    ("?expire=30", NOW + 30), ("?timeout=1", NOW + 1),
])
def test_put_timeouts(call: Client, query: str, expires_at: float | None) -> None:
    assert call("PUT", "/chain/f2b-ssh/ipv6/2001:db8:ffff::/48" + query, user="f2b").status == 201
    assert call.worker.commands == [Block(call.config.chains["f2b-ssh"], net("2001:db8:ffff::/48"), expires_at,
                                          "f2b", "198.51.100.7")]


def test_put_of_an_existing_block_is_200(tmp_path: Path) -> None:
    def answer(cmd: Any) -> Any:
        return Blocked(False, Entry(cmd.chain.name, cmd.network, "DROP", NOW - 100, cmd.expires_at, "someone"))

    call = Client(tmp_path, RecordingWorker(answer))
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.0/24?timeout=60")
    assert r.status == 200 and r.body["created_by"] == "someone"


def test_delete_submits_exactly_one_unblock(tmp_path: Path) -> None:
    entry = Entry("f2b-web", net("203.0.113.9/32"), "DROP", NOW, None, "f2b")
    call = Client(tmp_path, RecordingWorker(lambda cmd: Unblocked(True, entry)))
    r = call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9", user="f2b")
    assert call.worker.commands == [Unblock(call.config.chains["f2b-web"], net("203.0.113.9/32"), "f2b",
                                            "198.51.100.7")]
    assert (r.status, r.body["deleted"], r.body["entry"]) == (200, True, entry.to_json())


def test_delete_of_an_absent_block_is_still_200(call: Client) -> None:
    r = call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9")
    assert (r.status, dict(r.body)) == (200, {"deleted": False, "released": False, "entry": None})


def test_delete_takes_no_query(call: Client) -> None:
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?timeout=5").status == 400
    assert call.worker.commands == []


def test_get_entry_submits_a_lookup(tmp_path: Path) -> None:
    entry = Entry("f2b-web", net("203.0.113.9/32"), "DROP", NOW, None, "admin")
    found: dict[Any, Any] = {net("203.0.113.9/32"): entry}
    call = Client(tmp_path, RecordingWorker(lambda cmd: found.get(cmd.network)))
    r = call("GET", "/chain/f2b-web/ipv4/203.0.113.9", user="reader")
    assert (r.status, r.body) == (200, entry.to_json())
    r = call("HEAD", "/chain/f2b-web/ipv4/203.0.113.10", user="reader")
    assert r.status == 404 and r.body["error"] == "not_blocked"
    assert call.worker.commands == [Lookup("f2b-web", net("203.0.113.9/32")),
                                    Lookup("f2b-web", net("203.0.113.10/32"))]
    assert call("GET", "/chain/f2b-web/ipv4/203.0.113.9?timeout=1").status == 400
    assert len(call.worker.commands) == 2


def test_get_chain_reads_the_store_and_submits_nothing(tmp_path: Path) -> None:
    entries = [Entry("admin-list", net("203.0.113.0/24"), "DROP", NOW, None, "admin"),
               Entry("admin-list", net("2001:db8:ffff::/48"), "DROP", NOW, 4102444800.0, "admin")]
    call = Client(tmp_path, RecordingWorker(lambda cmd: entries))
    store = Store(call.config.state_dir)
    store.write(entries, [])
    store.close()
    r = call("GET", "/chain/admin-list")
    assert call.worker.commands == [] and r.status == 200 and r.stream is not None
    # The whole chain comes as a stream, in the store's key order: the network's text.
    assert json.loads(b"".join(r.stream())) == {"chain": "admin-list", "entries": [e.to_json() for e in entries[::-1]]}


def test_read_only_user_may_read_but_submits_no_writes(call: Client) -> None:
    for method in ("PUT", "DELETE"):
        r = call(method, "/chain/f2b-web/ipv4/203.0.113.9", user="reader")
        assert r.status == 403 and r.body["error"] == "read_only"
    assert call.worker.commands == []
    assert call("GET", "/chain/f2b-web", user="reader").status == 200
    assert call("GET", "/chain/f2b-web/ipv4/203.0.113.9", user="reader").status == 404
    assert call.worker.commands == [Lookup("f2b-web", net("203.0.113.9/32"))]


def test_forbidden_chain_is_403_and_submits_nothing(call: Client) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = call(method, "/chain/admin-list/ipv4/203.0.113.9", user="f2b")
        assert r.status == 403 and r.body["error"] == "forbidden"
    assert call("GET", "/chain/admin-list", user="f2b").status == 403
    assert call.worker.commands == []


def test_unknown_chain_is_404_and_submits_nothing(call: Client) -> None:
    for target in ("/chain/f2b-nope", "/chain/f2b-nope/ipv4/203.0.113.9"):
        r = call("GET", target, user="f2b")
        assert r.status == 404 and r.body["error"] == "unknown_chain"
    assert call("PUT", "/chain/f2b-nope/ipv4/203.0.113.9").status == 404
    assert call.worker.commands == []


def test_a_user_cannot_tell_which_chains_outside_its_patterns_exist(call: Client) -> None:
    for target in ("/chain/admin-list", "/chain/admin-nope", "/chain/admin-list/ipv4/203.0.113.9",
                   "/chain/admin-nope/ipv4/203.0.113.9"):
        r = call("GET", target, user="f2b")
        assert r.status == 403 and r.body["error"] == "forbidden", (target, r)
    assert call.worker.commands == []


@pytest.mark.parametrize("target, error", [
    ("/chain/f2b.web/ipv4/203.0.113.9", "bad_chain"),             # '.' is a fine segment, not a chain name
    ("/chain/" + "c" * 29 + "/ipv4/203.0.113.9", "bad_chain"),
    ("/chain/f2b-web/ipv5/203.0.113.9", "bad_address"),
    ("/chain/f2b-web/ipv4/2001:db8::1", "bad_address"),
    ("/chain/f2b-web/ipv6/203.0.113.9", "bad_address"),
    ("/chain/f2b-web/ipv4/203.0.113.9/24", "bad_address"),         # host bits
    ("/chain/f2b-web/ipv4/0.0.0.0/0", "bad_address"),
    ("/chain/f2b-web/ipv4/203.0.113.0/024", "bad_address"),
    ("/chain/f2b-web/ipv6/::ffff:203.0.113.9", "bad_address"),
    ("/chain/f2b-web/ipv4/203.0.113.9?timeout=-5", "bad_query"),
    ("/chain/f2b-web/ipv4/203.0.113.9?timeout=1&timeout=2", "bad_query"),
    ("/chain/f2b-web/ipv4/203.0.113.9?ttl=5", "bad_query"),
    ("/chain/f2b-web/ipv4/203.0.113.9?timeout=315360001", "bad_query"),
    ("/chain/f2b-web/ipv4/203.0.113.9?timeout=1e3", "bad_request"),
    ("/chain/f2b-web/ipv4/203.0.113.9%2F24", "bad_request"),
])
def test_bad_put_is_400_and_submits_nothing(call: Client, target: str, error: str) -> None:
    r = call("PUT", target)
    assert r.status == 400 and r.body["error"] == error, r
    assert call.worker.commands == []


@pytest.mark.parametrize("network", ["127.0.0.1", "127.0.0.0/8", "127.0.0.0/9", "126.0.0.0/7",
                                      "198.51.100.250", "198.51.100.0/24", "10.1.2.3", "10.0.0.0/8"])
def test_never_block_is_409_and_submits_nothing(call: Client, network: str) -> None:
    r = call("PUT", "/chain/f2b-web/ipv4/" + network)
    assert r.status == 409 and r.body["error"] == "never_block"
    assert call.worker.commands == []


def test_never_block_for_ipv6(call: Client) -> None:
    assert call("PUT", "/chain/f2b-web/ipv6/::1").status == 409
    assert call("PUT", "/chain/f2b-web/ipv6/::/127").status == 409
    assert call.worker.commands == []
    # Unblocking and looking up a protected network are harmless and allowed.
    assert call("DELETE", "/chain/f2b-web/ipv6/::1").status == 200
    assert call("GET", "/chain/f2b-web/ipv4/127.0.0.1").status == 404
    assert [type(c) for c in call.worker.commands] == [Unblock, Lookup]


def test_allow_from_is_checked_after_authentication(call: Client) -> None:
    r = call("GET", "/chains", user="faraway")
    assert r.status == 403 and r.body["error"] == "forbidden"
    r = call("GET", "/chains", user="faraway", password="wrong")
    assert r.status == 401
    assert call("GET", "/chains", user="faraway", client=ip("203.0.113.5")).status == 200
    assert call("PUT", "/chain/f2b-web/ipv4/198.51.100.9", user="faraway", client=ip("203.0.113.5")).status == 201
    assert call("PUT", "/chain/f2b-web/ipv4/198.51.100.9", user="faraway", client=ip("2001:db8::5")).status == 403
    assert call.worker.commands == [Block(call.config.chains["f2b-web"], net("198.51.100.9/32"), None, "faraway",
                                          "203.0.113.5")]


def test_repeated_failures_throttle_even_good_credentials(call: Client) -> None:
    for _ in range(2):
        assert call("GET", "/version", password="wrong").status == 401
    # A success in between neither clears the count nor is refused yet.
    assert call("GET", "/version").status == 200
    assert call("GET", "/version", password="wrong").status == 401   # the third failure starts a throttle
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 429 and r.body["error"] == "throttled"
    assert r.headers == (("Retry-After", "60"),)
    assert call.worker.commands == []
    # Only that client is throttled; another address is unaffected.
    assert call("GET", "/version", client=ip("198.51.100.8")).status == 200
    call.clock_now += 30
    assert dict(call("GET", "/version").headers) == {"Retry-After": "30"}
    call.clock_now += 30
    assert call("GET", "/version").status == 200


def test_requests_without_credentials_are_not_counted_as_failures(call: Client) -> None:
    for _ in range(10):
        assert call("GET", "/version", user=None).status == 401
    assert call("GET", "/version").status == 200


def test_throttle_counts_ipv6_clients_per_64(call: Client) -> None:
    for i in range(3):
        call("GET", "/version", password="wrong", client=ip(f"2001:db8:0:1::{i + 1}"))
    assert call("GET", "/version", client=ip("2001:db8:0:1::99")).status == 429
    assert call("GET", "/version", client=ip("2001:db8:0:2::99")).status == 200


def test_worker_timeout_is_503_and_cancels_the_command(tmp_path: Path) -> None:
    call = Client(tmp_path, RecordingWorker(pending=True), worker_timeout=0.05)
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 503 and r.body["error"] == "worker_timeout"
    assert "nothing was changed" in r.body["message"]
    assert len(call.worker.futures) == 1 and call.worker.futures[0].cancelled()


def test_worker_timeout_after_the_worker_started_is_503_without_a_promise(tmp_path: Path) -> None:
    call = Client(tmp_path, RecordingWorker(pending=True), worker_timeout=0.05)
    original_submit = call.worker.submit

    def submit_and_start(cmd: Any) -> Future[Any]:
        fut = original_submit(cmd)
        assert fut.set_running_or_notify_cancel()  # what the worker does when it takes a command
        return fut

    call.worker.submit = submit_and_start  # type: ignore[method-assign]
    r = call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 503 and r.body["error"] == "worker_timeout"
    assert "may still be applied" in r.body["message"]
    assert not call.worker.futures[0].cancelled()


def test_firewall_unavailable_is_503(tmp_path: Path) -> None:
    def refuse(cmd: Any) -> Any:
        raise FirewallUnavailable("the firewall refused the change")

    call = Client(tmp_path, RecordingWorker(refuse))
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9")
    assert (r.status, r.body["error"]) == (503, "firewall_unavailable")
    assert call("GET", "/chain/f2b-web/ipv4/203.0.113.9").status == 503


def test_an_unexpected_error_is_a_generic_500_that_echoes_nothing(tmp_path: Path) -> None:
    def explode(cmd: Any) -> Any:
        raise RuntimeError("secret internals /var/lib/web-ipt-d")

    call = Client(tmp_path, RecordingWorker(explode))
    r = call("GET", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 500 and r.body["error"] == "internal_error"
    assert "secret" not in str(r.body) and "/var/lib" not in str(r.body)


def test_a_request_uses_one_config_snapshot(tmp_path: Path) -> None:
    # A reload that lands while a request waits for the worker does not change that request.
    swapped: list[Config] = []

    def reload_during(cmd: Any) -> Any:
        newer = make_config(tmp_path / "new", worker_timeout=1)
        call.runtime.generation = Generation(newer, Authenticator(newer.users))
        swapped.append(newer)
        return RecordingWorker.default_answer(cmd)

    (tmp_path / "new").mkdir()
    call = Client(tmp_path, RecordingWorker(reload_during))
    old = call.config
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 201
    assert call.worker.commands[0].chain is old.chains["f2b-web"]
    assert swapped and call.runtime.generation.config is swapped[0]
    # The next request sees the new generation, whose chain is an equal but distinct value.
    call("PUT", "/chain/f2b-web/ipv4/203.0.113.10")
    assert call.worker.commands[1].chain is swapped[0].chains["f2b-web"]


# -- claims: ?owner= -------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["sshd", "a", "x" * 64, "nginx-http-auth", "c0ffee.1:2_3-4", "A.b", ".", "-"])
def test_owner_labels(label: str) -> None:
    assert parse_owner([("owner", label), ("timeout", "5")]) == (label, [("timeout", "5")])
    assert parse_target(f"/chain/f2b-web/ipv4/203.0.113.9?owner={label}")[1] == [("owner", label)]


@pytest.mark.parametrize("label", ["", "x" * 65, "a/b", "a b", "a+b", "a%20b", "é", "a*", "**", "a,b", "a;b"])
def test_bad_owner_labels_are_400(call: Client, label: str) -> None:
    for method in ("PUT", "DELETE"):
        r = call(method, f"/chain/f2b-web/ipv4/203.0.113.9?owner={label}", user="f2b")
        assert r.status == 400 and r.body["error"] in ("bad_query", "bad_request"), (label, r)
    assert call.worker.commands == []


def test_put_with_an_owner_claims_for_user_slash_label(call: Client) -> None:
    assert call("PUT", "/chain/f2b-web/ipv4/203.0.113.9?owner=sshd&timeout=600", user="f2b").status == 201
    assert call("PUT", "/chain/f2b-web/ipv4/203.0.113.9?timeout=60&owner=nginx", user="f2b").status == 201
    chain = call.config.chains["f2b-web"]
    assert call.worker.commands == [
        Block(chain, net("203.0.113.9/32"), NOW + 600, "f2b", "198.51.100.7", "f2b/sshd"),
        Block(chain, net("203.0.113.9/32"), NOW + 60, "f2b", "198.51.100.7", "f2b/nginx")]


def test_delete_with_an_owner_releases_that_claim(call: Client) -> None:
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=sshd", user="f2b").status == 200
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9", user="f2b").status == 200
    chain = call.config.chains["f2b-web"]
    assert call.worker.commands == [Unblock(chain, net("203.0.113.9/32"), "f2b", "198.51.100.7", "f2b/sshd"),
                                    Unblock(chain, net("203.0.113.9/32"), "f2b", "198.51.100.7")]


def test_every_claim_at_once_takes_override(call: Client) -> None:
    r = call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=*", user="f2b")
    assert r.status == 403 and r.body["error"] == "forbidden" and "override" in r.body["message"]
    assert call.worker.commands == []
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=*").status == 200
    assert call.worker.commands == [Unblock(call.config.chains["f2b-web"], net("203.0.113.9/32"), "admin",
                                            "198.51.100.7", "", every_claim=True)]
    # Read-only comes first, and override is for DELETE only.
    assert call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=*", user="reader").body["error"] == "read_only"
    r = call("PUT", "/chain/f2b-web/ipv4/203.0.113.9?owner=*")
    assert r.status == 400 and r.body["error"] == "bad_query"
    assert len(call.worker.commands) == 1


@pytest.mark.parametrize("method, target", [
    ("GET", "/chain/f2b-web/ipv4/203.0.113.9?owner=sshd"), ("HEAD", "/chain/f2b-web/ipv4/203.0.113.9?owner=sshd"),
    ("GET", "/chain/f2b-web?owner=sshd"), ("GET", "/chains?owner=sshd"), ("GET", "/version?owner=sshd"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?owner=a&owner=b"),
    ("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=a&owner=a"),
    ("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=a&timeout=5"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?owner"),
    ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?Owner=a"), ("PUT", "/chain/f2b-web/ipv4/203.0.113.9?owner=a&timeout=x"),
    ("POST", "/chain/f2b-web?owner=*"),
])
def test_owner_where_it_does_not_belong_is_400(call: Client, method: str, target: str) -> None:
    r = call(method, target)
    assert r.status == 400, r
    assert call.worker.commands == []


def test_a_bulk_block_takes_an_owner(tmp_path: Path) -> None:
    from webiptd.commands import BulkBlock
    seen: list[Any] = []

    def answer(cmd: Any) -> Any:
        seen.append(cmd)
        return [Blocked(True, Entry(cmd.chain.name, n, "DROP", NOW, None, cmd.owner)) for n in cmd.networks]

    call = Client(tmp_path, RecordingWorker(answer))
    r = call.app.handle("POST", "/chain/f2b-web?owner=feed", "Basic " + base64.b64encode(b"f2b:f2b-pw").decode(),
                        CLIENT, body=b'["203.0.113.9"]')
    assert r.status == 200, r
    assert isinstance(seen[0], BulkBlock) and seen[0].owner == "f2b/feed"


def test_delete_answers_released_and_the_entry_left(tmp_path: Path) -> None:
    from webiptd.commands import Claim
    left = Entry.of("f2b-web", net("203.0.113.9/32"), "DROP", NOW, "f2b/sshd", [Claim("f2b/nginx", NOW + 1, None)])
    call = Client(tmp_path, RecordingWorker(lambda cmd: Unblocked(False, left, True)))
    r = call("DELETE", "/chain/f2b-web/ipv4/203.0.113.9?owner=sshd", user="f2b")
    assert (r.status, r.body["deleted"], r.body["released"]) == (200, False, True)
    assert r.body["entry"]["claims"] == [{"owner": "f2b/nginx", "created_at": "2023-11-14T22:13:21Z",
                                          "expires_at": None, "node": None}]
    assert r.body["entry"]["created_by"] == "f2b/sshd"


def test_override_is_a_user_key(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert config.users["admin"].override is True and config.users["f2b"].override is False
    from webiptd.config import ConfigError
    raw = {"listen": "127.0.0.1:8820", "plain_http": True, "state_dir": str(tmp_path), "log": {"file": None},
           "users": {"x": {"password_hash": HASHES["admin"], "chains": ["*"], "override": "yes"}},
           "chains": {"f2b-web": {}}}
    with pytest.raises(ConfigError, match="users.x.override"):
        from_mapping(raw, tmp_path / "config.yaml")


def test_the_openapi_document_is_served_without_credentials(call: Client) -> None:
    r = call("GET", "/openapi.json", user=None)
    assert r.status == 200 and r.raw is not None and r.content_type == "application/json"
    document = json.loads(r.raw)
    assert document["openapi"].startswith("3.1") and "/chain/{chain}/ipv4/{address}" in document["paths"]
    assert call("PUT", "/openapi.json", user=None).status == 405
    assert call.worker.commands == []


@pytest.mark.parametrize("query, pairs", [
    ("owner=%2A", [("owner", "*")]),                   # what URL libraries send for owner=*
    ("owner=jail%3Asshd", [("owner", "jail:sshd")]),
    ("proto=tcp&port=22%2C80%3A90", [("proto", "tcp"), ("port", "22,80:90")]),
    ("port=a%2Bb", [("port", "a+b")]),
])
def test_text_query_values_may_be_percent_encoded_and_are_decoded_once(query: str, pairs: list[Any]) -> None:
    assert parse_target(f"/x?{query}")[1] == pairs


@pytest.mark.parametrize("query", ["owner=%20", "owner=%7F", "owner=%0A", "owner=%", "owner=%2", "timeout=%31"])
def test_encoded_query_values_outside_visible_ascii_are_refused(query: str) -> None:
    with pytest.raises(ValueError):
        parse_target(f"/x?{query}")
