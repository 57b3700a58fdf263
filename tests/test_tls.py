"""TLS against the real daemon in a private namespace: verification with the test CA, TLS < 1.2 refused,
min_version 1.3, certificate rotation on SIGHUP, plain HTTP on loopback only, and client certificates.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PKI, PORT, Daemon, make_pki

pytestmark = pytest.mark.root


def handshake(daemon: Daemon, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> ssl.SSLSocket:
    """A TLS connection to the daemon in its namespace, handshake done (raises on failure)."""
    sock = daemon.ns.connect(host, PORT, timeout=10)
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def issuer_cn(tls: ssl.SSLSocket) -> str:
    cert: Any = tls.getpeercert()
    return dict(pair[0] for pair in cert["issuer"])["commonName"]


def legacy_client(pki: PKI, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that would accept TLS 1.0/1.1: OpenSSL 3's default security level forbids it client-side too."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca))
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = maximum
    return ctx


def test_verifying_client_with_the_test_ca(running: Daemon) -> None:
    for host in ("127.0.0.1", "::1"):
        with handshake(running, running.context(), host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert issuer_cn(tls) == "web-ipt-d test CA"
    r = running.request("GET", "/version")
    assert r.status == 200, r


def test_client_that_does_not_trust_the_ca_fails_verification(running: Daemon, workdir: Path) -> None:
    stranger = make_pki(workdir / "stranger", "stranger")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(running, stranger.client_context())
    # A context with only the system trust store does not know the test CA either.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(running, ssl.create_default_context())


@pytest.mark.parametrize("maximum", ["TLSv1", "TLSv1_1"])
def test_tls_below_1_2_is_refused_by_the_server(running: Daemon, maximum: str) -> None:
    ctx = legacy_client(running.pki, getattr(ssl.TLSVersion, maximum))
    with pytest.raises(ssl.SSLError) as info:
        handshake(running, ctx)
    # The alert comes from the server: the client offered the old version and was refused.
    # (Had the client refused on its own, the reason would be NO_PROTOCOLS_AVAILABLE or similar.)
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", info.value
    # The same daemon still serves a modern client.
    assert running.request("GET", "/version").status == 200


def test_min_version_1_3_refuses_a_tls_1_2_client(daemon: Daemon) -> None:
    daemon.config["tls"]["min_version"] = "1.3"
    daemon.start()
    with pytest.raises(ssl.SSLError) as info:
        handshake(daemon, daemon.context(maximum_version=ssl.TLSVersion.TLSv1_2))
    assert info.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", info.value
    with handshake(daemon, daemon.context()) as tls:
        assert tls.version() == "TLSv1.3"


def test_sighup_rotates_the_certificate_without_a_restart(running: Daemon, workdir: Path) -> None:
    d = running
    pid = d.proc.pid if d.proc else None
    before = d.connection()
    assert d.request("GET", "/version", conn=before).status == 200

    second = make_pki(workdir / "second", "second")
    d.config["tls"]["cert"] = str(second.server_cert)
    d.config["tls"]["key"] = str(second.server_key)
    d.reload()

    assert d.proc is not None and d.proc.poll() is None and d.proc.pid == pid
    with handshake(d, second.client_context()) as tls:
        assert issuer_cn(tls) == "web-ipt-d second CA"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(d, d.pki.client_context())
    r = d.request("GET", "/version", conn=d.connection(ctx=second.client_context()))
    assert r.status == 200, r
    # A keep-alive connection made before the reload keeps working on its own session.
    assert d.request("GET", "/version", conn=before).status == 200
    before.close()


def test_plain_http_on_loopback(daemon: Daemon) -> None:
    del daemon.config["tls"]
    daemon.config["plain_http"] = True
    daemon.start()
    for host in ("127.0.0.1", "::1"):
        conn = daemon.ns.http_connection(host, PORT, timeout=10)
        try:
            r = daemon.request("GET", "/chains", conn=conn)
            assert r.status == 200, r
            assert {c["name"] for c in r.json["chains"]} == {"f2b-web", "f2b-ssh", "admin-list"}
            assert daemon.request("GET", "/chains", user=None, conn=conn).status == 401
        finally:
            conn.close()


def web_ipt_d() -> list[str]:
    script = Path(sys.executable).with_name("web-ipt-d")
    return [str(script)] if script.exists() else [sys.executable, "-m", "webiptd"]


@pytest.mark.parametrize("listen", ["0.0.0.0:8820", "198.51.100.1:8820", "[::]:8820"])
def test_plain_http_on_a_non_loopback_address_is_rejected(daemon: Daemon, listen: str) -> None:
    # -check_config never binds or touches netfilter, so it runs directly, outside the namespace.
    del daemon.config["tls"]
    daemon.config.update(plain_http=True, listen=["127.0.0.1:8820", listen])
    daemon.write_config()
    result = subprocess.run([*web_ipt_d(), "-check_config", "-config", str(daemon.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "plain_http" in result.stderr, result.stderr
    # The daemon itself refuses to start on it too.
    daemon.start(wait=False)
    assert daemon.proc is not None and daemon.proc.wait(30) == 1
    assert "plain_http" in daemon.stderr()


@pytest.fixture
def client_ca_daemon(daemon: Daemon) -> Daemon:
    daemon.config["tls"]["client_ca"] = str(daemon.pki.ca)
    daemon.start()
    return daemon


def test_client_certificate_required_when_client_ca_is_set(client_ca_daemon: Daemon, workdir: Path) -> None:
    d = client_ca_daemon
    # Without a certificate: refused. With TLS 1.3 the refusal may only show on the first read.
    for ctx in (d.context(), d.context(maximum_version=ssl.TLSVersion.TLSv1_2)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            d.request("GET", "/version", conn=d.connection(ctx=ctx))
    # A certificate from another CA: refused as well.
    other = make_pki(workdir / "other", "other")
    ctx = d.context()
    ctx.load_cert_chain(str(other.client_cert), str(other.client_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        d.request("GET", "/version", conn=d.connection(ctx=ctx))

    ctx = d.context()
    ctx.load_cert_chain(str(d.pki.client_cert), str(d.pki.client_key))
    conn = d.connection(ctx=ctx)
    try:
        # The certificate does not replace Basic auth.
        r = d.request("GET", "/version", user=None, conn=conn)
        assert r.status == 401, r
        assert r.headers["WWW-Authenticate"].startswith('Basic realm="web-ipt-d"')
        r = d.request("GET", "/version", conn=conn)
        assert r.status == 200, r
    finally:
        conn.close()

