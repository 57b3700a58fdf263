"""The client's end of the HTTPS API (docs/api.md): one kept-alive connection that verifies the server's certificate,
Basic credentials (RFC 7617), and each answer as JSON or as the server's refusal."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from webiptd.client.settings import Settings, SettingsError

# A reused keep-alive connection the server has closed in the meantime fails like this on the next request;
# the request never reached the server, so it is sent once more on a new connection.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass
class Refused(Exception):
    """The server answered with an error: `web-ipt` exits 1 with its message."""
    status: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class Unreachable(Exception):
    """No answer: the connection, the TLS handshake (the server's certificate did not verify) or a time-out."""


class Api:
    def __init__(self, settings: Settings):
        self.settings = settings
        parts = urlsplit(settings.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 443
        self.base = parts.path.rstrip("/")
        try:
            self.context = ssl.create_default_context(cafile=settings.cacert)
            if settings.cert:
                self.context.load_cert_chain(settings.cert, settings.key)
        except FileNotFoundError as exc:
            raise SettingsError(f"{exc.filename or settings.cacert}: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(f"cannot load the CA or the client certificate: {exc}") from None
        self._auth: str | None = None
        if settings.user is not None:
            pair = f"{settings.user}:{settings.password or ''}".encode()
            self._auth = "Basic " + base64.b64encode(pair).decode("ascii")
        self._conn: http.client.HTTPSConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def target(self, segments: list[str], query: dict[str, str] | None = None) -> str:
        path = self.base + "/" + "/".join(quote(s, safe="") for s in segments)
        # `*` (owner=*) must reach the daemon as it is; `,` and `:` of a port list may (docs/api.md).
        return path + ("?" + urlencode(query, safe="*,:") if query else "")

    def call(self, method: str, segments: list[str], query: dict[str, str] | None = None,
             body: Any = None, auth: bool = True) -> tuple[int, Any]:
        """(status, JSON body) of a 2xx answer; Refused for any other, Unreachable when none came."""
        target = self.target(segments, query)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if auth and self._auth is not None:
            headers["Authorization"] = self._auth
        status, raw = self._exchange(method, target, data, headers)
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        if 200 <= status < 300:
            if doc is None:
                raise Unreachable(f"{method} {target}: the answer ({status}) is not JSON")
            return status, doc
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise Refused(status, doc["error"], str(doc.get("message", "")))
        raise Refused(status, "http_error", f"{status} {http.client.responses.get(status, '')}".strip())

    def _exchange(self, method: str, target: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                         timeout=self.settings.max_time)
            conn = self._conn
            try:
                conn.request(method, target, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except _STALE as exc:
                self.close()
                if fresh or attempt == 2:
                    raise Unreachable(f"{self.settings.url}: the connection closed ({exc.__class__.__name__})") \
                        from None
                continue
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise Unreachable(f"{self.settings.url}: the server's certificate did not verify "
                                  f"({exc.verify_message}); name its CA with --cacert or WEB_IPT_CACERT") from None
            except (TimeoutError, socket.timeout):
                self.close()
                raise Unreachable(f"{self.settings.url}: no answer within {self.settings.max_time:g} s "
                                  "(--max-time)") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or repr(exc)
                raise Unreachable(f"{self.settings.url}: {reason}") from None
            if resp.will_close:
                self.close()
            return resp.status, raw
        raise AssertionError("unreachable")  # the loop returns or raises
