"""Every answer the API gives: a status and a JSON body, with the one table of error codes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generator, Mapping

REALM = 'Basic realm="web-ipt-d", charset="UTF-8"'


@dataclass(frozen=True)
class Response:
    """A JSON answer; or, with `raw`, those bytes as `content_type` (the metrics' text format, the API's document);
    or, with `stream`, the pieces it makes, sent as they come in a chunked body (a whole chain's listing)."""

    status: int
    body: Mapping[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    raw: bytes | None = None
    content_type: str = "application/json"
    stream: Callable[[], Generator[bytes, None, None]] | None = None


# Each error code the API answers with, and its status: a client can rely on the code.
ERRORS: dict[str, int] = {
    "bad_request": 400,  # the request line, a header or the target is malformed
    "bad_chain": 400,
    "bad_address": 400,
    "bad_query": 400,
    "bad_body": 400,
    "incomplete_body": 400,  # a bulk body that stopped coming, or came too slowly, before its Content-Length
    "unauthorized": 401,
    "forbidden": 403,
    "read_only": 403,
    "not_found": 404,
    "unknown_chain": 404,
    "not_blocked": 404,
    "not_configured": 404,
    "method_not_allowed": 405,
    "never_block": 409,
    "never_allow": 409,
    "too_large": 413,  # a body, or a bulk list, over its limit
    "unsupported_media_type": 415,  # a bulk body neither JSON nor text/plain
    "uri_too_long": 414,
    "throttled": 429,
    "headers_too_large": 431,
    "internal_error": 500,
    "worker_timeout": 503,
    "firewall_unavailable": 503,
    "firewall_full": 507,
}


def error(code: str, message: str, *headers: tuple[str, str]) -> Response:
    return Response(ERRORS[code], {"error": code, "message": message}, tuple(headers))


UNAUTHORIZED = error("unauthorized", "valid credentials are required", ("WWW-Authenticate", REALM))
NOT_FOUND = error("not_found", "no such resource")
INTERNAL_ERROR = error("internal_error", "the server failed; this is a bug and it has been logged")
