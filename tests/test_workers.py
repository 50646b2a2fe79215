"""Several worker threads on one SA table (``SATable(workers=N)``): the
sequence number of a shared SA is handed out atomically, each worker has
crypto contexts of its own, the replay window accepts each packet once
however the workers race, and SAs come and go while batches are in flight.

Every check reads the packets themselves (sequence numbers from the ESP
headers, plaintext after decryption), not the engine's counters alone.
"""

from __future__ import annotations

import functools
import threading

import pytest
from helpers import esp_seq, inner_packet, sa_info

from espdp.engine import SA, PacketBatch, SATable

ROUNDS, BATCH = 60, 64


@functools.cache
def plain(k: int, size: int) -> bytes:
    return inner_packet(4, "udp", size, fill=k)


def size_of(r: int, i: int) -> int:
    return 64 + (r + i) % 700


def run_threads(target, n):
    errors = []

    def wrap(k):
        try:
            target(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def encrypt_concurrently(table, index, workers, rounds=ROUNDS):
    """Each worker encrypts ``rounds`` batches through SA ``index``; the packets."""
    out = [[] for _ in range(workers)]

    def work(k):
        batch = PacketBatch(BATCH)
        for r in range(rounds):
            batch.clear()
            for i in range(BATCH):
                batch.add(plain(k, size_of(r, i)), sa=index)
            assert table.encrypt(batch, worker=k) == BATCH
            out[k] += [batch.packet(i) for i in range(BATCH)]

    run_threads(work, workers)
    return out


def decrypt_concurrently(table, orders):
    """Worker k decrypts ``orders[k]`` in batches, all at once; what they delivered."""
    got = [[] for _ in orders]

    def work(k):
        batch = PacketBatch(BATCH, 2304)
        for start in range(0, len(orders[k]), BATCH):
            batch.clear()
            for p in orders[k][start:start + BATCH]:
                batch.add(p)
            table.decrypt(batch, worker=k)
            got[k] += [batch.packet(i) for i in range(batch.count) if batch.verdict[i] == 0]

    run_threads(work, len(orders))
    return [p for per in got for p in per]


@pytest.mark.parametrize("transform", ["gcm", "chacha", "cbc-sha256"])
@pytest.mark.parametrize("esn", [False, True])
def test_workers_share_one_sequence_and_never_repeat_a_number(transform, esn):
    info = sa_info(4, "tunnel", transform, flags=("esn",) if esn else (),
                   replay_window=1024 if esn else 64)
    out_table = SATable(workers=2)
    index = out_table.add(SA(info))
    packets = encrypt_concurrently(out_table, index, 2)
    seqs = [esp_seq(p) for per in packets for p in per]
    n = 2 * ROUNDS * BATCH
    assert sorted(seqs) == list(range(1, n + 1))     # each number once, none skipped
    assert out_table[index].oseq == n
    # Every packet decrypts, in sequence order, to its own plaintext (a context
    # shared by two threads would garble some).
    in_table = SATable()
    in_table.add(SA(info))
    sent = sorted(((esp_seq(p), k, j, p) for k, per in enumerate(packets)
                   for j, p in enumerate(per)))
    for _, k, j, p in sent:
        verdict, got, _ = in_table.decrypt_packet(p)
        assert verdict == "ok", (k, j, verdict)
        assert got == plain(k, size_of(j // BATCH, j % BATCH)), (k, j)


def test_workers_racing_over_the_same_packets_accept_each_once():
    info = sa_info(4, "tunnel", "gcm", replay_window=2048)
    sender = SA(info)
    packets = [sender.encrypt_packet(inner_packet(4, "udp", 100 + i % 500, fill=i))[1]
               for i in range(4000)]            # (size, fill) differ: all distinct
    table = SATable(workers=2)
    table.add(SA(info))
    # the two workers go through the packets in opposite orders: they meet in the middle
    delivered = decrypt_concurrently(table, [packets, packets[::-1]])
    stats = table[0].stats()
    assert len(set(delivered)) == len(delivered)          # none twice
    # every packet was offered twice; the window (2048 of 4000) may also refuse
    # the oldest as too old once the other worker has moved it on
    assert len(delivered) + stats["replay"] + stats["replay_window"] == 2 * len(packets)
    assert stats["integrity_failed"] == 0 and stats["packets"] == len(delivered)


def test_each_packet_accepted_once_when_all_fit_in_the_window():
    info = sa_info(6, "tunnel", "chacha", replay_window=2048)
    sender = SA(info)
    packets = [sender.encrypt_packet(inner_packet(6, "tcp", 300 + i % 500, fill=i))[1]
               for i in range(1500)]
    table = SATable(workers=3)
    table.add(SA(info))
    delivered = sorted(decrypt_concurrently(table, [packets] * 3))
    want = sorted(inner_packet(6, "tcp", 300 + i % 500, fill=i) for i in range(1500))
    assert delivered == want                              # all of them, none twice
    assert table[0].stats()["replay"] == 2 * len(packets)


def test_sas_come_and_go_while_workers_encrypt():
    info = sa_info(4, "tunnel", "gcm")
    table = SATable(workers=2)
    keep = table.add(SA(info))
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            extra = [SA(info.replace(spi=0x5000 + i)) for i in range(50)]
            for sa in extra:
                table.add(sa)
            for sa in extra:
                table.remove(sa)

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        packets = encrypt_concurrently(table, keep, 2, rounds=60)
    finally:
        stop.set()
        churner.join()
    seqs = sorted(esp_seq(p) for per in packets for p in per)
    assert seqs == list(range(1, 2 * 60 * BATCH + 1))


def test_worker_index_is_checked_and_tables_grow():
    info = sa_info(4, "tunnel", "gcm")
    table = SATable()
    index = table.add(SA(info))
    batch = PacketBatch(4)
    batch.add(inner_packet(4), sa=index)
    with pytest.raises(ValueError, match="worker 1 of a table for 1"):
        table.encrypt(batch, worker=1)
    table.set_workers(4)
    assert table.workers == 4
    assert table.encrypt(batch, worker=3) == 1
    assert esp_seq(batch.packet(0)) == 1
    table.set_workers(2)                     # never shrinks: a worker may be using them
    assert table.workers == 4
