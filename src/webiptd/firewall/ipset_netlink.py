"""A small ipset client over one NETLINK_NETFILTER socket: add and del of hash:net and hash:net,port entries, many
to a send.

The constants are from the kernel's include/uapi/linux/netfilter/ipset/ip_set.h, each checked against a 6.x kernel.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
import struct
from itertools import count
from typing import NamedTuple, Sequence

from webiptd.firewall.netlink import (
    BE32, NETLINK_CAP_ACK, NFGENMSG, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST, NLMSG_ERROR, NLMSGHDR, SOL_NETLINK, NetlinkError, answer, attr, attrs, error_code,
    message, nfgen_attrs, open_socket, replies,
)
from webiptd.net import Network

NFNL_SUBSYS_IPSET = 6

IPSET_PROTOCOL = 7  # what this client speaks; the kernel's is asked once (IPSET_CMD_PROTOCOL)
IPSET_PROTOCOL_MIN = 6  # every kernel since 2.6.39 accepts this one, so it is what the question is asked in
IPSET_CMD_PROTOCOL, IPSET_CMD_DESTROY, IPSET_CMD_SWAP, IPSET_CMD_LIST = 1, 3, 6, 7
IPSET_CMD_ADD, IPSET_CMD_DEL, IPSET_CMD_TEST = 9, 10, 11
# Command-level attributes
IPSET_ATTR_PROTOCOL, IPSET_ATTR_SETNAME, IPSET_ATTR_TYPENAME, IPSET_ATTR_FAMILY = 1, 2, 3, 5
IPSET_ATTR_SETNAME2 = IPSET_ATTR_TYPENAME  # at swap
IPSET_ATTR_FLAGS, IPSET_ATTR_DATA, IPSET_ATTR_ADT, IPSET_ATTR_LINENO = 6, 7, 8, 9  # LINENO: in DATA too
# Attributes inside IPSET_ATTR_DATA
IPSET_ATTR_IP, IPSET_ATTR_CIDR, IPSET_ATTR_TIMEOUT = 1, 3, 6
# hash:net,port: the port (or the first of a range) and the last of a range, each a big-endian u16 the kernel wants
# flagged NLA_F_NET_BYTEORDER; the protocol, a u8. A range add or del is one element per port in the kernel.
IPSET_ATTR_PORT, IPSET_ATTR_PORT_TO, IPSET_ATTR_PROTO = 4, 5, 7
IPSET_ATTR_MAXELEM, IPSET_ATTR_ELEMENTS = 19, 24
IPSET_ATTR_IPADDR_IPV4, IPSET_ATTR_IPADDR_IPV6 = 1, 2
IPSET_FLAG_LIST_HEADER = 1 << 2  # list a set's header without its members

IPSET_ERR_EXIST = 4103  # an exclusive add of a present entry, or an exclusive del of an absent one
IPSET_ERR_HASH_FULL = 4352  # IPSET_ERR_TYPE_SPECIFIC, the first hash-type error (ip_set_hash.h)
ERROR_NAMES = {
    4097: "IPSET_ERR_PROTOCOL", 4098: "IPSET_ERR_FIND_TYPE", 4099: "IPSET_ERR_MAX_SETS",
    4100: "IPSET_ERR_BUSY", 4101: "IPSET_ERR_EXIST_SETNAME2", 4102: "IPSET_ERR_TYPE_MISMATCH",
    IPSET_ERR_EXIST: "IPSET_ERR_EXIST", 4104: "IPSET_ERR_INVALID_CIDR", 4105: "IPSET_ERR_INVALID_NETMASK",
    4106: "IPSET_ERR_INVALID_FAMILY", 4107: "IPSET_ERR_TIMEOUT", 4108: "IPSET_ERR_REFERENCED",
    4109: "IPSET_ERR_IPADDR_IPV4", 4110: "IPSET_ERR_IPADDR_IPV6", IPSET_ERR_HASH_FULL: "IPSET_ERR_HASH_FULL",
    4353: "IPSET_ERR_HASH_ELEM",
}

# Many elements go in one message: the kernel's batch form (IPSET_ATTR_ADT, a list of IPSET_ATTR_DATA, as
# `ipset restore` sends), one ack a message. A message the kernel stops part way, at an element it refuses, answers
# with that element's IPSET_ATTR_LINENO (ip_set_core.c, call_ad()); the rest is sent again in a new message, so each
# element gets its own code, in order. SEND_MAX elements of at most 72 bytes (IPv6 with ports) stay well under the
# socket's send buffer (208 KiB by default), and the error reply, which echoes the whole message, fits the receive
# buffer.
SEND_MAX = 1024
RCVBUF = 1 << 20
RECV_SIZE = 1 << 18  # larger than any reply: a whole echoed message and its headers
TIMEOUT = 10.0  # the kernel acks at once; a missing ack means the socket's state is unknown

BE16 = struct.Struct(">H")
_NLA = struct.Struct("=HH")
_ERROR_SIZE = 4
_LINENO = struct.Struct("=HHI")  # IPSET_ATTR_LINENO is a host-order u32 (NLA_U32)
_LINENO_VALUE = struct.Struct("=I")
# IPSET_ATTR_IP (nested) holding the address, then IPSET_ATTR_CIDR: one struct each for IPv4 and IPv6.
_ADDRESS = {4: struct.Struct("=HHHH4sHHB3x"), 16: struct.Struct("=HHHH16sHHB3x")}
_ADDRESS_HEADERS = {4: (12, IPSET_ATTR_IP | NLA_F_NESTED, 8, IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER),
                    16: (24, IPSET_ATTR_IP | NLA_F_NESTED, 20, IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER)}
_CIDR = struct.Struct("=HHB3x")  # IPSET_ATTR_CIDR, as the end of _ADDRESS packs it
_LINENOS = [_LINENO_VALUE.pack(i) for i in range(SEND_MAX + 1)]  # the values of IPSET_ATTR_LINENO in a message
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ADDR_ATTR = {4: IPSET_ATTR_IPADDR_IPV4, 6: IPSET_ATTR_IPADDR_IPV6}


def error_name(code: int) -> str:
    """`IPSET_ERR_EXIST (4103)`, or `ENOENT (No such file or directory)` for a plain errno."""
    if code in ERROR_NAMES:
        return f"{ERROR_NAMES[code]} ({code})"
    if code >= 4096:
        return f"ipset error {code}"
    return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"


class IpsetError(Exception):
    """The kernel refused an ipset request; `code` is its errno or IPSET_ERR_* number."""

    def __init__(self, what: str, code: int):
        super().__init__(f"{what}: {error_name(code)}")
        self.code = code


@dataclass(frozen=True)
class Header:
    type: str
    family: int  # AF_INET or AF_INET6
    maxelem: int
    elements: int
    timeouts: bool  # created with timeout support


class Element(NamedTuple):
    """One add or del of a set element: `timeout` None sends none (a del); 0 is permanent in a timeout set.

    A hash:net,port element has a protocol number and a port range (lo, hi): the kernel adds or deletes each port
    of it as its own element, so such a message should not be exclusive (the kernel stops at the first port that
    is there, or is not, having done the ones before).
    """

    cmd: int  # IPSET_CMD_ADD or IPSET_CMD_DEL
    set: str
    network: Network
    exclusive: bool  # NLM_F_EXCL: report IPSET_ERR_EXIST rather than replace (add) or ignore (del)
    timeout: int | None = None
    proto: int | None = None  # hash:net,port only, with `ports`
    ports: tuple[int, int] | None = None


def packed_elements(items: Sequence[tuple[str, bytes, int]], timeout: int | None) -> bytes:
    """The IPSET_ATTR_DATA of each of `items` (of one family; at most SEND_MAX), numbered from 1, as
    IpsetNetlink._element_data makes them. Every one is as long, and only three parts differ: the address, the
    prefix length, the line number; so each is put together from bytes made once (a fifth of the time)."""
    size = len(items[0][1])
    address, headers = _ADDRESS[size], _ADDRESS_HEADERS[size]
    extra = b"" if timeout is None else _NLA.pack(8, IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER) + BE32.pack(timeout)
    head = _NLA.pack(4 + address.size + len(extra) + _LINENO.size, IPSET_ATTR_DATA | NLA_F_NESTED) \
        + _NLA.pack(*headers[:2]) + _NLA.pack(*headers[2:])
    after = [_CIDR.pack(5, IPSET_ATTR_CIDR, length) + extra + _NLA.pack(8, IPSET_ATTR_LINENO)
             for length in range(size * 8 + 1)]
    return b"".join([head + packed + after[length] + _LINENOS[i] for i, (_, packed, length) in enumerate(items, 1)])


class IpsetNetlink:
    """One netlink socket to the kernel's ipset, opened on first use and kept.

    Not thread-safe: the backend's worker thread is its only user.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = count(1)
        self._protocol = b""  # the IPSET_ATTR_PROTOCOL attribute, once agreed
        self._set_attrs: dict[str, bytes] = {}  # set name -> its protocol and name attributes

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _open(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = open_socket()
        try:
            sock.settimeout(TIMEOUT)
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass  # a kernel without it echoes the whole request in an error ack: larger, still fits
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self._sock = sock
            self._protocol = attr(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL_MIN]))
            answer = self._request(IPSET_CMD_PROTOCOL, b"", "ask the kernel's ipset protocol")
            found = nfgen_attrs(answer[0]) if answer else {}
            kernel = found.get(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL_MIN]))[0]
        except BaseException:
            sock.close()
            self._sock = None
            raise
        self._protocol = attr(IPSET_ATTR_PROTOCOL, bytes([min(kernel, IPSET_PROTOCOL)]))
        self._set_attrs.clear()
        return sock

    def _prefix(self, name: str) -> bytes:
        prefix = self._set_attrs.get(name)
        if prefix is None:
            prefix = self._set_attrs[name] = self._protocol + attr(IPSET_ATTR_SETNAME, name.encode() + b"\0")
        return prefix

    def _element_data(self, element: Element, lineno: int) -> bytes:
        """The element's IPSET_ATTR_DATA, numbered `lineno` (from 1) for the kernel to name it if it refuses it."""
        network = element.network
        address = network.network_address.packed
        data = _ADDRESS[len(address)].pack(*_ADDRESS_HEADERS[len(address)], address, 5, IPSET_ATTR_CIDR,
                                           network.prefixlen)
        if element.ports is not None and element.proto is not None:
            lo, hi = element.ports
            data += attr(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, BE16.pack(lo)) + attr(IPSET_ATTR_PROTO,
                                                                                        bytes([element.proto]))
            if hi != lo:
                data += attr(IPSET_ATTR_PORT_TO | NLA_F_NET_BYTEORDER, BE16.pack(hi))
        if element.timeout is not None:
            data += _NLA.pack(8, IPSET_ATTR_TIMEOUT | NLA_F_NET_BYTEORDER) + BE32.pack(element.timeout)
        data += _LINENO.pack(8, IPSET_ATTR_LINENO, lineno)
        return _NLA.pack(len(data) + 4, IPSET_ATTR_DATA | NLA_F_NESTED) + data

    def _element_message(self, element: Element, seq: int) -> bytes:
        """One element alone in a message (IPSET_ATTR_DATA)."""
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_EXCL if element.exclusive else 0)
        return message(NFNL_SUBSYS_IPSET, element.cmd, flags, seq,
                       self._prefix(element.set) + self._element_data(element, 1), _FAMILY[element.network.version])

    def _batch_message(self, elements: Sequence[Element], seq: int) -> bytes:
        """Elements of one set, command and exclusiveness in one message (IPSET_ATTR_ADT)."""
        first = elements[0]
        adt = b"".join([self._element_data(e, i) for i, e in enumerate(elements, 1)])
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_EXCL if first.exclusive else 0)
        return message(NFNL_SUBSYS_IPSET, first.cmd, flags, seq,
                       self._prefix(first.set) + _LINENO.pack(8, IPSET_ATTR_LINENO, 0)
                       + _NLA.pack(len(adt) + 4, IPSET_ATTR_ADT | NLA_F_NESTED) + adt,
                       _FAMILY[first.network.version])

    def apply(self, elements: Sequence[Element]) -> list[int]:
        """Apply the elements in order; return each one's error code (0: done).

        Consecutive elements of one set, command and exclusiveness go in one message, SEND_MAX at most. The kernel
        stops a message at the first element it refuses and names it; that one gets the code, and the rest go
        again, so each code says what happened to its element, as if each had been a message of its own.
        """
        sock = self._open()
        codes: list[int] = []
        start = 0
        while start < len(elements):
            first = elements[start]
            group = (first.cmd, first.set, first.exclusive, first.network.version)
            end = start + 1
            limit = min(len(elements), start + SEND_MAX)
            while end < limit:
                e = elements[end]
                if (e.cmd, e.set, e.exclusive, e.network.version) != group:
                    break
                end += 1
            chunk = elements[start:end]
            seq = next(self._seq) & 0xFFFFFFFF
            try:
                sock.send(self._batch_message(chunk, seq))
                code, failed = self._batch_ack(sock, seq)
            except BaseException:
                self.close()  # an ack may be left unread or lost: start the next request on a clean socket
                raise
            if code == 0:
                codes += [0] * len(chunk)
                start = end
            elif failed is None:  # refused as a whole (no such set, say): nothing of it was done
                codes += [code] * len(chunk)
                start = end
            else:
                codes += [0] * (failed - 1) + [code]
                start += failed
        return codes

    def add_packed(self, name: str, items: Sequence[tuple[str, bytes, int]], timeout: int | None) -> list[int]:
        """Add many networks of one family to set `name`, as apply() does with non-exclusive ADD elements (one that
        is there takes the new timeout), each given as (text, packed address, prefix length): apply()'s codes,
        without an Element an item. A load's millions pass here."""
        if not items:
            return []
        sock = self._open()
        size = len(items[0][1])
        prefix = self._prefix(name) + _LINENO.pack(8, IPSET_ATTR_LINENO, 0)
        codes: list[int] = []
        start = 0
        while start < len(items):
            chunk = items[start:start + SEND_MAX]
            adt = packed_elements(chunk, timeout)
            seq = next(self._seq) & 0xFFFFFFFF
            try:
                sock.send(message(NFNL_SUBSYS_IPSET, IPSET_CMD_ADD, NLM_F_REQUEST | NLM_F_ACK, seq,
                                  prefix + _NLA.pack(len(adt) + 4, IPSET_ATTR_ADT | NLA_F_NESTED) + adt,
                                  _FAMILY[4 if size == 4 else 6]))
                code, failed = self._batch_ack(sock, seq)
            except BaseException:
                self.close()  # as apply()
                raise
            if code == 0:
                codes += [0] * len(chunk)
                start += len(chunk)
            elif failed is None:
                codes += [code] * len(chunk)
                start += len(chunk)
            else:
                codes += [0] * (failed - 1) + [code]
                start += failed
        return codes

    def test(self, elements: Sequence[Element]) -> list[bool]:
        """Whether each element is in its set (`ipset test`). The kernel tests one element a message (the
        IPSET_ATTR_DATA form: IPSET_ATTR_ADT is for add and del only), so each goes alone. The daemon never asks;
        bench/fleet.py's watcher does."""
        sock = self._open()
        found: list[bool] = []
        for element in elements:
            seq = next(self._seq) & 0xFFFFFFFF
            try:
                sock.send(self._element_message(element._replace(cmd=IPSET_CMD_TEST, exclusive=False), seq))
                code, _ = self._batch_ack(sock, seq)
            except BaseException:
                self.close()
                raise
            if code not in (0, IPSET_ERR_EXIST):
                raise IpsetError(f"ipset test {element.set} {element.network}", code)
            found.append(code == 0)
        return found

    def _batch_ack(self, sock: socket.socket, seq: int) -> tuple[int, int | None]:
        """The answer to one message: (0, None), or (its error code, the number of the element refused, if it says);
        anything else (left from an earlier, failed request) is skipped."""
        while True:
            for kind, reply_seq, payload in replies(sock.recv(RECV_SIZE)):
                if kind != NLMSG_ERROR or reply_seq != seq:
                    continue
                code = error_code(payload)
                if code == 0:
                    return 0, None
                # The echoed request follows the error code: its header, nfgenmsg, then its attributes.
                echoed = attrs(payload[_ERROR_SIZE + NLMSGHDR.size + NFGENMSG.size:])
                lineno = echoed.get(IPSET_ATTR_LINENO)
                if lineno is None or len(lineno) < 4:
                    return code, None
                failed = _LINENO_VALUE.unpack_from(lineno)[0]
                return code, failed if failed > 0 else None

    def _request(self, cmd: int, body: bytes, what: str, dump: bool = False) -> list[bytes]:
        """One request; the payloads of its replies, up to its ack (a dump: NLMSG_DONE). Raises on an error."""
        sock = self._open()
        seq = next(self._seq) & 0xFFFFFFFF
        # A dump ends with NLMSG_DONE; whether an ack follows it depends on the kernel, so none is asked for.
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        try:
            sock.send(message(NFNL_SUBSYS_IPSET, cmd, flags, seq, self._protocol + body))
            return list(answer(sock, seq))
        except NetlinkError as exc:
            raise IpsetError(what, exc.errno or 0) from None
        except BaseException:
            self.close()
            raise

    def header(self, name: str) -> Header | None:
        """The set's type, family, maxelem, element count and timeout support; None when there is no such set."""
        body = (attr(IPSET_ATTR_SETNAME, name.encode() + b"\0")
                + attr(IPSET_ATTR_FLAGS | NLA_F_NET_BYTEORDER, BE32.pack(IPSET_FLAG_LIST_HEADER)))
        try:
            answer = self._request(IPSET_CMD_LIST, body, f"ipset list -t {name}", dump=True)
        except IpsetError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise
        if not answer:
            return None
        found = nfgen_attrs(answer[0])
        data = attrs(found.get(IPSET_ATTR_DATA, b""))
        return Header(found[IPSET_ATTR_TYPENAME].rstrip(b"\0").decode(), found[IPSET_ATTR_FAMILY][0],
                      BE32.unpack(data[IPSET_ATTR_MAXELEM])[0], BE32.unpack(data[IPSET_ATTR_ELEMENTS])[0],
                      IPSET_ATTR_TIMEOUT in data)

    def swap(self, first: str, second: str) -> None:
        self._request(IPSET_CMD_SWAP, attr(IPSET_ATTR_SETNAME, first.encode() + b"\0")
                      + attr(IPSET_ATTR_SETNAME2, second.encode() + b"\0"), f"ipset swap {first} {second}")

    def destroy(self, name: str) -> None:
        """Destroy the set if there is one (newer kernels say nothing of a missing one, older ones ENOENT)."""
        try:
            self._request(IPSET_CMD_DESTROY, attr(IPSET_ATTR_SETNAME, name.encode() + b"\0"),
                          f"ipset destroy {name}")
        except IpsetError as exc:
            if exc.code != errno.ENOENT:
                raise
