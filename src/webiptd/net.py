"""Addresses and networks: parsing them from a config, a request path, a bulk item or the store, and the
unit a client is counted in."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def compact(network: Network) -> Network:
    """Drop the per-instance `hosts` that CPython's ipaddress gives a /32 or /128 (a closure) and a /31 or /127.

    A /32 IPv4Network then takes 192 bytes instead of 494 (bench/README.md); nothing here calls hosts().
    `del`, not `__dict__.pop`, which would materialise the instance dict.
    """
    try:
        del network.hosts
    except AttributeError:
        pass
    return network


_V4_MASKS = [ipaddress.IPv4Address((0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF) for n in range(33)]
_V6_MASKS = [ipaddress.IPv6Address(((1 << 128) - 1) ^ ((1 << (128 - n)) - 1)) for n in range(129)]
_V4_INT_MASKS = [int(m) for m in _V4_MASKS]
_V6_INT_MASKS = [int(m) for m in _V6_MASKS]
_V4_NEW = ipaddress.IPv4Network.__new__
_V6_NEW = ipaddress.IPv6Network.__new__


def v4_network(address: int, prefixlen: int) -> ipaddress.IPv4Network:
    """The IPv4Network of an address (an int, host bits clear: the caller checked) and a prefix length 0-32.

    What IPv4Network((address, prefixlen)) makes, its three attributes set directly: a third of the time, and no
    `hosts` closure (see compact). Equal, with the same hash, str() and methods (tests/test_net.py checks)."""
    network = _V4_NEW(ipaddress.IPv4Network)
    network.network_address = ipaddress.IPv4Address(address)
    network.netmask = _V4_MASKS[prefixlen]
    network._prefixlen = prefixlen  # type: ignore[attr-defined]
    return network


def v6_network(address: int, prefixlen: int) -> ipaddress.IPv6Network:
    """The IPv6Network of an address (an int, host bits clear) and a prefix length 0-128; as v4_network."""
    network = _V6_NEW(ipaddress.IPv6Network)
    network.network_address = ipaddress.IPv6Address(address)
    network.netmask = _V6_MASKS[prefixlen]
    network._prefixlen = prefixlen  # type: ignore[attr-defined]
    return network


def network_of(version: int, address: int, prefixlen: int) -> Network:
    """The network of an address (an int) and a prefix length, as IPv4Network((address, prefixlen)) makes it
    (strict: ValueError for host bits set, or a length out of range), at v4_network's speed."""
    if version == 4:
        if 0 <= prefixlen <= 32 and 0 <= address <= 0xFFFFFFFF and not address & ~int(_V4_MASKS[prefixlen]):
            return v4_network(address, prefixlen)
    elif 0 <= prefixlen <= 128 and 0 <= address < 1 << 128 and not address & ~int(_V6_MASKS[prefixlen]):
        return v6_network(address, prefixlen)
    raise ValueError(f"not an IPv{version} network: {address:#x}/{prefixlen}")


def net_text(network: Network) -> str:
    """str(network), the store's form of it, made faster (IPv6's took 10 us in CPython 3.11): inet_ntop writes the same
    RFC 5952 text, except where the first 80 bits are zero (IPv4-mapped and -compatible addresses, which it writes
    with a dotted quad), left to str()."""
    if network.version == 6:
        address = int(network.network_address)
        if address >> 48:
            return f"{socket.inet_ntop(socket.AF_INET6, address.to_bytes(16, 'big'))}/{network.prefixlen}"
        return str(network)
    # IPv4: inet_ntoa writes the dotted quad as str() does, in half its time (1.05 -> 0.5 us).
    return f"{socket.inet_ntoa(int(network.network_address).to_bytes(4, 'big'))}/{network.prefixlen}"


def parse_stored(text: str) -> Network:
    """A network as the state DB stores it (str() of one): about 4x faster than ip_network() for IPv4."""
    address, _, prefix = text.partition("/")
    try:
        if address.count(".") == 3 and prefix.isdigit():
            value, length = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big"), int(prefix)
            if length <= 32 and not value & ~int(_V4_MASKS[length]):
                return v4_network(value, length)
        elif ":" in address and "%" not in address and prefix.isdigit():
            value, length = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big"), int(prefix)
            if length <= 128 and not value & ~int(_V6_MASKS[length]):
                return v6_network(value, length)
    except OSError:
        pass
    return compact(ipaddress.ip_network(text, strict=True))


def parse_listed(text: str) -> Network:
    """A network as a tool lists it (`ipset save`): ADDRESS/PREFIX, or ADDRESS alone for a host; parse_stored's
    speed (ip_network() took half of reading back a million)."""
    if "/" not in text:
        text += "/128" if ":" in text else "/32"
    return parse_stored(text)


def parse_cidr(text: Any) -> Network:
    """A network in CIDR notation as a config gives it, host bits clear."""
    if not isinstance(text, str):
        raise ValueError("expected a network in CIDR notation")
    return ipaddress.ip_network(text, strict=True)


def parse_segments(family: str, address: str, prefix: str | None) -> Network:
    """The network that a request path names (`ipv4`, ADDRESS, PREFIX); ValueError with a sentence for the client."""
    fast = _fast_segments(family, address, prefix)
    if fast is not None:
        return fast
    if family not in ("ipv4", "ipv6"):
        raise ValueError(f"unknown address family {family!r}; use ipv4 or ipv6")
    version = 4 if family == "ipv4" else 6
    try:
        addr = ipaddress.IPv4Address(address) if version == 4 else ipaddress.IPv6Address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not a valid {family} address") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError("scoped IPv6 addresses cannot be blocked")
        if addr.ipv4_mapped is not None:
            raise ValueError("IPv4-mapped IPv6 addresses are blocked through the ipv4 path")
    max_len: int = addr.max_prefixlen
    if prefix is None:
        length = max_len
    else:
        if not prefix.isascii() or not prefix.isdigit() or (len(prefix) > 1 and prefix[0] == "0"):
            raise ValueError(f"prefix {prefix!r} is not a whole number")
        length = int(prefix)
        if not 1 <= length <= max_len:
            raise ValueError(f"prefix length must be 1 to {max_len} for {family}")
    # The address as an int, and the family's class: ip_network((addr, length)) parses the address's text again.
    network_class = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    try:
        return compact(network_class((int(addr), length), strict=True))
    except ValueError:
        proper = ipaddress.ip_network((addr, length), strict=False)
        raise ValueError(f"{address}/{length} has host bits set; did you mean {proper}?") from None


def _fast_segments(family: str, address: str, prefix: str | None) -> Network | None:
    """parse_segments for what is valid and common, in a fifth of the time; None for anything else, which the slow
    path parses or explains. inet_pton takes only the strict forms (dotted decimal without leading zeros; RFC 4291
    text without a zone), which ipaddress takes too."""
    if prefix is not None and not (prefix.isascii() and prefix.isdigit() and (len(prefix) == 1 or prefix[0] != "0")):
        return None
    try:
        if family == "ipv4":
            value = int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
            length = 32 if prefix is None else int(prefix)
            if 1 <= length <= 32 and not value & ~int(_V4_MASKS[length]):
                return v4_network(value, length)
        elif family == "ipv6" and address.isascii() and "." not in address:
            value = int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
            length = 128 if prefix is None else int(prefix)
            if value >> 32 != 0xFFFF and 1 <= length <= 128 and not value & ~int(_V6_MASKS[length]):
                return v6_network(value, length)
    except (OSError, ValueError):
        pass
    return None


_pton, _ntop, _AF_INET, _AF_INET6 = socket.inet_pton, socket.inet_ntop, socket.AF_INET, socket.AF_INET6
_ZERO_48 = bytes(6)


def packed_item(text: str) -> tuple[str, bytes, int] | None:
    """A bulk item ("ADDRESS" or "ADDRESS/PREFIX") as (net_text of its network, the address packed, the prefix
    length), for what is valid and common, without an ipaddress object or even an int for a host: a load's
    millions pass here. None for anything else, which parse_item parses or explains. What it takes, parse_item
    takes too and gives the same network (tests/test_bulk_load.py)."""
    address, slash, prefix = text.partition("/")
    if slash and not (prefix.isascii() and prefix.isdigit() and (len(prefix) == 1 or prefix[0] != "0")):
        return None
    try:
        if ":" in address:
            if not address.isascii() or "." in address:
                return None
            packed = _pton(_AF_INET6, address)
            if packed[:6] == _ZERO_48:
                return None  # IPv4-mapped and the like: net_text writes them with str(), as parse_item does
            if not slash:
                return _ntop(_AF_INET6, packed) + "/128", packed, 128
            length = int(prefix)
            if not 1 <= length <= 128 or (length < 128 and int.from_bytes(packed, "big") & ~_V6_INT_MASKS[length]):
                return None
            return f"{_ntop(_AF_INET6, packed)}/{length}", packed, length
        packed = _pton(_AF_INET, address)
        if not slash:
            return _ntop(_AF_INET, packed) + "/32", packed, 32
        length = int(prefix)
        if not 1 <= length <= 32 or int.from_bytes(packed, "big") & ~_V4_INT_MASKS[length]:
            return None
        return f"{_ntop(_AF_INET, packed)}/{length}", packed, length
    except (OSError, ValueError):
        return None


def packed_of(network: Network) -> tuple[str, bytes, int]:
    """(net_text, packed address, prefix length) of a network: a commands.Packed."""
    return net_text(network), network.network_address.packed, network.prefixlen


def unpacked(packed: bytes, prefixlen: int) -> Network:
    """The network of a packed address (host bits clear) and its prefix length."""
    value = int.from_bytes(packed, "big")
    return v4_network(value, prefixlen) if len(packed) == 4 else v6_network(value, prefixlen)


def parse_item(text: str) -> Network:
    """One bulk item, "ADDRESS" or "ADDRESS/PREFIX", its family taken from the address."""
    address, _, prefix = text.partition("/")
    family = "ipv6" if ":" in address else "ipv4"
    return parse_segments(family, address, prefix if "/" in text else None)


def client_key(address: Address) -> str:
    """The unit a throttle counts: one IPv4 address, or one IPv6 /64 (what one host usually has)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def peer_address(host: str) -> Address:
    """The client's address as the throttle and admission count it: an IPv4-mapped IPv6 address as IPv4."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
