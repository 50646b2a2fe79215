"""A soak (issue 8): two namespaces with ``espdp run`` each, for
``ESPDP_SOAK_SECONDS`` (40 in CI; ``scripts/soak.sh SECONDS`` for longer).

While it runs:

* steady UDP from a to b over inner IPv6, each datagram a counter, a
  payload and a BLAKE2 digest of both, checked by the receiver: none may be
  corrupted or arrive twice (losses are counted and must stay rare);
* a TCP stream from b to a over inner IPv4, compared by SHA-256;
* rekeys every few seconds through the control sockets, as an IKE daemon
  does them: the new inbound SA on the receiver, the new outbound SA on the
  sender, the sender's policies switched to it (``policy update``), then the
  old SAs deleted -- both directions, fresh keys each time;
* churn: 1,000 extra SAs added to a and deleted again, over and over.

The daemons' RSS and file descriptors are sampled every two seconds; after
a warm-up (a quarter of the run, at least 15 s) RSS may not grow by more
than ``RSS_SLACK`` and the descriptors may not change.  The figures are
printed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from espdp.client import ControlClient
from espdp.lab import INNER, OUTER, Lab, keys, tunnel_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                       reason="needs root, network namespaces and /dev/net/tun"),
]

SECONDS = float(os.environ.get("ESPDP_SOAK_SECONDS", "40"))
WARMUP = max(15.0, SECONDS / 4)
REKEY_EVERY = 5.0
CHURN = 1000
SAMPLE_EVERY = 2.0
RSS_SLACK = 4 << 20          # bytes of RSS growth allowed after the warm-up
UDP_RATE = 800               # datagrams per second
UDP_PORT, TCP_PORT = 6001, 6002

UDP_SENDER = r"""
import hashlib, os, socket, struct, sys, time
dst, port, seconds, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
start = time.monotonic(); i = 0
while time.monotonic() - start < seconds:
    payload = os.urandom(40 + (i * 7919) % 1100)
    head = struct.pack("!Q", i)
    s.sendto(head + hashlib.blake2b(head + payload, digest_size=16).digest() + payload,
             (dst, port))
    i += 1
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
time.sleep(1.0)
for _ in range(5):
    s.sendto(b"END" + struct.pack("!Q", i), (dst, port)); time.sleep(0.05)
print(i, flush=True)
"""

UDP_RECEIVER = r"""
import hashlib, json, socket, struct, sys, time
addr, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((addr, port)); s.settimeout(1.0)
print("ready", flush=True)
seen = bytearray(1 << 16); got = dup = corrupt = 0; sent = None
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        d = s.recv(65535)
    except socket.timeout:
        continue
    if d[:3] == b"END":
        sent = struct.unpack("!Q", d[3:11])[0]; break
    if len(d) < 24:
        corrupt += 1; continue
    i, digest, payload = struct.unpack("!Q", d[:8])[0], d[8:24], d[24:]
    if hashlib.blake2b(d[:8] + payload, digest_size=16).digest() != digest:
        corrupt += 1; continue
    while i // 8 >= len(seen):
        seen.extend(bytes(len(seen)))
    if seen[i // 8] & (1 << (i % 8)):
        dup += 1; continue
    seen[i // 8] |= 1 << (i % 8); got += 1
print(json.dumps({"sent": sent, "received": got, "duplicates": dup, "corrupted": corrupt}))
"""


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _fds(pid: int) -> int:
    """Open descriptors, leaving out the sequence reservation file while it is
    being rewritten (open for a moment on each SA added)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        n += not target.endswith(".seq.json.tmp")
    return n


class Rekeyer:
    """Rekeys both directions between daemons a and b the way an IKE daemon
    would, through their control sockets."""

    def __init__(self, a, b) -> None:
        self.ctl = {"a": ControlClient(a.control), "b": ControlClient(b.control)}
        self.outer = {"a": OUTER[4][0], "b": OUTER[4][1]}
        # The SAs the configurations start with: spi, reqid.
        self.current = {("a", "b"): (0xA0B0, 1), ("b", "a"): (0xB0A0, 2)}
        self.next_spi, self.next_reqid = 0x100000, 100
        self.done = 0
        self.keys: list = []
        # Inbound policies take any reqid from the peer, as the old and the new SA
        # are both valid for a moment during each rekey.
        for side, peer in (("a", "b"), ("b", "a")):
            for fam in (2, 3):
                self.ctl[side].xfrm(
                    f"ip xfrm policy update src {INNER[peer][fam]} dst {INNER[side][fam]} "
                    f"dir in tmpl src {self.outer[peer]} dst {self.outer[side]} proto esp "
                    "reqid 0 mode tunnel")

    def _sa(self, src: str, dst: str, spi: int, reqid: int, key: str) -> str:
        return (f"ip xfrm state add src {self.outer[src]} dst {self.outer[dst]} proto esp "
                f"spi {spi:#x} reqid {reqid} mode tunnel replay-window 1024 "
                f"aead 'rfc4106(gcm(aes))' {key} 128 encap espinudp 4500 4500 0.0.0.0")

    def rekey(self, sender: str, receiver: str) -> None:
        old_spi, _ = self.current[(sender, receiver)]
        spi, reqid = self.next_spi, self.next_reqid
        self.next_spi += 1
        self.next_reqid += 1
        key = keys(1)[0]
        self.keys.append(key)
        self.ctl[receiver].xfrm(self._sa(sender, receiver, spi, reqid, key))
        self.ctl[sender].xfrm(self._sa(sender, receiver, spi, reqid, key))
        for fam in (2, 3):
            self.ctl[sender].xfrm(
                f"ip xfrm policy update src {INNER[sender][fam]} dst {INNER[receiver][fam]} "
                f"dir out tmpl src {self.outer[sender]} dst {self.outer[receiver]} proto esp "
                f"reqid {reqid} mode tunnel")
        time.sleep(0.3)                              # what is in flight arrives
        for side in (sender, receiver):
            self.ctl[side].xfrm(f"ip xfrm state delete src {self.outer[sender]} "
                                f"dst {self.outer[receiver]} proto esp spi {old_spi:#x}")
        self.current[(sender, receiver)] = (spi, reqid)
        self.done += 1

    def close(self) -> None:
        for c in self.ctl.values():
            c.close()


def _churn(control: str, stop: threading.Event, stats: dict) -> None:
    """Add CHURN SAs to a daemon and delete them again, until ``stop``."""
    spi = 0x200000
    with ControlClient(control, timeout=60) as c:
        while not stop.is_set():
            first = spi
            started = time.monotonic()
            for _ in range(CHURN):
                c.xfrm(f"ip xfrm state add src 192.0.2.77 dst {OUTER[4][0]} proto esp "
                       f"spi {spi:#x} mode tunnel aead 'rfc4106(gcm(aes))' {keys(1)[0]} 128")
                spi += 1
            stats["peak"] = max(stats.get("peak", 0), c.xfrm("ip xfrm state count")["count"])
            for s in range(first, spi):
                c.xfrm(f"ip xfrm state delete src 192.0.2.77 dst {OUTER[4][0]} proto esp "
                       f"spi {s:#x}")
            stats["cycles"] = stats.get("cycles", 0) + 1
            stats.setdefault("seconds", []).append(round(time.monotonic() - started, 2))
            stop.wait(1.0)


def test_soak(capsys):
    with Lab("soak") as lab:
        k = keys()
        a = lab.start("a", tunnel_config("a", 4, True, *k))
        b = lab.start("b", tunnel_config("b", 4, True, *k))
        pids = {"a": a.proc.pid, "b": b.proc.pid}
        for pid in pids.values():
            assert "espdp" in Path(f"/proc/{pid}/cmdline").read_text()
        assert lab.ping("a", INNER["b"][0]) and lab.ping("a", INNER["b"][1])
        fds_idle = {side: _fds(pid) for side, pid in pids.items()}

        receiver = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns["b"], sys.executable, "-c", UDP_RECEIVER,
             INNER["b"][1], str(UDP_PORT), str(SECONDS + 60)], stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "ready"
        sender = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns["a"], sys.executable, "-c", UDP_SENDER,
             INNER["b"][1], str(UDP_PORT), str(SECONDS), str(UDP_RATE)],
            stdout=subprocess.PIPE, text=True)
        tcp: dict = {}
        tcp_bytes = int(SECONDS) * (256 << 10)

        def stream():
            try:
                tcp["result"] = lab.transfer("b", "a", INNER["a"][0], tcp_bytes, port=TCP_PORT,
                                             seconds=SECONDS * 0.9, timeout=SECONDS + 120)
            except Exception as e:  # noqa: BLE001 - reported below
                tcp["error"] = e

        tcp_thread = threading.Thread(target=stream)
        tcp_thread.start()
        stop = threading.Event()
        churn: dict = {}
        churn_thread = threading.Thread(target=_churn, args=(a.control, stop, churn))
        churn_thread.start()
        rekeyer = Rekeyer(a, b)
        samples: list = []
        start = time.monotonic()
        next_rekey, next_sample = start + REKEY_EVERY, start
        try:
            while time.monotonic() - start < SECONDS:
                now = time.monotonic()
                if now >= next_sample:
                    samples.append((round(now - start, 1),
                                    {s: (_rss(p), _fds(p)) for s, p in pids.items()}))
                    next_sample += SAMPLE_EVERY
                if now >= next_rekey:
                    rekeyer.rekey("a", "b")
                    rekeyer.rekey("b", "a")
                    next_rekey += REKEY_EVERY
                time.sleep(0.05)
        finally:
            stop.set()
            churn_thread.join(120)
            rekeyer.close()
        sent = int(sender.communicate(timeout=60)[0])
        udp = json.loads(receiver.communicate(timeout=90)[0])
        tcp_thread.join(SECONDS + 180)
        time.sleep(1.0)
        fds_end = {side: _fds(pid) for side, pid in pids.items()}
        status = {"a": a.status(), "b": b.status()}
        logs = {"a": a.output(), "b": b.output()}
        for d in (a, b):
            assert d.stop() == 0, d.output()
        logs = {"a": a.output(), "b": b.output()}

    warm = [(t, s) for t, s in samples if t >= WARMUP]
    report = {"seconds": SECONDS, "rekeys": rekeyer.done, "churn": churn, "udp": udp,
              "udp_sent": sent, "tcp": {k: v for k, v in tcp.get("result", {}).items()},
              "rss_mib": {}, "fds": {}}
    for side in pids:
        rss = [s[side][0] for _, s in samples]
        rss_warm = [s[side][0] for _, s in warm]
        report["rss_mib"][side] = {
            "start": round(rss[0] / 2**20, 1), "after_warmup": round(rss_warm[0] / 2**20, 1),
            "max_after_warmup": round(max(rss_warm) / 2**20, 1),
            "end": round(rss[-1] / 2**20, 1),
            "growth_after_warmup": round((max(rss_warm) - rss_warm[0]) / 2**20, 2)}
        report["fds"][side] = {"idle": fds_idle[side],
                               "during": sorted({s[side][1] for _, s in warm}),
                               "end": fds_end[side]}
    with capsys.disabled():
        print("\nsoak: " + json.dumps(report))

    # Content end to end: nothing corrupted, nothing twice, little lost; the stream whole.
    assert "error" not in tcp, tcp.get("error")
    assert tcp["result"]["bytes"] == tcp_bytes
    assert udp["sent"] == sent and udp["corrupted"] == 0 and udp["duplicates"] == 0
    assert udp["received"] >= 0.98 * sent, udp
    # The work was done.
    assert rekeyer.done >= 2 * (int(SECONDS / REKEY_EVERY) - 2)
    assert churn.get("cycles", 0) >= 1 and churn["peak"] >= CHURN
    for side in ("a", "b"):
        sas = {sa["spi"] for sa in status[side]["sas"]}
        assert sas == {f"0x{rekeyer.current[p][0]:08x}" for p in rekeyer.current}, sas
        for sa in status[side]["sas"]:
            assert not sa["drops"], sa
        assert "Traceback" not in logs[side]
        for key in k + rekeyer.keys:
            assert key[2:] not in logs[side]
    # Flat: memory and descriptors.
    for side in pids:
        assert len(warm) >= 3
        assert report["rss_mib"][side]["growth_after_warmup"] * 2**20 < RSS_SLACK, report
        assert len(report["fds"][side]["during"]) == 1, report
        assert fds_end[side] == fds_idle[side], report
