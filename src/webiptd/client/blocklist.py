"""Blocklists as `web-ipt import` reads them: one address or network a line with `#` (or `;`) comments, as ipset and
FireHOL netsets and Spamhaus DROP write them, or a JSON list; each item checked as the daemon's bulk POST checks it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from webiptd.net import parse_item

MAX_ITEM = 64  # characters of one bulk item, as the daemon takes it (http/app.py)


@dataclass(frozen=True)
class Item:
    where: str  # "line 12" in a text list, "item 12" in a JSON one
    text: str


@dataclass(frozen=True)
class Bad:
    where: str
    text: str
    message: str


def parse(text: str) -> tuple[list[Item], list[Bad]]:
    """The good items, in order, and the bad ones, each with its line (or JSON item) number."""
    if text.lstrip().startswith("["):
        return _parse_json(text)
    good: list[Item] = []
    bad: list[Bad] = []
    for number, line in enumerate(text.splitlines(), 1):
        content = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not content:
            continue
        _check(Item(f"line {number}", content), good, bad)
    return good, bad


def _parse_json(text: str) -> tuple[list[Item], list[Bad]]:
    try:
        items = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return [], [Bad("JSON", "", f"not a JSON list: {exc}")]
    if not isinstance(items, list):
        return [], [Bad("JSON", "", "a JSON blocklist is a list of strings")]
    good: list[Item] = []
    bad: list[Bad] = []
    for number, value in enumerate(items, 1):
        if not isinstance(value, str):
            bad.append(Bad(f"item {number}", json.dumps(value)[:MAX_ITEM], "an item is a string: an address or "
                                                                            "ADDRESS/PREFIX"))
            continue
        _check(Item(f"item {number}", value.strip()), good, bad)
    return good, bad


def _check(item: Item, good: list[Item], bad: list[Bad]) -> None:
    text = item.text
    if len(text) > MAX_ITEM or not text.isascii() or any(c.isspace() for c in text):
        bad.append(Bad(item.where, text[:MAX_ITEM], "not an address or network (one a line)"))
        return
    try:
        parse_item(text)
    except ValueError as exc:
        bad.append(Bad(item.where, text, str(exc)))
        return
    good.append(item)
