"""The netlink framing that the ipset client and the nftables generation read share, as pure functions: no root."""

from __future__ import annotations

import errno
import socket
import struct

from webiptd.firewall.netlink import (
    BE32, NFGENMSG, NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSGHDR,
    attr, attrs, error_code, message, nfgen_attrs, replies,
)


def test_a_message_is_its_header_the_nfgenmsg_and_the_body() -> None:
    body = attr(2, b"set\0")
    data = message(6, 9, NLM_F_REQUEST | NLM_F_ACK, 77, body, socket.AF_INET6)
    assert len(data) == NLMSGHDR.size + NFGENMSG.size + len(body)
    assert NLMSGHDR.unpack_from(data) == (len(data), 6 << 8 | 9, NLM_F_REQUEST | NLM_F_ACK, 77, 0)
    assert NFGENMSG.unpack_from(data, NLMSGHDR.size) == (socket.AF_INET6, 0, 0)
    assert data.endswith(body)


def test_attributes_are_padded_to_four_bytes_and_read_back_without_their_flags() -> None:
    assert attr(1, b"abc") == struct.pack("=HH", 7, 1) + b"abc\0"
    assert attr(1, b"abcd") == struct.pack("=HH", 8, 1) + b"abcd"
    inner = attr(1 | NLA_F_NET_BYTEORDER, BE32.pack(600))
    data = attr(3, b"x") + attr(7 | NLA_F_NESTED, inner) + attr(24, b"")
    assert attrs(data) == {3: b"x", 7: inner, 24: b""}
    assert attrs(attrs(data)[7]) == {1: BE32.pack(600)}
    assert attrs(struct.pack("=HH", 2, 1) + b"junk") == {}  # a length shorter than its header ends the read


def test_one_datagram_of_several_replies() -> None:
    ack = struct.pack("=i", 0) + b"echoed header"
    refused = struct.pack("=i", -errno.ENOENT)
    listed = NFGENMSG.pack(socket.AF_UNSPEC, 0, 0) + attr(1, BE32.pack(42))

    def reply(kind: int, seq: int, payload: bytes) -> bytes:
        size = NLMSGHDR.size + len(payload)
        return NLMSGHDR.pack(size, kind, 0, seq, 0) + payload + b"\0" * (-size % 4)

    data = reply(NLMSG_ERROR, 1, ack) + reply(NLMSG_ERROR, 2, refused) + reply(0x0A10, 3, listed) + reply(
        NLMSG_DONE, 3, b"")
    found = list(replies(data))
    assert [(kind, seq) for kind, seq, _ in found] == [(NLMSG_ERROR, 1), (NLMSG_ERROR, 2), (0x0A10, 3), (NLMSG_DONE, 3)]
    assert error_code(found[0][2]) == 0 and error_code(found[1][2]) == errno.ENOENT
    assert nfgen_attrs(found[2][2]) == {1: BE32.pack(42)}
    # A header whose length is shorter than itself ends the read rather than loop on it.
    assert list(replies(NLMSGHDR.pack(0, NLMSG_ERROR, 0, 9, 0) + ack)) == []


def test_a_port_element_carries_its_ports_in_network_order_and_its_protocol() -> None:
    import ipaddress

    from webiptd.firewall.ipset_netlink import (
        IPSET_ATTR_DATA, IPSET_ATTR_PORT, IPSET_ATTR_PORT_TO, IPSET_ATTR_PROTO, IPSET_ATTR_TIMEOUT, IPSET_CMD_ADD,
        Element, IpsetNetlink,
    )

    def data(element: Element) -> dict[int, bytes]:
        raw = IpsetNetlink()._element_message(element, 1)  # packing only: no socket is opened
        return attrs(nfgen_attrs(raw[NLMSGHDR.size:])[IPSET_ATTR_DATA])

    network = ipaddress.ip_network("198.51.100.0/24")
    ranged = data(Element(IPSET_CMD_ADD, "c-p4", network, False, 600, 6, (80, 0x1234)))
    assert ranged[IPSET_ATTR_PORT] == b"\x00\x50" and ranged[IPSET_ATTR_PORT_TO] == b"\x12\x34"
    assert ranged[IPSET_ATTR_PROTO] == bytes([6]) and ranged[IPSET_ATTR_TIMEOUT] == BE32.pack(600)
    single = data(Element(IPSET_CMD_ADD, "c-p4", network, True, None, 136, (22, 22)))
    assert IPSET_ATTR_PORT_TO not in single and single[IPSET_ATTR_PROTO] == bytes([136])
    assert IPSET_ATTR_PORT not in data(Element(IPSET_CMD_ADD, "c-v4", network, True))
