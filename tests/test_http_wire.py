"""The HTTP/1.1 wire over real HTTPS, byte for byte: how the request head is parsed (RFC 9112 sections 3 and 5),
how a response head is written, and when a connection stays open (connection slots: tests/test_admission.py).
"""

from __future__ import annotations

import base64
import email.utils
import json
import socket
import ssl
import time
from typing import Iterator

import pytest

from tests.conftest import PASSWORDS, PORT, Daemon
from tests.test_api import shared  # noqa: F401  (a fixture)
from webiptd.http.wire import MAX_HEADER_BYTES

AUTH = b"Authorization: Basic " + base64.b64encode(b"admin:" + PASSWORDS["admin"].encode()) + b"\r\n"
BASE_HEADERS = ["Server", "Date", "Content-Type", "Content-Length", "Cache-Control"]


class Wire:
    """One TLS connection to the daemon: requests written as given, responses read one at a time."""

    def __init__(self, d: Daemon):
        self.tls = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=10), server_hostname="127.0.0.1")
        self.rfile = self.tls.makefile("rb")

    def send(self, data: bytes) -> None:
        self.tls.sendall(data)

    def response(self, head: bool = False) -> tuple[int, list[tuple[str, str]], bytes]:
        """(status, headers in the order sent, body); a 1xx has no body, nor has the answer to HEAD."""
        status_line = self.rfile.readline()
        assert status_line.startswith(b"HTTP/1.1 ") and status_line.endswith(b"\r\n"), status_line
        headers = []
        while (line := self.rfile.readline()) != b"\r\n":
            assert line.endswith(b"\r\n"), line
            name, sep, value = line[:-2].decode("latin-1").partition(": ")
            assert sep, line
            headers.append((name, value))
        status = int(status_line.split()[1])
        if status < 200 or head:
            return status, headers, b""
        return status, headers, self.rfile.read(int(dict(headers)["Content-Length"]))

    def closed_by_server(self) -> bool:
        self.tls.settimeout(5)
        try:
            return self.rfile.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.rfile.close()
        self.tls.close()


@pytest.fixture
def wire(shared: Daemon) -> Iterator[Wire]:  # noqa: F811
    w = Wire(shared)
    try:
        yield w
    finally:
        w.close()


def request(method: str, path: str, *headers: bytes, version: bytes = b"HTTP/1.1", body: bytes = b"") -> bytes:
    return method.encode() + b" " + path.encode() + b" " + version + b"\r\nHost: 127.0.0.1\r\n" + b"".join(headers) \
        + b"\r\n" + body


def blocked(d: Daemon, address: str) -> bool:
    return d.request("GET", f"/chain/f2b-web/ipv4/{address}").status == 200


# -- the response head ---------------------------------------------------------------------------------

@pytest.mark.root
def test_response_heads_carry_the_same_headers_in_the_same_order(wire: Wire) -> None:
    wire.send(request("GET", "/health"))
    status, headers, body = wire.response()
    assert status == 200 and [n for n, _ in headers] == BASE_HEADERS, headers
    values = dict(headers)
    assert values["Server"] == "web-ipt-d" and values["Content-Type"] == "application/json"
    assert values["Cache-Control"] == "no-store" and int(values["Content-Length"]) == len(body)
    assert abs(email.utils.parsedate_to_datetime(values["Date"]).timestamp() - time.time()) < 5
    assert values["Date"].endswith(" GMT")
    assert json.loads(body) == {"status": "ok"}
    # A ready error adds its own headers after the usual ones; the connection stays open.
    wire.send(request("GET", "/chains"))
    status, headers, _ = wire.response()
    assert status == 401 and [n for n, _ in headers] == BASE_HEADERS + ["WWW-Authenticate"], headers
    # Connection: close comes last, and then the server closes.
    wire.send(request("DELETE", "/chains", AUTH, b"Connection: close\r\n"))
    status, headers, body = wire.response()
    assert status == 405 and [n for n, _ in headers] == BASE_HEADERS + ["Allow", "Connection"], headers
    assert dict(headers)["Connection"] == "close" and json.loads(body)["error"] == "method_not_allowed"
    assert wire.closed_by_server()


@pytest.mark.root
def test_head_sends_the_length_of_the_body_it_leaves_out(wire: Wire) -> None:
    wire.send(request("GET", "/version", AUTH))
    _, _, body = wire.response()
    wire.send(request("HEAD", "/version", AUTH))
    status, headers, _ = wire.response(head=True)
    assert status == 200 and int(dict(headers)["Content-Length"]) == len(body)
    wire.send(request("GET", "/health"))  # nothing of a body was left on the wire
    assert wire.response()[0] == 200


# -- keep-alive ----------------------------------------------------------------------------------------

@pytest.mark.root
def test_http_1_0_closes_unless_it_asks_for_keep_alive(shared: Daemon) -> None:  # noqa: F811
    w = Wire(shared)
    try:
        w.send(request("GET", "/health", version=b"HTTP/1.0"))
        status, headers, _ = w.response()
        assert status == 200 and dict(headers).get("Connection") == "close", headers
        assert w.closed_by_server()
    finally:
        w.close()
    w = Wire(shared)
    try:
        for _ in range(3):
            w.send(request("GET", "/version", AUTH, b"Connection: Keep-Alive\r\n", version=b"HTTP/1.0"))
            status, headers, _ = w.response()
            assert status == 200 and "Connection" not in dict(headers), headers
    finally:
        w.close()


@pytest.mark.parametrize("value", [b"close", b"Close", b"CLOSE"])
@pytest.mark.root
def test_connection_close_in_any_case_closes(wire: Wire, value: bytes) -> None:
    wire.send(request("GET", "/health", b"Connection:" + value + b"\r\n"))
    status, headers, _ = wire.response()
    assert status == 200 and dict(headers)["Connection"] == "close"
    assert wire.closed_by_server()


@pytest.mark.root
def test_pipelined_requests_are_answered_in_order(shared: Daemon, wire: Wire) -> None:  # noqa: F811
    path = "/chain/f2b-web/ipv4/203.0.113.150"
    wire.send(request("PUT", path, AUTH) + request("GET", path, AUTH) + request("DELETE", path, AUTH)
              + request("GET", path, AUTH))
    answers = [wire.response() for _ in range(4)]
    assert [a[0] for a in answers] == [201, 200, 200, 404], answers
    assert json.loads(answers[1][2])["network"] == "203.0.113.150/32"
    assert not blocked(shared, "203.0.113.150")


@pytest.mark.root
def test_bare_lf_line_endings_are_accepted(wire: Wire) -> None:
    wire.send(b"GET /version HTTP/1.1\nHost: 127.0.0.1\n" + AUTH.replace(b"\r\n", b"\n") + b"\n")
    status, _, body = wire.response()
    assert status == 200 and "version" in json.loads(body)
    wire.send(request("GET", "/health"))
    assert wire.response()[0] == 200


@pytest.mark.root
def test_field_names_are_case_insensitive_and_values_need_no_space(wire: Wire) -> None:
    wire.send(request("GET", "/version", b"authorization: " + AUTH.split(b": ", 1)[1], b"CONTENT-LENGTH:3\r\n",
                      body=b"abc"))
    assert wire.response()[0] == 200
    wire.send(request("GET", "/version", b"AuThOrIzAtIoN:\t" + AUTH.split(b": ", 1)[1]))
    assert wire.response()[0] == 200


# -- Expect: 100-continue ----------------------------------------------------------------------------------

@pytest.mark.root
def test_expect_100_continue_from_a_client_that_does_not_wait(shared: Daemon, wire: Wire) -> None:  # noqa: F811
    body = json.dumps(["203.0.113.151", "203.0.113.152"]).encode()
    wire.send(request("POST", "/chain/f2b-web", AUTH, b"Expect: 100-Continue\r\n",
                      b"Content-Length: %d\r\n" % len(body), body=body))
    status, headers, _ = wire.response()
    assert status == 100 and headers == []
    status, _, reply = wire.response()
    assert status == 200 and json.loads(reply)["created"] == 2
    wire.send(request("GET", "/chain/f2b-web/ipv4/203.0.113.152", AUTH))  # still in step
    assert wire.response()[0] == 200


@pytest.mark.root
def test_http_1_0_gets_no_interim_100(shared: Daemon) -> None:  # noqa: F811
    assert shared.request("PUT", "/chain/f2b-web/ipv4/203.0.113.153").status == 201
    w = Wire(shared)
    try:
        w.send(request("DELETE", "/chain/f2b-web/ipv4/203.0.113.153", AUTH, b"Expect: 100-continue\r\n",
                       version=b"HTTP/1.0"))
        status, _, reply = w.response()
        assert status == 200 and json.loads(reply)["deleted"] is True
    finally:
        w.close()


# -- malformed header sections -----------------------------------------------------------------------------

@pytest.mark.parametrize("lines", [
    b"X-Note: a\r\n  folded\r\n",  # obs-fold (RFC 9112 section 5.2)
    b"X-Note: a\r\n\tfolded\r\n",
    AUTH[:-2] + b"\r\n " + b"x\r\n",  # a fold onto the credentials
    b"X-Note without a colon\r\n",
    b"Authorization : " + AUTH.split(b": ", 1)[1],  # whitespace before the colon (RFC 9112 section 5.1)
    b"Authorization\t: " + AUTH.split(b": ", 1)[1],
    b": no name\r\n",
    b"X Note: a\r\n",
    b"X(Note): a\r\n",  # not a token
    b"X-N\xc3\xb6te: a\r\n",
    b"X-Note: a\rAuthorization: Basic x\r\n",  # a bare CR must not split a line
    b"X-Note: a\x00b\r\n",
    b"X-Note: a\x7fb\r\n",
])
@pytest.mark.root
def test_malformed_header_lines_are_400_and_change_nothing(shared: Daemon, wire: Wire,  # noqa: F811
                                                           lines: bytes) -> None:
    wire.send(request("PUT", "/chain/f2b-web/ipv4/203.0.113.160", AUTH, lines))
    status, headers, body = wire.response()
    assert status == 400 and json.loads(body)["error"] == "bad_request", (status, body)
    assert dict(headers)["Connection"] == "close"
    assert wire.closed_by_server()
    assert not blocked(shared, "203.0.113.160")


@pytest.mark.root
def test_credentials_hidden_behind_a_bare_cr_never_log_in(wire: Wire) -> None:
    wire.send(request("GET", "/version", b"X-Note: a\r" + AUTH))
    assert wire.response()[0] == 400


@pytest.mark.root
def test_header_section_limit_is_exact(wire: Wire, shared: Daemon) -> None:  # noqa: F811
    def with_section_of(size: int) -> bytes:
        fixed = b"Host: 127.0.0.1\r\n" + AUTH + b"X-Fill: \r\n" + b"\r\n"
        section = b"Host: 127.0.0.1\r\n" + AUTH + b"X-Fill: " + b"f" * (size - len(fixed)) + b"\r\n\r\n"
        assert len(section) == size
        return b"GET /version HTTP/1.1\r\n" + section

    wire.send(with_section_of(MAX_HEADER_BYTES))
    assert wire.response()[0] == 200
    wire.send(with_section_of(MAX_HEADER_BYTES + 1))
    status, _, body = wire.response()
    assert status == 431 and json.loads(body)["error"] == "headers_too_large"
    assert wire.closed_by_server()


@pytest.mark.parametrize("fields, status", [(99, 200), (100, 431)])
@pytest.mark.root
def test_at_most_99_header_fields(shared: Daemon, fields: int, status: int) -> None:  # noqa: F811
    # http.client's limit, kept: 100 lines with the blank one that ends the section.
    w = Wire(shared)
    try:
        w.send(request("GET", "/version", AUTH, *(b"X-H%d: 1\r\n" % i for i in range(fields - 2))))
        assert w.response()[0] == status
    finally:
        w.close()


@pytest.mark.parametrize("cut", [
    b"PUT /chain/f2b-web/ipv4/203.0.113.160 HTTP/1.1\r\nHost: x\r\n" + AUTH,  # before the blank line
    b"PUT /chain/f2b-web/ipv4/203.0.113.160 HTTP/1.1\r\nHost: x\r\n" + AUTH + b"X-Last: 1",  # mid-line
    b"PUT /chain/f2b-web/ipv4/203.0.113.160 HTTP/1.1",  # within the request line
])
@pytest.mark.root
def test_a_request_head_cut_off_by_the_end_of_the_stream_is_not_acted_on(shared: Daemon, cut: bytes) -> None:  # noqa: F811
    w = Wire(shared)
    try:
        w.send(cut)
        socket.socket.shutdown(w.tls, socket.SHUT_WR)  # the TCP stream just ends, TLS state kept
        w.tls.settimeout(5)
        try:
            answer = w.rfile.read()
        except (ssl.SSLError, ConnectionError):
            answer = b""  # closed with an alert or a reset: no answer either
        assert answer == b"", answer
    finally:
        w.close()
    assert not blocked(shared, "203.0.113.160")


@pytest.mark.parametrize("line", [b"\xa0", b"\x0b", b"\x1c\x1f", b"\x85"])
@pytest.mark.root
def test_a_request_line_of_what_str_split_calls_space_is_a_400_not_a_blank_line(wire: Wire, line: bytes) -> None:
    wire.send(line + b"\r\n" + request("GET", "/health"))
    assert wire.response()[0] == 400
