"""The fleet: hosts that share the blocks of their `shared: true` chains through a Redis stream (docs/fleet.md).

Two threads, each with its own Redis client (its hot calls on one connection it holds, _Lean), and neither in the
way of a request:
- the publisher drains the outbox (rows the worker writes in the transaction of each local change of a shared chain)
  into the stream `<prefix>events` and the snapshot hash `<prefix>state`, with the last row's seq in
  `<prefix>published`, all in one script call (PUBLISH_SCRIPT; atomic as a MULTI is), so a publisher killed half-way
  publishes no row twice;
- the follower reads the stream from its cursor with XREAD BLOCK (or, while most of it is this host's own events,
  with FOLLOW_SCRIPT, which leaves those in Redis), checks each event, and hands a run of them to the
  worker (FleetApply), which applies them as claims of their nodes and moves the cursor in the same transaction. A
  new host, or one whose cursor the stream's trimming has passed, resyncs from the snapshot (FleetResync).

This module is imported only when the config has a fleet section, and it is the only one that imports `redis`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import redis
import redis.sentinel
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from webiptd.commands import FleetApplied, FleetApply, FleetResync, RemoteChange
from webiptd.config import (
    CHAIN_NAME_RE, NODE_RE, OWNER_LABEL_RE, PRODUCER_NODE, USER_NAME_RE, Config, Fleet as Settings,
)
from webiptd.firewall.pending import Pending
from webiptd.firewall.worker import Worker
from webiptd.net import Network, parse_item
from webiptd.scope import Scope, parse_scope, scope_refusal
from webiptd.state import OutboxReader, OutboxRun

logger = logging.getLogger(__name__)
# redis-py annotates each command's result as sync-or-asyncio (Awaitable[T] | T); this module uses the sync client.
Client = Any

EVENT_FIELDS = frozenset({"op", "chain", "network", "owner", "node", "id", "timeout", "expires_at", "created_at",
                          "proto", "port"})
MAX_FIELD = 256  # characters of one field's value; the longest valid one (a port list) is shorter
MAX_TIMEOUT = 10 * 365 * 86400  # as the API's
READ_COUNT = 5000  # events a follower reads (and the worker applies) at a time
WATCH_TRIES = 5  # an override's snapshot update, tried under WATCH this often before it goes without
PUBLISH_COUNT = 500  # outbox rows a publisher sends in one script call
BLOCK_MS = 1000  # XREAD BLOCK: how long the follower waits for an event before it looks at its status again
DOWN_WARNING = 60.0  # seconds without Redis before the one WARNING
PRUNE_EVERY = 600.0  # seconds between prunes of the snapshot's expired claims
BACKOFF = (0.2, 5.0)  # retry delays after a failure, doubling from the first to the second
APPLY_TIMEOUT = 300.0  # a resync of a million claims is one batch
SEEN_IDS = 10_000  # event ids remembered against duplicates
CURSOR_EVERY = 1.0  # seconds: a run of events this host only skips moves the stored cursor at most this often
PUBLISH_DELAY = 0.01  # seconds between two rounds of a busy publisher (an idle one sends at once)
# Longer waits at higher rates (changes a second, and the wait): the rounds carry more events each, fewer of them.
PUBLISH_BUSY = ((4000.0, 0.05), (2000.0, 0.02))
TRIM_EVERY = 1.0  # seconds: a busy publisher lets the worker delete the published outbox rows at most this often
FOLLOW_DELAY = 0.05  # seconds a follower without FOLLOW_SCRIPT waits after a run with nothing to apply (its echo)


class Malformed(ValueError):
    """An event that is not one: logged (rate-limited) and skipped."""


class Refused(ValueError):
    """A valid event this host does not apply (its chain is not shared here, never_block): logged and skipped."""


# -- events -------------------------------------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    """A reply's bytes as text; Malformed when they are not UTF-8."""
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{value[:40]!r} is not UTF-8 text") from None


def _fields(raw: dict[bytes, bytes]) -> dict[str, str]:
    try:
        return {k.decode(): v.decode() for k, v in raw.items()}
    except UnicodeDecodeError:
        raise Malformed("a field or its value is not UTF-8 text") from None


def stream_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _number(fields: dict[str, str], name: str) -> float | None:
    text = fields.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise Malformed(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise Malformed(f"{name} {text!r} is not a time")
    return value


def _owner(text: str | None, op: str) -> str:
    if text is None:
        raise Malformed("owner is missing")
    if text == "*":
        if op != "unblock":
            raise Malformed("owner * (every claim) is for op unblock only")
        return text
    user, slash, label = text.partition("/")
    if not USER_NAME_RE.match(user) or (slash and not OWNER_LABEL_RE.match(label)):
        raise Malformed(f"owner {text!r} is not user or user/label")
    return text


def parse_event(stream_id: str, fields: dict[str, str]) -> RemoteChange:
    """An event of the stream as a RemoteChange, or Malformed with the reason; nothing about this host's config."""
    unknown = sorted(set(fields) - EVENT_FIELDS)
    if unknown:
        raise Malformed(f"unknown field {unknown[0][:40]!r}")
    long = next((k for k, v in fields.items() if len(v) > MAX_FIELD), None)
    if long is not None:
        raise Malformed(f"field {long} is longer than {MAX_FIELD} characters")
    op = fields.get("op")
    if op not in ("block", "unblock"):
        raise Malformed("op is not block or unblock" if op is not None else "op is missing")
    chain = fields.get("chain")
    if chain is None or not CHAIN_NAME_RE.match(chain):
        raise Malformed("chain is missing" if chain is None else f"chain {chain!r} is not a chain name")
    text = fields.get("network")
    if text is None:
        raise Malformed("network is missing")
    try:
        network: Network = parse_item(text)
    except ValueError as exc:
        raise Malformed(f"network: {exc}") from None
    owner = _owner(fields.get("owner"), op)
    node = fields.get("node", PRODUCER_NODE)
    if not NODE_RE.match(node):
        raise Malformed(f"node {node!r} is not a node name")
    try:
        scope: Scope | None = parse_scope(fields.get("proto"), fields.get("port"))
    except ValueError as exc:
        raise Malformed(f"proto/port: {exc}") from None
    at = stream_ms(stream_id) / 1000
    created_at = _number(fields, "created_at")
    expires_at = _number(fields, "expires_at")
    if "timeout" in fields:
        if expires_at is not None:
            raise Malformed("give timeout or expires_at, not both")
        timeout = fields["timeout"]
        if not timeout.lstrip("-").isdigit() or not -1 <= int(timeout) <= MAX_TIMEOUT:
            raise Malformed(f"timeout {timeout!r} is not -1, 0 or 1 to {MAX_TIMEOUT} seconds")
        expires_at = None if int(timeout) in (-1, 0) else at + int(timeout)
    if op == "unblock" and (expires_at is not None or created_at is not None):
        raise Malformed("an unblock has no times")
    return RemoteChange(op, chain, network, scope, node, owner, at if created_at is None else created_at, expires_at,
                        fields.get("id", stream_id))


def refusal(config: Config, change: RemoteChange) -> str | None:
    """Why this host does not apply a valid event, in a sentence; None when it does."""
    chain = config.chains.get(change.chain)
    if chain is None or not chain.shared:
        return f"chain {change.chain} is not shared here"
    protected = config.protected_by(change.network, chain.target)
    if protected is not None:
        return f"{change.network} overlaps {'never_allow' if chain.target == 'ACCEPT' else 'never_block'} {protected}"
    return scope_refusal(chain, change.scope)


def snapshot_field(node: str, owner: str, chain: str, network: str, proto: str, ports: str) -> str:
    return json.dumps([node, owner, chain, network, proto, ports], separators=(",", ":"))


def _event_snapshot_key(event: dict[str, Any]) -> tuple[str, str, str, str]:
    return (event["chain"], str(event["network"]), event.get("proto") or "", event.get("port") or "")


# A publisher's round, run by Redis (EVALSHA; atomic, as a MULTI is): the outbox rows (OutboxReader.run's text, the
# worker's JSON, not parsed in Python: a round costs the daemon's one GIL the same for 1 event or 500), an XADD each,
# then the snapshot's changes of the run in one HSET and one HDEL (a key's last event wins, as one HSET or HDEL an
# event in order would leave it), then this host's marker; it returns the last event's stream id.
# - An entry's fields are the row's, in the order Worker._announce writes them; JSON nulls are left out.
# - A snapshot field is snapshot_field()'s text byte for byte (other code HDELs and HSCANs by it): Python's json.dumps
#   with ensure_ascii, which cjson.encode is not (it writes "/" as "\/"). The value is the text json.dumps gives
#   {"created_at": t, "expires_at": t or None}: the rows carry both times as their float's repr, which is its JSON.
# - `#!lua` with no flags: Redis refuses the whole script up front when it is out of memory, rather than at its
#   first write (Redis 7.0's EVAL flags).
PUBLISH_SCRIPT = r"""#!lua
local FIELDS = {'op', 'chain', 'network', 'owner', 'node', 'id', 'proto', 'port', 'created_at', 'expires_at'}
local ESCAPES = {['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f', ['\n'] = '\\n', ['\r'] = '\\r',
                 ['\t'] = '\\t'}
local null = cjson.null

local function u(code)
  return string.format('\\u%04x', code)
end

local function utf16(bytes)  -- one UTF-8 sequence as json.dumps escapes it: one \uXXXX, or a surrogate pair
  local b1, b2, b3, b4 = string.byte(bytes, 1, 4)
  local code
  if b1 < 224 then
    code = (b1 - 192) * 64 + (b2 - 128)
  elseif b1 < 240 then
    code = ((b1 - 224) * 64 + (b2 - 128)) * 64 + (b3 - 128)
  else
    code = (((b1 - 240) * 64 + (b2 - 128)) * 64 + (b3 - 128)) * 64 + (b4 - 128)
  end
  if code < 65536 then
    return u(code)
  end
  code = code - 65536
  return u(55296 + math.floor(code / 1024)) .. u(56320 + code % 1024)
end

local function quoted(text)  -- a JSON string as Python's json.dumps writes it (ensure_ascii); '' for none
  if text == nil or text == null then
    return '""'
  end
  if string.find(text, '[%z\1-\31"\\\127-\255]') then
    text = string.gsub(text, '[%z\1-\31"\\\127]', function(c) return ESCAPES[c] or u(string.byte(c)) end)
    text = string.gsub(text, '[\192-\247][\128-\191]*', utf16)
  end
  return '"' .. text .. '"'
end

local rows = cjson.decode(ARGV[4])
for i = 2, #rows do  -- an aggregate's order is SQLite's to choose
  if rows[i][1] < rows[i - 1][1] then
    table.sort(rows, function(x, y) return x[1] < y[1] end)
    break
  end
end
local snapshot, keys = {}, {}
local last
for i = 1, #rows do
  local event = rows[i][2]
  local args = {KEYS[1], 'MINID', '~', ARGV[1], '*'}
  for _, name in ipairs(FIELDS) do
    local value = event[name]
    if value ~= nil and value ~= null then
      args[#args + 1] = name
      args[#args + 1] = value
    end
  end
  last = redis.call('XADD', unpack(args))
  local key = '[' .. quoted(event.node) .. ',' .. quoted(event.owner) .. ',' .. quoted(event.chain) .. ',' ..
              quoted(event.network) .. ',' .. quoted(event.proto) .. ',' .. quoted(event.port) .. ']'
  local value = false
  if event.op == 'block' then
    local expires = event.expires_at
    if expires == nil or expires == null then
      expires = 'null'
    end
    value = '{"created_at": ' .. event.created_at .. ', "expires_at": ' .. expires .. '}'
  end
  if snapshot[key] == nil then
    keys[#keys + 1] = key
  end
  snapshot[key] = value
end
local sets, gone = {}, {}
for _, key in ipairs(keys) do
  local value = snapshot[key]
  if value then
    sets[#sets + 1] = key
    sets[#sets + 1] = value
  else
    gone[#gone + 1] = key
  end
end
if #sets > 0 then
  redis.call('HSET', KEYS[2], unpack(sets))
end
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return last
"""


# A follower's read while this host is the one publishing (FleetNode._follow_loop): the events after the cursor
# (exclusive), at most ARGV[2], without this host's own (their `node` field is ARGV[3]; the last one of a repeated
# field counts, as in _fields). It returns the last id it passed (false if none), how many it passed, and the others
# as XRANGE gives them. An echo of this host's own events costs the daemon no parsing: XREAD's reply of them cost the
# follower ~2 µs an event (bench/README.md, fleet).
FOLLOW_SCRIPT = r"""#!lua
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local others = {}
for _, entry in ipairs(entries) do
  local fields, node = entry[2], nil
  for j = 1, #fields - 1, 2 do
    if fields[j] == 'node' then
      node = fields[j + 1]
    end
  end
  if node ~= ARGV[3] then
    others[#others + 1] = entry
  end
end
local last = false
if #entries > 0 then
  last = entries[#entries][1]
end
return {last, #entries, others}
"""
FILTER_COUNT = 1000  # events FOLLOW_SCRIPT passes at a time: Redis runs a script as one command (~2 µs an event)


def _change_ports(change: RemoteChange) -> tuple[str, str]:
    scope = change.scope
    return ("", "") if scope is None else (scope.proto, scope.port_text if scope.ports else "")


# -- the connection ---------------------------------------------------------------------------------------------


def connect(settings: Settings) -> Client:
    """A client for the URL; nothing is sent until it is used."""
    # Replies stay bytes: what another client wrote may not be UTF-8, and a decoding client would fail the whole
    # reply (every event in it) on one such field. Each field is decoded on its own (_text).
    common: dict[str, Any] = {"decode_responses": False, "socket_timeout": 10.0, "socket_connect_timeout": 5.0,
                              "health_check_interval": 30}
    url = settings.redis
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "sentinel":
        auth, _, hosts = parts.netloc.rpartition("@")
        user, _, password = auth.partition(":")
        credentials = {"username": urllib.parse.unquote(user) or None,
                       "password": urllib.parse.unquote(password) or None}
        nodes = []
        for host in hosts.split(","):
            name, _, port = host.rpartition(":")
            nodes.append((name.strip("[]") or host, int(port) if port else 26379))
        path = [p for p in parts.path.split("/") if p]
        # The URL's credentials are the primary's; sentinels commonly run without a password, and one sent to
        # them would fail every connection ("AUTH called without any password configured").
        sentinel = redis.sentinel.Sentinel(nodes, sentinel_kwargs={"socket_timeout": 5.0}, **credentials, **common)
        return sentinel.master_for(path[0], db=int(path[1]) if len(path) > 1 else 0)
    if parts.scheme == "rediss":
        common.update(ssl_cert_reqs="required", ssl_ca_certs=None if settings.redis_ca is None
                      else str(settings.redis_ca))
    return redis.Redis.from_url(url, **common)


def describe(exc: BaseException, settings: Settings) -> str:
    """An exception in one line, without the URL's password should a message ever carry it."""
    text = f"{exc.__class__.__name__}: {exc}".replace("\n", " ")[:300]
    password = urllib.parse.urlsplit(settings.redis).password
    return text.replace(password, "***") if password else text


class _Lean:
    """One connection of a thread's client, held for its calls in a loop: a command sent and its reply read without
    Redis.execute_command's pool, retry and option handling (a publisher's round, 65-100 µs of CPU that way, costs
    45-50 µs; bench/README.md, fleet). A call that fails other than by Redis' error reply drops the connection,
    whose reply may be half read; the next call connects again, and the error goes to the loop as redis-py's would."""

    def __init__(self, client: Client):
        self._pool = client.connection_pool
        self._conn: Any = None

    def call(self, *args: Any) -> Any:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.get_connection()
        try:
            conn.send_command(*args)
            return conn.read_response()
        except redis.ResponseError:
            raise  # the reply was read whole: the connection is fine
        except BaseException:
            self.close(drop=True)
            raise

    def script(self, source: str, sha: str, keys: tuple[str, ...], args: tuple[Any, ...],
               wait: tuple[Any, ...] = ()) -> Any:
        """EVALSHA, and SCRIPT LOAD once when Redis does not have the script (a restart, SCRIPT FLUSH). `wait`: a
        blocking command sent with it, whose reply is dropped: Redis runs the script once that is over."""
        call = ("EVALSHA", sha, len(keys), *keys, *args)
        try:
            if not wait:
                return self.call(*call)
            waited, got = self.calls(wait, call)
            if isinstance(waited, Exception):
                raise waited
            if isinstance(got, Exception):
                raise got
            return got
        except redis.exceptions.NoScriptError:
            self.call("SCRIPT", "LOAD", source)
            return self.call(*call)

    def calls(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Commands sent at once, and their replies in order; an error reply as its exception, which leaves the
        connection in step."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            self.close(drop=True)
            raise

    def close(self, drop: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if drop:
                conn.disconnect()
            self._pool.release(conn)


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


PUBLISH_SHA, FOLLOW_SHA = _sha(PUBLISH_SCRIPT), _sha(FOLLOW_SCRIPT)


class _Link:
    """Whether Redis answers, shared by both threads: one WARNING after a minute without it, one INFO when back."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.connected = False
        self._warned = False
        self.downs = 0  # times either thread found Redis gone (or refusing)
        self.last_error = ""
        self.error_kind: str | None = None  # what GET /fleet says of it: a word, never the exception's text
        self._refusal = ""  # the last refusal logged (credentials, ACL): each new one is an ERROR at once

    def up(self, note: Callable[[], str] = lambda: "") -> None:
        with self._lock:
            was, warned, since = self.connected, self._warned, self.down_since
            self.connected, self.down_since, self._warned = True, None, False
        if warned and since is not None:
            logger.info("fleet: redis %s answers again after %d s%s", self._settings.redis_display,
                        self._clock() - since, note())
        elif not was:
            logger.info("fleet: connected to redis %s as node %s", self._settings.redis_display, self._settings.node)

    def down(self, exc: BaseException) -> None:
        now = self._clock()
        text = describe(exc, self._settings)
        # Redis answered and said no (bad credentials, an ACL without a command we use): a config error that no
        # retry mends, said at once; the retries go on, for the admin who fixes the ACL on the Redis side.
        if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):
            with self._lock:
                new, self._refusal = text != self._refusal, text
            if new:
                logger.error("fleet: redis %s refused us: %s (check fleet.redis's user and its ACL: docs/fleet.md)",
                             self._settings.redis_display, text)
        with self._lock:
            self.downs += 1
            self.connected = False
            self.last_error = text
            self.error_kind = _error_kind(exc)
            if self.down_since is None:
                self.down_since = now
                logger.debug("fleet: redis unreachable (%s); retrying", self.last_error)
            warn = not self._warned and now - self.down_since >= DOWN_WARNING
            if warn:
                self._warned = True
        if warn:
            logger.warning("fleet: redis %s unreachable for %d s (%s); blocks here still work, and their events "
                           "wait in the outbox", self._settings.redis_display, now - (self.down_since or now),
                           self.last_error)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, redis.AuthenticationError):
        return "authentication"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return "permission"
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError):
        return "connection"
    if isinstance(exc, redis.ResponseError):
        return "refused"
    return "error"


class _Skips:
    """The events skipped, logged so that no producer can flood the log: per kind (malformed, refused), the first
    of a minute in full, the others of that minute counted in one line when it is over. Each is skipped for good:
    the cursor moves past it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start = clock()
        self._counted: dict[str, int] = {}  # kind -> skipped since its line, in this minute
        self.total: dict[str, int] = {"own": 0, "duplicate": 0, "malformed": 0, "refused": 0}

    def skip(self, kind: str, stream_id: str, why: str) -> None:
        self.total[kind] += 1
        self.flush()
        if kind in self._counted:
            self._counted[kind] += 1
        else:
            self._counted[kind] = 0
            logger.warning("fleet: skipped %s event %s: %s (skipped for good; more of this kind in the next minute "
                           "are counted in one line)", kind, stream_id, why)

    def flush(self) -> None:
        now = self._clock()
        if now - self._start < 60.0:
            return
        more = {kind: n for kind, n in self._counted.items() if n}
        if more:
            logger.warning("fleet: skipped %s more events in the last %d s",
                           ", ".join(f"{n} {kind}" for kind, n in sorted(more.items())), now - self._start)
        self._start, self._counted = now, {}


# -- the two threads ---------------------------------------------------------------------------------------------


@dataclass
class _Status:
    cursor: str = ""
    ordinal: int = 0
    lag_events: int | None = None  # None until the follower has looked at the stream since the start
    lag_seconds: float | None = None
    last_published: str | None = None
    last_resync: float | None = None
    published: int = 0
    applied: int = 0
    resyncs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _InFlight(NamedTuple):
    cmd: FleetApply
    produced: list[tuple[str, RemoteChange]]
    answer: Pending[FleetApplied]


class _Read(NamedTuple):
    """A follower's read: the `entries` it looks at, the `last` id read (its new cursor), how many events it
    `passed` in all, of which Redis `left_out` this host's own, and whether the read was `full` (more may wait)."""

    entries: list[tuple[bytes, dict[bytes, bytes]]]
    last: str
    passed: int
    left_out: int
    full: bool


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An entry's fields from Redis' flat list (a field given twice: the last one, as redis-py's pairs_to_dict)."""
    return dict(zip(flat[::2], flat[1::2]))


class FleetNode:
    """This host in the fleet: the publisher and the follower, and what GET /fleet and /metrics show of them."""

    def __init__(self, settings: Settings, worker: Worker, store_path: Any, config: Callable[[], Config],
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self._worker = worker
        self._config = config
        self._clock = clock
        self._reader = OutboxReader(store_path)
        self._link = _Link(settings)
        self._skips = _Skips()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._reannounce = threading.Event()  # set by the publisher when redis lost this host's events
        self._status = _Status()
        # The ids of the last events applied: one published twice (after redis lost the publisher's marker) is
        # applied once.
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._node_bytes = settings.node.encode()
        self._filter = True  # the follower may read with FOLLOW_SCRIPT (not when Redis refuses it)
        self._cursor_written = 0.0
        self._published_seq = 0  # the last outbox row in Redis; the worker's `published` follows it (TRIM_EVERY)
        state = worker.fleet_state()
        self._status.cursor = state.get("cursor", "")
        self._status.ordinal = int(state.get("ordinal", "0"))
        resync = state.get("last_resync")
        self._status.last_resync = float(resync) if resync else None
        worker.on_outbox = self._wake.set
        self._threads = [threading.Thread(target=self._guard, args=(self._publish_loop,), name="fleet-publisher",
                                          daemon=True),
                         threading.Thread(target=self._guard, args=(self._follow_loop,), name="fleet-follower",
                                          daemon=True)]
        p = settings.key_prefix
        self.events, self.state, self.published_key, self.folded = (f"{p}events", f"{p}state", f"{p}published",
                                                                    f"{p}folded")

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._reader.close()

    def _guard(self, loop: Callable[[Client], None]) -> None:
        """Run a thread's loop with its own client; a bug is logged and the loop starts again, never a dead
        thread that nobody sees."""
        client = connect(self.settings)
        delay = BACKOFF[0]
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                loop(client)
                return
            except redis.RedisError as exc:
                self._link.down(exc)
            except Exception:
                logger.exception("fleet: %s failed; starting it again", threading.current_thread().name)
            if time.monotonic() - started > 30:
                delay = BACKOFF[0]  # it worked for a while: this is a new failure, not the same one again
            self._stop.wait(delay)
            delay = min(delay * 2, BACKOFF[1])

    # -- publishing --------------------------------------------------------------------------------------------

    def _publish_loop(self, r: Client) -> None:
        """Publish from the marker Redis holds, checked again whenever the link was lost since: Redis may be back
        without its data, and an idle publisher's connection would not notice (redis-py reconnects on its own)."""
        lean = _Lean(r)
        try:
            while not self._stop.is_set():
                downs = self._link.downs
                self._publish_rounds(r, lean, self._check_marker(r), downs)
        finally:
            lean.close()

    def _check_marker(self, r: Client) -> int:
        """Where to publish from: this host's marker in Redis, unless Redis lost data or the store is new."""
        marker = int(_text(r.hget(self.published_key, self.settings.node) or b"0"))
        # What this host knows it published: the store's (the worker writes it when it trims the outbox), or this
        # process's own count, which is ahead of it by what was published since the last trim.
        known = max(int(self._worker.fleet_state().get("published", "0")), self._published_seq)
        if marker < known:
            # Redis lost what this host published (a restart without persistence, a failover to a replica that
            # lagged): its blocks are announced again, from the store, by the follower.
            logger.warning("fleet: redis has node %s's events up to %d only, and this host published up to %d: "
                           "redis lost data; announcing this host's blocks again", self.settings.node, marker, known)
            self._reannounce.set()
            marker = known
        if marker > self._worker.outbox_committed:
            # Another store's marker (this node's store was made anew): its seqs start again at 1.
            logger.warning("fleet: redis says node %s published up to event %d, but this host's outbox ends at %d: "
                           "a new state store under an old node name; publishing its outbox from the start",
                           self.settings.node, marker, self._worker.outbox_committed)
            marker = 0
        self._published_seq = self._worker.published = max(self._worker.published, marker)
        self._link.up(self._outbox_note)
        return marker

    def _publish_rounds(self, r: Client, lean: _Lean, marker: int, downs: int) -> None:
        """Rounds from `marker` until the stop, or until the link is lost (`downs` is no longer its count)."""
        next_prune = next_trim = last_round = time.monotonic()
        while not self._stop.is_set() and self._link.downs == downs:
            run = self._reader.run(marker, self._worker.outbox_committed, PUBLISH_COUNT)
            if run.last is not None:
                self._publish(lean, run)
                marker = run.last
            elif run.star is not None:
                self._publish_every_claim(r, run.star, json.loads(self._reader.event(run.star)))
                marker = run.star
            else:
                self._worker.published = marker  # nothing more to send: the published rows may go
                if time.monotonic() >= next_prune:
                    self._prune(r)
                    next_prune = time.monotonic() + PRUNE_EVERY
                self._wake.wait(1.0)  # an idle host publishes a change at once
                self._wake.clear()
                continue
            self._published_seq = marker
            if time.monotonic() >= next_trim:
                # While busy, the worker deletes the published rows (and stores the marker) at most this often:
                # each time is two more statements in a batch's transaction (bench/README.md, fleet).
                self._worker.published = marker
                next_trim = time.monotonic() + TRIM_EVERY
            self._link.up(self._outbox_note)
            now = time.monotonic()
            rate, last_round = run.read / max(now - last_round, 0.001), now
            if run.read < PUBLISH_COUNT:
                # Busy (it had something to send): what comes in the next moments goes in one round. A round
                # (a wake-up, the outbox read, the script call) costs this thread more than the events in it do
                # (bench/README.md, fleet); at thousands of changes a second, longer rounds cut that for 10-40 ms
                # more on the way to the other hosts.
                self._stop.wait(next((wait for least, wait in PUBLISH_BUSY if rate >= least), PUBLISH_DELAY))

    def _outbox_note(self) -> str:
        depth = self.outbox_depth()
        return f"; publishing {depth} queued events" if depth else ""

    def _minid(self) -> int:
        """XADD's MINID: the stream keeps `retention` seconds of events."""
        return int((self._clock() - self.settings.retention) * 1000)

    def _xadd(self, pipe: Any, event: dict[str, Any], minid: int) -> None:
        """The XADD of an outbox row: its fields as the stream entry's. execute_command rather than pipe.xadd: the
        same command, without xadd()'s checks of its options, a few µs an event on the publisher's hot path."""
        pipe.execute_command("XADD", self.events, "MINID", "~", minid, "*",
                             *(x for k, v in event.items() if v is not None for x in (k, str(v))))

    def _publish(self, lean: _Lean, run: OutboxRun) -> None:
        """One call of PUBLISH_SCRIPT: the run's events into the stream and the snapshot, and this host's marker."""
        last_id = lean.script(PUBLISH_SCRIPT, PUBLISH_SHA, (self.events, self.state, self.published_key),
                              (self._minid(), self.settings.node, run.last, run.text))
        self._published(run.events, last_id)

    def _published(self, count: int, last_id: Any) -> None:
        with self._status.lock:
            self._status.published += count
            if isinstance(last_id, (bytes, str)):
                self._status.last_published = _text(last_id)

    def _publish_every_claim(self, r: Client, seq: int, event: dict[str, Any]) -> None:
        """An override unblock: the event, and every claim of its key out of the snapshot, whoever holds it. WATCH
        makes the scan and the deletion one step against other hosts' publishers."""
        key = _event_snapshot_key(event)
        with r.pipeline(transaction=True) as pipe:
            for attempt in range(WATCH_TRIES + 1):
                try:
                    # The last try goes without WATCH: other hosts' publishers may change the snapshot all the
                    # time, and a claim of this key they add during the scan is the only thing it can miss.
                    if attempt < WATCH_TRIES:
                        pipe.watch(self.state)
                    fields = self._scan(pipe if attempt < WATCH_TRIES else r, key)
                    pipe.multi()
                    self._xadd(pipe, event, self._minid())
                    if fields:
                        pipe.hdel(self.state, *fields)
                    pipe.hset(self.published_key, self.settings.node, str(seq))
                    result = pipe.execute()
                    self._published(1, result[0])
                    return
                except redis.WatchError:
                    continue

    def _scan(self, r: Any, key: tuple[str, ...]) -> list[bytes]:
        """The snapshot's fields of every claim on `key` (chain, network, proto, ports). HSCAN NOVALUES is
        Redis 7.4's; Debian 12 has 7.0."""
        found = []
        for name, _ in r.hscan_iter(self.state, count=1000):
            try:
                if tuple(_snapshot_key(_text(name))[2:]) == key:
                    found.append(name)
            except ValueError:
                continue  # not a claim of ours; _prune removes it
        return found

    def _prune(self, r: Client) -> None:
        """Delete the snapshot's expired claims (any host may; they are gone everywhere)."""
        now = self._clock()
        gone = []
        for name, value in r.hscan_iter(self.state, count=1000):
            try:
                _snapshot_key(_text(name))
                expires = json.loads(value).get("expires_at")
                if expires is not None and not isinstance(expires, (int, float)):
                    raise ValueError("expires_at is not a time")
            except (ValueError, AttributeError):
                gone.append(name)  # not ours to read: nobody can resync from it either
                continue
            if expires is not None and expires <= now:
                gone.append(name)
        for i in range(0, len(gone), 1000):
            r.hdel(self.state, *gone[i:i + 1000])
        if gone:
            logger.info("fleet: pruned %d expired claims from the snapshot", len(gone))

    # -- following ---------------------------------------------------------------------------------------------

    def _follow_loop(self, r: Client) -> None:
        """Read, check, and hand to the worker; the next run of events is read and checked while the worker
        applies the one before (one in flight at most, so they are applied in order)."""
        cursor = self._check(r)
        self._look(r)
        self._link.up()
        last_look = time.monotonic()
        ordinal = self._status.ordinal
        pending: _InFlight | None = None
        lean = _Lean(r)
        filtering = False  # most of the last run was this host's own events: Redis leaves them out (FOLLOW_SCRIPT)
        try:
            while not self._stop.is_set():
                if self._reannounce.is_set():
                    self._settle(r, pending)
                    pending = None
                    self._reannounce.clear()
                    cursor = self._resync(r, keep=True, why="redis lost this host's events")
                    ordinal = self._status.ordinal
                # With a run in flight, only what is there already: the worker's answer comes first.
                got = self._read(lean, cursor, block=pending is None, filtering=filtering)
                run = None
                if got.passed:
                    own_before = self._skips.total["own"]
                    changes, produced = self._check_events(got.entries)
                    self._skips.total["own"] += got.left_out
                    filtering = 2 * (self._skips.total["own"] - own_before) > got.passed
                    cursor = got.last
                    ordinal += got.passed
                    run = FleetApply(tuple(changes), cursor, ordinal), produced
                self._settle(r, pending)
                pending = None
                if run is not None:
                    cmd, produced = run
                    if cmd.changes or produced or time.monotonic() - self._cursor_written >= CURSOR_EVERY:
                        pending = _InFlight(cmd, produced, self._worker.submit(cmd))
                    else:  # only events this host skips (its own, mostly): the cursor is written with a later run
                        with self._status.lock:
                            self._status.cursor, self._status.ordinal = cursor, ordinal
                        if not got.full and not (filtering and self._filter):
                            # This host is the one publishing, and Redis refused it the script: read its echo in
                            # fewer, larger runs (with the script, the next read waits for a round of it).
                            self._stop.wait(FOLLOW_DELAY)
                now = time.monotonic()
                if now - last_look >= 1.0:
                    info = self._look(r)
                    if pending is None:
                        ordinal = self._status.ordinal  # as _look found it (exact again when caught up)
                        if info is not None and _trimmed_past(info, cursor, ordinal):
                            # A host that fell this far behind while connected (or a hand-made XTRIM): the events
                            # XREAD would skip silently are in the snapshot.
                            cursor = self._resync(r, keep=False, why=f"events after this host's cursor {cursor} "
                                                  "were trimmed from the stream while it followed")
                            ordinal = self._status.ordinal
                    self._skips.flush()
                    last_look = now
        finally:
            lean.close()
            if pending is not None:  # a redis error or the stop: the worker finishes the run all the same
                self._settle(None, pending)

    def _read(self, lean: _Lean, cursor: str, block: bool, filtering: bool) -> _Read:
        """The events after `cursor`, with XREAD (with `block`, waiting up to BLOCK_MS for the first), or with
        `filtering` by FOLLOW_SCRIPT, without this host's own. The script cannot wait: with `block`, an XREAD of one
        entry goes first, in the same send, and the script (which reads that entry again) runs when it returns. So a
        host that publishes wakes once a round of its own publisher, and another host's event reaches it at once."""
        if filtering and self._filter:
            wait = ("XREAD", "COUNT", 1, "BLOCK", BLOCK_MS, "STREAMS", self.events, cursor) if block else ()
            try:
                last, passed, others = lean.script(FOLLOW_SCRIPT, FOLLOW_SHA, (self.events,),
                                                   (cursor, FILTER_COUNT, self.settings.node), wait)
            except redis.exceptions.NoPermissionError as exc:
                # A user from before the scripts (docs/fleet.md, Redis users): the follower works without.
                self._filter = False
                logger.warning("fleet: redis refused this host's user the follower's script (%s); reading every "
                               "event with XREAD instead", describe(exc, self.settings))
                return self._read(lean, cursor, block, filtering=False)
            return _Read([(e[0], _pairs(e[1])) for e in others], _text(last) if passed else cursor, passed,
                         passed - len(others), passed >= FILTER_COUNT)
        reply = lean.call("XREAD", "COUNT", READ_COUNT, *(("BLOCK", BLOCK_MS) if block else ()), "STREAMS",
                          self.events, cursor)
        if not reply:
            return _Read([], cursor, 0, 0, False)
        # RESP3 (redis-py 8's default) gives the streams as a map, RESP2 as [name, entries] pairs.
        entries = [(e[0], _pairs(e[1])) for e in (next(iter(reply.values())) if isinstance(reply, dict)
                                                   else reply[0][1])]
        return _Read(entries, entries[-1][0].decode("ascii"), len(entries), 0, len(entries) >= READ_COUNT)

    def _check_events(self, entries: list[tuple[bytes, dict[bytes, bytes]]]
                      ) -> tuple[list[RemoteChange], list[tuple[str, RemoteChange]]]:
        """The events of a run this host applies, and the outside producers' (for the snapshot)."""
        config = self._config()
        own = self._node_bytes
        changes: list[RemoteChange] = []
        produced: list[tuple[str, RemoteChange]] = []
        for raw_id, raw in entries:
            if raw.get(b"node") == own:  # this host's own, back from the stream: nothing to parse
                self._skips.total["own"] += 1
                continue
            stream_id = raw_id.decode("ascii")
            try:
                fields = _fields(raw)
                change = parse_event(stream_id, fields)
            except Malformed as exc:
                self._skips.skip("malformed", stream_id, str(exc))
                continue
            if change.event_id in self._seen:
                self._skips.total["duplicate"] += 1
                continue
            self._seen[change.event_id] = None
            if len(self._seen) > SEEN_IDS:
                self._seen.popitem(last=False)
            if "node" not in fields:
                produced.append((stream_id, change))
            why = refusal(config, change)
            if why is not None:
                self._skips.skip("refused", stream_id, why)
                continue
            changes.append(change)
        return changes, produced

    def _settle(self, r: Client | None, pending: _InFlight | None) -> None:
        """Wait for the run in flight; a run the worker could not apply (the kernel or the store refused it) is
        handed to it again, with backoff, and the cursor waits. Then the outside producers' events of the run
        are folded into the snapshot (with `r`)."""
        if pending is None:
            return
        cmd, produced, answer = pending
        delay = BACKOFF[0]
        while True:
            try:
                result = answer.result(APPLY_TIMEOUT)
                break
            except Exception as exc:
                logger.warning("fleet: applying %d events failed (%s); trying again in %.1f s", len(cmd.changes),
                               exc.__class__.__name__, delay)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, BACKOFF[1])
                answer = self._worker.submit(cmd)
        self._cursor_written = time.monotonic()
        with self._status.lock:
            self._status.cursor, self._status.ordinal = cmd.cursor, cmd.ordinal
            self._status.applied += result.applied
        if produced and r is not None:
            self._fold(r, produced)

    def _check(self, r: Client) -> str:
        """Where to follow from: the cursor, or the snapshot's id after a resync."""
        cursor = self._status.cursor or None  # ahead of the stored one by the runs of skipped events (CURSOR_EVERY)
        info = self._info(r)
        if cursor is None:
            return self._resync(r, keep=False, why="this host has not followed the stream before")
        if info is None:
            if cursor != "0-0":
                return self._resync(r, keep=True, why="the stream is gone from redis (its data was lost?)")
            return cursor
        if id_key(cursor) > id_key(info["last-generated-id"]):
            return self._resync(r, keep=True, why=f"the stream ends at {info['last-generated-id']}, before this "
                                f"host's cursor {cursor} (redis went back in time?)")
        if _trimmed_past(info, cursor, self._status.ordinal):
            return self._resync(r, keep=False, why=f"events after this host's cursor {cursor} were trimmed from "
                                "the stream")
        return cursor

    def _info(self, r: Any) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = r.xinfo_stream(self.events)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        return _stream_info(info)

    def _resync(self, r: Client, keep: bool, why: str) -> str:
        pipe = r.pipeline(transaction=True)
        pipe.hgetall(self.state)
        pipe.xinfo_stream(self.events)
        snapshot, info = pipe.execute(raise_on_error=False)
        if isinstance(snapshot, Exception):
            raise snapshot
        if isinstance(info, Exception):
            if "no such key" not in str(info).lower():
                raise info
            info = None
        else:
            info = _stream_info(info)
        cursor = "0-0" if info is None else info["last-generated-id"]
        ordinal = 0 if info is None else int(info.get("entries-added") or 0)
        logger.info("fleet: resyncing from the snapshot (%d claims) and following from %s: %s", len(snapshot),
                    cursor, why)
        config = self._config()
        claims = []
        for name, value in snapshot.items():
            try:
                change = _snapshot_claim(_text(name), _text(value))
            except (Malformed, ValueError, TypeError, KeyError, AttributeError) as exc:
                self._skips.skip("malformed", f"snapshot field {name[:80]!r}", str(exc))
                continue
            if change.node == self.settings.node:
                continue  # this host's own claims are in its own store
            why_not = refusal(config, change)
            if why_not is not None:
                self._skips.skip("refused", f"snapshot claim {change.node}/{change.owner}", why_not)
                continue
            claims.append(change)
        self._worker.submit(FleetResync(tuple(claims), cursor, ordinal, keep)).result(APPLY_TIMEOUT)
        with self._status.lock:
            self._status.cursor, self._status.ordinal = cursor, ordinal
            self._status.last_resync = self._clock()
            self._status.resyncs += 1
        return cursor

    def _fold(self, r: Client, produced: list[tuple[str, RemoteChange]]) -> None:
        """Put the outside producers' events in the snapshot, once: the first host to apply them does, the others
        find `folded` past them."""
        with r.pipeline(transaction=True) as pipe:
            for _ in range(10):
                try:
                    pipe.watch(self.folded)
                    done = _text(pipe.get(self.folded) or b"0-0")
                    todo = [(i, c) for i, c in produced if id_key(i) > id_key(done)]
                    if not todo:
                        pipe.unwatch()
                        return
                    stale = [f for _, c in todo if c.owner == "*"
                             for f in self._scan(pipe, (c.chain, str(c.network), *_change_ports(c)))]
                    pipe.multi()
                    for _, c in todo:
                        key = snapshot_field(c.node, c.owner, c.chain, str(c.network), *_change_ports(c))
                        if c.op == "block":
                            pipe.hset(self.state, key, json.dumps({"created_at": c.created_at,
                                                                   "expires_at": c.expires_at}))
                        elif c.owner != "*":
                            pipe.hdel(self.state, key)
                    if stale:
                        pipe.hdel(self.state, *stale)
                    pipe.set(self.folded, todo[-1][0])
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _look(self, r: Client) -> dict[str, Any] | None:
        """The lag: events after the applied cursor (from the stream's entries-added count; a run read and still
        being applied counts as not applied) and the age of the first."""
        with self._status.lock:
            cursor = self._status.cursor or "0-0"
        info = self._info(r)
        lag_events, lag_seconds = 0, 0.0
        if info is not None:
            added = int(info.get("entries-added") or 0)
            if cursor == info["last-generated-id"]:
                with self._status.lock:
                    self._status.ordinal = added  # caught up: the count is exact again (an XDEL may have moved it)
            else:
                lag_events = max(1, added - self._status.ordinal)
                first = r.xrange(self.events, f"({cursor}", "+", count=1)
                if first:
                    lag_seconds = max(0.0, self._clock() - stream_ms(_text(first[0][0])) / 1000)
        with self._status.lock:
            self._status.lag_events, self._status.lag_seconds = lag_events, lag_seconds
        return info

    # -- what it shows --------------------------------------------------------------------------------------------

    def outbox_depth(self) -> int:
        return max(0, self._worker.outbox_committed - self._published_seq)

    def status(self) -> dict[str, Any]:
        s = self._status
        with s.lock:
            connected = self._link.connected
            return {
                "node": self.settings.node,
                "redis": self.settings.redis_display,
                "connected": connected,
                "last_error": None if connected else self._link.error_kind,
                "last_applied_id": s.cursor or None,
                "lag_events": s.lag_events,
                "lag_seconds": None if s.lag_seconds is None else round(s.lag_seconds, 3),
                "outbox": self.outbox_depth(),
                "last_published_id": s.last_published,
                "last_resync": _iso(s.last_resync),
                "remote_claims": self._worker.remote_claims,
                "shared_chains": [c.name for c in self._config().chains.values() if c.shared],
            }

    def status_line(self) -> str:
        if not self._link.connected and self._link.down_since is None:
            return "fleet: connecting to redis"
        if not self._link.connected:
            return f"fleet: redis unreachable, {self.outbox_depth()} events waiting"
        lag = self._status.lag_events
        return "fleet: catching up" if lag is None else f"fleet lag {lag} events"

    def collect(self) -> Iterable[Metric]:
        s = self._status
        yield GaugeMetricFamily("webiptd_fleet_connected", "1 while Redis answers this host's fleet threads.",
                                value=1 if self._link.connected else 0)
        if s.lag_events is not None and s.lag_seconds is not None:  # known once the follower has looked
            yield GaugeMetricFamily("webiptd_fleet_lag_events", "Events in the stream this host has not applied "
                                    "yet.", value=s.lag_events)
            yield GaugeMetricFamily("webiptd_fleet_lag_seconds", "Age of the oldest event this host has not "
                                    "applied.", value=s.lag_seconds)
        yield GaugeMetricFamily("webiptd_fleet_outbox_depth", "Local changes of shared chains not yet in Redis.",
                                value=self.outbox_depth())
        yield GaugeMetricFamily("webiptd_fleet_remote_claims", "Claims of other hosts held here.",
                                value=self._worker.remote_claims)
        yield CounterMetricFamily("webiptd_fleet_events_published", "Events this host published.", value=s.published)
        yield CounterMetricFamily("webiptd_fleet_events_applied", "Events of other hosts that changed a claim here.",
                                  value=s.applied)
        skipped = CounterMetricFamily("webiptd_fleet_events_skipped", "Events not applied here, by reason: this "
                                      "host's own, malformed, or refused (a chain not shared here, never_block).",
                                      labels=("reason",))
        for reason, count in sorted(self._skips.total.items()):
            skipped.add_metric((reason,), count)
        yield skipped
        yield CounterMetricFamily("webiptd_fleet_resyncs", "Times this host replaced its remote claims with the "
                                  "snapshot.", value=s.resyncs)


def _trimmed_past(info: dict[str, Any], cursor: str, ordinal: int) -> bool:
    """Whether events after `cursor` (the `ordinal`-th entry ever added) are gone from the stream.

    Redis 7.0 moves max-deleted-entry-id on XDEL, not when the stream is trimmed. So a cursor before the first entry
    (or in a stream trimmed empty) counts too, when more entries left the stream than this host had read: then some
    it had not read are gone. A host that joined an empty stream has cursor 0-0, before every entry, and lost
    nothing."""
    deleted = info["max-deleted-entry-id"]
    if deleted != "0-0" and id_key(cursor) <= id_key(deleted):
        return True
    first = info.get("first-entry")
    front = first is None or id_key(cursor) < id_key(_text(first[0]))
    gone = int(info.get("entries-added") or 0) - int(info.get("length") or 0)
    return front and id_key(cursor) < id_key(info["last-generated-id"]) and gone > ordinal


def _stream_info(info: dict[str, Any]) -> dict[str, Any]:
    """XINFO STREAM's reply with its ids as text."""
    return {**info, "last-generated-id": _text(info["last-generated-id"]),
            "max-deleted-entry-id": _text(info.get("max-deleted-entry-id") or b"0-0")}


def _snapshot_key(name: str) -> list[str]:
    key = json.loads(name)
    if not isinstance(key, list) or len(key) != 6 or not all(isinstance(k, str) for k in key):
        raise Malformed("not a claim's key")
    return key


def _snapshot_claim(name: str, value: str) -> RemoteChange:
    node, owner, chain, network, proto, ports = _snapshot_key(name)
    times = json.loads(value)
    fields = {"op": "block", "chain": chain, "network": network, "owner": owner, "node": node}
    if proto:
        fields["proto"] = proto
    if ports:
        fields["port"] = ports
    if times.get("expires_at") is not None:
        fields["expires_at"] = repr(float(times["expires_at"]))
    fields["created_at"] = repr(float(times["created_at"]))
    return parse_event("0-0", fields)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
