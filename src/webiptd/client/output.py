"""What `web-ipt` prints for people: aligned tables of entries and chains. (`--json` prints the API's own JSON.)

tabulate is imported when a table is printed, so `--json`, `export` and `health` do not pay for it."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

ENTRY_HEADERS = ("NETWORK", "SCOPE", "EXPIRES", "CREATED", "CLAIMS")
CHAIN_HEADERS = ("CHAIN", "TARGET", "HOOKS", "BACKEND", "MATCH", "INTERFACE")


def scope_text(entry: dict[str, Any]) -> str:
    """`all`, `tcp` (every port of it) or `tcp/22,80:90`."""
    proto, port = entry.get("proto"), entry.get("port")
    if not proto:
        return "all"
    return f"{proto}/{port}" if port else str(proto)


def claims_text(entry: dict[str, Any]) -> str:
    claims = entry.get("claims") or []
    # A claim of another host of the fleet says so: its owner `fw2/ops` may also be a local user's label.
    return ",".join(str(c.get("owner")) + (" (fleet)" if c.get("node") else "") for c in claims) or str(
        entry.get("created_by") or "")


def entry_row(entry: dict[str, Any]) -> list[str]:
    return [str(entry.get("network")), scope_text(entry), str(entry.get("expires_at") or "never"),
            str(entry.get("created_at") or ""), claims_text(entry)]


def table(headers: tuple[str, ...], rows: list[list[str]], out: TextIO | None = None) -> None:
    from tabulate import tabulate  # lazily: only tables need it

    out = out or sys.stdout
    if rows:
        # disable_numparse: a port list such as "22" stays text, aligned left like the rest.
        out.write(tabulate(rows, headers=list(headers), tablefmt="plain", disable_numparse=True) + "\n")


def entries(doc: dict[str, Any], out: TextIO | None = None) -> None:
    table(ENTRY_HEADERS, [entry_row(e) for e in doc.get("entries", [])], out)


def chains(doc: dict[str, Any], out: TextIO | None = None) -> None:
    rows = [[str(c.get("name")), str(c.get("target")), ",".join(c.get("hooks") or []), str(c.get("backend")),
             str(c.get("match")), str(c.get("interface") or "-")] for c in doc.get("chains", [])]
    table(CHAIN_HEADERS, rows, out)


def as_json(doc: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(doc, indent=2) + "\n")
