"""The dataplane loop between a TUN and the wire, with stand-in devices:
policies choose the SA, the engine does the work, policy checks after
decryption, MAPPING reported, drops counted."""

from __future__ import annotations

from collections import deque

from scapy.all import ICMP, IP, UDP, Raw

from espdp.dataplane import Dataplane
from espdp.xfrm import Xfrm

K1, K2 = "0x" + "11" * 20, "0x" + "22" * 20
LINES = {
    "a": ["ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24 dir out tmpl src 192.0.2.1 "
          "dst 192.0.2.2 proto esp reqid 1 mode tunnel",
          "ip xfrm policy add src 10.9.2.0/24 dst 10.9.1.0/24 dir in tmpl src 192.0.2.2 "
          "dst 192.0.2.1 proto esp reqid 2 mode tunnel",
          "ip xfrm policy add src 10.9.1.0/24 dst 10.9.4.0/24 dir out action block"],
    "b": ["ip xfrm policy add src 10.9.2.0/24 dst 10.9.1.0/24 dir out tmpl src 192.0.2.2 "
          "dst 192.0.2.1 proto esp reqid 2 mode tunnel",
          "ip xfrm policy add src 10.9.1.0/24 dst 10.9.2.0/24 dir in tmpl src 192.0.2.1 "
          "dst 192.0.2.2 proto esp reqid 1 mode tunnel"],
}
SAS = [
    f"ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101 reqid 1 mode tunnel "
    f"replay-window 64 aead 'rfc4106(gcm(aes))' {K1} 128 encap espinudp 4500 4500 0.0.0.0",
    f"ip xfrm state add src 192.0.2.2 dst 192.0.2.1 proto esp spi 0x202 reqid 2 mode tunnel "
    f"replay-window 64 aead 'rfc4106(gcm(aes))' {K2} 128 encap espinudp 4500 4500 0.0.0.0",
]


class Device:
    """Stands in for a TUN or a UDP socket: an inbox to read, a list of what was written."""

    def __init__(self) -> None:
        self.inbox: deque = deque()
        self.written: list = []

    def read_batch(self, batch) -> int:
        n = 0
        while self.inbox and batch.count < batch.capacity:
            batch.add(self.inbox.popleft())
            n += 1
        return n

    def write_batch(self, batch, indexes) -> int:
        self.written += [batch.packet(i) for i in indexes]
        return len(indexes)

    def fileno(self) -> int:
        return -1


def gateway(name: str, with_in_policy: bool = True):
    x = Xfrm()
    for line in SAS + [p for p in LINES[name] if with_in_policy or "dir in" not in p]:
        x.execute(line, now=0)
    tun, wire = Device(), Device()
    return Dataplane(x, tun, {4: wire}), tun, wire


def packet(dst: str, i: int = 0, src: str = "10.9.1.1") -> bytes:
    return bytes(IP(src=src, dst=dst, id=i) / ICMP(seq=i) / Raw(b"x" * (i * 13 % 200)))


def test_packets_cross_between_two_gateways_both_ways():
    a, a_tun, a_wire = gateway("a")
    b, b_tun, b_wire = gateway("b")
    sent = [packet("10.9.2.1", i) for i in range(100)]
    a_tun.inbox.extend(sent)
    while a_tun.inbox:
        a.handle_tun(now=1)
    assert len(a_wire.written) == 100
    b_wire.inbox.extend(a_wire.written)
    while b_wire.inbox:
        b.handle_datagrams(b_wire, now=1)
    assert b_tun.written == sent
    replies = [packet("10.9.1.1", i, src="10.9.2.1") for i in range(10)]
    b_tun.inbox.extend(replies)
    b.handle_tun(now=2)
    a_wire.inbox.extend(b_wire.written)
    a.handle_datagrams(a_wire, now=2)
    assert a_tun.written == replies
    assert a.xfrm.getsa("192.0.2.2", 0x101).counters()["packets"] == 100


def test_blocked_unprotected_and_acquiring_packets_are_counted_not_sent():
    a, a_tun, a_wire = gateway("a")
    a.xfrm.execute("ip xfrm policy add src 10.9.1.0/24 dst 10.9.3.0/24 dir out tmpl "
                   "src 192.0.2.1 dst 192.0.2.9 proto esp reqid 9 mode tunnel", now=0)
    a_tun.inbox.extend([packet("10.9.4.1"), packet("10.9.5.1"), packet("10.9.3.1")])
    a.handle_tun(now=1)
    assert a_wire.written == [] and a_tun.written == []
    assert a.counters.policy_drops == {"block": 1, "no_policy": 1, "acquire": 1}


def test_decrypted_packets_without_an_inbound_policy_are_refused():
    a, a_tun, a_wire = gateway("a")
    b, b_tun, b_wire = gateway("b", with_in_policy=False)
    a_tun.inbox.append(packet("10.9.2.1"))
    a.handle_tun(now=1)
    b_wire.inbox.extend(a_wire.written)
    b.handle_datagrams(b_wire, now=1)
    assert b_tun.written == [] and b.counters.policy_drops == {"inbound_policy": 1}


def test_replays_and_forgeries_are_dropped_and_counted():
    a, a_tun, a_wire = gateway("a")
    b, b_tun, b_wire = gateway("b")
    a_tun.inbox.extend([packet("10.9.2.1", 1), packet("10.9.2.1", 2)])
    a.handle_tun(now=1)
    good, fresh = a_wire.written
    forged = fresh[:-1] + bytes([fresh[-1] ^ 1])   # a sequence number not yet seen
    b_wire.inbox.extend([good, good, forged])
    b.handle_datagrams(b_wire, now=1)
    assert len(b_tun.written) == 1
    assert b.counters.engine_drops == {"replay": 1, "integrity": 1}


def test_a_nat_rebinding_is_reported_as_mapping():
    a, a_tun, a_wire = gateway("a")
    b, b_tun, b_wire = gateway("b")
    events = []
    b.xfrm.subscribe(events.append, groups=("mapping",))
    a_tun.inbox.append(packet("10.9.2.1"))
    a.handle_tun(now=1)
    outer = IP(a_wire.written[0])
    outer[IP].src, outer[UDP].sport = "198.51.100.77", 31000   # as a NAT would rewrite it
    del outer[IP].chksum
    b_wire.inbox.append(bytes(outer))
    b.handle_datagrams(b_wire, now=1)
    assert len(b_tun.written) == 1
    [event] = events
    assert event.to_json()["new"] == {"addr": "198.51.100.77", "port": 31000}


def test_remembered_flows_follow_sad_and_spd_changes():
    """The C flow cache is invalidated by every SAD/SPD change: a rekeyed SA is
    used from the next packet on, a blocking policy takes effect at once."""
    a, a_tun, a_wire = gateway("a")
    for _ in range(3):
        a_tun.inbox.append(packet("10.9.2.1", 1))   # one flow, many packets
        a.handle_tun(now=1)
    assert {p[28:32] for p in a_wire.written} == {(0x101).to_bytes(4, "big")}
    new_key = "0x" + "33" * 20
    a.xfrm.execute("ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x103 "
                   f"reqid 1 mode tunnel replay-window 64 aead 'rfc4106(gcm(aes))' {new_key} "
                   "128 encap espinudp 4500 4500 0.0.0.0", now=2)
    a.xfrm.execute("ip xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101",
                   now=2)
    a_wire.written.clear()
    a_tun.inbox.append(packet("10.9.2.1", 1))
    a.handle_tun(now=3)
    assert [p[28:32] for p in a_wire.written] == [(0x103).to_bytes(4, "big")]
    a.xfrm.execute("ip xfrm policy update src 10.9.1.0/24 dst 10.9.2.0/24 dir out "
                   "action block", now=4)
    a_wire.written.clear()
    a_tun.inbox.append(packet("10.9.2.1", 1))
    a.handle_tun(now=5)
    assert a_wire.written == [] and a.counters.policy_drops.get("block") == 1


def test_packets_without_a_socket_of_their_kind_are_each_counted():
    x = Xfrm()
    for line in SAS + LINES["a"]:
        x.execute(line, now=0)
    tun, esp_wire = Device(), Device()
    dp = Dataplane(x, tun, {}, esp_sockets={4: esp_wire})   # raw ESP only: no UDP socket
    tun.inbox.extend(packet("10.9.2.1", i) for i in range(5))
    dp.handle_tun(now=1)
    assert dp.counters.policy_drops == {"no_ipv4_udp_socket": 5}
    assert esp_wire.written == [] and dp.counters.sent == 0


class Wire(Device):
    def __init__(self) -> None:
        super().__init__()
        self.keepalives: list = []

    def send_keepalive(self, addr) -> None:
        self.keepalives.append(addr)


def test_keepalives_cover_the_sas_other_workers_send_with():
    # Only worker 0 runs the timers; an SA that only worker 1 had sent with got
    # no NAT keepalive once idle, and its NAT mapping could lapse.
    x = Xfrm()
    for line in SAS + LINES["a"]:
        x.execute(line, now=0)
    x.sad.table.set_workers(2)
    wire0, wire1 = Wire(), Wire()
    first = Dataplane(x, Device(), {4: wire0}, keepalive_interval=20)
    other = Dataplane(x, Device(), {4: wire1}, worker=1)
    other.tun.inbox.append(packet("10.9.2.1"))
    other.handle_tun(now=1)
    assert len(wire1.written) == 1
    first.take_used(other)
    first.send_keepalives()                  # the baseline: it has just sent
    assert first.send_keepalives() == 1      # idle since: one keepalive, from worker 0
    assert wire0.keepalives == [("192.0.2.2", 4500)]
    x.execute("ip xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101", now=2)
    first.take_used(other)                   # gone: the worker forgets it
    assert other._used == {} and first.send_keepalives() == 0
