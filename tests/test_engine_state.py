"""What the control plane reads and changes on an engine SA: replay state
(XFRM GETAE/NEWAE) and the fields UPDSA/MIGRATE may change."""

from __future__ import annotations

import ipaddress

import pytest
from helpers import inner_packet, make_pair, sa_info

from espdp.engine import SA
from espdp.errors import ConfigError
from espdp.sa import Encap, Lifetime, Mark


def test_replay_state_reports_top_bitmap_and_oseq():
    pair = make_pair(sa_info(replay_window=64, flags=frozenset({"esn"})))
    packets = [pair.out.encrypt_packet(inner_packet(fill=i))[1] for i in range(5)]
    for i in (0, 2, 4):
        assert pair.table.decrypt_packet(packets[i])[0] == "ok"
    assert pair.inb.replay_state() == {"seq": 5, "seq_hi": 0, "oseq": 0, "oseq_hi": 0,
                                       "bitmap": 0b10101, "window": 64}
    assert pair.out.replay_state()["oseq"] == 5


def test_set_replay_state_moves_both_directions_past_a_checkpoint():
    pair = make_pair(sa_info(replay_window=64, flags=frozenset({"esn"})))
    pair.out.set_replay_state(0, (7 << 32) | 100)
    verdict, outer, _ = pair.out.encrypt_packet(inner_packet())
    assert int.from_bytes(outer[24:28], "big") == 101          # low half on the wire
    pair.inb.set_replay_state((7 << 32) | 101, 0, bitmap=0b1)  # 101 already seen
    assert pair.table.decrypt_packet(outer)[0] == "replay"
    assert pair.out.replay_state()["oseq_hi"] == 7


def test_update_changes_encap_set_mark_and_lifetimes_only():
    info = sa_info(encap=True, replay_window=32)
    sa = SA(info)
    sa.update(info.replace(encap=Encap("espinudp", 4501, 4502), set_mark=Mark(5),
                           lifetime=Lifetime(hard_packets=1)))
    verdict, outer, mark = sa.encrypt_packet(inner_packet())
    assert (verdict, mark) == ("ok", 5)
    assert outer[20:24] == (4501).to_bytes(2, "big") + (4502).to_bytes(2, "big")
    assert sa.encrypt_packet(inner_packet())[0] == "limit"


def test_migrate_changes_the_outer_addresses():
    info = sa_info()
    sa = SA(info)
    sa.update(info.replace(src=ipaddress.ip_address("198.51.100.9"),
                           dst=ipaddress.ip_address("198.51.100.10")))
    outer = sa.encrypt_packet(inner_packet())[1]
    assert outer[12:20] == bytes([198, 51, 100, 9, 198, 51, 100, 10])


@pytest.mark.parametrize("change", [
    dict(aead=None), dict(spi=7), dict(mode="transport"), dict(replay_window=128),
])
def test_update_refuses_to_rekey_or_change_identity(change):
    info = sa_info(replay_window=32)
    if "aead" in change:
        change = dict(aead=info.aead.__class__(info.aead.name, bytes(20), 128))
    sa = SA(info)
    with pytest.raises(ConfigError):
        sa.update(info.replace(**change))


def test_new_lifetime_lets_a_soft_limit_fire_again():
    info = sa_info(lifetime=Lifetime(soft_packets=0))
    sa = SA(info)
    sa.encrypt_packet(inner_packet())
    assert sa.soft_expired
    sa.update(info.replace(lifetime=Lifetime(soft_packets=10)))
    assert not sa.soft_expired


def test_algorithm_ids_agree_between_python_and_the_engine():
    from espdp import algorithms
    from espdp._crypto import ENGINE_IDS

    assert ENGINE_IDS == {name: getattr(algorithms, name) for name in ENGINE_IDS}
    assert {a.engine_id for a in algorithms.ALGORITHMS if a.kind != "auth"} <= {
        v for k, v in ENGINE_IDS.items() if k.startswith("CIPHER_")}


def test_killed_sa_sends_nothing():
    sa = SA(sa_info())
    sa.kill()
    assert sa.encrypt_packet(inner_packet())[0] == "no_sa"
    assert sa.dead


def test_oseq_sweep_reads_counters_by_slot():
    from espdp.engine import OseqSweep

    a, b = SA(sa_info(spi=0x21)), SA(sa_info(spi=0x22))
    sweep = OseqSweep([a])
    sweep.resize(3)                        # grows, the SA stays in slot 0
    sweep.resize(1)                        # never shrinks
    sweep.put(2, b)
    a.oseq, b.oseq = 7, 9
    b.kill()
    oseq, dead = sweep.read()
    assert oseq.tolist() == [7, 0, 9] and dead.tolist() == [False, False, True]
    sweep.clear(2)
    oseq, dead = sweep.read()
    assert oseq.tolist() == [7, 0, 0] and not dead.any() and len(sweep) == 3
    with pytest.raises(TypeError):
        sweep.put(1, object())
    with pytest.raises(IndexError):
        sweep.put(3, a)
    with pytest.raises(IndexError):
        sweep.clear(-1)


def test_copy_from_with_head_copies_only_the_first_bytes():
    from espdp.engine import PacketBatch

    template, work = PacketBatch(4), PacketBatch(4)
    template.add(bytes(range(100)))
    work.add(b"\xff" * 100)
    work.copy_from(template, 10)
    assert work.packet(0) == bytes(range(10)) + b"\xff" * 90
    work.copy_from(template)
    assert work.packet(0) == bytes(range(100))
