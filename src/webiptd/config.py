"""The YAML config, loaded into frozen dataclasses and fully validated at load.

A reload builds a new `Config` and swaps one reference; nothing here is ever mutated.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

from webiptd import passwords

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PATH = Path("/etc/web-ipt-d/config.yaml")

# iptables(8): a user chain name is at most 28 characters; we also keep to a
# shell- and URL-safe alphabet so a name never needs quoting or escaping.
CHAIN_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,28}\Z")
USER_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
# Names iptables reserves for built-in chains and targets.
RESERVED_CHAIN_NAMES = frozenset(
    {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING",
     "ACCEPT", "DROP", "REJECT", "RETURN", "QUEUE", "LOG", "NFQUEUE"}
)
FILTER_BUILTINS = ("INPUT", "FORWARD", "OUTPUT")
TARGETS = ("DROP", "REJECT")
BACKENDS = ("iptables", "ipset", "nftables")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class ConfigError(Exception):
    """Every problem found in a config, one line each, each naming its key."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


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
    # A verified client certificate whose subject CN names a user logs in as that user, without Basic.
    client_cert_auth: bool = False


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str = field(repr=False)
    chains: tuple[str, ...]
    allow_from: tuple[Network, ...]
    read_only: bool

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
    backend: str = "iptables"
    maxelem: int = 1_048_576  # ipset and nftables: the most entries a set holds, per family
    priority: int = -10  # nftables: the base chain's priority (the filter table's is 0)


@dataclass(frozen=True)
class Log:
    file: Path | None
    level: str


@dataclass(frozen=True)
class Limits:
    max_connections: int = 128  # connection slots for clients outside trusted_clients
    request_timeout: float = 10.0  # for each read of a body and each write of a response
    worker_timeout: float = 5.0
    auth_failures: int = 10
    auth_window: int = 60
    max_bulk_items: int = 10_000
    kernel_check: float = 5.0  # seconds between looks at whether the kernel still has every block
    max_connections_per_client: int = 8  # of max_connections, per IPv4 address or IPv6 /64
    trusted_clients: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    trusted_connections: int = 32  # slots only trusted_clients may use, with no per-client cap among them
    handshake_timeout: float = 5.0  # for the whole TLS handshake
    header_timeout: float = 10.0  # for the whole request line and header section
    idle_timeout: float = 15.0  # for a keep-alive connection waiting for its next request


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
    log: Log
    limits: Limits
    # Built at load so a bad cert is a load error and a reload rotates it.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def protected_by(self, network: Network) -> Network | None:
        """The never_block network that `network` overlaps, if any."""
        for protected in self.never_block:
            if protected.version == network.version and protected.overlaps(network):
                return protected
        return None


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


def compact(network: Network) -> Network:
    """Drop the per-instance `hosts` that CPython's ipaddress gives a /32 or /128 (a closure) and a /31 or /127.

    A /32 IPv4Network then takes 192 bytes instead of 494 (bench/README.md); nothing here calls hosts().
    `del`, not `__dict__.pop`, which would materialise the instance dict.
    """
    try:
        del network.hosts
    except AttributeError:
        pass
    return network


def parse_stored_network(text: str) -> Network:
    """A network as the state DB stores it (str() of one): about 4x faster than ip_network() for IPv4."""
    address, _, prefix = text.partition("/")
    try:
        if address.count(".") == 3 and prefix.isdigit():
            return compact(ipaddress.IPv4Network((int.from_bytes(socket.inet_aton(address), "big"), int(prefix))))
        if ":" in address and "%" not in address and prefix.isdigit():
            return compact(ipaddress.IPv6Network(
                (int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), int(prefix))))
    except OSError:
        pass
    return compact(ipaddress.ip_network(text, strict=True))


def parse_network(text: Any) -> Network:
    if not isinstance(text, str):
        raise ValueError("expected a network in CIDR notation")
    return ipaddress.ip_network(text, strict=True)


def build_ssl_context(tls: TLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.load_verify_locations(cafile=str(tls.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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

    def take(self, key: str, value: Any, convert: Callable[[Any], Any], default: Any) -> Any:
        if value is None:
            return default
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            self.problem(key, str(exc), value)
            return default

    def path(self, value: Any) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise ValueError("expected a file path")
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def item(self, key: str, value: Any, convert: Callable[[Any], Any]) -> Any:
        """A list element: an empty (null) one is a problem, never silently dropped (allow_from: [null])."""
        if value is None:
            self.problem(key, "an empty list item", value)
            return None
        return self.take(key, value, convert, None)

    def readable_file(self, key: str, value: Any) -> Path | None:
        p: Path | None = self.take(key, value, self.path, None)
        if p is not None and not os.access(p, os.R_OK):
            self.problem(key, "file is missing or unreadable", str(p))
        return p


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


def _chain_name(value: Any) -> str:
    if not isinstance(value, str) or not CHAIN_NAME_RE.match(value):
        raise ValueError("a chain name is 1 to 28 letters, digits, '-' or '_'")
    return value


def _str_list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


TOP_KEYS = dict.fromkeys(
    ["listen", "tls", "plain_http", "state_dir", "users", "chains", "never_block", "log", "limits"]
)
TLS_KEYS = dict.fromkeys(["cert", "key", "min_version", "client_ca", "client_cert_auth"])
USER_KEYS = dict.fromkeys(["password_hash", "chains", "allow_from", "read_only"])
CHAIN_KEYS = dict.fromkeys(["hooks", "target", "backend", "maxelem", "priority"])
LOG_KEYS = dict.fromkeys(["file", "level"])
LIMIT_KEYS = dict.fromkeys(["max_connections", "max_connections_per_client", "trusted_clients", "trusted_connections",
                            "handshake_timeout", "header_timeout", "idle_timeout", "request_timeout",
                            "worker_timeout", "auth_failures", "auth_window", "max_bulk_items", "kernel_check"])


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


def from_mapping(raw: Any, path: Path) -> Config:
    r = _Reader(path.parent if path.parent != Path("") else Path("."))
    top = r.mapping("", raw, TOP_KEYS)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(path, r.problems)

    listen_raw = top.get("listen", "[::]:8820")
    listen_items = listen_raw if isinstance(listen_raw, list) else [listen_raw]
    listen = tuple(
        x for i, item in enumerate(listen_items)
        if (x := r.take(f"listen[{i}]" if isinstance(listen_raw, list) else "listen",
                        item, parse_listen, None)) is not None
    )
    if not listen:
        r.problem("listen", "at least one listen address is needed", listen_raw)

    plain_http = r.take("plain_http", top.get("plain_http"), _bool, False)
    if plain_http and any(not item.is_loopback for item in listen):
        r.problem("plain_http", "plain HTTP is allowed only when every listen address is loopback",
                  [str(x) for x in listen])

    tls: TLS | None = None
    ssl_context: ssl.SSLContext | None = None
    tls_raw = r.mapping("tls", top.get("tls"), TLS_KEYS)
    if not plain_http:
        if not tls_raw:
            r.problem("tls", "TLS is required (cert and key) unless plain_http is true on loopback", show=False)
        else:
            for name in ("cert", "key"):
                if tls_raw.get(name) is None:
                    r.problem(f"tls.{name}", "is required", show=False)
            cert = r.readable_file("tls.cert", tls_raw.get("cert"))
            key_file = r.readable_file("tls.key", tls_raw.get("key"))
            min_version = r.take("tls.min_version", _yaml_version(tls_raw.get("min_version")),
                                 _choice(TLS_VERSIONS), "1.2")
            client_ca = r.readable_file("tls.client_ca", tls_raw.get("client_ca"))
            if client_ca is not None and not any(p.startswith("tls.client_ca") for p in r.problems):
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(client_ca))
                except (ssl.SSLError, OSError, ValueError) as exc:
                    r.problem("tls.client_ca", f"does not load as PEM CA certificates: {exc}", str(client_ca))
            client_cert_auth = r.take("tls.client_cert_auth", tls_raw.get("client_cert_auth"), _bool, False)
            if client_cert_auth and tls_raw.get("client_ca") is None:
                r.problem("tls.client_cert_auth", "needs tls.client_ca: only a certificate that CA signed "
                          "and the handshake verified can stand in for a password", show=False)
            if cert is not None and key_file is not None:
                tls = TLS(cert, key_file, min_version, client_ca, client_cert_auth)
                if not any(p.startswith(("tls.cert", "tls.key", "tls.client_ca")) for p in r.problems):
                    try:
                        ssl_context = build_ssl_context(tls)
                    except (ssl.SSLError, OSError, ValueError) as exc:
                        r.problem("tls.cert", f"certificate and key do not load together: {exc}",
                                  f"{cert}, {key_file}")

    state_dir = r.take("state_dir", top.get("state_dir"), r.path, Path("/var/lib/web-ipt-d"))
    if not state_dir.is_dir() and not state_dir.parent.is_dir():
        r.problem("state_dir", "neither the directory nor its parent exists", str(state_dir))

    chains: dict[str, Chain] = {}
    for name, body in r.mapping("chains", top.get("chains"), None).items():
        key = f"chains.{name}"
        if r.take(key, name, _chain_name, None) is None:
            continue
        if name in RESERVED_CHAIN_NAMES:
            r.problem(key, "is a name iptables reserves for a built-in chain or target", name)
            continue
        b = r.mapping(key, body, CHAIN_KEYS)
        hooks_raw = r.take(f"{key}.hooks", b.get("hooks", ["INPUT"]), _str_list, [])
        hooks = []
        for i, h in enumerate(hooks_raw):
            hook = r.item(f"{key}.hooks[{i}]", h, _chain_name)
            if hook is not None:
                if hook in RESERVED_CHAIN_NAMES and hook not in FILTER_BUILTINS:
                    r.problem(f"{key}.hooks[{i}]", "is not a chain of the filter table; use INPUT, FORWARD, "
                              "OUTPUT or a user chain", hook)
                elif hook == name:
                    r.problem(f"{key}.hooks[{i}]", "a chain cannot jump to itself", hook)
                elif hook not in hooks:
                    hooks.append(hook)
        target = r.take(f"{key}.target", b.get("target"), _choice(TARGETS), "DROP")
        backend = r.take(f"{key}.backend", b.get("backend"), _choice(BACKENDS), "iptables")
        maxelem = r.take(f"{key}.maxelem", b.get("maxelem"), _int_range(1, 2**31 - 1), Chain.maxelem)
        priority = r.take(f"{key}.priority", b.get("priority"), _int_range(-400, 400), Chain.priority)
        if "maxelem" in b and backend == "iptables":
            r.problem(f"{key}.maxelem", "applies only to the ipset and nftables backends", b["maxelem"])
        if "priority" in b and backend != "nftables":
            r.problem(f"{key}.priority", "applies only to the nftables backend", b["priority"])
        if backend == "nftables":
            for i, hook in enumerate(hooks):
                if hook not in FILTER_BUILTINS:
                    r.problem(f"{key}.hooks[{i}]", "an nftables chain hooks INPUT, FORWARD or OUTPUT", hook)
        chains[name] = Chain(name, tuple(hooks), target, backend, maxelem, priority)
    for chain in chains.values():
        for hook in chain.hooks:
            if hook in chains:
                r.problem(f"chains.{chain.name}.hooks", "a hook must not be another managed chain", hook)

    users: dict[str, User] = {}
    for name, body in r.mapping("users", top.get("users"), None).items():
        key = f"users.{name}"
        if not USER_NAME_RE.match(name):
            r.problem(key, "a user name is 1 to 64 letters, digits, '.', '-' or '_'", name)
            continue
        b = r.mapping(key, body, USER_KEYS)
        pw = b.get("password_hash")
        if not isinstance(pw, str) or not pw:
            r.problem(f"{key}.password_hash", "is required: make one with `web-ipt-d -hash_password`", show=False)
        elif not passwords.well_formed(pw):
            r.problem(f"{key}.password_hash", "is not a supported hash (bcrypt, argon2, sha512_crypt, sha256_crypt, "
                      "pbkdf2_sha256); make one with `web-ipt-d -hash_password`", show=False)
        patterns = r.take(f"{key}.chains", b.get("chains", []), _str_list, [])
        good_patterns = []
        for i, p in enumerate(patterns):
            if not isinstance(p, str) or not re.fullmatch(r"[A-Za-z0-9_\-*?\[\]!]{1,64}", p):
                r.problem(f"{key}.chains[{i}]", "expected a chain name or glob pattern", p)
            else:
                good_patterns.append(p)
        allow = r.take(f"{key}.allow_from", b.get("allow_from", []), _str_list, [])
        nets = tuple(n for i, item in enumerate(allow)
                     if (n := r.item(f"{key}.allow_from[{i}]", item, parse_network)) is not None)
        read_only = r.take(f"{key}.read_only", b.get("read_only"), _bool, False)
        users[name] = User(name, pw if isinstance(pw, str) else "", tuple(good_patterns), nets, read_only)

    nb_raw = r.take("never_block", top.get("never_block", ["127.0.0.0/8", "::1/128"]), _str_list, [])
    never_block = tuple(n for i, item in enumerate(nb_raw)
                        if (n := r.item(f"never_block[{i}]", item, parse_network)) is not None)

    log_raw = r.mapping("log", top.get("log"), LOG_KEYS)
    log_file = (r.take("log.file", log_raw.get("file", "/var/log/web-ipt-d/web-ipt-d.log"), r.path, None)
                if log_raw.get("file", "") is not None else None)
    if log_file is not None and not log_file.parent.is_dir() and not log_file.parent.parent.is_dir():
        # A missing directory is made at start (like state_dir); a missing parent is a typo.
        r.problem("log.file", "neither its directory nor that directory's parent exists", str(log_file))
    level = r.take("log.level", log_raw.get("level"), _choice(LOG_LEVELS), "INFO")

    lim = r.mapping("limits", top.get("limits"), LIMIT_KEYS)
    d = Limits()
    tc_raw = r.take("limits.trusted_clients", lim.get("trusted_clients", [str(n) for n in d.trusted_clients]),
                    _str_list, [])
    trusted_clients = tuple(n for i, item in enumerate(tc_raw)
                            if (n := r.item(f"limits.trusted_clients[{i}]", item, parse_network)) is not None)
    limits = Limits(
        max_connections=r.take("limits.max_connections", lim.get("max_connections"), _int_range(1, 10000),
                               d.max_connections),
        max_connections_per_client=r.take("limits.max_connections_per_client", lim.get("max_connections_per_client"),
                                          _int_range(1, 10000), d.max_connections_per_client),
        trusted_clients=trusted_clients,
        trusted_connections=r.take("limits.trusted_connections", lim.get("trusted_connections"), _int_range(0, 10000),
                                   d.trusted_connections),
        handshake_timeout=r.take("limits.handshake_timeout", lim.get("handshake_timeout"), _seconds(0, 3600),
                                 d.handshake_timeout),
        header_timeout=r.take("limits.header_timeout", lim.get("header_timeout"), _seconds(0, 3600), d.header_timeout),
        idle_timeout=r.take("limits.idle_timeout", lim.get("idle_timeout"), _seconds(0, 3600), d.idle_timeout),
        request_timeout=r.take("limits.request_timeout", lim.get("request_timeout"), _seconds(0, 3600),
                               d.request_timeout),
        worker_timeout=r.take("limits.worker_timeout", lim.get("worker_timeout"), _seconds(0, 600), d.worker_timeout),
        auth_failures=r.take("limits.auth_failures", lim.get("auth_failures"), _int_range(1, 100000), d.auth_failures),
        auth_window=r.take("limits.auth_window", lim.get("auth_window"), _int_range(1, 86400), d.auth_window),
        max_bulk_items=r.take("limits.max_bulk_items", lim.get("max_bulk_items"), _int_range(1, 1_000_000),
                              d.max_bulk_items),
        kernel_check=r.take("limits.kernel_check", lim.get("kernel_check"), _seconds(0, 86400), d.kernel_check),
    )

    if r.problems:
        raise ConfigError(path, r.problems)
    return Config(
        path=path, listen=listen, tls=tls, plain_http=plain_http, state_dir=state_dir,
        users=MappingProxyType(users), chains=MappingProxyType(chains), never_block=never_block,
        log=Log(log_file, level), limits=limits, ssl_context=ssl_context,
    )



def _yaml_version(value: Any) -> Any:
    # An unquoted 1.2 in YAML is a float; accept it as the string it was meant to be.
    return str(value) if isinstance(value, float) else value
