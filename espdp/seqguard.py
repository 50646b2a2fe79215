"""Outbound sequence numbers that survive a restart: no nonce used twice.

An SA's (key, sequence number) pair is the nonce of its AEAD (GCM, ChaCha20-
Poly1305): sending two packets with the same pair breaks the key.  With keys
from a configuration file (``ip xfrm``'s static keys) a restarted daemon
would start each SA at sequence number 1 again, and so would the kernel.

:class:`SequenceGuard` keeps, per SA (identified by a hash of its SPI,
addresses and keys: the file never holds a key), a *reservation*: a sequence
number the SA will not reach before a larger one is on disk.  When an SA
appears (at start or when one is added through the control socket) its
outbound counter starts at its reservation, if one exists, and a new
reservation ``jump`` beyond is written, with fsync, before any packet can
use it.  :meth:`SequenceGuard.check`, called from the daemon's loop, writes
the next reservation when the counter gets within a quarter of ``jump`` of
the current one.  A restart therefore skips at most ``jump`` sequence
numbers of the 2^32 (2^64 with ESN) and never repeats one.  The peer sees a
jump forward, which its replay window accepts.  The reservation of an SA
that is deleted without having sent anything goes back to where it started
(it is dropped when that was 0: inbound SAs, SAs that came and went), so
the file holds live SAs and SAs that sent, not every SA ever added.

It relies on the loop checking more often than ``jump / 4`` packets go
out (1 M packets by default: seconds at line rate; the daemon's loop checks
every 0.1 s); it does not protect against a state directory that is lost or
copied to another machine (the cluster issue checkpoints to etcd instead).
A reservation that cannot be written (a full disk) is fatal: the SA it was
for sends nothing, and :meth:`SequenceGuard.check` raises
:class:`~espdp.errors.FatalError` from then on, which stops ``espdp run``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from .engine import OseqSweep
from .errors import ConfigError, FatalError

JUMP = 1 << 22
NEVER = np.iinfo(np.uint64).max    # the limit of an empty slot
COMPACT_MIN = 1024                 # change lines always allowed before a rewrite


def sa_id(info: Any) -> str:
    """A stable name for the (key, SA) whose nonces are counted; reveals no key."""
    h = hashlib.sha256(b"espdp sequence reservation\0")
    h.update(f"{info.src}|{info.dst}|{info.spi}|{info.proto}".encode())
    for algo in (info.aead, info.enc, info.auth):
        if algo is not None:
            h.update(algo.name.encode() + b"\0" + bytes(algo.key))
    return h.hexdigest()[:32]


def read_reservations(path: str) -> dict[str, int]:
    """The reservations in ``path``: its first line a snapshot
    ``{"reserved": {sa id: n}}``, each further line a change
    ``{"set": {sa id: n}, "drop": [sa id]}``.  A last line without its newline
    is a change whose write a crash cut short: its fsync never returned, so no
    SA used it, and it is left out.  ConfigError when the file is unreadable."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1]:
        lines.pop()               # the cut-short change
    try:
        reserved = {str(k): int(v) for k, v in json.loads(lines[0])["reserved"].items()}
        for line in lines[1:]:
            if line:
                change = json.loads(line)
                _apply(reserved, {str(k): int(v) for k, v in change["set"].items()})
                _apply(reserved, {str(k): None for k in change["drop"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _unreadable(path, e) from None
    return reserved


def _unreadable(path: str, e: Exception) -> ConfigError:
    return ConfigError(f"{path}: unreadable sequence reservations ({e}); "
                       "remove it only if every SA in it has been rekeyed")


def _apply(reserved: dict, changes: dict) -> None:
    for key, value in changes.items():
        if value is None:
            reserved.pop(key, None)
        else:
            reserved[key] = value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SequenceGuard:
    """Reservations in ``path`` (mode 0600): a snapshot line, then a line per
    change appended with fsync (see :func:`read_reservations`), so a change
    costs one short write however many SAs there are; the file is rewritten,
    atomically, once the changes outnumber the reservations."""

    def __init__(self, path: str, jump: int = JUMP) -> None:
        self.path = path
        self.jump = jump
        self.reserved: dict[str, int] = read_reservations(path)   # what is on disk
        self.failed: Optional[FatalError] = None
        self._log: Optional[int] = None     # the file, open for appending changes
        self._changes = 0                   # change lines after its snapshot
        # The live SAs, each in a slot of arrays the check compares in one go.
        self._slot: dict[str, int] = {}     # sa id -> slot
        self._keys: list[Optional[str]] = []
        self._engines: list[Any] = []
        self._free: list[int] = []
        self._sweep = OseqSweep()           # the engine SAs' counters, by slot
        self._odd: dict[int, Any] = {}      # slot -> a stand-in for an engine SA (tests)
        self._limits = np.zeros(0, np.uint64)   # counter at which a slot is due
        self._start: dict[str, tuple] = {}  # sa id -> (engine SA, its counter when protected)

    def protect(self, info: Any, engine: Any) -> None:
        """Start ``engine``'s outbound counter past anything a previous run may have
        used, and reserve ahead before it sends.  When the reservation cannot be
        written the SA is killed (it sends nothing under a number not on disk)
        and :class:`FatalError` raised, now and by every later :meth:`check`."""
        self.protect_all([(info, engine)])

    def protect_all(self, sas: list) -> None:
        """:meth:`protect` for many ``(info, engine)`` at once, with one write of the
        file (loading 100,000 SAs at start does not write it 100,000 times)."""
        changes: dict[str, Optional[int]] = {}
        fresh = []
        for info, engine in sas:
            key = sa_id(info)
            slot = self._slot.get(key)
            if slot is not None and self._engines[slot] is engine:
                continue    # an update of an SA already protected: its counter is covered
            start = changes.get(key) or self.reserved.get(key, 0)
            if engine.oseq < start:
                engine.oseq = start
            changes[key] = max(start, engine.oseq + self.jump)
            fresh.append((key, engine))
        if not fresh:
            return
        try:
            self._commit(changes)          # on disk first: memory never runs ahead of it
        except FatalError:
            for _, engine in fresh:
                engine.kill()
            raise
        for key, engine in fresh:
            self._track(key, engine)
            self._start[key] = (engine, engine.oseq)

    def check(self) -> None:
        """Reserve further for every SA within a quarter jump of its reservation;
        :class:`FatalError` when a reservation could not be written."""
        if self.failed is not None:
            raise self.failed
        changes: dict[str, Optional[int]] = {}    # key -> new reservation (None: drop it)
        reserved, quarter = self.reserved, self.jump // 4
        for key, engine in self._due():
            if engine.dead:
                self._untrack(key)
                started, start = self._start.pop(key)
                if started is engine and engine.oseq == start:
                    # It sent nothing: no number above ``start`` was used under its key,
                    # so its reservation goes back to ``start`` (or goes: an inbound SA,
                    # an SA of churn), and the file does not grow with every SA ever seen.
                    changes[key] = start or None
                continue
            oseq = engine.oseq
            if oseq + quarter > reserved.get(key, 0):
                changes[key] = oseq + self.jump
        if changes:
            self._commit(changes)

    # ------------------------------------------------------------ the live SAs

    def _track(self, key: str, engine: Any) -> None:
        slot = self._slot.get(key)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._slot[key] = slot
            self._keys[slot] = key
        self._engines[slot] = engine
        self._odd.pop(slot, None)
        try:
            self._sweep.put(slot, engine)
        except TypeError:
            self._sweep.clear(slot)
            self._odd[slot] = engine
        self._limits[slot] = self._limit(key)

    def _untrack(self, key: str) -> None:
        slot = self._slot.pop(key)
        self._keys[slot] = self._engines[slot] = None
        self._odd.pop(slot, None)
        self._sweep.clear(slot)
        self._limits[slot] = NEVER
        self._free.append(slot)

    def _grow(self) -> None:
        n = len(self._keys)
        size = max(64, 2 * n)
        self._sweep.resize(size)
        self._limits = np.concatenate([self._limits, np.full(size - n, NEVER, np.uint64)])
        self._keys += [None] * (size - n)
        self._engines += [None] * (size - n)
        self._free += range(size - 1, n - 1, -1)

    def _limit(self, key: str) -> int:
        return max(self.reserved.get(key, 0) - self.jump // 4, 0)

    def _due(self) -> list:
        """The live SAs that are dead or within a quarter jump of their reservation:
        the counters of all are read in C and compared with numpy, so a check
        costs about a millisecond per 100,000 SAs, not a Python loop over them."""
        if not self._slot:
            return []
        oseq, dead = self._sweep.read()
        for slot, engine in self._odd.items():
            oseq[slot], dead[slot] = engine.oseq, bool(engine.dead)
        hit = np.flatnonzero(dead | (oseq >= self._limits))
        return [(self._keys[i], self._engines[i]) for i in hit]

    # ------------------------------------------------------------ the file

    def _commit(self, changes: dict[str, Optional[int]]) -> None:
        """Put ``changes`` (sa id -> reservation, None to drop it) on disk, then in
        memory; :class:`FatalError` when they could not be written."""
        if self.failed is not None:
            raise self.failed
        try:
            if self._log is None or self._changes >= max(COMPACT_MIN, len(self.reserved)):
                pending = dict(self.reserved)
                _apply(pending, changes)
                self._rewrite(pending)
                self.reserved = pending
            else:
                line = json.dumps({"set": {k: v for k, v in changes.items() if v is not None},
                                   "drop": [k for k, v in changes.items() if v is None]})
                _write_all(self._log, (line + "\n").encode())
                os.fsync(self._log)
                self._changes += 1
                _apply(self.reserved, changes)
        except OSError as e:
            raise self._fail(e) from None
        for key in changes:
            slot = self._slot.get(key)
            if slot is not None:
                self._limits[slot] = self._limit(key)

    def _rewrite(self, reserved: dict) -> None:
        """The snapshot, replacing the file atomically; later changes append to it."""
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, (json.dumps({"reserved": reserved}) + "\n").encode())
            os.fsync(fd)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._log is not None:
            os.close(self._log)
        self._log = fd      # open on the renamed file: appends go to the new one
        os.lseek(fd, 0, os.SEEK_END)
        self._changes = 0

    def close(self) -> None:
        """Once nothing sends any more (the daemon's last step): the reservations
        of SAs that sent nothing go back to where they started, as :meth:`check`
        does for deleted ones, so the file keeps only SAs that sent."""
        if self._log is None:
            return
        if self.failed is None:
            changes = {key: start or None for key, (engine, start) in self._start.items()
                       if engine.oseq == start and self.reserved.get(key) != start}
            if changes:
                with contextlib.suppress(FatalError):   # it stays reserved: no harm
                    self._commit(changes)
        os.close(self._log)
        self._log = None

    def _fail(self, e: OSError) -> FatalError:
        self.failed = FatalError(f"{self.path}: cannot write the sequence reservations "
                                 f"({e.strerror or e}); sending on could repeat a nonce "
                                 "after a restart")
        return self.failed

    def attach(self, xfrm: Any) -> None:
        """Protect every SA of ``xfrm`` now and each one added or made valid later."""
        self.protect_all([(st.info, st.engine) for st in xfrm.sad.dump()
                          if st.engine is not None])

        def on_sa(event: Any) -> None:
            st = event.ref
            if event.action in ("newsa", "updsa") and st is not None and st.engine is not None:
                try:
                    self.protect(st.info, st.engine)
                except FatalError:
                    pass    # the SA is dead; the loop's next check() raises it

        xfrm.subscribe(on_sa, ["sa"])
