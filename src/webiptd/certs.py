"""Certificates for first runs and tests: a small CA and the server and client certificates it signs.

`generate` is what `web-ipt-d -gen_certs` runs. Uses the `cryptography` package; keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey
IssuerKey = CertificateIssuerPrivateKeyTypes
ISSUER_KEY_CLASSES = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, dsa.DSAPrivateKey,
                      ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

DEFAULT_CLIENT_NAME = "web-ipt-d-client"
FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")
# A client certificate's CN can name a config user (tls.client_cert_auth), so it obeys the user-name rule.
CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
# RFC 1123 host name labels; a leftmost "*" label is a wildcard (RFC 6125 section 6.4.3).
DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
MAX_CN = 64  # ub-common-name, RFC 5280 appendix A


class CertError(Exception):
    """A problem -gen_certs reports and stops on; the message names the file or the value."""


def new_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _signing_hash(key: IssuerKey) -> hashes.SHA256 | None:
    # Ed25519 and Ed448 sign the message itself; every other key type signs a SHA-256 digest.
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def not_after(cert: x509.Certificate) -> datetime.datetime:
    # not_valid_after_utc is cryptography >= 42; older ones give a naive UTC datetime.
    moment = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.timezone.utc)


def make_ca(common_name: str = "web-ipt-d CA", days: int = 3650) -> tuple[x509.Certificate, Key]:
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def host_name(text: str) -> x509.GeneralName:
    """A SAN for `text`: an IP address, or a DNS name (lower-cased). ValueError says what is wrong."""
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        raise ValueError("give an IPv6 address without brackets")
    if not text.isascii():
        raise ValueError("not an ASCII host name; give an internationalised name in its xn-- (punycode) form")
    name = text.lower()
    labels = name.split(".")
    if len(name) > 253 or not all(DNS_LABEL_RE.match(label) for label in labels[1:]) or not (
            DNS_LABEL_RE.match(labels[0]) or (labels[0] == "*" and len(labels) > 2)):
        raise ValueError("not a DNS name (letters, digits and '-' in dot-separated labels of 1 to 63) "
                         "or an IP address")
    if labels[-1].isdigit():
        raise ValueError("not a valid IP address, and a DNS name cannot end in a numeric label")
    return x509.DNSName(name)


def issue(ca: x509.Certificate, ca_key: IssuerKey, common_name: str, hosts: Iterable[str] = (),
          client: bool = False, days: int = 825) -> tuple[x509.Certificate, Key]:
    """A leaf certificate signed by `ca`: a server one with `hosts` as SANs, or a client one.

    It never outlives the CA, so a reused old CA gives leaves that expire with it.
    """
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    try:
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    expires = min(now + datetime.timedelta(days=days), not_after(ca))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, _signing_hash(ca_key)), key


def _pem_key(key: IssuerKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_key(path: Path, key: IssuerKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(_pem_key(key))
    os.chmod(path, 0o600)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a new file next to `path` (fsynced, `mode`); the caller renames it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have taken bits off; never adds any to a key
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _install(files: list[tuple[Path, bytes, int]]) -> None:
    """Stage every file, then rename them all into place, so a failure never leaves a cert without its key."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _spki(key: x509.Certificate | IssuerKey) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_ca(directory: Path) -> tuple[x509.Certificate, IssuerKey] | None:
    """The CA in `directory` (ca.crt and ca.key), None when neither file exists; CertError if it cannot be used."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if not crt.exists() and not key_path.exists():
        return None
    if not key_path.exists():
        raise CertError(f"{crt} exists without {key_path.name}: cannot sign with it. Put its private key "
                        f"next to it as {key_path.name}, or move {crt.name} away to make a new CA")
    if not crt.exists():
        raise CertError(f"{key_path} exists without {crt.name}: refusing to overwrite a CA key. Put its "
                        f"certificate next to it as {crt.name}, or move {key_path.name} away to make a new CA")
    try:
        ca = x509.load_pem_x509_certificate(crt.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{crt}: not a readable PEM certificate ({exc})") from None
    try:
        ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except TypeError:
        raise CertError(f"{key_path}: the key is encrypted; -gen_certs needs an unencrypted CA key") from None
    except (OSError, ValueError) as exc:
        raise CertError(f"{key_path}: not a readable PEM private key ({exc})") from None
    if not isinstance(ca_key, ISSUER_KEY_CLASSES):
        raise CertError(f"{key_path}: -gen_certs cannot sign with a {type(ca_key).__name__}; "
                        "use an EC, RSA or Ed25519 CA key")
    if _spki(ca) != _spki(ca_key):
        raise CertError(f"{crt} and {key_path.name} do not match: the key is not the certificate's")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{crt} is not a CA certificate (no basicConstraints CA:TRUE)")
    if not_after(ca) <= datetime.datetime.now(datetime.timezone.utc):
        raise CertError(f"{crt} expired on {not_after(ca):%Y-%m-%d}; move ca.crt and ca.key "
                        "away to make a new CA")
    return ca, ca_key


@dataclass(frozen=True)
class Generated:
    """What `generate` did: the CA (new or reused) and the files it wrote, for -gen_certs to print."""

    ca: x509.Certificate
    ca_reused: bool
    server: x509.Certificate
    client: x509.Certificate
    written: tuple[Path, ...]
    replaced: tuple[Path, ...]


def check_hosts(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """SANs for the server certificate, duplicates dropped; CertError naming every bad host."""
    sans: list[x509.GeneralName] = []
    problems = []
    for host in hosts:
        try:
            san = host_name(host)
        except ValueError as exc:
            problems.append(f"-host {host!r}: {exc}")
            continue
        if san not in sans:
            sans.append(san)
    if problems:
        raise CertError("; ".join(problems))
    if not sans:
        raise CertError("give the server's names with -host NAME (a DNS name or an IP address; "
                        "repeat -host for each name clients use)")
    return sans


def generate(directory: Path, hosts: Iterable[str], client_name: str = DEFAULT_CLIENT_NAME) -> Generated:
    """Make (or reuse) the CA in `directory` and issue a new server and client certificate from it.

    ca.crt and ca.key are reused when both exist and are never overwritten; server.* and
    client.* are replaced. Keys are mode 0600; a missing `directory` is created mode 0700.
    """
    sans = check_hosts(hosts)
    if not CLIENT_NAME_RE.match(client_name):
        raise CertError(f"-client_name {client_name!r}: 1 to 64 letters, digits, '.', '-' or '_' "
                        "(it can name a config user)")
    if directory.exists() and not directory.is_dir():
        raise CertError(f"{directory} exists and is not a directory")
    if not directory.exists():
        try:
            directory.mkdir(mode=0o700, parents=True)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise CertError(f"cannot create {directory}: {exc.strerror}") from None
    loaded = load_ca(directory)
    files: list[tuple[Path, bytes, int]] = []
    ca_key: IssuerKey
    if loaded is None:
        ca, ca_key = make_ca()
        files += [(directory / "ca.key", _pem_key(ca_key), 0o600),
                  (directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)]
    else:
        ca, ca_key = loaded
    first = next((str(s.value) for s in sans if isinstance(s, x509.DNSName)), str(sans[0].value))
    server, server_key = issue(ca, ca_key, first if len(first) <= MAX_CN else "web-ipt-d server",
                               [str(s.value) for s in sans])
    client, client_key = issue(ca, ca_key, client_name, client=True)
    for name, cert, key in (("server", server, server_key), ("client", client, client_key)):
        files += [(directory / f"{name}.key", _pem_key(key), 0o600),
                  (directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)]
    replaced = tuple(path for path, _, _ in files if path.exists())
    try:
        _install(files)
    except OSError as exc:
        raise CertError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    return Generated(ca, loaded is not None, server, client, tuple(path for path, _, _ in files), replaced)


def describe(cert: x509.Certificate) -> str:
    """One line for humans: CN, SANs and expiry."""
    cn = ", ".join(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    parts = [f"CN={cn}"]
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        parts.append("SANs " + ", ".join(
            f"{'IP' if isinstance(s, x509.IPAddress) else 'DNS'}:{s.value}" for s in sans))
    except x509.ExtensionNotFound:
        pass
    parts.append(f"valid until {not_after(cert):%Y-%m-%d}")
    return "; ".join(parts)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()
