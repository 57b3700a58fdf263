"""End to end under a real systemd 252 as PID 1 in a throwaway nspawn container (tests/nspawn.py): the install
steps of docs/service.md, socket activation, reload, the journal, stop, the socket's IP access list, and a reboot that
restores the bans. The steps run in file order on one container, whose firewall is its own (--private-network).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests import nspawn, wheelhouse
from tests.netns import NetNS

# make test installs systemd-container and the rest: a missing tool fails these tests, it does not skip them.
pytestmark = pytest.mark.root

SRC_INSIDE, WHEELS_INSIDE = "/root/web-ipt-d", "/root/wheelhouse"
CA = "/etc/web-ipt-d/ca.crt"
PASSWORD, OPS_PASSWORD = "fail2ban-pw", "ops-pw"
V4, V6 = "203.0.113.7", "2001:db8:ffff::7"
RULE4, RULE6 = f"-A f2b-web -s {V4}/32 -j DROP", f"-A f2b-web -s {V6}/128 -j DROP"
CAPS_NET_ADMIN_AND_NET_RAW = (1 << 12) | (1 << 13)

# The socket's access list (docs/socket-access.md): the sample drop-in, installed with the site's line replaced,
# tried from a namespace linked to the container by a veth, from one allowed and one other address per family.
IP_ACCESS_SAMPLE = wheelhouse.REPO / "systemd/web-ipt-d.socket.d/ip-access.conf.example"
IP_ACCESS_DROP_IN = "/etc/systemd/system/web-ipt-d.socket.d/ip-access.conf"
IP_ACCESS_SITE_LINE = "IPAddressAllow=10.1.2.0/24 2001:db8:1::/64"
BOX4, BOX6 = "198.51.100.1", "2001:db8::1"
ALLOWED4, ALLOWED6 = "198.51.100.2", "2001:db8::2"
DENIED4, DENIED6 = "198.51.100.3", "2001:db8::3"
REMOTE_BAN = "203.0.113.8"
CURL_TIMED_OUT = 28  # curl(1) EXIT CODES: "Operation timeout"
DENIED_WAIT = 2.0  # seconds a denied client waits for an answer to its SYN; an allowed one gets it in milliseconds
LOG_FILE = "/var/log/web-ipt-d/web-ipt-d.log"

# The commands of docs/service.md's "Install" section, run below as written (the wheelhouse by tests/wheelhouse.py);
# test_readme_gives_these_steps checks that section still gives them.
README_STEPS = (
    f"PIP_NO_INDEX=1 PIP_FIND_LINKS={WHEELS_INSIDE} make install",
    "pip wheel --use-pep517 --wheel-dir wheelhouse . 'setuptools>=77'",
    "web-ipt-d -gen_certs /etc/web-ipt-d -host",
    "chgrp web-ipt-d /etc/web-ipt-d/server.key && chmod 0640 /etc/web-ipt-d/server.key",
    "web-ipt-d -hash_password",
    "runuser -u web-ipt-d -- web-ipt-d -check_config",
    "systemctl enable web-ipt-d.service",
    "systemctl start web-ipt-d.socket",
    "systemctl reload web-ipt-d",
    "journalctl -u web-ipt-d",
)


class Machine:
    """The Disk, the container booted on it now, and the install guide's steps run inside."""

    def __init__(self, base: Path, src: Path, wheels: Path) -> None:
        self.binds = {src: SRC_INSIDE, wheels: WHEELS_INSIDE}
        self.disk = nspawn.Disk(base)
        self.box: nspawn.Container | None = None

    def boot(self, unit: str = "basic.target", wait: bool = True) -> nspawn.Container:
        if self.box is not None:
            self.box.stop()
            self.box = None
        self.box = self.disk.boot(unit, self.binds)
        if wait:
            self.box.wait_booted()
        return self.box

    def wait_active(self, *units: str, timeout: float = 60) -> None:
        """Wait for these units only (not the whole boot, which may wait on the host's other services)."""
        deadline = time.monotonic() + timeout
        while self.run("systemctl", "is-active", *units, check=False).split() != ["active"] * len(units):
            assert time.monotonic() < deadline, f"{units} not active after {timeout} s"
            time.sleep(0.1)

    def run(self, *argv: str, **kw: Any) -> str:
        assert self.box is not None
        return self.box.run(argv, **kw).stdout

    def sh(self, script: str, **kw: Any) -> str:
        return self.run("sh", "-ec", script, **kw)

    def curl(self, method: str, path: str, user: str | None = "fail2ban", password: str = PASSWORD,
             host: str = "127.0.0.1") -> tuple[int, Any, float]:
        """(status, JSON body, seconds) of one HTTPS request made inside the container."""
        argv = ["curl", "-sS", "-g", "--max-time", "20", "--cacert", CA, "-X", method,
                "-o", "/dev/stdout", "-w", "\n%{http_code} %{time_total}"]
        if user is not None:
            argv += ["-u", f"{user}:{password}"]  # a test-only password, inside a throwaway container
        out = self.run(*argv, f"https://{host}:8820{path}")
        body, _, tail = out.rpartition("\n")
        status, seconds = tail.split()
        return int(status), json.loads(body) if body else None, float(seconds)

    def curl_from(self, peer: NetNS, source: str, method: str, path: str, user: str | None = "fail2ban",
                  connect_timeout: float = 20) -> tuple[int, int]:
        """(curl's exit code, HTTP status or 0) of one HTTPS request from `source`, an address of `peer`,
        to the container's veth address of the same family; the certificate is checked for "localhost"."""
        assert self.box is not None
        server = f"[{BOX6}]" if ":" in source else BOX4
        argv = ["curl", "-sS", "--cacert", str(self.box.path(CA)), "--interface", source,
                "--connect-timeout", str(connect_timeout), "--max-time", "30",
                "--connect-to", f"localhost:8820:{server}:8820", "-X", method, "-o", "/dev/null", "-w", "%{http_code}"]
        if user is not None:
            argv += ["-u", f"{user}:{PASSWORD}"]  # a test-only password, inside a throwaway container
        proc = peer.run([*argv, f"https://localhost:8820{path}"], check=False)
        return proc.returncode, int(proc.stdout or 0)

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).strip()

    def is_active(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).strip()

    def rules(self) -> list[str]:
        return (self.run("iptables-legacy-save") + self.run("ip6tables-legacy-save")).splitlines()

    def other_backends(self) -> tuple[str, str]:
        """What the nftables and ipset backends hold: `nft list ruleset` and `ipset list`."""
        return self.run("nft", "list", "ruleset"), self.run("ipset", "list")

    def hash_password(self, password: str) -> str:
        return self.run("web-ipt-d", "-hash_password", input=password + "\n").strip()

    def edit_config(self, change: Any) -> None:
        """Edit /etc/web-ipt-d/config.yaml in place, as an admin with an editor would (mode and owner kept)."""
        assert self.box is not None
        path = self.box.path("/etc/web-ipt-d/config.yaml")
        config = yaml.safe_load(path.read_text())
        change(config)
        with open(path, "r+") as f:
            f.truncate()
            f.write(yaml.safe_dump(config, sort_keys=False))

    def close(self) -> None:
        try:
            if self.box is not None:
                self.box.stop()
        finally:
            self.disk.close()


def install_as_the_readme_says(m: Machine) -> None:
    m.run("make", "-C", SRC_INSIDE, "install", env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS_INSIDE})
    m.run("web-ipt-d", "-gen_certs", "/etc/web-ipt-d", "-host", "localhost", "-host", "127.0.0.1", "-host", "::1")
    m.sh("chgrp web-ipt-d /etc/web-ipt-d/server.key && chmod 0640 /etc/web-ipt-d/server.key")
    password_hash = m.hash_password(PASSWORD)

    def configure(config: dict[str, Any]) -> None:
        config["users"] = {"fail2ban": {"password_hash": password_hash, "chains": ["f2b-*"]}}
        # One chain per backend: each must work in the sandbox (only CAP_NET_ADMIN and CAP_NET_RAW).
        config["chains"] = {"f2b-web": {"hooks": ["INPUT"], "target": "DROP"},
                            "f2b-nft": {"hooks": ["INPUT"], "target": "DROP", "backend": "nftables"},
                            "f2b-set": {"hooks": ["INPUT"], "target": "DROP", "backend": "ipset"}}

    m.edit_config(configure)
    m.run("runuser", "-u", "web-ipt-d", "--", "web-ipt-d", "-check_config")
    m.run("systemctl", "enable", "web-ipt-d.service")
    m.run("systemctl", "start", "web-ipt-d.socket")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    src, wheels = wheelhouse.prepared(tmp_path_factory)
    m = Machine(tmp_path_factory.mktemp("nspawn"), src, wheels)
    try:
        m.boot()
        install_as_the_readme_says(m)
        yield m
    finally:
        m.close()


def test_readme_gives_these_steps() -> None:
    guide = (wheelhouse.REPO / "docs/service.md").read_text()
    section = guide.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    missing = [step for step in README_STEPS if step not in section]
    assert missing == []


def test_first_request_activates_the_service_and_blocks(machine: Machine) -> None:
    assert machine.is_active("web-ipt-d.socket") == "active"
    assert machine.is_active("web-ipt-d.service") == "inactive"

    status, entry, _ = machine.curl("PUT", f"/chain/f2b-web/ipv4/{V4}")
    assert status == 201, entry
    assert entry["network"] == f"{V4}/32" and entry["created_by"] == "fail2ban"
    assert machine.is_active("web-ipt-d.service") == "active"
    # Over IPv6 too: the socket is dual-stack.
    status, entry, _ = machine.curl("PUT", f"/chain/f2b-web/ipv6/{V6}", host="[::1]")
    assert status == 201, entry
    rules = machine.rules()
    assert RULE4 in rules and RULE6 in rules
    assert rules.count("-A INPUT -j f2b-web") == 2
    for chain in ("f2b-nft", "f2b-set"):
        status, entry, _ = machine.curl("PUT", f"/chain/{chain}/ipv4/{V4}?timeout=3600")
        assert status == 201, entry
    nft, ipset = machine.other_backends()
    assert V4 in nft and V4 in ipset


def test_runs_unprivileged_with_only_net_admin_and_net_raw(machine: Machine) -> None:
    pid = machine.show("web-ipt-d.service", "MainPID")
    status = dict(line.split(":", 1) for line in machine.run("cat", f"/proc/{pid}/status").splitlines())
    uid = machine.run("id", "-u", "web-ipt-d").strip()
    assert status["Uid"].split() == [uid] * 4
    for caps in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[caps], 16) == CAPS_NET_ADMIN_AND_NET_RAW, caps
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    owners = machine.run("stat", "-c", "%U %a %n", "/var/lib/web-ipt-d", "/var/lib/web-ipt-d/state.db",
                         "/var/log/web-ipt-d/web-ipt-d.log").splitlines()
    assert owners == ["web-ipt-d 700 /var/lib/web-ipt-d", "web-ipt-d 600 /var/lib/web-ipt-d/state.db",
                      "web-ipt-d 600 /var/log/web-ipt-d/web-ipt-d.log"]


def test_the_daemon_feeds_the_watchdog(machine: Machine) -> None:
    assert machine.show("web-ipt-d.service", "WatchdogUSec") not in ("", "0", "infinity")
    first = int(machine.show("web-ipt-d.service", "WatchdogTimestampMonotonic"))
    deadline = time.monotonic() + 10
    while int(machine.show("web-ipt-d.service", "WatchdogTimestampMonotonic")) == first:
        assert time.monotonic() < deadline, "no WATCHDOG=1 within 10 s"
        time.sleep(0.2)


def test_reload_applies_a_new_user_with_the_same_main_pid(machine: Machine) -> None:
    pid = machine.show("web-ipt-d.service", "MainPID")
    assert machine.curl("GET", "/chains", user="ops", password=OPS_PASSWORD)[0] == 401
    ops_hash = machine.hash_password(OPS_PASSWORD)
    machine.edit_config(lambda c: c["users"].update(ops={"password_hash": ops_hash, "chains": ["*"],
                                                         "read_only": True}))
    machine.run("systemctl", "reload", "web-ipt-d")
    status, body, _ = machine.curl("GET", "/chains", user="ops", password=OPS_PASSWORD)
    assert status == 200, body
    assert machine.show("web-ipt-d.service", "MainPID") == pid
    assert machine.show("web-ipt-d.service", "NRestarts") == "0"


def test_journal_and_log_file_have_the_audit_line(machine: Machine) -> None:
    audit = re.compile(rf"user=fail2ban client=127\.0\.0\.1 action=block chain=f2b-web network={V4}/32 "
                       r".*result=created")
    journal = machine.run("journalctl", "-u", "web-ipt-d", "-o", "cat", "--no-pager")
    assert audit.search(journal), journal[-3000:]
    assert audit.search(machine.run("cat", "/var/log/web-ipt-d/web-ipt-d.log"))


def test_stop_keeps_the_bans_and_the_next_request_finds_them(machine: Machine,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    machine.run("systemctl", "stop", "web-ipt-d.service")
    assert machine.is_active("web-ipt-d.service") == "inactive"
    assert machine.is_active("web-ipt-d.socket") == "active"
    assert RULE4 in machine.rules() and RULE6 in machine.rules()
    nft, ipset = machine.other_backends()
    assert V4 in nft and V4 in ipset

    # Activation latency: the first request on a stopped, socket-activated service (no auth, so no bcrypt).
    latencies = []
    for _ in range(3):
        machine.run("systemctl", "stop", "web-ipt-d.service")
        status, body, seconds = machine.curl("GET", "/health", user=None)
        assert status == 200 and body == {"status": "ok"}
        latencies.append(seconds)
    with capsys.disabled():
        print(f"\nweb-ipt-d activation latency (stopped service, first HTTPS GET /health): "
              f"median {statistics.median(latencies):.3f} s of {', '.join(f'{s:.3f}' for s in latencies)}")

    status, entry, _ = machine.curl("GET", f"/chain/f2b-web/ipv4/{V4}")
    assert status == 200 and entry["network"] == f"{V4}/32"
    rules = machine.rules()
    assert rules.count(RULE4) == 1 and rules.count(RULE6) == 1


def test_socket_access_list_drops_other_addresses_before_the_daemon(machine: Machine, peer: NetNS) -> None:
    assert machine.box is not None
    machine.box.link(peer, [f"{BOX4}/24", f"{BOX6}/64"],
                     [f"{ALLOWED4}/24", f"{DENIED4}/24", f"{ALLOWED6}/64", f"{DENIED6}/64"])
    log = machine.box.path(LOG_FILE)
    level: list[str] = []

    def log_debug(config: dict[str, Any]) -> None:
        # At DEBUG the daemon logs every request with its client address, so the log shows whom it saw.
        level.append(config["log"]["level"])
        config["log"]["level"] = "DEBUG"

    machine.edit_config(log_debug)
    machine.run("systemctl", "try-reload-or-restart", "web-ipt-d")  # not running: its next start reads it
    try:
        # Before the drop-in: every address gets in, and the log names it.
        for source in (DENIED4, DENIED6):
            assert machine.curl_from(peer, source, "GET", "/health", user=None) == (0, 200), source
        assert DENIED4 in log.read_text() and DENIED6 in log.read_text()

        # The sample drop-in, as docs/socket-access.md installs it: copied, the site's line edited, daemon-reload.
        sample = IP_ACCESS_SAMPLE.read_text()
        assert IP_ACCESS_SITE_LINE in sample
        machine.run("mkdir", "-p", str(Path(IP_ACCESS_DROP_IN).parent))
        machine.box.path(IP_ACCESS_DROP_IN).write_text(
            sample.replace(IP_ACCESS_SITE_LINE, f"IPAddressAllow={ALLOWED4} {ALLOWED6}"))
        machine.run("systemctl", "daemon-reload")
        assert set(machine.show("web-ipt-d.socket", "IPAddressDeny").split()) == {"0.0.0.0/0", "::/0"}
        assert set(machine.show("web-ipt-d.socket", "IPAddressAllow").split()) == {
            "127.0.0.0/8", "::1/128", f"{ALLOWED4}/32", f"{ALLOWED6}/128"}
        seen = log.stat().st_size

        # Stopped, so the next connection would start it: a denied SYN is dropped in the kernel, unanswered
        # (curl times out; no refusal, no TLS), and systemd never even starts the service for it.
        machine.run("systemctl", "stop", "web-ipt-d.service")
        for source in (DENIED4, DENIED6):
            started = time.monotonic()
            assert machine.curl_from(peer, source, "GET", "/health", user=None, connect_timeout=DENIED_WAIT) == (
                CURL_TIMED_OUT, 0), f"{source} got in: no BPF program on the socket? {_bpf_firewall_lines(machine)!r}"
            assert time.monotonic() - started >= DENIED_WAIT
        assert machine.is_active("web-ipt-d.service") == "inactive"

        # An allowed address gets in, starts the service and blocks; the audit line names it.
        assert machine.curl_from(peer, ALLOWED4, "PUT", f"/chain/f2b-web/ipv4/{REMOTE_BAN}") == (0, 201)
        assert machine.is_active("web-ipt-d.service") == "active"
        assert machine.curl_from(peer, ALLOWED6, "GET", "/health", user=None) == (0, 200)
        # localhost stays allowed: a fail2ban on the machine itself.
        assert machine.curl("GET", "/health", user=None)[0] == 200
        assert machine.curl("GET", "/health", user=None, host="[::1]")[0] == 200
        # Running, the connections it accepts carry the socket's access list too.
        assert machine.curl_from(peer, DENIED4, "GET", "/health", user=None, connect_timeout=DENIED_WAIT) == (
            CURL_TIMED_OUT, 0)

        with open(log, "rb") as f:
            f.seek(seen)
            since = f.read().decode(errors="replace")
        assert ALLOWED4 in since and ALLOWED6 in since
        assert DENIED4 not in since and DENIED6 not in since
        journal = machine.run("journalctl", "-u", "web-ipt-d", "-o", "cat", "--no-pager")
        assert re.search(rf"user=fail2ban client=(::ffff:)?{re.escape(ALLOWED4)} action=block chain=f2b-web "
                         rf"network={REMOTE_BAN}/32 .*result=created", journal), journal[-3000:]

        # Taking the drop-in away is live too.
        machine.run("rm", IP_ACCESS_DROP_IN)
        machine.run("systemctl", "daemon-reload")
        assert machine.curl_from(peer, DENIED4, "GET", "/health", user=None) == (0, 200)
    finally:
        machine.run("rm", "-f", IP_ACCESS_DROP_IN)
        machine.run("systemctl", "daemon-reload")
        machine.edit_config(lambda c: c["log"].update(level=level[0]))
        machine.run("systemctl", "try-reload-or-restart", "web-ipt-d")


def _bpf_firewall_lines(machine: Machine) -> str:
    """What systemd said about BPF firewalling this boot: once, for the first unit with an access list, and in a
    container only at debug level when bpf(2) is refused (see tests/nspawn.py)."""
    return machine.run("journalctl", "-b", "-o", "cat", "--no-pager", "-g", "IP firewall|BPF", check=False)


def test_reboot_restores_the_bans_at_boot_before_the_network(machine: Machine) -> None:
    # A new container on the same disk: fresh /run, fresh network namespace (an empty firewall),
    # booted to multi-user.target like a real machine. No request is made before the checks.
    machine.boot("multi-user.target", wait=False)
    machine.wait_active("web-ipt-d.service", "network-pre.target")
    rules = machine.rules()
    assert RULE4 in rules and RULE6 in rules
    nft, ipset = machine.other_backends()
    assert V4 in nft and V4 in ipset
    # Started at boot, and ready (bans restored) before network-pre.target, so before any interface.
    ready = int(machine.show("web-ipt-d.service", "ActiveEnterTimestampMonotonic"))
    network_pre = int(machine.show("network-pre.target", "ActiveEnterTimestampMonotonic"))
    assert 0 < ready <= network_pre
    assert machine.show("web-ipt-d.service", "NRestarts") == "0"

    status, entry, _ = machine.curl("GET", f"/chain/f2b-web/ipv6/{V6}")
    assert status == 200 and entry["network"] == f"{V6}/128"
    assert machine.rules().count(RULE6) == 1
