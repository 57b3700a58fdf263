"""`web-ipt`, the command line a sysadmin uses on web-ipt-d: block, unblock, show, list, chains, import, export,
health. Exit codes: 0 done, 1 refused by the server (with its message), 2 usage, 3 no answer from the server."""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import ipaddress
import os
import re
import sys
from collections import deque
from typing import Any, Callable, Iterator

from webiptd import __version__
from webiptd.client import output
from webiptd.client.api import Api, Refused, Unreachable
from webiptd.client.blocklist import Bad, Item, parse
from webiptd.client.settings import Flags, Settings, SettingsError, resolve
from webiptd.net import Network, parse_item
from webiptd.scope import parse_scope

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3
PROG = "web-ipt"
DEFAULT_CHUNK = 10_000  # the daemon's limits.max_bulk_items by default; a smaller limit is found by its 413
_TIMEOUT_RE = re.compile(r"(-1|0|[1-9][0-9]*)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A bad argument: exit 2."""


# -- arguments ---------------------------------------------------------------------------------------------


def _timeout(text: str) -> str:
    """Seconds, or with a unit (90m, 12h, 7d, 2w); -1 or 0 is permanent. The daemon checks the range."""
    match = _TIMEOUT_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, or a number with s, m, h, d or w; -1 or 0 is "
                                         "permanent")
    number, unit = match.groups()
    return str(int(number) * _UNITS[unit]) if int(number) > 0 else number


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds above 0")
    return value


def _chunk(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number above 0")
    return int(text)


def _connection_options(default: Any) -> argparse.ArgumentParser:
    """The options that say where the server is; taken before or after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("server (else WEB_IPT_* variables, a netrc file, ~/.config/web-ipt/client.yaml)")
    g.add_argument("--url", default=default, help="https://HOST:PORT of web-ipt-d (WEB_IPT_URL; "
                                                  "default https://127.0.0.1:8820)")
    g.add_argument("--cacert", default=default, metavar="FILE", help="the CA that signed the server's certificate "
                   "(WEB_IPT_CACERT; default /etc/web-ipt-d/ca.crt if it exists, else the system's CAs)")
    g.add_argument("--user", default=default, help="the API user (WEB_IPT_USER); the password comes from "
                   "WEB_IPT_PASSWORD, the netrc file, client.yaml or a prompt, never from the command line")
    g.add_argument("--netrc", default=default, metavar="FILE", help="the netrc file to read (WEB_IPT_NETRC; "
                   "default ~/.netrc), e.g. fail2ban's /etc/fail2ban/web-ipt-d.netrc")
    g.add_argument("--cert", default=default, metavar="FILE", help="a client certificate (WEB_IPT_CERT)")
    g.add_argument("--key", default=default, metavar="FILE", help="its key, if not in --cert (WEB_IPT_KEY)")
    g.add_argument("--config", default=default, metavar="FILE", help="client.yaml to read instead of "
                   "~/.config/web-ipt/client.yaml")
    g.add_argument("--max-time", default=default, type=_positive, metavar="S",
                   help="seconds for each request (default 120)")
    return p


def _scope_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proto", help="tcp, udp, sctp, dccp or udplite: only this protocol (default: all traffic)")
    p.add_argument("--port", metavar="LIST", help="only these destination ports of --proto: 22, http,https, 8000:8100")


def parser() -> argparse.ArgumentParser:
    late = _connection_options(argparse.SUPPRESS)  # after the subcommand: must not reset what came before it
    top = argparse.ArgumentParser(prog=PROG, parents=[_connection_options(None)],
                                  description="Block and unblock addresses through web-ipt-d's HTTPS API.",
                                  epilog="Exit codes: 0 done, 1 refused by the server, 2 usage, 3 no answer. "
                                         "See docs/client.md.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, run: Callable[[Api, argparse.Namespace], int],
                json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[late])
        p.set_defaults(run=run)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON, for scripts")
        return p

    p = command("block", "block an address or network (or add your claim to its block)", cmd_block)
    p.add_argument("chain")
    p.add_argument("address", metavar="ADDR[/PREFIX]")
    p.add_argument("--timeout", type=_timeout, metavar="S", help="seconds (or 90m, 12h, 7d, 2w); -1 or 0: "
                                                                  "permanent, the default")
    p.add_argument("--owner", metavar="LABEL", help="claim as USER/LABEL (a jail, a container)")
    _scope_options(p)
    p = command("unblock", "release your claim; the block goes with its last claim", cmd_unblock)
    p.add_argument("chain")
    p.add_argument("address", metavar="ADDR[/PREFIX]")
    p.add_argument("--owner", metavar="LABEL", help="release the claim of USER/LABEL; '*' releases every claim "
                                                   "(needs override)")
    _scope_options(p)
    p = command("show", "the entries of a network: with --proto, that one entry; without, every entry whose "
                        "network overlaps it, in every scope", cmd_show)
    p.add_argument("chain")
    p.add_argument("address", metavar="ADDR[/PREFIX]")
    _scope_options(p)
    p = command("list", "every entry of a chain", cmd_list)
    p.add_argument("chain")
    command("chains", "the chains you may use", cmd_chains)
    command("fleet", "this host's place in the fleet: Redis connected, lag, outbox, last resync", cmd_fleet)
    p = command("import", "block every address of a blocklist (one a line, '#' comments; or a JSON list)",
                cmd_import)
    p.add_argument("chain")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("--timeout", type=_timeout, metavar="S", help="for every entry (see block)")
    p.add_argument("--owner", metavar="LABEL", help="claim as USER/LABEL")
    _scope_options(p)
    p.add_argument("--chunk", type=_chunk, default=DEFAULT_CHUNK, metavar="N",
                   help=f"items per request (default {DEFAULT_CHUNK:,}, the daemon's default limit)")
    p = command("export", "the chain's networks, one a line, for import; all-traffic entries unless --proto",
                cmd_export, json_flag=False)
    p.add_argument("chain")
    _scope_options(p)
    command("health", "whether the daemon answers (no credentials needed)", cmd_health)
    return top


# -- what each command does --------------------------------------------------------------------------------


def _network(text: str) -> Network:
    try:
        return parse_item(text.strip())
    except ValueError as exc:
        raise UsageError(f"{text!r}: {exc}") from None


def _entry_segments(args: argparse.Namespace) -> tuple[list[str], Network]:
    network = _network(args.address)
    family = "ipv4" if network.version == 4 else "ipv6"
    segments = ["chain", args.chain, family, str(network.network_address)]
    if network.prefixlen != network.max_prefixlen:
        segments.append(str(network.prefixlen))
    return segments, network


def _query(args: argparse.Namespace, *names: str) -> dict[str, str]:
    if getattr(args, "port", None) is not None and getattr(args, "proto", None) is None:
        raise UsageError("--port needs --proto (tcp, udp, sctp, dccp or udplite)")
    return {name: str(getattr(args, name)) for name in names if getattr(args, name, None) is not None}


def _describe(entry: dict[str, Any]) -> str:
    scope = output.scope_text(entry)
    what = "all traffic" if scope == "all" else scope
    return (f"{entry['network']} ({what}) in {entry['chain']}, expires {entry.get('expires_at') or 'never'}, "
            f"claims: {output.claims_text(entry)}")


def cmd_block(api: Api, args: argparse.Namespace) -> int:
    segments, _ = _entry_segments(args)
    status, entry = api.call("PUT", segments, _query(args, "timeout", "owner", "proto", "port"))
    if args.json:
        output.as_json(entry)
    else:
        print(("blocked: " if status == 201 else "already blocked, your claim refreshed: ") + _describe(entry))
    return OK


def cmd_unblock(api: Api, args: argparse.Namespace) -> int:
    segments, network = _entry_segments(args)
    _, doc = api.call("DELETE", segments, _query(args, "owner", "proto", "port"))
    if args.json:
        output.as_json(doc)
        return OK
    entry = doc.get("entry")
    if entry is None:
        print(f"not blocked: {network} in {args.chain}{_scope_suffix(args)}; nothing to do")
    elif doc.get("deleted"):
        print("unblocked: " + _describe(entry))
    elif doc.get("released"):
        print("claim released, still blocked: " + _describe(entry))
    else:
        print("you hold no claim on it, still blocked: " + _describe(entry))
    return OK


def _scope_suffix(args: argparse.Namespace) -> str:
    if args.proto is None:
        return ""
    return f" for {args.proto}" + (f"/{args.port}" if args.port else "")


def cmd_show(api: Api, args: argparse.Namespace) -> int:
    segments, network = _entry_segments(args)
    if args.proto is not None or args.port is not None:
        # One scope named: the API's GET of that one entry, in the same shape as a listing.
        _, entry = api.call("GET", segments, _query(args, "proto", "port"))
        doc = {"chain": args.chain, "entries": [entry]}
    else:
        # No scope named: the API's GET would show the all-traffic entry only, and say "not blocked" of an address
        # blocked for tcp/22. A sysadmin asking about an address wants every entry that touches it.
        _, listing = api.call("GET", ["chain", args.chain])
        doc = {"chain": listing.get("chain", args.chain),
               "entries": [e for e in listing.get("entries", []) if _overlaps(e.get("network"), network)]}
    if args.json:
        output.as_json(doc)
    else:
        output.entries(doc)
    if not doc["entries"]:
        print(f"{PROG}: {network} is not blocked in {args.chain}", file=sys.stderr)
        return REFUSED
    return OK


def _overlaps(text: Any, network: Network) -> bool:
    try:
        other = ipaddress.ip_network(str(text))
    except ValueError:
        return False
    return other.version == network.version and other.overlaps(network)


def cmd_list(api: Api, args: argparse.Namespace) -> int:
    _, doc = api.call("GET", ["chain", args.chain])
    if args.json:
        output.as_json(doc)
    else:
        output.entries(doc)
        if not doc.get("entries") and sys.stdout.isatty():
            print(f"{args.chain}: no entries", file=sys.stderr)
    return OK


def cmd_chains(api: Api, args: argparse.Namespace) -> int:
    _, doc = api.call("GET", ["chains"])
    if args.json:
        output.as_json(doc)
    else:
        output.chains(doc)
    return OK


def cmd_fleet(api: Api, args: argparse.Namespace) -> int:
    _, doc = api.call("GET", ["fleet"])
    if args.json:
        output.as_json(doc)
    else:
        output.table(("KEY", "VALUE"), [[key, "-" if value is None else ", ".join(value) if isinstance(value, list)
                                         else str(value).lower() if isinstance(value, bool) else str(value)]
                                        for key, value in doc.items()])
    return OK


def cmd_health(api: Api, args: argparse.Namespace) -> int:
    _, doc = api.call("GET", ["health"], auth=False)
    if args.json:
        output.as_json(doc)
    else:
        print(doc.get("status", "?"))
    return OK if doc.get("status") == "ok" else REFUSED


def cmd_export(api: Api, args: argparse.Namespace) -> int:
    query = _query(args, "proto", "port")
    try:
        scope = parse_scope(query.get("proto"), query.get("port"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _, doc = api.call("GET", ["chain", args.chain])
    wanted = (None, None) if scope is None else (scope.proto, scope.port_text or None)
    networks, other = [], 0
    for entry in doc.get("entries", []):
        if (entry.get("proto") or None, entry.get("port") or None) == wanted:
            networks.append(str(entry["network"]))
        else:
            other += 1
    out = sys.stdout
    what = "all traffic" if scope is None else str(scope)
    out.write(f"# web-ipt export of chain {args.chain} ({what}) from {api.settings.url}: {len(networks)} networks\n")
    if other:
        out.write(f"# {other} {'entry' if other == 1 else 'entries'} of other scopes left out: export those with "
                  "--proto and --port\n")
    out.write("".join(n + "\n" for n in networks))
    return OK


# -- import ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportReport:
    chain: str
    items: int = 0
    created: int = 0
    existing: int = 0
    failures: list[Bad] = dataclasses.field(default_factory=list)

    def json(self) -> dict[str, Any]:
        return {"chain": self.chain, "items": self.items, "created": self.created, "existing": self.existing,
                "failed": len(self.failures),
                "failures": [{"where": f.where, "item": f.text, "message": f.message} for f in self.failures]}


def _read_blocklist(name: str) -> str:
    try:
        if name == "-":
            return sys.stdin.buffer.read().decode("utf-8", errors="replace")
        with open(name, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"{name}: {exc.strerror}") from None


def _progress(total: int) -> Any:
    """A progress bar on a terminal (stderr), nothing otherwise; tqdm is imported only for the bar."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="addr", unit_scale=True, file=sys.stderr)


def _chunks(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def bulk_import(api: Api, chain: str, good: list[Item], query: dict[str, str], chunk: int,
                report: ImportReport) -> None:
    """POST the items in chunks, each one group commit in the daemon; a 413 (a lower limits.max_bulk_items than
    the chunk) halves the chunk and sends it again. Refused raised for any other refusal, after the chunks before."""
    pending = deque(_chunks(good, chunk))
    bar = _progress(len(good))
    try:
        while pending:
            part = pending.popleft()
            try:
                _, doc = api.call("POST", ["chain", chain], query, body=[i.text for i in part])
            except Refused as exc:
                if exc.status == 413 and len(part) > 1:
                    half = (len(part) + 1) // 2
                    pending.extendleft(reversed([part[:half], part[half:]]))
                    continue
                raise
            for item, result in zip(part, doc.get("results", [])):
                status = result.get("status")
                if status == 201:
                    report.created += 1
                elif status == 200:
                    report.existing += 1
                else:
                    report.failures.append(Bad(item.where, item.text, f"{result.get('error', status)}: "
                                                                      f"{result.get('message', '')}"))
            if bar is not None:
                bar.update(len(part))
    finally:
        if bar is not None:
            bar.close()


def cmd_import(api: Api, args: argparse.Namespace) -> int:
    query = _query(args, "timeout", "owner", "proto", "port")
    good, bad = parse(_read_blocklist(args.file))
    report = ImportReport(args.chain, items=len(good) + len(bad), failures=list(bad))
    refused: Refused | None = None
    try:
        if good:
            bulk_import(api, args.chain, good, query, args.chunk, report)
    except Refused as exc:
        refused = exc  # the chunks before it are in; say so, then the refusal
    report.failures.sort(key=lambda f: _position(f.where))
    if args.json:
        doc = report.json()
        if refused is not None:
            doc["refused"] = {"status": refused.status, "error": refused.code, "message": refused.message}
        output.as_json(doc)
    else:
        for f in report.failures:
            print(f"{PROG}: {f.where}: {f.text!r}: {f.message}", file=sys.stderr)
        print(f"{args.chain}: {report.created} created, {report.existing} existing, {len(report.failures)} failed "
              f"(of {report.items} items)")
    if refused is not None:
        raise refused
    return REFUSED if report.failures else OK


def _position(where: str) -> int:
    number = where.rpartition(" ")[2]
    return int(number) if number.isdigit() else 0


# -- the command -------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    flags = Flags(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(Flags)})
    settings = resolve(flags, os.environ)
    if args.run is not cmd_health and settings.user is not None and settings.password is None \
            and settings.cert is None and sys.stdin.isatty():
        password = getpass.getpass(f"password for {settings.user} at {settings.url}: ")
        settings = dataclasses.replace(settings, password=password)
    return settings


def _hint_401(settings: Settings | None) -> str:
    if settings is None:
        return ""
    if settings.user is None:
        return (f" (no user: give --user, WEB_IPT_USER, a netrc entry for {settings.host} or user in "
                "client.yaml)")
    return f" (user {settings.user!r} from {settings.user_source})"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)  # exits 2 on a usage error, as argparse does
    settings = None
    try:
        settings = _settings(args)
        with Api(settings) as api:
            code: int = args.run(api, args)
        sys.stdout.flush()
        return code
    except (UsageError, SettingsError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return USAGE
    except Refused as exc:
        hint = _hint_401(settings) if exc.status == 401 else ""
        print(f"{PROG}: refused: {exc}{hint}", file=sys.stderr)
        return REFUSED
    except Unreachable as exc:
        print(f"{PROG}: no answer: {exc}", file=sys.stderr)
        return UNREACHABLE
    except BrokenPipeError:
        # `web-ipt export CHAIN | head`: the reader went away; say nothing more (Python's signal docs, SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    except KeyboardInterrupt:
        return 130
