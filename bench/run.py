"""Throughput and latency of blocks and unblocks through HTTPS, against a real web-ipt-d in a private netns.

Run as root: `.venv/bin/python bench/run.py` (see bench/README.md). Prints a Markdown table; not a test.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
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
# tests.netns is the one vetted way into a private namespace; src/ lets a plain checkout run too.
for _p in (str(REPO / "src"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import yaml  # noqa: E402

from tests.netns import NetNS  # noqa: E402
from webiptd import __version__, certs  # noqa: E402

HOST = "127.0.0.1"
PORT = 8820
CHAIN = "bench"
USER = "bench"
# Entries are never contacted: they only exist as `-s` matches inside the private namespace.
# RFC 2544's benchmarking range (131,072 addresses) and RFC 5180's IPv6 one.
POOLS = {"ipv4": ipaddress.ip_network("198.18.0.0/15"), "ipv6": ipaddress.ip_network("2001:2::/48")}
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 300.0
OTHER_LOAD_WARNING = 0.25  # cores busy outside the daemon and the clients that make a run suspect


# -- measurement helpers -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of `pid` so far (proc(5), fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far: every field of proc(5)'s `cpu` line but idle and iowait."""
    with open("/proc/stat", encoding="ascii") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already counted in user/nice]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def address(family: str, index: int) -> str:
    pool = POOLS[family]
    if index >= pool.num_addresses:
        raise ValueError(f"{family} pool {pool} has only {pool.num_addresses} addresses")
    return str(pool.network_address + index)


def paths(family: str, start: int, count: int) -> list[str]:
    return [f"/chain/{CHAIN}/{family}/{address(family, i)}" for i in range(start, start + count)]


# -- client processes ----------------------------------------------------------------------


def _client_main(pipe: multiprocessing.connection.Connection) -> None:
    """One client process: one persistent HTTPS connection opened inside the namespace.

    Runs under the spawn start method, so it holds no copy of the parent's NetNS objects;
    its own NetNS handle is never closed, so it can never delete the parent's namespace.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    conn: Any = None
    headers: dict[str, str] = {}
    while True:
        msg = pipe.recv()
        kind = msg["kind"]
        try:
            if kind == "connect":
                if conn is not None:
                    conn.close()
                ns = NetNS(msg["ns"], msg["inode"])
                ctx = ssl.create_default_context(cafile=msg["cafile"])
                conn = ns.https_connection(msg["host"], msg["port"], ctx, timeout=msg["timeout"])
                headers = {"Authorization": msg["authorization"]}
                _warm(conn, headers)
                pipe.send({"ok": True, "tls": conn.sock.version(), "cipher": conn.sock.cipher()[0]})
            elif kind == "run":
                _warm(conn, headers)  # also re-opens a connection the server closed while idle
                pipe.send({"ok": True, "ready": True})
                pipe.send(_run_phase(conn, headers, msg))
            elif kind == "close":
                if conn is not None:
                    conn.close()
                    conn = None
                pipe.send({"ok": True})
            elif kind == "exit":
                if conn is not None:
                    conn.close()
                return
        except Exception as exc:  # reported to the parent, which aborts the run
            pipe.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _warm(conn: Any, headers: dict[str, str]) -> None:
    for attempt in (1, 2):
        try:
            conn.request("GET", "/version", headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET /version answered {resp.status}")
            return
        except (ConnectionError, OSError):
            conn.close()
            if attempt == 2:
                raise


def _run_phase(conn: Any, headers: dict[str, str], msg: dict[str, Any]) -> dict[str, Any]:
    method, todo, expect, must_contain = msg["method"], msg["paths"], msg["expect"], msg.get("must_contain")
    needle = must_contain.encode() if must_contain else None
    latencies: list[float] = []
    errors: list[str] = []
    perf = time.perf_counter
    # perf_counter is CLOCK_MONOTONIC on Linux, shared by every process: all clients start together.
    while (left := msg["start_at"] - perf()) > 0:
        time.sleep(min(left, 0.01))
    cpu0 = time.process_time()
    t0 = perf()
    for path in todo:
        s = perf()
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        latencies.append(perf() - s)
        if resp.status != expect or (needle is not None and needle not in body):
            if len(errors) < 5:
                errors.append(f"{method} {path} -> {resp.status} {body[:200]!r}")
            else:
                errors.append("")
    t1 = perf()
    return {"ok": True, "t0": t0, "t1": t1, "cpu": time.process_time() - cpu0,
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
               "timeout": 60.0}
        return self._ask(self._pipes, [msg] * len(self._pipes))[0]

    def run(self, clients: int, method: str, todo: Sequence[str], expect: int, must_contain: str | None = None,
            sample: Callable[[], Any] | None = None) -> tuple[list[dict[str, Any]], Any, Any]:
        """Split `todo` round-robin over `clients` processes, start them together, collect results.

        `sample` is called just as the clients start and again once the last one is done.
        """
        pipes = self._pipes[:clients]
        start_at = time.perf_counter() + 0.2 + 0.05 * clients
        msgs = [{"kind": "run", "method": method, "paths": list(todo[i::clients]), "expect": expect,
                 "must_contain": must_contain, "start_at": start_at} for i in range(clients)]
        for pipe, msg in zip(pipes, msgs):
            pipe.send(msg)
        for pipe in pipes:
            self._reply(pipe, 60.0)  # warmed up and waiting for start_at
        while (left := start_at - time.perf_counter()) > 0:
            time.sleep(left)
        before = sample() if sample else None
        timeout = 60.0 + 0.1 * len(todo)
        replies = [self._reply(pipe, timeout) for pipe in pipes]
        return replies, before, sample() if sample else None

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
    """One measured kind of request, and the rule count it must leave: N + rules_delta * --ops (None: not checked)."""

    name: str
    method: str
    expect: int
    must_contain: str | None
    fresh: bool  # the fresh addresses (else GET /version)
    rules_delta: int | None  # rules in the chain afterwards, relative to N, in units of --ops


PHASES = {
    # The HTTPS stack alone (TLS, parsing, auth cache, JSON), no firewall worker: the clients' ceiling.
    "version": Phase("version", "GET", 200, None, False, None),
    # A round trip through the worker's queue, without SQLite or a kernel commit.
    "lookup": Phase("lookup", "GET", 404, None, True, None),
    "block": Phase("block", "PUT", 201, None, True, 1),
    "unblock": Phase("unblock", "DELETE", 200, '"deleted":true', True, 0),
}


# -- targets -------------------------------------------------------------------------------


@dataclass
class Server:
    """A running server under test, as the clients and the report need it."""

    ns: NetNS
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    cafile: Path
    authorization: str
    startup_s: float
    count_rules: Callable[[], int]
    notify: NotifyReader | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int | None:
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
    default) the sender blocks, and python-systemd's notify() holds the GIL while it does, which
    freezes the whole daemon at its next STATUS= (every 10 s).
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
        while not self._ready.wait(0.2):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} before READY=1; stderr:\n"
                                   f"{stderr_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no READY=1 within {timeout:.0f} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@dataclass
class Target:
    """How to start one kind of server with `existing` entries already blocked.

    web-ipt-d with another firewall backend is another WebiptdTarget with its own
    config overrides; a baseline server is another Target subclass with its own start().
    """

    name: str
    description: str

    def start(self, ns: NetNS, workdir: Path, pki: Pki, family: str, existing: int, populate: str) -> Server:
        raise NotImplementedError


@dataclass
class WebiptdTarget(Target):
    config_overrides: dict[str, Any] = field(default_factory=dict)
    family_tool: dict[str, int] = field(default_factory=lambda: {"ipv4": 4, "ipv6": 6})

    def config(self, workdir: Path, pki: Pki) -> dict[str, Any]:
        config = {
            "listen": [f"{HOST}:{PORT}"],
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "min_version": "1.2"},
            "state_dir": str(workdir / "state"),
            "users": {USER: {"password_hash": pki.password_hash, "chains": ["*"]}},
            "chains": {CHAIN: {"hooks": ["INPUT"], "target": "DROP"}},
            "never_block": ["127.0.0.0/8", "::1/128"],
            "log": {"file": str(workdir / "web-ipt-d.log"), "level": "INFO"},
            # Idle keep-alive connections must survive the pauses between phases.
            "limits": {"request_timeout": 60},
        }
        config.update(self.config_overrides)
        return config

    def start(self, ns: NetNS, workdir: Path, pki: Pki, family: str, existing: int, populate: str) -> Server:
        config = self.config(workdir, pki)
        if populate == "state" and existing:
            write_state(Path(config["state_dir"]), family, existing)
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        # Read for as long as the daemon runs, as systemd would: it also sends STATUS= and STOPPING=1.
        notify = NotifyReader(workdir / "notify.sock")
        try:
            env = {**os.environ, "NOTIFY_SOCKET": str(notify.path),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
            t0 = time.perf_counter()
            with open(workdir / "stderr.log", "ab") as err:
                # Own session: a Ctrl-C on the terminal reaches only us; NetNS.close() stops the daemon by PID.
                proc = ns.popen([sys.executable, "-m", "webiptd", "-config", str(config_path)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
            notify.wait_ready(proc, workdir / "stderr.log")
            startup = time.perf_counter() - t0
        except BaseException:
            notify.close()
            raise
        tool = self.family_tool[family]
        return Server(ns, proc, HOST, PORT, pki.ca, pki.authorization, startup,
                      lambda: sum(1 for line in ns.iptables_save(tool).splitlines()
                                  if line.startswith(f"-A {CHAIN} ")), notify)


TARGETS: dict[str, Target] = {
    "iptables": WebiptdTarget("iptables", "web-ipt-d, python-iptables backend (one rule per address)"),
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
    password_hash: str
    authorization: str


def make_pki(directory: Path) -> Pki:
    from webiptd.auth import CRYPT_CONTEXT

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
    password_hash = CRYPT_CONTEXT.hash(password)
    authorization = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
    return Pki(*paths_, password_hash, authorization)


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
    daemon_cpu_cores: float
    host_cpu_cores: float
    first_errors: list[str]
    latencies_ms: list[float] = field(repr=False)


@dataclass
class SizeResult:
    target: str
    existing: int
    populate: str
    startup_s: float
    populate_s: float
    rss_kib_ready: int
    rss_kib_end: int
    rules_checked: dict[str, int]
    tls: str = ""


def summarise(target: str, existing: int, op: str, clients: int, replies: list[dict[str, Any]],
              daemon_cpu: float, host_cpu: float) -> PhaseResult:
    lat = sorted(x * 1000 for r in replies for x in r["latencies"])
    wall = max(r["t1"] for r in replies) - min(r["t0"] for r in replies)
    errors = [e for r in replies for e in r["errors"]]
    return PhaseResult(
        target, existing, op, clients, len(lat), len(errors), wall, len(lat) / wall if wall > 0 else math.nan,
        percentile(lat, 50), percentile(lat, 99), lat[-1] if lat else math.nan,
        sum(lat) / len(lat) if lat else math.nan,
        sum(r["cpu"] for r in replies) / wall, daemon_cpu / wall, host_cpu / wall, [e for e in errors if e][:5],
        lat,
    )


def measure(pool: ClientPool, server: Server, target: str, existing: int, phase: Phase, clients: int,
            todo: Sequence[str]) -> PhaseResult:
    def sample() -> tuple[float, float]:
        return proc_cpu_seconds(server.pid), host_busy_seconds()

    replies, (cpu0, host0), (cpu1, host1) = pool.run(clients, phase.method, todo, phase.expect,
                                                     phase.must_contain, sample)
    result = summarise(target, existing, phase.name, clients, replies, cpu1 - cpu0, host1 - host0)
    print(f"  {phase.name:8} N={existing:<6} clients={clients:<2} {result.ops_per_s:8.0f} ops/s  "
          f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors {result.errors}",
          file=sys.stderr, flush=True)
    return result


def bench_size(pool: ClientPool, target: Target, pki: Pki, workdir_root: Path, args: argparse.Namespace,
               existing: int) -> tuple[SizeResult, list[PhaseResult]]:
    family = args.family
    workdir = Path(tempfile.mkdtemp(prefix=f"{target.name}-{existing}-", dir=workdir_root))
    phases: list[PhaseResult] = []
    with NetNS.create(prefix="wbench") as ns:
        server = target.start(ns, workdir, pki, family, existing, args.populate)
        profiler: Profiler | None = None
        try:
            info = pool.connect(server)
            rss_ready = proc_rss_kib(server.pid)
            populate_s = 0.0
            if args.populate == "api" and existing:
                t0 = time.perf_counter()
                replies, _, _ = pool.run(len(pool), "PUT", paths(family, 0, existing), 201)
                populate_s = time.perf_counter() - t0
                bad = [e for r in replies for e in r["errors"] if e]
                if bad:
                    raise RuntimeError(f"populating N={existing} failed: {bad[:3]}")
            checked = {"ready": server.count_rules()}
            if checked["ready"] != existing:
                raise RuntimeError(f"expected {existing} rules after start, found {checked['ready']}")
            if args.profile is not None:
                profiler = Profiler(server.pid, args.profile / f"{target.name}-{existing}")
            fresh = paths(family, existing, args.ops)
            for clients in args.clients:
                for phase in args.phases:
                    todo = fresh if phase.fresh else ["/version"] * args.ops
                    phases.append(measure(pool, server, target.name, existing, phase, clients, todo))
                    if phase.rules_delta is not None:
                        want = existing + phase.rules_delta * args.ops
                        checked[f"after {phase.name} c={clients}"] = n = server.count_rules()
                        if n != want:
                            raise RuntimeError(f"expected {want} rules after {phase.name}, found {n}")
            if profiler is not None:
                profiler.stop()
            rss_end = proc_rss_kib(server.pid)
            pool.disconnect()
        finally:
            if profiler is not None:
                profiler.stop()
            code = server.stop()
    if code != 0:
        raise RuntimeError(f"the server exited with {code} on SIGTERM; see {workdir} (use --keep)")
    size = SizeResult(target.name, existing, args.populate, server.startup_s, populate_s, rss_ready, rss_end,
                      checked, f"{info['tls']} {info['cipher']}")
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
    try:
        import importlib.metadata as md
        iptc_version = md.version("python-iptables")
    except Exception:
        iptc_version = "?"
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg_start": loadavg(), "kernel": platform.release(),
            "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
            "python-iptables": iptc_version, "web-ipt-d": __version__}


def markdown(phases: list[PhaseResult], sizes: list[SizeResult], machine: dict[str, Any],
             args: argparse.Namespace) -> str:
    out = [
        f"web-ipt-d {machine['web-ipt-d']} benchmark: {args.ops} {args.family} addresses blocked, then the same "
        f"ones unblocked, per N; populate={args.populate}",
        "",
        f"Machine: nproc {machine['nproc']} ({machine['cpu'] or 'unknown CPU'}), kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['openssl']}, python-iptables {machine['python-iptables']}; "
        f"load average at start {machine['loadavg_start']}, at end {machine.get('loadavg_end', '?')}",
        "",
        "| target | N existing | op | clients | ops/s | p50 ms | p99 ms | client CPU | daemon CPU | host CPU | errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        out.append(f"| {p.target} | {p.existing:,} | {p.op} | {p.clients} | {p.ops_per_s:,.0f} | {p.p50_ms:.2f} | "
                   f"{p.p99_ms:.2f} | {p.client_cpu_cores:.2f} | {p.daemon_cpu_cores:.2f} | "
                   f"{p.host_cpu_cores:.2f} | {p.errors} |")
    out += [
        "",
        "CPU columns are cores busy (CPU seconds / wall seconds) during the phase: all client processes together, "
        "the daemon, and the whole machine (host minus client minus daemon = everything else running). "
        "version = GET /version (HTTPS only); lookup = GET of an unblocked address (a round trip through the "
        "firewall worker, no commit).",
    ]
    busy = [p for p in phases if p.host_cpu_cores - p.client_cpu_cores - p.daemon_cpu_cores > OTHER_LOAD_WARNING]
    if busy:
        worst = max(p.host_cpu_cores - p.client_cpu_cores - p.daemon_cpu_cores for p in busy)
        out += ["", f"**Warning:** something other than the daemon and the clients kept up to {worst:.2f} of "
                    f"{machine['nproc']} cores busy during {len(busy)} of {len(phases)} phases; on a shared machine "
                    "those figures understate what the daemon can do."]
    out += [
        "",
        "| target | N existing | start to READY=1 s | populate s | daemon RSS at READY | daemon RSS at end | TLS |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in sizes:
        out.append(f"| {s.target} | {s.existing:,} | {s.startup_s:.2f} | {s.populate_s:.2f} | "
                   f"{s.rss_kib_ready / 1024:.1f} MiB | {s.rss_kib_end / 1024:.1f} MiB | {s.tls} |")
    return "\n".join(out)


def int_list(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int_list, default=[8],
                   help="keep-alive client processes; a comma list runs each count in turn (default 8)")
    p.add_argument("--sizes", type=int_list, default=[0, 1000, 10000],
                   help="existing blocks N before measuring (default 0,1000,10000)")
    p.add_argument("--ops", type=int, default=2000, help="fresh addresses blocked, then unblocked (default 2000)")
    p.add_argument("--phases", default="version,lookup,block,unblock",
                   help="what to measure, in order, from: " + ", ".join(PHASES) + "; block needs a later "
                        "unblock (default version,lookup,block,unblock)")
    p.add_argument("--targets", default="iptables",
                   help=f"comma list of servers to measure: {', '.join(TARGETS)} (default iptables)")
    p.add_argument("--family", choices=sorted(POOLS), default="ipv4", help="address family (default ipv4)")
    p.add_argument("--populate", choices=("state", "api"), default="state",
                   help="how the N existing blocks get there: written to the state DB before start and "
                        "added by the daemon's reconcile (state, default), or PUT through the API (api)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every figure, raw latencies included")
    p.add_argument("--keep", action="store_true", help="keep each run's work dir (config, logs, state DB)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="sample the server with py-spy (pip install py-spy) during the measured phases; raw "
                        "stacks and a per-thread summary per N go to DIR (costs the server a little CPU)")
    args = p.parse_args(argv)
    if args.ops < 1 or min(args.clients) < 1:
        p.error("--ops and --clients must be at least 1")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        p.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    args.targets = names
    phase_names = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not phase_names or any(x not in PHASES for x in phase_names):
        p.error(f"--phases takes a comma list of {', '.join(PHASES)}")
    if phase_names.count("block") != phase_names.count("unblock") or (
            "block" in phase_names and phase_names.index("block") > phase_names.index("unblock")) or (
            "lookup" in phase_names and "block" in phase_names
            and phase_names.index("block") < phase_names.index("lookup") < phase_names.index("unblock")):
        p.error("--phases: block must be followed by unblock once each, with no lookup between them")
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
        print("bench/run.py needs root, iproute2 and iptables (legacy tools) to run the daemon in a private "
              "network namespace", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM both unwind through the finally blocks below, which stop what we started.
    # SIGINT is set explicitly because a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    machine = machine_info()
    root = Path(tempfile.mkdtemp(prefix="wipt-bench-", dir="/tmp"))
    pool: ClientPool | None = None
    phases: list[PhaseResult] = []
    sizes: list[SizeResult] = []
    try:
        print(f"generating the test CA and a bcrypt user in {root} ...", file=sys.stderr, flush=True)
        pki = make_pki(root)
        pool = ClientPool(max(args.clients))
        for name in args.targets:
            for existing in args.sizes:
                print(f"{name}: N={existing} (populate={args.populate})", file=sys.stderr, flush=True)
                size, got = bench_size(pool, TARGETS[name], pki, root, args, existing)
                sizes.append(size)
                phases.extend(got)
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
    print(markdown(phases, sizes, machine, args))
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        settings["phases"] = [p.name for p in args.phases]
        data = {"machine": machine, "args": settings,
                "phases": [asdict(p) for p in phases], "sizes": [asdict(s) for s in sizes]}
        args.json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
