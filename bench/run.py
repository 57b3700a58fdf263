"""web-ipt-d against per-request iptables: blocks/s, unblocks/s, latency, restore, RSS and packet path.

One command, run as root: `/tmp/venv/bin/python bench/run.py` (see bench/README.md). Every server runs in a
private network namespace that this script creates and removes; the host's firewall is never touched.
Prints Markdown tables and the target checks; not a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
# tests.netns is the one vetted way into a private namespace; src/ lets a plain checkout run too.
for _p in (str(REPO / "src"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import yaml  # noqa: E402

from tests.netns import NetNS, veth_pair  # noqa: E402
from webiptd import __version__, certs  # noqa: E402

HOST = "127.0.0.1"
PORT = 8820
CHAIN = "bench"
USER = "bench"
# Entries are never contacted: they only exist as matches inside the private namespace.
# RFC 2544's benchmarking range (131,072 addresses) and RFC 5180's IPv6 one.
POOLS = {"ipv4": ipaddress.ip_network("198.18.0.0/15"), "ipv6": ipaddress.ip_network("2001:2::/48")}
# The packet-path peers: TEST-NET-2 only (this machine's own uplink is TEST-NET-1).
SERVER_ADDR, PEER_ADDR = "198.51.100.1", "198.51.100.2"
IPERF_PORT = 5201
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 300.0
# One request may take this long before a client gives up and the run fails. The baseline's `iptables-nft -D`
# at 100k rules with 16 concurrent deletes took up to 113 s here: each one re-reads the whole ruleset and
# starts again when another commit got in first.
REQUEST_TIMEOUT = 900.0
OTHER_LOAD_WARNING = 0.25  # cores busy outside the server and the clients that make a phase suspect
SET_BACKENDS = ("ipset", "nftables")

# The issue's targets (issue 4, deliverable 5), checked by `checks()`.
MIN_SET_BLOCKS = 3000  # blocks/s, 16 clients
MAX_FLAT = 1.25  # p50 at 100k / p50 at 0
MIN_RATIO = {10_000: 5.0, 100_000: 50.0}  # set backend blocks/s / baseline blocks/s
MAX_RESTORE_S = 3.0
MAX_RSS_BYTES = 80_000_000  # "80 MB", read as 10^6 bytes (76.3 MiB), the stricter reading
MAX_PACKET_LOSS = 0.10
MIN_IPTABLES_BLOCKS = 1000  # at 10k, 16 clients


# -- measurement helpers -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_cpu_seconds(pid: int) -> float:
    """CPU of every thread of `pid` so far, plus its reaped children's (proc(5), fields 14-17).

    The children count for the baseline, whose work is done by one iptables process per request.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def proc_sys_seconds(pid: int) -> float:
    """The kernel's share of proc_cpu_seconds(): system time of `pid` and its reaped children."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[12]) + int(fields[14])) / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far: every field of proc(5)'s `cpu` line but idle and iowait."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def address(family: str, index: int) -> str:
    pool = POOLS[family]
    if index >= pool.num_addresses:
        raise ValueError(f"{family} pool {pool} has only {pool.num_addresses} addresses")
    return str(pool.network_address + index)


def paths(family: str, start: int, count: int) -> list[str]:
    return [f"/chain/{CHAIN}/{family}/{address(family, i)}" for i in range(start, start + count)]


def path_address(path: str) -> str:
    return path.rpartition("/")[2]


# -- client processes ----------------------------------------------------------------------


class LeanClient:
    """One keep-alive HTTPS connection that speaks just enough HTTP/1.1 for the bench.

    http.client costs about 0.33 ms of CPU per request here; on 2 vCPUs, 16 client processes at
    1,700 requests/s then take more than half a core from the server they measure. This one sends
    prebuilt request bytes and reads the status line, Content-Length and body: about a third of that.
    """

    def __init__(self, ns: NetNS, host: str, port: int, ctx: ssl.SSLContext, authorization: str, timeout: float):
        self._ns, self._host, self._port, self._ctx, self._timeout = ns, host, port, ctx, timeout
        self._auth = authorization.encode("ascii")
        self._hostport = f"{host}:{port}".encode("ascii")
        self.sock: ssl.SSLSocket | None = None
        self._buf = b""

    def connect(self) -> None:
        self.close()
        raw = self._ns.connect(self._host, self._port, timeout=self._timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self._host)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self._buf = b""

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """(status, body); reconnects once if the server closed the idle connection before this request."""
        if self.sock is None:
            self.connect()
        # Like http.client: Content-Length: 0 on a PUT or POST without a body, nothing on the others.
        data = b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n%s\r\n" % (
            method.encode("ascii"), path.encode("ascii"), self._hostport, self._auth,
            b"Content-Length: 0\r\n" if method in ("PUT", "POST") else b"")
        try:
            assert self.sock is not None
            self.sock.sendall(data)
            return self._response()
        except (ConnectionError, EOFError):
            if self._buf:  # the server closed in the middle of a response: a real failure
                raise
            self.connect()
            assert self.sock is not None
            self.sock.sendall(data)
            return self._response()

    def _response(self) -> tuple[int, bytes]:
        assert self.sock is not None
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body_end = end + 4 + length
        while len(buf) < body_end:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection in a response body")
            buf += chunk
        body, self._buf = buf[end + 4:body_end], buf[body_end:]
        if close:
            self.close()
        return status, body


def _client_main(pipe: multiprocessing.connection.Connection) -> None:
    """One client process: one persistent HTTPS connection opened inside the namespace.

    Runs under the spawn start method, so it holds no copy of the parent's NetNS objects;
    its own NetNS handle is never closed, so it can never delete the parent's namespace.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    conn: LeanClient | None = None
    while True:
        msg = pipe.recv()
        kind = msg["kind"]
        try:
            if kind == "connect":
                if conn is not None:
                    conn.close()
                ctx = ssl.create_default_context(cafile=msg["cafile"])
                conn = LeanClient(NetNS(msg["ns"], msg["inode"]), msg["host"], msg["port"], ctx,
                                  msg["authorization"], msg["timeout"])
                _warm(conn)
                assert conn.sock is not None
                cipher = conn.sock.cipher()
                pipe.send({"ok": True, "tls": conn.sock.version(), "cipher": cipher[0] if cipher else "?"})
            elif kind == "run":
                assert conn is not None
                _warm(conn)  # also re-opens a connection the server closed while idle
                pipe.send({"ok": True, "ready": True})
                pipe.send(_run_phase(conn, msg))
            elif kind == "close":
                if conn is not None:
                    conn.close()
                pipe.send({"ok": True})
            elif kind == "exit":
                if conn is not None:
                    conn.close()
                return
        except Exception as exc:  # reported to the parent, which aborts the run
            pipe.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _warm(conn: LeanClient) -> None:
    status, _ = conn.request("GET", "/version")
    if status != 200:
        raise RuntimeError(f"GET /version answered {status}")


def _run_phase(conn: LeanClient, msg: dict[str, Any]) -> dict[str, Any]:
    """Send this client's share in order until done or past the deadline; `done` is how many were sent."""
    method, todo, expect, must_contain = msg["method"], msg["paths"], msg["expect"], msg.get("must_contain")
    deadline = msg.get("deadline")
    needle = must_contain.encode() if must_contain else None
    latencies: list[float] = []
    errors: list[str] = []
    perf = time.perf_counter
    request = conn.request
    # perf_counter is CLOCK_MONOTONIC on Linux, shared by every process: all clients start together.
    while (left := msg["start_at"] - perf()) > 0:
        time.sleep(min(left, 0.01))
    cpu0 = time.process_time()
    t0 = perf()
    for path in todo:
        s = perf()
        if deadline is not None and s >= deadline:
            break
        status, body = request(method, path)
        latencies.append(perf() - s)
        if status != expect or (needle is not None and needle not in body):
            if len(errors) < 5:
                errors.append(f"{method} {path} -> {status} {body[:200]!r}")
            else:
                errors.append("")
    t1 = perf()
    return {"ok": True, "t0": t0, "t1": t1, "cpu": time.process_time() - cpu0, "done": len(latencies),
            "latencies": latencies, "errors": errors}


class ClientPool:
    """`size` client processes; each phase uses the first `clients` of them."""

    def __init__(self, size: int):
        ctx = multiprocessing.get_context("spawn")
        self._procs: list[Any] = []
        self._pipes: list[multiprocessing.connection.Connection] = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child,), name=f"bench-client-{i}", daemon=True)
            proc.start()
            child.close()
            self._procs.append(proc)
            self._pipes.append(parent)

    def __len__(self) -> int:
        return len(self._procs)

    def _ask(self, pipes: Sequence[multiprocessing.connection.Connection], msgs: Sequence[dict[str, Any]],
             timeout: float = 120.0) -> list[dict[str, Any]]:
        for pipe, msg in zip(pipes, msgs):
            pipe.send(msg)
        return [self._reply(pipe, timeout) for pipe in pipes]

    def _reply(self, pipe: multiprocessing.connection.Connection, timeout: float) -> dict[str, Any]:
        if not pipe.poll(timeout):
            raise RuntimeError(f"a client process did not answer within {timeout:.0f} s")
        reply = pipe.recv()
        if not reply.get("ok"):
            raise RuntimeError(f"a client process failed: {reply.get('error')}")
        return reply

    def connect(self, server: Server) -> dict[str, Any]:
        msg = {"kind": "connect", "ns": server.ns.name, "inode": server.ns.inode, "cafile": str(server.cafile),
               "host": server.host, "port": server.port, "authorization": server.authorization,
               "timeout": REQUEST_TIMEOUT}
        return self._ask(self._pipes, [msg] * len(self._pipes))[0]

    def run(self, clients: int, method: str, todo: Sequence[str], expect: int, must_contain: str | None = None,
            budget: float | None = None, sample: Callable[[], Any] | None = None
            ) -> tuple[list[dict[str, Any]], list[str], Any, Any]:
        """Deal `todo` round-robin to `clients` processes, start them together, collect results.

        With `budget` (seconds), a client sends no request after start + budget. Returns the replies,
        the paths actually sent, and `sample()` as the clients start and once the last one is done.
        """
        pipes = self._pipes[:clients]
        start_at = time.perf_counter() + 0.2 + 0.05 * clients
        deadline = None if budget is None else start_at + budget
        shares = [list(todo[i::clients]) for i in range(clients)]
        for pipe, share in zip(pipes, shares):
            pipe.send({"kind": "run", "method": method, "paths": share, "expect": expect,
                       "must_contain": must_contain, "start_at": start_at, "deadline": deadline})
        for pipe in pipes:
            self._reply(pipe, 60.0)  # warmed up and waiting for start_at
        while (left := start_at - time.perf_counter()) > 0:
            time.sleep(left)
        before = sample() if sample else None
        # A request in flight at the deadline still completes; at the slowest (the baseline deleting at 100k
        # rules with 16 clients) they queue behind each other for a minute or two.
        timeout = (budget if budget is not None else 0.1 * len(todo)) + REQUEST_TIMEOUT
        replies = [self._reply(pipe, timeout) for pipe in pipes]
        sent = [p for share, r in zip(shares, replies) for p in share[:r["done"]]]
        return replies, sent, before, sample() if sample else None

    def disconnect(self) -> None:
        self._ask(self._pipes, [{"kind": "close"}] * len(self._pipes))

    def close(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(Exception):
                pipe.send({"kind": "exit"})
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()  # by PID: only processes this pool started
                proc.join(5)
        for pipe in self._pipes:
            pipe.close()


# -- phases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    method: str
    expect: int
    must_contain: str | None


PHASES = {
    # The HTTPS stack alone (TLS, parsing, auth cache, JSON), no firewall worker: the clients' ceiling.
    "version": Phase("version", "GET", 200, None),
    # A round trip through the worker's queue, without SQLite or a kernel commit (web-ipt-d only).
    "lookup": Phase("lookup", "GET", 404, None),
    "block": Phase("block", "PUT", 201, None),
    "unblock": Phase("unblock", "DELETE", 200, '"deleted":true'),
}


# -- servers -------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server under test, as the clients and the report need it."""

    ns: NetNS
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    cafile: Path
    authorization: str
    startup_s: float  # process start to READY=1
    populate_s: float  # putting the N existing entries in place before the start (state DB, iptables-restore)
    count: Callable[[], int]  # entries the kernel holds for the chain
    # Removes entries without timing them (leftovers of an unblock phase cut by its budget); None: through the API.
    remove: Callable[[list[str]], None] | None = None
    notify: NotifyReader | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the server (by PID, only if it is still our unreaped child); its exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
                    return None
            return self.proc.returncode
        finally:
            if self.notify is not None:
                self.notify.close()


class NotifyReader:
    """The NOTIFY_SOCKET end systemd would hold (sd_notify(3)): waits for READY=1, then keeps reading.

    It must keep reading: once a datagram socket's queue is full (net.unix.max_dgram_qlen, 10 by
    default) the sender blocks, which froze the daemon at its next STATUS= before it sent notifications
    from a non-blocking socket; systemd reads promptly, and so do we.
    """

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self._sock.recv(4096).decode(errors="replace")
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(msg)
            if "READY=1" in msg.split("\n"):
                self._ready.set()

    def wait_ready(self, proc: subprocess.Popen[bytes], stderr_path: Path, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.01):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} before READY=1; stderr:\n"
                                   f"{stderr_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no READY=1 within {timeout:.0f} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


def start_process(ns: NetNS, argv: list[str], workdir: Path, env: dict[str, str]) -> tuple[
        subprocess.Popen[bytes], NotifyReader, float]:
    """Start `argv` in `ns` with a NOTIFY_SOCKET we read; wait for READY=1. Returns (proc, reader, seconds)."""
    notify = NotifyReader(workdir / "notify.sock")
    try:
        env = {**os.environ, **env, "NOTIFY_SOCKET": str(notify.path)}
        t0 = time.perf_counter()
        with open(workdir / "stderr.log", "ab") as err:
            # Own session: a Ctrl-C on the terminal reaches only us; NetNS.close() stops it by PID.
            proc = ns.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
        notify.wait_ready(proc, workdir / "stderr.log")
        return proc, notify, time.perf_counter() - t0
    except BaseException:
        notify.close()
        raise


@dataclass
class Target:
    """One kind of server: how to start it with `existing` entries already in place."""

    name: str
    description: str

    def unavailable(self) -> str | None:
        """Why this target cannot run on this host; None when it can."""
        return None

    def start(self, ns: NetNS, workdir: Path, pki: Pki, family: str, existing: int) -> Server:
        raise NotImplementedError


@dataclass
class WebiptdTarget(Target):
    """The real daemon, `python -m webiptd`, with one chain on the given backend."""

    backend: str = "iptables"
    src: Path = REPO / "src"  # --src: run the daemon from another tree, to measure a proposed change

    def unavailable(self) -> str | None:
        if self.backend == "iptables":
            return None
        module = f"webiptd.firewall.{self.backend}"
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
        needs = {"ipset": (None, "ipset"), "nftables": ("nftables", "nft")}[self.backend]
        if needs[0] is not None and importlib.util.find_spec(needs[0]) is None:
            return f"the Python module {needs[0]} is not importable (see bench/README.md)"
        if shutil.which(needs[1]) is None:
            return f"the {needs[1]} command is missing"
        return None

    def config(self, workdir: Path, pki: Pki) -> dict[str, Any]:
        return {
            "listen": [f"{HOST}:{PORT}"],
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "min_version": "1.2"},
            "state_dir": str(workdir / "state"),
            "users": {USER: {"password_hash": pki.password_hash, "chains": ["*"]}},
            "chains": {CHAIN: {"hooks": ["INPUT"], "target": "DROP", "backend": self.backend}},
            "never_block": ["127.0.0.0/8", "::1/128"],
            "log": {"file": str(workdir / "web-ipt-d.log"), "level": "INFO"},
            # Idle keep-alive connections must survive the pauses between phases.
            "limits": {"request_timeout": 120},
        }

    def start(self, ns: NetNS, workdir: Path, pki: Pki, family: str, existing: int) -> Server:
        config = self.config(workdir, pki)
        t0 = time.perf_counter()
        if existing:
            write_state(Path(config["state_dir"]), family, existing)
        populate_s = time.perf_counter() - t0
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(self.src), os.environ.get("PYTHONPATH")]))}
        proc, notify, startup = start_process(ns, [sys.executable, "-m", "webiptd", "-config", str(config_path)],
                                              workdir, env)
        version = 4 if family == "ipv4" else 6
        return Server(ns, proc, HOST, PORT, pki.ca, pki.authorization, startup, populate_s,
                      lambda: count_entries(ns, self.backend, version), None, notify)


def count_entries(ns: NetNS, backend: str, version: int) -> int:
    """How many networks the kernel blocks in the bench chain (the names tests/conftest.py's kernel_entries uses)."""
    if backend == "iptables":
        return sum(1 for line in ns.iptables_save(version).splitlines() if line.startswith(f"-A {CHAIN} -s "))
    if backend == "ipset":
        out = ns.run(["ipset", "list", "-t", f"{CHAIN}-v{version}"]).stdout
        found = re.search(r"^Number of entries: (\d+)$", out, re.M)
        if found is None:
            raise RuntimeError(f"cannot read the size of set {CHAIN}-v{version}: {out!r}")
        return int(found.group(1))
    if backend == "nftables":
        doc = json.loads(ns.run(["nft", "-j", "list", "set", "inet", "web-ipt-d", f"{CHAIN}-v{version}"]).stdout)
        return sum(len(item.get("set", {}).get("elem", [])) for item in doc["nftables"])
    raise ValueError(backend)


@dataclass
class BaselineTarget(Target):
    """bench/baseline.py: one `iptables -w -I/-D` process per request. Its N rules come from one iptables-restore."""

    iptables: str = "iptables"

    def tool(self, version: int, suffix: str = "") -> str:
        name = self.iptables if version == 4 else self.iptables.replace("iptables", "ip6tables", 1)
        return name + suffix

    def variant(self) -> str:
        path = shutil.which(self.iptables)
        return os.path.basename(os.path.realpath(path)) if path else "missing"

    def unavailable(self) -> str | None:
        for suffix in ("", "-save", "-restore"):
            if shutil.which(self.tool(4, suffix)) is None:
                return f"{self.tool(4, suffix)} is missing"
        return None

    def start(self, ns: NetNS, workdir: Path, pki: Pki, family: str, existing: int) -> Server:
        version = 4 if family == "ipv4" else 6
        script = ["*filter", f":{CHAIN} - [0:0]", f"-A INPUT -j {CHAIN}"]
        script += [f"-A {CHAIN} -s {address(family, i)} -j DROP" for i in range(existing)]
        t0 = time.perf_counter()
        ns.run([self.tool(version, "-restore"), "--noflush"], input="\n".join(script + ["COMMIT", ""]),
               timeout=600)
        populate_s = time.perf_counter() - t0
        argv = [sys.executable, str(BENCH / "baseline.py"), "--listen", f"{HOST}:{PORT}", "--cert",
                str(pki.server_cert), "--key", str(pki.server_key), "--user", USER, "--chain", CHAIN,
                "--iptables", self.iptables]
        proc, notify, startup = start_process(ns, argv, workdir, {"BASELINE_PASSWORD": pki.password})

        def count() -> int:
            out = ns.run([self.tool(version, "-save"), "-t", "filter"], timeout=600).stdout
            return sum(1 for line in out.splitlines() if line.startswith(f"-A {CHAIN} -s "))

        def remove(todo: list[str]) -> None:
            lines = [f"-D {CHAIN} -s {path_address(p)} -j DROP" for p in todo]
            ns.run([self.tool(version, "-restore"), "--noflush"], input="\n".join(["*filter", *lines, "COMMIT", ""]),
                   timeout=600)

        return Server(ns, proc, HOST, PORT, pki.ca, pki.authorization, startup, populate_s, count, remove, notify)


TARGETS: dict[str, Target] = {
    "baseline": BaselineTarget("baseline", "bench/baseline.py: stdlib HTTPS, one `iptables -w -I/-D` process "
                                           "per request, as the Go web-ipt-d, rfw and fail2ban do"),
    "iptables": WebiptdTarget("iptables", "web-ipt-d, python-iptables backend (one rule per network)",
                              backend="iptables"),
    "ipset": WebiptdTarget("ipset", "web-ipt-d, ipset backend (hash:net set through netlink)", backend="ipset"),
    "nftables": WebiptdTarget("nftables", "web-ipt-d, nftables backend (sets through libnftables)",
                              backend="nftables"),
}


def write_state(state_dir: Path, family: str, count: int) -> None:
    """Record `count` permanent blocks in the state DB, through the daemon's own Store."""
    from webiptd.commands import Entry
    from webiptd.state import Store

    store = Store(state_dir)
    try:
        now = time.time()
        store.write([Entry(CHAIN, ipaddress.ip_network(address(family, i)), "DROP", now, None, "bench")
                     for i in range(count)], [], [])
    finally:
        store.close()


# -- PKI and user --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    password: str
    password_hash: str
    authorization: str


def make_pki(directory: Path) -> Pki:
    from webiptd.passwords import context as crypt_context

    ca, ca_key = certs.make_ca("web-ipt-d bench CA")
    server, server_key = certs.issue(ca, ca_key, "localhost", ["localhost", HOST, "::1"])
    pki_dir = directory / "pki"
    pki_dir.mkdir()
    paths_ = (pki_dir / "ca.crt", pki_dir / "server.crt", pki_dir / "server.key")
    certs.write_cert(paths_[0], ca)
    certs.write_cert(paths_[1], server)
    certs.write_key(paths_[2], server_key)
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    # A real bcrypt hash at the default cost: the daemon's auth cache makes it a one-off per client.
    password_hash = crypt_context().hash(password)
    authorization = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
    return Pki(*paths_, password, password_hash, authorization)


# -- packet path ---------------------------------------------------------------------------


@dataclass
class PacketResult:
    target: str
    existing: int
    tcp_bps: float  # best run
    udp_sent_pps: float
    udp_received_pps: float
    runs: dict[str, list[float]]  # every run, in order, to show the noise


def packet_stage(target: Target, pki: Pki, workdir_root: Path, args: argparse.Namespace,
                 sizes: Sequence[int]) -> list[PacketResult]:
    """iperf3 from a peer that is not blocked into the server's namespace, at each of `sizes` side by side.

    One namespace per N, each with its server running and N entries in place, and its own peer namespace
    on a veth pair (198.51.100.2 -> 198.51.100.1). Every packet walks the chain's INPUT hook and misses.
    The runs alternate between the sizes (TCP at each N, then 64-byte UDP at each N, repeated), so a
    burst of other load on the machine hits both sides alike; the best run of each counts.
    """
    iperf = shutil.which("iperf3")
    if iperf is None:
        print("no packet path: iperf3 is missing (apt-get install iperf3)", file=sys.stderr)
        return []
    seconds, family = args.packet_seconds, args.family
    with contextlib.ExitStack() as stack:
        servers: dict[int, NetNS] = {}
        for existing in sizes:
            workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-packets-{existing}-", dir=workdir_root))
            ns = stack.enter_context(NetNS.create(prefix="wpkt"))
            server = target.start(ns, workdir, pki, family, existing)
            stack.callback(server.stop)
            peer = stack.enter_context(NetNS.create(prefix="wpeer"))
            veth_pair(ns, peer, (f"{SERVER_ADDR}/24",), (f"{PEER_ADDR}/24",))
            iperf_server = ns.popen([iperf, "-s", "-B", SERVER_ADDR, "-p", str(IPERF_PORT)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(stop_child, iperf_server)
            deadline = time.monotonic() + 10
            while f"{SERVER_ADDR}:{IPERF_PORT}" not in ns.run(["ss", "-Hltn"]).stdout:
                if iperf_server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the iperf3 server did not start")
                time.sleep(0.05)
            if server.count() != existing:
                raise RuntimeError(f"expected {existing} entries in the packet-path namespace")
            servers[existing] = peer
        print(f"  packet path at N={', '.join(f'{n:,}' for n in sizes)}: iperf3 TCP and 64-byte UDP, "
              f"{seconds:g} s a run, {args.packet_repeats} rounds", file=sys.stderr, flush=True)
        client = [iperf, "-c", SERVER_ADDR, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
        runs: dict[int, dict[str, list[float]]] = {n: {"tcp_bps": [], "udp_sent_pps": [], "udp_received_pps": []}
                                                   for n in sizes}
        for _ in range(args.packet_repeats):
            for existing, peer in servers.items():
                tcp = json.loads(peer.run(client, timeout=seconds + 120).stdout)
                runs[existing]["tcp_bps"].append(tcp["end"]["sum_received"]["bits_per_second"])
            for existing, peer in servers.items():
                udp = json.loads(peer.run([*client, "-u", "-l", "64", "-b", "0"], timeout=seconds + 120).stdout)
                sent, received = udp["end"]["sum_sent"], udp["end"]["sum_received"]
                runs[existing]["udp_sent_pps"].append(sent["packets"] / sent["seconds"])
                runs[existing]["udp_received_pps"].append(received["bytes"] / 64 / received["seconds"])
    results = [PacketResult(target.name, n, max(r["tcp_bps"]), max(r["udp_sent_pps"]), max(r["udp_received_pps"]), r)
               for n, r in runs.items()]
    for r in results:
        print(f"  N={r.existing:<7,} TCP {r.tcp_bps / 1e9:6.2f} Gb/s   UDP 64 B received {r.udp_received_pps / 1e3:6.1f} "
              f"kpps, sent {r.udp_sent_pps / 1e3:6.1f} kpps", file=sys.stderr, flush=True)
    return results


def stop_child(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL, one process we started (by PID, only while it is our unreaped child)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the run -------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    target: str
    existing: int
    op: str
    clients: int
    ops: int
    errors: int
    wall_s: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    client_cpu_cores: float
    server_cpu_cores: float
    host_cpu_cores: float
    cut_by_budget: bool
    first_errors: list[str]
    latencies_ms: list[float] = field(repr=False)
    server_sys_cores: float = math.nan  # the kernel's share of server_cpu_cores


@dataclass
class SizeResult:
    target: str
    existing: int
    populate: str
    populate_s: float
    startup_s: float
    rss_kib_ready: int
    rss_kib_end: int
    rss_kib_peak: int
    counts_checked: dict[str, int]
    tls: str = ""


def summarise(target: str, existing: int, op: str, clients: int, replies: list[dict[str, Any]], asked: int,
              server_cpu: float, host_cpu: float, server_sys: float = math.nan) -> PhaseResult:
    lat = sorted(x * 1000 for r in replies for x in r["latencies"])
    wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
    errors = [e for r in replies for e in r["errors"]]
    return PhaseResult(
        target, existing, op, clients, len(lat), len(errors), wall, len(lat) / wall if wall > 0 else math.nan,
        percentile(lat, 50), percentile(lat, 99), lat[-1] if lat else math.nan,
        sum(lat) / len(lat) if lat else math.nan,
        sum(r["cpu"] for r in replies) / wall, server_cpu / wall, host_cpu / wall, len(lat) < asked,
        [e for e in errors if e][:5], lat, server_sys / wall,
    )


def measure(pool: ClientPool, server: Server, target: str, existing: int, phase: Phase, clients: int,
            todo: Sequence[str], budget: float) -> tuple[PhaseResult, list[str]]:
    def sample() -> tuple[float, float, float]:
        return proc_cpu_seconds(server.pid), host_busy_seconds(), proc_sys_seconds(server.pid)

    replies, sent, (cpu0, host0, sys0), (cpu1, host1, sys1) = pool.run(
        clients, phase.method, todo, phase.expect, phase.must_contain, budget, sample)
    result = summarise(target, existing, phase.name, clients, replies, len(todo), cpu1 - cpu0, host1 - host0,
                       sys1 - sys0)
    per_op = result.server_cpu_cores / result.ops_per_s * 1000 if result.ops_per_s > 0 else math.nan
    sys_op = result.server_sys_cores / result.ops_per_s * 1000 if result.ops_per_s > 0 else math.nan
    print(f"  {phase.name:8} N={existing:<6} clients={clients:<2} {result.ops:6} ops {result.ops_per_s:8.0f} ops/s  "
          f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  server CPU {per_op:.3f} ms/op "
          f"({sys_op:.3f} of it in the kernel)  errors {result.errors}"
          f"{'  (cut by the time budget)' if result.cut_by_budget else ''}", file=sys.stderr, flush=True)
    return result, sent


def bench_size(pool: ClientPool, target: Target, pki: Pki, workdir_root: Path, args: argparse.Namespace,
               existing: int) -> tuple[SizeResult, list[PhaseResult]]:
    family = args.family
    workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-{existing}-", dir=workdir_root))
    phases: list[PhaseResult] = []
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, workdir, pki, family, existing)
        print(f"  ready: populate {server.populate_s:.2f} s, start to READY=1 {server.startup_s:.2f} s",
              file=sys.stderr, flush=True)
        profiler: Profiler | None = None
        try:
            rss_ready = proc_status_kib(server.pid, "VmRSS")
            info = pool.connect(server)
            checked = {"ready": server.count()}
            if checked["ready"] != existing:
                raise RuntimeError(f"expected {existing} entries after start, found {checked['ready']}")
            if args.profile is not None:
                profiler = Profiler(server.pid, args.profile / f"{target.name}-{existing}")
            fresh = paths(family, existing, args.ops)
            for clients in args.clients:
                blocked: list[str] = []
                for phase in args.phases:
                    if phase.name == "version":
                        todo = ["/version"] * args.ops
                    elif phase.name == "unblock":
                        todo = blocked
                    else:
                        todo = fresh
                    if phase.name == "lookup" and isinstance(target, BaselineTarget):
                        continue  # the baseline has no lookup
                    result, sent = measure(pool, server, target.name, existing, phase, clients, todo, args.budget)
                    phases.append(result)
                    if phase.name == "block":
                        blocked = sent
                        checked[f"after block c={clients}"] = n = server.count()
                        if n != existing + len(sent):
                            raise RuntimeError(f"expected {existing + len(sent)} entries after block, found {n}")
                    elif phase.name == "unblock":
                        unblocked = set(sent)
                        left = [p for p in blocked if p not in unblocked]
                        if left:  # cut by the budget: take the rest away untimed, so the next phase starts at N
                            print(f"  removing the {len(left)} blocks the budget left, untimed", file=sys.stderr)
                            if server.remove is not None:
                                server.remove(left)
                            else:
                                pool.run(len(pool), "DELETE", left, 200, '"deleted":true')
                        checked[f"after unblock c={clients}"] = n = server.count()
                        if n != existing:
                            raise RuntimeError(f"expected {existing} entries after unblock, found {n}")
            if profiler is not None:
                profiler.stop()
            rss_end = proc_status_kib(server.pid, "VmRSS")
            rss_peak = proc_status_kib(server.pid, "VmHWM")
            pool.disconnect()
        finally:
            if profiler is not None:
                profiler.stop()
            code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with {code} on SIGTERM; see {workdir} (use --keep)")
    populate = "iptables-restore" if isinstance(target, BaselineTarget) else "state DB"
    size = SizeResult(target.name, existing, populate, server.populate_s, server.startup_s, rss_ready, rss_end,
                      rss_peak, checked, f"{info['tls']} {info['cipher']}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return size, phases


class Profiler:
    """py-spy sampling the server during the measured phases; raw stacks plus a per-thread summary.

    --nonblocking keeps the target running while it is sampled, so figures drop only a little;
    threads blocked in a system call (waiting on a socket, a future or fsync) are not sampled.
    """

    def __init__(self, pid: int, out: Path):
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out.with_suffix(".txt")
        self._err = open(out.with_suffix(".stderr"), "wb")
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads", "--nonblocking",
             "--output", str(self.out)], stdout=subprocess.DEVNULL, stderr=self._err)
        time.sleep(1.0)  # let it attach before the first phase starts
        if self._proc.poll() is not None:
            self._err.close()
            raise RuntimeError(f"py-spy failed: {out.with_suffix('.stderr').read_text(errors='replace')}")

    def stop(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._err.close()
        if self.out.exists():
            summary = self.out.with_suffix(".summary.txt")
            summary.write_text(profile_summary(self.out.read_text()), encoding="utf-8")
            print(f"  profile: {self.out} and {summary}", file=sys.stderr)


def profile_summary(raw: str, top: int = 25) -> str:
    """Per thread (connection threads pooled): share of samples, then the functions most often on the stack
    (inclusive) and at its top (self). Waits py-spy could not tell from work (Condition.wait, SSL reads) show up
    too; read them as "waiting for the worker" and "waiting for the next request"."""
    threads: dict[str, int] = {}
    inclusive: dict[tuple[str, str], int] = {}
    leaf: dict[tuple[str, str], int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        head, *frames = stack.split(";")
        name = head.partition(": ")[2] or head
        name = "conn-*" if name.startswith("conn-") else name
        threads[name] = threads.get(name, 0) + n
        total += n
        for func in {f.partition(" (")[0] for f in frames} - {"Thread._bootstrap", "Thread._bootstrap_inner",
                                                              "Thread.run"}:
            inclusive[(name, func)] = inclusive.get((name, func), 0) + n
        if frames:
            leaf[(name, frames[-1])] = leaf.get((name, frames[-1]), 0) + n
    if not total:
        return "no samples\n"
    out = [f"{total} samples"]
    out += [f"{100 * n / total:5.1f}%  thread {t}" for t, n in sorted(threads.items(), key=lambda x: -x[1])]
    for title, table in (("on the stack (inclusive)", inclusive), ("at the top of the stack (self)", leaf)):
        out.append(f"functions {title}, top {top}:")
        out += [f"{100 * n / total:5.1f}%  {t:16} {f}" for (t, f), n in sorted(table.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(out) + "\n"


# -- the report ----------------------------------------------------------------------------


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    import importlib.metadata as md
    for dist in ("python-iptables",):
        try:
            versions[dist] = md.version(dist)
        except Exception:
            versions[dist] = "-"
    tools = {}
    for tool, flag in (("iptables", "-V"), ("ipset", "-v"), ("nft", "-v"), ("iperf3", "-v")):
        try:
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10).stdout.strip()
            tools[tool] = out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            tools[tool] = "missing"
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_start": loadavg(), "kernel": platform.release(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION, **versions, "tools": tools,
            "web-ipt-d": __version__}


def find(phases: list[PhaseResult], target: str, existing: int, op: str, clients: int) -> PhaseResult | None:
    for p in phases:
        if (p.target, p.existing, p.op, p.clients) == (target, existing, op, clients):
            return p
    return None


def find_size(sizes: list[SizeResult], target: str, existing: int) -> SizeResult | None:
    return next((s for s in sizes if (s.target, s.existing) == (target, existing)), None)


def find_packets(packets: list[PacketResult], target: str, existing: int) -> PacketResult | None:
    return next((p for p in packets if (p.target, p.existing) == (target, existing)), None)


def checks(phases: list[PhaseResult], sizes: list[SizeResult], packets: list[PacketResult],
           args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The issue's targets: (what, the figures, met / NOT MET / not measured)."""
    out: list[tuple[str, str, str]] = []
    big, c16 = 100_000, 16

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**NOT MET**")

    for backend in (t for t in args.targets if t in SET_BACKENDS):
        rows = [r for n in args.sizes if (r := find(phases, backend, n, "block", c16)) is not None]
        out.append((f"{backend}: >= {MIN_SET_BLOCKS:,} blocks/s with 16 clients, at every N",
                    ", ".join(f"{r.ops_per_s:,.0f} at N={r.existing:,}" for r in rows) or "-",
                    verdict(all(r.ops_per_s >= MIN_SET_BLOCKS for r in rows) if rows else None)))
        for op in ("block", "unblock"):
            lo, hi = find(phases, backend, 0, op, c16), find(phases, backend, big, op, c16)
            ok, figure = None, "-"
            if lo is not None and hi is not None:
                ok = hi.p50_ms <= MAX_FLAT * lo.p50_ms
                figure = f"{hi.p50_ms:.2f} / {lo.p50_ms:.2f} ms = {hi.p50_ms / lo.p50_ms:.2f}"
            out.append((f"{backend}: flat, p50 {op} at 100k <= {MAX_FLAT} x p50 at 0 (16 clients)", figure,
                        verdict(ok)))
        for n, need in MIN_RATIO.items():
            mine, base = find(phases, backend, n, "block", c16), find(phases, "baseline", n, "block", c16)
            ok, figure = None, "-"
            if mine is not None and base is not None:
                ok = mine.ops_per_s >= need * base.ops_per_s
                figure = (f"{mine.ops_per_s:,.0f} / {base.ops_per_s:,.1f} blocks/s = "
                          f"{mine.ops_per_s / base.ops_per_s:,.1f} x")
            out.append((f"{backend}: >= {need:g} x the baseline's blocks/s at N={n:,} (16 clients)", figure,
                        verdict(ok)))
        s = find_size(sizes, backend, big)
        out.append((f"{backend}: 100k restored at start in <= {MAX_RESTORE_S:g} s (process start to READY=1)",
                    "-" if s is None else f"{s.startup_s:.2f} s", verdict(None if s is None else
                                                                          s.startup_s <= MAX_RESTORE_S)))
        if s is None:
            out.append((f"{backend}: RSS <= 80 MB at 100k", "-", verdict(None)))
        else:
            rss = max(s.rss_kib_ready, s.rss_kib_end) * 1024
            out.append((f"{backend}: RSS <= 80 MB at 100k (larger of READY and end)",
                        f"{rss / 1e6:.1f} MB ({rss / 2**20:.1f} MiB); peak during restore "
                        f"{s.rss_kib_peak * 1024 / 1e6:.1f} MB", verdict(rss <= MAX_RSS_BYTES)))
        empty, full = find_packets(packets, backend, 0), find_packets(packets, backend, big)
        for key, label in (("tcp_bps", "TCP"), ("udp_received_pps", "UDP 64 B received")):
            a: float | None = getattr(empty, key) if empty else None
            b: float | None = getattr(full, key) if full else None
            ok, figure = None, "-"
            if a and b:
                ok = b >= (1 - MAX_PACKET_LOSS) * a
                figure = f"{b / a:.1%} of empty"
            out.append((f"{backend}: non-blocked {label} at 100k within 10% of empty", figure, verdict(ok)))
    if "iptables" in args.targets:
        r = find(phases, "iptables", 10_000, "block", c16)
        out.append((f"iptables: >= {MIN_IPTABLES_BLOCKS:,} blocks/s at N=10,000 (16 clients)",
                    "-" if r is None else f"{r.ops_per_s:,.0f}",
                    verdict(None if r is None else r.ops_per_s >= MIN_IPTABLES_BLOCKS)))
    return out


def markdown(phases: list[PhaseResult], sizes: list[SizeResult], packets: list[PacketResult],
             machine: dict[str, Any], args: argparse.Namespace) -> str:
    baseline = TARGETS["baseline"]
    assert isinstance(baseline, BaselineTarget)
    out = [
        f"web-ipt-d {machine['web-ipt-d']} against the baseline: up to {args.ops:,} fresh {args.family} addresses "
        f"blocked, then the same ones unblocked, per N and client count; each phase stops sending after "
        f"{args.budget:g} s. Run time {machine.get('run_s', 0) / 60:.1f} min.",
        "",
        f"Machine: nproc {machine['nproc']} ({machine['cpu'] or 'unknown CPU'}), kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['openssl']}, python-iptables {machine['python-iptables']}, "
        f"{machine['tools']['iptables']}, {machine['tools']['nft']}, "
        f"{machine['tools']['ipset']}; baseline command `{baseline.iptables}` ({baseline.variant()}); "
        f"load average at start {machine['loadavg_start']}, at end {machine.get('loadavg_end', '?')}.",
        "",
        "Targets: " + "; ".join(f"**{t}**: {TARGETS[t].description}" for t in args.targets) + ".",
        "",
        "| target | N | clients | op | ops | ops/s | p50 ms | p99 ms | server cores | server CPU ms/op | "
        "host cores | errors |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        per_op = p.server_cpu_cores / p.ops_per_s * 1000 if p.ops_per_s > 0 else math.nan
        out.append(f"| {p.target} | {p.existing:,} | {p.clients} | {p.op} | {p.ops:,}{'*' if p.cut_by_budget else ''} "
                   f"| {p.ops_per_s:,.{1 if p.ops_per_s < 100 else 0}f} | {p.p50_ms:,.2f} | {p.p99_ms:,.2f} | "
                   f"{p.server_cpu_cores:.2f} | {per_op:,.2f} | {p.host_cpu_cores:.2f} | {p.errors} |")
    out += [
        "",
        f"ops: requests measured; * = the phase hit its {args.budget:g} s budget before all {args.ops:,} were sent. "
        "ops/s: requests / wall time from the common start to the last response. p50/p99: per-request latency, "
        "nearest rank. Server cores: CPU seconds of the server process (every thread, and its reaped children: the "
        "baseline's iptables processes) per wall second; server CPU ms/op: the same per request. Host cores: the whole "
        "machine, clients included (2 would be everything on this 2-vCPU machine).",
    ]
    busy = [p for p in phases if p.host_cpu_cores - p.client_cpu_cores - p.server_cpu_cores > OTHER_LOAD_WARNING
            and p.target != "baseline"]
    if busy:
        worst = max(p.host_cpu_cores - p.client_cpu_cores - p.server_cpu_cores for p in busy)
        out += ["", f"**Warning:** something other than the server and the clients kept up to {worst:.2f} of "
                    f"{machine['nproc']} cores busy during {len(busy)} web-ipt-d phases (kernel work on behalf of the "
                    "server counts there too); on a shared machine those figures understate what it can do."]
    # Ratios against the baseline.
    rows = []
    for t in (t for t in args.targets if t != "baseline"):
        for n in args.sizes:
            for clients in args.clients:
                for op in ("block", "unblock"):
                    mine, base = find(phases, t, n, op, clients), find(phases, "baseline", n, op, clients)
                    if mine and base and base.ops_per_s > 0:
                        rows.append(f"| {t} | {n:,} | {clients} | {op} | {mine.ops_per_s:,.0f} | "
                                    f"{base.ops_per_s:,.1f} | **{mine.ops_per_s / base.ops_per_s:,.1f} x** | "
                                    f"{base.p50_ms / mine.p50_ms:,.1f} x |")
    if rows:
        out += ["", "Against the baseline (same N, clients and op):", "",
                "| target | N | clients | op | ops/s | baseline ops/s | throughput ratio | p50 latency ratio "
                "(baseline / target) |", "|---|---:|---:|---|---:|---:|---:|---:|", *rows]
    out += [
        "",
        "Start, restore and memory:",
        "",
        "| target | N | N put in place by | that took s | process start to READY=1 s | RSS at READY MiB "
        "| RSS at end MiB | peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sizes:
        out.append(f"| {s.target} | {s.existing:,} | {s.populate} | {s.populate_s:.2f} | {s.startup_s:.2f} | "
                   f"{s.rss_kib_ready / 1024:.1f} | {s.rss_kib_end / 1024:.1f} | {s.rss_kib_peak / 1024:.1f} |")
    out += ["", "For web-ipt-d, start to READY=1 is the restore: the N entries are in the state DB and the "
                "namespace's kernel is empty, so the daemon's reconcile adds all N before READY=1. For the baseline, "
                "the N rules were put in place by one iptables-restore before it started."]
    if packets:
        out += ["", f"Packet path for a peer that is not blocked: iperf3 from {PEER_ADDR} to {SERVER_ADDR} over a "
                    "veth pair, into the server's namespace through the chain's INPUT hook, with the server running "
                    f"and N entries in place; the sizes side by side, runs alternating, best of {args.packet_repeats} "
                    f"runs of {args.packet_seconds:g} s:", "",
                "| target | N | TCP Gb/s | UDP 64 B received kpps | UDP 64 B sent kpps | TCP vs N=0 "
                "| UDP received vs N=0 | every run: TCP Gb/s; UDP received kpps |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for pk in packets:
            empty = find_packets(packets, pk.target, 0)
            rel = [f"{getattr(pk, k) / getattr(empty, k):.0%}" if empty and pk.existing and getattr(empty, k) else ""
                   for k in ("tcp_bps", "udp_received_pps")]
            every = (", ".join(f"{v / 1e9:.1f}" for v in pk.runs["tcp_bps"]) + "; "
                     + ", ".join(f"{v / 1e3:.0f}" for v in pk.runs["udp_received_pps"]))
            out.append(f"| {pk.target} | {pk.existing:,} | {pk.tcp_bps / 1e9:.2f} | {pk.udp_received_pps / 1e3:.1f} | "
                       f"{pk.udp_sent_pps / 1e3:.1f} | {rel[0]} | {rel[1]} | {every} |")
    out += ["", "Target checks (issue 4):", "", "| target | measured | result |", "|---|---|---|"]
    out += [f"| {what} | {figure} | {result} |" for what, figure, result in checks(phases, sizes, packets, args)]
    return "\n".join(out)


def plot(phases: list[PhaseResult], args: argparse.Namespace, path: Path) -> bool:
    """p50 latency against N, per target, block and unblock; needs matplotlib (imported only here)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed; `{sys.executable} -m pip install matplotlib` to get {path}",
              file=sys.stderr)
        return False
    sizes = sorted(args.sizes)
    colours = {"baseline": "tab:red", "iptables": "tab:orange", "ipset": "tab:blue", "nftables": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, op in zip(axes, ("block", "unblock")):
        for t in args.targets:
            for clients, style in zip(sorted(args.clients, reverse=True), ("-", "--", ":", "-.")):
                pts = [(i, r.p50_ms) for i, n in enumerate(sizes) if (r := find(phases, t, n, op, clients))]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", color=colours.get(t),
                            label=f"{t}, {clients} clients")
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
        ax.set_xlabel("entries already blocked (N)")
        ax.set_title(f"{op}: p50 latency through HTTPS")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("p50 latency, ms (log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("web-ipt-d backends against one `iptables -w` process per request (baseline)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the command ---------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


QUICK = {"sizes": [0, 10_000], "ops": 600, "budget": 4.0, "packet_seconds": 1.0, "packet_repeats": 1}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (about 2 minutes): N=0,10k, 600 ops, 4 s budgets, 1 s packet runs, no plot "
                        "unless --plot; explicit options still win")
    p.add_argument("--targets",
                   help=f"comma list from {', '.join(TARGETS)}; by default all, skipping set backends this checkout "
                        "or host lacks (named explicitly, a missing one is an error)")
    p.add_argument("--baseline-iptables", default="iptables", choices=("iptables", "iptables-nft", "iptables-legacy"),
                   help="the command the baseline runs per request (default iptables, the host's: iptables-nft on "
                        "Debian 12)")
    p.add_argument("--clients", type=int_list, default=[4, 16], help="keep-alive client processes (default 4,16)")
    p.add_argument("--sizes", type=int_list, help="existing entries N (default 0,10000,100000)")
    p.add_argument("--ops", type=int, help="fresh addresses per block phase, unblocked after (default 3000)")
    p.add_argument("--budget", type=float, help="seconds after which a phase sends no more requests (default 10)")
    p.add_argument("--phases", default="block,unblock",
                   help="what to measure, in order, from: " + ", ".join(PHASES) + " (default block,unblock)")
    p.add_argument("--family", choices=sorted(POOLS), default="ipv4", help="address family (default ipv4)")
    p.add_argument("--packets", choices=("ends", "all", "none"), default="ends",
                   help="packet-path runs at the smallest and largest N (ends, default), every N, or none")
    p.add_argument("--packet-seconds", type=float, help="length of one iperf3 run (default 3)")
    p.add_argument("--packet-repeats", type=int, help="iperf3 runs per test, best counts (default 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure, raw latencies included")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help=f"p50 latency against N (default {BENCH / 'latency.png'} for a full run; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    p.add_argument("--src", type=Path, metavar="DIR",
                   help="run web-ipt-d from this source tree (say a scratch copy with a proposed change) instead of "
                        "this checkout's src/")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir (config, logs, state DB)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample web-ipt-d with py-spy (pip install py-spy) during the measured phases; raw stacks and "
                        "a per-thread summary per target and N go to DIR (costs the server a little CPU)")
    args = p.parse_args(argv)
    defaults = {"sizes": [0, 10_000, 100_000], "ops": 3000, "budget": 10.0, "packet_seconds": 3.0,
                "packet_repeats": 2}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    if args.plot is None and not args.quick:
        args.plot = BENCH / "latency.png"
    if args.no_plot:
        args.plot = None
    if args.ops < 1 or min(args.clients) < 1 or args.budget <= 0 or args.packet_repeats < 1:
        p.error("--ops, --clients, --budget and --packet-repeats must be positive")
    args.sizes = sorted(set(args.sizes))
    args.clients = sorted(set(args.clients))
    TARGETS["baseline"].iptables = args.baseline_iptables  # type: ignore[attr-defined]
    if args.src is not None:
        if not (args.src / "webiptd" / "__init__.py").is_file():
            p.error(f"--src {args.src}: no webiptd package there")
        for target in TARGETS.values():
            if isinstance(target, WebiptdTarget):
                target.src = args.src.resolve()
    explicit = args.targets is not None
    names = [t.strip() for t in (args.targets or ",".join(TARGETS)).split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    args.skipped = {}
    for name in list(names):
        reason = TARGETS[name].unavailable()
        if reason is not None:
            if explicit:
                p.error(f"target {name} cannot run here: {reason}")
            args.skipped[name] = reason
            names.remove(name)
    args.targets = names
    phase_names = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not phase_names or any(x not in PHASES for x in phase_names) or len(set(phase_names)) != len(phase_names):
        p.error(f"--phases takes a comma list of {', '.join(PHASES)}, each at most once")
    if ("block" in phase_names) != ("unblock" in phase_names) or (
            "block" in phase_names and phase_names.index("block") > phase_names.index("unblock")) or (
            "lookup" in phase_names and "block" in phase_names
            and phase_names.index("block") < phase_names.index("lookup") < phase_names.index("unblock")):
        p.error("--phases: block must be followed by unblock, with no lookup between them")
    args.phases = [PHASES[x] for x in phase_names]
    pool = POOLS[args.family]
    if max(args.sizes) + args.ops > pool.num_addresses:
        p.error(f"the largest N plus --ops must fit in the {pool} pool ({pool.num_addresses} addresses)")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables-legacy-save") is None:
        print("bench/run.py needs root, iproute2 and iptables (legacy tools) to run the servers in private "
              "network namespaces", file=sys.stderr)
        return 2
    for name, reason in args.skipped.items():
        print(f"skipping target {name}: {reason}", file=sys.stderr)
    # Ctrl-C and SIGTERM both unwind through the finally blocks below, which stop what we started.
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    machine = machine_info()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="wipt-bench-", dir="/tmp"))
    pool: ClientPool | None = None
    phases: list[PhaseResult] = []
    sizes: list[SizeResult] = []
    packets: list[PacketResult] = []
    packet_sizes = {"ends": sorted({args.sizes[0], args.sizes[-1]}), "all": args.sizes, "none": []}[args.packets]
    try:
        print(f"generating the test CA and a bcrypt user in {root} ...", file=sys.stderr, flush=True)
        pki = make_pki(root)
        pool = ClientPool(max(args.clients))
        for name in args.targets:
            for existing in args.sizes:
                print(f"{name}: N={existing:,}  [{(time.monotonic() - started) / 60:.1f} min]", file=sys.stderr,
                      flush=True)
                size, got = bench_size(pool, TARGETS[name], pki, root, args, existing)
                sizes.append(size)
                phases.extend(got)
            if packet_sizes:
                packets += packet_stage(TARGETS[name], pki, root, args, packet_sizes)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        if pool is not None:
            pool.close()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    machine["loadavg_end"] = loadavg()
    machine["run_s"] = time.monotonic() - started
    print(markdown(phases, sizes, packets, machine, args))
    if args.plot is not None and plot(phases, args, args.plot):
        print(f"plot: {args.plot}", file=sys.stderr)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        settings["phases"] = [p.name for p in args.phases]
        data = {"machine": machine, "args": settings, "phases": [asdict(p) for p in phases],
                "sizes": [asdict(s) for s in sizes], "packets": [asdict(p) for p in packets],
                "checks": [dict(zip(("target", "measured", "result"), c))
                           for c in checks(phases, sizes, packets, args)]}
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
