"""Idle and slow connections must not lock anyone out: while each flood runs, a legitimate client (a new TLS
connection per request, PUT then DELETE with Basic auth, as fail2ban's curl) gets every request answered, from
another remote address and from localhost; afterwards the daemon is up and serves as before.

The floods come from a peer namespace over a veth pair, bound to 200 extra addresses of 198.51.100.0/24:
(a) Debian's slowhttptest, slowloris with 1,000 connections from one address; (b) 600 silent TCP connections
over 100 addresses; (c) 600 slow request heads over finished TLS handshakes over 100 addresses. Timings are
bench/attack.py's job; these tests assert availability, the log and memory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests import flood
from tests.conftest import PEER4, PKI, PORT, SERVER4, Daemon
from tests.harness import RssSampler, proc_status_kib
from tests.netns import NetNS, veth_pair

pytestmark = pytest.mark.root

ATTACKERS = flood.source_addresses(200)  # 198.51.100.10-209: never the legitimate client's .2
SLOWLORIS_SOURCE = ATTACKERS[0]
LEGIT_PAIRS = 10  # per client location, under attack
# ... spread over this many seconds: longer than the daemon's handshake and header deadlines (5 s, 10 s), so the
# requests also meet the attack after the daemon has timed out its first round of connections.
LEGIT_WINDOW = 12.0
AFTER_PAIRS = 2  # per client location, once the attack is over
AFTER_SETTLE = 1.0  # seconds between the attacker's exit and "serves normally": its last sockets are reset
LEGIT_BUDGET = 20.0  # seconds; a daemon that does not answer must not hold the test longer
MAX_RSS_KIB = 150_000_000 // 1024  # the 150 MB, read as 10^6 bytes (the stricter reading)
# Log lines an attack may cause: the issue allows one WARNING per source and reason a minute (a handful of
# reasons); each legitimate request writes an audit line or two.
LOG_LINES_PER_SOURCE = 6
LOG_LINES_PER_REQUEST = 4
LOG_LINES_SLACK = 30


@dataclass
class Site:
    """The daemon in its namespace, listening on 127.0.0.1 and 198.51.100.1; a peer namespace beside it."""

    daemon: Daemon
    peer: NetNS
    peer_if: str
    clients: list[flood.LegitClient]
    addresses: Iterator[str]

    @property
    def log_path(self) -> Path:
        return self.daemon.workdir / "web-ipt-d.log"


@pytest.fixture(scope="module")
def site(pki: PKI, user_hashes: dict[str, str]) -> Iterator[Site]:
    workdir = Path(tempfile.mkdtemp(prefix="wipt-", dir="/tmp"))
    try:
        with NetNS.create() as ns, NetNS.create() as peer:
            _, peer_if = veth_pair(ns, peer)
            flood.add_addresses(peer, peer_if, ATTACKERS)
            d = Daemon(ns, workdir, pki, user_hashes)
            d.config["listen"] = [f"127.0.0.1:{PORT}", f"{SERVER4}:{PORT}"]
            # What a deployment runs at: DEBUG writes a line per connection by design.
            d.config["log"]["level"] = "INFO"
            try:
                d.start()
                ctx = d.context()
                clients = [flood.LegitClient("remote", peer, SERVER4, PORT, PEER4, ctx),
                           flood.LegitClient("localhost", ns, "127.0.0.1", PORT, None, ctx)]
                yield Site(d, peer, peer_if, clients, flood.fresh_addresses("203.0.113.0/24"))
            finally:
                d.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def under_attack(site: Site, attack: AbstractContextManager[Any], ramped: Callable[[], Any], sources: int,
                 describe: Callable[[], str]) -> None:
    """Run the legitimate clients while `attack` runs (after `ramped()` returns), then once it is over; fail
    with every problem found at once: requests not answered, a dead daemon, tracebacks, log volume, memory."""
    d = site.daemon
    assert d.proc is not None
    warm = flood.legit_run(site.clients, 1, site.addresses)
    assert all(o.ok for o in warm), f"before any attack: {flood.describe_failures(warm)}"
    log_before = flood.count_lines(site.log_path)
    text_before = len(d.log())
    with RssSampler(d.proc.pid) as rss:
        with attack:
            ramped()
            during = flood.legit_run(site.clients, LEGIT_PAIRS, site.addresses, pause=LEGIT_WINDOW / LEGIT_PAIRS,
                                     deadline=time.monotonic() + LEGIT_BUDGET)
            attacker = describe()
    time.sleep(AFTER_SETTLE)
    alive = d.proc.poll() is None
    after = flood.legit_run(site.clients, AFTER_PAIRS, site.addresses) if alive else []
    written = d.log()[text_before:]
    lines = flood.count_lines(site.log_path) - log_before
    requests = 2 * len(site.clients) * (LEGIT_PAIRS + AFTER_PAIRS)
    max_lines = LOG_LINES_PER_SOURCE * sources + LOG_LINES_PER_REQUEST * requests + LOG_LINES_SLACK
    peak_kib = max(rss.max_kib, proc_status_kib(d.proc.pid, "VmHWM"))

    problems = []
    expected = 2 * len(site.clients) * LEGIT_PAIRS
    summary = flood.summarize(during)
    if summary["answered"] != expected:
        problems.append(f"under attack {summary['answered']}/{expected} requests answered with 201/200 "
                        f"({len(during)} sent): {flood.describe_failures(during)}")
    if not alive:
        problems.append(f"the daemon exited with {d.proc.returncode}; stderr:\n{d.stderr()[-3000:]}")
    elif not all(o.ok for o in after) or len(after) != 2 * len(site.clients) * AFTER_PAIRS:
        problems.append(f"after the attack: {flood.describe_failures(after)}")
    if "Traceback" in written:
        at = written.index("Traceback")
        problems.append(f"the log has a traceback:\n{written[max(0, at - 300):at + 1500]}")
    if lines > max_lines:
        problems.append(f"{lines} log lines written during the attack, more than {max_lines}")
    if peak_kib > MAX_RSS_KIB:
        problems.append(f"RSS peaked at {peak_kib / 1024:.1f} MiB, over 150 MB")
    assert not problems, f"attacker: {attacker}\n" + "\n".join(problems)


def test_slowloris_from_one_address(site: Site) -> None:
    """(a) slowhttptest -H: 1,000 connections from one address, 250 a second, a header line every 2 s."""
    slow = flood.SlowHTTPTest(site.peer, f"https://{SERVER4}:{PORT}/health", connections=1000, rate=250,
                              interval=2, duration=60)
    with flood.preferred_source(site.peer, site.peer_if, SERVER4, SLOWLORIS_SOURCE):
        under_attack(site, slow, lambda: slow.wait_ramped(slow.connections / slow.rate + 8), 1,
                     lambda: f"slowhttptest runs={slow.runs} max connected={slow.max_connected} "
                             f"last status={slow.counters}")
    assert slow.max_opened >= slow.connections, f"slowhttptest never got going: {list(slow.output_tail)}"


@pytest.mark.parametrize("kind", ["silent", "heads"])
def test_flood_from_many_addresses(site: Site, kind: str) -> None:
    """(b) silent: 600 TCP connections that send nothing; (c) heads: 600 TLS handshakes, each followed by a
    request head that never ends (a header line every 2 s). Both over 100 addresses, reconnecting when closed."""
    sources = ATTACKERS[:100]
    attack = flood.FloodProcess(site.peer, kind, SERVER4, PORT, sources, connections=600, rate=250, interval=2,
                                duration=60)
    stats: dict[str, Any] = {}

    def ramped() -> None:
        stats.update(attack.wait_ramped(timeout=15))

    def describe() -> str:
        stats.update(attack.latest)
        return f"{kind} flood {stats}"

    under_attack(site, attack, ramped, len(sources), describe)
    assert attack.latest.get("established", 0) >= 600, \
        f"the flood did not get its connections: {attack.latest} {attack.stderr()}"
