"""The servers the bench measures: web-ipt-d on each backend and bench/baseline.py, each started in a namespace
with N entries already in place, and how to count the entries the kernel holds.
"""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common import BENCH, CHAIN, HOST, PORT, READY_TIMEOUT, REPO, USER, address, path_address
from tests.harness import PKI, Daemon, Service, basic, make_pki, stop_process
from tests.netns import NetNS

SET_BACKENDS = ("ipset", "nftables")


@dataclass(frozen=True)
class BenchPki:
    """The test CA of tests/harness.py and the bench user, whose bcrypt hash is real (the default cost)."""

    certs: PKI
    password: str
    password_hash: str
    authorization: str

    @property
    def ca(self) -> Path:
        return self.certs.ca

    @property
    def server_cert(self) -> Path:
        return self.certs.server_cert

    @property
    def server_key(self) -> Path:
        return self.certs.server_key


def make_bench_pki(directory: Path) -> BenchPki:
    from webiptd.passwords import context as crypt_context

    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    # The default cost: the daemon's auth cache makes it a one-off per client.
    return BenchPki(make_pki(directory / "pki", "bench"), password, crypt_context().hash(password),
                    basic(USER, password))


@dataclass
class Server:
    """A running server under test, as the clients and the report need it."""

    ns: NetNS
    service: Service
    host: str
    port: int
    cafile: Path
    authorization: str
    populate_s: float  # putting the N existing entries in place before the start (state DB, iptables-restore)
    count: Callable[[], int]  # entries the kernel holds for the chain
    # Removes entries without timing them (leftovers of an unblock phase cut by its budget); None: through the API.
    remove: Callable[[list[str]], None] | None = None

    @property
    def pid(self) -> int:
        return self.service.pid

    @property
    def startup_s(self) -> float:
        """Process start to READY=1."""
        return self.service.ready_s

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the server (SIGKILL after `timeout` s); its exit code, None if it had to be killed."""
        try:
            assert self.service.proc is not None
            return stop_process(self.service.proc, grace=timeout)
        finally:
            self.service.close()


@dataclass
class Target:
    """One kind of server: how to start it with `existing` entries already in place."""

    name: str
    description: str

    def unavailable(self) -> str | None:
        """Why this target cannot run on this host; None when it can."""
        return None

    def start(self, ns: NetNS, workdir: Path, pki: BenchPki, family: str, existing: int) -> Server:
        raise NotImplementedError


@dataclass
class WebiptdTarget(Target):
    """The real daemon, `python -m webiptd`, with one chain on the given backend."""

    backend: str = "iptables"
    src: Path = field(default=REPO / "src")  # --src: run the daemon from another tree, to measure a proposed change

    def unavailable(self) -> str | None:
        if self.backend == "iptables":
            return None
        module = f"webiptd.firewall.{self.backend}"
        if importlib.util.find_spec(module) is None:
            return f"{module} does not exist yet"
        needs = {"ipset": (None, "ipset"), "nftables": ("nftables", "nft")}[self.backend]
        if needs[0] is not None and importlib.util.find_spec(needs[0]) is None:
            return f"the Python module {needs[0]} is not importable (see bench/README.md)"
        if shutil.which(needs[1]) is None:
            return f"the {needs[1]} command is missing"
        return None

    def config(self, workdir: Path, pki: BenchPki) -> dict[str, Any]:
        return {
            "listen": [f"{HOST}:{PORT}"],
            "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "min_version": "1.2"},
            "state_dir": str(workdir / "state"),
            "users": {USER: {"password_hash": pki.password_hash, "chains": ["*"]}},
            "chains": {CHAIN: {"hooks": ["INPUT"], "target": "DROP", "backend": self.backend}},
            "never_block": ["127.0.0.0/8", "::1/128"],
            "log": {"file": str(workdir / "web-ipt-d.log"), "level": "INFO"},
            # Idle keep-alive connections must survive the pauses between phases.
            "limits": {"request_timeout": 120},
        }

    def populate(self, state_dir: Path, family: str, existing: int) -> None:
        """The `existing` entries in the state DB before the start."""
        write_state(state_dir, family, existing)

    def start(self, ns: NetNS, workdir: Path, pki: BenchPki, family: str, existing: int) -> Server:
        config = self.config(workdir, pki)
        t0 = time.perf_counter()
        if existing:
            self.populate(Path(config["state_dir"]), family, existing)
        populate_s = time.perf_counter() - t0
        daemon = Daemon(ns, workdir, pki.certs, backend=self.backend, config=config, keep_reading=True,
                        new_session=True)
        try:
            daemon.start(timeout=READY_TIMEOUT,
                         PYTHONPATH=os.pathsep.join(filter(None, [str(self.src), os.environ.get("PYTHONPATH")])))
        except BaseException:
            daemon.close()
            raise
        version = 4 if family == "ipv4" else 6
        return Server(ns, daemon, HOST, PORT, pki.ca, pki.authorization, populate_s,
                      lambda: count_entries(ns, self.backend, version))


def count_entries(ns: NetNS, backend: str, version: int) -> int:
    """How many networks the kernel blocks in the bench chain (the names tests/harness.py's kernel_entries uses)."""
    if backend == "iptables":
        return sum(1 for line in ns.iptables_save(version).splitlines() if line.startswith(f"-A {CHAIN} -s "))
    if backend == "ipset":
        out = ns.run(["ipset", "list", "-t", f"{CHAIN}-v{version}"]).stdout
        found = re.search(r"^Number of entries: (\d+)$", out, re.M)
        if found is None:
            raise RuntimeError(f"cannot read the size of set {CHAIN}-v{version}: {out!r}")
        return int(found.group(1))
    if backend == "nftables":
        doc = json.loads(ns.run(["nft", "-j", "list", "set", "inet", "web-ipt-d", f"{CHAIN}-v{version}"]).stdout)
        return sum(len(item.get("set", {}).get("elem", [])) for item in doc["nftables"])
    raise ValueError(backend)


def write_state(state_dir: Path, family: str, count: int) -> None:
    """Record `count` permanent blocks in the state DB, through the daemon's own Store."""
    from webiptd.commands import Entry
    from webiptd.state import Store

    store = Store(state_dir)
    try:
        now = time.time()
        store.write([Entry(CHAIN, ipaddress.ip_network(address(family, i)), "DROP", now, None, "bench")
                     for i in range(count)], [], [])
    finally:
        store.close()


@dataclass
class BaselineTarget(Target):
    """bench/baseline.py: one `iptables -w -I/-D` process per request. Its N rules come from one iptables-restore."""

    iptables: str = "iptables"

    def tool(self, version: int, suffix: str = "") -> str:
        name = self.iptables if version == 4 else self.iptables.replace("iptables", "ip6tables", 1)
        return name + suffix

    def variant(self) -> str:
        path = shutil.which(self.iptables)
        return os.path.basename(os.path.realpath(path)) if path else "missing"

    def unavailable(self) -> str | None:
        for suffix in ("", "-save", "-restore"):
            if shutil.which(self.tool(4, suffix)) is None:
                return f"{self.tool(4, suffix)} is missing"
        return None

    def start(self, ns: NetNS, workdir: Path, pki: BenchPki, family: str, existing: int) -> Server:
        version = 4 if family == "ipv4" else 6
        script = ["*filter", f":{CHAIN} - [0:0]", f"-A INPUT -j {CHAIN}"]
        script += [f"-A {CHAIN} -s {address(family, i)} -j DROP" for i in range(existing)]
        t0 = time.perf_counter()
        ns.run([self.tool(version, "-restore"), "--noflush"], input="\n".join(script + ["COMMIT", ""]),
               timeout=600)
        populate_s = time.perf_counter() - t0
        argv = [sys.executable, str(BENCH / "baseline.py"), "--listen", f"{HOST}:{PORT}", "--cert",
                str(pki.server_cert), "--key", str(pki.server_key), "--user", USER, "--chain", CHAIN,
                "--iptables", self.iptables]
        service = Service(ns, workdir, keep_reading=True, new_session=True)
        service.name = "the baseline"
        try:
            service.start(argv, timeout=READY_TIMEOUT, BASELINE_PASSWORD=pki.password)
        except BaseException:
            service.close()
            raise

        def count() -> int:
            out = ns.run([self.tool(version, "-save"), "-t", "filter"], timeout=600).stdout
            return sum(1 for line in out.splitlines() if line.startswith(f"-A {CHAIN} -s "))

        def remove(todo: list[str]) -> None:
            lines = [f"-D {CHAIN} -s {path_address(p)} -j DROP" for p in todo]
            ns.run([self.tool(version, "-restore"), "--noflush"], input="\n".join(["*filter", *lines, "COMMIT", ""]),
                   timeout=600)

        return Server(ns, service, HOST, PORT, pki.ca, pki.authorization, populate_s, count, remove)


def catalog(baseline_iptables: str = "iptables", src: Path | None = None) -> dict[str, Target]:
    """Every target, in the order they run: the baseline with `baseline_iptables`, web-ipt-d from `src`."""
    web = {"src": src.resolve()} if src is not None else {}
    return {
        "baseline": BaselineTarget("baseline", "bench/baseline.py: stdlib HTTPS, one `iptables -w -I/-D` process "
                                               "per request, as the Go web-ipt-d, rfw and fail2ban do",
                                   iptables=baseline_iptables),
        "iptables": WebiptdTarget("iptables", "web-ipt-d, python-iptables backend (one rule per network)",
                                  backend="iptables", **web),
        "ipset": WebiptdTarget("ipset", "web-ipt-d, ipset backend (hash:net set through netlink)", backend="ipset",
                               **web),
        "nftables": WebiptdTarget("nftables", "web-ipt-d, nftables backend (sets through libnftables)",
                                  backend="nftables", **web),
    }


TARGET_NAMES = tuple(catalog())
