"""The network helpers without root: the store's fast parser agrees with ipaddress, and compact() keeps equality."""

from __future__ import annotations

import ipaddress

import pytest

from webiptd.net import compact, parse_cidr, parse_item, parse_stored


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
