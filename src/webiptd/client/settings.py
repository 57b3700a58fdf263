"""Where `web-ipt` finds the server and its credentials: the flags, then the environment, then a netrc file, then
~/.config/web-ipt/client.yaml. A password never comes from the command line."""

from __future__ import annotations

import netrc
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_URL = "https://127.0.0.1:8820"  # as the shipped fail2ban action
DEFAULT_CACERT = "/etc/web-ipt-d/ca.crt"  # used when it exists and no other is named
DEFAULT_MAX_TIME = 120.0
CONFIG_KEYS = frozenset({"url", "cacert", "user", "password", "netrc", "cert", "key", "max_time"})


class SettingsError(ValueError):
    """A setting that cannot be used: `web-ipt` exits 2 with this sentence."""


@dataclass(frozen=True)
class Settings:
    url: str  # scheme://host[:port][/base], no trailing slash
    cacert: str | None  # None: the system's trust store
    user: str | None
    password: str | None
    cert: str | None  # a client certificate, for a daemon with tls.client_ca
    key: str | None
    max_time: float  # seconds for each request
    user_source: str  # where the user came from, for the hint after a 401

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class Flags:
    """What the command line said; None where it said nothing."""
    url: str | None = None
    cacert: str | None = None
    user: str | None = None
    netrc: str | None = None
    cert: str | None = None
    key: str | None = None
    config: str | None = None
    max_time: float | None = None


def config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".config")
    return Path(base) / "web-ipt" / "client.yaml"


def read_config(path: Path, named: bool) -> dict[str, Any]:
    """client.yaml as a dict; {} when it is absent and was not named on the command line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise SettingsError(f"{path}: no such file") from None
        return {}
    except OSError as exc:
        raise SettingsError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: must be a mapping of {', '.join(sorted(CONFIG_KEYS))}")
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise SettingsError(f"{path}: {key}: unknown key; the keys are {', '.join(sorted(CONFIG_KEYS))}")
        if key == "max_time":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise SettingsError(f"{path}: max_time: must be a number of seconds above 0")
        elif not isinstance(value, str) or not value:
            raise SettingsError(f"{path}: {key}: must be a non-empty string")
    if "password" in data:
        # As ssh and Python's netrc do for their files: a secret readable by others is refused, not used.
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SettingsError(f"{path}: password: the file holds a password and others may read it "
                                f"(mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")
    return data


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise SettingsError(f"url {url!r}: must start with https:// (web-ipt-d speaks TLS only)")
    if not parts.hostname:
        raise SettingsError(f"url {url!r}: has no host")
    if parts.username or parts.password:
        raise SettingsError(f"url {url!r}: credentials do not go in the URL; use --user and a netrc file or "
                            "WEB_IPT_PASSWORD")
    if parts.query or parts.fragment:
        raise SettingsError(f"url {url!r}: must not have a query or fragment")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise SettingsError(f"url {url!r}: bad port") from None
    return url.rstrip("/")


def read_netrc(path: str, host: str, named: bool) -> tuple[str, str] | None:
    """(login, password) for `host` (or the default entry), as curl --netrc-file reads it; None if none."""
    try:
        entries = netrc.netrc(path)
    except FileNotFoundError:
        if named:
            raise SettingsError(f"netrc {path}: no such file") from None
        return None
    except netrc.NetrcParseError as exc:
        raise SettingsError(f"netrc {path}: {exc.msg} (line {exc.lineno})") from None
    except OSError as exc:
        raise SettingsError(f"netrc {path}: {exc.strerror}") from None
    found = entries.authenticators(host)
    if found is None:
        return None
    login, _, password = found
    return login, password


def resolve(flags: Flags, environ: Mapping[str, str]) -> Settings:
    """The settings from `flags`, `environ` (WEB_IPT_*), the netrc file and client.yaml, in that order.

    A password goes with its own user: the netrc entry's with its login, client.yaml's with its `user`; so
    `--user admin` never sends the password of another user from either file. WEB_IPT_PASSWORD goes with any.
    """
    named_config = flags.config is not None
    path = Path(flags.config) if flags.config is not None else config_path(environ)
    conf = read_config(path, named_config)

    def pick(flag: str | None, env: str, key: str) -> str | None:
        value = flag or environ.get(env) or conf.get(key)
        return str(value) if value else None

    url = check_url(pick(flags.url, "WEB_IPT_URL", "url") or DEFAULT_URL)
    cacert = pick(flags.cacert, "WEB_IPT_CACERT", "cacert")
    if cacert is None and os.path.exists(DEFAULT_CACERT):
        cacert = DEFAULT_CACERT
    user = flags.user or environ.get("WEB_IPT_USER") or None
    user_source = "--user" if flags.user else "WEB_IPT_USER" if user else ""
    if user is not None and ":" in user:
        raise SettingsError("user: a user name has no ':' (RFC 7617), and a password never goes on the command "
                            "line: use WEB_IPT_PASSWORD, a netrc file or client.yaml")
    password = environ.get("WEB_IPT_PASSWORD") or None

    netrc_named = flags.netrc or environ.get("WEB_IPT_NETRC") or conf.get("netrc")
    netrc_path = netrc_named or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    host = urlsplit(url).hostname or ""
    if password is None or user is None:
        entry = read_netrc(str(netrc_path), host, bool(netrc_named))
        if entry is not None and entry[0] and (user is None or user == entry[0]):
            if user is None:
                user, user_source = entry[0], f"netrc {netrc_path}"
            if password is None:
                password = entry[1] or None
    if user is None and conf.get("user"):
        user, user_source = str(conf["user"]), str(path)
    if password is None and conf.get("password") and user == conf.get("user", user):
        password = str(conf["password"])

    max_time = flags.max_time
    if max_time is None:
        env_time = environ.get("WEB_IPT_MAX_TIME")
        try:
            max_time = float(env_time) if env_time else float(conf.get("max_time", DEFAULT_MAX_TIME))
        except ValueError:
            raise SettingsError(f"WEB_IPT_MAX_TIME {env_time!r}: not a number of seconds") from None
    if not max_time > 0:
        raise SettingsError("max-time: must be above 0 seconds")
    cert = pick(flags.cert, "WEB_IPT_CERT", "cert")
    key = pick(flags.key, "WEB_IPT_KEY", "key")
    if key is not None and cert is None:
        raise SettingsError("key: a client key needs its certificate (--cert)")
    return Settings(url, cacert, user, password, cert, key, max_time, user_source)
