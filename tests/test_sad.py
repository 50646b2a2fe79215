"""The SAD against the XFRM semantics an implementer commonly gets wrong
(../shared/XFRM-NOTES.md; net/xfrm/xfrm_state.c, xfrm_user.c), plus a
hypothesis state machine against a small reference model and the lookup-cost
probe.  Time is always explicit."""

from __future__ import annotations

import ipaddress
import random

import pytest
from helpers import GCM_KEY, inner_packet, sa_info
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from espdp.engine import SA
from espdp.errors import XfrmError
from espdp.sa import AlgoKey, Encap, Lifetime, Mark, Selector
from espdp.xfrm.policy import Flow, Policy, Template
from espdp.xfrm.sad import ACQUIRE, DYING, LARVAL, TRANSITIONS, VALID, SecurityAssociationDatabase

ip = ipaddress.ip_address
net = ipaddress.ip_network
SRC, DST = ip("192.0.2.1"), ip("192.0.2.2")
OTHER_KEY = AlgoKey("rfc4106(gcm(aes))", bytes.fromhex("77" * 20), 128)


def sad(**kw) -> SecurityAssociationDatabase:
    """A SAD with a seeded RNG; AE events off unless asked for."""
    kw = {"replay_maxdiff": 0, "replay_maxage": 0, **kw}
    return SecurityAssociationDatabase(rng=random.Random(7), **kw)


def expire_events(events) -> list[tuple[str, bool]]:
    return [(e.sa["spi"], e.hard) for e in events if e.type == "expire"]


def send(st, n: int = 1, size: int = 60) -> None:
    """Push n packets through the SA's engine object (outbound)."""
    for i in range(n):
        verdict = st.engine.encrypt_packet(inner_packet(size=size, fill=i))[0]
        assert verdict == "ok", verdict


def out_policy(*templates: Template, mark=None, if_id: int = 0) -> Policy:
    sel = Selector(net("10.1.0.0/16"), net("10.2.0.0/16"))
    return Policy(sel, "out", mark=mark, if_id=if_id, templates=templates)


def tunnel_template(reqid: int = 1, level: str = "required", **kw) -> Template:
    return Template(dst=DST, src=SRC, mode="tunnel", reqid=reqid, level=level, **kw)


FLOW = Flow(ip("10.1.0.1"), ip("10.2.0.1"), 17, 1234, 5678)


# ---------------------------------------------------------------- the transition table

def test_every_status_change_is_in_the_one_table():
    assert {status for status, _ in TRANSITIONS} == {LARVAL, ACQUIRE, VALID, DYING}
    assert (DYING, "soft") not in TRANSITIONS  # soft fires once
    assert TRANSITIONS[(DYING, "update")] == (VALID, None)  # new lifetimes clear dying


# ---------------------------------------------------------------- limits

@pytest.mark.parametrize("limit", ["hard_packets", "hard_bytes"])
def test_hard_byte_or_packet_limit_of_zero_expires_at_once(limit):
    db = sad()
    db.newsa(sa_info(reqid=1, lifetime=Lifetime(**{limit: 0})), now=0)
    assert expire_events(db.tick(0)) == [("0x00001001", True)]
    assert db.count() == 0


@pytest.mark.parametrize("limit", ["soft_packets", "soft_bytes"])
def test_soft_byte_or_packet_limit_of_zero_fires_at_once(limit):
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(**{limit: 0})), now=0)
    assert expire_events(db.tick(0)) == [("0x00001001", False)]
    assert st.status == DYING


def test_time_limits_of_zero_mean_never():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(soft_add_expires=0, hard_add_expires=0,
                                            soft_use_expires=0, hard_use_expires=0)), now=0)
    send(st)
    assert db.tick(10 ** 9) == [] and st.status == VALID


def test_packet_limits_count_the_engine_packets():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(soft_packets=2, hard_packets=4)), now=0)
    send(st, 1)
    assert db.tick(1) == []
    send(st, 1)  # the count reached the soft limit (as a limit of 0 fires at once)
    assert expire_events(db.tick(2)) == [("0x00001001", False)]
    send(st, 1)
    assert db.tick(3) == []  # once
    send(st, 1)
    assert expire_events(db.tick(4)) == [("0x00001001", True)]
    with pytest.raises(XfrmError):
        db.getsa(DST, 0x1001)


def test_use_time_counts_from_the_first_use_not_from_the_add():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(hard_use_expires=10)), now=0)
    assert db.tick(100) == []  # never used: never use-expires
    send(st)
    db.tick(100)  # the tick sees the first packet: use time 100
    assert st.current()["use_time"] == 100
    assert db.tick(109.9) == []
    assert expire_events(db.tick(110)) == [("0x00001001", True)]


def test_note_use_starts_the_use_time():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(soft_use_expires=5)), now=0)
    db.note_use(st.engine, now=3)
    assert db.tick(7.9) == []
    assert expire_events(db.tick(8)) == [("0x00001001", False)]


def test_soft_fires_once_and_a_newer_sa_for_the_template_wins():
    db = sad()
    old = db.newsa(sa_info(spi=0x1001, reqid=1, lifetime=Lifetime(soft_add_expires=10,
                                                                   hard_add_expires=20)), now=0)
    policy, tmpl = out_policy(tunnel_template()), tunnel_template()
    assert db.find_outbound(tmpl, policy, FLOW) is old
    assert expire_events(db.tick(10)) == [("0x00001001", False)]
    assert db.tick(15) == []  # once
    assert db.find_outbound(tmpl, policy, FLOW) is old  # dying, but still the only one
    new = db.newsa(sa_info(spi=0x1002, reqid=1), now=16)
    assert db.find_outbound(tmpl, policy, FLOW) is new
    assert expire_events(db.tick(20)) == [("0x00001001", True)]


def test_find_outbound_prefers_the_newest_of_equal_sas():
    db = sad()
    db.newsa(sa_info(spi=0x1001, reqid=1), now=0)
    newest = db.newsa(sa_info(spi=0x1002, reqid=1), now=1)
    db.newsa(sa_info(spi=0x1003, reqid=2), now=2)  # another reqid: never for this template
    assert db.find_outbound(tunnel_template(), out_policy(tunnel_template()), FLOW) is newest


def test_find_outbound_needs_the_exact_reqid_and_a_matching_sa_selector():
    db = sad()
    db.newsa(sa_info(reqid=5, selector=Selector(net("10.1.0.0/24"), net("10.2.0.0/24"))),
             now=0)
    assert db.find_outbound(tunnel_template(reqid=0), out_policy(), FLOW) is None
    assert db.find_outbound(tunnel_template(reqid=5), out_policy(), FLOW) is not None
    far = Flow(ip("10.1.9.1"), ip("10.2.0.1"))
    assert db.find_outbound(tunnel_template(reqid=5), out_policy(), far) is None


def test_hard_expiry_removes_the_sa_before_the_event():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(hard_add_expires=5)), now=0)
    engine = st.engine
    [event] = db.tick(5)
    assert event.hard and event.ref is st
    assert db.count() == 0 and len(db.table) == 0 and db.table.lookup(DST, 0x1001) is None
    assert engine.encrypt_packet(inner_packet())[0] == "no_sa"  # killed: it cannot send


# ---------------------------------------------------------------- newsa / updsa

def test_newsa_of_an_existing_id_is_eexist():
    db = sad()
    db.newsa(sa_info(), now=0)
    with pytest.raises(XfrmError) as exc:
        db.newsa(sa_info(), now=1)
    assert exc.value.errno == "EEXIST"


def test_updsa_completes_an_allocspi_state_and_newsa_on_it_is_eexist():
    db = sad()
    larval = db.allocspi(sa_info(spi=0, reqid=3), 0x2000, 0x2000, now=0)
    assert (larval.status, larval.info.spi, larval.engine) == (LARVAL, 0x2000, None)
    with pytest.raises(XfrmError) as exc:
        db.newsa(sa_info(spi=0x2000, reqid=3), now=1)
    assert exc.value.errno == "EEXIST"
    st = db.updsa(sa_info(spi=0x2000, reqid=3, replay_window=32), now=2)
    assert st is larval and st.status == VALID and st.add_time == 2
    assert db.table.lookup(DST, 0x2000) is st.engine
    assert db.tick(10 ** 6) == []  # the larval lifetime no longer applies


def test_updsa_of_an_absent_sa_is_esrch():
    with pytest.raises(XfrmError) as exc:
        sad().updsa(sa_info(), now=0)
    assert exc.value.errno == "ESRCH"


def test_updsa_with_another_dir_is_esrch_as_in_the_kernel():
    db = sad()
    db.newsa(sa_info(dir="in", replay_window=32), now=0)
    with pytest.raises(XfrmError) as exc:
        db.updsa(sa_info(dir="out"), now=1)
    assert exc.value.errno == "ESRCH"


def test_updsa_does_not_rekey_a_valid_sa():
    """xfrm_state_update copies only encap, lifetimes, set-mark and if_id: other
    fields of the update, keys included, are silently ignored (no EINVAL)."""
    db = sad()
    st = db.newsa(sa_info(replay_window=32), now=0)
    peer = sad()
    peer_st = peer.newsa(sa_info(replay_window=32), now=0)
    send(st)
    db.updsa(sa_info(aead=OTHER_KEY, replay_window=64, reqid=9, set_mark=Mark(0x42),
                     if_id=7, lifetime=Lifetime(hard_add_expires=99)), now=1)
    info = db.getsa(DST, 0x1001).info
    assert info.aead.key == GCM_KEY and info.replay_window == 32 and info.reqid == 0
    assert (info.set_mark, info.if_id, info.lifetime.hard_add_expires) == (Mark(0x42), 7, 99)
    verdict, outer, _ = st.engine.encrypt_packet(inner_packet())
    assert verdict == "ok" and peer_st.engine is peer.table.lookup(DST, 0x1001)
    assert peer.table.decrypt_packet(outer)[0] == "ok"  # still the old key
    assert st.engine.oseq == 2  # and the sequence numbers carried on


@pytest.mark.parametrize("old, new", [(None, Encap("espinudp", 4500, 4500)),
                                      (Encap("espinudp", 4500, 4500), None),
                                      (Encap("espinudp", 4500, 4500),
                                       Encap("espinudp-nonike", 4500, 4500))])
def test_updsa_cannot_add_remove_or_retype_encap(old, new):
    db = sad()
    db.newsa(sa_info(encap=False).replace(encap=old), now=0)
    with pytest.raises(XfrmError) as exc:
        db.updsa(sa_info(encap=False).replace(encap=new), now=1)
    assert exc.value.errno == "EINVAL"


def test_updsa_takes_new_encap_ports_of_the_same_type():
    db = sad()
    st = db.newsa(sa_info(encap=True), now=0)
    send(st, 3)
    db.updsa(sa_info(encap=True).replace(encap=Encap("espinudp", 4501, 4600)), now=1)
    assert (st.info.encap.sport, st.info.encap.dport) == (4501, 4600)
    assert st.engine.oseq == 3 and st.counters()["packets"] == 3  # carried to the new engine SA


def test_updsa_with_new_lifetimes_clears_dying():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(soft_add_expires=5)), now=0)
    db.tick(5)
    assert st.status == DYING
    db.updsa(sa_info(lifetime=Lifetime(soft_add_expires=50)), now=6)
    assert st.status == VALID
    assert expire_events(db.tick(50)) == [("0x00001001", False)]  # from the add time


# ---------------------------------------------------------------- marks

def test_lookup_matches_the_request_mark_under_the_sa_mask():
    db = sad()
    db.newsa(sa_info(spi=0x1001, mark=Mark(0x10, 0xF0)), now=0)
    db.newsa(sa_info(spi=0x1002), now=0)
    assert db.getsa(DST, 0x1001, mark=Mark(0x1F)).info.spi == 0x1001  # 0x1f & 0xf0 == 0x10
    assert db.getsa(DST, 0x1001, mark=0x13).info.spi == 0x1001
    for miss in (None, Mark(0x20), Mark(0x1F, 0x0F)):  # 0, 0x20, 0x0f: no (m & 0xf0) == 0x10
        with pytest.raises(XfrmError):
            db.getsa(DST, 0x1001, mark=miss)
    assert db.getsa(DST, 0x1002).info.spi == 0x1002  # no mark: matches mark 0
    assert db.getsa(DST, 0x1002, mark=Mark(0x55)).info.spi == 0x1002  # and any mark


def test_same_spi_with_disjoint_marks_coexists_and_the_engine_separates_them():
    db = sad()
    a = db.newsa(sa_info(mark=Mark(1, 0xFF)), now=0)
    b = db.newsa(sa_info(mark=Mark(2, 0xFF)), now=0)
    with pytest.raises(XfrmError) as exc:  # (3 & 0xff) is not 1 or 2, but v & m of 0x101
        db.newsa(sa_info(mark=Mark(0x101, 0xFFF)), now=0)  # matches SA a's (v=1, m=0xff)
    assert exc.value.errno == "EEXIST"
    assert db.table.lookup(DST, 0x1001, mark=0x301) is a.engine
    assert db.table.lookup(DST, 0x1001, mark=0x702) is b.engine
    assert db.table.lookup(DST, 0x1001, mark=3) is None


def test_outbound_uses_the_policy_mark_not_the_packet_mark():
    db = sad()
    st = db.newsa(sa_info(reqid=1, mark=Mark(0x5, 0xF)), now=0)
    tmpl = tunnel_template()
    assert db.find_outbound(tmpl, out_policy(tmpl, mark=Mark(0x25, 0xFF)), FLOW) is st
    assert db.find_outbound(tmpl, out_policy(tmpl, mark=Mark(0x6, 0xF)), FLOW) is None
    assert db.find_outbound(tmpl, out_policy(tmpl), FLOW) is None  # policy mark 0


# ---------------------------------------------------------------- inbound templates

@pytest.mark.parametrize("tmpl_reqid, sa_reqid, ok", [(0, 7, True), (7, 7, True),
                                                      (8, 7, False)])
def test_reqid_zero_is_a_wildcard_on_input(tmpl_reqid, sa_reqid, ok):
    db = sad()
    st = db.newsa(sa_info(reqid=sa_reqid), now=0)
    tmpl = Template(dst=DST, src=SRC, mode="tunnel", reqid=tmpl_reqid)
    assert db.inbound_ok(tmpl, st) is ok


def test_inbound_tunnel_template_checks_the_source_and_mode():
    db = sad()
    st = db.newsa(sa_info(), now=0)
    assert not db.inbound_ok(Template(src=ip("192.0.2.9"), mode="tunnel"), st)
    assert db.inbound_ok(Template(src=ip("0.0.0.0"), mode="tunnel"), st)
    assert not db.inbound_ok(Template(mode="transport"), st)


# ---------------------------------------------------------------- acquire states

def test_newsa_removes_the_matching_acquire_state():
    db = sad()
    policy = out_policy(tunnel_template(reqid=4))
    acq, new = db.acquire(policy, policy.templates[0], FLOW, now=0)
    assert new and acq.status == ACQUIRE and acq.info.spi == 0
    assert db.acquire(policy, policy.templates[0], FLOW, now=1) == (acq, False)
    db.newsa(sa_info(reqid=4, spi=0x1234), now=2)
    assert acq.status == "dead" and db.count() == 1
    assert db.tick(100) == []  # a resolved acquire state does not expire later


def test_acquire_state_dies_after_acq_expires_with_a_hard_expire_of_spi_0():
    db = sad(acq_expires=30)
    policy = out_policy(tunnel_template())
    db.acquire(policy, policy.templates[0], FLOW, now=0)
    assert db.tick(29.9) == []
    assert expire_events(db.tick(30)) == [("0x00000000", True)]


# ---------------------------------------------------------------- allocspi

def test_allocspi_min_equals_max_is_that_spi_and_a_taken_one_fails():
    db = sad()
    assert db.allocspi(sa_info(spi=0), 0x4242, 0x4242, now=0).info.spi == 0x4242
    with pytest.raises(XfrmError) as exc:
        db.allocspi(sa_info(spi=0, dst=ip("192.0.2.99")), 0x4242, 0x4242, now=0)
    assert exc.value.errno == "ENOENT"  # xfrm_alloc_spi's answer (Android relies on it)
    with pytest.raises(XfrmError):
        db.allocspi(sa_info(spi=0), 0x10, 0x0F, now=0)


def test_allocspi_is_unique_per_spi_and_proto_across_the_whole_table():
    db = sad()
    db.newsa(sa_info(spi=0x100), now=0)  # a valid SA holds 0x100
    got = {db.allocspi(sa_info(spi=0, dst=ip(f"192.0.2.{i}")), 0x100, 0x10F, now=0).info.spi
           for i in range(10, 25)}
    assert got == set(range(0x101, 0x110))  # every daddr, yet no SPI twice
    with pytest.raises(XfrmError) as exc:
        db.allocspi(sa_info(spi=0, dst=ip("192.0.2.99")), 0x100, 0x10F, now=0)
    assert exc.value.errno == "ENOENT"


def test_allocspi_with_a_seq_finds_its_larval_state_again():
    db = sad()
    first = db.allocspi(sa_info(spi=0, seq=77), 0x100, 0xFFFF, now=0)
    assert db.allocspi(sa_info(spi=0, seq=77), 0x100, 0xFFFF, now=1) is first
    assert db.allocspi(sa_info(spi=0, seq=78), 0x100, 0xFFFF, now=1) is not first


def test_allocspi_lifetime_comes_from_the_request_else_spi_expires():
    db = sad(spi_expires=60, acq_expires=30)
    db.allocspi(sa_info(spi=0), 0x500, 0x500, now=0, lifetime_hard=120)
    db.allocspi(sa_info(spi=0, lifetime=Lifetime(hard_add_expires=90)), 0x600, 0x600, now=0)
    db.allocspi(sa_info(spi=0), 0x700, 0x700, now=0)
    assert expire_events(db.tick(59)) == []
    assert expire_events(db.tick(60)) == [("0x00000700", True)]
    assert expire_events(db.tick(90)) == [("0x00000600", True)]
    assert expire_events(db.tick(120)) == [("0x00000500", True)]


def test_delsa_removes_a_larval_state_and_flush_takes_every_state():
    db = sad()
    db.allocspi(sa_info(spi=0), 0x500, 0x500, now=0)
    db.delsa(DST, 0x500, now=1)
    db.newsa(sa_info(), now=1)
    db.allocspi(sa_info(spi=0), 0x600, 0x600, now=1)
    policy = out_policy(tunnel_template())
    db.acquire(policy, policy.templates[0], FLOW, now=1)
    assert db.count() == 3 and len(db.flush(None)) == 3 and db.count() == 0


def test_dump_filters_and_newest_first():
    db = sad()
    db.newsa(sa_info(spi=0x1, reqid=1), now=0)
    db.newsa(sa_info(spi=0x2, reqid=2, mode="transport"), now=1)
    assert [s.info.spi for s in db.dump()] == [0x2, 0x1]
    assert [s.info.spi for s in db.dump(reqid=1)] == [0x1]
    assert [s.info.spi for s in db.dump(mode="transport")] == [0x2]
    assert [s.info.spi for s in db.dump(dst=net("192.0.2.0/24"))] == [0x2, 0x1]
    assert db.dump(src=net("198.51.100.0/24")) == []


# ---------------------------------------------------------------- replay state (AE)

def test_getae_newae_round_trip():
    db = sad()
    st = db.newsa(sa_info(replay_window=64, flags=frozenset({"esn"})), now=0)
    db.newae(DST, 0x1001, seq=500, seq_hi=2, oseq=900, oseq_hi=1, bitmap=0b1011, now=1)
    ae = db.getae(DST, 0x1001)
    assert ae["replay"] == {"seq": 500, "oseq": 900, "seq_hi": 2, "oseq_hi": 1,
                            "bitmap": "0xb", "window": 64}
    assert st.engine.oseq == (1 << 32) | 900
    assert ae["id"] == {"dst": "192.0.2.2", "spi": "0x00001001", "proto": "esp"}
    other = sad()
    other.newsa(sa_info(replay_window=64, flags=frozenset({"esn"})), now=0)
    other.newae(DST, 0x1001, **{k: ae["replay"][k] for k in ("seq", "seq_hi", "oseq",
                                                              "oseq_hi")},
                bitmap=int(ae["replay"]["bitmap"], 16), now=0)
    assert other.getae(DST, 0x1001)["replay"] == ae["replay"]
    send(other.getsa(DST, 0x1001))
    assert other.getsa(DST, 0x1001).engine.oseq == (1 << 32) | 901  # never reused


def test_imported_replay_state_refuses_replays_of_the_old_window():
    """A takeover imports top 10 with 10, 9 and 7 seen: none of those may be
    accepted again, while 8 (never seen) and 11 and later are."""
    db = sad()
    st = db.newsa(sa_info(replay_window=32), now=0)
    db.newae(DST, 0x1001, seq=10, bitmap=0b1011, now=0)
    peer = SA(sa_info(replay_window=32))
    sent = {}
    for seq in range(1, 14):
        sent[seq] = peer.encrypt_packet(inner_packet(fill=seq))[1]
    for seq in (10, 9, 7):
        assert db.table.decrypt_packet(sent[seq])[0] == "replay"
    for seq in (8, 11, 13, 12):
        assert db.table.decrypt_packet(sent[seq])[0] == "ok"
    assert db.table.decrypt_packet(sent[12])[0] == "replay"
    assert db.getae(DST, 0x1001)["replay"]["seq"] == 13
    assert st.counters()["packets"] == 4


def test_newae_needs_something_and_a_valid_sa():
    db = sad()
    db.newsa(sa_info(), now=0)
    with pytest.raises(XfrmError) as exc:
        db.newae(DST, 0x1001, now=0)
    assert exc.value.errno == "EINVAL"
    db.allocspi(sa_info(spi=0), 0x500, 0x500, now=0)
    with pytest.raises(XfrmError):
        db.newae(DST, 0x500, oseq=1, now=0)
    with pytest.raises(XfrmError) as exc:
        db.newae(DST, 0x999, oseq=1, now=0)
    assert exc.value.errno == "ESRCH"


def test_newae_sets_the_current_lifetime():
    db = sad()
    st = db.newsa(sa_info(lifetime=Lifetime(hard_packets=10)), now=0)
    db.newae(DST, 0x1001, current={"packets": 9, "bytes": 900, "add_time": 0}, now=1)
    assert st.current()["packets"] == 9
    send(st)
    assert expire_events(db.tick(2)) == [("0x00001001", True)]


def test_ae_event_when_a_sequence_number_advanced_by_replay_maxdiff():
    db = sad(replay_maxdiff=3, replay_maxage=0)
    st = db.newsa(sa_info(), now=0)
    send(st, 2)
    assert [e for e in db.tick(1) if e.type == "aevent"] == []
    send(st, 1)
    [event] = [e for e in db.tick(2) if e.type == "aevent"]
    assert (event.reason, event.replay["oseq"]) == ("seq", 3)
    assert [e for e in db.tick(3) if e.type == "aevent"] == []


def test_ae_event_after_replay_maxage_only_with_changes():
    db = sad(replay_maxdiff=100, replay_maxage=1.0)
    st = db.newsa(sa_info(), now=0)
    assert db.tick(5) == []  # no change: nothing
    send(st)
    assert db.tick(5.5) != []  # maxage passed since the add: reported
    send(st)
    assert db.tick(6.0) == []  # only 0.5 s since the last
    [event] = db.tick(6.5)
    assert (event.type, event.reason, event.replay["oseq"]) == ("aevent", "timer", 2)


# ---------------------------------------------------------------- migrate

def test_migrate_moves_an_sa_with_its_keys_counters_and_sequence_numbers():
    db = sad()
    st = db.newsa(sa_info(replay_window=32), now=0)
    peer = sad()
    send(st, 5)
    new_dst = ip("192.0.2.77")
    found = db.migrate_find(SRC, DST, 50, "tunnel")
    db.migrate_state(found, SRC, new_dst, now=1)
    assert db.getsa(new_dst, 0x1001) is st and st.counters()["packets"] == 5
    with pytest.raises(XfrmError):
        db.getsa(DST, 0x1001)
    verdict, outer, _ = st.engine.encrypt_packet(inner_packet())
    assert verdict == "ok" and st.engine.oseq == 6
    peer.newsa(sa_info(replay_window=32, dst=new_dst), now=1)
    assert peer.table.decrypt_packet(outer)[0] == "ok"  # same keys, new address


# ---------------------------------------------------------------- lookup cost

def _filled(n: int) -> SecurityAssociationDatabase:
    db = sad()
    for i in range(n):
        db.newsa(sa_info(spi=0x10000 + i, dst=ip(0xC6120000 + i % 60000), reqid=i % 997 + 1),
                 now=0)
    return db


@pytest.mark.slow
def test_lookup_work_stays_constant_with_1_1000_and_100000_sas():
    probes = {}
    for n in (1, 1000, 100_000):
        db = _filled(n)
        last = n - 1
        dst = ip(0xC6120000 + last % 60000)
        db.probes = 0
        for _ in range(100):
            assert db.getsa(dst, 0x10000 + last).info.spi == 0x10000 + last
            tmpl = Template(dst=dst, src=SRC, mode="tunnel", reqid=last % 997 + 1)
            assert db.find_outbound(tmpl, out_policy(tmpl), FLOW) is not None
        probes[n] = db.probes
        assert db.table.lookup(dst, 0x10000 + last) is not None
    assert probes[1] == probes[1000] == probes[100_000], probes


# ---------------------------------------------------------------- state machine

class SADMachine(RuleBasedStateMachine):
    """newsa/updsa/delsa/allocspi/tick with advancing time against a reference model:
    spi -> [status, add time, soft time limit, hard time limit] for SAs and
    spi -> ["larval", allocation time, 0, life] for ALLOCSPI states."""

    def __init__(self) -> None:
        super().__init__()
        self.db = SecurityAssociationDatabase(rng=random.Random(0), spi_expires=20,
                                              replay_maxdiff=0, replay_maxage=0)
        self.now = 0.0
        self.model: dict[int, list] = {}

    spis = st.integers(0x100, 0x107)
    lifetimes = st.sampled_from([(0, 0), (0, 5), (3, 30), (10, 0), (40, 50)])

    @staticmethod
    def _info(spi: int, soft_hard: tuple):
        soft, hard = soft_hard
        return sa_info(spi=spi, lifetime=Lifetime(soft_add_expires=soft, hard_add_expires=hard))

    @rule(spi=spis, life=lifetimes)
    def newsa(self, spi, life):
        try:
            self.db.newsa(self._info(spi, life), self.now)
        except XfrmError as exc:
            assert exc.errno == "EEXIST" and spi in self.model
        else:
            assert spi not in self.model
            self.model[spi] = ["valid", self.now, *life]

    @rule(spi=spis, life=lifetimes)
    def updsa(self, spi, life):
        try:
            self.db.updsa(self._info(spi, life), self.now)
        except XfrmError as exc:
            assert exc.errno == "ESRCH" and spi not in self.model
            return
        status, added = self.model[spi][:2]
        # a larval state becomes a new SA; a valid one keeps its add time, and new
        # lifetimes clear dying
        self.model[spi] = ["valid", self.now if status == "larval" else added, *life]

    @rule(spi=spis)
    def delsa(self, spi):
        try:
            self.db.delsa(DST, spi, now=self.now)
        except XfrmError:
            assert spi not in self.model
        else:
            del self.model[spi]

    @rule(spi=spis, life=st.sampled_from([None, 10]))
    def allocspi(self, spi, life):
        try:
            got = self.db.allocspi(sa_info(spi=0), spi, spi, self.now, lifetime_hard=life)
        except XfrmError:
            assert spi in self.model
        else:
            assert got.info.spi == spi and spi not in self.model
            self.model[spi] = ["larval", self.now, 0, life or 20]

    @precondition(lambda self: self.now < 200)
    @rule(dt=st.sampled_from([0.5, 3, 7, 25]))
    def tick(self, dt):
        self.now += dt
        got = sorted((int(e.sa["spi"], 16), e.hard) for e in self.db.tick(self.now))
        expected = []
        for spi, (status, added, soft, hard) in list(self.model.items()):
            if hard and added + hard <= self.now:
                expected.append((spi, True))
                del self.model[spi]
            elif status == "valid" and soft and added + soft <= self.now:
                expected.append((spi, False))
                self.model[spi][0] = "dying"
        assert got == sorted(expected)

    @invariant()
    def same_states(self):
        got = {s.info.spi: s.status for s in self.db.dump()}
        assert got == {spi: entry[0] for spi, entry in self.model.items()}
        assert len(self.db.table) == sum(1 for e in self.model.values() if e[0] != "larval")


TestSADMachine = SADMachine.TestCase
TestSADMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
