"""The I/O layer: UDP encapsulation on loopback, in-memory pairs, TUN in a namespace."""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import subprocess
import sys
import textwrap

import pytest

from espdp.engine import FLAG_MAPPING, SA, PacketBatch, SATable
from espdp.io import MemoryPipe, MemoryUdp, UdpEncapSocket
from espdp.sa import AlgoKey, Encap, SAInfo

INNER = bytes.fromhex("450000140000400040000000c0a80101c0a80102")
LOOP = {4: "127.0.0.1", 6: "::1"}


def _pair(host, sport, dport):
    addr = ipaddress.ip_address(host)
    info = SAInfo(src=addr, dst=addr, spi=0x2001, mode="tunnel", replay_window=32,
                  aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128),
                  encap=Encap("espinudp", sport, dport))
    table = SATable()
    table.add(SA(info))
    return SA(info), table


def _wait(dev, timeout=2.0):
    select.select([dev], [], [], timeout)


@pytest.mark.parametrize("fam", [4, 6])
def test_udp_demux_and_synthetic_header(fam):
    host = LOOP[fam]
    seen = []
    with UdpEncapSocket(fam, 0, host, on_ike=lambda m, p: seen.append((m, p))) as rx, \
            socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6,
                          socket.SOCK_DGRAM) as tx:
        tx.bind((host, 0))
        tport = tx.getsockname()[1]
        tx.sendto(b"\xff", (host, rx.port))
        tx.sendto(b"\0\0\0\0ike!", (host, rx.port))
        tx.sendto(b"\x00\x00\x20\x01espdata", (host, rx.port))
        batch = PacketBatch(8)
        got = 0
        for _ in range(20):
            _wait(rx, 0.2)
            got += rx.read_batch(batch)
            if rx.stats["received"] == 3:
                break
        assert got == 1 and batch.count == 1
        assert rx.stats["keepalive"] == 1 and rx.stats["non_esp"] == 1
        assert seen == [(b"ike!", (host, tport))]
        pkt = batch.packet(0)
        hdr = 28 if fam == 4 else 48
        assert batch.offset[0] == batch.headroom and len(pkt) == hdr + 11
        assert pkt[hdr:] == b"\x00\x00\x20\x01espdata"
        src = pkt[12:16] if fam == 4 else pkt[8:24]
        assert socket.inet_ntop(socket.AF_INET if fam == 4 else socket.AF_INET6, src) == host
        assert int.from_bytes(pkt[hdr - 8:hdr - 6], "big") == tport
        assert int.from_bytes(pkt[hdr - 6:hdr - 4], "big") == rx.port


def test_ike_unhandled_counted():
    with UdpEncapSocket(4, 0, "127.0.0.1") as rx, UdpEncapSocket(4, 0, "127.0.0.1") as tx:
        tx.send_ike(b"x", ("127.0.0.1", rx.port))
        _wait(rx)
        assert rx.read_batch(PacketBatch(4)) == 0
        assert rx.stats["ike_unhandled"] == 1


@pytest.mark.parametrize("fam", [4, 6])
def test_udp_end_to_end_with_engine(fam):
    host = LOOP[fam]
    with UdpEncapSocket(fam, 0, host) as a, UdpEncapSocket(fam, 0, host) as b:
        out, table = _pair(host, a.port, b.port)
        batch = PacketBatch(8)
        batch.add(INNER)
        assert out.encrypt(batch) == 1
        assert a.write_batch(batch, [0]) == 1
        rx = PacketBatch(8)
        _wait(b)
        assert b.read_batch(rx) == 1
        assert table.decrypt(rx) == 1
        verdict, packet, _ = rx.result(0)
        assert (verdict, packet) == ("ok", INNER)
        assert not rx.flags[0] & FLAG_MAPPING


def test_memory_udp_end_to_end_and_mapping():
    a, b = MemoryUdp.pair(("192.0.2.1", 4500), ("192.0.2.1", 4501))
    with a, b:
        out, table = _pair("192.0.2.1", 4500, 4501)
        for rebind in (False, True):
            if rebind:
                a.addr = ("192.0.2.1", 6000)  # a NAT picked another port
            batch = PacketBatch(4)
            batch.add(INNER)
            out.encrypt(batch)
            a.send_keepalive(("192.0.2.1", 4501))
            assert a.write_batch(batch) == 1
            rx = PacketBatch(4)
            assert b.read_batch(rx) == 1 and b.stats["keepalive"] == 1 + rebind
            assert table.decrypt(rx) == 1
            assert rx.result(0)[:2] == ("ok", INNER)
            assert bool(rx.flags[0] & FLAG_MAPPING) == rebind


def test_memory_pipe():
    a, b = MemoryPipe.pair(maxlen=2)
    with a, b:
        batch = PacketBatch(4)
        for _ in range(3):
            batch.add(INNER)
        assert a.write_batch(batch) == 3 and b.stats["dropped"] == 1
        assert select.select([b], [], [], 0)[0]
        rx = PacketBatch(4)
        assert b.read_batch(rx) == 2 and rx.packet(1) == INNER
        assert rx.offset[0] == rx.headroom
        assert not select.select([b], [], [], 0)[0]


TUN_CHILD = textwrap.dedent("""
    import fcntl, json, os, select, socket, struct, subprocess, sys
    from espdp.engine import PacketBatch
    from espdp.io import Tun
    from espdp.io.tun import IFF_NO_PI, IFF_TUN, TUNSETIFF
    Tun.io_path = sys.argv[1]
    with Tun.create("espt0", mtu=1300) as tun:
        link = json.loads(subprocess.check_output(["ip", "-j", "link", "show", "espt0"]))[0]
        assert link["mtu"] == 1300 and "UP" in link["flags"], link
        assert tun.mtu == 1300 and tun.name == "espt0"
        subprocess.check_call(["ip", "addr", "add", "10.77.0.1/24", "dev", "espt0"])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("10.77.0.1", 7777))
        s.sendto(b"hello", ("10.77.0.2", 9999))
        batch, found = PacketBatch(16), None
        for _ in range(20):
            select.select([tun], [], [], 0.2)
            tun.read_batch(batch)
            for i in range(batch.count):
                p = batch.packet(i)
                if p[0] >> 4 == 4 and p[9] == 17 and p.endswith(b"hello"):
                    found = i
            if found is not None:
                break
        assert found is not None and batch.offset[found] == batch.headroom
        # kernel-bound: a UDP packet from 10.77.0.2:5555 to 10.77.0.1:7777
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 33, 0, 0, 64, 17, 0,
                          socket.inet_aton("10.77.0.2"), socket.inet_aton("10.77.0.1"))
        words = sum(struct.unpack("!10H", hdr))
        while words >> 16:
            words = (words & 0xFFFF) + (words >> 16)
        hdr = hdr[:10] + struct.pack("!H", ~words & 0xFFFF) + hdr[12:]
        out = PacketBatch(4)
        out.add(hdr + struct.pack("!HHHH", 5555, 7777, 13, 0) + b"world")
        assert tun.write_batch(out, [0]) == 1
        s.settimeout(2)
        data, peer = s.recvfrom(100)
        assert data == b"world" and peer == ("10.77.0.2", 5555), (data, peer)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"espt1", IFF_TUN | IFF_NO_PI).ljust(40, b"\\0"))
    with Tun.from_fd(fd) as tun:
        assert tun.name == "espt1" and tun.fileno() == fd
        assert tun.read_batch(PacketBatch(4)) == 0
    print("TUN-OK")
""")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
@pytest.mark.parametrize("io_path", ["c", "python"])
def test_tun_in_namespace(netns, io_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", TUN_CHILD, io_path],
                         capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 0 and "TUN-OK" in res.stdout, res.stderr


def test_tun_missing_device_is_a_config_error(monkeypatch):
    from espdp.errors import ConfigError
    from espdp.io import tun
    monkeypatch.setattr(tun, "TUN_PATH", "/nonexistent/tun")
    with pytest.raises(ConfigError, match="espx0"):
        tun.Tun.create("espx0")
