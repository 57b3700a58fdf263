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
from typing import Any, Mapping, cast

from webiptd.admission import BODY, BUSY, HEAD, IDLE, Slot
from webiptd.http import wire
from webiptd.http.app import App, Generation, Runtime
from webiptd.http.responses import Response, error
from webiptd.log import Reason
from webiptd.net import Address, peer_address

logger = logging.getLogger(__name__)

EXPIRE_EVERY = 0.25  # seconds between looks for connections past their phase's deadline
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close(2) sends a reset
NO_THREAD = Reason("closed a connection from {source}: the system would not start another thread",
                   "closed {n} connections from {source}: the system would not start another thread")


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
        body = self._read_body(gen, length, head.expect_continue)
        if body is None:
            self.close_connection = True
            return
        # The request is whole: from here on its slot is not taken back, and it is answered or, if
        # admission took the slot first, not acted on at all.
        if not self.server.runtime.admission.enter(self.slot, BUSY, None):
            self.close_connection = True
            return
        self.connection.settimeout(gen.config.limits.request_timeout)  # for each write of the answer
        if head.method != "POST":
            body = b""  # no other route takes a body; it was read only to keep the connection in step
        response = self.server.app.handle(head.method, head.target, wire.authorization(head), self._peer,
                                          self._client_cert_cn(gen), body, generation=gen)
        self._write(response, head_only=head.method == "HEAD")

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

    def _write(self, response: Response, head_only: bool = False, close: bool = False) -> None:
        if close or self.server.runtime.stopping:
            self.close_connection = True
        logger.debug('client=%s "%s" %s', self.client_address[0], self.requestline[:200], response.status)
        self.wfile.write(wire.render(response, head_only=head_only, close=self.close_connection))

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
