"""Shared fixtures: a test CA, and a real web-ipt-d process (tests/harness.py) in a network namespace of its own.

Everything that touches netfilter runs inside a namespace made by tests/netns.py, through tests/nsguard.py.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.harness import (  # noqa: F401  (the tests import these from here)
    FAST_HASH, PASSWORDS, PEER4, PEER6, PKI, PORT, SERVER4, SERVER6, Daemon, Reply, base_config, make_pki)
from tests.netns import NetNS

BACKENDS = ("iptables", "ipset", "nftables")

# The port of a plain TCP service on the daemon's side (SERVER4, SERVER6) that packet tests try to reach.
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
def h(tmp_path: Path) -> Iterator[Any]:
    """The firewall worker's harness without root (tests/test_worker_logic.py's Harness: a real store, a recording
    backend, a clock the test moves); the test fails if the backend saw an anomaly."""
    from tests.test_worker_logic import Harness

    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()
    assert harness.backend.anomalies == []


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
