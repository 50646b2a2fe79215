"""Raw ESP sockets and the kernel injector, for real, between two network
namespaces of the test's own joined by a veth pair: the outer header as the
engine wrote it (TOS/ECN, DF, TTL, traffic class, flow label, hop limit)
crosses the wire, the received header is what the engine decrypts, the send
mark is seen by nftables on the way out, the receive mark set by nftables
lands in ``batch.mark`` (SO_RCVMARK) and selects the inbound SA, injected
packets carry their mark through the kernel's hooks and routing, and bad
slots are counted, never raised.

Each test runs one child Python that moves between the two namespaces with
``setns(2)`` (sockets stay in the namespace they were made in); the
namespaces are deleted in ``finally``, also when the test fails.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_IDS = itertools.count(1)

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root (raw sockets, namespaces, nftables)")

PRELUDE = textwrap.dedent(r"""
    import ctypes, ipaddress, json, os, select, socket, struct, subprocess, sys, time
    sys.path.insert(0, "tests")
    from helpers import inner_packet
    from espdp.engine import SA, PacketBatch, SATable
    from espdp.io import KernelInjector, RawEspSocket
    from espdp.sa import AlgoKey, Mark, SAInfo

    NS_A, NS_B, FAM, ADDR_A, ADDR_B = sys.argv[1:6]
    FAM, SEND_PATH = int(FAM), (sys.argv[6:] or [None])[0]
    _libc = ctypes.CDLL(None, use_errno=True)

    def enter(ns):
        fd = os.open("/run/netns/" + ns, os.O_RDONLY)
        try:
            if _libc.setns(fd, 0x40000000) != 0:          # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns " + ns)
        finally:
            os.close(fd)

    def sa_pair(**inbound):
        info = SAInfo(src=ipaddress.ip_address(ADDR_A), dst=ipaddress.ip_address(ADDR_B),
                      spi=0x3003, mode="tunnel", replay_window=32,
                      aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128))
        table = SATable()
        table.add(SA(info.replace(**inbound)))
        return SA(info), table

    def receive(dev, batch, want=1, timeout=3.0):
        end = time.monotonic() + timeout
        while batch.count < want and time.monotonic() < end:
            select.select([dev], [], [], 0.1)
            dev.read_batch(batch)
        return batch.count

    def counter(ns, name):
        out = subprocess.check_output(["ip", "netns", "exec", ns, "nft", "-j", "list",
                                       "counter", "inet", "t", name])
        return [x["counter"]["packets"] for x in json.loads(out)["nftables"]
                if "counter" in x][0]

    def tclass(p):
        return p[1] if p[0] >> 4 == 4 else ((p[0] & 15) << 4) | (p[1] >> 4)
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _nft(ns: str, ruleset: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset,
                         text=True, capture_output=True, timeout=10)
    assert res.returncode == 0, res.stderr


@pytest.fixture
def two_ns():
    """Namespaces A and B, veth vA (x.1, fd..::1) -- vB (x.2, fd..::2); always deleted."""
    n = next(_IDS)
    tag = f"{os.getpid()}-{n}"
    a, b = f"espdp-rawA-{tag}", f"espdp-rawB-{tag}"
    x, y = os.getpid() % 250 + 1, n % 250 + 1
    addrs = {4: (f"10.{x}.{y}.1", f"10.{x}.{y}.2"),
             6: (f"fd00:{x:x}:{y:x}::1", f"fd00:{x:x}:{y:x}::2")}
    made = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", "vA", "type", "veth", "peer", "name", "vB", "netns", b)
        for ns, dev, i in ((a, "vA", 0), (b, "vB", 1)):
            _ip("-n", ns, "addr", "add", addrs[4][i] + "/24", "dev", dev)
            _ip("-n", ns, "addr", "add", addrs[6][i] + "/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        yield a, b, addrs
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _run(two_ns, fam: int, body: str, *extra: str) -> str:
    a, b, addrs = two_ns
    code = PRELUDE + textwrap.dedent(body) + "\nprint('CHILD-OK')\n"
    proc = subprocess.run([sys.executable, "-c", code, a, b, str(fam), *addrs[fam], *extra],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fam,send_path", [(4, "hdrincl"), (6, "hdrincl"), (6, "sendmsg")])
def test_raw_esp_between_namespaces(two_ns, fam, send_path):
    """A encrypts and sends with a mark; B receives and decrypts the same inner
    packet; the outer header's TOS/ECN (and the rest) arrives as written.
    ``sendmsg``: the IPv6 path for kernels without IPV6_HDRINCL, forced here."""
    _nft(two_ns[0], """
        table inet t {
            counter marked {}
            chain out { type filter hook output priority 0;
                        meta l4proto esp meta mark 0x33 counter name marked; }
        }""")
    _run(two_ns, fam, r"""
        out, table = sa_pair()
        inner = inner_packet(FAM, tos=0xB9, df=True, flow=0x12345)   # DSCP 46, ECT(1)
        enter(NS_B)
        rx_dev = RawEspSocket(FAM, rcvmark=True)
        enter(NS_A)
        with RawEspSocket(FAM) as tx_dev, rx_dev:
            assert tx_dev.hdrincl, "IPV6_HDRINCL refused"
            if SEND_PATH == "sendmsg":
                tx_dev.sock.setsockopt(socket.IPPROTO_IPV6, 36, 0)
                tx_dev.hdrincl = False
            tx = PacketBatch(4)
            tx.add(inner, 0x33)
            assert out.encrypt(tx) == 1, tx.result(0)
            sent = tx.packet(0)
            assert tclass(sent) == 0xB9, hex(tclass(sent))
            assert tx_dev.write_batch(tx) == 1, tx_dev.stats
            rx = PacketBatch(4)
            assert receive(rx_dev, rx) == 1, rx_dev.stats
            got = rx.packet(0)
            assert rx.offset[0] == rx.headroom and len(got) == len(sent)
            assert tclass(got) == 0xB9, hex(tclass(got))      # DSCP and ECN as written
            if FAM == 4:
                assert got[1] == sent[1] and got[8] == sent[8]          # TOS, TTL
                assert got[6] & 0x40 == sent[6] & 0x40                  # DF
                assert got[9] == 50 and got[12:20] == sent[12:20]
            elif tx_dev.hdrincl:                                       # all of it, flow label too
                assert got[:8] == sent[:8], (got[:8].hex(), sent[:8].hex())
                assert got[8:40] == sent[8:40]
            else:                                  # the kernel picks the flow label
                assert got[4:8] == sent[4:8] and got[8:40] == sent[8:40]
            # the mark does not cross the veth (another namespace): 0 here
            assert int(rx.mark[0]) == 0, int(rx.mark[0])
            assert table.decrypt(rx) == 1 and rx.result(0)[:2] == ("ok", inner)
            assert rx_dev.stats["esp"] == 1 and tx_dev.stats["sent"] == 1
        assert counter(NS_A, "marked") == 1       # SO_MARK was on the packet that left
    """, send_path)


@pytest.mark.parametrize("fam", [4, 6])
def test_rcvmark_from_nftables_selects_sa_and_injects(two_ns, fam):
    """B's nftables marks incoming ESP 0x77: the mark lands in batch.mark, an
    inbound SA with mark 0x77 decrypts it, and its set-mark 0x42 goes with the
    inner packet through the KernelInjector into B's stack."""
    _nft(two_ns[1], """
        table inet t {
            counter injected {}
            chain pre { type filter hook prerouting priority -150;
                        meta l4proto esp meta mark set 0x77; }
            chain inp { type filter hook input priority 0;
                        meta l4proto udp meta mark 0x42 counter name injected; }
        }""")
    _run(two_ns, fam, r"""
        out, table = sa_pair(mark=Mark(0x77), set_mark=Mark(0x42))
        inner = inner_packet(FAM, src=ADDR_A, dst=ADDR_B, fill=9)
        enter(NS_B)
        rx_dev = RawEspSocket(FAM)
        assert rx_dev.rcvmark and rx_dev.rcvmark_supported, "SO_RCVMARK not available"
        inj = KernelInjector()
        sink = socket.socket(socket.AF_INET if FAM == 4 else socket.AF_INET6,
                             socket.SOCK_DGRAM)
        sink.bind((ADDR_B, 5678))
        sink.settimeout(3)
        enter(NS_A)
        with RawEspSocket(FAM) as tx_dev, rx_dev, inj, sink:
            tx = PacketBatch(4)
            tx.add(inner)
            out.encrypt(tx)
            assert tx_dev.write_batch(tx) == 1, tx_dev.stats
            rx = PacketBatch(4)
            assert receive(rx_dev, rx) == 1, rx_dev.stats
            assert int(rx.mark[0]) == 0x77, hex(int(rx.mark[0]))
            assert table.decrypt(rx) == 1, rx.result(0)[0]
            verdict, packet, mark = rx.result(0)
            assert (verdict, packet, mark) == ("ok", inner, 0x42), (verdict, mark)
            assert inj.write_batch(rx, [0]) == 1, inj.stats
            data, peer = sink.recvfrom(2048)
            assert data == inner[-64:] and peer[0] == ADDR_A
        assert counter(NS_B, "injected") == 1
    """)


@pytest.mark.parametrize("fam", [4, 6])
def test_injector_mark_is_seen_by_nftables_and_routing(two_ns, fam):
    """Marked and unmarked injected packets for B's own address are both
    delivered, only the marked one counted by ``meta mark 0x42``; towards a
    prefix that ``fwmark 0x42`` sends to a blackhole, the marked packet is
    refused (counted) and the unmarked one leaves by the main table."""
    a, b, addrs = two_ns
    far = "10.254.9.0/24" if fam == 4 else "fd00:fe:9::/64"
    v = f"-{fam}"
    _ip("-n", b, v, "rule", "add", "fwmark", "0x42", "lookup", "100")
    _ip("-n", b, v, "route", "add", "blackhole", far, "table", "100")
    _ip("-n", b, v, "route", "add", far, "via", addrs[fam][0])
    _nft(b, """
        table inet t {
            counter marked {}
            counter every {}
            chain inp { type filter hook input priority 0;
                        udp dport 5678 counter name every;
                        udp dport 5678 meta mark 0x42 counter name marked; }
        }""")
    _run(two_ns, fam, r"""
        far = "10.254.9.5" if FAM == 4 else "fd00:fe:9::5"
        enter(NS_B)
        sink = socket.socket(socket.AF_INET if FAM == 4 else socket.AF_INET6,
                             socket.SOCK_DGRAM)
        sink.bind((ADDR_B, 5678))
        sink.settimeout(3)
        with KernelInjector() as inj, sink:
            assert inj.fileno() >= 0 and repr(inj) == "<KernelInjector>"
            batch = PacketBatch(8)
            batch.add(inner_packet(FAM, src=ADDR_A, dst=ADDR_B, fill=1), 0x42)
            batch.add(inner_packet(FAM, src=ADDR_A, dst=ADDR_B, fill=2), 0)
            assert inj.write_batch(batch) == 2, inj.stats
            got = sorted(sink.recv(2048)[0] for _ in range(2))
            assert got == [1, 2], got
            assert counter(NS_B, "marked") == 1 and counter(NS_B, "every") == 2

            batch = PacketBatch(8)
            batch.add(inner_packet(FAM, src=ADDR_B, dst=far, fill=3), 0x42)
            batch.add(inner_packet(FAM, src=ADDR_B, dst=far, fill=4), 0)
            assert inj.write_batch(batch) == 1, inj.stats
            assert inj.stats["send_errors"] == 1 and inj.stats["sent"] == 3, inj.stats
    """)


@pytest.mark.parametrize("fam", [4, 6])
def test_bad_and_short_packets_do_not_raise(two_ns, fam):
    """Slots that are not whole outer packets of the family, a packet beyond the
    MTU, an unroutable destination and a short ESP packet on the wire are all
    counted; nothing raises."""
    _run(two_ns, fam, r"""
        out, table = sa_pair()
        enter(NS_B)
        rx_dev = RawEspSocket(FAM)
        enter(NS_A)
        other = "10.253.0.1" if FAM == 4 else "fd00:fd::1"
        def outer(dst, payload, proto=50):
            a, b = ipaddress.ip_address(ADDR_A).packed, ipaddress.ip_address(dst).packed
            if FAM == 4:
                return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64,
                                   proto, 0, a, b) + payload
            return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, a, b) + payload
        with RawEspSocket(FAM) as tx_dev, rx_dev:
            tx = PacketBatch(8, 4096)
            tx.add(b"")                                   # empty
            tx.add(b"\x45\x00")                           # short
            tx.add(b"\x10" + bytes(60))                   # neither version
            tx.add(outer(ADDR_B, bytes(16), proto=17))    # not ESP
            tx.add(outer(ADDR_B, bytes(3000)))            # beyond the veth MTU
            tx.add(outer(other, bytes(16)))               # no route
            tx.add(outer(ADDR_B, b"\x00\x00\x30\x03"))    # a short ESP packet
            assert tx_dev.write_batch(tx) == 1, tx_dev.stats
            assert tx_dev.stats["bad_outer"] == 4, tx_dev.stats
            assert tx_dev.stats["send_errors"] == 2, tx_dev.stats
            rx = PacketBatch(4)
            assert receive(rx_dev, rx) == 1, rx_dev.stats
            assert rx.packet(0)[-4:] == b"\x00\x00\x30\x03"
            assert table.decrypt(rx) == 0 and rx.result(0)[0] != "ok"
            batch = PacketBatch(4)
            batch.add(b"")
            batch.add(b"\x45" + bytes(5))
            batch.add(b"\x60" + bytes(20))
            with KernelInjector() as inj:
                assert inj.write_batch(batch) == 0 and inj.stats["bad_packet"] == 3
            print(repr(tx_dev), tx_dev.stats, rx_dev.stats)
    """)


def test_not_permitted_is_a_config_error():
    """Without CAP_NET_RAW (an unprivileged uid) both devices say what they need."""
    code = textwrap.dedent(r"""
        import os
        from espdp.errors import ConfigError
        from espdp.io import KernelInjector, RawEspSocket
        os.setgroups([])          # after the imports: nobody may not read the interpreter's
        os.setgid(65534)
        os.setuid(65534)
        for make in (KernelInjector, lambda: RawEspSocket(4), lambda: RawEspSocket(6)):
            try:
                make()
            except ConfigError as e:
                assert "CAP_NET_RAW" in str(e), str(e)
            else:
                raise AssertionError("no ConfigError")
        print("CHILD-OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, cwd="/", env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, proc.stdout + proc.stderr
