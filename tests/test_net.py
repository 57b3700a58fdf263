"""The network helpers without root: the store's fast parser agrees with ipaddress, and compact() keeps equality."""

from __future__ import annotations

import ipaddress
import random

import pytest

from webiptd.net import (
    compact, net_text, network_of, parse_cidr, parse_item, parse_listed, parse_stored, v4_network, v6_network,
)


@pytest.mark.parametrize("text", ["203.0.113.7/32", "198.18.0.0/15", "0.0.0.0/1", "2001:db8::1/128",
                                  "2001:db8::/32", "::/1", "::ffff:0:0/96"])
def test_the_store_parser_agrees_with_ipaddress(text: str) -> None:
    parsed = parse_stored(text)
    assert parsed == ipaddress.ip_network(text) and type(parsed) is type(ipaddress.ip_network(text))
    assert str(parsed) == text


@pytest.mark.parametrize("text", ["203.0.113.7/33", "203.0.113.7/24", "2001:db8::1/64", "nonsense"])
def test_the_store_parser_refuses_what_ipaddress_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stored(text)


def test_compact_keeps_equality_and_hashing() -> None:
    a, b = ipaddress.ip_network("203.0.113.7/32"), compact(ipaddress.ip_network("203.0.113.7/32"))
    assert a == b and hash(a) == hash(b) and "hosts" not in vars(b)


def test_config_and_bulk_parsers() -> None:
    assert parse_cidr("198.51.100.0/24") == ipaddress.ip_network("198.51.100.0/24")
    with pytest.raises(ValueError):
        parse_cidr("198.51.100.1/24")  # host bits set
    with pytest.raises(ValueError):
        parse_cidr(24)
    assert parse_item("2001:db8::/48") == ipaddress.ip_network("2001:db8::/48")
    assert parse_item("203.0.113.9") == ipaddress.ip_network("203.0.113.9/32")


# -- the fast paths: the same values as ipaddress makes, in a fraction of the time ----------------------------------


def _random_networks(count: int, seed: int) -> list[tuple[int, int, int]]:
    """(version, address, prefix length) with host bits clear, IPv6 with runs of zero hextets and the edge forms."""
    rng = random.Random(seed)
    out: list[tuple[int, int, int]] = []
    for _ in range(count):
        length = rng.randint(0, 32)
        out.append((4, rng.getrandbits(32) & (((1 << length) - 1) << (32 - length)), length))
        hextets = [rng.getrandbits(16) if rng.random() < 0.5 else 0 for _ in range(8)]
        address = sum(h << (16 * k) for k, h in enumerate(hextets))
        if rng.random() < 0.1:  # IPv4-mapped, -compatible and the like: the first 80 bits zero
            address &= (1 << 48) - 1
        length = rng.randint(0, 128)
        out.append((6, address & (((1 << length) - 1) << (128 - length)), length))
    return out


def test_the_fast_constructors_make_what_ipaddress_makes() -> None:
    for version, address, length in _random_networks(5000, 1):
        slow = (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((address, length))
        fast = (v4_network if version == 4 else v6_network)(address, length)
        assert (fast, hash(fast), str(fast), repr(fast)) == (slow, hash(slow), str(slow), repr(slow))
        assert (fast.prefixlen, fast.num_addresses, fast.broadcast_address) == (
            slow.prefixlen, slow.num_addresses, slow.broadcast_address)
        assert fast.overlaps(slow) and slow.subnet_of(fast) and not fast < slow and not slow < fast
        assert net_text(fast) == str(slow)
        assert parse_stored(str(slow)) == slow


@pytest.mark.parametrize("family, item", [
    ("ipv4", a) for a in ("1.2.3.4", "0.0.0.0", "255.255.255.255", "01.2.3.4", "1.2.3", "1.2.3.4.5", "0x7f.0.0.1",
                          "1.2.3.4 ", " 1.2.3.4", "1.2.3.4/24", "1.2.3.0/24", "1.2.3.0/024", "1.2.3.0/0", "1.2.3.4/33",
                          "1.2.3.4/", "١.2.3.4", "1.2.3.4/+8")] + [
    ("ipv6", a) for a in ("::1", "::", "2001:db8::1", "2001:DB8::1", "::ffff:1.2.3.4", "::1.2.3.4", "fe80::1%eth0",
                          "2001:db8::/32", "2001:db8::1/64", "2001:db8::/0", "2001:db8::/129", "2001:0db8::1",
                          "2001:db8:0:0:0:0:0:1", "1:2:3:4:5:6:7:8:9", ":::1", "2001:db8::/032")])
def test_parse_item_takes_and_refuses_what_ipaddress_does(family: str, item: str) -> None:
    address, slash, prefix = item.partition("/")
    slow: object
    try:
        addr = ipaddress.ip_address(address)
        if family == "ipv6" and (addr.version != 6 or addr.ipv4_mapped is not None or addr.scope_id):
            raise ValueError
        if prefix and (prefix[0] == "0" and len(prefix) > 1 or not prefix.isdigit()):
            raise ValueError
        slow = ipaddress.ip_network(item, strict=True)
        if slash and slow.prefixlen == 0:
            raise ValueError
    except ValueError:
        slow = ValueError
    try:
        fast: object = parse_item(item)
    except ValueError:
        fast = ValueError
    assert fast == slow


def test_network_of_and_parse_listed_agree_with_ipaddress() -> None:
    for version, address, length in _random_networks(2000, 2):
        slow = (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((address, length))
        assert network_of(version, address, length) == slow
        listed = str(slow.network_address) if length == (32 if version == 4 else 128) else str(slow)
        assert parse_listed(listed) == slow == ipaddress.ip_network(listed)
    for version, address, length in ((4, 1, 24), (4, 1 << 32, 32), (4, 0, 33), (6, 1, 64), (6, 0, 129)):
        with pytest.raises(ValueError):
            network_of(version, address, length)
    with pytest.raises(ValueError):
        parse_listed("203.0.113.7/24")
