"""Shared helpers for the engine tests: SAInfos, SA pairs, inner packets, an
independent ESP sealer (``cryptography``, not the engine) and byte-level
rewrites of outer headers.

Terms used by the tests:

* a *pair* is an outbound :class:`espdp.engine.SA` and an
  :class:`espdp.engine.SATable` holding the matching inbound SA;
* *inner* packets are what goes into ``encrypt_packet`` (built with scapy);
* *outer* packets are what the engine produces and what ``decrypt_packet``
  takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Optional

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from espdp.engine import SA, PacketBatch, SATable
from espdp.sa import AlgoKey, Encap, SAInfo

M32 = 0xFFFF_FFFF

ADDR = {
    4: (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")),
    6: (ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("2001:db8::2")),
}
INNER_ADDR = {
    4: ("10.1.0.1", "10.2.0.1"),
    6: ("2001:db8:a::1", "2001:db8:b::1"),
}

# Distinctive keys (a test checks that error messages never show them).
GCM_KEY = bytes.fromhex("5ec7e75ec7e75ec7e75ec7e75ec7e75e") + bytes.fromhex("0badcafe")
CHACHA_KEY = bytes(range(0x40, 0x60)) + bytes.fromhex("c0ffee00")
CBC_KEY = bytes.fromhex("a5" * 16)
HMAC_KEY = bytes.fromhex("3c" * 32)

TRANSFORMS = {
    "gcm": dict(aead=AlgoKey("rfc4106(gcm(aes))", GCM_KEY, 128)),
    "chacha": dict(aead=AlgoKey("rfc7539esp(chacha20,poly1305)", CHACHA_KEY, 128)),
    "cbc-sha256": dict(enc=AlgoKey("cbc(aes)", CBC_KEY),
                       auth=AlgoKey("hmac(sha256)", HMAC_KEY, 128)),
}


def sa_info(family: int = 4, mode: str = "tunnel", transform: str = "gcm", *,
            encap: bool = False, spi: int = 0x1001, **changes) -> SAInfo:
    """An SAInfo between the test addresses of ``family``; ``changes`` go to SAInfo."""
    src, dst = ADDR[family]
    fields = dict(src=src, dst=dst, spi=spi, mode=mode, **TRANSFORMS[transform])
    if encap:
        fields["encap"] = Encap("espinudp", 4500, 4500)
    fields.update(changes)
    return SAInfo(**fields)


@dataclass
class Pair:
    """An outbound SA and the peer's table holding the matching inbound SA."""

    out: SA
    table: SATable
    inb: SA

    def roundtrip(self, inner: bytes, mark: int = 0):
        verdict, outer, mark = self.out.encrypt_packet(inner, mark)
        assert verdict == "ok", verdict
        return self.table.decrypt_packet(outer, mark)


def make_pair(info: Optional[SAInfo] = None, *, inbound: Optional[dict] = None,
              outbound: Optional[dict] = None, **kwargs) -> Pair:
    """``info`` (or ``sa_info(**kwargs)``) for both ends, with per-end changes."""
    if info is None:
        info = sa_info(**kwargs)
    out = SA(info.replace(**(outbound or {})))
    inb = SA(info.replace(**(inbound or {})))
    table = SATable()
    table.add(inb)
    return Pair(out, table, inb)


# ---------------------------------------------------------------- inner packets

def inner_packet(family: int = 4, proto: str = "udp", size: int = 64, *, tos: int = 0,
                 df: bool = False, src: Optional[str] = None, dst: Optional[str] = None,
                 fill: Optional[int] = None, flow: int = 0) -> bytes:
    """An IPv4/IPv6 ICMP/TCP/UDP packet with a ``size``-byte payload.

    ``tos`` is the TOS byte (IPv4) or traffic class (IPv6); ``df`` sets DF
    (IPv4 only).  Payload bytes are a pattern derived from ``fill``.
    """
    s, d = INNER_ADDR[family]
    src, dst = src or s, dst or d
    seed = size if fill is None else fill
    payload = Raw(bytes((seed + i * 7) & 0xFF for i in range(size)))
    if family == 4:
        ip = IP(src=src, dst=dst, tos=tos, flags="DF" if df else 0, id=size & 0xFFFF, ttl=61)
        l4 = {"udp": UDP(sport=1234, dport=5678), "tcp": TCP(sport=1234, dport=80, flags="PA"),
              "icmp": ICMP(type=8, id=7, seq=size & 0xFFFF)}[proto]
    else:
        ip = IPv6(src=src, dst=dst, tc=tos, fl=flow, hlim=61)
        l4 = {"udp": UDP(sport=1234, dport=5678), "tcp": TCP(sport=1234, dport=80, flags="PA"),
              "icmp": ICMPv6EchoRequest(id=7, seq=size & 0xFFFF)}[proto]
    return bytes(ip / l4 / payload)


def transport_packet(family: int = 4, proto: str = "udp", size: int = 64, **kw) -> bytes:
    """An inner packet between the SA addresses (what transport mode protects)."""
    src, dst = ADDR[family]
    return inner_packet(family, proto, size, src=str(src), dst=str(dst), **kw)


def tos_of(packet: bytes) -> int:
    """TOS byte (IPv4) or traffic class (IPv6)."""
    if packet[0] >> 4 == 4:
        return packet[1]
    return ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)


def ipv4_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return _csum(packet[:ihl]) == 0


def udp6_checksum_ok(packet: bytes, udp_offset: int) -> bool:
    """RFC 8200 8.1: the UDP checksum over the pseudo header (addresses from the
    IPv6 header) and the datagram verifies."""
    udp = packet[udp_offset:]
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(udp), 17)
    return _csum(pseudo + udp) == 0 and udp[6:8] != b"\0\0"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    acc = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return ~acc & 0xFFFF


# ---------------------------------------------------------------- outer packets

@dataclass
class OuterLayout:
    """Where things are in an outer packet the engine produced."""

    family: int
    ip_len: int          # outer IP header (no extension headers here)
    udp: Optional[int]   # offset of the UDP header, or None
    esp: int             # offset of the ESP header


def layout(packet: bytes) -> OuterLayout:
    family = packet[0] >> 4
    ip_len = (packet[0] & 0x0F) * 4 if family == 4 else 40
    proto = packet[9] if family == 4 else packet[6]
    if proto == 17:
        return OuterLayout(family, ip_len, ip_len, ip_len + 8)
    return OuterLayout(family, ip_len, None, ip_len)


def esp_seq(packet: bytes) -> int:
    """The (low 32 bits of the) sequence number on the wire."""
    off = layout(packet).esp
    return int.from_bytes(packet[off + 4:off + 8], "big")


def rewrite_outer(packet: bytes, *, tos: Optional[int] = None, src: Optional[str] = None,
                  sport: Optional[int] = None) -> bytes:
    """Change outer TOS/traffic class, source address or UDP source port
    (fields the ICV does not cover), fixing the IPv4 header checksum."""
    p = bytearray(packet)
    lay = layout(packet)
    if tos is not None:
        if lay.family == 4:
            p[1] = tos
        else:
            p[0] = 0x60 | (tos >> 4)
            p[1] = ((tos & 0x0F) << 4) | (p[1] & 0x0F)
    if src is not None:
        packed = ipaddress.ip_address(src).packed
        start = 12 if lay.family == 4 else 8
        p[start:start + len(packed)] = packed
    if sport is not None:
        assert lay.udp is not None
        p[lay.udp:lay.udp + 2] = sport.to_bytes(2, "big")
    if lay.family == 4:
        p[10:12] = b"\0\0"
        p[10:12] = _csum(bytes(p[:lay.ip_len])).to_bytes(2, "big")
    return bytes(p)


def outer_ip(family: int, payload: bytes, *, proto: int = 50, src=None, dst=None,
             tos: int = 0, frag: int = 0, ttl: int = 64) -> bytes:
    """A bare outer IPv4/IPv6 header (hand-built, so any field can be wrong) + payload.

    ``frag`` is the IPv4 flags+fragment-offset word.
    """
    s, d = ADDR[family]
    src = ipaddress.ip_address(src) if src is not None else s
    dst = ipaddress.ip_address(dst) if dst is not None else d
    if family == 4:
        hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 1, frag,
                                    ttl, proto, 0, src.packed, dst.packed))
        hdr[10:12] = _csum(bytes(hdr)).to_bytes(2, "big")
        return bytes(hdr) + payload
    first = 0x60000000 | (tos << 20)
    return struct.pack("!IHBB16s16s", first, len(payload), proto, ttl, src.packed,
                       dst.packed) + payload


def udp_header(payload: bytes, sport: int = 4500, dport: int = 4500,
               length: Optional[int] = None) -> bytes:
    """UDP header with checksum 0 (the engine does not check it)."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload) if length is None else length,
                       0) + payload


# ---------------------------------------------------------------- independent ESP

def esp_seal(transform: str, spi: int, seq: int, payload: bytes, nh: int, *,
             pad: Optional[bytes] = None, pad_len: Optional[int] = None,
             esn: bool = False) -> bytes:
    """ESP (RFC 4303) built with ``cryptography``, independently of the engine.

    ``payload`` is the inner packet (tunnel) or upper-layer data (transport);
    ``pad`` replaces the standard padding 1, 2, 3...; ``pad_len`` replaces the
    pad length byte.  ``seq`` may be 64 bits with ``esn``.
    """
    align = 16 if transform == "cbc-sha256" else 4
    if pad is None:
        n = (align - (len(payload) + 2) % align) % align
        pad = bytes(range(1, n + 1))
    trailer = pad + bytes([len(pad) if pad_len is None else pad_len, nh])
    plain = payload + trailer
    header = struct.pack("!II", spi, seq & M32)
    hi = struct.pack("!I", seq >> 32)
    if transform in ("gcm", "chacha"):
        key = GCM_KEY if transform == "gcm" else CHACHA_KEY
        iv = struct.pack("!Q", seq)
        nonce = key[-4:] + iv
        aad = header[:4] + hi + header[4:] if esn else header
        aead = AESGCM(key[:-4]) if transform == "gcm" else ChaCha20Poly1305(key[:-4])
        return header + iv + aead.encrypt(nonce, plain, aad)
    assert transform == "cbc-sha256"
    assert len(plain) % 16 == 0, "CBC plaintext must be a multiple of 16"
    iv = os.urandom(16)
    enc = Cipher(algorithms.AES(CBC_KEY), modes.CBC(iv)).encryptor()
    body = header + iv + enc.update(plain) + enc.finalize()
    icv = hmac.new(HMAC_KEY, body + (hi if esn else b""), hashlib.sha256).digest()[:16]
    return body + icv


def esp_open(transform: str, esp: bytes, *, esn_hi: Optional[int] = None) -> bytes:
    """Decrypt an ESP packet (header onwards) made with TRANSFORMS; returns the
    plaintext with its trailer.  Raises on an ICV mismatch."""
    header = esp[:8]
    hi = b"" if esn_hi is None else struct.pack("!I", esn_hi)
    if transform in ("gcm", "chacha"):
        key = GCM_KEY if transform == "gcm" else CHACHA_KEY
        iv = esp[8:16]
        aad = header[:4] + hi + header[4:]
        aead = AESGCM(key[:-4]) if transform == "gcm" else ChaCha20Poly1305(key[:-4])
        return aead.decrypt(key[-4:] + iv, esp[16:], aad)
    body, icv = esp[:-16], esp[-16:]
    want = hmac.new(HMAC_KEY, body + hi, hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(icv, want):
        raise ValueError("ICV mismatch")
    dec = Cipher(algorithms.AES(CBC_KEY), modes.CBC(esp[8:24])).decryptor()
    return dec.update(esp[24:-16]) + dec.finalize()


def esp_packet(family: int, esp: bytes, *, encap: bool = False, **outer) -> bytes:
    """An outer packet carrying ``esp``, raw or in UDP 4500."""
    if encap:
        return outer_ip(family, udp_header(esp), proto=17, **outer)
    return outer_ip(family, esp, proto=50, **outer)


# ---------------------------------------------------------------- damaged packets

def with_lengths(packet: bytes, n: int) -> bytes:
    """The first n bytes, with the IP (and UDP) length fields saying n."""
    lay = layout(packet)
    p = bytearray(packet[:n])
    if lay.family == 4:
        p[2:4] = n.to_bytes(2, "big")
    else:
        p[4:6] = (n - 40).to_bytes(2, "big")
    if lay.udp is not None:
        p[lay.udp + 4:lay.udp + 6] = (n - lay.udp).to_bytes(2, "big")
    return bytes(p)


def ipv6_with_headers(packet: bytes, headers: list[tuple[int, bytes]]) -> bytes:
    """Insert extension headers (type, body of 6 + 8k bytes) after the IPv6 header."""
    nh = packet[6]
    chain = b""
    types = [t for t, _ in headers]
    for i, (_, body) in enumerate(headers):
        nxt = types[i + 1] if i + 1 < len(types) else nh
        chain += bytes([nxt, (len(body) + 2) // 8 - 1]) + body
    p = bytearray(packet[:40]) + chain + packet[40:]
    p[6] = types[0]
    p[4:6] = (len(p) - 40).to_bytes(2, "big")
    return bytes(p)


# ---------------------------------------------------------------- counters

def decrypt_all(table, packets, slot: int = 2048):
    """Decrypt ``packets`` in one batch: ``([(verdict, inner, mark)], [flags], ok count)``."""
    batch = PacketBatch(len(packets), slot, 0)
    for p in packets:
        batch.add(p)
    ok = table.decrypt(batch)
    return [batch.result(i) for i in range(len(packets))], [int(f) for f in batch.flags], ok


def drops_total(*stats_dicts) -> int:
    """Sum of drop counters: SA ``stats()['drops']`` or table ``stats()`` dicts."""
    return sum(sum(d.values()) for d in stats_dicts)


def decrypt_flags(table: SATable, packet: bytes, mark: int = 0):
    """Decrypt one packet through the batch API: ``(verdict, inner, mark, flags)``."""
    batch = PacketBatch(1, 65536 + 256, 128)
    batch.add(packet, mark)
    table.decrypt(batch)
    verdict, inner, mark = batch.result(0)
    return verdict, inner, mark, int(batch.flags[0])


def encrypt_flags(sa: SA, packet: bytes, mark: int = 0):
    """Encrypt one packet through the batch API: ``(verdict, outer, mark, flags)``."""
    batch = PacketBatch(1)
    batch.add(packet, mark)
    sa.encrypt(batch)
    verdict, outer, mark = batch.result(0)
    return verdict, outer, mark, int(batch.flags[0])


# ---------------------------------------------------------------- control socket

@contextlib.contextmanager
def serve_control(path: str, xfrm, handlers: Optional[dict] = None):
    """A :class:`espdp.control.ControlServer` on ``xfrm`` at ``path``, polled by a
    thread (as the daemon's loop would) until the block ends; yields the path."""
    from espdp.control import ControlServer

    server = ControlServer(path, xfrm, handlers)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [server.poll(time.monotonic(), 0.05)
                                              for _ in iter(stop.is_set, True)])
    thread.start()
    try:
        yield server.path
    finally:
        stop.set()
        thread.join()
        server.close()
