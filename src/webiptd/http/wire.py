"""The HTTP/1.1 wire, as pure functions: a request head from its lines (RFC 9112 sections 3 and 5), the
request target, the body's length, and a response as the bytes to send."""

from __future__ import annotations

import email.utils
import http
import json
import re
import time
from typing import Callable, NamedTuple

from webiptd.http.responses import Response

MAX_REQUEST_LINE = 8192
MAX_HEADER_BYTES = 16384
MAX_HEADER_LINES = 100  # the blank line included, as http.client counts
MAX_IGNORED_BODY = 65536  # what a request other than a bulk POST may send along
PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.:-]+\Z")
PLAIN_PATH_RE = re.compile(r"(?:/[A-Za-z0-9_.:-]+)+\Z")  # nothing to decode: the usual target
PRINTABLE_RE = re.compile(r"[!-~]*\Z")
PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
QUERY_KEY_RE = re.compile(r"[a-z_]{1,32}\Z")
QUERY_VALUE_RE = re.compile(r"-?[0-9]{1,12}\Z")
# A claim's owner label, checked by the route (OWNER_LABEL_RE in http/app.py) so that its error can say what a label
# is. Visible ASCII, and short; a client may percent-encode any of it (URL libraries send owner=* as owner=%2A and a
# ':' as %3A), decoded once, to visible ASCII only.
OWNER_VALUE_RE = re.compile(r"(?:[!-$&-~]|%(?:2[1-9A-Fa-f]|[3-6][0-9A-Fa-f]|7[0-9A-Ea-e])){0,128}\Z")
# proto and port: words, numbers, ',' and ':' (fail2ban's port list), which a client may percent-encode (%2C, %3A,
# and %2B for a '+'); checked by the route (scope.parse_scope) so that its error can say what is wrong.
SCOPE_VALUE_RE = re.compile(r"(?:[A-Za-z0-9,:._+-]|%2[BbCc]|%3[Aa]){0,512}\Z")
# A listing's cursor (`after`): opaque base64url (RFC 4648 section 5) without padding, checked by the route.
CURSOR_VALUE_RE = re.compile(r"[A-Za-z0-9_-]{0,512}\Z")
TEXT_VALUES = {"owner": OWNER_VALUE_RE, "proto": SCOPE_VALUE_RE, "port": SCOPE_VALUE_RE, "after": CURSOR_VALUE_RE}
METHOD_RE = re.compile(r"^[A-Z]{1,16}\Z")
REQUEST_LINE_RE = re.compile(rb"[!-~]+ [!-~]+ HTTP/1\.[0-9]\r?\n\Z")  # RFC 9112 section 3
# RFC 9112 section 5: field-name is a token and ':' follows it at once; the value is visible ASCII, obs-text,
# space and tab.
HEADER_LINE_RE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)\r?\n\Z")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
SERVER = "web-ipt-d"
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in http.HTTPStatus}
JSON = json.JSONEncoder(separators=(",", ":"))


class HeadError(Exception):
    """A request head to answer with this error code (responses.ERRORS), then close."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class RequestHead(NamedTuple):
    """What is kept of a request line and its header section."""

    line: str  # the request line, for the debug log
    method: str
    target: str
    content_lengths: list[str]
    authorizations: list[str]
    transfer_encoding: bool
    close: bool  # the connection closes after the answer
    expect_continue: bool  # the client waits for "100 Continue" before its body
    content_type: str | None = None  # the one Content-Type header's value ("" when there are several)
    accept: str | None = None  # the Accept headers' values, joined with ","
    http10: bool = False  # an HTTP/1.0 request: no chunked answer (RFC 9112 section 7.1)


def parse_head(readline: Callable[[int], bytes]) -> RequestHead | None:
    """Read and parse one request head strictly, line by line, with `readline(limit)` (a socket file's, or
    io.BytesIO's in a test). None when there is nothing to answer: the stream ended, or held a blank line.

    A head the stream cuts off is never acted on, whatever it already said. Raises HeadError for the rest.
    Replaces BaseHTTPRequestHandler.parse_request(), whose email-package parser took a folded line or one
    without a colon as the end of the headers, and a bare CR as a line break. Its connection rules stay:
    HTTP/1.0 closes unless it asks for keep-alive, and "Connection: close" closes.
    """
    raw = readline(MAX_REQUEST_LINE + 1)
    if not raw:
        return None
    if len(raw) > MAX_REQUEST_LINE:
        raise HeadError("uri_too_long", "the request line is too long")
    if not REQUEST_LINE_RE.match(raw):
        if not raw.endswith(b"\n") or not raw.strip(b"\r\n"):
            return None  # cut off by the end of the stream, or a blank line: close quietly, as the stdlib did
        # Also refuses what parse_request() took: any whitespace as separator, raw non-ASCII, HTTP/0.9, 2.0.
        raise HeadError("bad_request", "malformed request line")
    line = raw.decode("ascii").rstrip("\r\n")
    method, target, version = line.split(" ")
    if not METHOD_RE.match(method):
        raise HeadError("bad_request", "malformed method")
    lengths: list[str] = []
    authorizations: list[str] = []
    transfer_encoding = False
    connection: str | None = None
    expect: str | None = None
    content_types: list[str] = []
    accepts: list[str] = []
    left = MAX_HEADER_BYTES
    for _ in range(MAX_HEADER_LINES):
        field = readline(left + 1)
        left -= len(field)
        if left < 0:
            break
        if not field.endswith(b"\n"):
            return None  # the stream ended within the head
        if field in (b"\r\n", b"\n"):
            close = version == "HTTP/1.0"
            if connection is not None and connection.lower() == "close":
                close = True
            elif connection is not None and connection.lower() == "keep-alive":
                close = False
            expect_continue = expect is not None and expect.lower() == "100-continue" and version >= "HTTP/1.1"
            content_type = content_types[0] if len(content_types) == 1 else "" if content_types else None
            return RequestHead(line, method, target, lengths, authorizations, transfer_encoding, close,
                               expect_continue, content_type, ",".join(accepts) if accepts else None,
                               version == "HTTP/1.0")
        match = HEADER_LINE_RE.match(field)
        if match is None:
            raise HeadError("bad_request", "a folded header line is not accepted (RFC 9112 section 5.2)"
                            if field[:1] in (b" ", b"\t") else "malformed header line")
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
        elif name == b"content-type":
            content_types.append(match.group(2).decode("latin-1").strip())
        elif name == b"accept" and len(accepts) < 8:
            accepts.append(match.group(2).decode("latin-1")[:1024])
    raise HeadError("headers_too_large", "Request Header Fields Too Large")


def body_length(head: RequestHead, limit: int) -> int:
    """The body's length from Content-Length, at most `limit`; HeadError otherwise."""
    if head.transfer_encoding:
        raise HeadError("bad_request", "Transfer-Encoding is not accepted; send a Content-Length")
    lengths = head.content_lengths
    if len(lengths) > 1 or (lengths and not (lengths[0].isascii() and lengths[0].isdigit())):
        raise HeadError("bad_request", "malformed Content-Length")
    # int() refuses strings over 4300 digits; anything over 18 is over any limit anyway.
    length = 0 if not lengths else int(lengths[0]) if len(lengths[0]) <= 18 else limit + 1
    if length > limit:
        raise HeadError("too_large", "the request body is too large")
    return length


def authorization(head: RequestHead) -> str | None:
    """The one Authorization header's value; "" (never valid) when there are several, None for none."""
    auths = head.authorizations
    return auths[0] if len(auths) == 1 else ("" if auths else None)


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
            value_re = TEXT_VALUES.get(key, QUERY_VALUE_RE)
            if not sep or not QUERY_KEY_RE.match(key) or not value_re.match(value):
                raise ValueError(f"malformed query parameter {item[:40]!r}")
            if value_re is not QUERY_VALUE_RE and "%" in value:
                value = PERCENT_RE.sub(lambda m: chr(int(m.group(1), 16)), value)
            pairs.append((key, value))
    return segments, pairs


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value (RFC 9110 section 6.6.1), formatted once a second rather than once a response."""
    global _date
    now = time.time()
    cached = _date
    if cached[0] != int(now):
        cached = _date = (int(now), email.utils.formatdate(now, usegmt=True))
    return cached[1]


def media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type, lower-cased, and its parameters (RFC 9110 section 8.3.1); ("", {}) for none."""
    if not value:
        return "", {}
    kind, *params = value.split(";")
    found = {}
    for param in params:
        name, _, val = param.strip().partition("=")
        found[name.strip().lower()] = val.strip().strip('"').lower()
    return kind.strip().lower(), found


def wants_text(accept: str | None) -> bool:
    """Whether an Accept header asks for text/plain rather than JSON: it names text/plain and not
    application/json (weights are not weighed: a client asks for one of the two)."""
    if not accept:
        return False
    kinds = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "text/plain" in kinds and "application/json" not in kinds


def render_stream_head(response: Response, *, close: bool = False, chunked: bool = True) -> bytes:
    """The status line and headers of an answer whose body follows in chunks (RFC 9112 section 7.1), or, for
    HTTP/1.0 (`chunked` False), until the connection closes."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    if chunked:
        extra += "Transfer-Encoding: chunked\r\n"
    if close:
        extra += "Connection: close\r\n"
    status_line = STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} "
    return (f"{status_line}\r\nServer: {SERVER}\r\nDate: {http_date()}\r\n"
            f"Content-Type: {response.content_type}\r\nCache-Control: no-store\r\n{extra}\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; b"" gives the last chunk, which ends the body."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def render(response: Response, *, head_only: bool = False, close: bool = False) -> bytes:
    """A response as the bytes to send in one write: the status line, the headers in a fixed order, the JSON."""
    body = JSON.encode(response.body).encode() + b"\n" if response.raw is None else response.raw
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    if close:
        extra += "Connection: close\r\n"
    status_line = STATUS_LINES.get(response.status) or f"HTTP/1.1 {response.status} "
    data = (f"{status_line}\r\nServer: {SERVER}\r\nDate: {http_date()}\r\n"
            f"Content-Type: {response.content_type}\r\nContent-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            f"{extra}\r\n").encode("latin-1")
    return data if head_only else data + body
