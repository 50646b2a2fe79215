"""The XFRM model (espdp.xfrm.model.Xfrm): events and their JSON, ACQUIRE and
the outbound decision, the inbound policy check, MAPPING with real engine
packets, MIGRATE, and ``ip xfrm`` lines with explicit time."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from helpers import GCM_KEY, decrypt_flags, inner_packet, layout, rewrite_outer, sa_info

from espdp.engine import FLAG_MAPPING, SA
from espdp.errors import ConfigError, XfrmError
from espdp.sa import Encap, Lifetime, Mark, Selector
from espdp.xfrm.events import GROUPS
from espdp.xfrm.model import MigrateEntry, Xfrm
from espdp.xfrm.policy import Flow, Policy, Template

ip = ipaddress.ip_address
net = ipaddress.ip_network
LOCAL, PEER = ip("198.51.100.1"), ip("203.0.113.7")
KEY_HEX = "5ec7e75ec7e75ec7e75ec7e75ec7e75e0badcafe"
AEAD = f"aead 'rfc4106(gcm(aes))' 0x{KEY_HEX} 128"
FLOW = Flow(ip("10.9.1.5"), ip("10.9.2.5"), 17, 1111, 53)
OUT_POLICY = ("ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24 dir out "
              "tmpl src 198.51.100.1 dst 203.0.113.7 proto esp mode tunnel reqid 1")


def model(**kw) -> Xfrm:
    return Xfrm(rng=random.Random(3), replay_maxdiff=kw.pop("replay_maxdiff", 0),
                replay_maxage=kw.pop("replay_maxage", 0), **kw)


def collect(m: Xfrm, groups=None) -> list:
    got: list = []
    m.subscribe(got.append, groups)
    return got


def out_sa_line(spi: str = "0xc0ffee01", extra: str = "") -> str:
    return (f"ip xfrm state add src {LOCAL} dst {PEER} proto esp spi {spi} mode tunnel "
            f"reqid 1 {AEAD} {extra}")


def policy(templates, dir="out", mark=None, if_id=0, **kw) -> Policy:
    return Policy(Selector(net("10.9.1.0/24"), net("10.9.2.0/24")), dir, mark=mark,
                  if_id=if_id, templates=tuple(templates), **kw)


TUNNEL = Template(dst=PEER, src=LOCAL, mode="tunnel", reqid=1)


# ---------------------------------------------------------------- the two timeouts (issue)

def test_spi_allocated_for_120s_outlives_the_30s_acquire_state_each_with_its_expire():
    m = model(acq_expires=30, spi_expires=60)
    events = collect(m)
    m.execute(OUT_POLICY, now=0)
    assert m.outbound(FLOW, now=0).action == "drop"
    [acquire] = [e for e in events if e.type == "acquire"]
    reply = m.execute("ip xfrm state allocspi src 203.0.113.7 dst 198.51.100.1 proto esp "
                      "mode tunnel reqid 1 min 0xc0000000 max 0xcfffffff limit time-hard 120",
                      now=0)
    spi = reply["spi"]
    assert reply["state"] == "larval" and reply["lifetime"] == {"time-hard": 120}
    assert [e.to_json() for e in m.tick(29.9)] == []
    [acq_expire] = m.tick(30)
    assert (acq_expire.type, acq_expire.hard, acq_expire.sa["spi"]) == ("expire", True,
                                                                        "0x00000000")
    assert acq_expire.sa["state"] == "acquire" and acq_expire.ref is acquire.ref
    assert m.execute(f"ip xfrm state get src 203.0.113.7 dst 198.51.100.1 proto esp "
                     f"spi {spi}", now=60)["state"] == "larval"  # past acq_expires, alive
    assert m.tick(119.9) == []
    [spi_expire] = m.tick(120)
    assert (spi_expire.hard, spi_expire.sa["spi"], spi_expire.sa["state"]) == (True, spi,
                                                                               "larval")
    with pytest.raises(XfrmError):
        m.execute(f"ip xfrm state get src 203.0.113.7 dst 198.51.100.1 proto esp spi {spi}",
                  now=121)


# ---------------------------------------------------------------- a strongSwan sequence

def test_execute_strongswan_sequence_allocspi_update_policy_traffic_expire():
    m = model()
    events = collect(m)
    larval = m.execute("ip xfrm state allocspi src 203.0.113.7 dst 198.51.100.1 proto esp "
                       "mode tunnel reqid 1 min 0xc0000000 max 0xcfffffff", now=0)
    spi = larval["spi"]
    assert m.execute(f"ip xfrm state update src 203.0.113.7 dst 198.51.100.1 proto esp "
                     f"spi {spi} mode tunnel reqid 1 replay-window 32 {AEAD} "
                     f"limit time-soft 50 limit time-hard 60", now=1) == {}
    assert m.execute(out_sa_line(extra="limit time-soft 50 limit time-hard 60"), now=1) == {}
    assert m.execute(OUT_POLICY, now=1) == {}
    assert m.execute(OUT_POLICY.replace("dir out", "dir in").replace(
        "src 10.9.1.0/24 dst 10.9.2.0/24", "src 10.9.2.0/24 dst 10.9.1.0/24").replace(
        "tmpl src 198.51.100.1 dst 203.0.113.7", "tmpl src 203.0.113.7 dst 198.51.100.1"),
        now=1) == {}
    decision = m.outbound(FLOW, now=2)
    assert decision.action == "encrypt" and decision.sa.spi == 0xC0FFEE01
    verdict, outer, _ = decision.sa.encrypt_packet(inner_packet(src="10.9.1.5",
                                                                dst="10.9.2.5"))
    assert verdict == "ok"
    peer = model()  # the peer: its inbound SA is our outbound one
    peer.execute(out_sa_line().replace("add", "add") + " replay-window 32", now=0)
    verdict, inner, mark = peer.table.decrypt_packet(outer)
    assert verdict == "ok"
    sa = peer.table.lookup(PEER, 0xC0FFEE01)
    peer.execute("ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24 dir in "
                 "tmpl src 198.51.100.1 dst 203.0.113.7 proto esp mode tunnel", now=0)
    assert peer.inbound_check(sa, FLOW, now=2, mark=mark)  # reqid 0 template: wildcard
    listed = m.execute("ip xfrm state list", now=3)["states"]
    assert [s["spi"] for s in listed] == ["0xc0ffee01", spi]
    assert listed[0]["current"]["packets"] == 1
    assert m.execute("ip xfrm state count", now=3) == {"count": 2}
    assert [e.hard for e in m.tick(50.9) if e.type == "expire"] == []
    assert [e.hard for e in m.tick(51) if e.type == "expire"] == [False, False]
    assert [e.hard for e in m.tick(61) if e.type == "expire"] == [True, True]
    assert m.execute("ip xfrm state list", now=61) == {"states": []}
    assert m.outbound(FLOW, now=61).action == "drop"
    assert [e.action for e in events if e.type == "sa"] == ["updsa", "newsa"]
    assert [e.action for e in events if e.type == "policy"] == ["newpolicy", "newpolicy"]


def test_execute_returns_json_ready_answers():
    m = model()
    assert m.execute(out_sa_line(), now=0) == {}
    got = m.execute(f"ip xfrm state get src {LOCAL} dst {PEER} proto esp spi 0xc0ffee01", 0)
    assert got["aead"] == {"name": "rfc4106(gcm(aes))", "icv_bits": 128}
    shown = m.execute(f"state get src {LOCAL} dst {PEER} proto esp spi 0xc0ffee01", 0,
                      show_keys=True)
    assert shown["aead"]["key"] == "0x" + KEY_HEX
    assert KEY_HEX not in json.dumps(m.execute("ip xfrm state list", 0, show_keys=False))
    assert KEY_HEX not in json.dumps(m.execute("ip xfrm state list nokeys", 0,
                                               show_keys=True))
    m.execute(OUT_POLICY, now=0)
    pol = m.execute("ip xfrm policy get src 10.9.1.0/24 dst 10.9.2.0/24 dir out", 0)
    assert pol["tmpl"][0]["reqid"] == 1 and pol["dir"] == "out"
    assert len(m.execute("ip xfrm policy list", 0)["policies"]) == 1
    assert m.execute("ip xfrm policy count", 0) == {"count": 1}
    assert m.execute("ip xfrm policy flush", 0) == {} and len(m.spd) == 0
    assert m.execute("xfrm state flush", 0) == {} and m.sad.count() == 0
    with pytest.raises(XfrmError) as exc:
        m.execute(f"ip xfrm state delete src {LOCAL} dst {PEER} proto esp spi 0x1", 0)
    assert exc.value.errno == "ESRCH"
    with pytest.raises(ConfigError):
        m.execute("ip xfrm state frobnicate", 0)


# ---------------------------------------------------------------- expiry and events

def test_hard_expiry_deletes_the_sa_before_the_event_reaches_a_subscriber():
    m = model()
    m.execute(out_sa_line(extra="limit time-hard 10"), now=0)
    seen = []

    def on_expire(event):
        try:
            m.getsa(PEER, 0xC0FFEE01)
        except XfrmError as exc:
            seen.append(exc.errno)
        else:
            seen.append("found")

    m.subscribe(on_expire, "expire")
    m.tick(10)
    assert seen == ["ESRCH"]


def test_sa_and_policy_changes_are_echoed_to_listeners():
    m = model()
    events = collect(m, ["sa", "policy"])
    m.execute(out_sa_line(), 0)
    m.execute(out_sa_line().replace("add", "update"), 1)
    m.execute(f"ip xfrm state delete src {LOCAL} dst {PEER} proto esp spi 0xc0ffee01", 2)
    m.execute("ip xfrm state flush", 3)  # empty: the kernel sends nothing
    m.execute(out_sa_line(), 4)
    m.execute("ip xfrm state flush proto esp", 5)
    m.execute(OUT_POLICY, 6)
    m.execute(OUT_POLICY.replace("add", "update"), 7)
    m.execute("ip xfrm policy delete src 10.9.1.0/24 dst 10.9.2.0/24 dir out", 8)
    m.execute(OUT_POLICY, 9)
    m.execute("ip xfrm policy flush", 10)
    assert [e.action for e in events] == [
        "newsa", "updsa", "delsa", "newsa", "flushsa", "newpolicy", "updpolicy", "delpolicy",
        "newpolicy", "flushpolicy"]
    assert events[4].proto == 50


def test_events_queue_for_pull_style_users():
    m = model()
    queue = m.events()
    m.execute(out_sa_line(extra="limit time-hard 5"), 0)
    m.tick(5)
    assert [e.type for e in queue] == ["sa", "expire"]
    assert len(queue) == 0 and m.events() is queue
    expire_only = m.events("expire")
    m.execute(out_sa_line(), 6)
    assert len(expire_only) == 0 and queue.get().type == "sa"
    queue.close()
    expire_only.close()
    assert not m.listening("sa")


def test_policy_expire_events():
    m = model()
    events = collect(m, "polexpire")
    m.execute(OUT_POLICY + " limit time-soft 5 limit time-hard 10", 0)
    m.tick(5)
    m.tick(10)
    assert [(e.type, e.hard) for e in events] == [("polexpire", False), ("polexpire", True)]
    assert len(m.spd) == 0


# ---------------------------------------------------------------- ACQUIRE

def test_no_acquire_when_nobody_listens_then_one_when_someone_does():
    m = model()
    m.execute(OUT_POLICY, 0)
    sa_events = collect(m, "sa")  # not an acquire listener
    assert m.outbound(FLOW, now=0).action == "drop"
    assert m.tick(1) == [] and sa_events == []
    acquires = collect(m, "acquire")
    decision = m.outbound(FLOW, now=2)
    assert decision.action == "drop" and [e.seq for e in acquires] == [decision.acquire_seq]
    m.outbound(FLOW, now=3)
    assert len(acquires) == 1


def test_acquire_is_rate_limited_per_sa_identity_and_each_mark_or_if_id_gets_its_own():
    m = model()
    acquires = collect(m, "acquire")
    plain = m.newpolicy(policy([TUNNEL], priority=10), 0)
    marked = m.newpolicy(policy([TUNNEL], mark=Mark(7, 0xFF)), 0)
    xfrmi = m.newpolicy(policy([TUNNEL], if_id=9), 0)
    for now in range(3):
        m.outbound(FLOW, now)  # plain
        m.outbound(Flow(ip("10.9.1.6"), ip("10.9.2.6")), now)  # another flow, same identity
        m.outbound(FLOW, now, mark=0x107)  # (0x107 & 0xff) == 7: the marked policy
        m.outbound(FLOW, now, if_id=9)
    assert [e.policy["index"] for e in acquires] == [plain.index, marked.index, xfrmi.index]
    assert [e.mark for e in acquires] == [None, {"value": 7, "mask": 0xFF}, None]
    assert [e.if_id for e in acquires] == [0, 0, 9]
    seqs = [e.seq for e in acquires]
    assert 0 not in seqs and len(set(seqs)) == 3
    first = acquires[0].to_json()
    assert first["id"] == {"dst": str(PEER), "proto": "esp", "spi": "0x00000000"}
    assert first["saddr"] == str(LOCAL) and first["tmpl"][0]["reqid"] == 1
    assert first["sel"] == {"src": "10.9.1.5/32", "dst": "10.9.2.5/32", "proto": 17,
                            "sport": 1111, "sport_mask": 0xFFFF, "dport": 53,
                            "dport_mask": 0xFFFF}
    m.tick(30)  # the acquire states die: a new ACQUIRE may go out
    m.outbound(FLOW, 31)
    assert len(acquires) == 4 and acquires[3].seq not in seqs


def test_newsa_resolves_the_acquire_state_and_traffic_is_encrypted():
    m = model()
    collect(m, "acquire")
    m.execute(OUT_POLICY, 0)
    assert m.outbound(FLOW, 0).action == "drop"
    assert m.sad.count() == 1  # the acquire state
    m.execute(out_sa_line(), 1)
    assert m.sad.count() == 1 and m.outbound(FLOW, 1).action == "encrypt"


def test_level_use_template_acquires_but_lets_the_packet_through_in_the_clear():
    m = model()
    acquires = collect(m, "acquire")
    use = Template(mode="transport", reqid=5, level="use")
    m.newpolicy(policy([use]), 0)
    decision = m.outbound(FLOW, 0)
    assert decision.action == "clear" and decision.acquire_seq == acquires[0].seq
    m.newsa(sa_info(src=FLOW.src, dst=FLOW.dst, mode="transport", reqid=5), 1)
    assert m.outbound(FLOW, 1).action == "encrypt"


def test_required_template_drops_while_acquiring_or_queues_when_asked():
    m = model(acquire_queue=2)
    collect(m, "acquire")
    m.execute(OUT_POLICY, 0)
    actions = [m.outbound(FLOW, 0, packet=bytes([i])).action for i in range(3)]
    assert actions == ["queued", "queued", "drop"]
    st = m.newsa(sa_info(src=LOCAL, dst=PEER, spi=0x777, reqid=1), 1)
    assert [p for p, _, _ in m.take_queued(st.engine)] == [b"\0", b"\1"]
    assert m.take_queued(st.engine) == []
    unbounded = model(larval_drop=False)
    unbounded.execute(OUT_POLICY, 0)
    assert unbounded.outbound(FLOW, 0, packet=b"x").action == "queued"


def test_default_verdicts_and_block_policies():
    m = model(default={"out": "block", "in": "allow", "fwd": "allow"})
    assert m.outbound(FLOW, 0).action == "block"
    m.newpolicy(policy([], priority=10), 0)
    assert m.outbound(FLOW, 0).action == "clear"
    m.newpolicy(policy([], action="block", priority=0).replace(
        selector=Selector(net("10.9.1.5/32"), net("10.9.2.0/24"))), 0)
    assert m.outbound(FLOW, 0).action == "block"


# ---------------------------------------------------------------- inbound policy check

def test_inbound_check_reqid_wildcard_mode_and_default():
    m = model()
    transport = m.newsa(sa_info(mode="transport", spi=0x10, reqid=4, replay_window=32), 0)
    tunnel = m.newsa(sa_info(spi=0x11, reqid=4, replay_window=32), 0)
    flow = Flow(ip("10.9.2.5"), ip("10.9.1.5"))
    assert m.inbound_check(transport.engine, flow, 0)  # no policy: allowed
    assert not m.inbound_check(tunnel.engine, flow, 0)  # a tunnel SA needs a policy
    src, dst = sa_info().src, sa_info().dst
    m.newpolicy(Policy(Selector(net("10.9.2.0/24"), net("10.9.1.0/24")), "in",
                       templates=(Template(dst=dst, src=src, mode="tunnel", reqid=0),)), 0)
    assert m.inbound_check(tunnel.engine, flow, 0)  # reqid 0 matches reqid 4
    assert not m.inbound_check(transport.engine, flow, 0)  # wrong mode for the template
    m.updpolicy(Policy(Selector(net("10.9.2.0/24"), net("10.9.1.0/24")), "in",
                       templates=(Template(dst=dst, src=src, mode="tunnel", reqid=5),)), 1)
    assert not m.inbound_check(tunnel.engine, flow, 1)


# ---------------------------------------------------------------- MAPPING

def _encap_pair(m: Xfrm):
    """Our inbound encap SA (peer 192.0.2.1:4500) and the peer's outbound engine SA."""
    info = sa_info(encap=True, replay_window=32, reqid=3)
    st = m.newsa(info, 0)
    return st, SA(info)


def _decrypt(m: Xfrm, packet: bytes):
    verdict, _, _, flags = decrypt_flags(m.table, packet)
    lay = layout(packet)
    src = ipaddress.ip_address(packet[12:16] if lay.family == 4 else packet[8:24])
    sport = int.from_bytes(packet[lay.udp:lay.udp + 2], "big")
    return verdict, flags, src, sport


def test_mapping_only_after_a_good_icv_and_rate_limited():
    m = model(mapping_min_interval=10)
    events = collect(m, "mapping")
    st, peer = _encap_pair(m)
    sent = [peer.encrypt_packet(inner_packet(fill=i))[1] for i in range(5)]
    verdict, flags, src, sport = _decrypt(m, sent[0])  # the expected address and port
    assert verdict == "ok" and not flags & FLAG_MAPPING
    forged = bytearray(rewrite_outer(sent[1], src="198.51.100.99", sport=40000))
    forged[-1] ^= 1  # a bad ICV from a new address: no MAPPING
    verdict, flags, _, _ = _decrypt(m, bytes(forged))
    assert verdict == "integrity" and not flags & FLAG_MAPPING
    for i, now in ((2, 1.0), (3, 5.0)):
        moved = rewrite_outer(sent[i], src="198.51.100.99", sport=40000)
        verdict, flags, src, sport = _decrypt(m, moved)
        assert verdict == "ok" and flags & FLAG_MAPPING
        m.report_mapping(st.engine, src, sport, now)
    assert len(events) == 1  # the second came within mapping_min_interval
    moved = rewrite_outer(sent[4], src="198.51.100.99", sport=40001)  # another port: at once
    _, flags, src, sport = _decrypt(m, moved)
    m.report_mapping(st.engine, src, sport, 6.0)
    assert [e.to_json() for e in events] == [
        {"type": "mapping", "id": {"dst": "192.0.2.2", "spi": "0x00001001", "proto": "esp"},
         "reqid": 3, "old": {"addr": "192.0.2.1", "port": 4500},
         "new": {"addr": "198.51.100.99", "port": port}} for port in (40000, 40001)]
    assert st.info.src == ip("192.0.2.1")  # the SA itself is unchanged


# ---------------------------------------------------------------- MIGRATE

def test_migrate_moves_sas_and_policy_templates():
    m = model()
    events = collect(m, "migrate")
    out = m.newsa(sa_info(src=LOCAL, dst=PEER, spi=0x51, reqid=1), 0)
    m.execute(OUT_POLICY, 0)
    encap = Encap("espinudp", 4500, 4500)
    new_local = ip("198.51.100.50")
    moved = m.migrate(Selector(net("10.9.1.0/24"), net("10.9.2.0/24")), "out",
                      [MigrateEntry(LOCAL, PEER, new_local, PEER, reqid=1)], 1, encap=encap)
    assert moved == [out] and out.info.src == new_local and out.info.encap == encap
    assert m.outbound(FLOW, 2).sa is out.engine
    [tmpl] = m.getpolicy("out", Selector(net("10.9.1.0/24"), net("10.9.2.0/24"))).templates
    assert (tmpl.src, tmpl.dst) == (new_local, PEER)
    assert events[0].to_json()["migrate"][0]["new_src"] == str(new_local)
    with pytest.raises(XfrmError):
        m.migrate(Selector(net("10.0.0.0/8"), net("10.9.2.0/24")), "out", [], 3)


# ---------------------------------------------------------------- AE through the model

def test_newae_is_echoed_and_ae_events_need_a_listener():
    m = model(replay_maxdiff=1)
    st = m.newsa(sa_info(replay_window=32), 0)
    st.engine.encrypt_packet(inner_packet())
    assert m.tick(1) == []  # nobody listens to aevent
    events = collect(m, "aevent")
    st.engine.encrypt_packet(inner_packet())
    m.tick(2)
    m.newae(sa_info().dst, 0x1001, oseq=1000, now=3)
    assert [(e.reason, e.replay["oseq"]) for e in events] == [("seq", 2), ("update", 1000)]


# ---------------------------------------------------------------- JSON of every event

def test_every_event_type_has_json_with_type_and_no_key_material():
    m = model(replay_maxdiff=1, mapping_min_interval=0)
    m.events()  # listen to everything
    everything = collect(m)
    m.execute(OUT_POLICY + " limit time-soft 1 limit time-hard 2", 0)
    m.outbound(FLOW, 0)  # acquire
    m.execute(out_sa_line(extra="limit time-soft 1 limit time-hard 2"), 0)
    inbound = m.newsa(sa_info(encap=True, replay_window=32, spi=0x99), 0)
    peer = SA(sa_info(encap=True, replay_window=32, spi=0x99))
    packet = rewrite_outer(peer.encrypt_packet(inner_packet())[1], sport=999)
    assert decrypt_flags(m.table, packet)[3] & FLAG_MAPPING
    m.report_mapping(inbound.engine, "192.0.2.1", 999, 0.5)
    m.migrate(Selector(net("10.9.1.0/24"), net("10.9.2.0/24")), "out",
              [MigrateEntry(LOCAL, PEER, LOCAL, PEER, reqid=1)], 0.5)
    m.tick(1)  # soft SA and policy expires, AE
    m.tick(2)  # hard ones
    m.execute("ip xfrm state flush", 3)
    m.execute(OUT_POLICY, 3)
    m.execute("ip xfrm policy flush", 3)
    types = {e.type for e in everything}
    assert types >= {"acquire", "expire", "polexpire", "sa", "policy", "aevent", "mapping",
                     "migrate"}
    assert {g for e in everything for g in e.groups} == set(GROUPS)
    for event in everything:
        text = json.dumps(event.to_json())
        assert json.loads(text)["type"] == event.type
        assert KEY_HEX not in text and GCM_KEY.hex() not in text


def test_unknown_event_group_is_refused():
    with pytest.raises(ConfigError):
        model().subscribe(print, "acquires")


def test_lifetime_json_shows_only_non_default_limits():
    m = model()
    m.newsa(sa_info(lifetime=Lifetime(hard_bytes=10**6, soft_add_expires=30)), 0)
    [state] = m.execute("ip xfrm state list", 0)["states"]
    assert state["lifetime"] == {"time-soft": 30, "byte-hard": 10**6}


def test_generation_moves_with_every_sad_and_spd_change():
    from espdp.xfrm import Xfrm

    x = Xfrm()
    seen = [x.generation]

    def changed():
        assert x.generation > seen[-1]
        seen.append(x.generation)

    key = "0x" + "77" * 20
    x.execute("state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x5 mode tunnel "
              f"aead 'rfc4106(gcm(aes))' {key} 128 limit time-hard 10", 0)
    changed()
    x.execute("policy add src 10.0.0.0/8 dst 10.1.0.0/16 dir out tmpl src 192.0.2.1 "
              "dst 192.0.2.2 proto esp mode tunnel", 0)
    changed()
    x.execute("policy delete src 10.0.0.0/8 dst 10.1.0.0/16 dir out", 0)
    changed()
    x.tick(20)   # the SA's hard lifetime ends
    changed()
    before = x.generation
    x.execute("state list", 30)
    assert x.generation == before   # reading changes nothing
