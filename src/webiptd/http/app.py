"""The API's routes: one request, already parsed off the wire, to one Response. Each route is a small method
that parses, authorises and builds one command for the firewall worker."""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import operator
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

import yaml

from webiptd import __version__
from webiptd.admission import Admission
from webiptd.auth import AuthFailure, Authenticator, FailureThrottle
from webiptd.commands import (
    Block, BulkBlock, BulkBlocked, BulkLoad, FirewallFull, FirewallUnavailable, Lookup, Packed, Unblock,
)
from webiptd.config import CHAIN_NAME_RE, OWNER_LABEL_RE, Chain, Config, User
from webiptd.firewall.pending import Pending
from webiptd.firewall.worker import Worker
from webiptd.http import listing
from webiptd.http.bulk import BadBody, Body, BodyIncomplete, BytesBody, Item, chunks, json_items, text_items
from webiptd.http.responses import INTERNAL_ERROR, NOT_FOUND, UNAUTHORIZED, Response, error
from webiptd.http.wire import media_type, parse_target, wants_text
from webiptd.log import Reason
from webiptd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from webiptd.metrics import Metric, Metrics, states
from webiptd.net import Address, Network, client_key, packed_item, packed_of, parse_item, parse_segments
from webiptd.scope import Scope, parse_scope, scope_refusal
from webiptd.state import ListingKey, Reader

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAX_TIMEOUT = 10 * 365 * 86400  # ten years; anything longer is a typo, and permanent is -1 or 0
MAX_ITEM = 64  # characters of one bulk item: the longest IPv6 network is 43
BATCH = 100_000  # networks of a bulk POST submitted to the worker at a time
DETAIL = 10_000  # a bulk POST of at most this many items gets a result per item
MAX_FAILURES = 100  # the failures a bulk POST's answer lists
_text = operator.itemgetter(0)  # of a Packed
EVERY_OWNER = "*"  # DELETE ?owner=*: every claim at once, for a user with override
AUTH_FAILED = Reason("authentication failed: client={source} (unknown user, wrong password or bad credentials)",
                     "authentication failed {n} more times: client={source}")
THROTTLED = Reason("throttling client={source}: too many failed logins (limits.auth_failures in limits.auth_window)",
                   "throttling client={source} {n} more times")
NOT_ALLOWED = Reason("refused a user from client={source}: not in the user's allow_from",
                     "refused {n} more requests from client={source}: not in the user's allow_from")

# (first path segment, number of segments) -> {method: route}. The route is App's method "_" + route.
ROUTES: dict[tuple[str, int], dict[str, str]] = {
    ("health", 1): {"GET": "health", "HEAD": "health"},
    ("openapi.json", 1): {"GET": "openapi", "HEAD": "openapi"},
    ("version", 1): {"GET": "version", "HEAD": "version"},
    ("chains", 1): {"GET": "chains", "HEAD": "chains"},
    ("metrics", 1): {"GET": "metrics", "HEAD": "metrics"},
    ("fleet", 1): {"GET": "fleet", "HEAD": "fleet"},
    ("chain", 2): {"GET": "list", "HEAD": "list", "POST": "bulk"},
    ("chain", 4): {"GET": "lookup", "HEAD": "lookup", "PUT": "block", "DELETE": "unblock"},
    ("chain", 5): {"GET": "lookup", "HEAD": "lookup", "PUT": "block", "DELETE": "unblock"},
}
WRITES = ("PUT", "DELETE", "POST")
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Generation:
    """One config and what is derived from it; a reload swaps the whole value at once."""

    config: Config
    authenticator: Authenticator


class Runtime:
    """The one mutable holder: the current generation (swapped whole), the throttle, admission and the worker."""

    def __init__(self, generation: Generation, worker: Worker, throttle: FailureThrottle | None = None,
                 metrics: Metrics | None = None, reader: Reader | None = None):
        self.generation = generation
        self.worker = worker
        # The listings' read-only view of the store, which Store opens at state_dir/state.db.
        self.reader = reader or Reader(generation.config.state_dir / "state.db")
        self.throttle = throttle or FailureThrottle()
        self.admission = Admission()
        self.stopping = False
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._states)
        # The fleet's status (webiptd.fleet.FleetNode.status), once its threads run; None without a fleet.
        self.fleet_status: Callable[[], dict[str, Any]] | None = None
        self.fleet_line: Callable[[], str] | None = None

    def _states(self) -> Iterable[Metric]:
        """What a scrape reads of the daemon's state (metrics.states)."""
        worker = self.worker
        return states(worker.entry_counts(), {c.name: c.backend for c in self.generation.config.chains.values()},
                      worker.queue_depth(), max(0.0, time.monotonic() - worker.heartbeat), self.admission.counts())


class Request(NamedTuple):
    """One authenticated request, as the route methods see it. (A NamedTuple rather than a frozen dataclass, like
    Target and Started: each request makes one, and a frozen dataclass's __init__ costs several times more.)"""

    gen: Generation
    method: str
    segments: list[str]
    query: list[tuple[str, str]]
    user: User
    client: Address
    body: Body
    content_type: str | None = None
    accept: str | None = None


class Started(NamedTuple):
    """A route's command, submitted to the worker: `finish` turns its answer into the Response. What a route
    returns when all that is left is to wait; App.handle waits, the connection loop (http/server.py) does not."""

    gen: Generation
    pending: Pending[Any]
    finish: Callable[[Any], Response]


class Slow:
    """App.begin's answer for a request the connection loop must not serve itself: its credentials are not in the
    cache (checking them is a password hash's work), or its route is not one of FAST_ROUTES."""


SLOW = Slow()
# The routes the connection loop serves itself: no body, one command to the worker at most.
FAST_ROUTES = frozenset({"health", "lookup", "block", "unblock"})


class Target(NamedTuple):
    """What a /chain/... request names. The owner is "" for the user's own claim, `user/label` with ?owner=label,
    and "*" for DELETE ?owner=*; the scope is None for all traffic."""

    chain: Chain
    network: Network | None
    timeout: int | None
    owner: str
    scope: Scope | None


def parse_owner(pairs: list[tuple[str, str]], every: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """The `owner` label of a write's query, None when there is none, and the query's other pairs. "*" (every
    claim) only with `every` (DELETE); whether the user may is the route's to check."""
    owners = [v for k, v in pairs if k == "owner"]
    rest = [(k, v) for k, v in pairs if k != "owner"]
    if not owners:
        return None, rest
    if len(owners) > 1:
        raise ValueError("give owner at most once")
    if owners[0] == EVERY_OWNER:
        if not every:
            raise ValueError("owner=* (every claim) is for DELETE only")
        return EVERY_OWNER, rest
    if not OWNER_LABEL_RE.match(owners[0]):
        raise ValueError("an owner label is 1 to 64 letters, digits, '.', '_', ':' or '-'")
    return owners[0], rest


def parse_scope_query(pairs: list[tuple[str, str]]) -> tuple[Scope | None, list[tuple[str, str]]]:
    """The `proto` and `port` of a query (fail2ban's port format, see scope.parse_scope), None for all traffic, and
    the query's other pairs."""
    found = {name: [v for k, v in pairs if k == name] for name in ("proto", "port")}
    for name, values in found.items():
        if len(values) > 1:
            raise ValueError(f"give {name} at most once")
    rest = [(k, v) for k, v in pairs if k not in found]
    return parse_scope(*(values[0] if values else None for values in found.values())), rest


def parse_timeout(pairs: list[tuple[str, str]]) -> int | None:
    """The PUT query without its owner: `timeout` or its rfw alias `expire`, in seconds; -1, 0 or none is
    permanent."""
    allowed = {"timeout", "expire"}
    seen = [k for k, _ in pairs]
    unknown = [k for k in seen if k not in allowed]
    if unknown:
        raise ValueError(f"unknown query parameter {unknown[0]!r}; PUT accepts timeout (alias expire), owner, proto "
                         "and port")
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


def parse_paging(pairs: list[tuple[str, str]]) -> tuple[int | None, ListingKey | None]:
    """A listing's `limit` (None: the whole chain, or the rest of it) and `after` (a cursor); ValueError with a
    sentence."""
    found = {name: [v for k, v in pairs if k == name] for name in ("limit", "after")}
    for name, values in found.items():
        if len(values) > 1:
            raise ValueError(f"give {name} at most once")
    limit = None
    if found["limit"]:
        limit = int(found["limit"][0])
        if not 1 <= limit <= listing.MAX_LIMIT:
            raise ValueError(f"limit must be 1 to {listing.MAX_LIMIT} entries a page")
    after = None
    if found["after"]:
        after = listing.decode_cursor(found["after"][0])
    return limit, after


@functools.cache
def openapi_document() -> bytes:
    """The API's OpenAPI document (the package's openapi.yaml, the one source) as JSON, made once."""
    text = importlib.resources.files("webiptd").joinpath("openapi.yaml").read_text(encoding="utf-8")
    return json.dumps(yaml.safe_load(text), separators=(",", ":")).encode()


class App:
    """Turns one request into one Response. Never raises for anything a client sends."""

    def __init__(self, runtime: Runtime, clock: Callable[[], float] = time.time):
        self.runtime = runtime
        self.clock = clock

    def handle(self, method: str, target: str, authorization: str | None, client: Address,
               client_cert_cn: str | None = None, body: bytes | Body = b"", generation: Generation | None = None,
               content_type: str | None = None, accept: str | None = None) -> Response:
        """`client_cert_cn`: the subject CN of the client certificate the TLS handshake verified, if any.
        `body`: the request body, which only POST (bulk) reads, as it goes: whatever a route answers before reading
        it (a 401, say) is answered without it. `generation`: the config snapshot the request is served under,
        taken once by the caller; the current one if not given. `content_type`, `accept`: those headers' values."""
        started = time.perf_counter()
        route = ["none"]  # the route's name once known: the metrics' label
        if isinstance(body, bytes):
            body = BytesBody(body)
        try:
            response = self._handle(generation or self.runtime.generation, method, target, authorization, client,
                                    client_cert_cn, body, route, content_type, accept, False)
            if isinstance(response, Started):
                response = self._complete(response, self._wait(response.gen, response.pending))
        except Exception:
            logger.exception("internal error on %s %s", method, target[:200])
            response = INTERNAL_ERROR
        assert isinstance(response, Response)
        self.runtime.metrics.observe_request(route[0], method, response.status, time.perf_counter() - started)
        return response

    def begin(self, method: str, target: str, authorization: str | None, client: Address,
              client_cert_cn: str | None, generation: Generation, route: list[str]) -> Response | Started | Slow:
        """A request without a body, as far as it goes without waiting: the Response, the command submitted
        (Started: `finish` it once its Pending is done), or SLOW, having done nothing, for a request to be served
        by App.handle on a thread of its own. `route[0]` is set to the metrics' label; the caller observes the
        request (App.observe) once it has its Response."""
        try:
            return self._handle(generation, method, target, authorization, client, client_cert_cn, BytesBody(b""),
                                route, None, None, True)
        except Exception:
            logger.exception("internal error on %s %s", method, target[:200])
            return INTERNAL_ERROR

    def finish(self, started: Started, method: str, target: str) -> Response:
        """The Response to a Started whose Pending is done (or given up on: see Loop); never raises."""
        try:
            return self._complete(started, self._answer(started.pending))
        except Exception:
            logger.exception("internal error on %s %s", method, target[:200])
            return INTERNAL_ERROR

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.runtime.metrics.observe_request(route, method, status, seconds)

    @staticmethod
    def _complete(started: Started, result: Any) -> Response:
        return result if isinstance(result, Response) else started.finish(result)

    def _handle(self, gen: Generation, method: str, target: str, authorization: str | None, client: Address,
                client_cert_cn: str | None, body: Body, label: list[str], content_type: str | None,
                accept: str | None, fast: bool) -> Response | Started | Slow:
        if target == "/":
            return NOT_FOUND
        try:
            segments, query = parse_target(target)
        except ValueError as exc:
            return error("bad_request", str(exc))
        routes = ROUTES.get((segments[0], len(segments)))
        if routes is None:
            return NOT_FOUND
        route = routes.get(method)
        if route is None:
            label[0] = segments[0]  # a known path (so a bounded label): chains, chain, ...
            return error("method_not_allowed", f"{method} is not allowed here", ("Allow", ", ".join(routes)))
        if fast and route not in FAST_ROUTES:
            return SLOW
        label[0] = route
        if route == "health":
            return Response(200, {"status": "ok"})  # no credentials: for load balancers and monitors
        if route == "openapi":  # no credentials: the API's shape, which the code on GitHub tells anyone anyway
            return Response(200, {}, raw=openapi_document())
        user = self._authenticate(gen, authorization, client, client_cert_cn, fast)
        if isinstance(user, (Response, Slow)):
            return user
        if not user.may_connect_from(client):
            self.runtime.admission.events.event(NOT_ALLOWED, client_key(client))
            return error("forbidden", "this user may not connect from this address")
        handler: Callable[[Request], Response | Started] = getattr(self, "_" + route)
        return handler(Request(gen, method, segments, query, user, client, body, content_type, accept))

    # -- the routes ---------------------------------------------------------------------------------------

    def _metrics(self, req: Request) -> Response:
        if not req.user.metrics:
            return error("forbidden", f"user {req.user.name!r} may not read the metrics: it needs metrics: true")
        return self._no_query(req.query) or Response(200, {}, raw=self.runtime.metrics.render(),
                                                     content_type=METRICS_CONTENT_TYPE)

    def _fleet(self, req: Request) -> Response:
        status = self.runtime.fleet_status
        if status is None:
            return error("not_configured", "this host is not in a fleet (the config has no fleet section)")
        return self._no_query(req.query) or Response(200, status())

    def _version(self, req: Request) -> Response:
        return self._no_query(req.query) or Response(200, {"version": __version__})

    def _chains(self, req: Request) -> Response:
        return self._no_query(req.query) or Response(200, {"chains": [
            {"name": c.name, "target": c.target, "hooks": list(c.hooks), "backend": c.backend, "match": c.match,
             "interface": c.interface}
            for c in req.gen.config.chains.values() if req.user.may_use(c.name)]})

    def _list(self, req: Request) -> Response:
        """GET /chain/<chain>: with `limit` (and `after`), one page and the cursor of the next; without, the whole
        chain, streamed page by page. JSON, or one entry a line with Accept: text/plain. Read from the store, not
        the worker: a listing of a million entries never waits in the worker's queue, nor delays it."""
        paging = [(k, v) for k, v in req.query if k in ("limit", "after")]
        target = self._target(req._replace(query=[(k, v) for k, v in req.query
                                                              if k not in ("limit", "after")]))
        if isinstance(target, Response):
            return target
        try:
            limit, after = parse_paging(paging)
        except ValueError as exc:
            return error("bad_query", str(exc))
        chain = target.chain.name
        text = wants_text(req.accept)
        content_type = TEXT if text else "application/json"
        reader = self.runtime.reader
        if limit is None:
            return Response(200, {}, content_type=content_type,
                            stream=lambda: listing.stream(reader, chain, text, self.clock, after=after))
        try:
            db = reader.connect()
            try:
                entries, key = reader.page(db, chain, after, limit, self.clock())
            finally:
                db.close()
        except sqlite3.Error:
            logger.exception("reading a page of chain %s from the state store failed", chain)
            return error("firewall_unavailable", "the state store cannot be read; try again")
        cursor = None if key is None else listing.encode_cursor(key)
        if text:
            headers = () if cursor is None else (("Next-Cursor", cursor),)
            return Response(200, {}, headers, raw="".join(listing.text_line(e) for e in entries).encode(),
                            content_type=content_type)
        return Response(200, {"chain": chain, "entries": [e.to_json() for e in entries], "next": cursor})

    def _lookup(self, req: Request) -> Response | Started:
        target = self._target(req)
        if isinstance(target, Response):
            return target
        chain, network = target.chain, target.network
        assert network is not None

        def finish(found: Any) -> Response:
            if found is None:
                what = "" if target.scope is None else f" for {target.scope}"
                return error("not_blocked", f"{network} is not blocked{what} in chain {chain.name!r}")
            return Response(200, found.to_json())

        return Started(req.gen, self.runtime.worker.submit(Lookup(chain.name, network, target.scope)), finish)

    def _block(self, req: Request) -> Response | Started:
        target = self._target(req)
        if isinstance(target, Response):
            return target
        chain, network, timeout = target.chain, target.network, target.timeout
        assert network is not None
        refused = self._never_block(req.gen, chain, network)
        if refused is not None:
            return refused
        expires_at = None if timeout is None else self.clock() + timeout
        command = Block(chain, network, expires_at, req.user.name, str(req.client), target.owner, target.scope)
        return Started(req.gen, self.runtime.worker.submit(command), _blocked)

    def _unblock(self, req: Request) -> Response | Started:
        target = self._target(req)
        if isinstance(target, Response):
            return target
        chain, network, owner = target.chain, target.network, target.owner
        assert network is not None
        every = owner == EVERY_OWNER
        if every and not req.user.override:
            return error("forbidden", f"user {req.user.name!r} may not remove every claim (owner=*): it needs "
                                      "override")
        command = Unblock(chain, network, req.user.name, str(req.client), "" if every else owner, every, target.scope)
        return Started(req.gen, self.runtime.worker.submit(command), _unblocked)

    def _bulk(self, req: Request) -> Response:
        """POST /chain/<chain>: addresses or networks, a JSON list or text/plain, blocked in batches as the body
        arrives (_BulkLoad). Checked before a byte of the body is read: credentials, the chain, the user's rights
        and the query."""
        target = self._target(req)
        if isinstance(target, Response):
            return target
        kind, params = media_type(req.content_type)
        charset = params.get("charset", "utf-8")
        if req.content_type == "":
            return error("unsupported_media_type", "give one Content-Type: application/json or text/plain")
        if kind in ("", "application/json") and charset == "utf-8":
            parse = json_items
        elif kind == "text/plain" and charset in ("utf-8", "us-ascii", "ascii"):
            parse = text_items
        else:
            return error("unsupported_media_type", "the body is a JSON list (Content-Type: application/json) or "
                                                   "one address a line (text/plain), in UTF-8")
        return _BulkLoad(self, req, target, text=parse is text_items).run(parse(chunks(req.body)))

    # -- what the routes share -----------------------------------------------------------------------------

    def _target(self, req: Request) -> Target | Response:
        """What a /chain/... request names, checked in a fixed order: the chain's name, the network, the query, the
        user's rights to the chain, that it is managed, read-only, and that the chain's backend can hold the scope."""
        segments = req.segments
        name = segments[1]
        if not CHAIN_NAME_RE.match(name):
            return error("bad_chain", "a chain name is 1 to 28 letters, digits, '-' or '_'")
        network = None
        if len(segments) > 2:
            try:
                network = parse_segments(segments[2], segments[3], segments[4] if len(segments) == 5 else None)
            except ValueError as exc:
                return error("bad_address", str(exc))
        timeout = None
        label: str | None = None
        scope: Scope | None = None
        query = req.query
        try:
            if network is not None or req.method == "POST":
                scope, query = parse_scope_query(query)
            elif any(k in ("proto", "port") for k, _ in query):
                raise ValueError("proto and port name one entry (or, on POST, every item's); a listing shows "
                                 "every entry")
            if req.method in WRITES:
                label, rest = parse_owner(query, every=req.method == "DELETE")
                if req.method == "DELETE":
                    if rest:
                        raise ValueError(f"unknown query parameter {rest[0][0]!r}; DELETE accepts owner, proto "
                                         "and port")
                else:
                    timeout = parse_timeout(rest)
            elif any(k == "owner" for k, _ in query):
                raise ValueError("owner is for PUT, DELETE and POST; a lookup or a listing shows every claim")
        except ValueError as exc:
            return error("bad_query", str(exc))
        if req.method not in WRITES and (bad := self._no_query(query)) is not None:
            return bad
        user = req.user
        # The user's rights first: a user learns nothing about chains outside its patterns, not even
        # whether they exist.
        if not user.may_use(name):
            return error("forbidden", f"user {user.name!r} may not use chain {name!r}")
        chain = req.gen.config.chains.get(name)
        if chain is None:
            return error("unknown_chain", f"chain {name!r} is not managed by web-ipt-d")
        if req.method in WRITES and user.read_only:
            return error("read_only", f"user {user.name!r} is read-only")
        refusal = scope_refusal(chain, scope)
        if refusal is not None:
            return error("bad_query", refusal)
        owner = "" if label is None else EVERY_OWNER if label == EVERY_OWNER else f"{user.name}/{label}"
        return Target(chain, network, timeout, owner, scope)

    @staticmethod
    def _never_block(gen: Generation, chain: Chain, network: Network) -> Response | None:
        """The 409 for a network that overlaps never_block (never_allow, in an allow chain), or None."""
        protected = gen.config.protected_by(network, chain.target)
        if protected is None:
            return None
        rule = "never_allow" if chain.target == "ACCEPT" else "never_block"
        return error(rule, f"{network} overlaps {protected}, which is in {rule}")

    @staticmethod
    def _no_query(query: list[tuple[str, str]]) -> Response | None:
        if query:
            return error("bad_query", f"unknown query parameter {query[0][0]!r}")
        return None

    def _authenticate(self, gen: Generation, authorization: str | None, client: Address,
                      client_cert_cn: str | None, fast: bool = False) -> User | Response | Slow:
        """The user, or the 401 or 429 to answer; with `fast`, SLOW for credentials that are not in the cache."""
        throttle = self.runtime.throttle
        limits = gen.config.limits
        wait = throttle.retry_after(client, self.clock())
        if wait is not None:
            self.runtime.metrics.throttled.inc()
            return error("throttled", "too many failed logins from this address; try again later",
                         ("Retry-After", str(max(1, int(wait + 0.999)))))
        # tls.client_cert_auth: a verified certificate naming a user is enough. Credentials that are
        # sent are always checked, so a wrong password is a 401 even with a good certificate.
        tls = gen.config.tls
        if authorization is None and client_cert_cn is not None and tls is not None and tls.client_cert_auth:
            cert_user = gen.config.users.get(client_cert_cn)
            if cert_user is not None:
                logger.debug("user=%s authenticated by client certificate, client=%s", cert_user.name, client)
                return cert_user
        if fast:
            return gen.authenticator.cached(authorization) or SLOW
        try:
            return gen.authenticator.authenticate(authorization)
        except AuthFailure:
            if authorization is not None:
                events = self.runtime.admission.events
                source = client_key(client)
                events.event(AUTH_FAILED, source)
                self.runtime.metrics.auth_failures.inc()
                if throttle.record_failure(client, self.clock(), limits.auth_failures, limits.auth_window):
                    events.event(THROTTLED, source)
            return UNAUTHORIZED

    def _wait(self, gen: Generation, pending: Pending[T], extra_time: float = 0.0) -> T | Response:
        """The worker's answer to a submitted command, within limits.worker_timeout; a Response on failure."""
        timeout = gen.config.limits.worker_timeout + extra_time
        try:
            pending.result(timeout=timeout)
        except TimeoutError:
            if pending.cancel():
                return NOT_TAKEN
            try:
                pending.result(timeout=timeout)
            except TimeoutError:
                return NOT_ANSWERED
        except Exception:
            pass  # _answer's to say
        return self._answer(pending)

    @staticmethod
    def _answer(pending: Pending[T]) -> T | Response:
        """The answer of a Pending that is done: the command's result, or the Response for what the worker raised.
        NOT_ANSWERED when it is not done (given up on)."""
        if not pending.done():
            return NOT_ANSWERED
        try:
            return pending.result(timeout=0)
        except FirewallFull as exc:
            return error("firewall_full", str(exc))
        except FirewallUnavailable as exc:
            return error("firewall_unavailable", str(exc))


# What the client of a command the worker did not answer within limits.worker_timeout gets: while the command was
# still in the queue, it is withdrawn; once the worker had taken it, it may yet be applied.
NOT_TAKEN = error("worker_timeout", "the firewall is busy; nothing was changed, try again")
NOT_ANSWERED = error("worker_timeout", "the firewall is busy; the change may still be applied")


def _blocked(result: Any) -> Response:
    return Response(201 if result.created else 200, result.entry.to_json())


def _unblocked(result: Any) -> Response:
    return Response(200, {"deleted": result.deleted, "released": result.released,
                          "entry": result.entry.to_json() if result.entry else None})


class _BulkLoad:
    """One bulk POST, item by item as its body is parsed: bad items are counted (the first MAX_FAILURES listed),
    good ones go to the worker in batches of at most BATCH networks. Up to DETAIL items, the one batch is submitted
    when the body has ended, with a result per item (a BulkBlock); past that, each batch as it fills, answered with
    counts (a BulkLoad of packed networks: the common item costs no ipaddress object, see net.packed_item).

    A batch of counts is applied while the next one is read and parsed (the worker's SQLite and kernel work runs
    without the GIL); it is waited for before the next is submitted, so one is in flight at a time, in order.

    When a batch is refused (the worker's 503 or 507), or the body stops or turns out not to be a list, every batch
    before stays applied and the answer has the error, the counts and `applied_through`: the last line (or index)
    of the last batch applied; nothing after it was."""

    def __init__(self, app: App, req: Request, target: Target, text: bool):
        self.app = app
        self.req = req
        self.target = target
        self.text = text
        self.limit = req.gen.config.limits.max_bulk_items
        self.expires_at = None if target.timeout is None else app.clock() + target.timeout
        self.count = 0
        self.created = 0
        self.existing = 0
        self.failed = 0
        self.failures: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] | None = []  # None once past DETAIL items
        self.wanted: list[tuple[int, Network]] = []  # (index in results; the network) of the batch, with results
        self.loading: list[Packed] = []  # the batch, without
        self.protected = req.gen.config.protected_packed
        self.through = self.none = 0 if text else -1  # where the batch being filled ends
        self.applied_through = self.none
        self.failed_applied = 0  # the failures up to applied_through
        # The batch the worker is applying: its answer, then its applied_through, failed_applied and size.
        self.in_flight: tuple[Pending[BulkBlocked], int, int, int] | None = None

    def run(self, items: Iterator[Item]) -> Response:
        try:
            for item in items:
                self.count += 1
                if self.count > self.limit:
                    return self._stopped(error("too_large", f"at most {self.limit} items per request "
                                                            "(limits.max_bulk_items)"))
                if self.results is not None and self.count > DETAIL:
                    self.results = None  # counts only, from here on: the first batch goes as one
                    refused = self._flush()
                    if refused is not None:
                        return self._stopped(refused)
                self._take(item)
                self.through = item.at
                if self.results is None and len(self.loading) >= BATCH:
                    refused = self._flush()
                    if refused is not None:
                        return self._stopped(refused)
        except BadBody as exc:
            return self._stopped(error("bad_body", str(exc)))
        except BodyIncomplete as exc:
            return self._stopped(error("incomplete_body", str(exc)))
        refused = self._flush() or self._settle()
        if refused is not None:
            return self._stopped(refused)
        body: dict[str, Any] = {"chain": self.target.chain.name}
        if self.results is not None:
            body["results"] = self.results
        body.update(created=self.created, existing=self.existing, failed=self.failed, failures=self.failures)
        return Response(200, body)

    def _take(self, item: Item) -> None:
        if self.results is None and item.problem is None and item.scope is None and item.text is not None \
                and len(item.text) <= MAX_ITEM:
            fast = packed_item(item.text)
            if fast is not None and self.protected(fast[1], fast[2], self.target.chain.target) is None:
                self.loading.append(fast)
                return
        result: dict[str, Any] = {"item": item.text if item.text is not None and len(item.text) <= MAX_ITEM
                                  else None}
        problem: Response | None = None
        network = None
        if item.problem is not None:
            problem = error("bad_address", item.problem)
        else:
            try:
                assert item.text is not None
                if len(item.text) > MAX_ITEM or not item.text.isascii():
                    raise ValueError("an item is a string: an address or ADDRESS/PREFIX")
                network = parse_item(item.text)
            except ValueError as exc:
                problem = error("bad_address", str(exc))
            else:
                if item.scope is not None and self._scope_of(item.scope) != self.target.scope:
                    problem = error("bad_address", "the line names a scope (proto=, port=) other than the "
                                                   "request's: post such lines with that proto and port in the query")
                else:
                    problem = self.app._never_block(self.req.gen, self.target.chain, network)
        if self.results is not None:
            self.results.append(result)
        if problem is not None or network is None:
            assert problem is not None
            result.update(status=problem.status, **problem.body)
            self.failed += 1
            if len(self.failures) < MAX_FAILURES:
                self.failures.append({"line" if self.text else "index": item.at, **result})
            return
        if self.results is None:
            self.loading.append(packed_of(network))
        else:
            self.wanted.append((len(self.results) - 1, network))

    @staticmethod
    def _scope_of(fields: tuple[str | None, str | None]) -> Scope | None | str:
        try:
            return parse_scope(*fields)
        except ValueError:
            return "unreadable"

    def _flush(self) -> Response | None:
        """Submit the batch; the worker's refusal as a Response, None when it was applied."""
        wanted, loading = self.wanted, self.loading
        if self.results is None and wanted:  # past DETAIL items: the batch so far goes with counts too
            loading[:0] = [packed_of(n) for _, n in wanted]
            wanted.clear()
        refused = self._settle()
        if refused is not None:
            return refused
        req, target = self.req, self.target
        if loading:  # in flight until the next flush, or the end, settles it
            # In key order (the store's text): the worker's lookups and writes then take each page of the table
            # once, whatever the order of the list (a real feed's is random: 2.5 times the time without).
            loading.sort(key=_text)
            command = BulkLoad(target.chain, tuple(loading), self.expires_at, req.user.name, str(req.client),
                               target.owner, target.scope)
            self.in_flight = (self.app.runtime.worker.submit(command), self.through, self.failed, len(loading))
            loading.clear()
            return None
        if wanted:
            with req.body.busy():
                # A large batch takes longer in the worker; allow it about 2 ms an item on top.
                pending = self.app.runtime.worker.submit(BulkBlock(
                    target.chain, tuple(n for _, n in wanted), self.expires_at, req.user.name, str(req.client),
                    target.owner, target.scope))
                done = self.app._wait(req.gen, pending, extra_time=len(wanted) / 500)
            if isinstance(done, Response):
                return done
            assert self.results is not None
            for (i, _), blocked in zip(wanted, done):
                self.results[i].update(status=201 if blocked.created else 200, entry=blocked.entry.to_json())
                if blocked.created:
                    self.created += 1
                else:
                    self.existing += 1
            wanted.clear()
        self.applied_through = self.through
        self.failed_applied = self.failed
        return None

    def _settle(self) -> Response | None:
        """Wait for the batch in flight; the worker's refusal as a Response, None when it was applied (or none was
        in flight)."""
        if self.in_flight is None:
            return None
        pending, through, failed, size = self.in_flight
        self.in_flight = None
        with self.req.body.busy():
            done = self.app._wait(self.req.gen, pending, extra_time=size / 500)
        if isinstance(done, Response):
            return done
        self.created += done.created
        self.existing += done.existing
        self.applied_through = through
        self.failed_applied = failed
        return None

    def _stopped(self, refused: Response) -> Response:
        """The answer when the load stopped half-way: the error, and what was applied before it (the batch in
        flight is waited for: a refusal of it is the error then, being the first)."""
        refused = self._settle() or refused
        key = "line" if self.text else "index"
        failures = [f for f in self.failures if f[key] <= self.applied_through]
        body = {**refused.body, "chain": self.target.chain.name, "created": self.created, "existing": self.existing,
                "failed": self.failed_applied, "failures": failures, "applied_through": self.applied_through}
        return Response(refused.status, body, refused.headers)
