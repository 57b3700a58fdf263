"""The systemd units checked by systemd's own tools (verify, security), and `make install`
staged with DESTDIR: everything in place, relocated to PREFIX, and nothing done to the live system.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import wheelhouse
from webiptd import __version__

REPO = wheelhouse.REPO
UNITS = ("web-ipt-d.socket", "web-ipt-d.service")
MAX_EXPOSURE = 2.5

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is missing (Debian package systemd)")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(values: list[str]) -> set[str]:
    return {word for value in values for word in value.split()}


def make(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_verify_passes_with_no_output(tmp_path: Path) -> None:
    # verify needs ExecStart= to exist. Stage the units the way `make install` renders them,
    # with PREFIX set to the venv these tests run from (its bin/web-ipt-d is the real program).
    prefix = Path(sys.prefix)
    assert (prefix / "bin" / "web-ipt-d").is_file(), "the test venv has no web-ipt-d script (pip install -e .)"
    make("install-files", f"DESTDIR={tmp_path}", f"PREFIX={prefix}")
    staged = [tmp_path / "etc/systemd/system" / name for name in UNITS]
    for unit in staged:
        # Rendering changes the install prefix and nothing else.
        assert unit.read_text() == (REPO / "systemd" / unit.name).read_text().replace("/opt/web-ipt-d", str(prefix))
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, staged)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_security_exposure_is_at_most_2_5() -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "systemd/web-ipt-d.service"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"Overall exposure level for web-ipt-d\.service: (\d+(?:\.\d+)?)", proc.stdout)
    assert found, proc.stdout[-2000:]
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, proc.stdout


def test_units_keep_the_service_contract() -> None:
    socket = parse_unit(REPO / "systemd/web-ipt-d.socket")
    service = parse_unit(REPO / "systemd/web-ipt-d.service")
    assert socket["Socket"]["ListenStream"] == ["8820"]
    assert socket["Socket"]["BindIPv6Only"] == ["both"]
    assert socket["Install"]["WantedBy"] == ["sockets.target"]

    unit, svc, install = service["Unit"], service["Service"], service["Install"]
    assert svc["Type"] == ["notify"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["WatchdogSec"] and int(svc["WatchdogSec"][0]) > 0
    # Bans come back at boot, before any interface is configured (docs/service.md: no free window).
    assert "multi-user.target" in install["WantedBy"]
    assert "network-pre.target" in words(unit["Before"]) and "network-pre.target" in words(unit["Wants"])
    assert "web-ipt-d.socket" in words(unit["Requires"]) and "web-ipt-d.socket" in words(unit["After"])
    # Least privilege: a system user with the two network capabilities libiptc needs, nothing else.
    assert svc["User"] == ["web-ipt-d"]
    assert words(svc["AmbientCapabilities"]) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert words(svc["CapabilityBoundingSet"]) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "MemoryDenyWriteExecute": "yes",
                       "LockPersonality": "yes", "ProtectKernelModules": "yes", "UMask": "0077",
                       "StateDirectory": "web-ipt-d", "LogsDirectory": "web-ipt-d"}.items():
        assert svc[key] == [value], key
    assert words(svc["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert svc["SystemCallFilter"][0] == "@system-service"


def test_sysusers_and_tmpfiles_name_the_service_user() -> None:
    user = parse_unit(REPO / "systemd/web-ipt-d.service")["Service"]["User"][0]
    sysusers = [line.split() for line in (REPO / "systemd/sysusers.d/web-ipt-d.conf").read_text().splitlines()
                if line and not line.startswith("#")]
    assert [fields[:2] for fields in sysusers] == [["u", user]]
    tmpfiles = [line.split() for line in (REPO / "systemd/tmpfiles.d/web-ipt-d.conf").read_text().splitlines()
                if line and not line.startswith("#")]
    # The lock `iptables -w` takes, openable by the service's group (it runs without CAP_DAC_OVERRIDE).
    assert ["f", "/run/xtables.lock", "0640", "root", user] in [fields[:5] for fields in tmpfiles]


def test_destdir_install_touches_nothing_live() -> None:
    dry = make("-n", "install", "DESTDIR=/nonexistent/stage").stdout
    for live_only in ("useradd", "systemd-sysusers", "systemctl", "systemd-tmpfiles", "chgrp", "/var/log"):
        assert live_only not in dry, f"`make install DESTDIR=...` would run {live_only}"


def test_destdir_install_stages_a_relocated_venv(tmp_path_factory: pytest.TempPathFactory) -> None:
    src, wheels = wheelhouse.prepared(tmp_path_factory)
    dest = tmp_path_factory.mktemp("stage")
    make("install", f"DESTDIR={dest}", cwd=src, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)})

    for path, mode in {"etc/systemd/system/web-ipt-d.service": 0o644, "etc/systemd/system/web-ipt-d.socket": 0o644,
                       "etc/web-ipt-d": 0o750, "etc/web-ipt-d/config.yaml": 0o640,
                       "etc/logrotate.d/web-ipt-d": 0o644, "etc/sysusers.d/web-ipt-d.conf": 0o644,
                       "etc/tmpfiles.d/web-ipt-d.conf": 0o644, "etc/modules-load.d/web-ipt-d.conf": 0o644}.items():
        assert (dest / path).stat().st_mode & 0o7777 == mode, path
    for action in ("web-ipt-d.conf", "web-ipt-d-multiport.conf"):
        assert (dest / "etc/fail2ban/action.d" / action).read_bytes() == \
            (REPO / "fail2ban/action.d" / action).read_bytes()
    assert os.readlink(dest / "usr/local/sbin/web-ipt-d") == "/opt/web-ipt-d/bin/web-ipt-d"
    service = parse_unit(dest / "etc/systemd/system/web-ipt-d.service")["Service"]
    assert service["ExecStart"] == ["/opt/web-ipt-d/bin/web-ipt-d -config /etc/web-ipt-d/config.yaml"]

    venv = dest / "opt/web-ipt-d"
    assert (venv / "bin/web-ipt-d").read_text().splitlines()[0] == "#!/opt/web-ipt-d/bin/python"
    staged_path = str(dest).encode()
    leaks = [path for root, _, files in os.walk(venv) for path in (Path(root, name) for name in files)
             if not path.is_symlink() and staged_path in path.read_bytes()]
    assert leaks == [], f"files still naming the staging dir: {leaks[:5]}"
    version = subprocess.run([str(venv / "bin/python"), "-m", "webiptd", "-version"],
                             capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"web-ipt-d {__version__}"


def test_install_never_overwrites_an_existing_config(tmp_path: Path) -> None:
    make("install-files", f"DESTDIR={tmp_path}")
    config = tmp_path / "etc/web-ipt-d/config.yaml"
    assert config.read_text() == (REPO / "etc/config.yaml").read_text()
    config.write_text("# mine\n")
    config.chmod(0o600)
    make("install-files", f"DESTDIR={tmp_path}")
    assert config.read_text() == "# mine\n"
    assert config.stat().st_mode & 0o777 == 0o600
