"""What tests/ and bench/ share to run a server for real: a test CA and client contexts, a process started in
a network namespace behind a NOTIFY_SOCKET we read (READY=1), the web-ipt-d daemon on top of it, RSS readings.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import select
import signal as signals
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.netns import NetNS
from webiptd import certs
from webiptd.passwords import context as crypt_context

PORT = 8820
# Cheap bcrypt for the fixtures' users (the scheme is real, only the cost is low) so tests stay fast.
FAST_HASH = crypt_context().using(bcrypt__rounds=4)
PASSWORDS = {"admin": "admin-pw", "f2b": "f2b-pw", "reader": "reader-pw", "faraway": "faraway-pw"}

# The daemon's and the peer's ends of tests/netns.py's veth_pair (its default addresses).
SERVER4, PEER4 = "198.51.100.1", "198.51.100.2"
SERVER6, PEER6 = "2001:db8::1", "2001:db8::2"


# -- the test CA ------------------------------------------------------------------------------------------


def client_context(cafile: str | os.PathLike[str], **kw: Any) -> ssl.SSLContext:
    """A client context that verifies the server against `cafile`; `kw` set attributes (say maximum_version)."""
    ctx = ssl.create_default_context(cafile=os.fspath(cafile))
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, **kw: Any) -> ssl.SSLContext:
        return client_context(self.ca, **kw)


def make_pki(directory: Path, name: str = "test") -> PKI:
    """A fresh CA, a server certificate for localhost, 127.0.0.1 and ::1, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = certs.make_ca(f"web-ipt-d {name} CA")
    server, server_key = certs.issue(ca, ca_key, "localhost", ["localhost", "127.0.0.1", "::1"])
    client, client_key = certs.issue(ca, ca_key, "test-client", client=True)
    pki = PKI(directory, directory / "ca.crt", directory / "server.crt", directory / "server.key",
              directory / "client.crt", directory / "client.key")
    certs.write_cert(pki.ca, ca)
    certs.write_cert(pki.server_cert, server)
    certs.write_key(pki.server_key, server_key)
    certs.write_cert(pki.client_cert, client)
    certs.write_key(pki.client_key, client_key)
    return pki


def basic(user: str, password: str) -> str:
    """An `Authorization` header value (RFC 7617)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- a process behind a notify socket -------------------------------------------------------------------


class NotifySocket:
    """The NOTIFY_SOCKET end systemd holds (sd_notify(3)): datagrams kept in order until drained or waited for.

    With `keep_reading`, a thread empties the socket as it fills, as systemd does; without, the socket is read
    only in drain() and wait(), so a test can leave it unread and fill its queue (net.unix.max_dgram_qlen).
    """

    def __init__(self, path: Path, keep_reading: bool = False):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if keep_reading:
            self._thread = threading.Thread(target=self._keep_reading, name="notify-reader", daemon=True)
            self._thread.start()

    def _read_available(self) -> None:
        """Move every datagram the socket holds now to the pending list; the caller holds the condition."""
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # closed
                return
            self._pending.append(data.decode(errors="replace"))
            self._cond.notify_all()

    def _keep_reading(self) -> None:
        while not self._closed.is_set():
            try:
                ready = select.select([self._sock], [], [], 0.2)[0]
            except (OSError, ValueError):  # closed under us
                return
            if ready:
                with self._cond:
                    self._read_available()

    def drain(self) -> list[str]:
        """Every message received and not yet taken, oldest first; does not wait."""
        with self._cond:
            self._read_available()
            got, self._pending = self._pending, []
        return got

    def wait(self, state: str, timeout: float, check: Callable[[], None] | None = None) -> list[str]:
        """Take messages until one holds the line `state` (say READY=1); return all of them, that one last.

        `check` runs between reads and may raise to give up early (the process exited). TimeoutError after
        `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            with self._cond:
                self._read_available()
                while self._pending:
                    msg = self._pending.pop(0)
                    seen.append(msg)
                    if state in msg.split("\n"):
                        return seen
            if check is not None:
                check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {state} within {timeout:g} s; saw {seen}")
            if self._thread is None:
                select.select([self._sock], [], [], min(left, 0.05))
            else:
                with self._cond:
                    if not self._pending:
                        self._cond.wait(min(left, 0.05))

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(2)
        self._sock.close()


def stop_process(proc: subprocess.Popen[Any], sig: int = signals.SIGTERM, grace: float = 10.0) -> int | None:
    """`sig`, then SIGKILL after `grace` s, to one process we started; its exit code, None if it had to be killed.

    By PID and only while it is our unreaped child: Popen never signals a reaped (maybe recycled) PID.
    """
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
        return None


class Service:
    """A program run in `ns` as systemd runs a Type=notify service: NOTIFY_SOCKET, stderr to a file in `workdir`.

    `keep_reading`: see NotifySocket. `new_session`: the process gets a session of its own, so a Ctrl-C on the
    terminal reaches only the caller, which stops it by PID.
    """

    def __init__(self, ns: NetNS, workdir: Path, *, keep_reading: bool = False, new_session: bool = False):
        self.ns = ns
        self.workdir = workdir
        self.keep_reading = keep_reading
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None
        # Set it before start() to use another socket (a second daemon in the same workdir).
        self.notify_path = workdir / "notify.sock"
        self.notify: NotifySocket | None = None
        self.stderr_path = workdir / "stderr.log"
        self.ready_s = float("nan")  # process start to READY=1, when start() waited for it
        self.name = "the server"  # in error messages

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        raise NotImplementedError("give start() an argv")

    def start(self, argv: list[str] | None = None, wait: bool = True, timeout: float = 30.0, **env: str) -> None:
        """Start the program (argv, or self.argv()) with `env` added; with `wait`, until it sends READY=1."""
        if self.notify is None:
            self.notify = NotifySocket(self.notify_path, keep_reading=self.keep_reading)
        self.notify.drain()
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **env}
        started = time.perf_counter()
        with open(self.stderr_path, "ab") as err:
            self.proc = self.ns.popen(argv or self.argv(), env=full_env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=err, start_new_session=self.new_session)
        if wait:
            self.wait_notify("READY=1", timeout=timeout)
            self.ready_s = time.perf_counter() - started

    def drain_notify(self) -> list[str]:
        assert self.notify is not None
        return self.notify.drain()

    def wait_notify(self, state: str, timeout: float = 30) -> list[str]:
        """Wait for a datagram holding the line `state`; return every message seen until then."""
        assert self.notify is not None and self.proc is not None
        proc = self.proc

        def alive() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode} before {state}; "
                                   f"stderr:\n{self.stderr()}")

        try:
            return self.notify.wait(state, timeout, alive)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit code; subprocess.TimeoutExpired after `timeout` s."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """SIGKILL the process if it still runs; close the notify socket. Idempotent."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None


# -- the daemon -------------------------------------------------------------------------------------------


def base_config(workdir: Path, pki: PKI, hashes: dict[str, str], backend: str = "iptables") -> dict[str, Any]:
    """The tests' config: four users (see PASSWORDS), three chains, DEBUG logs, short timeouts."""
    config: dict[str, Any] = {
        "listen": [f"127.0.0.1:{PORT}", f"[::1]:{PORT}"],
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "min_version": "1.2"},
        "state_dir": str(workdir / "state"),
        "users": {
            "admin": {"password_hash": hashes["admin"], "chains": ["*"]},
            "f2b": {"password_hash": hashes["f2b"], "chains": ["f2b-*"]},
            "reader": {"password_hash": hashes["reader"], "chains": ["*"], "read_only": True},
            "faraway": {"password_hash": hashes["faraway"], "chains": ["*"], "allow_from": ["203.0.113.0/24"]},
        },
        "chains": {
            "f2b-web": {"hooks": ["INPUT"], "target": "DROP"},
            "f2b-ssh": {"hooks": ["INPUT"], "target": "REJECT"},
            "admin-list": {"hooks": ["INPUT", "FORWARD"], "target": "DROP"},
        },
        "never_block": ["127.0.0.0/8", "::1/128", "198.51.100.250/32"],
        "log": {"file": str(workdir / "web-ipt-d.log"), "level": "DEBUG"},
        # kernel_check: tests that take blocks out of the kernel see them stay out, unless they ask otherwise.
        "limits": {"request_timeout": 3, "worker_timeout": 5, "auth_failures": 5, "auth_window": 30,
                   "kernel_check": 3600},
    }
    if backend != "iptables":
        for chain in config["chains"].values():
            chain["backend"] = backend
    return config


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes):
        self.status = status
        self.headers = headers
        self.raw = body
        # JSON, except the metrics' text format (and anything else not JSON)
        json_body = "json" in (headers.get("Content-Type") or "application/json")
        self.json: Any = json.loads(body) if body and json_body else None

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.raw[:300]!r}>"


class Daemon(Service):
    """A real `web-ipt-d` process in `ns`, with its config, notify socket and log in `workdir`.

    The config is base_config() unless `config` is given; start() writes it to workdir/config.yaml.
    """

    def __init__(self, ns: NetNS, workdir: Path, pki: PKI, hashes: dict[str, str] | None = None,
                 backend: str = "iptables", *, config: dict[str, Any] | None = None, keep_reading: bool = False,
                 new_session: bool = False):
        super().__init__(ns, workdir, keep_reading=keep_reading, new_session=new_session)
        self.pki = pki
        self.backend = backend
        if config is None:
            if hashes is None:
                raise ValueError("the tests' config needs the users' hashes")
            config = base_config(workdir, pki, hashes, backend)
        self.config = config
        self.config_path = workdir / "config.yaml"
        self.name = "the daemon"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(config or self.config), encoding="utf-8")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "webiptd", "-config", str(self.config_path)]

    def start(self, argv: list[str] | None = None, wait: bool = True, timeout: float = 30.0, **env: str) -> None:
        self.write_config()
        super().start(argv, wait, timeout, **env)

    def log(self) -> str:
        path = self.workdir / "web-ipt-d.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def reload(self) -> list[str]:
        self.write_config()
        self.drain_notify()
        self.signal(signals.SIGHUP)
        self.wait_notify("RELOADING=1", timeout=10)
        return self.wait_notify("READY=1", timeout=30)

    def context(self, **kw: Any) -> ssl.SSLContext:
        return self.pki.client_context(**kw)

    def connection(self, host: str = "127.0.0.1", timeout: float = 10, ctx: ssl.SSLContext | None = None) -> Any:
        return self.ns.https_connection(host, PORT, ctx or self.context(), timeout=timeout)

    def request(self, method: str, path: str, user: str | None = "admin", password: str | None = None,
                headers: dict[str, str] | None = None, conn: Any = None, body: bytes | None = None) -> Reply:
        own = conn is None
        conn = conn or self.connection()
        hdrs = dict(headers or {})
        if user is not None:
            hdrs["Authorization"] = basic(user, PASSWORDS.get(user, "") if password is None else password)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            if own:
                conn.close()

    def rules(self, family: int = 4) -> list[str]:
        """The `-A ...` lines of the filter table, from iptables-legacy-save inside the namespace."""
        return [line for line in self.ns.iptables_save(family).splitlines() if line.startswith("-A ")]

    def chain_rules(self, chain: str, family: int = 4) -> list[str]:
        return [r for r in self.rules(family) if r.startswith(f"-A {chain} ")]

    def kernel_entries(self, chain: str, family: int = 4) -> set[str]:
        """The networks `chain` blocks in the kernel, whatever its backend, as CIDR strings."""
        backend = self.config["chains"].get(chain, {}).get("backend", "iptables")
        if backend == "iptables":
            return {r.split()[3] for r in self.chain_rules(chain, family) if r.split()[2] in ("-s", "-d")}
        if backend == "ipset":
            out = self.ns.run(["ipset", "list", f"{chain}-v{family}"]).stdout
            members = out.split("Members:\n", 1)[1] if "Members:\n" in out else ""
            return {_cidr(line.split()[0]) for line in members.splitlines() if line.strip()}
        # Hosts are in <chain>-v4 (-v6); the networks of each shorter prefix length L in <chain>-v4-L.
        table = self.ns.run(["nft", "-j", "-t", "list", "table", "inet", "web-ipt-d"], check=False)
        if table.returncode != 0:
            return set()
        hosts = f"{chain}-v{family}"
        found = set()
        for item in json.loads(table.stdout)["nftables"]:
            name = item.get("set", {}).get("name", "")
            if name == hosts or (name.startswith(f"{hosts}-") and name[len(hosts) + 1:].isdigit()):
                suffix = "" if name == hosts else "/" + name[len(hosts) + 1:]
                out = self.ns.run(["nft", "-j", "list", "set", "inet", "web-ipt-d", name]).stdout
                found |= {_cidr(e + suffix) for e in _nft_elements(json.loads(out))}
        return found


def _cidr(text: str) -> str:
    return str(ipaddress.ip_network(text))


def _nft_elements(doc: dict[str, Any]) -> list[str]:
    """Set elements from `nft -j list set`: plain addresses, prefixes, or either wrapped with a timeout."""
    out = []
    for item in doc["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                elem = elem["elem"]["val"]
            if isinstance(elem, dict) and "prefix" in elem:
                elem = f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
            out.append(str(elem))
    return out


# -- memory -----------------------------------------------------------------------------------------------


def proc_status_kib(pid: int, key: str) -> int:
    """A kB field of /proc/<pid>/status (VmRSS now, VmHWM the peak so far); -1 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class RssSampler:
    """The largest VmRSS of `pid` seen, sampled every `every` s from a thread, until the block ends."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every = pid, every
        self.max_kib = proc_status_kib(pid, "VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss")

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.max_kib = max(self.max_kib, proc_status_kib(self.pid, "VmRSS"))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.max_kib = max(self.max_kib, proc_status_kib(self.pid, "VmRSS"))
