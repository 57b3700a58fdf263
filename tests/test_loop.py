"""The connection loop (http/server.py's Loop): one thread serves every connection between requests and the common
requests, and hands any other request to a thread of its own. What it must keep: answers in order whoever serves
them, no thread held by an idle connection, and no client able to stall the others by not reading its answers.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.test_api import shared  # noqa: F401  (a fixture)
from tests.test_http_wire import AUTH, Wire, request

ROOT = pytest.mark.root


def threads(d: Daemon) -> int:
    return len(os.listdir(Path(f"/proc/{d.pid}/task")))


@ROOT
def test_requests_served_by_the_loop_and_by_threads_are_answered_in_order(shared: Daemon) -> None:  # noqa: F811
    path = "/chain/f2b-web/ipv4/203.0.113.151"
    body = json.dumps(["203.0.113.152", "203.0.113.153"]).encode()
    w = Wire(shared)
    try:
        # /health, the PUT and the lookups the loop serves; the bulk POST (a body), /version (not one of the loop's
        # routes) and the PUT with a wrong password (a verify) go to a thread each; one write for all of them.
        w.send(request("GET", "/health") + request("PUT", path, AUTH)
               + request("POST", "/chain/f2b-web", AUTH, b"Content-Type: application/json\r\n",
                         f"Content-Length: {len(body)}\r\n".encode(), body=body)
               + request("GET", "/version", AUTH) + request("GET", "/chain/f2b-web/ipv4/203.0.113.153", AUTH)
               + request("PUT", "/chain/f2b-web/ipv4/203.0.113.154", b"Authorization: Basic YWRtaW46bm8=\r\n")
               + request("DELETE", path, AUTH) + request("GET", path, AUTH))
        answers = [w.response() for _ in range(8)]
    finally:
        w.close()
    assert [a[0] for a in answers] == [200, 201, 200, 200, 200, 401, 200, 404], answers
    assert json.loads(answers[2][2])["created"] == 2
    assert "version" in json.loads(answers[3][2])
    assert json.loads(answers[4][2])["network"] == "203.0.113.153/32"
    for address in ("203.0.113.152", "203.0.113.153"):
        assert shared.request("DELETE", f"/chain/f2b-web/ipv4/{address}").status == 200


@ROOT
def test_idle_keep_alive_connections_hold_no_thread(shared: Daemon) -> None:  # noqa: F811
    """Before the loop, each open connection had a thread of its own for as long as it stayed open."""
    before = threads(shared)
    wires = []
    try:
        for _ in range(24):  # within limits.trusted_connections (32): no slot is taken back
            w = Wire(shared)
            wires.append(w)
            w.send(request("GET", "/chain/f2b-web/ipv4/203.0.113.155", AUTH))
            assert w.response()[0] == 404
        deadline = time.monotonic() + 5
        while threads(shared) > before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # a handshake's thread ends right after handing its connection over
        assert threads(shared) <= before + 3, (before, threads(shared))
        for w in wires:  # and every one of them is still served
            w.send(request("GET", "/health"))
            assert w.response()[0] == 200
    finally:
        for w in wires:
            w.close()


@ROOT
def test_a_client_that_does_not_read_its_answers_stalls_nobody(shared: Daemon) -> None:  # noqa: F811
    """Its answers wait in its own socket's buffers; the loop serves the others meanwhile, and closes it once an
    answer has waited limits.request_timeout (3 s in the tests) for room."""
    # Small TCP buffers in the daemon's namespace (its own; put back after), so that a few hundred answers fill them.
    keys = ("net.ipv4.tcp_wmem", "net.ipv4.tcp_rmem")
    saved = {k: shared.ns.run(["sysctl", "-n", k]).stdout.strip() for k in keys}
    for k in keys:
        shared.ns.run(["sysctl", "-q", "-w", f"{k}=4096 4096 4096"])
    stuck = None
    try:
        stuck = Wire(shared)
        stuck.tls.settimeout(0.5)
        sent = 0
        ended = ""
        started = time.monotonic()
        try:
            while sent < 20_000:
                stuck.send(request("GET", "/health") * 50)
                sent += 50
        except TimeoutError:
            ended = "timeout"  # the daemon stopped reading: its answers to us have nowhere to go
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            # On a slow machine the daemon may take longer to read the requests its buffer for answers holds than
            # request_timeout: it closes the connection then, while we still write. Never before that time.
            ended = "closed"
            assert time.monotonic() - started >= 3.0, "closed before an answer waited limits.request_timeout"
        stalled = time.monotonic()
        assert ended in ("timeout", "closed") and sent < 20_000, (ended, sent)
        other = Wire(shared)
        try:
            t0 = time.monotonic()
            other.send(request("GET", "/chain/f2b-web/ipv4/203.0.113.156", AUTH))
            assert other.response()[0] == 404
            assert time.monotonic() - t0 < 1.0
        finally:
            other.close()
        if ended == "closed":
            return
        time.sleep(stalled + 4 - time.monotonic())  # not reading, past request_timeout
        stuck.tls.settimeout(10)
        answered = 0
        try:
            while data := stuck.tls.recv(65536):
                answered += data.count(b"HTTP/1.1 200 OK")
        except TimeoutError:
            pytest.fail("the connection stayed open")
        except (ConnectionResetError, ssl.SSLError):
            pass
        # Closed after request_timeout, with answers to fewer requests than it sent.
        assert 0 < answered < sent
    finally:
        if stuck is not None:
            stuck.close()
        for k, v in saved.items():
            shared.ns.run(["sysctl", "-q", "-w", f"{k}={v}"])


@ROOT
def test_requests_sent_before_the_client_stops_sending_are_all_answered(shared: Daemon) -> None:  # noqa: F811
    """A client that writes its requests and shuts its side (TCP half-close, as `nc -N` does) gets every answer,
    then the end of the stream."""
    path = "/chain/f2b-web/ipv4/203.0.113.157"
    w = Wire(shared)
    try:
        w.send(request("PUT", path, AUTH) + request("GET", "/version", AUTH) + request("GET", path, AUTH)
               + request("DELETE", path, AUTH))
        socket.socket.shutdown(w.tls, socket.SHUT_WR)  # TCP's, under TLS: the daemon reads the end of the stream
        assert [w.response()[0] for _ in range(4)] == [201, 200, 200, 200]
        # Then the daemon closes (a timeout fails here). Its TLS met the end of the stream without a close_notify,
        # which OpenSSL 3 may answer with an alert before the close.
        w.tls.settimeout(5)
        try:
            assert w.rfile.read(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
    finally:
        w.close()
