"""espdp.pmtu: ESP overhead against the real engine, and the ICMP "too big" replies."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from helpers import ADDR, TRANSFORMS, inner_packet, sa_info, transport_packet
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, UDP, ICMPv6PacketTooBig, IPv6, IPv6ExtHdrFragment, Raw
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from espdp import pmtu
from espdp.engine import SA
from espdp.sa import AlgoKey

# Transforms beyond the helpers' three, for the overhead cross-check only.
EXTRA = {
    "null-sha256": dict(enc=AlgoKey("ecb(cipher_null)", b""),
                        auth=AlgoKey("hmac(sha256)", bytes(range(32)), 128)),
    "ctr-sha1": dict(enc=AlgoKey("rfc3686(ctr(aes))", bytes(20)),
                     auth=AlgoKey("hmac(sha1)", bytes(20), 96)),
    "cbc-sha512": dict(enc=AlgoKey("cbc(aes)", bytes(32)),
                       auth=AlgoKey("hmac(sha512)", bytes(64), 256)),
    "gcm8": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(36), 64)),
    "gmac": dict(aead=AlgoKey("rfc4543(gcm(aes))", bytes(20), 128)),
    "ccm12": dict(aead=AlgoKey("rfc4309(ccm(aes))", bytes(19), 96)),
}
ALL_TRANSFORMS = [*TRANSFORMS, *EXTRA]

# (outer family, inner family, mode)
LAYOUTS = [(4, 4, "tunnel"), (4, 6, "tunnel"), (6, 4, "tunnel"), (6, 6, "tunnel"),
           (4, 4, "transport"), (6, 6, "transport")]
LAYOUT_IDS = ["4in4", "6in4", "4in6", "6in6", "transport4", "transport6"]


def _info(outer: int, mode: str, transform: str, encap: bool, **changes):
    if transform in EXTRA:
        base = sa_info(outer, mode, "gcm", encap=encap, **changes)
        return base.replace(**{"aead": None, "enc": None, "auth": None, **EXTRA[transform]})
    return sa_info(outer, mode, transform, encap=encap, **changes)


def _engine(info) -> SA:
    try:
        return SA(info.replace(dir="out"))
    except Exception as exc:  # e.g. CCM on an OpenSSL that refuses it
        pytest.skip(f"engine refuses {info.aead or info.enc}: {exc}")


def _inner(outer: int, inner: int, mode: str, length: int) -> bytes:
    """An inner UDP packet of exactly ``length`` bytes."""
    ip_udp = 28 if inner == 4 else 48
    make = transport_packet if mode == "transport" else inner_packet
    packet = make(inner, "udp", length - ip_udp)
    assert len(packet) == length
    return packet


def _encrypt(sa: SA, packet: bytes) -> bytes:
    verdict, outer, _mark = sa.encrypt_packet(packet)
    assert verdict == "ok", verdict
    return outer


# ---------------------------------------------------------------- overhead vs engine

@pytest.mark.parametrize("path_mtu", [1500, 1337])
@pytest.mark.parametrize("encap", [False, True], ids=["esp", "udp"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_max_inner_is_exact_for_the_engine(transform, layout, encap, path_mtu):
    outer, inner, mode = layout
    info = _info(outer, mode, transform, encap)
    sa = _engine(info)
    best = pmtu.max_inner(info, path_mtu, inner)
    fits = _encrypt(sa, _inner(outer, inner, mode, best))
    assert len(fits) <= path_mtu
    assert len(fits) == pmtu.encapsulated_length(info, best, inner)
    too_big = _encrypt(sa, _inner(outer, inner, mode, best + 1))
    assert len(too_big) > path_mtu
    # The worst case bounds every length, and is reached.
    overhead = pmtu.esp_overhead(info, inner)
    growth = set()
    for length in range(best - 20, best + 1):
        out = _encrypt(sa, _inner(outer, inner, mode, length))
        assert len(out) == pmtu.encapsulated_length(info, length, inner)
        growth.add(len(out) - length)
    assert max(growth) == overhead


@pytest.mark.parametrize("transform", ["gcm", "cbc-sha256"])
def test_tfc_padding_counts_only_for_short_packets(transform):
    info = sa_info(4, "tunnel", transform, tfcpad=600)
    sa = _engine(info)
    short = _encrypt(sa, _inner(4, 4, "tunnel", 100))
    assert len(short) == pmtu.encapsulated_length(info, 100, 4)
    assert len(short) == pmtu.encapsulated_length(info, 600, 4)
    assert pmtu.max_inner(info, 1500, 4) == pmtu.max_inner(info.replace(tfcpad=0), 1500, 4)
    assert pmtu.max_inner(info, 500, 4) == 0  # 600 bytes of TFC never fit in 500


def test_overhead_figures():
    gcm = sa_info(4, "tunnel", "gcm")
    assert pmtu.esp_overhead(gcm, 4) == 20 + 8 + 8 + 3 + 2 + 16
    assert pmtu.esp_overhead(sa_info(6, "tunnel", "gcm", encap=True), 4) == 40 + 8 + 8 + 8 + 3 \
        + 2 + 16
    assert pmtu.esp_overhead(sa_info(4, "transport", "cbc-sha256"), 4) == 8 + 16 + 15 + 2 + 16
    assert pmtu.max_inner(gcm, 1500, 4) == 1446
    assert pmtu.max_inner(gcm.replace(encap=pmtu.TYPICAL_SA.encap), 1500, 4) == 1438
    with pytest.raises(ValueError):
        pmtu.max_inner(sa_info(4, "transport", "gcm"), 1500, 6)


def test_default_tun_mtu_is_the_smallest_fit():
    infos = [sa_info(4, "tunnel", "gcm"), sa_info(6, "tunnel", "cbc-sha256", encap=True),
             sa_info(4, "transport", "chacha")]
    expected = min(pmtu.max_inner(i, 1500, f) for i in infos
                   for f in ((4, 6) if i.mode == "tunnel" else (4,)))
    assert pmtu.default_tun_mtu(1500, infos) == expected == 1406
    assert pmtu.default_tun_mtu(1500, []) == 1500
    assert pmtu.default_tun_mtu(1500, [pmtu.TYPICAL_SA]) == 1418
    # Below 1280: the raw figure, the caller warns about IPv6.
    assert pmtu.default_tun_mtu(1300, [pmtu.TYPICAL_SA]) == 1218
    pmtu.TYPICAL_SA.validate()


# ---------------------------------------------------------------- ICMP replies

def _rebuilt_checksums_match(packet) -> None:
    """Let scapy recompute every checksum and compare with what we sent."""
    raw = bytes(packet)
    clone = packet.__class__(raw)
    for layer in (IP, ICMP, ICMPv6PacketTooBig):
        if clone.haslayer(layer):
            for name in ("chksum", "cksum"):
                if name in clone[layer].fields:
                    delattr(clone[layer], name)
    assert bytes(clone.__class__(bytes(clone))) == raw


def test_ipv4_df_gets_fragmentation_needed():
    inner = inner_packet(4, "udp", 1400, df=True, tos=0x2E)
    reply = pmtu.too_big_reply(inner, 1438)
    p = IP(reply)
    assert (p.version, p.ihl, p.ttl, p.proto, p.tos) == (4, 5, 64, 1, 0xC0)
    assert p.src == "10.2.0.1" and p.dst == "10.1.0.1"  # from the inner destination
    assert p.len == len(reply) == 576
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, 1438)
    assert reply[28:] == inner[:548]
    _rebuilt_checksums_match(p)


def test_ipv4_reporter_and_short_quote():
    inner = inner_packet(4, "tcp", 10, df=True)
    reply = pmtu.too_big_reply(inner, 1400, reporter=ipaddress.ip_address("192.0.2.9").packed)
    p = IP(reply)
    assert p.src == "192.0.2.9" and p.dst == "10.1.0.1"
    assert reply[28:] == inner and len(reply) == 28 + len(inner)
    _rebuilt_checksums_match(p)
    # Trailing bytes past the IP total length are not quoted.
    assert pmtu.too_big_reply(inner + b"junk", 1400, ipaddress.ip_address("192.0.2.9").packed) \
        == reply
    with pytest.raises(ValueError):
        pmtu.too_big_reply(inner, 1400, reporter=bytes(16))


def test_ipv4_mtu_field_is_clamped():
    inner = inner_packet(4, "udp", 100, df=True)
    assert IP(pmtu.too_big_reply(inner, 40))[ICMP].nexthopmtu == 68
    assert IP(pmtu.too_big_reply(inner, 100000))[ICMP].nexthopmtu == 0xFFFF


def test_ipv6_gets_packet_too_big():
    inner = inner_packet(6, "udp", 1400, flow=0x12345)
    reply = pmtu.too_big_reply(inner, 1418)
    p = IPv6(reply)
    assert (p.version, p.hlim, p.nh, p.tc, p.fl) == (6, 64, 58, 0, 0)
    assert p.src == "2001:db8:b::1" and p.dst == "2001:db8:a::1"
    assert p.plen == len(reply) - 40 and len(reply) == 1280
    ptb = p[ICMPv6PacketTooBig]
    assert (ptb.type, ptb.code, ptb.mtu) == (2, 0, 1418)
    assert reply[48:] == inner[:1232]
    _rebuilt_checksums_match(p)


def test_ipv6_mtu_never_below_1280_and_reporter():
    inner = inner_packet(6, "tcp", 50)
    reporter = ipaddress.ip_address("2001:db8::9").packed
    reply = pmtu.too_big_reply(inner, 1000, reporter)
    p = IPv6(reply)
    assert p[ICMPv6PacketTooBig].mtu == 1280
    assert p.src == "2001:db8::9" and p.dst == "2001:db8:a::1"
    assert reply[48:] == inner
    _rebuilt_checksums_match(p)


def test_ipv6_informational_icmp_and_extension_headers_are_answered():
    echo = bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1") / IPv6ExtHdrHopByHop()
                 / IPv6ExtHdrDestOpt() / ICMPv6EchoRequest() / Raw(b"x" * 100))
    p = IPv6(pmtu.too_big_reply(echo, 1300))
    assert p[ICMPv6PacketTooBig].mtu == 1300
    _rebuilt_checksums_match(p)
    # A first fragment of an echo is answered too.
    frag = bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1") / IPv6ExtHdrFragment(m=1)
                 / ICMPv6EchoRequest() / Raw(b"x" * 96))
    assert pmtu.too_big_reply(frag, 1300) is not None
    # IPv4 ICMP echo with DF is answered.
    ping = bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="DF") / ICMP(type=8) / Raw(b"y" * 9))
    assert IP(pmtu.too_big_reply(ping, 1300))[ICMP].type == 3


ERROR6 = ICMPv6DestUnreach() / IPv6(src="2001:db8:b::1", dst="2001:db8:a::1") / UDP()
NO_REPLY = {
    "v4-no-df": inner_packet(4, "udp", 1400),
    "v4-icmp-error": bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="DF") / ICMP(type=3, code=1)
                           / IP(src="10.2.0.1", dst="10.1.0.1") / UDP()),
    "v4-time-exceeded": bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="DF") / ICMP(type=11)
                              / Raw(b"z" * 28)),
    "v4-non-first-fragment": bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="DF", frag=100,
                                      proto=17) / Raw(b"a" * 100)),
    "v4-multicast-source": inner_packet(4, "udp", 100, df=True, src="224.0.0.5"),
    "v4-broadcast-source": inner_packet(4, "udp", 100, df=True, src="255.255.255.255"),
    "v4-unspecified-source": inner_packet(4, "udp", 100, df=True, src="0.0.0.0"),
    "v4-multicast-destination": inner_packet(4, "udp", 100, df=True, dst="239.1.1.1"),
    "v4-truncated": inner_packet(4, "udp", 100, df=True)[:60],
    "v4-bad-ihl": b"\x44" + inner_packet(4, "udp", 100, df=True)[1:],
    "v4-icmp-without-type": bytes(IP(src="10.1.0.1", dst="10.2.0.1", flags="DF", proto=1)),
    "v6-icmp-error": bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1") / ERROR6),
    "v6-icmp-error-behind-headers": bytes(
        IPv6(src="2001:db8:a::1", dst="2001:db8:b::1") / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting() / IPv6ExtHdrFragment() / IPv6ExtHdrDestOpt() / ERROR6),
    "v6-ptb-error": bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1")
                          / ICMPv6PacketTooBig() / Raw(b"q" * 48)),
    "v6-non-first-icmp-fragment": bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1")
                                        / IPv6ExtHdrFragment(offset=10, nh=58)
                                        / Raw(b"\x80" * 64)),
    "v6-multicast-source": inner_packet(6, "udp", 100, src="ff02::1"),
    "v6-unspecified-source": inner_packet(6, "udp", 100, src="::"),
    "v6-multicast-destination-no-reporter": inner_packet(6, "udp", 100, dst="ff0e::1"),
    "v6-truncated": inner_packet(6, "udp", 100)[:90],
    "v6-truncated-extension": bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1", nh=0,
                                         plen=4) / Raw(b"\x11\x05\0\0")),
    "v6-icmp-without-type": bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1", nh=58)),
    "empty": b"",
    "version-5": b"\x50" + bytes(40),
}


@pytest.mark.parametrize("packet", NO_REPLY.values(), ids=NO_REPLY.keys())
def test_no_reply(packet):
    assert pmtu.too_big_reply(packet, 1280) is None


def test_ipv6_multicast_destination_with_reporter_is_answered():
    inner = inner_packet(6, "udp", 100, dst="ff0e::1")
    p = IPv6(pmtu.too_big_reply(inner, 1280, ADDR[6][0].packed))
    assert p.src == str(ADDR[6][0]) and p[ICMPv6PacketTooBig].mtu == 1280


def test_ipv6_non_first_fragment_of_udp_is_answered():
    frag = bytes(IPv6(src="2001:db8:a::1", dst="2001:db8:b::1")
                 / IPv6ExtHdrFragment(offset=10, nh=17) / Raw(b"u" * 64))
    assert pmtu.too_big_reply(frag, 1280) is not None


def _valid_ipv4(reply: bytes) -> None:
    assert len(reply) <= 576
    assert pmtu._csum(reply[:20]) == 0 and pmtu._csum(reply[20:]) == 0


def _valid_ipv6(reply: bytes) -> None:
    assert len(reply) <= 1280
    pseudo = reply[8:40] + struct.pack("!I3xB", len(reply) - 40, 58)
    assert pmtu._csum(pseudo + reply[40:]) == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1600), st.integers(0, 70000))
def test_random_bytes_never_raise(data, mtu):
    reply = pmtu.too_big_reply(data, mtu)
    if reply is not None:
        (_valid_ipv4 if reply[0] >> 4 == 4 else _valid_ipv6)(reply)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([inner_packet(4, "udp", 700, df=True), inner_packet(6, "udp", 1300),
                        NO_REPLY["v6-icmp-error-behind-headers"]]),
       st.lists(st.tuples(st.integers(0, 1400), st.integers(0, 255)), max_size=4),
       st.integers(0, 1400))
def test_mutated_packets_never_raise(packet, flips, cut):
    """Valid headers with bytes changed and the end cut off reach deeper checks."""
    data = bytearray(packet)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    reply = pmtu.too_big_reply(bytes(data[:len(data) - cut]), 1280)
    if reply is not None:
        (_valid_ipv4 if reply[0] >> 4 == 4 else _valid_ipv6)(reply)
