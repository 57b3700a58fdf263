"""`web-ipt`, the command-line client (src/webiptd/client/): where it finds the server and its credentials, how it
reads blocklists, that the daemon never loads its libraries, and every subcommand run for real against a live
daemon in a network namespace, with its exit codes (0 done, 1 refused, 2 usage, 3 no answer).
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import json
import os
import pty
import select
import subprocess
import struct
import sys
import termios
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import PASSWORDS, PKI, PORT, Daemon, make_pki, module_daemon
from tests.test_imports import SRC, imports
from webiptd.client import blocklist
from webiptd.client.main import _timeout, main
from webiptd.client.settings import Flags, SettingsError, resolve

CLIENT_LIBRARIES = ("tabulate", "tqdm")
URL = f"https://127.0.0.1:{PORT}"


# -- the pure layer ---------------------------------------------------------------------------------------


def write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def test_flags_beat_the_environment_which_beats_netrc_which_beats_client_yaml(tmp_path: Path) -> None:
    write_private(tmp_path / ".netrc", "machine fw.example.net login netrc-user password netrc-pw\n")
    write_private(tmp_path / ".config/web-ipt/client.yaml",
                  "url: https://fw.example.net:8820\ncacert: /yaml/ca.crt\nuser: yaml-user\npassword: yaml-pw\n")
    env = {"HOME": str(tmp_path)}
    s = resolve(Flags(), env)
    # client.yaml names the server; the netrc entry for its host gives the user, and its password goes with it.
    assert (s.url, s.cacert, s.user, s.password) == ("https://fw.example.net:8820", "/yaml/ca.crt", "netrc-user",
                                                     "netrc-pw")
    s = resolve(Flags(), {**env, "WEB_IPT_USER": "env-user", "WEB_IPT_CACERT": "/env/ca.crt"})
    # Neither file's password belongs to env-user, so neither is sent.
    assert (s.cacert, s.user, s.password) == ("/env/ca.crt", "env-user", None)
    s = resolve(Flags(user="yaml-user", cacert="/flag/ca.crt", url="https://fw.example.net:9000/"), env)
    assert (s.url, s.cacert, s.user, s.password) == ("https://fw.example.net:9000", "/flag/ca.crt", "yaml-user",
                                                     "yaml-pw")
    s = resolve(Flags(user="netrc-user"), {**env, "WEB_IPT_PASSWORD": "env-pw"})
    assert (s.user, s.password) == ("netrc-user", "env-pw")
    # The netrc machine is the URL's host: another host's entry is not used.
    s = resolve(Flags(url="https://other.example.net"), {"HOME": str(tmp_path), "XDG_CONFIG_HOME": "/nonexistent"})
    assert (s.user, s.password) == (None, None)


def test_settings_errors_name_what_is_wrong(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    with pytest.raises(SettingsError, match="password never goes on the command line"):
        resolve(Flags(user="admin:secret"), env)
    with pytest.raises(SettingsError, match="https://"):
        resolve(Flags(url="http://127.0.0.1:8820"), env)
    with pytest.raises(SettingsError, match="credentials do not go in the URL"):
        resolve(Flags(url="https://admin:pw@127.0.0.1:8820"), env)
    conf = write_private(tmp_path / "client.yaml", "user: admin\npassword: pw\n")
    conf.chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        resolve(Flags(config=str(conf)), env)
    write_private(conf, "usr: admin\n")
    with pytest.raises(SettingsError, match="usr: unknown key"):
        resolve(Flags(config=str(conf)), env)
    with pytest.raises(SettingsError, match="no such file"):
        resolve(Flags(config=str(tmp_path / "missing.yaml")), env)
    with pytest.raises(SettingsError, match="no such file"):
        resolve(Flags(netrc=str(tmp_path / "missing.netrc")), env)


def test_blocklists_ipset_firehol_spamhaus_and_json() -> None:
    text = ("# FireHOL netset\n"
            "203.0.113.0/24\n"
            "\n"
            "198.18.0.1   # a comment\n"
            "198.18.1.0/24 ; SBL123 (Spamhaus DROP)\n"
            "2001:db8::/32\n"
            "not-an-address\n"
            "198.18.2.1/24\n"
            "198.18.0.2 198.18.0.3\n")
    good, bad = blocklist.parse(text)
    assert [(i.where, i.text) for i in good] == [("line 2", "203.0.113.0/24"), ("line 4", "198.18.0.1"),
                                                 ("line 5", "198.18.1.0/24"), ("line 6", "2001:db8::/32")]
    assert [b.where for b in bad] == ["line 7", "line 8", "line 9"]
    assert "did you mean 198.18.2.0/24" in bad[1].message
    good, bad = blocklist.parse('["203.0.113.5", 7, "203.0.113.0/23"]')
    assert [(i.where, i.text) for i in good] == [("item 1", "203.0.113.5")]
    assert [b.where for b in bad] == ["item 2", "item 3"]
    assert blocklist.parse("[not json")[1][0].where == "JSON"


def test_timeouts_take_units_and_permanent() -> None:
    assert [_timeout(t) for t in ("3600", "90m", "12h", "7d", "2w", "-1", "0")] == \
        ["3600", "5400", "43200", "604800", "1209600", "-1", "0"]
    for bad in ("1.5h", "-5", "abc", "1y", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _timeout(bad)


@pytest.mark.parametrize("argv", [
    [], ["block", "f2b-web"], ["frobnicate"], ["block", "f2b-web", "203.0.113.7", "--timeout", "soon"],
    ["block", "f2b-web", "not-an-address"], ["block", "f2b-web", "203.0.113.7/24"],
    ["block", "f2b-web", "203.0.113.7", "--port", "22"], ["--user", "admin:pw", "chains"],
    ["import", "f2b-web", "/nonexistent/list.txt"], ["import", "f2b-web", "-", "--chunk", "0"],
    ["--cacert", "/nonexistent/ca.crt", "chains"],
])
def test_usage_errors_exit_2_before_any_request(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A port nobody listens on: had any request gone out, the exit would be 3 (no answer), not 2.
    for name in [n for n in os.environ if n.startswith("WEB_IPT_")] + ["XDG_CONFIG_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WEB_IPT_URL", "https://127.0.0.1:9")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_the_daemon_never_imports_the_client_or_its_libraries() -> None:
    """Statically (any depth, lazy imports too): no module outside webiptd/client imports it or its libraries."""
    package = SRC / "webiptd"
    client_dir = package / "client"
    seen_client_libraries = set()
    for path in package.rglob("*.py"):
        names = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif node.module:
                names.add(node.module)
        tops = {n.split(".")[0] for n in names}
        if client_dir in path.parents:
            seen_client_libraries |= tops & set(CLIENT_LIBRARIES)
            continue
        assert not tops & set(CLIENT_LIBRARIES), f"{path} imports a client library"
        assert not any(n == "webiptd.client" or n.startswith("webiptd.client.") for n in names), path
    assert seen_client_libraries == set(CLIENT_LIBRARIES)  # the walker does see them where they are


def test_the_daemon_path_loads_no_client_library_and_the_client_loads_them_only_when_used() -> None:
    probe = (
        "import sys, io\n"
        "import webiptd.cli, webiptd.daemon, webiptd.http.app, webiptd.http.server, webiptd.firewall.worker\n"
        "daemon = sorted(m for m in sys.modules if m.split('.')[0] in ('tabulate', 'tqdm') or "
        "m.startswith('webiptd.client'))\n"
        "import webiptd.client\n"
        "client = sorted(m for m in sys.modules if m.split('.')[0] in ('tabulate', 'tqdm'))\n"
        "from webiptd.client import output\n"
        "output.table(('A',), [['x']], io.StringIO())\n"
        "table = sorted(m for m in sys.modules if m.split('.')[0] in ('tabulate', 'tqdm'))\n"
        "print(repr((daemon, client, table)))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    daemon, client, table = ast.literal_eval(out.stdout.strip())
    assert daemon == []
    assert client == []  # --json, export and health never pay for them
    assert "tabulate" in table  # the probe sees a library once it is loaded


# -- against a live daemon --------------------------------------------------------------------------------


def _with_override(config: dict[str, Any]) -> None:
    config["users"]["admin"]["override"] = True


@pytest.fixture(scope="module")
def live(pki: PKI, user_hashes: dict[str, str]) -> Iterator[Daemon]:
    """One daemon for the module, on the ipset backend (the 50,000-line import); tests use distinct addresses."""
    with module_daemon(pki, user_hashes, "ipset", configure=_with_override) as d:
        yield d


def web_ipt(d: Daemon, home: Path, *argv: str, user: str | None = "admin", stdin: str | None = None,
            timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m webiptd.client ARGV` inside the daemon's namespace, HOME=home, the server named by variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_IPT_", "XDG_"))}
    environ.update(HOME=str(home), WEB_IPT_URL=URL, WEB_IPT_CACERT=str(d.pki.ca))
    if user is not None:
        environ.update(WEB_IPT_USER=user, WEB_IPT_PASSWORD=PASSWORDS[user])
    environ.update(env)
    kw: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return d.ns.run([sys.executable, "-m", "webiptd.client", *argv], env=environ, cwd=str(home), check=False,
                    timeout=timeout, **kw)


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.root
def test_health_and_chains(live: Daemon, tmp_path: Path) -> None:
    assert ok(web_ipt(live, tmp_path, "health", user=None)).strip() == "ok"
    assert json.loads(ok(web_ipt(live, tmp_path, "health", "--json", user=None))) == {"status": "ok"}
    lines = ok(web_ipt(live, tmp_path, "chains")).splitlines()
    assert lines[0].split() == ["CHAIN", "TARGET", "HOOKS", "BACKEND", "MATCH", "INTERFACE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"f2b-web", "f2b-ssh", "admin-list"}
    assert rows["admin-list"][1:4] == ["DROP", "INPUT,FORWARD", "ipset"]
    doc = json.loads(ok(web_ipt(live, tmp_path, "chains", "--json", user="f2b")))
    assert sorted(c["name"] for c in doc["chains"]) == ["f2b-ssh", "f2b-web"]


@pytest.mark.root
def test_fleet_on_a_host_without_one_is_a_refusal(live: Daemon, tmp_path: Path) -> None:
    r = web_ipt(live, tmp_path, "fleet")
    assert r.returncode == 1 and "404 not_configured" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.root
def test_block_show_list_unblock(live: Daemon, tmp_path: Path) -> None:
    d = live
    out = ok(web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.10", "--timeout", "1h"))
    assert out.startswith("blocked: 203.0.113.10/32 (all traffic) in f2b-web, expires 20")
    assert "203.0.113.10/32" in d.kernel_entries("f2b-web", 4)
    out = ok(web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.10", "--owner", "sshd"))
    assert out.startswith("already blocked, your claim refreshed: ") and "claims: admin,admin/sshd" in out
    entry = json.loads(ok(web_ipt(d, tmp_path, "block", "f2b-web", "2001:db8:10::/48", "--json")))
    assert (entry["network"], entry["family"], entry["expires_at"]) == ("2001:db8:10::/48", "ipv6", None)
    assert "2001:db8:10::/48" in d.kernel_entries("f2b-web", 6)

    lines = ok(web_ipt(d, tmp_path, "show", "f2b-web", "203.0.113.10")).splitlines()
    assert lines[0].split() == ["NETWORK", "SCOPE", "EXPIRES", "CREATED", "CLAIMS"]
    assert lines[1].split()[0:2] == ["203.0.113.10/32", "all"] and lines[1].split()[-1] == "admin,admin/sshd"
    listing = json.loads(ok(web_ipt(d, tmp_path, "list", "f2b-web", "--json")))
    assert {"203.0.113.10/32", "2001:db8:10::/48"} <= {e["network"] for e in listing["entries"]}
    table = ok(web_ipt(d, tmp_path, "list", "f2b-web"))
    assert "203.0.113.10/32" in table and "2001:db8:10::/48" in table

    out = ok(web_ipt(d, tmp_path, "unblock", "f2b-web", "203.0.113.10"))
    assert out.startswith("claim released, still blocked: ") and "claims: admin/sshd" in out
    assert "203.0.113.10/32" in d.kernel_entries("f2b-web", 4)
    out = ok(web_ipt(d, tmp_path, "unblock", "f2b-web", "203.0.113.10", "--owner", "sshd"))
    assert out.startswith("unblocked: 203.0.113.10/32")
    assert "203.0.113.10/32" not in d.kernel_entries("f2b-web", 4)
    out = ok(web_ipt(d, tmp_path, "unblock", "f2b-web", "203.0.113.10"))
    assert out.startswith("not blocked: 203.0.113.10/32 in f2b-web")
    doc = json.loads(ok(web_ipt(d, tmp_path, "unblock", "f2b-web", "2001:db8:10::/48", "--json")))
    assert (doc["deleted"], doc["released"]) == (True, True)

    r = web_ipt(d, tmp_path, "show", "f2b-web", "203.0.113.10")
    assert (r.returncode, r.stdout) == (1, "") and "not blocked" in r.stderr


@pytest.mark.root
def test_scoped_entries_and_what_show_shows(live: Daemon, tmp_path: Path) -> None:
    d = live
    ok(web_ipt(d, tmp_path, "block", "f2b-ssh", "203.0.113.20", "--proto", "tcp", "--port", "ssh"))
    ok(web_ipt(d, tmp_path, "block", "f2b-ssh", "203.0.113.16/29", "--owner", "web"))
    # Without --proto: every entry whose network overlaps the address, in every scope.
    doc = json.loads(ok(web_ipt(d, tmp_path, "show", "f2b-ssh", "203.0.113.20", "--json")))
    assert sorted((e["network"], e["proto"], e["port"]) for e in doc["entries"]) == [
        ("203.0.113.16/29", None, None), ("203.0.113.20/32", "tcp", "22")]
    table = ok(web_ipt(d, tmp_path, "show", "f2b-ssh", "203.0.113.0/24"))
    assert "tcp/22" in table and "203.0.113.16/29" in table
    # With --proto: the API's GET of exactly that entry, named the way a PUT names it.
    doc = json.loads(ok(web_ipt(d, tmp_path, "show", "f2b-ssh", "203.0.113.20", "--proto", "tcp", "--port", "22",
                                "--json")))
    assert [(e["network"], e["port"]) for e in doc["entries"]] == [("203.0.113.20/32", "22")]
    r = web_ipt(d, tmp_path, "show", "f2b-ssh", "203.0.113.20", "--proto", "udp")
    assert r.returncode == 1 and "not_blocked" in r.stderr
    out = ok(web_ipt(d, tmp_path, "unblock", "f2b-ssh", "203.0.113.20", "--proto", "tcp", "--port", "22"))
    assert out.startswith("unblocked: 203.0.113.20/32 (tcp/22)")
    out = ok(web_ipt(d, tmp_path, "unblock", "f2b-ssh", "203.0.113.16/29", "--owner", "*"))
    assert out.startswith("unblocked: 203.0.113.16/29")


@pytest.mark.root
def test_exit_codes_refused_usage_and_no_answer(live: Daemon, tmp_path: Path) -> None:
    d = live
    r = web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.30", user="reader")
    assert r.returncode == 1 and r.stderr.startswith("web-ipt: refused: 403 read_only: ")
    r = web_ipt(d, tmp_path, "block", "admin-list", "203.0.113.30", user="f2b")
    assert r.returncode == 1 and "403 forbidden" in r.stderr
    r = web_ipt(d, tmp_path, "block", "f2b-web", "127.0.0.1")
    assert r.returncode == 1 and "409 never_block" in r.stderr
    r = web_ipt(d, tmp_path, "list", "no-such-chain")
    assert r.returncode == 1 and "404 unknown_chain" in r.stderr
    r = web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.30", "--timeout", "99999999999")
    assert r.returncode == 1 and "400 bad_query" in r.stderr
    r = web_ipt(d, tmp_path, "list", "f2b-web", WEB_IPT_PASSWORD="wrong")
    assert r.returncode == 1 and "401 unauthorized" in r.stderr and "user 'admin' from WEB_IPT_USER" in r.stderr
    r = web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.300")
    assert r.returncode == 2 and "not a valid ipv4 address" in r.stderr
    assert d.kernel_entries("f2b-web", 4).isdisjoint({"203.0.113.30/32"})
    # No answer: nothing listens there, or the certificate does not verify against the CA named.
    r = web_ipt(d, tmp_path, "health", WEB_IPT_URL="https://127.0.0.1:9")
    assert r.returncode == 3 and "Connection refused" in r.stderr
    other = make_pki(tmp_path / "other-ca", "other")
    r = web_ipt(d, tmp_path, "chains", WEB_IPT_CACERT=str(other.ca))
    assert r.returncode == 3 and "certificate did not verify" in r.stderr


@pytest.mark.root
def test_credentials_from_netrc_and_client_yaml(live: Daemon, tmp_path: Path) -> None:
    d = live
    netrc = write_private(tmp_path / "f2b.netrc", f"machine 127.0.0.1 login f2b password {PASSWORDS['f2b']}\n")
    # fail2ban's convention: the netrc file gives user and password; nothing secret on the command line.
    doc = json.loads(ok(web_ipt(d, tmp_path, "--netrc", str(netrc), "chains", "--json", user=None)))
    assert sorted(c["name"] for c in doc["chains"]) == ["f2b-ssh", "f2b-web"]
    write_private(tmp_path / ".config/web-ipt/client.yaml",
                  f"url: {URL}\ncacert: {d.pki.ca}\nuser: reader\npassword: {PASSWORDS['reader']}\n")
    environ = {k: "" for k in ("WEB_IPT_URL", "WEB_IPT_CACERT")}
    doc = json.loads(ok(web_ipt(d, tmp_path, "chains", "--json", user=None, **environ)))
    assert len(doc["chains"]) == 3  # reader sees every chain
    r = web_ipt(d, tmp_path, "block", "f2b-web", "203.0.113.40", user=None, **environ)
    assert r.returncode == 1 and "read_only" in r.stderr  # it really was reader, from client.yaml


def blocklist_text(n: int, bad_every: int) -> tuple[str, list[int], set[str]]:
    """n lines of 198.18.0.0/15 hosts (comments between), every `bad_every`-th line bad; (text, bad lines, good)."""
    lines = ["# a FireHOL-style netset, made for the test"]
    bad_lines, good = [], set()
    for i in range(n):
        if i % bad_every == bad_every - 1:
            lines.append(f"198.18.{i % 256}.{i % 256}/24" if (i // 100) % 2 else f"bogus-{i}")
            bad_lines.append(len(lines))
        else:
            address = f"198.{18 + i // 65536}.{(i // 256) % 256}.{i % 256}"
            lines.append(address)
            good.add(f"{address}/32")
    return "\n".join(lines) + "\n", bad_lines, good


@pytest.mark.root
def test_import_of_50000_lines_with_one_percent_bad(live: Daemon, tmp_path: Path) -> None:
    d = live
    text, bad_lines, good = blocklist_text(50_000, 100)
    assert (len(bad_lines), len(good)) == (500, 49_500)
    path = tmp_path / "blocklist.txt"
    path.write_text(text, encoding="ascii")
    started = time.monotonic()
    r = web_ipt(d, tmp_path, "import", "f2b-ssh", str(path), "--timeout", "1d", timeout=300)
    took = time.monotonic() - started
    assert r.returncode == 1, r.stderr[-2000:]  # some lines failed; the rest went in
    assert r.stdout == "f2b-ssh: 49500 created, 0 existing, 500 failed (of 50000 items)\n"
    reported = [line for line in r.stderr.splitlines() if line.startswith("web-ipt: line ")]
    assert [int(line.split()[2].rstrip(":")) for line in reported] == bad_lines
    assert "not a valid ipv4 address" in reported[0] and "did you mean 198.18.199.0/24" in reported[1]
    assert not r.stderr.replace("\n".join(reported), "").strip()  # no progress bar without a terminal
    assert good <= d.kernel_entries("f2b-ssh", 4)
    print(f"import of 50,000 lines: {took:.1f} s")
    # Again, as JSON: every good line is there already.
    r = web_ipt(d, tmp_path, "import", "f2b-ssh", "-", "--json", stdin=text, timeout=300)
    doc = json.loads(r.stdout)
    assert (r.returncode, doc["created"], doc["existing"], doc["failed"]) == (1, 0, 49_500, 500)
    assert doc["failures"][0]["where"] == f"line {bad_lines[0]}"


@pytest.mark.root
def test_export_is_reimportable_and_a_too_large_chunk_is_halved(live: Daemon, tmp_path: Path) -> None:
    d = live
    items = [f"198.19.{i // 256}.{i % 256}" for i in range(15_000)] + ["2001:db8:20::/48"]
    # --chunk 15,001 is over the daemon's limit (10,000): its 413 halves the chunk, and the import goes through.
    r = web_ipt(d, tmp_path, "import", "admin-list", "-", "--chunk", "15001", stdin=json.dumps(items), timeout=300)
    assert ok(r) == "admin-list: 15001 created, 0 existing, 0 failed (of 15001 items)\n"
    ok(web_ipt(d, tmp_path, "block", "admin-list", "203.0.113.50", "--proto", "udp"))
    exported = ok(web_ipt(d, tmp_path, "export", "admin-list"))
    lines = exported.splitlines()
    assert lines[0].startswith("# web-ipt export of chain admin-list (all traffic)")
    assert lines[1] == "# 1 entry of other scopes left out: export those with --proto and --port"
    assert sorted(lines[2:]) == sorted([f"{i}/32" for i in items[:-1]] + items[-1:])
    assert ok(web_ipt(d, tmp_path, "export", "admin-list", "--proto", "udp")).splitlines()[1:] == [
        "# 15001 entries of other scopes left out: export those with --proto and --port", "203.0.113.50/32"]
    # Into another chain and out again: the same networks.
    r = web_ipt(d, tmp_path, "import", "f2b-web", "-", stdin=exported, timeout=300)
    assert ok(r).startswith("f2b-web: 15001 created, 0 existing, 0 failed")
    again = ok(web_ipt(d, tmp_path, "export", "f2b-web")).splitlines()
    assert sorted(n for n in again if not n.startswith("#")) == sorted(lines[2:])


@pytest.mark.root
def test_import_shows_a_progress_bar_on_a_terminal(live: Daemon, tmp_path: Path) -> None:
    d = live
    path = tmp_path / "list.txt"
    path.write_text("".join(f"203.0.113.{i}\n" for i in range(100, 200)), encoding="ascii")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WEB_IPT_", "XDG_"))}
    environ.update(HOME=str(tmp_path), WEB_IPT_URL=URL, WEB_IPT_CACERT=str(d.pki.ca), WEB_IPT_USER="admin",
                   WEB_IPT_PASSWORD=PASSWORDS["admin"])
    master, slave = pty.openpty()
    # A terminal has a size; a fresh pty's is 0 x 0, in which tqdm draws nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = d.ns.popen([sys.executable, "-m", "webiptd.client", "import", "f2b-web", str(path), "--chunk", "10"],
                          env=environ, cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=slave)
        os.close(slave)
        slave = -1
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, seen
    assert stdout.decode() == "f2b-web: 100 created, 0 existing, 0 failed (of 100 items)\n"
    assert b"100/100" in seen and b"addr" in seen, seen  # tqdm's bar, on the terminal only
