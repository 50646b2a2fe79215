"""Outbound sequence numbers never repeat across restarts with the same keys."""

from __future__ import annotations

import os

import pytest

from espdp.errors import ConfigError
from espdp.seqguard import SequenceGuard, read_reservations, sa_id
from espdp.xfrm import Xfrm

KEY = "0x" + "ab" * 20
SA = (f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x10 reqid 1 mode tunnel "
      f"aead 'rfc4106(gcm(aes))' {KEY} 128")


def _run(path, sent: int, jump: int = 1000, checks: int = 1) -> int:
    """One daemon lifetime: the SA sends ``sent`` packets; returns its first seq."""
    x = Xfrm()
    x.execute(SA, 0)
    guard = SequenceGuard(str(path), jump=jump)
    guard.attach(x)
    sa = x.sad.table[0]
    first = sa.oseq + 1
    step = max(1, sent // checks)
    for _ in range(checks):
        sa.oseq = sa.oseq + step    # as the engine advances it
        guard.check()
    return first


def test_restart_continues_past_every_sequence_number_used(tmp_path):
    path = tmp_path / "esp0.seq.json"
    assert _run(path, sent=2500, checks=10) == 1
    second = _run(path, sent=10)
    assert second > 2500           # a crash after 2500 packets: none repeated
    third = _run(path, sent=10)
    assert third > second + 10
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert KEY[2:] not in path.read_text()


def test_sa_added_later_is_protected_before_it_sends(tmp_path):
    path = tmp_path / "g.json"
    x = Xfrm()
    guard = SequenceGuard(str(path), jump=100)
    guard.attach(x)
    x.execute(SA, 0)
    sa = x.sad.table[0]
    reserved = read_reservations(str(path))
    assert reserved == {sa_id(x.sad.dump()[0].info): 100} and sa.oseq == 0


def test_other_keys_are_other_sas(tmp_path):
    x = Xfrm()
    x.execute(SA, 0)
    y = Xfrm()
    y.execute(SA.replace("ab" * 20, "cd" * 20), 0)
    assert sa_id(x.sad.dump()[0].info) != sa_id(y.sad.dump()[0].info)


def test_unreadable_file_stops_the_start(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable sequence reservations"):
        SequenceGuard(str(path))


def test_a_reservation_that_cannot_be_written_stops_the_sa_and_the_checks(tmp_path,
                                                                          monkeypatch):
    # A full disk used to leave an SA added at run time live with a reservation
    # only in memory: the model swallows a failing listener, the next check saw
    # nothing due, and a restart could reuse its sequence numbers.
    import errno

    from espdp.errors import FatalError

    path = tmp_path / "g.json"
    x = Xfrm()
    guard = SequenceGuard(str(path), jump=100)
    guard.attach(x)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    x.execute(SA, 0)                      # as the control socket would: no exception here
    sa = x.sad.table[0]
    assert sa.dead and sa.encrypt_packet(bytes(20))[0] == "no_sa"
    assert not path.exists()              # nothing reserved on disk: nothing sent
    with pytest.raises(FatalError, match="cannot write the sequence reservations"):
        guard.check()
    with pytest.raises(FatalError):
        guard.check()
    monkeypatch.undo()
    y = Xfrm()
    y.execute(SA, 0)
    with pytest.raises(FatalError):       # at start: refused before anything is sent
        SequenceGuard(str(tmp_path / "ro" / "g.json")).attach(y)


def test_an_update_of_a_live_sa_does_not_move_its_counter(tmp_path):
    # Each UPDSA (new lifetimes, NAT ports ...) used to jump the SA's counter by a
    # whole reservation (4 Mi numbers): after ~1000 updates a 32-bit SA was spent.
    x = Xfrm()
    SequenceGuard(str(tmp_path / "g.json"), jump=1000).attach(x)
    x.execute(SA, 0)
    sa = x.sad.table[0]
    sa.oseq = 10                               # as if it had sent ten packets
    for soft in range(100, 105):
        x.execute(SA.replace("state add", "state update") + f" limit time-soft {soft}", 0)
    assert sa.oseq == 10
    reserved = read_reservations(str(tmp_path / "g.json"))
    assert list(reserved.values()) == [1000]


def test_reservations_of_sas_that_never_sent_do_not_pile_up(tmp_path):
    # Every SA ever added used to keep its entry, rewritten with fsync on each
    # add: under churn (1,000 SAs added and deleted, over and over, in the soak)
    # each cycle got slower than the last and the daemon's memory grew.
    path = tmp_path / "g.json"
    x = Xfrm()
    guard = SequenceGuard(str(path), jump=1000)
    guard.attach(x)
    x.execute(SA, 0)
    for spi in range(0x100, 0x180):                    # come and go, never sending
        line = SA.replace("spi 0x10", f"spi {spi:#x}")
        x.execute(line, 0)
        x.execute(line.replace("state add", "state delete").split(" reqid")[0], 0)
    guard.check()
    sent = x.sad.table[0]
    sent.oseq = 5
    x.execute(SA.replace("state add", "state delete").split(" reqid")[0], 0)
    guard.check()
    reserved = read_reservations(str(path))
    assert reserved == {sa_id_of(SA): 1000}            # the one that sent keeps its own
    assert len(guard.reserved) == 1


def sa_id_of(line: str) -> str:
    x = Xfrm()
    x.execute(line, 0)
    return sa_id(x.sad.dump()[0].info)


def _guarded(path, n: int, jump: int = 1000):
    """``n`` SAs (distinct SPIs) under a guard on ``path``."""
    x = Xfrm()
    for spi in range(0x100, 0x100 + n):
        x.execute(SA.replace("spi 0x10", f"spi {spi:#x}"), 0)
    guard = SequenceGuard(str(path), jump=jump)
    guard.attach(x)
    return x, guard


def test_a_reservation_appends_a_line_and_does_not_rewrite_every_sa(tmp_path):
    # Each reservation used to rewrite the whole file with fsync: with 100,000
    # SAs a busy SA's next reservation stalled the daemon's loop for 0.15 s.
    path = tmp_path / "g.json"
    x, guard = _guarded(path, 300)
    size, inode = path.stat().st_size, path.stat().st_ino
    sa = x.sad.table[5]
    for step in range(1, 6):
        sa.oseq = step * 1000
        guard.check()
    assert path.stat().st_ino == inode                  # not replaced
    assert path.stat().st_size - size < 5 * 150         # five short lines
    assert len(path.read_text().splitlines()) == 6
    key = sa_id(x.sad.state_of(sa).info)
    assert read_reservations(str(path))[key] == 6000 == guard.reserved[key]
    assert read_reservations(str(path)) == guard.reserved


def test_the_file_is_rewritten_once_changes_outnumber_reservations(tmp_path, monkeypatch):
    monkeypatch.setattr("espdp.seqguard.COMPACT_MIN", 4)
    path = tmp_path / "g.json"
    x, guard = _guarded(path, 3)
    sa = x.sad.table[0]
    lines = []
    for step in range(1, 12):
        sa.oseq = step * 1000
        guard.check()
        lines.append(len(path.read_text().splitlines()))
    assert lines == [2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]    # 4 changes, then a snapshot
    assert read_reservations(str(path)) == guard.reserved
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_change_cut_short_by_a_crash_is_left_out_and_a_broken_one_refused(tmp_path):
    path = tmp_path / "g.json"
    x, guard = _guarded(path, 2)
    before = dict(guard.reserved)
    with open(path, "a") as f:
        f.write('{"set": {"abc": 99')                   # no newline: its fsync never returned
    assert read_reservations(str(path)) == before
    assert SequenceGuard(str(path)).reserved == before
    with open(path, "a") as f:
        f.write('\n{"set": {}, "drop": []}\n')          # now a broken line in the middle
    with pytest.raises(ConfigError, match="unreadable sequence reservations"):
        SequenceGuard(str(path))


def test_the_file_of_an_earlier_version_is_read(tmp_path):
    path = tmp_path / "g.json"
    path.write_text('{"reserved": {"abc": 4194304}}')   # one JSON object, no newline
    assert read_reservations(str(path)) == {"abc": 4194304}


def test_a_restart_after_appended_changes_starts_past_them(tmp_path):
    path = tmp_path / "g.json"
    x, guard = _guarded(path, 50)
    sa = x.sad.table[7]
    key = sa_id(x.sad.state_of(sa).info)
    for step in range(1, 4):
        sa.oseq = step * 800
        guard.check()
    guard.close()
    y, _ = _guarded(path, 50)
    [again] = [s.engine for s in y.sad.dump() if sa_id(s.info) == key]
    assert again.oseq >= 2400 + 1                          # past every number used
    others = [s.engine.oseq for s in y.sad.dump() if sa_id(s.info) != key]
    assert set(others) == {0}               # the rest sent nothing: no reservation kept


def test_a_clean_stop_keeps_only_the_sas_that_sent(tmp_path):
    path = tmp_path / "g.json"
    x, guard = _guarded(path, 100)
    sa = x.sad.table[3]
    key = sa_id(x.sad.state_of(sa).info)
    sa.oseq = 17
    guard.check()
    guard.close()
    assert read_reservations(str(path)) == {key: 1000}
    y, _ = _guarded(path, 100)                       # the next run: still past 17
    assert [s.engine.oseq for s in y.sad.dump() if sa_id(s.info) == key] == [1000]
