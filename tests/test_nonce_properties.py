"""No nonce twice (issue 8): under one key, no sequence number is ever used
for two packets.

For the counter-mode AEADs (GCM, ChaCha20-Poly1305) the nonce is the salt
and the 64-bit sequence number carried as the explicit IV, so a repeated
sequence number is a repeated nonce.  Nothing here trusts the engine's
counters: every packet produced is opened with ``cryptography``
(helpers.esp_open), which proves that the IV on the wire is the nonce it was
sealed with (and, with ESN, that the high half in the AAD agrees), and the
nonces of all the packets are then compared.

Properties (hypothesis):

* across batch boundaries, with random batch sizes, through ``SA.encrypt``
  and ``SATable.encrypt`` (the daemon's path) alike, also when slots of a
  batch are refused (a refused packet spends no sequence number);
* across the wrap of the low 32 bits with ESN;
* at the end of the sequence space, with and without ESN: refused
  (``seq_overflow``), never wrapped;
* across daemon restarts with the sequence reservations of
  :mod:`espdp.seqguard`, for SAs from the configuration and SAs added later
  (as an IKE daemon re-adds them), crashing at the worst moment (after
  packets left, before the next check); and once with real ``espdp run``
  processes, killed with SIGKILL, their packets captured on the wire.

Concurrent use: several workers on one ``SATable(workers=N)`` share an SA's
sequence number (handed out atomically); the last property has them race.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import M32, esp_open, inner_packet, layout, sa_info
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from espdp.engine import SA, PacketBatch, SATable
from espdp.seqguard import SequenceGuard
from espdp.xfrm import Xfrm

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
TRANSFORMS = st.sampled_from(["gcm", "chacha"])
ESN = frozenset({"esn"})
INNER = inner_packet(4, "udp", 40)
TOO_BIG = inner_packet(4, "udp", 1885)  # fits a 2048-byte slot, but not once encrypted: too_big


def nonce_of(packet: bytes, transform: str, esn: bool) -> int:
    """The 64-bit sequence number a packet was sealed with, checked by opening it."""
    esp = packet[layout(packet).esp:]
    iv = int.from_bytes(esp[8:16], "big")
    assert int.from_bytes(esp[4:8], "big") == iv & M32        # the wire's low half
    esp_open(transform, esp, esn_hi=(iv >> 32) if esn else None)   # raises on a mismatch
    if not esn:
        assert iv >> 32 == 0
    return iv


def encrypt_batches(sa: SA, sizes: list, via_table: bool = False, refuse=()) -> tuple:
    """Encrypt batches of ``sizes`` packets (slot k of batch b refused when (b, k) is in
    ``refuse``); returns (packets that went out, verdicts of the others)."""
    table = None
    if via_table:
        table = SATable()
        table.add(sa)
    out, other = [], []
    for b, size in enumerate(sizes):
        batch = PacketBatch(size, 2048, 128)
        for k in range(size):
            batch.add(TOO_BIG if (b, k) in refuse else INNER, 0, sa.index)
        (table.encrypt if via_table else sa.encrypt)(batch)
        for i in range(size):
            verdict, packet, _ = batch.result(i)
            if verdict == "ok":
                out.append(packet)
            else:
                other.append(verdict)
    if table is not None:
        table.remove(sa)
    return out, other


# ---------------------------------------------------------------- batches

@SETTINGS
@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=24), transform=TRANSFORMS,
       via_table=st.booleans(), start=st.integers(0, M32 - 2000), esn=st.booleans(),
       data=st.data())
def test_sequence_numbers_are_consecutive_across_random_batches(sizes, transform, via_table,
                                                                 start, esn, data):
    refuse = set(data.draw(st.lists(st.tuples(st.integers(0, len(sizes) - 1),
                                              st.integers(0, 63)), max_size=20)))
    info = sa_info(4, transform=transform, flags=ESN if esn else frozenset(),
                   replay_window=64 if esn else 0)
    sa = SA(info)
    sa.oseq = start
    packets, other = encrypt_batches(sa, sizes, via_table, refuse)
    refused = sum(1 for b, k in refuse if k < sizes[b])
    assert other == ["too_big"] * refused
    nonces = [nonce_of(p, transform, esn) for p in packets]
    # Every packet that left has the next number: none repeated, none skipped.
    assert nonces == list(range(start + 1, start + 1 + sum(sizes) - refused))
    assert sa.oseq == start + len(nonces)


# ---------------------------------------------------------------- ESN

@SETTINGS
@given(before=st.integers(1, 200), sizes=st.lists(st.integers(1, 64), min_size=1, max_size=12),
       transform=TRANSFORMS, hi=st.integers(0, 1000))
def test_esn_crosses_the_low_32_bit_wrap_without_a_repeat(before, sizes, transform, hi):
    start = (hi << 32) + M32 - before          # ``before`` packets left below the wrap
    info = sa_info(4, transform=transform, flags=ESN, replay_window=128)
    sa = SA(info)
    sa.oseq = start
    packets, other = encrypt_batches(sa, sizes)
    assert other == []
    nonces = [nonce_of(p, transform, True) for p in packets]
    assert nonces == list(range(start + 1, start + 1 + sum(sizes)))
    # The peer takes them all, inferring the high half (RFC 4303 Appendix A) ...
    peer = SATable()
    peer.add(SA(info.replace(replay_seq_hi=hi, replay_seq=M32 - before - 1)))
    assert [peer.decrypt_packet(p)[0] for p in packets] == ["ok"] * len(packets)
    # ... and refuses each of them a second time.
    assert {peer.decrypt_packet(p)[0] for p in packets[-100:]} == {"replay"}


# ---------------------------------------------------------------- the end of the space

@SETTINGS
@given(left=st.integers(0, 100), sizes=st.lists(st.integers(1, 64), min_size=1, max_size=8),
       transform=TRANSFORMS, esn=st.booleans(), via_table=st.booleans())
def test_outbound_overflow_is_refused_never_wrapped(left, sizes, transform, esn, via_table):
    last = (1 << 64) - 1 if esn else M32
    info = sa_info(4, transform=transform, flags=ESN if esn else frozenset(),
                   replay_window=64 if esn else 0)
    sa = SA(info)
    sa.oseq = last - left
    packets, other = encrypt_batches(sa, sizes + [left + 1], via_table)   # past the end
    nonces = [nonce_of(p, transform, esn) for p in packets]
    assert nonces == list(range(last - left + 1, last + 1))
    assert other == ["seq_overflow"] * (sum(sizes) + 1)
    assert sa.oseq == last and sa.stats()["drops"]["seq_overflow"] == len(other)
    again, other = encrypt_batches(sa, [3])            # and it stays so
    assert again == [] and other == ["seq_overflow"] * 3


# ---------------------------------------------------------------- restarts

KEY = "0x" + "c3" * 20
SA_LINE = (f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x4242 reqid 1 mode tunnel "
           f"aead 'rfc4106(gcm(aes))' {KEY} 128")


DEL_LINE = "state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x4242"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jump=st.integers(8, 512), data=st.data())
def test_a_restarted_daemon_never_reuses_a_sequence_number(tmp_path_factory, jump, data):
    """Each lifetime: the SA from the configuration (before the guard is attached)
    or added later through the model (after it, as an IKE daemon re-adds it);
    then steps: a batch of at most jump/4 packets, or the SA deleted (whether
    it sent or not) and added again with the same key, each followed by the
    guard's check as the daemon's loop does it; then a crash right after the
    last step, before any further check."""
    path = tmp_path_factory.mktemp("seq") / "esp0.seq.json"
    seen: list[int] = []
    for _ in range(data.draw(st.integers(2, 5), label="lifetimes")):
        x = Xfrm()
        from_config = data.draw(st.booleans(), label="SA in the configuration")
        if from_config:
            x.execute(SA_LINE, 0)
        guard = SequenceGuard(str(path), jump=jump)
        guard.attach(x)
        if not from_config:
            x.execute(SA_LINE, 0)
        steps = data.draw(st.lists(st.one_of(st.integers(1, max(1, jump // 4)),
                                             st.just("re-add")), max_size=12), label="steps")
        for step in steps:
            if step == "re-add":
                x.execute(DEL_LINE, 0)
                guard.check()
                x.execute(SA_LINE, 0)
            else:
                [sa] = x.sad.table
                packets, other = encrypt_batches(sa, [step], via_table=False)
                assert other == []
                seen += [_gcm_nonce(p) for p in packets]
            guard.check()
        # crash: whatever the last check reserved is all the next run knows
    assert len(seen) == len(set(seen)), "a sequence number was used twice"
    assert seen == sorted(seen)


def _gcm_nonce(packet: bytes) -> int:
    """The nonce of a packet sealed with KEY (not the helpers' key), opened independently."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    esp = packet[layout(packet).esp:]
    key = bytes.fromhex(KEY[2:])
    iv = esp[8:16]
    AESGCM(key[:16]).decrypt(key[16:] + iv, esp[16:], esp[:8])
    assert esp[4:8] == iv[4:]
    return int.from_bytes(iv, "big")


ROOT_AND_TUN = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root, network namespaces and /dev/net/tun")

SNIFFER = r"""
import json, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
s.bind(("eth0", 0))
print("ready", flush=True)
while True:
    p = s.recv(65535)
    if len(p) < 36 or p[9] != 17 or p[22:24] != b"\x11\x94":     # UDP to port 4500
        continue
    esp = p[(p[0] & 15) * 4 + 8:]
    if len(esp) >= 16 and esp[:4] == bytes.fromhex(sys.argv[1]):
        print(json.dumps(esp.hex()), flush=True)
"""


@ROOT_AND_TUN
def test_espdp_run_killed_and_restarted_continues_past_every_nonce_it_sent():
    """Real daemons: a (sender) is SIGKILLed mid-traffic and started again with the
    same static keys; every ESP packet of its SA seen on b's wire is opened with
    the key, and no nonce appears twice."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from espdp.lab import INNER as TARGETS
    from espdp.lab import Lab, keys, tunnel_config

    with Lab("nonce") as lab:
        k = keys()
        config = tunnel_config("a", 4, True, *k)
        lab.start("a", config)
        lab.start("b", tunnel_config("b", 4, True, *k))
        sniffer = subprocess.Popen(["ip", "netns", "exec", lab.ns["b"], sys.executable, "-c",
                                    SNIFFER, "0000a0b0"], stdout=subprocess.PIPE, text=True)
        try:
            assert sniffer.stdout.readline().strip() == "ready"
            for _ in range(2):
                assert lab.ping("a", TARGETS["b"][0], count=4)
                lab.daemons[0].stop(signal.SIGKILL)      # a crash: nothing written at exit
                lab.daemons.pop(0)
                lab.daemons.insert(0, lab.start("a", config))
            assert lab.ping("a", TARGETS["b"][0], count=4)
            time.sleep(0.5)
        finally:
            sniffer.send_signal(signal.SIGTERM)
            out, _ = sniffer.communicate(timeout=10)
        key = bytes.fromhex(k[0][2:])
        nonces = []
        for line in out.splitlines():
            esp = bytes.fromhex(json.loads(line))
            AESGCM(key[:16]).decrypt(key[16:] + esp[8:16], esp[16:], esp[:8])  # it is the nonce
            nonces.append(int.from_bytes(esp[8:16], "big"))
        assert len(nonces) >= 12, nonces
        assert len(nonces) == len(set(nonces)), "a nonce was used twice"
        assert nonces == sorted(nonces)
        # Each restart jumped past the reservation: three runs, two jumps.
        jumps = [b - a for a, b in zip(nonces, nonces[1:], strict=False) if b - a > 1000]
        assert len(jumps) == 2, jumps


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workers=st.integers(2, 4), transform=TRANSFORMS, esn=st.booleans(),
       start=st.sampled_from([0, M32 - 3000, (1 << 32) + 5]),
       sizes=st.lists(st.integers(1, 64), min_size=4, max_size=40))
@example(workers=2, transform="gcm", esn=False, start=M32 - 3000, sizes=[64] * 40)  # overflow
@example(workers=3, transform="chacha", esn=True, start=M32 - 3000, sizes=[64] * 40)  # wrap
def test_workers_never_share_a_sequence_number(workers, transform, esn, start, sizes):
    """``workers`` threads encrypt through one SA of a ``SATable(workers=N)``, each
    with batches of the drawn sizes, at once: the nonces (read back by opening
    every packet) are start+1 ... start+total, each once, across the low half's
    wrap with ESN; without ESN, what would wrap is refused, never reused."""
    import threading

    if not esn:
        start = min(start, M32 - 3000)
    info = sa_info(4, transform=transform, flags=ESN if esn else frozenset(),
                   replay_window=64 if esn else 0)
    table = SATable(workers=workers)
    sa = SA(info)
    sa.oseq = start
    index = table.add(sa)
    out: list = [[] for _ in range(workers)]
    barrier = threading.Barrier(workers)

    def work(k: int) -> None:
        barrier.wait()
        for size in sizes:
            batch = PacketBatch(size, 2048, 128)
            for _ in range(size):
                batch.add(INNER, 0, index)
            table.encrypt(batch, worker=k)
            out[k] += [batch.result(i)[1] for i in range(size) if batch.result(i)[0] == "ok"]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    nonces = sorted(nonce_of(p, transform, esn) for per in out for p in per)
    total = workers * sum(sizes)
    sent = total if esn else min(total, M32 - start)    # the rest: seq_overflow
    assert nonces == list(range(start + 1, start + 1 + sent))
    assert sa.oseq == start + sent
    assert sa.stats()["drops"].get("seq_overflow", 0) == total - sent
