"""`web-ipt-d -gen_certs` (files, modes, SANs, CA reuse, errors) and client certificates: the generated
PKI serving a real daemon in a namespace, and `tls.client_cert_auth` (config checks, App, end to end).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.conftest import PASSWORDS, PKI, PORT, Daemon
from webiptd import certs, cli
from webiptd.auth import Authenticator
from webiptd.passwords import context as crypt_context
from webiptd.config import ConfigError, from_mapping
from webiptd.http.app import App, Generation, Runtime

FAST_HASH = crypt_context().using(bcrypt__rounds=4)
REPO = Path(__file__).resolve().parents[1]
KEYS = ("ca.key", "server.key", "client.key")


def gen(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def spki(obj: Any) -> bytes:
    return obj.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def sans(cert: x509.Certificate) -> tuple[list[str], list[Any]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.IPAddress)


def eku(cert: x509.Certificate) -> list[Any]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()} if directory.exists() else {}


# -- -gen_certs: files, modes, SANs ---------------------------------------------------------


def test_gen_certs_writes_a_ca_a_server_and_a_client_certificate(tmp_path: Path) -> None:
    out = tmp_path / "new" / "pki"  # the parent is missing too
    code, stdout, stderr = gen("-gen_certs", str(out), "-host", "localhost", "-host", "127.0.0.1",
                               "-host", "::1", "-host", "API.Example.org", "-host", "*.example.net")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(certs.FILES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in KEYS:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    for name in certs.FILES:
        assert str(out / name) in stdout, name  # it says what it wrote

    ca, server, client = (load_cert(out / f"{n}.crt") for n in ("ca", "server", "client"))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for leaf, key in ((server, "server.key"), (client, "client.key")):
        leaf.verify_directly_issued_by(ca)
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        assert spki(leaf) == spki(load_key(out / key))
    assert spki(ca) == spki(load_key(out / "ca.key"))

    dns, ips = sans(server)
    assert dns == ["localhost", "api.example.org", "*.example.net"]
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cn(client) == certs.DEFAULT_CLIENT_NAME == "web-ipt-d-client"
    assert eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    # The files load the way the daemon and a client load them.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(out / "server.crt"), str(out / "server.key"))
    server_ctx.load_verify_locations(cafile=str(out / "ca.crt"))
    client_ctx = ssl.create_default_context(cafile=str(out / "ca.crt"))
    client_ctx.load_cert_chain(str(out / "client.crt"), str(out / "client.key"))


def test_second_run_reuses_the_ca_and_replaces_the_leaves(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert gen("-gen_certs", str(out), "-host", "old.example")[0] == 0
    first = snapshot(out)
    code, stdout, stderr = gen("--gen_certs", str(out), "--host", "new.example", "--host", "198.51.100.7",
                               "--client_name", "admin")
    assert code == 0, stderr
    second = snapshot(out)
    # The CA is untouched, byte for byte: same key, same certificate (same fingerprint).
    assert second["ca.crt"] == first["ca.crt"] and second["ca.key"] == first["ca.key"]
    ca = load_cert(out / "ca.crt")
    assert "reused" in stdout and certs.fingerprint(ca) in stdout
    # Server and client are new, from the same CA, with the new names.
    for name in ("server.crt", "server.key", "client.crt", "client.key"):
        assert second[name] != first[name], name
    server, client = load_cert(out / "server.crt"), load_cert(out / "client.crt")
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    assert sans(server) == (["new.example"], [ipaddress.ip_address("198.51.100.7")])
    assert cn(client) == "admin"
    assert spki(server) == spki(load_key(out / "server.key"))
    for name in KEYS:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    assert sorted(second) == sorted(certs.FILES)  # no temporary files left behind


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "etc"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    (out / "config.yaml").write_text("kept\n")
    assert gen("-gen_certs", str(out), "-host", "localhost")[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert (out / "config.yaml").read_text() == "kept\n"


def test_a_ca_of_your_own_is_reused_and_never_outlived(tmp_path: Path) -> None:
    """An RSA CA made elsewhere, expiring in 30 days: leaves are signed by it and expire with it."""
    out = tmp_path / "pki"
    out.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    certs.write_cert(out / "ca.crt", ca)
    certs.write_key(out / "ca.key", key)
    code, _, stderr = gen("-gen_certs", str(out), "-host", "fw.corp.example")
    assert code == 0, stderr
    for leaf in (load_cert(out / "server.crt"), load_cert(out / "client.crt")):
        leaf.verify_directly_issued_by(ca)
        assert certs.not_after(leaf) <= certs.not_after(ca)


# -- -gen_certs: errors ---------------------------------------------------------------------


def test_no_host_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    code, stdout, stderr = gen("-gen_certs", str(out))
    assert code == 1
    assert "-host" in stderr and stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("host", [
    "bad_host.example", "1.2.3.999", "-lead.example", "trail-.example", "a..b", "[::1]", "example.com.",
    "ünïcode.example", "x" * 64 + ".example", "*", "*.com", "a.*.example", "", "10.0.0.0/8",
])
def test_a_bad_host_is_an_error_naming_it(tmp_path: Path, host: str) -> None:
    out = tmp_path / "pki"
    code, stdout, stderr = gen("-gen_certs", str(out), "-host", "good.example", f"-host={host}")
    assert code == 1
    assert repr(host) in stderr, stderr
    assert "good.example" not in stderr  # only the bad one is named
    assert not out.exists()


@pytest.mark.parametrize("present", ["ca.crt", "ca.key"])
def test_half_a_ca_is_an_error_and_nothing_is_overwritten(tmp_path: Path, present: str) -> None:
    source = tmp_path / "source"
    assert gen("-gen_certs", str(source), "-host", "localhost")[0] == 0
    out = tmp_path / "pki"
    out.mkdir()
    shutil.copy(source / present, out / present)
    before = snapshot(out)
    code, stdout, stderr = gen("-gen_certs", str(out), "-host", "localhost")
    assert code == 1
    missing = "ca.key" if present == "ca.crt" else "ca.crt"
    assert str(out / present) in stderr and missing in stderr, stderr
    assert snapshot(out) == before


def test_a_ca_and_a_key_that_do_not_match_are_an_error(tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert gen("-gen_certs", str(tmp_path / name), "-host", "localhost")[0] == 0
    out = tmp_path / "pki"
    out.mkdir()
    shutil.copy(tmp_path / "one" / "ca.crt", out / "ca.crt")
    shutil.copy(tmp_path / "two" / "ca.key", out / "ca.key")
    before = snapshot(out)
    code, _, stderr = gen("-gen_certs", str(out), "-host", "localhost")
    assert code == 1
    assert "do not match" in stderr and str(out / "ca.crt") in stderr, stderr
    assert snapshot(out) == before


def test_a_leaf_certificate_is_not_taken_for_a_ca(tmp_path: Path) -> None:
    source = tmp_path / "source"
    assert gen("-gen_certs", str(source), "-host", "localhost")[0] == 0
    out = tmp_path / "pki"
    out.mkdir()
    shutil.copy(source / "server.crt", out / "ca.crt")
    shutil.copy(source / "server.key", out / "ca.key")
    code, _, stderr = gen("-gen_certs", str(out), "-host", "localhost")
    assert code == 1
    assert "not a CA" in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key"]


def test_garbage_and_encrypted_ca_files_are_errors(tmp_path: Path) -> None:
    source = tmp_path / "source"
    assert gen("-gen_certs", str(source), "-host", "localhost")[0] == 0
    out = tmp_path / "pki"
    out.mkdir()
    shutil.copy(source / "ca.crt", out / "ca.crt")
    (out / "ca.key").write_bytes(load_key(source / "ca.key").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    code, _, stderr = gen("-gen_certs", str(out), "-host", "localhost")
    assert code == 1 and "encrypted" in stderr, stderr
    (out / "ca.key").write_text("not a key\n")
    code, _, stderr = gen("-gen_certs", str(out), "-host", "localhost")
    assert code == 1 and str(out / "ca.key") in stderr, stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key"]


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 65, "ünï"])
def test_a_bad_client_name_is_an_error(tmp_path: Path, name: str) -> None:
    code, _, stderr = gen("-gen_certs", str(tmp_path / "pki"), "-host", "localhost", "-client_name", name)
    assert code == 1 and "-client_name" in stderr, stderr
    assert not (tmp_path / "pki").exists()


def test_dir_that_is_a_file_and_host_without_gen_certs_are_errors(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    code, _, stderr = gen("-gen_certs", str(afile), "-host", "localhost")
    assert code == 1 and "not a directory" in stderr
    for argv in (["-host", "localhost"], ["-client_name", "admin"]):
        code, _, stderr = gen(*argv)
        assert code == 1 and "-gen_certs" in stderr, argv


def test_help_documents_the_flags() -> None:
    text = cli.build_parser().format_help()
    for flag in ("-gen_certs DIR", "-host NAME", "-client_name NAME", certs.DEFAULT_CLIENT_NAME):
        assert flag in text, flag
    assert "reused" in text and "replaced" in text  # what a second run does


# -- tls.client_cert_auth: config checks (pure) ----------------------------------------------


@pytest.fixture
def raw(tmp_path: Path, pki: PKI) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:8443"],
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca)},
        "state_dir": str(tmp_path),
        "log": {"file": None},
        "users": {
            "admin": {"password_hash": FAST_HASH.hash(PASSWORDS["admin"]), "chains": ["*"]},
            "f2b": {"password_hash": FAST_HASH.hash(PASSWORDS["f2b"]), "chains": ["f2b-*"]},
            "reader": {"password_hash": FAST_HASH.hash(PASSWORDS["reader"]), "chains": ["*"], "read_only": True},
            "faraway": {"password_hash": FAST_HASH.hash(PASSWORDS["faraway"]), "chains": ["*"],
                        "allow_from": ["203.0.113.0/24"]},
        },
        "chains": {"f2b-web": {}, "admin-list": {}},
    }


def problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(raw, tmp_path / "config.yaml")
    return info.value.problems


def test_client_cert_auth_defaults_to_false(raw: dict[str, Any], tmp_path: Path) -> None:
    cfg = from_mapping(raw, tmp_path / "config.yaml")
    assert cfg.tls is not None and cfg.tls.client_cert_auth is False
    raw["tls"]["client_cert_auth"] = True
    cfg = from_mapping(raw, tmp_path / "config.yaml")
    assert cfg.tls is not None and cfg.tls.client_cert_auth is True


def test_client_cert_auth_without_client_ca_is_an_error_naming_the_key(raw: dict[str, Any], tmp_path: Path) -> None:
    del raw["tls"]["client_ca"]
    raw["tls"]["client_cert_auth"] = True
    found = problems(raw, tmp_path)
    assert len(found) == 1 and found[0].startswith("tls.client_cert_auth:") and "tls.client_ca" in found[0], found
    raw["tls"]["client_ca"] = None
    assert problems(raw, tmp_path) == found
    raw["tls"]["client_cert_auth"] = False
    from_mapping(raw, tmp_path / "config.yaml")  # false needs no CA


@pytest.mark.parametrize("value", ["yes", 1, "true", []])
def test_client_cert_auth_must_be_a_boolean(raw: dict[str, Any], tmp_path: Path, value: Any) -> None:
    raw["tls"]["client_cert_auth"] = value
    assert any(p.startswith("tls.client_cert_auth:") and "true or false" in p for p in problems(raw, tmp_path))


def test_the_two_sample_configs_document_client_cert_auth() -> None:
    sample = (REPO / "src" / "webiptd" / "sample-config.yaml").read_text(encoding="utf-8")
    assert (REPO / "etc" / "config.yaml").read_text(encoding="utf-8") == sample
    assert yaml.safe_load(sample)["tls"]["client_cert_auth"] is False


# -- tls.client_cert_auth: App (pure) ----------------------------------------------------------


class NoWorker:
    """The routes used below never reach the firewall."""

    def submit(self, command: Any) -> Any:
        raise AssertionError(f"unexpected firewall command {command!r}")


def app_for(raw: dict[str, Any], tmp_path: Path) -> App:
    cfg = from_mapping(raw, tmp_path / "config.yaml")
    return App(Runtime(Generation(cfg, Authenticator(cfg.users)), NoWorker()))  # type: ignore[arg-type]


def basic(user: str, password: str | None = None) -> str:
    pw = PASSWORDS[user] if password is None else password
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


LOCAL = ipaddress.ip_address("198.51.100.2")


def visible_chains(app: App, authorization: str | None, cn: str | None) -> Any:
    r = app.handle("GET", "/chains", authorization, LOCAL, cn)
    return r.status, sorted(c["name"] for c in r.body["chains"]) if r.status == 200 else r.body["error"]


def test_app_certificate_logs_in_only_when_client_cert_auth_is_true(raw: dict[str, Any], tmp_path: Path) -> None:
    off = app_for(raw, tmp_path)
    assert off.handle("GET", "/version", None, LOCAL, "admin").status == 401
    assert off.handle("GET", "/version", basic("admin"), LOCAL, "admin").status == 200
    raw["tls"]["client_cert_auth"] = True
    on = app_for(raw, tmp_path)
    assert visible_chains(on, None, "admin") == (200, ["admin-list", "f2b-web"])
    assert visible_chains(on, None, "f2b") == (200, ["f2b-web"])
    # No certificate, or one naming no user (names are matched exactly): Basic as usual.
    for name in (None, "nobody", "Admin", ""):
        r = on.handle("GET", "/version", None, LOCAL, name)
        assert r.status == 401 and dict(r.headers)["WWW-Authenticate"].startswith("Basic"), name
        assert on.handle("GET", "/version", basic("admin"), LOCAL, name).status == 200
    # Credentials that are sent win, and are checked: a wrong password is a 401 despite the certificate.
    assert visible_chains(on, basic("f2b"), "admin") == (200, ["f2b-web"])
    assert on.handle("GET", "/version", basic("admin", "wrong"), LOCAL, "admin").status == 401


def test_app_per_user_restrictions_hold_for_certificate_logins(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["tls"]["client_cert_auth"] = True
    app = app_for(raw, tmp_path)
    r = app.handle("PUT", "/chain/f2b-web/ipv4/203.0.113.9", None, LOCAL, "reader")
    assert (r.status, r.body["error"]) == (403, "read_only")
    r = app.handle("PUT", "/chain/admin-list/ipv4/203.0.113.9", None, LOCAL, "f2b")
    assert (r.status, r.body["error"]) == (403, "forbidden")
    assert app.handle("GET", "/version", None, LOCAL, "faraway").status == 403
    assert app.handle("GET", "/version", None, ipaddress.ip_address("203.0.113.5"), "faraway").status == 200


def test_app_without_tls_ignores_a_certificate_name(raw: dict[str, Any], tmp_path: Path) -> None:
    del raw["tls"]
    raw["plain_http"] = True
    assert app_for(raw, tmp_path).handle("GET", "/version", None, LOCAL, "admin").status == 401


# -- the generated PKI against the real daemon --------------------------------------------------

CERT_USERS = ("admin", "reader", "f2b", "faraway", certs.DEFAULT_CLIENT_NAME)


@pytest.fixture(scope="module")
def genpki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PKI made by the real command, then client certificates for several CNs from the same CA.

    <cn>.crt / <cn>.key are client.crt / client.key copied aside after each run.
    """
    out = tmp_path_factory.mktemp("genpki") / "pki"
    hosts = ["-host", "localhost", "-host", "127.0.0.1", "-host", "::1"]
    for name in CERT_USERS:
        if name == CERT_USERS[0]:
            done = subprocess.run([sys.executable, "-m", "webiptd", "-gen_certs", str(out), *hosts,
                                   "-client_name", name], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
        else:
            assert gen("-gen_certs", str(out), *hosts, "-client_name", name)[0] == 0
        shutil.copy(out / "client.crt", out / f"{name}.crt")
        shutil.copy(out / "client.key", out / f"{name}.key")
    return out


def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def as_cn(genpki: Path, name: str) -> ssl.SSLContext:
    return client_ctx(genpki / "ca.crt", genpki / f"{name}.crt", genpki / f"{name}.key")


@pytest.fixture
def gendaemon(daemon: Daemon, genpki: Path) -> Daemon:
    """The daemon on the generated server certificate, requiring client certificates from the generated CA."""
    daemon.config["tls"] = {"cert": str(genpki / "server.crt"), "key": str(genpki / "server.key"),
                            "client_ca": str(genpki / "ca.crt")}
    return daemon


def refused(d: Daemon, ctx: ssl.SSLContext) -> bool:
    try:
        d.request("GET", "/version", conn=d.connection(ctx=ctx))
    except (ssl.SSLError, ConnectionError):
        return True
    return False


@pytest.mark.root
def test_generated_certs_serve_and_basic_stays_required_by_default(gendaemon: Daemon, genpki: Path,
                                                                   pki: PKI) -> None:
    d = gendaemon
    d.start()
    admin = as_cn(genpki, "admin")
    # The server certificate verifies for every -host: by IP, and by DNS name.
    for host, server_hostname in (("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("127.0.0.1", "localhost")):
        sock = d.ns.connect(host, PORT, timeout=10)
        with admin.wrap_socket(sock, server_hostname=server_hostname) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    conn = d.connection(ctx=admin)
    try:
        r = d.request("GET", "/version", user=None, conn=conn)
        assert r.status == 401, r  # client_cert_auth is false: the certificate alone is not enough
        assert d.request("GET", "/version", conn=conn).status == 200
    finally:
        conn.close()
    # Without a client certificate, or with one from another CA: refused at the handshake.
    assert refused(d, client_ctx(genpki / "ca.crt"))
    assert refused(d, client_ctx(genpki / "ca.crt", pki.client_cert, pki.client_key))


@pytest.mark.root
def test_client_cert_auth_logs_in_by_certificate(gendaemon: Daemon, genpki: Path, pki: PKI) -> None:
    d = gendaemon
    d.config["tls"]["client_cert_auth"] = True
    d.start()

    def call(name: str, method: str, path: str, user: str | None = None, password: str | None = None) -> Any:
        return d.request(method, path, user=user, password=password, conn=d.connection(ctx=as_cn(genpki, name)))

    assert call("admin", "GET", "/version").status == 200
    r = call("admin", "PUT", "/chain/admin-list/ipv4/203.0.113.7")
    assert r.status == 201, r
    assert any("203.0.113.7/32" in rule for rule in d.chain_rules("admin-list")), d.rules()
    assert any("user=admin " in line and "network=203.0.113.7/32" in line for line in d.log().splitlines())
    # A password that is sent is checked, certificate or not.
    assert call("admin", "GET", "/version", user="admin", password="wrong").status == 401

    r = call("reader", "GET", "/chain/admin-list/ipv4/203.0.113.7")
    assert r.status == 200, r
    r = call("reader", "PUT", "/chain/f2b-web/ipv4/203.0.113.8")
    assert (r.status, r.json["error"]) == (403, "read_only")
    r = call("f2b", "PUT", "/chain/admin-list/ipv4/203.0.113.8")
    assert (r.status, r.json["error"]) == (403, "forbidden")
    assert call("f2b", "PUT", "/chain/f2b-web/ipv4/203.0.113.8").status == 201
    assert call("faraway", "GET", "/version").status == 403  # allow_from holds
    assert not any("203.0.113.8" in rule for rule in d.chain_rules("admin-list") + d.chain_rules("f2b-ssh"))

    # A certificate that names no user: Basic as usual.
    nobody = certs.DEFAULT_CLIENT_NAME
    r = call(nobody, "GET", "/version")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic"), r
    assert call(nobody, "GET", "/version", user="admin").status == 200

    assert refused(d, client_ctx(genpki / "ca.crt"))
    assert refused(d, client_ctx(genpki / "ca.crt", pki.client_cert, pki.client_key))


@pytest.mark.root
def test_reload_switches_certificate_logins_even_on_open_connections(gendaemon: Daemon, genpki: Path,
                                                                     pki: PKI) -> None:
    d = gendaemon
    d.config["tls"]["client_cert_auth"] = True
    d.config["limits"]["request_timeout"] = 30  # keep the connections open across the reloads
    d.start()
    opened = d.connection(ctx=as_cn(genpki, "admin"))
    try:
        assert d.request("GET", "/version", user=None, conn=opened).status == 200
        # A reload with the same client CA keeps the open connection's certificate login.
        d.config["users"]["extra"] = dict(d.config["users"]["reader"])
        d.reload()
        assert d.request("GET", "/version", user=None, conn=opened).status == 200
        d.config["tls"]["client_cert_auth"] = False
        d.reload()
        assert d.request("GET", "/version", user=None, conn=opened).status == 401
        assert d.request("GET", "/version", user=None, conn=d.connection(ctx=as_cn(genpki, "admin"))).status == 401
        d.config["tls"]["client_cert_auth"] = True
        d.reload()
        assert d.request("GET", "/version", user=None, conn=opened).status == 200
        # A new client CA: the connection verified against the old one no longer logs in by certificate,
        # and new connections with the old CA's certificates are refused.
        d.config["tls"]["client_ca"] = str(pki.ca)
        d.reload()
        assert d.request("GET", "/version", user=None, conn=opened).status == 401
        assert d.request("GET", "/version", conn=opened).status == 200  # Basic still works
        assert refused(d, as_cn(genpki, "admin"))
    finally:
        opened.close()
