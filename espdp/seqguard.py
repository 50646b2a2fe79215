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

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from .engine import oseq_array
from .errors import ConfigError, FatalError

JUMP = 1 << 22


def sa_id(info: Any) -> str:
    """A stable name for the (key, SA) whose nonces are counted; reveals no key."""
    h = hashlib.sha256(b"espdp sequence reservation\0")
    h.update(f"{info.src}|{info.dst}|{info.spi}|{info.proto}".encode())
    for algo in (info.aead, info.enc, info.auth):
        if algo is not None:
            h.update(algo.name.encode() + b"\0" + bytes(algo.key))
    return h.hexdigest()[:32]


class SequenceGuard:
    """Reservations in ``path`` (JSON, mode 0600, replaced atomically)."""

    def __init__(self, path: str, jump: int = JUMP) -> None:
        self.path = path
        self.jump = jump
        self.reserved: dict[str, int] = {}   # what is on disk
        self._live: dict[str, Any] = {}     # sa id -> engine SA
        self._start: dict[str, tuple] = {}  # sa id -> (engine SA, its counter when protected)
        self._live_version = object()       # replaced whenever _live changes
        self._arrays: Optional[tuple] = None         # (version, keys, engines, limits)
        self._arrays_reserved: Optional[dict] = None  # the reservations the limits are of
        self.failed: Optional[FatalError] = None
        try:
            with open(path) as f:
                data = json.load(f)
            self.reserved = {str(k): int(v) for k, v in data.get("reserved", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: unreadable sequence reservations ({e}); "
                              "remove it only if every SA in it has been rekeyed") from None

    def protect(self, info: Any, engine: Any) -> None:
        """Start ``engine``'s outbound counter past anything a previous run may have
        used, and reserve ahead before it sends.  When the reservation cannot be
        written the SA is killed (it sends nothing under a number not on disk)
        and :class:`FatalError` raised, now and by every later :meth:`check`."""
        self.protect_all([(info, engine)])

    def protect_all(self, sas: list) -> None:
        """:meth:`protect` for many ``(info, engine)`` at once, with one write of the
        file (loading 100,000 SAs at start does not write it 100,000 times)."""
        pending = dict(self.reserved)
        fresh = []
        for info, engine in sas:
            key = sa_id(info)
            if self._live.get(key) is engine:
                continue    # an update of an SA already protected: its counter is covered
            start = pending.get(key, 0)
            if engine.oseq < start:
                engine.oseq = start
            pending[key] = max(start, engine.oseq + self.jump)
            fresh.append((key, engine))
        if not fresh:
            return
        try:
            self._write(pending)           # on disk first: memory never runs ahead of it
        except OSError as e:
            for _, engine in fresh:
                engine.kill()
            raise self._fail(e) from None
        self.reserved = pending
        self._live_version = object()
        for key, engine in fresh:
            self._live[key] = engine
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
                del self._live[key]
                self._live_version = object()
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
        if changes:   # the copy only when something is due (100,000 SAs: not each round)
            pending = dict(reserved)
            for key, value in changes.items():
                if value is None:
                    pending.pop(key, None)
                else:
                    pending[key] = value
            try:
                self._write(pending)
            except OSError as e:
                raise self._fail(e) from None
            self.reserved = pending

    def _due(self) -> list:
        """The live SAs that are dead or within a quarter jump of their reservation:
        the counters of all are read in C and compared with numpy, so a check
        costs about a millisecond per 100,000 SAs, not a Python loop over them."""
        if self._arrays is None or self._arrays[0] is not self._live_version:
            keys = list(self._live)
            engines = [self._live[k] for k in keys]
            self._arrays = (self._live_version, keys, engines, None)
        _, keys, engines, limits = self._arrays
        if limits is None or self._arrays_reserved is not self.reserved:
            limits = np.array([max(self.reserved.get(k, 0) - self.jump // 4, 0) for k in keys],
                              dtype=np.uint64)
            self._arrays = self._arrays[:3] + (limits,)
            self._arrays_reserved = self.reserved
        if not keys:
            return []
        try:
            oseq, dead = oseq_array(engines)
        except TypeError:   # stand-ins for engine SAs (tests): read them one by one
            oseq = np.array([e.oseq for e in engines], dtype=np.uint64)
            dead = np.array([bool(e.dead) for e in engines])
        hit = np.flatnonzero(dead | (oseq >= limits))
        return [(keys[i], engines[i]) for i in hit]

    def _fail(self, e: OSError) -> FatalError:
        self.failed = FatalError(f"{self.path}: cannot write the sequence reservations "
                                 f"({e.strerror or e}); sending on could repeat a nonce "
                                 "after a restart")
        return self.failed

    def _write(self, reserved: dict) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"reserved": reserved}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

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
