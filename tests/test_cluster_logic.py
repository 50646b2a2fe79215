"""The cluster's pieces on their own (no root, no etcd): settings, sealing, the
balance plan, where an SA starts after a takeover, the per-batch filter and
the replication of control-socket changes."""

from __future__ import annotations

import ipaddress
import os
import random
import struct

import pytest

from espdp.cluster.agent import start_values
from espdp.cluster.balance import plan
from espdp.cluster.config import parse_cluster
from espdp.cluster.filter import SegmentFilter
from espdp.cluster.hash import PeerSegments, segment_of
from espdp.cluster.replicate import ReplicatingXfrm, apply_record
from espdp.cluster.seal import Sealer, read_secret
from espdp.config import loads
from espdp.engine import PacketBatch
from espdp.errors import ConfigError
from espdp.xfrm import Xfrm

BASE = {"node": "gw1", "endpoints": ["http://127.0.0.1:2379"], "addresses": ["192.0.2.1"],
        "secret_file": "/nonexistent"}


# ---------------------------------------------------------------- settings


def test_cluster_table_is_read_from_the_toml_with_defaults():
    cfg = loads('[tunnel]\ntun = "esp0"\n[cluster]\nnode = "gw1"\n'
                'endpoints = ["http://10.0.0.1:2379"]\naddresses = ["192.0.2.1", "2001:db8::1"]\n'
                'secret_file = "/etc/espdp/cluster.key"\nsegments = 8\ninbound = "strict"\n')
    c = cfg.cluster
    assert (c.node, c.segments, c.inbound, c.hash, c.ipv6_words, c.lease_ttl) == \
        ("gw1", 8, "strict", "addr", 1, 5)
    assert c.addresses == (ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1"))
    assert c.jump == 2 * c.max_rate * c.checkpoint_interval
    assert c.fence_margin == 1.25 and c.keepalive_interval == 1.25


@pytest.mark.parametrize("change,message", [
    ({"segments": 33}, "segments"),
    ({"segments": 0}, "segments"),
    ({"inbound": "loose"}, "inbound"),
    ({"hash": "port"}, "hash"),
    ({"ipv6_words": 2}, "ipv6_words"),
    ({"lease_ttl": 1}, "lease_ttl"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"endpoints": ["10.0.0.1:2379"]}, "endpoints"),
    ({"addresses": ["not an address"]}, "addresses"),
    ({"fence_margin": 4.5}, "fence_margin"),
    ({"node": None}, "node"),
])
def test_bad_cluster_settings_name_the_key(change, message):
    table = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        parse_cluster(table, "t.toml: [cluster]")


# ---------------------------------------------------------------- sealing


def _secret(tmp_path, mode=0o600):
    path = tmp_path / "secret"
    path.write_text(os.urandom(32).hex())
    path.chmod(mode)
    return str(path)


def test_sealed_records_open_only_with_the_secret_and_under_their_name(tmp_path):
    sealer = Sealer(read_secret(_secret(tmp_path)))
    sealed = sealer.seal(b"state add ... aead rfc4106(gcm(aes)) 0xsecret 128", "/espdp/x/sa/1")
    assert b"0xsecret" not in sealed
    assert sealer.open(sealed, "/espdp/x/sa/1").endswith(b"0xsecret 128")
    with pytest.raises(ConfigError):
        sealer.open(sealed, "/espdp/x/sa/2")   # moved to another name
    with pytest.raises(ConfigError):
        Sealer(os.urandom(32)).open(sealed, "/espdp/x/sa/1")   # another cluster
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ConfigError):
        sealer.open(tampered, "/espdp/x/sa/1")


def test_a_secret_others_can_read_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="chmod 600"):
        read_secret(_secret(tmp_path, 0o644))


def test_checkpoint_ids_follow_the_keys_not_the_addresses(tmp_path):
    sealer = Sealer(read_secret(_secret(tmp_path)))
    x = Xfrm()
    key = "0x" + "ab" * 20
    for dst, spi, k in (("192.0.2.9", 0x10, key), ("192.0.2.10", 0x10, key),
                        ("192.0.2.11", 0x10, "0x" + "cd" * 20)):
        x.execute(f"state add src 192.0.2.1 dst {dst} proto esp spi {spi} mode tunnel "
                  f"aead 'rfc4106(gcm(aes))' {k} 128", 0)
    a, b, c = (sealer.checkpoint_id(st.info) for st in x.sad.dump())
    assert len({a, b, c}) == 2 and key[2:] not in a + b + c
    assert Sealer(os.urandom(32)).checkpoint_id(x.sad.dump()[0].info) not in (a, b, c)


# ---------------------------------------------------------------- balance


def _settle(members, owners, total, rounds=50):
    for _ in range(rounds):
        changed = False
        for me in random.Random(len(owners)).sample(members, len(members)):
            decided = plan(me, members, owners, total)
            for s in decided.claims:
                if owners.get(s) is None:
                    owners[s] = me
                    changed = True
            if decided.release is not None:
                owners[decided.release] = None
                changed = True
        if not changed:
            return owners
    raise AssertionError(f"no steady state: {owners}")


def _counts(owners, members):
    return sorted(sum(1 for o in owners.values() if o == m) for m in members)


@pytest.mark.parametrize("total", [6, 7, 16, 32])
def test_segments_balance_as_nodes_come_and_go_and_return_home(total):
    members, owners = [], {}
    for node in ("n1", "n2", "n3"):
        members.append(node)
        owners = _settle(members, owners, total)
        assert max(_counts(owners, members)) - min(_counts(owners, members)) <= 1
    before = dict(owners)
    members.remove("n2")
    owners = _settle(members, {s: o for s, o in owners.items() if o != "n2"}, total)
    assert None not in owners.values() and len(owners) == total
    members.append("n2")
    owners = _settle(members, owners, total)
    assert max(_counts(owners, members)) - min(_counts(owners, members)) <= 1
    assert any(o == "n2" and owners[s] == "n2" for s, o in before.items())   # some went home


def test_a_segment_of_a_node_that_is_gone_is_not_free_until_its_key_goes():
    assert plan("a", ["a"], {0: "b"}, 2).claims == [1]


# ---------------------------------------------------------------- where SAs start


def _item(oseq=0, seq=0, bitmap=0, window=64, esn=False):
    return {"oseq": oseq, "seq": seq, "bitmap": bitmap, "window": window, "esn": esn}


def test_outbound_starts_past_the_checkpoint_by_the_jump_and_never_lower():
    ckpt = {"oseq": 5000, "seq": 70, "bitmap": "ff"}
    assert start_values(_item(), ckpt, 1000, "window")["oseq"] == 6000
    assert start_values(_item(oseq=9000), ckpt, 1000, "window")["oseq"] == 9000
    assert start_values(_item(oseq=42), None, 1000, "window")["oseq"] == 42


def test_inbound_window_mode_restores_the_checkpointed_window():
    got = start_values(_item(seq=10, bitmap=1), {"oseq": 0, "seq": 70, "bitmap": "f0f"},
                       1000, "window")
    assert (got["seq"], got["bitmap"]) == (70, 0xF0F)


def test_inbound_strict_mode_accepts_only_past_checkpoint_plus_jump():
    got = start_values(_item(seq=10, window=64), {"oseq": 0, "seq": 70, "bitmap": "1"},
                       1000, "strict")
    assert (got["seq"], got["bitmap"]) == (1070, (1 << 64) - 1)


def test_a_non_esn_sa_is_exhausted_rather_than_wrapped():
    got = start_values(_item(), {"oseq": 0xFFFFFF00, "seq": 0xFFFFFFF0, "bitmap": "0"},
                       1000, "strict")
    assert got["oseq"] == got["seq"] == 0xFFFFFFFF
    esn = start_values(_item(esn=True), {"oseq": 0xFFFFFF00, "seq": 0, "bitmap": "0"},
                       1000, "window")
    assert esn["oseq"] == 0xFFFFFF00 + 1000


# ---------------------------------------------------------------- the filter


def _udp4(src: str, sport: int = 4500) -> bytes:
    udp = struct.pack("!HHHH", sport, 4500, 8 + 16, 0) + bytes(16)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, bytes([192, 0, 2, 1])) + udp


def _udp6(src: str) -> bytes:
    udp = struct.pack("!HHHH", 4500, 4500, 8 + 16, 0) + bytes(16)
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64,
                       ipaddress.ip_address(src).packed,
                       ipaddress.ip_address("2001:db8::1").packed) + udp


def _filter(total=6, with_port=False, now=100.0):
    f = SegmentFilter(PeerSegments(total, 7, with_port), total, clock=lambda: now)
    f.fence_until = now + 1
    return f


def test_inbound_keeps_only_owned_segments_in_order_and_compacts_the_batch():
    f = _filter()
    sources = [f"192.0.2.{i}" for i in range(10, 40)] + [f"fd5e:{i:x}::2" for i in range(1, 30)]
    segs = {s: segment_of(ipaddress.ip_address(s), 6, 7) for s in sources}
    f.set_owned(0, True)
    f.set_owned(3, True)
    batch = PacketBatch(64, 2304, 256)
    for s in sources:
        batch.add(_udp4(s) if "." in s else _udp6(s))
    f.inbound(batch)
    kept = [s for s in sources if segs[s] in (0, 3)]
    assert 0 < batch.count == len(kept) < len(sources)
    got = []
    for i in range(batch.count):
        p = batch.packet(i)
        got.append(str(ipaddress.ip_address(p[12:16] if p[0] >> 4 == 4 else p[8:24])))
    assert got == kept
    assert f.counters["not_owned_in"] == len(sources) - len(kept)


def test_inbound_one_peer_batch_takes_the_fast_path_and_all_or_nothing():
    f = _filter()
    src = "192.0.2.77"
    f.set_owned(segment_of(ipaddress.ip_address(src), 6, 7), True)
    batch = PacketBatch(64, 2304, 256)
    for _ in range(64):
        batch.add(_udp4(src))
    f.inbound(batch)
    assert batch.count == 64
    f.disarm_all()
    f.inbound(batch)
    assert batch.count == 0 and f.counters["not_owned_in"] == 64


def test_addr_and_port_mode_splits_one_nat_address_by_port():
    f = _filter(with_port=True)
    owned = PeerSegments(6, 7, with_port=True).of(ipaddress.ip_address("198.51.100.1"), 4501)
    f.set_owned(owned, True)
    batch = PacketBatch(64, 2304, 256)
    for port in range(4500, 4540):
        batch.add(_udp4("198.51.100.1", port))
    f.inbound(batch)
    expected = [p for p in range(4500, 4540)
                if PeerSegments(6, 7, True).of(ipaddress.ip_address("198.51.100.1"), p) == owned]
    assert batch.count == len(expected) and 4501 in expected
    assert [struct.unpack("!H", batch.packet(i)[20:22])[0] for i in range(batch.count)] == \
        expected


def test_a_fenced_node_drops_everything_both_ways():
    now = [100.0]
    f = SegmentFilter(PeerSegments(6, 7), 6, clock=lambda: now[0])
    f.owned[:] = [True] * 6
    f.fence_until = 100.5
    sa = _FakeSA(0, 10)
    f.arm(sa, 1000, 500)
    batch = PacketBatch(8, 2304, 256)
    for _ in range(4):
        batch.add(_udp4("192.0.2.9"))
    f.inbound(batch)
    assert batch.count == 4
    now[0] = 100.5
    f.inbound(batch)
    assert batch.count == 0 and f.counters["fenced_in"] == 4
    out = _out_batch([0, 0, -1])
    f.outbound(out)
    assert list(out.sa[:3]) == [-1, -1, -1] and f.counters["fenced_out"] == 2


class _FakeSA:
    def __init__(self, index: int, oseq: int) -> None:
        self.index, self.oseq = index, oseq


def _out_batch(sas):
    batch = PacketBatch(64, 2304, 256)
    for sa in sas:
        batch.add(b"\x45" + bytes(39), sa=sa)
    return batch


def test_outbound_keeps_armed_sas_and_holds_one_at_its_budget():
    f = _filter()
    a, b, c = _FakeSA(0, 10), _FakeSA(1, 995), _FakeSA(70, 0)
    f.arm(a, 1000, 500)
    f.arm(b, 1000, 500)
    batch = _out_batch([0, 1, 2, 0, 1, 1, 1, 1, 1, 1, -1])   # 2: not armed here
    f.outbound(batch)
    # b would pass 1000 with its seven packets: held, and a checkpoint asked for
    assert list(batch.sa[:11]) == [0, -1, -1, 0, -1, -1, -1, -1, -1, -1, -1]
    assert f.counters == {**f.counters, "not_owned_out": 1, "budget": 7}
    assert f.checkpoint_due
    f.checkpoint_due = False
    f.raise_limit(b, 3000, 2000)
    f.arm(c, 100, 50)   # index 70: the table grows
    batch = _out_batch([1, 1, 70])
    f.outbound(batch)
    assert list(batch.sa[:3]) == [1, 1, 70] and not f.checkpoint_due
    f.disarm(b)
    batch = _out_batch([1, 70])
    f.outbound(batch)
    assert list(batch.sa[:2]) == [-1, 70] and not f.armed(b) and f.armed(c)


# ---------------------------------------------------------------- replication


KEY = "0x" + "5a" * 20


def test_control_socket_changes_replicate_to_another_node_in_order():
    here, there = Xfrm(), Xfrm()
    records: list = []
    view = ReplicatingXfrm(here, lambda name, record: records.append((name, record)))
    lines = [
        f"ip xfrm state add src 192.0.2.1 dst 192.0.2.9 proto esp spi 0x10 mode tunnel "
        f"aead 'rfc4106(gcm(aes))' {KEY} 128",
        f"state add src 192.0.2.9 dst 192.0.2.1 proto esp spi 0x11 mode tunnel "
        f"aead 'rfc4106(gcm(aes))' {KEY} 128",
        f"state update src 192.0.2.1 dst 192.0.2.9 proto esp spi 0x10 mode tunnel "
        f"aead 'rfc4106(gcm(aes))' {KEY} 128 limit time-soft 500",
        "policy add src 10.1.0.0/16 dst 10.2.0.0/16 dir out tmpl src 192.0.2.1 "
        "dst 192.0.2.9 proto esp reqid 1 mode tunnel",
        "policy add src 10.3.0.0/16 dst 10.2.0.0/16 dir out tmpl src 192.0.2.1 "
        "dst 192.0.2.9 proto esp reqid 1 mode tunnel",
        "state delete src 192.0.2.9 dst 192.0.2.1 proto esp spi 0x11",
        "state list",
    ]
    for line in lines:
        view.execute(line, 0)
    index = next(p["index"] for p in here.execute("policy list", 0)["policies"]
                 if p["src"] == "10.3.0.0/16")
    view.execute(f"policy delete dir out index {index}", 0)
    assert len(records) == 7   # not the list
    for _, record in records:
        apply_record(there, record, 0)
    for what in ("state list", "policy list"):
        assert there.execute(what, 0, show_keys=True) == here.execute(what, 0, show_keys=True)
    assert there.getsa("192.0.2.9", 0x10).info.lifetime.soft_add_expires == 500
    # A record applies where the SA already exists (an add becomes an update) and
    # where it does not (an update becomes an add); a delete of what is gone is fine.
    for _, record in records:
        apply_record(there, record, 0)
    apply_record(Xfrm(), records[2][1], 0)
    view.execute("state flush", 0)
    name, flush = records[-1]
    assert name == "flush/sa"
    apply_record(there, flush, 0)
    assert there.execute("state count", 0) == {"count": 0}


def test_a_failed_change_is_not_published():
    records: list = []
    view = ReplicatingXfrm(Xfrm(), lambda *r: records.append(r))
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises
        view.execute("state delete src 192.0.2.1 dst 192.0.2.9 proto esp spi 0x99", 0)
    assert records == []
