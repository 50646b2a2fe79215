"""Batched UDP I/O (espdp._mmsg: recvmmsg/sendmmsg) behind UdpEncapSocket.

The Python path (one recvmsg_into/sendto per datagram, ``_datagram.deliver``
and ``write_outer``) is the independent reference for what the C path does.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import select
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import inner_packet, sa_info

from espdp.engine import SA, PacketBatch
from espdp.io import UdpEncapSocket
from espdp.io._datagram import HEADER_LEN, pack_addr, write_outer
from espdp.io._sockopt import SO_MARK, SO_RCVMARK
from espdp.sa import Encap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="recvmmsg/sendmmsg are Linux's")

LOOP = {4: "127.0.0.1", 6: "::1"}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_linux_uses_the_batched_path():
    assert UdpEncapSocket.io_path == "mmsg"  # not a silent fallback to the Python path
    with UdpEncapSocket(4, 0, "127.0.0.1") as s:
        assert s.io_path == "mmsg" and s.rcvmark is True


def test_enosys_falls_back_to_python(monkeypatch):
    from espdp.io import udp

    class NoMmsg:
        def recv_batch(self, *args):
            raise OSError(errno.ENOSYS, "Function not implemented")

        send_batch = recv_batch

    monkeypatch.setattr(udp, "_mmsg", NoMmsg())
    with UdpEncapSocket(4, 0, "127.0.0.1") as rx, UdpEncapSocket(4, 0, "127.0.0.1") as tx:
        tx.send_keepalive(("127.0.0.1", rx.port))
        select.select([rx], [], [], 1)
        assert rx.read_batch(PacketBatch(4)) == 0 and rx.stats["keepalive"] == 1
        assert rx.io_path == "python" and UdpEncapSocket.io_path == "mmsg"
        batch = _encrypted(4, tx.port, rx.port, n=1)
        assert tx.write_batch(batch) == 1 and tx.io_path == "python"


def _burst(n=200):
    """``(kind, payload)`` datagrams: ESP of varied sizes, keepalives, IKE, one too big."""
    out = []
    for i in range(n):
        if i == 100:
            out.append(("trunc", b"\x00\x00\x10\x01" + bytes(3000)))
        elif i % 10 == 3:
            out.append(("keepalive", b"\xff"))
        elif i % 10 == 7:
            out.append(("ike", b"\0\0\0\0" + b"ike-%d" % i))
        else:
            body = bytes((i + j) & 0xFF for j in range(i % 50 + 1))
            out.append(("esp", (0x2000 + i).to_bytes(4, "big") + body))
    return out


def _reference(fam, payload, peer, local, local_port):
    hdr = HEADER_LEN[AF[fam]]
    pkt = bytearray(hdr + len(payload))
    write_outer(memoryview(pkt), 0, AF[fam], pack_addr(AF[fam], peer[0]), peer[1],
                pack_addr(AF[fam], local), local_port, len(payload))
    pkt[hdr:] = payload
    return bytes(pkt)


def _read_all(rx, want, batch_capacity=64, timeout=3.0):
    """Read batches until ``want`` datagrams were counted; ESP packets and marks in order."""
    packets, sizes = [], []
    deadline = time.monotonic() + timeout
    while rx.stats["received"] < want and time.monotonic() < deadline:
        select.select([rx], [], [], 0.2)
        batch = PacketBatch(batch_capacity)
        added = rx.read_batch(batch)
        assert added == batch.count
        sizes.append(added)
        for i in range(batch.count):
            assert batch.offset[i] == batch.headroom and batch.sa[i] == -1
            packets.append((batch.packet(i), int(batch.mark[i])))
    return packets, sizes


@pytest.mark.parametrize("wildcard", [False, True])
@pytest.mark.parametrize("fam", [4, 6])
def test_recv_burst_matches_python_path(fam, wildcard):
    host = LOOP[fam]
    results = {}
    for path in ("mmsg", "python"):
        seen = []
        rx = UdpEncapSocket(fam, 0, None if wildcard else host,
                            on_ike=lambda m, p, seen=seen: seen.append((m, p)))
        with rx, socket.socket(AF[fam], socket.SOCK_DGRAM) as tx, \
                socket.socket(AF[fam], socket.SOCK_DGRAM) as tx2:
            rx.io_path = path
            tx.bind((host, 0))
            tx2.bind((host, 0))
            peers = [tx.getsockname()[:2], tx2.getsockname()[:2]]
            burst = _burst()
            for i, (_, data) in enumerate(burst):
                (tx2 if i % 4 == 1 else tx).sendto(data, (host, rx.port))
            packets, sizes = _read_all(rx, len(burst))
            expect_esp = [_reference(fam, data, peers[i % 4 == 1], host, rx.port)
                          for i, (kind, data) in enumerate(burst) if kind == "esp"]
            expect_ike = [(data[4:], peers[i % 4 == 1])
                          for i, (kind, data) in enumerate(burst) if kind == "ike"]
            assert [p for p, _ in packets] == expect_esp
            assert all(mark == 0 for _, mark in packets)
            assert seen == expect_ike
            stats = {k: v for k, v in rx.stats.items() if v}
            assert stats == {"received": 200, "esp": len(expect_esp), "keepalive": 20,
                             "non_esp": 20, "truncated": 1}
            assert max(sizes) > 1 or path == "python"
            results[path] = stats
    assert results["mmsg"] == results["python"]  # (ports differ, so packets are per path)


def test_recv_ike_unhandled_and_full_batch():
    with UdpEncapSocket(4, 0, "127.0.0.1") as rx, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(10):
            tx.sendto(b"\0\0\0\0x" if i % 2 else b"\0\0\0\1esp", ("127.0.0.1", rx.port))
        select.select([rx], [], [], 1)
        time.sleep(0.05)
        batch = PacketBatch(3)
        assert rx.read_batch(batch) == 3 and batch.count == 3  # stops when full
        assert rx.read_batch(batch) == 0
        batch.clear()
        assert rx.read_batch(batch) == 2
        assert rx.stats["ike_unhandled"] == rx.stats["non_esp"] == 5
        assert rx.stats["esp"] == 5 and rx.stats["received"] == 10


def _encrypted(fam, sport, dport, n=100):
    addr = ipaddress.ip_address(LOOP[fam])
    info = dataclasses.replace(sa_info(fam, encap=True, src=addr, dst=addr),
                               encap=Encap("espinudp", sport, dport))
    out = SA(info)
    batch = PacketBatch(n + 8)
    for i in range(n):
        batch.add(inner_packet(fam, size=20 + i))
    assert out.encrypt(batch) == n
    return batch


def _recv_marked(sock, n, timeout=3.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        data, anc, _, peer = sock.recvmsg(4096, socket.CMSG_SPACE(4))
        mark = None
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_MARK:
                mark = int.from_bytes(value[:4], sys.byteorder)
        got.append((data, peer[1], mark))
    return got


@pytest.mark.parametrize("path", ["mmsg", "python"])
@pytest.mark.parametrize("fam", [4, 6])
def test_send_batch(fam, path):
    host = LOOP[fam]
    root = os.geteuid() == 0
    with UdpEncapSocket(fam, 0, host) as a, socket.socket(AF[fam], socket.SOCK_DGRAM) as b:
        a.io_path = path
        b.bind((host, 0))
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        b.setsockopt(socket.SOL_SOCKET, SO_RCVMARK, 1)
        batch = _encrypted(fam, a.port, b.getsockname()[1])
        bad = batch.add(bytes(60))                         # not IP + UDP
        marks = [0] * batch.count
        if root:  # runs of marks: the send is split at each change
            marks = [0x10 + (i // 30) if i % 50 else 0 for i in range(batch.count)]
            for i, m in enumerate(marks):
                batch.mark[i] = m
        hdr = HEADER_LEN[AF[fam]]
        expect = [batch.packet(i)[hdr:] for i in range(batch.count) if i != bad]
        assert a.write_batch(batch) == 100
        assert a.stats["sent"] == 100 and a.stats["bad_outer"] == 1
        got = _recv_marked(b, 100)
        assert [d for d, _, _ in got] == expect
        assert {p for _, p, _ in got} == {a.port}
        if root:
            # loopback keeps skb->mark: the receiver sees each packet's sender mark
            assert [m or 0 for _, _, m in got] == [m for i, m in enumerate(marks) if i != bad]
        # an index subset
        assert a.write_batch(batch, [0, 5, bad]) == 2 and a.stats["bad_outer"] == 2
        assert [d for d, _, _ in _recv_marked(b, 2)] == [expect[0], expect[5]]


def test_send_error_counted_and_continues():
    with UdpEncapSocket(4, 0, "127.0.0.1") as a, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        b.bind(("127.0.0.1", 0))
        enc = _encrypted(4, a.port, b.getsockname()[1], n=3)
        batch = PacketBatch(4, slot_size=70000)
        batch.add(enc.packet(0))
        big = bytearray(70000 - batch.headroom)  # a UDP payload over 64 KiB: EMSGSIZE
        big[:28] = enc.packet(1)[:28]
        batch.add(bytes(big))
        batch.add(enc.packet(2))
        assert a.write_batch(batch) == 2
        assert a.stats["send_errors"] == 1 and a.stats["sent"] == 2
        assert [d for d, _, _ in _recv_marked(b, 2)] == [enc.packet(i)[28:] for i in (0, 2)]


RCVMARK_CHILD = textwrap.dedent("""
    import select, socket, subprocess
    from espdp.engine import PacketBatch
    from espdp.io import UdpEncapSocket
    subprocess.check_call(["ip", "link", "set", "lo", "up"])
    for fam, host in ((4, "127.0.0.1"), (6, "::1")):
        for path in ("mmsg", "python"):
            with UdpEncapSocket(fam, 0, host) as rx:
                assert rx.rcvmark, "SO_RCVMARK not available"
                rx.io_path = path
                subprocess.run(["nft", "delete", "table", "inet", "t"], capture_output=True)
                subprocess.run(["nft", "-f", "-"], check=True, input=(
                    "table inet t {\\n chain in {\\n type filter hook input priority 0;\\n"
                    f"udp dport {rx.port} meta mark set 0x77\\n }}\\n}}\\n").encode())
                af = socket.AF_INET if fam == 4 else socket.AF_INET6
                with socket.socket(af, socket.SOCK_DGRAM) as tx:
                    tx.sendto(b"\\0\\0\\x20\\x01esp", (host, rx.port))
                    tx.sendto(b"\\0\\0\\x20\\x02esp", (host, rx.port))
                batch = PacketBatch(8)
                for _ in range(20):
                    select.select([rx], [], [], 0.2)
                    rx.read_batch(batch)
                    if batch.count == 2:
                        break
                assert batch.count == 2, (fam, path, rx.stats)
                assert list(batch.mark[:2]) == [0x77, 0x77], (fam, path, batch.mark[:2])
    print("RCVMARK-OK")
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_rcvmark_from_nftables(netns):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", RCVMARK_CHILD],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0 and "RCVMARK-OK" in res.stdout, res.stderr


def _recv_pps(path, fam=4, total=40000, chunk=2000):
    host = LOOP[fam]
    payload = b"\x00\x00\x30\x01" + bytes(60)  # 64-byte ESP-looking datagrams
    elapsed = 0.0
    with UdpEncapSocket(fam, 0, host, rcvbuf=16 << 20) as rx, \
            socket.socket(AF[fam], socket.SOCK_DGRAM) as tx:
        rx.io_path = path
        batch = PacketBatch(64)
        dest = (host, rx.port)
        for _ in range(total // chunk):
            for _ in range(chunk):
                tx.sendto(payload, dest)
            want = rx.stats["received"] + chunk
            t0 = time.perf_counter()
            while rx.stats["received"] < want:
                batch.clear()
                if not rx.read_batch(batch) and rx.stats["received"] < want:
                    select.select([rx], [], [], 0.5)
            elapsed += time.perf_counter() - t0
        assert rx.stats["esp"] == total
    return total / elapsed


def test_measure_recv_pps():
    py = _recv_pps("python")
    mm = _recv_pps("mmsg")
    print(f"\nrecv 64-byte datagrams on loopback: python {py:,.0f} pps, "
          f"recvmmsg {mm:,.0f} pps, x{mm / py:.1f}")


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("gso", [True, False])
def test_equal_sized_runs_arrive_as_separate_datagrams(fam, gso):
    """UDP GSO groups runs of equal-sized datagrams to one peer into one message;
    the receiver must still see every datagram as it was, in order."""
    host = LOOP[fam]
    with UdpEncapSocket(fam, 0, host, gso=gso) as a, \
            socket.socket(AF[fam], socket.SOCK_DGRAM) as b, \
            socket.socket(AF[fam], socket.SOCK_DGRAM) as c:
        for s in (b, c):
            s.bind((host, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        addr = ipaddress.ip_address(host)
        batches = []
        for dport in (b.getsockname()[1], c.getsockname()[1]):
            info = dataclasses.replace(sa_info(fam, encap=True, src=addr, dst=addr),
                                       encap=Encap("espinudp", a.port, dport))
            batches.append((SA(info), dport))
        batch = PacketBatch(64)
        # runs: 40 equal to b, then one shorter, then 3 to c, then 20 equal to b again
        plan = [0] * 40 + [0] + [1] * 3 + [0] * 20
        for k, which in enumerate(plan):
            verdict, packet, _ = batches[which][0].encrypt_packet(
                inner_packet(fam, size=500 if k == 40 else 1000))
            assert verdict == "ok"
            batch.add(packet)
        hdr = HEADER_LEN[AF[fam]]
        expect = [batch.packet(i)[hdr:] for i in range(batch.count)]
        assert a.write_batch(batch) == len(plan) and a.gso == gso
        to_b = [e for e, w in zip(expect, plan, strict=True) if w == 0]
        to_c = [e for e, w in zip(expect, plan, strict=True) if w == 1]
        assert [d for d, _, _ in _recv_marked(b, len(to_b))] == to_b
        assert [d for d, _, _ in _recv_marked(c, len(to_c))] == to_c


UDP_SEGMENT = 103


@pytest.mark.parametrize("fam", [4, 6])
def test_gro_cuts_coalesced_messages_across_batches(fam):
    """A sender's UDP_SEGMENT message arrives whole at a UDP_GRO socket: the
    GroReader cuts it into datagrams, carrying what does not fit over to the
    next batch, and they match what a socket without GRO receives."""
    host = LOOP[fam]
    payloads = [(0x3000 + i).to_bytes(4, "big") + bytes([i]) * 996 for i in range(40)]
    payloads[-1] = payloads[-1][:500]                        # a shorter last segment
    got = {}
    for gro in (True, False):
        rx = UdpEncapSocket(fam, 0, host, gro=gro)
        with rx, socket.socket(AF[fam], socket.SOCK_DGRAM) as tx:
            assert rx.gro is gro
            tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 1000)
            tx.sendto(b"".join(payloads), (host, rx.port))
            tx.setsockopt(socket.SOL_UDP, UDP_SEGMENT, 0)
            tx.sendto(b"\xff", (host, rx.port))                # a keepalive after it
            packets, sizes = _read_all(rx, 41, batch_capacity=16)
            got[gro] = [p for p, _ in packets]
            assert rx.stats["keepalive"] == 1 and rx.stats["esp"] == 40
            if gro:
                assert rx.stats["gro"] == 1 and sizes[0] == 16 and not rx.pending
    hdr = HEADER_LEN[AF[fam]]
    assert [p[hdr:] for p in got[True]] == payloads

    def but_ports(p):    # each run had sockets of its own
        return p[:hdr - 8] + p[hdr - 4:]
    assert list(map(but_ports, got[True])) == list(map(but_ports, got[False]))
