"""The nftables backend: the daemon's own table `inet web-ipt-d`, hash sets with kernel timeouts, and every
change of a batch in one transaction through libnftables (python3-nftables). See nft(8), libnftables-json(5).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from webiptd.config import Chain
from webiptd.firewall.host import NFTABLES_MISSING
from webiptd.firewall.netlink import (
    BE32, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkError, answer, attr,
    attrs, error_code, message, nested, nfgen_attrs, open_socket, replies,
)
from webiptd.firewall.ops import Add, CapacityExceeded, Items, Key, Op, Remove, adds
from webiptd.net import Network, network_of, unpacked
from webiptd.scope import PROTOCOL_NAMES, PROTOCOLS, Scope

logger = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "web-ipt-d"
HOOKS = {"INPUT": "input", "FORWARD": "forward", "OUTPUT": "output"}
# A chain's `interface` is matched in the jump from its base chain: the in-interface, but the out-interface at output.
IFNAME = {"INPUT": "iifname", "FORWARD": "iifname", "OUTPUT": "oifname"}
FIELD = {"source": "saddr", "destination": "daddr"}  # a chain's match, as the address a rule looks up
MAX_PREFIX = {4: 32, 6: 128}
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
PROTOCOL = {4: "ip", 6: "ip6"}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
NETWORK: dict[int, Any] = {4: ipaddress.IPv4Network, 6: ipaddress.IPv6Network}
# What iptables' REJECT sends by default, so both backends answer alike.
REJECT = {4: {"type": "icmp", "expr": "port-unreachable"}, 6: {"type": "icmpv6", "expr": "port-unreachable"}}
VERDICT_TARGET = {"drop": "DROP", "reject": "REJECT", "accept": "ACCEPT"}  # a rule's verdict -> the chain's target
DEFAULT_SIZE = Chain.maxelem
ENOENT = os.strerror(errno.ENOENT)  # libnftables reports errors as text: "Could not process rule: <strerror>"
ENFILE = os.strerror(errno.ENFILE)  # what the kernel answers when a set is at its size

# NFT_MSG_GETGEN and NFT_MSG_GETSETELEM, from linux/netfilter/nfnetlink.h and linux/netfilter/nf_tables.h.
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM = 13, 12
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_KEY_END = 1, 10
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_DATA_VALUE = 1
DUMP_TIMEOUT = 30.0  # between two datagrams of a dump: the kernel sends them as fast as they are read

# The kinds of set: all traffic of a network (an atom of scope None), every port of one protocol (Scope(proto)), and
# for some destination ports of one protocol (Scope(proto, ports)) two: a hash set of single ports, and an interval
# (pipapo) set of the ranges wider than MAX_FLAT_RANGE. One atom of ports may have elements in both.
ALL, PROTO, PORT, RANGE = 1, 2, 3, 4
KIND_SUFFIX = {ALL: "", PROTO: "-proto", PORT: "-port", RANGE: "-ports"}
SUFFIX_KIND = {suffix: kind for kind, suffix in KIND_SUFFIX.items()}
L4PROTO = {"meta": {"key": "l4proto"}}
DPORT = {"payload": {"protocol": "th", "field": "dport"}}  # the port field of tcp, udp, sctp, dccp and udplite alike
# The widest range of ports kept one element a port in the hash set; a wider one is one range element in the
# `-ports` interval (pipapo) set, whose every delete costs time that grows with the set (milliseconds at 1k
# elements, a hash set's stays flat). At this width a range's hash elements cost about one delete from a pipapo set
# of a hundred ranges; wider, their cost grows with the width, and each port takes a place of the set's maxelem
# (bench/scoped_nft_direct.py --width --flat-max).
MAX_FLAT_RANGE = 64

SetKey = tuple[int, int, int]  # (IP version, prefix length, kind)
ElementKey = tuple[str, int, int, int]  # (chain, IP version, prefix length, kind): one set
# One element: an address (kind ALL), (address, protocol number) (PROTO), (address, protocol number, port) (PORT),
# (address, protocol number, lo, hi) (RANGE).
Element = str | tuple[str, int] | tuple[str, int, int] | tuple[str, int, int, int]
PORT_KINDS = (PORT, RANGE)


class NftablesError(RuntimeError):
    """libnftables refused a command; the text is nft's own message."""


def set_name(chain: str, version: int, prefixlen: int, kind: int = ALL) -> str:
    """`<chain>-v4` holds hosts; `<chain>-v4-<len>` holds the networks of one shorter prefix length. Scoped
    atoms have sets of their own, with a suffix: `-proto` (`<chain>-v4-proto`, `<chain>-v4-24-proto`) for a
    whole protocol, `-ports` for ports of one.

    A hash set per prefix length, not one `flags interval` set, which nft reads back whole before each
    change (docs/backends.md has the figures) and which refuses overlapping elements, while the API lets
    a /24 and a host inside it be blocked and unblocked independently. Each rule masks the source and looks
    the network up, so each entry is one element with its own timeout; a packet costs one lookup per
    prefix length in use. A prefix length's set stays once made.
    """
    base = f"{chain}-v{version}"
    return (base if prefixlen == MAX_PREFIX[version] else f"{base}-{prefixlen}") + KIND_SUFFIX[kind]


def base_chain_name(hook: str, priority: int) -> str:
    """The base chain of our table at one hook and priority, shared by every chain of ours there: `input.-10`.
    A managed chain's name never holds a dot, and the base chains of earlier releases (`<chain>.input`) end in a
    hook's name, so it is neither."""
    return f"{HOOKS[hook]}.{priority}"


def _parse_set_name(chain: str, name: str) -> SetKey | None:
    m = re.fullmatch(re.escape(chain) + r"-v([46])(?:-(\d{1,3}))?(-proto|-port|-ports)?", name)
    if m is None:
        return None
    version, kind = int(m.group(1)), SUFFIX_KIND[m.group(3) or ""]
    if m.group(2) is None:
        return version, MAX_PREFIX[version], kind
    prefixlen = int(m.group(2))
    if prefixlen < MAX_PREFIX[version] and str(prefixlen) == m.group(2):
        return version, prefixlen, kind
    return None


def _set_type(version: int, kind: int) -> str | list[str]:
    """A set's `type` as libnftables-json(5) shows it: the address, or a concatenation (nft(8), SETS)."""
    if kind == ALL:
        return ADDR_TYPE[version]
    return [ADDR_TYPE[version], "inet_proto"] + (["inet_service"] if kind in PORT_KINDS else [])


def _set_flags(kind: int) -> list[str]:
    # Port ranges need an interval set; concatenated with ranges that is the pipapo set type, which refuses
    # overlapping elements: the worker keeps one atom per (chain, network, protocol), so ours never overlap.
    return ["interval", "timeout"] if kind == RANGE else ["timeout"]


def _elements_of(address: str, scope: Scope | None) -> list[tuple[int, Element]]:
    """The (kind of set, element) pairs that hold one atom: for ports, one element per port of the ranges up to
    MAX_FLAT_RANGE ports wide, one range element per wider range."""
    if scope is None:
        return [(ALL, address)]
    proto = PROTOCOLS[scope.proto]
    if not scope.ports:
        return [(PROTO, (address, proto))]
    out: list[tuple[int, Element]] = []
    for lo, hi in scope.ports:
        if hi - lo < MAX_FLAT_RANGE:
            out += [(PORT, (address, proto, port)) for port in range(lo, hi + 1)]
        else:
            out.append((RANGE, (address, proto, lo, hi)))
    return out


def _element_value(element: Element) -> Any:
    """An element as libnftables-json(5) takes it: `198.51.100.0 . tcp . 80-90` is a concat with a range."""
    if isinstance(element, str):
        return element
    if len(element) < 4:
        return {"concat": list(element)}
    address, proto, lo, hi = element
    return {"concat": [address, proto, lo if lo == hi else {"range": [lo, hi]}]}


def _proto_name(value: Any) -> str | None:
    """A protocol as nft prints it (its /etc/protocols name, or its number) -> our name; None if not ours."""
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return PROTOCOL_NAMES.get(int(value))
    return value if value in PROTOCOLS else None


def _port_range(value: Any) -> tuple[int, int]:
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        return int(lo), int(hi)
    return int(value), int(value)


def _looked_up(version: int, prefixlen: int, match: str, kind: int = ALL) -> dict[str, Any]:
    """The packet's source or destination address, masked to `prefixlen`, then for a scoped set its protocol
    (`meta l4proto`) and destination port (`th dport`): what a set of that length and kind is looked up by."""
    address: dict[str, Any] = {"payload": {"protocol": PROTOCOL[version], "field": FIELD[match]}}
    if prefixlen != MAX_PREFIX[version]:
        address = {"&": [address, str(NETWORK[version]((0, prefixlen)).netmask)]}
    if kind == ALL:
        return address
    return {"concat": [address, L4PROTO] + ([DPORT] if kind in PORT_KINDS else [])}


def _jump(chain: Chain, hook: str) -> list[dict[str, Any]]:
    """The base chain's one rule: `jump <chain>`, after `iifname`/`oifname` when the chain has an interface.
    iptables' wildcard `eth+` is nft's `eth*` (nft(8), STRING)."""
    jump: dict[str, Any] = {"jump": {"target": chain.name}}
    if chain.interface is None:
        return [jump]
    name = chain.interface[:-1] + "*" if chain.interface.endswith("+") else chain.interface
    return [{"match": {"op": "==", "left": {"meta": {"key": IFNAME[hook]}}, "right": name}}, jump]


def _verdict(target: str, version: int) -> dict[str, Any]:
    """A rule's verdict: an allow chain's `accept` ends the base chain that jumped to it, before the block chains'
    jumps that follow there."""
    return {"accept": None} if target == "ACCEPT" else {"drop": None} if target == "DROP" else {
        "reject": REJECT[version]}


def _address(network: Network) -> str:
    """The network's address as nft prints it (inet_ntop is four times faster than ipaddress' str)."""
    return socket.inet_ntop(AF[network.version], int(network.network_address).to_bytes(network.max_prefixlen // 8,
                                                                                        "big"))


def _timeout(expires_at: float | None, now: float) -> int | None:
    # Rounded up, so the kernel never lets go before the worker's own expiry does.
    return None if expires_at is None else max(1, math.ceil(expires_at - now))


# Elements of a load in one transaction. A transaction the kernel refuses answers each of its messages with an
# error that echoes it; past some 10,000 elements those overflow the socket (ENOBUFS) and the cause (ENFILE: the
# set is full, a 507) is lost.
LOAD_CHUNK = 10_000

# A set of our table with no chain's name pattern (set_name's are `<chain>-v4...`): one random number, put there when
# the worker is quiet after a change, and at a stop (NftablesBackend.seal).
SEAL_SET = "seal"
GENERATION_TIMEOUT = 10.0  # the kernel answers at once; the worker must never wait for ever on it


def _kernel_context() -> str | None:
    """This boot and this network namespace, in which a ruleset generation means something."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.stat("/proc/self/ns/net")
    except OSError:
        return None
    return f"{boot}/{namespace.st_dev}.{namespace.st_ino}"


class RulesetGeneration:
    """nf_tables' ruleset generation (NFT_MSG_GETGEN): the kernel adds one with every committed transaction.

    A batch re-makes our chains' rules and hooks only when some other program committed since our
    last transaction: reading the generation is one netlink round trip, the re-make costs a batch
    about a quarter of its CPU (bench/README.md).
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def read(self) -> int:
        try:
            return self._read()
        except OSError:
            self.close()  # a request without its answer leaves the socket's state unknown: a new one next time
            raise

    def _read(self) -> int:
        if self._sock is None:
            self._sock = open_socket()
            self._sock.settimeout(GENERATION_TIMEOUT)
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sock.send(message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETGEN, NLM_F_REQUEST, self._seq, b""))
        while True:
            for kind, seq, payload in replies(self._sock.recv(65536)):
                if seq != self._seq:
                    continue  # an answer to an earlier request that timed out: not ours any more
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    raise OSError(code, f"NFT_MSG_GETGEN: {os.strerror(code)}")
                generation = nfgen_attrs(payload).get(NFTA_GEN_ID, b"")
                if len(generation) < BE32.size:
                    raise OSError(errno.EPROTO, "NFT_MSG_GETGEN answered without NFTA_GEN_ID")
                return int(BE32.unpack_from(generation)[0])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def set_elements(sock: socket.socket, seq: int, name: str) -> Iterator[tuple[bytes, bytes | None]]:
    """The key (and, in an interval set, the key's end) of each element of our set `name`, as the kernel dumps
    them (NFT_MSG_GETSETELEM): one datagram at a time, never the whole set, and without libnftables, which builds
    the whole listing (objects, then its JSON text) first: 1.3 GB for a million elements (bench/README.md).

    A key is the set's type's bytes: an address, then for a concatenation each further field in 4 bytes (nft(8),
    CONCATENATIONS): a protocol number in its first byte, a port big-endian in its first two. `sock`: a netlink
    socket of the namespace to read (one dump at a time). Raises OSError.
    """
    body = attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0") + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
    sock.send(message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, seq, body, NFPROTO_INET))
    while True:
        for kind, reply_seq, payload in replies(sock.recv(1 << 17)):
            if reply_seq != seq:
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise OSError(code, f"listing the elements of set {name}: {os.strerror(code)}")
                return
            listed = nfgen_attrs(payload).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
            for _, elem in nested(listed):
                found = attrs(elem)
                key = attrs(found.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
                if key is None:
                    continue
                end = found.get(NFTA_SET_ELEM_KEY_END)
                yield key, None if end is None else attrs(end).get(NFTA_DATA_VALUE)


def element_expiration(sock: socket.socket, seq: int, name: str, key: bytes) -> int | None:
    """The ms left before element `key` (an address's bytes) of our set `name` expires in the kernel (0: it has no
    timeout), or None when the set does not hold it: NFT_MSG_GETSETELEM of one element. Raises OSError."""
    elem = attr(NFTA_LIST_ELEM | NLA_F_NESTED, attr(NFTA_SET_ELEM_KEY | NLA_F_NESTED, attr(NFTA_DATA_VALUE, key)))
    body = (attr(NFTA_SET_ELEM_LIST_TABLE, TABLE.encode() + b"\0") + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
            + attr(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elem))
    sock.send(message(NFNL_SUBSYS_NFTABLES, NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK, seq, body, NFPROTO_INET))
    found: int | None = None
    try:
        for payload in answer(sock, seq):
            for _, listed in nested(nfgen_attrs(payload).get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                left = attrs(listed).get(NFTA_SET_ELEM_EXPIRATION)
                found = 0 if left is None else int.from_bytes(left[:8], "big")
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return found


@dataclass
class _Layout:
    """Our table's sets and chains as the kernel has them, without elements or rules (both cost O(N))."""

    exists: bool = False
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)

    def sets_of(self, chain: str) -> dict[SetKey, str]:
        found = {}
        for name, body in self.sets.items():
            key = _parse_set_name(chain, name)
            if key is not None and body.get("type") == _set_type(key[0], key[2]) and (
                    key[2] not in PORT_KINDS or (key[2] == RANGE) == ("interval" in body.get("flags", ()))):
                found[key] = name
        return found


@dataclass(slots=True)
class _Change:
    """What a batch does to one element: delete what the kernel holds first?, then add it (with timeout)?"""

    delete_first: bool
    add: bool
    timeout: int | None = None


class NftablesBackend:
    """The layout, for a chain f2b-web and an allow chain friends hooked at INPUT, both at priority -10:

        table inet web-ipt-d {
            set f2b-web-v4    { type ipv4_addr; size <maxelem>; flags timeout; }   # hosts (/32)
            set f2b-web-v6    { type ipv6_addr; size <maxelem>; flags timeout; }   # hosts (/128)
            set f2b-web-v4-24 { type ipv4_addr; size <maxelem>; flags timeout; }   # /24 networks, made when first used
            set f2b-web-v4-proto {                                # scope tcp: every port of a protocol
                type ipv4_addr . inet_proto; size <maxelem>; flags timeout;
                elements = { 198.51.100.7 . tcp timeout 10m }
            }
            set f2b-web-v4-port {                                 # scope tcp/22,80:81: one element a port
                type ipv4_addr . inet_proto . inet_service; size <maxelem>; flags timeout;
                elements = { 198.51.100.7 . tcp . 22 timeout 10m, 198.51.100.7 . tcp . 80 timeout 10m,
                             198.51.100.7 . tcp . 81 timeout 10m }
            }
            set f2b-web-v4-ports {                                # scope tcp/8000:9000: ranges wider than 64
                type ipv4_addr . inet_proto . inet_service; size <maxelem>; flags interval, timeout;
                elements = { 198.51.100.7 . tcp . 8000-9000 timeout 10m }
            }
            chain f2b-web {
                ip saddr & 255.255.255.0 == @f2b-web-v4-24 drop
                ip saddr @f2b-web-v4 drop
                ip saddr . meta l4proto @f2b-web-v4-proto drop
                ip saddr . meta l4proto . th dport @f2b-web-v4-port drop
                ip saddr . meta l4proto . th dport @f2b-web-v4-ports drop
                ip6 saddr @f2b-web-v6 drop
            }
            chain friends { ip saddr @friends-v4 accept; ip6 saddr @friends-v6 accept }   # an allow chain
            chain input.-10 {
                type filter hook input priority -10; policy accept;
                jump friends                                      # every allow chain first, in config order,
                jump f2b-web                                      # then every block chain, in config order
            }
        }

    Each (family, prefix length, kind of atom) has a set, made when first used: `-proto` sets hold whole
    protocols; an atom of ports is one element per port in the `-port` hash set, except each range wider than
    MAX_FLAT_RANGE, which is one element of the `-ports` interval set (a concatenation with ranges: the kernel's
    pipapo set type, whose every delete costs milliseconds at 10k elements, and which refuses overlapping elements;
    the worker keeps at most one atom per (chain, network, protocol), and prefix lengths keep separate sets, so
    ours never overlap). read() merges both into one Scope. `th dport` is the destination port of tcp, udp, sctp,
    dccp and udplite alike: all carry it at the same offset.

    Every rule has the chain's target, so a chain's entries all share it. With `match: destination` the rules
    look up `ip daddr` and `ip6 daddr`; with an `interface`, the jump is `iifname "eth0" jump f2b-web`
    (`oifname` at output).

    One base chain per (hook, priority), `<hook>.<priority>`, holds the jumps of every chain of ours there: an
    `accept` ends only the base chain it is in, and another base chain at the same hook would still see the
    packet, so an allow chain overrules the block chains only from the same base chain, ahead of their jumps
    (config._check_allow_chains keeps an allow chain's hook to one backend family and priority). prepare re-makes
    the base chains whole from every chain, and deletes any other base chain of the table, so a reload that
    changes a chain's hooks, priority, interface or target takes effect at once.
    """

    name = "nftables"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        try:
            import nftables  # type: ignore[import-untyped]  # Debian's python3-nftables, untyped
        except ImportError as exc:
            raise RuntimeError(f"the nftables backend cannot import nftables: {NFTABLES_MISSING}") from exc
        self._module: Any = nftables
        self._clock = clock
        self._nft: Any = None  # the libnftables context, made by the worker thread on first use
        self._sets: dict[str, set[SetKey]] = {}  # chain -> the sets it has in the kernel, as far as we know
        self._targets: dict[str, str] = {}  # chain -> the target its rules have, since our last prepare
        self._chains: list[Chain] = []  # every chain of ours, in config order, as the last prepare had them
        self._generation = RulesetGeneration()
        self._seen: int | None = None  # the ruleset generation our last transaction made; None: unknown
        # Since the kernel was last read (or found sealed), every commit has been ours, the last making _last_ours:
        # the kernel then holds what the worker thinks, and a stop may seal it (seal()).
        self._exclusive = False
        self._last_ours: int | None = None
        self._checked: int | None = None  # the generation missing() last found our table whole in
        # Whether an `add element` of an element the set holds gives it the add's timeout (Linux 6.10 and later; an
        # older kernel keeps the old one): found out by the first load that replaces (load()); None: not yet known.
        self.readd_sets_timeout: bool | None = None

    # -- libnftables --------------------------------------------------------------

    def _ctx(self) -> Any:
        if self._nft is None:
            try:
                nft = self._module.Nftables()
            except OSError as exc:  # libnftables.so.1 itself is missing
                raise RuntimeError(f"the nftables backend cannot load libnftables: {NFTABLES_MISSING}") from exc
            nft.set_json_output(True)
            self._nft = nft
        return self._nft

    def _run(self, cmds: list[dict[str, Any]]) -> Any:
        """One transaction: the kernel applies every command or none."""
        rc, out, err = self._ctx().json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftablesError(" ".join(line.strip() for line in err.splitlines() if line.strip()))
        return out

    def _list(self, what: dict[str, Any], terse: bool = False) -> list[dict[str, Any]]:
        """`nft -j list ...` as a list of objects; empty when the object does not exist."""
        ctx = self._ctx()
        ctx.set_terse_output(terse)
        try:
            out = self._run([{"list": what}])
        except NftablesError as exc:
            if ENOENT in str(exc):
                return []
            raise
        finally:
            ctx.set_terse_output(False)
        return list(out["nftables"]) if out else []

    def _layout(self) -> _Layout:
        layout = _Layout()
        # Listing sets (terse) and chains never reads a set's elements; listing our table or its rules would.
        ours = {"family": FAMILY, "table": TABLE}
        for item in self._list({"sets": {"family": FAMILY}}, terse=True):
            if ours.items() <= item.get("set", {}).items():
                layout.sets[item["set"]["name"]] = item["set"]
        for item in self._list({"chains": {"family": FAMILY}}):
            if ours.items() <= item.get("chain", {}).items():
                layout.chains[item["chain"]["name"]] = item["chain"]
        layout.exists = bool(layout.sets or layout.chains) or any(
            item.get("table", {}).get("name") == TABLE and item["table"].get("family") == FAMILY
            for item in self._list({"tables": {"family": FAMILY}}))
        return layout

    def _verdicts(self, chain: str) -> dict[str, str]:
        """set name -> DROP, REJECT or ACCEPT, from the rules of `chain` (reads every set's elements: O(N))."""
        found = {}
        for item in self._list({"chain": self._obj(name=chain)}):
            expr = item.get("rule", {}).get("expr", [])
            if len(expr) != 2 or "match" not in expr[0] or not isinstance(expr[1], dict):
                continue
            right = expr[0]["match"].get("right")
            target = next((t for verdict, t in VERDICT_TARGET.items() if verdict in expr[1]), None)
            if isinstance(right, str) and right.startswith("@") and target is not None:
                found[right[1:]] = target
        return found

    def _elements(self, name: str) -> list[Any]:
        """The values of a set's elements as libnftables-json(5) shows them, without their timeouts."""
        values = []
        for item in self._list({"set": self._obj(name=name)}):
            for elem in item.get("set", {}).get("elem", []):
                values.append(elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem)
        return values

    # -- commands -----------------------------------------------------------------

    @staticmethod
    def _obj(**spec: Any) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, **spec}

    def _add_set(self, chain: str, key: SetKey, size: int) -> dict[str, Any]:
        version, prefixlen, kind = key
        return {"add": {"set": self._obj(name=set_name(chain, *key), type=_set_type(version, kind),
                                         flags=_set_flags(kind), size=size)}}

    def _rule_cmds(self, chain: Chain, sets: Iterable[SetKey]) -> list[dict[str, Any]]:
        """Re-make `chain`'s rules, one per set, with its verdict. Atomic with the rest of the transaction, so no
        packet ever sees them half made."""
        cmds: list[dict[str, Any]] = [{"add": {"chain": self._obj(name=chain.name)}},
                                      {"flush": {"chain": self._obj(name=chain.name)}}]
        for version, prefixlen, kind in sorted(sets):
            match = {"match": {"op": "==", "left": _looked_up(version, prefixlen, chain.match, kind),
                               "right": "@" + set_name(chain.name, version, prefixlen, kind)}}
            cmds.append({"add": {"rule": self._obj(chain=chain.name, expr=[match, _verdict(chain.target, version)])}})
        return cmds

    def _base_cmds(self, chains: Iterable[Chain], layout: _Layout | None) -> list[dict[str, Any]]:
        """Re-make the base chains whole from every chain of ours (`chains`, in config order): per (hook,
        priority), the jumps of the allow chains first, then those of the block chains. With `layout`, also
        delete every other base chain of our table: one whose hook or priority no chain has any more, and the
        per-chain ones of earlier releases (`<chain>.input`), so that no jump is left twice."""
        ordered = sorted(chains, key=lambda c: c.target != "ACCEPT")  # stable: config order within each
        wanted: dict[str, tuple[str, int]] = {}
        for chain in ordered:
            for hook in chain.hooks:
                wanted.setdefault(base_chain_name(hook, chain.priority), (hook, chain.priority))
        cmds: list[dict[str, Any]] = []
        if layout is not None:
            for name, have in sorted(layout.chains.items()):
                if "hook" in have and (name not in wanted or (have.get("type"), have.get("hook"), have.get("prio"))
                                       != ("filter", HOOKS[wanted[name][0]], wanted[name][1])):
                    cmds.append({"delete": {"chain": self._obj(name=name)}})  # a base chain's hook cannot change
        # A jump needs its chain; `add` leaves one that exists as it is.
        cmds += [{"add": {"chain": self._obj(name=c.name)}} for c in ordered if c.hooks]
        for name, (hook, priority) in wanted.items():
            cmds += [{"add": {"chain": self._obj(name=name, type="filter", hook=HOOKS[hook], prio=priority,
                                                 policy="accept")}},
                     {"flush": {"chain": self._obj(name=name)}}]
            cmds += [{"add": {"rule": self._obj(chain=name, expr=_jump(chain, hook))}}
                     for chain in ordered if hook in chain.hooks and chain.priority == priority]
        return cmds

    def _ensure_cmds(self, touched: Iterable[ElementKey], chains: Mapping[str, Chain],
                     remake: bool) -> list[dict[str, Any]]:
        """Create the sets a batch needs; with `remake` (another program changed the ruleset since our last
        transaction), also re-make the touched chains' rules and the base chains, as the iptables backend
        re-checks its jumps: a hook deleted behind our back is back with the next change."""
        cmds: list[dict[str, Any]] = self._base_cmds(self._chains, None) if remake else []
        for name in sorted({c for c, _, _, _ in touched}):
            chain = chains.get(name)
            ours = chain is not None and chain.backend == self.name
            known = self._sets.get(name, set())
            new = sorted({(v, p, k) for c, v, p, k in touched if c == name} - known)
            cmds += [self._add_set(name, key, chain.maxelem if chain is not None and ours else DEFAULT_SIZE)
                     for key in new]
            if chain is not None and ours and (remake or new):
                cmds += self._rule_cmds(chain, known | set(new))
        return cmds

    def _run_tracked(self, cmds: list[dict[str, Any]], before: int | None) -> int | None:
        """Run one transaction; remember the generation it made when it was the only one since `before`. One the
        kernel refuses changes nothing (a transaction is applied whole or not at all), and what was known stays."""
        exclusive = self._exclusive and before is not None and before == self._last_ours
        seen = self._seen
        self._exclusive = False
        self._seen = None  # until this transaction is known to be the only one since `before`
        try:
            self._run(cmds)
        except NftablesError:
            self._exclusive, self._seen = exclusive, seen
            raise
        after = self._read_generation()
        if before is not None and after == (before + 1) & 0xFFFFFFFF:
            self._seen = self._last_ours = after
            self._exclusive = exclusive
        return after

    def _read_generation(self) -> int | None:
        try:
            return self._generation.read()
        except OSError as exc:
            logger.warning("cannot read the nftables ruleset generation (%s); re-making the chains every batch", exc)
            return None

    def _element_cmds(self, changes: Mapping[ElementKey, Mapping[Element, _Change]],
                      exact: bool) -> list[dict[str, Any]]:
        """The element commands of a batch, per set.

        exact: trust each change's delete_first, which the worker knows. Otherwise make the final state
        whatever the kernel holds: add every touched element, delete them all, add back those that
        stay. Deleting an element the kernel no longer has (it expired there a moment ago) fails the
        whole transaction, nft 1.0.6 has no `destroy`, and an `add` of an element that exists keeps
        its old timeout on kernels before 6.10. Port ranges of one address and protocol may overlap across
        the atoms of a batch (Remove(tcp/100:300), Add(tcp/200:400)), and the `-ports` set of ranges refuses to
        hold two overlapping elements even for a moment; so for it only the elements the worker thinks the kernel
        holds (its atom before the batch: disjoint ranges) are added and deleted first.
        """
        cmds: list[dict[str, Any]] = []
        for (chain, version, prefixlen, kind), elements in changes.items():
            obj = self._obj(name=set_name(chain, version, prefixlen, kind))
            delete = [_element_value(a) for a, c in elements.items() if c.delete_first or (not exact and kind != RANGE)]
            stay = [_element_value(a) if c.timeout is None else {"elem": {"val": _element_value(a),
                                                                          "timeout": c.timeout}}
                    for a, c in elements.items() if c.add]
            if not exact and delete:
                cmds.append({"add": {"element": {**obj, "elem": delete}}})
            if delete:
                cmds.append({"delete": {"element": {**obj, "elem": delete}}})
            if stay:
                cmds.append({"add": {"element": {**obj, "elem": stay}}})
        return cmds

    # -- the Backend interface ----------------------------------------------------

    def expires_in_kernel(self, chain: str) -> bool:
        return True

    def shares_target(self, chain: str) -> bool:
        return True

    def prepare(self, chains: Iterable[Chain], retired: Iterable[str] = ()) -> None:
        # `retired` needs nothing more: the base chains are re-made from the configured chains alone.
        chains = list(chains)
        if not chains:
            if self._chains:  # the last of our chains left the config: unhook them all
                unhook = self._base_cmds([], self._layout())
                if unhook:
                    self._exclusive = False
                    self._run(unhook)
                    self._seen = None
                self._chains = []
            return
        before = self._read_generation()
        layout = self._layout()
        cmds: list[dict[str, Any]] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
        known: dict[str, set[SetKey]] = {}
        for chain in chains:
            sets = set(layout.sets_of(chain.name)) | {(4, 32, ALL), (6, 128, ALL)}
            # `add` of an existing set keeps its elements; the kernel updates its size where it can.
            cmds += [self._add_set(chain.name, key, chain.maxelem) for key in sorted(sets)]
            cmds += self._rule_cmds(chain, sets)
            known[chain.name] = sets
        # ByChain gives each backend all of its chains, so these are every chain the base chains jump to.
        cmds += self._base_cmds(chains, layout)
        if SEAL_SET in layout.sets:  # the last seal, read already (the worker asks before prepare)
            cmds.append({"delete": {"set": self._obj(name=SEAL_SET)}})
        self._run_tracked(cmds, before)  # what it made is ours: a later seal() may count on it
        self._chains = chains
        self._sets.update(known)
        self._targets.update((c.name, c.target) for c in chains)
        if not layout.exists:
            logger.info("created table %s %s for chains %s", FAMILY, TABLE, ", ".join(c.name for c in chains))
        after = self._layout()
        for chain in chains:
            for name in after.sets_of(chain.name).values():
                if after.sets[name].get("size") != chain.maxelem:
                    logger.warning("set %s holds at most %s elements, not maxelem %d: this kernel cannot resize a "
                                   "set; `nft delete table %s %s` and a restart rebuild it", name,
                                   after.sets[name].get("size"), chain.maxelem, FAMILY, TABLE)

    def read(self, chains: Iterable[str]) -> Iterator[tuple[Key, str]]:
        """Every atom of `chains`, one set at a time, read through netlink (set_elements); the port elements of
        one (chain, network, protocol) come back as one Scope, so a chain's port sets are grouped first. The
        layout is read, and the socket opened, before this returns: in the caller's network namespace."""
        generation = self._read_generation()  # before the dump: a commit after it ends _exclusive (see seal)
        self._exclusive, self._last_ours = generation is not None, generation
        layout = self._layout()
        sock = open_socket()
        sock.settimeout(DUMP_TIMEOUT)
        return self._atoms(list(chains), layout, sock)

    def _atoms(self, chains: list[str], layout: _Layout, sock: socket.socket) -> Iterator[tuple[Key, str]]:
        with sock:
            yield from self._atoms_from(chains, layout, sock)

    def _atoms_from(self, chains: list[str], layout: _Layout, sock: socket.socket) -> Iterator[tuple[Key, str]]:
        seq = 0
        for chain in chains:
            sets = layout.sets_of(chain)
            if not sets:
                continue
            self._sets[chain] = self._sets.get(chain, set()) | set(sets)
            # prepare() made every set's rule with the chain's target; a chain it did not see
            # (one that has left the config) keeps the rules it had.
            verdicts = ({n: self._targets[chain] for n in sets.values()} if chain in self._targets
                        else self._verdicts(chain))
            ports: dict[tuple[Network, str], tuple[str, list[tuple[int, int]]]] = {}  # -> (target, ranges)
            for (version, prefixlen, kind), name in sorted(sets.items()):
                target = verdicts.get(name)
                if target is None:
                    logger.warning("no rule of chain %s matches set %s; its elements block nothing", chain, name)
                    continue
                width = 4 if version == 4 else 16
                seq += 1
                for key, end in set_elements(sock, seq, name):
                    try:
                        network = network_of(version, int.from_bytes(key[:width], "big"), prefixlen)  # no host bits
                        if kind == ALL:
                            if len(key) != width:
                                raise ValueError("not an address")
                            yield (chain, network, None), target
                            continue
                        proto = PROTOCOL_NAMES.get(key[width])
                        if proto is None or len(key) != width + (8 if kind in PORT_KINDS else 4):
                            raise ValueError("no protocol (and port) of ours")
                        if kind == PROTO:
                            yield (chain, network, Scope(proto)), target
                            continue
                        lo = int.from_bytes(key[width + 4:width + 6], "big")
                        hi = lo if end is None else int.from_bytes(end[width + 4:width + 6], "big")
                    except (ValueError, IndexError) as exc:
                        logger.warning("set %s holds %s, which is no /%d network%s (%s); leaving it alone", name,
                                       key.hex(), prefixlen, "" if kind == ALL else " with a protocol of ours", exc)
                        continue
                    ports.setdefault((network, proto), (target, []))[1].append((lo, hi))
            for (network, proto), (target, ranges) in ports.items():
                yield (chain, network, Scope.of(proto, ranges)), target

    def missing(self, chains: Iterable[Chain], counts: Mapping[str, int]) -> str | None:
        """Nothing to look at while the ruleset generation is ours. When another program committed (say
        `nft -f /etc/nftables.conf`, which starts with `flush ruleset`), a missing set or chain is reported;
        otherwise the rules and the base chains are made again at once, in case a chain of ours was flushed.
        An atom of ports is one element or more of the `-port` and `-ports` sets, each a set of self._sets."""
        every = list(chains)
        hooked = self._chains or every
        chains = [c for c in every if counts.get(c.name)]
        before = self._read_generation()
        if not hooked or (before is not None and before in (self._seen, self._checked)):
            return None
        layout = self._layout()
        if not chains and not layout.exists:
            return None  # nothing lost, and nothing to put in order; the next prepare makes the table again
        for chain in chains:
            wanted = [set_name(chain.name, *key) for key in sorted(self._sets.get(chain.name, ()))]
            wanted_chains = [chain.name] + [base_chain_name(hook, chain.priority) for hook in chain.hooks]
            gone = [n for n in wanted if n not in layout.sets] + [n for n in wanted_chains if n not in layout.chains]
            if gone:
                return f"{', '.join(gone)} gone from table {FAMILY} {TABLE}"
        cmds: list[dict[str, Any]] = []
        for chain in chains:
            cmds += self._rule_cmds(chain, self._sets.get(chain.name, set()))
        # Even with no entries anywhere: the order of the jumps is what lets an allow chain overrule the others.
        cmds += self._base_cmds(hooked, layout)
        self._checked = self._run_tracked(cmds, before)
        return None

    def apply(self, ops: Iterable[Op], chains: Mapping[str, Chain]) -> None:
        now = self._clock()
        changes: dict[ElementKey, dict[Element, _Change]] = {}
        for op in ops:
            net = op.network
            for kind, element in _elements_of(_address(net), op.scope):
                elements = changes.setdefault((op.chain, net.version, net.prefixlen, kind), {})
                # The first op on an element tells whether the kernel holds it; the last, what it ends as.
                first = elements.get(element)
                delete_first = first.delete_first if first is not None else (
                    not isinstance(op, Add) or op.replaces)
                if isinstance(op, Add):
                    elements[element] = _Change(delete_first, True, _timeout(op.expires_at, now))
                else:
                    elements[element] = _Change(delete_first, False)
        self._commit(changes, chains)

    def load(self, chain: str, target: str, expires_at: float | None, scope: Scope | None, items: Items,
             chains: Mapping[str, Chain], replaces: bool = False) -> None:
        """Whole networks as one transaction's `add element`s, the elements made from the items' text (the address
        before the slash: inet_ntop's form, or ipaddress' for the few it leaves to str(), which nft reads as well)
        with no Op, dict lookup or _Change an item; anything else as apply() of their Adds. `replaces` (a new
        expiry for elements the set holds): an add, where the kernel gives an element that it holds the timeout of
        an add of it (Linux 6.10 and later: found out once, by reading an element back before and after); elsewhere
        each element is deleted and added again in its transaction, as apply() does with a new expiry."""
        if scope is not None:
            self.apply(adds(chain, target, expires_at, scope, items, replaces), chains)
            return
        timeout = _timeout(expires_at, self._clock())
        # A new timeout for held elements: an add alone where the kernel takes it from an add, which it then does
        # with half the commands (a timed feed posted again); a delete and an add elsewhere.
        add_only = replaces and timeout is not None and self.readd_sets_timeout is not False
        if add_only and self.readd_sets_timeout is None and not self._can_tell(chain, items[0], timeout):
            add_only = False
        added = _Change(replaces and not add_only, True, timeout)
        done: list[tuple[str, bytes, int]] = []
        for start in range(0, len(items), LOAD_CHUNK):
            part = items[start:start + LOAD_CHUNK]
            by_set: dict[tuple[int, int], list[str]] = {}
            for text, packed, length in part:
                by_set.setdefault((len(packed), length), []).append(text[:text.index("/")])
            try:
                self._commit({(chain, 4 if size == 4 else 6, length, ALL): dict.fromkeys(addresses, added)
                              for (size, length), addresses in by_set.items()}, chains)
                if add_only and self.readd_sets_timeout is None:
                    left = self._expiration(chain, part[0])
                    self.readd_sets_timeout = None if left is None else abs(left - 1000 * (timeout or 0)) < 2_000
                if add_only and not self.readd_sets_timeout:  # this part again, with deletes; the rest too
                    add_only, added = False, _Change(True, True, timeout)
                    self._commit({(chain, 4 if size == 4 else 6, length, ALL): dict.fromkeys(addresses, added)
                                  for (size, length), addresses in by_set.items()}, chains)
            except Exception:
                if done and not replaces:  # take back the transactions before; the worker's reconcile settles what
                    # this leaves (held blocks given a new expiry stay: the worker's restore puts the old back)
                    try:
                        self.apply([Remove(chain, unpacked(packed, length), target) for _, packed, length in done],
                                   chains)
                    except Exception:
                        logger.exception("could not take back the part of a load that went in")
                raise
            done += part

    def _can_tell(self, chain: str, item: tuple[str, bytes, int], timeout: int | None) -> bool:
        """Whether the element of `item` can show if an add gives it `timeout` (s): it is there, and its time left
        is not near that."""
        left = self._expiration(chain, item)
        return left is not None and abs(left - 1000 * (timeout or 0)) >= 10_000

    def _expiration(self, chain: str, item: tuple[str, bytes, int]) -> int | None:
        """element_expiration() of the element of a load's `item` in `chain`'s set; None also when it cannot be read
        (logged)."""
        _, packed, length = item
        name = set_name(chain, 4 if len(packed) == 4 else 6, length, ALL)
        try:
            with open_socket() as sock:
                sock.settimeout(GENERATION_TIMEOUT)
                return element_expiration(sock, 1, name, packed)
        except OSError:
            logger.exception("could not read an element of set %s back", name)
            return None

    def _commit(self, changes: Mapping[ElementKey, Mapping[Element, _Change]], chains: Mapping[str, Chain]) -> None:
        if not changes:
            return
        before = self._read_generation()
        ensure = self._ensure_cmds(changes, chains, remake=before is None or before != self._seen)
        try:
            self._run_tracked(ensure + self._element_cmds(changes, exact=True), before)
        except NftablesError as exc:
            if ENFILE in str(exc):
                raise CapacityExceeded(self._full_message(changes, chains)) from exc
            if ENOENT not in str(exc):
                raise
            # An element the worker thought in the kernel is not there (it expired there, or someone
            # deleted it): do the batch again without relying on what the kernel holds.
            self._apply_whatever_the_kernel_holds(ensure, changes, chains)
        for chain, version, prefixlen, kind in changes:
            self._sets.setdefault(chain, set()).add((version, prefixlen, kind))

    def _apply_whatever_the_kernel_holds(self, ensure: list[dict[str, Any]],
                                         changes: Mapping[ElementKey, Mapping[Element, _Change]],
                                         chains: Mapping[str, Chain]) -> None:
        # The kernel lacked an element the worker thought there. Without a commit by another program (the ruleset
        # generation tells), that is one the kernel let go at its timeout a moment before the worker's own expiry of
        # it: the kernel still holds what the worker thinks, and each transaction here stays tracked (the seal).
        try:
            self._run_tracked(ensure + self._element_cmds(changes, exact=False), self._read_generation())
            return
        except NftablesError as exc:
            if ENFILE not in str(exc):
                raise
            removes = {k: [a for a, c in e.items() if not c.add] for k, e in changes.items()}
            if not any(removes.values()):
                raise CapacityExceeded(self._full_message(changes, chains)) from exc
        # Removing an element the kernel no longer has adds it for a moment, which a full set refuses.
        # So remove one at a time, where "not there" is as good as removed, then do the rest. If the
        # rest fails, the worker's reconcile after a failed batch puts the removed entries back.
        for (chain, version, prefixlen, kind), elements in removes.items():
            for element in elements:
                try:
                    self._run_tracked([{"delete": {"element": self._obj(name=set_name(chain, version, prefixlen, kind),
                                                                        elem=[_element_value(element)])}}],
                                      self._read_generation())
                except NftablesError as missing:
                    if ENOENT not in str(missing):
                        raise
        rest = {k: {a: c for a, c in e.items() if c.add} for k, e in changes.items()}
        try:
            self._run_tracked(ensure + self._element_cmds({k: e for k, e in rest.items() if e}, exact=False),
                              self._read_generation())
        except NftablesError as exc:
            if ENFILE in str(exc):
                raise CapacityExceeded(self._full_message(changes, chains)) from exc
            raise

    @staticmethod
    def _full_message(changes: Mapping[ElementKey, Any], chains: Mapping[str, Chain]) -> str:
        names = sorted({c for c, _, _, _ in changes})
        sizes = ", ".join(f"{n} (maxelem {chains[n].maxelem if n in chains else DEFAULT_SIZE})" for n in names)
        return f"a set of chain {sizes} is full"

    def seal(self) -> str | None:
        """A fresh random number in our table's `seal` set, and the ruleset generation that transaction made: both
        unchanged at the next start mean that nobody committed to nftables since, so the sets hold what they held
        now. Only when every commit since the kernel was last read was ours (the worker knows what it did, not
        what another program did: a `nft flush set` while we ran, say). With the boot and the network namespace:
        a generation counts again from 0 in a new one."""
        if not self._chains:
            return None
        before = self._read_generation()
        if not self._exclusive or before is None or before != self._last_ours:
            return None  # another program committed since the kernel was read: what it did is not known here
        nonce = secrets.randbelow(1 << 31) + 1
        seal = self._obj(name=SEAL_SET)
        try:
            self._run_tracked([{"add": {"set": {**seal, "type": "mark"}}}, {"flush": {"set": seal}},
                               {"add": {"element": {**seal, "elem": [nonce]}}}], before)
        except NftablesError as exc:
            logger.warning("could not seal the nftables sets for the next start (%s); it reads them back", exc)
            return None
        context = _kernel_context()
        if not self._exclusive or self._last_ours is None or context is None:
            return None
        return f"{context}:{self._last_ours}:{nonce}"

    def sealed(self, token: str) -> bool:
        parts = token.rsplit(":", 2)
        if len(parts) != 3 or parts[0] != _kernel_context() or not parts[1].isdigit() or not parts[2].isdigit():
            return False
        generation = self._read_generation()
        if generation != int(parts[1]):
            return False
        try:
            if self._elements(SEAL_SET) != [int(parts[2])]:
                return False
        except NftablesError:
            return False
        self._exclusive, self._last_ours = True, generation
        return True

    def close(self) -> None:
        self._nft = None  # the binding frees its context when the object goes
        self._generation.close()
