"""The connections, under the admission deadlines: a thread each for its TLS handshake; then one thread, the
Loop, for all of them between requests and for the common requests (App.begin: a change or lookup of one entry,
/health), reading heads off the wire and writing each answer in one write; a thread of its own (Handler) for any
other request (a bulk POST, a listing, credentials to verify, anything odd), after which the connection goes back
to the Loop.

Why one thread for the common requests: each thread that serves a request takes the GIL, hands the command to the
worker and is woken by its answer, and on two cores those hand-offs, not the work, were the larger part of a
request's CPU (bench/README.md, the request path). The Loop reads every ready request, submits each, and is woken
once by the worker for a whole batch of answers."""

from __future__ import annotations

import collections
import http.server
import logging
import os
import selectors
import socket
import socketserver
import ssl
import struct
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from webiptd.admission import BODY, BUSY, HEAD, IDLE, Admission, Slot
from webiptd.firewall.pending import Pending
from webiptd.http import wire
from webiptd.http.app import NOT_ANSWERED, NOT_TAKEN, SLOW, App, Generation, Runtime, Started
from webiptd.http.bulk import CHUNK, BodyIncomplete
from webiptd.http.responses import Response, error
from webiptd.log import Reason
from webiptd.net import Address, peer_address

logger = logging.getLogger(__name__)

EXPIRE_EVERY = 0.25  # seconds between looks for connections past their phase's deadline
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset
# A streamed body (a bulk POST's) has limits.request_timeout, and one more second for each MIN_BODY_RATE bytes that
# came (Apache mod_reqtimeout's MinRate): a large load at any honest speed passes, a trickle is cut. The time the
# worker spends on its batches does not count.
MIN_BODY_RATE = 16384
LINGER_TIME = 1.0  # seconds to read and drop what a client still sends after an answer that did not read its body
LINGER_BYTES = 1 << 20
READ_SIZE = 65536
# A complete head fits in this many bytes (wire.parse_head's bounds); past it without one, it is a Handler's to refuse.
HEAD_MAX = wire.MAX_REQUEST_LINE + 1 + wire.MAX_HEADER_BYTES + 1
LOOP_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE"})
NO_THREAD = Reason("closed a connection from {source}: the system would not start another thread",
                   "closed {n} connections from {source}: the system would not start another thread")


class StreamedBody:
    """A POST's body, which the route reads in chunks as it goes (http/bulk.py's Body): each read under the
    connection's body deadline, "100 Continue" sent only when the route first reads, that is once the request
    passed its checks."""

    def __init__(self, handler: Handler, length: int, expect_continue: bool, timeout: float):
        self._handler = handler
        self._left = length
        self._expect_continue = expect_continue
        self._timeout = timeout
        self._started: float | None = None
        self._received = 0
        self._busy = 0.0  # seconds spent busy (the worker applying a batch) since the first read

    @property
    def done(self) -> bool:
        return self._left == 0

    def read(self, size: int = CHUNK) -> bytes:
        if not self._left:
            return b""
        handler = self._handler
        now = time.monotonic()
        if self._started is None:
            self._started = now
            if self._expect_continue:
                # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits for this before the body.
                handler.wfile.write(wire.CONTINUE)
        left = self._started + self._busy + self._timeout + self._received / MIN_BODY_RATE - now
        if left <= 0 or not handler.server.runtime.admission.enter(handler.slot, BODY, left):
            raise BodyIncomplete("the body came too slowly (limits.request_timeout)")
        try:
            handler.connection.settimeout(min(left, self._timeout))
            data = handler.reader.read1(min(size, self._left))
        except OSError:
            raise BodyIncomplete("the body stopped coming (limits.request_timeout)") from None
        if not data:
            raise BodyIncomplete("the body ended before its Content-Length")
        self._left -= len(data)
        self._received += len(data)
        return data

    def skip_small(self) -> bool:
        """Read and drop what is left of a small body (at most MAX_IGNORED_BODY bytes, as any other request may
        send along), unless the client waits for "100 Continue", which it never got: then the connection stays
        usable for the next request. False when it does not (too big, too slow, or not sent)."""
        if self._left > wire.MAX_IGNORED_BODY or (self._expect_continue and self._started is None):
            return False
        self._expect_continue = False
        try:
            while self._left:
                self.read()
        except BodyIncomplete:
            return False
        return True

    @contextmanager
    def busy(self) -> Iterator[None]:
        handler = self._handler
        handler.server.runtime.admission.enter(handler.slot, BUSY, None)
        started = time.monotonic()
        try:
            yield
        finally:
            self._busy += time.monotonic() - started


class Connection:
    """One admitted connection after its TLS handshake, whichever thread holds it: the Loop between requests, or a
    Handler's thread for one request. `buffer` holds what was read of the next request(s)."""

    __slots__ = ("sock", "raw", "addr", "peer", "peer_cert", "slot", "server", "tls", "buffer", "first", "eof",
                 "events", "idle", "head", "route", "started", "given_up", "out", "close_after", "_cert_cn")

    def __init__(self, sock: Any, raw: socket.socket, addr: Any, peer: Address, peer_cert: Mapping[str, Any],
                 slot: Slot, server: Server):
        self.sock = sock  # the SSLSocket, or `raw` itself with plain_http
        self.raw = raw
        self.addr = addr
        self.peer = peer
        self.peer_cert = peer_cert  # as getpeercert() gave it right after the handshake: {} without one
        self.slot = slot
        self.server = server
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.buffer = bytearray()
        self.first = True  # no request yet: the first one's head is due within header_timeout of the handshake
        self.eof = False  # the client has stopped sending
        self.events = 0  # what the Loop's selector watches it for
        self.idle = False  # between requests (IDLE): the next one's first bytes move it to HEAD or BUSY
        # The request the Loop is serving: its head, metrics label and start, the command in the worker, whether
        # limits.worker_timeout has passed once, the answer's bytes not yet sent and whether to close after them.
        self.head: wire.RequestHead | None = None
        self.route: tuple[list[str], float] = (["none"], 0.0)
        self.started: Started | None = None
        self.given_up = False
        self.out = b""
        self.close_after = False
        self._cert_cn: tuple[ssl.SSLContext | None, str | None] | None = None

    def cert_cn(self, gen: Generation) -> str | None:
        """The subject CN of the client certificate this connection's handshake verified, or None.

        Only while the current config trusts the same client CAs as the context that verified it:
        after a reload that replaces tls.client_ca, a connection opened before it no longer logs in by it.
        Worked out once per connection and config context, since a reload is what changes the answer.
        """
        current = gen.config.ssl_context
        cached = self._cert_cn
        if cached is None or cached[0] is not current:
            cached = self._cert_cn = (current, self._verified_cn(current))
        return cached[1]

    def _verified_cn(self, current: ssl.SSLContext | None) -> str | None:
        conn = self.sock
        if not isinstance(conn, ssl.SSLSocket) or current is None or not self.peer_cert:
            return None
        if conn.context is not current and (
                conn.context.get_ca_certs(binary_form=True) != current.get_ca_certs(binary_form=True)):
            return None
        names = [value for rdn in self.peer_cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return names[0] if len(names) == 1 else None  # several CNs: ambiguous, so none

    def close(self, admission: Admission) -> None:
        admission.release(self.slot)  # before close: the descriptor cannot be reused under it
        try:
            self.sock.close()
        finally:
            self.raw.close()


class Reader:
    """A Handler's `rfile`: the bytes the Loop read ahead first, then the socket. What is left after the request
    (the start of a pipelined next one) goes back to the Loop in `buffer`."""

    def __init__(self, sock: Any, buffer: bytearray):
        self._sock = sock
        self.buffer = buffer

    def _fill(self) -> bool:
        data = self._sock.recv(READ_SIZE)
        self.buffer += data
        return bool(data)

    def readline(self, limit: int = -1) -> bytes:
        buffer = self.buffer
        while True:
            end = buffer.find(b"\n", 0, limit if limit >= 0 else len(buffer))
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(buffer) or not self._fill():
                end = len(buffer) if limit < 0 else min(limit, len(buffer))
                break
        line = bytes(buffer[:end])
        del buffer[:end]
        return line

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size and self._fill():
            pass
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def read1(self, size: int) -> bytes:
        if not self.buffer:
            data: bytes = self._sock.recv(min(size, READ_SIZE))
            return data
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


class Handler(http.server.BaseHTTPRequestHandler):
    """One request of a connection on a thread of its own: what the Loop does not serve itself (App.begin's SLOW),
    from the bytes the Loop read of it on."""

    protocol_version = "HTTP/1.1"
    # Unbuffered: each answer, status line to body, goes to one sendall(), so it leaves in one TLS record and
    # one send(); a buffer would only copy it once more.
    wbufsize = 0
    server_version = wire.SERVER
    sys_version = ""
    server: "Server"

    def __init__(self, conn: Connection):
        self.conn = conn
        self.slot = conn.slot
        self.reader = Reader(conn.sock, conn.buffer)
        self.requestline = ""
        super().__init__(conn.sock, conn.addr, conn.server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = self.reader  # type: ignore[assignment]
        self.wfile = socketserver._SocketWriter(self.connection)  # type: ignore[attr-defined]

    def finish(self) -> None:
        pass  # nothing buffered to flush; the connection is the Loop's again, or closed, after this

    def handle(self) -> None:
        """The one request, under the admission phase the Loop set (its head is in the buffer already)."""
        gen = self.server.runtime.generation  # one config snapshot for the whole request, taken as it starts
        self.close_connection = True
        try:
            self.connection.settimeout(gen.config.limits.header_timeout)  # a backstop: admission bounds the phase
            self.handle_one_request(gen)
        except OSError:
            self.close_connection = True  # the peer went, a backstop timeout fired, or admission shut it

    def handle_one_request(self, gen: Generation | None = None) -> None:
        gen = gen or self.server.runtime.generation
        self.close_connection = True
        try:
            head = wire.parse_head(self.reader.readline)
            if head is None:
                return
            self.requestline = head.line
            # Only a bulk POST carries a body: room for its item limit (an item is at most 64 bytes).
            limit = (64 * gen.config.limits.max_bulk_items + 1024 if head.method == "POST"
                     else wire.MAX_IGNORED_BODY)
            length = wire.body_length(head, limit)
        except wire.HeadError as exc:
            self._write(error(exc.code, exc.message), close=True)
            return
        self.close_connection = head.close
        admission = self.server.runtime.admission
        timeout = gen.config.limits.request_timeout
        streamed = None
        if head.method == "POST":
            # The route reads the body itself, in chunks, once it has checked the request: a request it refuses
            # is answered without its body being read, and a bulk load is applied as it arrives.
            streamed = StreamedBody(self, length, head.expect_continue, timeout)
        elif self._read_body(gen, length, head.expect_continue) is None:
            # No other route takes a body; it is read only to keep the connection in step.
            self.close_connection = True
            return
        # From here on the slot is not taken back while the request is worked on (a streamed body's reads
        # excepted), and it is answered or, if admission took the slot first, not acted on at all.
        if not admission.enter(self.slot, BUSY, None):
            self.close_connection = True
            return
        self.connection.settimeout(timeout)
        response = self.server.app.handle(head.method, head.target, wire.authorization(head), self.conn.peer,
                                          self.conn.cert_cn(gen), b"" if streamed is None else streamed,
                                          generation=gen, content_type=head.content_type, accept=head.accept)
        # A body the route did not read: a small one is read and dropped, as for any other request; a big one
        # is not, and the connection closes after the answer.
        unread = streamed is not None and not streamed.done and not streamed.skip_small()
        if streamed is not None:
            if not admission.enter(self.slot, BUSY, None):
                self.close_connection = True
                return
            self.connection.settimeout(timeout)  # for each write of the answer
        self._write(response, head_only=head.method == "HEAD", close=unread, http10=head.http10)
        if unread:
            self._linger()

    def _linger(self) -> None:
        """After an answer given without reading the body (a 401, say), close gently: stop sending, then read and
        drop what the client still sends, a little while, so that the close does not reset the connection (and
        the answer with it) under a client that is still sending."""
        conn = self.connection
        try:
            conn.shutdown(socket.SHUT_WR)
            until = time.monotonic() + LINGER_TIME
            dropped = 0
            while dropped < LINGER_BYTES:
                left = until - time.monotonic()
                if left <= 0:
                    break
                conn.settimeout(left)
                data = conn.recv(65536)
                if not data:
                    break
                dropped += len(data)
        except (OSError, ValueError):
            pass

    def _read_body(self, gen: Generation, length: int, expect_continue: bool) -> bytes | None:
        """The body, all `length` bytes of it within limits.request_timeout; None if it did not all come."""
        if expect_continue:
            # curl sends "Expect: 100-continue" for bodies over 1 KiB and waits for this before the body.
            self.wfile.write(wire.CONTINUE)
        if not length:
            return b""
        timeout = gen.config.limits.request_timeout
        if not self.server.runtime.admission.enter(self.slot, BODY, timeout):
            return None
        self.connection.settimeout(timeout)
        body = self.reader.read(length)
        return body if len(body) == length else None

    def _write(self, response: Response, head_only: bool = False, close: bool = False, http10: bool = False) -> None:
        if close or self.server.runtime.stopping:
            self.close_connection = True
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug('client=%s "%s" %s', self.client_address[0], self.requestline[:200], response.status)
        if response.stream is None:
            self.connection.sendall(wire.render(response, head_only=head_only, close=self.close_connection))
            return
        if http10:
            self.close_connection = True  # HTTP/1.0 has no chunks: the body ends where the connection does
        self.wfile.write(wire.render_stream_head(response, close=self.close_connection, chunked=not http10))
        if head_only:
            return
        pieces = response.stream()
        try:
            for piece in pieces:
                self.wfile.write(piece if http10 else wire.chunk(piece))
        except OSError:
            raise
        except Exception:
            # The status went out already: end the connection without the last chunk, so the client sees the
            # body cut off rather than a short listing that looks whole.
            logger.exception("streaming the answer to %s failed", self.requestline[:200])
            self.close_connection = True
            return
        finally:
            pieces.close()
        if not http10:
            self.wfile.write(wire.chunk(b""))

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("client=%s " + format, self.client_address[0], *args)


class _NeedMore(Exception):
    """The buffer ends within a line of the head: wait for more bytes."""


class _Lines:
    """wire.parse_head's `readline` over the bytes read so far: each line as a socket file's readline(limit)
    would give it, or _NeedMore where that would wait for the client."""

    def __init__(self, buffer: bytearray):
        self._buffer = buffer
        self.at = 0

    def readline(self, limit: int) -> bytes:
        buffer, at = self._buffer, self.at
        end = buffer.find(b"\n", at, at + limit)
        if end >= 0:
            end += 1
        elif len(buffer) - at >= limit:
            end = at + limit
        else:
            raise _NeedMore
        self.at = end
        return bytes(buffer[at:end])


class Loop:
    """One thread for every connection between requests, and for the requests App.begin serves without waiting.

    A connection is watched for reading while idle or reading a head; its phase moves to HEAD on the first byte.
    A complete head of a request without a body goes to App.begin: its answer is sent at once, or its command is
    in the worker and the connection waits, unwatched, until the worker answers (Pending.on_done: the worker puts
    the answer on `_done` and wakes the Loop once for a batch), or limits.worker_timeout passes, as App._wait. Any
    other request (SLOW, a body, a head that does not parse) is handed with what was read of it to a Handler on a
    thread of its own, which gives the connection back when it stays open. The Loop never blocks: sockets are
    non-blocking, and an answer the client does not take is sent as it makes room, within limits.request_timeout.
    """

    def __init__(self, runtime: Runtime, app: App):
        self.runtime = runtime
        self.app = app
        self._selector = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._signalled = False
        self._incoming: collections.deque[Connection] = collections.deque()  # handed over by other threads
        self._done: collections.deque[tuple[Connection, Pending[Any]]] = collections.deque()  # worker's answers
        self._ready: collections.deque[Connection] = collections.deque()  # a request left in the buffer
        self._deadlines: dict[Connection, float] = {}  # waiting on the worker, or sending an answer
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="http-loop")
        self._thread.start()

    def add(self, conn: Connection) -> None:
        """Take `conn` over (from any thread): its first request, or the next one."""
        self._incoming.append(conn)
        self._signal()

    def _signal(self) -> None:
        if not self._signalled:
            self._signalled = True
            os.eventfd_write(self._wake, 1)

    def _answered(self, conn: Connection, pending: Pending[Any]) -> None:
        """The worker's thread: a command the Loop submitted is answered."""
        self._done.append((conn, pending))
        self._signal()

    def _run(self) -> None:
        while True:
            timeout = 0 if self._ready else EXPIRE_EVERY if self._deadlines else None
            try:
                for key, _ in self._selector.select(timeout):
                    conn = key.data
                    if conn is None:
                        self._woken()
                    elif conn.out:
                        self._send(conn)
                    else:
                        self._read(conn)
                for _ in range(len(self._ready)):
                    self._serve(self._ready.popleft())
                if self._deadlines:
                    self._check_deadlines()
            except Exception:
                logger.exception("the connection loop failed; going on")

    def _woken(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        self._signalled = False  # before the queues are read: an answer after this wakes the Loop again
        while self._incoming:
            self._adopt(self._incoming.popleft())
        while self._done:
            conn, pending = self._done.popleft()
            started = conn.started
            if started is not None and started.pending is pending:
                self._finish(conn, started)

    def _watch(self, conn: Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: Connection) -> None:
        self._watch(conn, 0)
        self._deadlines.pop(conn, None)
        conn.started = None
        try:
            conn.close(self.runtime.admission)
        except OSError:
            pass

    def _adopt(self, conn: Connection) -> None:
        limits = self.runtime.generation.config.limits
        if conn.first:
            ok = self.runtime.admission.enter(conn.slot, HEAD, limits.header_timeout)
        else:
            ok = self.runtime.admission.enter(conn.slot, IDLE, limits.idle_timeout)
        if not ok or self.runtime.stopping:
            self._close(conn)
            return
        try:
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        self._serve(conn)

    def _read(self, conn: Connection) -> None:
        if conn.started is not None:
            # Ready while its request is in the worker: a pipelined next one, or the stream's end. Read after the
            # answer (TLS: a read that meets the end of the stream fails every write after it); until then the
            # socket is not watched, so that it does not keep the Loop awake. (It stays watched while the worker
            # works, in the usual case that nothing comes: two epoll_ctl(2) a request less.)
            self._watch(conn, 0)
            return
        sock = conn.sock
        buffer = conn.buffer
        was_empty = not buffer
        try:
            while True:
                data = sock.recv(READ_SIZE)
                if not data:
                    conn.eof = True
                    break
                buffer += data
                if len(buffer) >= HEAD_MAX or not conn.tls or not sock.pending():
                    break
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except OSError as exc:  # ssl.SSLError included; SSLWantWriteError too: nothing here asks a client for that
            logger.debug("connection from %s ended: %s", conn.addr[0], exc)
            self._close(conn)
            return
        if was_empty and buffer and not conn.first:
            conn.idle = True  # the next request has begun: its head is due within header_timeout (_serve)
        self._serve(conn)

    def _serve(self, conn: Connection) -> None:
        """The request at the start of the buffer, if its head is there; otherwise wait for more."""
        buffer = conn.buffer
        if not buffer:
            if conn.eof:
                self._close(conn)
            else:
                self._watch(conn, selectors.EVENT_READ)
            return
        lines = _Lines(buffer)
        try:
            head = wire.parse_head(lines.readline)
            if (head is None or head.method not in LOOP_METHODS or head.expect_continue
                    or wire.body_length(head, wire.MAX_IGNORED_BODY)):
                self._hand_over(conn)
                return
        except _NeedMore:
            if conn.eof:
                self._hand_over(conn)  # a Handler closes quietly on a head cut off, as before
                return
            if conn.idle:
                # Part of a head: the rest is due within header_timeout, as it was in a Handler. (A head that came
                # whole goes from IDLE to BUSY at once.)
                conn.idle = False
                if not self.runtime.admission.enter(conn.slot, HEAD,
                                                    self.runtime.generation.config.limits.header_timeout):
                    self._close(conn)
                    return
            self._watch(conn, selectors.EVENT_READ)
            return
        except wire.HeadError:
            self._hand_over(conn)  # a Handler answers the same bytes with the same error
            return
        runtime = self.runtime
        conn.idle = False
        if not runtime.admission.enter(conn.slot, BUSY, None):
            self._close(conn)
            return
        gen = runtime.generation
        route = ["none"]
        started = time.perf_counter()
        answer = self.app.begin(head.method, head.target, wire.authorization(head), conn.peer, conn.cert_cn(gen),
                                gen, route)
        if answer is SLOW:
            self._hand_over(conn)
            return
        del buffer[:lines.at]
        conn.head = head
        conn.route = (route, started)
        conn.first = False
        if isinstance(answer, Response):
            self._respond(conn, answer)
            return
        assert isinstance(answer, Started)
        conn.started = answer
        conn.given_up = False
        self._deadlines[conn] = time.monotonic() + gen.config.limits.worker_timeout
        answer.pending.on_done(lambda pending: self._answered(conn, pending))

    def _finish(self, conn: Connection, started: Started) -> None:
        conn.started = None
        self._deadlines.pop(conn, None)
        head = conn.head
        assert head is not None
        self._respond(conn, self.app.finish(started, head.method, head.target))

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        late = [conn for conn, deadline in self._deadlines.items() if deadline <= now]
        for conn in late:
            started = conn.started
            if started is None:  # an answer the client did not take in time
                logger.debug("connection from %s ended: the answer was not read in time", conn.addr[0])
                self._close(conn)
            elif not conn.given_up and not started.pending.cancel():
                conn.given_up = True  # taken by the worker: one more worker_timeout, as App._wait
                self._deadlines[conn] = now + started.gen.config.limits.worker_timeout
            else:
                conn.started = None
                del self._deadlines[conn]
                self._respond(conn, NOT_ANSWERED if conn.given_up else NOT_TAKEN)

    def _respond(self, conn: Connection, response: Response) -> None:
        head = conn.head
        assert head is not None
        route, started = conn.route
        self.app.observe(route[0], head.method, response.status, time.perf_counter() - started)
        conn.close_after = head.close or self.runtime.stopping  # at the stream's end: once the buffer is served
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug('client=%s "%s" %s', conn.addr[0], head.line[:200], response.status)
        conn.out = wire.render(response, head_only=head.method == "HEAD", close=conn.close_after)
        self._send(conn)

    def _send(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            sent = 0  # TLS: the same bytes are offered again once the socket has room
        except OSError as exc:
            logger.debug("connection from %s ended: %s", conn.addr[0], exc)
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            if conn.events != selectors.EVENT_WRITE:
                self._watch(conn, selectors.EVENT_WRITE)
                self._deadlines[conn] = time.monotonic() + self.runtime.generation.config.limits.request_timeout
            return
        self._deadlines.pop(conn, None)
        if conn.close_after:
            self._close(conn)
            return
        limits = self.runtime.generation.config.limits
        if not self.runtime.admission.enter(conn.slot, IDLE, limits.idle_timeout):
            self._close(conn)
            return
        if conn.buffer or conn.eof:
            conn.idle = True
            self._watch(conn, 0)
            self._ready.append(conn)  # a pipelined request: served in the Loop's next round, not recursively
        else:
            self._watch(conn, selectors.EVENT_READ)

    def _hand_over(self, conn: Connection) -> None:
        """The request at the start of the buffer to a Handler on a thread of its own."""
        self._watch(conn, 0)
        self._deadlines.pop(conn, None)
        if conn.idle:  # a head that came whole but is not the Loop's: the Handler reads it under header_timeout
            conn.idle = False
            if not self.runtime.admission.enter(conn.slot, HEAD, self.runtime.generation.config.limits.header_timeout):
                self._close(conn)
                return
        try:
            threading.Thread(target=conn.server.serve_one, args=(conn,), daemon=True,
                             name=f"conn-{conn.addr[0]}").start()
        except RuntimeError:  # no more threads: the system's limit, not ours
            self._close(conn)
            self.runtime.admission.events.event(NO_THREAD, conn.slot.source)


class Server(socketserver.TCPServer):
    """Serves one listening socket. Admission decides on each connection before any thread or TLS is spent
    on it; an admitted one gets a thread for its TLS handshake, then goes to the Loop."""

    def __init__(self, sock: socket.socket, runtime: Runtime, app: App, loop: Loop):
        # process_request() makes each Handler itself, with its slot: the class given here is never used.
        super().__init__(sock.getsockname()[:2], socketserver.BaseRequestHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.runtime = runtime
        self.app = app
        self.loop = loop
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
            self.loop.add(Connection(conn, request, addr, peer, peer_cert, slot, self))
            return
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            logger.debug("connection from %s ended: %s", addr[0], exc)
        except Exception:
            logger.exception("connection from %s failed", addr[0])
        self.runtime.admission.release(slot)  # before close: the descriptor cannot be reused under it
        try:
            conn.close()
        finally:
            request.close()

    def serve_one(self, conn: Connection) -> None:
        """A Handler's thread: one request, then the connection back to the Loop, or closed."""
        keep = False
        try:
            handler = Handler(conn)
            keep = not handler.close_connection and not self.runtime.stopping
        except OSError as exc:
            logger.debug("connection from %s ended: %s", conn.addr[0], exc)
        except Exception:
            logger.exception("connection from %s failed", conn.addr[0])
        if keep:
            conn.first = False
            self.loop.add(conn)
        else:
            conn.close(self.runtime.admission)
