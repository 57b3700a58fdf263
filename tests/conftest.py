"""Shared fixtures: a test CA, and a real web-ipt-d process inside a network namespace of its own.

Everything that touches netfilter runs inside a namespace made by tests/netns.py;
the daemon is started through tests/nsguard.py, which refuses the initial namespace.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal as signals
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

from tests.netns import NetNS
from webiptd import certs
from webiptd.passwords import context as crypt_context

PORT = 8820
# Cheap bcrypt for the fixtures' users (the scheme is real, only the cost is low) so tests stay fast.
FAST_HASH = crypt_context().using(bcrypt__rounds=4)
PASSWORDS = {"admin": "admin-pw", "f2b": "f2b-pw", "reader": "reader-pw", "faraway": "faraway-pw"}

BACKENDS = ("iptables", "ipset", "nftables")

# The daemon's and the peer's ends of tests/netns.py's veth_pair (its default addresses),
# and the port of a plain TCP service on the daemon's side that packet tests try to reach.
SERVER4, PEER4 = "198.51.100.1", "198.51.100.2"
SERVER6, PEER6 = "2001:db8::1", "2001:db8::2"
APP_PORT = 9099


# The fixtures below that make a network namespace; every test that uses one (directly or through another
# fixture) must carry the `root` marker, or a run without root would fail it instead of leaving it out.
NAMESPACE_FIXTURES = frozenset({"ns", "peer", "daemon", "running"})


def pytest_collection_finish(session: pytest.Session) -> None:
    """Tests marked `root` (namespaces, netfilter, the daemon, systemd, fail2ban) need root. Without it, stop
    before running anything: skipping them would end in a pass that tested little. `-m "not root"` runs the rest."""
    if session.testsfailed:
        return  # collection errors, which pytest reports itself (and -m may not have deselected yet)
    unmarked = [item.nodeid for item in session.items if item.get_closest_marker("root") is None
                and NAMESPACE_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if unmarked:
        pytest.exit(f"these tests use a network namespace but lack @pytest.mark.root: {', '.join(unmarked[:10])}",
                    returncode=pytest.ExitCode.USAGE_ERROR)
    if os.geteuid() == 0 or session.config.option.collectonly:
        return
    needing = sum(1 for item in session.items if item.get_closest_marker("root") is not None)
    if needing:
        pytest.exit(f'{needing} of the {len(session.items)} tests selected need root (marker `root`): run them as '
                    'root (`make test`), or only the tests that do not with: pytest -m "not root"',
                    returncode=pytest.ExitCode.USAGE_ERROR)


@dataclass(frozen=True)
class PKI:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, **kw: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        for name, value in kw.items():
            setattr(ctx, name, value)
        return ctx


def make_pki(directory: Path, name: str = "test") -> PKI:
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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `backends` run once per firewall backend (all three, or the ones named); others on iptables."""
    if "backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = (marker.args or BACKENDS) if marker is not None else ("iptables",)
        metafunc.parametrize("backend", names, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def user_hashes() -> dict[str, str]:
    return {name: FAST_HASH.hash(pw) for name, pw in PASSWORDS.items()}


def base_config(workdir: Path, pki: PKI, hashes: dict[str, str], backend: str = "iptables") -> dict[str, Any]:
    config = {
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
        self.json: Any = json.loads(body) if body else None

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.raw[:300]!r}>"


class Daemon:
    """A real `web-ipt-d` process in `ns`, with its config, notify socket and log in `workdir`."""

    def __init__(self, ns: NetNS, workdir: Path, pki: PKI, hashes: dict[str, str], backend: str = "iptables"):
        self.ns = ns
        self.workdir = workdir
        self.pki = pki
        self.backend = backend
        self.config = base_config(workdir, pki, hashes, backend)
        self.config_path = workdir / "config.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify_path = workdir / "notify.sock"
        self.notify: socket.socket | None = None
        self.stderr_path = workdir / "stderr.log"

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        self.config_path.write_text(yaml.safe_dump(config or self.config), encoding="utf-8")

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "webiptd", "-config", str(self.config_path)]

    def start(self, argv: list[str] | None = None, wait: bool = True, **env: str) -> None:
        self.write_config()
        if self.notify is None:
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(self.notify_path))
        self.drain_notify()
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **env}
        with open(self.stderr_path, "ab") as err:
            self.proc = self.ns.popen(argv or self.argv(), env=full_env, stderr=err, stdout=subprocess.DEVNULL)
        if wait:
            self.wait_notify("READY=1", timeout=30)

    def drain_notify(self) -> list[str]:
        assert self.notify is not None
        got = []
        self.notify.setblocking(False)
        try:
            while True:
                got.append(self.notify.recv(4096).decode())
        except BlockingIOError:
            pass
        return got

    def wait_notify(self, state: str, timeout: float = 30) -> list[str]:
        """Wait for a datagram holding the line `state`; return every message seen until then."""
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode} before {state}; "
                                     f"stderr:\n{self.stderr()}")
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            seen.append(msg)
            if state in msg.split("\n"):
                return seen
        raise AssertionError(f"no {state} within {timeout}s; saw {seen}; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def log(self) -> str:
        path = self.workdir / "web-ipt-d.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def reload(self) -> list[str]:
        self.write_config()
        self.drain_notify()
        self.signal(signals.SIGHUP)
        self.wait_notify("RELOADING=1", timeout=10)
        return self.wait_notify("READY=1", timeout=30)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

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
            import base64
            pw = PASSWORDS.get(user, "") if password is None else password
            hdrs["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
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
            return {r.split()[3] for r in self.chain_rules(chain, family) if r.split()[2] == "-s"}
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

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            if self.notify is not None:
                self.notify.close()


def _cidr(text: str) -> str:
    import ipaddress
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


def assert_json_error(r: Reply, status: int) -> None:
    assert r.status == status, r
    assert r.headers["Content-Type"] == "application/json", r.headers
    assert set(r.json) == {"error", "message"}, r.json
    assert isinstance(r.json["error"], str) and r.json["error"]
    assert isinstance(r.json["message"], str) and r.json["message"]


def raw_exchange(d: Daemon, data: bytes, host: str = "127.0.0.1", method: str = "GET") -> Reply:
    """Send `data` as-is over a fresh TLS connection and parse the one response that comes back."""
    sock = d.ns.connect(host, PORT, timeout=10)
    tls = d.context().wrap_socket(sock, server_hostname=host)
    try:
        tls.sendall(data)
        resp = http.client.HTTPResponse(tls, method=method)  # type: ignore[arg-type]
        resp.begin()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        tls.close()


class Listener:
    """A TCP listener in `ns` that accepts and closes connections from a thread of its own."""

    def __init__(self, ns: NetNS, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = ns.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextmanager
def module_daemon(pki: PKI, user_hashes: dict[str, str], backend: str = "iptables",
                  configure: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Daemon]:
    """A started daemon in a namespace and workdir of its own, for fixtures wider than one test
    (`ns`, `workdir` and `daemon` are per test); `configure` edits its config before the start."""
    workdir = Path(tempfile.mkdtemp(prefix="wipt-", dir="/tmp"))
    try:
        with NetNS.create() as ns:
            d = Daemon(ns, workdir, pki, user_hashes, backend)
            if configure is not None:
                configure(d.config)
            try:
                d.start()
                yield d
            finally:
                d.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, so the notify socket path fits in sun_path.
    path = Path(tempfile.mkdtemp(prefix="wipt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ns() -> Iterator[NetNS]:
    with NetNS.create() as n:
        yield n


@pytest.fixture
def peer() -> Iterator[NetNS]:
    """A second namespace, to link to the daemon's with veth_pair(daemon.ns, peer)."""
    with NetNS.create() as p:
        yield p


@pytest.fixture
def daemon(ns: NetNS, workdir: Path, pki: PKI, user_hashes: dict[str, str], backend: str) -> Iterator[Daemon]:
    """A daemon object, configured but not started: tests tweak `daemon.config` then call start()."""
    d = Daemon(ns, workdir, pki, user_hashes, backend)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def running(daemon: Daemon) -> Daemon:
    daemon.start()
    return daemon
