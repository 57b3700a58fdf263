"""Durable state against the real daemon, on every firewall backend: expiry (also across restarts),
a simulated reboot into a fresh namespace, and kill -9 in the middle of bursts of blocks and unblocks.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import stat
import threading
import time
from typing import Any, Callable

import pytest

from tests.conftest import Daemon
from tests.netns import NetNS

pytestmark = pytest.mark.root

BLOCK_RULE_RE = re.compile(r"^-A (\S+) -s (\S+) -j (DROP|REJECT)(?: --reject-with \S+)?$")
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def net(text: str) -> Net:
    return ipaddress.ip_network(text)


def path(chain: str, network: Net) -> str:
    family = "ipv4" if network.version == 4 else "ipv6"
    if network.prefixlen == network.max_prefixlen:
        return f"/chain/{chain}/{family}/{network.network_address}"
    return f"/chain/{chain}/{family}/{network.network_address}/{network.prefixlen}"


def kernel(d: Daemon, chain: str) -> list[Net]:
    """Networks the kernel blocks for `chain`, both families; with iptables one per rule, duplicates kept."""
    if d.backend == "iptables":
        return [net(m.group(2)) for family in (4, 6) for rule in d.chain_rules(chain, family)
                if (m := BLOCK_RULE_RE.match(rule))]
    return [net(text) for family in (4, 6) for text in sorted(d.kernel_entries(chain, family))]


def listed(d: Daemon, chain: str) -> dict[Net, dict[str, Any]]:
    r = d.request("GET", f"/chain/{chain}")
    assert r.status == 200, r
    return {net(e["network"]): e for e in r.json["entries"]}


def wait_until(predicate: Callable[[], bool], deadline: float, step: float = 0.1) -> bool:
    """Poll until predicate() holds or time.monotonic() passes deadline; the last answer."""
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(step)


def expire_audited(d: Daemon, chain: str, network: str) -> bool:
    return re.search(rf"action=expire chain={re.escape(chain)} network={re.escape(network)} .*result=deleted",
                     d.log()) is not None


@pytest.mark.backends
def test_timed_block_expires_on_time(running):
    d = running
    t0 = time.monotonic()
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.20?timeout=2")
    assert r.status == 201 and r.json["expires_at"] is not None, r
    # A later PUT with a new timeout replaces the old expiry, here with "permanent".
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::20?timeout=2").status == 201
    r = d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::20?timeout=-1")
    assert r.status == 200 and r.json["expires_at"] is None, r
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.0/28?expire=2").status == 201
    assert d.kernel_entries("f2b-web", 4) == {"203.0.113.20/32"}

    def expired() -> bool:
        return (kernel(d, "f2b-web") == [net("2001:db8:ffff::20/128")] and kernel(d, "f2b-ssh") == []
                and set(listed(d, "f2b-web")) == {net("2001:db8:ffff::20/128")} and listed(d, "f2b-ssh") == {})

    assert not expired()
    assert wait_until(expired, t0 + 3.5), (d.rules(4), d.rules(6))
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.20").status == 404
    assert expire_audited(d, "f2b-web", "203.0.113.20/32")
    assert expire_audited(d, "f2b-ssh", "203.0.113.0/28")
    assert not expire_audited(d, "f2b-web", "2001:db8:ffff::20/128")


@pytest.mark.backends
def test_expiry_holds_across_restart_and_permanent_blocks_survive(running):
    d = running
    t0 = time.monotonic()
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.30?timeout=2").status == 201   # expires while down
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.31?timeout=6").status == 201   # expires after restart
    assert d.request("PUT", "/chain/f2b-web/ipv6/2001:db8:ffff::31?timeout=6").status == 201
    assert d.request("PUT", "/chain/f2b-ssh/ipv4/203.0.113.32").status == 201             # permanent
    assert d.request("PUT", "/chain/f2b-ssh/ipv6/2001:db8:ffff::/64?timeout=0").status == 201  # permanent
    assert d.stop() == 0
    # Stopping leaves the blocks in the kernel; expiry is the daemon's job once it is back (on a set
    # backend the kernel may already have expired the 2 s one by itself).
    still = set(kernel(d, "f2b-web"))
    assert {net("203.0.113.31/32"), net("2001:db8:ffff::31/128")} <= still <= {
        net("203.0.113.30/32"), net("203.0.113.31/32"), net("2001:db8:ffff::31/128")}
    if d.backend == "iptables":
        assert net("203.0.113.30/32") in still

    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))
    d.start()
    assert time.monotonic() < t0 + 5.5, "the restart was too slow for this test to judge the 6 s blocks"
    assert sorted(kernel(d, "f2b-web"), key=str) == [net("2001:db8:ffff::31/128"), net("203.0.113.31/32")]
    assert set(listed(d, "f2b-web")) == {net("203.0.113.31/32"), net("2001:db8:ffff::31/128")}
    assert expire_audited(d, "f2b-web", "203.0.113.30/32")
    permanent = {net("203.0.113.32/32"), net("2001:db8:ffff::/64")}
    assert set(kernel(d, "f2b-ssh")) == permanent and set(listed(d, "f2b-ssh")) == permanent

    assert wait_until(lambda: kernel(d, "f2b-web") == [] and listed(d, "f2b-web") == {}, t0 + 7.5), d.rules(4)
    assert expire_audited(d, "f2b-web", "203.0.113.31/32")
    assert expire_audited(d, "f2b-web", "2001:db8:ffff::31/128")
    assert d.stop() == 0
    d.start()
    assert kernel(d, "f2b-web") == [] and listed(d, "f2b-web") == {}
    assert set(kernel(d, "f2b-ssh")) == permanent and set(listed(d, "f2b-ssh")) == permanent
    assert {e["expires_at"] for e in listed(d, "f2b-ssh").values()} == {None}


@pytest.mark.backends
def test_unblocked_entry_stays_gone_after_restart(running):
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.40").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.41").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.40").json["deleted"] is True
    assert d.stop() == 0
    d.start()
    assert kernel(d, "f2b-web") == [net("203.0.113.41/32")]
    assert set(listed(d, "f2b-web")) == {net("203.0.113.41/32")}
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.40").status == 404


@pytest.mark.backends
def test_simulated_reboot_restores_every_block(daemon, user_hashes):
    d = daemon
    d.start()
    blocks = [("f2b-web", "ipv4/203.0.113.50"), ("f2b-web", "ipv6/2001:db8:ffff::50"),
              ("admin-list", "ipv4/203.0.113.128/25"), ("f2b-ssh", "ipv6/2001:db8:ffff:2::/64"),
              ("f2b-ssh", "ipv4/203.0.113.51"), ("f2b-web", "ipv4/203.0.113.52?timeout=3600")]
    for chain, rest in blocks:
        assert d.request("PUT", f"/chain/{chain}/{rest}").status == 201
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.53").status == 201
    assert d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.53").json["deleted"] is True
    chains = ("f2b-web", "f2b-ssh", "admin-list")
    before = {c: listed(d, c) for c in chains}
    kernel_before = {(c, f): d.kernel_entries(c, f) for c in chains for f in (4, 6)}
    assert kernel_before[("admin-list", 4)] == {"203.0.113.128/25"}
    timed = before["f2b-web"][net("203.0.113.52/32")]
    assert timed["expires_at"] is not None
    assert d.stop() == 0

    # The "reboot": the same state dir, but a brand-new namespace with an empty firewall.
    with NetNS.create() as fresh:
        assert fresh.iptables_save(4).strip() == ""
        rebooted = Daemon(fresh, d.workdir, d.pki, user_hashes, d.backend)
        rebooted.notify_path = d.workdir / "notify-reboot.sock"
        try:
            rebooted.start()
            for (chain, family), entries in kernel_before.items():
                assert rebooted.kernel_entries(chain, family) == entries, (chain, family)
            for family in (4, 6) if d.backend in ("iptables", "ipset") else ():
                hooks = [r for r in rebooted.rules(family) if r.startswith(("-A INPUT -j", "-A FORWARD -j"))]
                assert sorted(hooks) == ["-A FORWARD -j admin-list", "-A INPUT -j admin-list",
                                         "-A INPUT -j f2b-ssh", "-A INPUT -j f2b-web"]
            after = {c: listed(rebooted, c) for c in chains}
            assert after == before  # created_at, expires_at and created_by included
            assert after["f2b-web"][net("203.0.113.52/32")]["expires_at"] == timed["expires_at"]
            assert net("203.0.113.53/32") not in after["f2b-web"]
        finally:
            rebooted.close()


def burst(d: Daemon, method: str, shares: list[list[Net]], chain: str = "f2b-web",
          kill_after: int | None = None) -> tuple[set[Net], int]:
    """`method` every network of each share from its own thread and keep-alive connection.

    With kill_after, kill -9 the daemon once that many requests were acknowledged. Returns the
    networks acknowledged with a 2xx, and how many requests failed (connection lost)."""
    acked: set[Net] = set()
    failed: list[BaseException] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    enough = threading.Event()

    def client(share: list[Net]) -> None:
        try:
            conn = d.connection()
            for network in share:
                r = d.request(method, path(chain, network), conn=conn)
                assert 200 <= r.status < 300, r
                with lock:
                    acked.add(network)
                    if kill_after is not None and len(acked) >= kill_after:
                        enough.set()
            conn.close()
        except (OSError, http.client.HTTPException) as exc:  # the daemon was killed under us
            with lock:
                failed.append(exc)
        except BaseException as exc:  # a wrong status: re-raised in the test thread
            errors.append(exc)
            enough.set()

    threads = [threading.Thread(target=client, args=(share,)) for share in shares]
    for t in threads:
        t.start()
    if kill_after is not None:
        assert enough.wait(60), f"only {len(acked)} requests were acknowledged"
        d.kill9()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]
    return acked, len(failed)


def crash_networks() -> list[list[Net]]:
    """Four shares of never-contacted networks: two of IPv4 hosts, two of IPv6 hosts."""
    return [[net(f"203.0.113.{i}/32") for i in range(128)],
            [net(f"203.0.113.{i}/32") for i in range(128, 256)],
            [net(f"2001:db8:ffff:3::{i:x}/128") for i in range(1, 401)],
            [net(f"2001:db8:ffff:4::{i:x}/128") for i in range(1, 401)]]


def assert_store_matches_kernel(d: Daemon) -> dict[Net, dict[str, Any]]:
    in_kernel = kernel(d, "f2b-web")
    assert len(in_kernel) == len(set(in_kernel)), "a rule is in the kernel twice"
    entries = listed(d, "f2b-web")
    assert set(entries) == set(in_kernel)
    return entries


@pytest.mark.backends
def test_kill9_during_block_burst_keeps_every_acknowledged_block(running):
    d = running
    shares = crash_networks()
    acked, failed = burst(d, "PUT", shares, kill_after=100)
    assert failed > 0 and len(acked) < sum(map(len, shares)), "the kill did not land inside the burst"
    d.start()
    entries = assert_store_matches_kernel(d)
    missing = acked - set(entries)
    assert not missing, f"{len(missing)} acknowledged blocks were lost, e.g. {sorted(missing, key=str)[:5]}"
    # Really from the store, not merely found in the kernel and adopted.
    assert {entries[n]["created_by"] for n in acked} == {"admin"}
    assert set(entries) <= {n for share in shares for n in share}


@pytest.mark.backends
def test_kill9_during_unblock_burst_keeps_every_acknowledged_unblock(running):
    d = running
    shares = crash_networks()
    everything = {n for share in shares for n in share}
    acked, failed = burst(d, "PUT", shares)
    assert failed == 0 and acked == everything
    acked, failed = burst(d, "DELETE", shares, kill_after=100)
    assert failed > 0 and len(acked) < len(everything), "the kill did not land inside the burst"
    d.start()
    entries = assert_store_matches_kernel(d)
    back = acked & set(entries)
    assert not back, f"{len(back)} acknowledged unblocks came back, e.g. {sorted(back, key=str)[:5]}"
    assert set(entries) <= everything - acked
    # And they stay gone through one more ordinary restart.
    assert d.stop() == 0
    d.start()
    assert set(assert_store_matches_kernel(d)) == set(entries)


def test_state_files_are_private(running):
    d = running
    assert d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.60").status == 201
    state_dir = d.workdir / "state"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((state_dir / "state.db").stat().st_mode) == 0o600
    for extra in state_dir.iterdir():  # the WAL and shared-memory files hold the same data
        assert stat.S_IMODE(extra.stat().st_mode) & 0o077 == 0, extra
