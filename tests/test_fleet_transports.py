"""The fleet over the other transports of docs/fleet.md: `rediss://` (TLS, verified against `fleet.redis_ca`) and
`sentinel://` (the primary found through a sentinel). Real daemons in namespaces, a real redis-server (and a real
sentinel) in the Redis namespace of tests/fleet_net.py; only the Redis side differs from tests/test_fleet.py.
"""

from __future__ import annotations

import os
import shutil
import signal as signals
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from tests.fleet_net import (ADMIN_PASSWORD, ADMIN_USER, NODE_ACL, REDIS4, REDIS_CLI, REDIS_PORT, REDIS_SERVER,
                             Fleet, node_password, path, wait_until)
from tests.harness import stop_process
from tests.test_fleet import make_fleet, started  # noqa: F401 (make_fleet is a fixture used by name)
from webiptd import certs

pytestmark = pytest.mark.root

TLS_PORT = 6380
SENTINEL_PORT = 26379
SERVICE = "web-ipt-d"


class RedisProcess:
    """One more Redis process (a TLS server or a sentinel) in the Redis namespace: its own config, log and
    directory under `workdir`; stopped by PID."""

    def __init__(self, f: Fleet, workdir: Path, lines: Sequence[str], sentinel: bool = False):
        self.ns = f.redis_ns
        self.workdir = workdir
        self.log_path = workdir / "redis.log"
        self.conf = workdir / "redis.conf"
        workdir.mkdir(parents=True, exist_ok=True)
        base = ["daemonize no", "supervised no", 'pidfile ""', f"dir {workdir}", f"logfile {self.log_path}"]
        self.conf.write_text("\n".join([*base, *lines]) + "\n", encoding="utf-8")
        sentinel_bin = shutil.which("redis-sentinel")
        argv = ([sentinel_bin, str(self.conf)] if sentinel and sentinel_bin
                else [REDIS_SERVER, str(self.conf), *(["--sentinel"] if sentinel else [])])
        self.proc: subprocess.Popen[bytes] = self.ns.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                           stderr=subprocess.DEVNULL)

    def cli(self, *args: str, auth: bool = False) -> str:
        """redis-cli inside the namespace (as `tester` with `auth`); its stdout, '' when it fails."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis exited with {self.proc.returncode}:\n{self.log()[-2000:]}")
        env = {**os.environ, **({"REDISCLI_AUTH": ADMIN_PASSWORD} if auth else {})}
        argv = [REDIS_CLI, *(["--user", ADMIN_USER] if auth else []), *args]
        r = self.ns.run(argv, env=env, check=False, timeout=10)
        return str(r.stdout).strip() if r.returncode == 0 else ""

    def stop(self) -> None:
        stop_process(self.proc, signals.SIGTERM, 10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_ca(directory: Path, name: str) -> tuple[Any, Any, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = certs.make_ca(f"redis {name} CA")
    ca_path = directory / f"{name}-ca.crt"
    certs.write_cert(ca_path, ca)
    return ca, ca_key, ca_path


def assert_no_password(f: Fleet, name: str) -> None:
    d = f[name]
    password = node_password(name)
    assert d.log(), f"node {name} wrote no log"
    assert password not in d.log() and password not in d.stderr(), f"node {name}'s password in its log"


def test_rediss_with_redis_ca(make_fleet: Callable[..., Fleet], tmp_path: Path) -> None:  # noqa: F811
    """Redis on TLS only (port 0), its certificate from a test CA naming the address the nodes dial: A and B with
    that CA as fleet.redis_ca share a PUT. C trusts another CA: it never connects, says so in /fleet (no
    credentials anywhere), and serves its own PUTs all the same."""
    ca, ca_key, ca_path = write_ca(tmp_path, "good")
    _, _, other_ca_path = write_ca(tmp_path, "other")
    server, server_key = certs.issue(ca, ca_key, "redis", [REDIS4])
    certs.write_cert(tmp_path / "redis.crt", server)
    certs.write_key(tmp_path / "redis.key", server_key)

    def configure(name: str, config: dict[str, Any]) -> None:
        config["fleet"]["redis"] = f"rediss://{name}:{node_password(name)}@{REDIS4}:{TLS_PORT}/0"
        config["fleet"]["redis_ca"] = str(other_ca_path if name == "c" else ca_path)

    f = make_fleet(names=("a", "b", "c"), backends=("ipset", "nftables", "ipset"), configure=configure)
    server_proc = RedisProcess(f, f.root / "redis-tls", [
        "port 0", f"tls-port {TLS_PORT}", f"bind 127.0.0.1 {REDIS4}",
        f"tls-cert-file {tmp_path / 'redis.crt'}", f"tls-key-file {tmp_path / 'redis.key'}",
        f"tls-ca-cert-file {ca_path}", "tls-auth-clients no", 'save ""', "appendonly no",
        "user default off", f"user {ADMIN_USER} on >{ADMIN_PASSWORD} ~* &* +@all",
        *(f"user {n} on >{node_password(n)} {NODE_ACL}" for n in f.nodes)])
    tls_cli = ("--tls", "--cacert", str(ca_path), "-h", REDIS4, "-p", str(TLS_PORT))
    try:
        wait_until(lambda: server_proc.cli(*tls_cli, "ping", auth=True) == "PONG", 15, "redis answers on TLS")
        f.start(redis_too=False)  # the fleet's own plain Redis stays off: TLS is the only way in
        wait_until(lambda: f.caught_up("a") and f.caught_up("b"), 15, "A and B connected over TLS")
        assert f.status("a")["redis"] == f"rediss://{REDIS4}:{TLS_PORT}/0"

        assert f["a"].request("PUT", path("203.0.113.21") + "?timeout=600").status == 201
        wait_until(lambda: "203.0.113.21/32" in f.entries("b"), 10, "A's PUT in B's kernel")
        assert [c["node"] for c in f.listing("b")["203.0.113.21/32"]["claims"]] == ["a"]
        assert server_proc.cli(*tls_cli, "xlen", "web-ipt-d:events", auth=True) == "1"

        # C: the server's certificate does not verify against C's CA
        wait_until(lambda: f.status("c")["last_error"] is not None, 15, "C reports why it is not connected")
        status = f.status("c")
        assert (status["connected"], status["last_error"]) == (False, "connection"), status
        assert node_password("c") not in str(status)
        assert f["c"].request("PUT", path("203.0.113.22")).status == 201
        assert "203.0.113.22/32" in f.entries("c")
        assert f.status("c")["outbox"] == 1
        assert "203.0.113.22/32" not in f.entries("b")
        assert "203.0.113.21/32" not in f.entries("c")
        for n in f.nodes:
            assert_no_password(f, n)
    finally:
        server_proc.stop()
        print("--- redis (TLS) log (tail)\n" + server_proc.log()[-1500:])


def test_sentinel(make_fleet: Callable[..., Fleet]) -> None:  # noqa: F811
    """The nodes name only a sentinel (no password on it) and the service; it tells them the primary, whose ACL
    users they log in as: a PUT on A reaches B's kernel."""

    def configure(name: str, config: dict[str, Any]) -> None:
        config["fleet"]["redis"] = f"sentinel://{name}:{node_password(name)}@{REDIS4}:{SENTINEL_PORT}/{SERVICE}/0"

    f = make_fleet(names=("a", "b"), backends=("ipset", "nftables"), configure=configure)
    f.redis.start()
    sentinel = RedisProcess(f, f.root / "sentinel", [
        f"port {SENTINEL_PORT}", f"bind 127.0.0.1 {REDIS4}", "protected-mode no",
        f"sentinel monitor {SERVICE} {REDIS4} {REDIS_PORT} 1",
        f"sentinel auth-user {SERVICE} {ADMIN_USER}", f"sentinel auth-pass {SERVICE} {ADMIN_PASSWORD}",
        f"sentinel down-after-milliseconds {SERVICE} 5000"], sentinel=True)
    try:
        sentinel_cli = ("-h", "127.0.0.1", "-p", str(SENTINEL_PORT))
        wait_until(lambda: server_flags(sentinel, sentinel_cli) == "master", 15,
                   "the sentinel sees the primary up (flags master only)")
        assert sentinel.cli(*sentinel_cli, "sentinel", "get-master-addr-by-name", SERVICE).split() == \
            [REDIS4, str(REDIS_PORT)]
        started(f)
        assert node_password("a") not in str(f.status("a"))

        assert f["a"].request("PUT", path("203.0.113.31") + "?timeout=600").status == 201
        wait_until(lambda: "203.0.113.31/32" in f.entries("b"), 10, "A's PUT in B's kernel")
        assert [c["node"] for c in f.listing("b")["203.0.113.31/32"]["claims"]] == ["a"]
        assert [e["network"] for _, e in f.stream()] == ["203.0.113.31/32"]
        for n in f.nodes:
            assert_no_password(f, n)
    finally:
        sentinel.stop()
        print("--- sentinel log (tail)\n" + sentinel.log()[-1500:])


def server_flags(sentinel: RedisProcess, cli: Sequence[str]) -> str:
    """The `flags` field of SENTINEL MASTER for the service ('' while the sentinel does not answer)."""
    words = sentinel.cli(*cli, "sentinel", "master", SERVICE).split("\n")
    pairs = dict(zip(words[::2], words[1::2]))
    return pairs.get("flags", "")
