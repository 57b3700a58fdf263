"""Self-test of the network-namespace harness (tests/netns.py and tests/nsguard.py).

Nothing here writes to the initial namespace: it is only read (inodes, addresses, rulesets).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import subprocess
import sys
import time

import pytest

try:  # `python -m pytest` from the repo root (or tests/ as a package)
    from tests import netns as harness
except ImportError:  # plain `pytest`, which puts tests/ itself on sys.path
    import netns as harness  # type: ignore[no-redef]

NetNS = harness.NetNS

pytestmark = pytest.mark.root

A4, A6 = "198.51.100.1", "2001:db8::1"
B4, B6 = "198.51.100.2", "2001:db8::2"


@pytest.fixture
def ns():
    with NetNS.create() as n:
        yield n


@pytest.fixture
def pair():
    with NetNS.create("wipta") as a, NetNS.create("wiptb") as b:
        yield a, b, harness.veth_pair(a, b)


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


def _echo_roundtrip(listener: socket.socket, client: socket.socket) -> tuple[str, ...]:
    """Accept client on listener, bounce a payload, return the peer address seen by the server."""
    listener.settimeout(5)
    conn, peer = listener.accept()
    with conn:
        client.sendall(b"ping")
        assert conn.recv(16) == b"ping"
        conn.sendall(b"pong")
        assert client.recv(16) == b"pong"
    return peer


def test_namespace_inode_differs_from_initial(ns):
    initial = harness.initial_netns_inode()
    assert ns.inode != initial
    assert ns.inode == os.stat(ns.path).st_ino
    # A command run through the guard really is in that namespace.
    seen = ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout.strip()
    assert int(seen) == ns.inode
    # refuse_initial_netns() passes inside the namespace ...
    code = (f"import sys; sys.path.insert(0, {str(harness.NSGUARD.parent)!r}); "
            "import netns; netns.refuse_initial_netns()")
    ns.run([sys.executable, "-c", code])
    # ... and refuses out here when we are in the initial one.
    if harness.current_netns_inode() == initial:
        with pytest.raises(RuntimeError):
            harness.refuse_initial_netns()


def test_guard_refuses_in_initial_netns():
    if harness.current_netns_inode() != harness.initial_netns_inode():
        pytest.skip("test process is not in the initial network namespace")
    res = subprocess.run([sys.executable, str(harness.NSGUARD), "true"], capture_output=True, text=True, timeout=30)
    assert res.returncode == harness.GUARD_REFUSED_EXIT == 97
    assert "REFUSING" in res.stderr


def test_guard_refuses_unexpected_namespace(ns):
    # In a fresh namespace, but not the one the caller asked for: must also refuse.
    res = subprocess.run(
        ["ip", "netns", "exec", ns.name, sys.executable, str(harness.NSGUARD), "--expect-netns-ino=1", "true"],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 97, res.stderr


@pytest.mark.parametrize(("family", "server", "client_addr"), [(socket.AF_INET, A4, B4), (socket.AF_INET6, A6, B6)])
def test_veth_connects_between_namespaces(pair, family, server, client_addr):
    a, b, _ = pair
    with a.socket(family) as listener:
        listener.bind((server, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with b.connect(server, port, timeout=3) as client:
            peer = _echo_roundtrip(listener, client)
    assert peer[0] == client_addr  # came from b's veth end, not from anywhere else


def test_veth_is_invisible_from_initial_netns(pair):
    # Proven without sending anything: from this namespace a connect() to those
    # addresses would follow the default route off the machine, which we must not do.
    _, _, (a_if, b_if) = pair
    local_ifs = {name for _, name in socket.if_nameindex()}
    assert a_if not in local_ifs and b_if not in local_ifs
    for family, addr in ((socket.AF_INET, A4), (socket.AF_INET, B4), (socket.AF_INET6, A6), (socket.AF_INET6, B6)):
        with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(OSError) as exc:
            s.bind((addr, 0))
        assert exc.value.errno == errno.EADDRNOTAVAIL, addr


def test_loopback_listener_inside_ns_only(ns):
    # Reserve a port on the initial namespace's loopback without listening: nothing can
    # listen on it there, so a connect() to it here must be refused deterministically.
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with ns.socket() as listener:
            listener.bind(("127.0.0.1", port))  # separate port space inside the namespace
            listener.listen()
            with ns.connect("127.0.0.1", port, timeout=3) as client:
                _echo_roundtrip(listener, client)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=3).close()


def test_http_connection_keepalive_inside_ns(ns):
    srv = ns.popen(
        [sys.executable, "-m", "http.server", "--protocol", "HTTP/1.1", "--bind", "127.0.0.1", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # http.server prints "Serving HTTP on 127.0.0.1 port N ..." once it is listening.
    line = srv.stdout.readline()
    port = int(line.split(" port ")[1].split()[0])
    conn = ns.http_connection("127.0.0.1", port, timeout=3)
    try:
        socks = []
        for _ in range(2):
            conn.request("HEAD", "/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            socks.append(conn.sock)
        assert socks[0] is socks[1]  # keep-alive: the second request reused the connection
    finally:
        conn.close()


_TLS_SERVER = """
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def test_https_connection_inside_ns(ns, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    srv = ns.popen([sys.executable, "-c", _TLS_SERVER, cert, key], stdout=subprocess.PIPE, text=True)
    port = int(srv.stdout.readline())
    ctx = ssl.create_default_context(cafile=str(cert))  # verifies the chain and the IP SAN
    conn = ns.https_connection("127.0.0.1", port, ctx, timeout=3)
    try:
        socks = []
        for _ in range(2):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"ok")
            socks.append(conn.sock)
        assert isinstance(socks[0], ssl.SSLSocket) and socks[0] is socks[1]
    finally:
        conn.close()


def test_close_deletes_namespace_and_stops_processes():
    ns = NetNS.create()
    proc = ns.popen(["sleep", "60"])
    assert ns.name in _netns_names()
    # The harness execs all the way down, so the PID it holds is sleep's, in the namespace.
    deadline = time.monotonic() + 5
    while _comm(proc.pid) != "sleep" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _comm(proc.pid) == "sleep"
    assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns.inode
    ns.close()
    assert proc.returncode == -15
    assert ns.name not in _netns_names()
    assert not ns.path.exists()
    ns.close()  # idempotent


def test_iptables_inside_ns_leaves_initial_untouched(ns):
    def initial_rules() -> tuple[str, str]:
        # Read-only; strip the "# Generated/Completed on <date>" lines.
        outs = []
        for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
            out = subprocess.run([tool], check=True, capture_output=True, text=True, timeout=30).stdout
            outs.append("\n".join(line for line in out.splitlines() if not line.startswith("#")))
        return outs[0], outs[1]

    before = initial_rules()
    ns.run(["iptables-legacy", "-w", "-N", "TESTCHAIN"])
    ns.run(["ip6tables-legacy", "-w", "-N", "TESTCHAIN6"])
    assert ":TESTCHAIN " in ns.iptables_save(4)
    assert ":TESTCHAIN6 " in ns.iptables_save(6)
    assert initial_rules() == before
    assert "TESTCHAIN" not in "".join(before)


def test_python_iptables_inside_ns(ns):
    # The pattern daemon tests will use: python-iptables runs only in the namespace.
    code = "import iptc; iptc.Table(iptc.Table.FILTER).create_chain('PYCHAIN')"
    ns.run([sys.executable, "-c", code])
    assert ":PYCHAIN " in ns.iptables_save(4)
