"""A chain's listing: pages with an opaque cursor, the whole chain streamed page by page, and the text form (one
entry a line) that a bulk POST takes back."""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import time
from typing import Callable, Generator

from webiptd.commands import Entry
from webiptd.http.wire import JSON
from webiptd.state import ListingKey, Reader

MAX_LIMIT = 10_000  # entries in one page
STREAM_PAGE = 1_000  # entries read from the store at a time for a whole-chain stream
MAX_KEY_PART = 64  # characters of a part of the key in a cursor: a network's text is at most 43


def encode_cursor(key: ListingKey) -> str:
    """The cursor for the page after `key`: opaque to clients (base64url of the key, RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(JSON.encode(list(key)).encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> ListingKey:
    """The key in a cursor that encode_cursor made; ValueError for anything else."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValueError("malformed cursor (after): pass on the `next` of the page before") from None
    if (not isinstance(key, list) or len(key) != 3
            or not all(isinstance(k, str) and len(k) <= MAX_KEY_PART for k in key)):
        raise ValueError("malformed cursor (after): pass on the `next` of the page before")
    return key[0], key[1], key[2]


def text_line(entry: Entry) -> str:
    """An entry as a line of the text listing: its network, and for a scoped entry `proto=P` and `port=P` as the
    query names them, so that a bulk POST never takes it back as a block of all traffic."""
    scope = entry.scope
    if scope is None:
        return f"{entry.network}\n"
    if not scope.ports:
        return f"{entry.network} proto={scope.proto}\n"
    return f"{entry.network} proto={scope.proto} port={scope.port_text}\n"


def stream(reader: Reader, chain: str, text: bool, clock: Callable[[], float] = time.time,
           page: int = STREAM_PAGE, after: ListingKey | None = None) -> Generator[bytes, None, None]:
    """The whole chain (after the key `after`, given), read from the store a page at a time: the JSON document
    {"chain", "entries"} or the text listing, in pieces of one page each, never the whole of it in memory."""
    db: sqlite3.Connection = reader.connect()
    try:
        if not text:
            yield b'{"chain":' + JSON.encode(chain).encode() + b',"entries":['
        key: ListingKey | None = after
        first = True
        while True:
            entries, key = reader.page(db, chain, key, page, clock())
            if text:
                piece = "".join(text_line(e) for e in entries).encode()
            else:
                piece = ",".join(JSON.encode(e.to_json()) for e in entries).encode()
                if entries and not first:
                    piece = b"," + piece
                first = first and not entries
            if piece:
                yield piece
            if key is None:
                break
        if not text:
            yield b"]}\n"
    finally:
        db.close()
