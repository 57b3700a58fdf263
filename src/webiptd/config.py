"""The YAML config: SCHEMA holds each key's default, reader and help; it drives the loader and the sample.

`load` returns frozen, fully validated dataclasses; a reload builds a new `Config` and swaps one reference.
"""

from __future__ import annotations

import fnmatch
import functools
import ipaddress
import json
import logging
import os
import re
import ssl
import socket
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

from webiptd import passwords
from webiptd.net import Address, Network, parse_cidr

logger = logging.getLogger(__name__)


DEFAULT_PATH = Path("/etc/web-ipt-d/config.yaml")

# iptables(8): a user chain name is at most 28 characters; we also keep to a
# shell- and URL-safe alphabet so a name never needs quoting or escaping.
CHAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,28}\Z")
USER_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
# A claim's owner label: fail2ban passes its jail name, a container its id. The claim's owner is then `user/label`.
OWNER_LABEL_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
# The owner of the one claim of a rule the worker found in a managed chain and took over. It is nobody's: any
# release of that network by a user who may write its chain releases it too, as any such user could remove it
# before claims. So it is no user's name.
ADOPTED = "adopted"
# Names iptables reserves for built-in chains and targets.
RESERVED_CHAIN_NAMES = frozenset(
    {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING",
     "ACCEPT", "DROP", "REJECT", "RETURN", "QUEUE", "LOG", "NFQUEUE"}
)
FILTER_BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
TARGETS = ("DROP", "REJECT", "ACCEPT")
BLOCK_TARGETS = ("DROP", "REJECT")  # the targets of block chains; an ACCEPT chain lets its entries through
MATCHES = ("source", "destination")
# dev_valid_name() in net/core/dev.c: a name is 1 to IFNAMSIZ - 1 (15) bytes, not "." or "..", with no "/", ":" or
# white space. We keep to what needs no quoting for iptables or nft; a trailing "+" is iptables' wildcard
# (iptables(8), -i), which nft writes as "*".
INTERFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
BACKENDS = ("iptables", "ipset", "nftables")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class ConfigError(Exception):
    """Every problem found in a config, one line each, each naming its key."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


# -- readers: each turns one YAML value into what the config holds, or raises ValueError saying what it expected

def parse_listen(text: Any) -> Listen:
    """Parse "host:port" or "[v6]:port" with an IP literal host."""
    if not isinstance(text, str):
        raise ValueError('expected a string "ADDRESS:PORT"')
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", text)
    if not m:
        raise ValueError('expected "ADDRESS:PORT" or "[IPV6]:PORT" with an IP address')
    host, port_text = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    ipaddress.ip_address(host)
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1 to 65535")
    return Listen(host, port)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return value
    return convert


def _seconds(lo: float, hi: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
            raise ValueError(f"expected a number of seconds above {lo:g} and at most {hi:g}")
        return float(value)
    return convert


def _choice(options: tuple[str, ...] | Mapping[str, Any]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
        return str(value)
    return convert


def _path(value: Any) -> Path:
    """A file path; the loader reads a relative one against the config file's directory."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError("expected a file path")
    return Path(value)


def _chain_name(value: Any) -> str:
    if not isinstance(value, str) or not CHAIN_NAME_RE.match(value):
        raise ValueError("a chain name is 1 to 28 letters, digits, '-' or '_'")
    return value


def _managed_chain_name(value: Any) -> str:
    name = _chain_name(value)
    if name in RESERVED_CHAIN_NAMES:
        raise ValueError("is a name iptables reserves for a built-in chain or target")
    return name


def _user_name(value: Any) -> str:
    if not isinstance(value, str) or not USER_NAME_RE.match(value):
        raise ValueError("a user name is 1 to 64 letters, digits, '.', '-' or '_'")
    if value == ADOPTED:
        raise ValueError(f"{ADOPTED!r} is the owner of rules the daemon adopts; choose another user name")
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix", "sentinel")
NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
# The node of events that other Redis clients add to the stream (no `node` field): no host may take the name.
PRODUCER_NODE = "redis"


def _redis_url(value: Any) -> str:
    """A Redis URL redis-py can use, checked without connecting. Its problems never show it (a password)."""
    if not isinstance(value, str) or not value:
        raise ValueError("a Redis URL is a string")
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("a Redis URL starts with " + ", ".join(f"{s}://" for s in REDIS_SCHEMES))
    if any(c.isspace() for c in value):
        raise ValueError("a Redis URL has no white space")
    if parts.scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError("unix:// needs an absolute socket path")
        return value
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ValueError("the Redis URL names no host")
    for host in hosts.split(","):
        name, _, port = host.rpartition(":") if "]" not in host.rpartition(":")[2] else (host, "", "")
        if not name:
            name, port = host, ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("the Redis URL's port is not a number from 1 to 65535")
        if "," in hosts and parts.scheme != "sentinel":
            raise ValueError("only sentinel:// lists several hosts")
    path = [p for p in parts.path.split("/") if p]
    if parts.scheme == "sentinel":
        if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError("sentinel:// needs /<service name>[/<db number>] after the hosts")
    elif len(path) > 1 or (path and not path[0].isdigit()):
        raise ValueError("the Redis URL's path is a database number (/0)")
    return value


def _node_name(value: Any) -> str:
    if not isinstance(value, str) or not NODE_RE.match(value):
        raise ValueError("a node name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if value == PRODUCER_NODE:
        raise ValueError(f"{PRODUCER_NODE!r} names the events other Redis clients add; give this host another name")
    return value


def _key_prefix(value: Any) -> str:
    if (not isinstance(value, str) or not 1 <= len(value) <= 64 or not value.isprintable()
            or any(c in value for c in " *?[]\\")):
        raise ValueError("a key prefix is 1 to 64 printable characters without spaces or the glob characters "
                         "*?[]\\ (it goes into ACL key patterns)")
    return value


def _hook(value: Any) -> str:
    hook = _chain_name(value)
    if hook in RESERVED_CHAIN_NAMES and hook not in FILTER_BUILTINS:
        raise ValueError("is not a chain of the filter table; use INPUT, FORWARD, OUTPUT or a user chain")
    return hook


def _interface(value: Any) -> str:
    name = value[:-1] if isinstance(value, str) and value.endswith("+") else value
    if not isinstance(value, str) or not isinstance(name, str) or len(value) > 15 or not INTERFACE_RE.match(name) \
            or name in (".", ".."):
        raise ValueError("expected an interface name: 1 to 15 letters, digits, '.', '-' or '_', "
                         "or such a beginning and '+' for every name that begins so (eth+)")
    return value


def _chain_pattern(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_\-*?\[\]!]{1,64}", value):
        raise ValueError("expected a chain name or glob pattern")
    return value


_HASH_REQUIRED = "is required: make one with `web-ipt-d -hash_password`"


def _password_hash(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(_HASH_REQUIRED)
    if not passwords.well_formed(value):
        raise ValueError("is not a supported hash (bcrypt, argon2, sha512_crypt, sha256_crypt, pbkdf2_sha256); "
                         "make one with `web-ipt-d -hash_password`")
    return value


# -- the schema ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListOf:
    """A list read item by item, each problem naming key[i]; null stands for the empty list."""

    item: Callable[[Any], Any]
    one: bool = False  # a single item may stand for a list of one (listen)


@dataclass(frozen=True)
class Option:
    """One key: what its absence means (written as YAML would), how a value is read, and what it is for."""

    default: Any
    convert: Callable[[Any], Any] | ListOf
    help: str
    example: Any = None  # what the sample shows, where that is not the default
    commented: bool = False  # the sample shows it commented out (it does not suit the sample's example)
    nullable: bool = False  # null means none (None) rather than the default
    required: str = ""  # the problem when it is absent or null; "" when it may be
    secret: bool = False  # a problem never shows the value

    def loaded_default(self) -> Any:
        """The default as the loader returns it (a tuple of networks, a float of seconds)."""
        if self.default is None:
            return None
        if isinstance(self.convert, ListOf):
            items = self.default if isinstance(self.default, list) else [self.default]
            return tuple(self.convert.item(x) for x in items)
        return self.convert(self.default)


@dataclass(frozen=True)
class Section:
    """A mapping of options; for users and chains, a mapping of names to one such mapping each."""

    help: str
    options: Mapping[str, Option]
    named: str = ""  # users, chains: the one name the sample shows
    optional: bool = False  # absent means off (fleet): the sample shows it commented out


# Radicale's DEFAULT_CONFIG_SCHEMA in shape: the loader, the dataclass defaults, -write_config and etc/config.yaml
# all come from this table, in its order.
SCHEMA: Mapping[str, Option | Section] = MappingProxyType({
    "listen": Option(
        "[::]:8820", ListOf(parse_listen, one=True),
        "Address and port to listen on when NOT started by systemd socket activation.\n"
        '"[::]:8820" is dual-stack (IPv4 and IPv6). A list of addresses is also accepted.\n'
        "Changing it takes a restart."),
    "tls": Section(
        "TLS is mandatory. Make a CA, a server and a client certificate with your own\n"
        "tools, or with `web-ipt-d -gen_certs /etc/web-ipt-d -host NAME [-host NAME ...]`.", {
            "cert": Option(None, _path, "PEM certificate (chain) presented to clients",
                           example="/etc/web-ipt-d/server.crt", required="is required"),
            "key": Option(None, _path, "its PEM private key; keep it mode 0600",
                          example="/etc/web-ipt-d/server.key", required="is required"),
            "min_version": Option("1.2", _choice(TLS_VERSIONS), " or ".join(f'"{v}"' for v in TLS_VERSIONS)),
            "client_ca": Option(None, _path, "PEM CA file: if set, clients must present a certificate it signed"),
            "client_cert_auth": Option(
                False, _bool,
                "With client_ca set: true lets a client whose certificate's subject CN is a\n"
                "user name below log in as that user without a password (Basic auth still\n"
                "works, and a password that is sent is always checked); false keeps Basic\n"
                "auth required on top of the certificate."),
        }),
    "plain_http": Option(
        False, _bool,
        "Plain HTTP without TLS. Allowed only when every listen address is loopback\n"
        "(for a local fail2ban, say). The tls section is then ignored."),
    "state_dir": Option(
        "/var/lib/web-ipt-d", _path,
        "Where the SQLite state lives (state.db). Every acknowledged block is written\n"
        "here before it is answered, and restored from here after a reboot or crash."),
    "users": Section(
        "Who may call the API. HTTP Basic auth over TLS.", {
            "password_hash": Option(
                None, _password_hash,
                "A passlib hash: bcrypt (default), argon2, sha512_crypt, sha256_crypt or\n"
                "pbkdf2_sha256. Make one with:  web-ipt-d -hash_password",
                example="REPLACE-ME: run web-ipt-d -hash_password", required=_HASH_REQUIRED, secret=True),
            "chains": Option([], ListOf(_chain_pattern), "Glob patterns of the chains this user may use.",
                             example=["f2b-*"]),
            "allow_from": Option([], ListOf(parse_cidr),
                                 "Client networks this user may connect from; empty means any."),
            "read_only": Option(False, _bool, "A read-only user may list and look up, never block or unblock."),
            "override": Option(
                False, _bool,
                "true lets this user remove every claim on a block at once (DELETE with\n"
                "owner=*), whoever holds them; false: a user removes only its own claims."),
            "metrics": Option(
                False, _bool,
                "true lets this user read GET /metrics (Prometheus' text format): counts\n"
                "and timings of requests, entries per chain, the worker, connection slots.\n"
                "A scraper's user needs no chains: chains: [] and metrics: true."),
        }, named="fail2ban"),
    "chains": Section(
        "The chains web-ipt-d manages. web-ipt-d is the only writer of what it makes\n"
        "for them and never touches any other rule. A name is 1 to 28 letters, digits,\n"
        '"-" or "_".', {
            "hooks": Option(
                ["INPUT"], ListOf(_hook),
                "Built-in chains (INPUT, FORWARD, OUTPUT) or, for iptables and ipset, your\n"
                "own chains, that get a jump to this chain at the top: allow chains' jumps\n"
                "first, then block chains', each in config order. A reload removes the\n"
                "jumps from built-in chains a chain no longer lists. An empty list hooks it\n"
                "nowhere (jump to it from your own rules). Packets to containers (Docker's\n"
                "published ports) and VMs go through FORWARD, not INPUT."),
            "target": Option(
                "DROP", _choice(TARGETS),
                "What a listed packet gets: DROP (silence) or REJECT (an ICMP error); or\n"
                "ACCEPT, an allow chain: its entries are let through before any of\n"
                "web-ipt-d's block chains at the same hook see them (\"open tcp/22 to this\n"
                "customer for 2 hours\"). An allow chain needs every chain at its hooks on\n"
                "the same kind of backend (iptables and ipset share the legacy tables;\n"
                "nftables at the same priority): an accept in one table cannot overrule a\n"
                "drop in another. never_allow applies to it, never_block does not."),
            "match": Option(
                "source", _choice(MATCHES),
                "Which address of a packet a block is matched against: source (who sends it)\n"
                "or destination (where it goes: egress to a known bad network, in a chain\n"
                "hooked at OUTPUT or FORWARD). destination does not go with INPUT, where\n"
                "every packet's destination is this host."),
            "interface": Option(
                None, _interface,
                "Only packets on this interface go through the chain: the in-interface for\n"
                "INPUT and FORWARD, the out-interface for OUTPUT, matched in each hook's jump.\n"
                '"eth+" is every interface whose name begins with "eth". null: every interface.\n'
                "Needs hooks, and only INPUT, FORWARD and OUTPUT.",
                nullable=True),
            "backend": Option(
                "iptables", _choice(BACKENDS),
                "Where this chain's blocks live:\n"
                "  iptables  one rule per blocked network, in a chain of this name in the\n"
                "            legacy filter tables of iptables and ip6tables. Plain to read\n"
                "            (`iptables-legacy -S`), but every change and every packet pays\n"
                "            for each rule: fine up to a few thousand blocks.\n"
                "  ipset     one rule in that chain matches two hash:net sets, <name>-v4\n"
                "            and <name>-v6, and the kernel expires their entries. Flat cost\n"
                "            to 100k blocks and more. Needs legacy iptables as above, the\n"
                "            ip_set kernel module and the ipset command.\n"
                "  nftables  web-ipt-d's own table `inet web-ipt-d`: hash sets with kernel\n"
                "            timeouts (<name>-v4 and <name>-v6 for hosts, <name>-v4-24 and\n"
                "            the like for networks) and a base chain per hook. Flat cost like\n"
                "            ipset, without legacy iptables: the choice on RHEL 9 and later\n"
                "            and on hosts that run nftables only. Needs python3-nftables.\n"
                "            See it with `nft list table inet web-ipt-d`.\n"
                "web-ipt-d -check_config warns when a backend does not suit this host."),
            "maxelem": Option(
                1_048_576, _int_range(1, 2**31 - 1),
                "ipset and nftables only: the most entries a set holds (per family; with\n"
                "nftables, per family and prefix length). A block that does not fit gets 507.",
                commented=True),
            "priority": Option(
                -10, _int_range(-400, 400),
                "nftables only: the priority of the base chains. The usual filter chains\n"
                "are at 0, so the default -10 sees packets before them.",
                commented=True),
            "shared": Option(
                False, _bool,
                "true shares this chain's blocks with every host of the fleet (the fleet\n"
                "section): a block or unblock here reaches the others through Redis, and\n"
                "theirs reach this host. Each host names the chains it shares."),
        }, named="f2b-web"),
    "never_block": Option(
        ["127.0.0.0/8", "::1/128"], ListOf(parse_cidr),
        "Networks that are never blocked: a request that overlaps one gets 409.\n"
        "Put your own management and monitoring networks here."),
    "never_allow": Option(
        [], ListOf(parse_cidr),
        "Networks that an allow chain (target ACCEPT) never lets through: a request\n"
        "that overlaps one gets 409. For example the networks of known attackers,\n"
        "or 0.0.0.0/1 and 128.0.0.0/1 against a client that allows everyone."),
    "fleet": Section(
        "Hosts that share the blocks of their `shared: true` chains through a Redis\n"
        "stream (docs/fleet.md). Without this section no Redis code runs. Changing it\n"
        "takes a restart.", {
            "redis": Option(
                None, _redis_url,
                "redis://[user:password@]host:port/db, rediss:// for TLS, unix:///path?db=N,\n"
                "or sentinel://[user:password@]host:port[,host:port]/service[/db]",
                example="redis://fw1:secret@10.0.0.5:6379/0", required="is required", secret=True),
            "redis_ca": Option(None, _path, "CA file for rediss:// (null: the system's CAs)", nullable=True),
            "node": Option(None, _node_name, "this host's name in the fleet, unique per host; null: the host name",
                           nullable=True, example="fw1"),
            "key_prefix": Option("web-ipt-d:", _key_prefix, "every Redis key web-ipt-d touches starts with this"),
            "retention": Option(
                604800, _int_range(60, 31_536_000),
                "seconds of events kept in the stream for hosts that were down to catch up;\n"
                "a host down longer resyncs from the snapshot"),
        }, optional=True),
    "log": Section("", {
        "file": Option(
            "/var/log/web-ipt-d/web-ipt-d.log", _path,
            "Every message at `level` and above goes here; the audit trail always does.\n"
            "Warnings, errors and audit lines also go to stderr (the journal).\n"
            "null logs to stderr only. logrotate needs no copytruncate: the file is reopened when moved.",
            nullable=True),
        "level": Option("INFO", _choice(LOG_LEVELS), ", ".join(LOG_LEVELS[:-1]) + " or " + LOG_LEVELS[-1]),
    }),
    "limits": Section(
        "Connections get a slot before TLS. When every slot is taken, a new connection takes one back from\n"
        "the connection that has waited longest without a request in progress (handshake, reading, idle).", {
            "max_connections": Option(128, _int_range(1, 10000), "slots for clients outside trusted_clients"),
            "max_connections_per_client": Option(
                8, _int_range(1, 10000), "of those, per IPv4 address or IPv6 /64; more are closed at once"),
            "trusted_clients": Option(["127.0.0.0/8", "::1/128"], ListOf(parse_cidr),
                                      "a local fail2ban: slots the rest of the world cannot take"),
            "trusted_connections": Option(
                32, _int_range(0, 10000), "slots kept for trusted_clients (who also use the others, uncapped)"),
            "handshake_timeout": Option(5, _seconds(0, 3600), "seconds for the whole TLS handshake"),
            "header_timeout": Option(10, _seconds(0, 3600), "seconds for the whole request line and headers"),
            "idle_timeout": Option(
                15, _seconds(0, 3600), "seconds a keep-alive connection may wait for its next request"),
            "request_timeout": Option(
                10, _seconds(0, 3600), "seconds for each read of a request body and each write of a response"),
            "worker_timeout": Option(
                5, _seconds(0, 600), "seconds a request waits for the firewall worker before a 503"),
            "auth_failures": Option(
                10, _int_range(1, 100000), "failed logins from one client (an IPv4 address or an IPv6 /64) ..."),
            "auth_window": Option(
                60, _int_range(1, 86400), "... within this many seconds earn it 429 for this many seconds"),
            "max_bulk_items": Option(
                10_000, _int_range(1, 1_000_000), "the most addresses one POST /chain/<chain> may carry"),
            "kernel_check": Option(
                5, _seconds(0, 86400),
                "seconds between looks at whether the kernel still has every block;\n"
                "one that went (nft flush ruleset, iptables-restore, ipset flush) is put back"),
        }),
})


def _section(name: str) -> Mapping[str, Option]:
    node = SCHEMA[name]
    assert isinstance(node, Section)
    return node.options


def _default(section: str, key: str) -> Any:
    """The default of a dataclass field, so that it is written only in SCHEMA."""
    return _section(section)[key].loaded_default()


# -- the config as a value -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLS:
    cert: Path
    key: Path
    min_version: str
    client_ca: Path | None
    client_cert_auth: bool = _default("tls", "client_cert_auth")


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str = field(repr=False)
    chains: tuple[str, ...]
    allow_from: tuple[Network, ...]
    read_only: bool
    override: bool = _default("users", "override")
    metrics: bool = _default("users", "metrics")

    def may_use(self, chain: str) -> bool:
        return any(fnmatch.fnmatchcase(chain, pattern) for pattern in self.chains)

    def may_connect_from(self, address: Address) -> bool:
        if not self.allow_from:
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow_from if net.version == address.version)


@dataclass(frozen=True)
class Chain:
    name: str
    hooks: tuple[str, ...]
    target: str
    backend: str = _default("chains", "backend")
    maxelem: int = _default("chains", "maxelem")
    priority: int = _default("chains", "priority")
    match: str = _default("chains", "match")
    interface: str | None = _default("chains", "interface")
    shared: bool = _default("chains", "shared")


@dataclass(frozen=True)
class Fleet:
    redis: str = field(repr=False)  # may hold a password: never in a repr, a log or a problem
    redis_ca: Path | None
    node: str
    key_prefix: str
    retention: int

    @property
    def redis_display(self) -> str:
        """The URL without its credentials, for logs and GET /fleet."""
        parts = urllib.parse.urlsplit(self.redis)
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))


@dataclass(frozen=True)
class Log:
    file: Path | None
    level: str


@dataclass(frozen=True)
class Limits:
    max_connections: int = _default("limits", "max_connections")
    request_timeout: float = _default("limits", "request_timeout")
    worker_timeout: float = _default("limits", "worker_timeout")
    auth_failures: int = _default("limits", "auth_failures")
    auth_window: int = _default("limits", "auth_window")
    max_bulk_items: int = _default("limits", "max_bulk_items")
    kernel_check: float = _default("limits", "kernel_check")
    max_connections_per_client: int = _default("limits", "max_connections_per_client")
    trusted_clients: tuple[Network, ...] = _default("limits", "trusted_clients")
    trusted_connections: int = _default("limits", "trusted_connections")
    handshake_timeout: float = _default("limits", "handshake_timeout")
    header_timeout: float = _default("limits", "header_timeout")
    idle_timeout: float = _default("limits", "idle_timeout")


@dataclass(frozen=True)
class Config:
    path: Path
    listen: tuple[Listen, ...]
    tls: TLS | None
    plain_http: bool
    state_dir: Path
    users: Mapping[str, User]
    chains: Mapping[str, Chain]
    never_block: tuple[Network, ...]
    never_allow: tuple[Network, ...]
    log: Log
    limits: Limits
    fleet: Fleet | None = None
    # Built at load so a bad cert is a load error and a reload rotates it.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def protected_by(self, network: Network, target: str = "DROP") -> Network | None:
        """The network of never_block (never_allow for an ACCEPT chain's `target`) that `network` overlaps, if any.
        Compared as ranges of ints: every item of a bulk load asks (overlaps() took a tenth of a load's time)."""
        ranges = self._never_allow_ranges if target == "ACCEPT" else self._never_block_ranges
        if not ranges:
            return None
        version, first = network.version, int(network.network_address)
        last = first | ((1 << ((32 if version == 4 else 128) - network.prefixlen)) - 1)
        for protected_version, low, high, protected in ranges:
            if protected_version == version and low <= last and first <= high:
                return protected
        return None

    def protected_packed(self, packed: bytes, prefixlen: int, target: str = "DROP") -> Network | None:
        """protected_by() for a network given packed (its address, host bits clear) and its prefix length: the
        ranges compared as big-endian bytes of one length, which order as their ints do (a bulk load's items)."""
        ranges = (self._never_allow_packed if target == "ACCEPT" else self._never_block_packed).get(len(packed))
        if not ranges:
            return None
        size = len(packed)
        last = packed if prefixlen == size * 8 else (
            int.from_bytes(packed, "big") | ((1 << (size * 8 - prefixlen)) - 1)).to_bytes(size, "big")
        for low, high, protected in ranges:
            if low <= last and packed <= high:
                return protected
        return None

    @functools.cached_property
    def _never_block_packed(self) -> dict[int, tuple[tuple[bytes, bytes, Network], ...]]:
        return _packed_ranges(self.never_block)

    @functools.cached_property
    def _never_allow_packed(self) -> dict[int, tuple[tuple[bytes, bytes, Network], ...]]:
        return _packed_ranges(self.never_allow)

    @functools.cached_property
    def _never_block_ranges(self) -> tuple[tuple[int, int, int, Network], ...]:
        return _ranges(self.never_block)

    @functools.cached_property
    def _never_allow_ranges(self) -> tuple[tuple[int, int, int, Network], ...]:
        return _ranges(self.never_allow)


def _packed_ranges(networks: tuple[Network, ...]) -> dict[int, tuple[tuple[bytes, bytes, Network], ...]]:
    """(first address, last address, network) of each network, packed, by the packed length (4 or 16)."""
    return {size: tuple((n.network_address.packed, n.broadcast_address.packed, n) for n in networks
                        if n.max_prefixlen == size * 8) for size in (4, 16)}


def _ranges(networks: tuple[Network, ...]) -> tuple[tuple[int, int, int, Network], ...]:
    """(version, first address, last address, network) of each network, as ints."""
    return tuple((n.version, int(n.network_address), int(n.broadcast_address), n) for n in networks)


def build_ssl_context(tls: TLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=str(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- loading -------------------------------------------------------------------------------------------------


class _Reader:
    """Walks the parsed YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, base: Path):
        self.base = base
        self.problems: list[str] = []

    def problem(self, key: str, message: str, value: Any = None, *, show: bool = True) -> None:
        self.problems.append(f"{key}: {message}" + (f" (got {value!r})" if show else ""))

    def mapping(self, key: str, value: Any, allowed: Mapping[str, Any] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, "expected a mapping", value)
            return {}
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                self.problem(key, "keys must be strings", k)
            elif allowed is not None and k not in allowed:
                self.problem(f"{key}.{k}" if key else k, "unknown key; allowed: " + ", ".join(allowed), show=False)
            else:
                out[k] = v
        return out

    def take(self, key: str, value: Any, convert: Callable[[Any], Any], default: Any, show: bool = True) -> Any:
        try:
            result = convert(value)
        except (ValueError, TypeError) as exc:
            self.problem(key, str(exc), value, show=show)
            return default
        # A relative path is relative to the config file, not to the daemon's working directory.
        return self.base / result if isinstance(result, Path) else result

    def item(self, key: str, value: Any, convert: Callable[[Any], Any]) -> Any:
        """A list element: an empty (null) one is a problem, never silently dropped (allow_from: [null])."""
        if value is None:
            self.problem(key, "an empty list item", value)
            return None
        return self.take(key, value, convert, None)

    def options(self, prefix: str, body: Mapping[str, Any], options: Mapping[str, Option]) -> dict[str, Any]:
        """Each option's value in `body`, named by its key: the default where it is absent or null."""
        return {name: self.option(f"{prefix}.{name}" if prefix else name, body.get(name, opt.default), opt)
                for name, opt in options.items()}

    def option(self, key: str, value: Any, opt: Option) -> Any:
        if isinstance(opt.convert, ListOf):
            if value is None:
                return ()
            if not isinstance(value, list):
                if not opt.convert.one:
                    self.problem(key, "expected a list", value)
                    return ()
                return tuple(x for x in [self.take(key, value, opt.convert.item, None)] if x is not None)
            return tuple(x for i, v in enumerate(value)
                         if (x := self.item(f"{key}[{i}]", v, opt.convert.item)) is not None)
        fallback = None if opt.nullable else opt.loaded_default()
        if value is None:
            if opt.required:
                self.problem(key, opt.required, show=False)
            return fallback
        return self.take(key, value, opt.convert, fallback, show=not opt.secret)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep only the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: Path | str) -> Config:
    """Read, parse and validate `path`. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read the config file: {exc}"]) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {exc}".replace("\n", " ")]) from None
    return from_mapping(raw, path)


_TOP_OPTIONS = {name: node for name, node in SCHEMA.items() if isinstance(node, Option)}


def from_mapping(raw: Any, path: Path) -> Config:
    r = _Reader(path.parent if path.parent != Path("") else Path("."))
    top = r.mapping("", raw, SCHEMA)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(path, r.problems)
    values = r.options("", top, _TOP_OPTIONS)
    _check_listen(r, values["listen"], top.get("listen"), values["plain_http"])
    tls, ssl_context = _tls(r, r.mapping("tls", top.get("tls"), _section("tls")), values["plain_http"])
    _check_state_dir(r, values["state_dir"])
    chains = _chains(r, top.get("chains"))
    users = {name: User(name=name, **v) for name, (_, v) in _named(r, "users", top.get("users"), _user_name).items()}
    log = Log(**_read_section(r, "log", top.get("log")))
    _check_log_file(r, log.file)
    limits = Limits(**_read_section(r, "limits", top.get("limits")))
    fleet = _fleet(r, top.get("fleet"), chains)
    if r.problems:
        raise ConfigError(path, r.problems)
    return Config(path=path, tls=tls, users=MappingProxyType(users), chains=MappingProxyType(chains), log=log,
                  limits=limits, fleet=fleet, ssl_context=ssl_context, **values)


def _read_section(r: _Reader, section: str, raw: Any) -> dict[str, Any]:
    options = _section(section)
    return r.options(section, r.mapping(section, raw, options), options)


# -- the checks that span keys, after the table has read each one --------------------------------------------


def _named(r: _Reader, section: str, raw: Any,
           read_name: Callable[[Any], str]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """users.<name> or chains.<name>: for each well-formed name, its body and the values its options read."""
    options = _section(section)
    out = {}
    for name, body in r.mapping(section, raw, None).items():
        key = f"{section}.{name}"
        if r.take(key, name, read_name, None) is not None:
            body = r.mapping(key, body, options)
            out[name] = body, r.options(key, body, options)
    return out


def _check_listen(r: _Reader, listen: tuple[Listen, ...], raw: Any, plain_http: bool) -> None:
    if not listen:
        r.problem("listen", "at least one listen address is needed", raw)
    if plain_http and any(not item.is_loopback for item in listen):
        r.problem("plain_http", "plain HTTP is allowed only when every listen address is loopback",
                  [str(x) for x in listen])


def _tls(r: _Reader, body: dict[str, Any], plain_http: bool) -> tuple[TLS | None, ssl.SSLContext | None]:
    """The TLS settings, unless plain_http, and the context they make: the files must load, and together."""
    if plain_http:
        return None, None
    if not body:
        r.problem("tls", "TLS is required (cert and key) unless plain_http is true on loopback", show=False)
        return None, None
    # An unquoted 1.2 in YAML is a float; read it as the string it was meant to be.
    version = body.get("min_version")
    body = dict(body, min_version=str(version) if isinstance(version, float) else version)
    values = r.options("tls", body, _section("tls"))
    for name in ("cert", "key", "client_ca"):
        if values[name] is not None and not os.access(values[name], os.R_OK):
            r.problem(f"tls.{name}", "file is missing or unreadable", str(values[name]))
    client_ca = values["client_ca"]
    if client_ca is not None and not any(p.startswith("tls.client_ca") for p in r.problems):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(client_ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            r.problem("tls.client_ca", f"does not load as PEM CA certificates: {exc}", str(client_ca))
    if values["client_cert_auth"] and body.get("client_ca") is None:
        r.problem("tls.client_cert_auth", "needs tls.client_ca: only a certificate that CA signed "
                  "and the handshake verified can stand in for a password", show=False)
    if values["cert"] is None or values["key"] is None:
        return None, None
    tls = TLS(**values)
    if any(p.startswith(("tls.cert", "tls.key", "tls.client_ca")) for p in r.problems):
        return tls, None
    try:
        return tls, build_ssl_context(tls)
    except (ssl.SSLError, OSError, ValueError) as exc:
        r.problem("tls.cert", f"certificate and key do not load together: {exc}", f"{tls.cert}, {tls.key}")
        return tls, None


def _fleet(r: _Reader, raw: Any, chains: Mapping[str, Chain]) -> Fleet | None:
    """The fleet section; None when absent, and then no chain may be shared."""
    if raw is None:
        for chain in chains.values():
            if chain.shared:
                r.problem(f"chains.{chain.name}.shared", "needs the fleet section (the Redis to share through)",
                          show=False)
        return None
    values = _read_section(r, "fleet", raw)
    if values["node"] is None:
        try:
            values["node"] = _node_name(socket.gethostname().partition(".")[0])
        except ValueError as exc:
            r.problem("fleet.node", f"the host name does not make a node name ({exc}); set fleet.node", show=False)
    ca = values["redis_ca"]
    if ca is not None:
        if not os.access(ca, os.R_OK):
            r.problem("fleet.redis_ca", "file is missing or unreadable", str(ca))
        else:
            try:
                ssl.create_default_context(cafile=str(ca))
            except (ssl.SSLError, OSError, ValueError) as exc:
                r.problem("fleet.redis_ca", f"does not load as PEM CA certificates: {exc}", str(ca))
        if values["redis"] is not None and not values["redis"].startswith("rediss://"):
            r.problem("fleet.redis_ca", "applies only to a rediss:// URL (TLS)", show=False)
    if values["redis"] is None or any(p.startswith("fleet.") for p in r.problems):
        return None
    return Fleet(**values)


def _check_state_dir(r: _Reader, state_dir: Path) -> None:
    if not state_dir.is_dir() and not state_dir.parent.is_dir():
        r.problem("state_dir", "neither the directory nor its parent exists", str(state_dir))


def _chains(r: _Reader, raw: Any) -> dict[str, Chain]:
    """Each chain, its hooks without repeats; a key for one backend only is a problem on another."""
    chains: dict[str, Chain] = {}
    for name, (body, values) in _named(r, "chains", raw, _managed_chain_name).items():
        key = f"chains.{name}"
        raw_hooks = body.get("hooks")
        for i, hook in enumerate(raw_hooks if isinstance(raw_hooks, list) else []):
            if hook == name:
                r.problem(f"{key}.hooks[{i}]", "a chain cannot jump to itself", hook)
        values["hooks"] = tuple(dict.fromkeys(hook for hook in values["hooks"] if hook != name))
        if "maxelem" in body and values["backend"] == "iptables":
            r.problem(f"{key}.maxelem", "applies only to the ipset and nftables backends", body["maxelem"])
        if "priority" in body and values["backend"] != "nftables":
            r.problem(f"{key}.priority", "applies only to the nftables backend", body["priority"])
        if values["backend"] == "nftables":
            for i, hook in enumerate(values["hooks"]):
                if hook not in FILTER_BUILTINS:
                    r.problem(f"{key}.hooks[{i}]", "an nftables chain hooks INPUT, FORWARD or OUTPUT", hook)
        _check_match_and_interface(r, key, values)
        chains[name] = Chain(name=name, **values)
    for chain in chains.values():
        for hook in chain.hooks:
            if hook in chains:
                r.problem(f"chains.{chain.name}.hooks", "a hook must not be another managed chain", hook)
    _check_allow_chains(r, chains)
    return chains


def backend_family(chain: Chain) -> str:
    """Where a chain's rules live: the legacy filter tables (iptables and ipset share them, and the jumps of one hook
    chain run in order), or nftables' table, whose base chains at one hook run by priority."""
    return f"nftables, priority {chain.priority}" if chain.backend == "nftables" else "the legacy iptables tables"


def _check_allow_chains(r: _Reader, chains: Mapping[str, Chain]) -> None:
    """An allow chain overrules the block chains at its hooks only where its jump comes first in the same chain of
    rules: netfilter runs every table (and every nftables base chain) hooked at a point, and an accept ends only
    the one it is in. So every chain at an allow chain's hook must be of its kind of backend."""
    for chain in chains.values():
        if chain.target != "ACCEPT":
            continue
        for hook in chain.hooks:
            for other in chains.values():
                if hook in other.hooks and other.target != "ACCEPT" and backend_family(other) != backend_family(chain):
                    r.problem(f"chains.{chain.name}.hooks", f"the allow chain cannot overrule chain {other.name} at "
                              f"{hook}: that one is in {backend_family(other)}, this one in {backend_family(chain)}, "
                              "and an accept ends only the table (or base chain) it is in; put both on the same "
                              "kind of backend (and priority)", hook)


def config_warnings(cfg: Config) -> list[str]:
    """What -check_config warns of in a config that loads: rights that are wider than they look."""
    warnings = []
    for chain in cfg.chains.values():
        if chain.target != "ACCEPT":
            continue
        wide = sorted(u.name for u in cfg.users.values() if not u.read_only and "*" in u.chains)
        if wide:
            warnings.append(f"allow chain {chain.name} (target ACCEPT) is writable by {', '.join(wide)}, whose "
                            "chains pattern is '*': such a user can let any address through; name its chains instead")
    return warnings


def _check_match_and_interface(r: _Reader, key: str, values: dict[str, Any]) -> None:
    """match: destination never with INPUT; an interface only in the jumps from built-in hooks."""
    hooks = values["hooks"]
    if values["match"] == "destination" and "INPUT" in hooks:
        r.problem(f"{key}.match", "destination does not go with hook INPUT, where every packet's destination is "
                  "this host: block sources there, or destinations at OUTPUT or FORWARD", values["match"])
    interface = values["interface"]
    if interface is None:
        return
    if not hooks:
        r.problem(f"{key}.interface", "is matched in the jumps from the chain's hooks, and it has none; "
                  "match the interface in your own jump instead", interface)
    for hook in hooks:
        if hook not in FILTER_BUILTINS:
            r.problem(f"{key}.interface", f"needs built-in hooks: in a jump from the user chain {hook} it is "
                      "neither an in- nor an out-interface; match it in your own jump instead", interface)


def _check_log_file(r: _Reader, file: Path | None) -> None:
    # A missing directory is made at start (like state_dir); a missing parent is a typo.
    if file is not None and not file.parent.is_dir() and not file.parent.parent.is_dir():
        r.problem("log.file", "neither its directory nor that directory's parent exists", str(file))


# -- the sample ----------------------------------------------------------------------------------------------


SAMPLE_HEADER = """\
web-ipt-d configuration. Every key is shown with its default or an example.
Check it with:  web-ipt-d -check_config -config /etc/web-ipt-d/config.yaml
Reload it without dropping bans:  systemctl reload web-ipt-d   (or kill -HUP <pid>)
Unknown keys are errors, so a typo never silently does nothing.
Made from SCHEMA in webiptd/config.py; in a checkout, remake both copies with
  .venv/bin/python -m webiptd.config | tee etc/config.yaml > src/webiptd/sample-config.yaml"""


def sample() -> str:
    """The commented sample config that -write_config writes and etc/config.yaml holds."""
    lines = _comment(SAMPLE_HEADER, "")
    for name, node in SCHEMA.items():
        lines.append("")
        if isinstance(node, Option):
            lines += _sample_option(name, node, "")
            continue
        section = [f"{name}:"] + ([f"  {node.named}:"] if node.named else [])
        for key, opt in node.options.items():
            section += _sample_option(key, opt, "    " if node.named else "  ")
        if node.optional:  # commented out whole: the section's absence is the default
            section = [f"# {line}" for line in section]
        lines += _comment(node.help, "") + section
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in text.splitlines()]


def _sample_option(key: str, opt: Option, indent: str) -> list[str]:
    line = f"{indent}{'# ' if opt.commented else ''}{key}: {_yaml(opt.default if opt.example is None else opt.example)}"
    inline = f"{line + '   ':<37}# {opt.help}"
    if "\n" not in opt.help and len(inline) <= 110:
        return [inline]
    return _comment(opt.help, indent) + [line]


def _yaml(value: Any) -> str:
    """`value` as the sample writes it: lists in flow style, a string quoted where YAML would misread it plain."""
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(item) for item in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z/][\w/.-]*", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)  # a JSON string is a double-quoted YAML string
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)


if __name__ == "__main__":
    sys.stdout.write(sample())
