"""The daemon's life: SIGHUP reload (valid and invalid), SIGTERM/SIGINT, socket activation, systemd notify
and the watchdog, silent clients, the connection cap, timeouts and keep-alive; and the command-line flags.
"""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from passlib.context import CryptContext

from tests.conftest import FAST_HASH, PKI, PORT, Daemon, base_config
from webiptd import __version__

REPO = Path(__file__).resolve().parent.parent


def basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def status_lines(messages: list[str]) -> list[str]:
    return [line for msg in messages for line in msg.split("\n") if line.startswith("STATUS=")]


def message_with(messages: list[str], state: str) -> str:
    found = [msg for msg in messages if state in msg.split("\n")]
    assert found, f"no message with {state} in {messages}"
    return found[-1]


def hup(d: Daemon) -> list[str]:
    """Write the config, SIGHUP, and return every notify message up to READY=1."""
    d.write_config()
    d.drain_notify()
    d.signal(signal.SIGHUP)
    return d.wait_notify("READY=1", timeout=30)


def error_lines(d: Daemon) -> list[str]:
    return [line for line in d.log().splitlines() if " ERROR " in line]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes (EOF or reset) within timeout; False if the socket stays open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def request_until_served(d: Daemon, deadline: float) -> Any:
    """Retry while the server is still releasing connection slots (asynchronous after a client closes)."""
    while True:
        try:
            return d.request("GET", "/version")
        except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --- SIGHUP -----------------------------------------------------------------------------------------------


@pytest.mark.root
def test_sighup_with_a_valid_config_applies_at_once(running: Daemon) -> None:
    d = running
    assert d.proc is not None
    pid = d.proc.pid
    assert d.request("GET", "/version", user="newbie", password="newbie-pw").status == 401
    assert d.request("GET", "/version", user="reader").status == 200
    keepalive = d.connection()
    assert d.request("GET", "/version", conn=keepalive).status == 200

    d.config["users"]["newbie"] = {"password_hash": FAST_HASH.hash("newbie-pw"), "chains": ["f2b-*"]}
    del d.config["users"]["reader"]
    d.config["chains"]["f2b-new"] = {"hooks": ["INPUT"], "target": "DROP"}
    d.config["never_block"].append("203.0.113.128/25")
    seen = hup(d)

    states = [line for msg in seen for line in msg.split("\n")]
    assert "RELOADING=1" in states and states.index("RELOADING=1") < states.index("READY=1"), seen
    assert any(line.startswith("MONOTONIC_USEC=") for line in message_with(seen, "RELOADING=1").split("\n"))
    assert d.proc.poll() is None and d.proc.pid == pid

    r = d.request("PUT", "/chain/f2b-new/ipv4/203.0.113.7", user="newbie", password="newbie-pw")
    assert r.status == 201, r
    assert r.json["created_by"] == "newbie"
    assert d.chain_rules("f2b-new") == ["-A f2b-new -s 203.0.113.7/32 -j DROP"]
    assert "-A INPUT -j f2b-new" in d.rules()
    assert d.request("PUT", "/chain/admin-list/ipv4/203.0.113.8", user="newbie", password="newbie-pw").status == 403
    assert d.request("GET", "/version", user="reader").status == 401
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.200").status == 409
    # A connection opened before the reload is served under the new config.
    assert d.request("GET", "/version", user="newbie", password="newbie-pw", conn=keepalive).status == 200
    keepalive.close()


@pytest.mark.root
def test_sighup_with_an_unknown_key_keeps_the_old_config(running: Daemon) -> None:
    d = running
    assert d.proc is not None
    d.config["users"]["newbie"] = {"password_hash": FAST_HASH.hash("newbie-pw"), "chains": ["*"]}
    d.config["bogus_key"] = 1
    seen = hup(d)

    assert d.proc.poll() is None
    assert any("fail" in line.lower() for line in status_lines([message_with(seen, "READY=1")])), seen
    assert any("bogus_key" in line for line in error_lines(d)), d.log()
    assert "bogus_key" in d.stderr()
    assert d.request("GET", "/version").status == 200
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.9").status == 201
    assert d.request("GET", "/version", user="newbie", password="newbie-pw").status == 401

    # Once the config is fixed, the next reload takes it.
    del d.config["bogus_key"]
    seen = hup(d)
    assert not any("fail" in line.lower() for line in status_lines(seen)), seen
    assert d.request("GET", "/version", user="newbie", password="newbie-pw").status == 200


@pytest.mark.root
def test_sighup_with_a_broken_cert_path_keeps_serving_tls(running: Daemon) -> None:
    d = running
    assert d.proc is not None
    d.config["tls"]["cert"] = str(d.workdir / "missing.crt")
    seen = hup(d)
    assert d.proc.poll() is None
    assert any("fail" in line.lower() for line in status_lines([message_with(seen, "READY=1")])), seen
    assert any("tls.cert" in line for line in error_lines(d)), d.log()
    # New TLS connections still get the old, valid certificate.
    r = d.request("GET", "/version")
    assert r.status == 200, r


@pytest.mark.root
def test_request_in_flight_survives_a_reload(running: Daemon) -> None:
    d = running
    sock = d.ns.connect("127.0.0.1", PORT, timeout=10)
    tls = d.context().wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        tls.sendall(b"PUT /chain/f2b-web/ipv4/203.0.113.44 HTTP/1.1\r\nHost: localhost\r\n")
        d.config["users"]["newbie"] = {"password_hash": FAST_HASH.hash("newbie-pw"), "chains": ["*"]}
        hup(d)
        tls.sendall(f"Authorization: {basic('admin', 'admin-pw')}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        resp.begin()
        assert resp.status == 201, resp.read()
        resp.read()
    finally:
        tls.close()
    assert d.chain_rules("f2b-web") == ["-A f2b-web -s 203.0.113.44/32 -j DROP"]


# --- stopping ---------------------------------------------------------------------------------------------


@pytest.mark.root
def test_sigterm_exits_0_and_leaves_the_bans_in_the_kernel(running: Daemon) -> None:
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.10").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv6/2001:db8:ffff::/64?timeout=3600").status == 201
    idle = d.connection()
    assert d.request("GET", "/version", conn=idle).status == 200
    d.drain_notify()

    assert d.stop(signal.SIGTERM) == 0
    assert any("STOPPING=1" in msg.split("\n") for msg in d.drain_notify())
    idle.close()
    assert d.chain_rules("f2b-web") == ["-A f2b-web -s 203.0.113.10/32 -j DROP"]
    assert d.chain_rules("f2b-ssh", 6) == [
        "-A f2b-ssh -s 2001:db8:ffff::/64 -j REJECT --reject-with icmp6-port-unreachable"]
    assert "-A INPUT -j f2b-web" in d.rules()
    assert "-A INPUT -j f2b-ssh" in d.rules(6)


@pytest.mark.root
def test_sigterm_lets_a_request_in_flight_finish(running: Daemon) -> None:
    d = running
    sock = d.ns.connect("127.0.0.1", PORT, timeout=10)
    tls = d.context().wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        tls.sendall(b"PUT /chain/f2b-web/ipv4/203.0.113.45 HTTP/1.1\r\nHost: localhost\r\n")
        time.sleep(0.5)  # let the server read the request line: from then on the request is in flight
        d.drain_notify()
        d.signal(signal.SIGTERM)
        d.wait_notify("STOPPING=1", timeout=10)
        tls.sendall(f"Authorization: {basic('admin', 'admin-pw')}\r\n\r\n".encode())
        resp = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        resp.begin()
        assert resp.status == 201, resp.read()
        assert resp.getheader("Connection") == "close"
        resp.read()
    finally:
        tls.close()
    assert d.proc is not None and d.proc.wait(30) == 0
    assert d.chain_rules("f2b-web") == ["-A f2b-web -s 203.0.113.45/32 -j DROP"]


@pytest.mark.root
def test_sigint_exits_0(running: Daemon) -> None:
    assert running.request("PUT", "/chain/f2b-web/ipv4/203.0.113.11").status == 201
    running.drain_notify()
    assert running.stop(signal.SIGINT) == 0
    assert any("STOPPING=1" in msg.split("\n") for msg in running.drain_notify())
    assert running.chain_rules("f2b-web") == ["-A f2b-web -s 203.0.113.11/32 -j DROP"]


# --- systemd ----------------------------------------------------------------------------------------------


@pytest.mark.root
def test_ready_carries_a_status(daemon: Daemon) -> None:
    daemon.start(wait=False)
    seen = daemon.wait_notify("READY=1")
    status = status_lines([message_with(seen, "READY=1")])
    assert len(status) == 1 and "blocks" in status[0], seen


@pytest.mark.root
def test_watchdog_is_fed(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon.start(wait=False, WATCHDOG_USEC="2000000")
    daemon.wait_notify("READY=1")
    daemon.wait_notify("WATCHDOG=1", timeout=10)
    daemon.wait_notify("WATCHDOG=1", timeout=10)


@pytest.mark.root
def test_unread_notify_socket_never_stalls_the_daemon(daemon: Daemon) -> None:
    # A manager that stops reading fills the datagram queue (about 10 messages); notify must
    # drop messages then, never block: a blocking send would freeze every thread.
    daemon.start()
    for _ in range(15):  # each reload sends RELOADING=1 and READY=1; nobody reads them
        daemon.signal(signal.SIGHUP)
        r = daemon.request("GET", "/version")
        assert r.status == 200, r
    daemon.drain_notify()
    assert daemon.stop() == 0


@pytest.mark.root
def test_socket_activation_through_systemd_socket_activate(daemon: Daemon) -> None:
    d = daemon
    d.config["listen"] = "127.0.0.1:9999"
    # systemd-socket-activate passes on only LISTEN_*, TERM, PATH, USER and HOME; -E NAME copies NAME through.
    d.start(argv=["systemd-socket-activate", "-l", f"127.0.0.1:{PORT}", "-E", "NOTIFY_SOCKET",
                  sys.executable, "-m", "webiptd", "-config", str(d.config_path)], wait=False)
    # It starts the program only on the first connection; this request waits for it to start and answer.
    deadline = time.monotonic() + 10
    while True:
        try:
            first = d.ns.connect("127.0.0.1", PORT, timeout=10)
            break
        except ConnectionRefusedError:  # systemd-socket-activate has not bound its socket yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn = d.connection()
    conn.sock = d.context().wrap_socket(first, server_hostname="127.0.0.1")
    try:
        r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.12", conn=conn)
    finally:
        conn.close()
    assert r.status == 201, r
    seen = d.wait_notify("READY=1")
    assert status_lines([message_with(seen, "READY=1")]), seen
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.12").status == 200
    # The config's own listen address was never bound.
    with pytest.raises(ConnectionRefusedError):
        d.ns.connect("127.0.0.1", 9999, timeout=5)
    assert d.stop() == 0


# --- connections ------------------------------------------------------------------------------------------

# The start of a TLS 1.2 ClientHello record, cut off: the server waits for the rest.
PARTIAL_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + b"\x00" * 16


@pytest.mark.root
def test_silent_and_partial_clients_do_not_stall_others(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"]["request_timeout"] = 30  # far longer than the client timeout below
    d.start()
    silent = [d.ns.connect(host, PORT) for host in ("127.0.0.1", "::1", "127.0.0.1")]
    partial = d.ns.connect("127.0.0.1", PORT)
    partial.sendall(PARTIAL_CLIENT_HELLO)
    try:
        for host in ("127.0.0.1", "::1"):
            # A stalled accept loop would leave these waiting for 30 s; the client gives up after 5.
            conn = d.connection(host=host, timeout=5)
            try:
                assert d.request("GET", "/version", conn=conn).status == 200
                assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.13", conn=conn).status in (200, 201)
            finally:
                conn.close()
        # The silent ones were still open all along.
        for sock in (*silent, partial):
            assert not closed_by_peer(sock, 0.1)
    finally:
        for sock in (*silent, partial):
            sock.close()


@pytest.mark.root
def test_a_full_pool_takes_back_the_oldest_waiting_connection(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"].update(max_connections=3, trusted_clients=[], handshake_timeout=30)
    d.start()
    silent = [d.ns.connect("127.0.0.1", PORT, source=f"127.0.0.{i}") for i in (2, 3, 4)]
    try:
        time.sleep(0.3)  # admitted in order
        # A real client still gets in: it takes back the slot of the oldest silent connection.
        r = request_until_served(d, time.monotonic() + 10)
        assert r.status == 200, r
        assert closed_by_peer(silent[0], 5), "the oldest silent connection kept its slot"
        assert not closed_by_peer(silent[2], 0.1)
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.root
def test_per_client_cap(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"].update(max_connections_per_client=2, trusted_clients=[], handshake_timeout=30)
    d.start()
    held = [d.ns.connect("127.0.0.1", PORT) for _ in range(2)]
    try:
        time.sleep(0.3)
        third = d.ns.connect("127.0.0.1", PORT)
        assert closed_by_peer(third, 5), "the connection over the per-client cap was not closed"
        third.close()
        for sock in held:
            assert not closed_by_peer(sock, 0.1)
        # Another address is a client of its own.
        other = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, source="127.0.0.2"),
                                        server_hostname="127.0.0.1")
        try:
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert other.recv(100).startswith(b"HTTP/1.1 200 ")
        finally:
            other.close()
    finally:
        for sock in held:
            sock.close()
    assert "over the per-client limit" in d.log()


@pytest.mark.root
def test_idle_and_silent_connections_are_closed_at_their_phase_deadlines(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"].update(idle_timeout=3, handshake_timeout=2)
    d.start()
    silent = d.ns.connect("127.0.0.1", PORT)
    conn = d.connection()
    try:
        assert d.request("GET", "/version", conn=conn).status == 200
        start = time.monotonic()
        assert closed_by_peer(silent, 15), "a silent connection was never closed"
        assert closed_by_peer(conn.sock, 15), "an idle keep-alive connection was never closed"
        # Kept alive for a while, not closed straight after the response.
        assert time.monotonic() - start > 1.5
    finally:
        conn.close()
        silent.close()


@pytest.mark.root
def test_a_trickled_request_head_is_closed_at_the_header_deadline(daemon: Daemon) -> None:
    d = daemon
    d.config["limits"].update(header_timeout=2, request_timeout=30)
    d.start()
    tls = d.context().wrap_socket(d.ns.connect("127.0.0.1", PORT, timeout=10), server_hostname="127.0.0.1")
    try:
        tls.sendall(b"GET /health HTTP/1.1\r\n")
        start = time.monotonic()
        closed = False
        for i in range(40):  # a header line every 0.25 s: no single read ever waits long
            try:
                tls.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                closed = True
                break
            time.sleep(0.25)
        assert closed or closed_by_peer(tls, 1), "a head that trickles in kept its connection"
        assert time.monotonic() - start < 6
    finally:
        tls.close()


@pytest.mark.root
def test_keep_alive_serves_many_requests_on_one_connection(running: Daemon) -> None:
    d = running
    conn = d.connection()
    try:
        first = None
        for i in range(200):
            addr = f"203.0.113.{i // 4 + 1}"
            method, path = [("PUT", f"/chain/f2b-web/ipv4/{addr}"), ("GET", f"/chain/f2b-web/ipv4/{addr}"),
                            ("DELETE", f"/chain/f2b-web/ipv4/{addr}"), ("GET", "/version")][i % 4]
            r = d.request(method, path, conn=conn)
            assert r.status in (200, 201), (i, r)
            assert r.headers.get("Connection") != "close"
            first = first or conn.sock
            assert conn.sock is first, f"reconnected at request {i}"
    finally:
        conn.close()
    assert d.chain_rules("f2b-web") == []


# --- the command line (never touches the firewall, so it runs outside any namespace) ----------------------


def web_ipt_d(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("web-ipt-d")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "webiptd"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version(flag: str) -> None:
    result = web_ipt_d(flag)
    assert result.returncode == 0, result
    assert result.stdout == f"web-ipt-d {__version__}\n"


@pytest.mark.parametrize("flag", ["-help", "--help", "-h"])
def test_help(flag: str) -> None:
    result = web_ipt_d(flag)
    assert result.returncode == 0, result
    for name in ("-config", "-version", "-write_config", "-check_config", "-hash_password"):
        assert name in result.stdout


def test_write_config(tmp_path: Path) -> None:
    result = web_ipt_d("-write_config", cwd=tmp_path)
    assert result.returncode == 0, result
    written = tmp_path / "config.yaml"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    sample = (REPO / "src" / "webiptd" / "sample-config.yaml").read_text(encoding="utf-8")
    assert written.read_text(encoding="utf-8") == sample

    written.write_text(sample + "# edited by hand\n", encoding="utf-8")
    result = web_ipt_d("--write_config", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "config.yaml" in result.stderr
    assert written.read_text(encoding="utf-8").endswith("# edited by hand\n")

    # The sample's password is a placeholder, so it cannot be used as it is.
    result = web_ipt_d("-check_config", "-config", "config.yaml", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "users.fail2ban.password_hash" in result.stderr


def test_etc_sample_is_the_packaged_sample() -> None:
    assert (REPO / "etc" / "config.yaml").read_bytes() == (REPO / "src" / "webiptd" / "sample-config.yaml").read_bytes()


@pytest.mark.parametrize("flags", [("-check_config", "-config"), ("--check_config", "--config")])
def test_check_config_accepts_a_good_config(flags: tuple[str, str], workdir: Path, pki: PKI,
                                             user_hashes: dict[str, str]) -> None:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(base_config(workdir, pki, user_hashes)), encoding="utf-8")
    result = web_ipt_d(flags[0], flags[1], str(path))
    assert result.returncode == 0, result
    assert "ok" in result.stdout


def test_check_config_lists_every_problem_by_key(workdir: Path, pki: PKI, user_hashes: dict[str, str]) -> None:
    config = base_config(workdir, pki, user_hashes)
    config["bogus_key"] = 1
    config["tls"]["min_version"] = "1.1"
    config["tls"]["client_ca"] = str(workdir / "missing-ca.crt")
    config["never_block"] = ["127.0.0.0/8", "not-a-network"]
    config["limits"]["max_connections"] = 0
    config["chains"]["f2b-web"]["target"] = "ALLOW"
    config["users"]["admin"]["read_only"] = "yes"
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")

    result = web_ipt_d("-check_config", "-config", str(path))
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    keys = ["bogus_key", "tls.min_version", "tls.client_ca", "never_block[1]", "limits.max_connections",
            "chains.f2b-web.target", "users.admin.read_only"]
    for key in keys:
        assert sum(f": {key}:" in line for line in lines) == 1, (key, lines)
    assert len(lines) == len(keys), lines


@pytest.mark.parametrize("breakage", ["key_of_another_cert", "garbage_cert"])
def test_check_config_loads_the_cert_and_key(breakage: str, workdir: Path, pki: PKI,
                                             user_hashes: dict[str, str]) -> None:
    config = base_config(workdir, pki, user_hashes)
    if breakage == "key_of_another_cert":
        config["tls"]["key"] = str(pki.client_key)
    else:
        garbage = workdir / "garbage.crt"
        garbage.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        config["tls"]["cert"] = str(garbage)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = web_ipt_d("-check_config", "-config", str(path))
    assert result.returncode == 1, result
    assert ": tls.cert:" in result.stderr or ": tls.key:" in result.stderr, result.stderr


def test_hash_password_reads_stdin() -> None:
    result = web_ipt_d("-hash_password", input="correct horse battery\n")
    assert result.returncode == 0, result
    hashed = result.stdout.strip()
    assert hashed.startswith("$2b$"), hashed  # bcrypt by default
    ctx = CryptContext(schemes=["bcrypt", "argon2", "sha512_crypt"])
    assert ctx.verify("correct horse battery", hashed)
    assert not ctx.verify("correct horse", hashed)
