"""Anti-replay: espdp.engine.ReplayWindow and the SA's inbound window against
a reference model written here from the rules (XFRM-NOTES "Replay",
RFC 4303 section 3.4.3 and Appendix A):

* window 0: no checking at all, nothing is ever dropped;
* sequence number 0 is rejected when the window is > 0;
* above the top: accepted; ``top - seq >= window``: too old; seen: duplicate;
* ESN: the high half is inferred from the 32-bit low half on the wire
  exactly as RFC 4303 Appendix A2.2 says; a packet whose inferred number is
  below the first subspace (``Th == 0`` in case B) is too old.

The model keeps a plain set of every accepted 64-bit number and the top.
"""

from __future__ import annotations

from functools import cache

import pytest
from helpers import M32, esp_seq, inner_packet, sa_info
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from espdp.engine import SA, ReplayWindow, SATable

OK, DUPLICATE, TOO_OLD, ZERO = 0, 1, 2, 3
WINDOWS = [0, 1, 32, 64, 128, 1024, 4096]
VERDICT = {DUPLICATE: "replay", TOO_OLD: "replay_window", ZERO: "seq_zero"}


class ReplayModel:
    """The reference: a set of accepted 64-bit sequence numbers and the top."""

    def __init__(self, window: int, esn: bool = False, top: int = 0) -> None:
        self.window, self.esn, self.top = window, esn, top
        self.seen: set[int] = set()

    def infer(self, seq_lo: int) -> int | None:
        """RFC 4303 A2.2; None when the number would precede subspace 0."""
        if not self.esn or self.window == 0:
            return seq_lo
        tl, th, w = self.top & M32, self.top >> 32, self.window
        if tl >= w - 1:                                   # case A
            return (th << 32 | seq_lo) if seq_lo >= tl - w + 1 else ((th + 1) << 32 | seq_lo)
        if seq_lo >= (tl - w + 1) % 2**32:                # case B, mod 2^32
            return None if th == 0 else ((th - 1) << 32 | seq_lo)
        return th << 32 | seq_lo

    def check(self, seq_lo: int) -> tuple[int, int]:
        seq = self.infer(seq_lo)
        if self.window == 0:
            return OK, seq
        if seq is None:
            return TOO_OLD, seq_lo
        if seq == 0:
            return ZERO, 0
        if seq > self.top:
            return OK, seq
        if self.top - seq >= self.window:
            return TOO_OLD, seq
        if seq in self.seen:
            return DUPLICATE, seq
        return OK, seq

    def advance(self, seq: int) -> None:
        self.top = max(self.top, seq)
        if self.window:
            self.seen.add(seq)

    def accept(self, seq_lo: int) -> bool:
        result, seq = self.check(seq_lo)
        if result == OK:
            self.advance(seq)
        return result == OK

    def bitmap(self) -> int:
        if self.window == 0:
            return 0
        return sum(1 << i for i in range(min(self.window, self.top)) if self.top - i in self.seen)


# ---------------------------------------------------------------- strategies

@st.composite
def start_tops(draw, window: int, esn: bool) -> int:
    kind = draw(st.sampled_from(["zero", "small", "near_wrap", "near_wrap", "just_crossed",
                                 "random"]))
    if kind == "zero":
        low = 0
    elif kind == "small":
        low = draw(st.integers(0, 3 * window + 64))
    elif kind == "just_crossed":  # RFC 4303 A2.2 case B: the window reaches back a subspace
        low = draw(st.integers(0, max(window - 2, 0)))
    elif kind == "near_wrap":     # the window straddles (or is about to cross) 2^32
        low = (2**32 - window + draw(st.integers(-70, 70))) % 2**32
    else:
        low = draw(st.integers(0, M32))
    high = draw(st.sampled_from([0, 1, 1, 7, 0xFFFF])) if esn else 0
    return high << 32 | low


def operations(window: int):
    """Sequence numbers to feed, relative to the top at the time of use, absolute
    (random jumps anywhere in 32 bits) or a resend of something accepted."""
    span = 2 * window + 66
    return st.lists(st.one_of(
        st.tuples(st.just("rel"), st.integers(-span, window + 66)),
        st.tuples(st.just("rel"), st.integers(-max(window, 1), 0)),    # late, in the window
        st.tuples(st.just("rel"), st.integers(1, max(window // 2, 3))),  # a little ahead
        st.tuples(st.just("rel"), st.integers(-3, 3)),
        st.tuples(st.just("abs"), st.integers(0, M32)),
        st.tuples(st.just("dup"), st.integers(0, 10**6)),
    ), min_size=8, max_size=80)


@st.composite
def scenarios(draw, windows=tuple(WINDOWS)):
    window = draw(st.sampled_from(windows))
    esn = draw(st.booleans())
    top = draw(start_tops(window, esn))
    return window, esn, top, draw(operations(window))


def wire_seq(op, model: ReplayModel, accepted: list[int]) -> int:
    kind, value = op
    if kind == "rel":
        return (model.top + value) & M32
    if kind == "dup" and accepted:
        return accepted[value % len(accepted)] & M32
    return value & M32


PROPERTY = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- ReplayWindow

@PROPERTY
@given(scenarios())
def test_check_and_advance_agree_with_the_reference_model(scenario):
    window, esn, top, ops = scenario
    w, model, accepted = ReplayWindow(window, esn, top), ReplayModel(window, esn, top), []
    for op in ops:
        seq_lo = wire_seq(op, model, accepted)
        expected = model.check(seq_lo)
        assert w.check(seq_lo) == expected, (hex(model.top), hex(seq_lo))
        if expected[0] == OK:
            w.advance(expected[1])
            model.advance(expected[1])
            accepted.append(expected[1])
        assert w.top == model.top


def run(ops, model: ReplayModel, accepted: list[int], *windows: ReplayWindow) -> None:
    """Feed ``ops`` to the model and every window; all must agree."""
    for op in ops:
        seq_lo = wire_seq(op, model, accepted)
        result, seq = model.check(seq_lo)
        for w in windows:
            assert w.accept(seq_lo) is (result == OK), (hex(model.top), hex(seq_lo))
        if result == OK:
            model.advance(seq)
            accepted.append(seq)


@PROPERTY
@given(scenarios())
def test_accept_takes_exactly_the_packets_the_model_takes(scenario):
    window, esn, top, ops = scenario
    w, model = ReplayWindow(window, esn, top), ReplayModel(window, esn, top)
    run(ops, model, [], w)
    assert w.top == model.top


@PROPERTY
@given(scenarios(windows=(0, 1, 32, 64, 128, 1024)), st.data())
def test_imported_state_behaves_like_the_window_it_describes(scenario, data):
    window, esn, top, ops = scenario
    cut = data.draw(st.integers(0, len(ops)))
    model, accepted = ReplayModel(window, esn, top), []
    run(ops[:cut], model, accepted)
    w = ReplayWindow(window, esn)
    w.import_state(model.top, model.bitmap())
    assert w.top == model.top
    run(ops[cut:], model, accepted, w)


@PROPERTY
@example(scenario=(32, False, 0, [("rel", 1), ("rel", 31)]), cut=2)
@example(scenario=(64, False, 0, [("rel", 1), ("rel", 39)]), cut=2)
@given(scenarios(windows=(0, 1, 32, 64, 128, 1024)), st.integers(0, 80))
def test_exported_bitmap_round_trips_through_import_state(scenario, cut):
    window, esn, top, ops = scenario
    cut = min(cut, len(ops))
    w, model, accepted = ReplayWindow(window, esn, top), ReplayModel(window, esn, top), []
    run(ops[:cut], model, accepted, w)
    bitmap = w.export_bitmap()
    assert bitmap == model.bitmap()
    copy = ReplayWindow(window, esn)
    copy.import_state(w.top, bitmap)
    assert copy.top == w.top and copy.export_bitmap() == bitmap
    run(ops[cut:], model, accepted, w, copy)
    assert copy.export_bitmap() == w.export_bitmap() == model.bitmap()


@pytest.mark.parametrize("esn", [False, True])
def test_window_zero_accepts_everything_including_duplicates_and_zero(esn):
    w = ReplayWindow(0, esn)
    for seq in (5, 5, 0, 1, 2**32 - 1, 3, 3):
        assert w.check(seq) == (OK, seq)
        assert w.accept(seq)
    assert w.export_bitmap() == 0


@pytest.mark.parametrize("esn", [False, True])
@pytest.mark.parametrize("window", [1, 32, 4096])
def test_sequence_number_zero_is_rejected(window, esn):
    w = ReplayWindow(window, esn)
    assert w.check(0) == (ZERO, 0)
    assert not w.accept(0)
    assert w.top == 0


def test_duplicate_and_too_old_are_told_apart():
    w = ReplayWindow(32)
    for seq in (1, 2, 40):
        assert w.accept(seq)
    assert w.check(40) == (DUPLICATE, 40)
    assert w.check(2) == (TOO_OLD, 2)        # seen, but 40 - 2 >= 32: too old wins
    assert w.check(8) == (TOO_OLD, 8)        # 40 - 8 = 32: just outside
    assert w.check(9) == (OK, 9)             # 40 - 9 = 31: inside, unseen


@pytest.mark.parametrize(("top", "seq_lo", "expected"), [
    # case A (Tl >= W - 1): at or above the bottom -> Th, below -> Th + 1
    (5 << 32 | 1000, 1000 - 31, (DUPLICATE, 5 << 32 | 969)),
    (5 << 32 | 1000, 1000 - 32, (OK, 6 << 32 | 968)),
    (5 << 32 | 1000, 2000, (OK, 5 << 32 | 2000)),
    # case B (Tl < W - 1): at or above the (wrapped) bottom -> Th - 1, below -> Th
    (5 << 32 | 10, M32 - 10, (OK, 4 << 32 | (M32 - 10))),
    (5 << 32 | 10, M32 - 30, (OK, 5 << 32 | (M32 - 30))),      # taken for the future
    (5 << 32 | 10, M32 - 20, (DUPLICATE, 4 << 32 | (M32 - 20))),
    (5 << 32 | 10, 11, (OK, 5 << 32 | 11)),
    (5 << 32 | 10, 2**31, (OK, 5 << 32 | 2**31)),
    # case B in subspace 0: nothing precedes it
    (10, M32 - 5, (TOO_OLD, M32 - 5)),
])
def test_esn_high_half_is_inferred_as_rfc4303_appendix_a(top, seq_lo, expected):
    w, model = ReplayWindow(32, esn=True), ReplayModel(32, True, top)
    if expected[0] == DUPLICATE:                  # mark the number seen in both
        model.seen.add(expected[1])
    w.import_state(top, model.bitmap())
    assert w.check(seq_lo) == expected
    assert model.check(seq_lo) == expected


def test_import_state_marks_the_given_bits_as_seen():
    w = ReplayWindow(64)
    w.import_state(100, 0b101)
    assert [w.check(s)[0] for s in (100, 99, 98, 37, 36)] == [DUPLICATE, OK, DUPLICATE, OK,
                                                            TOO_OLD]


def test_the_largest_window_still_rejects_a_duplicate():
    try:
        w = ReplayWindow(M32)
    except (ValueError, MemoryError):
        return                                   # refusing the window is fine too
    assert w.accept(3) and w.accept(70)
    assert not w.accept(3)


# ---------------------------------------------------------------- end to end

def e2e_pair(window: int, esn: bool, top: int, transform: str = "gcm"):
    flags = frozenset({"esn"}) if esn else frozenset()
    info = sa_info(4, transform=transform, replay_window=window, flags=flags)
    out = SA(info.replace(dir="out", replay_window=0))
    inb = SA(info.replace(dir="in", replay_seq=top & M32, replay_seq_hi=top >> 32))
    table = SATable()
    table.add(inb)
    return out, inb, table


@cache
def numbered_inner(i: int) -> bytes:
    """Inner packet number i (scapy is slow: build each one once)."""
    return inner_packet(4, "udp", 20 + i % 50, fill=i)


def expected_verdict(model: ReplayModel, true_seq: int) -> str:
    """What the engine must say: check, ICV (the inferred high half must be the
    sender's, it is in the ICV), check again, advance."""
    result, seq = model.check(true_seq & M32)
    if result != OK:
        return VERDICT[result]
    if seq != true_seq:
        return "integrity"
    model.advance(seq)
    return "ok"


E2E_CASES = [(0, False), (1, False), (32, False), (128, False),
             (1, True), (32, True), (128, True)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize(("window", "esn"), E2E_CASES)
def test_engine_verdicts_and_counters_follow_the_model(window, esn, data):
    n = data.draw(st.integers(1, 2 * window + 24), label="packets")
    if esn:   # cross 2^32 (and sometimes a later subspace boundary)
        start = data.draw(st.sampled_from([1, 2**32 - n // 2, 5 * 2**32 - n // 3]))
    else:
        start = data.draw(st.sampled_from([1, 1000, 2**32 - n - 1]))
    top = max(0, start - 1 - data.draw(st.integers(0, window + 4), label="top behind"))
    out, inb, table = e2e_pair(window, esn, top)
    out.oseq = start - 1
    inners, packets = [], []
    for i in range(n):
        inner = numbered_inner(i)
        verdict, packet, _ = out.encrypt_packet(inner)
        assert verdict == "ok" and esp_seq(packet) == (start + i) & M32
        inners.append(inner)
        packets.append(packet)
    if data.draw(st.booleans(), label="jitter"):
        keys = [i + data.draw(st.integers(0, window + 3)) for i in range(n)]
        order = sorted(range(n), key=keys.__getitem__)
    else:
        order = data.draw(st.permutations(range(n)))
    dups = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n)),
                              max_size=n), label="duplicates")
    order = list(order)
    for index, position in dups:
        order.insert(position, index)

    model = ReplayModel(window, esn, top)
    seen = {"ok": 0, "replay": 0, "replay_window": 0, "integrity": 0, "seq_zero": 0}
    for i in order:
        expected = expected_verdict(model, start + i)
        verdict, inner, _ = table.decrypt_packet(packets[i])
        assert verdict == expected, (i, hex(start + i), hex(model.top))
        if verdict == "ok":
            assert inner == inners[i]
        seen[verdict] += 1
    stats = inb.stats()
    assert stats["packets"] == seen["ok"]
    assert stats["replay"] == seen["replay"]
    assert stats["replay_window"] == seen["replay_window"]
    assert stats["integrity_failed"] == seen["integrity"]
    assert sum(stats["drops"].values()) == len(order) - seen["ok"]
    assert inb.replay_top == model.top
    if window == 0:
        assert seen["ok"] == len(order)


def test_esn_sa_decrypts_in_order_across_2_32():
    out, inb, table = e2e_pair(64, True, 2**32 - 10)
    out.oseq = 2**32 - 10
    for i in range(20):
        inner = inner_packet(4, "icmp", 30, fill=i)
        _, packet, _ = out.encrypt_packet(inner)
        assert table.decrypt_packet(packet)[:2] == ("ok", inner)
    assert inb.replay_top == out.oseq == 2**32 + 10


def test_esn_late_packet_from_the_previous_subspace_is_accepted_once():
    out, inb, table = e2e_pair(32, True, 2**32 - 20)
    out.oseq = 2**32 - 20
    packets = [out.encrypt_packet(inner_packet(4, size=10, fill=i))[1] for i in range(30)]
    # seq 2^32 - 19 .. 2^32 + 10; deliver the ones after the wrap first
    for packet in packets[19:]:
        assert table.decrypt_packet(packet)[0] == "ok"
    assert inb.replay_top == 2**32 + 10
    late = packets[5]                          # 2^32 - 14: 24 behind the top, in the window
    assert table.decrypt_packet(late)[0] == "ok"
    assert table.decrypt_packet(late)[0] == "replay"
    too_late = packets[0]                      # 2^32 - 19: 29 behind, still in the window
    assert table.decrypt_packet(too_late)[0] == "ok"
    stats = inb.stats()
    assert (stats["replay"], stats["replay_window"], stats["integrity_failed"]) == (1, 0, 0)


def test_esn_packet_older_than_the_window_fails_the_icv_not_the_window():
    # RFC 4303 A2.2: a packet below the window in case B is taken for the next
    # subspace up, so it is "new" -- and its ICV (over the wrong high half) fails.
    out, inb, table = e2e_pair(32, True, 2**32 - 40)
    out.oseq = 2**32 - 40
    packets = [out.encrypt_packet(inner_packet(4, size=10, fill=i))[1] for i in range(60)]
    assert table.decrypt_packet(packets[50])[0] == "ok"     # top = 2^32 + 11: case B
    assert table.decrypt_packet(packets[0])[0] == "integrity"
    assert inb.stats()["integrity_failed"] == 1 and inb.replay_top == 2**32 + 11


@pytest.mark.parametrize("esn", [False, True])
def test_replayed_packet_is_dropped_and_counted(esn):
    out, inb, table = e2e_pair(64, esn, 0)
    _, packet, _ = out.encrypt_packet(inner_packet(6 if esn else 4, "tcp", 40))
    assert table.decrypt_packet(packet)[0] == "ok"
    assert table.decrypt_packet(packet)[0] == "replay"
    assert table.decrypt_packet(packet)[0] == "replay"
    stats = inb.stats()
    assert stats["replay"] == 2 and stats["drops"] == {"replay": 2} and stats["packets"] == 1


def test_packet_older_than_the_window_is_dropped_and_counted_as_replay_window():
    out, inb, table = e2e_pair(32, False, 0)
    packets = [out.encrypt_packet(inner_packet(4, size=10, fill=i))[1] for i in range(40)]
    assert table.decrypt_packet(packets[39])[0] == "ok"     # top 40
    assert table.decrypt_packet(packets[8])[0] == "ok"      # seq 9: 31 behind
    assert table.decrypt_packet(packets[7])[0] == "replay_window"   # seq 8: 32 behind
    assert inb.stats()["replay_window"] == 1


def test_sa_with_window_zero_takes_replays():
    out, inb, table = e2e_pair(0, False, 0)
    _, packet, _ = out.encrypt_packet(inner_packet(4, size=10))
    assert [table.decrypt_packet(packet)[0] for _ in range(3)] == ["ok"] * 3
    stats = inb.stats()
    assert stats["packets"] == 3 and stats["replay"] == stats["replay_window"] == 0


def test_sa_with_the_largest_window_drops_a_replay():
    try:
        out, inb, table = e2e_pair(M32, False, 0)
    except (ValueError, MemoryError):
        return
    packets = [out.encrypt_packet(inner_packet(4, size=10, fill=i))[1] for i in range(70)]
    assert table.decrypt_packet(packets[2])[0] == "ok"      # seq 3
    assert table.decrypt_packet(packets[69])[0] == "ok"     # seq 70: clears the only block
    assert table.decrypt_packet(packets[2])[0] == "replay"
