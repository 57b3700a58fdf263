"""Network-namespace test harness: throwaway `ip netns` namespaces, veth pairs between them,
and sockets / HTTP(S) connections opened inside a namespace without moving the test process.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import http.client
import importlib.util
import ipaddress
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from socket import AF_INET, SOCK_STREAM
from typing import Any, Callable, Sequence, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

NSGUARD = Path(__file__).resolve().with_name("nsguard.py")
NETNS_RUN_DIR = Path("/run/netns")
IP = shutil.which("ip") or "/usr/sbin/ip"

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3) from linux/nsfs.h

# TEST-NET-2, not TEST-NET-1: on some machines (the test machines included) the initial
# namespace's own uplink is 192.0.2.0/24, so veths there could be confused with, or
# a stray connect could reach, a real host.  veth_pair() refuses overlapping ranges.
DEFAULT_A_ADDRS: tuple[str, ...] = ("198.51.100.1/24", "2001:db8::1/64")
DEFAULT_B_ADDRS: tuple[str, ...] = ("198.51.100.2/24", "2001:db8::2/64")

DEFAULT_TIMEOUT = 5.0
_STOP_GRACE = 5.0


def _load_guard() -> Any:
    # nsguard.py must stay runnable as a bare script, so load it by path rather than
    # making tests/ a package: one copy of the "are we in the initial netns?" logic.
    spec = importlib.util.spec_from_file_location("_webiptd_test_nsguard", NSGUARD)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {NSGUARD}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_guard = _load_guard()
GUARD_REFUSED_EXIT: int = _guard.REFUSED_EXIT


def initial_netns_inode() -> int:
    """Inode of the initial network namespace (PID 1's; kthreadd's if PID 1 is unreadable)."""
    observed = _guard.observed_initial_netns_inodes()
    if not observed:
        raise RuntimeError("cannot determine the initial network namespace inode")
    return observed[0]


def current_netns_inode() -> int:
    return _guard.current_netns_inode()


def refuse_initial_netns() -> None:
    """Raise RuntimeError unless this thread is provably outside the initial netns."""
    reason = _guard.refusal_reason()
    if reason is not None:
        raise RuntimeError(f"refusing to continue: {reason}")


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _verify_netns_file(path: Path) -> int:
    """Return the inode of the netns bound at path, after proving it is a new netns."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # ENOTTY here means path is a plain file (the bind mount did not happen).
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        inode = os.fstat(fd).st_ino
    finally:
        os.close(fd)
    if nstype != CLONE_NEWNET:
        raise RuntimeError(f"{path} is a namespace of type {nstype:#x}, not a network namespace")
    if inode in _guard.forbidden_netns_inodes() or inode == current_netns_inode():
        raise RuntimeError(f"{path} (inode {inode}) is not a fresh network namespace")
    return inode


class NetNSCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes the captured output."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, data in (("stdout", self.stdout), ("stderr", self.stderr)):
            if data:
                text += f"\n{label}: {data.strip() if isinstance(data, str) else data!r}"
        return text


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run an `ip netns add/del/list` management command (these never touch links or rules)."""
    return subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=30)


_counter = itertools.count(1)
# Namespaces not yet closed; atexit deletes them so an aborted run leaves nothing behind.
_live: set[NetNS] = set()


class NetNS:
    """A named network namespace; create with NetNS.create() and use as a context manager."""

    def __init__(self, name: str, inode: int) -> None:
        self.name = name
        self.path = NETNS_RUN_DIR / name
        self.inode = inode
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._closed = False

    @classmethod
    def create(cls, prefix: str = "wipt") -> NetNS:
        name = f"{prefix}{os.getpid()}x{next(_counter)}{secrets.token_hex(2)}"
        _ip("netns", "add", name)
        try:
            inode = _verify_netns_file(NETNS_RUN_DIR / name)
        except BaseException:
            try:
                _ip("netns", "del", name)
            except Exception:
                logger.exception("could not delete unverified namespace %s", name)
            raise
        ns = cls(name, inode)
        _live.add(ns)
        try:
            # A fresh netns has lo down; 127.0.0.1 and ::1 only work once it is up.
            ns.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            ns.close()
            raise
        logger.debug("created network namespace %s (inode %d)", name, inode)
        return ns

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetNS({self.name!r}, inode={self.inode}{', closed' if self._closed else ''})"

    def _wrap(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if not argv:
            raise ValueError("empty argv")
        # The guard checks it landed in exactly this namespace before exec'ing argv,
        # so a vanished/renamed namespace can never make argv run in the initial one.
        return [
            IP, "netns", "exec", self.name,
            sys.executable, "-I", str(NSGUARD), f"{_guard.EXPECT_OPTION}{self.inode}",
            *(os.fspath(a) for a in argv),
        ]

    def run(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace; defaults: check=True, text output captured, timeout 60 s."""
        check = kw.pop("check", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        cmd = self._wrap(argv)
        result = subprocess.run(cmd, **kw)
        if check and result.returncode != 0:
            raise NetNSCommandError(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace; close() stops it (and only it) by PID."""
        # ip and the guard both exec, so proc.pid is the PID of argv[0] itself.
        proc = subprocess.Popen(self._wrap(argv), **kw)
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn in a short-lived thread that has joined this namespace; return its result."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        box: dict[str, Any] = {}

        def worker() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                # setns is per thread; this thread dies right after, so nothing else ever
                # runs in the namespace.  Re-check in case the name now means another ns.
                if current_netns_inode() != self.inode:
                    raise RuntimeError(f"setns landed in inode {current_netns_inode()}, expected {self.inode}")
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc

        thread = threading.Thread(target=worker, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def socket(self, family: int = AF_INET, type: int = SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket that lives in this namespace (sockets keep the netns they were created in)."""
        sock = self.call(lambda: socket.socket(family, type, proto))
        self._sockets.add(sock)
        return sock

    def connect(self, host: str, port: int, timeout: float | None = DEFAULT_TIMEOUT,
                source: str | None = None) -> socket.socket:
        """A TCP socket in this namespace connected to (host, port), from the address `source` if given."""
        # Resolution happens in the namespace too, so a name lookup can never
        # send DNS traffic from the initial namespace.
        bind = None if source is None else (source, 0)
        sock = self.call(lambda: socket.create_connection((host, port), timeout=timeout, source_address=bind))
        self._sockets.add(sock)
        return sock

    def http_connection(self, host: str, port: int,
                        timeout: float | None = DEFAULT_TIMEOUT) -> http.client.HTTPConnection:
        return _NetNSHTTPConnection(self, host, port, timeout=timeout)

    def https_connection(
        self, host: str, port: int, ssl_context: ssl.SSLContext, timeout: float | None = DEFAULT_TIMEOUT
    ) -> http.client.HTTPSConnection:
        return _NetNSHTTPSConnection(self, host, port, ssl_context, timeout=timeout)

    def iptables_save(self, family: int = 4) -> str:
        """Legacy-backend ruleset of this namespace (python-iptables writes the legacy tables)."""
        tool = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}.get(family)
        if tool is None:
            raise ValueError(f"family must be 4 or 6, not {family!r}")
        return self.run([tool]).stdout

    def close(self) -> None:
        """Stop our processes, close our sockets, delete the namespace. Idempotent."""
        if self._closed:
            return
        try:
            for proc in self._procs:
                try:
                    _stop_process(proc)
                except Exception:
                    logger.exception("could not stop pid %s in %s", proc.pid, self.name)
            for sock in list(self._sockets):
                try:
                    # An open socket pins the namespace in the kernel after its name is gone.
                    sock.close()
                except Exception:
                    logger.exception("could not close socket in %s", self.name)
        finally:
            try:
                if self.path.exists():
                    _ip("netns", "del", self.name)
            except Exception:
                logger.exception("could not delete network namespace %s", self.name)
                raise
            else:
                self._closed = True
                _live.discard(self)
                logger.debug("deleted network namespace %s", self.name)


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    # Popen.send_signal/kill do nothing once the child is reaped, so a recycled PID
    # belonging to someone else is never signalled.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGTERM for %.1f s; sending SIGKILL", proc.pid, _STOP_GRACE)
            proc.kill()
            proc.wait(_STOP_GRACE)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except Exception:
                pass


def _open_tcp(conn: http.client.HTTPConnection, netns: NetNS) -> None:
    conn.sock = netns.connect(conn.host, conn.port, timeout=conn.timeout)
    # Same as http.client: avoid Nagle delays on small request/response bodies.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NetNSHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection whose TCP connection is opened inside a NetNS (reconnects too)."""

    def __init__(self, netns: NetNS, host: str, port: int, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.netns = netns

    def connect(self) -> None:
        _open_tcp(self, self.netns)


class _NetNSHTTPSConnection(http.client.HTTPSConnection):
    """HTTPSConnection whose TCP connection is opened inside a NetNS, then TLS-wrapped."""

    def __init__(self, netns: NetNS, host: str, port: int, ssl_context: ssl.SSLContext, **kw: Any) -> None:
        super().__init__(host, port, context=ssl_context, **kw)
        self.netns = netns
        self.ssl_context = ssl_context

    def connect(self) -> None:
        _open_tcp(self, self.netns)
        self.sock = self.ssl_context.wrap_socket(self.sock, server_hostname=self.host)
        # wrap_socket detached the tracked plain socket; track the TLS one instead.
        self.netns._sockets.add(self.sock)


def _host_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Networks configured in the current (normally initial) namespace; read-only."""
    out = subprocess.run([IP, "-j", "addr", "show"], check=True, capture_output=True, text=True, timeout=30).stdout
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if "local" in info and "prefixlen" in info:
                nets.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}").network)
    return nets


def _check_no_host_overlap(addrs: Sequence[str]) -> None:
    host = _host_networks()
    for addr in addrs:
        net = ipaddress.ip_interface(addr).network
        for hnet in host:
            if hnet.version == net.version and net.overlaps(hnet) and not hnet.is_link_local:
                raise ValueError(
                    f"veth address {addr} overlaps {hnet}, which is configured in the test process's "
                    "namespace; pick a range that exists only inside the test namespaces"
                )


def _addr_cmd(ifname: str, addr: str) -> list[str]:
    if ipaddress.ip_interface(addr).version == 6:
        # nodad: skip Duplicate Address Detection so the address is usable at once
        # instead of staying "tentative" for ~1-2 s.
        return ["ip", "-6", "addr", "add", addr, "dev", ifname, "nodad"]
    return ["ip", "addr", "add", addr, "dev", ifname]


_veth_counter = itertools.count(1)


def veth_pair(
    a: NetNS,
    b: NetNS,
    a_addrs: Sequence[str] = DEFAULT_A_ADDRS,
    b_addrs: Sequence[str] = DEFAULT_B_ADDRS,
) -> tuple[str, str]:
    """Link a and b with a veth pair, address and raise both ends; return (a_ifname, b_ifname)."""
    _check_no_host_overlap([*a_addrs, *b_addrs])
    n = next(_veth_counter)
    a_if, b_if = f"wipt{n}a", f"wipt{n}b"
    # Created from inside a with the peer sent straight to b: the pair never exists,
    # even briefly, in the initial namespace.  Deleting either namespace removes it.
    a.run(["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name])
    for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
        for addr in addrs:
            ns.run(_addr_cmd(ifname, addr))
    a.run(["ip", "link", "set", a_if, "up"])
    b.run(["ip", "link", "set", b_if, "up"])
    return a_if, b_if


@atexit.register
def _close_leftover_namespaces() -> None:
    for ns in list(_live):
        try:
            ns.close()
        except Exception:
            logger.exception("could not close %r at exit", ns)
