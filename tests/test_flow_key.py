"""flow_key: packets with the same key have the same flow (what makes the
dataplane's per-batch decision cache exact)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ICMP, IP, TCP, UDP, ICMPv6EchoRequest, IPv6, IPv6ExtHdrHopByHop, Raw

from espdp.xfrm.policy import flow_key, flow_of_packet


def _packets():
    out = []
    for sport in (1, 2):
        out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=sport, dport=80)))
        out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=sport, dport=53)))
        out.append(bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=sport, dport=53)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 4) / TCP(sport=1)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=10, proto=6) / Raw(b"x" * 8)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=11, proto=6) / Raw(b"y" * 8)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, code=0)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=0, code=0)))
    out.append(bytes(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=9)))
    out.append(bytes(IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / Raw(b"gre!")))
    return out


def test_equal_keys_mean_equal_flows_and_different_flows_different_keys():
    packets = _packets()
    for p in packets:
        for q in packets:
            if flow_key(p) is not None and flow_key(p) == flow_key(q):
                assert flow_of_packet(p) == flow_of_packet(q)
            if flow_of_packet(p) != flow_of_packet(q):
                assert flow_key(p) != flow_key(q) or flow_key(p) is None


def test_ipv6_extension_headers_are_not_keyed():
    p = bytes(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / UDP(sport=1))
    assert flow_key(p) is None and flow_of_packet(p) is not None


@settings(max_examples=3000)
@given(st.binary(min_size=0, max_size=80), st.binary(min_size=0, max_size=80))
def test_random_bytes_never_break_the_rule(a, b):
    for p in (a, b, bytes([0x45]) + a[1:], bytes([0x60]) + b[1:]):
        key = flow_key(p)
        if key is None:
            continue
        for q in (a, b, bytes([0x45]) + a[1:], bytes([0x60]) + b[1:]):
            if flow_key(q) == key:
                assert flow_of_packet(p) == flow_of_packet(q)
