"""Hostile and broken input: every drop is a verdict and a counter, never an
exception and never a crash (run this module also under
``python -X faulthandler -m pytest tests/test_bad_packets.py``).

Bit flips in a valid packet may only give "ok" where the flipped bit is in a
field the ICV does not cover and the engine does not use (ALLOWED_OK below):

* outer IPv4: TOS (all of it: the inner packet is Not-ECT, so no ECN
  combination changes it, and CE over Not-ECT is "ecn_drop"), identification,
  the reserved and DF flag bits, TTL, header checksum (not verified, as IP
  does below it), source address (tunnel mode does not use it; with UDP
  encapsulation the packet gets FLAG_MAPPING);
* outer IPv6: traffic class, flow label, hop limit, source address;
* UDP: source port (FLAG_MAPPING), destination port (the engine is handed
  the packet, it does not demultiplex by port), checksum (0 over IPv4; over
  IPv6 the engine does not verify it).

Everywhere else a flip must be dropped.  In tunnel mode an "ok" must give
back the original inner packet; in transport mode the rebuilt packet is the
original with the same bit flipped (IPv4 header checksum recomputed).
"""

from __future__ import annotations

import pytest
from helpers import (
    ADDR,
    TRANSFORMS,
    decrypt_all,
    drops_total,
    esp_packet,
    esp_seal,
    inner_packet,
    ipv4_checksum_ok,
    ipv6_with_headers,
    layout,
    make_pair,
    outer_ip,
    sa_info,
    tos_of,
    transport_packet,
    with_lengths,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from espdp.engine import FLAG_MAPPING, SA, VERDICTS, PacketBatch

CONFIGS = [(t, f, e) for t in TRANSFORMS for f in (4, 6) for e in (False, True)]
CONFIG_IDS = [f"{t}-v{f}-{'udp' if e else 'esp'}" for t, f, e in CONFIGS]
DROPS = set(VERDICTS) - {"ok"}


def allowed_ok(lay, offset: int, mask: int) -> bool:
    """May flipping ``mask`` at ``offset`` of an outer packet still give "ok"?"""
    if lay.family == 4 and offset < lay.ip_len:
        if offset == 6:
            return mask & ~0xC0 == 0                  # reserved, DF; not MF or offset
        return offset in (1, 4, 5, 8, 10, 11) or 12 <= offset < 16
    if lay.family == 6 and offset < 40:
        if offset == 0:
            return mask & 0xF0 == 0                   # traffic class, not the version
        return offset in (1, 2, 3, 7) or 8 <= offset < 24
    if lay.udp is not None and lay.udp <= offset < lay.udp + 8:
        return offset - lay.udp in (0, 1, 2, 3, 6, 7)
    return False


def maps(lay, offset: int) -> bool:
    """Does the flip change what MAPPING compares (source address or port)?"""
    src = (12, 16) if lay.family == 4 else (8, 24)
    return lay.udp is not None and (src[0] <= offset < src[1] or offset in (lay.udp,
                                                                             lay.udp + 1))


def flips(packet: bytes):
    """(offset, mask, flipped packet): every single bit, and every whole byte."""
    for offset in range(len(packet)):
        for mask in (1, 2, 4, 8, 16, 32, 64, 128, 0xFF):
            p = bytearray(packet)
            p[offset] ^= mask
            yield offset, mask, bytes(p)


def assert_counters_add_up(pair, fed: int, ok: int) -> None:
    stats = pair.inb.stats()
    assert stats["packets"] == ok
    assert ok + drops_total(stats["drops"], pair.table.stats()) == fed


# ---------------------------------------------------------------- bit flips

@pytest.mark.parametrize(("transform", "family", "encap"), CONFIGS, ids=CONFIG_IDS)
def test_every_flipped_bit_is_dropped_unless_the_field_is_unprotected_and_unused(
        transform, family, encap):
    pair = make_pair(sa_info(family, transform=transform, encap=encap))   # window 0
    inner = inner_packet(4, "udp", 40)
    _, packet, _ = pair.out.encrypt_packet(inner)
    lay = layout(packet)
    cases = list(flips(packet))
    results, flags, ok = decrypt_all(pair.table, [p for _, _, p in cases])
    for (offset, mask, flipped), (verdict, got, _), flag in zip(cases, results, flags, strict=True):
        where = f"offset {offset} mask {mask:#x} -> {verdict}"
        if verdict == "ok":
            assert allowed_ok(lay, offset, mask), where
            assert got == inner, where
            assert bool(flag & FLAG_MAPPING) == maps(lay, offset), where
        else:
            assert verdict in DROPS
            if allowed_ok(lay, offset, mask):          # only CE over the Not-ECT inner
                assert verdict == "ecn_drop" and tos_of(flipped) & 3 == 3, where
    assert_counters_add_up(pair, len(cases), ok)
    assert pair.inb.stats()["integrity_failed"] > 8 * (len(packet) - lay.esp - 8)


@pytest.mark.parametrize("family", [4, 6])
def test_flipped_bits_in_transport_mode_never_change_protected_bytes(family):
    pair = make_pair(sa_info(family, mode="transport"))
    original = transport_packet(family, "tcp", 33)
    _, packet, _ = pair.out.encrypt_packet(original)
    lay = layout(packet)
    cases = list(flips(packet))
    results, _, ok = decrypt_all(pair.table, [p for _, _, p in cases])
    for (offset, mask, _), (verdict, got, _) in zip(cases, results, strict=True):
        where = f"offset {offset} mask {mask:#x} -> {verdict}"
        if verdict != "ok":
            assert verdict in DROPS and not allowed_ok(lay, offset, mask), where
            continue
        assert allowed_ok(lay, offset, mask), where
        expected = bytearray(original)
        expected[offset] ^= mask
        if family == 4:
            assert ipv4_checksum_ok(got), where
            assert got[:10] + got[12:] == bytes(expected[:10] + expected[12:]), where
        else:
            assert got == bytes(expected), where
    assert_counters_add_up(pair, len(cases), ok)


# ---------------------------------------------------------------- truncation

@pytest.mark.parametrize(("transform", "family", "encap"), CONFIGS, ids=CONFIG_IDS)
def test_every_truncation_is_dropped(transform, family, encap):
    pair = make_pair(sa_info(family, transform=transform, encap=encap, replay_window=32))
    _, packet, _ = pair.out.encrypt_packet(inner_packet(6, "icmp", 50))
    prefixes = [packet[:n] for n in range(len(packet))]
    results, _, ok = decrypt_all(pair.table, prefixes)
    assert ok == 0 and {r[0] for r in results} == {"malformed"}
    assert_counters_add_up(pair, len(prefixes), 0)


@pytest.mark.parametrize(("transform", "family", "encap"), CONFIGS, ids=CONFIG_IDS)
def test_every_truncation_with_consistent_length_fields_is_dropped(transform, family, encap):
    pair = make_pair(sa_info(family, transform=transform, encap=encap, replay_window=32))
    _, packet, _ = pair.out.encrypt_packet(inner_packet(4, "tcp", 50))
    lay = layout(packet)
    start = lay.ip_len + (8 if encap else 0)
    cut = [with_lengths(packet, n) for n in range(start, len(packet))]
    results, _, ok = decrypt_all(pair.table, cut)
    # Whatever is long enough for ESP header, IV, ICV and a trailer (and, for CBC,
    # whole blocks) reaches the ICV check and fails it; the rest is malformed.
    cbc = transform == "cbc-sha256"
    for n, (verdict, _, _) in zip(range(start, len(packet)), results, strict=True):
        text = n - lay.esp - 8 - (16 if cbc else 8) - 16
        reaches_icv = text >= 2 and (not cbc or text % 16 == 0)
        assert verdict == ("integrity" if reaches_icv else "malformed"), n
    assert ok == 0 and pair.inb.stats()["integrity_failed"] > 0
    assert_counters_add_up(pair, len(cut), 0)


# ---------------------------------------------------------------- SPI, padding, payload

@pytest.mark.parametrize("family", [4, 6])
def test_wrong_spi_finds_no_sa(family):
    pair = make_pair(sa_info(family))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    lay = layout(packet)
    for spi in (0x1000, 0x1002, 0, 0xFFFFFFFF):
        p = bytearray(packet)
        p[lay.esp:lay.esp + 4] = spi.to_bytes(4, "big")
        assert pair.table.decrypt_packet(bytes(p))[0] == "no_sa"
    assert pair.table.stats() == {"no_sa": 4}
    assert pair.inb.stats()["drops"] == {}


def padded(transform: str, payload: bytes, total_pad: int) -> bytes:
    """Standard padding of ``total_pad`` bytes, checked against the cipher's block."""
    align = 16 if transform == "cbc-sha256" else 4
    assert (len(payload) + total_pad + 2) % align == 0
    return bytes(range(1, total_pad + 1))


def pad_for(transform: str, payload: bytes, minimum: int) -> int:
    align = 16 if transform == "cbc-sha256" else 4
    n = minimum
    while (len(payload) + n + 2) % align:
        n += 1
    return n


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("damage", ["wrong-byte", "zeros", "reversed", "off-by-one-start"])
def test_padding_bytes_other_than_1_2_3_are_bad_padding(transform, damage):
    pair = make_pair(sa_info(transform=transform, replay_window=32))
    inner = inner_packet(4, "udp", 21)
    n = pad_for(transform, inner, 5)
    pad = bytearray(padded(transform, inner, n))
    if damage == "wrong-byte":
        pad[2] ^= 0x40
    elif damage == "zeros":
        pad = bytearray(n)
    elif damage == "reversed":
        pad.reverse()
    else:
        pad = bytearray(range(0, n))
    packet = esp_packet(4, esp_seal(transform, 0x1001, 1, inner, 4, pad=bytes(pad)))
    assert pair.table.decrypt_packet(packet) == ("bad_padding", None, 0)
    assert pair.inb.stats()["drops"] == {"bad_padding": 1}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_longer_than_needed_padding_is_accepted(transform):
    pair = make_pair(sa_info(transform=transform))
    inner = inner_packet(4, "udp", 21)
    for minimum in (9, 100, 240):
        n = pad_for(transform, inner, minimum)
        packet = esp_packet(4, esp_seal(transform, 0x1001, 1, inner, 4,
                                        pad=padded(transform, inner, n)))
        assert pair.table.decrypt_packet(packet)[:2] == ("ok", inner)


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("pad_len", ["255", "one-too-many", "all-of-the-text"])
def test_pad_length_larger_than_the_payload_is_bad_padding(transform, pad_len):
    pair = make_pair(sa_info(transform=transform))
    inner = inner_packet(4, "udp", 21)
    pad = padded(transform, inner, pad_for(transform, inner, 0))
    text_len = len(inner) + len(pad) + 2
    value = {"255": 255, "one-too-many": text_len - 1, "all-of-the-text": text_len - 2}[pad_len]
    packet = esp_packet(4, esp_seal(transform, 0x1001, 1, inner, 4, pad=pad, pad_len=value))
    assert pair.table.decrypt_packet(packet)[0] == "bad_padding"


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_padding_that_swallows_the_whole_payload_leaves_no_inner_packet(transform):
    pair = make_pair(sa_info(transform=transform))
    align = 16 if transform == "cbc-sha256" else 4
    pad = bytes(range(1, align * 2 - 2 + 1))          # the whole text is padding
    packet = esp_packet(4, esp_seal(transform, 0x1001, 1, b"", 4, pad=pad))
    assert pair.table.decrypt_packet(packet)[0] == "bad_inner"
    assert pair.inb.stats()["drops"] == {"bad_inner": 1}


@pytest.mark.parametrize("encap", [False, True])
@pytest.mark.parametrize("family", [4, 6])
def test_esp_header_with_nothing_after_it_is_malformed(family, encap):
    pair = make_pair(sa_info(family, encap=encap))
    for tail in (b"", bytes(8), bytes(8 + 15)):       # nothing / IV only / IV + short ICV
        header = (0x1001).to_bytes(4, "big") + (1).to_bytes(4, "big") + tail
        packet = esp_packet(family, header, encap=encap)
        assert pair.table.decrypt_packet(packet)[0] == "malformed"
    assert pair.inb.stats()["drops"] == {"malformed": 3}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_ciphertext_too_short_or_not_whole_cbc_blocks_is_malformed(transform):
    pair = make_pair(sa_info(transform=transform))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    lay = layout(packet)
    esp = packet[lay.esp:]
    cut = esp[:24 + 5] + esp[-16:] if transform == "cbc-sha256" else esp[:16 + 1] + esp[-16:]
    verdict = pair.table.decrypt_packet(esp_packet(4, cut))[0]
    assert verdict == "malformed"


# ---------------------------------------------------------------- big and random

@pytest.mark.parametrize(("transform", "family", "encap"), CONFIGS, ids=CONFIG_IDS)
def test_a_60_kb_packet_round_trips(transform, family, encap):
    pair = make_pair(sa_info(family, transform=transform, encap=encap, replay_window=64))
    inner = inner_packet(4 if family == 6 else 6, "udp", 60 * 1024)
    batch = PacketBatch(1, 65536 + 512, 256)
    batch.add(inner)
    pair.out.encrypt(batch)
    verdict, packet, _ = batch.result(0)
    assert verdict == "ok" and len(packet) > 60 * 1024
    assert pair.table.decrypt_packet(packet)[:2] == ("ok", inner)
    batch.clear()
    batch.add(inner)
    pair.out.encrypt(batch)                            # the next one, damaged in the middle
    damaged = bytearray(batch.packet(0))
    damaged[len(damaged) // 2] ^= 1
    assert pair.table.decrypt_packet(bytes(damaged))[0] == "integrity"
    assert pair.inb.stats()["packets"] == 1


GARBAGE = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@GARBAGE
@given(st.one_of(st.binary(max_size=64), st.binary(min_size=65, max_size=1600)))
def test_random_garbage_is_dropped_without_exceptions(data):
    pair = make_pair(sa_info(4, encap=True, replay_window=32))
    results, _, ok = decrypt_all(pair.table, [data], slot=2048)
    assert ok == 0 and results[0][0] in DROPS
    assert_counters_add_up(pair, 1, 0)


@st.composite
def esp_shaped(draw):
    """An outer header that reaches the SA (right family, dst, SPI, encap) and
    random bytes after the SPI, with lengths that may or may not agree."""
    family = draw(st.sampled_from([4, 6]))
    encap = draw(st.booleans())
    body = (0x1001).to_bytes(4, "big") + draw(st.binary(max_size=300))
    packet = bytearray(esp_packet(family, body, encap=encap))
    if draw(st.booleans()):                            # lie about a length
        fields = [2 if family == 4 else 4]             # IP total / payload length
        if encap:
            fields.append((20 if family == 4 else 40) + 4)   # UDP length
        at = draw(st.sampled_from(fields))
        packet[at:at + 2] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    return family, encap, bytes(packet)


@GARBAGE
@given(esp_shaped())
def test_random_esp_payload_for_a_known_sa_is_dropped_and_counted(case):
    family, encap, packet = case
    pair = make_pair(sa_info(family, encap=encap, replay_window=32))
    results, _, ok = decrypt_all(pair.table, [packet], slot=2048)
    assert ok == 0 and results[0][0] in DROPS
    assert_counters_add_up(pair, 1, 0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), esp_shaped().map(lambda c: c[2])),
                min_size=1, max_size=64))
def test_a_batch_of_garbage_with_valid_packets_keeps_the_valid_ones(junk):
    pair = make_pair(sa_info(4, replay_window=64))
    inners = [inner_packet(4, "udp", 10 + i, fill=i) for i in range(len(junk))]
    valid = [pair.out.encrypt_packet(p)[1] for p in inners]
    mixed = [x for both in zip(junk, valid, strict=True) for x in both]
    results, _, ok = decrypt_all(pair.table, mixed)
    assert ok == len(valid)
    assert [r[1] for r in results[1::2]] == inners
    assert_counters_add_up(pair, len(mixed), ok)


# ---------------------------------------------------------------- fragments, UDP length

@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x2001, 0x1FFF, 0x6000, 0x3FFF])
@pytest.mark.parametrize("encap", [False, True])
def test_ipv4_fragments_are_not_reassembled_here(frag, encap):
    pair = make_pair(sa_info(4, encap=encap))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    p = bytearray(packet)
    p[6:8] = frag.to_bytes(2, "big")
    assert pair.table.decrypt_packet(bytes(p))[0] == "fragment"
    assert pair.table.stats() == {"fragment": 1}


def test_ipv4_df_alone_is_not_a_fragment():
    pair = make_pair(sa_info(4))
    _, packet, _ = pair.out.encrypt_packet(inner_packet(df=True))
    assert packet[6:8] == b"\x40\x00"
    assert pair.table.decrypt_packet(packet)[0] == "ok"


@pytest.mark.parametrize("chain", [[44], [0, 44], [0, 60, 44]], ids=["frag", "hbh-frag",
                                                                      "hbh-dst-frag"])
@pytest.mark.parametrize("offset_and_more", [0x0001, 0x0008, 0x0009, 0xFFF8])
@pytest.mark.parametrize("encap", [False, True])
def test_ipv6_fragment_header_is_a_fragment(chain, offset_and_more, encap):
    pair = make_pair(sa_info(6, encap=encap))
    _, packet, _ = pair.out.encrypt_packet(inner_packet(6))
    frag = offset_and_more.to_bytes(2, "big") + (0xABCD).to_bytes(4, "big")
    headers = [(t, frag if t == 44 else bytes([1, 4, 0, 0, 0, 0])) for t in chain]
    assert pair.table.decrypt_packet(ipv6_with_headers(packet, headers))[0] == "fragment"


@pytest.mark.parametrize("encap", [False, True])
def test_outer_ipv6_hop_by_hop_and_destination_options_are_skipped(encap):
    pair = make_pair(sa_info(6, encap=encap))
    inner = inner_packet(4)
    _, packet, _ = pair.out.encrypt_packet(inner)
    padn = bytes([1, 4, 0, 0, 0, 0])
    longer = ipv6_with_headers(packet, [(0, padn), (60, padn + bytes(8))])
    assert pair.table.decrypt_packet(longer)[:2] == ("ok", inner)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("delta", [1, 8, 1000, "max"])
def test_udp_length_larger_than_the_packet_is_malformed(family, delta):
    pair = make_pair(sa_info(family, encap=True))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    lay = layout(packet)
    p = bytearray(packet)
    ulen = len(packet) - lay.udp
    p[lay.udp + 4:lay.udp + 6] = (0xFFFF if delta == "max" else ulen + delta).to_bytes(2, "big")
    assert pair.table.decrypt_packet(bytes(p))[0] == "malformed"
    assert pair.table.stats() == {"malformed": 1}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("ulen", [0, 1, 7, 8, 10, 15])
def test_udp_length_too_short_for_udp_and_esp_is_malformed(family, ulen):
    pair = make_pair(sa_info(family, encap=True))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    lay = layout(packet)
    p = bytearray(packet)
    p[lay.udp + 4:lay.udp + 6] = ulen.to_bytes(2, "big")
    assert pair.table.decrypt_packet(bytes(p))[0] == "malformed"


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("delta", [1, 4, 16, 40])
def test_udp_length_smaller_than_the_datagram_cuts_the_esp_short(family, delta):
    # As Linux does (udp_rcv trims the skb to the UDP length), the bytes after
    # the UDP length are not part of the datagram: the ESP packet is cut short
    # and fails its ICV (or is too short to be ESP).
    pair = make_pair(sa_info(family, encap=True, replay_window=32))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    lay = layout(packet)
    p = bytearray(packet)
    p[lay.udp + 4:lay.udp + 6] = (len(packet) - lay.udp - delta).to_bytes(2, "big")
    assert pair.table.decrypt_packet(bytes(p))[0] in ("integrity", "malformed")
    assert pair.inb.stats()["packets"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_bytes_after_the_udp_datagram_are_ignored(family):
    pair = make_pair(sa_info(family, encap=True))
    inner = inner_packet()
    _, packet, _ = pair.out.encrypt_packet(inner)
    lay = layout(packet)
    p = bytearray(packet + b"trailing junk")
    if family == 4:
        p[2:4] = len(p).to_bytes(2, "big")
    else:
        p[4:6] = (len(p) - 40).to_bytes(2, "big")
    assert pair.table.decrypt_packet(bytes(p))[:2] == ("ok", inner)
    assert lay.udp is not None


@pytest.mark.parametrize("family", [4, 6])
def test_bytes_after_the_ip_packet_are_ignored(family):
    pair = make_pair(sa_info(family))
    inner = inner_packet()
    _, packet, _ = pair.out.encrypt_packet(inner)
    assert pair.table.decrypt_packet(packet + bytes(18))[:2] == ("ok", inner)   # L2 padding


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", [1, 6, 51, 58, 255])
def test_outer_packet_that_is_neither_esp_nor_udp_is_not_esp(family, proto):
    pair = make_pair(sa_info(family))
    assert pair.table.decrypt_packet(outer_ip(family, bytes(40), proto=proto))[0] == "not_esp"
    assert pair.table.stats() == {"not_esp": 1}


def test_packet_for_another_destination_finds_no_sa():
    pair = make_pair(sa_info(4))
    _, packet, _ = pair.out.encrypt_packet(inner_packet())
    p = bytearray(packet)
    p[16:20] = ADDR[4][0].packed
    assert pair.table.decrypt_packet(bytes(p))[0] == "no_sa"


def test_sa_works_again_after_a_flood_of_bad_packets():
    pair = make_pair(sa_info(4, replay_window=32))
    inner = inner_packet()
    _, good, _ = pair.out.encrypt_packet(inner)
    bad = [good[:n] for n in range(len(good))] + [bytes(n) for n in range(100)]
    decrypt_all(pair.table, bad)
    assert pair.table.decrypt_packet(good)[:2] == ("ok", inner)
    assert SA(sa_info(4)).encrypt_packet(inner)[0] == "ok"
