"""TUN offloads (``espdp._vnet``): cutting large TCP segments read with a
virtio-net header, and coalescing TCP segments written back.

A ``SOCK_SEQPACKET`` socketpair stands in for the TUN fd (it keeps message
boundaries as the TUN does), so each case controls exactly what "the kernel"
hands over.  scapy is the independent judge: it rebuilds every expected
segment and verifies every checksum.  The real TUN with real TCP is covered
by the namespace tests (tests/test_e2e.py, ``espdp lab``), which run with
offload on.
"""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from espdp.engine import PacketBatch

_vnet = pytest.importorskip("espdp._vnet")

HDR = 10
NEEDS_CSUM, TCPV4, TCPV6 = 1, 1, 4


def vnet_header(flags=0, gso=0, hdr_len=0, gso_size=0, csum_start=0, csum_off=0) -> bytes:
    return struct.pack("<BBHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_off)


def pseudo_partial(pkt) -> bytes:
    """The packet as the kernel hands it with CHECKSUM_PARTIAL: the L4 checksum
    field holds the (uncomplemented) pseudo-header sum."""
    raw = bytearray(bytes(pkt))
    ip = IP(bytes(raw)) if raw[0] >> 4 == 4 else IPv6(bytes(raw))
    l4 = ip.payload
    start = (raw[0] & 15) * 4 if raw[0] >> 4 == 4 else 40
    field = start + (16 if isinstance(l4, TCP) else 6)
    if raw[0] >> 4 == 4:
        pseudo = raw[12:20] + struct.pack("!BBH", 0, raw[9], len(raw) - start)
    else:
        pseudo = raw[8:40] + struct.pack("!IxxxB", len(raw) - start, raw[6])
    s = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    raw[field:field + 2] = struct.pack("!H", s)
    return bytes(raw), start, field - start


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def big_tcp(family: int, payload: bytes, flags="PA", seq=1000, ip_id=77):
    if family == 4:
        ip = IP(src="10.1.0.1", dst="10.2.0.1", id=ip_id, flags="DF", tos=0x02)
    else:
        ip = IPv6(src="fd00::1", dst="fd00::2", fl=0x12345)
    return ip / TCP(sport=40000, dport=5201, seq=seq, ack=99, flags=flags, window=502,
                    options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / payload


def expected_segments(pkt, mss: int) -> list[bytes]:
    """What the kernel's TSO would send, rebuilt by scapy (checksums computed)."""
    tcp = pkt[TCP]
    data = bytes(tcp.payload)
    out = []
    for k, off in enumerate(range(0, len(data), mss)):
        seg = pkt.copy()
        last = off + mss >= len(data)
        flags = int(tcp.flags)
        if not last:
            flags &= ~0x09
        if k:
            flags &= ~0x80
        seg[TCP].seq = (tcp.seq + off) & 0xFFFFFFFF
        seg[TCP].flags = flags
        seg[TCP].remove_payload()
        seg[TCP].add_payload(data[off:off + mss])
        del seg[TCP].chksum
        if IP in seg:
            seg[IP].id = (pkt[IP].id + k) & 0xFFFF
            del seg[IP].len, seg[IP].chksum
        else:
            del seg[IPv6].plen
        out.append(bytes(seg))
    return out


def read_all(vt, batch, stats) -> list[bytes]:
    got = []
    while True:
        batch.clear()
        n = vt.read_batch(batch, stats)
        got += [batch.packet(i) for i in range(batch.count)]
        if n == 0 and not vt.pending:
            return got


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("size", [1, 1400, 1401, 4000, 60000])
def test_tso_segments_match_the_kernels_rules(pair, family, size):
    a, b = pair
    pkt = big_tcp(family, bytes(range(256)) * (size // 256) + b"x" * (size % 256),
                  flags="FPA" if size > 1400 else "PA")
    pkt = pkt.__class__(bytes(pkt))
    mss = 1388 if family == 4 else 1368
    raw, start, off = pseudo_partial(pkt)
    hdr_len = start + len(pkt[TCP]) - len(pkt[TCP].payload)
    a.send(vnet_header(NEEDS_CSUM, TCPV4 if family == 4 else TCPV6, hdr_len, mss, start, off)
           + raw)
    vt = _vnet.VnetTun(b.fileno())
    stats = {"received": 0}
    batch = PacketBatch(8, 2304)      # small: a 60000-byte packet spans many batches
    got = read_all(vt, batch, stats)
    want = expected_segments(pkt, mss)
    assert len(got) == len(want) == stats["received"]
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"segment {k} of {len(want)} differs"
        parsed = (IP if family == 4 else IPv6)(g)
        again = parsed.copy()
        del again[TCP].chksum
        if IP in again:
            del again[IP].chksum
        assert bytes(again.__class__(bytes(again))) == g  # checksums verified by scapy
    assert stats["gso_in"] == 1


def test_partial_checksum_without_gso_is_completed(pair):
    a, b = pair
    pkt = IP(bytes(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=1, dport=2) / b"hello!"))
    raw, start, off = pseudo_partial(pkt)
    a.send(vnet_header(NEEDS_CSUM, 0, 0, 0, start, off) + raw)
    a.send(vnet_header() + bytes(pkt))        # a plain one, untouched
    vt = _vnet.VnetTun(b.fileno())
    batch = PacketBatch(8, 2304)
    stats = {"received": 0}
    assert vt.read_batch(batch, stats) == 2
    assert batch.packet(0) == bytes(pkt) == batch.packet(1)


@pytest.mark.parametrize("bad", [
    vnet_header(0, 3, 0, 1400, 20, 6),            # UFO: never asked for
    vnet_header(NEEDS_CSUM, TCPV4, 0, 0, 20, 16),  # gso_size 0
    vnet_header(NEEDS_CSUM, TCPV6, 0, 1400, 20, 16),  # TCPV6 on an IPv4 packet
    vnet_header(NEEDS_CSUM, 0, 0, 0, 150, 16),     # checksum beyond the packet (152)
])
def test_bad_headers_are_counted_and_dropped(pair, bad):
    a, b = pair
    pkt = bytes(big_tcp(4, b"y" * 100))
    a.send(bad + pkt)
    a.send(vnet_header() + pkt)
    a.send(b"\x00" * 5)                          # shorter than the header
    vt = _vnet.VnetTun(b.fileno())
    batch = PacketBatch(8, 2304)
    stats = {"received": 0}
    assert vt.read_batch(batch, stats) == 1
    assert batch.packet(0) == pkt
    assert stats["bad_offload"] == 1 and stats["truncated"] == 1


def fill(batch, packets):
    batch.clear()
    for p in packets:
        batch.add(p)


@pytest.mark.parametrize("family", [4, 6])
def test_write_coalesces_one_flow_and_the_kernel_would_cut_it_back(pair, family):
    a, b = pair
    pkt = big_tcp(family, bytes(range(256)) * 40, flags="PA")
    segs = expected_segments(pkt.__class__(bytes(pkt)), 1000)
    other = bytes(big_tcp(family, b"z" * 10, flags="A", seq=5))
    batch = PacketBatch(64, 2304)
    fill(batch, segs + [other])
    vt = _vnet.VnetTun(a.fileno())
    stats = {"sent": 0, "dropped": 0, "send_errors": 0}
    assert vt.write_batch(batch, None, stats) == len(segs) + 1
    assert stats["gso_out"] == 1
    msg = b.recv(70000)
    flags, gso, hdr_len, gso_size, start, off = struct.unpack_from("<BBHHHH", msg)
    assert (flags, gso, gso_size, off) == (NEEDS_CSUM, TCPV4 if family == 4 else TCPV6,
                                           1000, 16)
    big = msg[HDR:]
    # cut it back the way the kernel does (our reader is that code): the same segments
    c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with c, d:
        d.setblocking(False)
        c.send(msg)
        got = read_all(_vnet.VnetTun(d.fileno()), PacketBatch(64, 2304), {"received": 0})
    assert got == segs
    assert len(big) == start + hdr_len - start + sum(len(s) - hdr_len for s in segs)
    # the lone segment of another flow goes as it is, with a zero header
    assert b.recv(70000) == bytes(HDR) + other


def test_write_does_not_coalesce_across_gaps_flags_or_flows(pair):
    a, b = pair
    pkt = big_tcp(4, b"q" * 3000, flags="A")
    segs = expected_segments(pkt.__class__(bytes(pkt)), 1000)
    gap = expected_segments(big_tcp(4, b"q" * 1000, flags="A", seq=1000 + 4000), 1000)
    syn = bytes(big_tcp(4, b"", flags="S"))
    batch = PacketBatch(64, 2304)
    fill(batch, [segs[0], segs[1], gap[0], syn, segs[2]])
    vt = _vnet.VnetTun(a.fileno())
    stats = {"sent": 0, "dropped": 0, "send_errors": 0}
    assert vt.write_batch(batch, None, stats) == 5
    sizes = []
    while True:
        try:
            m = b.recv(70000)
        except BlockingIOError:
            break
        sizes.append((m[1], len(m) - HDR))
    assert sizes == [(TCPV4, len(segs[0]) + 1000), (0, len(gap[0])), (0, len(syn)),
                     (0, len(segs[2]))]
    assert stats["gso_out"] == 1


def test_write_counts_a_full_queue_as_dropped(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    packets = [bytes(big_tcp(4, b"w" * 1200, flags="A", seq=i * 5000)) for i in range(200)]
    batch = PacketBatch(200, 2304)
    fill(batch, packets)
    stats = {"sent": 0, "dropped": 0, "send_errors": 0}
    sent = _vnet.VnetTun(a.fileno()).write_batch(batch, None, stats)
    assert 0 < sent < 200 and stats["dropped"] == 200 - sent
