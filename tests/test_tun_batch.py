"""TUN batch I/O (``Tun.read_batch`` / ``Tun.write_batch``) against a real TUN device
in a network namespace of its own, on the C path (``_mmsg.tun_read_batch`` /
``tun_write_batch``, GIL released) and the Python fallback.

Each case runs in a child python under ``ip netns exec``; the namespace is created
and deleted here.  The benchmark prints (never asserts) packets per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from espdp.engine import PacketBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_root_tun = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun")

CHILD = textwrap.dedent("""
    import json, os, select, socket, struct, subprocess, sys, time
    from espdp.engine import PacketBatch
    from espdp.io.tun import Tun

    MODE, PATH = sys.argv[1], sys.argv[2]
    LOCAL, PEER = "10.88.0.1", "10.88.0.2"

    def csum(data):
        if len(data) % 2:
            data += b"\\0"
        s = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF

    def udp4(src, dst, sport, dport, payload, ident=0):
        src, dst = socket.inet_aton(src), socket.inet_aton(dst)
        ulen = 8 + len(payload)
        pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
        uc = csum(pseudo + struct.pack("!HHHH", sport, dport, ulen, 0) + payload) or 0xFFFF
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ident, 0x4000, 64, 17, 0,
                          src, dst)
        hdr = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:]
        return hdr + struct.pack("!HHHH", sport, dport, ulen, uc) + payload

    def ours(p, port=9999):
        # IPv4 UDP to PEER:port (the kernel may also send IPv6 router solicitations)
        return (len(p) >= 28 and p[0] == 0x45 and p[9] == 17
                and p[16:20] == socket.inet_aton(PEER) and p[22:24] == struct.pack("!H", port))

    def read_all(tun, want, batch, timeout=5.0, port=9999):
        got, deadline = [], time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            select.select([tun], [], [], 0.1)
            batch.count = 0
            n = tun.read_batch(batch)
            assert n == batch.count, (n, batch.count)
            for i in range(n):
                assert batch.offset[i] == batch.headroom and batch.mark[i] == 0
                assert batch.sa[i] == -1
                p = batch.packet(i)
                if ours(p, port):
                    got.append(p[28:])
        return got

    def payload(k, size):
        return (k.to_bytes(4, "big") * (size // 4 + 1))[:size]

    Tun.io_path = PATH
    out = {}
    for conf in ("all", "default"):     # no IPv6 router solicitations or MLD reports
        with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
            f.write("1")
    with Tun.create("esptb0", mtu=1400) as tun:
        subprocess.check_call(["ip", "link", "set", "esptb0", "txqueuelen", "4000"])
        subprocess.check_call(["ip", "addr", "add", LOCAL + "/24", "dev", "esptb0"])
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind((LOCAL, 0))
        if MODE == "roundtrip":
            # 500 datagrams of varied sizes into the TUN, read back in batches of 64
            sizes = [1 + (k * 37) % 1372 for k in range(500)]
            sent = [payload(k, sizes[k]) for k in range(500)]
            for data in sent:
                tx.sendto(data, (PEER, 9999))
            got = read_all(tun, 500, PacketBatch(64))
            assert len(got) == 500, len(got)
            assert got == sent, [k for k in range(500) if got[k] != sent[k]][:5]
            assert tun.stats["received"] >= 500 and tun.stats["truncated"] == 0, tun.stats
            # 500 kernel-bound IPv4 UDP packets written back, received by a socket
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            rx.bind((LOCAL, 7777))
            back = [payload(1000 + k, 1 + (k * 53) % 1300) for k in range(500)]
            batch = PacketBatch(500)
            for k, data in enumerate(back):
                batch.add(udp4(PEER, LOCAL, 5555, 7777, data, ident=k))
            # explicit indexes: a range, then a list (more than one C chunk of 64 each)
            written = tun.write_batch(batch, range(0, 300))
            written += tun.write_batch(batch, list(range(300, 500)))
            assert written == 500 and tun.stats["sent"] == 500, tun.stats
            assert tun.stats["dropped"] == 0 and tun.stats["send_errors"] == 0, tun.stats
            rx.settimeout(3)
            recv = []
            for _ in range(500):
                data, peer = rx.recvfrom(2000)
                assert peer == (PEER, 5555), peer
                recv.append(data)
            assert recv == back, [k for k in range(500) if recv[k] != back[k]][:5]
            # all slots (indexes None), one refused by the kernel, one overrunning its slot
            rx.settimeout(0.5)
            batch = PacketBatch(8)
            for k in range(3):
                batch.add(udp4(PEER, LOCAL, 5555, 7777, b"ok%d" % k))
            batch.add(b"\\x00" * 40)             # not IPv4/IPv6: EINVAL
            batch.add(udp4(PEER, LOCAL, 5555, 7777, b"ok3"))
            batch.add(udp4(PEER, LOCAL, 5555, 7777, b"overrun"))
            batch.offset[5] = batch.slot_size - 10
            before = dict(tun.stats)
            assert tun.write_batch(batch) == 4, tun.stats
            assert tun.stats["send_errors"] - before["send_errors"] == 2, tun.stats
            assert tun.stats["dropped"] == before["dropped"], tun.stats
            assert sorted(rx.recvfrom(100)[0] for _ in range(4)) == [b"ok0", b"ok1", b"ok2",
                                                                    b"ok3"]
            try:
                tun.write_batch(batch, [8])
            except IndexError:
                pass
            else:
                raise AssertionError("slot 8 of 6 written")
            out["ok"] = True
        elif MODE == "edge":
            # empty queue: nothing read, the batch untouched
            b = PacketBatch(4)
            assert tun.read_batch(b) == 0 and b.count == 0
            # a full batch reads nothing (and loses nothing)
            tx.sendto(b"queued", (PEER, 9999))
            time.sleep(0.05)
            full = PacketBatch(2)
            full.add(b"x")
            full.add(b"y")
            assert tun.read_batch(full) == 0 and full.count == 2
            got = read_all(tun, 1, PacketBatch(4))
            assert got == [b"queued"], got
            # truncation: room = 600 - 128 = 472; a 1000-byte packet fills it: dropped
            small = PacketBatch(8, slot_size=600, headroom=128)
            before = tun.stats["truncated"]
            tx.sendto(b"first", (PEER, 9999))
            tx.sendto(b"B" * 1000, (PEER, 9999))
            tx.sendto(b"last", (PEER, 9999))
            tx.sendto(b"C" * (472 - 28), (PEER, 9999))   # exactly the room: dropped too
            tx.sendto(b"D" * (471 - 28), (PEER, 9999))   # one byte less: kept
            got = read_all(tun, 3, small, timeout=1.0)
            assert got == [b"first", b"last", b"D" * 443], [len(g) for g in got]
            assert tun.stats["truncated"] - before == 2, tun.stats
            # appending after slots already there, up to capacity
            b = PacketBatch(3)
            b.add(b"keep")
            for k in range(5):
                tx.sendto(b"p%d" % k, (PEER, 9999))
            time.sleep(0.05)
            select.select([tun], [], [], 1)
            n = tun.read_batch(b)
            assert n == 2 and b.count == 3 and b.packet(0) == b"keep", (n, b.count)
            out["ok"] = True
        elif MODE == "bench":
            rates = {}
            for path in ("python", "c"):
                Tun.io_path = path
                best = 0.0
                for _ in range(7):
                    for k in range(500):
                        tx.sendto(b"%04d" % k + b"." * 28, (PEER, 9999))
                    time.sleep(0.02)
                    batch, n = PacketBatch(64), 0
                    t0 = time.perf_counter()
                    while True:
                        batch.count = 0
                        got = tun.read_batch(batch)
                        if not got:
                            break
                        n += got
                    dt = time.perf_counter() - t0
                    assert n >= 500, n
                    best = max(best, n / dt)
                rates[path] = best
            out["rates"] = rates
        tx.close()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture
def netns():
    name = f"espdp-tunb-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _child(netns, mode, path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CHILD, mode, path],
                         capture_output=True, text=True, timeout=60, env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr + res.stdout
    return json.loads(lines[-1][7:])


def test_c_path_is_used():
    from espdp.io.tun import Tun
    assert Tun.io_path == "c"     # not a silent fallback to the Python loops


def test_bad_fd_raises_when_nothing_was_read():
    from espdp import _mmsg
    stats = {"received": 0, "truncated": 0}
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(OSError):
        _mmsg.tun_read_batch(r, PacketBatch(4), stats)
    assert stats["received"] == 0


@pytest.mark.parametrize("path", ["c", "python"])
def test_full_queue_drops_the_rest(monkeypatch, path):
    """EAGAIN on write (a full queue) counts that packet and the rest ``dropped``;
    a pipe of one page stands in for the TUN (the loop is the same ``write``)."""
    import fcntl

    from espdp.io.tun import Tun
    monkeypatch.setattr(Tun, "io_path", path)
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 4096)          # F_SETPIPE_SZ: one page
        os.set_blocking(w, False)
        os.write(w, b"\0" * (4096 - 150))   # room for fifteen 10-byte packets
        tun = Tun(w, None, owns_fd=False)
        batch = PacketBatch(150)
        for k in range(150):
            batch.add(bytes([k]) * 10)
        assert tun.write_batch(batch, range(149, -1, -1)) == 15
        assert tun.stats["sent"] == 15 and tun.stats["dropped"] == 135, tun.stats
        assert os.read(r, 8192)[-150:] == b"".join(bytes([k]) * 10 for k in range(149, 134, -1))
    finally:
        os.close(r)
        os.close(w)


@needs_root_tun
@pytest.mark.parametrize("path", ["c", "python"])
def test_roundtrip_500(netns, path):
    assert _child(netns, "roundtrip", path) == {"ok": True}


@needs_root_tun
@pytest.mark.parametrize("path", ["c", "python"])
def test_empty_full_and_truncated(netns, path):
    assert _child(netns, "edge", path) == {"ok": True}


@needs_root_tun
def test_read_rate_python_vs_c(netns):
    rates = _child(netns, "bench", "c")["rates"]
    print(f"\nTUN read of 500 small packets: python {rates['python']:,.0f} pkt/s, "
          f"c {rates['c']:,.0f} pkt/s, {rates['c'] / rates['python']:.2f}x")
