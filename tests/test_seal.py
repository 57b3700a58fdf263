"""A restart on nftables does not read the sets back when nobody has changed nftables since the worker sealed them (at
a quiet moment after a change, and at a stop: NftablesBackend.seal, Worker._seal, Worker._reconcile), and reads them
back whenever anything may have: a commit by anyone, a crash during a change, other chains. Each case checks the
kernel and the API after the start, not only which way it went.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Daemon
from tests.test_backend_nftables import TABLE, elements, listed, nft, restart

pytestmark = [pytest.mark.root, pytest.mark.backends("nftables")]

SEALED = "the kernel as sealed before, not read back"


def reconciles(d: Daemon) -> list[str]:
    return [line for line in d.log().splitlines() if "reconciled" in line]


def put(d: Daemon, path: str, expect: int = 201) -> None:
    r = d.request("PUT", path)
    assert r.status == expect, r


def test_a_clean_restart_takes_the_sealed_kernel_and_ends_the_same(running: Daemon) -> None:
    d = running
    put(d, "/chain/f2b-web/ipv4/203.0.113.60")
    put(d, "/chain/f2b-web/ipv4/203.0.113.61?timeout=2")  # expires while the daemon is down
    put(d, "/chain/f2b-web/ipv6/2001:db8::60")
    put(d, "/chain/f2b-web/ipv4/203.0.113.62?proto=tcp&port=22")
    put(d, "/chain/f2b-web/ipv4/203.0.113.62?proto=tcp&port=80&owner=web")
    assert d.stop() == 0, d.stderr()
    assert "seal" in nft(d, "list", "table", *TABLE).stdout
    time.sleep(2.5)
    d.start()
    assert SEALED in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.60"}
    assert set(elements(d, "f2b-web-v6")) == {"2001:db8::60"}
    assert set(listed(d, "f2b-web")) == {"203.0.113.60/32", "2001:db8::60/128", "203.0.113.62/32"}
    ports = nft(d, "-nn", "list", "set", *TABLE, "f2b-web-v4-port").stdout
    assert "203.0.113.62 . 6 . 22" in ports and "203.0.113.62 . 6 . 80" in ports, ports
    # A change, and a crash at once (before the worker's next quiet moment): the change took the seal out of the
    # store before it reached the kernel, so the start after reads the kernel back.
    put(d, "/chain/f2b-web/ipv4/203.0.113.63")
    d.kill9()
    d.start()
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.60", "203.0.113.63"}


def test_a_crash_after_a_quiet_moment_takes_the_sealed_kernel(running: Daemon) -> None:
    """The worker seals the kernel once it has had nothing to do for a moment after a change: a kill -9 then is as
    good as a clean stop."""
    d = running
    put(d, "/chain/f2b-web/ipv4/203.0.113.64")
    put(d, "/chain/f2b-web/ipv4/203.0.113.65?timeout=2")  # expires before the crash, in the kernel and the store
    put(d, "/chain/f2b-web/ipv6/2001:db8::64")
    time.sleep(4.5)
    assert "seal" in nft(d, "list", "table", *TABLE).stdout
    d.kill9()
    d.start()
    assert SEALED in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.64"}
    assert set(listed(d, "f2b-web")) == {"203.0.113.64/32", "2001:db8::64/128"}
    # Someone deletes one of ours while the daemon is down after a crash: read back, and put back.
    put(d, "/chain/f2b-web/ipv4/203.0.113.66")
    time.sleep(1.5)
    d.kill9()
    nft(d, "delete", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.66 }")
    d.start()
    assert SEALED not in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.64", "203.0.113.66"}


def test_a_commit_by_anyone_after_the_stop_makes_the_start_read_the_kernel(running: Daemon) -> None:
    d = running
    for i in (70, 71):
        put(d, f"/chain/f2b-web/ipv4/203.0.113.{i}")
    assert d.stop() == 0, d.stderr()
    # Someone takes one of ours out while the daemon is down (a commit: the ruleset generation moves).
    nft(d, "delete", "element", *TABLE, "f2b-web-v4", "{ 203.0.113.70 }")
    d.start()
    assert SEALED not in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.70", "203.0.113.71"}


def test_a_table_made_anew_is_not_taken_for_the_sealed_one(running: Daemon) -> None:
    """The generation of a table deleted and made again can come back to the same number; the seal's random number
    cannot."""
    d = running
    put(d, "/chain/f2b-web/ipv4/203.0.113.80")
    assert d.stop() == 0, d.stderr()
    nft(d, "delete", "table", *TABLE)
    d.start()
    assert SEALED not in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.80"}


def test_other_chains_after_the_stop_make_the_start_read_the_kernel(daemon: Daemon) -> None:
    d = daemon
    d.start()
    put(d, "/chain/f2b-web/ipv4/203.0.113.90")
    d.config["chains"]["f2b-more"] = {"hooks": ["INPUT"], "target": "DROP", "backend": "nftables"}
    d.write_config()
    restart(d)
    assert SEALED not in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.90"}
    restart(d)  # the same chains as at the stop now
    assert SEALED in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.90"}


def test_a_change_by_another_program_while_running_is_never_sealed(running: Daemon) -> None:
    """Our own commit after theirs makes the generation ours again; the seal still must not vouch for the sets."""
    d = running
    put(d, "/chain/f2b-web/ipv4/203.0.113.95")
    nft(d, "flush", "set", *TABLE, "f2b-web-v4")
    put(d, "/chain/f2b-ssh/ipv4/203.0.113.96")
    restart(d)
    assert SEALED not in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.95"}
    restart(d)  # and from a start that read the kernel, the next clean stop seals again
    assert SEALED in reconciles(d)[-1], reconciles(d)
    assert set(elements(d, "f2b-web-v4")) == {"203.0.113.95"}
