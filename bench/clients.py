"""The bench's clients: processes that each hold one keep-alive HTTPS connection into a namespace and send their
share of a phase's requests from a common start.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from common import REQUEST_TIMEOUT
from tests.harness import client_context
from tests.netns import NetNS


class Endpoint(Protocol):
    """Where the clients connect: a server listening in a namespace, verified against a CA, with Basic auth."""

    ns: NetNS
    host: str
    port: int
    cafile: Path
    authorization: str


class LeanClient:
    """One keep-alive HTTPS connection that speaks just enough HTTP/1.1 for the bench.

    Prebuilt request bytes; it reads the status line, Content-Length and body. http.client cost so much CPU
    that the clients took a good part of the machine from the server they measure (bench/README.md, Clients).
    """

    def __init__(self, ns: NetNS, host: str, port: int, ctx: ssl.SSLContext, authorization: str, timeout: float):
        self._ns, self._host, self._port, self._ctx, self._timeout = ns, host, port, ctx, timeout
        self._auth = authorization.encode("ascii")
        self._hostport = f"{host}:{port}".encode("ascii")
        self.sock: ssl.SSLSocket | None = None
        self._buf = b""

    def connect(self) -> None:
        self.close()
        raw = self._ns.connect(self._host, self._port, timeout=self._timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self._host)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self._buf = b""

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """(status, body); reconnects once if the server closed the idle connection before this request."""
        if self.sock is None:
            self.connect()
        # Like http.client: Content-Length: 0 on a PUT or POST without a body, nothing on the others.
        data = b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n%s\r\n" % (
            method.encode("ascii"), path.encode("ascii"), self._hostport, self._auth,
            b"Content-Length: 0\r\n" if method in ("PUT", "POST") else b"")
        try:
            assert self.sock is not None
            self.sock.sendall(data)
            return self._response()
        except (ConnectionError, EOFError):
            if self._buf:  # the server closed in the middle of a response: a real failure
                raise
            self.connect()
            assert self.sock is not None
            self.sock.sendall(data)
            return self._response()

    def _response(self) -> tuple[int, bytes]:
        assert self.sock is not None
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body_end = end + 4 + length
        while len(buf) < body_end:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection in a response body")
            buf += chunk
        body, self._buf = buf[end + 4:body_end], buf[body_end:]
        if close:
            self.close()
        return status, body


def _client_main(pipe: multiprocessing.connection.Connection) -> None:
    """One client process: one persistent HTTPS connection opened inside the namespace.

    Runs under the spawn start method, so it holds no copy of the parent's NetNS objects;
    its own NetNS handle is never closed, so it can never delete the parent's namespace.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    conn: LeanClient | None = None
    while True:
        msg = pipe.recv()
        kind = msg["kind"]
        try:
            if kind == "connect":
                if conn is not None:
                    conn.close()
                ctx = client_context(msg["cafile"])
                conn = LeanClient(NetNS(msg["ns"], msg["inode"]), msg["host"], msg["port"], ctx,
                                  msg["authorization"], msg["timeout"])
                _warm(conn)
                assert conn.sock is not None
                cipher = conn.sock.cipher()
                pipe.send({"ok": True, "tls": conn.sock.version(), "cipher": cipher[0] if cipher else "?"})
            elif kind == "run":
                assert conn is not None
                _warm(conn)  # also re-opens a connection the server closed while idle
                pipe.send({"ok": True, "ready": True})
                pipe.send(_run_phase(conn, msg))
            elif kind == "close":
                if conn is not None:
                    conn.close()
                pipe.send({"ok": True})
            elif kind == "exit":
                if conn is not None:
                    conn.close()
                return
        except Exception as exc:  # reported to the parent, which aborts the run
            pipe.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _warm(conn: LeanClient) -> None:
    status, _ = conn.request("GET", "/version")
    if status != 200:
        raise RuntimeError(f"GET /version answered {status}")


def _run_phase(conn: LeanClient, msg: dict[str, Any]) -> dict[str, Any]:
    """Send this client's share in order until done or past the deadline; `done` is how many were sent."""
    method, todo, expect, must_contain = msg["method"], msg["paths"], msg["expect"], msg.get("must_contain")
    deadline = msg.get("deadline")
    needle = must_contain.encode() if must_contain else None
    latencies: list[float] = []
    errors: list[str] = []
    perf = time.perf_counter
    request = conn.request
    # perf_counter is CLOCK_MONOTONIC on Linux, shared by every process: all clients start together.
    while (left := msg["start_at"] - perf()) > 0:
        time.sleep(min(left, 0.01))
    cpu0 = time.process_time()
    t0 = perf()
    for path in todo:
        s = perf()
        if deadline is not None and s >= deadline:
            break
        status, body = request(method, path)
        latencies.append(perf() - s)
        if status != expect or (needle is not None and needle not in body):
            if len(errors) < 5:
                errors.append(f"{method} {path} -> {status} {body[:200]!r}")
            else:
                errors.append("")
    t1 = perf()
    return {"ok": True, "t0": t0, "t1": t1, "cpu": time.process_time() - cpu0, "done": len(latencies),
            "latencies": latencies, "errors": errors}


class ClientPool:
    """`size` client processes; each phase uses the first `clients` of them."""

    def __init__(self, size: int):
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._pipes: list[multiprocessing.connection.Connection] = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child,), name=f"bench-client-{i}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._pipes.append(parent)

    def __len__(self) -> int:
        return len(self._procs)

    def _ask(self, pipes: Sequence[multiprocessing.connection.Connection], msgs: Sequence[dict[str, Any]],
             timeout: float = 120.0) -> list[dict[str, Any]]:
        for pipe, msg in zip(pipes, msgs):
            pipe.send(msg)
        return [self._reply(pipe, timeout) for pipe in pipes]

    def _reply(self, pipe: multiprocessing.connection.Connection, timeout: float) -> dict[str, Any]:
        if not pipe.poll(timeout):
            raise RuntimeError(f"a client process did not answer within {timeout:.0f} s")
        reply = pipe.recv()
        if not reply.get("ok"):
            raise RuntimeError(f"a client process failed: {reply.get('error')}")
        return reply

    def connect(self, server: Endpoint) -> dict[str, Any]:
        msg = {"kind": "connect", "ns": server.ns.name, "inode": server.ns.inode, "cafile": str(server.cafile),
               "host": server.host, "port": server.port, "authorization": server.authorization,
               "timeout": REQUEST_TIMEOUT}
        return self._ask(self._pipes, [msg] * len(self._pipes))[0]

    def run(self, clients: int, method: str, todo: Sequence[str], expect: int, must_contain: str | None = None,
            budget: float | None = None, sample: Callable[[], Any] | None = None
            ) -> tuple[list[dict[str, Any]], list[str], Any, Any]:
        """Deal `todo` round-robin to `clients` processes, start them together, collect results.

        With `budget` (seconds), a client sends no request after start + budget. Returns the replies,
        the paths actually sent, and `sample()` as the clients start and once the last one is done.
        """
        pipes = self._pipes[:clients]
        start_at = time.perf_counter() + 0.2 + 0.05 * clients
        deadline = None if budget is None else start_at + budget
        shares = [list(todo[i::clients]) for i in range(clients)]
        for pipe, share in zip(pipes, shares):
            pipe.send({"kind": "run", "method": method, "paths": share, "expect": expect,
                       "must_contain": must_contain, "start_at": start_at, "deadline": deadline})
        for pipe in pipes:
            self._reply(pipe, 60.0)  # warmed up and waiting for start_at
        while (left := start_at - time.perf_counter()) > 0:
            time.sleep(left)
        before = sample() if sample else None
        # A request in flight at the deadline still completes; at the slowest (the baseline deleting at 100k
        # rules with 16 clients) they queue behind each other for a minute or two.
        timeout = (budget if budget is not None else 0.1 * len(todo)) + REQUEST_TIMEOUT
        replies = [self._reply(pipe, timeout) for pipe in pipes]
        sent = [p for share, r in zip(shares, replies) for p in share[:r["done"]]]
        return replies, sent, before, sample() if sample else None

    def disconnect(self) -> None:
        self._ask(self._pipes, [{"kind": "close"}] * len(self._pipes))

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                pipe.send({"kind": "exit"})
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()  # by PID: only processes this pool started
                proc.join(5)
        for pipe in self._pipes:
            pipe.close()
