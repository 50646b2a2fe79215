"""The engine's XFRM semantics, one behaviour per test: sequence numbers,
lifetimes, marks, directions, encapsulation, dummy packets, TFC, ECN/DSCP,
DF, TTL, MAPPING, IPv6 extension headers, configuration errors and the batch
API against one packet at a time (XFRM-NOTES.md; RFC 4303, 3948, 6040)."""

from __future__ import annotations

import pytest
from helpers import (
    ADDR,
    CBC_KEY,
    GCM_KEY,
    HMAC_KEY,
    M32,
    decrypt_flags,
    encrypt_flags,
    esp_open,
    esp_packet,
    esp_seal,
    esp_seq,
    inner_packet,
    ipv4_checksum_ok,
    layout,
    make_pair,
    outer_ip,
    rewrite_outer,
    sa_info,
    tos_of,
    transport_packet,
    udp6_checksum_ok,
    udp_header,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.packet import Raw

from espdp.engine import FLAG_MAPPING, FLAG_SOFT_EXPIRED, SA, PacketBatch, SATable
from espdp.errors import ConfigError
from espdp.sa import AlgoKey, Lifetime, Mark

ECT0, ECT1, CE = 2, 1, 3


def seqs(sa: SA, n: int) -> list:
    """Wire sequence numbers of the next n packets (None when refused)."""
    out = []
    for i in range(n):
        verdict, packet, _ = sa.encrypt_packet(inner_packet(size=10, fill=i))
        out.append(esp_seq(packet) if verdict == "ok" else verdict)
    return out


# ---------------------------------------------------------------- sequence numbers

def test_first_sequence_number_is_one_by_default():
    assert seqs(SA(sa_info()), 3) == [1, 2, 3]


def test_sequence_numbers_start_after_replay_oseq():
    sa = SA(sa_info(replay_oseq=41))
    assert seqs(sa, 3) == [42, 43, 44]
    assert sa.oseq == 44


def test_outbound_sequence_number_overflow_is_refused_counted_and_never_wraps():
    sa = SA(sa_info())
    sa.oseq = M32 - 1
    assert seqs(sa, 4) == [M32, "seq_overflow", "seq_overflow", "seq_overflow"]
    assert sa.oseq == M32
    stats = sa.stats()
    assert stats["drops"] == {"seq_overflow": 3} and stats["packets"] == 1


def test_replay_oseq_at_the_limit_refuses_the_first_packet():
    sa = SA(sa_info(replay_oseq=M32))
    assert seqs(sa, 1) == ["seq_overflow"]


def test_oseq_may_wrap_lets_the_32_bit_counter_wrap_as_xfrm_does():
    # Linux: ++oseq wraps to 0 and, with the flag, that packet goes out with 0.
    sa = SA(sa_info(extra_flags=frozenset({"oseq-may-wrap"})))
    sa.oseq = M32 - 1
    assert seqs(sa, 4) == [M32, 0, 1, 2]
    assert sa.stats()["drops"] == {}


def test_esn_low_half_wraps_into_the_high_half_and_decrypts_across():
    esn = frozenset({"esn"})
    pair = make_pair(sa_info(flags=esn, replay_window=64, replay_oseq=M32 - 2),
                     inbound=dict(replay_seq=M32 - 10))
    inners = [inner_packet(4, "tcp", 50, fill=i) for i in range(5)]
    packets = [pair.out.encrypt_packet(p)[1] for p in inners]
    assert [esp_seq(p) for p in packets] == [M32 - 1, M32, 0, 1, 2]
    assert pair.out.oseq == 2**32 + 2
    for inner, packet in zip(inners, packets, strict=True):
        assert pair.table.decrypt_packet(packet)[:2] == ("ok", inner)
    assert pair.inb.replay_top == 2**32 + 2


def test_esn_oseq_hi_sets_the_high_half_of_the_first_sequence_number():
    sa = SA(sa_info(flags=frozenset({"esn"}), replay_window=32, replay_oseq_hi=3,
                    replay_oseq=7))
    assert seqs(sa, 1) == [8] and sa.oseq == 3 << 32 | 8


def test_esn_refuses_only_the_64_bit_wrap():
    sa = SA(sa_info(flags=frozenset({"esn"}), replay_window=32))
    sa.oseq = 2**64 - 2
    assert seqs(sa, 2) == [M32, "seq_overflow"]


# ---------------------------------------------------------------- lifetimes

@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("limit", ["hard_packets", "hard_bytes"])
def test_hard_limit_of_zero_drops_the_first_packet(side, limit):
    lifetime = {"lifetime": Lifetime(**{limit: 0})}
    pair = make_pair(sa_info(), **{"outbound" if side == "out" else "inbound": lifetime})
    inner = inner_packet()
    if side == "out":
        assert pair.out.encrypt_packet(inner)[0] == "limit"
        assert pair.out.stats()["drops"] == {"limit": 1}
    else:
        assert pair.roundtrip(inner)[0] == "limit"
        assert pair.inb.stats()["drops"] == {"limit": 1}


@pytest.mark.parametrize("side", ["out", "in"])
def test_hard_packet_limit_of_n_lets_n_packets_through(side):
    lifetime = {"lifetime": Lifetime(hard_packets=3)}
    pair = make_pair(sa_info(), **{"outbound" if side == "out" else "inbound": lifetime})
    verdicts = []
    for i in range(5):
        verdict, outer, _ = pair.out.encrypt_packet(inner_packet(fill=i))
        if verdict == "ok":
            verdict = pair.table.decrypt_packet(outer)[0]
        verdicts.append(verdict)
    assert verdicts == ["ok"] * 3 + ["limit"] * 2
    sa = pair.out if side == "out" else pair.inb
    assert sa.stats()["packets"] == 3 and sa.stats()["drops"] == {"limit": 2}


@pytest.mark.parametrize("side", ["out", "in"])
def test_hard_byte_limit_stops_once_the_counted_bytes_reach_it(side):
    inner = inner_packet(size=72)                  # 100 bytes: tunnel mode counts the inner packet
    assert len(inner) == 100
    lifetime = {"lifetime": Lifetime(hard_bytes=201)}
    pair = make_pair(sa_info(), **{"outbound" if side == "out" else "inbound": lifetime})
    verdicts = []
    for _ in range(5):
        verdict, outer, _ = pair.out.encrypt_packet(inner)
        verdicts.append(pair.table.decrypt_packet(outer)[0] if verdict == "ok" else verdict)
    assert verdicts == ["ok"] * 3 + ["limit"] * 2   # 0, 100, 200 < 201; 300 is not
    sa = pair.out if side == "out" else pair.inb
    assert sa.stats()["bytes"] == 300


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("limit", [dict(soft_packets=3), dict(soft_bytes=250)])
def test_soft_limit_flags_exactly_one_packet_the_one_after_it_as_linux_does(side, limit):
    inner = inner_packet(size=72)                  # 100 bytes
    pair = make_pair(sa_info(), **{"outbound" if side == "out" else "inbound":
                                   {"lifetime": Lifetime(**limit)}})
    flags = []
    for _ in range(6):
        verdict, outer, _, out_flags = encrypt_flags(pair.out, inner)
        assert verdict == "ok"
        verdict, got, _, in_flags = decrypt_flags(pair.table, outer)
        assert (verdict, got) == ("ok", inner)
        flags.append(bool((out_flags if side == "out" else in_flags) & FLAG_SOFT_EXPIRED))
    # xfrm_state_check_expire compares the counts before the packet: 3 packets
    # (300 bytes) have passed when the 4th arrives.
    assert flags == [False, False, False, True, False, False]
    assert (pair.out if side == "out" else pair.inb).soft_expired


def test_soft_limit_of_zero_flags_the_first_packet():
    sa = SA(sa_info(lifetime=Lifetime(soft_packets=0)))
    flags = [encrypt_flags(sa, inner_packet())[3] for _ in range(3)]
    assert flags == [FLAG_SOFT_EXPIRED, 0, 0]


# ---------------------------------------------------------------- marks

def test_inbound_lookup_matches_the_packet_mark_under_the_sa_mask():
    pair = make_pair(sa_info(), inbound=dict(mark=Mark(0x10, 0xF0)))
    inner = inner_packet()
    _, outer, _ = pair.out.encrypt_packet(inner)
    assert pair.table.decrypt_packet(outer, mark=0x1F)[:2] == ("ok", inner)
    assert pair.table.decrypt_packet(outer, mark=0x20)[0] == "no_sa"
    assert pair.table.stats() == {"no_sa": 1}


def test_mark_without_mask_must_match_exactly():
    pair = make_pair(sa_info(), inbound=dict(mark=Mark(5)))
    _, outer, _ = pair.out.encrypt_packet(inner_packet())
    assert pair.table.decrypt_packet(outer, mark=0x105)[0] == "no_sa"
    assert pair.table.decrypt_packet(outer, mark=5)[0] == "ok"


def test_sas_sharing_an_spi_are_told_apart_by_mark():
    info = sa_info()
    first, second = SA(info.replace(mark=Mark(1, 0xFF))), SA(info.replace(mark=Mark(2, 0xFF)))
    table = SATable()
    table.add(first)
    table.add(second)
    _, outer, _ = SA(info).encrypt_packet(inner_packet())
    assert table.decrypt_packet(outer, mark=0x302)[0] == "ok"
    assert (first.stats()["packets"], second.stats()["packets"]) == (0, 1)
    assert table.lookup(ADDR[4][1], info.spi, 0x301) is first


def test_inbound_set_mark_rewrites_the_decrypted_packet_mark_after_lookup():
    pair = make_pair(sa_info(), inbound=dict(mark=Mark(0x1234), set_mark=Mark(0x500, 0xF00)))
    _, outer, _ = pair.out.encrypt_packet(inner_packet())
    verdict, _, mark = pair.table.decrypt_packet(outer, mark=0x1234)
    assert (verdict, mark) == ("ok", (0x1234 & ~0xF00) | 0x500)


def test_output_mark_rewrites_the_encrypted_packet_mark():
    sa = SA(sa_info(set_mark=Mark(0xAB00, 0xFF00)))
    verdict, _, mark = sa.encrypt_packet(inner_packet(), mark=0x12345678)
    assert (verdict, mark) == ("ok", 0x1234AB78)
    assert SA(sa_info(set_mark=Mark(7))).encrypt_packet(inner_packet(), mark=0x99)[2] == 7


def test_without_set_mark_the_mark_passes_unchanged():
    pair = make_pair(sa_info())
    verdict, outer, mark = pair.out.encrypt_packet(inner_packet(), mark=0xCAFE)
    assert mark == 0xCAFE
    assert pair.table.decrypt_packet(outer, mark=0xBEEF)[2] == 0xBEEF


# ---------------------------------------------------------------- direction

def test_inbound_sa_refuses_to_encrypt():
    sa = SA(sa_info(dir="in", replay_window=32))
    assert sa.encrypt_packet(inner_packet()) == ("wrong_dir", None, 0)


def test_outbound_sa_refuses_to_decrypt_and_counts_it():
    info = sa_info()
    table = SATable()
    out_only = SA(info.replace(dir="out"))
    table.add(out_only)
    _, outer, _ = SA(info).encrypt_packet(inner_packet())
    assert table.decrypt_packet(outer)[0] == "wrong_dir"
    assert out_only.stats()["drops"] == {"wrong_dir": 1}


@pytest.mark.parametrize("case", ["wrong_dir", "bad_inner", "malformed"])
def test_every_outbound_drop_is_counted(case):
    if case == "wrong_dir":
        sa, packet = SA(sa_info(dir="in", replay_window=32)), inner_packet()
    elif case == "bad_inner":       # transport mode over IPv4 given an IPv6 packet
        sa, packet = SA(sa_info(mode="transport")), inner_packet(6)
    else:
        sa, packet = SA(sa_info()), b"\x45" + bytes(30)
    assert sa.encrypt_packet(packet)[0] == case
    assert sa.stats()["drops"] == {case: 1}


# ---------------------------------------------------------------- UDP encapsulation

@pytest.mark.parametrize("family", [4, 6])
def test_sa_with_encap_refuses_raw_esp(family):
    raw = make_pair(sa_info(family))
    encap = make_pair(sa_info(family, encap=True))
    _, outer, _ = raw.out.encrypt_packet(inner_packet())
    assert encap.table.decrypt_packet(outer)[0] == "encap_mismatch"
    assert encap.inb.stats()["drops"] == {"encap_mismatch": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_sa_without_encap_refuses_esp_in_udp(family):
    raw = make_pair(sa_info(family))
    encap = make_pair(sa_info(family, encap=True))
    _, outer, _ = encap.out.encrypt_packet(inner_packet())
    assert raw.table.decrypt_packet(outer)[0] == "encap_mismatch"
    assert raw.inb.stats()["drops"] == {"encap_mismatch": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_nat_keepalive_is_eaten_and_counted(family):
    pair = make_pair(sa_info(family, encap=True))
    packet = outer_ip(family, udp_header(b"\xff"), proto=17)
    assert pair.table.decrypt_packet(packet) == ("keepalive", None, 0)
    assert pair.table.stats() == {"keepalive": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_non_esp_marker_is_left_to_ike(family):
    pair = make_pair(sa_info(family, encap=True))
    ike = bytes(4) + bytes(range(28))              # marker + an IKE header's worth
    assert pair.table.decrypt_packet(outer_ip(family, udp_header(ike), proto=17))[0] == "non_esp"
    assert pair.table.stats() == {"non_esp": 1}


@pytest.mark.parametrize("family", [4, 6])
def test_esp_in_udp_round_trips(family):
    pair = make_pair(sa_info(family, encap=True))
    inner = inner_packet(family, "udp", 300)
    _, outer, _ = pair.out.encrypt_packet(inner)
    lay = layout(outer)
    assert lay.udp is not None and outer[lay.udp:lay.udp + 4] == bytes.fromhex("11941194")
    assert int.from_bytes(outer[lay.udp + 4:lay.udp + 6], "big") == len(outer) - lay.ip_len
    checksum = int.from_bytes(outer[lay.udp + 6:lay.udp + 8], "big")
    assert checksum == 0 if family == 4 else udp6_checksum_ok(outer, lay.udp)
    assert pair.table.decrypt_packet(outer)[:2] == ("ok", inner)


# ---------------------------------------------------------------- dummy packets, TFC

@pytest.mark.parametrize("transform", ["gcm", "cbc-sha256"])
def test_dummy_packet_is_authenticated_then_dropped_and_counted(transform):
    pair = make_pair(sa_info(transform=transform, replay_window=32))
    payload = bytes(range(14)) if transform == "gcm" else bytes(30)
    dummy = esp_packet(4, esp_seal(transform, 0x1001, 1, payload, 59))
    assert pair.table.decrypt_packet(dummy) == ("dummy", None, 0)
    assert pair.inb.stats()["drops"] == {"dummy": 1}
    assert pair.inb.replay_top == 1                # it was authentic: the window moved
    assert pair.table.decrypt_packet(dummy)[0] == "replay"


def test_dummy_packet_with_a_bad_icv_is_an_integrity_failure():
    pair = make_pair(sa_info())
    dummy = bytearray(esp_packet(4, esp_seal("gcm", 0x1001, 1, bytes(14), 59)))
    dummy[-1] ^= 1
    assert pair.table.decrypt_packet(bytes(dummy))[0] == "integrity"


@pytest.mark.parametrize("family", [4, 6])
def test_tfc_padding_is_added_on_output_and_removed_on_input(family):
    tfc = make_pair(sa_info(family, tfcpad=400))
    plain = make_pair(sa_info(family))
    inner = inner_packet(family, "udp", 30)
    _, padded, _ = tfc.out.encrypt_packet(inner)
    _, unpadded, _ = plain.out.encrypt_packet(inner)
    assert len(unpadded) < len(inner) + 100 < 400 < len(padded)
    text = esp_open("gcm", padded[layout(padded).esp:])
    assert len(text) >= 400 and text[:len(inner)] == inner
    assert set(text[len(inner):400]) == {0}        # TFC padding is zeros
    assert tfc.table.decrypt_packet(padded)[:2] == ("ok", inner)


def test_tfc_padding_leaves_packets_longer_than_tfcpad_alone():
    tfc, plain = make_pair(sa_info(tfcpad=200)), make_pair(sa_info())
    inner = inner_packet(4, "tcp", 400)
    padded, unpadded = tfc.out.encrypt_packet(inner)[1], plain.out.encrypt_packet(inner)[1]
    assert len(padded) == len(unpadded)
    assert tfc.table.decrypt_packet(padded)[:2] == ("ok", inner)


# ---------------------------------------------------------------- ECN and DSCP (RFC 6040)

@pytest.mark.parametrize("outer_family", [4, 6])
@pytest.mark.parametrize("inner_family", [4, 6])
@pytest.mark.parametrize("tos", [0xB8 | ECT0, 0xB8 | CE, 0x28 | ECT1, 0x00])
def test_encap_copies_inner_dscp_and_ecn_to_the_outer_header(outer_family, inner_family, tos):
    sa = SA(sa_info(outer_family))
    _, outer, _ = sa.encrypt_packet(inner_packet(inner_family, tos=tos))
    assert tos_of(outer) == tos


def test_noecn_clears_the_outer_ecn_field():
    sa = SA(sa_info(flags=frozenset({"noecn"})))
    _, outer, _ = sa.encrypt_packet(inner_packet(tos=0xB8 | CE))
    assert tos_of(outer) == 0xB8


def test_dont_encap_dscp_clears_the_outer_dscp():
    sa = SA(sa_info(extra_flags=frozenset({"dont-encap-dscp"})))
    _, outer, _ = sa.encrypt_packet(inner_packet(tos=0xB8 | ECT0))
    assert tos_of(outer) == ECT0


def decap_with_outer_tos(pair, inner: bytes, outer_tos: int):
    _, outer, _ = pair.out.encrypt_packet(inner)
    return pair.table.decrypt_packet(rewrite_outer(outer, tos=outer_tos))


@pytest.mark.parametrize("outer_family", [4, 6])
@pytest.mark.parametrize("inner_family", [4, 6])
def test_outer_ce_over_ect_inner_marks_the_inner_packet_ce(outer_family, inner_family):
    pair = make_pair(sa_info(outer_family))
    inner = inner_packet(inner_family, "tcp", 100, tos=0x28 | ECT0, flow=0x12345)
    verdict, got, _ = decap_with_outer_tos(pair, inner, 0x28 | CE)
    assert verdict == "ok" and tos_of(got) == 0x28 | CE
    if inner_family == 4:
        assert ipv4_checksum_ok(got)
        assert got[:1] + got[2:10] + got[12:] == inner[:1] + inner[2:10] + inner[12:]
    else:   # only the traffic class changed, the flow label stayed
        assert got[:4] == bytes.fromhex("6" + "2b" + "12345")
        assert got[4:] == inner[4:]


@pytest.mark.parametrize("inner_family", [4, 6])
def test_outer_ce_over_not_ect_inner_is_dropped(inner_family):
    pair = make_pair(sa_info())
    verdict, _, _ = decap_with_outer_tos(pair, inner_packet(inner_family, tos=0x28), 0x28 | CE)
    assert verdict == "ecn_drop"
    assert pair.inb.stats()["drops"] == {"ecn_drop": 1}


def test_outer_ect1_over_ect0_inner_becomes_ect1():
    pair = make_pair(sa_info())
    verdict, got, _ = decap_with_outer_tos(pair, inner_packet(tos=ECT0), ECT1)
    assert verdict == "ok" and tos_of(got) == ECT1 and ipv4_checksum_ok(got)


@pytest.mark.parametrize("outer_ecn", [0, ECT0, ECT1])
def test_outer_without_ce_leaves_a_not_ect_inner_alone(outer_ecn):
    pair = make_pair(sa_info())
    inner = inner_packet(tos=0)
    assert decap_with_outer_tos(pair, inner, outer_ecn)[:2] == ("ok", inner)


def test_noecn_on_the_inbound_sa_skips_ecn_decapsulation():
    pair = make_pair(sa_info(flags=frozenset({"noecn"})))
    inner = inner_packet(tos=0)
    assert decap_with_outer_tos(pair, inner, CE)[:2] == ("ok", inner)


@pytest.mark.parametrize("inner_family", [4, 6])
def test_decap_dscp_copies_the_outer_dscp_to_the_inner_packet(inner_family):
    pair = make_pair(sa_info(flags=frozenset({"decap-dscp"})))
    verdict, got, _ = decap_with_outer_tos(pair, inner_packet(inner_family, tos=ECT0), 0xB8)
    assert verdict == "ok" and tos_of(got) == 0xB8 | ECT0
    if inner_family == 4:
        assert ipv4_checksum_ok(got)


def test_without_decap_dscp_the_inner_dscp_is_kept():
    pair = make_pair(sa_info())
    inner = inner_packet(tos=0x28 | ECT0)
    assert decap_with_outer_tos(pair, inner, 0xB8 | ECT0)[:2] == ("ok", inner)


# ---------------------------------------------------------------- DF and TTL

@pytest.mark.parametrize(("inner", "flags", "df"), [
    (dict(family=4, df=True), frozenset(), True),
    (dict(family=4, df=False), frozenset(), False),
    (dict(family=6), frozenset(), True),
    (dict(family=4, df=True), frozenset({"nopmtudisc"}), False),
    (dict(family=6), frozenset({"nopmtudisc"}), False),
], ids=["v4-df", "v4-no-df", "v6", "v4-df-nopmtudisc", "v6-nopmtudisc"])
def test_outer_df_is_copied_from_ipv4_set_for_ipv6_and_cleared_by_nopmtudisc(inner, flags, df):
    sa = SA(sa_info(4, flags=flags))
    _, outer, _ = sa.encrypt_packet(inner_packet(**inner))
    assert int.from_bytes(outer[6:8], "big") == (0x4000 if df else 0)


@pytest.mark.parametrize("family", [4, 6])
def test_outer_ttl_comes_from_the_sa(family):
    for ttl in (17, 64, 255):
        _, outer, _ = SA(sa_info(family, ttl=ttl)).encrypt_packet(inner_packet())
        assert outer[8 if family == 4 else 7] == ttl
        assert family == 6 or ipv4_checksum_ok(outer)


# ---------------------------------------------------------------- MAPPING

@pytest.mark.parametrize("family", [4, 6])
def test_mapping_is_not_flagged_for_the_expected_address_and_port(family):
    pair = make_pair(sa_info(family, encap=True))
    _, outer, _ = pair.out.encrypt_packet(inner_packet())
    assert decrypt_flags(pair.table, outer)[3] & FLAG_MAPPING == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("change", ["src", "sport"])
def test_mapping_is_flagged_after_a_good_icv_from_another_address_or_port(family, change):
    pair = make_pair(sa_info(family, encap=True))
    inner = inner_packet(family)
    _, outer, _ = pair.out.encrypt_packet(inner)
    moved = rewrite_outer(outer, **({"src": "198.51.100.7" if family == 4 else "2001:db8::77"}
                                    if change == "src" else {"sport": 40123}))
    verdict, got, _, flags = decrypt_flags(pair.table, moved)
    assert (verdict, got) == ("ok", inner) and flags & FLAG_MAPPING


@pytest.mark.parametrize("family", [4, 6])
def test_mapping_is_not_flagged_when_the_icv_fails(family):
    pair = make_pair(sa_info(family, encap=True))
    _, outer, _ = pair.out.encrypt_packet(inner_packet(family))
    moved = bytearray(rewrite_outer(outer, sport=40123))
    moved[-1] ^= 0x80
    verdict, _, _, flags = decrypt_flags(pair.table, bytes(moved))
    assert verdict == "integrity" and not flags & FLAG_MAPPING


def test_mapping_is_only_for_sas_with_encap():
    pair = make_pair(sa_info(4))
    _, outer, _ = pair.out.encrypt_packet(inner_packet())
    verdict, _, _, flags = decrypt_flags(pair.table, rewrite_outer(outer, src="198.51.100.7"))
    assert verdict == "ok" and not flags & FLAG_MAPPING


# ---------------------------------------------------------------- transport mode

@pytest.mark.parametrize("chain", ["hbh+rt", "dst+rt", "hbh+rt+dst"])
@pytest.mark.parametrize("encap", [False, True])
def test_transport_ipv6_puts_esp_after_hop_by_hop_and_routing_headers(chain, encap):
    src, dst = ADDR[6]
    headers = {"hbh": IPv6ExtHdrHopByHop(), "dst": IPv6ExtHdrDestOpt(),
               "rt": IPv6ExtHdrRouting(addresses=["2001:db8::99"], segleft=1)}
    pkt = IPv6(src=str(src), dst=str(dst), hlim=9, tc=0x20, fl=0xABCDE)
    names = chain.split("+")
    for name in names:
        pkt = pkt / headers[name]
    inner = bytes(pkt / UDP(sport=1, dport=2) / Raw(b"payload!" * 5))
    before = 40 + 8 + 24                           # ESP goes before a trailing dst-opts
    pair = make_pair(sa_info(6, mode="transport", encap=encap))
    verdict, outer, _ = pair.out.encrypt_packet(inner)
    assert verdict == "ok"
    rt_nh = 40 + 8                                 # next-header byte of the routing header
    expected = bytearray(inner[:before])
    expected[rt_nh] = 17 if encap else 50
    expected[4:6] = (len(outer) - 40).to_bytes(2, "big")
    assert outer[:before] == bytes(expected)
    spi_at = before + (8 if encap else 0)
    assert outer[spi_at:spi_at + 4] == (0x1001).to_bytes(4, "big")
    assert pair.table.decrypt_packet(outer)[:2] == ("ok", inner)


@pytest.mark.parametrize("encap", [False, True])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["udp", "tcp", "icmp"])
def test_transport_mode_rebuilds_the_original_packet(family, proto, encap):
    pair = make_pair(sa_info(family, mode="transport", transform="cbc-sha256", encap=encap))
    inner = transport_packet(family, proto, 123, tos=0x28)
    verdict, outer, _ = pair.out.encrypt_packet(inner)
    assert verdict == "ok" and outer[(8 if family == 4 else 7)] == 61   # header kept
    lay = layout(outer)
    assert (lay.udp is not None) == encap
    if family == 4:
        assert ipv4_checksum_ok(outer)
    elif encap:
        assert udp6_checksum_ok(outer, lay.udp)
    got = pair.table.decrypt_packet(outer)[:2]
    assert got == ("ok", inner)


# ---------------------------------------------------------------- every transform

ALL_TRANSFORMS = {
    "gcm16": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128)),
    "gcm8-256": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(36)), 64)),
    "gcm12-192": dict(aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(28)), 96)),
    "ccm8": dict(aead=AlgoKey("rfc4309(ccm(aes))", bytes(range(19)), 64)),
    "ccm16-256": dict(aead=AlgoKey("rfc4309(ccm(aes))", bytes(range(35)), 128)),
    "gmac": dict(aead=AlgoKey("rfc4543(gcm(aes))", bytes(range(20)), 128)),
    "chacha": dict(aead=AlgoKey("rfc7539esp(chacha20,poly1305)", bytes(range(36)), 128)),
    "ctr-sha1": dict(enc=AlgoKey("rfc3686(ctr(aes))", bytes(range(20))),
                     auth=AlgoKey("hmac(sha1)", bytes(20), 96)),
    "null-sha512": dict(enc=AlgoKey("ecb(cipher_null)", b""),
                        auth=AlgoKey("hmac(sha512)", bytes(64), 256)),
    "cbc-cmac": dict(enc=AlgoKey("cbc(aes)", bytes(32)), auth=AlgoKey("cmac(aes)", bytes(16), 96)),
    "cbc-md5": dict(enc=AlgoKey("cbc(aes)", bytes(24)), auth=AlgoKey("hmac(md5)", bytes(16), 128)),
    "cbc-sha384": dict(enc=AlgoKey("cbc(aes)", bytes(16)),
                       auth=AlgoKey("hmac(sha384)", bytes(48), 384)),
}


@settings(max_examples=200, deadline=None)
@given(transform=st.sampled_from(sorted(ALL_TRANSFORMS)), family=st.sampled_from([4, 6]),
       inner_family=st.sampled_from([4, 6]), mode=st.sampled_from(["tunnel", "transport"]),
       encap=st.booleans(), esn=st.booleans(), proto=st.sampled_from(["udp", "tcp", "icmp"]),
       size=st.integers(0, 1400), tos=st.integers(0, 255), start=st.integers(0, 2**33))
def test_every_transform_mode_and_family_round_trips(transform, family, inner_family, mode,
                                                     encap, esn, proto, size, tos, start):
    info = sa_info(family, mode, **{"aead": None, **ALL_TRANSFORMS[transform]}, encap=encap,
                   replay_window=64, flags=frozenset({"esn"}) if esn else frozenset())
    if not esn:
        start %= 2**32 - 2
    pair = make_pair(info, inbound=dict(replay_seq=start & M32, replay_seq_hi=start >> 32))
    pair.out.oseq = start
    if mode == "transport":
        inner = transport_packet(family, proto, size, tos=tos)
    else:
        inner = inner_packet(inner_family, proto, size, tos=tos)
    verdict, outer, _ = pair.out.encrypt_packet(inner)
    assert verdict == "ok"
    assert esp_seq(outer) == (start + 1) & M32
    assert pair.table.decrypt_packet(outer)[:2] == ("ok", inner)
    assert pair.table.decrypt_packet(outer)[0] == "replay"


# ---------------------------------------------------------------- configuration errors

BAD_CONFIGS = {
    "aead-with-auth": dict(auth=AlgoKey("hmac(sha256)", HMAC_KEY, 128)),
    "enc-without-auth": dict(aead=None, enc=AlgoKey("cbc(aes)", CBC_KEY)),
    "aead-key-length": dict(aead=AlgoKey("rfc4106(gcm(aes))", GCM_KEY[:-1], 128)),
    "enc-key-length": dict(aead=None, enc=AlgoKey("cbc(aes)", CBC_KEY + b"\1"),
                           auth=AlgoKey("hmac(sha256)", HMAC_KEY, 128)),
    "auth-key-length": dict(aead=None, enc=AlgoKey("cbc(aes)", CBC_KEY),
                            auth=AlgoKey("hmac(sha256)", HMAC_KEY[:20], 128)),
    "aead-icv-bits": dict(aead=AlgoKey("rfc4106(gcm(aes))", GCM_KEY, 100)),
    "auth-icv-bits": dict(aead=None, enc=AlgoKey("cbc(aes)", CBC_KEY),
                          auth=AlgoKey("hmac(sha256)", HMAC_KEY, 80)),
    "auth-icv-too-long": dict(aead=None, enc=AlgoKey("cbc(aes)", CBC_KEY),
                              auth=AlgoKey("hmac(sha256)", HMAC_KEY, 288)),
    "esn-inbound-window-0": dict(flags=frozenset({"esn"}), replay_window=0, dir="in"),
    "esn-any-dir-window-0": dict(flags=frozenset({"esn"}), replay_window=0),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_invalid_sa_is_refused_with_a_message_that_shows_no_key(name):
    info = sa_info(**BAD_CONFIGS[name])
    for attempt in (info.validate, lambda: SA(info)):
        with pytest.raises(ConfigError) as error:
            attempt()
        message = str(error.value)
        assert message
        for key in (GCM_KEY, CBC_KEY, HMAC_KEY):
            assert key.hex()[:8] not in message.lower() and repr(key)[2:10] not in message


def test_esn_with_window_zero_is_fine_on_an_outbound_sa():
    SA(sa_info(flags=frozenset({"esn"}), replay_window=0, dir="out"))


# ---------------------------------------------------------------- batches

def mixed_infos():
    return [
        sa_info(4, "tunnel", "gcm", spi=0x100),
        sa_info(6, "tunnel", "chacha", encap=True, spi=0x200, flags=frozenset({"esn"}),
                replay_window=64, set_mark=Mark(0x70000, 0xF0000)),
        sa_info(4, "transport", "cbc-sha256", spi=0x300, replay_window=32),
        sa_info(6, "transport", "gcm", encap=True, spi=0x400, tfcpad=300),
        sa_info(4, "tunnel", "cbc-sha256", encap=True, spi=0x500, tfcpad=500),
    ]


def mixed_packets(infos):
    """(packet, mark, sa index) x 64, with a few the engine must refuse."""
    out = []
    for i in range(64):
        k = (i * 7 + i // 5) % len(infos)
        info = infos[k]
        proto = ("udp", "tcp", "icmp")[i % 3]
        size = (i * 97) % 1300
        family = info.family if info.mode == "transport" else (4, 6)[i % 2]
        if info.mode == "transport":
            packet = transport_packet(family, proto, size, tos=i % 4)
        else:
            packet = inner_packet(family, proto, size, tos=(i * 9) % 256, df=bool(i % 3))
        if i == 13:
            packet = b"\x45" + bytes(30)                  # malformed
        if i == 29:
            packet = inner_packet(6)                      # IPv6 into IPv4 transport: bad_inner
            k = 2
        if i == 41:
            packet = inner_packet(4, "udp", 1880)         # fits a slot, its ESP does not
        out.append((packet, i * 0x10001, k))
    return out


def test_batch_of_mixed_packets_matches_one_packet_at_a_time():
    infos = mixed_infos()
    items = mixed_packets(infos)
    out_table, in_table = SATable(), SATable()
    for info in infos:
        out_table.add(SA(info))
        in_table.add(SA(info))
    singles_out = [SA(info) for info in infos]
    singles_in = SATable()
    for info in infos:
        singles_in.add(SA(info))

    batch = PacketBatch(64)
    for packet, mark, k in items:
        batch.add(packet, mark, k)
    assert out_table.encrypt(batch) == sum(batch.verdict == 0)
    encrypted = [batch.result(i) for i in range(64)]
    expected = [singles_out[k].encrypt_packet(packet, mark) for packet, mark, k in items]
    assert [e[0] for e in encrypted] == [e[0] for e in expected]
    assert {e[0] for e in encrypted} == {"ok", "malformed", "bad_inner", "too_big"}
    for (_, _, k), got, want in zip(items, encrypted, expected, strict=True):
        assert got[2] == want[2]
        if got[0] == "ok":
            assert len(got[1]) == len(want[1])
            if infos[k].aead is not None:
                assert got[1] == want[1]              # IV = sequence number: same bytes

    back = PacketBatch(64)
    sent = [(i, e) for i, e in enumerate(encrypted) if e[0] == "ok"]
    for _, (_, packet, mark) in sent:
        back.add(packet, mark)
    assert in_table.decrypt(back) == len(sent)
    for j, (i, (_, packet, mark)) in enumerate(sent):
        verdict, inner, new_mark = back.result(j)
        assert (verdict, inner) == ("ok", items[i][0])
        assert (verdict, inner, new_mark) == singles_in.decrypt_packet(packet, mark)
        assert back.sa[j] == items[i][2]
    for k in range(len(infos)):
        assert in_table[k].stats() == singles_in[k].stats()
        assert out_table[k].stats()["packets"] == singles_out[k].stats()["packets"]


def test_table_encrypt_reports_no_sa_for_an_unknown_index():
    table = SATable()
    table.add(SA(sa_info()))
    batch = PacketBatch(3)
    for index in (0, -1, 7):
        batch.add(inner_packet(), 0, index)
    assert table.encrypt(batch) == 1
    assert [batch.result(i)[0] for i in range(3)] == ["ok", "no_sa", "no_sa"]
    # -1 is "the caller chose no SA" (counted by the caller), 7 an SA that is gone.
    assert table.stats() == {"no_sa": 1}


# ---------------------------------------------------------------- too big

def test_packet_too_large_for_the_slot_is_too_big_and_counted():
    sa = SA(sa_info())
    inner = inner_packet(4, "udp", 1880)            # fits the 1920 bytes after the headroom
    assert sa.encrypt_packet(inner)[0] == "too_big"  # ... but not with ESP's trailer and ICV
    assert sa.stats()["drops"] == {"too_big": 1}
    assert sa.oseq == 0                             # no sequence number was used


def test_packet_longer_than_a_slot_cannot_be_added_to_a_batch():
    with pytest.raises(ConfigError):
        PacketBatch(1).add(inner_packet(4, "udp", 1900))


def test_too_little_headroom_is_too_big():
    sa = SA(sa_info(encap=True))
    batch = PacketBatch(1, 2048, 16)                 # outer IPv4 + UDP + ESP needs 36
    batch.add(inner_packet())
    sa.encrypt(batch)
    assert batch.result(0)[0] == "too_big"


def test_packet_just_fitting_the_slot_is_encrypted():
    sa = SA(sa_info())
    # slot 2048, headroom 128: inner + 2 (pad length, next header) + pad + 16 (ICV) <= 1920
    inner = inner_packet(4, "udp", 1920 - 16 - 2 - 28)
    assert len(inner) % 4 == 2
    assert sa.encrypt_packet(inner)[0] == "ok"
    assert sa.encrypt_packet(inner_packet(4, "udp", 1920 - 16 - 2 - 28 + 1))[0] == "too_big"


def test_esp_packet_longer_than_65535_bytes_is_refused():
    sa = SA(sa_info())
    batch = PacketBatch(1, 70000, 128)
    batch.add(inner_packet(4, "udp", 65535 - 28))
    sa.encrypt(batch)
    verdict, outer, _ = batch.result(0)
    assert verdict != "ok", f"ok with IPv4 total length {int.from_bytes(outer[2:4], 'big')}"
