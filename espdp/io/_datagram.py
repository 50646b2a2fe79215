"""What every UDP-encapsulation device shares (RFC 3948), the kernel socket
and the in-memory one alike.

* :func:`deliver` classifies one received datagram, already copied into a
  slot behind room for the outer headers: a lone ``0xFF`` is a NAT keepalive
  (counted, eaten); a first 32-bit word of zero is the non-ESP marker (the
  IKE message after it goes to ``on_ike`` or is counted ``ike_unhandled``);
  anything else is ESP, and a synthetic outer IP + UDP header carrying the
  peer's real address and port is written in front of it so that the engine
  sees a whole packet.  The payload is never parsed beyond its first word.
* :func:`parse_outer` is the reverse for sending: it reads the destination
  address and UDP port of the whole packet the engine wrote and says where
  its UDP payload is.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Optional

KEEPALIVE = b"\xff"
NON_ESP_MARKER = b"\x00\x00\x00\x00"
HEADER_LEN = {socket.AF_INET: 20 + 8, socket.AF_INET6: 40 + 8}
TTL = 64

IkeCallback = Callable[[bytes, tuple], None]

STAT_KEYS = ("received", "esp", "keepalive", "non_esp", "ike_unhandled", "truncated",
             "sent", "send_errors", "bad_outer", "dropped")


def new_stats() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pack_addr(family: int, host: str) -> bytes:
    """The packed form of ``host`` (a scope suffix such as ``%lo`` is ignored)."""
    return socket.inet_pton(family, host.split("%", 1)[0])


def ipv4_checksum(header: bytes | memoryview) -> int:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_outer(slot: memoryview, start: int, family: int, src: bytes, sport: int,
                dst: bytes, dport: int, payload_len: int) -> None:
    """Write an IP + UDP header at ``slot[start:]`` for ``payload_len`` bytes behind it.

    UDP checksum 0: the engine does not check it on input.
    """
    udp_len = 8 + payload_len
    if family == socket.AF_INET:
        struct.pack_into("!BBHHHBBH4s4s", slot, start, 0x45, 0, 20 + udp_len, 0, 0x4000,
                         TTL, socket.IPPROTO_UDP, 0, src, dst)
        struct.pack_into("!H", slot, start + 10, ipv4_checksum(slot[start:start + 20]))
        udp = start + 20
    else:
        struct.pack_into("!IHBB16s16s", slot, start, 6 << 28, udp_len, socket.IPPROTO_UDP,
                         TTL, src, dst)
        udp = start + 40
    struct.pack_into("!HHHH", slot, udp, sport, dport, udp_len, 0)


def deliver(batch, family: int, payload_len: int, peer: tuple, local: bytes, local_port: int,
            stats: dict[str, int], on_ike: Optional[IkeCallback], mark: int = 0) -> bool:
    """Classify the datagram in slot ``batch.count`` and add it to the batch if it is ESP.

    The payload must already sit at ``batch.headroom + HEADER_LEN[family]`` of
    the slot; ``peer`` is ``(host, port, ...)`` as the socket reported it and
    ``local`` the packed local address it arrived on; ``mark`` the outer
    packet's mark (``SO_RCVMARK``), stored in ``batch.mark``.  Returns True
    when the slot was added.
    """
    i = batch.count
    hdr = HEADER_LEN[family]
    start = batch.headroom
    slot = memoryview(batch.data[i])
    payload = start + hdr
    stats["received"] += 1
    if payload_len == 1 and slot[payload] == 0xFF:
        stats["keepalive"] += 1
        return False
    if payload_len >= 4 and slot[payload:payload + 4] == NON_ESP_MARKER:
        stats["non_esp"] += 1
        if on_ike is None:
            stats["ike_unhandled"] += 1
        else:
            on_ike(bytes(slot[payload + 4:payload + payload_len]), (peer[0], peer[1]))
        return False
    write_outer(slot, start, family, pack_addr(family, peer[0]), peer[1], local, local_port,
                payload_len)
    batch.offset[i] = start
    batch.length[i] = hdr + payload_len
    batch.mark[i] = mark
    batch.sa[i] = -1
    batch.count = i + 1
    stats["esp"] += 1
    return True


def parse_outer(slot: memoryview, offset: int, length: int):
    """``(family, dst_host, dport, payload_start, payload_end)`` of a whole outer
    IP + UDP packet at ``slot[offset:offset + length]``, or None when it is not one."""
    if length < 28:
        return None
    version = slot[offset] >> 4
    if version == 4:
        ihl = (slot[offset] & 0x0F) * 4
        if ihl < 20 or slot[offset + 9] != socket.IPPROTO_UDP or length < ihl + 8:
            return None
        family, dst = socket.AF_INET, bytes(slot[offset + 16:offset + 20])
        udp = offset + ihl
    elif version == 6:
        if length < 48 or slot[offset + 6] != socket.IPPROTO_UDP:
            return None
        family, dst = socket.AF_INET6, bytes(slot[offset + 24:offset + 40])
        udp = offset + 40
    else:
        return None
    (dport,) = struct.unpack_from("!H", slot, udp + 2)
    return family, socket.inet_ntop(family, dst), dport, udp + 8, offset + length
