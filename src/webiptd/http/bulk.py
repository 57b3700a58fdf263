"""A bulk POST's body, parsed as it arrives: text/plain (one network a line, the format of ipset and FireHOL lists)
or a JSON list of strings, each in bounded memory whatever the body's size."""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import re
from typing import Iterable, Iterator, NamedTuple, Protocol

CHUNK = 65536  # bytes of the body read at a time
MAX_LINE = 4096  # bytes of a text line before its comment; a longer one is a bad item
MAX_TOKEN = 4096  # characters of a JSON value in the list; a longer one is a bad body
JSON_WS = " \t\r\n"
# A JSON string (RFC 8259 section 7), whole: the usual item.
STRING_RE = re.compile(r'"((?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*)"')
# The start of one that may still be whole once more of the body comes.
OPEN_STRING_RE = re.compile(r'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{0,4})?)*\Z')
SCOPE_FIELD_RE = re.compile(r"(proto|port)=(\S+)\Z")


class BadBody(ValueError):
    """The body is not a JSON list (or not UTF-8): what came after the last good item is not taken."""


class BodyIncomplete(Exception):
    """The body stopped coming, or came too slowly, before its Content-Length was read."""


class Body(Protocol):
    """A request's body as the route reads it: in chunks, each read under the connection's deadlines."""

    def read(self, size: int = CHUNK) -> bytes:
        """Up to `size` bytes; b"" at its end. Raises BodyIncomplete."""
        ...

    def busy(self) -> contextlib.AbstractContextManager[object]:
        """A context in which the request is doing work (the worker applies a batch): no body deadline runs."""
        ...


class BytesBody:
    """A body that is all there already (a pure test's, or one read off the wire whole)."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._at = 0

    def read(self, size: int = CHUNK) -> bytes:
        piece = bytes(self._data[self._at:self._at + size])
        self._at += len(piece)
        return piece

    def busy(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    @property
    def done(self) -> bool:
        return self._at >= len(self._data)


class Item(NamedTuple):
    """One item of a bulk body: where it is (a text line, from 1, or a JSON index, from 0), its text (None when it
    is not a string or too long to show) and, for a bad item, why (the item is then not applied); `scope`: the
    `proto=` and `port=` fields of a text line, None when it has none."""

    at: int
    text: str | None
    problem: str | None = None
    scope: tuple[str | None, str | None] | None = None


def chunks(body: Body) -> Iterator[bytes]:
    while True:
        data = body.read(CHUNK)
        if not data:
            return
        yield data


def text_items(pieces: Iterable[bytes]) -> Iterator[Item]:
    """The items of a text/plain body: one address or network a line; `#` starts a comment, blank lines and the
    whitespace around an item are ignored, CRLF is a line end too. After the item, `proto=P` and `port=P` (as in
    the query) may say the entry's scope, as the text listing writes it."""
    line = 0
    tail = b""  # the start of a line whose end has not come yet
    skipping = False  # inside a line already too long, or a long comment: its rest is dropped
    overlong = False
    for piece in pieces:
        parts = piece.split(b"\n")
        rest = parts.pop()  # no line end yet: kept for the next piece, bounded
        if parts:
            if skipping:  # the long line ends: what was kept of it is the line
                skipping = False
                data = tail
            else:
                data = tail + parts[0] if tail else parts[0]
            tail = b""
            line += 1
            item = _line_item(line, data, overlong)
            overlong = False
            if item is not None:
                yield item
            for data in itertools.islice(parts, 1, None):  # whole lines: most of a body
                line += 1
                item = _line_item(line, data, False)
                if item is not None:
                    yield item
        if skipping:
            continue
        data = tail + rest if tail else rest
        if len(data) > MAX_LINE:
            hash_at = data.find(b"#")
            if 0 <= hash_at <= MAX_LINE:
                data = data[:hash_at]  # a long comment: only what is before it counts
            else:
                data, overlong = b"", True
            skipping = True
        tail = data
    if tail or overlong:
        item = _line_item(line + 1, tail, overlong)
        if item is not None:
            yield item


_new_item = tuple.__new__  # an Item made without NamedTuple's __new__ (its defaults cost a call): a load's millions


def _line_item(line: int, data: bytes, overlong: bool) -> Item | None:
    if overlong:
        return Item(line, None, f"the line is longer than {MAX_LINE} bytes")
    if b"#" in data:
        data = data.split(b"#", 1)[0]
    data = data.strip()
    if not data:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return Item(line, None, "an item is an address or ADDRESS/PREFIX, in ASCII")
    fields = text.split()
    if len(fields) == 1:
        return _new_item(Item, (line, fields[0], None, None))
    proto = port = None
    for extra in fields[1:]:
        match = SCOPE_FIELD_RE.match(extra)
        if match is None or (proto if match.group(1) == "proto" else port) is not None:
            return Item(line, fields[0] if len(fields[0]) <= 64 else None,
                        "after the item, a line may only have proto=P and port=P, once each")
        if match.group(1) == "proto":
            proto = match.group(2)
        else:
            port = match.group(2)
    scope = None if proto is None and port is None else (proto, port)
    return Item(line, fields[0], None, scope)


def json_items(pieces: Iterable[bytes]) -> Iterator[Item]:
    """The items of a JSON list, tokenized as the body arrives. A string is an item; any other value in the list
    (a number, null, an object) a bad item; anything that is not a non-empty list of values raises BadBody."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    raw_decode = json.JSONDecoder().raw_decode
    buf = ""
    at = 0
    state = "start"  # start, first (after '['), value, after (a value), end (after ']')
    index = 0
    ended = False
    source = iter(pieces)
    while True:
        if not ended:
            # More of the body when what is left is not enough to go on (the loop below says so by breaking).
            try:
                piece = next(source)
            except StopIteration:
                piece = b""
                ended = True
            try:
                text = decoder.decode(piece, final=ended)
            except UnicodeDecodeError:
                raise BadBody("the body is not UTF-8") from None
            buf = buf[at:] + text if at else buf + text
            at = 0
        n = len(buf)
        while True:
            while at < n and buf[at] in JSON_WS:
                at += 1
            if at == n:
                break
            c = buf[at]
            if state == "start":
                if c != "[":
                    raise BadBody("the body must be a JSON list of addresses or networks")
                at += 1
                state = "first"
            elif state in ("first", "value"):
                if c == "]" and state == "first":
                    raise BadBody("the body must be a non-empty JSON list of addresses or networks")
                if c == '"':
                    match = STRING_RE.match(buf, at)
                    if match is None:
                        if (n - at <= MAX_TOKEN and OPEN_STRING_RE.match(buf, at)) and not ended:
                            break  # the rest of the string is still to come
                        raise BadBody(f"item {index} is not a well-formed JSON string of at most {MAX_TOKEN} "
                                      "characters")
                    value = match.group(1)
                    if "\\" in value:
                        value = json.loads(match.group(0))
                    at = match.end()
                    yield Item(index, value)
                else:
                    if n - at < MAX_TOKEN and not ended:
                        break  # a value other than a string: wait until all of it is surely here
                    try:
                        _, end = raw_decode(buf[:at + MAX_TOKEN], at)
                    except (ValueError, RecursionError):  # RecursionError: nested some 1,000 deep
                        raise BadBody(f"item {index} is not a JSON value of at most {MAX_TOKEN} characters") \
                            from None
                    at = end
                    yield Item(index, None, "an item is a string: an address or ADDRESS/PREFIX")
                index += 1
                state = "after"
            elif state == "after":
                if c == ",":
                    state = "value"
                elif c == "]":
                    state = "end"
                else:
                    raise BadBody(f"expected ',' or ']' after item {index - 1}")
                at += 1
            else:
                raise BadBody("nothing may follow the list")
        if ended:
            if state != "end":
                raise BadBody("the body ended before its JSON list did")
            return
