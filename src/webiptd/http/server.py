"""The connections: a thread each for the TLS handshake and its requests, under the admission deadlines,
reading heads and bodies off the wire and writing each answer in one write."""

from __future__ import annotations

import http.server
import io
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, cast

from webiptd.admission import BODY, BUSY, HEAD, IDLE, Slot
from webiptd.http import wire
from webiptd.http.app import App, Generation, Runtime
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
            data = cast(io.BufferedReader, handler.rfile).read1(min(size, self._left))
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


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection's requests, in order. Built by Server._serve once the TLS handshake is done."""

    protocol_version = "HTTP/1.1"
    # Unbuffered: each answer, status line to body, goes to one sendall(), so it leaves in one TLS record and
    # one send(); a buffer would only copy it once more.
    wbufsize = 0
    server_version = wire.SERVER
    sys_version = ""
    server: "Server"

    def __init__(self, request: Any, client_address: Any, server: Server, slot: Slot, peer: Address,
                 peer_cert: Mapping[str, Any]):
        # Per connection, not per request: neither the peer nor its verified certificate changes.
        self.slot = slot
        self._peer = peer
        self._peer_cert = peer_cert  # as getpeercert() gave it right after the handshake: {} without one
        self._cert_cn: tuple[ssl.SSLContext | None, str | None] | None = None
        self.requestline = ""
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
                if not first:
                    idle = runtime.generation.config.limits.idle_timeout
                    if not admission.enter(self.slot, IDLE, idle):
                        return
                    self.connection.settimeout(idle)
                    # The next request's first byte, or the end of the stream (rfile is a BufferedReader).
                    if not cast(io.BufferedReader, self.rfile).peek(1):
                        return
                gen = runtime.generation  # one config snapshot for the whole request, taken as it starts
                limits = gen.config.limits
                if not admission.enter(self.slot, HEAD, limits.header_timeout):
                    return
                self.connection.settimeout(limits.header_timeout)
                self.handle_one_request(gen)
                if self.close_connection or runtime.stopping:
                    return
                first = False
        except OSError:
            pass  # the peer went, a backstop timeout fired, or admission shut the connection

    def handle_one_request(self, gen: Generation | None = None) -> None:
        gen = gen or self.server.runtime.generation
        self.close_connection = True
        try:
            head = wire.parse_head(self.rfile.readline)
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
        response = self.server.app.handle(head.method, head.target, wire.authorization(head), self._peer,
                                          self._client_cert_cn(gen), b"" if streamed is None else streamed,
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
        body = self.rfile.read(length)
        return body if len(body) == length else None

    def _client_cert_cn(self, gen: Generation) -> str | None:
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
        conn = self.connection
        if not isinstance(conn, ssl.SSLSocket) or current is None or not self._peer_cert:
            return None
        if conn.context is not current and (
                conn.context.get_ca_certs(binary_form=True) != current.get_ca_certs(binary_form=True)):
            return None
        names = [value for rdn in self._peer_cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        return names[0] if len(names) == 1 else None  # several CNs: ambiguous, so none

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
