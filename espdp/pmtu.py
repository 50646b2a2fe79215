"""Path MTU arithmetic for ESP, and the ICMP errors that tell senders about it.

ESP overhead (RFC 4303)
-----------------------
An outbound packet grows by, in this order:

* the outer IP header in tunnel mode: 20 bytes over IPv4, 40 over IPv6
  (transport mode keeps the packet's own header: nothing is added);
* an 8-byte UDP header when the SA uses UDP encapsulation (RFC 3948);
* the ESP header, SPI and sequence number, 8 bytes, then the IV of the
  cipher (:mod:`espdp.algorithms`: 8 for GCM, CCM, GMAC, ChaCha20-Poly1305
  and CTR, 16 for CBC, 0 for the null cipher);
* padding, so that payload + padding + the 2-byte trailer (pad length, next
  header) is a multiple of ``max(4, cipher block size)`` (RFC 4303 2.4:
  4-byte alignment at least; CBC needs whole 16-byte blocks), that is 0 to
  ``align - 1`` bytes, then the 2-byte trailer;
* the ICV: the AEAD tag, or the truncated HMAC/CMAC.

:func:`esp_overhead` is the worst case of that sum (``align - 1`` bytes of
padding); :func:`max_inner` is exact: the largest inner packet whose
encapsulated length is at most the path MTU, which is always
``k * align - 2`` payload bytes for the largest ``k`` that fits.  In
transport mode, the payload is what follows the IP header, assumed without
IPv4 options or IPv6 extension headers (20 or 40 bytes); other header
lengths shift the padding and may cost up to ``align - 4`` bytes more, within
:func:`esp_overhead`.  TFC padding (``tfcpad``, RFC 4303 2.7) pads short
tunnel-mode packets up to ``tfcpad`` bytes; it never makes a longer packet
longer, so it only matters when ``tfcpad`` itself does not fit.

:func:`default_tun_mtu` is the smallest :func:`max_inner` over outbound SAs:
a TUN of that MTU never hands over a packet that needs fragmenting.  IPv6
needs links of at least 1280 bytes (RFC 8200 section 5); this module returns
the raw figure, and a caller that runs IPv6 inside the tunnel warns when it
is below 1280 (the IPv6 packets that do not fit get "Packet Too Big" with
1280, and must be fragmented at the source or by the outer path).

ICMP errors (:func:`too_big_reply`)
-----------------------------------
An inner packet too big for the path is answered back into the TUN, as a
router on the path would (RFC 1191, RFC 8201):

* IPv4 with DF set: Destination Unreachable, code 4 "fragmentation needed
  and DF set", next-hop MTU = ``mtu`` (RFC 1191 section 4; clamped to
  68..65535, RFC 791's minimum).  IPv4 without DF: no reply, the caller
  encrypts the packet anyway and the outer packet is fragmented.
* IPv6: Packet Too Big (type 2, RFC 4443 section 3.2) with MTU = ``mtu`` but
  never below 1280 (RFC 8200 section 5).
* Source: ``reporter`` when given, else the inner packet's destination: the
  tunnel endpoint speaks for the path to it, as the kernel does for a tunnel
  without an address (and a host inside the tunnel accepts the error because
  it names the destination it was talking to).  Destination: the inner
  packet's source.  TTL / hop limit 64; IPv4 precedence 6, "internetwork
  control" (RFC 1812 4.3.2.5).
* As much of the original packet as fits in 576 bytes in all (IPv4, RFC 1812
  4.3.2.3) or 1280 bytes (IPv6, RFC 4443 2.4 (c)).
* Never in answer to (RFC 1812 4.3.2.7, RFC 4443 2.4 (e)): an ICMP error
  (IPv4 types 3, 4, 5, 11, 12; ICMPv6 types below 128, found after the IPv6
  extension headers: hop-by-hop, routing, fragment, destination options and
  AH); a non-first IPv4 fragment; an IPv6 non-first fragment of an ICMPv6
  message (its type cannot be seen); a packet from an unspecified, loopback,
  multicast, broadcast or class E (IPv4) source; an IPv4 packet to a
  multicast or broadcast destination.  An IPv6 packet to a multicast group
  does get Packet Too Big (RFC 4443 2.4 (e.2)), but only with a unicast
  ``reporter`` to send it from.
* A malformed or truncated packet gets no reply (``None``), never an
  exception.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Optional

from . import algorithms
from .sa import AlgoKey, Encap, SAInfo

IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
ESP_HEADER = 8      # SPI + sequence number
ESP_TRAILER = 2     # pad length + next header
IPV4_MIN_MTU = 68       # RFC 791
IPV6_MIN_MTU = 1280     # RFC 8200 section 5
IPV4_ICMP_MAX = 576     # RFC 1812 4.3.2.3: the whole ICMP error datagram
IPV6_ICMP_MAX = 1280    # RFC 4443 2.4 (c)
ICMP_TTL = 64
MAX_IP_LENGTH = 0xFFFF  # the engine refuses longer (no jumbograms)

#: A GCM SA over IPv6 with UDP encapsulation: what :func:`default_tun_mtu`
#: is given when no outbound SA is configured yet (a safe guess: IPv6 outer
#: headers and the UDP header are the larger choices; GCM is what IKE picks).
TYPICAL_SA = SAInfo(
    src=ipaddress.IPv6Address("2001:db8::1"), dst=ipaddress.IPv6Address("2001:db8::2"),
    spi=0x100, mode="tunnel", aead=AlgoKey("rfc4106(gcm(aes))", bytes(20), 128),
    encap=Encap("espinudp", 4500, 4500),
)

_ICMP4_ERRORS = frozenset({3, 4, 5, 11, 12})
_IPV6_EXT = frozenset({0, 43, 44, 51, 60})  # hop-by-hop, routing, fragment, AH, dest. options
_MAX_EXT_HEADERS = 16


# ---------------------------------------------------------------- overhead

def _transform(info: SAInfo) -> tuple[int, int, int]:
    """``(iv_len, align, icv_len)`` of the SA's transform, as the engine uses them."""
    if info.aead is not None:
        alg = algorithms.lookup("aead", info.aead.name)
        icv = info.aead.bits // 8
    else:
        if info.enc is None:
            raise ValueError("SA has neither aead nor enc")
        alg = algorithms.lookup("enc", info.enc.name)
        icv = info.auth.bits // 8 if info.auth is not None else 0
    return alg.iv_bytes, max(4, alg.block_bytes), icv


def _kept_header(info: SAInfo, inner_family: int) -> int:
    """Outer header bytes before ESP that are not the inner packet's: the outer
    header in tunnel mode, 0 in transport mode (the packet's own header stays)."""
    if inner_family not in (4, 6):
        raise ValueError(f"inner family {inner_family}: expected 4 or 6")
    if info.mode == "tunnel":
        return IPV4_HEADER if info.family == 4 else IPV6_HEADER
    if inner_family != info.family:
        raise ValueError(f"a transport-mode IPv{info.family} SA cannot carry IPv{inner_family}")
    return 0


def esp_overhead(info: SAInfo, inner_family: int) -> int:
    """The most bytes ESP adds to an inner packet of ``inner_family`` for ``info``
    (padding at its worst, ``align - 1`` bytes; TFC padding not counted)."""
    iv, align, icv = _transform(info)
    udp = UDP_HEADER if info.encap is not None else 0
    return (_kept_header(info, inner_family) + udp + ESP_HEADER + iv + align - 1
            + ESP_TRAILER + icv)


def encapsulated_length(info: SAInfo, inner_len: int, inner_family: int) -> int:
    """The length of the packet the engine makes of an ``inner_len``-byte inner
    packet (transport mode: with a 20/40-byte IP header), TFC padding included."""
    iv, align, icv = _transform(info)
    extra = _kept_header(info, inner_family)
    udp = UDP_HEADER if info.encap is not None else 0
    if info.mode == "tunnel":
        header, payload = extra, max(inner_len, info.tfcpad)
    else:
        header = IPV4_HEADER if inner_family == 4 else IPV6_HEADER
        payload = inner_len - header
        if payload < 0:
            raise ValueError(f"inner length {inner_len} is shorter than its IP header")
    text = -(-(payload + ESP_TRAILER) // align) * align
    return header + udp + ESP_HEADER + iv + text + icv


def max_inner(info: SAInfo, path_mtu: int, inner_family: int) -> int:
    """The largest inner packet of ``inner_family`` that ``info`` encapsulates
    into at most ``path_mtu`` bytes (0 when none fits)."""
    iv, align, icv = _transform(info)
    udp = UDP_HEADER if info.encap is not None else 0
    if info.mode == "tunnel":
        header = _kept_header(info, inner_family)
        kept = 0  # the whole inner packet is ESP payload
    else:
        _kept_header(info, inner_family)  # checks the family
        header = kept = IPV4_HEADER if inner_family == 4 else IPV6_HEADER
    room = min(path_mtu, MAX_IP_LENGTH) - header - udp - ESP_HEADER - iv - icv
    payload = (room // align) * align - ESP_TRAILER
    if payload < 0:
        return 0
    if info.mode == "tunnel" and info.tfcpad > payload:
        return 0  # even the smallest packet is padded past the path MTU
    return kept + payload


def default_tun_mtu(path_mtu: int, infos: Iterable[SAInfo]) -> int:
    """The TUN MTU that fits every SA of ``infos``: the smallest :func:`max_inner`
    over them and the inner families each can carry (both in tunnel mode, its own
    in transport mode).  Not raised to 1280 for IPv6 (see the module docstring):
    the caller warns.  ``path_mtu`` itself when ``infos`` is empty."""
    best = path_mtu
    for info in infos:
        families = (4, 6) if info.mode == "tunnel" else (info.family,)
        for family in families:
            best = min(best, max_inner(info, path_mtu, family))
    return best


# ---------------------------------------------------------------- ICMP

def _csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\0"
    acc = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return ~acc & 0xFFFF


def _bad_source4(addr: bytes) -> bool:
    # 0/8 "this network", 127/8 loopback, 224/4 multicast, 240/4 class E incl. broadcast
    return addr[0] == 0 or addr[0] == 127 or addr[0] >= 224


def _bad_source6(addr: bytes) -> bool:
    ip = ipaddress.IPv6Address(addr)
    return ip.is_unspecified or ip.is_loopback or ip.is_multicast


def too_big_reply(inner: bytes, mtu: int, reporter: Optional[bytes] = None) -> Optional[bytes]:
    """The ICMP error telling the source of ``inner`` that only ``mtu`` bytes
    fit, to be written into the TUN; ``None`` when none is due (see the module
    docstring).  ``reporter`` is the packed source address to send it from, of
    the inner packet's family (default: the inner packet's destination)."""
    try:
        packet = bytes(inner)
        if not packet:
            return None
        version = packet[0] >> 4
        if version == 4:
            return _too_big4(packet, mtu, reporter)
        if version == 6:
            return _too_big6(packet, mtu, reporter)
        return None
    except (IndexError, struct.error):  # a truncated packet the checks missed
        return None


def _check_reporter(reporter: Optional[bytes], size: int) -> None:
    if reporter is not None and len(reporter) != size:
        raise ValueError(f"reporter address is {len(reporter)} bytes, expected {size}")


def _too_big4(p: bytes, mtu: int, reporter: Optional[bytes]) -> Optional[bytes]:
    _check_reporter(reporter, 4)
    if len(p) < IPV4_HEADER:
        return None
    ihl = (p[0] & 0x0F) * 4
    total = int.from_bytes(p[2:4], "big")
    if ihl < IPV4_HEADER or total < ihl or total > len(p):
        return None
    p = p[:total]
    frag = int.from_bytes(p[6:8], "big")
    if not frag & 0x4000 or frag & 0x1FFF:  # no DF, or not the first fragment
        return None
    src, dst = p[12:16], p[16:20]
    if _bad_source4(src) or dst[0] >= 224:  # nor to multicast / broadcast
        return None
    if p[9] == 1:  # ICMP: never an error about an error
        if total <= ihl or p[ihl] in _ICMP4_ERRORS:
            return None
    quote = p[:IPV4_ICMP_MAX - IPV4_HEADER - 8]
    next_hop = min(max(mtu, IPV4_MIN_MTU), 0xFFFF)
    icmp = bytearray(struct.pack("!BBHHH", 3, 4, 0, 0, next_hop) + quote)
    icmp[2:4] = _csum(bytes(icmp)).to_bytes(2, "big")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, IPV4_HEADER + len(icmp), 0,
                                   0x4000, ICMP_TTL, 1, 0, reporter or dst, src))
    header[10:12] = _csum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + bytes(icmp)


def _upper_layer6(p: bytes) -> Optional[tuple[int, int, bool]]:
    """``(next header, offset, first fragment)`` of the upper layer of an IPv6
    packet, after its extension headers; ``None`` when the chain is malformed."""
    nh, off, first = p[6], IPV6_HEADER, True
    for _ in range(_MAX_EXT_HEADERS):
        if nh not in _IPV6_EXT:
            return nh, off, first
        if off + 8 > len(p):
            return None
        if nh == 44:  # fragment header: fixed 8 bytes
            first = first and int.from_bytes(p[off + 2:off + 4], "big") >> 3 == 0
            size = 8
        elif nh == 51:  # AH: length in 4-byte units, minus 2 (RFC 4302)
            size = (p[off + 1] + 2) * 4
        else:
            size = (p[off + 1] + 1) * 8
        nh = p[off]
        off += size
        if off > len(p):
            return None
        if not first:
            return nh, off, first  # what follows is not the upper-layer header
    return None


def _too_big6(p: bytes, mtu: int, reporter: Optional[bytes]) -> Optional[bytes]:
    _check_reporter(reporter, 16)
    if len(p) < IPV6_HEADER:
        return None
    payload = int.from_bytes(p[4:6], "big")
    if payload == 0 or IPV6_HEADER + payload > len(p):  # jumbogram or truncated
        return None
    p = p[:IPV6_HEADER + payload]
    src, dst = p[8:24], p[24:40]
    if _bad_source6(src):
        return None
    if reporter is None:
        if dst[0] == 0xFF or ipaddress.IPv6Address(dst).is_unspecified:
            return None  # no unicast address to send it from
        reporter = dst
    upper = _upper_layer6(p)
    if upper is None:
        return None
    nh, off, first = upper
    if nh == 58:
        if not first or off >= len(p) or p[off] < 128:
            return None
    quote = p[:IPV6_ICMP_MAX - IPV6_HEADER - 8]
    icmp = bytearray(struct.pack("!BBHI", 2, 0, 0, min(max(mtu, IPV6_MIN_MTU), 0xFFFFFFFF))
                     + quote)
    pseudo = reporter + src + struct.pack("!I3xB", len(icmp), 58)
    icmp[2:4] = _csum(pseudo + bytes(icmp)).to_bytes(2, "big")
    header = struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, ICMP_TTL, reporter, src)
    return header + bytes(icmp)
