"""Quick end-to-end check of the fixture: block, look up, list, unblock in a private namespace."""

import pytest

pytestmark = pytest.mark.root


def test_block_lookup_unblock(running):
    d = running
    r = d.request("PUT", "/chain/f2b-web/ipv4/203.0.113.9?timeout=600")
    assert r.status == 201, r
    assert d.chain_rules("f2b-web") == ["-A f2b-web -s 203.0.113.9/32 -j DROP"]
    assert d.request("GET", "/chain/f2b-web/ipv4/203.0.113.9").status == 200
    r = d.request("DELETE", "/chain/f2b-web/ipv4/203.0.113.9")
    assert r.status == 200 and r.json["deleted"] is True
    assert d.chain_rules("f2b-web") == []
