"""The HTTPS API: routes as a pure request-to-response function, a thin handler, and the server.

The TLS handshake runs in each connection's own thread, never in the accept loop,
so a silent client stalls nobody. Every response is JSON; every bad input is a 4xx.
"""

from __future__ import annotations

import email.utils
import http.server
import io
import json
import logging
import re
import socket
import socketserver
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, cast

from webiptd import __version__
from webiptd.admission import BODY, BUSY, HEAD, IDLE, Admission, Slot, peer_address
from webiptd.auth import AuthFailure, Authenticator, FailureThrottle, client_key
from webiptd.commands import (
    Block, Blocked, BulkBlock, Command, Entry, FirewallFull, FirewallUnavailable, ListChain, Lookup, Unblock, Unblocked,
    parse_item, parse_network,
)
from webiptd.config import CHAIN_NAME_RE, Address, Chain, Config, Network, User
from webiptd.firewall.worker import Worker
from webiptd.log import Reason

logger = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 16384
MAX_IGNORED_BODY = 65536
MAX_TIMEOUT = 10 * 365 * 86400  # ten years; anything longer is a typo, and permanent is -1 or 0
REALM = 'Basic realm="web-ipt-d", charset="UTF-8"'
PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.:-]+\Z")
PLAIN_PATH_RE = re.compile(r"(?:/[A-Za-z0-9_.:-]+)+\Z")  # nothing to decode: the usual target
PRINTABLE_RE = re.compile(r"[!-~]*\Z")
PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
QUERY_KEY_RE = re.compile(r"[a-z_]{1,32}\Z")
QUERY_VALUE_RE = re.compile(r"-?[0-9]{1,12}\Z")
METHOD_RE = re.compile(r"^[A-Z]{1,16}\Z")
REQUEST_LINE_RE = re.compile(rb"[!-~]+ [!-~]+ HTTP/1\.[0-9]\r?\n\Z")  # RFC 9112 section 3
# RFC 9112 section 5: field-name is a token and ':' follows it at once; the value is visible ASCII, obs-text,
# space and tab. A line that ends at EOF without its newline is still a line, as http.client took it.
HEADER_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)(?:\r?\n)?\Z")
MAX_HEADER_LINES = 100  # the blank line included, as http.client counts
EXPIRE_EVERY = 0.25  # seconds between looks for connections past their phase's deadline
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset
AUTH_FAILED = Reason("authentication failed: client={source} (unknown user, wrong password or bad credentials)",
                     "authentication failed {n} more times: client={source}")
THROTTLED = Reason("throttling client={source}: too many failed logins (limits.auth_failures in limits.auth_window)",
                   "throttling client={source} {n} more times")
NOT_ALLOWED = Reason("refused a user from client={source}: not in the user's allow_from",
                     "refused {n} more requests from client={source}: not in the user's allow_from")
NO_THREAD = Reason("closed a connection from {source}: the system would not start another thread",
                   "closed {n} connections from {source}: the system would not start another thread")


@dataclass(frozen=True)
class Response:
    status: int
    body: Mapping[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


def error(status: int, code: str, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, {"error": code, "message": message}, tuple(headers))


UNAUTHORIZED = error(401, "unauthorized", "valid credentials are required", ("WWW-Authenticate", REALM))
NOT_FOUND = error(404, "not_found", "no such resource")


@dataclass(frozen=True)
class Generation:
    """One config and what is derived from it; a reload swaps the whole value at once."""

    config: Config
    authenticator: Authenticator


class Runtime:
    """The one mutable holder: the current generation (swapped whole), the throttle and the worker."""

    def __init__(self, generation: Generation, worker: Worker, throttle: FailureThrottle | None = None):
        self.generation = generation
        self.worker = worker
        self.throttle = throttle or FailureThrottle()
        self.admission = Admission()
        self.stopping = False


def parse_target(target: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Split a request target into decoded path segments and query pairs, strictly.

    Percent-encoding is decoded once; what it decodes to must itself be a plain
    segment, so encoded slashes, double encoding and control characters are refused.
    """
    if not PRINTABLE_RE.match(target):
        raise ValueError("the request target must be printable ASCII")
    if not target.startswith("/") or "#" in target:
        raise ValueError("the request target must be an absolute path")
    path, _, query = target.partition("?")
    if PLAIN_PATH_RE.match(path):
        # The usual target: no '%', so nothing to decode, and every segment is already plain and non-empty.
        segments = path[1:].split("/")
        if "." in segments or ".." in segments:
            raise ValueError("the path holds an empty or invalid segment")
    else:
        segments = []
        for raw in path[1:].split("/"):
            if "%" in PERCENT_RE.sub("", raw):
                raise ValueError("malformed percent-encoding in the path")
            try:
                seg = PERCENT_RE.sub(lambda m: chr(int(m.group(1), 16)), raw).encode("latin-1").decode("utf-8")
            except UnicodeError:
                raise ValueError("the path is not valid UTF-8") from None
            if not seg or not PATH_SEGMENT_RE.match(seg) or seg in (".", ".."):
                raise ValueError("the path holds an empty or invalid segment")
            segments.append(seg)
    pairs = []
    if query:
        for item in query.split("&"):
            key, sep, value = item.partition("=")
            if not sep or not QUERY_KEY_RE.match(key) or not QUERY_VALUE_RE.match(value):
                raise ValueError(f"malformed query parameter {item[:40]!r}")
            pairs.append((key, value))
    return segments, pairs


def parse_timeout(pairs: list[tuple[str, str]]) -> int | None:
    """The PUT query: `timeout` or its rfw alias `expire`, in seconds; -1, 0 or none is permanent."""
    allowed = {"timeout", "expire"}
    seen = [k for k, _ in pairs]
    unknown = [k for k in seen if k not in allowed]
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0]!r}; PUT accepts timeout (alias expire)")
    if len(seen) > 1:
        raise ValueError("give timeout (or expire) at most once")
    if not pairs:
        return None
    value = int(pairs[0][1])
    if value in (-1, 0):
        return None
    if value < 0 or value > MAX_TIMEOUT:
        raise ValueError(f"timeout must be -1, 0 (permanent) or 1 to {MAX_TIMEOUT} seconds")
    return value


ROUTES: dict[tuple[str, int], tuple[str, ...]] = {
    ("health", 1): ("GET", "HEAD"),
    ("version", 1): ("GET", "HEAD"),
    ("chains", 1): ("GET", "HEAD"),
    ("chain", 2): ("GET", "HEAD", "POST"),
    ("chain", 4): ("GET", "HEAD", "PUT", "DELETE"),
    ("chain", 5): ("GET", "HEAD", "PUT", "DELETE"),
}


class App:
    """Turns one request into one Response. Never raises for anything a client sends."""

    def __init__(self, runtime: Runtime, clock: Any = time.time):
        self.runtime = runtime
        self.clock = clock

    def handle(self, method: str, target: str, authorization: str | None, client: Address,
               client_cert_cn: str | None = None, body: bytes = b"") -> Response:
        """`client_cert_cn`: the subject CN of the client certificate the TLS handshake verified, if any.
        `body`: the request body, which only POST (bulk) uses."""
        try:
            return self._handle(method, target, authorization, client, client_cert_cn, body)
        except Exception:
            logger.exception("internal error on %s %s", method, target[:200])
            return error(500, "internal_error", "the server failed; this is a bug and it has been logged")

    def _handle(self, method: str, target: str, authorization: str | None, client: Address,
                client_cert_cn: str | None, body: bytes) -> Response:
        gen = self.runtime.generation  # one snapshot for the whole request
        if target == "/":
            return NOT_FOUND
        try:
            segments, query = parse_target(target)
        except ValueError as exc:
            return error(400, "bad_request", str(exc))
        allowed = ROUTES.get((segments[0], len(segments)))
        if allowed is None:
            return NOT_FOUND
        if method not in allowed:
            return error(405, "method_not_allowed", f"{method} is not allowed here", ("Allow", ", ".join(allowed)))
        if segments[0] == "health":
            return Response(200, {"status": "ok"})

        user = self._authenticate(gen, authorization, client, client_cert_cn)
        if isinstance(user, Response):
            return user
        if not user.may_connect_from(client):
            self.runtime.admission.events.event(NOT_ALLOWED, client_key(client))
            return error(403, "forbidden", "this user may not connect from this address")

        if segments[0] == "version":
            return self._no_query(query) or Response(200, {"version": __version__})
        if segments[0] == "chains":
            return self._no_query(query) or Response(200, {"chains": [
                {"name": c.name, "target": c.target, "hooks": list(c.hooks), "backend": c.backend}
                for c in gen.config.chains.values() if user.may_use(c.name)]})

        name = segments[1]
        if not CHAIN_NAME_RE.match(name):
            return error(400, "bad_chain", "a chain name is 1 to 28 letters, digits, '-' or '_'")
        network = None
        if len(segments) > 2:
            try:
                network = parse_network(segments[2], segments[3], segments[4] if len(segments) == 5 else None)
            except ValueError as exc:
                return error(400, "bad_address", str(exc))
        timeout = None
        if method in ("PUT", "POST"):
            try:
                timeout = parse_timeout(query)
            except ValueError as exc:
                return error(400, "bad_query", str(exc))
        elif (bad := self._no_query(query)) is not None:
            return bad
        chain = gen.config.chains.get(name)
        if chain is None:
            return error(404, "unknown_chain", f"chain {name!r} is not managed by web-ipt-d")
        if not user.may_use(name):
            return error(403, "forbidden", f"user {user.name!r} may not use chain {name!r}")
        if method in ("PUT", "DELETE", "POST") and user.read_only:
            return error(403, "read_only", f"user {user.name!r} is read-only")

        if method == "POST":
            return self._bulk(gen, chain, body, timeout, user.name, str(client))
        if network is None:
            entries = self._run(gen, ListChain(name))
            if isinstance(entries, Response):
                return entries
            return Response(200, {"chain": name, "entries": [e.to_json() for e in entries]})
        actor, peer = user.name, str(client)
        if method == "PUT":
            refused = self._never_block(gen, network)
            if refused is not None:
                return refused
            expires_at = None if timeout is None else self.clock() + timeout
            result = self._run(gen, Block(chain, network, expires_at, actor, peer))
            if isinstance(result, Response):
                return result
            assert isinstance(result, Blocked)
            return Response(201 if result.created else 200, result.entry.to_json())
        if method == "DELETE":
            result = self._run(gen, Unblock(chain, network, actor, peer))
            if isinstance(result, Response):
                return result
            assert isinstance(result, Unblocked)
            return Response(200, {"deleted": result.deleted,
                                  "entry": result.entry.to_json() if result.entry else None})
        found = self._run(gen, Lookup(name, network))
        if isinstance(found, Response):
            return found
        if found is None:
            return error(404, "not_blocked", f"{network} is not blocked in chain {name!r}")
        assert isinstance(found, Entry)
        return Response(200, found.to_json())

    def _bulk(self, gen: Generation, chain: Chain, body: bytes, timeout: int | None, actor: str,
              peer: str) -> Response:
        """POST /chain/<chain>: a JSON list of addresses or networks, blocked in one group commit.

        Each item gets its own result, as a single PUT would have; a bad item never stops the good ones.
        """
        limit = gen.config.limits.max_bulk_items
        try:
            items = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested some 1,000 deep
            return error(400, "bad_body", "the body must be a JSON list of addresses or networks")
        if not isinstance(items, list) or not items:
            return error(400, "bad_body", "the body must be a non-empty JSON list of addresses or networks")
        if len(items) > limit:
            return error(413, "too_many_items", f"at most {limit} items per request (limits.max_bulk_items)")
        results: list[dict[str, Any]] = []
        wanted: list[tuple[int, Network]] = []
        for i, item in enumerate(items):
            result: dict[str, Any] = {"item": item if isinstance(item, str) and len(item) <= 64 else None}
            results.append(result)
            try:
                if not isinstance(item, str) or len(item) > 64 or not item.isascii():
                    raise ValueError("an item is a string: an address or ADDRESS/PREFIX")
                network = parse_item(item)
            except ValueError as exc:
                result.update(status=400, error="bad_address", message=str(exc))
                continue
            refused = self._never_block(gen, network)
            if refused is not None:
                result.update(status=refused.status, **refused.body)
                continue
            wanted.append((i, network))
        if wanted:
            expires_at = None if timeout is None else self.clock() + timeout
            command = BulkBlock(chain, tuple(n for _, n in wanted), expires_at, actor, peer)
            # A large batch takes longer in the worker; allow it about 2 ms an item on top.
            done = self._run(gen, command, extra_time=len(wanted) / 500)
            if isinstance(done, Response):
                return done  # nothing was applied
            for (i, _), blocked in zip(wanted, done):
                results[i].update(status=201 if blocked.created else 200, entry=blocked.entry.to_json())
        statuses = [r["status"] for r in results]
        return Response(200, {"chain": chain.name, "results": results, "created": statuses.count(201),
                              "existing": statuses.count(200), "failed": len(statuses) - len(wanted)})

    @staticmethod
    def _never_block(gen: Generation, network: Network) -> Response | None:
        """The 409 for a network that overlaps never_block, or None."""
        protected = gen.config.protected_by(network)
        if protected is None:
            return None
        return error(409, "never_block", f"{network} overlaps {protected}, which is in never_block")

    @staticmethod
    def _no_query(query: list[tuple[str, str]]) -> Response | None:
        if query:
            return error(400, "bad_query", f"unknown query parameter {query[0][0]!r}")
        return None

    def _authenticate(self, gen: Generation, authorization: str | None, client: Address,
                      client_cert_cn: str | None) -> User | Response:
        throttle = self.runtime.throttle
        limits = gen.config.limits
        wait = throttle.retry_after(client, self.clock())
        if wait is not None:
            return error(429, "throttled", "too many failed logins from this address; try again later",
                         ("Retry-After", str(max(1, int(wait + 0.999)))))
        # tls.client_cert_auth: a verified certificate naming a user is enough. Credentials that are
        # sent are always checked, so a wrong password is a 401 even with a good certificate.
        tls = gen.config.tls
        if authorization is None and client_cert_cn is not None and tls is not None and tls.client_cert_auth:
            cert_user = gen.config.users.get(client_cert_cn)
            if cert_user is not None:
                logger.debug("user=%s authenticated by client certificate, client=%s", cert_user.name, client)
                return cert_user
        try:
            return gen.authenticator.authenticate(authorization)
        except AuthFailure:
            if authorization is not None:
                events = self.runtime.admission.events
                source = client_key(client)
                events.event(AUTH_FAILED, source)
                if throttle.record_failure(client, self.clock(), limits.auth_failures, limits.auth_window):
                    events.event(THROTTLED, source)
            return UNAUTHORIZED

    def _run(self, gen: Generation, command: Command, extra_time: float = 0.0) -> Any:
        """Submit to the worker and wait, bounded by limits.worker_timeout; a Response on failure."""
        fut = self.runtime.worker.submit(command)
        timeout = gen.config.limits.worker_timeout + extra_time
        try:
            try:
                return fut.result(timeout=timeout)
            except TimeoutError:
                if fut.cancel():
                    return error(503, "worker_timeout", "the firewall is busy; nothing was changed, try again")
                return fut.result(timeout=timeout)
        except TimeoutError:
            return error(503, "worker_timeout", "the firewall is busy; the change may still be applied")
        except FirewallFull as exc:
            return error(507, "firewall_full", str(exc))
        except FirewallUnavailable as exc:
            return error(503, "firewall_unavailable", str(exc))


class RequestHead(NamedTuple):
    """What the handler keeps of a request line and its header section."""

    method: str
    target: str
    content_lengths: list[str]
    authorizations: list[str]
    transfer_encoding: bool


ERROR_CODES = {400: "bad_request", 408: "timeout", 413: "too_large", 414: "uri_too_long",
               431: "headers_too_large"}
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in http.HTTPStatus}
JSON = json.JSONEncoder(separators=(",", ":"))
_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value (RFC 9110 section 6.6.1), formatted once a second rather than once a response."""
    global _date
    now = time.time()
    cached = _date
    if cached[0] != int(now):
        cached = _date = (int(now), email.utils.formatdate(now, usegmt=True))
    return cached[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Unbuffered: _write hands each response, status line to body, to one sendall(), so it leaves in one TLS
    # record and one send(); a buffer would only copy it once more. See bench/README.md.
    wbufsize = 0
    server_version = "web-ipt-d"
    sys_version = ""
    server: "Server"

    def __init__(self, request: Any, client_address: Any, server: Server, slot: Slot, peer: Address,
                 peer_cert: Mapping[str, Any]):
        # Per connection, not per request: neither the peer nor its verified certificate changes.
        self.slot = slot
        self._peer = peer
        self._peer_cert = peer_cert  # as getpeercert() gave it right after the handshake: {} without one
        self._cert_cn: tuple[ssl.SSLContext | None, str | None] | None = None
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        """Requests until the connection closes, each phase under its admission deadline (admission.py);
        the socket timeout is only a backstop for the same bound."""
        runtime = self.server.runtime
        admission = runtime.admission
        self.close_connection = True
        first = True
        try:
            while True:
                limits = runtime.generation.config.limits
                if not first:
                    if not admission.enter(self.slot, IDLE, limits.idle_timeout):
                        return
                    self.connection.settimeout(limits.idle_timeout)
                    # The next request's first byte, or the end of the stream (rfile is a BufferedReader).
                    if not cast(io.BufferedReader, self.rfile).peek(1):
                        return
                if not admission.enter(self.slot, HEAD, limits.header_timeout):
                    return
                self.connection.settimeout(limits.header_timeout)
                self.handle_one_request()
                if self.close_connection or runtime.stopping:
                    return
                first = False
        except OSError:
            pass  # the peer went, a backstop timeout fired, or admission shut the connection

    def handle_one_request(self) -> None:
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.command, self.requestline = "", ""
            self.send_error(414, "the request line is too long")
            return
        head = self._read_head()
        if head is not None:
            self._dispatch(head)

    def _read_head(self) -> RequestHead | None:
        """Parse the request line and the header section strictly (RFC 9112 sections 3 and 5); None once an
        error was sent.

        This replaces BaseHTTPRequestHandler.parse_request(), whose email-package parser built a Message for
        every request (an eighth of the daemon's time under load) and took a folded line or one without a
        colon as the end of the headers. Its connection rules stay: HTTP/1.0 closes unless it asks for
        keep-alive, "Connection: close" closes, and "Expect: 100-continue" from HTTP/1.1 gets its interim answer.
        """
        raw = self.raw_requestline
        if not REQUEST_LINE_RE.match(raw):
            self.command, self.requestline = "", str(raw, "latin-1").rstrip("\r\n")
            if not raw.endswith(b"\n"):
                self.close_connection = True  # the stream ended within the request line: nobody to answer
                return None
            if not raw.strip(b"\r\n"):
                self.close_connection = True  # a blank line, not a request: close quietly, as the stdlib did
                return None
            # Also refuses what parse_request() took: any whitespace as separator, raw non-ASCII, HTTP/0.9, 2.0.
            self.send_error(400, "malformed request line")
            return None
        self.requestline = line = raw.decode("ascii").rstrip("\r\n")
        self.command, target, version = line.split(" ")
        if not METHOD_RE.match(self.command):
            self.send_error(400, "malformed method")
            return None
        lengths: list[str] = []
        authorizations: list[str] = []
        transfer_encoding = False
        connection: str | None = None
        expect: str | None = None
        readline = self.rfile.readline
        left = MAX_HEADER_BYTES
        for _ in range(MAX_HEADER_LINES):
            field = readline(left + 1)
            left -= len(field)
            if left < 0:
                break
            if not field.endswith(b"\n"):
                # The stream ended (or admission shut it) before the blank line: an incomplete request is
                # not acted on, whatever it already said. Close without an answer, as for a blank line.
                self.close_connection = True
                return None
            if field in (b"\r\n", b"\n"):  # the end of the header section
                self.close_connection = version == "HTTP/1.0"
                if connection is not None and connection.lower() == "close":
                    self.close_connection = True
                elif connection is not None and connection.lower() == "keep-alive":
                    self.close_connection = False
                if expect is not None and expect.lower() == "100-continue" and version >= "HTTP/1.1":
                    self.handle_expect_100()
                return RequestHead(self.command, target, lengths, authorizations, transfer_encoding)
            match = HEADER_LINE_RE.match(field)
            if match is None:
                self.send_error(400, "a folded header line is not accepted (RFC 9112 section 5.2)"
                                if field[:1] in (b" ", b"\t") else "malformed header line")
                return None
            name = match.group(1).lower()
            if name == b"content-length":
                lengths.append(match.group(2).decode("latin-1"))
            elif name == b"authorization":
                authorizations.append(match.group(2).decode("latin-1"))
            elif name == b"transfer-encoding":
                transfer_encoding = True
            elif name == b"connection" and connection is None:
                connection = match.group(2).decode("latin-1")
            elif name == b"expect" and expect is None:
                expect = match.group(2).decode("latin-1")
        self.send_error(431)
        return None

    def _dispatch(self, head: RequestHead) -> None:
        method = head.method
        if head.transfer_encoding:
            self.send_error(400, "Transfer-Encoding is not accepted; send a Content-Length")
            return
        lengths = head.content_lengths
        if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
            self.send_error(400, "malformed Content-Length")
            return
        # int() refuses strings over 4300 digits; anything over 18 is too large anyway.
        length = 0 if not lengths else int(lengths[0]) if len(lengths[0]) <= 18 else MAX_IGNORED_BODY + 1
        # Only a bulk POST carries a body: room for its item limit (an item is at most 64 bytes).
        limit = (64 * self.server.runtime.generation.config.limits.max_bulk_items + 1024 if method == "POST"
                 else MAX_IGNORED_BODY)
        if length > limit:
            self.send_error(413, "the request body is too large")
            return
        admission = self.server.runtime.admission
        limits = self.server.runtime.generation.config.limits
        if length:
            if not admission.enter(self.slot, BODY, limits.request_timeout):
                self.close_connection = True
                return
            self.connection.settimeout(limits.request_timeout)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            return
        # The request is whole: from here on its slot is not taken back, and it is answered or, if
        # admission took the slot first, not acted on at all.
        if not admission.enter(self.slot, BUSY, None):
            self.close_connection = True
            return
        self.connection.settimeout(limits.request_timeout)  # for each write of the answer
        if method != "POST":
            body = b""  # no other route takes a body; it was read only to keep the connection in step
        auths = head.authorizations
        authorization = auths[0] if len(auths) == 1 else ("" if auths else None)
        response = self.server.app.handle(method, head.target, authorization, self._peer, self._client_cert_cn(), body)
        self._write(response, head=method == "HEAD")

    def _client_cert_cn(self) -> str | None:
        """The subject CN of the client certificate this connection's handshake verified, or None.

        Only while the current config trusts the same client CAs as the context that verified it:
        after a reload that replaces tls.client_ca, a connection opened before it no longer logs in by it.
        Worked out once per connection and config context, since a reload is what changes the answer.
        """
        current = self.server.runtime.generation.config.ssl_context
        cached = self._cert_cn
        if cached is None or cached[0] is not current:
            cached = self._cert_cn = (current, self._verified_cn(current))
        return cached[1]

    def _verified_cn(self, current: ssl.SSLContext | None) -> str | None:
        conn = self.connection
        if not isinstance(conn, ssl.SSLSocket) or current is None or not self._peer_cert:
            return None
        if conn.context is not current and (
                conn.context.get_ca_certs(binary_form=True) != current.get_ca_certs(binary_form=True)):
            return None
        names = [value for rdn in self._peer_cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return names[0] if len(names) == 1 else None  # several CNs: ambiguous, so none

    def _write(self, response: Response, head: bool = False, close: bool = False) -> None:
        """One response as one write: the headers send_response() and send_header() wrote, in their order."""
        body = JSON.encode(response.body).encode() + b"\n"
        status = response.status
        self.log_request(status)
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        if close or self.close_connection or self.server.runtime.stopping:
            extra += "Connection: close\r\n"
            self.close_connection = True
        status_line = STATUS_LINES.get(status) or f"HTTP/1.1 {status} "
        data = (f"{status_line}\r\nServer: {self.server_version}\r\nDate: {http_date()}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                f"{extra}\r\n").encode("latin-1")
        self.wfile.write(data if head else data + body)
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Errors found while parsing: answer in JSON like every other response, then close.
        self.close_connection = True
        text = message if message and code != 431 else http.HTTPStatus(code).phrase
        self._write(error(code, ERROR_CODES.get(code, "bad_request"), text), close=True)

    def handle_expect_100(self) -> bool:
        # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits for this before sending the body.
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.wfile.flush()
        return True

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        logger.debug('client=%s "%s" %s', self.client_address[0], self.requestline[:200], code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("client=%s " + format, self.client_address[0], *args)


class Server(socketserver.TCPServer):
    """Serves one listening socket. Admission decides on each connection before any thread or TLS is spent
    on it; an admitted one gets a thread of its own for the TLS handshake and its requests."""

    def __init__(self, sock: socket.socket, runtime: Runtime, app: App):
        # process_request() makes each Handler itself, with its slot: the class given here is never used.
        super().__init__(sock.getsockname()[:2], socketserver.BaseRequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.runtime = runtime
        self.app = app
        self._last_expire = 0.0

    def process_request(self, request: Any, client_address: Any) -> None:
        runtime = self.runtime
        admission = runtime.admission
        slot = None
        if not runtime.stopping:
            try:
                peer = peer_address(client_address[0])
            except ValueError:
                peer = None  # not an IP peer; systemd passed us something odd
            if peer is not None:
                slot = admission.admit(request, peer, runtime.generation.config.limits)
        if slot is None:
            # Reset rather than close: no TIME_WAIT left behind for each connection a flood makes.
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            request.close()
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, slot, peer), daemon=True,
                             name=f"conn-{client_address[0]}").start()
        except RuntimeError:  # no more threads: the system's limit, not ours
            admission.release(slot)
            request.close()
            admission.events.event(NO_THREAD, slot.source)

    def service_actions(self) -> None:
        # The accept loop wakes at least every poll_interval: a few times a second, end connections past
        # their deadline. With several listeners, whichever loop comes first does it.
        now = time.monotonic()
        if now - self._last_expire >= EXPIRE_EVERY:
            self._last_expire = now
            self.runtime.admission.expire()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("accepting a connection from %s failed", client_address[0])

    def _serve(self, request: socket.socket, addr: Any, slot: Slot, peer: Address) -> None:
        conn: Any = request
        config = self.runtime.generation.config
        try:
            request.settimeout(config.limits.handshake_timeout)  # a backstop: admission bounds the phase
            if request.family in (socket.AF_INET, socket.AF_INET6):
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_cert: Mapping[str, Any] = {}
            if config.ssl_context is not None:
                conn = config.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                conn.do_handshake()
                # Here, where the handshake is known to be finished; {} unless a certificate was verified.
                peer_cert = conn.getpeercert() or {}
            Handler(conn, addr, self, slot, peer, peer_cert)
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            logger.debug("connection from %s ended: %s", addr[0], exc)
        except Exception:
            logger.exception("connection from %s failed", addr[0])
        finally:
            self.runtime.admission.release(slot)  # before close: the descriptor cannot be reused under it
            try:
                conn.close()
            finally:
                request.close()
