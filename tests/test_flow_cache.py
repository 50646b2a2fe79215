"""The C flow decision caches (espdp._flow): the C key is policy.flow_key, and
a cache hit is never a wrong decision (generation, live SA, max_len, key)."""

from __future__ import annotations

import random
import time

import pytest
from helpers import inner_packet, make_pair, sa_info
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import (
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
)

from espdp._flow import FLAG_ACCEPTED, KEY_MAX_LEN, FlowCache, InboundCache, key_of
from espdp.engine import FLAG_MAPPING, FLAG_SOFT_EXPIRED, SA, PacketBatch, SATable
from espdp.errors import ConfigError
from espdp.xfrm.policy import flow_key

GEN = 7


def _real_packets() -> list[bytes]:
    v4, v6 = dict(src="10.0.0.1", dst="10.0.0.2"), dict(src="fd00::1", dst="fd00::2")
    out = [inner_packet(f, p, size) for f in (4, 6) for p in ("udp", "tcp", "icmp")
           for size in (0, 1, 64)]
    out += [
        bytes(IP(**v4) / TCP(sport=1, dport=80)),
        bytes(IP(**v4) / UDP(sport=2, dport=53) / Raw(b"q")),
        bytes(IP(**v4, options=b"\x01" * 4) / TCP(sport=1)),
        bytes(IP(**v4, options=b"\x01" * 8) / UDP(sport=9, dport=9)),
        bytes(IP(**v4, frag=10, proto=6) / Raw(b"x" * 8)),
        bytes(IP(**v4, frag=1, proto=17) / Raw(b"x" * 8)),
        bytes(IP(**v4, frag=0x100, proto=1) / Raw(b"x" * 8)),
        bytes(IP(**v4, flags="MF", proto=6) / TCP(sport=5, dport=6)),
        bytes(IP(**v4, flags="DF") / ICMP(type=3, code=4)),
        bytes(IP(**v4) / ICMP(type=0, code=0)),
        bytes(IP(**v4) / GRE() / IP(**v4)),
        bytes(IP(**v4, proto=132) / Raw(b"sctp-ports")),
        bytes(IP(**v4, proto=33) / Raw(b"dccp")),
        bytes(IP(**v4, proto=0) / Raw(b"hopo")),
        bytes(IP(**v4, proto=50) / Raw(b"esp-payload")),
        bytes(IPv6(**v6) / UDP(sport=1, dport=53)),
        bytes(IPv6(**v6) / TCP(sport=1, dport=443)),
        bytes(IPv6(**v6) / ICMPv6EchoRequest(id=9)),
        bytes(IPv6(**v6, nh=135) / Raw(b"\x01\x02mh")),
        bytes(IPv6(**v6) / GRE() / IP(**v4)),
        bytes(IPv6(**v6) / IPv6ExtHdrHopByHop() / UDP(sport=1)),
        bytes(IPv6(**v6) / IPv6ExtHdrRouting() / UDP(sport=1)),
        bytes(IPv6(**v6) / IPv6ExtHdrDestOpt() / TCP(sport=1)),
        bytes(IPv6(**v6) / IPv6ExtHdrFragment(offset=3) / Raw(b"frag")),
        bytes(IPv6(**v6) / IPv6ExtHdrFragment() / UDP(sport=7)),
    ]
    return out


REAL = _real_packets()


# ---------------------------------------------------------------- the key

def test_key_of_equals_flow_key_on_real_packets_and_all_their_prefixes():
    for packet in REAL:
        for n in range(len(packet) + 1):
            assert key_of(packet[:n]) == flow_key(packet[:n]), (packet.hex(), n)
        key = key_of(packet)
        assert key is None or len(key) + 8 <= KEY_MAX_LEN


@settings(max_examples=4000)
@given(st.binary(min_size=0, max_size=90), st.integers(0, 255))
def test_key_of_equals_flow_key_on_random_bytes(data, first):
    for packet in (data, bytes([first]) + data, bytes([0x40 | (first & 0x0F)]) + data,
                   bytes([0x60]) + data):
        assert key_of(packet) == flow_key(packet)


@settings(max_examples=3000)
@given(st.sampled_from(REAL), st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)),
                                       max_size=4), st.integers(0, 120))
def test_key_of_equals_flow_key_on_mutated_real_packets(packet, changes, cut):
    data = bytearray(packet)
    for pos, value in changes:
        if pos < len(data):
            data[pos] = value
    for p in (bytes(data), bytes(data[:cut])):
        assert key_of(p) == flow_key(p)


# ---------------------------------------------------------------- outbound

def _table(n: int = 4):
    table = SATable()
    sas = [SA(sa_info(spi=0x2000 + k)) for k in range(n)]
    return table, sas, [table.add(sa) for sa in sas]


def _batch(packets, capacity: int = 64) -> PacketBatch:
    batch = PacketBatch(capacity=capacity)
    for p in packets:
        batch.add(p)
    return batch


def _udp(sport: int, size: int = 32, family: int = 4) -> bytes:
    if family == 4:
        return bytes(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=53)
                     / Raw(bytes(size)))
    return bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=sport, dport=53)
                 / Raw(bytes(size)))


def test_capacity_must_be_a_power_of_two():
    for bad in (0, 1, 4, 100, 4095):
        with pytest.raises(ConfigError):
            FlowCache(bad)
    assert FlowCache().capacity == 4096 and InboundCache(64).capacity == 64


def test_flag_accepted_is_a_free_bit():
    assert FLAG_ACCEPTED & (FLAG_MAPPING | FLAG_SOFT_EXPIRED) == 0
    assert 0 < FLAG_ACCEPTED < 256


def test_hit_after_insert_and_generation_bump_invalidates():
    table, _, idx = _table()
    cache = FlowCache()
    batch = _batch([_udp(1), _udp(1, 40), _udp(2), _udp(1, 10, family=6), b"\x45junk"])
    assert cache.classify(batch, table, GEN) == [0, 1, 2, 3, 4]
    assert list(batch.sa[:5]) == [-1] * 5
    assert cache.insert(batch, 0, idx[2], 1500, GEN)
    assert cache.insert(batch, 3, idx[1], 1500, GEN)
    assert not cache.insert(batch, 4, idx[1], 1500, GEN)   # no key
    assert len(cache) == 2
    assert cache.classify(batch, table, GEN) == [2, 4]
    assert list(batch.sa[:5]) == [idx[2], idx[2], -1, idx[1], -1]
    assert cache.classify(batch, table, GEN + 1) == [0, 1, 2, 3, 4]
    assert list(batch.sa[:5]) == [-1] * 5
    stats = cache.stats()
    assert stats["inserts"] == 2 and stats["hits"] == 3 and stats["misses"] == 12
    cache.clear()
    assert len(cache) == 0 and cache.classify(batch, table, GEN) == [0, 1, 2, 3, 4]


def test_reinsert_updates_the_entry():
    table, _, idx = _table()
    cache = FlowCache(8)
    batch = _batch([_udp(1)])
    cache.insert(batch, 0, idx[0], 1500, GEN)
    cache.insert(batch, 0, idx[3], 1500, GEN)
    assert len(cache) == 1 and cache.classify(batch, table, GEN) == []
    assert batch.sa[0] == idx[3]
    cache.insert(batch, 0, idx[1], 1500, GEN + 1)
    assert cache.classify(batch, table, GEN) == [0]
    assert cache.classify(batch, table, GEN + 1) == [] and batch.sa[0] == idx[1]


def test_killed_or_removed_sa_invalidates():
    table, sas, idx = _table()
    cache = FlowCache()
    batch = _batch([_udp(1), _udp(2), _udp(3)])
    for i in range(3):
        cache.insert(batch, i, idx[i], 1500, GEN)
    assert cache.classify(batch, table, GEN) == []
    sas[0].kill()
    table.remove(sas[1])
    assert cache.classify(batch, table, GEN) == [0, 1]
    assert list(batch.sa[:3]) == [-1, -1, idx[2]]
    # an index beyond the table is never a hit either
    cache.insert(batch, 2, 1000, 1500, GEN)
    assert cache.classify(batch, table, GEN) == [0, 1, 2]


def test_packet_longer_than_max_len_is_a_miss():
    table, _, idx = _table()
    cache = FlowCache()
    small, big = _udp(1, 10), _udp(1, 1000)
    batch = _batch([small, big])
    cache.insert(batch, 0, idx[0], len(small) + 1, GEN)
    assert cache.classify(batch, table, GEN) == [1]
    cache.insert(batch, 1, idx[0], len(big), GEN)
    assert cache.classify(batch, table, GEN) == []


def test_flows_differing_in_one_field_do_not_share_an_entry():
    table, _, idx = _table()
    base = dict(src="10.1.0.1", dst="10.2.0.1")
    packets = [
        bytes(IP(**base) / UDP(sport=1, dport=53)),
        bytes(IP(**base) / UDP(sport=1, dport=54)),
        bytes(IP(**base) / UDP(sport=2, dport=53)),
        bytes(IP(**base) / TCP(sport=1, dport=53)),
        bytes(IP(src="10.1.0.2", dst="10.2.0.1") / UDP(sport=1, dport=53)),
        bytes(IP(src="10.1.0.1", dst="10.2.0.2") / UDP(sport=1, dport=53)),
        bytes(IP(**base, frag=3, proto=17) / Raw(bytes(8))),
        bytes(IP(**base) / ICMP(type=8)),
        bytes(IP(**base) / ICMP(type=0)),
    ]
    batch = _batch(packets)
    for i in range(len(packets)):
        cache = FlowCache()
        cache.insert(batch, i, idx[0], 1500, GEN)
        assert cache.classify(batch, table, GEN) == [j for j in range(len(packets)) if j != i]


def test_many_more_flows_than_capacity_never_give_a_wrong_sa():
    rng = random.Random(1)
    table, sas, idx = _table(8)
    cache = FlowCache(64)
    flows = [_udp(sport, family=4 if sport % 3 else 6) for sport in range(1, 1001)]
    for gen in (GEN, GEN + 1):
        truth = {}
        for _ in range(5):
            order = rng.sample(range(len(flows)), len(flows))
            for start in range(0, len(order), 64):
                chunk = order[start:start + 64]
                batch = _batch([flows[k] for k in chunk])
                misses = set(cache.classify(batch, table, gen))
                for i, k in enumerate(chunk):
                    if i in misses:
                        assert batch.sa[i] == -1
                        truth[k] = rng.choice(idx)
                        assert cache.insert(batch, i, truth[k], 1500, gen)
                    else:
                        assert batch.sa[i] == truth[k]
        stats = cache.stats()
        assert stats["hits"] > 0 and stats["evictions"] > 0
        assert len(cache) <= cache.capacity


# ---------------------------------------------------------------- inbound

def _inbound_batch(rows) -> PacketBatch:
    """rows of (packet, sa index, mark): decrypted slots (verdict ok)."""
    batch = PacketBatch(capacity=max(1, len(rows)))
    for packet, sa, mark in rows:
        batch.add(packet, mark, sa)
    return batch


def _accepted(batch) -> list[int]:
    return [i for i in range(batch.count) if batch.flags[i] & FLAG_ACCEPTED]


def test_inbound_hit_after_insert_keyed_on_sa_mark_and_flow():
    cache = InboundCache()
    rows = [(_udp(1), 0, 0), (_udp(1, 50), 0, 0), (_udp(1), 1, 0), (_udp(1), 0, 5),
            (_udp(2), 0, 0), (b"\x60short", 0, 0), (_udp(1), -1, 0)]
    batch = _inbound_batch(rows)
    assert cache.check(batch, GEN) == list(range(7)) and _accepted(batch) == []
    assert cache.insert(batch, 0, GEN)
    assert not cache.insert(batch, 5, GEN) and not cache.insert(batch, 6, GEN)
    assert cache.check(batch, GEN) == [2, 3, 4, 5, 6]
    assert _accepted(batch) == [0, 1]
    cache.insert(batch, 3, GEN)
    assert cache.check(batch, GEN) == [2, 4, 5, 6] and _accepted(batch) == [0, 1, 3]
    assert cache.check(batch, GEN + 1) == list(range(7)) and _accepted(batch) == []


def test_inbound_slots_not_ok_are_neither_and_other_flags_stay():
    cache = InboundCache()
    batch = _inbound_batch([(_udp(1), 0, 0), (_udp(1), 0, 0), (_udp(2), 0, 0)])
    cache.insert(batch, 0, GEN)
    batch.verdict[1] = 11   # replay
    batch.flags[0] = FLAG_MAPPING | FLAG_ACCEPTED
    batch.flags[1] = FLAG_ACCEPTED   # stale
    batch.flags[2] = FLAG_SOFT_EXPIRED
    assert cache.check(batch, GEN) == [2]
    assert list(batch.flags[:3]) == [FLAG_MAPPING | FLAG_ACCEPTED, 0, FLAG_SOFT_EXPIRED]


def test_inbound_after_real_decryption():
    pair = make_pair(sa_info())
    cache = InboundCache()
    batch = PacketBatch()
    for sport in (1, 1, 2):
        verdict, outer, mark = pair.out.encrypt_packet(_udp(sport), 3)
        assert verdict == "ok"
        batch.add(outer, mark)
    batch.add(b"\x45" + bytes(30))   # not ESP
    pair.table.decrypt(batch)
    assert list(batch.verdict[:3]) == [0, 0, 0] and batch.verdict[3] != 0
    assert cache.check(batch, GEN) == [0, 1, 2]
    assert cache.insert(batch, 0, GEN)
    assert cache.check(batch, GEN) == [2] and _accepted(batch) == [0, 1]


def test_inbound_many_more_keys_than_capacity_never_wrongly_accept():
    rng = random.Random(2)
    cache = InboundCache(32)
    keys = [(_udp(sport % 97 + 1), sport % 3, sport % 5) for sport in range(600)]
    keys = list(dict.fromkeys(keys))
    accepted: set = set()
    for _ in range(6):
        order = rng.sample(range(len(keys)), len(keys))
        for start in range(0, len(order), 64):
            chunk = order[start:start + 64]
            batch = _inbound_batch([keys[k] for k in chunk])
            misses = set(cache.check(batch, GEN))
            for i, k in enumerate(chunk):
                if batch.flags[i] & FLAG_ACCEPTED:
                    assert k in accepted and i not in misses
                else:
                    assert i in misses
                    if rng.random() < 0.7:   # the policy accepts most
                        accepted.add(k)
                        cache.insert(batch, i, GEN)
    assert cache.stats()["hits"] > 0 and cache.stats()["evictions"] > 0


# ---------------------------------------------------------------- benchmark

def test_micro_benchmark_classify_vs_python(capsys):
    table, _, idx = _table()
    cache = FlowCache()
    batch = _batch([inner_packet(4, "udp", 64)] * 64)
    cache.insert(batch, 0, idx[0], 1500, GEN)
    assert cache.classify(batch, table, GEN) == []
    rounds = 2000

    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        cache.classify(batch, table, GEN)
    c_ns = (time.perf_counter_ns() - t0) / (rounds * 64)

    decisions = {flow_key(batch.packet(0)): idx[0]}
    t0 = time.perf_counter_ns()
    for _ in range(rounds // 10):
        for i in range(batch.count):
            batch.sa[i] = decisions.get(flow_key(batch.packet(i)), -1)
    py_ns = (time.perf_counter_ns() - t0) / (rounds // 10 * 64)
    many = _batch([_udp(sport) for sport in range(64)])
    for i in range(64):
        cache.insert(many, i, idx[i % 4], 1500, GEN)
    assert cache.classify(many, table, GEN) == []
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        cache.classify(many, table, GEN)
    many_ns = (time.perf_counter_ns() - t0) / (rounds * 64)
    with capsys.disabled():
        print(f"\nflow cache: C classify {c_ns:.1f} ns/packet (one flow), "
              f"{many_ns:.1f} ns/packet (64 flows); Python flow_key + dict "
              f"{py_ns:.1f} ns/packet ({py_ns / c_ns:.0f}x)")
