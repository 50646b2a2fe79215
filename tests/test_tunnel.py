"""The embeddable tunnel (the mobile-client case): a TUN it did not open,
SAs and policies through the API, events to callbacks, no thread unless
asked, a clean stop; and the example under examples/ run for real."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from scapy.all import ICMP, IP, Raw

from espdp.engine import PacketBatch
from espdp.io.memory import MemoryPipe, MemoryUdp
from espdp.tunnel import Tunnel
from espdp.xfrm import Xfrm

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("0x" + "31" * 20, "0x" + "42" * 20)


def _sa(src, dst, spi, key, reqid, sport, dport):
    return (f"state add src {src} dst {dst} proto esp spi {spi} reqid {reqid} mode tunnel "
            f"replay-window 32 aead 'rfc4106(gcm(aes))' {key} 128 "
            f"encap espinudp {sport} {dport} 0.0.0.0")


def _policies(t: Tunnel, mine: str, theirs: str, here: str, there: str, out: int, inn: int):
    t.execute(f"policy add src {mine} dst {theirs} dir out tmpl src {here} dst {there} "
              f"proto esp reqid {out} mode tunnel")
    t.execute(f"policy add src {theirs} dst {mine} dir in tmpl src {there} dst {here} "
              f"proto esp reqid {inn} mode tunnel")


def _read_all(pipe: MemoryPipe) -> list[bytes]:
    batch = PacketBatch(64)
    pipe.read_batch(batch)
    return [batch.packet(i) for i in range(batch.count)]


def _two_tunnels(**kw):
    wire_a, wire_b = MemoryUdp.pair(("192.0.2.1", 4500), ("192.0.2.2", 4500))
    app_a, tun_a = MemoryPipe.pair()
    app_b, tun_b = MemoryPipe.pair()
    a = Tunnel(tun_a, sockets={4: wire_a}, xfrm=Xfrm(**kw))
    b = Tunnel(tun_b, sockets={4: wire_b})
    _policies(a, "10.1.0.0/16", "10.2.0.0/16", "192.0.2.1", "192.0.2.2", 1, 2)
    _policies(b, "10.2.0.0/16", "10.1.0.0/16", "192.0.2.2", "192.0.2.1", 2, 1)
    return a, b, app_a, app_b


def _both_ways(a, b):
    for t, (src, dst, spi, key, reqid) in ((a, ("192.0.2.1", "192.0.2.2", 0x11, KEYS[0], 1)),
                                           (a, ("192.0.2.2", "192.0.2.1", 0x22, KEYS[1], 2)),
                                           (b, ("192.0.2.1", "192.0.2.2", 0x11, KEYS[0], 1)),
                                           (b, ("192.0.2.2", "192.0.2.1", 0x22, KEYS[1], 2))):
        t.execute(_sa(src, dst, spi, key, reqid, 4500, 4500))


def _ping(i: int, src="10.1.0.1", dst="10.2.0.1") -> bytes:
    return bytes(IP(src=src, dst=dst, id=i) / ICMP(seq=i) / Raw(b"p" * i))


def _pump(*tunnels, rounds: int = 20):
    for _ in range(rounds):
        for t in tunnels:
            t.poll(0)


def test_two_embedded_tunnels_pass_traffic_with_poll_only():
    a, b, app_a, app_b = _two_tunnels()
    with a, b:
        _both_ways(a, b)
        sent = [_ping(i) for i in range(20)]
        for p in sent:
            app_a.write(p)
        before = threading.active_count()
        _pump(a, b)
        assert threading.active_count() == before  # poll() starts no thread
        assert _read_all(app_b) == sent
        reply = _ping(1, "10.2.0.1", "10.1.0.1")
        app_b.write(reply)
        _pump(a, b)
        assert _read_all(app_a) == [reply]


def test_acquire_reaches_the_callback_and_the_held_packet_goes_out():
    a, b, app_a, app_b = _two_tunnels(acquire_queue=4)
    with a, b:
        seen = []
        a.subscribe(seen.append, ["acquire"])
        b.execute(_sa("192.0.2.1", "192.0.2.2", 0x11, KEYS[0], 1, 4500, 4500))
        first = _ping(7)
        app_a.write(first)
        _pump(a)
        assert [e.type for e in seen] == ["acquire"]
        assert seen[0].sel["dst"].startswith("10.2.0.1")
        assert _read_all(app_b) == []  # held, not sent in the clear, not lost
        a.execute(_sa("192.0.2.1", "192.0.2.2", 0x11, KEYS[0], 1, 4500, 4500)
                  + f" seq {seen[0].seq}")
        a.dataplane.tick(time.monotonic())
        _pump(a, b)
        assert _read_all(app_b) == [first]


def test_expire_and_mapping_events_reach_callbacks():
    a, b, app_a, app_b = _two_tunnels()
    with a, b:
        _both_ways(a, b)
        events = []
        b.subscribe(events.append, ["mapping"])
        a.dataplane.sockets[4].addr = ("192.0.2.1", 6100)  # a NAT rebinds
        app_a.write(_ping(1))
        _pump(a, b)
        assert [e.type for e in events] == ["mapping"]
        assert events[0].new == {"addr": "192.0.2.1", "port": 6100}
        expired = []
        a.subscribe(expired.append, ["expire"])
        a.execute("state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x11")
        a.execute(_sa("192.0.2.1", "192.0.2.2", 0x11, KEYS[0], 1, 4500, 4500)
                  + " limit time-hard 1")
        a.dataplane.tick(time.monotonic() + 5)
        assert any(e.type == "expire" and e.hard for e in expired)


def test_start_stop_in_a_thread_and_the_given_fd_stays_open():
    r, w = os.pipe()  # stands for the TUN fd the OS handed over
    try:
        t = Tunnel.from_fd(r, udp_port=0, families=(4,), bind={4: "127.0.0.1"})
        thread = t.start()
        assert thread.is_alive()
        with pytest.raises(Exception, match="already running"):
            t.start()
        t.stop()
        assert not thread.is_alive()
        t.close()
        os.fstat(r)  # not closed: we did not own it
    finally:
        os.close(r)
        os.close(w)


def test_mobile_client_example_in_memory():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "mobile_client.py"),
                           "--memory"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ACQUIRE" in proc.stdout and "EXPIRE" in proc.stdout
    assert "every reply arrived" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_mobile_client_example_with_a_real_tun_fd():
    ns = f"espdp-mob-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable,
                               str(ROOT / "examples" / "mobile_client.py")],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "every reply arrived" in proc.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_nat_keepalive_only_on_idle_encapsulated_outbound_sas():
    wire_a, wire_b = MemoryUdp.pair(("192.0.2.1", 4500), ("192.0.2.2", 4500))
    app_a, tun_a = MemoryPipe.pair()
    app_b, tun_b = MemoryPipe.pair()
    now = [1000.0]
    a = Tunnel(tun_a, sockets={4: wire_a}, keepalive_interval=20, clock=lambda: now[0])
    b = Tunnel(tun_b, sockets={4: wire_b})
    _policies(a, "10.1.0.0/16", "10.2.0.0/16", "192.0.2.1", "192.0.2.2", 1, 2)
    _policies(b, "10.2.0.0/16", "10.1.0.0/16", "192.0.2.2", "192.0.2.1", 2, 1)
    with a, b:
        _both_ways(a, b)
        app_a.write(_ping(1))
        _pump(a, b)                      # a's first tick: a baseline, nothing sent
        assert wire_b.stats["keepalive"] == 0
        now[0] += 20
        app_a.write(_ping(2))            # busy during the interval: no keepalive
        _pump(a, b)
        assert wire_b.stats["keepalive"] == 0
        now[0] += 20                     # idle for an interval: one keepalive
        _pump(a, b)
        now[0] += 5                      # not yet due again
        _pump(a, b)
        assert wire_b.stats["keepalive"] == 1 and a.counters.keepalives == 1
