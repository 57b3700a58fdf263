"""A fleet for tests: a private redis-server in a network namespace of its own, and web-ipt-d daemons, each in its
own namespace with its own kernel, all on one bridge in the Redis namespace (198.51.100.0/24, 2001:db8::/64).

Nothing here touches the test process's namespace: Redis is reached through sockets opened inside its namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal as signals
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import redis

from tests.harness import PKI, Daemon, Reply, base_config, stop_process
from tests.netns import NetNS, veth_pair

T = TypeVar("T")

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
REDIS_PORT = 6379
# The bridge's address in the Redis namespace; node i gets .11 + i (and 2001:db8::11 + i).
REDIS4, REDIS6 = "198.51.100.10", "2001:db8::10"
# An address on the bridge's network that nobody holds: a connect to it gets no answer (ARP fails).
NOBODY4 = "198.51.100.99"
PREFIX = "web-ipt-d:"
EVENTS = PREFIX + "events"
STATE = PREFIX + "state"
CHAIN = "f2b-web"  # shared on every node; f2b-ssh and admin-list stay local
# Each node's Redis user as docs/fleet.md tells operators to make it: the prefix's keys, the commands used.
NODE_ACL = (f"resetchannels ~{PREFIX}* -@all +@transaction +evalsha +script|load +xadd +xread +xrange "
            "+xinfo|stream +hset +hdel +hget +hgetall +hscan +get +set +ping")
# The test's own Redis user (every key); each node has a user of its own limited to the prefix's keys.
ADMIN_USER, ADMIN_PASSWORD = "tester", "tester-7Qv1x"


def node_password(name: str) -> str:
    """The Redis password of node `name`: distinctive, so a test can look for it in logs and replies."""
    return f"pw-{name}-Zr4kq9"


def wait_until(check: Callable[[], T], timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `check` until it returns something truthy (returned); AssertionError naming `what` after `timeout` s.

    The last value (or exception) seen is in the message, so a failure says how far things got.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, redis.RedisError, ValueError, KeyError, TypeError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}; last seen: {str(last)[:600]}")
        time.sleep(every)


# -- Redis ------------------------------------------------------------------------------------------------


def _ns_connection_class(ns: NetNS) -> type[redis.connection.Connection]:
    """A redis-py connection whose TCP socket is opened inside `ns` (so the test reaches 127.0.0.1 there)."""

    class NSConnection(redis.connection.Connection):
        def _connect(self) -> socket.socket:
            sock = ns.connect(self.host, self.port, timeout=self.socket_connect_timeout or 5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.socket_timeout)
            return sock

    return NSConnection


class RedisServer:
    """Debian's redis-server run in the foreground in `ns` with a private config, data dir and log in `workdir`.

    Bound to 127.0.0.1 (the test's client, redis-cli) and `addrs` (the nodes). ACL: `tester` may do anything;
    each node's user is NODE_ACL; the default user is off.
    """

    def __init__(self, ns: NetNS, workdir: Path, addrs: Sequence[str], node_names: Iterable[str],
                 appendonly: bool = False):
        self.ns = ns
        self.workdir = workdir
        self.addrs = list(addrs)
        self.node_names = list(node_names)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "redis.conf"
        self.log_path = workdir / "redis.log"
        self._client: redis.Redis | None = None

    def url(self, node: str, host: str = REDIS4) -> str:
        host = f"[{host}]" if ":" in host else host
        return f"redis://{node}:{node_password(node)}@{host}:{REDIS_PORT}/0"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"bind 127.0.0.1 {' '.join(self.addrs)}",
            f"port {REDIS_PORT}",
            "daemonize no",
            "supervised no",
            'pidfile ""',
            f"dir {self.workdir}",
            f"logfile {self.log_path}",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync always",
            "protected-mode yes",
            "user default off",
            f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all",
            *(f"user {name} on >{node_password(name)} {NODE_ACL}" for name in self.node_names),
        ]
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15) -> None:
        assert not self.running, "redis-server runs already"
        self.write_config()
        self.proc = self.ns.popen([REDIS_SERVER, str(self.conf)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{self.log()[-2000:]}")
            # Loading the AOF answers LOADING errors first; PING is true only once it serves.
            return bool(self.client().ping())

        try:
            wait_until(answers, timeout, "redis-server answers PING", every=0.02)
        except AssertionError:
            raise AssertionError(f"redis-server did not come up; log:\n{self.log()[-2000:]}") from None

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM (redis writes the AOF out and exits), by PID; SIGKILL after `timeout`."""
        self.close_client()
        if self.proc is None:
            return None
        return stop_process(self.proc, signals.SIGTERM, timeout)

    def kill9(self) -> None:
        self.close_client()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        """A redis-py client (as `tester`, decode_responses) whose connections are opened inside the namespace."""
        if self._client is None:
            self._client = self.client_as(ADMIN_USER, ADMIN_PASSWORD, decode_responses=True)
        return self._client

    def client_as(self, user: str, password: str, decode_responses: bool = False,
                  protocol: int | None = None) -> redis.Redis:
        """A new redis-py client as `user` (a node's: node_password(name)), opened inside the namespace, speaking
        RESP `protocol` (None: redis-py's default); the caller closes it."""
        pool = redis.ConnectionPool(connection_class=_ns_connection_class(self.ns), host="127.0.0.1",
                                    port=REDIS_PORT, username=user, password=password,
                                    decode_responses=decode_responses, socket_timeout=10, socket_connect_timeout=2,
                                    **({} if protocol is None else {"protocol": protocol}))
        return redis.Redis(connection_pool=pool)

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client.connection_pool.disconnect()
            self._client = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """redis-cli inside the namespace, as an operator would type it (the password through REDISCLI_AUTH)."""
        env = {**os.environ, "REDISCLI_AUTH": ADMIN_PASSWORD}
        return self.ns.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(REDIS_PORT), "--user", ADMIN_USER, *args],
                           env=env, check=check, timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- the fleet --------------------------------------------------------------------------------------------


class Fleet:
    """Redis in a namespace of its own with a bridge, and one web-ipt-d daemon per node name, each in a namespace
    of its own on a veth to that bridge.

    Every node's config is tests/harness.py's base_config() with a `fleet` section, `shared: true` on CHAIN,
    `metrics: true` for admin; `configure(name, config)` may edit it before the first start. `fleet=False` leaves
    the fleet section and the shared flag out (a plain daemon on the same network).
    """

    def __init__(self, pki: PKI, hashes: dict[str, str], backends: Sequence[str] = ("ipset", "ipset", "ipset"),
                 *, names: Sequence[str] = ("a", "b", "c"), appendonly: bool = False, retention: int = 3600,
                 fleet: bool = True, configure: Callable[[str, dict[str, Any]], None] | None = None):
        assert len(backends) == len(names)
        self.root = Path(tempfile.mkdtemp(prefix="wiptf-", dir="/tmp"))
        self.namespaces: list[NetNS] = []
        self.nodes: dict[str, Daemon] = {}
        self.addr4: dict[str, str] = {}
        try:
            self.redis_ns = self._namespace()
            self.redis_ns.run(["ip", "link", "add", "br0", "type", "bridge"])
            self.redis_ns.run(["ip", "addr", "add", f"{REDIS4}/24", "dev", "br0"])
            self.redis_ns.run(["ip", "-6", "addr", "add", f"{REDIS6}/64", "dev", "br0", "nodad"])
            self.redis_ns.run(["ip", "link", "set", "br0", "up"])
            self.redis = RedisServer(self.redis_ns, self.root / "redis", [REDIS4, REDIS6], names, appendonly)
            for i, (name, backend) in enumerate(zip(names, backends)):
                ns = self._namespace()
                addr4, addr6 = f"198.51.100.{11 + i}", f"2001:db8::{11 + i}"
                bridge_end, _ = veth_pair(self.redis_ns, ns, (), (f"{addr4}/24", f"{addr6}/64"))
                self.redis_ns.run(["ip", "link", "set", bridge_end, "master", "br0"])
                workdir = self.root / name
                workdir.mkdir()
                config = base_config(workdir, pki, hashes, backend)
                config["users"]["admin"]["metrics"] = True
                if fleet:
                    config["chains"][CHAIN]["shared"] = True
                    config["fleet"] = {"redis": self.redis.url(name), "node": name, "key_prefix": PREFIX,
                                       "retention": retention}
                if configure is not None:
                    configure(name, config)
                d = Daemon(ns, workdir, pki, config=config)
                d.name = f"node {name}"
                self.nodes[name] = d
                self.addr4[name] = addr4
        except BaseException:
            self.close()
            raise

    def _namespace(self) -> NetNS:
        ns = NetNS.create("wiptf")
        self.namespaces.append(ns)
        return ns

    def __getitem__(self, name: str) -> Daemon:
        return self.nodes[name]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, *names: str, redis_too: bool = True, timeout: float = 30) -> None:
        """Start Redis (unless it runs or not `redis_too`), then the nodes named (all by default) side by side."""
        if redis_too and not self.redis.running:
            self.redis.start()
        chosen = [self.nodes[n] for n in (names or self.nodes)]
        for d in chosen:
            d.start(wait=False)
        for d in chosen:
            d.wait_notify("READY=1", timeout=timeout)

    def stop(self, name: str, timeout: float = 30) -> int:
        """SIGTERM one node and wait for it to exit; its exit code."""
        return self.nodes[name].stop(signals.SIGTERM, timeout)

    def kill9(self, name: str) -> None:
        self.nodes[name].kill9()

    def restart(self, name: str, timeout: float = 30) -> None:
        self.nodes[name].start(timeout=timeout)

    def close(self) -> None:
        """Kill the daemons and Redis we started (by PID), delete the namespaces and the files. Idempotent."""
        for d in self.nodes.values():
            try:
                d.close()
            except Exception:  # the others still need closing
                pass
        redis_server = getattr(self, "redis", None)
        if redis_server is not None:
            try:
                redis_server.kill9()
            except Exception:
                pass
        for ns in reversed(self.namespaces):
            try:
                ns.close()
            except Exception:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -- reading a node --------------------------------------------------------------------------------

    def entries(self, name: str, chain: str = CHAIN) -> set[str]:
        """The networks `chain` holds in node `name`'s kernel, IPv4 and IPv6, as CIDR strings."""
        d = self.nodes[name]
        return d.kernel_entries(chain, 4) | d.kernel_entries(chain, 6)

    def kernel_text(self, name: str) -> str:
        """Node `name`'s sets as their tool prints them (every set, scoped ones too): `ipset list` or the
        nftables table."""
        d = self.nodes[name]
        if d.config["chains"][CHAIN].get("backend") == "nftables":
            return str(d.ns.run(["nft", "list", "table", "inet", "web-ipt-d"], check=False).stdout)
        return str(d.ns.run(["ipset", "list"]).stdout)

    def status(self, name: str) -> dict[str, Any]:
        """GET /fleet of node `name` (asserts 200)."""
        r = self.nodes[name].request("GET", "/fleet")
        assert r.status == 200, (name, r)
        body: dict[str, Any] = r.json
        return body

    def listing(self, name: str, chain: str = CHAIN) -> dict[str, dict[str, Any]]:
        """GET /chain/<chain> of node `name`: entries by (network, proto, port) text, "net" for all traffic."""
        r = self.nodes[name].request("GET", f"/chain/{chain}")
        assert r.status == 200, (name, r)
        out = {}
        for e in r.json["entries"]:
            key = e["network"] if e["proto"] is None else f"{e['network']} {e['proto']} {e['port']}"
            out[key] = e
        return out

    def metric(self, name: str, metric: str, labels: str = "") -> float | None:
        """One sample of node `name`'s /metrics (`labels` as written, say reason="refused"); None if absent."""
        r = self.nodes[name].request("GET", "/metrics")
        assert r.status == 200, (name, r)
        wanted = metric + (f"{{{labels}}}" if labels else "")
        for line in r.raw.decode().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[1])
        return None

    def caught_up(self, name: str) -> bool:
        """True when node `name` is connected and its /fleet says it has applied everything in the stream."""
        s = self.status(name)
        return bool(s["connected"] and s["lag_events"] == 0)

    def published(self, name: str) -> bool:
        """True when node `name` is connected and its outbox is empty."""
        s = self.status(name)
        return bool(s["connected"] and s["outbox"] == 0)

    def stream(self) -> list[tuple[str, dict[str, str]]]:
        """Every entry of the events stream, oldest first."""
        return list(self.redis.client().xrange(EVENTS, "-", "+"))


# -- requests ---------------------------------------------------------------------------------------------


def path(network: str, chain: str = CHAIN) -> str:
    """The API path of `network` (an address or CIDR text) in `chain`."""
    net = ipaddress.ip_network(network)
    return f"/chain/{chain}/ipv{net.version}/{net}"


def bulk(d: Daemon, items: Sequence[str], query: str = "", chain: str = CHAIN, user: str = "admin") -> Reply:
    return d.request("POST", f"/chain/{chain}{query}", user=user, body=json.dumps(list(items)).encode(),
                     headers={"Content-Type": "application/json"})


def host_range(count: int, first: str = "198.18.0.1") -> list[str]:
    """`count` consecutive IPv4 host networks (/32) from `first` (say in 198.18.0.0/15), as CIDR texts."""
    start = int(ipaddress.IPv4Address(first))
    return [f"{ipaddress.IPv4Address(start + i)}/32" for i in range(count)]


def log_lines_since(d: Daemon, offset: int) -> list[str]:
    """The lines of `d`'s log written after `offset` characters (take len(d.log()) before)."""
    return d.log()[offset:].splitlines()


def kernel_timeouts(d: Daemon, chain: str = CHAIN, family: int = 4) -> dict[str, float]:
    """On a set backend, the seconds each element of `chain` has left in the kernel, by CIDR text."""
    backend = d.config["chains"][chain].get("backend", "iptables")
    out: dict[str, float] = {}
    if backend == "ipset":
        text = d.ns.run(["ipset", "list", f"{chain}-v{family}"]).stdout
        members = text.split("Members:\n", 1)[1] if "Members:\n" in text else ""
        for line in members.splitlines():
            words = line.split()
            if "timeout" in words and words[words.index("timeout") + 1] != "0":  # 0: permanent
                out[str(ipaddress.ip_network(words[0]))] = float(words[words.index("timeout") + 1])
        return out
    if backend == "nftables":
        table = d.ns.run(["nft", "-j", "list", "table", "inet", "web-ipt-d"], check=False)
        if table.returncode != 0:
            return out
        hosts = f"{chain}-v{family}"
        for item in json.loads(table.stdout)["nftables"]:
            s = item.get("set", {})
            name = s.get("name", "")
            if name != hosts and not (name.startswith(f"{hosts}-") and name[len(hosts) + 1:].isdigit()):
                continue
            suffix = "" if name == hosts else "/" + name[len(hosts) + 1:]
            for elem in s.get("elem", []):
                if not (isinstance(elem, dict) and "elem" in elem and "expires" in elem["elem"]):
                    continue
                val = elem["elem"]["val"]
                if isinstance(val, dict) and "prefix" in val:
                    val = f"{val['prefix']['addr']}/{val['prefix']['len']}"
                out[str(ipaddress.ip_network(str(val) + ("" if "/" in str(val) else suffix)))] = \
                    float(elem["elem"]["expires"])
        return out
    raise ValueError(f"{backend} keeps no timeouts in the kernel")
