"""The request-head parser and the response writer as pure functions on bytes, without root or sockets
(RFC 9112 sections 3 and 5; tests/test_http_wire.py runs the same wire against the real daemon)."""

from __future__ import annotations

import io
import json

import pytest

from webiptd.http.responses import ERRORS, Response, error
from webiptd.http.wire import (
    MAX_HEADER_BYTES, MAX_HEADER_LINES, MAX_REQUEST_LINE, HeadError, RequestHead, authorization, body_length,
    parse_head, render,
)


def head(data: bytes) -> RequestHead | None:
    return parse_head(io.BytesIO(data).readline)


def refused(data: bytes) -> str:
    with pytest.raises(HeadError) as caught:
        head(data)
    assert caught.value.code in ERRORS
    return caught.value.code


def test_a_plain_request() -> None:
    h = head(b"PUT /chain/f2b-web/ipv4/203.0.113.7?timeout=60 HTTP/1.1\r\nHost: x\r\n"
             b"Authorization: Basic YTpi\r\nContent-Length: 0\r\n\r\nleft for the body")
    assert h == RequestHead("PUT /chain/f2b-web/ipv4/203.0.113.7?timeout=60 HTTP/1.1", "PUT",
                            "/chain/f2b-web/ipv4/203.0.113.7?timeout=60", ["0"], ["Basic YTpi"], False, False, False)
    assert authorization(h) == "Basic YTpi"


def test_the_parser_reads_no_further_than_the_blank_line() -> None:
    stream = io.BytesIO(b"GET /health HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n\r\n")
    assert parse_head(stream.readline) is not None
    assert stream.read() == b"GET /version HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("data, close", [
    (b"GET / HTTP/1.1\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nConnection: CLOSE\r\n\r\n", True),
    (b"GET / HTTP/1.0\r\n\r\n", True),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", False),  # the first one counts
])
def test_when_the_connection_closes(data: bytes, close: bool) -> None:
    h = head(data)
    assert h is not None and h.close is close


@pytest.mark.parametrize("data, expect", [
    (b"POST /chain/x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n", True),
    (b"POST /chain/x HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n", True),
    (b"POST /chain/x HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", False),
    (b"POST /chain/x HTTP/1.1\r\n\r\n", False),
])
def test_expect_100_continue(data: bytes, expect: bool) -> None:
    h = head(data)
    assert h is not None and h.expect_continue is expect


def test_bare_lf_and_case_insensitive_names_with_no_space() -> None:
    h = head(b"GET / HTTP/1.1\ncontent-length:5\nAUTHORIZATION:\tBasic x\n\n")
    assert h is not None and h.content_lengths == ["5"] and h.authorizations == ["Basic x"]


@pytest.mark.parametrize("data", [
    b"",  # the stream ended
    b"\r\n",  # a blank line before a request
    b"\n",
    b"GET /health HTT",  # cut off within the request line
    b"PUT /chain/f2b-web/ipv4/203.0.113.7 HTTP/1.1\r\nAuthorization: Basic YTpi\r\n",  # before the blank line
    b"PUT /chain/f2b-web/ipv4/203.0.113.7 HTTP/1.1\r\nAuthorization: Basic YTpi\r\nX-Cut: 1",  # mid-line
])
def test_nothing_to_answer_when_the_stream_ends_within_a_head(data: bytes) -> None:
    assert head(data) is None


@pytest.mark.parametrize("data", [
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET /\tHTTP/1.1\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET /\r\n\r\n",  # HTTP/0.9
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
    b"get / HTTP/1.1\r\n\r\n",
    b"G-T / HTTP/1.1\r\n\r\n",
    b"\xa0\r\n",  # what str.split() calls space is not a blank line
    b"\x0b\r\n",
    b"GET / HTTP/1.1\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nName : value\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: a\rAuthorization: Basic YTpi\r\n\r\n",  # a bare CR is no line break
    b"GET / HTTP/1.1\r\nX-A: \x00\r\n\r\n",
])
def test_malformed_heads_are_a_400(data: bytes) -> None:
    assert refused(data) == "bad_request"


def test_limits_on_the_request_line_and_the_header_section() -> None:
    assert refused(b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n\r\n") == "uri_too_long"
    assert head(b"GET /" + b"a" * (MAX_REQUEST_LINE - 16) + b" HTTP/1.1\r\n\r\n") is not None
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADER_LINES - 1))
    assert head(b"GET / HTTP/1.1\r\n" + fields + b"\r\n") is not None
    assert refused(b"GET / HTTP/1.1\r\n" + fields + b"X-Last: 1\r\n\r\n") == "headers_too_large"
    assert refused(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n") == "headers_too_large"


@pytest.mark.parametrize("lengths, limit, expected", [
    ([], 10, 0),
    (["0"], 10, 0),
    (["10"], 10, 10),
    (["007"], 10, 7),
])
def test_body_length(lengths: list[str], limit: int, expected: int) -> None:
    h = RequestHead("", "POST", "/", lengths, [], False, False, False)
    assert body_length(h, limit) == expected


@pytest.mark.parametrize("lengths, transfer_encoding, code", [
    (["11"], False, "too_large"),
    (["1" * 19], False, "too_large"),  # past what int() is asked to read, and past any limit
    (["1" * 5000], False, "too_large"),
    (["5", "5"], False, "bad_request"),
    (["-1"], False, "bad_request"),
    (["0x10"], False, "bad_request"),
    (["5 "], False, "bad_request"),
    (["\u0665"], False, "bad_request"),  # a digit to str.isdigit(), not to HTTP
    ([], True, "bad_request"),
])
def test_body_length_refusals(lengths: list[str], transfer_encoding: bool, code: str) -> None:
    h = RequestHead("", "POST", "/", lengths, [], transfer_encoding, False, False)
    with pytest.raises(HeadError) as caught:
        body_length(h, 10)
    assert caught.value.code == code


def test_several_authorization_headers_are_never_valid() -> None:
    h = RequestHead("", "GET", "/", [], ["Basic YTpi", "Basic YTpi"], False, False, False)
    assert authorization(h) == ""
    assert authorization(h._replace(authorizations=[])) is None


def test_render_writes_one_response_with_its_headers_in_order() -> None:
    out = render(Response(201, {"a": 1}, (("Retry-After", "3"),)), close=True)
    head_part, _, body = out.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 201 Created"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "Server", "Date", "Content-Type", "Content-Length", "Cache-Control", "Retry-After", "Connection"]
    assert "Connection: close" in lines and f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"a": 1}
    assert render(Response(200, {"a": 1}), head_only=True).endswith(b"\r\n\r\n")


def test_every_error_code_has_one_status() -> None:
    assert error("too_large", "x").status == 413
    assert {ERRORS[code] for code in ("uri_too_long", "headers_too_large", "throttled")} == {414, 431, 429}
    with pytest.raises(KeyError):
        error("too_many_items", "x")  # one name for a 413
