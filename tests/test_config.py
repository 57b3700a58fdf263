"""Pure tests of webiptd.config: loading, defaults, immutability, and one named problem per bad key.

No root, no network: only files in tmp_path and certificates made with webiptd.certs.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import random
import ssl
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PKI
from webiptd import certs
from webiptd.passwords import context as crypt_context
from webiptd.config import (
    SCHEMA, TLS, Chain, Config, ConfigError, Limits, Listen, Option, Section, User, config_warnings, from_mapping, load,
    sample,
)

REPO = Path(__file__).resolve().parents[1]

FAST_HASH = crypt_context().using(bcrypt__rounds=4)
HASH = FAST_HASH.hash("secret")


@pytest.fixture
def base(tmp_path: Path, pki: PKI) -> dict[str, Any]:
    """A complete, valid config as a plain mapping; tests edit a copy and write it."""
    return {
        "listen": ["127.0.0.1:8443", "[::1]:8443"],
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "min_version": "1.3",
                "client_ca": str(pki.ca)},
        "plain_http": False,
        "state_dir": str(tmp_path / "state"),
        "users": {
            "admin": {"password_hash": HASH, "chains": ["*"], "allow_from": [], "read_only": False},
            "f2b": {"password_hash": HASH, "chains": ["f2b-*"], "allow_from": ["198.51.100.0/24", "2001:db8::/64"]},
            "reader": {"password_hash": HASH, "chains": ["f2b-web"], "read_only": True},
        },
        "chains": {
            "f2b-web": {"hooks": ["INPUT"], "target": "DROP"},
            "f2b-ssh": {"hooks": ["INPUT", "FORWARD"], "target": "REJECT"},
        },
        "never_block": ["127.0.0.0/8", "::1/128", "198.51.100.250/32"],
        "log": {"file": str(tmp_path / "web-ipt-d.log"), "level": "DEBUG"},
        "limits": {"max_connections": 8, "request_timeout": 2.5, "worker_timeout": 3,
                   "auth_failures": 4, "auth_window": 30},
    }


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def problems_of(tmp_path: Path, data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, data))
    assert info.value.problems, "a ConfigError always lists at least one problem"
    return info.value.problems


def has_problem(problems: list[str], key: str, *fragments: str) -> bool:
    """True when one problem starts with `key:` and holds every fragment (the bad value, usually)."""
    return any(p.startswith(f"{key}:") and all(f in p for f in fragments) for p in problems)


# -- a valid config ------------------------------------------------------------------------


def test_full_config_loads_into_values(tmp_path: Path, base: dict[str, Any], pki: PKI) -> None:
    cfg = load(write(tmp_path, base))
    assert cfg.listen == (Listen("127.0.0.1", 8443), Listen("::1", 8443))
    assert [str(x) for x in cfg.listen] == ["127.0.0.1:8443", "[::1]:8443"]
    assert cfg.tls is not None
    assert (cfg.tls.cert, cfg.tls.key, cfg.tls.client_ca) == (pki.server_cert, pki.server_key, pki.ca)
    assert cfg.tls.min_version == "1.3"
    assert isinstance(cfg.ssl_context, ssl.SSLContext)
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED  # client_ca set
    assert cfg.plain_http is False
    assert cfg.state_dir == tmp_path / "state"
    assert sorted(cfg.users) == ["admin", "f2b", "reader"]
    f2b = cfg.users["f2b"]
    assert f2b == User("f2b", HASH, ("f2b-*",),
                       (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/64")), False)
    assert cfg.users["reader"].read_only is True
    assert cfg.chains["f2b-ssh"].hooks == ("INPUT", "FORWARD")
    assert cfg.chains["f2b-ssh"].target == "REJECT"
    assert cfg.never_block[2] == ipaddress.ip_network("198.51.100.250/32")
    assert cfg.log.file == tmp_path / "web-ipt-d.log" and cfg.log.level == "DEBUG"
    assert cfg.limits == Limits(max_connections=8, request_timeout=2.5, worker_timeout=3.0,
                                auth_failures=4, auth_window=30)


def test_config_is_frozen_all_the_way_down(tmp_path: Path, base: dict[str, Any]) -> None:
    cfg = load(write(tmp_path, base))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.plain_http = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.limits.worker_timeout = 99  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.users["admin"].read_only = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chains["f2b-web"].target = "ACCEPT"  # type: ignore[misc]
    assert cfg.tls is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tls.min_version = "1.0"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.users["mallory"] = cfg.users["admin"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del cfg.chains["f2b-web"]  # type: ignore[attr-defined]
    # Sequences are tuples, so nothing can be appended in place either.
    assert isinstance(cfg.never_block, tuple) and isinstance(cfg.users["admin"].chains, tuple)
    assert isinstance(cfg.chains["f2b-web"].hooks, tuple) and isinstance(cfg.listen, tuple)


def test_from_mapping_does_not_keep_the_callers_dicts(tmp_path: Path, base: dict[str, Any]) -> None:
    raw = copy.deepcopy(base)
    cfg = from_mapping(raw, tmp_path / "config.yaml")
    raw["users"]["mallory"] = raw["users"]["admin"]
    raw["chains"]["f2b-web"]["target"] = "REJECT"
    assert "mallory" not in cfg.users
    assert cfg.chains["f2b-web"].target == "DROP"


def test_defaults(tmp_path: Path, pki: PKI) -> None:
    cfg = load(write(tmp_path, {
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
        "state_dir": str(tmp_path / "state"),
        "log": {"file": None},
        "chains": {"f2b-web": {}},
    }))
    assert cfg.listen == (Listen("::", 8820),)
    assert cfg.tls is not None and cfg.tls.min_version == "1.2" and cfg.tls.client_ca is None
    assert cfg.ssl_context is not None and cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE
    assert cfg.plain_http is False
    assert cfg.never_block == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert cfg.limits == Limits(max_connections=128, request_timeout=10.0, worker_timeout=5.0,
                                auth_failures=10, auth_window=60, max_connections_per_client=8,
                                trusted_connections=32, handshake_timeout=5.0, header_timeout=10.0,
                                idle_timeout=15.0)
    assert cfg.limits.trusted_clients == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert cfg.chains["f2b-web"].hooks == ("INPUT",) and cfg.chains["f2b-web"].target == "DROP"
    assert cfg.log.file is None and cfg.log.level == "INFO"
    assert dict(cfg.users) == {}


def test_state_dir_default_is_var_lib(tmp_path: Path, pki: PKI) -> None:
    cfg = load(write(tmp_path, {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
                                "log": {"file": None}}))
    assert cfg.state_dir == Path("/var/lib/web-ipt-d")


def test_unquoted_tls_version_floats_are_accepted(tmp_path: Path, base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base).replace("min_version: '1.3'", "min_version: 1.3")
    assert "min_version: 1.3\n" in text
    cfg = load(write(tmp_path, text))
    assert cfg.tls is not None and cfg.tls.min_version == "1.3"


def test_relative_paths_resolve_against_the_config_directory(
        tmp_path: Path, base: dict[str, Any], pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    confdir = tmp_path / "etc"
    confdir.mkdir()
    (confdir / "tls").mkdir()
    for src, dst in ((pki.server_cert, "tls/server.crt"), (pki.server_key, "tls/server.key"), (pki.ca, "ca.crt")):
        (confdir / dst).write_bytes(src.read_bytes())
    base["tls"] = {"cert": "tls/server.crt", "key": "tls/server.key", "client_ca": "ca.crt"}
    base["state_dir"] = "state"
    base["log"] = {"file": "web-ipt-d.log"}
    cfg = load(write(confdir, base))
    assert cfg.tls is not None
    assert cfg.tls.cert == confdir / "tls/server.crt"
    assert cfg.tls.key == confdir / "tls/server.key"
    assert cfg.tls.client_ca == confdir / "ca.crt"
    assert cfg.state_dir == confdir / "state"
    assert cfg.log.file == confdir / "web-ipt-d.log"

    # Also when the config itself is named by a relative path, from another working directory.
    monkeypatch.chdir(tmp_path)
    cfg = load(Path("etc/config.yaml"))
    assert cfg.tls is not None and cfg.tls.cert.resolve() == (confdir / "tls/server.crt").resolve()
    assert cfg.state_dir.resolve() == (confdir / "state").resolve()


def test_plain_http_on_loopback_needs_no_tls(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, {
        "listen": ["127.0.0.1:8820", "[::1]:8820"], "plain_http": True,
        "state_dir": str(tmp_path), "log": {"file": None},
    }))
    assert cfg.plain_http is True
    assert cfg.tls is None and cfg.ssl_context is None


def test_plain_http_ignores_the_tls_files_but_not_unknown_tls_keys(tmp_path: Path) -> None:
    data = {"listen": "127.0.0.1:8820", "plain_http": True, "state_dir": str(tmp_path), "log": {"file": None},
            "tls": {"cert": "/nonexistent/server.crt", "key": "/nonexistent/server.key"}}
    cfg = load(write(tmp_path, data))
    assert cfg.tls is None
    data["tls"]["ciphers"] = "ALL"
    assert has_problem(problems_of(tmp_path, data), "tls.ciphers")


# -- unknown keys --------------------------------------------------------------------------


@pytest.mark.parametrize("where, key, expected", [
    ((), "bogus", "bogus"),
    (("tls",), "ciphers", "tls.ciphers"),
    (("users", "admin"), "foo", "users.admin.foo"),
    (("chains", "f2b-web"), "oops", "chains.f2b-web.oops"),
    (("limits",), "bogus", "limits.bogus"),
    (("log",), "format", "log.format"),
])
def test_unknown_keys_are_errors_naming_the_key_path(
        tmp_path: Path, base: dict[str, Any], where: tuple[str, ...], key: str, expected: str) -> None:
    node = base
    for step in where:
        node = node[step]
    node[key] = 1
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, expected, "unknown key"), problems
    assert len(problems) == 1, problems


def test_unknown_key_under_a_user_with_an_odd_name(tmp_path: Path, base: dict[str, Any]) -> None:
    base["users"]["x"] = {"password_hash": HASH, "foo": True}
    assert has_problem(problems_of(tmp_path, base), "users.x.foo", "unknown key")


def test_non_string_keys_are_errors(tmp_path: Path, base: dict[str, Any]) -> None:
    text = yaml.safe_dump(base) + "12: true\n"
    assert any("keys must be strings" in p and "12" in p for p in problems_of(tmp_path, text))
    base["chains"][7] = {"target": "DROP"}
    assert has_problem(problems_of(tmp_path, base), "chains", "keys must be strings", "7")


# -- bad values name their key and the value ------------------------------------------------


@pytest.mark.parametrize("listen, key", [
    ("127.0.0.1", "listen"),                 # no port
    ("localhost:8820", "listen"),            # a host name, not an IP address
    ("[localhost]:8820", "listen"),
    ("127.0.0.1:0", "listen"),
    ("127.0.0.1:70000", "listen"),
    ("[::1]:99999", "listen"),
    ("::1:8820", "listen"),                  # IPv6 without brackets
    ("300.1.1.1:8820", "listen"),
    ("127.0.0.1:http", "listen"),
    (8820, "listen"),
    (["127.0.0.1:8820", "127.0.0.1"], "listen[1]"),
])
def test_bad_listen(tmp_path: Path, base: dict[str, Any], listen: Any, key: str) -> None:
    base["listen"] = listen
    bad = listen[1] if isinstance(listen, list) else listen
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, key, repr(bad)), problems


def test_empty_listen_list_is_an_error(tmp_path: Path, base: dict[str, Any]) -> None:
    base["listen"] = []
    assert has_problem(problems_of(tmp_path, base), "listen", "at least one")


@pytest.mark.parametrize("version", ["1.1", "1.0", "TLSv1.2", 1.1, 1, "1.4"])
def test_bad_tls_min_version(tmp_path: Path, base: dict[str, Any], version: Any) -> None:
    base["tls"]["min_version"] = version
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "tls.min_version", repr(str(version) if isinstance(version, float) else version))


@pytest.mark.parametrize("name", ["cert", "key", "client_ca"])
def test_missing_tls_files(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    missing = str(tmp_path / f"no-such-{name}.pem")
    base["tls"][name] = missing
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, f"tls.{name}", "missing", missing), problems
    assert len(problems) == 1, problems  # no second complaint about the files not loading together


@pytest.mark.parametrize("name", ["cert", "key"])
def test_tls_cert_and_key_are_required(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    del base["tls"][name]
    assert has_problem(problems_of(tmp_path, base), f"tls.{name}", "required")


def test_tls_section_is_required_without_plain_http(tmp_path: Path, base: dict[str, Any]) -> None:
    del base["tls"]
    assert has_problem(problems_of(tmp_path, base), "tls", "required")


def test_cert_that_does_not_match_the_key(tmp_path: Path, base: dict[str, Any]) -> None:
    other_key = tmp_path / "other.key"
    certs.write_key(other_key, certs.new_key())
    base["tls"]["key"] = str(other_key)
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "tls.cert", "do not load together", str(other_key)), problems


def test_garbage_cert_file(tmp_path: Path, base: dict[str, Any]) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    base["tls"]["cert"] = str(garbage)
    assert has_problem(problems_of(tmp_path, base), "tls.cert", str(garbage))


def test_garbage_client_ca_file(tmp_path: Path, base: dict[str, Any]) -> None:
    garbage = tmp_path / "garbage-ca.crt"
    garbage.write_text("hello\n")
    base["tls"]["client_ca"] = str(garbage)
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "tls.client_ca", str(garbage)), problems
    assert len(problems) == 1, problems  # blamed on client_ca, not on the cert and key


def test_plain_http_with_a_non_loopback_listener_is_an_error(tmp_path: Path, base: dict[str, Any]) -> None:
    base["plain_http"] = True
    base["listen"] = ["127.0.0.1:8820", "[::]:8820"]
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "plain_http", "loopback", "[::]:8820"), problems
    base["listen"] = "0.0.0.0:8820"
    assert has_problem(problems_of(tmp_path, base), "plain_http", "0.0.0.0:8820")


def test_plain_http_must_be_a_bool(tmp_path: Path, base: dict[str, Any]) -> None:
    base["plain_http"] = "yes please"
    assert has_problem(problems_of(tmp_path, base), "plain_http", "'yes please'")


def test_state_dir_whose_parent_is_missing(tmp_path: Path, base: dict[str, Any]) -> None:
    base["state_dir"] = str(tmp_path / "a" / "b" / "c")
    assert has_problem(problems_of(tmp_path, base), "state_dir", str(tmp_path / "a" / "b" / "c"))


# -- users ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_hash", [
    "secret",                                   # a plaintext password
    "REPLACE-ME: run web-ipt-d -hash_password",  # the sample's placeholder
    "{SSHA}abcdefgh",                           # not a scheme we accept
    "$1$saltsalt$abcdefghijklmnopqrstuv",       # md5_crypt: a real hash, but too weak to accept
    HASH[:-5],                                   # a truncated bcrypt hash: every login would fail
    "$2b$12$garbage",
    "$6$abc",                                    # a sha512_crypt config string, with no checksum
])
def test_invalid_password_hash(tmp_path: Path, base: dict[str, Any], bad_hash: str) -> None:
    base["users"]["admin"]["password_hash"] = bad_hash
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "users.admin.password_hash", "not a supported hash"), problems
    assert not any(bad_hash in p for p in problems), "a problem line never echoes a password hash"


@pytest.mark.parametrize("scheme, hasher", [
    ("argon2", lambda: crypt_context().handler("argon2").using(rounds=1, memory_cost=1024).hash("pw")),
    ("sha512_crypt", lambda: crypt_context().handler("sha512_crypt").using(rounds=1000).hash("pw")),
    ("sha256_crypt", lambda: crypt_context().handler("sha256_crypt").using(rounds=1000).hash("pw")),
    ("pbkdf2_sha256", lambda: crypt_context().handler("pbkdf2_sha256").using(rounds=1000).hash("pw")),
])
def test_other_supported_hash_schemes_load(tmp_path: Path, base: dict[str, Any], scheme: str, hasher: Any) -> None:
    h = hasher()
    base["users"]["admin"]["password_hash"] = h
    assert load(write(tmp_path, base)).users["admin"].password_hash == h


@pytest.mark.parametrize("body", [{}, {"password_hash": ""}, {"password_hash": None}, {"password_hash": 42}, None])
def test_missing_password_hash(tmp_path: Path, base: dict[str, Any], body: Any) -> None:
    base["users"]["admin"] = body
    assert has_problem(problems_of(tmp_path, base), "users.admin.password_hash", "required")


@pytest.mark.parametrize("name", ["bad name", "a/b", "ünicode", "x" * 65, "bob\n", "a:b"])
def test_bad_user_name(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    base["users"][name] = {"password_hash": HASH}
    assert has_problem(problems_of(tmp_path, base), f"users.{name}", repr(name))


def test_user_body_must_be_a_mapping(tmp_path: Path, base: dict[str, Any]) -> None:
    base["users"]["admin"] = ["password_hash", HASH]
    assert has_problem(problems_of(tmp_path, base), "users.admin", "expected a mapping")


@pytest.mark.parametrize("chains, key, value", [
    ("f2b-*", "users.admin.chains", "'f2b-*'"),           # a string, not a list
    (["f2b web"], "users.admin.chains[0]", "'f2b web'"),
    (["ok", "f2b/*"], "users.admin.chains[1]", "'f2b/*'"),
    ([7], "users.admin.chains[0]", "7"),
    (["x" * 65], "users.admin.chains[0]", "xxxx"),
])
def test_bad_chain_patterns(tmp_path: Path, base: dict[str, Any], chains: Any, key: str, value: str) -> None:
    base["users"]["admin"]["chains"] = chains
    assert has_problem(problems_of(tmp_path, base), key, value)


@pytest.mark.parametrize("allow, key, value", [
    (["10.0.0.1/8"], "users.f2b.allow_from[0]", "10.0.0.1/8"),          # host bits set
    (["198.51.100.0/24", "2001:db8::1/64"], "users.f2b.allow_from[1]", "2001:db8::1/64"),
    (["not-a-network"], "users.f2b.allow_from[0]", "not-a-network"),
    (["10.0.0.0/33"], "users.f2b.allow_from[0]", "10.0.0.0/33"),
    ("10.0.0.0/8", "users.f2b.allow_from", "10.0.0.0/8"),
    ([10], "users.f2b.allow_from[0]", "10"),
    # An empty item must not quietly turn a restricted user into one allowed from anywhere.
    ([None], "users.f2b.allow_from[0]", "None"),
])
def test_bad_allow_from(tmp_path: Path, base: dict[str, Any], allow: Any, key: str, value: str) -> None:
    base["users"]["f2b"]["allow_from"] = allow
    assert has_problem(problems_of(tmp_path, base), key, value)


@pytest.mark.parametrize("where, value, key", [
    (("listen",), ["127.0.0.1:8820", None], "listen[1]"),
    (("users", "admin", "chains"), ["f2b-*", None], "users.admin.chains[1]"),
    (("users", "f2b", "allow_from"), [None], "users.f2b.allow_from[0]"),
    (("chains", "f2b-web", "hooks"), [None], "chains.f2b-web.hooks[0]"),
    (("never_block",), [None], "never_block[0]"),
    (("limits", "trusted_clients"), ["10.0.0.0/8", None], "limits.trusted_clients[1]"),
])
def test_a_null_list_item_is_a_problem_in_every_list(
        tmp_path: Path, base: dict[str, Any], where: tuple[str, ...], value: list[Any], key: str) -> None:
    node = base
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    assert has_problem(problems_of(tmp_path, base), key, "an empty list item"), key


def test_read_only_must_be_a_bool(tmp_path: Path, base: dict[str, Any]) -> None:
    base["users"]["reader"]["read_only"] = "true"
    assert has_problem(problems_of(tmp_path, base), "users.reader.read_only", "'true'")


# -- chains --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "x" * 29, "f2b web", "f2b/web", "f2b.web", "ünicode", "f2b-web\n", "",
])
def test_bad_chain_names(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    base["chains"][name] = {"target": "DROP"}
    assert has_problem(problems_of(tmp_path, base), f"chains.{name}", repr(name))


def test_chain_name_of_exactly_28_characters_is_fine(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["c" * 28] = {"target": "DROP"}
    assert "c" * 28 in load(write(tmp_path, base)).chains


@pytest.mark.parametrize("name", ["INPUT", "FORWARD", "OUTPUT", "DROP", "ACCEPT", "REJECT", "RETURN", "LOG"])
def test_reserved_chain_names(tmp_path: Path, base: dict[str, Any], name: str) -> None:
    base["chains"][name] = {"hooks": [], "target": "DROP"}
    assert has_problem(problems_of(tmp_path, base), f"chains.{name}", "reserves")


def test_a_chain_cannot_hook_itself(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-web"]["hooks"] = ["INPUT", "f2b-web"]
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.hooks[1]", "itself", "'f2b-web'")


def test_a_hook_must_not_be_another_managed_chain(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-web"]["hooks"] = ["f2b-ssh"]
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.hooks", "another managed chain", "'f2b-ssh'")


@pytest.mark.parametrize("hooks, key, value", [
    ("INPUT", "chains.f2b-web.hooks", "'INPUT'"),
    (["bad hook"], "chains.f2b-web.hooks[0]", "'bad hook'"),
    (["INPUT", None], "chains.f2b-web.hooks[1]", "None"),
])
def test_bad_hooks(tmp_path: Path, base: dict[str, Any], hooks: Any, key: str, value: str) -> None:
    base["chains"]["f2b-web"]["hooks"] = hooks
    assert has_problem(problems_of(tmp_path, base), key, value)


def test_duplicate_hooks_collapse_and_empty_hooks_are_allowed(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-web"]["hooks"] = ["INPUT", "INPUT", "FORWARD"]
    base["chains"]["f2b-ssh"]["hooks"] = []
    cfg = load(write(tmp_path, base))
    assert cfg.chains["f2b-web"].hooks == ("INPUT", "FORWARD")
    assert cfg.chains["f2b-ssh"].hooks == ()


@pytest.mark.parametrize("target", ["accept", "drop", "RETURN", "LOG", 1])
def test_bad_chain_target(tmp_path: Path, base: dict[str, Any], target: Any) -> None:
    base["chains"]["f2b-web"]["target"] = target
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.target", repr(target))


def test_match_and_interface_default_to_source_and_every_interface(tmp_path: Path, base: dict[str, Any]) -> None:
    chain = load(write(tmp_path, base)).chains["f2b-web"]
    assert (chain.match, chain.interface) == ("source", None)
    assert (Chain("c", (), "DROP").match, Chain("c", (), "DROP").interface) == (
        _loaded("chains", "match"), _loaded("chains", "interface")) == ("source", None)


@pytest.mark.parametrize("hooks, match, interface", [
    (["OUTPUT"], "destination", None),
    (["OUTPUT", "FORWARD"], "destination", "eth0"),
    (["FORWARD"], "source", "eth+"),
    (["INPUT", "OUTPUT"], "source", "br-1a2b3c4d5e6f"),  # 15 characters, as long as a Linux name gets
    (["INPUT"], "source", "e" * 14 + "+"),
    (["INPUT"], None, "eth0.100"),
    (["INPUT"], None, "wg_0-a"),
    ([], "destination", None),  # jumped to from the admin's own rules
    (["DOCKER-USER"], "destination", None),
])
def test_match_and_interface_that_load(tmp_path: Path, base: dict[str, Any], hooks: list[str], match: str | None,
                                       interface: str | None) -> None:
    base["chains"]["f2b-web"].update(hooks=hooks, interface=interface)
    if match is not None:
        base["chains"]["f2b-web"]["match"] = match
    chain = load(write(tmp_path, base)).chains["f2b-web"]
    assert (chain.hooks, chain.match, chain.interface) == (tuple(hooks), match or "source", interface)


@pytest.mark.parametrize("match", ["src", "dst", "Source", "both", "", 1, True, ["source"]])
def test_bad_match(tmp_path: Path, base: dict[str, Any], match: Any) -> None:
    base["chains"]["f2b-web"]["match"] = match
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.match", repr(match), '"source"')


@pytest.mark.parametrize("interface", [
    "", "e" * 16, "e" * 15 + "+", "eth 0", "eth0\n", "eth/0", "eth:0", ".", "..", "+", "!eth0", "eth*", "eth+0",
    "ëth0", 0, True, ["eth0"], {"name": "eth0"},
])
def test_bad_interface(tmp_path: Path, base: dict[str, Any], interface: Any) -> None:
    base["chains"]["f2b-web"]["interface"] = interface
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.interface", repr(interface), "15")


def test_destination_does_not_go_with_input(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-ssh"]["match"] = "destination"  # hooks INPUT and FORWARD
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "chains.f2b-ssh.match", "INPUT", "'destination'")
    assert len(problems) == 1, problems


@pytest.mark.parametrize("chain_backend", ["iptables", "ipset", "nftables"])
def test_an_interface_needs_built_in_hooks(tmp_path: Path, base: dict[str, Any], chain_backend: str) -> None:
    base["chains"]["f2b-web"].update(hooks=[], interface="eth0", backend=chain_backend)
    assert has_problem(problems_of(tmp_path, base), "chains.f2b-web.interface", "has none", "'eth0'")
    if chain_backend != "nftables":  # (nftables refuses a user chain hook by itself)
        base["chains"]["f2b-web"]["hooks"] = ["INPUT", "DOCKER-USER"]
        problems = problems_of(tmp_path, base)
        assert has_problem(problems, "chains.f2b-web.interface", "user chain DOCKER-USER", "'eth0'")
        assert len(problems) == 1, problems


def test_match_and_interface_problems_are_all_reported(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-web"].update(match="dst", interface="eth 0")
    base["chains"]["f2b-ssh"].update(match="destination", interface="eth0", hooks=["INPUT", "mine"])
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "chains.f2b-web.match", "'dst'")
    assert has_problem(problems, "chains.f2b-web.interface", "'eth 0'")
    assert has_problem(problems, "chains.f2b-ssh.match", "INPUT")
    assert has_problem(problems, "chains.f2b-ssh.interface", "user chain mine")
    assert len(problems) == 4, problems


# -- never_block, log, limits --------------------------------------------------------------


@pytest.mark.parametrize("value, key, fragment", [
    (["10.0.0.1/8"], "never_block[0]", "10.0.0.1/8"),
    (["127.0.0.0/8", "::1/129"], "never_block[1]", "::1/129"),
    (["localhost"], "never_block[0]", "localhost"),
    ("127.0.0.0/8", "never_block", "127.0.0.0/8"),
    (["127.0.0.0/8", None], "never_block[1]", "None"),
])
def test_bad_never_block(tmp_path: Path, base: dict[str, Any], value: Any, key: str, fragment: str) -> None:
    base["never_block"] = value
    assert has_problem(problems_of(tmp_path, base), key, fragment)


def test_log_problems(tmp_path: Path, base: dict[str, Any]) -> None:
    base["log"] = {"file": str(tmp_path / "missing" / "missing-dir" / "x.log"), "level": "LOUD"}
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "log.file", "missing-dir")
    assert has_problem(problems, "log.level", "'LOUD'")


def test_a_missing_log_directory_is_made_at_start(tmp_path: Path, base: dict[str, Any]) -> None:
    # Like state_dir: /var/log/web-ipt-d/ need not exist before the first start.
    base["log"] = {"file": str(tmp_path / "new-dir" / "x.log")}
    assert load(write(tmp_path, base)).log.file == tmp_path / "new-dir" / "x.log"
    from webiptd import log as log_mod
    from webiptd.config import Log
    try:
        log_mod.setup(Log(tmp_path / "new-dir" / "x.log", "INFO"))
        assert (tmp_path / "new-dir").is_dir()
    finally:
        log_mod.setup(Log(None, "INFO"))


@pytest.mark.parametrize("key, value", [
    ("max_connections", 0),
    ("max_connections", 10001),
    ("max_connections", True),      # a bool is not a whole number here
    ("max_connections", 1.5),
    ("max_connections", "64"),
    ("request_timeout", 0),
    ("request_timeout", -1),
    ("request_timeout", 3601),
    ("request_timeout", False),
    ("request_timeout", "10"),
    ("worker_timeout", 0),
    ("worker_timeout", 601),
    ("worker_timeout", True),
    ("auth_failures", 0),
    ("auth_failures", True),
    ("auth_window", 0),
    ("auth_window", 86401),
    ("auth_window", 1.5),
    ("max_connections_per_client", 0),
    ("max_connections_per_client", True),
    ("trusted_connections", -1),
    ("trusted_connections", 10001),
    ("handshake_timeout", 0),
    ("handshake_timeout", "5"),
    ("header_timeout", 3601),
    ("idle_timeout", -1),
    ("trusted_clients", "127.0.0.1/8"),
])
def test_bad_limits(tmp_path: Path, base: dict[str, Any], key: str, value: Any) -> None:
    base["limits"][key] = value
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, f"limits.{key}", f"(got {value!r})"), problems


def test_limits_edges_are_accepted(tmp_path: Path, base: dict[str, Any]) -> None:
    base["limits"] = {"max_connections": 1, "request_timeout": 0.1, "worker_timeout": 600,
                      "auth_failures": 1, "auth_window": 86400}
    assert load(write(tmp_path, base)).limits == Limits(1, 0.1, 600.0, 1, 86400)


def test_trusted_clients_name_the_bad_item(tmp_path: Path, base: dict[str, Any]) -> None:
    base["limits"]["trusted_clients"] = ["10.0.0.0/8", "127.0.0.1/8", 5]
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "limits.trusted_clients[1]", "127.0.0.1/8"), problems
    assert has_problem(problems, "limits.trusted_clients[2]", "5"), problems
    assert not any("trusted_clients[0]" in p for p in problems), problems


def test_new_limits_are_read(tmp_path: Path, base: dict[str, Any]) -> None:
    base["limits"].update(max_connections_per_client=2, trusted_clients=["10.1.0.0/16", "fd00::/8"],
                          trusted_connections=0, handshake_timeout=1.5, header_timeout=2, idle_timeout=30)
    limits = load(write(tmp_path, base)).limits
    assert (limits.max_connections_per_client, limits.trusted_connections) == (2, 0)
    assert limits.trusted_clients == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8"))
    assert (limits.handshake_timeout, limits.header_timeout, limits.idle_timeout) == (1.5, 2.0, 30.0)


# -- the file as a whole -------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    problems = problems_of(tmp_path, text)
    assert any("expected a mapping" in p for p in problems), problems


def test_empty_file_reports_what_is_missing(tmp_path: Path) -> None:
    assert has_problem(problems_of(tmp_path, ""), "tls", "required")


def test_invalid_yaml(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, "listen: [unclosed\nusers: {\n")
    assert len(problems) == 1 and "not valid YAML" in problems[0]
    assert "\n" not in problems[0], "one line per problem"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "does-not-exist.yaml")
    assert len(info.value.problems) == 1 and "cannot read" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load(tmp_path)  # a directory
    assert "cannot read" in info.value.problems[0]
    (tmp_path / "latin1.yaml").write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "latin1.yaml")
    assert "cannot read" in info.value.problems[0]
    assert str(info.value).startswith(str(tmp_path / "latin1.yaml") + ": ")


def test_every_problem_is_reported_at_once(tmp_path: Path, base: dict[str, Any]) -> None:
    base["listen"] = ["127.0.0.1:8820", "localhost:8820"]
    base["tls"]["min_version"] = "1.1"
    base["users"]["admin"]["password_hash"] = "plaintext"
    base["users"]["f2b"]["allow_from"] = ["10.0.0.1/8"]
    base["chains"]["INPUT"] = {}
    base["chains"]["f2b-web"]["target"] = "ALLOW"
    base["never_block"] = ["nope"]
    base["limits"]["max_connections"] = True
    base["surprise"] = 1
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, base))
    problems = info.value.problems
    for key in ("listen[1]", "tls.min_version", "users.admin.password_hash", "users.f2b.allow_from[0]",
                "chains.INPUT", "chains.f2b-web.target", "never_block[0]", "limits.max_connections", "surprise"):
        assert has_problem(problems, key), (key, problems)
    assert len(problems) == 9, problems
    # str() gives one line per problem, each prefixed with the file.
    lines = str(info.value).splitlines()
    assert len(lines) == 9 and all(line.startswith(f"{tmp_path / 'config.yaml'}: ") for line in lines)
    assert info.value.path == tmp_path / "config.yaml"


# -- allow chains ------------------------------------------------------------------------------


def test_an_allow_chain_and_never_allow_load(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["customers"] = {"hooks": ["INPUT"], "target": "ACCEPT", "backend": "ipset"}
    base["never_allow"] = ["0.0.0.0/1", "128.0.0.0/1", "203.0.113.0/24"]
    cfg = load(write(tmp_path, base))
    assert cfg.chains["customers"].target == "ACCEPT"
    net = ipaddress.ip_network
    # never_allow for an allow chain, never_block for a block chain; neither crosses over.
    assert cfg.protected_by(net("203.0.113.7/32"), "ACCEPT") == net("128.0.0.0/1")
    assert cfg.protected_by(net("127.0.0.1/32"), "ACCEPT") == net("0.0.0.0/1")
    assert cfg.protected_by(net("::1/128"), "ACCEPT") is None
    assert cfg.protected_by(net("127.0.0.1/32"), "DROP") == net("127.0.0.0/8")
    assert cfg.protected_by(net("203.0.113.7/32"), "REJECT") is None
    assert load(write(tmp_path, {**base, "never_allow": []})).never_allow == ()


@pytest.mark.parametrize("allow, block, fragment", [
    ({"backend": "nftables"}, {"backend": "ipset"}, "this one in nftables, priority -10"),
    ({"backend": "iptables"}, {"backend": "nftables"}, "that one is in nftables, priority -10"),
    ({"backend": "nftables", "priority": -20}, {"backend": "nftables"}, "this one in nftables, priority -20"),
])
def test_an_allow_chain_must_share_its_hooks_backend_family(tmp_path: Path, base: dict[str, Any],
                                                             allow: dict[str, Any], block: dict[str, Any],
                                                             fragment: str) -> None:
    base["chains"] = {"allow": {"hooks": ["INPUT", "OUTPUT"], "target": "ACCEPT", **allow},
                      "block": {"hooks": ["FORWARD", "INPUT"], "target": "DROP", **block}}
    problems = problems_of(tmp_path, base)
    assert has_problem(problems, "chains.allow.hooks", "chain block at INPUT", fragment), problems
    assert len(problems) == 1, problems  # OUTPUT and FORWARD have no conflict


@pytest.mark.parametrize("allow, block", [
    ({"backend": "ipset"}, {"backend": "iptables"}),                  # both in the legacy tables
    ({"backend": "nftables"}, {"backend": "nftables"}),
    ({"backend": "nftables"}, {"backend": "ipset", "hooks": ["FORWARD"]}),  # not at the same hook
])
def test_allow_chains_that_can_overrule_their_hooks_block_chains(tmp_path: Path, base: dict[str, Any],
                                                                  allow: dict[str, Any], block: dict[str, Any]) -> None:
    base["chains"] = {"allow": {"hooks": ["INPUT"], "target": "ACCEPT", **allow},
                      "block": {"hooks": ["INPUT"], "target": "DROP", **block}}
    assert load(write(tmp_path, base)).chains["allow"].target == "ACCEPT"


def test_a_star_user_who_may_write_an_allow_chain_is_warned_of(tmp_path: Path, base: dict[str, Any]) -> None:
    base["chains"]["f2b-allow"] = {"hooks": ["INPUT"], "target": "ACCEPT"}
    cfg = load(write(tmp_path, base))
    warnings = config_warnings(cfg)
    # admin has '*'; f2b reaches it through 'f2b-*', which is named, and reader is read-only.
    assert len(warnings) == 1 and "f2b-allow" in warnings[0] and "admin" in warnings[0], warnings
    base["chains"].pop("f2b-allow")
    assert config_warnings(load(write(tmp_path, base))) == []


# -- behaviour of the loaded values ---------------------------------------------------------


def _config(tmp_path: Path, base: dict[str, Any], never_block: list[str]) -> Config:
    base["never_block"] = never_block
    return load(write(tmp_path, base))


def test_protected_by_overlaps_both_ways(tmp_path: Path, base: dict[str, Any]) -> None:
    cfg = _config(tmp_path, base, ["10.0.0.0/8", "198.51.100.250/32", "2001:db8:1::/48"])
    net = ipaddress.ip_network
    # A network inside a protected one.
    assert cfg.protected_by(net("10.1.2.3/32")) == net("10.0.0.0/8")
    # A network that contains a protected one.
    assert cfg.protected_by(net("198.51.100.0/24")) == net("198.51.100.250/32")
    assert cfg.protected_by(net("0.0.0.0/1")) == net("10.0.0.0/8")
    assert cfg.protected_by(net("2001:db8::/32")) == net("2001:db8:1::/48")
    assert cfg.protected_by(net("2001:db8:1:2::/64")) == net("2001:db8:1::/48")
    # Neighbours are not protected.
    assert cfg.protected_by(net("11.0.0.0/8")) is None
    assert cfg.protected_by(net("198.51.100.249/32")) is None
    assert cfg.protected_by(net("2001:db8:2::/48")) is None


def test_protected_packed_agrees_with_protected_by(tmp_path: Path, base: dict[str, Any]) -> None:
    """A bulk load asks with the packed address (Config.protected_packed): the same answer for any network."""
    import random

    cfg = _config(tmp_path, base, ["10.0.0.0/8", "198.51.100.250/32", "2001:db8:1::/48", "::1/128"])
    base["never_allow"] = ["0.0.0.0/1"]
    allow = load(write(tmp_path, base))
    rng = random.Random(5)
    picks = [ipaddress.ip_network(t) for t in ("10.255.255.255/32", "9.255.255.255/32", "0.0.0.0/1", "::/1",
                                               "2001:db8:1:ffff::/64", "2001:db8::/31", "::1/128", "::/127")]
    for _ in range(5000):
        bits = rng.choice((32, 128))
        length = rng.randint(1, bits)
        value = rng.getrandbits(bits) & ~((1 << (bits - length)) - 1)
        if rng.random() < 0.3:  # at the edges of the protected ones
            edge = rng.choice((10 << 24, 0xC63364FA) if bits == 32 else (0x20010DB8_0001 << 80, 1))
            value = (edge + rng.randint(-2, 2)) % (1 << bits) & ~((1 << (bits - length)) - 1)
        picks.append(ipaddress.ip_network((value, length)))
    for network in picks:
        for config, target in ((cfg, "DROP"), (allow, "ACCEPT"), (allow, "DROP")):
            assert config.protected_packed(network.network_address.packed, network.prefixlen, target) == \
                config.protected_by(network, target), (network, target)


def test_protected_by_agrees_with_overlaps_on_random_networks(tmp_path: Path, base: dict[str, Any]) -> None:
    # protected_by compares ranges of ints (it runs for every item of a bulk load): the same answers as overlaps().
    protected = ["10.0.0.0/8", "198.51.100.250/32", "203.0.113.128/25", "2001:db8:1::/48", "::1/128"]
    cfg = _config(tmp_path, base, protected)
    rng = random.Random(7)
    for _ in range(3000):
        version = rng.choice((4, 6))
        bits = 32 if version == 4 else 128
        length = rng.randint(1, bits)
        seed = rng.choice([ipaddress.ip_network(p) for p in protected if ipaddress.ip_network(p).version == version])
        address = (int(seed.network_address) ^ rng.getrandbits(rng.randint(0, bits))) >> (bits - length) << (
            bits - length)
        network = ipaddress.ip_network((address, length)) if version == 4 else ipaddress.IPv6Network((address, length))
        expected = next((p for p in cfg.never_block if p.version == version and p.overlaps(network)), None)
        assert cfg.protected_by(network) == expected, network


def test_protected_by_never_crosses_families(tmp_path: Path, base: dict[str, Any]) -> None:
    cfg = _config(tmp_path, base, ["0.0.0.0/1", "::1/128"])
    net = ipaddress.ip_network
    assert cfg.protected_by(net("::/128")) is None             # :: is numerically inside 0.0.0.0/1's range
    assert cfg.protected_by(net("::ffff:0:0/96")) is None
    assert cfg.protected_by(net("0.0.0.1/32")) == net("0.0.0.0/1")
    assert cfg.protected_by(net("0.0.0.1/32")).version == 4  # type: ignore[union-attr]
    assert cfg.protected_by(net("::1/128")) == net("::1/128")
    assert cfg.protected_by(net("::/127")) == net("::1/128")


def test_protected_by_with_no_never_block(tmp_path: Path, base: dict[str, Any]) -> None:
    cfg = _config(tmp_path, base, [])
    assert cfg.protected_by(ipaddress.ip_network("127.0.0.1/32")) is None


def test_user_may_use_globs() -> None:
    user = User("u", HASH, ("f2b-*", "admin-?", "list[0-9]", "exact"), (), False)
    assert user.may_use("f2b-web") and user.may_use("f2b-")
    assert user.may_use("admin-x") and not user.may_use("admin-xy")
    assert user.may_use("list7") and not user.may_use("listx")
    assert user.may_use("exact") and not user.may_use("exact2") and not user.may_use("EXACT")
    assert not user.may_use("F2B-web"), "patterns are case-sensitive, like iptables chain names"
    assert not User("n", HASH, (), (), False).may_use("anything"), "no patterns means no chains"
    assert User("a", HASH, ("*",), (), False).may_use("anything")


def test_user_may_connect_from() -> None:
    ip = ipaddress.ip_address
    anyone = User("a", HASH, ("*",), (), False)
    assert anyone.may_connect_from(ip("203.0.113.1")) and anyone.may_connect_from(ip("2001:db8::1"))
    user = User("u", HASH, ("*",), (ipaddress.ip_network("198.51.100.0/24"),
                                    ipaddress.ip_network("2001:db8::/64")), False)
    assert user.may_connect_from(ip("198.51.100.7"))
    assert not user.may_connect_from(ip("198.51.101.7"))
    assert user.may_connect_from(ip("2001:db8::99"))
    assert not user.may_connect_from(ip("2001:db8:0:1::99"))
    # A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6 addresses.
    assert user.may_connect_from(ip("::ffff:198.51.100.7"))
    assert not user.may_connect_from(ip("::ffff:203.0.113.7"))
    # ... but an IPv6 network never admits an IPv4 client, nor the other way round.
    v6only = User("v", HASH, ("*",), (ipaddress.ip_network("::/0"),), False)
    assert not v6only.may_connect_from(ip("198.51.100.7"))
    assert not v6only.may_connect_from(ip("::ffff:198.51.100.7"))


def test_user_repr_hides_the_hash() -> None:
    assert HASH not in repr(User("u", HASH, ("*",), (), False))


# -- the shipped sample --------------------------------------------------------------------


def test_sample_config_holds_only_real_keys(tmp_path: Path, pki: PKI) -> None:
    text = resources.files("webiptd").joinpath("sample-config.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    assert isinstance(raw, dict)
    # As shipped it refuses to load only because of the placeholder hash and the absent files.
    with pytest.raises(ConfigError) as info:
        from_mapping(raw, tmp_path / "config.yaml")
    assert not any("unknown key" in p for p in info.value.problems), info.value.problems
    assert any(p.startswith("users.fail2ban.password_hash:") for p in info.value.problems)

    for user in raw["users"].values():
        user["password_hash"] = HASH
    raw["tls"]["cert"], raw["tls"]["key"] = str(pki.server_cert), str(pki.server_key)
    raw["state_dir"] = str(tmp_path / "state")
    raw["log"]["file"] = str(tmp_path / "web-ipt-d.log")
    cfg = from_mapping(raw, tmp_path / "config.yaml")
    assert cfg.listen == (Listen("::", 8820),)
    assert cfg.users["fail2ban"].chains == ("f2b-*",)
    assert set(cfg.chains) == {"f2b-web"}
    # The sample documents the defaults: loading it gives what an empty section would.
    assert cfg.limits == Limits()
    assert cfg.tls is not None and cfg.tls.min_version == "1.2"

    # Every key of every section of the sample is one the loader knows: drop each in turn.
    for section, body in raw.items():
        if isinstance(body, dict) and section not in ("users", "chains"):
            for key in body:
                trimmed = copy.deepcopy(raw)
                trimmed[section][key] = "\x00 not a valid value"
                with pytest.raises(ConfigError) as info:
                    from_mapping(trimmed, tmp_path / "config.yaml")
                assert any(p.startswith(f"{section}.{key}") for p in info.value.problems), (section, key)



# -- one schema: the loader's defaults, the dataclasses' and the sample's -------------------------------------


def test_the_committed_samples_are_what_the_schema_makes() -> None:
    # Remake them as the sample's header says: python -m webiptd.config | tee etc/config.yaml > src/...
    made = sample()
    assert (REPO / "etc" / "config.yaml").read_text(encoding="utf-8") == made
    assert resources.files("webiptd").joinpath("sample-config.yaml").read_text(encoding="utf-8") == made
    assert "python -m webiptd.config" in made.split("\n\n")[0], "the header says how to remake it"


def test_python_m_webiptd_config_prints_the_sample() -> None:
    result = subprocess.run([sys.executable, "-m", "webiptd.config"], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == sample()


def test_the_sample_holds_every_key_of_the_schema_with_its_help() -> None:
    text = sample()
    raw = yaml.safe_load(text)
    optional = [name for name, node in SCHEMA.items() if isinstance(node, Section) and node.optional]
    assert optional == ["fleet"] and list(raw) == [name for name in SCHEMA if name not in optional]
    # An optional section is in the sample commented out, whole: taking away one "# " gives it.
    block = text[text.index("\n# fleet:\n") + 1:].split("\n\n")[0]
    raw.update(yaml.safe_load("\n".join(line[2:] for line in block.splitlines())))
    for name, node in SCHEMA.items():
        if isinstance(node, Section):
            body = raw[name][node.named] if node.named else raw[name]
            shown = [key for key, opt in node.options.items() if not opt.commented]
            assert list(body) == shown, name
            options = node.options.items()
        else:
            options = [(name, node)]
        for key, opt in options:
            assert opt.help and opt.help.splitlines()[0] in text, (name, key)
            if opt.commented:
                assert f"# {key}: {opt.default}\n" in text, (name, key)
    assert raw["users"]["fail2ban"]["password_hash"].startswith("REPLACE-ME")


def _loaded(section: str, key: str) -> Any:
    node = SCHEMA[section]
    assert isinstance(node, Section)
    opt = node.options[key]
    assert isinstance(opt, Option)
    return opt.loaded_default()


def test_the_dataclass_defaults_are_the_schemas() -> None:
    assert dataclasses.asdict(Limits()) == {f.name: _loaded("limits", f.name) for f in dataclasses.fields(Limits)}
    chain = Chain("c", (), "DROP")
    assert (chain.backend, chain.maxelem, chain.priority) == (
        _loaded("chains", "backend"), _loaded("chains", "maxelem"), _loaded("chains", "priority"))
    assert TLS(Path("c"), Path("k"), "1.2", None).client_cert_auth is _loaded("tls", "client_cert_auth") is False
    # The numbers, as the README and the sample promise them.
    assert Limits() == Limits(
        max_connections=128, max_connections_per_client=8, trusted_connections=32, handshake_timeout=5.0,
        header_timeout=10.0, idle_timeout=15.0, request_timeout=10.0, worker_timeout=5.0, auth_failures=10,
        auth_window=60, max_bulk_items=10_000, kernel_check=5.0,
        trusted_clients=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")))
    assert (chain.backend, chain.maxelem, chain.priority) == ("iptables", 1_048_576, -10)


def test_no_user_may_be_called_like_the_owner_of_adopted_rules(tmp_path: Path, base: dict[str, Any]) -> None:
    base["users"]["adopted"] = dict(base["users"]["admin"])
    problems = problems_of(tmp_path, base)
    assert any("users" in p and "adopted" in p for p in problems), problems
