"""Raw ESP sockets and the kernel injector, for real, in a namespace of the
test's own: the outer header as the engine wrote it (TOS/ECN, hop limit)
crosses the wire, the received header is what the engine expects, the send
mark comes back through SO_RCVMARK, and bad slots are counted, not raised."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(r"""
    import ipaddress, socket, select, sys
    sys.path.insert(0, "tests")
    from helpers import inner_packet
    from espdp.engine import SA, PacketBatch, SATable
    from espdp.io.raw import KernelInjector, RawEspSocket
    from espdp.sa import AlgoKey, SAInfo

    for fam, host in ((4, "127.0.0.1"), (6, "::1")):
        addr = ipaddress.ip_address(host)
        info = SAInfo(src=addr, dst=addr, spi=0x3003, mode="tunnel", replay_window=32,
                      aead=AlgoKey("rfc4106(gcm(aes))", bytes(range(20)), 128))
        out, table = SA(info), SATable()
        table.add(SA(info))
        inner = inner_packet(fam, tos=0xB9)          # DSCP 46, ECT(1)
        with RawEspSocket(fam) as raw:
            assert raw.rcvmark
            tx = PacketBatch(4)
            tx.add(inner, 0x33)
            tx.add(b"\x45" + bytes(10))                  # not an ESP packet: counted
            out.encrypt(tx)
            tx.sa[1] = -1
            sent_head = tx.packet(0)[:40]
            assert raw.write_batch(tx, [0, 1]) == 1 and raw.stats["bad_outer"] == 1
            select.select([raw], [], [], 2)
            rx = PacketBatch(4)
            assert raw.read_batch(rx) == 1, raw.stats
            got = rx.packet(0)
            tclass = got[1] if fam == 4 else ((got[0] & 15) << 4) | (got[1] >> 4)
            assert tclass == 0xB9, hex(tclass)   # DSCP and ECN as the engine wrote them
            if fam == 4:
                assert got[1] == sent_head[1] and got[8] == sent_head[8]   # TOS, TTL
                assert got[12:20] == sent_head[12:20]
            else:
                assert got[:2] == sent_head[:2] and got[7] == sent_head[7]  # tclass, hops
                assert got[8:40] == sent_head[8:40] and got[6] == 50
            assert int(rx.mark[0]) == 0x33, int(rx.mark[0])
            assert table.decrypt(rx) == 1 and rx.packet(0) == inner

    # The injector: a marked packet for a local address is delivered locally.
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    recv.bind(("127.0.0.1", 7777))
    recv.settimeout(2)
    import struct
    payload = b"marked"
    udp = struct.pack("!HHHH", 5555, 7777, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0x4000, 64, 17, 0,
                      socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
    b = PacketBatch(4)
    b.add(hdr + udp, 0x42)
    b.add(b"\x10\x00")                                # neither IPv4 nor IPv6
    inj = KernelInjector()
    assert inj.write_batch(b) == 1 and inj.stats["bad_packet"] == 1
    assert recv.recv(100) == payload
    inj.close()
    print("RAW-OK")
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (raw sockets, namespaces)")
def test_raw_esp_and_injector_in_a_namespace():
    ns = f"espdp-raw-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CHILD],
                              capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0 and "RAW-OK" in proc.stdout, proc.stdout + proc.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
