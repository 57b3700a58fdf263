"""Bounded connection floods for tests/test_attack.py and bench/attack.py, and the legitimate client they
measure: silent TCP connections and slow request heads over finished TLS handshakes from many bound source
addresses (run as `python -m tests.flood` inside a namespace), and Debian's slowhttptest. Every flood ends
by itself after its duration, when told to, or when the process that started it goes away.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import errno
import http.client
import ipaddress
import json
import math
import os
import re
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

if TYPE_CHECKING:
    from tests.netns import NetNS

REPO = Path(__file__).resolve().parent.parent
# Floods only ever come from, and go to, TEST-NET-2 and the IPv6 documentation prefix: never the
# machine's uplink (TEST-NET-1 on the test machines) or anything real.
FLOOD_NETWORKS = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/32"))
KINDS = ("silent", "heads")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # ip(7); not in every Python
CONNECT_TIMEOUT = 10.0  # a connect that hangs longer (SYNs dropped by a full backlog) is given up and retried
REPORT_EVERY = 0.5


def check_flood_address(address: str) -> str:
    if not any(ipaddress.ip_address(address) in net for net in FLOOD_NETWORKS):
        raise ValueError(f"{address} is outside {', '.join(map(str, FLOOD_NETWORKS))}; floods stay there")
    return address


def source_addresses(count: int, first: int = 10, prefix: str = "198.51.100.") -> list[str]:
    """`count` attacker addresses, 198.51.100.<first> onwards (10-209 by default: clear of .1, .2 and .250)."""
    if first < 1 or count < 1 or first + count > 255:
        raise ValueError(f"198.51.100.{first} + {count} does not fit in the /24")
    return [check_flood_address(f"{prefix}{first + i}") for i in range(count)]


def add_addresses(ns: NetNS, ifname: str, addresses: Iterable[str]) -> None:
    """Put each address on `ifname` in `ns` as a /32 (/128), in one `ip -batch` process."""
    lines = []
    for addr in addresses:
        check_flood_address(addr)
        if ":" in addr:
            lines.append(f"-6 addr add {addr}/128 dev {ifname} nodad")
        else:
            lines.append(f"addr add {addr}/32 dev {ifname}")
    ns.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n")


@contextlib.contextmanager
def preferred_source(ns: NetNS, ifname: str, destination: str, source: str) -> Iterator[None]:
    """Within the block, connections from `ns` to `destination` that do not bind() leave from `source`.

    For tools that cannot bind (slowhttptest): a host route with `src` (ip-route(8)) in the peer namespace only.
    """
    check_flood_address(destination)
    check_flood_address(source)
    bits = 128 if ":" in destination else 32
    ns.run(["ip", "route", "replace", f"{destination}/{bits}", "dev", ifname, "src", source])
    try:
        yield
    finally:
        ns.run(["ip", "route", "del", f"{destination}/{bits}", "dev", ifname], check=False)


# -- the flood engine: one process, one selector, every connection non-blocking ------------

IDLE, CONNECTING, HANDSHAKING, HOLDING = range(4)


class _Slot:
    __slots__ = ("index", "source", "sock", "state", "since", "next_send", "pending", "lines", "up")

    def __init__(self, index: int, source: str):
        self.index, self.source = index, source
        self.sock: Any = None
        self.state = IDLE
        self.since = 0.0
        self.next_send = 0.0
        self.pending = b""
        self.lines = 0
        self.up = False  # has reached HOLDING at least once


class Flood:
    """Keeps `connections` connections to (host, port), slot i bound to sources[i % len(sources)].

    silent: connect and send nothing. heads: finish a TLS handshake, send a request line and a Host header,
    then one more header line every `interval` s, never the blank line that ends the head. A connection the
    server closes (or answers) is reopened; all (re)connects together are paced to `rate` a second.
    """

    def __init__(self, kind: str, host: str, port: int, sources: Sequence[str], connections: int,
                 rate: float = 250.0, interval: float = 2.0, duration: float = 60.0,
                 server_hostname: str = "localhost"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if connections < 1 or rate <= 0 or interval <= 0 or duration <= 0 or not sources:
            raise ValueError("connections, rate, interval, duration and sources must be positive")
        self.kind, self.host, self.port = kind, check_flood_address(host), port
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.slots = [_Slot(i, check_flood_address(sources[i % len(sources)])) for i in range(connections)]
        self.rate, self.interval, self.duration = rate, interval, duration
        self.server_hostname = server_hostname
        # An attacker does not check certificates; that also keeps the client side of a handshake cheap.
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.sel = selectors.DefaultSelector()
        self.counts: collections.Counter[str] = collections.Counter()
        self.max_held = 0
        self.stopping = False
        self._idle: collections.deque[_Slot] = collections.deque(self.slots)

    def stop(self) -> None:
        self.stopping = True

    def stats(self, started: float) -> dict[str, Any]:
        states = collections.Counter(s.state for s in self.slots)
        held = states[HOLDING]
        self.max_held = max(self.max_held, held)
        return {"kind": self.kind, "elapsed": round(time.monotonic() - started, 2), "slots": len(self.slots),
                "connecting": states[CONNECTING], "handshaking": states[HANDSHAKING], "held": held,
                "max_held": self.max_held, "slots_up": sum(s.up for s in self.slots),
                "cpu_s": round(time.process_time(), 2), **self.counts}

    def run(self, report: Callable[[dict[str, Any]], None], stop_fd: int | None = None) -> dict[str, Any]:
        started = last_report = last_fill = time.monotonic()
        deadline = started + self.duration
        tokens = 1.0
        next_timers = started
        if stop_fd is not None:
            self.sel.register(stop_fd, selectors.EVENT_READ, None)
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= deadline:
                    break
                # Pace (re)connects; a burst of at most a tenth of a second's worth.
                tokens = min(tokens + (now - last_fill) * self.rate, max(1.0, self.rate / 10))
                last_fill = now
                while tokens >= 1 and self._idle:
                    tokens -= 1
                    self._connect(self._idle.popleft(), now)
                if now >= next_timers:  # not on every wake-up: under churn the loop wakes thousands of times a second
                    next_timers = now + 0.05
                    self._timers(now)
                wait = 0.05 if self._idle else 0.1
                for key, events in self.sel.select(wait):
                    if key.data is None:  # our stdin: EOF means whoever started us is gone
                        if not os.read(key.fd, 4096):
                            self.stopping = True
                        continue
                    self._event(key.data, events)
                if now - last_report >= REPORT_EVERY:
                    last_report = now
                    report(self.stats(started))
        finally:
            final = self.stats(started)
            for slot in self.slots:
                if slot.sock is not None:
                    self._drop(slot, requeue=False)
            self.sel.close()
        final["final"] = True
        report(final)
        return final

    # Each step below moves one slot on; _drop() puts it back in the queue for a reconnect.

    def _connect(self, slot: _Slot, now: float) -> None:
        self.counts["connects"] += 1
        sock = socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            # The kernel picks the port at connect() time, per (source, destination): no port runs out early.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((slot.source, 0))
            err = sock.connect_ex((self.host, self.port))
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.counts["connect_errors"] += 1
            self._idle.append(slot)
            return
        slot.sock, slot.state, slot.since = sock, CONNECTING, now
        self.sel.register(sock, selectors.EVENT_WRITE, slot)

    def _timers(self, now: float) -> None:
        for slot in self.slots:
            if slot.state == CONNECTING and now - slot.since > CONNECT_TIMEOUT:
                self.counts["connect_timeouts"] += 1
                self._drop(slot)
            elif slot.state == HOLDING and self.kind == "heads" and now >= slot.next_send:
                if not slot.pending:
                    slot.pending = b"X-Flood-%d: %d\r\n" % (slot.lines, slot.index)
                    slot.lines += 1
                slot.next_send = now + self.interval
                self._send(slot)

    def _event(self, slot: _Slot, events: int) -> None:
        if slot.state == CONNECTING:
            err = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.counts["connect_errors"] += 1
                self._drop(slot)
                return
            self.counts["established"] += 1
            if self.kind == "silent":
                self._hold(slot, selectors.EVENT_READ)
                return
            self.sel.unregister(slot.sock)
            raw, slot.sock = slot.sock, None
            try:
                slot.sock = self.ctx.wrap_socket(raw, server_hostname=self.server_hostname,
                                                 do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                raw.close()
                self.counts["closed"] += 1
                slot.state = IDLE
                self._idle.append(slot)
                return
            slot.state = HANDSHAKING
            self.sel.register(slot.sock, selectors.EVENT_WRITE, slot)
            self._handshake(slot)
        elif slot.state == HANDSHAKING:
            self._handshake(slot)
        elif slot.state == HOLDING:
            if events & selectors.EVENT_WRITE:
                self._send(slot)
            if slot.sock is not None and events & selectors.EVENT_READ:
                self._read(slot)

    def _handshake(self, slot: _Slot) -> None:
        try:
            slot.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.sel.modify(slot.sock, selectors.EVENT_READ, slot)
            return
        except ssl.SSLWantWriteError:
            self.sel.modify(slot.sock, selectors.EVENT_WRITE, slot)
            return
        except (OSError, ssl.SSLError):
            self.counts["closed_in_handshake"] += 1
            self._drop(slot)
            return
        self.counts["handshakes"] += 1
        slot.pending = b"GET /health HTTP/1.1\r\nHost: %s\r\n" % self.server_hostname.encode()
        self._hold(slot, selectors.EVENT_READ)
        slot.next_send = time.monotonic() + self.interval
        self._send(slot)

    def _hold(self, slot: _Slot, events: int) -> None:
        slot.state = HOLDING
        slot.up = True
        self.sel.modify(slot.sock, events, slot)

    def _send(self, slot: _Slot) -> None:
        if not slot.pending:
            return
        try:
            slot.sock.send(slot.pending)  # one short record; TLS sends it whole or not at all
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            self.sel.modify(slot.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, slot)
            return
        except (OSError, ssl.SSLError):
            self.counts["closed"] += 1
            self._drop(slot)
            return
        self.counts["lines"] += 1
        slot.pending = b""
        self.sel.modify(slot.sock, selectors.EVENT_READ, slot)

    def _read(self, slot: _Slot) -> None:
        try:
            data = slot.sock.recv(4096)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except (OSError, ssl.SSLError):
            data = b""
        if data:
            # The server answered the unfinished head (say 408) or spoke first: it is done with us.
            self.counts["answered"] += 1
        else:
            self.counts["closed"] += 1
        self._drop(slot)

    def _drop(self, slot: _Slot, requeue: bool = True) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(slot.sock)
        with contextlib.suppress(OSError):
            slot.sock.close()
        slot.sock, slot.state, slot.pending = None, IDLE, b""
        if requeue:
            self._idle.append(slot)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.flood", description=__doc__)
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--target", required=True, help="HOST:PORT (IPv6 in brackets)")
    p.add_argument("--sources", required=True, help="comma list of addresses to bind, each in 198.51.100.0/24")
    p.add_argument("--connections", type=int, default=600)
    p.add_argument("--rate", type=float, default=250.0, help="(re)connects a second, all slots together")
    p.add_argument("--interval", type=float, default=2.0, help="heads: seconds between header lines")
    p.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    flood = Flood(args.kind, host.strip("[]"), int(port), args.sources.split(","), args.connections,
                  args.rate, args.interval, args.duration)
    # The handlers only set a flag the loop reads at least every 0.1 s.
    signal.signal(signal.SIGTERM, lambda *_: flood.stop())
    signal.signal(signal.SIGINT, lambda *_: flood.stop())

    def report(stats: dict[str, Any]) -> None:
        print(json.dumps(stats), flush=True)

    flood.run(report, stop_fd=sys.stdin.fileno())
    return 0


# -- the parent's side: start a flood in a namespace, watch it, stop it ------------------


class FloodProcess:
    """`python -m tests.flood` in `ns`. Its JSON reports land in `latest`; stop() ends it and returns the last.

    It stops by itself after `duration` s, and when our end of its stdin closes (so also when we die).
    """

    def __init__(self, ns: NetNS, kind: str, target: str, port: int, sources: Sequence[str], connections: int,
                 rate: float = 250.0, interval: float = 2.0, duration: float = 60.0):
        self.ns = ns
        self.argv = [sys.executable, "-m", "tests.flood", kind, "--target", f"{target}:{port}" if ":" not in target
                     else f"[{target}]:{port}", "--sources", ",".join(sources), "--connections", str(connections),
                     "--rate", str(rate), "--interval", str(interval), "--duration", str(duration)]
        self.connections = connections
        self.duration = duration
        self.proc: subprocess.Popen[str] | None = None
        self.latest: dict[str, Any] = {}
        self.reports: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._stderr = ""

    def start(self) -> FloodProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = self.ns.popen(self.argv, cwd=REPO, env=env, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True, name="flood-reports")
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                stats = json.loads(line)
                with self._changed:
                    self.latest = stats
                    self.reports.append(stats)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_ramped(self, timeout: float = 15.0, settle: float = 1.0) -> dict[str, Any]:
        """Until every slot has been tried at least once and `settle` s more passed (or `timeout` s); the latest
        report. A server that refuses or evicts never lets the attacker hold them all at once: the attack is
        then the attempts it keeps making at its rate."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(lambda: self.latest.get("connects", 0) >= self.connections
                                   or self.latest.get("final") or not self.running()
                                   or time.monotonic() >= deadline, timeout)
        time.sleep(max(0.0, min(settle, deadline - time.monotonic())))
        with self._changed:
            return dict(self.latest)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the flood sees EOF and stops; SIGTERM below if it does not
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stderr = self.proc.stderr.read()
                self.proc.stderr.close()
        return dict(self.latest)

    def stderr(self) -> str:
        return self._stderr

    def __enter__(self) -> FloodProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SLOW_COUNTER = re.compile(r"^(initializing|pending|connected|error|closed):\s+(\d+)$")


class SlowHTTPTest:
    """Debian's slowhttptest (slowloris: -H) in `ns`, started again each time it ends, until `duration` s.

    slowhttptest opens `connections` at `rate` a second and does not reopen what the server closes; it ends
    when none is left open. Starting it again keeps the attack going for as long as asked.
    """

    def __init__(self, ns: NetNS, url: str, connections: int = 1000, rate: int = 250, interval: int = 2,
                 duration: float = 60.0, probe_timeout: int = 5):
        self.ns = ns
        self.url = url
        self.connections, self.rate, self.interval = connections, rate, interval
        self.duration, self.probe_timeout = duration, probe_timeout
        self.runs = 0
        self.counters: dict[str, int] = {}
        self.max_connected = 0
        self.max_opened = 0
        self.output_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def argv(self, seconds: int) -> list[str]:
        # -H slow headers; -c connections; -r per second; -i seconds between follow-up header lines;
        # -l test length; -p the tool's own probe timeout (its probe's verdict is not used here).
        # stdbuf: its status goes through stdio, block-buffered into our pipe and lost when it is stopped.
        return ["stdbuf", "-oL", "slowhttptest", "-H", "-c", str(self.connections), "-r", str(self.rate),
                "-i", str(self.interval), "-l", str(seconds), "-p", str(self.probe_timeout), "-u", self.url]

    def start(self) -> SlowHTTPTest:
        self._deadline = time.monotonic() + self.duration
        self._thread = threading.Thread(target=self._loop, daemon=True, name="slowhttptest")
        self._thread.start()
        return self

    def opened(self) -> int:
        """Connections the current run has started: its status counts every one in exactly one state."""
        return sum(v for k, v in self.counters.items() if k != "initializing")

    def wait_ramped(self, timeout: float) -> dict[str, int]:
        """Until slowhttptest reports all its connections started (it reports every 5 s), or `timeout` s."""
        with self._changed:
            self._changed.wait_for(lambda: self.opened() >= self.connections or self._stop.is_set(), timeout)
            return dict(self.counters)

    def _loop(self) -> None:
        while not self._stop.is_set():
            left = int(self._deadline - time.monotonic())
            if left < 2:
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self._proc = self.ns.popen(self.argv(left), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, errors="replace")
                self.runs += 1
            assert self._proc.stdout is not None
            for raw in self._proc.stdout:
                line = _ANSI.sub("", raw).strip()
                self.output_tail.append(line)
                match = _SLOW_COUNTER.match(line)
                if match:
                    with self._changed:
                        self.counters[match.group(1)] = int(match.group(2))
                        if match.group(1) == "connected":
                            self.max_connected = max(self.max_connected, int(match.group(2)))
                        self.max_opened = max(self.max_opened, self.opened())
                        self._changed.notify_all()
            self._proc.wait()
            with self._changed:
                self._changed.notify_all()
            if self._proc.returncode not in (0, None) and self.runs > 1 and not self._stop.is_set():
                time.sleep(0.5)  # a tool that fails at once must not be restarted in a tight loop

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> SlowHTTPTest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the legitimate client: fail2ban's curl, one new TLS connection per request ---------


@dataclass(frozen=True)
class Outcome:
    where: str
    method: str
    expected: int
    status: int | None  # None: no answer (refused, reset, closed, timed out)
    seconds: float
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == self.expected


@dataclass(frozen=True)
class LegitClient:
    """Where requests come from: `ns`, bound to `source` (None: the kernel's choice), to host:port.

    `server_hostname` is checked against the server certificate; the test CA's covers localhost, 127.0.0.1
    and ::1, so a remote client reaching 198.51.100.1 checks the name "localhost", as curl --resolve would.
    """

    name: str
    ns: NetNS
    host: str
    port: int
    source: str | None
    ctx: ssl.SSLContext
    server_hostname: str = "localhost"
    user: str = "f2b"
    password: str = "f2b-pw"
    chain: str = "f2b-web"
    timeout: float = 5.0

    def request(self, method: str, path: str, expected: int) -> Outcome:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        data = (f"{method} {path} HTTP/1.1\r\nHost: {self.server_hostname}:{self.port}\r\n"
                f"User-Agent: curl/7.88.1\r\nAccept: */*\r\nAuthorization: Basic {auth}\r\n\r\n").encode()
        status: int | None = None
        error = ""
        started = time.perf_counter()
        tls: ssl.SSLSocket | None = None
        raw = self.ns.call(lambda: socket.socket(family, socket.SOCK_STREAM))
        try:
            raw.settimeout(self.timeout)
            if self.source is not None:
                raw.bind((self.source, 0))
            raw.connect((self.host, self.port))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ctx.wrap_socket(raw, server_hostname=self.server_hostname)
            tls.sendall(data)
            resp = http.client.HTTPResponse(tls, method=method)
            resp.begin()
            resp.read()
            status = resp.status
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        finally:
            (tls or raw).close()
        return Outcome(self.name, method, expected, status, time.perf_counter() - started, error)

    def pair(self, address: str) -> list[Outcome]:
        """Block `address` (a fresh one: 201) and unblock it (200), as fail2ban's ban and unban."""
        path = f"/chain/{self.chain}/ipv4/{address}"
        return [self.request("PUT", path, 201), self.request("DELETE", path, 200)]


def fresh_addresses(network: str = "203.0.113.0/24", skip: int = 0) -> Iterator[str]:
    """Addresses to block that are never contacted, each handed out once."""
    net = ipaddress.IPv4Network(network)
    if not any(net.subnet_of(ipaddress.IPv4Network(n)) for n in ("203.0.113.0/24", "198.18.0.0/15")):
        raise ValueError(f"{network}: blocked addresses come from 203.0.113.0/24 or 198.18.0.0/15")
    for i, host in enumerate(net.hosts()):
        if i >= skip:
            yield str(host)


def legit_run(clients: Sequence[LegitClient], pairs: int, addresses: Iterator[str], pause: float = 0.1,
              deadline: float | None = None) -> list[Outcome]:
    """`pairs` PUT+DELETE pairs from each client, taking turns, `pause` s apart; stops early at `deadline`
    (a time.monotonic() value), so a server that answers nothing cannot hold a test for long."""
    outcomes: list[Outcome] = []
    for _ in range(pairs):
        for client in clients:
            if deadline is not None and time.monotonic() >= deadline:
                return outcomes
            outcomes += client.pair(next(addresses))
        time.sleep(pause)
    return outcomes


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank (q in 0..100), as bench/run.py."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(1, math.ceil(q / 100 * len(sorted_values))) - 1]


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """answered/total and the latency of answered requests (p50, p99, max in ms)."""
    times = sorted(o.seconds * 1000 for o in outcomes if o.ok)
    return {"answered": sum(o.ok for o in outcomes), "total": len(outcomes),
            "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
            "max_ms": times[-1] if times else math.nan}


def describe_failures(outcomes: Sequence[Outcome], limit: int = 8) -> str:
    bad = [o for o in outcomes if not o.ok]
    text = "; ".join(f"{o.where} {o.method} -> {o.status or o.error} after {o.seconds * 1000:.0f} ms"
                     for o in bad[:limit])
    return text + (f"; and {len(bad) - limit} more" if len(bad) > limit else "")


# -- watching the daemon (its memory: tests/harness.py) ---------------------------------------


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


if __name__ == "__main__":
    sys.exit(_main())
