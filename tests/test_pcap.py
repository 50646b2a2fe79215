"""espdp.pcap: reading captures (scapy-written and hand-built), writing them, esp_sa export."""

from __future__ import annotations

import doctest
import io
import ipaddress
import os
import stat
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Padding, Raw
from scapy.utils import EDecimal, PcapNgWriter, PcapWriter, rdpcap, wrpcap

import espdp.pcap as pcap
from espdp.errors import ConfigError
from espdp.pcap import CapturedPacket, read_packets, write_wireshark_esp_sa
from espdp.sa import AlgoKey, SAInfo

T0 = 1_700_000_000


def ip4(n: int = 0, size: int = 20) -> IP:
    return IP(src="192.0.2.1", dst="198.51.100.7", id=n) / UDP(sport=4000, dport=5000 + n) / Raw(
        bytes([n % 256]) * size)


def ip6(n: int = 0, size: int = 20) -> IPv6:
    return IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(dport=6000 + n) / Raw(b"v" * size)


def timed(pkt, t):
    pkt.time = t
    return pkt


def read_all(source) -> list[CapturedPacket]:
    return list(read_packets(source))


# ---- hand-built captures ----------------------------------------------------------

def classic(order: str, records, linktype: int, nano: bool = False) -> bytes:
    """A classic pcap; ``records`` are (sec, fraction, data[, origlen])."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for sec, frac, data, *orig in records:
        out += struct.pack(order + "IIII", sec, frac, len(data), orig[0] if orig else len(data))
        out += data
    return out


def block(order: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    size = struct.pack(order + "I", 12 + len(body))
    return struct.pack(order + "I", btype) + size + body + size


def shb(order: str) -> bytes:
    return block(order, 0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def option(order: str, code: int, value: bytes) -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def idb(order: str, linktype: int, snaplen: int = 0, *options: bytes) -> bytes:
    opts = b"".join(options) + (option(order, 0, b"") if options else b"")
    return block(order, 1, struct.pack(order + "HHI", linktype, 0, snaplen) + opts)


def epb(order: str, ifid: int, ticks: int, data: bytes, origlen: int | None = None) -> bytes:
    head = struct.pack(order + "IIIII", ifid, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                       len(data) if origlen is None else origlen)
    return block(order, 6, head + data)


def opb(order: str, ifid: int, ticks: int, data: bytes) -> bytes:
    head = struct.pack(order + "HHIIII", ifid, 0, ticks >> 32, ticks & 0xFFFFFFFF, len(data),
                       len(data))
    return block(order, 2, head + data)


def spb(order: str, data: bytes, origlen: int | None = None) -> bytes:
    return block(order, 3, struct.pack(order + "I", len(data) if origlen is None else origlen)
                 + data)


# ---- classic pcap written by scapy -------------------------------------------------

def test_ethernet_capture_yields_ip_packets_and_timestamps(tmp_path):
    pkts = [timed(Ether() / ip4(i), T0 + i + 0.123456) for i in range(3)]
    pkts.append(timed(Ether() / ip6(3), T0 + 9.5))
    wrpcap(str(tmp_path / "eth.pcap"), pkts)
    got = read_all(tmp_path / "eth.pcap")
    assert [p.index for p in got] == [0, 1, 2, 3]
    assert all(p.linktype == pcap.LINKTYPE_ETHERNET and p.ip_offset == 14 for p in got)
    assert [p.ip for p in got] == [bytes(p.payload) for p in pkts]
    assert [p.frame for p in got] == [bytes(p) for p in pkts]
    assert [p.timestamp for p in got] == pytest.approx([T0 + 0.123456, T0 + 1.123456,
                                                        T0 + 2.123456, T0 + 9.5], abs=1e-6)


def test_raw_ip_capture_is_read_as_ipv4_linktype(tmp_path):
    pkts = [timed(ip4(i), T0 + i) for i in range(2)] + [timed(ip6(2), T0 + 2)]
    wrpcap(str(tmp_path / "raw.pcap"), pkts)
    got = read_all(str(tmp_path / "raw.pcap"))
    assert {p.linktype for p in got} == {pcap.LINKTYPE_IPV4}  # what scapy picks for IP
    assert [p.ip for p in got] == [bytes(p) for p in pkts]
    assert all(p.ip_offset == 0 for p in got)


@pytest.mark.parametrize("linktype", [101, 12, 14, 228, 229])
def test_every_raw_linktype_uses_the_version_nibble(linktype):
    data = classic("<", [(T0, 0, bytes(ip4())), (T0, 0, bytes(ip6())), (T0, 0, b"\x10junk")],
                   linktype)
    assert [p.ip for p in read_all(io.BytesIO(data))] == [bytes(ip4()), bytes(ip6()), None]


def test_linux_cooked_captures_sll_and_sll2(tmp_path):
    v1 = [timed(CookedLinux(proto=0x0800) / ip4(), T0), timed(CookedLinux(proto=0x86DD) / ip6(),
                                                              T0 + 1)]
    wrpcap(str(tmp_path / "sll.pcap"), v1)
    got = read_all(tmp_path / "sll.pcap")
    assert [(p.linktype, p.ip_offset) for p in got] == [(113, 16), (113, 16)]
    assert [p.ip for p in got] == [bytes(ip4()), bytes(ip6())]

    v2 = [timed(CookedLinuxV2(proto=0x86DD) / ip6(), T0), timed(CookedLinuxV2(proto=0x0806) / ARP(),
                                                                T0)]
    wrpcap(str(tmp_path / "sll2.pcap"), v2)
    got = read_all(tmp_path / "sll2.pcap")
    assert [p.linktype for p in got] == [276, 276]
    assert [p.ip for p in got] == [bytes(ip6()), None]
    assert got[0].ip_offset == 20


def test_vlan_tags_single_and_stacked_are_skipped(tmp_path):
    pkts = [Ether() / Dot1Q(vlan=10) / ip4(), Ether() / Dot1AD(vlan=20) / Dot1Q(vlan=30) / ip6(),
            Ether() / Dot1Q(vlan=5) / ARP()]
    wrpcap(str(tmp_path / "vlan.pcap"), pkts)
    got = read_all(tmp_path / "vlan.pcap")
    assert [p.ip for p in got] == [bytes(ip4()), bytes(ip6()), None]
    assert [p.ip_offset for p in got] == [18, 22, None]


def test_nanosecond_capture_keeps_nanoseconds(tmp_path):
    pkt = timed(ip4(), EDecimal("1700000000.123456789"))
    writer = PcapWriter(str(tmp_path / "ns.pcap"), nano=True)
    writer.write(pkt)
    writer.close()
    (got,) = read_all(tmp_path / "ns.pcap")
    assert got.timestamp == 1700000000.123456789  # the float nearest, not a rounded microsecond
    assert got.ip == bytes(pkt)


@pytest.mark.parametrize("nano", [False, True])
def test_big_endian_capture_written_by_hand(nano):
    frac = 250_000_000 if nano else 250_000
    data = classic(">", [(T0, frac, bytes(Ether() / ip4())), (T0 + 1, 0, bytes(Ether() / ip6()))],
                   pcap.LINKTYPE_ETHERNET, nano)
    got = read_all(io.BytesIO(data))
    assert [p.timestamp for p in got] == [T0 + 0.25, T0 + 1]
    assert [p.ip for p in got] == [bytes(ip4()), bytes(ip6())]


@pytest.mark.parametrize(("linktype", "family", "order", "has_ip"), [
    (0, 2, "<", True), (0, 2, ">", True), (0, 24, "<", True), (0, 28, ">", True),
    (0, 30, "<", True), (108, 2, ">", True), (108, 30, "<", True), (0, 7, "<", False),
])
def test_null_and_loop_family_in_either_byte_order(linktype, family, order, has_ip):
    payload = bytes(ip6() if family != 2 else ip4())
    frame = struct.pack(order + "I", family) + payload
    (got,) = read_all(io.BytesIO(classic("<", [(T0, 0, frame)], linktype)))
    assert got.ip == (payload if has_ip else None)
    assert got.ip_offset == (4 if has_ip else None)


def test_unknown_linktype_and_non_ip_frames_yield_ip_none():
    data = classic("<", [(T0, 0, bytes(Ether() / ip4()))], 147)  # LINKTYPE_USER0
    (got,) = read_all(io.BytesIO(data))
    assert got.ip is None and got.ip_offset is None and got.linktype == 147
    arp = classic("<", [(T0, 0, bytes(Ether() / ARP())), (T0, 0, b"\x00" * 10)], 1)
    assert [p.ip for p in read_all(io.BytesIO(arp))] == [None, None]


def test_ethernet_padding_and_trailers_are_trimmed():
    small = ip4(size=2)  # 30 bytes: Ethernet pads to 60
    frames = [Ether() / small / Padding(b"\0" * 16), Ether() / ip6(size=1) / Padding(b"FCS!")]
    data = classic("<", [(T0, 0, bytes(f)) for f in frames], 1)
    got = read_all(io.BytesIO(data))
    assert [p.ip for p in got] == [bytes(small), bytes(ip6(size=1))]
    assert got[0].frame == bytes(frames[0])


def test_truncated_record_yields_the_truncated_bytes():
    full = bytes(Ether() / ip4(size=200))
    data = classic("<", [(T0, 0, full[:64], len(full))], 1)
    (got,) = read_all(io.BytesIO(data))
    assert got.ip == full[14:64]


# ---- pcapng ---------------------------------------------------------------------------

def test_pcapng_with_two_interfaces_of_different_linktypes(tmp_path):
    eth = [timed(Ether() / ip4(i), T0 + i) for i in range(2)]
    raw = [timed(ip6(i), T0 + 10 + i) for i in range(2)]
    for p in eth:
        p.sniffed_on = "eth0"
    for p in raw:
        p.sniffed_on = "ipsec0"
    writer = PcapNgWriter(str(tmp_path / "two.pcapng"))
    for p in (eth[0], raw[0], eth[1], raw[1]):
        writer.write(p)
    writer.close()
    got = read_all(tmp_path / "two.pcapng")
    assert [p.linktype for p in got] == [1, 229, 1, 229]  # LINKTYPE_IPV6
    assert [p.ip for p in got] == [bytes(eth[0].payload), bytes(raw[0]), bytes(eth[1].payload),
                                   bytes(raw[1])]
    assert [p.timestamp for p in got] == pytest.approx([T0, T0 + 10, T0 + 1, T0 + 11])
    assert [p.index for p in got] == [0, 1, 2, 3]


def test_pcapng_sections_resolutions_and_skipped_blocks():
    a, b, c = bytes(ip4(1)), bytes(ip6(2)), bytes(Ether() / ip4(3))
    ns = option("<", 9, b"\x09")  # if_tsresol 10^-9
    binary = option(">", 9, b"\x94")  # 2^-20
    offset = option(">", 14, struct.pack(">q", 100))  # if_tsoffset
    data = (shb("<") + idb("<", 101, 0, ns) + idb("<", 1, 64)
            + block("<", 4, b"\x00\x00\x00\x00")  # name resolution block
            + epb("<", 0, T0 * 10**9 + 5, a)
            + block("<", 0x40000BAD, b"custom data!")  # custom block
            + spb("<", c)  # simple packet block: interface 0 (raw), no timestamp
            + epb("<", 1, (T0 + 1) * 10**6, c)
            + block("<", 5, b"\0" * 12)  # interface statistics block
            + shb(">") + idb(">", 229, 0, binary, offset)  # second section, big-endian
            + epb(">", 0, 3 << 20, b) + opb(">", 0, 1 << 19, b)
            + block(">", 0x0A, struct.pack(">II", 0x544C534B, 8) + b"CLIENT_R"))  # secrets
    got = read_all(io.BytesIO(data))
    assert [p.index for p in got] == [0, 1, 2, 3, 4]
    assert [p.linktype for p in got] == [101, 101, 1, 229, 229]
    assert [p.ip for p in got] == [a, None, c[14:], b, b]  # SPB holds an Ethernet frame on raw
    assert [p.timestamp for p in got] == [T0 + 5e-9, 0.0, T0 + 1, 103.0, 100.5]


def test_pcapng_simple_packet_block_is_cut_to_the_snaplen():
    frame = bytes(Ether() / ip4(size=100))
    data = shb("<") + idb("<", 1, 60) + spb("<", frame)
    (got,) = read_all(io.BytesIO(data))
    assert got.frame == frame[:60] and got.ip == frame[14:60]


# ---- errors ---------------------------------------------------------------------------

def test_garbage_and_empty_files_name_the_file_and_offset(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"GIF89a" + b"\0" * 100)
    with pytest.raises(ConfigError, match=r"junk\.bin: not a pcap or pcapng file .*offset 0"):
        read_all(junk)
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.pcap: empty file.*offset 0"):
        read_all(empty)
    with pytest.raises(ConfigError, match="missing.pcap"):
        read_all(tmp_path / "missing.pcap")


def test_capture_cut_in_the_last_record_yields_the_rest_then_fails(tmp_path):
    data = classic("<", [(T0, 0, bytes(ip4(1))), (T0, 0, bytes(ip4(2)))], 101)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-5])
    packets = read_packets(cut)
    assert next(packets).ip == bytes(ip4(1))
    with pytest.raises(ConfigError, match=rf"cut\.pcap: truncated at offset {len(data) - 5}\b"):
        next(packets)


def test_capture_cut_in_a_header_fails_with_the_offset():
    data = classic("<", [(T0, 0, bytes(ip4()))], 101)
    with pytest.raises(ConfigError, match="truncated at offset 10 "):
        read_all(io.BytesIO(data[:10]))
    with pytest.raises(ConfigError, match="truncated at offset 30 .*record header"):
        read_all(io.BytesIO(data[:30]))


@pytest.mark.parametrize("build", [
    lambda: shb("<") + idb("<", 1) + epb("<", 0, 0, b"abcd")[:-2],
    lambda: classic("<", [(T0, 0, bytes(ip4()))], 101),
    lambda: shb(">") + idb(">", 101) + spb(">", bytes(ip6())) + epb(">", 0, 7, bytes(ip4())),
], ids=["pcapng-cut", "pcap", "pcapng-be"])
def test_every_prefix_of_a_capture_reads_or_raises_config_error(build):
    data = build()
    for n in range(len(data) + 1):
        try:
            read_all(io.BytesIO(data[:n]))
        except ConfigError as e:
            assert "offset" in str(e) and "\n" not in str(e)


@pytest.mark.parametrize(("data", "message"), [
    (shb("<") + struct.pack("<II", 1, 22) + b"\0" * 14, "bad length 22"),
    (shb("<") + struct.pack("<II", 6, 0x20000000), "bad length 536870912"),
    (shb("<") + struct.pack("<II", 1, 8), "bad length 8"),
    (shb("<")[:-4] + struct.pack("<I", 0), "lengths disagree"),
    (shb("<") + epb("<", 0, 0, b"data"), "interface 0, but the section describes 0"),
    (shb("<") + idb("<", 1) + epb("<", 3, 0, b"data"), "interface 3"),
    (shb("<") + idb("<", 1) + block("<", 6, struct.pack("<5I", 0, 0, 0, 99, 99)),
     "overruns its block"),
    (b"\x0a\x0d\x0d\x0a" + struct.pack("<I", 28) + b"\x11\x22\x33\x44" + b"\0" * 20,
     "byte-order magic"),
    (classic("<", [], 1) + struct.pack("<IIII", T0, 0, 0x20000000, 0x20000000),
     "record of 536870912 bytes"),
])
def test_corrupt_blocks_and_absurd_lengths_raise_config_error(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        read_all(io.BytesIO(data))
    assert "<stream>" in str(info.value) or "offset" in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\xa1\xb2\x3c\x4d"]),
       st.binary(max_size=300))
def test_random_bytes_after_a_magic_never_escape_as_other_errors(magic, tail):
    try:
        for p in read_packets(io.BytesIO(magic + tail)):
            assert isinstance(p.frame, bytes)
    except ConfigError:
        pass


# ---- writer ----------------------------------------------------------------------------

def test_writer_round_trips_through_read_packets_and_scapy(tmp_path):
    path = tmp_path / "out.pcap"
    packets = [bytes(ip4(i, size=i * 10)) for i in range(5)] + [bytes(ip6())]
    with pcap.PcapWriter(path) as writer:
        for i, p in enumerate(packets):
            writer.write(p, T0 + i / 1000)
    assert writer.count == 6
    got = read_all(path)
    assert [p.ip for p in got] == packets
    assert [p.timestamp for p in got] == pytest.approx([T0 + i / 1000 for i in range(6)],
                                                       abs=1e-6)
    assert path.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1" and got[0].linktype == 101
    theirs = rdpcap(str(path))
    assert [bytes(p) for p in theirs] == packets
    assert float(theirs[1].time) == pytest.approx(T0 + 0.001, abs=1e-6)
    assert theirs[5].haslayer(IPv6)


def test_writer_truncates_to_snaplen_and_keeps_a_file_object_open():
    buf = io.BytesIO()
    writer = pcap.PcapWriter(buf, linktype=pcap.LINKTYPE_ETHERNET, snaplen=40)
    frame = bytes(Ether() / ip4(size=100))
    writer.write(frame, T0)
    writer.close()
    writer.close()
    assert not buf.closed
    with pytest.raises(ConfigError, match="closed"):
        writer.write(frame)
    buf.seek(0)
    (got,) = read_all(buf)
    assert got.frame == frame[:40] and got.linktype == 1
    assert struct.unpack_from("<II", buf.getvalue(), 24 + 8) == (40, len(frame))


def test_writer_defaults_the_timestamp_to_now():
    buf = io.BytesIO()
    with pcap.PcapWriter(buf) as writer:
        writer.write(bytes(ip4()))
    buf.seek(0)
    (got,) = read_all(buf)
    assert abs(got.timestamp - __import__("time").time()) < 60


def test_reading_a_large_capture_does_not_hold_its_packets(tmp_path):
    path = tmp_path / "big.pcap"
    payload = bytes(ip4(size=972))  # 1000-byte packets
    with pcap.PcapWriter(path) as writer:
        for i in range(20_000):
            writer.write(payload, T0 + i)
    size = path.stat().st_size
    assert size > 20_000_000
    tracemalloc.start()
    try:
        count = sum(1 for p in read_packets(path) if p.ip is not None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20_000
    assert peak < size / 50  # a few packets and the read buffer, not the file


def test_module_example_runs():
    assert doctest.testmod(pcap).failed == 0


# ---- Wireshark esp_sa -------------------------------------------------------------------

def sa(spi: int, **kw) -> SAInfo:
    kw.setdefault("src", ipaddress.ip_address("192.0.2.1"))
    kw.setdefault("dst", ipaddress.ip_address("192.0.2.2"))
    return SAInfo(spi=spi, **kw)


K16, K20, K32, K36 = (bytes(range(n)) for n in (16, 20, 32, 36))
HEX = {n: "0x" + bytes(range(n)).hex() for n in (16, 20, 32, 36)}


def test_esp_sa_file_has_wireshark_lines_and_mode_0600(tmp_path):
    path = tmp_path / "esp_sa"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    v6 = {"src": ipaddress.ip_address("2001:db8::1"), "dst": ipaddress.ip_address("2001:db8::2")}
    entries = [
        sa(0x1001, aead=AlgoKey("rfc4106(gcm(aes))", K20, 128)),
        sa(0x1002, aead=AlgoKey("rfc4106(gcm(aes))", K20, 64), **v6),
        sa(0x1003, enc=AlgoKey("cbc(aes)", K16), auth=AlgoKey("hmac(sha256)", K32, 128), **v6),
        sa(0x1004, enc=AlgoKey("rfc3686(ctr(aes))", K20), auth=AlgoKey("hmac(sha1)", K20, 96)),
        sa(0x1005, aead=AlgoKey("rfc7539esp(chacha20,poly1305)", K36, 128)),
        sa(0x1006, enc=AlgoKey("ecb(cipher_null)", b""), auth=AlgoKey("hmac(sha512)", K32, 256),
           flags=frozenset({"esn"}), replay_oseq_hi=3),
        sa(0x1007, enc=AlgoKey("cbc(aes)", K32), auth=AlgoKey("hmac(sha384)", K32, 192),
           flags=frozenset({"esn"}), dir="in", replay_seq_hi=0x1A, replay_oseq_hi=9),
        sa(0x1008, enc=AlgoKey("aes", K16), auth=AlgoKey("md5", K16, 96)),
        sa(0x1009, enc=AlgoKey("cbc(aes)", K16), auth=AlgoKey("hmac(sha256)", K32, 96)),
        sa(0x100A, enc=AlgoKey("cbc(aes)", K16), auth=AlgoKey("cmac(aes)", K16, 96)),
        sa(0x100B, aead=AlgoKey("rfc4309(ccm(aes))", bytes(19), 128)),
        sa(0x100C, aead=AlgoKey("rfc4543(gcm(aes))", K20, 128)),
        sa(0x100D, enc=AlgoKey("cbc(aes)", K16), auth=AlgoKey("hmac(sha256)", K32, 160)),
    ]
    result = write_wireshark_esp_sa(path, entries)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert result.written == 10
    assert [spi for spi, _ in result.skipped] == [0x100B, 0x100C, 0x100D]
    assert "rfc4309(ccm(aes))" in result.skipped[0][1]
    lines = path.read_text().splitlines()
    records = [line for line in lines if not line.startswith("#")]
    assert records == [
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001001","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"{HEX[20]}","NULL","","32-bit","0"',
        f'"IPv6","2001:db8::1","2001:db8::2","0x00001002","AES-GCM with 8 octet ICV [RFC4106]",'
        f'"{HEX[20]}","NULL","","32-bit","0"',
        f'"IPv6","2001:db8::1","2001:db8::2","0x00001003","AES-CBC [RFC3602]","{HEX[16]}",'
        f'"HMAC-SHA-256-128 [RFC4868]","{HEX[32]}","32-bit","0"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001004","AES-CTR [RFC3686]","{HEX[20]}",'
        f'"HMAC-SHA-1-96 [RFC2404]","{HEX[20]}","32-bit","0"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001005","ChaCha20 with Poly1305 [RFC7634]",'
        f'"{HEX[36]}","NULL","","32-bit","0"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001006","NULL","",'
        f'"HMAC-SHA-512-256 [RFC4868]","{HEX[32]}","64-bit","3"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001007","AES-CBC [RFC3602]","{HEX[32]}",'
        f'"HMAC-SHA-384-192 [RFC4868]","{HEX[32]}","64-bit","1a"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001008","AES-CBC [RFC3602]","{HEX[16]}",'
        f'"HMAC-MD5-96 [RFC2403]","{HEX[16]}","32-bit","0"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x00001009","AES-CBC [RFC3602]","{HEX[16]}",'
        f'"HMAC-SHA-256-96 [draft-ietf-ipsec-ciph-sha-256-00]","{HEX[32]}","32-bit","0"',
        f'"IPv4","192.0.2.1","192.0.2.2","0x0000100a","AES-CBC [RFC3602]","{HEX[16]}",'
        f'"ANY 96 bit authentication [no checking]","{HEX[16]}","32-bit","0"',
    ]
    comments = "\n".join(line for line in lines if line.startswith("#"))
    assert "skipped SPI 0x0000100b" in comments and "cmac(aes)/96" in comments
    assert HEX[16][2:] not in comments  # keys only in records


def test_esp_sa_legacy_columns_skip_esn_sas(tmp_path):
    path = tmp_path / "legacy_esp_sa"
    entries = [sa(1, aead=AlgoKey("rfc4106(gcm(aes))", K20, 96)),
               sa(2, aead=AlgoKey("rfc4106(gcm(aes))", K20, 96), flags=frozenset({"esn"}))]
    result = write_wireshark_esp_sa(path, entries, esn_columns=False)
    assert result == (1, [(2, "ESN needs the SN columns of recent Wireshark")])
    records = [x for x in path.read_text().splitlines() if not x.startswith("#")]
    assert records == [f'"IPv4","192.0.2.1","192.0.2.2","0x00000001",'
                       f'"AES-GCM with 12 octet ICV [RFC4106]","{HEX[20]}","NULL",""']
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_esp_sa_write_errors_are_config_errors(tmp_path):
    entry = sa(1, aead=AlgoKey("rfc4106(gcm(aes))", K20, 128))
    with pytest.raises(ConfigError, match="no-such-dir"):
        write_wireshark_esp_sa(tmp_path / "no-such-dir" / "esp_sa", [entry])
