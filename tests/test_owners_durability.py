"""Claims against the real daemon, on every firewall backend: each owner's claim survives kill -9, a claim that
runs out while the daemon is down goes at the next start while the others hold the block, and the last release
takes the block out of the kernel for good.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import Daemon
from tests.test_durability import kernel, listed, net

pytestmark = pytest.mark.root

A = "/chain/f2b-web/ipv4/203.0.113.40"       # f2b/sshd for 2 s, and admin for good
B = "/chain/f2b-web/ipv6/2001:db8:ffff::40"  # f2b/sshd for 2 s, f2b/nginx for 8 s


def owners(d: Daemon, path: str) -> list[str]:
    r = d.request("GET", path)
    return [c["owner"] for c in r.json["claims"]] if r.status == 200 else []


@pytest.mark.backends
def test_claims_survive_kill9_and_expire_one_by_one(running: Daemon) -> None:
    d = running
    t0 = time.monotonic()
    assert d.request("PUT", A + "?timeout=2&owner=sshd", user="f2b").status == 201
    assert d.request("PUT", A).status == 200
    assert d.request("PUT", B + "?timeout=2&owner=sshd", user="f2b").status == 201
    assert d.request("PUT", B + "?timeout=8&owner=nginx", user="f2b").status == 200
    d.kill9()
    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))
    d.start()
    assert time.monotonic() < t0 + 7, "the restart was too slow for this test to judge the 8 s claim"
    # The 2 s claims ran out while the daemon was down; the blocks stay for the claims that hold them.
    assert owners(d, A) == ["admin"] and owners(d, B) == ["f2b/nginx"]
    assert listed(d, "f2b-web")[net("203.0.113.40/32")]["expires_at"] is None
    assert sorted(kernel(d, "f2b-web"), key=str) == [net("2001:db8:ffff::40/128"), net("203.0.113.40/32")]
    assert re.search(r"action=expire chain=f2b-web network=203\.0\.113\.40/32 owner=f2b/sshd .*result=released",
                     d.log())
    # A release that is not the last leaves the block; the last one takes it out, and a restart keeps it out.
    r = d.request("DELETE", B + "?owner=sshd", user="f2b")
    assert (r.json["deleted"], r.json["released"]) == (False, False), r
    r = d.request("DELETE", B + "?owner=nginx", user="f2b")
    assert (r.json["deleted"], r.json["released"]) == (True, True), r
    d.kill9()
    d.start()
    assert kernel(d, "f2b-web") == [net("203.0.113.40/32")]
    assert owners(d, A) == ["admin"] and owners(d, B) == []
