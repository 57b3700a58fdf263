"""HTTP Basic authentication (RFC 7617) against passlib hashes, and a throttle for failures.

An `Authenticator` belongs to one config generation; a reload builds a new one, which drops the cache.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
import secrets
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Mapping

from webiptd import passwords
from webiptd.net import client_key

if TYPE_CHECKING:
    from webiptd.config import User
    from webiptd.net import Address

logger = logging.getLogger(__name__)

MAX_HEADER_LENGTH = 4096
MAX_CACHED = 10_000


CONTROL_RE = re.compile("[\x00-\x1f\x7f]")  # no control character in a user name or password


class AuthFailure(Exception):
    """Credentials are missing, malformed or wrong. The message is safe to log; it never holds secrets."""


def parse_basic(header: str | None) -> tuple[str, str]:
    """Parse an Authorization header strictly into (user, password)."""
    if header is None:
        raise AuthFailure("no credentials")
    if len(header) > MAX_HEADER_LENGTH:
        raise AuthFailure("malformed Authorization header")
    scheme, sep, token = header.partition(" ")
    if not sep or scheme.lower() != "basic" or not token or " " in token.strip(" "):
        raise AuthFailure("malformed Authorization header")
    try:
        decoded = base64.b64decode(token.strip(" "), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise AuthFailure("malformed Authorization header") from None
    user, sep, password = decoded.partition(":")
    if not sep or not user or CONTROL_RE.search(decoded):
        raise AuthFailure("malformed Authorization header")
    return user, password


_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def _dummy() -> str:
    """A hash of a random secret, verified for unknown users so they cost what known ones do."""
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = passwords.hash_password(secrets.token_urlsafe(24))
        return _dummy_hash


class _Verify:
    """One verification in flight; callers with the same credential wait for it instead of paying their own."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class Authenticator:
    """Verifies credentials for one config's users, caching successes under a keyed MAC.

    A hash is verified once per credential however many requests bring it at the same time ("single
    flight"): the others wait for that verify. Only a success is cached, so a wrong password costs a
    verify each time it is tried after the one in flight, and the caller counts each failure.
    """

    def __init__(self, users: Mapping[str, User]):
        self._users = users
        # The cache holds HMAC(random key, user, password): no plaintext, useless outside this process.
        self._key = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._in_flight: dict[bytes, _Verify] = {}
        self._lock = threading.Lock()

    def cached(self, header: str | None) -> User | None:
        """The user these credentials verified as before (in the cache), else None, at the cost of one HMAC:
        never a password hash's verify, so never a wait."""
        try:
            name, password = parse_basic(header)
        except AuthFailure:
            return None
        user = self._users.get(name)
        if user is None:
            return None
        tag = hmac.digest(self._key, f"{name}\0{password}".encode("utf-8", "surrogatepass"), "sha256")
        return user if tag in self._verified else None

    def authenticate(self, header: str | None) -> User:
        name, password = parse_basic(header)
        user = self._users.get(name)
        tag = hmac.digest(self._key, f"{name}\0{password}".encode("utf-8", "surrogatepass"), "sha256")
        with self._lock:
            if user is not None and tag in self._verified:
                return user
            flight = self._in_flight.get(tag)
            leader = flight is None
            if flight is None:
                flight = self._in_flight[tag] = _Verify()
        if leader:
            try:
                # An unknown user costs a verify of a dummy hash, like a known one, and always fails.
                ok = passwords.verify(password, user.password_hash if user is not None else _dummy())
                flight.ok = ok and user is not None
            finally:
                with self._lock:
                    if flight.ok:
                        if len(self._verified) >= MAX_CACHED:
                            self._verified.clear()
                        self._verified.add(tag)
                    del self._in_flight[tag]
                flight.done.set()
        else:
            flight.done.wait()
        if not flight.ok or user is None:
            raise AuthFailure("unknown user or wrong password")
        return user


class FailureThrottle:
    """Counts failed logins per client; past the limit the client gets 429 until the window passes.

    A success does not clear anything, so a guesser cannot reset its count by
    interleaving a known-good login. Memory is bounded: the least recently seen
    clients are forgotten first.
    """

    def __init__(self, max_clients: int = 65_536):
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._throttled_until: dict[str, float] = {}
        self._max_clients = max_clients
        self._lock = threading.Lock()

    def retry_after(self, address: Address, now: float) -> float | None:
        """Seconds until `address` may try again, or None when it is not throttled."""
        if not self._throttled_until:
            return None  # nobody is: the usual case, asked on every request, so without the key or the lock
        key = client_key(address)
        with self._lock:
            until = self._throttled_until.get(key)
            if until is None:
                return None
            if until <= now:
                del self._throttled_until[key]
                self._failures.pop(key, None)
                return None
            return until - now

    def record_failure(self, address: Address, now: float, limit: int, window: float) -> bool:
        """Count one failure; True when this failure starts a throttle."""
        key = client_key(address)
        with self._lock:
            times = self._failures.pop(key, None) or deque()
            self._failures[key] = times
            times.append(now)
            while times and times[0] <= now - window:
                times.popleft()
            while len(times) > limit:
                times.popleft()
            while len(self._failures) > self._max_clients:
                old, _ = self._failures.popitem(last=False)
                self._throttled_until.pop(old, None)
            if len(times) >= limit and key not in self._throttled_until:
                self._throttled_until[key] = now + window
                return True
            return False
