"""The SPD (espdp.xfrm.spd) against the kernel's policy semantics.

The rules are those of net/xfrm/xfrm_policy.c (xfrm_policy_insert,
xfrm_gen_index, xfrm_policy_lookup_bytype, xfrm_policy_timer) and
net/xfrm/xfrm_user.c (verify_newpolicy_info, validate_tmpl,
xfrm_get_policy).  A stateful test checks the tuple-space SPD against a
plain list scanned linearly with the same rules.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from espdp.errors import ConfigError, XfrmError
from espdp.sa import Lifetime, Mark, Selector
from espdp.xfrm.policy import (
    DIR_CODE,
    Flow,
    Policy,
    Template,
    selector_matches,
)
from espdp.xfrm.spd import SecurityPolicyDatabase, policy_to_json

net = ipaddress.ip_network
addr = ipaddress.ip_address


def sel(src: str = "0.0.0.0/0", dst: str = "0.0.0.0/0", **upper) -> Selector:
    return Selector(net(src), net(dst), **upper)


def flow(src: str, dst: str, proto: int = 0, sport: int = 0, dport: int = 0) -> Flow:
    return Flow(addr(src), addr(dst), proto, sport, dport)


def pol(selector: Selector, dir: str = "out", **fields) -> Policy:
    return Policy(selector, dir, **fields)


def errno_of(call, *args, **kwargs) -> str:
    with pytest.raises(XfrmError) as info:
        call(*args, **kwargs)
    return info.value.errno


TUNNEL = Template(dst=addr("203.0.113.7"), src=addr("198.51.100.1"), mode="tunnel", reqid=1)
LAN_FLOW = flow("10.9.1.5", "10.9.2.7", 6, 40000, 443)


# ---------------------------------------------------------------- ordering


def test_lower_priority_wins_whatever_the_prefix():
    spd = SecurityPolicyDatabase()
    wide = spd.add(pol(sel("10.0.0.0/8", "10.0.0.0/8"), priority=100), 0)
    narrow = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=200), 0)
    assert spd.lookup("out", LAN_FLOW) == wide
    spd.delete("out", wide.selector)
    assert spd.lookup("out", LAN_FLOW) == narrow


def test_on_equal_priority_the_older_policy_wins_across_groups():
    spd = SecurityPolicyDatabase()
    older = spd.add(pol(sel("10.9.0.0/16", "10.9.2.0/24"), priority=5), 0)
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=5), 1)
    spd.add(pol(sel("10.9.1.5/32", "10.9.2.7/32"), priority=5), 2)
    assert spd.lookup("out", LAN_FLOW) == older


def test_on_equal_priority_the_older_policy_wins_within_a_bucket():
    spd = SecurityPolicyDatabase()
    older = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=5), 0)
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24", proto=6), priority=5), 1)
    assert spd.lookup("out", LAN_FLOW) == older


def test_a_policy_that_does_not_match_is_skipped_for_the_next():
    spd = SecurityPolicyDatabase()
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24", proto=17), priority=1), 0)
    tcp = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=9), 0)
    assert spd.lookup("out", LAN_FLOW) == tcp
    assert spd.lookup("in", LAN_FLOW) is None


# ---------------------------------------------------------------- add / update / index


def test_add_of_an_existing_policy_is_eexist_and_update_replaces_it():
    spd = SecurityPolicyDatabase()
    first = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), templates=(TUNNEL,)), 0)
    block = pol(sel("10.9.1.0/24", "10.9.2.0/24"), action="block")
    assert errno_of(spd.add, block, 1) == "EEXIST"
    updated = spd.add(block, 2, update=True)
    assert updated.index == first.index and updated.action == "block"
    assert len(spd) == 1 and spd.get("out", first.selector) == updated
    assert spd.current_lifetime(updated) == (2, None)


def test_update_keeps_the_index_even_when_it_gives_another():
    spd = SecurityPolicyDatabase()
    first = spd.add(pol(sel(dst="10.0.0.0/8")), 0)
    updated = spd.add(pol(sel(dst="10.0.0.0/8"), index=0x41), 0, update=True)
    assert updated.index == first.index


def test_update_inserts_when_there_is_nothing_to_replace():
    spd = SecurityPolicyDatabase()
    assert spd.add(pol(sel(dst="10.0.0.0/8")), 0, update=True) in spd.dump()


def test_update_with_the_same_priority_keeps_its_age():
    spd = SecurityPolicyDatabase()
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=5), 0)
    spd.add(pol(sel("10.9.0.0/16", "10.9.0.0/16"), priority=5), 1)
    updated = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=5, action="block"),
                      2, update=True)
    assert spd.lookup("out", LAN_FLOW) == updated


def test_update_with_another_priority_is_the_youngest_of_its_peers():
    spd = SecurityPolicyDatabase()
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=9), 0)
    peer = spd.add(pol(sel("10.9.0.0/16", "10.9.0.0/16"), priority=5), 1)
    spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), priority=5), 2, update=True)
    assert spd.lookup("out", LAN_FLOW) == peer


def test_generated_indexes_carry_the_dir_and_are_unique():
    spd = SecurityPolicyDatabase()
    stored = [spd.add(pol(sel(dst=f"10.{i}.0.0/16"), dir=d), 0)
              for i in range(20) for d in ("in", "out", "fwd")]
    assert all(p.index & 7 == DIR_CODE[p.dir] and p.index for p in stored)
    assert len({p.index for p in stored}) == len(stored)
    # xfrm_gen_index: one generator stepping by 8, ORed with the dir; 0 becomes 8
    assert [p.index for p in stored[:3]] == [8, 9, 18]


def test_a_given_index_is_honoured_and_a_taken_one_replaced_silently():
    spd = SecurityPolicyDatabase()
    first = spd.add(pol(sel(dst="10.0.0.0/8"), index=0x101), 0)
    assert first.index == 0x101
    second = spd.add(pol(sel(dst="10.1.0.0/16"), index=0x101), 0)
    assert second.index != 0x101 and second.index & 7 == 1


def test_an_index_of_another_dir_is_einval():
    spd = SecurityPolicyDatabase()
    assert errno_of(spd.add, pol(sel(dst="10.0.0.0/8"), dir="in", index=0x101), 0) == "EINVAL"
    with pytest.raises(ConfigError, match="index & 7"):
        pol(sel(), dir="fwd", index=0x11).validate()


@pytest.mark.parametrize("policy, words", [
    (pol(sel(), templates=(Template(),) * 7), "XFRM_MAX_DEPTH"),
    (pol(sel(), templates=(Template(dst=addr("2001:db8::1")),)), "transport mode"),
    (pol(sel(), templates=(replace(TUNNEL, level="use"),)), "level use"),
    (pol(sel(dst="10.0.0.0/8", dport=80, dport_mask=0xFFFF, proto=50)), "ports need"),
    (pol(Selector(net("10.0.0.0/8"), net("::/0"))), "different families"),
    (pol(sel(), action="drop"), "action"),
    (pol(sel(), dir="sideways"), "dir"),
    (pol(sel(), flags=frozenset({"urgent"})), "urgent"),
    (pol(sel(), templates=(Template(proto=51),)), "only esp"),
])
def test_invalid_policies_are_einval(policy, words):
    spd = SecurityPolicyDatabase()
    with pytest.raises(XfrmError, match=words) as info:
        spd.add(policy, 0)
    assert info.value.errno == "EINVAL" and len(spd) == 0


def test_optional_templates_are_fine_in_transport_mode_or_inbound():
    spd = SecurityPolicyDatabase()
    spd.add(pol(sel(dst="10.0.0.0/8"), templates=(Template(level="use"),)), 0)
    tunnel_use = Template(dst=TUNNEL.dst, src=TUNNEL.src, mode="tunnel", level="use")
    stored = spd.add(pol(sel(dst="10.0.0.0/8"), dir="fwd", templates=(tunnel_use,)), 0)
    assert stored.templates[0].optional


# ---------------------------------------------------------------- get / delete


def test_get_and_delete_by_selector_or_index_and_enoent():
    spd = SecurityPolicyDatabase()
    stored = spd.add(pol(sel("10.9.1.0/24", "10.9.2.0/24"), mark=Mark(1, 0xFF), if_id=4), 0)
    assert spd.get("out", stored.selector, mark=Mark(1, 0xFF), if_id=4) == stored
    assert spd.get("out", index=stored.index, mark=Mark(1, 0xFF), if_id=4) == stored
    for kwargs in ({"mark": Mark(1, 0xFFFFFFFF), "if_id": 4},  # mask differs
                   {"mark": Mark(1, 0xFF)},  # if_id differs
                   {"mark": Mark(1, 0xFF), "if_id": 4, "ptype": "sub"}):
        assert errno_of(spd.get, "out", stored.selector, **kwargs) == "ENOENT"
        assert errno_of(spd.get, "out", index=stored.index, **kwargs) == "ENOENT"
    assert errno_of(spd.get, "in", index=stored.index, mark=Mark(1, 0xFF), if_id=4) == "ENOENT"
    assert spd.delete("out", index=stored.index, mark=Mark(1, 0xFF), if_id=4) == stored
    assert errno_of(spd.delete, "out", stored.selector, mark=Mark(1, 0xFF), if_id=4) == \
        "ENOENT"
    assert errno_of(spd.get, "out") == "EINVAL"
    assert errno_of(spd.get, "up", stored.selector) == "EINVAL"


def test_policies_differing_only_in_mark_or_if_id_coexist():
    spd = SecurityPolicyDatabase()
    for mark in (None, Mark(1), Mark(1, 0xF), Mark(2)):
        for if_id in (0, 1):
            spd.add(pol(sel(dst="10.0.0.0/8"), mark=mark, if_id=if_id), 0)
    assert len(spd) == 8


# ---------------------------------------------------------------- matching


def test_mark_matches_under_its_mask():
    spd = SecurityPolicyDatabase()
    tagged = spd.add(pol(sel(dst="10.9.0.0/16"), mark=Mark(0x42, 0xFF), priority=1), 0)
    plain = spd.add(pol(sel(dst="10.9.0.0/16"), priority=2), 0)
    assert spd.lookup("out", LAN_FLOW, mark=0x1242) == tagged
    assert spd.lookup("out", LAN_FLOW, mark=0x43) == plain
    assert spd.lookup("out", LAN_FLOW) == plain


def test_if_id_must_be_equal():
    spd = SecurityPolicyDatabase()
    xfrmi = spd.add(pol(sel(dst="10.9.0.0/16"), if_id=7), 0)
    assert spd.lookup("out", LAN_FLOW) is None
    assert spd.lookup("out", LAN_FLOW, if_id=7) == xfrmi
    assert spd.lookup("out", LAN_FLOW, if_id=8) is None


def test_ports_match_under_their_masks():
    https = sel(dst="10.9.2.0/24", proto=6, dport=443, dport_mask=0xFFFF)
    assert selector_matches(https, LAN_FLOW)
    assert not selector_matches(https, flow("10.9.1.5", "10.9.2.7", 6, 40000, 80))
    assert not selector_matches(https, flow("10.9.1.5", "10.9.2.7", 17, 40000, 443))
    high = sel(sport=0x8000, sport_mask=0x8000)  # any source port >= 32768
    assert selector_matches(high, LAN_FLOW)
    assert not selector_matches(high, flow("10.9.1.5", "10.9.2.7", 6, 1024, 443))
    assert selector_matches(sel(dport=443, dport_mask=0), flow("1.1.1.1", "2.2.2.2"))


def test_icmp_type_and_code_in_the_port_fields():
    echo = sel(proto=1, sport=8, sport_mask=0xFFFF, dport=0, dport_mask=0xFFFF)
    assert selector_matches(echo, flow("10.0.0.1", "10.0.0.2", 1, 8, 0))
    assert not selector_matches(echo, flow("10.0.0.1", "10.0.0.2", 1, 0, 0))
    assert not selector_matches(echo, flow("10.0.0.1", "10.0.0.2", 1, 8, 1))
    spd = SecurityPolicyDatabase()
    nd = Selector(net("::/0"), net("::/0"), 58, 135, 0xFFFF)  # neighbour solicitation
    bypass = spd.add(pol(nd, dir="in", priority=1), 0)
    v6 = Flow(addr("fe80::1"), addr("fe80::2"), 58, 135, 0)
    assert spd.lookup("in", v6) == bypass


def test_families_never_match_each_other():
    assert not selector_matches(sel(), Flow(addr("::a00:1"), addr("::a00:2")))
    with pytest.raises(ConfigError):
        Flow(addr("10.0.0.1"), addr("::1"))


def test_selector_dev_matches_the_output_interface():
    wan = sel(ifindex=3)
    assert selector_matches(wan, Flow(addr("10.0.0.1"), addr("10.0.0.2"), ifindex=3))
    assert not selector_matches(wan, Flow(addr("10.0.0.1"), addr("10.0.0.2"), ifindex=4))


def test_sub_policies_are_looked_up_before_main_ones():
    spd = SecurityPolicyDatabase()
    spd.add(pol(sel(dst="10.9.0.0/16"), priority=0), 0)
    sub = spd.add(pol(sel(dst="10.9.0.0/16"), priority=99, ptype="sub"), 0)
    assert spd.lookup("out", LAN_FLOW) == sub


def test_verdict_uses_the_action_or_the_dir_default():
    spd = SecurityPolicyDatabase(default={"in": "block", "fwd": "block"})
    assert spd.verdict("in", LAN_FLOW) == ("block", None)
    assert spd.verdict("out", LAN_FLOW) == ("allow", None)
    bypass = spd.add(pol(sel(dst="10.9.2.0/24"), dir="in"), 0)
    drop = spd.add(pol(sel(dst="10.9.2.0/24"), dir="fwd", action="block"), 0)
    assert spd.verdict("in", LAN_FLOW) == ("allow", bypass)
    assert spd.verdict("fwd", LAN_FLOW) == ("block", drop)
    spd.set_default("out", "block")
    assert spd.verdict("out", LAN_FLOW) == ("block", None)
    with pytest.raises(ConfigError):
        spd.set_default("out", "maybe")


def lookup_cost(count: int) -> float:
    """Mean candidates examined per lookup with ``count`` host and ``count`` subnet policies.

    Three prefix-length pairs (/32-/32, /24-/24, /16-/0), so three groups.
    """
    spd = SecurityPolicyDatabase()
    for i in range(count):
        a, b = divmod(i, 250)
        spd.add(pol(sel(f"10.{a}.{b}.1/32", f"10.{a}.{b}.2/32"), priority=i), 0)
        spd.add(pol(sel(f"172.16.{a}.0/24", f"192.168.{b}.0/24"), priority=i), 0)
    spd.add(pol(sel("10.0.0.0/16", "0.0.0.0/0"), priority=5), 0)
    probes = [flow(f"10.0.{b}.1", f"10.0.{b}.2") for b in range(10)]
    probes += [flow(f"172.16.0.{b}", f"192.168.{b}.1") for b in range(10)]
    probes += [flow("10.0.9.9", "8.8.8.8"), flow("11.1.1.1", "12.1.1.1")]
    before = spd.comparisons
    for probe in probes:
        assert spd.lookup("out", probe) is not None or probe.src == addr("11.1.1.1")
    return (spd.comparisons - before) / len(probes)


def test_lookup_cost_does_not_grow_with_the_table():
    small, large = lookup_cost(10), lookup_cost(10_000)
    assert large == small <= 3


# ---------------------------------------------------------------- lifetimes


def test_hard_add_time_removes_the_policy_and_soft_is_reported_once():
    spd = SecurityPolicyDatabase()
    stored = spd.add(pol(sel(dst="10.0.0.0/8"),
                         lifetime=Lifetime(soft_add_expires=10, hard_add_expires=20)), 100)
    assert spd.tick(109.5) == []
    assert spd.tick(110) == [(stored, False)]
    assert spd.tick(115) == []
    assert spd.tick(120) == [(stored, True)]
    assert len(spd) == 0 and spd.tick(200) == []


def test_use_time_counts_from_the_last_use_or_the_add():
    spd = SecurityPolicyDatabase()
    idle = Lifetime(soft_use_expires=5, hard_use_expires=10)
    used = spd.add(pol(sel(dst="10.9.0.0/16"), lifetime=idle), 0)
    unused = spd.add(pol(sel(dst="11.0.0.0/8"), lifetime=idle), 0)
    assert spd.lookup("out", LAN_FLOW, now=4) == used
    assert spd.tick(5) == [(unused, False)]  # xfrm_policy_timer: use_time ?: add_time
    assert spd.lookup("out", LAN_FLOW, now=8) == used  # every use counts
    assert spd.current_lifetime(used) == (0, 8)
    assert spd.tick(10) == [(unused, True)]
    assert spd.tick(13) == [(used, False)]
    assert spd.tick(17.9) == []
    assert spd.tick(18) == [(used, True)]


def test_update_restarts_the_lifetime():
    spd = SecurityPolicyDatabase()
    limited = pol(sel(dst="10.0.0.0/8"), lifetime=Lifetime(hard_add_expires=10))
    spd.add(limited, 0)
    spd.add(limited, 8, update=True)
    assert spd.tick(12) == []
    assert [hard for _, hard in spd.tick(18)] == [True]


# ---------------------------------------------------------------- flush / dump


def test_flush_by_dir_and_type():
    spd = SecurityPolicyDatabase()
    for d in ("in", "out", "fwd"):
        spd.add(pol(sel(dst="10.0.0.0/8"), dir=d), 0)
    sub = spd.add(pol(sel(dst="10.0.0.0/8"), ptype="sub"), 0)
    assert [p.dir for p in spd.flush("fwd")] == ["fwd"]
    assert spd.counts() == {"in": 1, "out": 2, "fwd": 0}
    assert [p.dir for p in spd.flush()] == ["in", "out"]
    assert spd.dump() == [sub]
    assert spd.flush(ptype="sub") == [sub] and spd.flush() == []


def test_dump_orders_by_dir_then_priority_then_age():
    spd = SecurityPolicyDatabase()
    added = [spd.add(pol(sel(dst=f"10.{i}.0.0/16"), dir=d, priority=p), i)
             for i, (d, p) in enumerate([("fwd", 1), ("out", 9), ("in", 5), ("out", 1),
                                         ("out", 9), ("in", 5)])]
    order = [(p.dir, p.priority, p.selector.dst) for p in spd.dump()]
    expected = sorted(((p.dir, p.priority, p.selector.dst) for p in added),
                      key=lambda t: (DIR_CODE[t[0]], t[1], int(t[2].network_address)))
    assert order == expected
    assert list(spd) == spd.dump() and spd.dump("in") == [added[2], added[5]]


def test_policy_to_json_uses_ip_xfrm_words():
    policy = pol(sel("10.9.1.0/24", "10.9.2.0/24", proto=6, dport=443, dport_mask=0xFFFF),
                 priority=375423, index=9, mark=Mark(0x42, 0xFF), templates=(TUNNEL,),
                 lifetime=Lifetime(hard_add_expires=60), flags=frozenset({"icmp"}))
    assert policy_to_json(policy) == {
        "src": "10.9.1.0/24", "dst": "10.9.2.0/24", "proto": "tcp", "dport": 443,
        "dir": "out", "action": "allow", "priority": 375423, "index": 9, "ptype": "main",
        "if_id": 0, "mark": {"value": 0x42, "mask": 0xFF}, "flags": ["icmp"],
        "tmpl": [{"src": "198.51.100.1", "dst": "203.0.113.7", "proto": "esp", "spi": 0,
                  "mode": "tunnel", "reqid": 1, "level": "required"}],
        "lifetime": {"time-hard": 60},
    }
    icmp = policy_to_json(pol(sel(proto=1, sport=8, sport_mask=0xFFFF)))
    assert (icmp["proto"], icmp["type"], "mark" in icmp, icmp["lifetime"]) == (
        "icmp", 8, False, {})


# ---------------------------------------------------------------- against a model


class NaiveSPD:
    """The same rules over a plain list, scanned linearly."""

    def __init__(self) -> None:
        self.items: list[list] = []  # [policy, pos]
        self.pos = self.generator = 0

    @staticmethod
    def same(a: Policy, b: Policy) -> bool:
        key = lambda p: (p.dir, p.ptype, p.if_id, p.selector,  # noqa: E731
                         (p.mark.value, p.mark.mask) if p.mark else (0, 0))
        return key(a) == key(b)

    def gen_index(self, dir_code: int, index: int) -> int:
        taken = {p.index for p, _ in self.items}
        while True:
            if index:
                idx, index = index, 0
            else:
                idx, self.generator = self.generator | dir_code, self.generator + 8
            if (idx or 8) not in taken:
                return idx or 8

    def add(self, policy: Policy, update: bool) -> Policy:
        old = next((item for item in self.items if self.same(item[0], policy)), None)
        if old is not None and not update:
            raise XfrmError("EEXIST", "exists")
        self.pos += 1
        if old is not None:
            self.items.remove(old)
            pos = old[1] if old[0].priority == policy.priority else self.pos
            index = old[0].index
        else:
            pos, index = self.pos, self.gen_index(DIR_CODE[policy.dir], policy.index)
        stored = policy.replace(index=index)
        self.items.append([stored, pos])
        return stored

    def delete(self, policy: Policy) -> None:
        self.items = [item for item in self.items if not self.same(item[0], policy)]

    def lookup(self, dir: str, f: Flow, mark: int, if_id: int) -> Policy | None:
        for ptype in ("sub", "main"):
            found = [(p.priority, pos, p) for p, pos in self.items
                     if p.dir == dir and p.ptype == ptype and p.if_id == if_id
                     and (p.mark is None or mark & p.mark.mask == p.mark.value)
                     and selector_matches(p.selector, f)]
            if found:
                return min(found, key=lambda t: t[:2])[2]
        return None


OCTETS = st.sampled_from([0, 1])
PLENS = st.sampled_from([0, 0, 16, 24, 31, 32])


@st.composite
def small_selectors(draw) -> Selector:
    def prefix() -> ipaddress.IPv4Network:
        address = f"10.{draw(OCTETS)}.{draw(OCTETS)}.{draw(OCTETS)}"
        return net(f"{address}/{draw(PLENS)}", strict=False)
    proto = draw(st.sampled_from([0, 0, 6, 17]))
    port = draw(st.sampled_from([0, 0, 53, 443]))
    return Selector(prefix(), prefix(), proto, dport=port, dport_mask=0xFFFF if port else 0)


@st.composite
def small_policies(draw) -> Policy:
    direction = draw(st.sampled_from(["in", "out"]))
    index = draw(st.sampled_from([0, 0, 0x10, 0x20])) | DIR_CODE[direction]
    return Policy(draw(small_selectors()), direction, index=index if index > 1 else 0,
                  action=draw(st.sampled_from(["allow", "block"])),
                  priority=draw(st.sampled_from([0, 1, 5])),
                  mark=draw(st.sampled_from([None, Mark(1), Mark(1, 0xF), Mark(0, 0xF0)])),
                  if_id=draw(st.sampled_from([0, 0, 3])),
                  ptype=draw(st.sampled_from(["main", "main", "main", "sub"])))


@st.composite
def small_flows(draw) -> Flow:
    def address() -> ipaddress.IPv4Address:
        return addr(f"10.{draw(OCTETS)}.{draw(OCTETS)}.{draw(OCTETS)}")
    return Flow(address(), address(), draw(st.sampled_from([6, 17])), 1000,
                draw(st.sampled_from([53, 443])))


class SPDMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.spd, self.model, self.now = SecurityPolicyDatabase(), NaiveSPD(), 0.0

    @rule(policy=small_policies(), update=st.booleans())
    def add(self, policy, update):
        self.now += 1
        try:
            expected = self.model.add(policy, update)
        except XfrmError:
            assert errno_of(self.spd.add, policy, self.now, update) == "EEXIST"
            return
        assert self.spd.add(policy, self.now, update) == expected

    @rule(policy=small_policies())
    def delete(self, policy):
        present = any(self.model.same(p, policy) for p, _ in self.model.items)
        self.model.delete(policy)
        if present:
            gone = self.spd.delete(policy.dir, policy.selector, mark=policy.mark,
                                   if_id=policy.if_id, ptype=policy.ptype)
            assert self.model.same(gone, policy)
        else:
            assert errno_of(self.spd.delete, policy.dir, policy.selector, mark=policy.mark,
                            if_id=policy.if_id, ptype=policy.ptype) == "ENOENT"

    @rule(f=small_flows(), dir=st.sampled_from(["in", "out"]),
          mark=st.sampled_from([0, 1, 0x11, 0xF1]), if_id=st.sampled_from([0, 3]))
    def lookup(self, f, dir, mark, if_id):
        assert self.spd.lookup(dir, f, mark, if_id) == self.model.lookup(dir, f, mark, if_id)

    @invariant()
    def same_contents(self):
        ordered = sorted(self.model.items, key=lambda t: (DIR_CODE[t[0].dir], t[0].priority,
                                                          t[1]))
        assert self.spd.dump() == [p for p, _ in ordered]


SPDMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                        deadline=None)
TestSPDAgainstALinearModel = SPDMachine.TestCase
