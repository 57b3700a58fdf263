"""Pure tests of webiptd.auth: strict Basic parsing, hash verification with a cache, and the failure throttle.

No root and no network; hashes use real schemes at low cost so the tests stay fast.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import threading
import time
from typing import Any, Iterator

import pytest

import webiptd.auth as auth
from webiptd.auth import AuthFailure, Authenticator, FailureThrottle, parse_basic
from webiptd.net import client_key
from webiptd.passwords import context as crypt_context
from webiptd.config import User

BCRYPT = crypt_context().using(bcrypt__rounds=4)
HASHES = {
    "bcrypt": lambda pw: BCRYPT.hash(pw),
    "argon2": lambda pw: crypt_context().handler("argon2").using(rounds=1, memory_cost=1024, parallelism=1).hash(pw),
    "sha512_crypt": lambda pw: crypt_context().handler("sha512_crypt").using(rounds=1000).hash(pw),
}
ip = ipaddress.ip_address


def basic(user: str | bytes, password: str | bytes = b"", scheme: str = "Basic") -> str:
    raw = user if isinstance(user, bytes) else f"{user}:{password}".encode()
    return f"{scheme} {base64.b64encode(raw).decode()}"


def make_user(name: str, password: str, scheme: str = "bcrypt") -> User:
    return User(name, HASHES[scheme](password), ("*",), (), False)


class VerifyCounter:
    """Wraps crypt_context().verify to count calls; the real verify still runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls: list[str] = []  # the hash each call checked against
        real = crypt_context().verify

        def counting(secret: Any, hash: Any, *args: Any, **kw: Any) -> bool:
            self.calls.append(hash)
            return real(secret, hash, *args, **kw)

        monkeypatch.setattr(crypt_context(), "verify", counting)

    @property
    def count(self) -> int:
        return len(self.calls)


@pytest.fixture
def verify(monkeypatch: pytest.MonkeyPatch) -> VerifyCounter:
    return VerifyCounter(monkeypatch)


# -- parse_basic ---------------------------------------------------------------------------


def test_parse_basic_accepts_a_well_formed_header() -> None:
    assert parse_basic(basic("alice", "s3cret")) == ("alice", "s3cret")
    # RFC 7617: the password is everything after the first colon, and may hold colons itself.
    assert parse_basic(basic("alice", "a:b:c")) == ("alice", "a:b:c")
    assert parse_basic(basic("alice", "")) == ("alice", "")
    assert parse_basic(basic("älice", "pässwörd")) == ("älice", "pässwörd")


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_parse_basic_scheme_is_case_insensitive(scheme: str) -> None:
    assert parse_basic(basic("alice", "pw", scheme=scheme)) == ("alice", "pw")


GOOD_TOKEN = base64.b64encode(b"alice:pw").decode()


@pytest.mark.parametrize("header", [
    None,
    "",
    " ",
    "Basic",
    "Basic ",
    "Basic  ",
    f"Bearer {GOOD_TOKEN}",
    f"Digest {GOOD_TOKEN}",
    f"Basic{GOOD_TOKEN}",
    f"Basic\t{GOOD_TOKEN}",
    f" Basic {GOOD_TOKEN}",
    "Basic !!!!",                                         # not base64
    "Basic YWxpY2U6cHc",                                  # missing padding
    "Basic YWxp Y2U6cHc=",                                # whitespace inside the token
    "Basic YWxp\tY2U6cHc=",
    "Basic YWxp\nY2U6cHc=",
    f"Basic {GOOD_TOKEN} extra",
    f"Basic {GOOD_TOKEN}é",                               # non-ASCII in the token
    basic(b"alicepw"),                                    # no colon
    basic(b":pw"),                                        # empty user
    basic(b""),
    basic(b"al\x01ice:pw"),                               # control characters
    basic(b"alice:p\x00w"),
    basic(b"alice:pw\x7f"),
    basic(b"alice:pw\n"),
    basic(b"alice:\xff\xfe"),                             # not UTF-8
    basic(b"\xc3:pw"),
    basic("alice", "x" * 4000),                           # over-long header
])
def test_parse_basic_rejects_malformed_headers(header: str | None) -> None:
    with pytest.raises(AuthFailure) as info:
        parse_basic(header)
    # The message is safe to log: it never holds what the client sent.
    assert "alice" not in str(info.value) and "pw" not in str(info.value)


def test_parse_basic_header_length_limit() -> None:
    header = basic("alice", "x" * 3000)
    assert len(header) <= auth.MAX_HEADER_LENGTH
    assert parse_basic(header) == ("alice", "x" * 3000)
    longest = basic("alice", "x" * 5000)[: auth.MAX_HEADER_LENGTH + 1]
    with pytest.raises(AuthFailure):
        parse_basic(longest)


def test_parse_basic_never_raises_anything_but_auth_failure() -> None:
    rng = random.Random(7617)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= :\t\r\n\x00\x7f\xe9\u2028\udcff"
    seeds = [basic("alice", "pw"), basic("alice", "pässwörd"), "Basic ", "basic =", "Basic ===="]
    for i in range(3000):
        if i % 2:
            header = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
            if rng.random() < 0.5:
                header = "Basic " + header
        else:
            header = list(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                pos = rng.randrange(0, len(header) + 1)
                header.insert(pos, rng.choice(alphabet))
            header = "".join(header)
        try:
            user, password = parse_basic(header)
        except AuthFailure:
            continue
        assert user and ":" not in user
        assert not any(ord(c) < 0x20 or c == "\x7f" for c in user + password)


# -- Authenticator -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(HASHES))
def test_right_password_works_wrong_fails(scheme: str) -> None:
    alice = make_user("alice", "correct horse", scheme)
    authn = Authenticator({"alice": alice})
    assert authn.authenticate(basic("alice", "correct horse")) is alice
    for wrong in ("correct hors", "correct horse ", "Correct horse", ""):
        with pytest.raises(AuthFailure):
            authn.authenticate(basic("alice", wrong))


def test_unknown_user_fails_after_a_dummy_verify(verify: VerifyCounter) -> None:
    authn = Authenticator({"alice": make_user("alice", "pw")})
    # "ALICE" is unknown too: user names are exact. The same unknown user twice is verified twice:
    # failures are never cached.
    for name in ("mallory", "ALICE", "mallory"):
        with pytest.raises(AuthFailure) as unknown:
            authn.authenticate(basic(name, "pw"))
    # Each unknown-user attempt costs one real hash verification, like a wrong password does.
    assert verify.count == 3
    dummy = verify.calls[0]
    assert verify.calls == [dummy, dummy, dummy]
    assert crypt_context().identify(dummy) == "bcrypt"
    # At the default cost, not a cheap one: an unknown user is never the fast path.
    bcrypt = crypt_context().handler("bcrypt")
    assert bcrypt.from_string(dummy).rounds == bcrypt.default_rounds
    with pytest.raises(AuthFailure) as wrong:
        authn.authenticate(basic("alice", "nope"))
    assert verify.count == 4
    assert str(unknown.value) == str(wrong.value), "the two failures must look the same"


def test_second_success_is_served_from_the_cache(verify: VerifyCounter) -> None:
    alice = make_user("alice", "pw")
    authn = Authenticator({"alice": alice})
    assert authn.authenticate(basic("alice", "pw")) is alice
    assert verify.count == 1
    for _ in range(5):
        assert authn.authenticate(basic("alice", "pw")) is alice
    assert verify.count == 1


def test_cache_is_keyed_by_password_and_by_user(verify: VerifyCounter) -> None:
    alice, bob = make_user("alice", "pw"), make_user("bob", "other")
    authn = Authenticator({"alice": alice, "bob": bob})
    authn.authenticate(basic("alice", "pw"))
    assert verify.count == 1
    # A different password for the cached user is verified again, and fails.
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("alice", "pw2"))
    assert verify.count == 2
    # The same password for another user does not ride on alice's cache entry.
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("bob", "pw"))
    assert verify.count == 3
    # Failures are never cached.
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("alice", "pw2"))
    assert verify.count == 4


class GatedVerify:
    """crypt_context().verify that holds every caller until released, counting the calls; the real verify runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        self.gate = threading.Event()
        real = crypt_context().verify

        def gated(secret: Any, hash: Any, *args: Any, **kw: Any) -> bool:
            self.calls += 1
            assert self.gate.wait(10)
            return real(secret, hash, *args, **kw)

        monkeypatch.setattr(crypt_context(), "verify", gated)


def concurrent_logins(authn: Authenticator, header: str, gated: GatedVerify, n: int = 8) -> list[Any]:
    """`n` threads log in at once with one credential; the verify is held until all of them have asked."""
    results: list[Any] = [None] * n

    def login(i: int) -> None:
        try:
            results[i] = authn.authenticate(header)
        except AuthFailure as exc:
            results[i] = exc

    threads = [threading.Thread(target=login, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every thread has asked by now: without single flight each would be in verify
    calls_while_held = gated.calls
    gated.gate.set()
    for t in threads:
        t.join(10)
    assert calls_while_held == 1, f"{calls_while_held} verifies for one credential at once"
    return results


def test_concurrent_first_logins_with_one_credential_pay_one_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    alice = make_user("alice", "pw")
    authn = Authenticator({"alice": alice})
    gated = GatedVerify(monkeypatch)
    assert concurrent_logins(authn, basic("alice", "pw"), gated) == [alice] * 8
    assert authn.authenticate(basic("alice", "pw")) is alice
    assert gated.calls == 1, "the success is cached"


def test_concurrent_wrong_passwords_share_a_verify_and_each_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    authn = Authenticator({"alice": make_user("alice", "pw")})
    gated = GatedVerify(monkeypatch)
    results = concurrent_logins(authn, basic("alice", "wrong"), gated)
    assert all(isinstance(r, AuthFailure) for r in results), results  # each caller counts its failure
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("alice", "wrong"))
    assert gated.calls == 2, "a failure is never cached"
    unknown = concurrent_logins(authn, basic("mallory", "x"), GatedVerify(monkeypatch))
    assert all(isinstance(r, AuthFailure) for r in unknown)


def test_failed_verifications_do_not_poison_the_cache(verify: VerifyCounter) -> None:
    alice = make_user("alice", "pw")
    authn = Authenticator({"alice": alice})
    for _ in range(3):
        with pytest.raises(AuthFailure):
            authn.authenticate(basic("alice", "wrong"))
    assert authn.authenticate(basic("alice", "pw")) is alice
    assert authn.authenticate(basic("alice", "pw")) is alice
    assert verify.count == 4


def test_a_new_authenticator_starts_with_an_empty_cache(verify: VerifyCounter) -> None:
    alice = make_user("alice", "pw")
    users = {"alice": alice}
    first = Authenticator(users)
    first.authenticate(basic("alice", "pw"))
    first.authenticate(basic("alice", "pw"))
    assert verify.count == 1
    reloaded = Authenticator(users)  # what a reload builds
    reloaded.authenticate(basic("alice", "pw"))
    assert verify.count == 2


def test_a_reload_that_removes_a_user_or_changes_a_password_takes_effect() -> None:
    alice = make_user("alice", "old")
    first = Authenticator({"alice": alice})
    first.authenticate(basic("alice", "old"))
    changed = Authenticator({"alice": make_user("alice", "new")})
    with pytest.raises(AuthFailure):
        changed.authenticate(basic("alice", "old"))
    assert changed.authenticate(basic("alice", "new")).name == "alice"
    gone = Authenticator({})
    with pytest.raises(AuthFailure):
        gone.authenticate(basic("alice", "old"))


def _walk(value: Any, seen: set[int]) -> Iterator[Any]:
    if id(value) in seen:
        return
    seen.add(id(value))
    yield value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(k, seen)
            yield from _walk(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _walk(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _walk(vars(value), seen)


def test_the_cache_holds_no_plaintext() -> None:
    password = "very-distinctive-password-4711"
    authn = Authenticator({"alice": make_user("alice", password)})
    authn.authenticate(basic("alice", password))
    authn.authenticate(basic("alice", password))
    encoded = password.encode()
    found = []
    for value in _walk(vars(authn), set()):
        if isinstance(value, str) and password in value:
            found.append(value)
        elif isinstance(value, (bytes, bytearray)) and (encoded in value or base64.b64encode(encoded) in value):
            found.append(value)
    assert found == []


def test_an_over_long_password_is_a_clean_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    authn = Authenticator({"alice": make_user("alice", "pw"), "carol": make_user("carol", "pw", "argon2")})
    huge = "p" * 5000
    # Through the header, the length limit refuses it before any hashing.
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("alice", huge))
    # Past that limit, passlib refuses secrets over 4096 bytes with a ValueError; that is a failed
    # login too, not a 500.
    monkeypatch.setattr(auth, "MAX_HEADER_LENGTH", 100_000)
    for name in ("alice", "carol", "mallory"):
        with pytest.raises(AuthFailure):
            authn.authenticate(basic(name, huge))


def test_bcrypt_passwords_over_72_bytes_fail_cleanly() -> None:
    # bcrypt >= 5 refuses secrets over 72 bytes outright; a login with one must fail, never raise.
    authn = Authenticator({"alice": make_user("alice", "pw")})
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("alice", "x" * 100))
    with pytest.raises(AuthFailure):
        authn.authenticate(basic("mallory", "x" * 100))


def test_long_passwords_work_with_argon2() -> None:
    long_pw = "long passphrase " * 8  # 128 bytes
    carol = make_user("carol", long_pw, "argon2")
    assert Authenticator({"carol": carol}).authenticate(basic("carol", long_pw)) is carol


def test_malformed_headers_fail_without_verifying(verify: VerifyCounter) -> None:
    authn = Authenticator({"alice": make_user("alice", "pw")})
    for header in (None, "", "Basic !!", basic(b"nocolon")):
        with pytest.raises(AuthFailure):
            authn.authenticate(header)
    assert verify.count == 0


def test_a_broken_hash_is_a_failed_login_not_a_crash() -> None:
    # config.load refuses such hashes; an Authenticator built some other way still never raises past AuthFailure.
    broken = User("alice", "$2b$12$garbage", ("*",), (), False)
    with pytest.raises(AuthFailure):
        Authenticator({"alice": broken}).authenticate(basic("alice", "pw"))


# -- FailureThrottle -----------------------------------------------------------------------

LIMIT, WINDOW = 5, 60.0


def fail(throttle: FailureThrottle, client: str, now: float, times: int = 1) -> list[bool]:
    return [throttle.record_failure(ip(client), now, LIMIT, WINDOW) for _ in range(times)]


def test_below_the_limit_is_not_throttled() -> None:
    t = FailureThrottle()
    assert fail(t, "198.51.100.7", 1000.0, LIMIT - 1) == [False] * (LIMIT - 1)
    assert t.retry_after(ip("198.51.100.7"), 1000.0) is None


def test_at_the_limit_the_client_is_throttled_for_the_window() -> None:
    t = FailureThrottle()
    assert fail(t, "198.51.100.7", 1000.0, LIMIT) == [False] * (LIMIT - 1) + [True]
    assert t.retry_after(ip("198.51.100.7"), 1000.0) == pytest.approx(WINDOW)
    assert t.retry_after(ip("198.51.100.7"), 1030.0) == pytest.approx(WINDOW - 30)
    # Only the failing client; its neighbour is untouched.
    assert t.retry_after(ip("198.51.100.8"), 1000.0) is None
    # Further failures while throttled do not start a second throttle nor stretch the first.
    assert fail(t, "198.51.100.7", 1010.0) == [False]
    assert t.retry_after(ip("198.51.100.7"), 1010.0) == pytest.approx(WINDOW - 10)


def test_failures_spread_over_the_window_still_count() -> None:
    # There is no success API at all: nothing but time clears failures. Failures spaced out
    # within the window all count towards the limit.
    t = FailureThrottle()
    starts = [fail(t, "198.51.100.7", 1000.0 + i * (WINDOW - 1) / LIMIT) for i in range(LIMIT)]
    assert starts[-1] == [True]
    assert not hasattr(t, "record_success") and not hasattr(t, "reset")


def test_failures_older_than_the_window_are_forgotten() -> None:
    t = FailureThrottle()
    fail(t, "198.51.100.7", 1000.0, LIMIT - 1)
    # One window later the old failures no longer count: this one is the first of a new run.
    assert fail(t, "198.51.100.7", 1000.0 + WINDOW) == [False]
    assert t.retry_after(ip("198.51.100.7"), 1000.0 + WINDOW) is None


def test_the_throttle_expires_after_the_window() -> None:
    t = FailureThrottle()
    fail(t, "198.51.100.7", 1000.0, LIMIT)
    assert t.retry_after(ip("198.51.100.7"), 1000.0 + WINDOW - 0.5) == pytest.approx(0.5)
    assert t.retry_after(ip("198.51.100.7"), 1000.0 + WINDOW) is None
    # Expiry starts a clean slate rather than re-throttling on the next single failure.
    assert fail(t, "198.51.100.7", 1000.0 + WINDOW + 1) == [False]
    assert t.retry_after(ip("198.51.100.7"), 1000.0 + WINDOW + 1) is None


def test_ipv6_clients_are_counted_per_64() -> None:
    t = FailureThrottle()
    for i in range(LIMIT):
        # Every failure from a different address in the same /64.
        t.record_failure(ip(f"2001:db8:1:2::{i + 1:x}"), 1000.0, LIMIT, WINDOW)
    assert t.retry_after(ip("2001:db8:1:2:ffff::1"), 1000.0) == pytest.approx(WINDOW)
    assert t.retry_after(ip("2001:db8:1:3::1"), 1000.0) is None
    assert client_key(ip("2001:db8:1:2::1")) == client_key(ip("2001:db8:1:2:abcd::9")) == "2001:db8:1:2::/64"


def test_ipv4_mapped_ipv6_counts_as_ipv4() -> None:
    t = FailureThrottle()
    fail(t, "::ffff:198.51.100.7", 1000.0, LIMIT - 1)
    assert fail(t, "198.51.100.7", 1000.0) == [True]
    assert t.retry_after(ip("::ffff:198.51.100.7"), 1000.0) == pytest.approx(WINDOW)
    assert client_key(ip("::ffff:198.51.100.7")) == "198.51.100.7"
    # ... and not as the /64 ::ffff:0:0/64 that would lump every IPv4 client together.
    assert t.retry_after(ip("::ffff:198.51.100.8"), 1000.0) is None


def test_memory_is_bounded_and_the_oldest_client_is_forgotten() -> None:
    t = FailureThrottle(max_clients=3)
    fail(t, "198.51.100.1", 1000.0, LIMIT)           # throttled
    assert t.retry_after(ip("198.51.100.1"), 1000.0) is not None
    fail(t, "198.51.100.2", 1001.0, LIMIT - 1)
    fail(t, "198.51.100.3", 1002.0)
    fail(t, "198.51.100.4", 1003.0)                  # a fourth client: the oldest (.1) goes
    assert t.retry_after(ip("198.51.100.1"), 1003.0) is None
    # .2 was kept: one more failure reaches its limit.
    assert fail(t, "198.51.100.2", 1004.0) == [True]


def test_recently_failing_clients_are_kept_over_older_ones() -> None:
    t = FailureThrottle(max_clients=2)
    fail(t, "198.51.100.1", 1000.0, LIMIT - 1)
    fail(t, "198.51.100.2", 1001.0)
    fail(t, "198.51.100.1", 1002.0, 0)               # nothing
    assert fail(t, "198.51.100.1", 1002.0) == [True]  # .1 touched last, so it is the newest
    fail(t, "198.51.100.3", 1003.0)                  # evicts .2, not .1
    assert t.retry_after(ip("198.51.100.1"), 1003.0) is not None
