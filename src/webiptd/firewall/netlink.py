"""Netlink framing for the kernel's netfilter subsystems (ipset, nf_tables), packed by hand with `struct`.

From the kernel's include/uapi/linux/netlink.h and linux/netfilter/nfnetlink.h; see netlink(7).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Iterator

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # an error ack echoes only the request's header, not the whole request

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = 0x3FFF

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id
NFGENMSG = struct.Struct("=BBH")  # family, version, resource id: what every nfnetlink message starts with
BE32 = struct.Struct(">I")
_NLA = struct.Struct("=HH")  # length, type
_ERROR = struct.Struct("=i")


def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket bound to a port id the kernel picks."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def message(subsys: int, cmd: int, flags: int, seq: int, body: bytes, family: int = socket.AF_UNSPEC) -> bytes:
    """One nfnetlink message: its header, the nfgenmsg, then `body` (attributes)."""
    size = NLMSGHDR.size + NFGENMSG.size + len(body)
    return NLMSGHDR.pack(size, (subsys << 8) | cmd, flags, seq, 0) + NFGENMSG.pack(family, 0, 0) + body


def attr(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def attrs(data: bytes) -> dict[int, bytes]:
    """The attributes in `data` by type (flags masked off), each its payload."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLA.size <= len(data):
        size, kind = _NLA.unpack_from(data, offset)
        if size < _NLA.size:
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _NLA.size:offset + size]
        offset += (size + 3) & ~3
    return found


def nested(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute in `data`, in order, repeats included: a list such as a dump's elements."""
    offset = 0
    while offset + _NLA.size <= len(data):
        size, kind = _NLA.unpack_from(data, offset)
        if size < _NLA.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _NLA.size:offset + size]
        offset += (size + 3) & ~3


def replies(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each message in one datagram the kernel sent."""
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        size, kind, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if size < NLMSGHDR.size:
            return  # malformed: its length would never move on
        yield kind, seq, data[offset + NLMSGHDR.size:offset + size]
        offset += (size + 3) & ~3


def error_code(payload: bytes) -> int:
    """The errno an NLMSG_ERROR message carries, as a positive number; 0 is an ack."""
    code: int = _ERROR.unpack_from(payload)[0]
    return -code


class NetlinkError(OSError):
    """The kernel answered a request with an error: its errno."""


def answer(sock: socket.socket, seq: int) -> Iterator[bytes]:
    """The payloads of the replies to request `seq` on `sock`, up to its ack or NLMSG_DONE (what came before from
    earlier requests skipped). NetlinkError when the kernel answers with an error; socket errors as they come."""
    while True:
        for kind, reply_seq, payload in replies(sock.recv(65536)):
            if reply_seq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise NetlinkError(code, os.strerror(code))
                return
            if kind == NLMSG_DONE:
                return
            yield payload


def nfgen_attrs(payload: bytes) -> dict[int, bytes]:
    """The attributes of an nfnetlink reply's payload (after its nfgenmsg)."""
    return attrs(payload[NFGENMSG.size:])
