"""The security association database, with the semantics of Linux XFRM.

Pure and sans-I/O: every call that depends on time takes ``now`` (float
seconds); SPIs are drawn from an injectable :class:`random.Random`.

States and what moves them (the whole life of an SA is :data:`TRANSITIONS`)::

    allocspi ──> larval ──updsa──> valid ──soft──> dying
                   │                 │  ^─updsa─────┘ │
    acquire ──> acquire              └──hard/delete───┴──> (gone)
                   └──hard (acq_expires) / delete / resolved by newsa ──> (gone)

A hard expiry removes the state first, then reports it, as the kernel does
(``xfrm_timer_handler``): whoever handles the EXPIRE no longer finds the SA.
Events are not delivered from here: operations and :meth:`tick` append them
to an outbox that :meth:`drain` empties (:mod:`espdp.xfrm.model` delivers).

Valid SAs own an engine :class:`espdp.engine.SA` in :attr:`table`, the
engine's inbound table.  Where the engine cannot change a live SA (limits,
encapsulation ports, set-mark, replay import), the SA gets a new engine
object carrying the keys, counters, outbound sequence number and replay top
(see :mod:`._sastate`).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections import Counter
from typing import Any, Optional

from ..engine import SATable
from ..errors import XfrmError
from ..sa import Lifetime, Mark, SAInfo, Selector
from . import _sastate as lt
from ._sastate import ACQUIRE, DEAD, DYING, LARVAL, LIVE, VALID, SAState
from .events import AEEvent, ExpireEvent, mark_json, sa_id_json, sa_to_json
from .policy import selector_matches

__all__ = ["ACQUIRE", "DYING", "LARVAL", "TRANSITIONS", "VALID", "SAState",
           "SecurityAssociationDatabase"]

# (status, trigger) -> (new status, EXPIRE to report: None, "soft" or "hard").
# Every change of an SA's status goes through this table and nowhere else.
TRANSITIONS: dict[tuple[str, str], tuple[str, Optional[str]]] = {
    (LARVAL, "complete"): (VALID, None),   # updsa with the full SA
    (LARVAL, "hard"): (DEAD, "hard"),      # its lifetime (or spi_expires) passed
    (LARVAL, "delete"): (DEAD, None),      # delsa, flush, newsa by seq
    (ACQUIRE, "hard"): (DEAD, "hard"),     # acq_expires passed
    (ACQUIRE, "delete"): (DEAD, None),     # flush, newsa resolved it
    (VALID, "soft"): (DYING, "soft"),      # once; a newer SA now wins
    (VALID, "hard"): (DEAD, "hard"),
    (VALID, "delete"): (DEAD, None),
    (VALID, "update"): (VALID, None),      # updsa: lifetimes, encap, set-mark, if_id
    (VALID, "rebind"): (VALID, None),      # migrate, newae
    (DYING, "update"): (VALID, None),      # new lifetimes clear dying
    (DYING, "rebind"): (DYING, None),
    (DYING, "hard"): (DEAD, "hard"),
    (DYING, "delete"): (DEAD, None),
}
ALLOCSPI_TAKEN = "ENOENT"  # xfrm_alloc_spi: a taken SPI (min == max) is ENOENT


def _lookup_mark(mark: Any) -> int:
    """The mark value a request carries (``xfrm_mark_get``: ``v & m``)."""
    if mark is None:
        return 0
    return mark if isinstance(mark, int) else mark.value & mark.mask


def _normal_mark(mark: Optional[Mark]) -> Optional[Mark]:
    """``__xfrm_state_insert`` stores ``v & m``."""
    return None if mark is None else Mark(mark.value & mark.mask, mark.mask)


class SecurityAssociationDatabase:
    """The SAD.  ``spi_expires``: life of a larval ALLOCSPI state when the request
    gives none (espdp's, unlike the kernel); ``acq_expires``: life of an acquire
    state; ``replay_maxdiff``/``replay_maxage``: AE event thresholds."""

    def __init__(self, *, acq_expires: float = 30, spi_expires: float = 60,
                 replay_maxdiff: int = 2, replay_maxage: float = 1.0,
                 rng: Optional[random.Random] = None) -> None:
        self.acq_expires, self.spi_expires = acq_expires, spi_expires
        self.replay_maxdiff, self.replay_maxage = replay_maxdiff, replay_maxage
        self.rng = rng if rng is not None else random.SystemRandom()
        self.table = SATable()
        self.probes = 0  # candidate states examined by lookups: the lookup-cost probe
        self._serial = 0
        self._acqseq = 0
        self._states: dict[int, SAState] = {}
        self._by_id: dict[tuple, list[SAState]] = {}      # (dst, spi, proto), spi != 0
        self._spi_use: Counter = Counter()                  # (spi, proto)
        self._by_tuple: dict[tuple, list[SAState]] = {}   # (dst, src, reqid, mode, proto)
        self._acq: dict[tuple, list[SAState]] = {}        # the same + if_id, acquire states
        self._by_seq: dict[int, list[SAState]] = {}
        self._by_engine: dict[int, SAState] = {}
        self._polled: dict[int, SAState] = {}
        # SAs that inherited packets held while acquiring (Xfrm.ready_queued), so a
        # tick looks at those, not at every SA.
        self.queued: dict[int, SAState] = {}
        self._heap: list = []
        self._tiebreak = itertools.count()
        self._outbox: list = []

    # ------------------------------------------------------------ plumbing

    def drain(self) -> list:
        """The events produced since the last drain, oldest first."""
        out, self._outbox = self._outbox, []
        return out

    def __len__(self) -> int:
        return len(self._states)

    def count(self) -> int:
        """Every state, larval and acquire ones included (the kernel's sadcnt)."""
        return len(self._states)

    def _new_state(self, info: SAInfo, status: str, now: float) -> SAState:
        self._serial += 1
        return SAState(info, status, now, self._serial)

    def next_acquire_seq(self) -> int:
        """``xfrm_get_acqseq``: global, never 0."""
        self._acqseq = self._acqseq % 0xFFFFFFFF + 1
        return self._acqseq

    @staticmethod
    def _tuple(info: SAInfo) -> tuple:
        return (info.dst, info.src, info.reqid, info.mode, info.proto)

    def _add(self, st: SAState) -> SAState:
        self._states[st.serial] = st
        self._link(st)
        return st

    def _link(self, st: SAState) -> None:
        info = st.info
        if info.spi:
            self._by_id.setdefault((info.dst, info.spi, info.proto), []).append(st)
            self._spi_use[(info.spi, info.proto)] += 1
        if st.seq and st.status in (LARVAL, ACQUIRE):
            self._by_seq.setdefault(st.seq, []).append(st)
        if st.status in LIVE:
            self._by_tuple.setdefault(self._tuple(info), []).append(st)
            if lt.polled(st):
                self._polled[st.serial] = st
        elif st.status == ACQUIRE:
            self._acq.setdefault(self._tuple(info) + (info.if_id,), []).append(st)
        self._schedule(st)

    def _unlink(self, st: SAState) -> None:
        info = st.info
        self._polled.pop(st.serial, None)
        if info.spi:
            _remove(self._by_id, (info.dst, info.spi, info.proto), st)
            self._spi_use[(info.spi, info.proto)] -= 1
            if not self._spi_use[(info.spi, info.proto)]:
                del self._spi_use[(info.spi, info.proto)]
        if st.seq:
            _remove(self._by_seq, st.seq, st)
        _remove(self._by_tuple, self._tuple(info), st)
        _remove(self._acq, self._tuple(info) + (info.if_id,), st)

    def _transition(self, st: SAState, trigger: str, now: float,
                    change: Optional[dict] = None) -> None:
        """Apply TRANSITIONS[(status, trigger)]; ``change`` updates the state's fields
        while it is out of the indexes.  A hard EXPIRE is reported after removal."""
        try:
            new, expire = TRANSITIONS[(st.status, trigger)]
        except KeyError:
            raise XfrmError("EINVAL", f"{st!r}: '{trigger}' is not possible when "
                            f"{st.status}") from None
        self._unlink(st)
        for name, value in (change or {}).items():
            setattr(st, name, value)
        if new == DEAD:
            del self._states[st.serial]
            self._detach_engine(st)
            event_json = sa_to_json(st) if expire else None
            st.status = DEAD
            lt.retire(st.engine)
        else:
            st.status = new
            if new in LIVE and st.engine is None:  # a larval state completed: now the newest
                self._attach_engine(st, lt.make_engine(st.info))
                self._states[st.serial] = self._states.pop(st.serial)
            self._link(st)
            event_json = sa_to_json(st) if expire else None
        if expire:
            self._outbox.append(ExpireEvent(event_json, expire == "hard", ref=st))

    def _attach_engine(self, st: SAState, engine: Any) -> None:
        st.engine = engine
        self.table.add(engine)
        self._by_engine[engine.index] = st

    def _detach_engine(self, st: SAState) -> None:
        if st.engine is not None and st.engine.index >= 0:
            self._by_engine.pop(st.engine.index, None)
            self.table.remove(st.engine)


    def state_of(self, sa: Any) -> SAState:
        """The SAD state of an engine SA (or the state itself); ESRCH when gone."""
        if isinstance(sa, SAState):
            if sa.status == DEAD:
                raise XfrmError("ESRCH", f"{sa!r} is gone")
            return sa
        st = self._by_engine.get(getattr(sa, "index", -1))
        if st is None or st.engine is not sa:
            raise XfrmError("ESRCH", f"{sa!r} is not in this SAD")
        return st

    # ------------------------------------------------------------ lookups

    def _locate(self, dst: Any, spi: int, proto: int, mark: int) -> Optional[SAState]:
        """``__xfrm_state_lookup``: (daddr, spi, proto) and ``(mark & m) == v``."""
        self.probes += 1
        for st in self._by_id.get((dst, spi, proto), ()):
            self.probes += 1
            if st.mark_matches(mark):
                return st
        return None

    def lookup(self, dst: Any, spi: int, proto: int = 50, mark: Any = None) -> SAState:
        """getsa/delsa's lookup (``xfrm_user_state_lookup``); ESRCH when absent.
        ``mark`` (a Mark or an int) is matched as the kernel does: ``(v & m) & sa.m == sa.v``."""
        if not isinstance(dst, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            dst = ipaddress.ip_address(dst)
        st = self._locate(dst, spi, proto, _lookup_mark(mark))
        if st is None:
            raise XfrmError("ESRCH", f"no SA dst {dst} spi {spi:#010x} proto {proto}")
        return st

    getsa = lookup

    def find_outbound(self, template: Any, policy: Any, flow: Any) -> Optional[SAState]:
        """``xfrm_state_find``: the valid SA for ``template`` of ``policy`` and ``flow``.

        Matches (daddr, saddr, reqid (exact), mode, proto), the POLICY's mark,
        the policy's if_id, the template's SPI when set, and the SA's selector
        against the flow; prefers a non-dying SA, then the newest."""
        dst, src = lt.template_addresses(template, flow)
        pmark = _lookup_mark(getattr(policy, "mark", None))
        if_id = getattr(policy, "if_id", 0)
        best = None
        for key_src in (src, lt.unspecified(src)):
            self.probes += 1
            for st in self._by_tuple.get((dst, key_src, template.reqid, template.mode,
                                          template.proto), ()):
                self.probes += 1
                if (st.mark_matches(pmark) and st.info.if_id == if_id
                        and st.info.dir != "in"
                        and (not template.spi or template.spi == st.info.spi)
                        and (st.info.selector is None
                             or selector_matches(st.info.selector, flow))
                        and (best is None or lt.better(st, best))):
                    best = st
        return best

    def find_acquire(self, template: Any, policy: Any, flow: Any) -> Optional[SAState]:
        """The acquire state of this SA identity: (saddr, daddr, reqid, mode, proto,
        if_id) and the same mark (the kernel matches the policy mark under the
        state's mask, so an unmarked acquire state would silence marked policies)."""
        dst, src = lt.template_addresses(template, flow)
        key = (dst, src, template.reqid, template.mode, template.proto,
               getattr(policy, "if_id", 0))
        mark = _normal_mark(getattr(policy, "mark", None))
        self.probes += 1
        for st in self._acq.get(key, ()):
            self.probes += 1
            if st.info.mark == mark:  # the same mark: one ACQUIRE per SA identity
                return st
        return None

    @staticmethod
    def inbound_ok(template: Any, sa: Any) -> bool:
        """``xfrm_state_ok``: does SA ``sa`` satisfy inbound ``template``?  reqid and
        SPI 0 are wildcards; a tunnel SA must come from the template's source."""
        info = sa.info
        return (info.proto == template.proto
                and (not template.spi or template.spi == info.spi)
                and (not template.reqid or template.reqid == info.reqid)
                and info.mode == template.mode
                and (info.mode == "transport" or template.src is None
                     or template.src.is_unspecified or template.src == info.src))

    def dump(self, src: Any = None, dst: Any = None, proto: Optional[int] = None,
             spi: Optional[int] = None, mode: Optional[str] = None,
             reqid: Optional[int] = None, flags: frozenset = frozenset()) -> list[SAState]:
        """Every state passing the filters, newest first (the kernel's list order).
        ``src``/``dst`` are addresses or prefixes; ``flags``: any of them."""
        return [st for st in reversed(self._states.values())
                if _in(st.info.src, src) and _in(st.info.dst, dst)
                and (proto is None or st.info.proto == proto)
                and (spi is None or st.info.spi == spi)
                and (mode is None or st.info.mode == mode)
                and (reqid is None or st.info.reqid == reqid)
                and (not flags or flags & st.info.flags)]

    # ------------------------------------------------------------ operations

    def newsa(self, info: SAInfo, now: float) -> SAState:
        """XFRM_MSG_NEWSA.  EEXIST when (daddr, spi, proto, mark) is taken, larval
        states included; on success a matching acquire state goes away."""
        info.validate()
        info = info.replace(mark=_normal_mark(info.mark))
        if not info.spi:
            raise XfrmError("EINVAL", "spi 0 is reserved (RFC 4303)")
        if self._locate(info.dst, info.spi, info.proto, _lookup_mark(info.mark)) is not None:
            raise XfrmError("EEXIST", f"an SA dst {info.dst} spi {info.spi:#010x} "
                            "(or a larval state allocated with that SPI) exists")
        st = self._new_state(info, VALID, now)
        self._attach_engine(st, lt.make_engine(info))
        self._add(st)
        resolved = self._acquire_resolved_by(info)
        if resolved is not None:
            st.queue.extend(resolved.queue)
            if st.queue:
                self.queued[st.serial] = st
            self._transition(resolved, "delete", now)
        return st

    def _acquire_resolved_by(self, info: SAInfo) -> Optional[SAState]:
        """``xfrm_state_add``: the acquire state that a new SA answers, by seq
        (same daddr and proto) or else by (saddr, daddr, reqid, mode, proto, mark, if_id)."""
        mark = _lookup_mark(info.mark)
        for st in self._by_seq.get(info.seq, ()) if info.seq else ():
            if (st.mark_matches(mark) and st.info.proto == info.proto
                    and st.info.dst == info.dst):
                return st
        for st in self._acq.get(self._tuple(info) + (info.if_id,), ()):
            if st.mark_matches(mark):
                return st
        return None

    def updsa(self, info: SAInfo, now: float) -> SAState:
        """XFRM_MSG_UPDSA.  ESRCH when absent (or of another dir).  A larval state
        becomes this SA.  A valid SA takes only the lifetimes (clearing dying), the
        encap ports (same type; adding or removing one is EINVAL), a set-mark and
        a non-zero if_id; keys, algorithms and replay state stay as they are."""
        info.validate()
        info = info.replace(mark=_normal_mark(info.mark))
        st = self._locate(info.dst, info.spi, info.proto, _lookup_mark(info.mark))
        if st is None:
            raise XfrmError("ESRCH", f"no SA dst {info.dst} spi {info.spi:#010x} to update")
        if st.status == LARVAL:
            if info.dir and st.info.dir != info.dir:
                raise XfrmError("ESRCH", f"the larval state is dir {st.info.dir}")
            self._transition(st, "complete", now, {"info": info, "add_time": now,
                                                   "ae_time": now, "seq": info.seq})
            return st
        if st.info.dir != info.dir:
            raise XfrmError("ESRCH", f"the SA is dir {st.info.dir}, the update dir {info.dir}")
        changes = lt.valid_update(st.info, info)
        self._transition(st, "update", now, {"info": st.info.replace(**changes)})
        lt.sync_engine(st)
        return st

    def delsa(self, dst: Any, spi: int, proto: int = 50, mark: Any = None,
              now: float = 0.0) -> SAState:
        """XFRM_MSG_DELSA (any state with an SPI, larval ones included)."""
        st = self.lookup(dst, spi, proto, mark)
        self._transition(st, "delete", now)
        return st

    def flush(self, proto: Optional[int] = None, now: float = 0.0) -> list[SAState]:
        """XFRM_MSG_FLUSHSA: every state of ``proto`` (0 or None: all)."""
        gone = [st for st in self._states.values() if not proto or st.info.proto == proto]
        for st in gone:
            self._transition(st, "delete", now)
        return gone

    def allocspi(self, info: SAInfo, spi_min: int, spi_max: int, now: float,
                 lifetime_hard: Optional[float] = None) -> SAState:
        """XFRM_MSG_ALLOCSPI: the larval state with ``info.seq``, or a new one with a
        random free SPI in [spi_min, spi_max] (min == max: exactly that one).

        Unlike the kernel, the larval state lives ``lifetime_hard`` seconds, or the
        request's ``limit time-hard``, or ``spi_expires``; then EXPIRE (hard)."""
        if spi_min > spi_max:
            raise XfrmError("EINVAL", f"SPI range min {spi_min:#x} > max {spi_max:#x}")
        mark = _normal_mark(info.mark)
        for st in self._by_seq.get(info.seq, ()) if info.seq else ():
            if (st.status == LARVAL and st.info.dst == info.dst
                    and st.mark_matches(_lookup_mark(mark))):
                return st
        spi = self._choose_spi(info.proto, spi_min, spi_max)
        life = lifetime_hard or info.lifetime.hard_add_expires or self.spi_expires
        larval = SAInfo(info.src, info.dst, spi, info.proto, mode=info.mode, reqid=info.reqid,
                        dir=info.dir, seq=info.seq, mark=mark, if_id=info.if_id,
                        lifetime=Lifetime(hard_add_expires=int(life)))
        st = self._new_state(larval, LARVAL, now)
        st.expires_at = now + life
        return self._add(st)

    def _spi_taken(self, spi: int, proto: int) -> bool:
        self.probes += 1
        return (spi, proto) in self._spi_use

    def _choose_spi(self, proto: int, lo: int, hi: int) -> int:
        if lo == hi:
            if lo == 0 or self._spi_taken(lo, proto):
                raise XfrmError(ALLOCSPI_TAKEN, f"SPI {lo:#010x} is already in use")
            return lo
        for _ in range(min(hi - lo + 1, 64)):
            spi = self.rng.randint(lo, hi)
            if spi and not self._spi_taken(spi, proto):
                return spi
        if hi - lo < 1 << 16:  # a small, crowded range: look at every SPI once
            start = self.rng.randint(lo, hi)
            for k in range(hi - lo + 1):
                spi = lo + (start - lo + k) % (hi - lo + 1)
                if spi and not self._spi_taken(spi, proto):
                    return spi
        raise XfrmError(ALLOCSPI_TAKEN, f"no SPI available in {lo:#x}..{hi:#x}")

    def acquire(self, policy: Any, template: Any, flow: Any, now: float) -> tuple[SAState, bool]:
        """The acquire state for ``template`` of ``policy`` and ``flow``: the one that
        exists for (saddr, daddr, reqid, mode, proto, mark, if_id), or a new one
        (spi 0, exact-flow selector, the policy's mark and if_id, ``acq_expires``)."""
        found = self.find_acquire(template, policy, flow)
        if found is not None:
            return found, False
        dst, src = lt.template_addresses(template, flow)
        host = 32 if flow.dst.version == 4 else 128
        sel = Selector(ipaddress.ip_network(f"{flow.src}/{host}"),
                       ipaddress.ip_network(f"{flow.dst}/{host}"), flow.proto,
                       flow.sport, 0xFFFF, flow.dport, 0xFFFF)
        info = SAInfo(src, dst, 0, template.proto, mode=template.mode, reqid=template.reqid,
                      dir="out", mark=_normal_mark(getattr(policy, "mark", None)),
                      if_id=getattr(policy, "if_id", 0), selector=sel,
                      lifetime=Lifetime(hard_add_expires=int(self.acq_expires)))
        st = self._new_state(info, ACQUIRE, now)
        st.expires_at = now + self.acq_expires
        st.acquire_for = (policy, template, flow)
        return self._add(st), True

    def announce(self, st: SAState) -> int:
        """Give acquire state ``st`` its ACQUIRE seq (``build_acquire``); returns it."""
        if not st.announced:
            self._unlink(st)
            st.seq, st.announced = self.next_acquire_seq(), True
            self._link(st)
        return st.seq

    def note_use(self, sa: Any, now: float) -> None:
        """The dataplane used ``sa`` (first use starts the use-time limits)."""
        st = self.state_of(sa)
        if st.use_time is None:
            self._unlink(st)
            st.use_time = now
            self._link(st)

    # ------------------------------------------------------------ replay state (AE)

    def getae(self, dst: Any, spi: int, proto: int = 50, mark: Any = None) -> dict:
        """XFRM_MSG_GETAE: id, replay state and current lifetime of a valid SA."""
        st = self.lookup(dst, spi, proto, mark)
        return self._ae_json(st)

    def _ae_json(self, st: SAState) -> dict:
        return {"id": sa_id_json(st.info), "saddr": str(st.info.src), "reqid": st.info.reqid,
                "replay": st.replay_state(), "current": st.current(),
                "mark": mark_json(st.info.mark), "if_id": st.info.if_id}

    def newae(self, dst: Any, spi: int, proto: int = 50, mark: Any = None, *,
              seq: Optional[int] = None, oseq: Optional[int] = None,
              seq_hi: Optional[int] = None, oseq_hi: Optional[int] = None,
              bitmap: Optional[int] = None, current: Optional[dict] = None,
              now: float = 0.0) -> SAState:
        """XFRM_MSG_NEWAE: replace replay state and/or current lifetime.  ESRCH when
        absent, EINVAL when not valid or when nothing is given."""
        st = self.lookup(dst, spi, proto, mark)
        if st.status not in LIVE:
            raise XfrmError("EINVAL", f"{st!r} is not a valid SA")
        if all(v is None for v in (seq, oseq, seq_hi, oseq_hi, bitmap, current)):
            raise XfrmError("EINVAL", "newae needs replay state or a current lifetime")
        top, new_oseq = lt.replay_values(st, seq, seq_hi, oseq, oseq_hi)
        counters = None
        if current is not None:
            counters = {k: current[k] for k in ("bytes", "packets") if k in current}
            st.add_time = current.get("add_time", st.add_time)
            st.use_time = current.get("use_time") or st.use_time
        replay_given = seq is not None or seq_hi is not None or bitmap is not None
        lt.sync_engine(st, top=top if replay_given else None, bitmap=bitmap,
                       counters=counters)
        st.engine.oseq = new_oseq
        self._transition(st, "rebind", now)
        st.ae_last = lt.ae_snapshot(st)
        self._outbox.append(AEEvent(**self._ae_json(st), reason="update", ref=st))
        return st

    def _check_ae(self, now: float) -> None:
        """XFRM_REPLAY_UPDATE / _TIMEOUT, checked at each tick."""
        for st in list(self._states.values()):
            if st.status not in LIVE:
                continue
            snap = lt.ae_snapshot(st)
            last = st.ae_last
            if self.replay_maxdiff and (snap[0] - last[0] >= self.replay_maxdiff
                                        or snap[1] - last[1] >= self.replay_maxdiff):
                reason = "seq"
            elif self.replay_maxage and now - st.ae_time >= self.replay_maxage and snap != last:
                reason = "timer"
            else:
                continue
            st.ae_last, st.ae_time = snap, now
            self._outbox.append(AEEvent(**self._ae_json(st), reason=reason, ref=st))

    # ------------------------------------------------------------ migrate

    def migrate_find(self, old_src: Any, old_dst: Any, proto: int, mode: str, reqid: int = 0,
                     if_id: int = 0) -> Optional[SAState]:
        """``xfrm_migrate_state_find``: a valid SA by old addresses, mode, proto and
        reqid (0: any), if_id (0: any)."""
        for st in self._states.values():
            i = st.info
            if (st.status in LIVE and i.src == old_src and i.dst == old_dst
                    and i.proto == proto and i.mode == mode
                    and (not reqid or i.reqid == reqid) and (not if_id or i.if_id == if_id)):
                return st
        return None

    def migrate_state(self, st: SAState, new_src: Any, new_dst: Any, now: float,
                      encap: Any = None) -> None:
        """Move ``st`` to new outer addresses (and encap); same keys, counters,
        replay state and engine object.  EEXIST if the new id is taken."""
        changes: dict = {"src": new_src, "dst": new_dst}
        if encap is not None:
            changes["encap"] = encap
        new = st.info.replace(**changes)
        clash = self._locate(new.dst, new.spi, new.proto, _lookup_mark(new.mark))
        if clash is not None and clash is not st:
            raise XfrmError("EEXIST", f"migrating to dst {new_dst}: spi {new.spi:#010x} "
                            "is taken there")
        self._transition(st, "rebind", now, {"info": new})
        lt.sync_engine(st)

    # ------------------------------------------------------------ timers

    def _schedule(self, st: SAState) -> None:
        deadline = lt.next_deadline(st)
        if deadline != st.deadline:
            st.deadline = deadline
            if deadline is not None:
                heapq.heappush(self._heap, (deadline, next(self._tiebreak), st))

    def tick(self, now: float, aevents: bool = True) -> list:
        """Run lifetimes (time, bytes, packets), larval and acquire expiry and, when
        ``aevents``, AE events; returns every event produced (the outbox, drained)."""
        while self._heap and self._heap[0][0] <= now:
            deadline, _, st = heapq.heappop(self._heap)
            if st.status != DEAD and st.deadline == deadline:
                st.deadline = None
                trigger = lt.time_trigger(st, now)
                if trigger:
                    self._transition(st, trigger, now)
                else:
                    self._schedule(st)
        for st in list(self._polled.values()):
            if st.status in LIVE:
                self._poll(st, now)
        if aevents:
            self._check_ae(now)
        return self.drain()

    def _poll(self, st: SAState, now: float) -> None:
        counters = st.counters()
        if st.use_time is None and counters["packets"]:
            self.note_use(st, now)
        trigger = lt.count_trigger(st, counters)
        if trigger:
            self._transition(st, trigger, now)


# ---------------------------------------------------------------- helpers

def _remove(index: dict, key: Any, st: SAState) -> None:
    bucket = index.get(key)
    if bucket and st in bucket:
        bucket.remove(st)
        if not bucket:
            del index[key]


def _in(addr: Any, want: Any) -> bool:
    if want is None:
        return True
    if isinstance(want, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return addr.version == want.version and addr in want
    return addr == want
