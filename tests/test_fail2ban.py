"""End-to-end: the real fail2ban-server (Debian's 1.0.2) bans and unbans through the shipped actions,
fail2ban/action.d/web-ipt-d.conf and web-ipt-d-multiport.conf, inside the daemon's namespace; packets from a banned
peer are dropped (for the multiport action, only those to the jail's ports).
"""

from __future__ import annotations

import ast
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest

from tests.conftest import APP_PORT, PASSWORDS, PEER4, PEER6, PORT, SERVER4, SERVER6, Daemon, Listener
from tests.netns import NetNS, veth_pair

T = TypeVar("T")
# fail2ban's own complaint about the socket file a SIGKILLed server leaves behind; -x removes it.
STALE_SOCKET = "Fail2ban seems to be already running"

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "fail2ban" / "action.d" / "web-ipt-d.conf"
MULTIPORT = ROOT / "fail2ban" / "action.d" / "web-ipt-d-multiport.conf"
FAIL2BAN_SERVER = shutil.which("fail2ban-server")
FAIL2BAN_CLIENT = shutil.which("fail2ban-client")

JAIL = "wipt"
CHAIN = "f2b-web"
WAIT = 15.0  # upper bound for anything fail2ban does; it usually takes well under a second
SSH_PORT = 2222  # what the multiport jails ban; APP_PORT stays open to those bans


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Fail2ban:
    """A fail2ban-server in the foreground inside `ns`, with a private config dir built around our action.

    Nothing of /etc/fail2ban is read: fail2ban.conf, jail.conf, the filter and the actions are
    all in `root`, and the only actions are copies of the shipped web-ipt-d.conf and web-ipt-d-multiport.conf.
    The jails named in `multiport` use the multiport action with those bracket options (`port="22"`), the others
    the plain one.
    """

    def __init__(self, daemon: Daemon, root: Path, bantime: int = 600, curlopts: str = "",
                 jails: tuple[str, ...] = (JAIL,), multiport: dict[str, str] | None = None):
        self.ns = daemon.ns
        self.root = root
        self.conf = root / "conf"
        self.sock = root / "f2b.sock"
        self.pidfile = root / "f2b.pid"
        self.logfile = root / "fail2ban.log"
        self.authlog = root / "auth.log"
        self.stderr_path = root / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (self.conf / "action.d").mkdir(parents=True)
        (self.conf / "filter.d").mkdir()
        shutil.copy(ACTION, self.conf / "action.d" / "web-ipt-d.conf")
        shutil.copy(MULTIPORT, self.conf / "action.d" / "web-ipt-d-multiport.conf")
        multiport = multiport or {}
        netrc = root / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login f2b password {PASSWORDS['f2b']}\n")
        netrc.chmod(0o600)
        self.authlog.touch()
        (self.conf / "fail2ban.conf").write_text(
            "[Definition]\n"
            "loglevel = INFO\n"
            f"logtarget = {self.logfile}\n"
            f"socket = {self.sock}\n"
            f"pidfile = {self.pidfile}\n"
            f"dbfile = {root / 'fail2ban.sqlite3'}\n"
            "dbpurgeage = 1d\n")
        (self.conf / "filter.d" / "wipt.conf").write_text(
            "[Definition]\n"
            "failregex = ^auth failure from <HOST>$\n"
            "datepattern = {NONE}\n")
        (self.conf / "jail.conf").write_text(
            "[DEFAULT]\n"
            "backend = polling\n"
            "usedns = no\n"
            "ignoreself = false\n"
            "ignoreip =\n"
            "maxretry = 2\n"
            "findtime = 10m\n"
            f"bantime = {bantime}\n"
            + "".join(
                f"\n[{jail}]\n"
                "enabled = true\n"
                "filter = wipt\n"
                f"logpath = {self.authlog}\n"
                f'action = web-ipt-d{"-multiport" if jail in multiport else ""}[url="https://127.0.0.1:{PORT}", '
                f'chain={CHAIN}, cafile="{daemon.pki.ca}", netrc="{netrc}", curlopts="{curlopts}"'
                f'{", " + multiport[jail] if jail in multiport else ""}]\n'
                for jail in jails))
        self.jails = jails

    def start(self) -> None:
        assert FAIL2BAN_SERVER is not None
        with open(self.stderr_path, "ab") as err:
            self.proc = self.ns.popen(
                [FAIL2BAN_SERVER, "-f", "-x", "-c", self.conf, "-s", self.sock, "-p", self.pidfile],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        # The global status, not `status JAIL`: asking for a jail that is not there yet is an ERROR in its log.
        jails = r",\s*".join(self.jails)
        wait_for(f"jails {self.jails} to start", lambda: self.alive() and re.search(
            rf"Jail list:\s*{jails}$", self.client("status", check=False).stdout, re.M), timeout=30)

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"fail2ban-server exited with {self.proc.returncode}:\n"
                                 f"{self.stderr_path.read_text(errors='replace')}\n{self.log()}")
        return True

    def client(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """fail2ban-client on our private socket (never the system's)."""
        assert FAIL2BAN_CLIENT is not None
        return self.ns.run([FAIL2BAN_CLIENT, "-c", self.conf, "-s", self.sock, *args], check=check, timeout=30)

    def fail(self, address: str, times: int = 2) -> None:
        with open(self.authlog, "a") as log:
            log.write(f"auth failure from {address}\n" * times)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def errors(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if re.search(r"\b(ERROR|CRITICAL)\b", line) and STALE_SOCKET not in line]


@pytest.fixture
def net(daemon: Daemon, peer: NetNS) -> Iterator[tuple[Daemon, NetNS]]:
    """The daemon's namespace linked to a peer, with a TCP listener on APP_PORT."""
    veth_pair(daemon.ns, peer)
    listeners = [Listener(daemon.ns, SERVER4, APP_PORT), Listener(daemon.ns, SERVER6, APP_PORT)]
    try:
        daemon.start()
        yield daemon, peer
    finally:
        for listener in listeners:
            listener.close()


@contextmanager
def make_fail2ban(daemon: Daemon, bantime: int, curlopts: str = "", jails: tuple[str, ...] = (JAIL,),
                  multiport: dict[str, str] | None = None) -> Iterator[Fail2ban]:
    f2b = Fail2ban(daemon, daemon.workdir / "f2b", bantime, curlopts, jails, multiport)
    try:
        yield f2b
    finally:
        # Before the daemon goes, so fail2ban's unbans on stop find it.
        if f2b.proc is not None and f2b.proc.poll() is None:
            f2b.proc.terminate()
            try:
                f2b.proc.wait(30)
            except subprocess.TimeoutExpired:
                f2b.proc.kill()
                f2b.proc.wait(10)


@pytest.fixture
def f2b(net: tuple[Daemon, NetNS], request: pytest.FixtureRequest) -> Iterator[Fail2ban]:
    with make_fail2ban(net[0], getattr(request, "param", 600)) as f2b:
        yield f2b


def reaches(peer: NetNS, host: str, port: int = APP_PORT) -> bool:
    """Whether a TCP connect from the peer to host:port completes (a DROP makes it time out)."""
    try:
        peer.connect(host, port, timeout=1.0).close()
    except TimeoutError:
        return False
    return True


def audit(d: Daemon, network: str) -> list[str]:
    return [line for line in d.log().splitlines() if "webiptd.audit" in line and f"network={network} " in line]


def rule(network: str, proto: str = "", ports: str = "") -> str:
    scope = f"-p {proto} -m multiport --dports {ports} " if proto else ""
    return f"-A {CHAIN} -s {network} {scope}-j DROP"


@pytest.mark.root
def test_failures_ban_the_peer_and_unbanip_lifts_it(net, f2b):
    d, peer = net
    f2b.start()
    assert reaches(peer, SERVER4)

    f2b.fail(PEER4)
    wait_for("the ban rule", lambda: d.chain_rules(CHAIN) == [rule(PEER4 + "/32")])
    assert not reaches(peer, SERVER4)
    assert reaches(peer, SERVER6), "an IPv4 ban must not touch IPv6"
    entry = d.request("GET", f"/chain/{CHAIN}/ipv4/{PEER4}").json
    # The jail's own claim: owned by the netrc user and the jail's name.
    assert entry["created_by"] == f"f2b/{JAIL}" and entry["expires_at"] is not None
    assert [c["owner"] for c in entry["claims"]] == [f"f2b/{JAIL}"]
    assert audit(d, PEER4 + "/32")[-1].endswith("action=block chain=f2b-web network=198.51.100.2/32 "
                                                  f"owner=f2b/{JAIL} timeout=600 result=created scope=all")

    f2b.client("set", JAIL, "unbanip", PEER4)
    wait_for("the unban", lambda: d.chain_rules(CHAIN) == [])
    assert reaches(peer, SERVER4)
    assert f2b.errors() == []


@pytest.mark.root
def test_an_ipv6_failure_bans_in_ip6tables(net, f2b):
    d, peer = net
    f2b.start()
    assert reaches(peer, SERVER6)

    f2b.fail(PEER6)
    f2b.fail("2001:db8:ffff::7")  # blocked only, never contacted
    wait_for("the IPv6 ban rules", lambda: sorted(d.chain_rules(CHAIN, 6)) ==
             [rule("2001:db8::2/128"), rule("2001:db8:ffff::7/128")])
    assert not reaches(peer, SERVER6)
    assert reaches(peer, SERVER4), "an IPv6 ban must not touch IPv4"
    assert d.chain_rules(CHAIN, 4) == []
    assert d.request("GET", f"/chain/{CHAIN}/ipv6/{PEER6}").json["created_by"] == f"f2b/{JAIL}"

    f2b.client("set", JAIL, "unbanip", PEER6)
    wait_for("the IPv6 unban", lambda: d.chain_rules(CHAIN, 6) == [rule("2001:db8:ffff::7/128")])
    assert reaches(peer, SERVER6)
    assert f2b.errors() == []


@pytest.mark.root
@pytest.mark.parametrize("f2b", [3], indirect=True)
def test_bantime_expiry_lifts_the_ban(net, f2b):
    d, peer = net
    f2b.start()
    f2b.fail(PEER4)
    wait_for("the ban rule", lambda: d.chain_rules(CHAIN) == [rule(PEER4 + "/32")])
    assert "timeout=3 result=created" in audit(d, PEER4 + "/32")[-1]
    assert not reaches(peer, SERVER4)

    # Whichever comes first, fail2ban's unban or web-ipt-d's own expiry, the block goes.
    wait_for("the ban to expire", lambda: d.chain_rules(CHAIN) == [], timeout=3 + WAIT)
    assert reaches(peer, SERVER4)
    assert d.request("GET", f"/chain/{CHAIN}/ipv4/{PEER4}").status == 404
    assert f2b.errors() == []


@pytest.mark.root
@pytest.mark.parametrize("f2b", [-1], indirect=True)
def test_bantime_minus_one_is_a_permanent_block(net, f2b):
    d, _ = net
    f2b.start()
    f2b.fail("203.0.113.9")
    wait_for("the ban rule", lambda: d.chain_rules(CHAIN) == [rule("203.0.113.9/32")])
    assert d.request("GET", f"/chain/{CHAIN}/ipv4/203.0.113.9").json["expires_at"] is None
    assert audit(d, "203.0.113.9/32")[-1].endswith("timeout=permanent result=created scope=all")

    # A ban restored from fail2ban's database keeps bantime -1, so it stays permanent.
    f2b.stop(signal.SIGKILL)
    f2b.start()
    wait_for("the restored ban",
             lambda: audit(d, "203.0.113.9/32")[-1].endswith("timeout=permanent result=exists scope=all"))
    assert d.chain_rules(CHAIN) == [rule("203.0.113.9/32")]
    assert d.request("GET", f"/chain/{CHAIN}/ipv4/203.0.113.9").json["expires_at"] is None
    assert f2b.errors() == []


@pytest.mark.root
def test_restart_with_restored_bans_is_idempotent(net, f2b):
    d, peer = net
    f2b.start()
    f2b.fail(PEER4)
    f2b.fail(PEER6)
    f2b.fail("203.0.113.5")
    want4 = sorted([rule(PEER4 + "/32"), rule("203.0.113.5/32")])
    want6 = [rule("2001:db8::2/128")]
    wait_for("the ban rules", lambda: sorted(d.chain_rules(CHAIN)) == want4 and d.chain_rules(CHAIN, 6) == want6)

    # A crash: no unbans are sent, the blocks stay, and the next start restores the bans
    # from fail2ban's database and sends them again to blocks that already exist.
    f2b.stop(signal.SIGKILL)
    f2b.start()
    wait_for("the restored bans", lambda: all(audit(d, n)[-1].endswith("result=exists scope=all")
                                              for n in (PEER4 + "/32", "203.0.113.5/32", "2001:db8::2/128")))
    assert sorted(d.chain_rules(CHAIN)) == want4 and d.chain_rules(CHAIN, 6) == want6
    assert not reaches(peer, SERVER4) and not reaches(peer, SERVER6)

    # A clean stop unbans everything fail2ban banned...
    assert f2b.stop() == 0
    assert d.chain_rules(CHAIN) == [] and d.chain_rules(CHAIN, 6) == []
    assert reaches(peer, SERVER4) and reaches(peer, SERVER6)
    # ...and the next start bans it all again, once.
    f2b.start()
    wait_for("the bans after a clean restart",
             lambda: sorted(d.chain_rules(CHAIN)) == want4 and d.chain_rules(CHAIN, 6) == want6)
    assert not reaches(peer, SERVER4)
    assert f2b.errors() == []


@pytest.mark.root
def test_two_jails_banning_one_address_keep_it_blocked_until_both_unban(net):
    d, peer = net
    with make_fail2ban(d, 600, jails=(JAIL, "wipt2")) as f2b:
        f2b.start()
        f2b.fail(PEER4)  # one log, two jails: both ban
        owners = {f"f2b/{JAIL}", "f2b/wipt2"}
        wait_for("both claims", lambda: {c["owner"] for c in d.request(
            "GET", f"/chain/{CHAIN}/ipv4/{PEER4}").json.get("claims", [])} == owners)
        assert d.chain_rules(CHAIN) == [rule(PEER4 + "/32")]
        # An admin's block of the same address is not a jail's to lift either.
        assert d.request("PUT", f"/chain/{CHAIN}/ipv4/203.0.113.30").status == 201

        f2b.client("set", JAIL, "unbanip", PEER4)
        wait_for("the first unban", lambda: audit(d, PEER4 + "/32")[-1].endswith(
            f"action=unblock chain=f2b-web network={PEER4}/32 owner=f2b/{JAIL} timeout=- result=released scope=all"))
        assert d.chain_rules(CHAIN) == sorted([rule(PEER4 + "/32"), rule("203.0.113.30/32")])
        assert not reaches(peer, SERVER4)

        f2b.client("set", "wipt2", "unbanip", PEER4)
        wait_for("the second unban", lambda: d.chain_rules(CHAIN) == [rule("203.0.113.30/32")])
        assert reaches(peer, SERVER4)
        assert f2b.errors() == []
    assert d.chain_rules(CHAIN) == [rule("203.0.113.30/32")]


@pytest.mark.root
def test_curlopts_adds_a_client_certificate(daemon):
    # With tls.client_ca the handshake needs a client certificate, which only curlopts can give.
    daemon.config["tls"]["client_ca"] = str(daemon.pki.ca)
    daemon.start()
    pki = daemon.pki
    with make_fail2ban(daemon, 600, curlopts=f"--cert {pki.client_cert} --key {pki.client_key}") as f2b:
        f2b.start()
        f2b.fail("203.0.113.20")
        wait_for("the ban rule", lambda: daemon.chain_rules(CHAIN) == [rule("203.0.113.20/32")])
        f2b.client("set", JAIL, "unbanip", "203.0.113.20")
        wait_for("the unban", lambda: daemon.chain_rules(CHAIN) == [])
        assert f2b.errors() == []


@pytest.mark.root
def test_an_unreachable_daemon_fails_the_action_start_clearly(ns, workdir, pki, user_hashes):
    # Nothing listens on the port, so actionstart's health check fails at jail start.
    d = Daemon(ns, workdir, pki, user_hashes)
    with make_fail2ban(d, 600) as f2b:
        f2b.start()
        line = wait_for("the start error", lambda: [e for e in f2b.errors() if "is not reachable" in e])
        assert f"https://127.0.0.1:{PORT}/health" in line[0]
        assert PASSWORDS["f2b"] not in f2b.log()



@pytest.fixture
def ssh_port(net: tuple[Daemon, NetNS]) -> Iterator[None]:
    """TCP listeners on SSH_PORT too, next to net's on APP_PORT."""
    ns = net[0].ns
    listeners = [Listener(ns, SERVER4, SSH_PORT), Listener(ns, SERVER6, SSH_PORT)]
    try:
        yield
    finally:
        for listener in listeners:
            listener.close()


def scoped_entry(d: Daemon, family: str, address: str, query: str) -> dict | None:
    """The entry of `address` with the scope of `query` (proto=...&port=...), or None when there is none."""
    reply = d.request("GET", f"/chain/{CHAIN}/{family}/{address}?{query}")
    assert reply.status in (200, 404), reply
    return reply.json if reply.status == 200 else None


def claim_owners(d: Daemon, query: str) -> set[str]:
    entry = scoped_entry(d, "ipv4", PEER4, query)
    return {c["owner"] for c in entry["claims"]} if entry else set()


@pytest.mark.root
def test_the_multiport_action_blocks_only_the_jails_ports(net, ssh_port):
    d, peer = net
    ports = f"{SSH_PORT},8000:8100"  # a list and a range: "," and ":" go through curl and the query as they are
    query = f"proto=tcp&port={ports}"
    with make_fail2ban(d, 600, multiport={JAIL: f'port="{ports}", protocol="tcp"'}) as f2b:
        f2b.start()
        assert reaches(peer, SERVER4, SSH_PORT) and reaches(peer, SERVER6, SSH_PORT)

        f2b.fail(PEER4)
        f2b.fail(PEER6)
        entry = wait_for("the IPv4 ban", lambda: d.chain_rules(CHAIN) != []
                         and scoped_entry(d, "ipv4", PEER4, query))
        assert (entry["proto"], entry["port"]) == ("tcp", ports) and entry["expires_at"] is not None
        assert [c["owner"] for c in entry["claims"]] == [f"f2b/{JAIL}"]
        assert d.chain_rules(CHAIN) == [rule(PEER4 + "/32", "tcp", ports)]
        assert audit(d, PEER4 + "/32")[-1].endswith(f"owner=f2b/{JAIL} timeout=600 result=created scope=tcp/{ports}")
        wait_for("the IPv6 ban", lambda: d.chain_rules(CHAIN, 6) != []
                 and scoped_entry(d, "ipv6", PEER6, query))
        assert d.request("GET", f"/chain/{CHAIN}/ipv4/{PEER4}").status == 404, "no block of all traffic"
        assert not reaches(peer, SERVER4, SSH_PORT) and not reaches(peer, SERVER6, SSH_PORT)
        assert reaches(peer, SERVER4) and reaches(peer, SERVER6), "a port outside the jail's stays open"

        f2b.client("set", JAIL, "unbanip", PEER4)
        wait_for("the IPv4 unban", lambda: d.chain_rules(CHAIN) == []
                 and scoped_entry(d, "ipv4", PEER4, query) is None)
        assert reaches(peer, SERVER4, SSH_PORT)
        assert not reaches(peer, SERVER6, SSH_PORT), "the IPv6 ban is another ticket"
        assert f2b.errors() == []


@pytest.mark.root
def test_two_multiport_jails_keep_their_port_blocked_until_both_unban(net, ssh_port):
    d, peer = net
    tcp, udp = f"proto=tcp&port={SSH_PORT}", f"proto=udp&port={SSH_PORT}"
    # The first jail takes the action's default protocol (tcp); the second names two, one block each.
    multiport = {JAIL: f'port="{SSH_PORT}"', "wipt2": f'port="{SSH_PORT}", protocol="tcp,udp"'}
    with make_fail2ban(d, 600, jails=(JAIL, "wipt2"), multiport=multiport) as f2b:
        f2b.start()
        f2b.fail(PEER4)  # one log, two jails: both ban
        wait_for("both jails' claims", lambda: claim_owners(d, tcp) == {f"f2b/{JAIL}", "f2b/wipt2"}
                 and claim_owners(d, udp) == {"f2b/wipt2"})
        rules = [rule(PEER4 + "/32", proto, str(SSH_PORT)) for proto in ("tcp", "udp")]
        assert d.chain_rules(CHAIN) == rules
        assert not reaches(peer, SERVER4, SSH_PORT) and reaches(peer, SERVER4)

        f2b.client("set", JAIL, "unbanip", PEER4)
        wait_for("the first unban", lambda: claim_owners(d, tcp) == {"f2b/wipt2"})
        assert d.chain_rules(CHAIN) == rules
        assert not reaches(peer, SERVER4, SSH_PORT)

        f2b.client("set", "wipt2", "unbanip", PEER4)
        wait_for("the second unban", lambda: d.chain_rules(CHAIN) == []
                 and not claim_owners(d, tcp) and not claim_owners(d, udp))
        assert reaches(peer, SERVER4, SSH_PORT)
        assert f2b.errors() == []


def readme_jails(section: str) -> list[tuple[str, str]]:
    """The jail files of a section of docs/fail2ban.md: (name, text) of each ```ini block that starts `# /etc/...`."""
    text = (ROOT / "docs/fail2ban.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```ini\n# (/etc/fail2ban/\S+)\n(.*?)```", text, re.S)


def stock_config_with(tmp_path: Path, name: str, jail: str) -> list[list]:
    """The command stream of a copy of Debian's stock config plus our actions and `jail` written as `name` (an
    /etc/fail2ban path), only parsed (-d): no server, no socket."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf, symlinks=True)
    for stale in [*(conf / "jail.d").glob("web-ipt-d.*"), conf / "jail.local"]:  # a real installation's own
        stale.unlink(missing_ok=True)
    shutil.copy(ACTION, conf / "action.d" / "web-ipt-d.conf")
    shutil.copy(MULTIPORT, conf / "action.d" / "web-ipt-d-multiport.conf")
    (conf / Path(name).relative_to("/etc/fail2ban")).write_text(jail)
    assert FAIL2BAN_CLIENT is not None
    out = subprocess.run([FAIL2BAN_CLIENT, "-c", str(conf), "-s", str(tmp_path / "none.sock"), "-d"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [ast.literal_eval(line) for line in out.splitlines() if line.startswith("[")]


def action_options(stream: list[list], jail: str, action: str) -> dict[str, str]:
    assert [c[3] for c in stream if c[:3] == ["set", jail, "addaction"]] == [action]
    return dict(next(c[4] for c in stream if c[:4] == ["multi-set", jail, "action", action]))


STOCK_CONFIG = pytest.mark.skipif(
    FAIL2BAN_CLIENT is None or not Path("/etc/fail2ban/jail.conf").exists(),
    reason="needs Debian's fail2ban: its client and stock config (debian-packages.txt)")


@STOCK_CONFIG
def test_the_readme_jail_uses_only_our_action_with_debians_stock_config(tmp_path):
    [(name, jail)] = readme_jails("Set up")
    assert name == "/etc/fail2ban/jail.d/web-ipt-d.local"
    stream = stock_config_with(tmp_path, name, jail)
    options = action_options(stream, "sshd", "web-ipt-d")
    assert options["chain"] == "f2b-sshd"
    assert options["addrfamily"] == "ipv4" and options["addrfamily?family=inet6"] == "ipv6"
    assert options["actionban"].endswith('--request PUT "https://127.0.0.1:8820/chain/f2b-sshd/<addrfamily>/<ip>'
                                         '?timeout=<bantime>&owner=sshd"')
    assert options["actionunban"].endswith('--request DELETE "https://127.0.0.1:8820/chain/f2b-sshd/<addrfamily>/<ip>'
                                           '?owner=sshd"')
    assert "--netrc-file '/etc/fail2ban/web-ipt-d.netrc'" in options["actionban"]
    assert ["add", "sshd", "systemd"] in stream  # the journal backend, as docs/fail2ban.md says Debian 12 needs


@STOCK_CONFIG
@pytest.mark.parametrize("block", [0, 1], ids=["one-jail", "banaction"])
def test_the_readme_multiport_jails_ban_sshds_port_with_debians_stock_config(tmp_path, block):
    # The multiport action inherits all but the ban and unban from web-ipt-d.conf, and gets the jail's port.
    name, jail = readme_jails("Blocking only the jail's ports")[block]
    stream = stock_config_with(tmp_path, name, jail)
    options = action_options(stream, "sshd", "web-ipt-d-multiport")
    assert (options["chain"], options["port"], options["protocol"]) == ("f2b-sshd", "ssh", "tcp")
    assert options["addrfamily"] == "ipv4" and options["addrfamily?family=inet6"] == "ipv6"
    assert options["actionban"].endswith('--request PUT "https://127.0.0.1:8820/chain/f2b-sshd/<addrfamily>/<ip>'
                                         '?timeout=<bantime>&owner=sshd&proto=$proto&port=ssh" || exit; done')
    assert options["actionunban"].endswith('--request DELETE "https://127.0.0.1:8820/chain/f2b-sshd/<addrfamily>/<ip>'
                                           '?owner=sshd&proto=$proto&port=ssh" || exit; done')
    assert "--netrc-file '/etc/fail2ban/web-ipt-d.netrc'" in options["actionban"]
    assert options["actionstart"].endswith(f'{options["actioncheck"]} || {{ rc=$?; echo "web-ipt-d action: '
                                           'https://127.0.0.1:8820/health is not reachable (curl exit $rc)" >&2; '
                                           'exit $rc; }')
    assert ["add", "sshd", "systemd"] in stream
